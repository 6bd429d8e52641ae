"""Classification metrics for slide- and patient-level MIL: AUROC, balanced accuracy, calibration,
patient aggregation and bootstrap confidence intervals.

Scores are class probabilities: (N,) for the positive class or (N, C). Labels are class indices (N,).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def _as_matrix(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    return np.stack([1 - s, s], axis=1) if s.ndim == 1 else s


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as scipy's rankdata, without its overhead)."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.r_[True, sorted_s[1:] != sorted_s[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(s)] - 1
    ranks = np.empty(len(s))
    ranks[order] = (first[group] + last[group]) / 2 + 1
    return ranks


def _binary_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUROC with ties counted as half; NaN when only one class is present."""
    pos = y.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# Ours, not sklearn's roc_auc_score: the report's patient bootstrap calls this 10^4–10^5 times, and on 100
# patients roc_auc_score takes ~50× as long binary and ~30× with 3 classes (benchmarks/bench_metrics.py); it
# also raises where a resample lacks a class, where this averages over the classes present. Same numbers (tests).
def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC: binary, or macro one-vs-rest over the classes present (NaN if fewer than two are present)."""
    y = np.asarray(labels)
    p = _as_matrix(scores)
    if p.shape[1] == 2:
        return _binary_auroc(y == 1, p[:, 1])
    per_class = [_binary_auroc(y == k, p[:, k]) for k in range(p.shape[1]) if 0 < (y == k).sum() < len(y)]
    return float(np.mean(per_class)) if per_class else float("nan")


# Ours, not sklearn's balanced_accuracy_score (same numbers, tested): every site calls this when it evaluates,
# and the library would add the ~1 s import of sklearn.metrics to every site process for these three lines.
def balanced_accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean per-class recall of the arg-max prediction (binary: score > 0.5), over the classes present in
    `labels`; NaN when there are no labels."""
    y = np.asarray(labels)
    pred = _as_matrix(scores).argmax(axis=1)
    recalls = [float((pred[y == k] == k).mean()) for k in np.unique(y)]
    return float(np.mean(recalls)) if recalls else float("nan")


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE: Σ_bins (n_bin/N)·|accuracy − confidence| over equal-width confidence bins."""
    confidence, accuracy, counts = reliability_curve(labels, scores, n_bins)
    return float(np.sum(counts * np.abs(accuracy - confidence)) / max(len(labels), 1))


# Ours, not sklearn's calibration_curve: that one returns no counts (ECE weighs bins by them, and every site
# computes ECE without importing sklearn) and takes its edges from np.linspace, so a confidence within an ulp
# of an edge (e.g. 0.3 + 1 ulp) can land in the neighbouring bin; otherwise the same right-closed bins, empty
# bins dropped, and the same numbers (tests).
def reliability_curve(
    labels: np.ndarray, scores: np.ndarray, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin ((0, 1/n_bins], …, ((n_bins-1)/n_bins, 1]): mean confidence, accuracy (fractions
    0–1) and count of the top-label predictions; bins with no sample are dropped."""
    p = _as_matrix(scores)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    kept = counts > 0
    return (
        np.bincount(bins, confidence, n_bins)[kept] / counts[kept],
        np.bincount(bins, correct, n_bins)[kept] / counts[kept],
        counts[kept],
    )


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary ROC (class 1 against the rest): false- and true-positive rates at every distinct threshold, from
    (0, 0) to (1, 1) when both classes are present; a rate whose class is absent from `labels` is 0 throughout."""
    # imported here: sklearn.metrics adds ~1 s to importing fedpath.client.training (benchmarks/bench_metrics.py),
    # which every site does, and only the report draws ROC curves
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import roc_curve as sklearn_roc_curve

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # one class only: NaN rates, made 0 below
        fpr, tpr, _ = sklearn_roc_curve(
            np.asarray(labels) == 1, _as_matrix(scores)[:, 1], drop_intermediate=False
        )
    return np.nan_to_num(fpr, nan=0.0), np.nan_to_num(tpr, nan=0.0)


def aggregate_by_patient(
    patient_ids: Sequence[str], labels: np.ndarray, scores: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Patient-level scores: the mean of the patient's slide probabilities; the label is the patient's
    most frequent slide label (ties: the higher class). Returns (patients, labels, scores) in first-seen order.
    """
    p = _as_matrix(scores)
    y = np.asarray(labels)
    patients = list(dict.fromkeys(patient_ids))
    index = {pid: i for i, pid in enumerate(patients)}
    rows = np.array([index[pid] for pid in patient_ids])
    sums = np.zeros((len(patients), p.shape[1]))
    np.add.at(sums, rows, p)
    counts = np.bincount(rows, minlength=len(patients))[:, None]
    n_classes = max(p.shape[1], int(y.max()) + 1 if len(y) else 0)
    label_counts = np.zeros((len(patients), n_classes))
    np.add.at(label_counts, (rows, y), 1)
    # highest count, ties to the higher class: flip, argmax takes the first maximum
    patient_labels = n_classes - 1 - np.argmax(label_counts[:, ::-1], axis=1)
    return patients, patient_labels, sums / counts


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a bootstrap confidence interval (NaN bounds when it cannot be estimated)."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap CI of `metric`, resampling cases (pass patient-level arrays for patient CIs).

    Resamples where the metric is undefined (e.g. one class only for AUROC) are skipped.
    """
    # Ours, not scipy.stats.bootstrap(paired=True, method="percentile"): that one draws the same resamples from
    # the same seed and gives the same interval (to rounding) when every resample is defined, about as fast,
    # but one undefined resample (a small site's draw with one class) makes its whole interval NaN (tests).
    y = np.asarray(labels)
    s = np.asarray(scores)
    value = metric(y, s)
    if len(y) < 2:
        return Estimate(value, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        v = metric(y[idx], s[idx])
        if np.isfinite(v):
            stats.append(v)
    if len(stats) < max(10, n_boot // 10):
        return Estimate(value, float("nan"), float("nan"))
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Estimate(value, float(low), float(high))
