"""Calibration the sites agree on without sending a score: a temperature, and split-conformal prediction sets.

Each site computes two aggregates over its validation patients with the finished model's logits: for every
temperature T of a fixed grid, the summed negative log-likelihood of the true class under softmax(z / T), and
a histogram of the nonconformity score s = 1 − p_T(true class) in `BINS` bins over [0, 1] (log-spaced above
1e-6). No patient's score leaves the site, only counts per bin and sums. The coordinator adds them up, takes the temperature with
the lowest total NLL, and the split-conformal threshold q̂ for a coverage 1 − α from that temperature's pooled
histogram: the upper edge of the bin holding the ⌈(n + 1)(1 − α)⌉-th smallest score, which errs on the side
of larger sets (finite-sample coverage ≥ 1 − α on exchangeable patients, as split conformal prediction).

At prediction time: probabilities softmax(z / T); the prediction set holds every class c with 1 − p_c ≤ q̂; a
set of other than one class means "abstain" (empty: nothing is likely enough; several: the model cannot
choose). Coverage at a hospital the model never saw is not guaranteed (its patients are not exchangeable with
the sites'), which is why the comparison report measures it there. What restores it is the same split-conformal
step on that hospital's own labelled patients (`refit_threshold`, ``fedpath predict --recalibrate``): the
threshold is then fitted on patients exchangeable with the ones it is applied to, at the model's temperature.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

TEMPERATURES = np.round(np.geomspace(0.25, 8.0, 41), 6)  # includes 1.0 (index 20)
BINS = 200
# bin edges of the nonconformity scores: 0, then log-spaced from 1e-6 to 1, so that a good model's scores
# (most of them near 0) are resolved as finely as a poor model's
EDGES = np.concatenate([[0.0], np.geomspace(1e-6, 1.0, BINS)])
DEFAULT_COVERAGE = 0.9


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def site_statistics(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A site's aggregates over its validation patients: NLL sums (T,) and score histograms (T, BINS)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    nll = np.zeros(len(TEMPERATURES))
    hist = np.zeros((len(TEMPERATURES), BINS), dtype=np.int64)
    rows = np.arange(len(labels))
    for t, temperature in enumerate(TEMPERATURES):
        p_true = _softmax(logits, float(temperature))[rows, labels]
        nll[t] = float(-np.log(np.clip(p_true, 1e-12, 1.0)).sum())
        hist[t] = np.bincount(score_bins(1.0 - p_true), minlength=BINS)
    return nll, hist


def score_bins(scores: np.ndarray) -> np.ndarray:
    """Bin index of nonconformity scores in [0, 1]: bin i holds (EDGES[i], EDGES[i+1]], bin 0 also 0."""
    return np.clip(np.searchsorted(EDGES, np.asarray(scores), side="left") - 1, 0, BINS - 1)


def conformal_threshold(histogram: np.ndarray, coverage: float) -> float:
    """q̂ for `coverage` from a histogram of calibration scores: the upper edge of the bin holding the
    ⌈(n + 1)·coverage⌉-th smallest score; 1.0 (every class in every set) when n is too small for it."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be between 0 and 1, got {coverage}")
    counts = np.asarray(histogram, dtype=np.int64)
    n = int(counts.sum())
    rank = math.ceil((n + 1) * coverage)
    if n == 0 or rank > n:
        return 1.0
    index = int(np.searchsorted(np.cumsum(counts), rank))
    return float(EDGES[index + 1])


@dataclass(frozen=True)
class Calibration:
    """What the model carries: temperature, conformal threshold at `coverage`, and the pooled histogram at
    that temperature (so a site can ask for another coverage without asking the sites again)."""

    temperature: float
    coverage: float
    threshold: float
    patients: int
    histogram: list[int]
    nll_before: float  # mean NLL of the validation patients at T = 1
    nll_after: float  # ... at the chosen temperature
    sites: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration | None:
        return cls(**data) if data else None

    def threshold_for(self, coverage: float) -> float:
        return (
            self.threshold
            if coverage == self.coverage
            else conformal_threshold(np.array(self.histogram), coverage)
        )


