"""Which hospital (site) each slide comes from: the manifest's own `site` column, TCGA tissue source sites,
or the two CAMELYON16 hospitals.

* ``manifest`` — the `site` column as it is.
* ``tcga`` — the tissue source site (TSS) code, characters 6-7 of the TCGA barcode (``TCGA-CR-7395-...``),
  read from the patient id or else the slide id, named with the GDC table (``Source Site``, package data
  ``data/tcga_tissue_source_sites.tsv``) and the institution that spelling names (``data/tcga_site_aliases.csv``:
  ``UNC`` and ``University of North Carolina`` are one hospital). One institution that submitted to several
  studies under several codes is one site. Sites with fewer than `min_patients` patients are merged into one
  site ``other``: too few patients give no usable AUROC at a held-out site. Codes missing from the table keep
  ``TSS-XX`` as name. Empty patient ids are filled with the 12-character patient barcode; a patient id and a
  slide id that are barcodes of two patients are an error.
* ``tcga-region`` — the same TSS code mapped to its region as FLamby's Fed-TCGA-BRCA defines its six centres
  (Northeast, South, West, Midwest, Europe, Canada; package data ``data/tcga_regions.csv``). Codes FLamby's
  centres leave out (not in its table, or its region ``Other``) go to site ``other``; small regions merge as
  for ``tcga``.
* ``camelyon16`` — RUMC or UMCU for each CAMELYON16 slide (``normal_001``, ``tumor_012.tif``, ``test_040``),
  as FLamby's Fed-Camelyon16 defines its centres (package data ``data/camelyon16_sites.csv``).

Cohorts made rather than derived: `synthetic_cohort` (`fedpath.simulation.synth` with strong site shift) and
`mil_cohort`, which turns a multiple-instance table (MUSK1, MUSK2: molecules as bags of conformations, the
classic MIL benchmark) into one fedpath feature file per bag (raw values) and a manifest whose sites are dealt
stratified by label, in equal shares (round-robin) or unequal ones (``size_skew``, as `fedpath synth`).

`derive_cohort` writes the manifest with the derived `site` column (feature and slide paths made absolute,
every other column kept) and returns what was done in words, for the report. The derived manifest is then
loaded and checked like any other, so a patient whose slides land at two sites is an error naming the line.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedpath.common.atomic import write_text_atomic
from fedpath.common.manifest import PATH_COLUMNS, ManifestError, SlideRecord, load_manifest, write_manifest

SITE_SOURCES = ("manifest", "tcga", "tcga-region", "camelyon16")
TCGA_SOURCES = ("tcga", "tcga-region")
OTHER_SITE = "other"
TCGA_BARCODE = re.compile(r"^TCGA-([A-Z0-9]{2})-([A-Z0-9]{4})", re.IGNORECASE)
_CAMELYON16_ID = re.compile(r"^(normal|tumor|test)_(\d{1,3})$", re.IGNORECASE)


@dataclass(frozen=True)
class TissueSourceSite:
    code: str  # two characters, upper case
    site: str  # the submitting institution ("Source Site")
    study: str


@dataclass(frozen=True)
class Cohort:
    """A manifest whose `site` column says which hospital each slide comes from, and how it was derived."""

    manifest: Path
    source: str  # one of SITE_SOURCES, "synthetic", or the name of a MIL table (musk1, musk2)
    sites: dict[str, int]  # site → patients, in manifest order
    notes: tuple[str, ...]  # what was derived or merged, one sentence each (for the report)
    members: dict[str, list[str]] = field(default_factory=dict)  # site → TSS codes or table names it holds


class CohortError(ValueError):
    """Slides whose site cannot be derived; the message names the file, the lines and what to do."""


def _data_text(name: str) -> str:
    return (resources.files("fedpath.simulation") / "data" / name).read_text(encoding="utf-8")


@cache
def tss_table() -> dict[str, TissueSourceSite]:
    """The GDC table of TCGA tissue source sites: code → institution and study."""
    rows = csv.DictReader(io.StringIO(_data_text("tcga_tissue_source_sites.tsv")), delimiter="\t")
    out = {}
    for row in rows:
        code = row["TSS Code"].strip().upper()
        if len(code) == 2:
            out[code] = TissueSourceSite(code, row["Source Site"].strip(), row["Study Name"].strip())
    return out


@cache
def site_aliases() -> dict[str, str]:
    """GDC spelling of a tissue source site → the institution it names, for the spellings that differ
    (``UNC`` → ``University of North Carolina``); the table gives the reason of each."""
    rows = csv.DictReader(io.StringIO(_data_text("tcga_site_aliases.csv")))
    return {row["spelling"].strip(): row["institution"].strip() for row in rows}


def tcga_institution(code: str) -> str:
    """The site name of a TSS code: its institution (GDC spelling, aliases merged), or ``TSS-XX`` if unknown."""
    site = tss_table().get(code)
    return site_aliases().get(site.site, site.site) if site else f"TSS-{code}"


# FLamby's Fed-TCGA-BRCA centres, one per region; its table's region "Other" is in none of them
FLAMBY_REGIONS = ("Northeast", "South", "West", "Midwest", "Europe", "Canada")


@cache
def tcga_regions() -> dict[str, str]:
    """FLamby's Fed-TCGA-BRCA table: TSS code → region (one of `FLAMBY_REGIONS`, or ``Other``)."""
    rows = csv.DictReader(io.StringIO(_data_text("tcga_regions.csv")))
    return {row["TSS Code"].strip().upper(): row["Region"].strip() for row in rows}


