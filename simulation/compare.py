"""Cross-site comparison of training methods on identical patient splits: which way of training works at a
hospital whose patients the model never saw?

Protocols
    ``loso`` (leave-one-site-out): for every site, train on the other K−1 sites and test on **all** patients
    of the held-out site (none of them took part in training); the training sites' patients are split into
    training and validation only (``val_fraction``), none is held back for testing. ``internal``: train on all sites, test on
    each site's own held-out test patients (`split_patients`, fraction ``test_fraction``). ``cv``
    (``folds``-fold cross-validation at patient level, to set results beside published tables): the cohort's
    patients are dealt into folds stratified by label (`patient_folds`); for fold f, test on its patients (all
    sites) and train on the others, each site's split into training and validation only (``val_fraction``).
    Cells' test site is the fold (``fold-01``, ...). Under cv, ``local:SITE`` is tested on the whole fold, a
    federation's manifest names only its sites' training and validation patients, and seed i deals the folds
    (and splits) with ``split_seed + i``.

Methods (all on the same `split_patients` splits, the same initial weights and the same epoch budget: a site
trains ``rounds × local_epochs`` epochs over its training patients in every method)
    ``local`` — one model per training site, alone (`local:SITE`); in LOSO each is tested at every held-out
    site it did not train on. ``pooled`` — one model on the union of the training sites' training patients
    (the upper reference: not possible in practice), each batch from one site under LOSO (``POOLED_BATCHES``).
    ``fedavg`` and ``fedprox`` (one run per μ in the grid) — the real ServerApp and ClientApp on Flower's
    simulation engine, one simulation per held-out site × seed × variant. ``fedprox-dp`` — FedProx with per-patient DP-SGD at each site, one run per target ε (run
    config ``dp-epsilon``); its cells are written only when the sites kept a privacy ledger (``privacy/`` in
    the federation's run folder), so an ε in the report is one that was enforced.

Seeds
    Seed i trains with seed ``train_seed + i`` (initial weights, data order, every site's local training);
    internal validation also re-splits patients with split seed ``split_seed + i``; LOSO keeps ``split_seed``
    (the held-out site is tested whole, the split only picks the training sites' training patients).

The grid and resuming
    A *job* trains one model and scores it on one or more *cells* (protocol × method × test site × seed).
    Every finished cell is a folder ``cells/<protocol>/<method>/<test site>/seed-<seed>/`` holding
    ``predictions.csv`` (patient level, the report's contract), ``validation.csv`` (the same model on its
    training sites' validation patients: the report's threshold, verdicts and choices are taken there),
    ``rounds.csv`` for federated methods and, written last, ``done.json`` (training and test patients, number
    of classes trained on, seeds, seconds). A rerun skips jobs whose cells
    are all done, and a federation interrupted mid-run resumes from its last round checkpoint
    (``jobs/.../federation/``). More seeds, methods or μ/ε values may be added to an existing run folder;
    other training settings may not (``comparison.json`` records them). The report (``predictions.csv``,
    ``rounds.csv``, ``settings.json``, ``results.csv``, ``report.md``, ``report.html``) is rendered from
    every finished cell.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from pydantic import ConfigDict, Field, field_validator, model_validator

from fedpath.common.atomic import write_text_atomic
from fedpath.common.cohortcheck import precheck
from fedpath.common.manifest import (
    Manifest,
    PatientSplit,
    load_manifest,
    patient_folds,
    split_patients,
    write_manifest,
)
from fedpath.common.selection import SELECTION_RULE
from fedpath.common.settings import TrainingSettings
from fedpath.simulation.headline import (
    BEST_HOSPITAL,
    MEAN_OF_HOSPITALS,
    METHOD,
    ORACLE,
    Comparison,
    ComparisonRow,
    comparison,
    load_results,
)
from fedpath.simulation.headline import paired_difference as paired_mean_difference
from fedpath.simulation.verdicts import MIN_HOSPITAL_CLASSES, MIN_HOSPITAL_PATIENTS

if TYPE_CHECKING:
    from fedpath.simulation.simulate import SimulationEngine
from fedpath.simulation.report import (
    ALL_SITES,
    Analysis,
    CalibrationRow,
    PredictionRow,
    ReportPaths,
    RoundRow,
    TrainingFacts,
    load_calibration,
    load_predictions,
    load_rounds,
    write_calibration,
    write_predictions,
    write_report,
    write_rounds,
    write_training,
)

PROTOCOLS = ("loso", "internal", "official", "cv")
METHODS = ("local", "pooled", "fedavg", "fedprox", "fedprox-dp")
FEDERATED = ("fedavg", "fedprox", "fedprox-dp")
# How pooled training forms its batches. Under LOSO the test is a site nobody trained on, and the reference takes
# each batch from one training site, as a federation's sites do: with batches mixed across sites, the model also
# learns what tells the sites apart (scanner, stain, prevalence), which does not carry to a new site. Measured
# (mean held-out AUROC, LOSO, same seeds): demo cohort 0.818 → 0.875 (5 seeds), bench_learning's synthetic
# 0.884 → 0.908 and MUSK1 in 5 unequal sites 0.926 → 0.931 (3 seeds). Under internal and cv the test patients come
# from the training sites, so batches are mixed. Every patient is used once per pass either way.
POOLED_BATCHES = ("auto", "mixed", "by-site")
DONE = "done.json"
STATE = "comparison.json"
TEST_PATIENTS = {
    "loso": "all patients of the held-out site",
    "internal": "the test split of each site (test_fraction of its patients, stratified by label)",
    "official": "the cohort's own test patients at each site (manifest column 'split'; CAMELYON16: the official "
    "test slides, FLamby's Fed-Camelyon16 protocol), every model tested at every site and on all of them pooled",
    "cv": "the fold's patients at every site (folds of the cohort's patients, stratified by label)",
}
# Settings that change what a cell computes: a run folder's cells must all share them.
TRAINING_KEYS = ("folds", "rounds", "pooled_batches", "train_seed", *TrainingSettings.model_fields)


class CompareError(RuntimeError):
    """A comparison that cannot run as asked; the message says what to do."""


class CompareConfig(TrainingSettings):
    """The grid (protocols × methods × seeds, μ and ε values), the rounds and the shared training settings
    (`TrainingSettings`), which every method gets alike."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocols: tuple[str, ...] = Field(("loso",), description="loso, internal, official and/or cv")
    methods: tuple[str, ...] = Field(("local", "pooled", "fedavg", "fedprox"), description="methods to run")
    seeds: int = Field(3, ge=1, description="training seeds per cell")
    folds: int = Field(10, ge=2, description="cv: patient folds, stratified by label")
    mu: tuple[float, ...] = Field((0.01,), description="FedProx μ grid")
    dp_epsilons: tuple[float, ...] = Field((1.0, 4.0, 8.0), description="ε grid of fedprox-dp (per site)")
    dp_mu: float | None = Field(
        None, ge=0, description="FedProx μ of fedprox-dp (default: first of the μ grid)"
    )
    rounds: int = Field(10, ge=1, description="federated rounds")
    pooled_batches: str = Field("auto", description="by-site|mixed|auto (by-site if loso)")
    train_seed: int = Field(0, description="training seed of seed 0 (seed i: train_seed + i)")
    cpus_per_site: int = Field(1, ge=1, description="CPU cores per simulated site")
    min_local_patients: int = Field(
        MIN_HOSPITAL_PATIENTS, ge=1, description="sites with fewer training patients: no local model"
    )

    def test_fraction_of(self, protocol: str) -> float:
        """Share of each training site's patients held back for testing: none under LOSO, where the test
        set is the whole held-out site and the training sites' patients serve training and validation only."""
        return self.test_fraction if protocol == "internal" else 0.0

    @field_validator("protocols", "methods")
    @classmethod
    def _known(cls, values: tuple[str, ...], info: Any) -> tuple[str, ...]:
        known = PROTOCOLS if info.field_name == "protocols" else METHODS
        unknown = [v for v in values if v not in known]
        if unknown or not values:
            raise ValueError(f"{', '.join(unknown) or 'nothing'} given; choose from {', '.join(known)}")
        return tuple(v for v in known if v in values)  # canonical order, no repeats

    @field_validator("pooled_batches")
    @classmethod
    def _batches(cls, value: str) -> str:
        if value not in POOLED_BATCHES:
            raise ValueError(f"'{value}' given; choose from {', '.join(POOLED_BATCHES)}")
        return value

    def site_batches(self, protocol: str) -> bool:
        """Whether pooled training takes each batch from one site (see POOLED_BATCHES)."""
        return self.pooled_batches == "by-site" or (self.pooled_batches == "auto" and protocol == "loso")

    @field_validator("mu", "dp_epsilons")
    @classmethod
    def _grid(cls, values: tuple[float, ...], info: Any) -> tuple[float, ...]:
        if info.field_name == "dp_epsilons" and any(not v > 0 for v in values):
            raise ValueError(f"every ε must be positive, got {values}")
        if any(v < 0 or not math.isfinite(v) for v in values):
            raise ValueError(f"every μ must be a finite number ≥ 0, got {values}")
        return tuple(dict.fromkeys(values))

    @model_validator(mode="after")
    def _grids_given(self) -> CompareConfig:
        if "internal" in self.protocols and not self.test_fraction:
            raise ValueError("the internal protocol needs a test share of each site (--test-fraction > 0)")
        if "fedprox" in self.methods and not self.mu:
            raise ValueError("fedprox needs at least one μ (--mu)")
        if "fedprox-dp" in self.methods and not self.dp_epsilons:
            raise ValueError("fedprox-dp needs at least one ε (--dp-epsilons)")
        return self

    @property
    def private_mu(self) -> float:
        return self.dp_mu if self.dp_mu is not None else (self.mu[0] if self.mu else 0.01)

    def training(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in TRAINING_KEYS}


