"""Cross-validation in `fedpath compare` (patient folds, stratified; what each job may see), MUSK tables as
multi-site cohorts, and compare's options generated from CompareConfig's fields."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from fedpath.client.site import SiteRef, load_site
from fedpath.common.cli import UserError, build_parser
from fedpath.common.features import read_features
from fedpath.common.manifest import Manifest, load_manifest
from fedpath.common.runconfig import RunConfig
from fedpath.simulation import compare_cli, demo, mil_cli
from fedpath.simulation.cohorts import (
    CohortError,
    MilCohortConfig,
    deal_sites,
    mil_cohort,
    read_mil_table,
    synthetic_cohort,
)
from fedpath.simulation.compare import (
    CompareConfig,
    CompareError,
    Job,
    federation_manifest,
    plan,
    slug,
)

MUSK1 = Path(__file__).parent / "data" / "mil" / "musk1.csv"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """3 sites, 60 slides (some patients with 2-3 slides), 8-dim features."""
    root = tmp_path_factory.mktemp("cohort")
    return load_manifest(synthetic_cohort(root, sites=3, slides=60, dim=8, multi_slide_fraction=0.4).manifest)


def _by_seed(jobs: list[Job]) -> dict[int, dict[str, frozenset[str]]]:
    """seed → fold name → the fold's test patients."""
    out: dict[int, dict[str, frozenset[str]]] = {}
    for job in jobs:
        for cell in job.cells:
            assert (
                out.setdefault(job.seed, {}).setdefault(cell.test_site, cell.test_patients)
                == cell.test_patients
            )
    return out


def test_cv_folds_are_disjoint_stratified_and_cover_every_patient_once(cohort: Manifest) -> None:
    config = CompareConfig(protocols=("cv",), methods=("local", "pooled", "fedprox"), seeds=2, folds=5)
    jobs = plan(cohort, config)
    labels = cohort.patient_labels()
    everyone = set(labels)
    folds = _by_seed(jobs)
    assert sorted(folds[0]) == ["fold-01", "fold-02", "fold-03", "fold-04", "fold-05"]
    for by_fold in folds.values():
        tested = [p for patients in by_fold.values() for p in patients]
        assert len(tested) == len(everyone) and set(tested) == everyone  # every patient once
        for k in set(labels.values()):  # stratified: a class's counts differ by at most one between folds
            counts = [sum(labels[p] == k for p in patients) for patients in by_fold.values()]
            assert max(counts) - min(counts) <= 1, counts
    assert folds[0] != folds[1]  # seed i deals its own folds (split_seed + i)
    # 5 folds × (a local model per site that can train alone on that fold's patients + pooled + fedprox)
    local = [j for j in jobs if j.family == "local"]
    assert len(jobs) - len(local) == 2 * 5 * 2 and 0 < len(local) < 2 * 5 * 3
    assert all(len(j.train_patients) >= 10 for j in local) and {j.split_seed for j in jobs} == {0, 1}
    for job in jobs:
        (cell,) = job.cells
        assert not job.train_patients & job.val_patients
        assert not (job.train_patients | job.val_patients) & cell.test_patients
        at_sites = {p for p in everyone if cohort.patients()[p][0].site in job.train_sites}
        assert job.train_patients | job.val_patients == at_sites - cell.test_patients, job.describe()
        if job.family == "pooled":
            assert job.train_patients | job.val_patients | cell.test_patients == everyone
            assert job.val_patients


