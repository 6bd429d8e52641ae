"""Where a MIL model looked on a whole-slide image: a heatmap PNG, QuPath tiles and a tile gallery per slide.

`write_heatmaps` writes, under ``out_dir``:

* ``{slide_id}.heatmap.png``: the slide thumbnail (longest side at most ``thumbnail_max_px``) at its own
  resolution, each tile a semi-transparent square coloured by the first score map (colour map ``turbo`` on the
  tile's percentile rank), thin tile outlines, a colour bar and a title. Needs the slide.
* ``{slide_id}.tiles.geojson``: a GeoJSON FeatureCollection that QuPath imports as tile objects (File > Import
  objects): one closed Polygon per tile with, as measurements, every map's percentile rank (``name``) and raw
  value (``name_raw``); the object colour is the heatmap colour. Needs only the coordinates, so it is always
  written.
* ``{slide_id}.tiles/``: the ``top_k`` highest and ``top_k`` lowest tiles of the first map read at full level-0
  resolution as JPEG (``top-01_score-0.987_x12345_y678.jpg``, ``bottom-01_...``; the score is the percentile
  rank) and ``index.csv`` listing them. Needs the slide.

Coordinates: ``coords_px`` are tile top-left corners (x, y) in level-0 pixels, the convention of fedpath feature
files (`fedpath.common.features`), and a tile covers ``[x, x + tile_size_px) × [y, y + tile_size_px)``. The
GeoJSON keeps these coordinates exactly (QuPath's image coordinates are level-0 pixels with y down); the PNG
scales them by thumbnail size / level-0 size and clips tiles that reach past the slide.

Scores are shown as percentile ranks (`normalise_scores`), not min-max scaled: attention is heavy-tailed, and a
few extreme tiles would otherwise leave the rest of the slide one colour.

Every file is written atomically (temp name beside the target, then renamed) and the gallery folder is built
under a temp name and renamed when complete, so a crash never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
from PIL import Image
from scipy.stats import rankdata

from fedpath.client.slides import SlideError, open_slide
from fedpath.client.tissue import background_color, thumbnail
from fedpath.common.atomic import write_bytes_atomic, write_text_atomic

COLOUR_MAP = "turbo"
"""Matplotlib colour map of the PNG, its colour bar and the GeoJSON object colours."""
TILE_ALPHA = 0.5
"""Opacity of a tile's colour over the thumbnail."""
OUTLINE_ALPHA = 0.45
"""Opacity of the (black) tile outlines."""
MIN_OUTLINE_PX = 4
"""Tiles smaller than this many thumbnail pixels get no outline: a 1-px line would hide most of their colour."""
JPEG_QUALITY = 95

# Layout of the PNG in pixels (dpi 100): the map at its own resolution, title above, colour bar right.
_DPI = 100
_PAD = 16
_TITLE_PX = 56
_BAR_GAP_PX = 20
_BAR_PX = 20
_BAR_LABELS_PX = 130
_MIN_BAR_PX = 160
_MIN_WIDTH_PX = 480

# What reading a slide raises when the file is damaged; an error writing out_dir is not among these reads.
_READ_ERRORS = (openslide.OpenSlideError, OSError)


@dataclass(frozen=True)
class HeatmapFiles:
    """What `write_heatmaps` wrote for one slide; png and gallery are None when the slide could not be read."""

    png: Path | None
    geojson: Path
    gallery: Path | None


