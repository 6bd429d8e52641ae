"""Heatmaps of where a MIL model looked, drawn on the real CMU slide (tests/data/wsi, see PROVENANCE.md).

The tiles are a grid of 224 px tiles over the slide and the score rises with x (a little with y, so no two
tiles tie): the top tiles must be the right-most column, the bottom ones the left-most, bottom first.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
from PIL import Image

from fedpath.client.heatmaps import (
    HeatmapFiles,
    _colour_lut,
    _overlay_tiles,
    _png_bytes,
    _tiles_geojson,
    normalise_scores,
    write_heatmaps,
)

CMU = Path(__file__).parent / "data" / "wsi" / "CMU-1-Small-Region.svs"
CMU_SIZE = (2220, 2967)
TILE = 224
COLUMNS, ROWS = (
    CMU_SIZE[0] // TILE,
    CMU_SIZE[1] // TILE,
)  # 9 x 13 whole tiles; a strip right and below is bare
THUMB = 1024
TOP_K = 5
SLIDE_ID = "cmu-1"
GALLERY_NAME = re.compile(r"^(top|bottom)-(\d+)_score-([01]\.\d{3})_x(-?\d+)_y(-?\d+)\.jpg$")


def tile_grid(columns: int, rows: int) -> np.ndarray:
    """(columns·rows, 2) top-left corners of a grid of TILE px tiles from (0, 0), row by row."""
    xs, ys = np.meshgrid(np.arange(columns) * TILE, np.arange(rows) * TILE)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def rising_with_x(coords: np.ndarray) -> np.ndarray:
    return coords[:, 0] + 1e-3 * coords[:, 1]


def strict_json(text: str) -> Any:
    """json.loads that fails on NaN and Infinity, which are not JSON (QuPath rejects them)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"GeoJSON holds {constant}")

    return json.loads(text, parse_constant=refuse)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def read_tile(slide: openslide.OpenSlide, x: int, y: int) -> np.ndarray:
    return pixels(slide.read_region((x, y), 0, (TILE, TILE)))


def entries(folder: Path) -> set[str]:
    return set(os.listdir(folder)) if folder.exists() else set()


@dataclass(frozen=True)
class Run:
    files: HeatmapFiles
    coords: np.ndarray
    attention: np.ndarray
    gradient: np.ndarray


@pytest.fixture(scope="module")
def slide() -> Iterator[openslide.OpenSlide]:
    with openslide.OpenSlide(str(CMU)) as s:
        yield s


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    coords = tile_grid(COLUMNS, ROWS)
    attention = rising_with_x(coords)
    gradient = np.linspace(-3.0, 5.0, len(coords))
    files = write_heatmaps(
        tmp_path_factory.mktemp("heatmaps"),
        SLIDE_ID,
        coords,
        TILE,
        {"attention": attention, "attention_x_gradient_tumor": gradient},
        CMU,
        top_k=TOP_K,
        thumbnail_max_px=THUMB,
        title="predicted tumor (p = 0.83)",
    )
    return Run(files, coords, attention, gradient)


@pytest.fixture(scope="module")
def reversed_png(tmp_path_factory: pytest.TempPathFactory, run: Run) -> Path:
    """The same heatmap with the score reversed: only the tiles' colours differ from `run`'s PNG."""
    files = write_heatmaps(
        tmp_path_factory.mktemp("reversed"),
        SLIDE_ID,
        run.coords,
        TILE,
        {"attention": -run.attention},
        CMU,
        top_k=0,
        thumbnail_max_px=THUMB,
        title="predicted tumor (p = 0.83)",
    )
    assert files.png is not None
    return files.png


def test_the_slide_is_the_one_the_tests_assume(slide: openslide.OpenSlide) -> None:
    assert slide.dimensions == CMU_SIZE
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.499, abs=1e-3)