@cache
def camelyon16_table() -> dict[str, str]:
    """CAMELYON16 slide id (``normal_001``) → hospital (``RUMC`` or ``UMCU``)."""
    rows = csv.DictReader(io.StringIO(_data_text("camelyon16_sites.csv")))
    return {row["slide_id"].strip().lower(): row["site"].strip() for row in rows}


@cache
def camelyon16_labels() -> dict[str, str]:
    """CAMELYON16 slide id → slide-level label (``1`` = tumour), from the same shipped table."""
    rows = csv.DictReader(io.StringIO(_data_text("camelyon16_sites.csv")))
    return {row["slide_id"].strip().lower(): row["label"].strip() for row in rows}


def camelyon16_split(slide_id: str) -> str:
    """The official CAMELYON16 split of a normalised slide id: ``test`` for ``test_NNN``, else ``train``."""
    return "test" if slide_id.startswith("test_") else "train"


def tss_code(barcode: str) -> str | None:
    """The TSS code of a TCGA barcode (``TCGA-CR-7395-01A`` → ``CR``), or None if it is not one."""
    found = TCGA_BARCODE.match(barcode.strip())
    return found.group(1).upper() if found else None


def tcga_patient(barcode: str) -> str | None:
    """The patient part of a TCGA barcode (``TCGA-CR-7395-01A-01-TS1`` → ``TCGA-CR-7395``)."""
    found = TCGA_BARCODE.match(barcode.strip())
    return f"TCGA-{found.group(1)}-{found.group(2)}".upper() if found else None


def camelyon16_slide(slide_id: str) -> str | None:
    """Normalised CAMELYON16 slide id: folder and extension dropped, lower case, 3-digit number."""
    stem = Path(slide_id.strip()).name.split(".")[0]
    found = _CAMELYON16_ID.match(stem)
    return f"{found.group(1).lower()}_{int(found.group(2)):03d}" if found else None


def merge_small_sites(patients: dict[str, int], min_patients: int) -> dict[str, str]:
    """Site → site it is kept as: itself, or ``other`` when it has fewer than `min_patients` patients."""
    return {s: (s if n >= min_patients else OTHER_SITE) for s, n in patients.items()}


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    if not path.is_file():
        raise CohortError(f"{path}: manifest file does not exist")
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig")))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    rows = [
        (i + 2, {k: (v or "").strip() for k, v in r.items() if k is not None})
        for i, r in enumerate(reader)
        if any((v or "").strip() for k, v in r.items() if k is not None)
    ]
    if "slide_id" not in header:
        raise CohortError(f"{path}: no 'slide_id' column (the header has: {', '.join(header)})")
    return header, rows


