"""Tiles of a physical size on a slide: a non-overlapping grid in level-0 pixels, kept where there is tissue.

A tile is `tile_um` µm wide; the encoder sees it as `tile_px` px, so its resolution is tile_um / tile_px µm/px.
Each tile is read from the coarsest pyramid level that is still at least that fine, then resized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedpath.client.tissue import TissueMask
from fedpath.common.units import Microns, MicronsPerPixel, SlidePixels, TilePixels

LEVEL_TOLERANCE = 1.01
"""A level whose downsample overshoots the wanted one by at most 1 % still counts (rounding in scanners)."""


@dataclass(frozen=True)
class TileGrid:
    """The tiles kept on one slide and how to read them.

    coords_px: (N, 2) int64 top-left corners (x, y) in level-0 px, row-major order;
    tissue_fraction: (N,) float in [0, 1]; size_level0: tile side in level-0 px (float, the grid stride);
    read_level, read_size: the pyramid level read and the tile side there in px, before resizing to tile_px.
    """

    coords_px: np.ndarray
    tissue_fraction: np.ndarray
    tile_um: Microns
    tile_px: TilePixels
    size_level0: float
    read_level: int
    read_size: int

    def __len__(self) -> int:
        return int(self.coords_px.shape[0])


def best_level(level_downsamples: Sequence[float], downsample: float) -> int:
    """Index of the coarsest level whose downsample does not exceed `downsample` (level-0 px per tile px)."""
    fits = [i for i, d in enumerate(level_downsamples) if d <= downsample * LEVEL_TOLERANCE]
    return max(fits, key=lambda i: level_downsamples[i]) if fits else 0


def tile_read_level(
    level_downsamples: Sequence[float], mpp: MicronsPerPixel, tile_um: Microns, tile_px: TilePixels
) -> int:
    """The pyramid level tiles of `tile_um` µm at `tile_px` px are read from on a slide of `mpp` µm/px."""
    return best_level(level_downsamples, tile_um / mpp / tile_px)


def grid_positions(length: SlidePixels, size_level0: float) -> np.ndarray:
    """Left (or top) edges in level-0 px of the whole tiles that fit along a side of `length` px."""
    n = math.floor(length / size_level0 + 1e-9)
    return np.floor(np.arange(n) * size_level0 + 1e-9).astype(np.int64)


def tissue_fractions(tissue: TissueMask, coords_px: np.ndarray, size_level0: float) -> np.ndarray:
    """Fraction of each tile's footprint that the mask calls tissue; coords_px (N, 2) level-0 px → (N,)."""
    mask = tissue.mask
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    dx, dy = tissue.downsample
    x0 = np.clip(np.round(coords_px[:, 0] / dx).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.round(coords_px[:, 1] / dy).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.round((coords_px[:, 0] + size_level0) / dx).astype(np.int64), x0 + 1, w)
    y1 = np.clip(np.round((coords_px[:, 1] + size_level0) / dy).astype(np.int64), y0 + 1, h)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / ((x1 - x0) * (y1 - y0))


def plan_tiles(
    width: SlidePixels,
    height: SlidePixels,
    mpp: MicronsPerPixel,
    level_downsamples: Sequence[float],
    tissue: TissueMask,
    *,
    tile_um: Microns,
    tile_px: TilePixels,
    min_tissue: float,
) -> TileGrid:
    """The grid of `tile_um`-µm tiles inside a `width` × `height` level-0 px slide with ≥ `min_tissue` tissue."""
    size_level0 = tile_um / mpp
    if size_level0 < 1:
        raise ValueError(
            f"a {tile_um} µm tile is {size_level0:.3g} level-0 px at {mpp} µm/px: below one pixel; "
            "check the slide's MPP"
        )
    xs, ys = grid_positions(width, size_level0), grid_positions(height, size_level0)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64).reshape(-1, 2)
    fractions = tissue_fractions(tissue, coords, size_level0) if len(coords) else np.zeros(0)
    keep = fractions >= min_tissue
    level = tile_read_level(level_downsamples, mpp, tile_um, tile_px)
    read_size = max(1, round(size_level0 / level_downsamples[level]))
    return TileGrid(
        coords_px=coords[keep],
        tissue_fraction=fractions[keep],
        tile_um=tile_um,
        tile_px=tile_px,
        size_level0=size_level0,
        read_level=level,
        read_size=read_size,
    )