def test_all_three_outputs_are_written_under_their_names(run: Run) -> None:
    out = run.files.geojson.parent
    assert run.files.png == out / f"{SLIDE_ID}.heatmap.png"
    assert run.files.geojson == out / f"{SLIDE_ID}.tiles.geojson"
    assert run.files.gallery == out / f"{SLIDE_ID}.tiles"
    assert entries(out) == {f"{SLIDE_ID}.heatmap.png", f"{SLIDE_ID}.tiles.geojson", f"{SLIDE_ID}.tiles"}


def test_png_shows_the_tiles_coloured_over_the_thumbnail(
    run: Run, reversed_png: Path, slide: openslide.OpenSlide
) -> None:
    assert run.files.png is not None
    with Image.open(run.files.png) as image:
        assert image.mode in {"RGB", "RGBA"}
        assert image.width > 0 and image.height > 0
        png = pixels(image)
    with Image.open(reversed_png) as image:
        other = pixels(image)
    assert png.shape == other.shape

    # Reversing the score recolours the tiles and nothing else: the changed pixels span the tile grid.
    changed = np.argwhere((png != other).any(axis=2))
    assert len(changed) > 0
    (top, left), (bottom, right) = changed.min(axis=0), changed.max(axis=0) + 1
    thumb = pixels(slide.get_thumbnail((THUMB, THUMB)))
    h, w = thumb.shape[:2]
    grid_w = round(COLUMNS * TILE * w / CMU_SIZE[0])
    grid_h = round(ROWS * TILE * h / CMU_SIZE[1])
    assert right - left == pytest.approx(grid_w, abs=3)
    assert bottom - top == pytest.approx(grid_h, abs=3)

    # Where the map is: the offset at which the bare strip right of the grid is the plain thumbnail.
    def bare_strip_error(dy: int, dx: int) -> float:
        strip = png[dy : dy + h, dx + grid_w + 2 : dx + w]
        return float(np.abs(strip - thumb[:, grid_w + 2 :]).mean())

    error, dy, dx = min(
        (bare_strip_error(dy, dx), dy, dx)
        for dy in range(top - 3, top + 1)
        for dx in range(left - 3, left + 1)
    )
    assert error < 3.0  # the bare strip is the thumbnail (only resampling differs: get_thumbnail is ours)
    tiles = png[dy : dy + grid_h, dx : dx + grid_w]
    assert float(np.abs(tiles - thumb[:grid_h, :grid_w]).mean()) > 15.0  # the tiles are not


