"""Tissue detection at thumbnail scale: a saturation threshold cleaned up by morphology.

Stained tissue is coloured; glass, background and most out-of-focus haze are grey or white. A pixel is tissue
when its HSV saturation reaches `min_saturation` and it is not near-black (scanner borders, debris). Closing
joins tissue across small gaps, filling closes holes (lumina, fat), opening drops isolated specks.
Runs offline with no model to download.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import openslide
from PIL import Image
from scipy import ndimage

THUMB_SIDES = (1024, 4096)
"""Least and most pixels along the longest side of the thumbnail the mask is computed on."""
MASK_PX_PER_TILE = 8
"""The thumbnail is fine enough to give a tile at least this many mask pixels along a side (within THUMB_SIDES)."""
STRIP_ROWS = 2048
"""Rows of the read level decoded at once while making a thumbnail: bounds memory on one-level slides."""


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask of shape (h, w) over the whole slide.

    downsample: level-0 pixels per mask pixel along (x, y); mask pixel (r, c) covers level-0 pixels
    [c·dx, (c+1)·dx) × [r·dy, (r+1)·dy).
    """

    mask: np.ndarray
    downsample: tuple[float, float]

    @property
    def fraction(self) -> float:
        """Fraction of the slide area detected as tissue, in [0, 1]."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def thumbnail_side(slide_size: tuple[int, int], tile_level0: float) -> int:
    """Longest side in px of a thumbnail that gives a tile of `tile_level0` level-0 px MASK_PX_PER_TILE px."""
    wanted = math.ceil(max(slide_size) * MASK_PX_PER_TILE / tile_level0)
    return min(max(wanted, THUMB_SIDES[0]), THUMB_SIDES[1], max(slide_size))


def thumbnail_level(slide: openslide.AbstractSlide, max_side: int) -> int:
    """The pyramid level `thumbnail` reads for a thumbnail of at most `max_side` px."""
    return int(slide.get_best_level_for_downsample(max(1.0, max(slide.dimensions) / max_side)))


def thumbnail(
    slide: openslide.AbstractSlide, max_side: int, decoded: Image.Image | None = None
) -> Image.Image:
    """The whole slide as an RGB image no larger than `max_side` px on its longest side.

    Read from the coarsest sufficient pyramid level (`thumbnail_level`) in strips, each box-reduced by an
    integer factor before the final resize, so memory stays bounded and transparency is filled with the slide's
    background colour. `decoded`: that whole level as read_region returns it (RGBA), when the caller has it
    already; its strips are then cut from it instead of decoded again.
    """
    width, height = slide.dimensions
    downsample = max(1.0, max(width, height) / max_side)
    size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    level = thumbnail_level(slide, max_side)
    level_w, level_h = slide.level_dimensions[level]
    if decoded is not None and decoded.size != (level_w, level_h):
        raise ValueError(f"decoded level is {decoded.size} px, level {level} is {(level_w, level_h)} px")
    level_ds = slide.level_downsamples[level]
    factor = max(1, int(downsample / level_ds))
    rows = max(factor, STRIP_ROWS // factor * factor)
    reduced = Image.new("RGBA", (math.ceil(level_w / factor), math.ceil(level_h / factor)))
    for top in range(0, level_h, rows):
        strip_h = min(rows, level_h - top)
        strip = (
            decoded.crop((0, top, level_w, top + strip_h))
            if decoded is not None
            else slide.read_region((0, round(top * level_ds)), level, (level_w, strip_h))
        )
        reduced.paste(strip.reduce(factor) if factor > 1 else strip, (0, top // factor))
    rgba = reduced.resize(size, Image.Resampling.BILINEAR)
    out = Image.new("RGB", size, background_color(slide))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def background_color(slide: openslide.AbstractSlide) -> tuple[int, int, int]:
    """The slide's background colour (OpenSlide property, else white) as RGB 0-255."""
    hex_color = str(slide.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "FFFFFF"))
    try:
        return (int(hex_color[0:2], 16), int(hex_color[2:4], 16), int(hex_color[4:6], 16))
    except ValueError:
        return (255, 255, 255)


def detect_tissue(
    rgb: Image.Image,
    slide_size: tuple[int, int],
    *,
    min_saturation: int = 20,
    min_value: int = 40,
    smooth_px: int = 2,
) -> TissueMask:
    """Tissue mask of a thumbnail `rgb` of a slide whose level 0 is `slide_size` (width, height) px.

    min_saturation, min_value: HSV thresholds on a 0-255 scale; smooth_px: morphology radius in mask pixels.
    """
    hsv = np.asarray(rgb.convert("HSV"))
    mask = (hsv[..., 1] >= min_saturation) & (hsv[..., 2] >= min_value)
    if smooth_px > 0 and mask.any():
        # pad with the edge values so tissue cut by the slide's border is not eroded away
        pad = 2 * smooth_px
        work = np.pad(mask, pad, mode="edge")
        structure = ndimage.generate_binary_structure(2, 1)
        work = ndimage.binary_closing(work, structure, iterations=smooth_px)
        work = ndimage.binary_fill_holes(work)
        work = ndimage.binary_opening(work, structure, iterations=smooth_px)
        mask = work[pad:-pad, pad:-pad]
    h, w = mask.shape
    return TissueMask(mask=np.asarray(mask, dtype=bool), downsample=(slide_size[0] / w, slide_size[1] / h))
