"""TCGA sites: FLamby's Fed-TCGA-BRCA regions (`tcga-region`), GDC spellings of one institution merged (`tcga`),
patient and slide barcodes cross-checked, and the shipped tables matching their provenance."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from importlib import resources
from pathlib import Path

import pytest

from fedpath.simulation.cohorts import (
    FLAMBY_REGIONS,
    OTHER_SITE,
    CohortError,
    derive_cohort,
    site_aliases,
    tcga_regions,
    tss_table,
)
from tests.helpers import write_csv

DATA = resources.files("fedpath.simulation") / "data"


def _slides(root: Path, rows: list[tuple[str, str]]) -> Path:
    """A manifest of (slide_id, patient_id), labels alternating, with slide paths (not opened by a derivation)."""
    root.mkdir(parents=True, exist_ok=True)
    body = [[s, p, "x", str(i % 2), f"slides/{s}.svs"] for i, (s, p) in enumerate(rows)]
    return write_csv(root / "slides.csv", ["slide_id", "patient_id", "site", "label", "slide"], body)


def _one_patient_each(*codes: str) -> list[tuple[str, str]]:
    return [(f"TCGA-{c}-{i:04d}-01A-01-TS1", f"TCGA-{c}-{i:04d}") for i, c in enumerate(codes)]


# --- tcga-region: FLamby's Fed-TCGA-BRCA centres ------------------------------------------------------------


def test_flamby_table_has_six_regions_and_other() -> None:
    regions = tcga_regions()
    assert len(regions) == 111
    assert set(regions.values()) == {*FLAMBY_REGIONS, "Other"}
    assert {regions[c] for c in ("PL", "JL", "5L", "TM")} == {"Other"}  # Nigeria, Pakistan, Brazil, Australia


def test_real_codes_map_to_their_region(tmp_path: Path) -> None:
    rows = _one_patient_each("BH", "A8", "C8", "AR", "A2", "B6", "AO")
    cohort = derive_cohort(
        _slides(tmp_path, rows), tmp_path / "cohort.csv", source="tcga-region", min_patients=1
    )
    assert cohort.sites == {"Northeast": 2, "Europe": 1, "Canada": 1, "Midwest": 1, "West": 1, "South": 1}
    assert cohort.members["Northeast"] == ["AO", "BH"]
    with (tmp_path / "cohort.csv").open() as f:
        derived = {r["slide_id"][5:7]: (r["site"], r["tss"]) for r in csv.DictReader(f)}
    assert derived["BH"] == ("Northeast", "BH") and derived["A8"] == ("Europe", "A8")
    assert derived["C8"] == ("Canada", "C8")
    assert "6 regions" in cohort.notes[0]


def test_codes_flamby_leaves_out_go_to_other_with_a_note(tmp_path: Path) -> None:
    # PL (Nigeria) is region Other; 34 (University of Pittsburgh) is a GDC code FLamby's table lacks; ZZ is in no
    # table. Patient TCGA-PL-0001 has two slides.
    rows = [
        *_one_patient_each("BH", "A8", "34", "ZZ"),
        ("TCGA-PL-0001-01A-01-TS1", "TCGA-PL-0001"),
        ("TCGA-PL-0001-01A-02-TS2", "TCGA-PL-0001"),
    ]
    cohort = derive_cohort(
        _slides(tmp_path, rows), tmp_path / "cohort.csv", source="tcga-region", min_patients=1
    )
    assert cohort.sites == {"Northeast": 1, "Europe": 1, OTHER_SITE: 3}
    assert cohort.members[OTHER_SITE] == ["34", "PL", "ZZ"]
    note = next(n for n in cohort.notes if "leave out" in n)
    assert note.startswith(
        "3 patient(s) at TSS codes that FLamby's six centres leave out are at site 'other'"
    )
    assert "region 'Other' in FLamby's table: PL" in note and "not in FLamby's table: 34, ZZ" in note


def test_small_regions_merge_into_other(tmp_path: Path) -> None:
    rows = _one_patient_each("BH", "E2", "A8", "AA", "A2")  # Northeast 2, Europe 2, West 1
    cohort = derive_cohort(
        _slides(tmp_path, rows), tmp_path / "cohort.csv", source="tcga-region", min_patients=2
    )
    assert cohort.sites == {"Northeast": 2, "Europe": 2, OTHER_SITE: 1}
    assert cohort.members[OTHER_SITE] == ["A2"]
    assert any("1 region(s) with fewer than 2 patients merged into site 'other'" in n for n in cohort.notes)


# --- tcga: one site per institution, whatever its GDC spelling ----------------------------------------------


def test_spellings_of_one_institution_are_one_site(tmp_path: Path) -> None:
    assert (tss_table()["AQ"].site, tss_table()["DE"].site) == ("UNC", "University of North Carolina")
    assert (tss_table()["VT"].site, tss_table()["CR"].site) == ("Vanderbilt", "Vanderbilt University")
    rows = _one_patient_each("AQ", "DE", "DE", "VT", "CR")
    cohort = derive_cohort(_slides(tmp_path, rows), tmp_path / "cohort.csv", source="tcga", min_patients=1)
    assert cohort.sites == {"University of North Carolina": 3, "Vanderbilt University": 2}
    assert cohort.members == {
        "University of North Carolina": ["AQ", "DE"],
        "Vanderbilt University": ["CR", "VT"],
    }
    note = next(n for n in cohort.notes if "spelling" in n)
    assert note.startswith("2 other GDC spelling(s)")
    assert "University of North Carolina ← UNC; Vanderbilt University ← Vanderbilt" in note


def test_alias_table_names_gdc_spellings_without_chains() -> None:
    rows = list(csv.DictReader(io.StringIO((DATA / "tcga_site_aliases.csv").read_text(encoding="utf-8"))))
    gdc = {s.site for s in tss_table().values()}
    spellings = [r["spelling"] for r in rows]
    assert len(spellings) == len(set(spellings)) == len(site_aliases())
    assert set(spellings) <= gdc, set(spellings) - gdc
    institutions = {r["institution"] for r in rows}
    assert not institutions & set(spellings)  # no chains: an institution is never itself an alias
    assert institutions <= gdc  # every institution is one of the GDC's own spellings
    flamby = re.compile(r"^FLamby centers\.csv names both [0-9A-Z, ]+ so$")
    reasons = {"case", "punctuation", "typo", "abbreviation", "suffix"}
    assert all(r["why"] in reasons or flamby.match(r["why"]) for r in rows), rows
    assert all(r["spelling"] != r["institution"] for r in rows)
    # kept apart on purpose: another campus, or one institution submitting for another hospital
    for apart in ("Mayo Clinic Arizona", "Washington University - Emory", "BLN - University of Miami"):
        assert apart not in site_aliases() and apart not in institutions


def test_shipped_tables_match_their_provenance() -> None:
    provenance = (DATA / "PROVENANCE.md").read_text(encoding="utf-8")
    recorded = dict(re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", provenance, re.MULTILINE))
    shipped = sorted(f.name for f in DATA.iterdir() if f.name.endswith((".csv", ".tsv")))
    assert {"tcga_regions.csv", "tcga_site_aliases.csv"} <= set(shipped)
    assert sorted(recorded) == shipped
    for name in shipped:
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == recorded[name], name


# --- patient id and slide id must name one patient -----------------------------------------------------------


@pytest.mark.parametrize("source", ["tcga", "tcga-region"])
def test_patient_and_slide_barcodes_of_two_patients_are_an_error(tmp_path: Path, source: str) -> None:
    rows = [
        ("TCGA-BH-0001-01A-01-TS1", "TCGA-BH-0001"),
        ("TCGA-A2-0002-01A-01-TS1", "TCGA-BH-0002"),  # line 3: another TSS code
        ("TCGA-A8-0003-01A-01-TS1", "TCGA-A8-0003"),
        ("TCGA-A8-0005-01A-01-TS1", "TCGA-A8-0004-01A"),  # line 5: same code, another patient
        ("slide-6.svs", "TCGA-A8-0006"),  # a slide id that is no barcode is not cross-checked
    ]
    manifest, out = _slides(tmp_path, rows), tmp_path / "out" / "cohort.csv"
    with pytest.raises(CohortError) as err:
        derive_cohort(manifest, out, source=source, min_patients=1)
    message = str(err.value)
    assert message.startswith("2 slide(s) whose patient id and slide id are barcodes of different patients")
    assert (
        f"{manifest}, line 3: patient_id 'TCGA-BH-0002' and slide_id 'TCGA-A2-0002-01A-01-TS1' differ: "
        "TSS codes BH and A2"
    ) in message
    assert (
        f"{manifest}, line 5: patient_id 'TCGA-A8-0004-01A' and slide_id 'TCGA-A8-0005-01A-01-TS1' differ: "
        "TCGA-A8-0004 and TCGA-A8-0005"
    ) in message
    assert "line 6" not in message
    assert not out.exists() and not out.parent.exists()  # nothing written when the derivation fails