def test_cv_federation_sees_only_its_training_and_validation_patients(
    cohort: Manifest, tmp_path: Path
) -> None:
    config = CompareConfig(protocols=("cv",), methods=("fedavg",), seeds=1, folds=4)
    for job in plan(cohort, config):
        (cell,) = job.cells
        path = federation_manifest(cohort, job, tmp_path / slug(job.label))
        named = {s.patient_id for s in load_manifest(path).slides}
        assert named == job.train_patients | job.val_patients and not named & cell.test_patients
        # what the ClientApp's sites train and validate on, read as the ClientApp reads it
        run = RunConfig(
            in_dim=8,
            manifest=str(path),
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction_of(job.protocol),
            split_seed=job.split_seed,
        )
        train: set[str] = set()
        val: set[str] = set()
        for site in job.train_sites:
            data = load_site(SiteRef(path, site), run)
            train |= {b.patient_id for b in data.train}
            val |= {b.patient_id for b in data.val}
        assert train == job.train_patients and val == job.val_patients


def test_cv_needs_at_least_two_folds_and_no_more_than_the_smallest_class(cohort: Manifest) -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        CompareConfig(protocols=("cv",), folds=1)
    fewest = min(Counter(cohort.patient_labels().values()).values())
    with pytest.raises(
        CompareError, match=rf"smallest class has {fewest} patient.*use --folds {fewest} or fewer"
    ):
        plan(cohort, CompareConfig(protocols=("cv",), folds=fewest + 1))
    plan(cohort, CompareConfig(protocols=("loso",), folds=fewest + 1))  # only cv deals folds


# --- MUSK tables --------------------------------------------------------------------------------------------


def test_musk1_becomes_one_raw_feature_file_per_bag(tmp_path: Path) -> None:
    cohort = mil_cohort(MUSK1, tmp_path / "musk1", MilCohortConfig(sites=5))
    manifest = load_manifest(cohort.manifest)
    assert len(manifest.slides) == 92 and manifest.classes == ("0", "1")
    assert Counter(s.label for s in manifest.slides) == {"1": 47, "0": 45}
    assert sorted(cohort.sites) == ["site-A", "site-B", "site-C", "site-D", "site-E"]
    assert max(cohort.sites.values()) - min(cohort.sites.values()) <= 1  # equal shares: round-robin
    for row in manifest.summary():
        assert row.label_counts["0"] >= 1 and row.label_counts["1"] >= 1  # every site has both classes
    tiles = [read_features(s.features) for s in manifest.slides if s.features is not None]
    assert sum(len(t.features) for t in tiles) == 476 and {t.features.shape[1] for t in tiles} == {166}
    # raw values, as in the table: bag 1 (musk) starts with the table's first row
    first = next(s for s in manifest.slides if s.slide_id == "musk1-01")
    row = MUSK1.read_text().splitlines()[0].split(",")
    assert first.label == row[0] == "1"
    np.testing.assert_array_equal(
        read_features(first.features).features[0], np.array(row[2:], dtype=np.float32)
    )  # type: ignore[arg-type]

    stamp = cohort.manifest.stat().st_mtime_ns
    assert mil_cohort(MUSK1, tmp_path / "musk1", MilCohortConfig(sites=5)).sites == cohort.sites  # reused
    assert cohort.manifest.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="other settings"):
        mil_cohort(MUSK1, tmp_path / "musk1", MilCohortConfig(sites=3))
    with pytest.raises(CohortError, match="MUSK2 has 102 bags"):
        mil_cohort(MUSK1, tmp_path / "other", MilCohortConfig(), name="musk2")


