"""Tile-feature standardisation that the sites agree on, kept inside the model.

Why: encoders' features come on very different scales (MUSK2 distances span −471…625; a randomly initialised
ResNet's pooled activations differ between tiles in the third decimal). An aggregator trained on them with
a small learning rate stays at chance. Every MIL model (`fedpath.common.mil`) therefore starts with a
`FeatureStandardizer`: (x − mean) / scale per feature dimension, with mean and scale stored as buffers in
the model's state dict, so they travel and are checkpointed with the weights and a model applied to a new
patient standardises its tiles the same way.

Where the statistics come from: per-dimension moments (tile count, sum, sum of squares) over the training
tiles. A site sends only these three aggregates (never a tile); the coordinator adds them up across sites
(`combine`) and sets mean and scale once, before round 1. Local and pooled baselines compute the same
moments from their own training bags, so every method sees identically standardised features.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedpath.common.bags import Bag
from fedpath.common.features import read_feature_matrix
from fedpath.common.mil import FeatureStandardizer

# A dimension whose SD is below this share of its typical magnitude is treated as constant: it is centred
# but not divided (dividing would turn float rounding into signal).
MIN_RELATIVE_SD = 1e-6


@dataclass(frozen=True)
class FeatureMoments:
    """Per-dimension sums over tiles: count (tiles), total (D,), squares (D,), float64."""

    count: int
    total: np.ndarray
    squares: np.ndarray

    def standardization(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, scale) per dimension; scale is the SD, or 1 for a dimension that is constant."""
        if self.count < 2:
            raise ValueError(f"standardisation needs at least 2 tiles, got {self.count}")
        mean = self.total / self.count
        var = np.maximum(self.squares / self.count - mean**2, 0.0)
        sd = np.sqrt(var)
        constant = sd <= MIN_RELATIVE_SD * np.maximum(np.abs(mean), 1.0)
        return mean, np.where(constant, 1.0, sd)


def moments_of(bags: Sequence[Bag]) -> FeatureMoments:
    """The moments over every tile of every feature file of `bags` (each file read once)."""
    paths = list(dict.fromkeys(p for bag in bags for p in bag.paths))
    if not paths:
        raise ValueError("no feature files to standardise from")
    count, total, squares = 0, None, None
    for path in paths:
        x = read_feature_matrix(path).astype(np.float64)
        if total is None or squares is None:
            total, squares = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        count += x.shape[0]
        total += x.sum(axis=0)
        squares += (x**2).sum(axis=0)
    assert total is not None and squares is not None
    return FeatureMoments(count, total, squares)


def combine(parts: Iterable[FeatureMoments]) -> FeatureMoments:
    """The moments of the union of the parts' tiles (what the coordinator computes from the sites' sums)."""
    parts = list(parts)
    if not parts:
        raise ValueError("no moments to combine")
    dims = {p.total.shape for p in parts}
    if len(dims) > 1:
        raise ValueError(f"moments of different feature dimensions {sorted(dims)}")
    return FeatureMoments(
        sum(p.count for p in parts),
        np.sum([p.total for p in parts], axis=0),
        np.sum([p.squares for p in parts], axis=0),
    )


def standardizer_of(model: nn.Module) -> FeatureStandardizer:
    found = [m for m in model.modules() if isinstance(m, FeatureStandardizer)]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__} has {len(found)} feature standardizers, expected 1")
    return found[0]


def set_standardization(model: nn.Module, moments: FeatureMoments) -> None:
    """Store the moments' mean and scale in the model's standardizer (in place)."""
    mean, scale = moments.standardization()
    std = standardizer_of(model)
    if std.mean.shape != mean.shape:
        raise ValueError(f"moments of dimension {mean.shape[0]} for a model of in-dim {std.mean.shape[0]}")
    with torch.no_grad():
        std.mean.copy_(torch.from_numpy(mean))
        std.scale.copy_(torch.from_numpy(scale))


def is_standardized(model: nn.Module) -> bool:
    """Whether the model's standardizer holds statistics (not the identity it starts as)."""
    std = standardizer_of(model)
    return bool(std.mean.abs().sum() > 0 or (std.scale != 1).any())
