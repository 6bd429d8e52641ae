"""Evaluation, method names and the analysis: everything the report shows, computed once."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from fedpath.common.calibration import (
    calibrated_probs,
    minimum_patients,
    nonconformity,
    prediction_sets,
    split_threshold,
)
from fedpath.common.metrics import (
    Estimate,
    aggregate_by_patient,
    auroc,
    balanced_accuracy,
    bootstrap_ci,
    expected_calibration_error,
)
from fedpath.simulation.headline import (
    RESULT_COLUMNS,
    Comparison,
    RunResult,
    common_sites,
    comparison,
    nanmean,
    natural_key,
    result_row,
)
from fedpath.simulation.verdicts import (
    NOT_CHECKED,
    Verdict,
    hospital_ineligibility,
    inverted,
    judges,
    learned,
    operating_point,
    youden_threshold,
)

if TYPE_CHECKING:
    pass
from fedpath.simulation.report.contract import (
    ALL_SITES,
    MIN_PATIENTS,
    PROTOCOLS,
    CalibrationRow,
    PredictionRow,
    RoundRow,
    TrainingFacts,
    csv_text,
)

# --- evaluation ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """One trained model scored on one test set: patient-level labels (P,) and probabilities (P, C)."""

    protocol: str
    method: str
    test_site: str
    seed: int
    patient_ids: tuple[str, ...]
    labels: np.ndarray
    probs: np.ndarray
    epsilon: float | None
    # the same model on its training sites' validation patients (validation.csv), when the run recorded them
    validation: Evaluation | None = None

    @property
    def auroc(self) -> float:
        return auroc(self.labels, self.probs)

    @cached_property
    def threshold(self) -> tuple[float, str]:
        """Decision threshold on P(class 1) chosen on the validation patients, and how; NaN when none."""
        if self.probs.shape[1] != 2:
            return math.nan, "not available: more than two classes (the operating point is binary only)"
        if self.validation is None:
            return math.nan, "not available: no validation predictions (validation.csv)"
        return youden_threshold(self.validation.labels, self.validation.probs[:, 1])

    @cached_property
    def operating_point(self) -> tuple[float, float, float]:
        """(sensitivity, specificity, accuracy) on the test patients at `threshold`; NaN where unavailable."""
        threshold, _ = self.threshold
        if not math.isfinite(threshold):
            return math.nan, math.nan, math.nan
        return operating_point(self.labels, self.probs[:, 1], threshold)


def evaluations(rows: Sequence[PredictionRow], validation: Sequence[PredictionRow] = ()) -> list[Evaluation]:
    """Group prediction rows by (protocol, method, test_site, seed), one patient per entry; each with the
    validation rows of the same key (validation.csv), where there are any."""
    scored = {(e.protocol, e.method, e.test_site, e.seed): e for e in _group(validation)}
    return [
        replace(e, validation=scored.get((e.protocol, e.method, e.test_site, e.seed))) for e in _group(rows)
    ]


def _group(rows: Sequence[PredictionRow]) -> list[Evaluation]:
    groups: dict[tuple[str, str, str, int], list[PredictionRow]] = defaultdict(list)
    for r in rows:
        groups[(r.protocol, r.method, r.test_site, r.seed)].append(r)
    out = []
    for (protocol, method, site, seed), group in groups.items():
        patients, labels, probs = aggregate_by_patient(
            [r.patient_id for r in group],
            np.array([r.label for r in group]),
            np.array([r.probs for r in group]),
        )
        out.append(Evaluation(protocol, method, site, seed, tuple(patients), labels, probs, group[0].epsilon))
    return out


@dataclass(frozen=True)
class Summary:
    """A method's AUROC over some evaluations: one (site, seed), one site's seeds, or all sites and seeds.

    `auroc` is the mean of the per-evaluation AUROCs (those that are defined) with a patient-bootstrap 95% CI;
    `seed_sd` is the SD across seeds of the per-seed mean (NaN with one seed); balanced accuracy, ECE and the
    operating point (sensitivity, specificity, accuracy at each model's validation-chosen threshold; NaN
    where none) are fractions 0–1, means over the evaluations; `patients` and `positives` count distinct
    patients (positive: any class other than 0)."""

    protocol: str
    method: str
    test_site: str
    auroc: Estimate
    seed_sd: float
    balanced_accuracy: float
    ece: float
    sensitivity: float
    specificity: float
    accuracy: float
    patients: int
    positives: int
    classes: int
    seeds: int
    sites: int
    undefined: int  # evaluations whose AUROC is undefined (one class only)
    epsilon: float | None

    @property
    def warning(self) -> str:
        """Why this estimate should not be trusted, or '' when it can be."""
        reasons = []
        if self.patients < MIN_PATIENTS:
            reasons.append(f"only {self.patients} patients")
        if self.classes < 2:
            reasons.append("one class only: AUROC undefined")
        elif self.undefined:
            reasons.append(f"{self.undefined} test set(s) hold one class only and are left out")
        if math.isfinite(self.auroc.high) and self.auroc.high < 0.5:
            reasons.append("inverted: the whole AUROC CI lies below 0.5 (worse than chance)")
        return "; ".join(reasons)


def summarize(evals: Sequence[Evaluation], *, n_boot: int = 1000, seed: int = 0) -> Summary:
    """Summary of evaluations of one (protocol, method); see `Summary` for what each number means."""
    first = evals[0]
    keys = list(dict.fromkeys((e.test_site, p) for e in evals for p in e.patient_ids))
    index = {k: i for i, k in enumerate(keys)}
    # per evaluation: the row of each pooled patient in that evaluation, -1 where the patient is not in it
    rows_of = []
    for e in evals:
        rows = np.full(len(keys), -1)
        rows[[index[(e.test_site, p)] for p in e.patient_ids]] = np.arange(len(e.patient_ids))
        rows_of.append(rows)

    def mean_auroc(drawn: np.ndarray, _: np.ndarray) -> float:
        # the resampled patients, scored by every evaluation that holds them
        values = []
        for e, rows in zip(evals, rows_of, strict=True):
            r = rows[drawn]
            r = r[r >= 0]
            values.append(auroc(e.labels[r], e.probs[r]))
        return nanmean(values)

    patient_index = np.arange(len(keys))
    estimate = bootstrap_ci(mean_auroc, patient_index, patient_index, n_boot=n_boot, seed=seed)
    per_seed: dict[int, list[float]] = defaultdict(list)
    for e in evals:
        per_seed[e.seed].append(e.auroc)
    seed_means = [m for m in (nanmean(v) for v in per_seed.values()) if math.isfinite(m)]
    labels_by_key: dict[tuple[str, str], int] = {}
    for e in evals:
        for p, y in zip(e.patient_ids, e.labels, strict=True):
            labels_by_key.setdefault((e.test_site, p), int(y))
    labels = list(labels_by_key.values())
    return Summary(
        protocol=first.protocol,
        method=first.method,
        test_site=first.test_site if len({e.test_site for e in evals}) == 1 else ALL_SITES,
        auroc=estimate,
        seed_sd=float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else float("nan"),
        balanced_accuracy=nanmean([balanced_accuracy(e.labels, e.probs) for e in evals]),
        ece=nanmean([expected_calibration_error(e.labels, e.probs) for e in evals]),
        sensitivity=nanmean([e.operating_point[0] for e in evals]),
        specificity=nanmean([e.operating_point[1] for e in evals]),
        accuracy=nanmean([e.operating_point[2] for e in evals]),
        patients=len(keys),
        positives=sum(1 for y in labels if y != 0),
        classes=len(set(labels)),
        seeds=len(per_seed),
        sites=len({e.test_site for e in evals}),
        undefined=sum(1 for e in evals if not math.isfinite(e.auroc)),
        epsilon=first.epsilon,
    )


# --- method names -------------------------------------------------------------------------------------------


def method_parameters(method: str) -> tuple[str, dict[str, str]]:
    """`fedprox-dp(mu=0.01, eps=4)` → ('fedprox-dp', {'mu': '0.01', 'eps': '4'})."""
    found = re.fullmatch(r"\s*([^()]*?)\s*(?:\((.*)\))?\s*", method)
    base, inside = (found.group(1), found.group(2)) if found else (method, None)
    params = {}
    for part in (inside or "").split(","):
        key, sep, value = part.partition("=")
        if sep:
            params[key.strip()] = value.strip()
    return base, params


def method_kind(method: str, epsilon: float | None) -> str:
    """'pooled', 'single hospital', 'federated + DP' or 'federated'."""
    base = method.strip().lower()
    if base.startswith("pooled"):
        return "pooled"
    if base.startswith("local"):
        return "single hospital"
    return "federated" if epsilon is None else "federated + DP"


_KIND_ORDER = {"pooled": 0, "single hospital": 1, "federated": 2, "federated + DP": 3}


def _without_dp(base: str) -> str:
    return re.sub(r"[-_+ ]?dp$", "", base, flags=re.IGNORECASE)


# --- the analysis: everything the report shows, computed once -----------------------------------------------


@dataclass
class Analysis:
    evals: list[Evaluation]
    per_run: dict[tuple[str, str, str, int], Summary]  # (protocol, method, site, seed)
    per_site: dict[tuple[str, str, str], Summary]  # (protocol, method, site), over seeds
    # (protocol, method), over seeds and the protocol's common sites (`headline.common_sites`; a local model:
    # those of them it was tested at), so that every method's figure rests on the same hospitals
    overall: dict[tuple[str, str], Summary]
    methods: list[str]  # canonical order
    epsilon: dict[str, float | None]
    rounds: list[RoundRow] = field(default_factory=list)
    verdicts: dict[tuple[str, str], Verdict] = field(default_factory=dict)  # (protocol, method)
    results: list[RunResult] = field(default_factory=list)  # the rows of results.csv
    comparisons: dict[str, Comparison] = field(default_factory=dict)  # protocol → its comparison table
    has_validation: bool = False  # validation.csv was there
    has_training: bool = False  # training.csv was there
    # (protocol, method, test site) → what the models' calibration does there (calibration.csv was there)
    calibration: dict[tuple[str, str, str], CalibrationResult] = field(default_factory=dict)
    classes: tuple[str, ...] = ()  # class labels in index order (settings.json), () when not known

    @property
    def positive(self) -> str | None:
        """How the report names class 1 of a binary task: its label ("positive" when none is known); None
        for more classes, where there is no positive class, only "class X vs rest"."""
        if any(e.probs.shape[1] != 2 for e in self.evals):
            return None
        return self.classes[1] if len(self.classes) == 2 else "positive"

    def excluded(self, protocol: str, method: str) -> bool:
        """Did not learn, or inverted: shown, but in no finding, comparison or 'best' choice."""
        verdict = self.verdicts.get((protocol, method))
        return verdict is not None and verdict.excluded

    def usable(self, protocol: str) -> dict[str, Summary]:
        """The summaries of the protocol's methods that may enter findings, by method."""
        return {m: s for (p, m), s in self.overall.items() if p == protocol and not self.excluded(p, m)}

    @property
    def internal_protocol(self) -> str | None:
        """The protocol that tests on patients of the training hospitals (internal, official, else cv), if any."""
        return next((p for p in ("internal", "official", "cv") if p in self.protocols), None)

    @property
    def protocols(self) -> list[str]:
        return [p for p in PROTOCOLS if any(k[0] == p for k in self.overall)]

    @property
    def main_protocol(self) -> str:
        """LOSO when the run has it: performance at unseen hospitals is the question."""
        return self.protocols[0]

    def kind(self, method: str) -> str:
        return method_kind(method, self.epsilon[method])

    def sites(self, protocol: str) -> list[str]:
        return sorted({k[2] for k in self.per_site if k[0] == protocol}, key=natural_key)

    def site_patients(self, protocol: str, site: str) -> str:
        """Patients tested at a site, e.g. '42', or '40–42' when methods were tested on different numbers."""
        counts = {s.patients for (p, _, t), s in self.per_site.items() if (p, t) == (protocol, site)}
        return f"{min(counts)}" if len(counts) == 1 else f"{min(counts)}–{max(counts)}"

    def site_positives(self, protocol: str, site: str) -> int:
        return max(s.positives for (p, _, t), s in self.per_site.items() if (p, t) == (protocol, site))

    def gap(self, method: str) -> float | None:
        """Mean internal (or cv) AUROC − mean LOSO AUROC (AUROC points); None unless the method has both
        and learned in both."""
        other = self.internal_protocol
        internal = self.overall.get((other, method)) if other else None
        loso = self.overall.get(("loso", method))
        if (
            internal is None
            or loso is None
            or self.excluded("loso", method)
            or self.excluded(internal.protocol, method)
        ):
            return None
        return internal.auroc.value - loso.auroc.value

    def dp_curves(self, protocol: str) -> list[tuple[str, list[Summary], Summary | None]]:
        """Per DP family (a DP method name without its ε): its summaries by ε, and the non-DP reference (the ε
        = ∞ point): the non-DP method of the same name without '-dp' and with the same other parameters, the
        best of them by AUROC where several match."""
        families: dict[tuple[str, tuple[tuple[str, str], ...]], list[Summary]] = defaultdict(list)
        usable = self.usable(protocol)
        for method, s in usable.items():
            if s.epsilon is not None:
                base, params = method_parameters(method)
                rest = tuple(sorted((k, v) for k, v in params.items() if k not in {"eps", "epsilon"}))
                families[(base, rest)].append(s)
        curves = []
        for (base, rest), points in families.items():
            candidates = []
            for method, s in usable.items():
                other_base, other_params = method_parameters(method)
                if (
                    s.epsilon is None
                    and other_base.lower() == _without_dp(base).lower()
                    and all(other_params.get(k) == v for k, v in rest)
                ):
                    candidates.append(s)
            reference = max(candidates, key=lambda s: _sortable(s.auroc.value), default=None)
            name = base + (f"({', '.join(f'{k}={v}' for k, v in rest)})" if rest else "")
            curves.append((name, sorted(points, key=lambda s: s.epsilon or math.inf), reference))
        return curves