def test_geojson_has_one_closed_square_per_tile_at_its_true_corner(run: Run) -> None:
    doc = strict_json(run.files.geojson.read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection"
    features = doc["features"]
    assert len(features) == len(run.coords)
    width, height = CMU_SIZE
    for i, (feature, (x, y)) in enumerate(zip(features, run.coords.tolist(), strict=True)):
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert ring == [[x, y], [x + TILE, y], [x + TILE, y + TILE], [x, y + TILE], [x, y]]
        assert all(0 <= px <= width and 0 <= py <= height for px, py in ring)
        props = feature["properties"]
        assert props["objectType"] == "tile"
        assert props["name"] == f"tile {i}"
        assert len(props["color"]) == 3 and all(0 <= c <= 255 for c in props["color"])


def test_geojson_measurements_are_ranks_in_0_1_and_the_raw_values(run: Run) -> None:
    features = strict_json(run.files.geojson.read_text(encoding="utf-8"))["features"]
    measurements = [f["properties"]["measurements"] for f in features]
    names = {"attention", "attention_raw", "attention_x_gradient_tumor", "attention_x_gradient_tumor_raw"}
    assert all(set(m) == names for m in measurements)
    for name in ("attention", "attention_x_gradient_tumor"):
        values = np.array([m[name] for m in measurements])
        assert values.min() == 0.0 and values.max() == 1.0
    assert [m["attention_raw"] for m in measurements] == pytest.approx(run.attention.tolist())
    assert [m["attention_x_gradient_tumor_raw"] for m in measurements] == pytest.approx(run.gradient.tolist())
    highest = max(range(len(features)), key=lambda i: measurements[i]["attention"])
    assert features[highest]["geometry"]["coordinates"][0][0] == [(COLUMNS - 1) * TILE, (ROWS - 1) * TILE]


def gallery_rows(gallery: Path) -> list[dict[str, str]]:
    with (gallery / "index.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_gallery_holds_the_top_and_bottom_tiles_in_order(run: Run) -> None:
    assert run.files.gallery is not None
    jpegs = sorted(p.name for p in run.files.gallery.glob("*.jpg"))
    assert len(jpegs) == 2 * TOP_K
    parsed = [GALLERY_NAME.match(name) for name in jpegs]
    assert all(parsed), jpegs
    last_x, last_y = (COLUMNS - 1) * TILE, (ROWS - 1) * TILE
    top = sorted((int(m[2]), int(m[4]), int(m[5]), float(m[3])) for m in parsed if m and m[1] == "top")
    bottom = sorted((int(m[2]), int(m[4]), int(m[5]), float(m[3])) for m in parsed if m and m[1] == "bottom")
    # highest first: the right-most column from the bottom up; lowest first: the left-most from the top down
    assert [(x, y) for _, x, y, _ in top] == [(last_x, last_y - r * TILE) for r in range(TOP_K)]
    assert [(x, y) for _, x, y, _ in bottom] == [(0, r * TILE) for r in range(TOP_K)]
    assert top[0][3] == 1.0 and bottom[0][3] == 0.0

    rows = gallery_rows(run.files.gallery)
    assert [(r["kind"], r["rank"]) for r in rows] == [("top", str(k)) for k in range(1, TOP_K + 1)] + [
        ("bottom", str(k)) for k in range(1, TOP_K + 1)
    ]
    ranks = normalise_scores(run.attention)
    for row in rows:
        i = int(row["tile"])
        assert (int(row["x_px"]), int(row["y_px"])) == tuple(run.coords[i])
        assert float(row["score"]) == pytest.approx(ranks[i])
        assert float(row["score_raw"]) == pytest.approx(run.attention[i])
        assert row["map"] == "attention"
        assert (run.files.gallery / row["file"]).is_file()


def test_gallery_tiles_are_the_slide_at_full_resolution(run: Run, slide: openslide.OpenSlide) -> None:
    assert run.files.gallery is not None
    tiles: dict[tuple[int, int], np.ndarray] = {}
    for row in gallery_rows(run.files.gallery):
        with Image.open(run.files.gallery / row["file"]) as image:
            assert image.format == "JPEG" and image.size == (TILE, TILE)
            tiles[int(row["x_px"]), int(row["y_px"])] = pixels(image)
    for (x, y), tile in tiles.items():
        assert float(np.abs(tile - read_tile(slide, x, y)).mean()) < 3.0, (x, y)  # JPEG at quality 95
    # many gallery tiles are bare glass, alike: the most textured one is told apart from its neighbour
    (x, y), tissue = max(tiles.items(), key=lambda item: float(item[1].std()))
    assert float(tissue.std()) > 20.0
    neighbour = x - TILE if x >= TILE else x + TILE
    assert float(np.abs(tissue - read_tile(slide, neighbour, y)).mean()) > 10.0


@pytest.mark.parametrize(
    ("attention", "expected"),
    [
        ([0.2, 0.9, 0.5], [("top", "1"), ("top", "2"), ("bottom", "0")]),
        ([0.4, 0.4, 0.4], [("top", "0"), ("top", "1"), ("bottom", "2")]),  # ties: by index, still disjoint
    ],
)
def test_fewer_tiles_than_two_top_k_puts_each_tile_in_one_list(
    tmp_path: Path, attention: list[float], expected: list[tuple[str, str]]
) -> None:
    files = write_heatmaps(
        tmp_path,
        "three",
        tile_grid(3, 1),
        TILE,
        {"attention": np.array(attention)},
        CMU,
        thumbnail_max_px=256,
    )
    assert files.gallery is not None
    assert [(r["kind"], r["tile"]) for r in gallery_rows(files.gallery)] == expected
    assert len(list(files.gallery.glob("*.jpg"))) == 3


def test_tiles_past_the_slide_are_drawn_clipped_and_kept_in_the_geojson(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [CMU_SIZE[0] - 100, CMU_SIZE[1] - 100], [5000, 6000]])
    files = write_heatmaps(
        tmp_path, "edge", coords, TILE, {"attention": np.array([0.0, 1.0, 2.0])}, CMU, thumbnail_max_px=256
    )
    assert files.png is not None and files.png.is_file()
    features = strict_json(files.geojson.read_text(encoding="utf-8"))["features"]
    assert [f["geometry"]["coordinates"][0][0] for f in features] == coords.tolist()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([3.0, 1.0, 2.0, 2.0, 10.0], [0.75, 0.0, 0.375, 0.375, 1.0]),  # the tied 2s share ranks 2 and 3
        ([7.0, 7.0, 7.0], [0.5, 0.5, 0.5]),
        ([-4.2], [1.0]),
        ([1.0, 2.0], [0.0, 1.0]),
    ],
)
def test_normalise_scores_gives_percentile_ranks(values: list[float], expected: list[float]) -> None:
    assert normalise_scores(np.array(values)).tolist() == pytest.approx(expected)