def normalise_scores(values: np.ndarray) -> np.ndarray:
    """Per-tile scores (N,) → percentile ranks (N,) float64 in [0, 1]: 0 for the lowest tile, 1 for the highest.

    Ties share their mean rank (a constant map is 0.5 everywhere); one tile → [1.0]. `values` must be 1-D,
    non-empty and finite.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"scores contain {int((~np.isfinite(v)).sum())} NaN or Inf values")
    if v.size == 1:
        return np.ones(1)
    return (rankdata(v, method="average") - 1.0) / (v.size - 1)


def write_heatmaps(
    out_dir: Path,
    slide_id: str,
    coords_px: np.ndarray,
    tile_size_px: int,
    scores: Mapping[str, np.ndarray],
    slide_path: Path | None = None,
    *,
    top_k: int = 8,
    thumbnail_max_px: int = 2048,
    title: str = "",
) -> HeatmapFiles:
    """Write the heatmap PNG, the QuPath GeoJSON and the top/bottom tile gallery of one slide (see the module).

    coords_px: (N, 2) integer tile top-left corners (x, y) in level-0 pixels; tile_size_px: tile side in level-0
    pixels; scores: map name → (N,) raw per-tile values, the first map is drawn and picks the gallery;
    slide_path: the slide, read with OpenSlide (or PIL for plain images). Without a readable slide only the
    GeoJSON is written and a PNG or gallery left from an earlier run is removed, as it would no longer match.
    title: drawn under the slide id above the map. Raises ValueError, naming the slide, for invalid input
    (before anything is written).
    """
    coords, raw = _validated(slide_id, coords_px, tile_size_px, scores, top_k, thumbnail_max_px)
    tile_size, top_k, thumbnail_max_px = int(tile_size_px), int(top_k), int(thumbnail_max_px)
    normalised = {name: normalise_scores(values) for name, values in raw.items()}
    first = next(iter(raw))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    geojson = out / f"{slide_id}.tiles.geojson"
    png = out / f"{slide_id}.heatmap.png"
    gallery = out / f"{slide_id}.tiles"

    lut = _colour_lut()
    write_text_atomic(geojson, _tiles_geojson(coords, tile_size, raw, normalised, lut))

    slide = _open_or_none(slide_path)
    if slide is None:
        _remove_stale(png, gallery)
        return HeatmapFiles(png=None, geojson=geojson, gallery=None)
    with contextlib.closing(slide):
        try:
            thumb = np.asarray(thumbnail(slide, thumbnail_max_px), dtype=np.uint8)
        except _READ_ERRORS:
            _remove_stale(png, gallery)
            return HeatmapFiles(png=None, geojson=geojson, gallery=None)
        level0 = (int(slide.dimensions[0]), int(slide.dimensions[1]))
        picture = _overlay_tiles(thumb, level0, coords, tile_size, normalised[first], lut)
        png_bytes = _render_png(picture, slide_id, title, first)
        staged = Path(tempfile.mkdtemp(prefix=f".{gallery.name}.", suffix=".part", dir=out))
        try:
            readable = _write_gallery(
                staged, slide, coords, tile_size, first, raw[first], normalised[first], top_k
            )
            if not readable:
                shutil.rmtree(staged, ignore_errors=True)
                _remove_stale(png, gallery)
                return HeatmapFiles(png=None, geojson=geojson, gallery=None)
            write_bytes_atomic(png, png_bytes)
            _replace_dir(staged, gallery)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    return HeatmapFiles(png=png, geojson=geojson, gallery=gallery)


def _validated(
    slide_id: str,
    coords_px: np.ndarray,
    tile_size_px: int,
    scores: Mapping[str, np.ndarray],
    top_k: int,
    thumbnail_max_px: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Coordinates as (N, 2) int64 and scores as float64 (N,) arrays, or a ValueError naming the slide."""
    if not slide_id or slide_id in {".", ".."} or any(c in slide_id for c in "/\\\0"):
        raise ValueError(f"slide id {slide_id!r} cannot name files: it must be non-empty, without / or \\")
    where = f"heatmaps of slide '{slide_id}'"
    coords = np.asarray(coords_px)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"{where}: coords_px must be (N, 2) tile corners (x, y), got shape {coords.shape}")
    n = coords.shape[0]
    if n == 0:
        raise ValueError(f"{where}: the slide has no tiles, so there is nothing to draw")
    if not np.issubdtype(coords.dtype, np.number) or np.issubdtype(coords.dtype, np.complexfloating):
        raise ValueError(f"{where}: coords_px must be numbers, got dtype {coords.dtype}")
    if not np.issubdtype(coords.dtype, np.integer) and (
        not np.isfinite(coords).all() or (coords != np.round(coords)).any()
    ):
        raise ValueError(f"{where}: coords_px must be whole level-0 pixels (finite integers)")
    for label, value, least in (
        ("tile_size_px", tile_size_px, 1),
        ("top_k", top_k, 0),
        ("thumbnail_max_px", thumbnail_max_px, 1),
    ):
        if not _is_whole(value) or value < least:
            raise ValueError(f"{where}: {label} must be a whole number ≥ {least}, got {value!r}")
    if not scores:
        raise ValueError(f"{where}: no score maps given (e.g. {{'attention': values}})")
    raw: dict[str, np.ndarray] = {}
    for name, values in scores.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: score map names must be non-empty strings, got {name!r}")
        if f"{name}_raw" in scores:
            raise ValueError(
                f"{where}: maps '{name}' and '{name}_raw' would share a GeoJSON measurement name"
            )
        try:
            v = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: score map '{name}' is not numeric ({err})") from err
        if v.shape != (n,):
            raise ValueError(
                f"{where}: score map '{name}' has shape {v.shape}, expected ({n},): one per tile"
            )
        bad = int((~np.isfinite(v)).sum())
        if bad:
            raise ValueError(
                f"{where}: score map '{name}' has {bad} NaN or Inf values; check the model output"
            )
        raw[name] = v + 0.0  # -0.0 becomes 0.0 in the GeoJSON
    return coords.astype(np.int64), raw