def _problems(path: Path, bad: list[tuple[int, str]], what: str, fix: str) -> CohortError:
    shown = "\n".join(f"{path}, line {line}: {text}" for line, text in bad[:10])
    more = f"\n... and {len(bad) - 10} more" if len(bad) > 10 else ""
    return CohortError(f"{len(bad)} slide(s) {what}:\n{shown}{more}\n{fix}")


def _tcga_codes(path: Path, rows: list[tuple[int, dict[str, str]]], source: str) -> list[str]:
    """The TSS code of each row, from the patient id or else the slide id. Fills empty patient ids from the slide
    barcode and adds the `tss` column. Rows without a TCGA barcode, and rows whose patient id and slide id are
    barcodes of two patients, are errors naming every such line."""
    codes, bad, mismatched = [], [], []
    for line, row in rows:
        patient, slide = row.get("patient_id", ""), row["slide_id"]
        code = tss_code(patient) or tss_code(slide)
        if code is None:
            bad.append((line, f"'{slide}' (patient '{patient}') is not a TCGA barcode"))
            continue
        of_patient, of_slide = tcga_patient(patient), tcga_patient(slide)
        if of_patient and of_slide and of_patient != of_slide:
            differ = (
                f"TSS codes {tss_code(patient)} and {tss_code(slide)}"
                if tss_code(patient) != tss_code(slide)
                else f"{of_patient} and {of_slide}"
            )
            mismatched.append((line, f"patient_id '{patient}' and slide_id '{slide}' differ: {differ}"))
        codes.append(code)
        if not patient:
            row["patient_id"] = of_slide or ""
        row["tss"] = code
    if bad:
        raise _problems(
            path, bad, "without a TCGA barcode", f"--sites-from {source} needs ids like TCGA-CR-7395-01A."
        )
    if mismatched:
        raise _problems(
            path,
            mismatched,
            "whose patient id and slide id are barcodes of different patients",
            "the site would depend on which id is read: correct the patient_id or the slide_id of these lines.",
        )
    return codes


