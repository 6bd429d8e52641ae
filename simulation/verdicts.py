"""The rules that keep the comparison report honest: which methods learned anything, which hospitals may be
picked as "the best hospital", and the operating point a clinic would use.

Every threshold is one named constant here, and the report quotes the rule texts below, so what a reader is
told and what the code does cannot drift apart. The functions take plain numbers and arrays: the report feeds
them from predictions.csv, validation.csv, rounds.csv and training.csv.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A validation AUROC at or below this is chance for the purpose of "did it learn": with the few validation
# patients of a site (often 10–30), an AUROC of 0.6 is well inside the spread of a coin-flip model.
LEARNED_AUROC = 0.6
# The training loss of a C-class model that predicts the class frequencies of a balanced set is ln C; a loss
# that never fell below 95% of it means the optimiser did not move the model off chance.
CHANCE_LOSS_FRACTION = 0.95
# A local model trained on fewer patients, or on one class, is shown but never picked as the best hospital:
# its test AUROC says more about the test set than about the hospital (one class: it cannot rank at all).
MIN_HOSPITAL_PATIENTS = 10
MIN_HOSPITAL_CLASSES = 2
# A presented model's validation AUROC judges whether it learned only on at least this many validation
# patients of each of two classes (9 positive–negative pairs): on 2 + 2 patients a coin flip reads 0.75 or 1 a
# third of the time.
MIN_JUDGING_PATIENTS = 3
# The decision threshold when the validation patients cannot choose one (they hold a single class).
FALLBACK_THRESHOLD = 0.5

LEARNED = "learned"
DID_NOT_LEARN = "did not learn"
INVERTED = "inverted"
NOT_CHECKED = "not checked"

LEARNED_RULE = (
    f"A method is marked ✗ did not learn when its validation AUROC never rose above {LEARNED_AUROC:g} "
    "(federations: in any round of any run, from rounds.csv; local and pooled models: the presented model on "
    f"its training sites' validation patients, from validation.csv, where they hold ≥ {MIN_JUDGING_PATIENTS} "
    "patients of each of two classes) or when its training loss stayed at "
    f"chance (every round of every run ≥ {CHANCE_LOSS_FRACTION:g}·ln C for C classes; federations only, the "
    "baselines log no per-round loss). It is marked ✗ inverted when the 95% CI of its test AUROC lies "
    "entirely below 0.5. Both are shown, but left out of the findings, the comparisons and every 'best' choice."
)
HOSPITAL_RULE = (
    "The best hospital is the local model with the highest AUROC on its own validation patients (never on "
    f"test patients), among local models trained on at least {MIN_HOSPITAL_PATIENTS} patients of at least "
    f"{MIN_HOSPITAL_CLASSES} classes that learned; the others are shown but never chosen."
)
THRESHOLD_RULE = (
    "Sensitivity, specificity and accuracy are taken at one decision threshold per trained model, chosen on "
    "its training sites' validation patients by Youden's J (the threshold that maximises sensitivity + "
    f"specificity − 1; ties: the one nearest {FALLBACK_THRESHOLD:g}); where those patients hold one class "
    f"only, the threshold is {FALLBACK_THRESHOLD:g}. The test patients never choose it."
)


@dataclass(frozen=True)
class Verdict:
    """Whether a (protocol, method) learned: `status` is one of LEARNED, DID_NOT_LEARN, INVERTED,
    NOT_CHECKED; `why` is the evidence, in words."""

    status: str
    why: str

    @property
    def excluded(self) -> bool:
        """Left out of findings, comparisons and 'best' choices (still shown, marked)."""
        return self.status in (DID_NOT_LEARN, INVERTED)

    @property
    def mark(self) -> str:
        return f"✗ {self.status}" if self.excluded else ""


def learned(
    round_val_aurocs: Sequence[float],
    round_train_losses: Sequence[float],
    presented_val_aurocs: Sequence[float],
    classes: int,
) -> Verdict:
    """Did a method learn? `round_*`: every round of every run of a federation (rounds.csv); empty for
    baselines. `presented_val_aurocs`: the presented model's validation AUROC per run (validation.csv)."""
    losses = [v for v in round_train_losses if math.isfinite(v)]
    chance = CHANCE_LOSS_FRACTION * math.log(max(classes, 2))
    if losses and min(losses) >= chance:
        return Verdict(
            DID_NOT_LEARN,
            f"training loss stayed at chance: its lowest, {min(losses):.3f}, is ≥ {CHANCE_LOSS_FRACTION:g}·ln "
            f"{max(classes, 2)} = {chance:.3f} in {len(losses)} round(s)",
        )
    from_rounds = [v for v in round_val_aurocs if math.isfinite(v)]
    aurocs = from_rounds or [v for v in presented_val_aurocs if math.isfinite(v)]
    what = "round(s)" if from_rounds else "run(s) of the presented model"
    if aurocs and max(aurocs) <= LEARNED_AUROC:
        return Verdict(
            DID_NOT_LEARN,
            f"validation AUROC never rose above {LEARNED_AUROC:g} (highest {max(aurocs):.3f} in "
            f"{len(aurocs)} {what})",
        )
    if aurocs:
        return Verdict(LEARNED, f"highest validation AUROC {max(aurocs):.3f} in {len(aurocs)} {what}")
    if losses:
        return Verdict(
            LEARNED, f"training loss fell to {min(losses):.3f} (< {chance:.3f}); no validation AUROC"
        )
    return Verdict(
        NOT_CHECKED, "no validation AUROC and no training loss recorded (validation.csv, rounds.csv)"
    )


