"""A cohort's own test split (FLamby's Fed-Camelyon16 protocol): the manifest's `split` column, the `official`
protocol of `fedpath compare`, its pooled-test-set AUROC, the dry run on the shipped CAMELYON16 table, and one
rule for pooled and federated training when a class is missing at the training sites."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedpath.client.site import SiteRef, load_site
from fedpath.common.cli import main as fedpath_main
from fedpath.common.manifest import ManifestError, load_manifest, split_patients, write_manifest
from fedpath.common.runconfig import RunConfig
from fedpath.simulation import compare
from fedpath.simulation.cohorts import CohortError, derive_cohort, synthetic_cohort
from fedpath.simulation.compare import CompareConfig, CompareError, federation_manifest, plan, run_comparison
from fedpath.simulation.report.analysis import Evaluation, pooled_test_auroc
from tests.helpers import write_csv, write_feature_file


@pytest.fixture(scope="module")
def split_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 synthetic sites (60 slides, multi-slide patients) whose every third patient is marked 'test'."""
    root = tmp_path_factory.mktemp("official")
    manifest = load_manifest(
        synthetic_cohort(root, sites=3, slides=72, dim=8, multi_slide_fraction=0.3).manifest
    )
    test = {p for i, p in enumerate(manifest.patients()) if i % 3 == 0}
    slides = [
        replace(s, extra={**s.extra, "split": "Test " if s.patient_id in test else "train"})
        for s in manifest.slides
    ]
    return write_manifest(root / "split.csv", slides)


def test_the_split_column_is_canonical_and_checked(split_cohort: Path, tmp_path: Path) -> None:
    manifest = load_manifest(split_cohort)
    assert {s.extra["split"] for s in manifest.slides} == {"train", "test"}  # 'Test ' read as 'test'
    assert manifest.has_official_split and manifest.official_test()
    f = write_feature_file(tmp_path / "a.h5")
    header = ["slide_id", "patient_id", "site", "label", "features", "split"]
    bad = write_csv(
        tmp_path / "bad.csv",
        header,
        [
            ["s1", "p1", "A", "0", str(f), "test"],
            ["s2", "p1", "A", "0", str(f), "train"],
            ["s3", "p2", "A", "1", str(f), "holdout"],
        ],
    )
    with pytest.raises(ManifestError) as err:
        load_manifest(bad)
    text = str(err.value)
    assert "line 3, column 'split': patient 'p1' is in 'train' here but in 'test' on line 2" in text
    assert "line 4, column 'split': 'holdout' is neither 'train' nor 'test'" in text


def test_official_split_tests_on_the_marked_patients_only(split_cohort: Path) -> None:
    manifest = load_manifest(split_cohort)
    marked = manifest.official_test()
    splits = split_patients(manifest, val=0.2, test=0.0, seed=3, official=True)
    assert frozenset().union(*(s.test for s in splits.values())) == marked
    for split in splits.values():
        assert not (split.train | split.val) & marked and split.val and split.train
    # the other patients are split exactly as a manifest without the test patients would be (the federation's)
    rest = manifest.for_patients(set(manifest.patients()) - marked)
    assert {s: (x.train, x.val) for s, x in split_patients(rest, val=0.2, test=0.0, seed=3).items()} == {
        s: (x.train, x.val) for s, x in splits.items()
    }
    with pytest.raises(ValueError, match="fixes the test patients"):
        split_patients(manifest, test=0.2, official=True)


def test_official_plan_tests_every_model_at_every_site_and_never_trains_on_test_patients(
    split_cohort: Path, tmp_path: Path
) -> None:
    manifest = load_manifest(split_cohort)
    marked = manifest.official_test()
    config = CompareConfig(protocols=("official",), methods=("local", "pooled", "fedprox"), seeds=2)
    jobs = plan(manifest, config)
    assert {j.family for j in jobs} == {"local", "pooled", "fedprox"}
    for job in jobs:
        assert {c.test_site for c in job.cells} == set(manifest.sites), job.describe()  # local too, as FLamby
        assert frozenset().union(*(c.test_patients for c in job.cells)) == marked
        assert not (job.train_patients | job.val_patients) & marked
        if job.federated:
            path = federation_manifest(manifest, job, tmp_path / compare.slug(job.label) / str(job.seed))
            assert not {s.patient_id for s in load_manifest(path).slides} & marked  # not even named
            run = RunConfig(in_dim=8, manifest=str(path), val_fraction=config.val_fraction, test_fraction=0.0,
                            split_seed=job.split_seed)  # fmt: skip
            seen = set()
            for site in job.train_sites:
                seen |= {b.patient_id for b in load_site(SiteRef(path, site), run).train}
            assert seen == job.train_patients  # the ClientApp trains on exactly the plan's patients


def test_official_needs_a_split_column(tmp_path: Path) -> None:
    cohort = synthetic_cohort(tmp_path, sites=2, slides=20, dim=4)
    with pytest.raises(CompareError, match=r"no 'split' column.*--cohort camelyon16 fills it"):
        plan(load_manifest(cohort.manifest), CompareConfig(protocols=("official",), methods=("pooled",)))


