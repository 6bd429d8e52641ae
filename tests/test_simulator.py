"""The cross-site simulator: cohort site mappings, patient-level splits of every protocol, resuming the grid,
and a small end-to-end comparison on Flower's simulation engine."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from fedpath.client.site import SiteRef, load_site
from fedpath.common.manifest import load_manifest, split_patients
from fedpath.common.runconfig import RunConfig
from fedpath.simulation import compare
from fedpath.simulation.cohorts import (
    OTHER_SITE,
    CohortError,
    camelyon16_slide,
    derive_cohort,
    synthetic_cohort,
    tss_code,
)
from fedpath.simulation.compare import (
    CompareConfig,
    CompareError,
    cell_dir,
    federation_manifest,
    job_dir,
    plan,
    run_comparison,
)
from tests.helpers import write_csv, write_feature_file

# --- cohorts ------------------------------------------------------------------------------------------------


def _slide_list(root: Path, rows: list[tuple[str, str, str]], *, site: str = "x") -> Path:
    """A manifest of (slide_id, patient_id, label) with tiny real feature files beside it (relative paths)."""
    (root / "feats").mkdir(parents=True, exist_ok=True)
    for slide_id, _, _ in rows:
        write_feature_file(root / "feats" / f"{Path(slide_id).stem}.h5", slide_id=slide_id)
    body = [[s, p, site, y, f"feats/{Path(s).stem}.h5"] for s, p, y in rows]
    return write_csv(root / "slides.csv", ["slide_id", "patient_id", "site", "label", "features"], body)


def test_tss_code_and_camelyon16_ids_are_parsed() -> None:
    assert tss_code("TCGA-CR-7395-01A-01-TS1") == "CR"
    assert tss_code("tcga-a2-a0t2") == "A2"
    assert tss_code("CR-7395") is None
    assert camelyon16_slide("Tumor_012.tif") == "tumor_012"
    assert camelyon16_slide("/data/test_40.tif") == "test_040"
    assert camelyon16_slide("patient_012") is None


def test_tcga_sites_are_institutions_and_small_ones_merge_into_other(tmp_path: Path) -> None:
    rows = [
        # Vanderbilt University (CR): 3 patients, one with two slides
        ("TCGA-CR-0001-01A-01-TS1", "TCGA-CR-0001", "1"),
        ("TCGA-CR-0001-01A-02-TS2", "TCGA-CR-0001", "1"),
        ("TCGA-CR-0002-01A-01-TS1", "TCGA-CR-0002", "0"),
        ("TCGA-CR-0003-01A-01-TS1", "TCGA-CR-0003", "0"),
        # University of Pittsburgh under two codes (34, 50): one site with 3 patients; patient id left empty
        ("TCGA-34-0001-01A-01-TS1", "", "1"),
        ("TCGA-50-0001-01A-01-TS1", "", "0"),
        ("TCGA-50-0002-01A-01-TS1", "", "1"),
        # Walter Reed (A2), 1 patient, and a code missing from the GDC table (ZZ), 1 patient: merged
        ("TCGA-A2-0001-01A-01-TS1", "TCGA-A2-0001", "0"),
        ("TCGA-ZZ-0001-01A-01-TS1", "TCGA-ZZ-0001", "1"),
    ]
    cohort = derive_cohort(
        _slide_list(tmp_path / "in", rows), tmp_path / "out" / "cohort.csv", source="tcga", min_patients=3
    )
    assert cohort.sites == {"Vanderbilt University": 3, "University of Pittsburgh": 3, OTHER_SITE: 2}
    assert cohort.members["University of Pittsburgh"] == ["34", "50"]
    assert cohort.members[OTHER_SITE] == ["A2", "ZZ"]
    notes = " ".join(cohort.notes)
    assert "Walter Reed" in notes and "TSS-ZZ" in notes and "merged into site 'other'" in notes
    m = load_manifest(cohort.manifest)
    by_slide = {s.slide_id: s for s in m.slides}
    assert by_slide["TCGA-50-0002-01A-01-TS1"].patient_id == "TCGA-50-0002"  # filled from the barcode
    assert by_slide["TCGA-CR-0001-01A-02-TS2"].extra["tss"] == "CR"
    assert by_slide["TCGA-A2-0001-01A-01-TS1"].features == (
        tmp_path / "in" / "feats" / "TCGA-A2-0001-01A-01-TS1.h5"
    )


def test_tcga_sites_need_tcga_barcodes(tmp_path: Path) -> None:
    rows = [("TCGA-CR-0001-01A", "TCGA-CR-0001", "1"), ("slide-7", "patient-7", "0")]
    with pytest.raises(CohortError, match=r"line 3: 'slide-7'.*not a TCGA barcode"):
        derive_cohort(_slide_list(tmp_path, rows), tmp_path / "c.csv", source="tcga")


def test_camelyon16_slides_map_to_their_hospital(tmp_path: Path) -> None:
    rows = [
        ("normal_001.tif", "", "0"),
        ("tumor_001.tif", "", "1"),
        ("test_002", "", "1"),
        ("normal_101", "", "0"),
        ("tumor_071", "", "1"),
        ("test_001", "", "1"),
    ]
    cohort = derive_cohort(_slide_list(tmp_path, rows), tmp_path / "c.csv", source="camelyon16")
    assert cohort.sites == {"RUMC": 3, "UMCU": 3}
    sites = {s.slide_id: s.site for s in load_manifest(cohort.manifest).slides}
    assert sites["tumor_001.tif"] == "RUMC" and sites["test_002"] == "RUMC"
    assert sites["normal_101"] == "UMCU" and sites["test_001"] == "UMCU"


def test_camelyon16_rejects_unknown_slides(tmp_path: Path) -> None:
    rows = [("normal_001", "p1", "0"), ("tumor_999", "p2", "1")]
    with pytest.raises(CohortError, match=r"line 3: 'tumor_999' is not a CAMELYON16 slide id"):
        derive_cohort(_slide_list(tmp_path, rows), tmp_path / "c.csv", source="camelyon16")


# --- splits: no patient in both training and test -----------------------------------------------------------


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 sites, 60 slides (some patients with 2-3 slides), 8-dim features."""
    root = tmp_path_factory.mktemp("cohort")
    return synthetic_cohort(root, sites=3, slides=60, dim=8, multi_slide_fraction=0.4).manifest