def _is_whole(value: object) -> bool:
    """An int or numpy integer, or a float with no fraction (224.0); never a bool."""
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | np.integer):
        return True
    return isinstance(value, float | np.floating) and math.isfinite(value) and float(value).is_integer()


@functools.cache
def _colour_lut() -> np.ndarray:
    """(256, 3) uint8 RGB of the colour map at 0, 1/255, ..., 1 (read-only: it is computed once)."""
    from matplotlib import colormaps

    rgba = colormaps[COLOUR_MAP](np.linspace(0.0, 1.0, 256))
    lut = np.rint(np.asarray(rgba)[:, :3] * 255).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def _lut_index(normalised: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(normalised, 0.0, 1.0) * 255).astype(np.intp)


def _tiles_geojson(
    coords_px: np.ndarray,
    tile_size_px: int,
    raw: Mapping[str, np.ndarray],
    normalised: Mapping[str, np.ndarray],
    lut: np.ndarray,
) -> str:
    """The tiles as a QuPath-importable GeoJSON FeatureCollection (text).

    coords_px: (N, 2) top-left corners in level-0 pixels; raw, normalised: map name → (N,) values, finite;
    lut: (256, 3) uint8 colours, indexed by the first map's normalised value, for each object's colour.
    No classification: QuPath classes are categories with one colour, and a map value is not a category.

    The text is what ``json.dumps`` writes for the FeatureCollection (default separators; integers as ``str``,
    floats as ``repr``, names escaped by ``json.dumps``), built with one %-template per tile, which is several
    times faster than dumping 10,000 nested dicts.
    """
    s = int(tile_size_px)
    names = list(raw)
    keys = [key for name in names for key in (name, f"{name}_raw")]
    columns = [col.tolist() for name in names for col in (normalised[name], raw[name])]
    measurements = ", ".join(f"{_template_text(json.dumps(key))}: %r" for key in keys)
    feature = (
        '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
        "[[[%d, %d], [%d, %d], [%d, %d], [%d, %d], [%d, %d]]]}, "
        '"properties": {"objectType": "tile", "name": "tile %d", "color": %s, "isLocked": true, '
        '"measurements": {' + measurements + "}}}"
    )
    colour_text = [f"[{r}, {g}, {b}]" for r, g, b in lut.tolist()]
    colours = [colour_text[i] for i in _lut_index(normalised[names[0]]).tolist()]
    x, y = coords_px[:, 0].tolist(), coords_px[:, 1].tolist()
    x1, y1 = (coords_px[:, 0] + s).tolist(), (coords_px[:, 1] + s).tolist()
    rows = zip(x, y, x1, y, x1, y1, x, y1, x, y, range(len(x)), colours, *columns, strict=True)
    return '{"type": "FeatureCollection", "features": [' + ", ".join([feature % row for row in rows]) + "]}"


def _template_text(text: str) -> str:
    """`text` as a literal inside a %-format template."""
    return text.replace("%", "%%")