def test_normalise_scores_is_monotone_and_spans_0_1() -> None:
    values = np.random.default_rng(0).lognormal(size=500)  # heavy-tailed, like attention
    ranks = normalise_scores(values)
    order = np.argsort(values)
    assert np.all(np.diff(ranks[order]) > 0)
    assert ranks.min() == 0.0 and ranks.max() == 1.0


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan]), np.array([]), np.ones((2, 2))])
def test_normalise_scores_refuses_what_has_no_rank(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        normalise_scores(bad)


GRID = tile_grid(4, 2)
GOOD = rising_with_x(GRID)


@pytest.mark.parametrize(
    ("coords", "tile", "scores", "says"),
    [
        (GRID, TILE, {"attention": GOOD[:-1]}, "expected \\(8,\\)"),
        (GRID, TILE, {"attention": GOOD, "gradient": GOOD[:5]}, "'gradient'"),
        (GRID, TILE, {"attention": np.where(np.arange(8) == 3, np.nan, GOOD)}, "NaN"),
        (GRID, TILE, {"attention": np.where(np.arange(8) == 3, np.inf, GOOD)}, "NaN or Inf"),
        (np.zeros((8, 3), dtype=int), TILE, {"attention": GOOD}, "\\(N, 2\\)"),
        (np.zeros((0, 2), dtype=int), TILE, {"attention": np.zeros(0)}, "no tiles"),
        (GRID, 0, {"attention": GOOD}, "tile_size_px"),
        (GRID, TILE, {}, "no score maps"),
        (GRID, TILE, {"attention": GOOD, "attention_raw": GOOD}, "share a GeoJSON measurement"),
    ],
)
def test_invalid_input_is_refused_naming_the_slide_before_anything_is_written(
    tmp_path: Path, coords: np.ndarray, tile: int, scores: dict[str, np.ndarray], says: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=says) as caught:
        write_heatmaps(out, "slide-7", coords, tile, scores, CMU, thumbnail_max_px=256)
    assert "slide-7" in str(caught.value)
    assert entries(out) == set()


@pytest.mark.parametrize("slide_path", [None, "missing.svs", "garbage.svs"])
def test_without_a_readable_slide_only_the_geojson_is_written(tmp_path: Path, slide_path: str | None) -> None:
    path = None if slide_path is None else tmp_path / slide_path
    if slide_path == "garbage.svs":
        assert path is not None
        path.write_bytes(b"not a slide" * 100)
    out = tmp_path / "out"
    files = write_heatmaps(out, "s1", GRID, TILE, {"attention": GOOD}, path)
    assert files.png is None and files.gallery is None
    assert files.geojson == out / "s1.tiles.geojson"
    assert len(strict_json(files.geojson.read_text(encoding="utf-8"))["features"]) == len(GRID)
    assert entries(out) == {"s1.tiles.geojson"}


def test_a_rerun_replaces_the_outputs_of_the_last_run(tmp_path: Path) -> None:
    first = write_heatmaps(tmp_path, "s1", GRID, TILE, {"a": GOOD}, CMU, top_k=3, thumbnail_max_px=256)
    assert first.gallery is not None and len(list(first.gallery.glob("*.jpg"))) == 6
    again = write_heatmaps(tmp_path, "s1", GRID, TILE, {"a": -GOOD}, CMU, top_k=1, thumbnail_max_px=256)
    assert again.gallery is not None
    assert sorted(p.name.split("_")[0] for p in again.gallery.glob("*.jpg")) == ["bottom-01", "top-01"]
    assert entries(tmp_path) == {"s1.heatmap.png", "s1.tiles.geojson", "s1.tiles"}

    # Without the slide the old PNG and gallery would contradict the new GeoJSON, so they go.
    write_heatmaps(tmp_path, "s1", GRID, TILE, {"a": GOOD}, tmp_path / "moved.svs")
    assert entries(tmp_path) == {"s1.tiles.geojson"}


def test_a_failure_while_writing_the_gallery_leaves_no_partial_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = Image.Image.save
    jpegs: list[object] = []

    def disk_full_after_two_jpegs(
        self: Image.Image, fp: Any, format: str | None = None, **params: Any
    ) -> None:
        if format == "JPEG":
            jpegs.append(fp)
            if len(jpegs) > 2:
                raise OSError(28, "No space left on device")
        save(self, fp, format, **params)

    monkeypatch.setattr(Image.Image, "save", disk_full_after_two_jpegs)
    with pytest.raises(OSError, match="No space left"):
        write_heatmaps(tmp_path, "s1", GRID, TILE, {"attention": GOOD}, CMU, top_k=3, thumbnail_max_px=256)
    assert len(jpegs) == 3
    # the GeoJSON came first and is complete; no PNG without its gallery, no half gallery, no temp files
    assert entries(tmp_path) == {"s1.tiles.geojson"}


def test_ten_thousand_tiles_make_a_geojson_without_the_slide(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    coords = tile_grid(100, 100)
    scores = {"attention": rng.lognormal(size=10_000), "attention_x_gradient_tumor": rng.normal(size=10_000)}
    files = write_heatmaps(tmp_path, "big", coords, TILE, scores)
    features = strict_json(files.geojson.read_text(encoding="utf-8"))["features"]
    assert len(features) == 10_000
    assert features[-1]["geometry"]["coordinates"][0][2] == [100 * TILE, 100 * TILE]
    assert features[-1]["properties"]["measurements"]["attention_raw"] == pytest.approx(
        scores["attention"][-1]
    )


def reference_geojson(coords: np.ndarray, tile: int, raw: dict[str, np.ndarray], lut: np.ndarray) -> str:
    """The GeoJSON as json.dumps writes the nested dicts: what `_tiles_geojson` must equal, byte for byte."""
    ranks = {name: normalise_scores(values) for name, values in raw.items()}
    colours = lut[np.rint(np.clip(ranks[next(iter(raw))], 0.0, 1.0) * 255).astype(np.intp)].tolist()
    features = []
    for i, ((x, y), colour) in enumerate(zip(coords.tolist(), colours, strict=True)):
        measurements = {}
        for name in raw:
            measurements[name] = float(ranks[name][i])
            measurements[f"{name}_raw"] = float(raw[name][i])
        ring = [[x, y], [x + tile, y], [x + tile, y + tile], [x, y + tile], [x, y]]
        properties = {"objectType": "tile", "name": f"tile {i}", "color": colour, "isLocked": True}
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": properties | {"measurements": measurements},
            }
        )
    return json.dumps({"type": "FeatureCollection", "features": features}, allow_nan=False)