def _keep_large(
    names: list[str],
    codes: list[str],
    rows: list[tuple[int, dict[str, str]]],
    min_patients: int,
    what: str,
) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Each row's site once sites of fewer than `min_patients` patients are merged into ``other``; the note
    on that merge (`what`: "institution" or "region"); site → the TSS codes it holds."""
    patients_at: dict[str, set[str]] = defaultdict(set)
    for name, (_, row) in zip(names, rows, strict=True):
        patients_at[name].add(row.get("patient_id") or row["slide_id"])
    counts = {s: len(p) for s, p in patients_at.items()}
    kept = merge_small_sites(counts, min_patients)
    members: dict[str, set[str]] = defaultdict(set)
    for name, code in zip(names, codes, strict=True):
        members[kept[name]].add(code)
    merged = sorted(s for s, k in kept.items() if k == OTHER_SITE and s != OTHER_SITE)
    notes = []
    if merged:
        other = sum(n for s, n in counts.items() if kept[s] == OTHER_SITE)
        notes.append(
            f"{len(merged)} {what}(s) with fewer than {min_patients} patients merged into site "
            f"'{OTHER_SITE}' ({sum(counts[s] for s in merged)} patients): {', '.join(merged)}."
            + (
                f" '{OTHER_SITE}' itself has fewer than {min_patients} patients."
                if other < min_patients
                else ""
            )
        )
    return [kept[n] for n in names], notes, {s: sorted(c) for s, c in members.items()}


def _tcga(
    path: Path, rows: list[tuple[int, dict[str, str]]], min_patients: int
) -> tuple[list[str], list[str], dict[str, list[str]]]:
    table, aliases = tss_table(), site_aliases()
    codes = _tcga_codes(path, rows, "tcga")
    names = [tcga_institution(c) for c in codes]
    unknown = sorted({c for c in codes if c not in table})
    spellings: dict[str, set[str]] = defaultdict(set)  # institution → its other GDC spellings in this cohort
    for code in set(codes) - set(unknown):
        if table[code].site in aliases:
            spellings[aliases[table[code].site]].add(table[code].site)
    sites, merge_notes, members = _keep_large(names, codes, rows, min_patients, "institution")
    notes = [
        f"Sites from TCGA barcodes: tissue source site code → submitting institution (GDC table); "
        f"{len(set(names))} institutions ({len(set(codes))} TSS codes) found."
    ]
    if spellings:
        notes.append(
            f"{sum(map(len, spellings.values()))} other GDC spelling(s) of an institution merged into it "
            f"(tcga_site_aliases.csv): "
            + "; ".join(f"{inst} ← {', '.join(sorted(s))}" for inst, s in sorted(spellings.items()))
            + "."
        )
    if unknown:
        notes.append(f"TSS codes not in the GDC table kept as their own sites: {', '.join(unknown)}.")
    return sites, notes + merge_notes, members


def _tcga_region(
    path: Path, rows: list[tuple[int, dict[str, str]]], min_patients: int
) -> tuple[list[str], list[str], dict[str, list[str]]]:
    regions = tcga_regions()
    codes = _tcga_codes(path, rows, "tcga-region")
    names = [regions[c] if regions.get(c) in FLAMBY_REGIONS else OTHER_SITE for c in codes]
    sites, merge_notes, members = _keep_large(names, codes, rows, min_patients, "region")
    found = sorted({n for n in names if n != OTHER_SITE}, key=FLAMBY_REGIONS.index)
    notes = [
        f"Sites from TCGA barcodes: tissue source site code → region, as FLamby's Fed-TCGA-BRCA defines its "
        f"six centres (FLamby's centers.csv); {len(found)} regions ({', '.join(found) or 'none'}) found."
    ]
    left_out: dict[str, set[str]] = defaultdict(set)  # TSS code → its patients, for codes FLamby leaves out
    for code, name, (_, row) in zip(codes, names, rows, strict=True):
        if name == OTHER_SITE:
            left_out[code].add(row["patient_id"])
    if left_out:
        kinds = {
            "region 'Other' in FLamby's table": sorted(c for c in left_out if c in regions),
            "not in FLamby's table": sorted(c for c in left_out if c not in regions),
        }
        notes.append(
            f"{len(set().union(*left_out.values()))} patient(s) at TSS codes that FLamby's six centres leave out "
            f"are at site '{OTHER_SITE}': "
            + "; ".join(f"{kind}: {', '.join(cs)}" for kind, cs in kinds.items() if cs)
            + "."
        )
    return sites, notes + merge_notes, members


def _camelyon16(
    path: Path, rows: list[tuple[int, dict[str, str]]]
) -> tuple[list[str], list[str], dict[str, list[str]]]:
    table = camelyon16_table()
    sites, bad = [], []
    for line, row in rows:
        key = camelyon16_slide(row["slide_id"])
        if key is None or key not in table:
            bad.append((line, f"'{row['slide_id']}' is not a CAMELYON16 slide id"))
        else:
            sites.append(table[key])
            if not row.get("patient_id"):
                row["patient_id"] = row["slide_id"]  # CAMELYON16 has one slide per patient
            if not row.get("split"):  # the official split (a manifest's own split column is kept)
                row["split"] = camelyon16_split(key)
    if bad:
        raise _problems(
            path,
            bad,
            "not in the CAMELYON16 table",
            "expected ids like normal_001, tumor_012.tif or test_040.",
        )
    notes = [
        "Sites from the CAMELYON16 slide table: RUMC (Radboud) or UMCU (Utrecht), as FLamby's Fed-Camelyon16 "
        "defines its centres; the official split (test_NNN slides: test) in the 'split' column, which "
        "`--protocol official` tests on."
    ]
    return sites, notes, {s: [s] for s in dict.fromkeys(sites)}


def derive_cohort(
    manifest: str | Path, out: str | Path, *, source: str = "manifest", min_patients: int = 20
) -> Cohort:
    """Write `out`, the manifest with the `site` column derived from `source` (see the module docstring),
    load it back (all checks of `load_manifest`) and return the cohort with its notes and sites."""
    src, out = Path(manifest), Path(out)
    if source not in SITE_SOURCES:
        raise CohortError(f"unknown site source '{source}'; choose one of {', '.join(SITE_SOURCES)}")
    header, rows = _read_rows(src)
    if not rows:
        raise CohortError(f"{src}: no slides (a header but no rows)")
    members: dict[str, list[str]] = {}
    if source == "manifest":
        notes = ["Sites from the manifest's site column."]
        sites = [row.get("site", "") for _, row in rows]
    elif source == "tcga":
        sites, notes, members = _tcga(src, rows, min_patients)
    elif source == "tcga-region":
        sites, notes, members = _tcga_region(src, rows, min_patients)
    else:
        sites, notes, members = _camelyon16(src, rows)
    base = src.resolve().parent
    # the header's columns, then what the derivation added (site, patient_id; tss; split)
    columns = list(dict.fromkeys([*header, "site", "patient_id", *(k for _, row in rows for k in row)]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for site, (_, row) in zip(sites, rows, strict=True):
        row["site"] = site
        for (
            col
        ) in PATH_COLUMNS:  # the derived manifest lives elsewhere: keep paths pointing at the same files
            if row.get(col) and not Path(row[col]).expanduser().is_absolute():
                row[col] = str((base / row[col]).resolve())
        writer.writerow([row.get(c, "") for c in columns])
    # checked before anything is written to `out`; problems are told at the user's file and line
    with tempfile.TemporaryDirectory(prefix="fedpath-cohort-") as tmp:
        checked = Path(tmp) / out.name
        checked.write_text(buf.getvalue(), encoding="utf-8")
        try:
            loaded = load_manifest(checked)
        except ManifestError as err:
            source_line = {i + 2: line for i, (line, _) in enumerate(rows)}
            problems = [replace(p, line=source_line.get(p.line or 0, p.line)) for p in err.problems]
            raise CohortError(
                f"{src} with {source} sites is not a valid cohort:\n{ManifestError(src, problems)}"
            ) from None
    patients = Counter(s.site for s in {s.patient_id: s for s in loaded.slides}.values())
    counts = {s: patients[s] for s in loaded.sites}
    if len(counts) < 2:
        raise CohortError(
            f"{src}: {source} sites give only {len(counts)} site ({', '.join(counts)}); a federation needs "
            "at least 2" + (" (lower --min-site-patients)" if source in TCGA_SOURCES else "")
        )
    write_text_atomic(out, buf.getvalue())
    return Cohort(out, source, counts, tuple(notes), members)


# A synthetic cohort whose sites differ strongly (per-site affine scanner/stain shift of 2 noise SDs) and whose
# bags are hard enough that data matter (tumour prototype 2 SDs from normal, 5-20% tumour tiles): the setting in
# which single hospitals transfer badly and a federation has something to gain. Chosen on 4 × 160-slide
# cohorts (see benchmarks/bench_simulator.py); at shift 3 the best single hospital beat pooled and FedProx.
STRONG_SHIFT: dict[str, Any] = {
    "shift": 2.0,
    "size_skew": 0.0,
    "prevalence_skew": 0.0,
    "tiles_median": 60,
    "tiles_max": 200,
    "signal": 2.0,
    "witness_min": 0.05,
    "witness_max": 0.2,
}


def synthetic_cohort(
    out: str | Path,
    *,
    sites: int,
    slides: int,
    dim: int,
    seed: int = 0,
    replace_other: bool = False,
    **knobs: Any,
) -> Cohort:
    """A seeded synthetic cohort (`fedpath.simulation.synth`) in `out`, with the `STRONG_SHIFT` knobs unless
    `knobs` override them. An existing cohort with the same settings is reused; one with other settings is
    an error (FileExistsError), or replaced when `replace_other`."""
    from fedpath.simulation.synth import SynthConfig, synthesize

    config = SynthConfig(sites=sites, slides=slides, dim=dim, seed=seed, **{**STRONG_SHIFT, **knobs})
    try:
        path = synthesize(Path(out), config, progress=False)
    except FileExistsError:
        if not replace_other:
            raise
        path = synthesize(Path(out), config, progress=False, overwrite=True)
    note = (
        f"Synthetic cohort (fedpath synth): {sites} sites, {slides} slides, {dim}-dim features, site shift "
        f"{config.shift:g}, signal {config.signal:g}, seed {seed}."
    )
    return _cohort_of(path, "synthetic", (note,))


def _cohort_of(path: Path, source: str, notes: tuple[str, ...]) -> Cohort:
    manifest = load_manifest(path)
    patients = Counter(s.site for s in {s.patient_id: s for s in manifest.slides}.values())
    return Cohort(path, source, {s: patients[s] for s in manifest.sites}, notes, {})


# --- multiple-instance tables (MUSK1, MUSK2) ----------------------------------------------------------------

MIL_LAYOUTS = {
    "headerless": "no header; column 1 the bag label (0/1), column 2 the bag id, the rest the features "
    "(MUSK1 as musk1.csv)",
    "pmlb": "a header with the bag column 'molecule_name', 'target' (the bag label) and the features; "
    "'conformation_name' (the instance) is dropped (MUSK2 as PMLB's clean2)",
}
MIL_ENCODER = "none (features given by the table)"
MUSK_SIZES = {"musk1": (92, 476), "musk2": (102, 6598)}  # bags, instances (UCI Musk; README of the data)


class MilCohortConfig(BaseModel):
    """How the bags of a multiple-instance table are dealt to sites."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sites: int = Field(4, ge=2, le=26, description="sites to deal the bags to, stratified by label")
    size_skew: float = Field(0.0, ge=0, description="unequal sites: shares ∝ (k+1)^-size_skew (0 = equal)")
    seed: int = Field(0, description="seed of the site assignment")


