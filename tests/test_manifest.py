from pathlib import Path

import pytest

from fedpath.common.manifest import ManifestError, load_manifest, split_patients, write_manifest
from tests.helpers import run_cli, write_csv, write_feature_file

HEADER = ["slide_id", "patient_id", "site", "label", "features"]


@pytest.fixture
def feats(tmp_path: Path) -> Path:
    d = tmp_path / "feats"
    d.mkdir()
    for name in ("a", "b", "c", "d"):
        write_feature_file(d / f"{name}.h5", slide_id=name)
    return d


def good_rows() -> list[list[str]]:
    return [
        ["a", "p1", "H1", "0", "feats/a.h5"],
        ["b", "p1", "H1", "0", "feats/b.h5"],
        ["c", "p2", "H2", "1", "feats/c.h5"],
        ["d", "p3", "H2", "0", "feats/d.h5"],
    ]


def error_of(path: Path, **kwargs: object) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_valid_manifest_resolves_paths_against_its_folder(tmp_path: Path, feats: Path) -> None:
    m = load_manifest(write_csv(tmp_path / "m.csv", HEADER, good_rows()))
    assert m.classes == ("0", "1")
    assert m.sites == ["H1", "H2"]
    assert m.slides[0].features == (tmp_path / "feats" / "a.h5").resolve()
    assert {pid: len(s) for pid, s in m.patients().items()} == {"p1": 2, "p2": 1, "p3": 1}
    summary = {s.site: s for s in m.summary()}
    assert summary["H1"].slides == 2 and summary["H1"].patients == 1
    assert summary["H2"].label_counts == {"0": 1, "1": 1}


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_semicolon_tab_and_bar_separated_manifests_read_as_the_comma_one(
    tmp_path: Path, feats: Path, delimiter: str
) -> None:
    """A spreadsheet's export in many locales separates by ';' (with a BOM, and quotes where a value holds the
    separator): it reads to the same slides as the comma-separated file, and its errors name the same lines."""
    comma = load_manifest(write_csv(tmp_path / "comma.csv", HEADER, good_rows()))
    rows = [[f'"{v}"' if i == 2 else v for i, v in enumerate(r)] for r in good_rows()]
    text = "\ufeff" + "\n".join(delimiter.join(r) for r in [HEADER, *rows]) + "\n"
    other = tmp_path / "other.csv"
    other.write_text(text, encoding="utf-8")
    loaded = load_manifest(other)
    assert [(s.slide_id, s.patient_id, s.site, s.label, s.features) for s in loaded.slides] == [
        (s.slide_id, s.patient_id, s.site, s.label, s.features) for s in comma.slides
    ]
    other.write_text(text.replace(f"{delimiter}p2{delimiter}", f"{delimiter}{delimiter}"), encoding="utf-8")
    assert "line 4, column 'patient_id': empty id" in str(error_of(other))


def test_missing_column_names_file_and_column(tmp_path: Path, feats: Path) -> None:
    rows = [r[:1] + r[2:] for r in good_rows()]
    path = write_csv(tmp_path / "m.csv", ["slide_id", "site", "label", "features"], rows)
    err = error_of(path)
    assert str(path) in str(err)
    assert "line 1, column 'patient_id': missing column" in str(err)


def test_empty_id_names_line_and_column(tmp_path: Path, feats: Path) -> None:
    rows = good_rows()
    rows[2][1] = ""
    err = str(error_of(write_csv(tmp_path / "m.csv", HEADER, rows)))
    assert "line 4, column 'patient_id': empty id" in err


def test_duplicate_slide_names_both_lines(tmp_path: Path, feats: Path) -> None:
    rows = good_rows()
    rows[3][0] = "a"
    err = str(error_of(write_csv(tmp_path / "m.csv", HEADER, rows)))
    assert "line 5, column 'slide_id': duplicate slide 'a' (first on line 2)" in err


def test_patient_at_two_sites_is_an_error(tmp_path: Path, feats: Path) -> None:
    rows = good_rows()
    rows[2][1] = "p1"  # p1 is at H1 on lines 2-3; here at H2
    err = str(error_of(write_csv(tmp_path / "m.csv", HEADER, rows)))
    assert "line 4, column 'site': patient 'p1' is at site 'H2' here but at site 'H1' on line 2" in err