def test_pooled_test_auroc_is_the_auroc_of_all_sites_together() -> None:
    rng = np.random.default_rng(0)
    evals = []
    for seed in (0, 1):
        for site in ("A", "B"):
            y = rng.integers(0, 2, size=30)
            p1 = np.clip(0.3 * y + rng.uniform(size=30) * (0.8 if site == "A" else 0.5), 0, 1)
            probs = np.stack([1 - p1, p1], axis=1)
            evals.append(
                Evaluation(
                    "official", "pooled", site, seed, tuple(f"{site}{i}" for i in range(30)), y, probs, None
                )
            )
    pooled = pooled_test_auroc(evals)
    per_seed = [
        roc_auc_score(
            np.concatenate([e.labels for e in evals if e.seed == s]),
            np.concatenate([e.probs[:, 1] for e in evals if e.seed == s]),
        )
        for s in (0, 1)
    ]
    mean, sd = pooled["pooled"]
    assert mean == pytest.approx(np.mean(per_seed)) and sd == pytest.approx(np.std(per_seed, ddof=1))
    site_mean = np.mean([roc_auc_score(e.labels, e.probs[:, 1]) for e in evals])
    assert mean != pytest.approx(site_mean)  # not the mean of the sites' AUROCs


def test_official_comparison_of_baselines_reports_the_pooled_test_set(
    split_cohort: Path, tmp_path: Path
) -> None:
    config = CompareConfig(protocols=("official",), methods=("local", "pooled"), seeds=1, rounds=2)
    outcome = run_comparison(split_cohort, tmp_path / "run", config, n_boot=50, say=lambda _: None)
    assert not outcome.failed and outcome.analysis is not None
    table = outcome.analysis.comparisons["official"]
    assert set(table.pooled_test) == {m for m in outcome.analysis.methods}
    assert all(np.isfinite(v[0]) for v in table.pooled_test.values())
    report = (tmp_path / "run" / "report.md").read_text()
    assert "AUROC, pooled test set" in report and "official test split" in report
    printed = compare.format_headline(table, "official")
    assert "AUROC on the pooled test set" in printed


def test_dry_run_of_the_shipped_camelyon16_table_gives_flambys_split_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["compare", "--out", str(out), "--cohort", "camelyon16", "--protocol", "official", "--dry-run"]
    assert fedpath_main([*args, "--methods", "local,pooled,fedprox", "--seeds", "1"]) == 0
    said = capsys.readouterr().out
    assert not out.exists()
    table = {line.split()[0]: line for line in said.splitlines() if line.strip().startswith(("RUMC", "UMCU"))}
    assert "169 / 74" in table["RUMC"] and "101 / 55" in table["UMCU"]  # the cohort table's official split
    # FLamby's Fed-Camelyon16: RUMC 169 training / 74 test slides, UMCU 101 / 55 (one slide per patient)
    pooled = next(line for line in said.splitlines() if " pooled " in line)
    found = re.search(r"train\s+(\d+) / val\s+(\d+) patients.*test at RUMC \((\d+)\), UMCU \((\d+)\)", pooled)
    assert found is not None, pooled
    assert int(found[1]) + int(found[2]) == 169 + 101 and (int(found[3]), int(found[4])) == (74, 55)
    for site, train in (("RUMC", 169), ("UMCU", 101)):
        local = next(line for line in said.splitlines() if f"local:{site}" in line)
        numbers = re.search(r"train\s+(\d+) / val\s+(\d+)", local)
        assert numbers is not None and int(numbers[1]) + int(numbers[2]) == train


def test_a_class_missing_at_the_training_sites_stops_pooled_and_federated_alike(tmp_path: Path) -> None:
    rows = []
    for site, labels in (("A", "01"), ("B", "01"), ("C", "2")):
        for i in range(12):
            path = write_feature_file(tmp_path / f"{site}{i}.h5", n_tiles=3, dim=4, slide_id=f"{site}{i}")
            rows.append([f"{site}{i}", f"{site}-p{i}", site, labels[i % len(labels)], str(path)])
    manifest = load_manifest(
        write_csv(tmp_path / "m.csv", ["slide_id", "patient_id", "site", "label", "features"], rows)
    )
    jobs = plan(manifest, CompareConfig(methods=("local", "pooled", "fedprox"), seeds=1))
    without_c = [j for j in jobs if j.family != "local" and "C" not in j.train_sites]
    assert {j.family for j in without_c} == {"pooled", "fedprox"}
    reasons = {j.not_trained for j in without_c}
    assert reasons == {
        "not trained: label '2' at none of its training patients (pooled and federated need every class)"
    }
    assert all(not j.not_trained for j in jobs if j not in without_c)
    said = compare.describe_plan(manifest, CompareConfig(methods=("local", "pooled", "fedprox"), seeds=1))
    assert sum("not trained: label '2'" in line for line in said) == 2 and "2 job(s) not trained" in said[-1]


def test_a_failed_derivation_writes_nothing_and_names_the_users_file_and_line(tmp_path: Path) -> None:
    f = write_feature_file(tmp_path / "a.h5")
    source = write_csv(
        tmp_path / "slides.csv",
        ["slide_id", "patient_id", "label", "features"],
        [["normal_001", "p1", "0", str(f)], ["", "", "", ""], ["test_002", "p1", "1", str(f)]],
    )
    out = tmp_path / "out" / "cohort.csv"
    with pytest.raises(CohortError) as err:
        derive_cohort(source, out, source="camelyon16")
    assert f"{source}, line 4, column 'split'" in str(err.value)  # the user's line (a blank line above it)
    assert not out.parent.exists()


def test_loso_over_two_hospitals_trains_no_pooled_or_federated_model(tmp_path: Path) -> None:
    cohort = synthetic_cohort(tmp_path, sites=2, slides=40, dim=4)
    jobs = plan(load_manifest(cohort.manifest), CompareConfig(methods=("local", "pooled", "fedavg"), seeds=1))
    assert {j.family for j in jobs if not j.not_trained} == {"local"}
    for job in (j for j in jobs if j.family != "local"):
        assert job.not_trained.startswith(f"not trained: one training site ({job.train_sites[0]})")