@dataclass(frozen=True)
class MilBag:
    """One bag of a multiple-instance table: its id, label (0/1), instances (N, D) and first line."""

    bag_id: str
    label: int
    instances: np.ndarray
    line: int


def _open_text(path: Path) -> io.TextIOBase:
    raw = path.read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    return io.StringIO(data.decode("utf-8-sig"))


def read_mil_table(path: str | Path) -> tuple[list[MilBag], str]:
    """The bags of a multiple-instance table (plain or gzipped, comma- or tab-separated) in one of the
    `MIL_LAYOUTS`, and the layout's name. Every instance of a bag must carry the bag's label."""
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"{path}: no such file (give the MUSK1 or MUSK2 table, e.g. musk1.csv)")
    text = _open_text(path)
    first = text.readline()
    text.seek(0)
    delimiter = "\t" if "\t" in first else ","
    rows = csv.reader(text, delimiter=delimiter)
    header = [h.strip() for h in first.strip().split(delimiter)]
    if "molecule_name" in header and "target" in header:
        layout = "pmlb"
        next(rows)
        bag_col, label_col = header.index("molecule_name"), header.index("target")
        skip = {
            bag_col,
            label_col,
            *([header.index("conformation_name")] if "conformation_name" in header else []),
        }
        start = 2
    else:
        layout, bag_col, label_col, skip, start = "headerless", 1, 0, {0, 1}, 1
    bags: dict[str, tuple[int, int, list[list[float]]]] = {}
    width = None
    for line, row in enumerate(rows, start=start):
        if not any(v.strip() for v in row):
            continue
        try:
            values = [float(v) for i, v in enumerate(row) if i not in skip]
            label = int(float(row[label_col]))
        except (ValueError, IndexError):
            raise CohortError(
                f"{path}, line {line}: not a row of numbers in the {layout} layout ({MIL_LAYOUTS[layout]})"
            ) from None
        width = width or len(values)
        if len(values) != width or label not in (0, 1):
            what = f"{len(values)} features, not {width}" if len(values) != width else f"label {label}"
            raise CohortError(f"{path}, line {line}: {what}; expected {MIL_LAYOUTS[layout]}")
        bag = row[bag_col].strip()
        first_line, bag_label, instances = bags.setdefault(bag, (line, label, []))
        if label != bag_label:
            raise CohortError(
                f"{path}, line {line}: bag '{bag}' has label {label} here but {bag_label} on line "
                f"{first_line}; every instance of a bag must carry the bag's label"
            )
        instances.append(values)
    if not bags:
        raise CohortError(f"{path}: no bags found; expected {MIL_LAYOUTS[layout]}")
    return [
        MilBag(bag, label, np.asarray(inst, dtype=np.float32), line)
        for bag, (line, label, inst) in bags.items()
    ], layout