def test_geojson_text_is_what_json_dumps_writes(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [-5, 7], [10**12, 3], [224, 448], [3, 1]])
    raw = {
        'odd "name" 100% \\ ü': np.array([0.0, -1e-300, 1e20, 3.3, 2.5e-7]),
        "attention": np.array([1 / 3, 2.0, -7.5, 1e16, 0.1]),
    }
    files = write_heatmaps(tmp_path, "s1", coords, TILE, raw)
    assert files.geojson.read_text(encoding="utf-8") == reference_geojson(coords, TILE, raw, _colour_lut())
    rng = np.random.default_rng(3)
    coords = tile_grid(40, 30)
    raw = {"attention": rng.lognormal(size=len(coords)), "g": rng.normal(size=len(coords))}
    expected = reference_geojson(coords, TILE, raw, _colour_lut())
    assert (
        _tiles_geojson(coords, TILE, raw, {k: normalise_scores(v) for k, v in raw.items()}, _colour_lut())
        == expected
    )


def reference_overlay(
    thumb: np.ndarray, level0: tuple[int, int], coords: np.ndarray, tile: int, ranks: np.ndarray
) -> np.ndarray:
    """The overlay painted tile by tile: mean rank per pixel, blended and outlined in float32, rounded."""
    lut = _colour_lut()
    h, w = thumb.shape[:2]
    sx, sy = w / level0[0], h / level0[1]
    total, count = np.zeros((h, w)), np.zeros((h, w), dtype=int)
    lines = np.zeros((h, w), dtype=bool)
    for (x, y), rank in zip(coords.tolist(), ranks.tolist(), strict=True):
        x0, y0 = round(x * sx), round(y * sy)
        x1, y1 = max(round((x + tile) * sx), x0 + 1), max(round((y + tile) * sy), y0 + 1)
        x0, x1, y0, y1 = min(max(x0, 0), w), min(max(x1, 0), w), min(max(y0, 0), h), min(max(y1, 0), h)
        if x1 <= x0 or y1 <= y0:
            continue
        total[y0:y1, x0:x1] += rank
        count[y0:y1, x0:x1] += 1
        right, bottom = min(x1, w - 1), min(y1, h - 1)
        lines[[y0, bottom], x0 : right + 1] = True
        lines[y0 : bottom + 1, [x0, right]] = True
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    out = thumb.astype(np.float32)
    colour = lut[np.rint(mean * 255).astype(np.intp)].astype(np.float32)
    out += ((count > 0) * np.float32(0.5))[..., None] * (colour - out)
    if tile * min(sx, sy) >= 4:
        out *= (1.0 - lines * np.float32(0.45))[..., None]
    return np.rint(out).astype(np.uint8)