def _sortable(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def analyse(
    rows: Sequence[PredictionRow],
    rounds: Sequence[RoundRow] = (),
    *,
    validation: Sequence[PredictionRow] = (),
    training: Sequence[TrainingFacts] = (),
    calibration: Sequence[CalibrationRow] = (),
    n_boot: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> Analysis:
    """All summaries of a run: per (site, seed), per site over seeds, and per method over the protocol's
    common sites and seeds; the verdicts (did each method learn?), results.csv's rows and the comparison
    table of every protocol. `validation` and `training` may be empty (runs that did not record them)."""
    evals = evaluations(rows, validation)
    epsilon = {e.method: e.epsilon for e in evals}
    methods = sorted(
        epsilon, key=lambda m: (_KIND_ORDER[method_kind(m, epsilon[m])], natural_key(m.lower()), m)
    )
    order = {m: i for i, m in enumerate(methods)}
    evals.sort(key=lambda e: (PROTOCOLS.index(e.protocol), order[e.method], natural_key(e.test_site), e.seed))
    by_site: dict[tuple[str, str, str], list[Evaluation]] = defaultdict(list)
    for e in evals:
        by_site[(e.protocol, e.method, e.test_site)].append(e)
    if progress:
        progress(
            f"bootstrap 95% CIs ({n_boot} resamples) for {len(evals)} test sets of {len(methods)} methods"
        )
    per_run = {_key(e): summarize([e], n_boot=n_boot) for e in evals}
    per_site = {k: summarize(v, n_boot=n_boot) for k, v in by_site.items()}
    facts = {t.key: t for t in training}
    # The common sites depend only on which metrics are defined where, not on the verdicts: find them first.
    provisional = [
        _run_result(e, per_run[_key(e)], facts.get(_key(e)), Verdict(NOT_CHECKED, "")) for e in evals
    ]
    common: dict[str, tuple[str, ...]] = {}
    for protocol in dict.fromkeys(e.protocol for e in evals):
        sites, _ = common_sites([r for r in provisional if r.protocol == protocol])
        common[protocol] = sites or tuple({e.test_site for e in evals if e.protocol == protocol})
    by_method: dict[tuple[str, str], list[Evaluation]] = defaultdict(list)
    for e in evals:
        by_method[(e.protocol, e.method)].append(e)
    overall = {}
    for (protocol, method), found in by_method.items():
        shared = [e for e in found if e.test_site in common[protocol]]
        overall[(protocol, method)] = summarize(shared or found, n_boot=n_boot)
    verdicts = {}
    for (protocol, method), found in by_method.items():
        # the cells of one federation (internal: every site) repeat its round log: count each line once
        logged = {
            (r.test_site, r.seed, r.round, r.metric, r.value)
            for r in rounds
            if (r.protocol, r.method) == (protocol, method)
        }
        verdicts[(protocol, method)] = inverted(
            learned(
                [k[4] for k in logged if k[3] == "val_auroc"],
                [k[4] for k in logged if k[3] == "train_loss"],
                [
                    e.validation.auroc
                    for e in found
                    if e.validation is not None and judges(e.validation.labels)
                ],
                found[0].probs.shape[1],
            ),
            overall[(protocol, method)].auroc.high,
        )
    results = [
        _run_result(e, per_run[_key(e)], facts.get(_key(e)), verdicts[(e.protocol, e.method)]) for e in evals
    ]
    comparisons = {p: comparison(results, p) for p in common}
    if "official" in comparisons:
        comparisons["official"] = replace(
            comparisons["official"],
            pooled_test=pooled_test_auroc([e for e in evals if e.protocol == "official"]),
        )
    return Analysis(
        evals,
        per_run,
        per_site,
        overall,
        methods,
        epsilon,
        list(rounds),
        verdicts,
        results,
        comparisons,
        has_validation=bool(validation),
        has_training=bool(training),
        calibration=calibration_at_sites(evals, calibration),
    )


def pooled_test_auroc(evals: Sequence[Evaluation]) -> dict[str, tuple[float, float]]:
    """Per method: the AUROC over all its test sets' patients together (one model per seed, tested at every
    site: FLamby's "pooled test set"), as (mean over seeds, SD over seeds; NaN with one seed)."""
    by_run: dict[tuple[str, int], list[Evaluation]] = defaultdict(list)
    for e in evals:
        by_run[(e.method, e.seed)].append(e)
    per_method: dict[str, list[float]] = defaultdict(list)
    for (method, _), found in by_run.items():
        labels = np.concatenate([e.labels for e in found])
        probs = np.concatenate([e.probs for e in found])
        per_method[method].append(auroc(labels, probs))
    return {
        m: (nanmean(v), float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"))
        for m, v in per_method.items()
    }


def _key(e: Evaluation) -> tuple[str, str, str, int]:
    return (e.protocol, e.method, e.test_site, e.seed)


def _run_result(e: Evaluation, s: Summary, facts: TrainingFacts | None, verdict: Verdict) -> RunResult:
    """One row of results.csv: the evaluation's summary, its operating point, training facts and verdict."""
    threshold, threshold_from = e.threshold
    eligible = ""
    if method_kind(e.method, e.epsilon) == "single hospital":
        why = hospital_ineligibility(
            facts.train_patients if facts else None, facts.train_classes if facts else None
        )
        eligible = (
            "not checked: no training facts (training.csv)" if why is None else f"no: {why}" if why else "yes"
        )
    return RunResult(
        protocol=e.protocol,
        method=e.method,
        test_site=e.test_site,
        seed=e.seed,
        auroc=s.auroc.value,
        auroc_low=s.auroc.low,
        auroc_high=s.auroc.high,
        balanced_accuracy=s.balanced_accuracy,
        sensitivity=s.sensitivity,
        specificity=s.specificity,
        accuracy=s.accuracy,
        threshold=threshold,
        threshold_from=threshold_from,
        ece=s.ece,
        patients=s.patients,
        positives=s.positives,
        epsilon=s.epsilon,
        val_auroc=e.validation.auroc if e.validation is not None else math.nan,
        val_loss=_cross_entropy(e.validation) if e.validation is not None else math.nan,
        val_patients=len(e.validation.patient_ids)
        if e.validation is not None
        else (facts.val_patients if facts else None),
        train_patients=facts.train_patients if facts else None,
        train_classes=facts.train_classes if facts else None,
        verdict=verdict.status,
        verdict_why=verdict.why,
        hospital_eligible=eligible,
        warning=s.warning,
    )


def _cross_entropy(e: Evaluation) -> float:
    """Mean negative log-probability of the true class (nats per patient), the loss models are selected on."""
    p = e.probs[np.arange(len(e.labels)), e.labels.astype(int)]
    return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))


def results_csv(analysis: Analysis) -> str:
    """results.csv: one row per protocol × method × test site × seed, columns RESULT_COLUMNS (`RunResult`):
    metrics as fractions 0–1 (empty or nan where undefined), counts, the threshold and how it was chosen, the
    method's verdict and, for local models, whether they may be chosen as the best hospital."""
    return csv_text(RESULT_COLUMNS, (result_row(r) for r in analysis.results))


# --- calibration and abstention at the test sites -----------------------------------------------------------


@dataclass(frozen=True)
class CalibrationResult:
    """What a model's calibration does at one test site, means over seeds: top-label ECE of its own and of its
    temperature-scaled probabilities; the share of patients whose conformal prediction set holds their class
    (against `target`), the share it abstains on (a set of other than one class), and accuracy on the rest.
    `local_*`: the same sets with the threshold refitted on a random half of the site's own patients
    (`local_patients`, what ``fedpath predict --recalibrate`` does), measured on the other half, means over
    `LOCAL_SPLITS` halves; NaN when half the site is too few for the target."""

    protocol: str
    method: str
    test_site: str
    ece_before: float
    ece_after: float
    coverage: float
    target: float
    abstained: float
    accuracy_kept: float  # NaN when every patient was abstained on
    temperature: float
    patients: int
    seeds: int
    source: str
    local_coverage: float = math.nan
    local_abstained: float = math.nan
    local_patients: int = 0


LOCAL_SPLITS = 50


def _recalibrated_locally(
    labels: np.ndarray, probs: np.ndarray, target: float, seed: int
) -> tuple[float, float, int]:
    """(coverage, abstention rate, calibration patients) of conformal sets refitted on a random half of these
    patients and applied to the other half, means over LOCAL_SPLITS halves; NaNs when half is too few."""
    n = len(labels)
    half = n // 2
    if half < minimum_patients(target):
        return math.nan, math.nan, half
    scores = nonconformity(probs, labels)
    rng = np.random.default_rng(seed)
    covered, abstained = [], []
    for _ in range(LOCAL_SPLITS):
        order = rng.permutation(n)
        fit, rest = order[:half], order[half:]
        coverage, abstention = _covered_and_abstained(
            labels[rest], prediction_sets(probs[rest], split_threshold(scores[fit], target))
        )
        covered.append(coverage)
        abstained.append(abstention)
    return float(np.mean(covered)), float(np.mean(abstained)), half


def _covered_and_abstained(labels: np.ndarray, sets: Sequence[Sequence[int]]) -> tuple[float, float]:
    """The share of patients whose prediction set holds their class, and the share whose set is not one class."""
    coverage = float(np.mean([int(y) in s for y, s in zip(labels, sets, strict=True)]))
    return coverage, float(np.mean([len(s) != 1 for s in sets]))


def calibration_at_sites(
    evals: Sequence[Evaluation], rows: Sequence[CalibrationRow]
) -> dict[tuple[str, str, str], CalibrationResult]:
    """Per (protocol, method, test site) with a calibration row for its models: see `CalibrationResult`."""
    by_key = {r.key: r for r in rows}
    grouped: dict[tuple[str, str, str], list[tuple[Evaluation, CalibrationRow]]] = defaultdict(list)
    for e in evals:
        row = by_key.get(_key(e))
        if row is not None and len(e.labels):
            grouped[(e.protocol, e.method, e.test_site)].append((e, row))
    out = {}
    for key, pairs in grouped.items():
        numbers: dict[str, list[float]] = defaultdict(list)
        for e, row in pairs:
            probs = calibrated_probs(np.log(np.clip(e.probs, 1e-12, 1.0)), row.temperature)
            sets = prediction_sets(probs, row.threshold)
            kept = [i for i, s in enumerate(sets) if len(s) == 1]
            numbers["ece_before"].append(expected_calibration_error(e.labels, e.probs))
            numbers["ece_after"].append(expected_calibration_error(e.labels, probs))
            coverage, abstention = _covered_and_abstained(e.labels, sets)
            numbers["coverage"].append(coverage)
            numbers["abstained"].append(abstention)
            numbers["accuracy_kept"].append(
                float(np.mean([sets[i][0] == int(e.labels[i]) for i in kept])) if kept else math.nan
            )
            numbers["temperature"].append(row.temperature)
            local = _recalibrated_locally(e.labels, probs, row.coverage, seed=len(numbers["temperature"]))
            numbers["local_coverage"].append(local[0])
            numbers["local_abstained"].append(local[1])
            numbers["local_patients"].append(local[2])
        first = pairs[0][1]
        out[key] = CalibrationResult(
            protocol=key[0],
            method=key[1],
            test_site=key[2],
            ece_before=nanmean(numbers["ece_before"]),
            ece_after=nanmean(numbers["ece_after"]),
            coverage=nanmean(numbers["coverage"]),
            abstained=nanmean(numbers["abstained"]),
            accuracy_kept=nanmean(numbers["accuracy_kept"]),
            target=first.coverage,
            temperature=float(np.exp(np.mean(np.log(numbers["temperature"])))),
            patients=len({p for e, _ in pairs for p in e.patient_ids}),
            seeds=len(pairs),
            source=first.source,
            local_coverage=nanmean(numbers["local_coverage"]),
            local_abstained=nanmean(numbers["local_abstained"]),
            local_patients=int(min(numbers["local_patients"])),
        )
    return out