def deal_sites(labels: Sequence[int], sites: int, *, size_skew: float = 0.0, seed: int = 0) -> list[int]:
    """Site index (0 … sites−1) of each item, stratified: every class is dealt over the sites in shares
    ∝ (k+1)^-size_skew (`fedpath synth`'s site sizes; 0 = equal shares, a round-robin), at least one item
    of a class per site where the class has as many items as there are sites."""
    rng = np.random.default_rng(seed)
    shares = np.arange(1, sites + 1, dtype=float) ** -size_skew
    shares /= shares.sum()
    out = np.zeros(len(labels), dtype=int)
    totals = np.zeros(sites, dtype=int)
    for k in sorted(set(labels)):
        items = rng.permutation([i for i, y in enumerate(labels) if y == k])
        least = 1 if len(items) >= sites else 0
        ideal = shares * (len(items) - least * sites)
        counts = np.floor(ideal).astype(int) + least
        # largest remainder; ties (equal shares) go to the sites with fewer items so far
        order = sorted(range(sites), key=lambda s: (-(ideal[s] - np.floor(ideal[s])), totals[s], s))
        for s in order[: len(items) - int(counts.sum())]:
            counts[s] += 1
        out[items] = np.repeat(np.arange(sites), counts)
        totals += counts
    return [int(s) for s in out]


