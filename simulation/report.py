"""The comparison report of a simulation run: which training method generalizes to hospitals it never saw.

Input contract: a run folder holding

``predictions.csv`` (required): one row per (protocol, method, test_site, seed, patient), columns

- ``protocol``: ``loso`` (leave-one-site-out: the test site took no part in training), ``internal``
  (held-out patients of the sites that trained the model) or ``cv`` (patient-level k-fold over the whole
  cohort; ``test_site`` names the fold, e.g. ``fold-01``; like ``internal``, the model trained with patients
  of the sites it is tested at)
- ``method``: free text naming the training method, e.g. ``local:site-A``, ``pooled``, ``fedavg``,
  ``fedprox(mu=0.01)``, ``fedprox-dp(eps=4)``. Names starting with ``local`` are single-site models and
  ``pooled`` is all sites' data in one place; everything else is federated. Parameters in parentheses are
  ``key=value`` pairs separated by commas.
- ``test_site``: the site whose patients were scored; ``seed``: integer training seed
- ``patient_id``; ``label``: the patient's class index (0 = negative, 1 = positive for binary tasks)
- scores, in one of two forms: binary tasks give ``score`` = P(class 1) in [0, 1]; tasks with C > 2 classes
  give ``prob_0`` … ``prob_{C-1}`` (each in [0, 1], summing to 1) and no ``score`` column.
- ``epsilon`` (optional): the method's differential-privacy budget ε (δ as set in the run); empty or ``inf``
  means no DP. Where the column is absent or empty, an ``eps=`` parameter in the method name gives it.

A patient with several rows in one (protocol, method, test_site, seed) group (one per slide) is reduced to one
patient with `aggregate_by_patient` (mean probability, majority label).

``rounds.csv`` (optional): convergence of federated methods, columns ``protocol``, ``method``, ``test_site``
(the held-out site for ``loso``; empty or ``all`` for ``internal``), ``seed``, ``round`` (1-based integer),
``metric`` (e.g. ``val_auroc``, ``train_loss``), ``value`` (float).

``validation.csv`` (optional): the same columns as predictions.csv, one row per validation patient of each
(protocol, method, test_site, seed): the presented model scored on its training sites' validation patients
(``test_site`` names the cell it belongs to). It picks each model's decision threshold, the best hospital,
and (for local and pooled models) whether the model learned.

``training.csv`` (optional): ``protocol``, ``method``, ``test_site``, ``seed``, ``train_patients``,
``train_classes`` (classes among the training patients), ``val_patients``; empty where unknown. It decides
which local models may be chosen as the best hospital.

``settings.json`` (optional): a JSON object of the run's settings, printed as a table.

Without validation.csv or training.csv (runs from before fedpath recorded them) the report renders, and says
which rules it could not apply.

Outputs, written atomically into the run folder: ``results.csv`` (one row per protocol × method × test site ×
seed, columns `RESULT_COLUMNS`), ``report.md`` with PNG plots in ``plots/``, and ``report.html``, the same
report in one self-contained file (plots inlined, no external resources).

Statistics: per (protocol, method, test_site, seed) AUROC with a patient bootstrap 95% CI, balanced accuracy,
top-label ECE, and sensitivity, specificity and accuracy at a threshold chosen on validation patients
(`fedpath.simulation.verdicts`). Over seeds (and over sites for a method's overall figure), the AUROC is the
mean of the per-run AUROCs and its 95% CI is a patient bootstrap of that mean: every resample draws patients,
and every seed's model is scored on the same drawn patients. The CI therefore covers which patients were
tested; the spread caused by training randomness is reported separately as the SD across seeds. A method's
figure over sites is over the protocol's common sites (`fedpath.simulation.headline.common_sites`), the same
for every row of a table. Methods that did not learn, or whose AUROC is inverted, are shown marked and left out of the
findings (`fedpath.simulation.verdicts`).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpath.common.accounting import DEFAULT_DELTA_RULE
from fedpath.common.atomic import write_bytes_atomic, write_text_atomic
from fedpath.common.metrics import (
    Estimate,
    aggregate_by_patient,
    auroc,
    balanced_accuracy,
    bootstrap_ci,
    expected_calibration_error,
    reliability_curve,
    roc_curve,
)
from fedpath.common.version import fedpath_version
from fedpath.simulation.headline import (
    BEST_HOSPITAL,
    METHOD,
    METRIC_NAMES,
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
    HOSPITAL_RULE,
    LEARNED_RULE,
    NOT_CHECKED,
    THRESHOLD_RULE,
    Verdict,
    hospital_ineligibility,
    inverted,
    judges,
    learned,
    operating_point,
    youden_threshold,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PROTOCOLS = ("loso", "internal", "cv")
PROTOCOL_LABELS = {
    "loso": "unseen hospitals (leave-one-site-out)",
    "internal": "internal validation (held-out patients of the training hospitals)",
    "cv": "cross-validation (patient-level k-fold over the whole cohort)",
}
SHORT_LABELS = {
    "loso": "unseen hospitals (LOSO)",
    "internal": "internal validation",
    "cv": "cross-validation",
}
MIN_PATIENTS = 20  # estimates on fewer patients are flagged as unreliable
ALL_SITES = "all"
_TRAINING_COLUMNS = (
    "protocol",
    "method",
    "test_site",
    "seed",
    "train_patients",
    "train_classes",
    "val_patients",
)
_PREDICTION_KEYS = ("protocol", "method", "test_site", "seed", "patient_id", "label")
_ROUND_COLUMNS = ("protocol", "method", "test_site", "seed", "round", "metric", "value")


class ReportError(ValueError):
    """An input file of the report is missing or malformed; the message names the file, row and column."""


# --- input contract -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictionRow:
    """One row of predictions.csv: one patient scored by one trained model."""

    protocol: str
    method: str
    test_site: str
    seed: int
    patient_id: str
    label: int  # class index
    probs: tuple[float, ...]  # P(class k) for k = 0 … C-1; binary files give (1 - score, score)
    epsilon: float | None  # DP budget ε of the method; None = no DP


@dataclass(frozen=True)
class RoundRow:
    """One row of rounds.csv: one metric of one federated training run after one server round."""

    protocol: str
    method: str
    test_site: str  # the held-out site for loso, ALL_SITES for internal
    seed: int
    round: int
    metric: str
    value: float


@dataclass(frozen=True)
class TrainingFacts:
    """One row of training.csv: who trained the model of one (protocol, method, test_site, seed) cell."""

    protocol: str
    method: str
    test_site: str
    seed: int
    train_patients: int | None
    train_classes: int | None  # classes among the training patients
    val_patients: int | None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.protocol, self.method, self.test_site, self.seed)


@dataclass(frozen=True)
class ReportPaths:
    results: Path
    markdown: Path
    html: Path
    plots: tuple[Path, ...]
    analysis: Analysis | None = field(default=None, repr=False)  # what the report shows


def _read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV file with their 1-based line numbers; the header must hold `required`."""
    if not path.is_file():
        raise ReportError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise ReportError(
                f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(columns)})"
            )
        rows = [(i, row) for i, row in enumerate(reader, start=2)]
    if not rows:
        raise ReportError(f"{path}: no rows below the header")
    return rows