def test_label_outside_declared_classes(tmp_path: Path, feats: Path) -> None:
    rows = good_rows()
    rows[1][3] = "2"
    err = str(error_of(write_csv(tmp_path / "m.csv", HEADER, rows), classes=["0", "1"]))
    assert "line 3, column 'label': label '2' is not one of the declared classes ['0', '1']" in err


def test_missing_feature_file(tmp_path: Path, feats: Path) -> None:
    rows = good_rows()
    rows[0][4] = "feats/nope.h5"
    err = str(error_of(write_csv(tmp_path / "m.csv", HEADER, rows)))
    assert "line 2, column 'features': feature file does not exist" in err
    assert "nope.h5" in err
    # without the file check the same manifest loads (extraction will create the files)
    assert len(load_manifest(tmp_path / "m.csv", check_files=False).slides) == 4


def test_all_problems_reported_at_once(tmp_path: Path, feats: Path) -> None:
    rows = good_rows()
    rows[0][0] = ""
    rows[3][4] = "feats/missing.h5"
    err = error_of(write_csv(tmp_path / "m.csv", HEADER, rows))
    assert len(err.problems) == 2
    assert [p.line for p in err.problems] == [2, 5]


def test_no_path_column_and_bad_mpp(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", ["slide_id", "patient_id", "site", "label"], [["a", "p", "H", "0"]])
    assert "needs a 'features' column, a 'slide' column, or both" in str(error_of(path))
    path = write_csv(
        tmp_path / "m2.csv",
        ["slide_id", "patient_id", "site", "label", "slide", "mpp"],
        [["a", "p", "H", "0", "a.svs", "x"]],
    )
    assert "line 2, column 'mpp': 'x' is not a positive number" in str(error_of(path))


def test_write_then_load_round_trip(tmp_path: Path, feats: Path) -> None:
    m = load_manifest(write_csv(tmp_path / "m.csv", HEADER, good_rows()))
    out = tmp_path / "sub" / "copy.csv"
    write_manifest(out, m.slides)
    assert "../feats/a.h5" in out.read_text()  # relative to the new manifest's folder
    again = load_manifest(out)
    assert [(s.slide_id, s.features) for s in again.slides] == [(s.slide_id, s.features) for s in m.slides]


def _big_manifest(tmp_path: Path, n_patients: int = 120) -> Path:
    rows = []
    f = write_feature_file(tmp_path / "x.h5")
    for i in range(n_patients):
        site = f"H{i % 3}"
        label = "1" if i % 4 == 0 else "0"
        for k in range(1 + i % 3):  # up to three slides per patient
            rows.append([f"s{i}-{k}", f"p{i}", site, label, f.name])
    return write_csv(tmp_path / "big.csv", HEADER, rows)


def test_splits_are_patient_level_stratified_and_seeded(tmp_path: Path) -> None:
    m = load_manifest(_big_manifest(tmp_path))
    splits = split_patients(m, val=0.2, test=0.25, seed=7)
    labels = m.patient_labels()
    for site, split in splits.items():
        parts = [split.train, split.val, split.test]
        for i in range(3):
            for j in range(i + 1, 3):
                assert not parts[i] & parts[j], f"patient on two sides at {site}"
        site_patients = set(m.for_site(site).patients())
        assert split.train | split.val | split.test == site_patients
        # stratified: each part's positive share within one patient of the site's share
        pos_share = sum(labels[p] for p in site_patients) / len(site_patients)
        for part in parts:
            assert abs(sum(labels[p] for p in part) - pos_share * len(part)) <= 1.0
        assert abs(len(split.test) - 0.25 * len(site_patients)) <= 1
    assert split_patients(m, val=0.2, test=0.25, seed=7) == splits
    # a site's split does not depend on which other sites share its manifest
    alone = split_patients(m.for_site("H1"), val=0.2, test=0.25, seed=7)
    assert alone["H1"] == splits["H1"]
    assert split_patients(m, val=0.2, test=0.25, seed=8) != splits


def test_manifest_check_cli(tmp_path: Path, feats: Path) -> None:
    good = write_csv(tmp_path / "m.csv", HEADER, good_rows())
    ok = run_cli("manifest", "check", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "H1" in ok.stdout and "total" in ok.stdout and "OK" in ok.stdout
    rows = good_rows()
    rows[1][0] = "a"
    bad = write_csv(tmp_path / "bad.csv", HEADER, rows)
    fail = run_cli("manifest", "check", str(bad))
    assert fail.returncode == 1
    assert "line 3, column 'slide_id': duplicate slide 'a'" in fail.stderr


def test_numbers_that_are_the_same_number_are_one_class(tmp_path: Path, feats: Path) -> None:
    """Sites labelled 0/1 and one labelled 0.0/1.0: two classes, not four (as before this rule)."""
    rows = good_rows()
    rows[2][3], rows[3][3] = "1.0", "0.0"
    m = load_manifest(write_csv(tmp_path / "m.csv", HEADER, rows))
    assert m.classes == ("0", "1") and [s.label for s in m.slides] == ["0", "0", "1", "0"]
    assert [s.label_index for s in m.slides] == [0, 0, 1, 0]
    declared = load_manifest(write_csv(tmp_path / "d.csv", HEADER, rows), classes=["0.0", "1"])
    assert declared.classes == ("0", "1")
    rows[0][3], rows[1][3], rows[2][3], rows[3][3] = " LUAD", "LUAD ", "LUSC", "LUAD"
    assert load_manifest(write_csv(tmp_path / "t.csv", HEADER, rows)).classes == ("LUAD", "LUSC")


def test_labels_that_differ_only_in_case_are_an_error_naming_both(tmp_path: Path, feats: Path) -> None:
    rows = good_rows()
    rows[0][3], rows[1][3], rows[2][3], rows[3][3] = "LUAD", "LUAD", "LUSC", "luad"
    err = str(error_of(write_csv(tmp_path / "m.csv", HEADER, rows)))
    assert "line 5, column 'label': label 'luad' differs from 'LUAD' (line 2) only in case" in err


def test_deep_check_opens_every_file_and_names_line_and_file(tmp_path: Path) -> None:
    """Broken feature files that the plain check passes: not HDF5, NaN values, another dimension, no tiles,
    another encoder; and a slide path that does not exist. Each is named with its line and file."""
    import numpy as np

    from fedpath.common.features import FeatureMeta, write_features

    d = tmp_path / "feats"
    d.mkdir()
    names = ["ok1", "ok2", "ok3", "text", "nan", "dim", "empty", "vit"]
    for i, name in enumerate(names[:3]):
        write_feature_file(d / f"{name}.h5", seed=i, slide_id=name)
    (d / "text.h5").write_text("not an HDF5 file")
    meta = FeatureMeta("x", "test", "none", 224, 112.0, 0.5)
    write_features(d / "nan.h5", np.full((4, 8), np.nan), np.zeros((4, 2)), meta)
    write_feature_file(d / "dim.h5", dim=16, slide_id="dim")
    write_features(d / "empty.h5", np.zeros((0, 8)), np.zeros((0, 2)), meta)
    write_features(
        d / "vit.h5", np.ones((3, 8)), np.zeros((3, 2)), FeatureMeta("v", "vit_large", "abc", 224, 112.0, 0.5)
    )
    rows = [
        [n, f"p{i}", "H1" if i % 2 else "H2", str(i % 2), f"feats/{n}.h5", ""] for i, n in enumerate(names)
    ]
    rows[0][5] = "/nope/a.svs"
    manifest = write_csv(tmp_path / "m.csv", [*HEADER, "slide"], rows)
    plain = run_cli("manifest", "check", str(manifest))
    assert plain.returncode == 0, plain.stderr  # what the plain check lets through
    deep = run_cli("manifest", "check", str(manifest), "--deep")
    assert deep.returncode == 1
    err = deep.stderr
    assert "6 problem(s)" in err, err
    assert "line 2, column 'slide': /nope/a.svs: slide file does not exist" in err
    assert "line 5, column 'features'" in err and "text.h5: not a readable HDF5 feature file" in err
    assert "line 6, column 'features'" in err and "NaN" in err
    assert "line 7, column 'features': 16-dimensional features, but 8 in most files (e.g. line 2)" in err
    assert "line 8, column 'features'" in err and "holds no tiles" in err
    assert (
        "line 9, column 'features': made otherwise than most files: encoder: most files 'test', features 'vit_large'"
        in err
    )
    good = write_csv(tmp_path / "good.csv", HEADER, [r[:5] for r in rows[:3]])
    ok = run_cli("manifest", "check", str(good), "--deep")
    assert ok.returncode == 0 and "every feature file read" in ok.stdout, ok.stderr
