"""Which weights a training run presents: one rule for every method (federations, local and pooled baselines).

The model of a run is the one after the round (for a baseline: the block of ``local_epochs`` epochs that
stands for a round) with the **lowest validation loss**, the cross-entropy on the validation patients of the
sites that trained it (for a federation: the patient-weighted mean of the losses the sites reported). Ties go
to the earlier round. When no validation loss is known (every site below its `min-report-patients`, or no
validation patients), the last round is presented and the selection says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SELECTION_RULE = (
    "the round with the lowest validation loss (cross-entropy over the training sites' validation patients; "
    "ties: the earlier round), the last round when no validation loss was reported"
)


@dataclass(frozen=True)
class Selection:
    round: int
    loss: float | None  # the validation loss of that round; None when none was known
    why: str


def best_round(losses: Sequence[tuple[int, float | None]]) -> Selection:
    """The selected round among (round, validation loss or None) pairs, in any order; `losses` not empty."""
    if not losses:
        raise ValueError("no rounds to select from")
    known = [(loss, r) for r, loss in losses if loss is not None and math.isfinite(loss)]
    if not known:
        last = max(r for r, _ in losses)
        return Selection(last, None, f"round {last}, the last: no validation loss was reported")
    loss, r = min(known)
    return Selection(r, loss, f"round {r} of {max(x for x, _ in losses)}: lowest validation loss {loss:.4f}")