def _parse(path: Path, line: int, column: str, text: str | None, kind: Callable[[str], Any]) -> Any:
    try:
        return kind((text or "").strip())
    except ValueError:
        raise ReportError(
            f"{path} line {line}, column {column}: {text!r} is not a valid {kind.__name__}"
        ) from None


def _probability_columns(path: Path, columns: Sequence[str]) -> list[str]:
    probs = sorted((c for c in columns if re.fullmatch(r"prob_\d+", c)), key=lambda c: int(c[5:]))
    if "score" in columns and probs:
        raise ReportError(f"{path}: give either `score` (binary) or `prob_0` … `prob_{{C-1}}`, not both")
    if "score" in columns:
        return ["score"]
    if len(probs) < 3 or probs != [f"prob_{k}" for k in range(len(probs))]:
        raise ReportError(
            f"{path}: scores missing: binary tasks need a `score` column (P(class 1)), tasks with C > 2 "
            f"classes need prob_0 … prob_{{C-1}} (found {', '.join(probs) or 'none'})"
        )
    return probs


def _protocol(path: Path, line: int, text: str | None) -> str:
    protocol = (text or "").strip()
    if protocol not in PROTOCOLS:
        raise ReportError(f"{path} line {line}, column protocol: {protocol!r} is not one of {PROTOCOLS}")
    return protocol


def _epsilon(path: Path, line: int, text: str | None, method: str) -> float | None:
    text = (text or "").strip()
    if not text:
        found = re.search(r"\beps(?:ilon)?\s*=\s*([0-9.eE+-]+|inf)", method)
        text = found.group(1) if found else ""
    if not text or text.lower() in {"inf", "none"}:
        return None
    eps = float(_parse(path, line, "epsilon", text, float))
    if not eps > 0:
        raise ReportError(
            f"{path} line {line}, column epsilon: ε must be positive or empty (no DP), got {text}"
        )
    return eps


def load_predictions(path: str | Path) -> list[PredictionRow]:
    """Read and validate predictions.csv (see the module docstring for its columns)."""
    path = Path(path)
    rows = _read_csv(path, _PREDICTION_KEYS)
    prob_columns = _probability_columns(path, list(rows[0][1]))
    n_classes = 2 if prob_columns == ["score"] else len(prob_columns)
    out: list[PredictionRow] = []
    epsilons: dict[str, float | None] = {}
    for line, row in rows:
        protocol = _protocol(path, line, row["protocol"])
        values = [float(_parse(path, line, c, row[c], float)) for c in prob_columns]
        probs = (1.0 - values[0], values[0]) if n_classes == 2 else tuple(values)
        if not all(0.0 <= p <= 1.0 for p in values) or abs(sum(probs) - 1.0) > 1e-3:
            raise ReportError(
                f"{path} line {line}: scores {values} must be probabilities in [0, 1]"
                + ("" if n_classes == 2 else " summing to 1")
            )
        label = int(_parse(path, line, "label", row["label"], int))
        if not 0 <= label < n_classes:
            raise ReportError(
                f"{path} line {line}, column label: {label} is not a class index 0…{n_classes - 1}"
            )
        method = (row["method"] or "").strip()
        eps = _epsilon(path, line, row.get("epsilon"), method)
        if epsilons.setdefault(method, eps) != eps:
            raise ReportError(
                f"{path} line {line}: method {method!r} has ε {eps} here, {epsilons[method]} above"
            )
        out.append(
            PredictionRow(
                protocol=protocol,
                method=method,
                test_site=(row["test_site"] or "").strip(),
                seed=int(_parse(path, line, "seed", row["seed"], int)),
                patient_id=(row["patient_id"] or "").strip(),
                label=label,
                probs=probs,
                epsilon=eps,
            )
        )
    return out


def load_rounds(path: str | Path) -> list[RoundRow]:
    """Read and validate rounds.csv (see the module docstring for its columns)."""
    path = Path(path)
    out = []
    for line, row in _read_csv(path, _ROUND_COLUMNS):
        out.append(
            RoundRow(
                protocol=_protocol(path, line, row["protocol"]),
                method=(row["method"] or "").strip(),
                test_site=(row["test_site"] or "").strip() or ALL_SITES,
                seed=int(_parse(path, line, "seed", row["seed"], int)),
                round=int(_parse(path, line, "round", row["round"], int)),
                metric=(row["metric"] or "").strip(),
                value=float(_parse(path, line, "value", row["value"], float)),
            )
        )
    return out


def load_training(path: str | Path) -> list[TrainingFacts]:
    """Read and validate training.csv (see the module docstring for its columns)."""
    path = Path(path)

    def count(line: int, column: str, text: str | None) -> int | None:
        text = (text or "").strip()
        if not text:
            return None
        value = int(_parse(path, line, column, text, int))
        if value < 0:
            raise ReportError(f"{path} line {line}, column {column}: a count, got {value}")
        return value

    return [
        TrainingFacts(
            protocol=_protocol(path, line, row["protocol"]),
            method=(row["method"] or "").strip(),
            test_site=(row["test_site"] or "").strip(),
            seed=int(_parse(path, line, "seed", row["seed"], int)),
            train_patients=count(line, "train_patients", row["train_patients"]),
            train_classes=count(line, "train_classes", row["train_classes"]),
            val_patients=count(line, "val_patients", row["val_patients"]),
        )
        for line, row in _read_csv(path, _TRAINING_COLUMNS)
    ]


