"""Open a whole-slide image (any format OpenSlide reads) or a plain image, and settle its resolution (MPP).

OpenSlide formats (svs, ndpi, mrxs, scn, vms, bif, generic tiled TIFF, ...) open through openslide-python with
the bundled openslide-bin. Plain images (a TMA core as png/jpg, or a TIFF OpenSlide does not read) open through
PIL as a one-level slide; they carry no trustworthy MPP, so the user gives it.

The MPP (µm per level-0 pixel) comes from, in order: the manifest's ``mpp`` column (the user's word for this
slide), the slide's metadata (``openslide.mpp-x``/``-y``), ``--assume-mpp``. None of them: `MissingMPPError`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import openslide

from fedpath.common.units import MicronsPerPixel, SlidePixels

OPENSLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm"}
)
PLAIN_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
SLIDE_SUFFIXES = OPENSLIDE_SUFFIXES | PLAIN_IMAGE_SUFFIXES
PIL_FALLBACK_SUFFIXES = PLAIN_IMAGE_SUFFIXES | {".tif", ".tiff"}
"""Formats PIL may open when OpenSlide does not recognise the file (a plain, untiled TIFF is common for TMAs)."""

# A level-0 MPP outside this range is not a microscope's: generic TIFFs often carry a 72 dpi default
# (352.8 µm/px) that OpenSlide reports as the MPP.
PLAUSIBLE_MPP = (0.01, 20.0)

MppSource = Literal["manifest", "slide", "assumed"]


class SlideError(Exception):
    """A slide that cannot be opened or read; the message names the slide and the cause."""


class MissingMPPError(SlideError):
    """A slide whose resolution is unknown; the message names the slide and the two fixes."""


@dataclass(frozen=True)
class SlideInfo:
    """What extraction needs to know about an opened slide.

    width, height: level-0 size in pixels; mpp: µm per level-0 pixel; level_downsamples: level-0 pixels per
    pixel of each pyramid level (1.0 first).
    """

    path: Path
    slide_id: str
    width: SlidePixels
    height: SlidePixels
    mpp: MicronsPerPixel
    mpp_source: MppSource
    level_downsamples: tuple[float, ...]
    vendor: str


def open_slide(path: str | os.PathLike[str]) -> openslide.AbstractSlide:
    """Open `path` with OpenSlide when it recognises the format, else as a plain image through PIL."""
    p = Path(path)
    if not p.is_file():
        raise SlideError(f"{p}: slide file does not exist")
    try:
        vendor = openslide.OpenSlide.detect_format(str(p))
        if vendor is not None:
            return openslide.OpenSlide(str(p))
        if p.suffix.lower() in PIL_FALLBACK_SUFFIXES:
            slide = openslide.ImageSlide(str(p))
            slide.read_region((0, 0), 0, (1, 1))  # PIL opens lazily: decode now so a broken file fails here
            return slide
    except Exception as err:  # OpenSlideError, PIL's UnidentifiedImageError, OSError on truncated files
        raise SlideError(
            f"{p}: cannot open the slide ({type(err).__name__}: {err}); is the file complete?"
        ) from err
    raise SlideError(
        f"{p}: OpenSlide does not recognise this file as a {p.suffix} slide; it may be truncated or "
        "corrupt (compare its size and checksum with the scanner's copy)"
    )


def slide_mpp(slide: openslide.AbstractSlide) -> MicronsPerPixel | None:
    """The level-0 MPP from the slide's metadata (mean of x and y), or None when absent or implausible."""
    props = slide.properties
    try:
        values = [
            float(props[k])
            for k in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y)
            if k in props
        ]
    except ValueError:
        return None
    if not values:
        return None
    mpp = sum(values) / len(values)
    if not (math.isfinite(mpp) and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]):
        return None
    return MicronsPerPixel(mpp)


def resolve_mpp(
    slide: openslide.AbstractSlide,
    slide_id: str,
    path: Path,
    *,
    manifest_mpp: float | None = None,
    assume_mpp: float | None = None,
) -> tuple[MicronsPerPixel, MppSource]:
    """The MPP to tile `slide` with and where it came from; `MissingMPPError` when nothing gives one."""
    if manifest_mpp is not None:
        return MicronsPerPixel(manifest_mpp), "manifest"
    found = slide_mpp(slide)
    if found is not None:
        return found, "slide"
    if assume_mpp is not None:
        return MicronsPerPixel(assume_mpp), "assumed"
    raw = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
    why = (
        f"its metadata gives an implausible {float(raw):.4g} µm/px (a 72 dpi TIFF default?)"
        if raw
        else "its metadata has no MPP (µm per pixel)"
    )
    raise MissingMPPError(
        f"slide '{slide_id}' ({path}): {why}, so tiles of a physical size cannot be cut. Either pass "
        "--assume-mpp X (µm/px at level 0 for every slide without one, e.g. 0.5 for a 20x scan, 0.25 for 40x) "
        "or give this slide an 'mpp' column value in the input manifest."
    )


def describe_slide(
    slide: openslide.AbstractSlide,
    slide_id: str,
    path: Path,
    *,
    manifest_mpp: float | None = None,
    assume_mpp: float | None = None,
) -> SlideInfo:
    """Collect size, pyramid and resolved MPP of an opened slide."""
    mpp, source = resolve_mpp(slide, slide_id, path, manifest_mpp=manifest_mpp, assume_mpp=assume_mpp)
    width, height = slide.dimensions
    return SlideInfo(
        path=path,
        slide_id=slide_id,
        width=SlidePixels(int(width)),
        height=SlidePixels(int(height)),
        mpp=mpp,
        mpp_source=source,
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        vendor=str(slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "image")),
    )