def test_unequal_sites_keep_both_classes_and_cv_runs_over_them(tmp_path: Path) -> None:
    cohort = mil_cohort(MUSK1, tmp_path / "skewed", MilCohortConfig(sites=5, size_skew=1.5, seed=2))
    sizes = [cohort.sites[s] for s in sorted(cohort.sites)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 3 * sizes[-1]
    manifest = load_manifest(cohort.manifest)
    assert all(min(r.label_counts.values()) >= 1 for r in manifest.summary())
    jobs = plan(manifest, CompareConfig(protocols=("cv",), methods=("pooled",), seeds=1))
    assert len(jobs) == 10 and {j.cells[0].test_site for j in jobs} == {f"fold-{i:02d}" for i in range(1, 11)}


def test_deal_sites_is_stratified_and_seeded() -> None:
    labels = [0] * 45 + [1] * 47
    sites = deal_sites(labels, 5)
    assert Counter(sites) == {0: 19, 1: 19, 2: 18, 3: 18, 4: 18}
    assert all(
        Counter(s for s, y in zip(sites, labels, strict=True) if y == 1)[k] in (9, 10) for k in range(5)
    )
    assert deal_sites(labels, 5, seed=1) != sites and deal_sites(labels, 5) == sites


def test_pmlb_layout_and_a_bag_with_two_labels(tmp_path: Path) -> None:
    table = tmp_path / "clean2.tsv.gz"
    rows = [
        "molecule_name\tconformation_name\tf1\tf2\ttarget",
        "7\ta\t1\t2\t1",
        "7\tb\t3\t4\t1",
        "8\tc\t5\t6\t0",
    ]
    table.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    bags, layout = read_mil_table(table)
    assert layout == "pmlb" and [(b.bag_id, b.label, b.instances.tolist()) for b in bags] == [
        ("7", 1, [[1.0, 2.0], [3.0, 4.0]]),
        ("8", 0, [[5.0, 6.0]]),
    ]
    table.write_bytes(gzip.compress(("\n".join([*rows, "8\td\t7\t8\t1"]) + "\n").encode()))
    with pytest.raises(CohortError, match=r"line 5: bag '8' has label 1 here but 0 on line 4"):
        read_mil_table(table)


# --- options generated from CompareConfig -------------------------------------------------------------------


def _options(command: object) -> dict[str, list[str]]:
    parser = build_parser([command])  # type: ignore[list-item]
    sub = next(a for a in parser._actions if a.dest == "command")
    return {a.dest: a.option_strings for a in sub.choices[command.name]._actions}  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", [compare_cli.COMMAND, demo.COMMAND])
def test_every_compare_setting_is_an_option(command: object) -> None:
    options = _options(command)
    assert set(CompareConfig.model_fields) <= set(options)
    assert options["protocols"] == ["--protocol"] and options["dp_epsilons"] == ["--dp-epsilons"]
    assert options["standardize"] == ["--standardize", "--no-standardize"]


def test_options_parse_into_the_config() -> None:
    parser = build_parser([compare_cli.COMMAND])
    grid = ["--protocol", "cv,loso", "--folds", "4", "--mu", "0.1,0.5", "--dp-mu", "0.2"]
    training = ["--no-standardize", "--local-steps", "5", "--weight-decay", "0.005", "--model", "abmil"]
    args = parser.parse_args(["compare", "--out", "run", *grid, *training])
    config = compare_cli.compare_config(args)
    assert config == CompareConfig(
        protocols=("loso", "cv"),
        folds=4,
        mu=(0.1, 0.5),
        standardize=False,
        local_steps=5,
        weight_decay=0.005,
        dp_mu=0.2,
    )
    bad = parser.parse_args(["compare", "--out", "run", "--protocol", "kfold"])
    with pytest.raises(
        UserError, match=r"--protocol: .*kfold given; choose from loso, internal, official, cv"
    ):
        compare_cli.compare_config(bad)


def test_musk_cohort_needs_its_table(tmp_path: Path) -> None:
    args = build_parser([compare_cli.COMMAND]).parse_args(
        ["compare", "--out", str(tmp_path), "--cohort", "musk1"]
    )
    with pytest.raises(UserError, match="--cohort musk1 needs --mil-file F"):
        compare_cli._run(args)


def test_mil_command_writes_the_cohort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser([mil_cli.COMMAND])
    args = parser.parse_args(
        ["mil", str(MUSK1), "--out", str(tmp_path / "c"), "--sites", "3", "--size-skew", "1"]
    )
    assert args._run(args) == 0
    assert "fedpath compare --manifest" in capsys.readouterr().out
    assert len(load_manifest(tmp_path / "c" / "manifest.csv").sites) == 3
