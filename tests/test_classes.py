"""Declared classes and the positive class of a binary task (--classes, --positive): one order from the manifest
check to the sites, the run config, the comparison's settings and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpath.client.site import IncompatibleSite, SiteRef, load_site
from fedpath.common.manifest import class_order, load_manifest
from fedpath.common.runconfig import RunConfig
from fedpath.simulation.cohorts import synthetic_cohort
from fedpath.simulation.compare import CompareConfig, CompareError, run_comparison
from tests.helpers import run_cli, write_csv, write_feature_file


def test_the_positive_class_goes_second_and_wrong_uses_say_why() -> None:
    assert class_order(["LUSC", "LUAD"]) is None  # nothing declared: load_manifest sorts
    assert class_order(["LUAD", "LUSC"], positive="LUAD") == ("LUSC", "LUAD")
    assert class_order([], classes=["0", "1.0"], positive="0") == ("1", "0")  # canonical numbers
    assert class_order([], classes=["b", "a", "c"]) == ("b", "a", "c")  # the declared index order
    with pytest.raises(ValueError, match=r"needs a two-class task.*each one is reported against the rest"):
        class_order(["a", "b", "c"], positive="a")
    with pytest.raises(ValueError, match=r"--positive luad is not one of the classes \['LUAD', 'LUSC'\]"):
        class_order(["LUAD", "LUSC"], positive="luad")


def _two_labels(tmp_path: Path, labels: tuple[str, str] = ("LUAD", "LUSC")) -> Path:
    f = write_feature_file(tmp_path / "f.h5", dim=4)
    rows = [[f"s{i}", f"p{i}", "AB"[i % 2], labels[(i // 2) % 2], str(f)] for i in range(8)]
    return write_csv(tmp_path / "m.csv", ["slide_id", "patient_id", "site", "label", "features"], rows)


def test_manifest_check_states_the_positive_class(tmp_path: Path) -> None:
    manifest = _two_labels(tmp_path)
    result = run_cli("manifest", "check", str(manifest), "--positive", "LUAD")
    assert result.returncode == 0, result.stderr
    assert "classes ['LUSC', 'LUAD'], positive class 'LUAD'" in result.stdout
    result = run_cli("manifest", "check", str(manifest), "--positive", "LUXX")
    assert result.returncode == 2 and "--positive LUXX is not one of the classes" in result.stderr


def test_a_site_indexes_its_labels_in_the_runs_order(tmp_path: Path) -> None:
    manifest = _two_labels(tmp_path)
    run = RunConfig(
        in_dim=4, manifest=str(manifest), classes="LUSC,LUAD", val_fraction=0.0, test_fraction=0.0
    )
    site = load_site(SiteRef(manifest, "A"), run)
    assert site.classes == ("LUSC", "LUAD")
    labels = {s.patient_id: s.label for s in load_manifest(manifest).slides}
    assert site.train and all(b.label == ("LUSC", "LUAD").index(labels[b.patient_id]) for b in site.train)
    other = RunConfig(
        in_dim=4, manifest=str(manifest), classes="LUAD,KIRC", val_fraction=0.0, test_fraction=0.0
    )
    with pytest.raises(IncompatibleSite, match=r"labels \['LUSC'\], which are not among the run's classes"):
        load_site(SiteRef(manifest, "B"), other)


def test_the_coordinator_needs_classes_for_a_positive_class(tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = [
        "run",
        "--superlink",
        "127.0.0.1:9",
        "--insecure",
        "--out",
        str(out),
        "--sites",
        "2",
        "--in-dim",
        "4",
    ]
    result = run_cli(*base, "--positive", "LUAD")
    assert result.returncode == 2 and "--positive needs --classes" in result.stderr and not out.exists()
    result = run_cli(*base, "--classes", "a,b,c", "--num-classes", "2", "--positive", "a")
    assert result.returncode == 2 and "needs a two-class task" in result.stderr


def test_a_declared_order_reaches_the_report_and_is_kept_on_resume(tmp_path: Path) -> None:
    cohort = synthetic_cohort(tmp_path / "cohort", sites=2, slides=48, dim=4)
    config = CompareConfig(protocols=("internal",), methods=("pooled",), seeds=1, rounds=1)
    out = tmp_path / "run"
    outcome = run_comparison(cohort.manifest, out, config, n_boot=20, say=lambda _: None, classes=("1", "0"))
    assert json.loads((out / "settings.json").read_text())["classes"] == ["1", "0"]
    assert outcome.analysis is not None and outcome.analysis.positive == "0"
    assert "Patients (0)" in (out / "report.md").read_text()
    with pytest.raises(
        CompareError, match=r"classes: \['1', '0'\] → None"
    ):  # not mixed with the default order
        run_comparison(cohort.manifest, out, config, n_boot=20, say=lambda _: None)
