"""Bags of tile features for multiple-instance learning.

A bag is one slide, or all slides of one patient merged. `BagDataset` reads a bag's features from its
feature files when the bag is asked for, so a cohort never sits in memory; `collate_bags` pads a batch of
variable-size bags and returns a mask (True = a real tile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from fedpath.common.features import FeatureFileError, inspect_features, read_feature_matrix
from fedpath.common.manifest import Manifest


@dataclass(frozen=True)
class Bag:
    """One training example: its id (slide or patient), feature files, label index, patient and site."""

    bag_id: str
    paths: tuple[Path, ...]
    label: int
    patient_id: str
    site: str


def feature_dim(manifest: Manifest) -> int:
    """The tile feature dimension of a cohort, from its first slide's feature file (the one place it is read
    for a model's shape; a site's preflight, `fedpath site check`, checks that all its slides agree)."""
    first = manifest.slides[0]
    if first.features is None:
        raise FeatureFileError(
            f"{manifest.path}: line {first.line}, slide '{first.slide_id}' has no features path; "
            "run `fedpath extract` first or fill the 'features' column"
        )
    return inspect_features(first.features).dim


def bags_from_manifest(manifest: Manifest, *, by: Literal["patient", "slide"] = "patient") -> list[Bag]:
    """One bag per patient (its slides merged) or per slide. Every slide must have a features path."""
    missing = [s for s in manifest.slides if s.features is None]
    if missing:
        s = missing[0]
        raise FeatureFileError(
            f"{manifest.path}: line {s.line}, slide '{s.slide_id}' has no features path; "
            "run `fedpath extract` first or fill the 'features' column"
        )
    if by == "slide":
        return [
            Bag(s.slide_id, (s.features,), s.label_index, s.patient_id, s.site)  # type: ignore[arg-type]
            for s in manifest.slides
        ]
    labels = manifest.patient_labels()
    return [
        Bag(pid, tuple(s.features for s in slides), labels[pid], pid, slides[0].site)  # type: ignore[misc]
        for pid, slides in manifest.patients().items()
    ]


@dataclass
class BagItem:
    features: torch.Tensor  # (tiles, dim) float32
    label: int
    index: int


@dataclass
class BagBatch:
    """A padded batch: features (B, T, D), mask (B, T) with True on real tiles, labels (B,), indices (B,)."""

    features: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def to(self, device: torch.device | str) -> BagBatch:
        return BagBatch(
            self.features.to(device), self.mask.to(device), self.labels.to(device), self.indices.to(device)
        )


class BagDataset(Dataset[BagItem]):
    """Bags read on demand from feature files.

    max_tiles: cap per bag; when a bag has more tiles, a random subset is drawn from (seed, epoch, bag), so
    the draw is reproducible and independent of DataLoader workers. None keeps every tile (evaluation).
    """

    def __init__(self, bags: Sequence[Bag], *, max_tiles: int | None = None, seed: int = 0) -> None:
        self.bags = list(bags)
        self.max_tiles = max_tiles
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a new tile subset per bag for this epoch (call before each training epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.bags)

    @property
    def labels(self) -> np.ndarray:
        return np.array([b.label for b in self.bags], dtype=np.int64)

    def __getitem__(self, index: int) -> BagItem:
        bag = self.bags[index]
        parts = [read_feature_matrix(p) for p in bag.paths]
        dims = {p.shape[1] for p in parts}
        if len(dims) > 1:
            raise FeatureFileError(
                f"bag '{bag.bag_id}': its feature files have different dimensions {sorted(dims)} "
                f"({', '.join(str(p) for p in bag.paths)}); extract all slides with one encoder"
            )
        feats = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if feats.shape[0] == 0:
            raise FeatureFileError(f"bag '{bag.bag_id}' has no tiles ({', '.join(map(str, bag.paths))})")
        if self.max_tiles is not None and feats.shape[0] > self.max_tiles:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            keep = np.sort(rng.choice(feats.shape[0], size=self.max_tiles, replace=False))
            feats = feats[keep]
        return BagItem(torch.from_numpy(np.ascontiguousarray(feats)), bag.label, index)


def collate_bags(items: Sequence[BagItem]) -> BagBatch:
    """Pad bags to the longest in the batch; padded rows are zero and masked out."""
    longest = max(item.features.shape[0] for item in items)
    dim = items[0].features.shape[1]
    feats = torch.zeros(len(items), longest, dim, dtype=torch.float32)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, item in enumerate(items):
        n = item.features.shape[0]
        feats[i, :n] = item.features
        mask[i, :n] = True
    labels = torch.tensor([item.label for item in items], dtype=torch.long)
    indices = torch.tensor([item.index for item in items], dtype=torch.long)
    return BagBatch(feats, mask, labels, indices)