# --- the plan -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One trained model scored on one test set: a row of results.csv."""

    protocol: str
    method: str
    test_site: str
    seed: int  # training seed
    split_seed: int
    epsilon: float | None
    test_patients: frozenset[str]


@dataclass(frozen=True)
class Job:
    """One model to train (alone, pooled or federated) and the cells it is scored on."""

    protocol: str
    family: str  # one of METHODS
    method: str  # the name in the report: local:SITE, pooled, fedavg, fedprox(mu=…), fedprox-dp(mu=…, eps=…)
    train_sites: tuple[str, ...]
    label: str  # which training sites, for folder names: the site (local), without-SITE (loso), all-sites, the fold (cv)
    seed: int
    split_seed: int
    mu: float
    epsilon: float | None
    train_patients: frozenset[str]
    cells: tuple[Cell, ...]
    val_patients: frozenset[str] = frozenset()  # the training sites' validation patients (round selection)
    # why a pooled or federated job is not trained (`not_trained`: one training site, or a class of the cohort
    # at none of its training patients; one rule for both); '' when it is trained
    not_trained: str = ""

    @property
    def federated(self) -> bool:
        return self.family in FEDERATED

    def describe(self) -> str:
        tested = sorted({c.test_site for c in self.cells})
        where = tested[0] if len(tested) == 1 else f"{len(tested)} sites"
        return (
            f"{self.protocol} {self.method}: train on {', '.join(self.train_sites)}; test at {where} "
            f"(seed {self.seed})"
        )


def method_names(config: CompareConfig) -> list[tuple[str, str, float, float | None]]:
    """(family, report name, μ, ε) of every non-local method variant in the grid."""
    out: list[tuple[str, str, float, float | None]] = []
    for family in config.methods:
        if family == "pooled":
            out.append((family, "pooled", 0.0, None))
        elif family == "fedavg":
            out.append((family, "fedavg", 0.0, None))
        elif family == "fedprox":
            out += [(family, f"fedprox(mu={mu:g})", mu, None) for mu in config.mu]
        elif family == "fedprox-dp":
            mu = config.private_mu
            out += [(family, f"fedprox-dp(mu={mu:g}, eps={e:g})", mu, e) for e in config.dp_epsilons]
    return out


def plan(manifest: Manifest, config: CompareConfig) -> list[Job]:
    """Every job of the grid: baselines first (they are quick), then the federations, seed by seed."""
    if len(manifest.sites) < 2:
        raise CompareError(
            f"{manifest.path}: {len(manifest.sites)} site; a comparison needs at least 2 sites"
        )
    if "cv" in config.protocols:
        check_folds(manifest, config.folds)
    if "official" in config.protocols:
        check_official(manifest)
    labels = manifest.patient_labels()
    jobs: list[Job] = []
    for protocol in config.protocols:
        for i in range(config.seeds):
            split_seed = config.split_seed + (0 if protocol == "loso" else i)
            jobs += _seed_jobs(manifest, config, protocol, config.train_seed + i, split_seed, labels)
    jobs = [
        j if j.family == "local" else replace(j, not_trained=not_trained(manifest, j, labels)) for j in jobs
    ]
    return sorted(jobs, key=lambda j: (j.federated, j.seed if j.federated else 0))


