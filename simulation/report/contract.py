"""The input contract: what a run folder holds, read and written (the CSV columns are in the package docstring)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpath.common.atomic import write_text_atomic

if TYPE_CHECKING:
    pass


PROTOCOLS = ("loso", "internal", "official", "cv")
PROTOCOL_LABELS = {
    "loso": "unseen hospitals (leave-one-site-out)",
    "internal": "internal validation (held-out patients of the training hospitals)",
    "official": "the cohort's official test split (FLamby's protocol: every model at every hospital's test set)",
    "cv": "cross-validation (patient-level k-fold over the whole cohort)",
}
SHORT_LABELS = {
    "loso": "unseen hospitals (LOSO)",
    "internal": "internal validation",
    "official": "official test split",
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


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
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
    write_text_atomic(path, csv_text([*_PREDICTION_KEYS, *prob_header, "epsilon"], body))


def write_rounds(path: str | Path, rows: Sequence[RoundRow]) -> None:
    """Write rounds.csv in the contract's form."""
    write_text_atomic(path, csv_text(_ROUND_COLUMNS, ([getattr(r, k) for k in _ROUND_COLUMNS] for r in rows)))


def write_training(path: str | Path, rows: Sequence[TrainingFacts]) -> None:
    """Write training.csv in the contract's form (unknown counts empty)."""
    body = (["" if (v := getattr(r, k)) is None else v for k in _TRAINING_COLUMNS] for r in rows)
    write_text_atomic(path, csv_text(_TRAINING_COLUMNS, body))


# --- calibration.csv: the temperature and conformal threshold each presented model carries ----------------

_CALIBRATION_COLUMNS = (
    "protocol",
    "method",
    "test_site",
    "seed",
    "temperature",
    "threshold",
    "coverage",
    "source",
)


@dataclass(frozen=True)
class CalibrationRow:
    """One row of calibration.csv: the calibration of one model (its cell), from its training sites'
    validation patients: ``source`` says whether the sites agreed on it (a federation's model) or it was fitted
    the same way on the validation predictions (local and pooled models)."""

    protocol: str
    method: str
    test_site: str
    seed: int
    temperature: float
    threshold: float
    coverage: float
    source: str

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.protocol, self.method, self.test_site, self.seed)


def load_calibration(path: str | Path) -> list[CalibrationRow]:
    """Read and validate calibration.csv."""
    path = Path(path)
    out = []
    for line, row in _read_csv(path, _CALIBRATION_COLUMNS):
        values = {
            c: float(_parse(path, line, c, row[c], float)) for c in ("temperature", "threshold", "coverage")
        }
        if not (values["temperature"] > 0 and 0 <= values["threshold"] <= 1 and 0 < values["coverage"] < 1):
            raise ReportError(f"{path} line {line}: temperature > 0, threshold in [0, 1], coverage in (0, 1)")
        out.append(
            CalibrationRow(
                protocol=_protocol(path, line, row["protocol"]),
                method=(row["method"] or "").strip(),
                test_site=(row["test_site"] or "").strip(),
                seed=int(_parse(path, line, "seed", row["seed"], int)),
                source=(row["source"] or "").strip(),
                **values,
            )
        )
    return out


def write_calibration(path: str | Path, rows: Sequence[CalibrationRow]) -> None:
    write_text_atomic(
        path, csv_text(_CALIBRATION_COLUMNS, ([getattr(r, k) for k in _CALIBRATION_COLUMNS] for r in rows))
    )