def judges(validation_labels: np.ndarray) -> bool:
    """Are there enough validation patients (labels (P,)) for their AUROC to say whether a model learned?"""
    counts = np.bincount(np.asarray(validation_labels, dtype=int))
    return int((counts >= MIN_JUDGING_PATIENTS).sum()) >= 2


def inverted(verdict: Verdict, auroc_ci_high: float) -> Verdict:
    """The verdict, overruled by 'inverted' when the whole test AUROC CI lies below 0.5."""
    if math.isfinite(auroc_ci_high) and auroc_ci_high < 0.5:
        return Verdict(
            INVERTED, f"the whole 95% CI of its test AUROC lies below 0.5 (upper end {auroc_ci_high:.2f})"
        )
    return verdict


def hospital_ineligibility(train_patients: int | None, train_classes: int | None) -> str | None:
    """Why a local model may not be chosen as the best hospital; '' when it may, None when not known."""
    reasons = []
    if train_classes is not None and train_classes < MIN_HOSPITAL_CLASSES:
        reasons.append(
            f"only {train_classes} class{'' if train_classes == 1 else 'es'} among its training patients"
        )
    if train_patients is not None and train_patients < MIN_HOSPITAL_PATIENTS:
        reasons.append(f"{train_patients} training patients (< {MIN_HOSPITAL_PATIENTS})")
    if reasons:
        return "; ".join(reasons)
    return None if train_patients is None or train_classes is None else ""


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, str]:
    """Decision threshold on P(class 1) (positive when score ≥ threshold) that maximises Youden's J on the
    validation patients (labels (P,) of 0/1, scores (P,)), and how it was chosen."""
    y = np.asarray(labels) == 1
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():
        return FALLBACK_THRESHOLD, f"{FALLBACK_THRESHOLD:g}: the validation patients hold one class"
    distinct = np.unique(s)
    # midway between neighbouring validation scores, and beyond both ends (everyone positive / negative)
    candidates = np.r_[distinct[0], (distinct[1:] + distinct[:-1]) / 2, np.nextafter(distinct[-1], np.inf)]
    positive = s[None, :] >= candidates[:, None]
    j = positive[:, y].mean(axis=1) - positive[:, ~y].mean(axis=1)
    best = np.flatnonzero(j >= j.max() - 1e-12)
    chosen = float(candidates[best[np.argmin(np.abs(candidates[best] - FALLBACK_THRESHOLD))]])
    return chosen, f"Youden's J on {len(y)} validation patients"


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(sensitivity, specificity, accuracy) of 'positive when P(class 1) ≥ threshold' on labels (P,) of 0/1
    and scores (P,); a rate without patients to measure it on is NaN."""
    y = np.asarray(labels) == 1
    predicted = np.asarray(scores, dtype=np.float64) >= threshold
    sensitivity = float(predicted[y].mean()) if y.any() else math.nan
    specificity = float((~predicted[~y]).mean()) if (~y).any() else math.nan
    accuracy = float((predicted == y).mean()) if len(y) else math.nan
    return sensitivity, specificity, accuracy