def describe_plan(manifest: Manifest, config: CompareConfig) -> list[str]:
    """The grid a dry run prints: every job with the patients it trains, validates and tests on, and the
    totals; from the manifest alone (no feature file is opened, nothing is trained or written)."""
    jobs = plan(manifest, config)
    lines = []
    for job in jobs:
        tests = ", ".join(f"{c.test_site} ({len(c.test_patients)})" for c in job.cells)
        lines.append(
            f"{job.protocol:<8} seed {job.seed}  {job.method:<24} train {len(job.train_patients):>4} / "
            f"val {len(job.val_patients):>3} patients at {', '.join(job.train_sites)}; test at {tests}"
            + (f"; {job.not_trained}" if job.not_trained else "")
        )
    skipped = sum(1 for j in jobs if j.not_trained)
    jobs = [j for j in jobs if not j.not_trained]
    federations = sum(1 for j in jobs if j.federated)
    cells = sum(len(j.cells) for j in jobs)
    lines.append(
        f"{len(jobs)} jobs ({federations} federations on Flower's simulation engine, {len(jobs) - federations} "
        f"baselines), {cells} cells"
        + (f"; {skipped} job(s) not trained (above)" if skipped else "")
        + "; nothing was trained or written"
    )
    return lines


def fold_name(fold: int, folds: int) -> str:
    """The test site of cv fold `fold` (0-based) in cells and folders: ``fold-01``, zero-padded to sort right."""
    return f"fold-{fold + 1:0{max(2, len(str(folds)))}d}"


def check_folds(manifest: Manifest, folds: int) -> None:
    """Every fold must hold every class: `folds` at most the patients of the smallest class."""
    counts = Counter(manifest.patient_labels().values())
    per_class = {c: counts.get(k, 0) for k, c in enumerate(manifest.classes)}
    fewest = min(per_class.values())
    if folds > fewest:
        listed = ", ".join(f"label {c}: {n}" for c, n in per_class.items())
        fix = f"use --folds {fewest} or fewer" if fewest >= 2 else "cv needs 2 patients of every class"
        raise CompareError(
            f"{manifest.path}: {folds} folds, but the smallest class has {fewest} patient(s) ({listed}), so "
            f"some fold would miss a class; {fix}"
        )


def check_official(manifest: Manifest) -> None:
    """The official protocol needs the cohort's own split: a ``split`` column with test and training
    patients."""
    test = manifest.official_test()
    if not manifest.has_official_split:
        raise CompareError(
            f"{manifest.path}: the official protocol tests on the cohort's own test patients, but the manifest "
            "has no 'split' column (train/test per slide); --cohort camelyon16 fills it from the slide ids"
        )
    if not test or len(test) == len(manifest.patients()):
        raise CompareError(
            f"{manifest.path}: the 'split' column marks {len(test)} of {len(manifest.patients())} patients "
            "'test'; the official protocol needs both training and test patients"
        )


def _seed_jobs(
    manifest: Manifest,
    config: CompareConfig,
    protocol: str,
    seed: int,
    split_seed: int,
    labels: Mapping[str, int],
) -> list[Job]:
    """The jobs of one protocol and seed (`labels`: the cohort's patient labels)."""
    if protocol == "official":
        splits = split_patients(manifest, val=config.val_fraction, test=0.0, seed=split_seed, official=True)
        tests = {s: split.test for s, split in splits.items() if split.test}  # a site without any: no cell
        # the official test patients are in no training: a site holding only those sits training out
        splits = {s: split for s, split in splits.items() if split.train}
        return _split_jobs(config, protocol, seed, split_seed, splits, tests, labels)
    if protocol != "cv":
        splits = split_patients(
            manifest, val=config.val_fraction, test=config.test_fraction_of(protocol), seed=split_seed
        )
        site_of = {p: slides[0].site for p, slides in manifest.patients().items()}
        tests = {
            s: frozenset(p for p, at in site_of.items() if at == s) if protocol == "loso" else splits[s].test
            for s in manifest.sites
        }
        return _split_jobs(config, protocol, seed, split_seed, splits, tests, labels)
    jobs = []
    everyone = set(manifest.patients())
    for f, test in enumerate(patient_folds(manifest, config.folds, seed=split_seed)):
        # the fold is out of every split: each site's other patients serve training and validation only, split
        # as the ClientApp splits the federation's manifest of exactly these patients (test fraction 0)
        rest = manifest.for_patients(everyone - test)
        splits = split_patients(rest, val=config.val_fraction, test=0.0, seed=split_seed)
        # a site whose patients are all in the fold sits the fold out
        splits = {s: split for s, split in splits.items() if split.train}
        jobs += _split_jobs(
            config,
            protocol,
            seed,
            split_seed,
            splits,
            {fold_name(f, config.folds): test},
            labels,
        )
    return jobs


def too_small_alone(
    train: frozenset[str], labels: Mapping[str, int], min_patients: int = MIN_HOSPITAL_PATIENTS
) -> str:
    """Why a site's training patients cannot make a local model worth comparing ('' when they can): fewer
    than `min_patients` (`--min-local-patients`), or one class only. The report's best hospital is chosen among
    local models of at least `MIN_HOSPITAL_PATIENTS` whatever this is."""
    if len({labels[p] for p in train if p in labels}) < MIN_HOSPITAL_CLASSES:
        return "one class only"
    if len(train) < min_patients:
        return f"too small to train alone ({len(train)} training patients < {min_patients})"
    return ""


def _split_jobs(
    config: CompareConfig,
    protocol: str,
    seed: int,
    split_seed: int,
    splits: dict[str, PatientSplit],
    tests: dict[str, frozenset[str]],
    labels: Mapping[str, int],
) -> list[Job]:
    """The jobs of one patient split: `splits` holds the sites that may train (their training and validation
    patients), `tests` the test sets by cell name (a site under loso and internal, the fold under cv)."""
    sites = list(splits)
    fold = next(iter(tests)) if protocol == "cv" else ""

    def job(
        family: str,
        method: str,
        train: Sequence[str],
        label: str,
        test: Sequence[str],
        mu: float = 0.0,
        eps: float | None = None,
    ) -> Job:
        return Job(
            protocol=protocol,
            family=family,
            method=method,
            train_sites=tuple(train),
            label=label,
            seed=seed,
            split_seed=split_seed,
            mu=mu,
            epsilon=eps,
            train_patients=frozenset().union(*(splits[s].train for s in train)),
            cells=tuple(Cell(protocol, method, t, seed, split_seed, eps, tests[t]) for t in test),
            val_patients=frozenset().union(*(splits[s].val for s in train)),
        )

    jobs = []
    if "local" in config.methods:
        for s in sites:
            if too_small_alone(splits[s].train, labels, config.min_local_patients):
                continue  # still in every federation; the cohort table says why it has no local model
            tested = {"loso": [t for t in sites if t != s], "internal": [s], "official": list(tests)}.get(
                protocol, [fold]
            )
            jobs.append(job("local", f"local:{s}", [s], fold or s, tested))
    for family, method, mu, eps in method_names(config):
        if protocol == "loso":
            for held in sites:
                jobs.append(
                    job(family, method, [s for s in sites if s != held], f"without-{held}", [held], mu, eps)
                )
        else:
            jobs.append(job(family, method, sites, fold or "all-sites", list(tests), mu, eps))
    return jobs