def _overlay_tiles(
    thumb: np.ndarray,
    level0_size: tuple[int, int],
    coords_px: np.ndarray,
    tile_size_px: int,
    normalised: np.ndarray,
    lut: np.ndarray,
) -> np.ndarray:
    """The thumbnail (h, w, 3) uint8 with every tile blended in as a coloured square and outlined.

    level0_size: (width, height) of the slide in level-0 pixels, which the thumbnail shows whole; coords_px:
    (N, 2) tile corners in level-0 pixels; normalised: (N,) values in [0, 1] that index `lut` (256, 3).
    Tiles past the slide are clipped; where tiles overlap their values are averaged.

    Vectorised on a grid of cells: the distinct tile edges cut the thumbnail into rectangles that each lie
    inside the same tiles (on a tile grid, one cell per tile). Each tile adds its value at its four corners of
    a difference image over the cells, whose 2-D cumulative sum is every cell's total; the cells' colours are
    then repeated out to pixels, and one table look-up per pixel value does the blending and the outlines
    (the same arithmetic, float32 and round-half-even, as blending in float32 and rounding the image).
    """
    h, w = thumb.shape[:2]
    sx, sy = w / level0_size[0], h / level0_size[1]
    x0 = np.rint(coords_px[:, 0] * sx).astype(np.int64)
    y0 = np.rint(coords_px[:, 1] * sy).astype(np.int64)
    x1 = np.maximum(np.rint((coords_px[:, 0] + tile_size_px) * sx).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.rint((coords_px[:, 1] + tile_size_px) * sy).astype(np.int64), y0 + 1)
    x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    inside = (x1 > x0) & (y1 > y0)
    x0, x1, y0, y1, values = x0[inside], x1[inside], y0[inside], y1[inside], normalised[inside]

    xs = np.unique(np.concatenate(([0, w], x0, x1)))  # cell edges; cell (r, c) is [xs[c], xs[c+1]) × ...
    ys = np.unique(np.concatenate(([0, h], y0, y1)))
    c0, c1 = np.searchsorted(xs, x0), np.searchsorted(xs, x1)
    r0, r1 = np.searchsorted(ys, y0), np.searchsorted(ys, y1)
    size = ys.size * xs.size
    corners = np.concatenate((r0 * xs.size + c0, r1 * xs.size + c1, r0 * xs.size + c1, r1 * xs.size + c0))
    k = values.size
    total = np.bincount(corners, np.concatenate((values, values, -values, -values)), size).astype(np.float64)
    count = np.bincount(corners[: 2 * k], minlength=size) - np.bincount(corners[2 * k :], minlength=size)
    total = total.reshape(ys.size, xs.size).cumsum(axis=0).cumsum(axis=1)[:-1, :-1]
    count = count.reshape(ys.size, xs.size).cumsum(axis=0).cumsum(axis=1)[:-1, :-1]
    covered = count > 0
    mean = np.divide(total, count, out=np.zeros_like(total), where=covered)

    # Where one tile covers a cell, its value as it is (a sum of differences can be off in the last bit): the
    # same cumulative sum over tile numbers gives that tile's number.
    numbers = np.arange(k, dtype=np.float64)  # exact in float64, and so are their sums
    owner = np.bincount(corners, np.concatenate((numbers, numbers, -numbers, -numbers)), size)
    owner = np.rint(owner).astype(np.int64).reshape(ys.size, xs.size).cumsum(axis=0).cumsum(axis=1)[:-1, :-1]
    single = count == 1
    mean[single] = values[owner[single]]

    # The blend tables are indexed by (pixel << 8) | partner, the partner being the tile colour where the pixel
    # is covered and the pixel itself elsewhere (blending a pixel with itself keeps it). Without a per-pixel
    # choice: index = pixel · (256 + uncovered) + colour, with colour 0 where uncovered. One band of pixel rows
    # per row of cells, so that the work stays in the processor's cache.
    heights, widths = np.diff(ys), np.diff(xs)
    colour = np.where(covered[..., None], lut[_lut_index(mean)], 0).astype(np.uint16)
    factor = np.broadcast_to(np.where(covered, 256, 257).astype(np.uint16)[..., None], colour.shape)
    colour, factor = np.repeat(colour, widths, axis=1), np.repeat(factor, widths, axis=1)
    lines = _outline_mask((h, w), x0, y0, x1, y1) if tile_size_px * min(sx, sy) >= MIN_OUTLINE_PX else None
    plain, lined = _blend_tables()
    pixels = thumb[..., :3]
    out = np.empty((h, w, 3), dtype=np.uint8)
    index = np.empty((int(heights.max()), w, 3), dtype=np.uint16)
    for row, (top, bottom) in enumerate(zip(ys[:-1].tolist(), ys[1:].tolist(), strict=True)):
        band = index[: bottom - top]
        np.multiply(pixels[top:bottom], factor[row], out=band)
        band += colour[row]
        np.take(plain, band, out=out[top:bottom])
        if lines is not None:
            drawn = lines[top:bottom]
            out[top:bottom][drawn] = lined[band[drawn]]
    return out


