"""One rule picks the presented weights of every method: the round with the lowest validation loss."""

from __future__ import annotations

import math

import pytest

from fedpath.common.selection import best_round


def test_the_lowest_validation_loss_wins_and_ties_go_to_the_earlier_round() -> None:
    chosen = best_round([(1, 0.70), (2, 0.52), (3, 0.55), (4, 0.52)])
    assert (chosen.round, chosen.loss) == (2, 0.52)
    assert "round 2 of 4" in chosen.why


def test_unknown_losses_are_skipped_and_without_any_the_last_round_is_presented() -> None:
    assert best_round([(1, None), (2, 0.9), (3, math.nan)]).round == 2
    fallback = best_round([(1, None), (3, None), (2, math.inf)])
    assert fallback.round == 3 and fallback.loss is None and "no validation loss" in fallback.why
    with pytest.raises(ValueError):
        best_round([])