def combine(
    stats: list[tuple[str, np.ndarray, np.ndarray]], coverage: float = DEFAULT_COVERAGE
) -> Calibration | None:
    """The coordinator's choice from the sites' (name, NLL sums, histograms); None when no site sent any."""
    if not stats:
        return None
    nll = np.sum([s[1] for s in stats], axis=0)
    hist = np.sum([s[2] for s in stats], axis=0)
    n = int(hist[0].sum())
    if n == 0:
        return None
    one = int(np.argmin(np.abs(TEMPERATURES - 1.0)))
    best = int(np.argmin(nll))
    if nll[best] >= nll[one] - 1e-9:  # no gain: keep the model's own probabilities
        best = one
    return Calibration(
        temperature=float(TEMPERATURES[best]),
        coverage=coverage,
        threshold=conformal_threshold(hist[best], coverage),
        patients=n,
        histogram=[int(x) for x in hist[best]],
        nll_before=float(nll[one] / n),
        nll_after=float(nll[best] / n),
        sites=sorted(s[0] for s in stats),
    )


def minimum_patients(coverage: float) -> int:
    """The fewest calibration patients for which split conformal at `coverage` can give a threshold below 1:
    ⌈(n + 1)·coverage⌉ ≤ n (9 for 90 %, 19 for 95 %)."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be between 0 and 1, got {coverage}")
    n = max(1, math.floor(coverage / (1 - coverage)))  # the closed form, then exact in float arithmetic
    while n > 1 and math.ceil(n * coverage) <= n - 1:
        n -= 1
    while math.ceil((n + 1) * coverage) > n:
        n += 1
    return n


def nonconformity(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each patient's nonconformity score 1 − p(true class), from probabilities (n, C) and class indices (n,)."""
    labels = np.asarray(labels, dtype=np.int64)
    return 1.0 - np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]


def split_threshold(scores: np.ndarray, coverage: float) -> float:
    """Split conformal on exact nonconformity scores: the ⌈(n + 1)·coverage⌉-th smallest. Raises ValueError,
    saying how many it takes, when there are fewer than `minimum_patients(coverage)`."""
    need = minimum_patients(coverage)
    if len(scores) < need:
        raise ValueError(
            f"{len(scores)} labelled patients cannot calibrate {100 * coverage:g} % prediction sets: "
            f"it takes at least {need}"
        )
    return float(np.sort(np.asarray(scores, dtype=np.float64))[math.ceil((len(scores) + 1) * coverage) - 1])


def refit_threshold(
    calibration: Calibration,
    probs: np.ndarray,
    labels: np.ndarray,
    coverage: float | None = None,
    source: str = "local",
) -> Calibration:
    """`calibration` with its conformal threshold fitted on other labelled patients (one hospital's): the
    ⌈(n + 1)·coverage⌉-th smallest of their scores 1 − p_T(true class), `probs` (n, C) being their probabilities
    at the calibration's temperature T, at `coverage` (default the calibration's). The sets then cover patients exchangeable with these at that
    coverage. The scores are used exactly, not binned: they stay at the hospital, and the sites' bins are coarse
    near 1, where a shifted hospital's scores lie. (The binned histogram is kept for other coverages.) Raises
    ValueError when there are fewer than `minimum_patients(coverage)`."""
    coverage = coverage or calibration.coverage
    scores = nonconformity(probs, labels)
    threshold = split_threshold(scores, coverage)
    return replace(
        calibration,
        coverage=coverage,
        threshold=threshold,
        patients=len(labels),
        histogram=[int(x) for x in np.bincount(score_bins(scores), minlength=BINS)],
        sites=[source],
    )


def calibrated_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    return _softmax(np.atleast_2d(np.asarray(logits, dtype=np.float64)), temperature)


def prediction_sets(probs: np.ndarray, threshold: float) -> list[list[int]]:
    """Per case, the classes c with 1 − p_c ≤ threshold (the conformal prediction set)."""
    p = np.atleast_2d(probs)
    return [[int(c) for c in np.flatnonzero(1.0 - row <= threshold + 1e-12)] for row in p]