@pytest.mark.parametrize(
    ("coords", "tile"),
    [
        (tile_grid(9, 13), TILE),  # the grid, a bare strip right and below
        (tile_grid(9, 13)[::3], TILE),  # gaps between tiles, as where only tissue is tiled
        (
            np.random.default_rng(5).integers(-300, 3000, size=(60, 2)),
            500,
        ),  # overlapping, some past the slide
        (tile_grid(80, 100) // 8, 28),  # tiles under 4 thumbnail pixels: no outlines
        (np.array([[5000, 6000], [-900, 0]]), TILE),  # every tile past the slide: nothing drawn
    ],
)
def test_overlay_is_the_tiles_painted_one_by_one(coords: np.ndarray, tile: int) -> None:
    rng = np.random.default_rng(7)
    thumb = rng.integers(0, 256, size=(180, 135, 3), dtype=np.uint8)
    ranks = normalise_scores(rng.normal(size=len(coords)))
    got = _overlay_tiles(thumb, CMU_SIZE, coords, tile, ranks, _colour_lut())
    np.testing.assert_array_equal(got, reference_overlay(thumb, CMU_SIZE, coords, tile, ranks))


def test_png_encoding_round_trips_exactly() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    rgb[10:20] = 255
    with Image.open(io.BytesIO(_png_bytes(rgb))) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), rgb)