def load_settings(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(settings, dict):
        raise ReportError(f"{path}: expected a JSON object of settings, got {type(settings).__name__}")
    return settings


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_predictions(path: str | Path, rows: Sequence[PredictionRow]) -> None:
    """Write predictions.csv in the contract's form (binary: `score`; more classes: `prob_k`)."""
    n_classes = max((len(r.probs) for r in rows), default=2)
    prob_header = ["score"] if n_classes == 2 else [f"prob_{k}" for k in range(n_classes)]
    body = (
        [
            *(getattr(r, k) for k in _PREDICTION_KEYS),
            *([f"{r.probs[1]:.6g}"] if n_classes == 2 else [f"{p:.6g}" for p in r.probs]),
            "" if r.epsilon is None else f"{r.epsilon:g}",
        ]
        for r in rows
    )
    write_text_atomic(path, _csv_text([*_PREDICTION_KEYS, *prob_header, "epsilon"], body))


def write_rounds(path: str | Path, rows: Sequence[RoundRow]) -> None:
    """Write rounds.csv in the contract's form."""
    write_text_atomic(
        path, _csv_text(_ROUND_COLUMNS, ([getattr(r, k) for k in _ROUND_COLUMNS] for r in rows))
    )


def write_training(path: str | Path, rows: Sequence[TrainingFacts]) -> None:
    """Write training.csv in the contract's form (unknown counts empty)."""
    body = (["" if (v := getattr(r, k)) is None else v for k in _TRAINING_COLUMNS] for r in rows)
    write_text_atomic(path, _csv_text(_TRAINING_COLUMNS, body))


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

    def excluded(self, protocol: str, method: str) -> bool:
        """Did not learn, or inverted: shown, but in no finding, comparison or 'best' choice."""
        verdict = self.verdicts.get((protocol, method))
        return verdict is not None and verdict.excluded

    def usable(self, protocol: str) -> dict[str, Summary]:
        """The summaries of the protocol's methods that may enter findings, by method."""
        return {m: s for (p, m), s in self.overall.items() if p == protocol and not self.excluded(p, m)}

    @property
    def internal_protocol(self) -> str | None:
        """The protocol that tests on patients of the training hospitals (internal, else cv), if any."""
        return next((p for p in ("internal", "cv") if p in self.protocols), None)

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
    )


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
    return _csv_text(RESULT_COLUMNS, (result_row(r) for r in analysis.results))


# --- the document: one list of blocks, rendered to Markdown and to HTML -------------------------------------


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Plot:
    name: str  # file name under plots/
    png: bytes
    caption: str


Block = Heading | Paragraph | Bullets | Table | Plot


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            lines = [
                "| " + " | ".join(map(_md_cell, b.header)) + " |",
                "|" + "|".join(" --- " for _ in b.header) + "|",
                *("| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows),
            ]
            out.append("\n".join(lines))
        else:
            out.append(f"![{b.caption}](plots/{b.name})\n\n*{b.caption}*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #bbb; padding: .3em .6em; text-align: right; }
td { white-space: nowrap; }
.scroll { overflow-x: auto; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-style: italic; color: #555; }
"""

# Records in the DOM, once the page has loaded, how many images decoded completely and how many table rows
# exist: a headless browser's DOM dump then proves that the report renders. A truncated PNG still reports its
# size, so an image counts only if its last pixel (plots have an opaque background) was decoded.
_RENDER_CHECK = """
function decodedCompletely(img) {
  if (!img.complete || img.naturalWidth === 0) { return false; }
  var canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  var context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  return context.getImageData(img.naturalWidth - 1, img.naturalHeight - 1, 1, 1).data[3] > 0;
}
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-images-decoded", String(images.filter(decodedCompletely).length));
  document.body.setAttribute("data-table-rows", String(document.querySelectorAll("table tr").length));
});
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    esc = html.escape
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            out.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            out.append(f'<div class="scroll">{table}</div>')
        else:
            data = base64.b64encode(b.png).decode("ascii")
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{esc(b.caption)}">'
                f"<figcaption>{esc(b.caption)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n<script>{_RENDER_CHECK}</script>\n</head>\n"
        "<body>\n" + "\n".join(out) + "\n</body>\n</html>\n"
    )


# --- plots (matplotlib's Agg canvas, imported only here) ----------------------------------------------------


def method_colours(methods: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """One colour per method, the same in every plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _new_figure(
    n_axes: int, *, ncols: int = 3, size: tuple[float, float] = (4.6, 3.6)
) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    ncols = min(ncols, n_axes)
    nrows = math.ceil(n_axes / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_axes)]
    return fig, axes


def _png(fig: Figure, axes: Sequence[Axes]) -> bytes:
    """The figure as PNG, with one legend (methods) outside the axes on the right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize="small")
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _yerr(e: Estimate) -> tuple[float, float]:
    """Error-bar lengths below and above the estimate (0 where the CI is unknown)."""
    if not (math.isfinite(e.low) and math.isfinite(e.high)):
        return (0.0, 0.0)
    return (max(0.0, e.value - e.low), max(0.0, e.high - e.value))


def plot_auroc_by_site(analysis: Analysis, protocol: str, colours: Mapping[str, Any]) -> bytes:
    """AUROC (mean over seeds) with its 95% CI per test site, one marker per method."""
    sites = analysis.sites(protocol)
    methods = [m for m in analysis.methods if (protocol, m) in analysis.overall]
    fig, (ax,) = _new_figure(1, size=(max(6.0, 1.2 * len(sites) + 3), 4.2))
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        xs, ys, err = [], [], []
        for i, site in enumerate(sites):
            s = analysis.per_site.get((protocol, m, site))
            if s is None or not math.isfinite(s.auroc.value):
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(s.auroc.value)
            err.append(_yerr(s.auroc))
        if xs:
            ax.errorbar(xs, ys, yerr=np.array(err).T, fmt="o", color=colours[m], label=m, capsize=3)
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance (0.5)")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_xlabel("held-out site (not used in training)" if protocol == "loso" else "test site")
    ax.set_ylabel("AUROC (mean over seeds, 95% CI)")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(f"AUROC per site: {SHORT_LABELS[protocol]}")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig, [ax])


def plot_roc(analysis: Analysis, protocol: str, colours: Mapping[str, Any]) -> bytes:
    """ROC curve per test site and method; over seeds, the true-positive rates are averaged at each FPR."""
    sites = analysis.sites(protocol)
    fig, axes = _new_figure(len(sites))
    grid = np.linspace(0, 1, 101)
    for ax, site in zip(axes, sites, strict=True):
        for m in analysis.methods:
            runs = [
                e
                for e in analysis.evals
                if (e.protocol, e.method, e.test_site) == (protocol, m, site) and math.isfinite(e.auroc)
            ]
            if runs:
                tpr = np.mean([np.interp(grid, *roc_curve(e.labels, e.probs)) for e in runs], axis=0)
                ax.plot(np.r_[0.0, grid], np.r_[0.0, tpr], color=colours[m], label=m, lw=1.5)
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
        ax.set_title(f"{site} ({analysis.site_patients(protocol, site)} patients)")
        ax.set_xlabel("false-positive rate (1 − specificity)")
        ax.set_ylabel("true-positive rate (sensitivity)")
        ax.set_aspect("equal")
    fig.suptitle(f"ROC curves, mean over seeds: {SHORT_LABELS[protocol]}")
    return _png(fig, axes)