@functools.cache
def _blend_tables() -> tuple[np.ndarray, np.ndarray]:
    """(65536,) uint8 each, at index (pixel << 8) | colour: the pixel with the colour blended in at TILE_ALPHA,
    and that darkened by an outline at OUTLINE_ALPHA. Computed in float32 and rounded half to even."""
    pixel, colour = np.divmod(np.arange(1 << 16, dtype=np.float32), np.float32(256))
    blended = pixel + np.float32(TILE_ALPHA) * (colour - pixel)
    plain = np.rint(blended).astype(np.uint8)
    lined = np.rint(blended * (np.float32(1.0) - np.float32(OUTLINE_ALPHA))).astype(np.uint8)
    plain.flags.writeable = lined.flags.writeable = False
    return plain, lined


def _outline_mask(
    shape: tuple[int, int], x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray
) -> np.ndarray:
    """(h, w) bool: 1-px lines on each tile's edges at x0, x1, y0 and y1 (shared by neighbours on a grid).

    A line at the far edge x1 (y1) is drawn on the last pixel column (row) where x1 is the thumbnail's edge.
    Only the rows and columns that carry a line are worked on, each as a 1-D difference array.
    """
    h, w = shape
    right, bottom = np.minimum(x1, w - 1), np.minimum(y1, h - 1)
    mask = np.zeros((h, w), dtype=bool)
    # horizontal lines on rows y0 and bottom from x0 to right; vertical ones on columns x0 and right
    for at, start, stop, length, across in (
        (np.concatenate((y0, bottom)), np.tile(x0, 2), np.tile(right, 2), w, True),
        (np.concatenate((x0, right)), np.tile(y0, 2), np.tile(bottom, 2), h, False),
    ):
        lines, line = np.unique(at, return_inverse=True)
        runs = np.bincount(line * (length + 1) + start, minlength=lines.size * (length + 1))
        runs -= np.bincount(line * (length + 1) + stop + 1, minlength=lines.size * (length + 1))
        drawn = runs.reshape(lines.size, length + 1).cumsum(axis=1)[:, :length] > 0
        if across:
            mask[lines] |= drawn
        else:
            mask[:, lines] |= drawn.T
    return mask


def _render_png(picture: np.ndarray, slide_id: str, title: str, map_name: str) -> bytes:
    """The map at its own resolution (no resampling), the title above it and the colour bar beside it.

    Matplotlib draws only the frame: the heading (slide id and title) in a strip across the top, and the colour
    bar with its ticks and label in a strip right of the map; the map is copied into the page as it is
    (matplotlib's image drawing would resample it, slowly), and the page is encoded by `_png_bytes`.
    """
    h, w = picture.shape[:2]
    bar_h = max(h, _MIN_BAR_PX)
    longest_text = max(len(slide_id), len(title))
    fig_w = max(_PAD + w + _BAR_GAP_PX + _BAR_PX + _BAR_LABELS_PX, _MIN_WIDTH_PX, 2 * _PAD + 8 * longest_text)
    fig_h = _TITLE_PX + bar_h + _PAD
    left = _PAD + w
    page = np.empty((fig_h, fig_w, 3), dtype=np.uint8)
    page[:, :left] = 255
    page[:, left:] = _colour_bar_strip(fig_w - left, fig_h, map_name)
    # both strips are dark marks on white: where they meet (the top tick label), the darker pixel is the mark
    np.minimum(page[:_TITLE_PX], _heading_strip(fig_w, slide_id, title), out=page[:_TITLE_PX])
    page[_TITLE_PX : _TITLE_PX + h, _PAD:left] = picture
    return _png_bytes(page)


def _drawn(fig: Any) -> np.ndarray:
    """The RGB pixels of a matplotlib Figure drawn with Agg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def _heading_strip(width: int, slide_id: str, title: str) -> np.ndarray:
    """(_TITLE_PX, width, 3) uint8: the slide id in bold and the title under it, on white."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / _DPI, _TITLE_PX / _DPI), dpi=_DPI, facecolor="white")
    fig.text(_PAD / width, 1 - 8 / _TITLE_PX, slide_id, va="top", ha="left", fontsize=12, fontweight="bold")
    if title:
        fig.text(_PAD / width, 1 - 30 / _TITLE_PX, title, va="top", ha="left", fontsize=11)
    return _drawn(fig)