def not_trained(manifest: Manifest, job: Job, labels: Mapping[str, int]) -> str:
    """Why a pooled or federated job is not run ('' when it is), one rule for both: it has one training site
    (LOSO over two sites: it would be that hospital's local model again), or labels of the cohort's patients
    that none of its training patients hold (a model that never saw a class is not compared)."""
    if len(job.train_sites) < 2:
        return (
            f"not trained: one training site ({job.train_sites[0]}), so pooled and federated would be its local "
            "model again"
        )
    absent = sorted(set(labels.values()) - {labels[p] for p in job.train_patients if p in labels})
    if not absent:
        return ""
    names = ", ".join(f"'{manifest.classes[k]}'" for k in absent)
    return (
        f"not trained: label {names} at none of its training patients (pooled and federated need every class)"
    )


# --- folders ------------------------------------------------------------------------------------------------


def slug(name: str) -> str:
    """A folder name for a method or site name: runs of other characters than [A-Za-z0-9._-] become '-'."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-") or "-"


def cell_dir(root: Path, cell: Cell) -> Path:
    return root / "cells" / cell.protocol / slug(cell.method) / slug(cell.test_site) / f"seed-{cell.seed}"


def job_dir(root: Path, job: Job) -> Path:
    return root / "jobs" / job.protocol / slug(job.method) / slug(job.label) / f"seed-{job.seed}"


def check_names(jobs: Sequence[Job]) -> None:
    """Two different sites or methods must not share a folder name."""
    for kind, names in (
        ("site", {s for j in jobs for s in (*j.train_sites, *(c.test_site for c in j.cells))}),
        ("method", {j.method for j in jobs}),
    ):
        by_slug: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_slug[slug(name)].append(name)
        clashes = [sorted(v) for v in by_slug.values() if len(v) > 1]
        if clashes:
            raise CompareError(
                f"{kind} names {clashes[0]} share the folder name '{slug(clashes[0][0])}'; rename one"
            )


def cohort_fingerprint(manifest: Manifest) -> str:
    """SHA-256 of the cohort's (slide, patient, site, label) rows (paths left out: a moved cohort matches)."""
    rows = sorted((s.slide_id, s.patient_id, s.site, s.label) for s in manifest.slides)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def is_done(root: Path, cell: Cell) -> bool:
    return (cell_dir(root, cell) / DONE).is_file()


def check_state(root: Path, state: dict[str, Any], *, replace_other: bool) -> None:
    """Refuse (or, for a demo, clear) finished cells made with other training settings or another cohort."""
    path = root / STATE
    if not path.exists():
        return
    old = json.loads(path.read_text())
    keys = [*state, *(["classes"] if "classes" in old and "classes" not in state else [])]
    changed = [f"{k}: {old.get(k)!r} → {state.get(k)!r}" for k in keys if old.get(k) != state.get(k)]
    if not changed:
        return
    if replace_other:
        for folder in ("cells", "jobs"):
            shutil.rmtree(root / folder, ignore_errors=True)
        path.unlink()
        return
    raise CompareError(
        f"{root} holds a comparison made with other settings ({'; '.join(changed)}); use another --out, "
        f"or delete {root / 'cells'} and {root / 'jobs'} to start over"
    )


# --- training and scoring -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    model: Any  # torch.nn.Module
    rounds: list[dict[str, Any]]  # round-log lines of a federation, [] for baselines
    note: str  # where the model is, for done.json
    privacy: dict[str, Any] = field(default_factory=dict)  # site → ε spent and δ, from its privacy ledger
    overhead: float | None = None  # a federation's seconds outside its rounds (Flower start-up, shutdown)
    calibration: dict[str, Any] = field(default_factory=dict)  # a federation's: what its sites agreed on


