"""The cohort manifest: one CSV row per slide, loaded into a typed `Manifest` or a `ManifestError`.

Columns: ``slide_id``, ``patient_id``, ``site``, ``label`` and at least one of ``features`` (the slide's
feature file) and ``slide`` (the slide image). Optional: ``mpp`` (µm/px at level 0, for slides whose metadata
lacks it); ``split`` (``train`` or ``test``: a cohort's own fixed test set, such as CAMELYON16's official
test slides, which the ``official`` protocol of `fedpath compare` tests on; every slide of a patient in one part).
Relative paths are resolved against the manifest's folder. Any other column is kept in `extra` (``split``
canonical: trimmed, lower case).
"""

from __future__ import annotations

import csv
import io
import math
import os
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fedpath.common.atomic import write_text_atomic

REQUIRED_COLUMNS = ("slide_id", "patient_id", "site", "label")
PATH_COLUMNS = ("features", "slide")
KNOWN_COLUMNS = (*REQUIRED_COLUMNS, *PATH_COLUMNS, "mpp")
SPLIT_COLUMN = "split"
SPLIT_VALUES = ("train", "test")
MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class Problem:
    line: int | None
    column: str | None
    message: str

    def render(self, path: Path) -> str:
        where = [str(path)]
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.column is not None:
            where.append(f"column '{self.column}'")
        return f"{', '.join(where)}: {self.message}"


class ManifestError(ValueError):
    """Everything wrong with a manifest, each problem naming the file, the line and the column."""

    def __init__(self, path: Path, problems: Sequence[Problem]) -> None:
        self.path = path
        self.problems = list(problems)
        shown = [p.render(path) for p in self.problems[:MAX_LISTED_PROBLEMS]]
        more = len(self.problems) - len(shown)
        if more > 0:
            shown.append(f"... and {more} more problems")
        super().__init__("\n".join(shown))


@dataclass(frozen=True)
class SlideRecord:
    """One manifest row. `line` is the CSV line number (the header is line 1)."""

    slide_id: str
    patient_id: str
    site: str
    label: str
    label_index: int
    features: Path | None
    slide: Path | None
    mpp: float | None
    line: int
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteSummary:
    site: str
    slides: int
    patients: int
    label_counts: dict[str, int]