@functools.lru_cache(maxsize=8)
def _colour_bar_strip(width: int, height: int, map_name: str) -> np.ndarray:
    """(height, width, 3) uint8, read-only: the page's columns right of the map, with the colour bar from
    _TITLE_PX down to _PAD above the bottom and its ticks and label. Cached: slides whose thumbnails are equally
    tall (all upright ones at the thumbnail size) share it."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    bar_h = height - _TITLE_PX - _PAD
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    bar = fig.add_axes((_BAR_GAP_PX / width, _PAD / height, _BAR_PX / width, bar_h / height))
    fig.colorbar(
        ScalarMappable(norm=Normalize(0.0, 1.0), cmap=COLOUR_MAP),
        cax=bar,
        label=f"{map_name}\npercentile of tiles (0–1)",
    )
    strip = _drawn(fig)
    strip.flags.writeable = False
    return strip


def _png_bytes(rgb: np.ndarray) -> bytes:
    """(h, w, 3) uint8 as an 8-bit RGB PNG, Pillow's writer at its fastest level: on the CMU heatmap page about
    0.6 of the time of its default level 6, for a file about 15 % larger."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _gallery_picks(raw: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the highest tiles (highest first) and the lowest (lowest first), never one tile in both.

    With fewer than 2·top_k tiles the upper half (rounded up) is "top" and the rest "bottom". Ties go to the
    lower tile index.
    """
    n = raw.size
    k_top = min(top_k, math.ceil(n / 2))
    k_bottom = min(top_k, n - k_top)
    index = np.arange(n)
    highest = np.lexsort((index, -raw))[:k_top]
    taken = np.zeros(n, dtype=bool)
    taken[highest] = True
    lowest = np.lexsort((index, raw))
    return highest, lowest[~taken[lowest]][:k_bottom]


def _read_tile(slide: openslide.AbstractSlide, x: int, y: int, size: int) -> Image.Image:
    """Level-0 tile at (x, y) as RGB; transparent parts (past the slide's edge) take its background colour."""
    rgba = slide.read_region((x, y), 0, (size, size))
    rgb = Image.new("RGB", rgba.size, background_color(slide))
    rgb.paste(rgba, mask=rgba.getchannel("A"))
    return rgb


def _write_gallery(
    folder: Path,
    slide: openslide.AbstractSlide,
    coords: np.ndarray,
    tile_size_px: int,
    map_name: str,
    raw: np.ndarray,
    normalised: np.ndarray,
    top_k: int,
) -> bool:
    """JPEGs of the top and bottom tiles and index.csv into `folder`; False when the slide cannot be read."""
    highest, lowest = _gallery_picks(raw, top_k)
    digits = max(2, len(str(top_k)))
    rows: list[Sequence[Any]] = []
    for kind, picks in (("top", highest), ("bottom", lowest)):
        for rank, i in enumerate(picks.tolist(), start=1):
            x, y = int(coords[i, 0]), int(coords[i, 1])
            try:
                tile = _read_tile(slide, x, y, tile_size_px)
            except _READ_ERRORS:
                return False
            name = f"{kind}-{rank:0{digits}d}_score-{normalised[i]:.3f}_x{x}_y{y}.jpg"
            tile.save(folder / name, format="JPEG", quality=JPEG_QUALITY)
            rows.append((kind, rank, i, x, y, float(normalised[i]), float(raw[i]), map_name, name))
    text = io.StringIO()
    table = csv.writer(text, lineterminator="\n")
    table.writerow(("kind", "rank", "tile", "x_px", "y_px", "score", "score_raw", "map", "file"))
    table.writerows(rows)
    (folder / "index.csv").write_text(text.getvalue(), encoding="utf-8")
    return True


def _open_or_none(slide_path: Path | None) -> openslide.AbstractSlide | None:
    if slide_path is None:
        return None
    try:
        return open_slide(slide_path)
    except SlideError:
        return None


def _replace_dir(staged: Path, final: Path) -> None:
    """Put the complete folder `staged` at `final`, replacing what is there.

    A rename cannot replace a non-empty folder, so the old one is renamed aside first: for that moment `final`
    is absent, but it is never a mix of old and new files.
    """
    if not (final.exists() or final.is_symlink()):
        os.replace(staged, final)
        return
    old = final.with_name(f".{final.name}.{secrets.token_hex(6)}.old")
    os.replace(final, old)
    os.replace(staged, final)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_stale(*paths: Path) -> None:
    """Remove outputs of an earlier run that this run cannot replace (they would not match its GeoJSON)."""
    for path in paths:
        if path.exists() or path.is_symlink():
            _remove(path)
