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


def _colour_lut() -> np.ndarray:
    """(256, 3) uint8 RGB of the colour map at 0, 1/255, ..., 1."""
    from matplotlib import colormaps

    rgba = colormaps[COLOUR_MAP](np.linspace(0.0, 1.0, 256))
    return np.rint(np.asarray(rgba)[:, :3] * 255).astype(np.uint8)


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
    """
    s = int(tile_size_px)
    names = list(raw)
    keys = [key for name in names for key in (name, f"{name}_raw")]
    columns = [col.tolist() for name in names for col in (normalised[name], raw[name])]
    measurements = [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)]
    colours = lut[_lut_index(normalised[names[0]])].tolist()
    features = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]],
            },
            "properties": {
                "objectType": "tile",
                "name": f"tile {i}",
                "color": colour,
                "isLocked": True,
                "measurements": m,
            },
        }
        for i, ((x, y), colour, m) in enumerate(zip(coords_px.tolist(), colours, measurements, strict=True))
    ]
    return json.dumps({"type": "FeatureCollection", "features": features}, allow_nan=False)


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
    Tiles past the slide are clipped; where tiles overlap their values are averaged. Vectorised: each tile adds
    its value at its four corners of a difference image, whose 2-D cumulative sum is every pixel's total.
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

    total = np.zeros((h + 1, w + 1))
    count = np.zeros((h + 1, w + 1), dtype=np.int32)
    for rows, cols, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(total, (rows, cols), sign * values)
        np.add.at(count, (rows, cols), sign)
    total = total.cumsum(axis=0).cumsum(axis=1)[:h, :w]
    count = count.cumsum(axis=0).cumsum(axis=1)[:h, :w]
    covered = count > 0
    mean = np.divide(total, count, out=np.zeros_like(total), where=covered)

    # whole-image arithmetic: cheaper than boolean indexing of the covered pixels
    out = thumb[..., :3].astype(np.float32)
    alpha = (covered * np.float32(TILE_ALPHA))[..., None]
    out += alpha * (lut[_lut_index(mean)].astype(np.float32) - out)
    if tile_size_px * min(sx, sy) >= MIN_OUTLINE_PX:
        lines = _outline_mask((h, w), x0, y0, x1, y1)
        out *= (1.0 - lines * np.float32(OUTLINE_ALPHA))[..., None]
    return np.rint(out).astype(np.uint8)


def _outline_mask(
    shape: tuple[int, int], x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray
) -> np.ndarray:
    """(h, w) bool: 1-px lines on each tile's edges at x0, x1, y0 and y1 (shared by neighbours on a grid)."""
    h, w = shape
    right, bottom = np.minimum(x1, w - 1), np.minimum(y1, h - 1)
    across = np.zeros((h, w + 1), dtype=np.int32)  # horizontal lines: +1 where a run starts, -1 past its end
    for row in (y0, bottom):
        np.add.at(across, (row, x0), 1)
        np.add.at(across, (row, right + 1), -1)
    down = np.zeros((h + 1, w), dtype=np.int32)
    for col in (x0, right):
        np.add.at(down, (y0, col), 1)
        np.add.at(down, (bottom + 1, col), -1)
    mask: np.ndarray = (across.cumsum(axis=1)[:, :w] > 0) | (down.cumsum(axis=0)[:h] > 0)
    return mask


def _render_png(picture: np.ndarray, slide_id: str, title: str, map_name: str) -> bytes:
    """The map at its own resolution (no resampling), the title above it and the colour bar beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    h, w = picture.shape[:2]
    bar_h = max(h, _MIN_BAR_PX)
    longest_text = max(len(slide_id), len(title))
    fig_w = max(_PAD + w + _BAR_GAP_PX + _BAR_PX + _BAR_LABELS_PX, _MIN_WIDTH_PX, 2 * _PAD + 8 * longest_text)
    fig_h = _TITLE_PX + bar_h + _PAD
    fig = Figure(figsize=(fig_w / _DPI, fig_h / _DPI), dpi=_DPI, facecolor="white")
    fig.text(_PAD / fig_w, 1 - 8 / fig_h, slide_id, va="top", ha="left", fontsize=12, fontweight="bold")
    if title:
        fig.text(_PAD / fig_w, 1 - 30 / fig_h, title, va="top", ha="left", fontsize=11)
    bar = fig.add_axes(
        (
            (_PAD + w + _BAR_GAP_PX) / fig_w,
            (fig_h - _TITLE_PX - bar_h) / fig_h,
            _BAR_PX / fig_w,
            bar_h / fig_h,
        )
    )
    fig.colorbar(
        ScalarMappable(norm=Normalize(0.0, 1.0), cmap=COLOUR_MAP),
        cax=bar,
        label=f"{map_name}\npercentile of tiles (0–1)",
    )
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    # The map goes into the rendered page as it is: matplotlib's image drawing would resample it (slowly).
    page = np.array(canvas.buffer_rgba())[..., :3]
    page[_TITLE_PX : _TITLE_PX + h, _PAD : _PAD + w] = picture
    buf = io.BytesIO()
    Image.fromarray(page).save(buf, format="PNG", compress_level=6)
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