def mil_cohort(
    table: str | Path,
    out: str | Path,
    config: MilCohortConfig,
    *,
    name: str | None = None,
    overwrite: bool = False,
) -> Cohort:
    """Convert a multiple-instance table (MUSK1, MUSK2) into a fedpath cohort in `out`: one feature file per
    bag under ``features/`` (its instances as tiles, raw values: training standardises them from the training
    sites), ``manifest.csv`` (one patient per bag, sites dealt by `deal_sites`) and ``cohort.json``.

    `name` (default: the table's file name up to its first dot, e.g. ``musk1``) prefixes the bag ids. A cohort
    already in `out` from the same table and settings is reused; one from another is a FileExistsError unless
    `overwrite`."""
    from fedpath.common.features import FeatureMeta, write_features
    from fedpath.simulation.synth import site_names

    table, out = Path(table), Path(out)
    if not table.is_file():
        raise CohortError(f"{table}: no such file (give the MUSK1 or MUSK2 table, e.g. musk1.csv)")
    name = name or table.name.split(".")[0]
    manifest_path, info_path = out / "manifest.csv", out / "cohort.json"
    source = {"file": table.name, "sha256": hashlib.sha256(table.read_bytes()).hexdigest()}
    wanted = {"name": name, "source": source, "config": config.model_dump()}
    notes = (
        f"Multiple-instance table {table.name} ({name}): one bag per patient, its instances as tiles; "
        f"{config.sites} sites, bags dealt stratified by label"
        + (f" in shares ∝ (k+1)^-{config.size_skew:g}" if config.size_skew else " in equal shares")
        + f" (seed {config.seed}).",
    )
    if not overwrite and manifest_path.exists() and info_path.exists():
        if {k: v for k, v in json.loads(info_path.read_text()).items() if k in wanted} == wanted:
            return _cohort_of(manifest_path, name, notes)
        raise FileExistsError(
            f"{out} holds a cohort made from another table or with other settings; use another folder"
        )
    bags, layout = read_mil_table(table)
    instances = sum(len(b.instances) for b in bags)
    if name in MUSK_SIZES and MUSK_SIZES[name] != (len(bags), instances):
        bags_expected, instances_expected = MUSK_SIZES[name]
        raise CohortError(
            f"{table}: {len(bags)} bags and {instances} instances, but {name.upper()} has {bags_expected} bags "
            f"and {instances_expected} instances: give the {name.upper()} table, or name the cohort otherwise"
        )
    if len(bags) < config.sites:
        raise CohortError(f"{table}: {len(bags)} bags are too few for {config.sites} sites")
    sites = deal_sites([b.label for b in bags], config.sites, size_skew=config.size_skew, seed=config.seed)
    names = site_names(config.sites)
    width = len(str(len(bags)))
    records = []
    for bag, site in zip(bags, sites, strict=True):
        number = f"{int(bag.bag_id):0{width}d}" if bag.bag_id.isdigit() else None
        slide_id = f"{name}-{number or re.sub(r'[^A-Za-z0-9._-]+', '-', bag.bag_id)}"
        path = out / "features" / f"{slide_id}.h5"
        n = len(bag.instances)
        meta = FeatureMeta(
            slide_id=slide_id,
            encoder=MIL_ENCODER,
            weights_sha256=source["sha256"],
            tile_size_px=1,
            tile_size_um=1.0,
            slide_mpp=None,
            mpp_source="none: instances of a multiple-instance table, not tiles",
            extra={"source_table": table.name, "source_bag": bag.bag_id, "source_line": bag.line},
        )
        # coordinates: the instance's index (a table's instances have no place on a slide)
        write_features(
            path, bag.instances, np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.int64), meta
        )
        records.append(
            SlideRecord(slide_id, slide_id, names[site], str(bag.label), bag.label, path, None, None, 0)
        )
    write_manifest(manifest_path, sorted(records, key=lambda r: r.site))  # site-A first
    dims = {len(b.instances[0]) for b in bags}
    info = {
        **wanted,
        "layout": layout,
        "bags": len(bags),
        "instances": instances,
        "dim": dims.pop(),
        "site_bags": dict(Counter(names[s] for s in sites)),
    }
    write_text_atomic(info_path, json.dumps(info, indent=2) + "\n")
    return _cohort_of(manifest_path, name, notes)