def plot_reliability(analysis: Analysis, colours: Mapping[str, Any]) -> bytes:
    """Reliability diagram per protocol: observed accuracy against the model's confidence, all sites and seeds
    pooled; a calibrated model lies on the diagonal."""
    protocols = analysis.protocols
    fig, axes = _new_figure(len(protocols), ncols=2, size=(5.2, 4.6))
    for ax, protocol in zip(axes, protocols, strict=True):
        for m in analysis.methods:
            runs = [e for e in analysis.evals if (e.protocol, e.method) == (protocol, m)]
            if runs:
                conf, acc, _ = reliability_curve(
                    np.concatenate([e.labels for e in runs]), np.concatenate([e.probs for e in runs])
                )
                ax.plot(conf, acc, "o-", color=colours[m], label=m, lw=1.2, ms=4)
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
        ax.set_xlabel("predicted confidence (probability of the predicted class)")
        ax.set_ylabel("observed accuracy")
        ax.set_title(f"Calibration: {SHORT_LABELS[protocol]}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    return _png(fig, axes)


def plot_convergence(analysis: Analysis, colours: Mapping[str, Any]) -> bytes:
    """Each rounds.csv metric per server round and method: mean over seeds and held-out sites, band ± 1 SD."""
    from matplotlib.ticker import MaxNLocator

    panels = sorted(
        {(r.metric, r.protocol) for r in analysis.rounds}, key=lambda k: (k[0], PROTOCOLS.index(k[1]))
    )
    fig, axes = _new_figure(len(panels), ncols=2, size=(5.4, 3.8))
    for ax, (metric, protocol) in zip(axes, panels, strict=True):
        for m in [*analysis.methods, *sorted({r.method for r in analysis.rounds} - set(analysis.methods))]:
            values: dict[int, list[float]] = defaultdict(list)
            for r in analysis.rounds:
                if (r.metric, r.protocol, r.method) == (metric, protocol, m):
                    values[r.round].append(r.value)
            if not values:
                continue
            rounds = sorted(values)
            mean = np.array([np.mean(values[k]) for k in rounds])
            sd = np.array([np.std(values[k]) for k in rounds])
            colour = colours.get(m, "black")
            ax.plot(rounds, mean, "o-", color=colour, label=m, lw=1.5, ms=3)
            ax.fill_between(rounds, mean - sd, mean + sd, color=colour, alpha=0.15, lw=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("server round")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: {SHORT_LABELS[protocol]}")
        ax.grid(alpha=0.3)
    return _png(fig, axes)


def plot_privacy_utility(analysis: Analysis, colours: Mapping[str, Any]) -> bytes:
    """AUROC (mean over sites and seeds, 95% CI) against the privacy budget ε, log scale; ε = ∞ is the same
    method without DP. Solid lines: unseen hospitals; dashed: internal validation."""
    fig, (ax,) = _new_figure(1, size=(7.0, 4.4))
    all_eps = [s.epsilon for s in analysis.overall.values() if s.epsilon is not None]
    x_inf = max(all_eps) * 4
    styles = {"loso": "-", "internal": "--", "cv": ":"}
    for protocol in analysis.protocols:
        for _, points, reference in analysis.dp_curves(protocol):
            shown = [*points, *([reference] if reference else [])]
            xs = [s.epsilon or x_inf for s in shown]
            ax.plot(xs, [s.auroc.value for s in shown], styles[protocol], color="0.45", lw=1, zorder=1)
            for x, s in zip(xs, shown, strict=True):
                yerr = np.array([_yerr(s.auroc)]).T
                ax.errorbar(
                    [x],
                    [s.auroc.value],
                    yerr=yerr,
                    fmt="o",
                    color=colours[s.method],
                    label=s.method,
                    capsize=3,
                )
    ax.set_xscale("log")
    ticks = sorted(set(all_eps))
    ax.set_xticks([*ticks, x_inf], [f"{t:g}" for t in ticks] + ["∞ (no DP)"])
    ax.minorticks_off()
    ax.set_xlabel("privacy budget ε (smaller = stronger privacy)")
    ax.set_ylabel("AUROC (mean over sites and seeds, 95% CI)")
    ax.set_title("Privacy–utility: what differential privacy costs in AUROC")
    ax.grid(alpha=0.3)
    for protocol in analysis.protocols:
        ax.plot([], [], styles[protocol], color="0.45", label=SHORT_LABELS[protocol])
    return _png(fig, [ax])


# --- findings: one sentence each, for a reader who is not an ML engineer ------------------------------------


def _est(e: Estimate) -> str:
    if not math.isfinite(e.value):
        return "undefined (one class only)"
    if not (math.isfinite(e.low) and math.isfinite(e.high)):
        return f"{e.value:.2f} (no CI: too few patients)"
    return f"{e.value:.2f} [{e.low:.2f}, {e.high:.2f}]"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _basis(s: Summary) -> str:
    where = "held-out site" if s.protocol == "loso" else "site"
    return (
        f"mean over {_plural(s.sites, where)} × {_plural(s.seeds, 'seed')};"
        f" {s.patients} patients, {s.positives} positive"
    )


def _where(protocol: str, subject: str = "it") -> str:
    if protocol == "loso":
        return f"at hospitals {subject} never trained on"
    return f"on new patients of the hospitals {subject} trained with"


def _best(analysis: Analysis, protocol: str, kinds: Sequence[str]) -> Summary | None:
    """The method of the first kind in `kinds` that has any that learned, chosen as `Comparison.best` chooses
    (on validation loss, not on the test patients). Not for single hospitals: the best hospital is chosen on
    validation too (`Comparison.best_hospital`)."""
    table = analysis.comparisons.get(protocol)
    for kind in kinds:
        found = {
            m: s
            for m, s in analysis.usable(protocol).items()
            if analysis.kind(m) == kind and math.isfinite(s.auroc.value)
        }
        if not found:
            continue
        row = table.best(list(found)) if table is not None else None
        if row is not None and row.method in found:
            return found[row.method]
        return max(found.values(), key=lambda s: s.auroc.value)
    return None


def _best_hospital(analysis: Analysis, protocol: str) -> Summary | None:
    table = analysis.comparisons.get(protocol)
    if table is None or table.best_hospital is None:
        return None
    return analysis.overall.get((protocol, table.best_hospital))


def _federation_vs_members(analysis: Analysis, protocol: str) -> tuple[str, bool] | None:
    """The sentence comparing the best federated method with the best single hospital (chosen on
    validation), paired on the test sites both were tested at; True if the federation lost."""
    fed = _best(analysis, protocol, ["federated", "federated + DP"])
    table = analysis.comparisons.get(protocol)
    if fed is None or table is None:
        return None
    hospital = table.row(BEST_HOSPITAL)
    fed_row = next((r for r in table if r.role == METHOD and r.method == fed.method), None)
    if hospital is None or fed_row is None:
        return None
    # Paired on the same sites: in leave-one-site-out a hospital's own model is never tested at that
    # hospital, so its mean covers fewer sites than the federation's.
    sites = [
        s
        for s in hospital.sites
        if s in fed_row.sites and math.isfinite(hospital.at(s)) and math.isfinite(fed_row.at(s))
    ]
    if not sites:
        return None
    local_auroc = nanmean([hospital.at(s) for s in sites])
    fed_auroc = nanmean([fed_row.at(s) for s in sites])
    if protocol == "loso":
        where = f"{_where(protocol)}, on the {_plural(len(sites), 'held-out site')} both were tested at"
    else:
        tested = _plural(len(sites), "fold" if protocol == "cv" else "site")
        where = f"on the test patients of the {tested} both were tested at"
    if fed_auroc < local_auroc:
        return (
            f"⚠ Federated training did worse than one hospital training alone {where}: {fed.method} "
            f"{fed_auroc:.2f} against {hospital.method} {local_auroc:.2f}. This is the failure FLamby reported on "
            "Fed-Camelyon16 (FedProx 0.58 against 0.78 for one hospital alone): a federation that does not beat "
            "its best member gives a hospital no reason to join.",
            True,
        )
    return (
        f"The best single hospital alone ({hospital.method}) reached {local_auroc:.2f} {where}; the "
        f"federation ({fed.method}) reached {fed_auroc:.2f}, {fed_auroc - local_auroc:+.2f} (the hospital was "
        f"picked as {table.best_hospital_why}, not on test results).",
        False,
    )


def findings(analysis: Analysis) -> list[str]:
    """The report's findings, warnings first, one sentence each. Methods that did not learn or are inverted
    appear in none of them (`left_out_of_findings` says which)."""
    main = analysis.main_protocol
    warnings: list[str] = []
    out: list[str] = []
    lead = (
        _best(analysis, main, ["federated", "federated + DP"])
        or _best(analysis, main, ["pooled"])
        or _best_hospital(analysis, main)
    )
    if lead is not None:
        out.append(f"{lead.method} reached AUROC {_est(lead.auroc)} {_where(main)} ({_basis(lead)}).")
    elif any(p == main for p, _ in analysis.verdicts):
        warnings.append(
            f"⚠ No method of {SHORT_LABELS[main]} passed the check that it learned (see below the findings): "
            "this run says nothing about which way of training works."
        )
    for protocol in analysis.protocols:
        compared = _federation_vs_members(analysis, protocol)
        if compared is not None:
            sentence, lost = compared
            if lost:
                warnings.append(sentence)
            elif protocol == main:
                out.append(sentence)
    pooled = _best(analysis, main, ["pooled"])
    beaten_by = _best(analysis, main, ["federated", "federated + DP"])
    if pooled is not None and beaten_by is not None and beaten_by.auroc.value > pooled.auroc.value:
        warnings.append(
            f"⚠ Pooled training ({_est(pooled.auroc)}) scored below {beaten_by.method} "
            f"({_est(beaten_by.auroc)}). Pooling every hospital's patients is the reference a federation tries "
            "to match, so this is not a finding that federation beats pooling: it points to under-trained "
            "baselines or test sets too small, or (at unseen hospitals with strong site shift, as on fedpath's "
            "synthetic cohorts) to pooled training that learns what tells its hospitals apart, where the "
            "sites' separate local steps do not."
        )
    if pooled is not None and pooled is not lead:
        out.append(
            f"Pooling every hospital's patients in one place (the reference a federation tries to match, "
            f"not possible in practice) reached {_est(pooled.auroc)} {_where(main, 'the model')}."
        )
    fed = beaten_by
    if fed is not None and main == "loso":
        per_site = [
            (s.auroc.value, site)
            for (p, m, site), s in analysis.per_site.items()
            if (p, m) == (main, fed.method) and math.isfinite(s.auroc.value)
        ]
        if len(per_site) > 1:
            (low, low_site), (high, high_site) = min(per_site), max(per_site)
            out.append(
                f"Across held-out hospitals, {fed.method} ranged from {low:.2f} ({low_site}) to {high:.2f} "
                f"({high_site})" + (": the hospital a model is used at matters." if high - low > 0.1 else ".")
            )
    gaps = {m: g for m in analysis.methods if (g := analysis.gap(m)) is not None and math.isfinite(g)}
    if gaps and analysis.internal_protocol:
        m = max(gaps, key=lambda k: gaps[k])
        internal = analysis.overall[(analysis.internal_protocol, m)]
        loso = analysis.overall[("loso", m)]
        out.append(
            f"The largest drop from {SHORT_LABELS[analysis.internal_protocol]} to unseen hospitals was {m}'s: "
            f"AUROC {internal.auroc.value:.2f} → {loso.auroc.value:.2f} (gap {gaps[m]:+.2f})"
            + (
                f"; {SHORT_LABELS[analysis.internal_protocol]} alone would have overstated it."
                if gaps[m] > 0.05
                else "."
            )
        )
    for name, points, reference in analysis.dp_curves(main):
        lo, hi = points[0], points[-1]
        text = (
            f"With differential privacy (smaller ε = stronger privacy), {name} reached {_est(lo.auroc)} "
            f"at ε = {lo.epsilon:g}"
        )
        if hi is not lo:
            text += f" and {_est(hi.auroc)} at ε = {hi.epsilon:g}"
        if reference is not None:
            text += f"; without DP, {reference.method} reached {_est(reference.auroc)}"
        out.append(text + ".")
    flagged = [s for s in analysis.per_site.values() if s.warning]
    if flagged:
        sites = sorted({s.test_site for s in flagged}, key=natural_key)
        warnings.append(
            f"⚠ Estimates at {', '.join(sites)} ({len(flagged)} of {len(analysis.per_site)} per-site "
            f"estimates) rest on fewer than {MIN_PATIENTS} patients or on a single class, or are inverted; "
            "they are marked ⚠ below and are not evidence either way."
        )
    seeds = max(s.seeds for s in analysis.overall.values())
    if seeds < 3:
        warnings.append(
            f"⚠ Only {_plural(seeds, 'training seed')} per method: differences between methods may be "
            "training noise (at least 3 seeds are needed to see the spread)."
        )
    return warnings + out


def left_out_of_findings(analysis: Analysis) -> list[str]:
    """One line per (protocol, method) that did not learn or is inverted, with the evidence."""
    return [
        f"✗ {m} ({SHORT_LABELS[p]}): {v.status}: {v.why}."
        for (p, m), v in sorted(
            analysis.verdicts.items(),
            key=lambda k: (PROTOCOLS.index(k[0][0]), analysis.methods.index(k[0][1])),
        )
        if v.excluded
    ]


def missing_parts(analysis: Analysis, settings: Mapping[str, Any] | None) -> list[str]:
    """What this run lacks, and what the report therefore cannot show."""
    out = []
    if "loso" not in analysis.protocols:
        out.append(
            "No leave-one-site-out (loso) results: this report cannot say how any method does at a hospital "
            "it never trained on."
        )
    if analysis.internal_protocol is None:
        out.append(
            "No internal-validation results (internal or cv): the generalization gap (internal vs unseen) is "
            "not computed."
        )
    if not analysis.has_validation:
        out.append(
            "No validation.csv (cells from before fedpath scored each model on its validation patients): no "
            "operating point (sensitivity, specificity, accuracy), no best hospital unless a single one is "
            "eligible, and local and pooled models are not checked for having learned."
        )
    if not analysis.has_training:
        out.append(
            "No training.csv: local models are not checked for their number of training patients and "
            "classes before one is chosen as the best hospital."
        )
    if not any(s.epsilon is not None for s in analysis.overall.values()):
        out.append("No differentially private method (no ε): no privacy–utility curve.")
    for protocol in analysis.protocols:
        for name, _, reference in analysis.dp_curves(protocol):
            if reference is None:
                out.append(
                    f"No non-DP counterpart of {name} in {protocol}: its privacy–utility curve has no ε = ∞."
                )
    if not analysis.rounds:
        out.append("No rounds.csv: no convergence plot.")
    if settings is None:
        out.append("No settings.json: the run's settings are not known to this report.")
    if any(e.probs.shape[1] > 2 for e in analysis.evals):
        out.append("More than two classes: no ROC curves (binary only); AUROC is the macro one-vs-rest mean.")
    return out


# --- the report ---------------------------------------------------------------------------------------------


def _short(protocol: str) -> str:
    return {"loso": "unseen hospitals", "internal": "internal", "cv": "cross-validation"}[protocol]


def _flag(s: Summary) -> str:
    return " ⚠" if s.warning else ""


def _with_ci(value: float, s: Summary | None) -> str:
    """A row's mean AUROC with its bootstrap CI (a summary over several hospitals has none)."""
    if not math.isfinite(value):
        return "undefined (one class only)"
    if s is None:
        return f"{value:.2f} (no CI: a summary over hospitals)"
    if not (math.isfinite(s.auroc.low) and math.isfinite(s.auroc.high)):
        return f"{value:.2f} (no CI: too few patients)"
    return f"{value:.2f} [{s.auroc.low:.2f}, {s.auroc.high:.2f}]"


def _learned_cell(verdict: Verdict) -> str:
    return verdict.mark or ("yes" if verdict.status != NOT_CHECKED else "not checked")


def _comparison_table(analysis: Analysis, table: Comparison) -> list[Block]:
    """The comparison of one protocol (`Comparison`, the rows `fedpath compare` prints), its single
    hospitals and what its reader must know."""
    protocol = table.protocol
    operating = [k for k in ("sensitivity", "specificity", "accuracy") if k in table.metrics]
    header = ["Method", "Type", "Learned?", "AUROC [95% CI]", "± across seeds (SD)", "Balanced accuracy"]
    header += [f"{METRIC_NAMES[k].capitalize()} at threshold" for k in operating]
    header += ["ECE", "Patients (positive)", "Sites × seeds"]
    rows = []
    for row in table:
        s = analysis.overall.get((protocol, row.method)) if row.method else None
        sites = f"{len(row.sites)}" if row.sites == table.sites else f"{len(row.sites)} of {len(table.sites)}"
        cells = [
            row.label,
            analysis.kind(row.method) if row.method and row.role == METHOD else "single hospital",
            _learned_cell(row.verdict) if row.method else "—",
            _with_ci(row.mean, s) + (_flag(s) if s else ""),
            _number(row.seed_sd),
            _number(row.mean_of("balanced_accuracy")),
            *(_number(row.mean_of(k)) for k in operating),
            _number(row.mean_of("ece")),
            f"{s.patients} ({s.positives})" if s else "—",
            f"{sites} × {row.seeds}" + (f" ({row.note})" if row.note else ""),
        ]
        rows.append(tuple(cells))
    where = "held-out sites" if protocol == "loso" else "folds" if protocol == "cv" else "sites"
    blocks: list[Block] = [
        Paragraph(
            f"Every mean in this table is over the same {len(table.sites)} {where} "
            f"({', '.join(table.sites)}) and the seeds, except where 'Sites' says fewer."
        ),
        Table(tuple(header), tuple(rows)),
    ]
    if table.hospitals:
        hospital_rows = tuple(
            (
                h.method,
                "not known" if h.train_patients is None else str(h.train_patients),
                "not known" if h.train_classes is None else str(h.train_classes),
                f"{h.val_auroc:.2f} ({h.val_patients} patients)"
                if math.isfinite(h.val_auroc)
                else "not available",
                "yes"
                if h.ineligible == ""
                else "not checked"
                if h.ineligible is None
                else f"no: {h.ineligible}",
                _learned_cell(h.verdict),
                _number(h.row.mean),
                f"{len(h.row.sites)} of {len(table.sites)}",
                "chosen" if h.method == table.best_hospital else "",
            )
            for h in table.hospitals
        )
        blocks += [
            Paragraph("Single hospitals: which local model may be chosen as the best hospital, and on what."),
            Table(
                (
                    "Local model",
                    "Training patients",
                    "Classes",
                    "Validation AUROC (patients)",
                    "Eligible",
                    "Learned?",
                    "AUROC (test)",
                    "Sites",
                    "Best hospital",
                ),
                hospital_rows,
            ),
        ]
    if table.notes:
        blocks.append(Bullets(table.notes))
    return blocks


def _headline(analysis: Analysis) -> list[Block]:
    main = analysis.main_protocol
    blocks: list[Block] = [Heading(2, f"Headline: {PROTOCOL_LABELS[main]}")]
    blocks += _comparison_table(analysis, analysis.comparisons[main])
    for protocol in analysis.protocols:
        if protocol != main:
            blocks += [Heading(3, f"The same comparison: {PROTOCOL_LABELS[protocol]}")]
            blocks += _comparison_table(analysis, analysis.comparisons[protocol])
    explain = [
        "AUROC: how well the model ranks a positive patient above a negative one; 0.5 is a coin flip, "
        "1.0 is perfect. Here it is the mean over the table's sites and seeds; the 95% CI is the range that "
        "re-sampling the tested patients gives.",
        "± across seeds: the standard deviation between training runs that differ only in their random seed.",
        "Balanced accuracy: the mean of sensitivity and specificity at the model's most likely class.",
        "Sensitivity, specificity and accuracy at threshold: what a clinic would see using the model with one "
        "fixed decision threshold. " + THRESHOLD_RULE,
        "ECE (expected calibration error): how far the model's stated confidence is from how often it is "
        "right, 0 = its probabilities can be taken at face value.",
        "Patients (positive): distinct patients the estimate rests on, and how many of them are positive.",
        "Learned? " + LEARNED_RULE,
        HOSPITAL_RULE
        + " 'Best at each site (oracle)' picks among them after seeing each site's test result: an upper "
        "bound no hospital could choose in advance. 'Mean of hospitals' averages every local model that "
        "learned, eligible or not: what a hospital alone gets.",
    ]
    return [*blocks, Paragraph("How to read these tables:"), Bullets(tuple(explain))]


def _number(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "—"


def _per_site(analysis: Analysis, protocol: str, colours: Mapping[str, Any]) -> list[Block]:
    sites = analysis.sites(protocol)
    header = ["Method"] + [
        f"{t} ({analysis.site_patients(protocol, t)} patients, {analysis.site_positives(protocol, t)} "
        "positive)"
        for t in sites
    ]
    rows = []
    for m in analysis.methods:
        if (protocol, m) not in analysis.overall:
            continue
        cells = [m + (f" {analysis.verdicts[(protocol, m)].mark}" if analysis.excluded(protocol, m) else "")]
        for t in sites:
            s = analysis.per_site.get((protocol, m, t))
            cells.append("not tested" if s is None else _est(s.auroc) + _flag(s))
        rows.append(tuple(cells))
    flagged = sorted(
        {
            (s.test_site, s.warning)
            for (p, _, _), s in analysis.per_site.items()
            if p == protocol and s.warning
        },
        key=lambda k: natural_key(k[0]),
    )
    where = {
        "loso": "held-out site (one column per site left out of training)",
        "internal": "test site",
        "cv": "fold",
    }[protocol]
    blocks: list[Block] = [
        Heading(3, PROTOCOL_LABELS[protocol].capitalize()),
        Paragraph(f"AUROC [95% CI] per {where}, mean over seeds."),
        Table(tuple(header), tuple(rows)),
    ]
    if flagged:
        blocks.append(
            Bullets(tuple(f"⚠ {site}: {why}; read as an anecdote, not evidence." for site, why in flagged))
        )
    blocks.append(
        Plot(
            f"auroc_by_site_{protocol}.png",
            plot_auroc_by_site(analysis, protocol, colours),
            f"AUROC per site and method, {PROTOCOL_LABELS[protocol]}; bars are 95% CIs.",
        )
    )
    return blocks


def _gap_section(analysis: Analysis) -> list[Block]:
    internal = analysis.internal_protocol or "internal"
    blocks: list[Block] = [Heading(2, f"Generalization gap: {SHORT_LABELS[internal]} vs unseen hospitals")]
    methods = [m for m in analysis.methods if analysis.gap(m) is not None]
    if not methods:
        return [
            *blocks,
            Paragraph(
                "Not computed: the run needs both loso and internal (or cv) results of a method that learned "
                "in both."
            ),
        ]
    rows = tuple(
        (
            m,
            _est(analysis.overall[(internal, m)].auroc),
            _est(analysis.overall[("loso", m)].auroc),
            f"{analysis.gap(m) or 0.0:+.2f}",
        )
        for m in methods
    )
    return [
        *blocks,
        Paragraph(
            f"Gap = mean {SHORT_LABELS[internal]} AUROC − mean AUROC at unseen hospitals (leave-one-site-out), "
            "in AUROC points; methods that did not learn are left out. FLamby's hospital-0 model scored 0.87 "
            "at home and 0.68 at the other hospital: a gap of "
            "0.19."
        ),
        Table(
            (
                "Method",
                f"{SHORT_LABELS[internal].capitalize()} AUROC [95% CI]",
                "Unseen hospitals AUROC [95% CI]",
                "Gap",
            ),
            rows,
        ),
    ]


def _privacy_section(analysis: Analysis, colours: Mapping[str, Any]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Privacy–utility")]
    if not any(s.epsilon is not None for s in analysis.overall.values()):
        return [*blocks, Paragraph("Not shown: no method in this run used differential privacy.")]
    rows = []
    for protocol in analysis.protocols:
        for name, points, reference in analysis.dp_curves(protocol):
            for s in [*points, *([reference] if reference else [])]:
                eps = "∞ (no DP)" if s.epsilon is None else f"{s.epsilon:g}"
                rows.append((_short(protocol), name, s.method, eps, _est(s.auroc) + _flag(s)))
    return [
        *blocks,
        Paragraph(
            "Differential privacy bounds what the shared model reveals about any one patient; ε is the "
            "budget (smaller = stronger guarantee), at δ = "
            f"{DEFAULT_DELTA_RULE} unless the run set --dp-delta (δ: the chance that the guarantee fails "
            "outright, kept far below 1/patients). The ε = ∞ point is the same method without DP."
        ),
        Table(("Protocol", "DP method", "Run", "ε", "AUROC [95% CI]"), tuple(rows)),
        Plot(
            "privacy_utility.png",
            plot_privacy_utility(analysis, colours),
            "AUROC against ε; solid: unseen hospitals, dashed: internal validation, dotted: cross-validation.",
        ),
    ]


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += _flatten(value, f"{name}.")
        else:
            out.append((name, value if isinstance(value, str) else json.dumps(value)))
    return out


def report_blocks(analysis: Analysis, settings: Mapping[str, Any] | None, run_name: str) -> list[Block]:
    """The whole report as blocks (plots rendered to PNG on the way)."""
    colours = method_colours(analysis.methods)
    blocks: list[Block] = [
        Heading(1, f"Cross-site comparison of training methods: {run_name}"),
        Paragraph(
            "Which way of training a model works at a hospital whose patients it never saw: one hospital "
            "alone, all hospitals' data pooled in one place, or a federation in which the data stay at each "
            "hospital? "
            f"Made by fedpath {fedpath_version()}."
        ),
    ]
    features = (settings or {}).get("features") or {}
    if features.get("random_init_files"):
        blocks.append(
            Paragraph(
                f"WARNING: {features['random_init_files']} of {features['files']} feature files were extracted "
                f"with a randomly initialised encoder ({features.get('encoders', 'unknown')}). The numbers below "
                "measure the pipeline and the training methods on those features, not what a pretrained "
                "encoder would reach: do not read them as clinical performance."
            )
        )
    blocks += [Heading(2, "Findings"), Bullets(tuple(findings(analysis)))]
    left_out = left_out_of_findings(analysis)
    if left_out:
        blocks += [
            Paragraph(
                "Left out of these findings, the comparisons and every 'best' choice (shown in the tables, "
                "marked ✗):"
            ),
            Bullets(tuple(left_out)),
        ]
    missing = missing_parts(analysis, settings)
    if missing:
        blocks += [Heading(2, "Not in this run"), Bullets(tuple(missing))]
    blocks += _headline(analysis)
    blocks.append(Heading(2, "AUROC per site"))
    for protocol in analysis.protocols:
        blocks += _per_site(analysis, protocol, colours)
    blocks += _gap_section(analysis)
    blocks.append(Heading(2, "Convergence per round"))
    if analysis.rounds:
        blocks.append(
            Plot(
                "convergence.png",
                plot_convergence(analysis, colours),
                "Each metric in rounds.csv per server round: mean over seeds and held-out sites, "
                "band ± 1 SD.",
            )
        )
    else:
        blocks.append(Paragraph("Not shown: the run folder has no rounds.csv."))
    blocks.append(Heading(2, "ROC curves"))
    if all(e.probs.shape[1] == 2 for e in analysis.evals):
        for protocol in analysis.protocols:
            blocks.append(
                Plot(
                    f"roc_{protocol}.png",
                    plot_roc(analysis, protocol, colours),
                    f"ROC curve per site, {PROTOCOL_LABELS[protocol]}: sensitivity against 1 − specificity "
                    "at every threshold; the nearer the top-left corner, the better.",
                )
            )
    else:
        blocks.append(Paragraph("Not shown: ROC curves are drawn for binary tasks only."))
    blocks += [
        Heading(2, "Calibration"),
        Paragraph(
            "Can the model's probabilities be taken at face value? If it says 80%, it should be right 80% of "
            "the time: points on the diagonal. ECE per method is in the headline table."
        ),
        Plot(
            "calibration.png",
            plot_reliability(analysis, colours),
            "Reliability diagram, all sites and seeds.",
        ),
    ]
    blocks += _privacy_section(analysis, colours)
    blocks.append(Heading(2, "Run settings"))
    if settings:
        blocks.append(Table(("Setting", "Value"), tuple(_flatten(settings))))
    else:
        blocks.append(Paragraph("Not known: the run folder has no settings.json (or it is empty)."))
    blocks += [
        Heading(2, "How the numbers are computed"),
        Bullets(
            (
                "Every estimate is at the patient level: a patient's slides are averaged into one score.",
                "results.csv holds one row per protocol × method × test site × seed, with its own bootstrap "
                "CI.",
                "Over seeds (and sites), AUROC is the mean of the per-run AUROCs. Its 95% CI is a percentile "
                "bootstrap over patients: each resample draws patients with replacement and scores every "
                "seed's model on the same drawn patients, so the CI reflects which patients were tested; the "
                "spread from training randomness is the separate '± across seeds'.",
                f"Estimates on fewer than {MIN_PATIENTS} patients or a single class are marked ⚠.",
                "A table's means are over the test sites at which every method has every metric shown: a "
                "site whose test patients hold one class has no AUROC, so it leaves every mean of the table "
                "(balanced accuracy and ECE included), and the table says so.",
                LEARNED_RULE,
                HOSPITAL_RULE,
                THRESHOLD_RULE,
            )
        ),
    ]
    return blocks


def write_report(
    run_dir: str | Path, *, n_boot: int = 1000, progress: Callable[[str], None] | None = None
) -> ReportPaths:
    """Read RUN_DIR/predictions.csv (and rounds.csv, validation.csv, training.csv, settings.json where
    present), write results.csv, report.md with plots/*.png, and the self-contained report.html into RUN_DIR,
    each file atomically."""
    return write_analysis(
        run_dir, read_analysis(run_dir, n_boot=n_boot, progress=progress), progress=progress
    )


def read_analysis(
    run_dir: str | Path, *, n_boot: int = 1000, progress: Callable[[str], None] | None = None
) -> Analysis:
    """The analysis of a run folder's predictions.csv (and its optional inputs, see the module docstring)."""
    run_dir = Path(run_dir)
    rows = load_predictions(run_dir / "predictions.csv")
    optional = {name: run_dir / name for name in ("rounds.csv", "validation.csv", "training.csv")}
    rounds = load_rounds(optional["rounds.csv"]) if optional["rounds.csv"].exists() else []
    validation = load_predictions(optional["validation.csv"]) if optional["validation.csv"].exists() else []
    training = load_training(optional["training.csv"]) if optional["training.csv"].exists() else []
    return analyse(rows, rounds, validation=validation, training=training, n_boot=n_boot, progress=progress)


def write_analysis(
    run_dir: str | Path, analysis: Analysis, *, progress: Callable[[str], None] | None = None
) -> ReportPaths:
    """Write results.csv, report.md with plots/*.png and report.html of `analysis` into RUN_DIR."""
    run_dir = Path(run_dir)
    settings_path = run_dir / "settings.json"
    settings = load_settings(settings_path) if settings_path.exists() else None
    results = run_dir / "results.csv"
    write_text_atomic(results, results_csv(analysis))
    if progress:
        progress("plots")
    blocks = report_blocks(analysis, settings, run_dir.resolve().name)
    plots = []
    for b in blocks:
        if isinstance(b, Plot):
            plots.append(run_dir / "plots" / b.name)
            write_bytes_atomic(plots[-1], b.png)
    markdown, page = run_dir / "report.md", run_dir / "report.html"
    write_text_atomic(markdown, render_markdown(blocks))
    write_text_atomic(page, render_html(blocks, f"fedpath report: {run_dir.resolve().name}"))
    return ReportPaths(results, markdown, page, tuple(plots), analysis)