def _run_config(manifest: Path, job: compare.Job, config: CompareConfig) -> RunConfig:
    return RunConfig(
        in_dim=8,
        manifest=str(manifest),
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction_of(job.protocol),
        split_seed=job.split_seed,
    )


@pytest.mark.parametrize("protocol", ["loso", "internal"])
def test_no_patient_is_in_both_training_and_test(small_cohort: Path, tmp_path: Path, protocol: str) -> None:
    manifest = load_manifest(small_cohort)
    config = CompareConfig(protocols=(protocol,), methods=("local", "pooled", "fedprox"), seeds=2)
    jobs = plan(manifest, config)
    site_of = {s.patient_id: s.site for s in manifest.slides}
    assert {j.family for j in jobs} == {"local", "pooled", "fedprox"} and {j.seed for j in jobs} == {0, 1}
    assert any(len(slides) > 1 for slides in manifest.patients().values())  # multi-slide patients exist
    for job in jobs:
        assert job.train_patients, job.describe()
        for cell in job.cells:
            assert cell.test_patients and not job.train_patients & cell.test_patients, job.describe()
            if protocol == "loso":
                assert cell.test_site not in job.train_sites
                assert cell.test_patients == {p for p, s in site_of.items() if s == cell.test_site}
            else:
                split = split_patients(manifest, seed=cell.split_seed)[cell.test_site]
                assert cell.test_patients == split.test
        if job.federated:
            # what the ClientApp's sites train and validate on, read as the ClientApp reads it
            path = federation_manifest(manifest, job, tmp_path / compare.slug(job.label) / str(job.seed))
            assert set(load_manifest(path).sites) == set(job.train_sites)
            seen_train: set[str] = set()
            for site in job.train_sites:
                data = load_site(SiteRef(path, site), _run_config(path, job, config))
                seen_train |= {b.patient_id for b in data.train}
                for cell in job.cells:
                    assert not {b.patient_id for b in data.val} & cell.test_patients
            assert seen_train == job.train_patients
            if protocol == "loso":  # the training sites hold back no test patients: train + validation only
                everyone = {p for p, site in site_of.items() if site in job.train_sites}
                assert seen_train | job.val_patients == everyone and job.val_patients
    # internal validation re-splits per seed; leave-one-site-out keeps one split
    assert len({j.split_seed for j in jobs}) == (2 if protocol == "internal" else 1)