@dataclass(frozen=True)
class Manifest:
    path: Path
    classes: tuple[str, ...]
    slides: tuple[SlideRecord, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sites(self) -> list[str]:
        """Sites in order of first appearance."""
        return list(dict.fromkeys(s.site for s in self.slides))

    def for_site(self, site: str) -> Manifest:
        if site not in self.sites:
            raise KeyError(f"{self.path}: no site '{site}'; sites are {', '.join(self.sites)}")
        return replace(self, slides=tuple(s for s in self.slides if s.site == site))

    def for_patients(self, patients: Iterable[str]) -> Manifest:
        keep = set(patients)
        return replace(self, slides=tuple(s for s in self.slides if s.patient_id in keep))

    def patients(self) -> dict[str, list[SlideRecord]]:
        """Each patient's slides, patients in order of first appearance."""
        out: dict[str, list[SlideRecord]] = defaultdict(list)
        for s in self.slides:
            out[s.patient_id].append(s)
        return dict(out)

    @property
    def has_official_split(self) -> bool:
        """Whether the manifest states its own test set (a ``split`` column)."""
        return any(SPLIT_COLUMN in s.extra for s in self.slides)

    def official_test(self) -> frozenset[str]:
        """The patients of the manifest's own test set (``split`` = ``test``); empty without that column."""
        return frozenset(s.patient_id for s in self.slides if s.extra.get(SPLIT_COLUMN) == "test")

    def patient_labels(self) -> dict[str, int]:
        """A patient's label index: the most frequent among its slides (ties: the higher class)."""
        out = {}
        for pid, slides in self.patients().items():
            counts = Counter(s.label_index for s in slides)
            out[pid] = max(counts, key=lambda k: (counts[k], k))
        return out

    def summary(self) -> list[SiteSummary]:
        rows = []
        for site in self.sites:
            sub = self.for_site(site)
            counts = Counter(s.label for s in sub.slides)
            rows.append(
                SiteSummary(
                    site=site,
                    slides=len(sub.slides),
                    patients=len(sub.patients()),
                    label_counts={c: counts.get(c, 0) for c in self.classes},
                )
            )
        return rows


def canonical_label(text: str) -> str:
    """One spelling per class: text trimmed; a number written as a number (``1``, ``1.0`` and ``01`` are the
    same class, ``1``; ``0.50`` is ``0.5``). Case is kept: ``LUAD`` and ``luad`` are refused, not merged."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        return text
    if not math.isfinite(value):
        return text
    return str(int(value)) if value.is_integer() else format(value, "g")


def class_order(
    found: Iterable[str], *, classes: Sequence[str] | None = None, positive: str | None = None
) -> tuple[str, ...] | None:
    """The classes in index order that a command declares: `classes` as given, else the labels `found`
    (sorted); with `positive` (two classes only) moved to index 1, the class a binary task's AUROC,
    sensitivity and report call positive. None when neither is given: `load_manifest` sorts what it finds.
    A ValueError says what is wrong in the user's terms."""
    if classes is None and positive is None:
        return None
    order = (
        tuple(dict.fromkeys(canonical_label(str(c)) for c in classes if str(c).strip()))
        if classes is not None
        else _sort_labels(canonical_label(x) for x in found if x.strip())
    )
    if positive is None:
        return order
    chosen = canonical_label(positive)
    if len(order) != 2:
        raise ValueError(
            f"--positive {positive}: a positive class needs a two-class task, but the classes are {list(order)}; "
            "with more classes each one is reported against the rest"
        )
    if chosen not in order:
        raise ValueError(f"--positive {positive} is not one of the classes {list(order)}")
    return (next(c for c in order if c != chosen), chosen)


def _sort_labels(labels: Iterable[str]) -> tuple[str, ...]:
    unique = set(labels)
    try:
        return tuple(sorted(unique, key=float))
    except ValueError:
        return tuple(sorted(unique))


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path(os.path.normpath(base / p))


def _case_variants(rows: Sequence[tuple[int, dict[str, str]]]) -> list[Problem]:
    """Labels that differ only in case ('LUAD', 'luad'): one problem per other spelling, naming both spellings
    and the line where each first appears (a silent extra class would be worse)."""
    first: dict[str, int] = {}
    for line, row in rows:
        if row["label"]:
            first.setdefault(row["label"], line)
    by_fold: dict[str, list[str]] = defaultdict(list)
    for label in first:
        by_fold[label.casefold()].append(label)
    problems = []
    for spellings in by_fold.values():
        for other in spellings[1:]:
            problems.append(
                Problem(
                    first[other],
                    "label",
                    f"label '{other}' differs from '{spellings[0]}' (line {first[spellings[0]]}) only in case: "
                    "write one class one way at every site",
                )
            )
    return problems


DELIMITERS = (",", "\t", ";", "|")


def _delimiter(text: str) -> str:
    """The delimiter of a manifest: of the common ones (comma, tab, semicolon, bar), the one whose header
    names the most of the required columns (a spreadsheet's "CSV" in many locales uses ';'); comma on a tie."""
    first = next(iter(text.splitlines()), "")

    def named(d: str) -> int:
        cells = next(csv.reader([first], delimiter=d), [])
        return sum(c.strip() in REQUIRED_COLUMNS for c in cells)

    return max(DELIMITERS, key=lambda d: (named(d), d == ","))


def load_manifest(
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    require: str | None = None,
    check_files: bool = True,
) -> Manifest:
    """Load and validate a manifest (comma, tab, semicolon or bar separated; UTF-8 with or without a BOM).

    classes: the declared label classes in index order; labels outside them are errors. When omitted the
    classes are the labels found, sorted (numerically where all are numbers).
    require: ``"features"`` or ``"slide"`` to demand that column for every row.
    check_files: check that every feature file named exists (slide images are checked by extraction).
    """
    p = Path(path)
    if not p.exists():
        raise ManifestError(p, [Problem(None, None, "manifest file does not exist")])
    base = p.resolve().parent
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ManifestError(p, [Problem(None, None, f"not UTF-8 text ({err})")]) from err
    reader = csv.DictReader(io.StringIO(text), delimiter=_delimiter(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    problems: list[Problem] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if require is not None and require not in header:
        missing.append(require)
    if missing:
        problems.extend(
            Problem(1, c, f"missing column (the header has: {', '.join(header) or 'nothing'})")
            for c in missing
        )
    if not any(c in header for c in PATH_COLUMNS):
        problems.append(Problem(1, None, "needs a 'features' column, a 'slide' column, or both"))
    if problems:
        raise ManifestError(p, problems)

    rows: list[tuple[int, dict[str, str]]] = []
    for i, raw in enumerate(reader):
        line = i + 2
        if None in raw:
            problems.append(Problem(line, None, f"more fields than the header's {len(header)} columns"))
        row = {k: (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue  # blank line
        rows.append((line, row))

    declared = tuple(canonical_label(str(c)) for c in classes) if classes is not None else None
    for _, row in rows:
        row["label"] = canonical_label(row["label"])
    problems.extend(_case_variants(rows))
    found_labels = [r["label"] for _, r in rows if r["label"]]
    class_list = declared if declared is not None else _sort_labels(found_labels)
    class_index = {c: k for k, c in enumerate(class_list)}

    records: list[SlideRecord] = []
    first_line_of_slide: dict[str, int] = {}
    site_of_patient: dict[str, tuple[str, int]] = {}
    split_of_patient: dict[str, tuple[str, int]] = {}
    for line, row in rows:
        for col in REQUIRED_COLUMNS:
            if not row[col]:
                problems.append(Problem(line, col, "empty value" if col == "label" else "empty id"))
        sid, pid, site, label = row["slide_id"], row["patient_id"], row["site"], row["label"]
        if sid:
            if sid in first_line_of_slide:
                problems.append(
                    Problem(
                        line,
                        "slide_id",
                        f"duplicate slide '{sid}' (first on line {first_line_of_slide[sid]})",
                    )
                )
            else:
                first_line_of_slide[sid] = line
        if pid and site:
            if pid in site_of_patient and site_of_patient[pid][0] != site:
                other, other_line = site_of_patient[pid]
                problems.append(
                    Problem(
                        line,
                        "site",
                        f"patient '{pid}' is at site '{site}' here but at site '{other}' on line {other_line}; "
                        "a patient belongs to one site",
                    )
                )
            else:
                site_of_patient.setdefault(pid, (site, line))
        if label and label not in class_index:
            problems.append(
                Problem(
                    line, "label", f"label '{label}' is not one of the declared classes {list(class_list)}"
                )
            )
        features = _resolve(base, row["features"]) if row.get("features") else None
        slide = _resolve(base, row["slide"]) if row.get("slide") else None
        if require is not None and not row.get(require):
            problems.append(Problem(line, require, f"empty path; every row needs a {require} path"))
        elif features is None and slide is None:
            problems.append(Problem(line, None, "neither a features path nor a slide path"))
        if check_files and features is not None and not features.is_file():
            problems.append(Problem(line, "features", f"feature file does not exist: {features}"))
        mpp: float | None = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = -1.0
            if not (np.isfinite(mpp) and mpp > 0):
                problems.append(
                    Problem(line, "mpp", f"'{row['mpp']}' is not a positive number of µm per pixel")
                )
                mpp = None
        if SPLIT_COLUMN in row:
            row[SPLIT_COLUMN] = part = row[SPLIT_COLUMN].lower()
            if part not in SPLIT_VALUES:
                problems.append(
                    Problem(
                        line, SPLIT_COLUMN, f"'{part}' is neither 'train' nor 'test' (the cohort's own split)"
                    )
                )
            elif pid:
                other, other_line = split_of_patient.setdefault(pid, (part, line))
                if other != part:
                    problems.append(
                        Problem(
                            line,
                            SPLIT_COLUMN,
                            f"patient '{pid}' is in '{part}' here but in '{other}' on line {other_line}; all "
                            "of a patient's slides belong to one part",
                        )
                    )
        extra = {k: v for k, v in row.items() if k not in KNOWN_COLUMNS}
        records.append(
            SlideRecord(sid, pid, site, label, class_index.get(label, -1), features, slide, mpp, line, extra)
        )
    if not records and not problems:
        problems.append(Problem(None, None, "no slides (the manifest has a header but no rows)"))
    if problems:
        raise ManifestError(p, problems)
    return Manifest(path=p, classes=class_list, slides=tuple(records))


def write_manifest(path: str | os.PathLike[str], slides: Sequence[SlideRecord]) -> Path:
    """Write slides as a manifest CSV atomically; paths are written relative to the manifest's folder."""
    p = Path(path)
    base = p.resolve().parent
    extra_cols = list(dict.fromkeys(k for s in slides for k in s.extra))
    has = {c: any(getattr(s, c) is not None for s in slides) for c in ("features", "slide", "mpp")}
    cols = [*REQUIRED_COLUMNS, *(c for c in ("features", "slide", "mpp") if has[c]), *extra_cols]

    def rel(x: Path | None) -> str:
        if x is None:
            return ""
        try:
            return os.path.relpath(x.resolve(), base)
        except ValueError:  # another drive (Windows)
            return str(x.resolve())

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for s in slides:
        values = {
            "slide_id": s.slide_id,
            "patient_id": s.patient_id,
            "site": s.site,
            "label": s.label,
            "features": rel(s.features),
            "slide": rel(s.slide),
            "mpp": "" if s.mpp is None else repr(s.mpp),
            **s.extra,
        }
        w.writerow([values.get(c, "") for c in cols])
    write_text_atomic(p, buf.getvalue())
    return p


# ---------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class PatientSplit:
    """Disjoint patient ids of one site for training, validation and testing."""

    train: frozenset[str]
    val: frozenset[str]
    test: frozenset[str]


def _allocate(sizes: Sequence[int], fraction: float) -> list[int]:
    """Per-stratum counts summing to round(total·fraction), by largest remainder (stratified rounding)."""
    ideal = np.asarray(sizes, dtype=float) * fraction
    counts = np.floor(ideal).astype(int)
    target = round(float(np.sum(sizes)) * fraction)
    order = np.argsort(-(ideal - counts), kind="stable")
    for k in order[: max(0, target - int(counts.sum()))]:
        counts[k] += 1
    return [int(min(c, s)) for c, s in zip(counts, sizes, strict=True)]


def _shuffled_strata(
    patients: Sequence[str], labels: dict[str, int], num_classes: int, rng: np.random.Generator
) -> list[list[str]]:
    """The patients grouped by label index (class order), each group sorted by id, then shuffled by `rng`."""
    strata = [sorted(p for p in patients if labels[p] == k) for k in range(num_classes)]
    return [[str(p) for p in rng.permutation(s)] if s else [] for s in strata]


def split_patients(
    manifest: Manifest, *, val: float = 0.15, test: float = 0.25, seed: int = 0, official: bool = False
) -> dict[str, PatientSplit]:
    """Per-site patient-level split, stratified by the patient's label, reproducible from `seed`.

    No patient appears in two parts; all of a patient's slides go where the patient goes. `official`: the
    test part is the manifest's own (``split`` column, `Manifest.official_test`) and `test` must be 0; the
    other patients are split into training and validation as usual.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"fractions val={val}, test={test} must be in [0, 1) and sum below 1")
    if official and test:
        raise ValueError("the official split fixes the test patients: give test=0")
    labels = manifest.patient_labels()
    fixed = manifest.official_test() if official else frozenset()
    out: dict[str, PatientSplit] = {}
    for site in manifest.sites:
        # seeded by the site's name, not its position: a hospital's own one-site manifest and a simulation
        # over the whole cohort give that site the same split
        rng = np.random.default_rng([seed, zlib.crc32(site.encode("utf-8"))])
        patients = list(manifest.for_site(site).patients())
        strata = _shuffled_strata([p for p in patients if p not in fixed], labels, manifest.num_classes, rng)
        sizes = [len(s) for s in strata]
        n_test = _allocate(sizes, test)
        n_val = _allocate(
            [s - t for s, t in zip(sizes, n_test, strict=True)], val / (1 - test) if test < 1 else 0
        )
        tr: set[str] = set()
        va: set[str] = set()
        te: set[str] = set()
        for s, nt, nv in zip(strata, n_test, n_val, strict=True):
            te.update(s[:nt])
            va.update(s[nt : nt + nv])
            tr.update(s[nt + nv :])
        te.update(p for p in patients if p in fixed)
        out[site] = PatientSplit(frozenset(tr), frozenset(va), frozenset(te))
    return out


def patient_folds(manifest: Manifest, folds: int, *, seed: int = 0) -> list[frozenset[str]]:
    """`folds` disjoint sets of patients that cover every patient once (cross-validation), reproducible from
    `seed`; all of a patient's slides go where the patient goes.

    Stratified by the patient's label over the whole cohort: the patients of one class are dealt round-robin
    over the folds, so two folds' counts of a class differ by at most one (and, as a class's patients are
    dealt site by site, so do their counts of one site's patients of that class). A fold can only hold every
    class when `folds` is at most the number of patients in the smallest class.
    """
    if folds < 2:
        raise ValueError(f"{folds} fold(s): cross-validation needs at least 2")
    labels = manifest.patient_labels()
    # its own stream: the same seed's `split_patients` draws from per-site streams
    rng = np.random.default_rng([seed, zlib.crc32(b"patient folds")])
    by_site = [
        _shuffled_strata(list(manifest.for_site(s).patients()), labels, manifest.num_classes, rng)
        for s in manifest.sites
    ]
    dealt = [p for k in range(manifest.num_classes) for strata in by_site for p in strata[k]]
    out: list[set[str]] = [set() for _ in range(folds)]
    for i, patient in enumerate(dealt):
        out[i % folds].add(patient)
    return [frozenset(f) for f in out]