def train_baseline(manifest: Manifest, job: Job, config: CompareConfig) -> Trained:
    """local / pooled: `train_epochs` outside Flower, with a federation's initial weights, standardisation
    (from the job's own training patients' tiles) and budget, and the federations' rule for which weights to
    present (`fedpath.common.selection`): the validation loss on the job's validation patients is taken after
    every block of work that stands for a round, and the model is the best such round's.

    A round: ``local_epochs`` epochs; with ``local_steps``, that many optimizer steps per training site (a
    local model: ``local_steps``; pooled over K sites: K × ``local_steps``, the steps the federation's sites
    take together in a round)."""

    from fedpath.client.training import local_config, predict, train_epochs
    from fedpath.common.bags import bags_from_manifest, feature_dim
    from fedpath.common.mil import initial_model
    from fedpath.common.selection import best_round
    from fedpath.common.standardize import moments_of, set_standardization

    bags = bags_from_manifest(manifest.for_patients(job.train_patients))
    if not bags:
        raise CompareError(f"{job.describe()}: no training patients")
    val = bags_from_manifest(manifest.for_patients(job.val_patients)) if job.val_patients else []
    model = initial_model(
        config.model, in_dim=feature_dim(manifest), num_classes=manifest.num_classes, seed=job.seed
    )
    if config.standardize:
        set_standardization(model, moments_of(bags))
    train_config = local_config(
        config,
        seed=job.seed,
        rounds=config.rounds,
        sites=len(job.train_sites),
        site_batches=job.family == "pooled" and config.site_batches(job.protocol),
    )
    round_steps = (train_config.steps or 0) // config.rounds  # 0: a round is local_epochs epochs
    losses: list[tuple[int, float | None]] = []
    states: dict[int, dict[str, Any]] = {}

    def end_of_round(r: int) -> None:
        losses.append((r, predict(model, val).loss if val else None))
        if losses[-1][1] is not None and losses[-1][1] == min(x for _, x in losses if x is not None):
            states[r] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def after_epoch(epoch: int) -> None:
        if not (epoch + 1) % config.local_epochs:
            end_of_round((epoch + 1) // config.local_epochs)

    if round_steps:
        train_epochs(model, bags, train_config, every=(round_steps, end_of_round))
    else:
        train_epochs(model, bags, train_config, after_epoch=after_epoch)
    selection = best_round(losses)
    if selection.round in states and selection.round != config.rounds:
        model.load_state_dict(states[selection.round])
    model.eval()
    return Trained(model, [], f"in memory (not saved); {selection.why}")


def federation_manifest(manifest: Manifest, job: Job, folder: Path) -> Path:
    """The manifest the federation's sites read: the cohort's (internal: the ClientApp holds back each site's
    test patients itself), or (LOSO, cv) the rows of the job's training and validation patients only, written
    into the job folder, so the held-out site's or fold's (official: the test patients') files are not even
    named to the federation."""
    if job.protocol == "internal":
        return manifest.path
    path = folder / "manifest.csv"
    seen = job.train_patients | job.val_patients
    write_manifest(path, [s for s in manifest.slides if s.site in job.train_sites and s.patient_id in seen])
    held = {s.label for s in load_manifest(path, classes=manifest.classes).slides}
    if held != set(manifest.classes):  # `not_trained` keeps such jobs out of the plan
        raise CompareError(
            f"{job.describe()}: the training sites hold only the labels {sorted(held)} of "
            f"{list(manifest.classes)}; a federation needs every class at its training sites"
        )
    return path


def train_federation(
    manifest: Manifest,
    job: Job,
    config: CompareConfig,
    folder: Path,
    say: Callable[[str], None],
    engine: SimulationEngine | None = None,
) -> Trained:
    """FedAvg / FedProx / FedProx+DP on Flower's simulation engine over the job's training sites, on
    `engine` when the grid shares one (else on a private one).

    An interrupted federation resumes from its last checkpoint; a finished one is
    not run again.
    """
    from fedpath.server.runfolder import RunFolder, RunFolderError, load_model
    from fedpath.simulation.simulate import (
        SimulationError,
        federation_config,
        simulate,
        sites_that_never_trained,
    )

    manifest_path = federation_manifest(manifest, job, folder)
    run_dir = (folder / "federation").resolve()
    run = federation_config(
        manifest_path,
        run_dir=run_dir,
        classes=manifest.classes,
        **{
            **config.training_settings(),
            "resume": True,  # a run cut off in an earlier invocation continues from its last checkpoint
            "num_server_rounds": config.rounds,
            "proximal_mu": job.mu,
            "min_sites": len(job.train_sites),
            "seed": job.seed,
            "test_fraction": config.test_fraction_of(job.protocol),
            "split_seed": job.split_seed,
            "dp_epsilon": job.epsilon or 0.0,
        },
    )
    runs = RunFolder(run_dir)
    try:
        runs.resumable(run.model_dump(), resume=True, rounds=config.rounds)
    except RunFolderError as err:
        raise CompareError(f"{job.describe()}: {err}; or delete {folder} to rerun it") from err
    last = runs.checkpoint_rounds()
    finished = runs.model.exists() and bool(last) and last[-1] == config.rounds
    overhead = None
    if not finished:
        try:
            overhead = simulate(
                run, sites=len(job.train_sites), cpus_per_site=config.cpus_per_site, engine=engine,
                progress=say,
            ).overhead  # fmt: skip
        except SimulationError as err:
            raise CompareError(f"{job.describe()}: the federation failed: {err}") from err
    ledgers = list((run_dir / "privacy").glob("*.json"))
    if job.epsilon is not None and len(ledgers) < len(job.train_sites):
        raise CompareError(
            f"{job.describe()}: {len(ledgers)} of {len(job.train_sites)} sites kept a privacy ledger in "
            f"{run_dir / 'privacy'}: this fedpath's ClientApp did not apply DP-SGD everywhere, so ε would be a "
            "claim, not a guarantee; no cell was written. "
            "Leave fedprox-dp out of --methods until DP training is available."
        )
    never = sites_that_never_trained(runs.read_rounds(), len(job.train_sites))
    if never:
        raise CompareError(
            f"{job.describe()}: "
            + "; ".join(f"site {s} trained in no round ({why})" for s, why in never.items())
            + f"; the federation would stand for fewer sites than the grid says (logs in {run_dir / 'site-logs'})"
        )
    model, ckpt = load_model(runs.model)
    return Trained(
        model, runs.read_rounds(), str(runs.model), spent_privacy(ledgers), overhead, ckpt.calibration
    )


def spent_privacy(ledgers: Sequence[Path]) -> dict[str, Any]:
    """ε spent (after the last round the site trained) and δ per site, read from the sites' privacy ledgers."""
    out: dict[str, Any] = {}
    for path in ledgers:
        try:
            ledger = json.loads(path.read_text())
            entries = ledger.get("entries") or [{}]
            out[str(ledger.get("site", path.stem))] = {
                "epsilon": entries[-1].get("epsilon"),
                "delta": ledger.get("delta"),
            }
        except (OSError, ValueError, AttributeError):
            out[path.stem] = {"epsilon": None, "delta": None, "problem": f"unreadable ledger {path.name}"}
    return out


def score(manifest: Manifest, model: Any, cell: Cell) -> list[PredictionRow]:
    """Patient-level probabilities of `model` on the cell's test patients (all tiles of every slide)."""
    from fedpath.client.training import predict_patients

    patients, labels, probs = predict_patients(model, manifest.for_patients(cell.test_patients))
    return [
        PredictionRow(
            cell.protocol,
            cell.method,
            cell.test_site,
            cell.seed,
            pid,
            int(y),
            tuple(map(float, p)),
            cell.epsilon,
        )
        for pid, y, p in zip(patients, labels, probs, strict=True)
    ]


def round_rows(cell: Cell, lines: Sequence[dict[str, Any]]) -> list[RoundRow]:
    """The round log of a federation as rounds.csv rows: mean training loss and validation AUROC per round."""
    # loso: the held-out site; cv: the fold; internal and official: one federation for every test site
    site = ALL_SITES if cell.protocol in ("internal", "official") else cell.test_site
    out = []
    for line in lines:
        aggregate = line.get("aggregate", {})
        for metric, value in (
            ("train_loss", aggregate.get("train", {}).get("loss")),
            ("val_auroc", aggregate.get("evaluate", {}).get("auroc")),
        ):
            if isinstance(value, int | float) and math.isfinite(value):
                out.append(
                    RoundRow(cell.protocol, cell.method, site, cell.seed, int(line["round"]), metric, value)
                )
    return out


def model_calibration(
    trained: Trained, validation: Sequence[PredictionRow]
) -> tuple[tuple[float, float, float], str] | None:
    """(temperature, threshold, coverage) of a model and where they come from: a federation's model carries
    what its sites agreed on; local and pooled models are fitted the same way (`fedpath.common.calibration`,
    the same sums) on their validation predictions. None: neither (a DP federation, no validation patients)."""
    from fedpath.common.calibration import Calibration, combine, site_statistics

    if trained.calibration:
        agreed = Calibration.from_dict(trained.calibration)
        if agreed is not None:
            return (agreed.temperature, agreed.threshold, agreed.coverage), "the sites' aggregates"
        return None
    if trained.rounds or not validation:  # a federation without calibration stays without one
        return None
    probs = np.array([r.probs for r in validation], dtype=np.float64)
    labels = np.array([r.label for r in validation])
    fitted = combine([("validation", *site_statistics(np.log(np.clip(probs, 1e-12, 1.0)), labels))])
    if fitted is None:
        return None
    return (fitted.temperature, fitted.threshold, fitted.coverage), "fitted on the validation predictions"


def write_cell(
    root: Path,
    job: Job,
    cell: Cell,
    trained: Trained,
    rows: list[PredictionRow],
    seconds: float,
    *,
    validation: Sequence[PredictionRow] = (),
    train_classes: int | None = None,
) -> None:
    """predictions.csv (and rounds.csv, validation.csv, calibration.csv) first, done.json last: a cell without
    done.json is not finished. `validation`: the job's model on its validation patients (any cell of the job:
    rows are re-labelled with this cell); `train_classes`: classes among the training patients."""
    folder = cell_dir(root, cell)
    calibration = model_calibration(trained, validation)
    if calibration is not None:
        values, source = calibration
        row = CalibrationRow(cell.protocol, cell.method, cell.test_site, cell.seed, *values, source)
        write_calibration(folder / "calibration.csv", [row])
    write_predictions(folder / "predictions.csv", rows)
    rounds = round_rows(cell, trained.rounds)
    if rounds:
        write_rounds(folder / "rounds.csv", rounds)
    if validation:
        write_predictions(
            folder / "validation.csv",
            [replace(r, test_site=cell.test_site, seed=cell.seed) for r in validation],
        )
    done = {
        "protocol": cell.protocol,
        "method": cell.method,
        "test_site": cell.test_site,
        "seed": cell.seed,
        "split_seed": cell.split_seed,
        "epsilon": cell.epsilon,
        "mu": job.mu if job.family != "local" and job.family != "pooled" else None,
        "train_sites": list(job.train_sites),
        "train_patients": sorted(job.train_patients),
        "train_classes": train_classes,
        "val_patients": sorted(job.val_patients),
        "test_patients": sorted(cell.test_patients),
        "model": trained.note,
        "privacy_spent": trained.privacy,
        "job": job_dir(root, job).relative_to(root).as_posix(),
        "job_seconds": round(seconds, 2),
        "finished_at": time.time(),
    }
    write_text_atomic(folder / DONE, json.dumps(done, indent=1) + "\n")


# --- the run ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    report: Path  # report.html
    results: Path  # results.csv
    cells_run: int
    cells_skipped: int
    failed: list[str]  # one line per failed job
    seconds: float  # wall time of this invocation
    sweep_seconds: float  # training time of every finished job, earlier invocations included
    overheads: list[float] = field(default_factory=list)  # per federation run here, in order: Flower's share
    analysis: Analysis | None = (
        None  # what the report shows; `headline(outcome.analysis, protocol)` prints it
    )
    not_trained: list[str] = field(default_factory=list)  # jobs of the grid left out by rule, one line each


def _eta(remaining: Sequence[Job], durations: Mapping[str, Sequence[float]]) -> str:
    """Time left: the jobs still to run, each at the mean time of the finished jobs of its family. No guess
    before a family has a finished job: on a busy 2-core machine (the demo's cohort, 10 rounds) a federation of
    3 sites took 30–54 s, a local model 11–19 s and a pooled one 6–35 s, where the old fixed guess said 55 s
    and 5 s; all scale with the cohort, the rounds and the cores, so no fixed first guess holds."""

    def seconds(total: float) -> str:
        return f"{total / 60:.0f} min" if total >= 90 else f"{total:.0f} s"

    untimed = list(dict.fromkeys(j.family for j in remaining if not durations.get(j.family)))
    timed = sum(float(np.mean(durations[j.family])) for j in remaining if durations.get(j.family))
    if untimed:
        first = f"after the first {', '.join(untimed)} job{'s' if len(untimed) > 1 else ''}"
        return first + (f" (the other jobs: {seconds(timed)})" if timed else "")
    return seconds(timed)


def run_comparison(
    manifest_path: Path,
    out: Path,
    config: CompareConfig,
    *,
    cohort: dict[str, Any] | None = None,
    replace_other: bool = False,
    n_boot: int = 1000,
    say: Callable[[str], None] = print,
    classes: Sequence[str] | None = None,
) -> Outcome:
    """Run every unfinished job of the grid, then render the report from all finished cells in `out`.

    `cohort` (how the sites were derived) goes into settings.json. A failed job is reported and skipped; the
    others still run and the report shows what finished. `classes`: the class order declared (--classes,
    --positive); None: the labels found, sorted.
    """
    started = time.perf_counter()
    out = out.resolve()
    manifest = load_manifest(manifest_path, classes=classes)
    problems = precheck(manifest)
    if problems:
        raise CompareError(problems)
    jobs = plan(manifest, config)
    check_names(jobs)
    not_trained = [f"{j.describe()}: {j.not_trained}" for j in jobs if j.not_trained]
    jobs = [j for j in jobs if not j.not_trained]
    for line in not_trained:
        say(line)
    state = {"cohort": cohort_fingerprint(manifest), **config.training()}
    if classes is not None:  # a declared order changes what each output means (absent: sorted, as before)
        state["classes"] = list(manifest.classes)
    check_state(out, state, replace_other=replace_other)
    write_text_atomic(out / STATE, json.dumps(state, indent=1) + "\n")
    todo = [j for j in jobs if not all(is_done(out, c) for c in j.cells)]
    cells_total = sum(len(j.cells) for j in jobs)
    cells_done = skipped = cells_total - sum(len(j.cells) for j in todo)
    say(
        f"grid: {len(jobs)} jobs, {cells_total} cells ({', '.join(config.protocols)} × "
        f"{len({j.method for j in jobs})} methods × {config.seeds} seed(s)); "
        + (f"{cells_done} cells already done, " if cells_done else "")
        + f"{len(todo)} jobs to run"
    )
    durations: dict[str, list[float]] = defaultdict(list)  # job family → seconds of its finished jobs
    failed: list[str] = []
    overheads: list[float] = []
    ran = 0
    labels = manifest.patient_labels()
    from fedpath.simulation.simulate import SimulationEngine

    # one simulation engine for every federation of the grid: a run after the first skips its start-up
    engine = SimulationEngine(out / "flower") if any(j.federated for j in todo) else None
    with engine or contextlib.nullcontext():
        ran, cells_done = _run_jobs(
            manifest, out, config, todo, engine, labels, durations, failed, overheads, cells_done, cells_total,
            say,
        )  # fmt: skip
        if engine is not None:  # a federation is done at its model card; Flower's end of each is checked here
            for problem in engine.settle():
                failed.append(problem)
                say(f"  FAILED: {problem}")
    if overheads and engine is not None:
        overheads[0] += engine.start_seconds  # the engine started for the first federation
    say("\nreport: collecting finished cells")
    features = feature_provenance(manifest)
    if features["random_init_files"]:
        say(f"NOTE: {RANDOM_INIT_NOTE.format(**features)}")
    paths = render(
        out, cohort=cohort, config=config, n_boot=n_boot, say=say, features=features, classes=manifest.classes
    )
    sweep = finished_job_seconds(out)
    return Outcome(
        paths.html, paths.results, ran, skipped, failed, time.perf_counter() - started, sweep, overheads,
        paths.analysis, not_trained,
    )  # fmt: skip


def _run_jobs(
    manifest: Manifest,
    out: Path,
    config: CompareConfig,
    todo: Sequence[Job],
    engine: SimulationEngine | None,
    labels: Mapping[str, int],
    durations: dict[str, list[float]],
    failed: list[str],
    overheads: list[float],
    cells_done: int,
    cells_total: int,
    say: Callable[[str], None],
) -> tuple[int, int]:
    """Train, score and write each job of `todo`; returns the cells run and the cells now done."""
    ran = 0
    for i, job in enumerate(todo, start=1):
        eta = _eta(todo[i - 1 :], durations)
        say(f"\n[job {i}/{len(todo)} · {cells_done}/{cells_total} cells done · ETA {eta}] {job.describe()}")
        t0 = time.perf_counter()
        folder = job_dir(out, job)
        try:
            if job.federated:
                trained = train_federation(
                    manifest, job, config, folder, lambda line: say(f"    {line}"), engine
                )
            else:
                trained = train_baseline(manifest, job, config)
        except CompareError as err:
            failed.append(str(err))
            say(f"  FAILED: {err}")
            continue
        # the presented model on its training sites' validation patients: the report picks each model's
        # decision threshold and the best hospital there, never on the test patients
        validation = (
            score(manifest, trained.model, replace(job.cells[0], test_patients=job.val_patients))
            if job.val_patients
            else []
        )
        seconds = time.perf_counter() - t0
        durations[job.family].append(seconds)
        train_classes = len({labels[p] for p in job.train_patients if p in labels})
        scores = []
        for cell in job.cells:
            rows = score(manifest, trained.model, cell)
            write_cell(
                out, job, cell, trained, rows, seconds, validation=validation, train_classes=train_classes
            )
            scores.append(f"{cell.test_site} {_auroc(rows):.3f}")
        cells_done += len(job.cells)
        ran += len(job.cells)
        if trained.overhead is not None:
            overheads.append(trained.overhead)
        say(f"  done in {seconds:.0f} s; AUROC at {', '.join(scores)}")
    return ran, cells_done


RANDOM_INIT_NOTE = (
    "{random_init_files} of {files} feature files were extracted with a randomly initialised encoder "
    "({encoders}): these AUROCs measure the pipeline, not what the model would reach with pretrained weights"
)


def feature_provenance(manifest: Manifest) -> dict[str, Any]:
    """What the cohort's feature files record about their encoder: names, and how many came from random weights."""
    from fedpath.common.features import FeatureFileError, inspect_features

    encoders: set[str] = set()
    files = random_init = 0
    for slide in manifest.slides:
        if slide.features is None:
            continue
        try:
            info = inspect_features(slide.features)
        except FeatureFileError:
            continue  # a broken file fails its job, with its name, where it is read
        files += 1
        encoders.add(info.encoder or "unknown")
        random_init += bool(info.attrs.get("random_init", False))
    return {"files": files, "random_init_files": random_init, "encoders": ", ".join(sorted(encoders))}


def _auroc(rows: Sequence[PredictionRow]) -> float:
    from fedpath.common.metrics import auroc

    return auroc(np.array([r.label for r in rows]), np.array([r.probs for r in rows]))


def _done_files(root: Path) -> list[Path]:
    return sorted((root / "cells").glob(f"*/*/*/seed-*/{DONE}"))


def finished_job_seconds(root: Path) -> float:
    """Training and scoring seconds of every job with a finished cell (a job scored on several cells counts
    once), earlier invocations included: the wall time of the sweep without start-up and report."""
    seconds = {}
    for marker in _done_files(root):
        info = json.loads(marker.read_text())
        seconds[info.get("job", str(marker.parent))] = float(info["job_seconds"])
    return sum(seconds.values())


def render(
    root: Path,
    *,
    cohort: dict[str, Any] | None,
    config: CompareConfig,
    n_boot: int = 1000,
    say: Callable[[str], None] = print,
    features: dict[str, Any] | None = None,
    classes: Sequence[str] = (),
) -> ReportPaths:
    """Merge every finished cell into the report's inputs (predictions.csv, rounds.csv, validation.csv,
    training.csv, settings.json) and write the report. Cells of older runs without validation.csv or training
    facts still render: the report says which of its rules it could not apply."""
    predictions: list[PredictionRow] = []
    validation: list[PredictionRow] = []
    rounds: list[RoundRow] = []
    training: list[TrainingFacts] = []
    calibration: list[CalibrationRow] = []
    done = _done_files(root)
    if not done:
        raise CompareError(f"{root}: no finished cells to report on (see the errors above)")
    for marker in done:
        predictions += load_predictions(marker.parent / "predictions.csv")
        if (marker.parent / "rounds.csv").exists():
            rounds += load_rounds(marker.parent / "rounds.csv")
        if (marker.parent / "validation.csv").exists():
            validation += load_predictions(marker.parent / "validation.csv")
        training.append(_training_facts(marker))
        if (marker.parent / "calibration.csv").exists():
            calibration += load_calibration(marker.parent / "calibration.csv")
    write_predictions(root / "predictions.csv", predictions)
    _write_merged(root / "rounds.csv", rounds, write_rounds)
    _write_merged(root / "validation.csv", validation, write_predictions)
    _write_merged(root / "training.csv", training, write_training)
    _write_merged(root / "calibration.csv", calibration, write_calibration)
    settings = {
        "classes": list(classes),
        "cohort": cohort or {},
        "features": features or {},
        "protocols": {p: f"test patients: {TEST_PATIENTS[p]}" for p in config.protocols},
        "training": {
            **config.training(),
            "budget": (
                f"{config.rounds} rounds of {config.local_steps} optimizer steps at every training site, every "
                "method (a local model: that many steps a round; pooled over K sites: K × that many)"
                if config.local_steps
                else f"{config.rounds * config.local_epochs} epochs per site (rounds × local epochs), every method"
            ),
            "pooled batches": {
                p: "each from one training site" if config.site_batches(p) else "mixed across sites"
                for p in config.protocols
            },
            "model presented": f"every method: {SELECTION_RULE} (local and pooled: the work that stands for a "
            "round is followed by a validation)",
            "seeds": "seed i: train_seed + i; internal and cv split (cv: deal the folds) with split_seed + i, "
            "loso with split_seed",
        },
        "grid": {
            "methods": list(config.methods),
            "mu": list(config.mu),
            "dp_epsilons": list(config.dp_epsilons) if "fedprox-dp" in config.methods else [],
            "seeds": config.seeds,
            "finished cells": len(done),
        },
        "wall time of the finished jobs (s)": round(finished_job_seconds(root), 1),
    }
    write_text_atomic(root / "settings.json", json.dumps(settings, indent=2) + "\n")
    return write_report(root, n_boot=n_boot, progress=lambda s: say(f"report: {s}"))


_Row = TypeVar("_Row")


def _write_merged(path: Path, rows: Sequence[_Row], write: Callable[[Path, Sequence[_Row]], None]) -> None:
    """Write a merged report input; one that no finished cell has is removed, lest the report read a stale
    merge of earlier cells."""
    if rows:
        write(path, rows)
    else:
        path.unlink(missing_ok=True)


def _training_facts(marker: Path) -> TrainingFacts:
    """Who trained a finished cell's model, from its done.json (counts unknown to older cells stay None)."""
    info = json.loads(marker.read_text())

    def count(key: str) -> int | None:
        value = info.get(key)
        return len(value) if isinstance(value, list) else value if isinstance(value, int) else None

    return TrainingFacts(
        protocol=info["protocol"],
        method=info["method"],
        test_site=info["test_site"],
        seed=int(info["seed"]),
        train_patients=count("train_patients"),
        train_classes=count("train_classes"),
        val_patients=count("val_patients"),
    )


# --- the headline -------------------------------------------------------------------------------------------

# The printed headline is the report's comparison table (`fedpath.simulation.headline.Comparison`): the same
# rows, the same common sites, the same verdicts and the same best hospital as report.md.
HeadlineRow = ComparisonRow


def headline(source: Analysis | Path | None, protocol: str) -> Comparison:
    """The comparison table of `protocol`: methods (best first, those that did not learn last and marked ✗),
    then the single hospitals summarised: the best at each site (an oracle; dropped where one hospital model
    is tested per site), the best hospital (chosen on its validation patients, among eligible ones) and the
    mean of hospitals. `source`: a run's analysis (`Outcome.analysis`), or its results.csv, read back."""
    if isinstance(source, Analysis):
        return source.comparisons.get(protocol) or comparison([], protocol)
    if source is None:
        return comparison([], protocol)
    return comparison(load_results(source), protocol)


def _cell(value: float, width: int) -> str:
    return f"{value:>{width}.3f}" if math.isfinite(value) else f"{'—':>{width}}"


def format_headline(table: Comparison, protocol: str | None = None) -> str:
    """The comparison as a fixed-width text table, with the notes its reader needs below it."""
    protocol = protocol or table.protocol
    sites = list(table.tested_sites)
    width = max([len(r.label) + 2 for r in table] + [6])
    where = {
        "loso": "held-out site",
        "internal": "site's test patients",
        "official": "site's official test patients",
        "cv": "fold's test patients",
    }
    operating = [k for k in ("sensitivity", "specificity", "accuracy") if k in table.metrics]
    short = {"balanced_accuracy": "bal.acc", "sensitivity": "sens", "specificity": "spec", "accuracy": "acc"}
    extra = ["balanced_accuracy", *operating, "ece"]
    in_means = ", ".join(table.sites) if table.sites != table.tested_sites else "every site"
    lines = [
        f"AUROC at each {where.get(protocol, 'test site')}, mean over seeds; 'mean' and the other means: over "
        f"{in_means} (the same for every row), '± seeds': SD across seeds; "
        + (
            "sens/spec/acc at each model's threshold chosen on validation"
            if operating
            else "no operating point"
        )
        + "; ✗: did not learn or inverted, left out of comparisons",
        f"{'method':<{width}}  {'mean':>5}  {'± seeds':>7}  "
        + "  ".join(f"{short.get(k, k):>7}" for k in extra)
        + "  "
        + "  ".join(f"{s[:12]:>12}" for s in sites),
    ]
    for r in table:
        label = f"{r.label} ✗" if r.excluded else r.label
        cells = "  ".join(_cell(r.by_site[s], 12) if s in r.by_site else f"{'—':>12}" for s in sites)
        lines.append(
            f"{label:<{width}}  {_cell(r.mean, 5)}  {_cell(r.seed_sd, 7)}  "
            + "  ".join(_cell(r.mean_of(k), 7) for k in extra)
            + f"  {cells}"
        )
    lines += [
        f"  {r.label}: means over {', '.join(r.sites) or 'no site'} only" + (f" ({r.note})" if r.note else "")
        for r in table
        if r.sites != table.sites
    ]
    if table.pooled_test:
        lines.append("  AUROC on the pooled test set (every site's test patients together; FLamby's figure):")
        lines += [
            f"    {(f'{r.label} ✗' if r.excluded else r.label):<{width}}  "
            f"{_cell(table.pooled_test[r.method][0], 5)}  ± {_cell(table.pooled_test[r.method][1], 5)}"
            for r in table
            if r.method in table.pooled_test
        ]
    lines += [f"  {note}" for note in table.notes]
    return "\n".join(lines)


def paired_difference(a: ComparisonRow, b: ComparisonRow) -> float:
    """Mean over the test sites both rows' means cover of (a − b), in AUROC points: a paired comparison on
    the same sites (a hospital's own model has no value at its own site in leave-one-site-out)."""
    return paired_mean_difference(a, b)[0]


def comparison_lines(table: Comparison) -> list[str]:
    """The best federated method (not DP, and one that learned) against pooled and against the single
    hospitals, paired by site; each line says where it compares."""
    fed = table.best([r.method for r in table if r.method.startswith(("fedprox(", "fedavg"))])
    if fed is None:
        return []
    own = {
        "loso": "at the sites it did not train on",
        "internal": "at its own site's test patients",
        "official": "at every site's official test patients",
    }.get(table.protocol, "on the same folds (patients of every site)")
    out = []
    for role, text in (
        (METHOD, "pooled"),
        (BEST_HOSPITAL, f"the best hospital alone (chosen on validation), {own}"),
        (ORACLE, "the best hospital at each site (oracle)"),
        (MEAN_OF_HOSPITALS, "the mean hospital"),
    ):
        other = next((r for r in table if r.method == "pooled"), None) if role == METHOD else table.row(role)
        if other is None or other.excluded:
            continue
        diff, sites = paired_mean_difference(fed, other)
        line = f"{fed.label} − {text}: {diff:+.3f} (paired over {sites} site{'s' if sites != 1 else ''})"
        if role == METHOD and diff > 0:  # as the report says it: a warning, not a finding
            line += "; pooled is the upper reference: above it, read the report's caution"
        out.append(line)
    return out