# --- the grid resumes -------------------------------------------------------------------------------------


BASELINES = CompareConfig(methods=("local", "pooled"), seeds=1, rounds=1, protocols=("loso", "internal"))


def test_rerun_skips_finished_cells_and_redoes_only_missing_ones(
    small_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    first = run_comparison(small_cohort, out, BASELINES, n_boot=20, say=lambda _: None)
    # loso: a local model × 2 held-out sites for every site big enough to train alone + 3 pooled; internal:
    # local models of the sites big enough on their internal training split + pooled at 3 sites (the two
    # smaller sites' internal training splits are too small to train alone)
    jobs = plan(load_manifest(small_cohort), BASELINES)
    local = {p: sum(1 for j in jobs if j.family == "local" and j.protocol == p) for p in ("loso", "internal")}
    assert local == {"loso": 3, "internal": 1}
    cells = local["loso"] * 2 + 3 + local["internal"] + 3
    assert first.cells_run == cells == 13 and not first.failed
    markers = sorted(out.glob("cells/*/*/*/seed-*/done.json"))
    assert len(markers) == cells
    stamps = {p: p.stat().st_mtime_ns for p in markers}

    trained: list[str] = []
    real = compare.train_baseline

    def counting(manifest, job, config):  # type: ignore[no-untyped-def]
        trained.append(job.describe())
        return real(manifest, job, config)

    monkeypatch.setattr(compare, "train_baseline", counting)
    again = run_comparison(small_cohort, out, BASELINES, n_boot=20, say=lambda _: None)
    assert trained == [] and again.cells_run == 0 and again.cells_skipped == cells
    assert {p: p.stat().st_mtime_ns for p in markers} == stamps

    lost = out / "cells" / "loso" / "pooled" / "site-B" / "seed-0" / "done.json"
    lost.unlink()
    third = run_comparison(small_cohort, out, BASELINES, n_boot=20, say=lambda _: None)
    assert trained == ["loso pooled: train on site-A, site-C; test at site-B (seed 0)"]
    assert third.cells_run == 1 and lost.exists()
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == cells


def test_other_training_settings_are_refused_not_mixed(small_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = CompareConfig(methods=("pooled",), seeds=1, rounds=1)
    run_comparison(small_cohort, out, config, n_boot=20, say=lambda _: None)
    more_seeds = config.model_copy(update={"seeds": 2})  # growing the grid is fine
    assert run_comparison(small_cohort, out, more_seeds, n_boot=20, say=lambda _: None).cells_run == 3
    with pytest.raises(CompareError, match=r"other settings \(lr: 0\.003 → 0\.01\)"):
        run_comparison(small_cohort, out, config.model_copy(update={"lr": 0.01}), say=lambda _: None)


def test_config_rejects_unknown_methods() -> None:
    with pytest.raises(ValueError, match="fedsgd given; choose from local, pooled"):
        CompareConfig(methods=("local", "fedsgd"))


# --- end to end on Flower's simulation engine ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_loso_comparison_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    cohort = synthetic_cohort(tmp_path / "cohort", sites=3, slides=72, dim=8)
    config = CompareConfig(methods=("local", "pooled", "fedprox"), seeds=1, rounds=1)
    out = tmp_path / "run"
    outcome = run_comparison(cohort.manifest, out, config, n_boot=50, say=lambda _: None)
    assert not outcome.failed and outcome.cells_run == 3 * 2 + 3 + 3
    # the three federations ran on one engine: one SuperLink took all three runs, and (RAY_ADDRESS being set)
    # no Ray head of its own was started; each federation's time outside its rounds is reported
    superlink_log = (out / "flower" / "superlink.log").read_text()
    assert superlink_log.count("Created run") == 3
    assert not (out / "flower" / "ray-head.log").exists()
    assert len(outcome.overheads) == 3 and all(o > 0 for o in outcome.overheads)

    with outcome.results.open() as f:
        results = list(csv.DictReader(f))
    keys = [(r["protocol"], r["method"], r["test_site"], r["seed"]) for r in results]
    assert len(keys) == len(set(keys)) == 12
    assert {r["method"] for r in results} == {
        "local:site-A",
        "local:site-B",
        "local:site-C",
        "pooled",
        "fedprox(mu=0.01)",
    }
    assert {(k[2]) for k in keys if k[1] == "fedprox(mu=0.01)"} == {"site-A", "site-B", "site-C"}
    assert all(r["protocol"] == "loso" and r["seed"] == "0" and r["auroc"] for r in results)
    assert (out / "report.md").exists() and (out / "report.html").exists()
    assert "fedprox(mu=0.01)" in (out / "report.md").read_text()
    # every model's calibration: the federation's agreed by its sites, the baselines' fitted the same way
    with (out / "calibration.csv").open() as f:
        calibrated = {(r["method"], r["test_site"]): r for r in csv.DictReader(f)}
    assert set(calibrated) == {(r["method"], r["test_site"]) for r in results}
    assert {calibrated[("fedprox(mu=0.01)", s)]["source"] for s in ("site-A", "site-B", "site-C")} == {
        "the sites' aggregates"
    }
    assert calibrated[("pooled", "site-A")]["source"] == "fitted on the validation predictions"
    assert "Calibration and abstention at each test site" in (out / "report.md").read_text()
    assert json.loads((out / "settings.json").read_text())["classes"] == list(
        load_manifest(cohort.manifest).classes
    )

    # every cell records who trained and who was tested: disjoint, and the held-out site trained nowhere
    manifest = load_manifest(cohort.manifest)
    site_of = {s.patient_id: s.site for s in manifest.slides}
    for marker in out.glob("cells/*/*/*/seed-*/done.json"):
        done = json.loads(marker.read_text())
        assert not set(done["train_patients"]) & set(done["test_patients"])
        assert {site_of[p] for p in done["train_patients"]} == set(done["train_sites"])
        assert done["test_site"] not in done["train_sites"]
    fed = job_dir(out, next(j for j in plan(manifest, config) if j.federated and j.label == "without-site-B"))
    assert "site-B" not in (fed / "manifest.csv").read_text()
    assert (fed / "federation" / "model.pt").exists()
    assert (
        cell_dir(out, next(c for j in plan(manifest, config) for c in j.cells if j.federated)) / "rounds.csv"
    ).exists()
    assert (out / "rounds.csv").exists()

    again = run_comparison(cohort.manifest, out, config, n_boot=50, say=lambda _: None)
    assert again.cells_run == 0 and again.cells_skipped == 12


def test_baselines_present_their_best_round_by_validation_loss(small_cohort: Path) -> None:
    """local and pooled follow the federations' rule: the weights of the round (every local_epochs epochs)
    with the lowest loss on their training sites' validation patients, not the last epoch's."""
    from fedpath.client.training import predict
    from fedpath.common.bags import bags_from_manifest

    manifest = load_manifest(small_cohort)
    config = CompareConfig(
        methods=("pooled",), protocols=("internal",), seeds=1, rounds=4, local_epochs=1, lr=0.05
    )
    job = next(j for j in plan(manifest, config) if j.family == "pooled")
    assert job.val_patients and not job.val_patients & job.train_patients
    val = bags_from_manifest(manifest.for_patients(job.val_patients))
    losses = []
    for rounds in range(1, config.rounds + 1):  # the same training stopped after each round (its best so far)
        alone = compare.train_baseline(manifest, job, config.model_copy(update={"rounds": rounds}))
        losses.append(predict(alone.model, val).loss)
    trained = compare.train_baseline(manifest, job, config)
    best = min(range(len(losses)), key=lambda i: (round(losses[i], 6), i)) + 1
    assert predict(trained.model, val).loss == pytest.approx(min(losses), rel=1e-5), losses
    assert f"round {best} of {config.rounds}" in trained.note


def test_site_batches_hold_one_site_each_and_every_bag_once_per_pass() -> None:
    from fedpath.client.training import SiteBatches
    from fedpath.common.bags import Bag

    sites = ["a"] * 11 + ["b"] * 3 + ["c"] * 6
    bags = [Bag(f"p{i}", (), 0, f"p{i}", site) for i, site in enumerate(sites)]
    sampler = SiteBatches(bags, batch_size=4, seed=1)
    passes = [list(sampler), list(sampler)]
    for batches in passes:
        assert len(batches) == len(sampler) == 3 + 1 + 2
        assert all(len({sites[i] for i in batch}) == 1 for batch in batches)
        assert sorted(i for batch in batches for i in batch) == list(range(len(bags)))
    assert passes[0] != passes[1]  # reshuffled every pass


@pytest.mark.parametrize("protocol, by_site", [("loso", True), ("internal", False)])
def test_pooled_takes_each_batch_from_one_site_under_loso(
    small_cohort: Path, monkeypatch: pytest.MonkeyPatch, protocol: str, by_site: bool
) -> None:
    """LOSO tests a site nobody trained on: pooled then trains on batches of one site each, as a federation's
    sites do; internal tests the training sites' own patients and keeps mixed batches. Local models have one
    site and are left as they are; `pooled_batches` overrides the rule."""
    import fedpath.client.training as training

    seen: list[bool] = []
    real = training.train_epochs

    def spy(model: object, bags: object, config: training.TrainConfig, **kw: object) -> object:
        seen.append(config.site_batches)
        return real(model, bags, config, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(training, "train_epochs", spy)
    manifest = load_manifest(small_cohort)
    config = CompareConfig(methods=("pooled",), protocols=(protocol,), seeds=1, rounds=1)
    job = next(j for j in plan(manifest, config) if j.family == "pooled")
    compare.train_baseline(manifest, job, config)
    compare.train_baseline(manifest, job, config.model_copy(update={"pooled_batches": "mixed"}))
    compare.train_baseline(manifest, job, config.model_copy(update={"pooled_batches": "by-site"}))
    assert seen == [by_site, False, True]
    with pytest.raises(ValueError, match="mixed, by-site"):
        CompareConfig(pooled_batches="sites")


# --- what each cell records for the report's rules ----------------------------------------------------------


def test_cells_record_validation_and_training_facts_and_older_cells_still_render(
    small_cohort: Path, tmp_path: Path
) -> None:
    from fedpath.simulation.compare import headline, render

    out = tmp_path / "run"
    config = CompareConfig(methods=("local", "pooled"), seeds=1, rounds=1, protocols=("loso",))
    outcome = run_comparison(small_cohort, out, config, n_boot=20, say=lambda _: None)
    assert outcome.cells_run == 9 and outcome.analysis is not None
    labels = load_manifest(small_cohort).patient_labels()
    markers = sorted(out.glob("cells/*/*/*/seed-*/done.json"))
    for marker in markers:
        done = json.loads(marker.read_text())
        with (marker.parent / "validation.csv").open() as f:
            validation = list(csv.DictReader(f))
        # the job's model on its own validation patients, filed under this cell
        assert {r["patient_id"] for r in validation} == set(done["val_patients"]) != set()
        assert {(r["test_site"], r["seed"]) for r in validation} == {(done["test_site"], str(done["seed"]))}
        assert not set(done["val_patients"]) & (set(done["train_patients"]) | set(done["test_patients"]))
        assert done["train_classes"] == len({labels[p] for p in done["train_patients"]})
    with (out / "training.csv").open() as f:
        training = list(csv.DictReader(f))
    assert len(training) == 9 and all(r["train_classes"] and r["val_patients"] for r in training)
    assert (out / "validation.csv").exists()
    with outcome.results.open() as f:
        results = list(csv.DictReader(f))
    assert all(r["threshold_from"].startswith(("Youden", "0.5")) for r in results)
    assert {r["hospital_eligible"] != "" for r in results if r["method"].startswith("local")} == {True}
    # the printed table is the report's own table, whether handed over or read back from results.csv
    printed, report = headline(outcome.results, "loso"), headline(outcome.analysis, "loso")
    assert [(r.label, round(r.mean, 4)) for r in printed] == [(r.label, round(r.mean, 4)) for r in report]

    # cells of an older fedpath: no validation.csv, no class count or validation patients in done.json
    for marker in markers:
        (marker.parent / "validation.csv").unlink()
        done = json.loads(marker.read_text())
        del done["train_classes"], done["val_patients"]
        marker.write_text(json.dumps(done))
    paths = render(out, cohort=None, config=config, n_boot=20, say=lambda _: None)
    text = paths.markdown.read_text()
    assert "No validation.csv" in text and "Not checked for lack of training facts" in text
    assert not (out / "validation.csv").exists()
    with paths.results.open() as f:
        results = list(csv.DictReader(f))
    assert all(r["threshold_from"].startswith("not available") for r in results)
    assert {r["hospital_eligible"] for r in results if r["method"].startswith("local")} == {
        "not checked: no training facts (training.csv)"
    }


def test_eta_waits_for_a_finished_job_of_each_kind(small_cohort: Path) -> None:
    config = CompareConfig(methods=("local", "fedavg"), seeds=1, protocols=("loso",))
    jobs = plan(load_manifest(small_cohort), config)
    assert compare._eta(jobs, {}) == "after the first local, fedavg jobs"
    local = [j for j in jobs if j.family == "local"]
    assert (
        compare._eta(jobs, {"local": [10.0]})
        == f"after the first fedavg job (the other jobs: {10 * len(local)} s)"
    )
    fedavg = len(jobs) - len(local)
    assert compare._eta(jobs, {"local": [1.0], "fedavg": [2.0, 4.0]}) == f"{len(local) + 3 * fedavg} s"


def test_the_cohort_table_says_what_each_site_is_for(tmp_path: Path) -> None:
    from fedpath.simulation.cohorts import site_table

    rows = []
    for site, n, labels in (("big", 30, "01"), ("tiny", 6, "01"), ("mono", 14, "1")):
        for i in range(n):
            path = write_feature_file(tmp_path / f"{site}{i}.h5", n_tiles=3, dim=4, slide_id=f"{site}{i}")
            rows.append([f"{site}{i}", f"{site}-p{i}", site, labels[i % len(labels)], str(path)])
    manifest = write_csv(tmp_path / "m.csv", ["slide_id", "patient_id", "site", "label", "features"], rows)
    table = site_table(manifest, val_fraction=0.15, split_seed=0)
    by_site = {line.split()[0]: line for line in table[1:-1]}
    assert table[0].split()[:4] == ["site", "patients", "label", "0"]
    assert by_site["big"].endswith("trained, a candidate for the best hospital") and " 30 " in by_site["big"]
    assert by_site["tiny"].endswith("none: too small to train alone (< 10 training patients)")
    assert by_site["mono"].endswith("none: one class only (AUROC undefined when tested here)")
    assert table[-1].startswith("every site takes part")


def test_dry_run_prints_every_jobs_patients_and_writes_nothing(
    small_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedpath.common.cli import main as fedpath_main

    out = tmp_path / "run"
    args = ["compare", "--out", str(out), "--manifest", str(small_cohort), "--methods", "local,fedprox"]
    assert fedpath_main([*args, "--seeds", "2", "--dry-run"]) == 0
    said = capsys.readouterr().out
    config = CompareConfig(methods=("local", "fedprox"), seeds=2)
    jobs = plan(load_manifest(small_cohort), config)
    assert said.count(" train ") == len(jobs) and "its local model" in said
    assert f"{len(jobs)} jobs ({sum(j.federated for j in jobs)} federations" in said
    assert "nothing was trained or written" in said and not out.exists()
    first = next(j for j in jobs if j.family == "local")
    assert (
        f"train {len(first.train_patients):>4} / val {len(first.val_patients):>3} patients at {first.train_sites[0]}"
        in said
    )


def test_min_local_patients_decides_which_sites_train_alone(tmp_path: Path) -> None:
    from fedpath.simulation.cohorts import site_table

    rows = []
    for site, n in (("big", 30), ("small", 8)):
        for i in range(n):
            path = write_feature_file(tmp_path / f"{site}{i}.h5", n_tiles=3, dim=4, slide_id=f"{site}{i}")
            rows.append([f"{site}{i}", f"{site}-p{i}", site, str(i % 2), str(path)])
    manifest = write_csv(tmp_path / "m.csv", ["slide_id", "patient_id", "site", "label", "features"], rows)
    m = load_manifest(manifest)
    for threshold, small_alone in ((10, False), (5, True)):
        config = CompareConfig(methods=("local",), seeds=1, min_local_patients=threshold)
        locals_ = {j.train_sites[0] for j in plan(m, config)}
        assert ("small" in locals_) == small_alone and "big" in locals_
        table = site_table(manifest, val_fraction=0.15, split_seed=0, min_local=threshold)
        small = next(line for line in table if line.startswith("small"))
        expected = (
            "trained; never the best hospital (< 10"
            if small_alone
            else f"none: too small to train alone (< {threshold}"
        )
        assert expected in small, small


def test_a_run_ended_badly_after_its_card_is_reported_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A grid's run is done at its model card; `settle` asks Flower for its end later. An answer that fails
    is asked again; a run Flower ended as failed is a problem returned to the caller (compare lists it) and,
    when no caller asked, said on leaving the engine."""
    from fedpath.server import flower_runtime as fr
    from fedpath.simulation.simulate import SimulationEngine

    answers = {7: iter([fr.FlowerRuntimeError("flwr ls failed"), "running", "finished:failed"])}

    def status(run_id: int, _home: Path, **_: object) -> str:
        answer = next(answers[run_id])
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(fr, "run_status", status)
    monkeypatch.setattr(fr, "run_logs", lambda run_id, _home, **_: f"whole log of run {run_id}\n")
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    engine = SimulationEngine(tmp_path / "engine")
    engine.pending = [(7, tmp_path / "server.log")]
    engine._settle(wait=False, timeout=0.0)  # the failed answer: still pending, nothing lost
    assert engine.pending and engine.problems == []
    problems = engine.settle()
    assert len(problems) == 1 and "run 7 ended as 'finished:failed' after writing its model" in problems[0]
    assert (tmp_path / "server.log").read_text() == "whole log of run 7\n" and engine.pending == []

    quiet = SimulationEngine(tmp_path / "quiet")  # nobody calls settle: leaving the engine says it
    quiet.problems = ["run 8 ended as 'finished:failed' after writing its model and card"]
    quiet.__exit__(None, None, None)  # as leaving its `with` block does (this one was never started)
    assert "WARNING: run 8 ended as 'finished:failed'" in capsys.readouterr().err