def site_table(
    manifest_path: Path,
    *,
    val_fraction: float,
    test_fraction: float = 0.0,
    split_seed: int,
    local: bool = True,
    classes: Sequence[str] | None = None,
    min_local: int | None = None,
) -> list[str]:
    """The cohort at a glance, printed before a grid or a federation starts: per site its patients, their
    labels, the patients it trains on (LOSO: all but validation; `test_fraction` held back otherwise) and, with
    `local`, what that means for its local model."""
    from fedpath.common.manifest import load_manifest, split_patients
    from fedpath.simulation.verdicts import MIN_HOSPITAL_CLASSES, MIN_HOSPITAL_PATIENTS

    manifest = load_manifest(manifest_path, classes=classes)
    min_local = MIN_HOSPITAL_PATIENTS if min_local is None else min_local
    labels = manifest.patient_labels()
    splits = split_patients(manifest, val=val_fraction, test=test_fraction, seed=split_seed)
    official = manifest.official_test() if manifest.has_official_split else None
    rows = [
        [
            "site",
            "patients",
            *(f"label {c}" for c in manifest.classes),
            *(["official train / test"] if official is not None else []),
            "training",
        ]
    ]
    if local:
        rows[0][-1] = "training (LOSO)"
        rows[0].append("its local model")
    patients_at: dict[str, list[str]] = defaultdict(list)
    for patient, slides in manifest.patients().items():
        patients_at[slides[0].site].append(patient)
    for site in manifest.sites:
        patients = patients_at[site]
        counts = Counter(labels[p] for p in patients)
        train = splits[site].train
        row = [
            site,
            str(len(patients)),
            *(str(counts.get(k, 0)) for k in range(len(manifest.classes))),
            *(
                [f"{len(set(patients) - official)} / {len(official & set(patients))}"]
                if official is not None
                else []
            ),
            str(len(train)),
        ]
        if local:
            if len({labels[p] for p in train}) < MIN_HOSPITAL_CLASSES:
                row.append("none: one class only (AUROC undefined when tested here)")
            elif len(train) < min_local:
                row.append(f"none: too small to train alone (< {min_local} training patients)")
            elif len(train) < MIN_HOSPITAL_PATIENTS:  # --min-local-patients below the report's rule
                row.append(f"trained; never the best hospital (< {MIN_HOSPITAL_PATIENTS} training patients)")
            else:
                row.append("trained, a candidate for the best hospital")
        rows.append(row)
    sized = len(rows[0]) - (1 if local else 0)
    widths = [max(len(r[i]) for r in rows) for i in range(sized)]
    lines = [
        "  ".join([c.ljust(w) for c, w in zip(r[:sized], widths, strict=True)] + r[sized:]).rstrip()
        for r in rows
    ]
    return [*lines, "every site takes part in every federation it is not held out of"] if local else lines
