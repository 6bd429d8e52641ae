"""`fedpath extract` on real slides (tests/data/wsi, see PROVENANCE.md) with a tiny random-init encoder.

The encoder is resnet18 on 64 px tiles: its features mean nothing, but every step from slide to feature file
runs for real. One CLI run over the two real slides is shared by the tests that only read its outputs.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import resource
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import openslide
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from fedpath.client.encoders import Encoder, EncoderError, load_encoder
from fedpath.client.extract import (
    READER_NICE,
    ExtractSettings,
    SlideResult,
    TileReader,
    extract_cohort,
    find_jobs,
)
from fedpath.client.slides import MissingMPPError, describe_slide, open_slide, resolve_mpp
from fedpath.client.tiling import best_level, plan_tiles
from fedpath.client.tissue import detect_tissue, thumbnail, thumbnail_side
from fedpath.common.cli import main as fedpath_main
from fedpath.common.features import read_features
from fedpath.common.manifest import load_manifest
from fedpath.common.units import Microns, MicronsPerPixel, SlidePixels, TilePixels

DATA = Path(__file__).parent / "data" / "wsi"
CMU = DATA / "CMU-1-Small-Region.svs"
TCGA = DATA / "tcga-cr-7395-01a-01-ts1.svs"
TINY = DATA / "openslide-python_small.svs"
BOXES = DATA / "openslide-python_boxes.tiff"
TILE_PX = TilePixels(64)
TILE_UM = Microns(256.0)
MIN_TISSUE = 0.25
ASSUMED_MPP = 0.5
ENV_SET_BY_THE_CLI = {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads make tiny forwards 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return load_encoder("resnet18", tile_px=TILE_PX, random_init=True, device="cpu")


def settings(**changes: object) -> ExtractSettings:
    base = ExtractSettings(
        tile_um=TILE_UM, tile_px=TILE_PX, min_tissue=MIN_TISSUE, batch_size=16, workers=0, progress=False
    )
    return replace(base, **changes)


def slide_folder(tmp: Path, *slides: Path) -> Path:
    folder = tmp / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    for s in slides:
        shutil.copy(s, folder / s.name)
    return folder


def stained_core(path: Path) -> Path:
    """A 640 px plain image of glass with a 512 px stained square in the middle (a TMA core, of sorts)."""
    core = Image.new("RGB", (640, 640), (240, 240, 240))
    core.paste((170, 90, 160), (64, 64, 576, 576))
    core.save(path)
    return path


CORE_SETTINGS = {"tile_um": Microns(64.0), "assume_mpp": MicronsPerPixel(0.5)}
"""For `stained_core`: 128 px tiles on a 5x5 grid; the square fills the inner 3x3 cells, half of each edge
cell and a quarter of each corner cell."""


def by_id(results: list[SlideResult]) -> dict[str, SlideResult]:
    return {r.slide_id: r for r in results}


def report_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


@dataclass(frozen=True)
class CliRun:
    out: Path
    code: int
    stdout: str


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliRun]:
    """`fedpath extract` over a folder with the two real slides, the TCGA one at an assumed MPP."""
    tmp = tmp_path_factory.mktemp("cli")
    folder = slide_folder(tmp, CMU, TCGA)
    out = tmp / "out"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        for name, value in ENV_SET_BY_THE_CLI.items():  # restored when the run is over
            mp.setenv(name, value)
        code = fedpath_main(
            [
                "extract",
                str(folder),
                "--out",
                str(out),
                "--encoder",
                "resnet18",
                "--random-init",
                "--tile-px",
                str(TILE_PX),
                "--tile-um",
                str(TILE_UM),
                "--min-tissue",
                str(MIN_TISSUE),
                "--assume-mpp",
                str(ASSUMED_MPP),
                "--batch-size",
                "16",
                "--workers",
                "1",
            ]
        )
    yield CliRun(out=out, code=code, stdout=stdout.getvalue())


# ------------------------------------------------------------------------------------ real slides, via CLI


def test_cli_extracts_real_slides_and_says_where_outputs_went(cli_run: CliRun) -> None:
    assert cli_run.code == 0
    assert f"report: {cli_run.out / 'extraction_report.csv'}" in cli_run.stdout
    assert f"manifest: {cli_run.out / 'manifest.csv'}" in cli_run.stdout
    rows = report_rows(cli_run.out / "extraction_report.csv")
    assert {k: r["status"] for k, r in rows.items()} == {
        "CMU-1-Small-Region": "done",
        "tcga-cr-7395-01a-01-ts1": "done",
    }
    assert rows["CMU-1-Small-Region"]["mpp_source"] == "slide"
    assert rows["tcga-cr-7395-01a-01-ts1"]["mpp_source"] == "assumed"
    assert all(float(r["seconds"]) > 0 and r["error"] == "" for r in rows.values())


@pytest.mark.parametrize(("slide", "mpp", "source"), [(CMU, 0.499, "slide"), (TCGA, ASSUMED_MPP, "assumed")])
def test_features_are_finite_with_coordinates_inside_the_slide(
    cli_run: CliRun, encoder: Encoder, slide: Path, mpp: float, source: str
) -> None:
    tf = read_features(cli_run.out / "features" / f"{slide.stem}.h5")
    n = tf.info.n_tiles
    assert n > 0
    assert tf.features.shape == (n, encoder.dim) == (n, 512)
    assert np.isfinite(tf.features).all()
    assert tf.features.std(axis=0).mean() > 0  # tiles differ, so features do
    with open_slide(slide) as s:
        width, height = s.dimensions
    size0 = TILE_UM / mpp
    assert tf.coords_px is not None and tf.coords_um is not None
    assert (tf.coords_px >= 0).all()
    assert (tf.coords_px[:, 0] + size0 <= width + 1).all() and (
        tf.coords_px[:, 1] + size0 <= height + 1
    ).all()
    np.testing.assert_allclose(tf.coords_um, tf.coords_px * mpp, rtol=1e-3)
    attrs = tf.info.attrs
    assert attrs["random_init"] and attrs["encoder"] == "resnet18" and attrs["mpp_source"] == source
    assert attrs["tile_size_px"] == TILE_PX and attrs["tile_size_um"] == TILE_UM
    assert tf.info.slide_mpp == pytest.approx(mpp, rel=1e-3)
    assert attrs["weights_sha256"] == encoder.weights_sha256


@pytest.mark.parametrize("slide", [CMU, TCGA])
def test_tile_count_matches_the_tissue_mask(cli_run: CliRun, slide: Path) -> None:
    """Recount, independently of tiling.py, the grid cells whose footprint on the mask is ≥ MIN_TISSUE tissue."""
    tf = read_features(cli_run.out / "features" / f"{slide.stem}.h5")
    mpp = tf.info.slide_mpp
    assert mpp is not None
    size0 = TILE_UM / mpp
    with open_slide(slide) as s:
        width, height = s.dimensions
        tissue = detect_tissue(thumbnail(s, thumbnail_side((width, height), size0)), (width, height))
    dx, dy = tissue.downsample
    kept = {tuple(c) for c in tf.coords_px.tolist()} if tf.coords_px is not None else set()
    clearly_in, clearly_out = set(), set()
    for row in range(int(height // size0)):
        for col in range(int(width // size0)):
            x, y = int(col * size0), int(row * size0)
            cell = tissue.mask[int(y / dy) : int((y + size0) / dy), int(x / dx) : int((x + size0) / dx)]
            fraction = cell.mean()
            if fraction >= MIN_TISSUE + 0.05:
                clearly_in.add((x, y))
            elif fraction < MIN_TISSUE - 0.05:
                clearly_out.add((x, y))
    assert clearly_in, "the real slide should have tissue"
    assert clearly_in <= kept
    assert not (kept & clearly_out)
    assert len(kept) == tf.info.n_tiles


def test_qc_image_shows_mask_and_grid(cli_run: CliRun) -> None:
    img = np.asarray(Image.open(cli_run.out / "qc" / "CMU-1-Small-Region.png").convert("RGB"))
    assert max(img.shape[:2]) <= 1024
    grid_blue = ((img[..., 0] == 0) & (img[..., 1] == 60) & (img[..., 2] == 255)).sum()
    assert grid_blue > 100


def test_output_manifest_points_at_the_features(cli_run: CliRun) -> None:
    manifest = load_manifest(cli_run.out / "manifest.csv", require="features", check_files=True)
    rows = {s.slide_id: s for s in manifest.slides}
    tcga = rows["tcga-cr-7395-01a-01-ts1"]
    assert (tcga.patient_id, tcga.site, tcga.label) == ("TCGA-CR-7395", "CR", "unknown")
    assert tcga.mpp == ASSUMED_MPP  # an assumed MPP is written down, so a rerun from this manifest agrees
    assert rows["CMU-1-Small-Region"].mpp is None
    assert tcga.features == (cli_run.out / "features" / "tcga-cr-7395-01a-01-ts1.h5").resolve()
    assert tcga.slide is not None and tcga.slide.name == TCGA.name


# ------------------------------------------------------------------------------------------ missing MPP


def test_missing_mpp_names_the_slide_and_both_fixes(tmp_path: Path, encoder: Encoder) -> None:
    jobs = find_jobs(slide_folder(tmp_path, TCGA))
    result = extract_cohort(jobs, encoder, settings(), tmp_path / "out").results[0]
    assert result.status == "error"
    assert "tcga-cr-7395-01a-01-ts1" in result.error
    assert "--assume-mpp" in result.error and "'mpp' column" in result.error
    assert not (tmp_path / "out" / "features").exists()
    with open_slide(TCGA) as s, pytest.raises(MissingMPPError, match="has no MPP"):
        resolve_mpp(s, "tcga", TCGA)


def test_mpp_from_manifest_column_wins(tmp_path: Path, encoder: Encoder) -> None:
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"slide_id,patient_id,site,label,slide,mpp\nT1,P1,CR,1,{TCGA},1.0\n")
    cohort = extract_cohort(find_jobs(manifest), encoder, settings(), tmp_path / "out")
    result = cohort.results[0]
    assert (result.status, result.mpp, result.mpp_source) == ("done", 1.0, "manifest")
    tf = read_features(tmp_path / "out" / "features" / "T1.h5")
    assert tf.info.slide_mpp == 1.0 and tf.info.attrs["mpp_source"] == "manifest"
    # 256 µm tiles at 1 µm/px are 256 level-0 px: read from level 1 (downsample 2) at 128 px, then resized
    assert tf.info.attrs["read_level"] == 1
    out_row = load_manifest(tmp_path / "out" / "manifest.csv").slides[0]
    assert (out_row.slide_id, out_row.patient_id, out_row.label, out_row.mpp) == ("T1", "P1", "1", 1.0)


def test_implausible_tiff_resolution_counts_as_missing(tmp_path: Path, encoder: Encoder) -> None:
    results = by_id(
        extract_cohort(
            find_jobs(slide_folder(tmp_path, BOXES)), encoder, settings(), tmp_path / "out"
        ).results
    )
    assert results["openslide-python_boxes"].status == "error"
    assert "implausible 352.8" in results["openslide-python_boxes"].error


# ----------------------------------------------------------------------------------- robustness


def test_corrupt_slides_are_reported_and_the_run_goes_on(tmp_path: Path, encoder: Encoder) -> None:
    folder = slide_folder(tmp_path)
    stained_core(folder / "d_core.png")
    data = CMU.read_bytes()
    (folder / "a_truncated.svs").write_bytes(data[: len(data) // 6])
    damaged = bytearray(data)
    damaged[120_000:150_000] = bytes(30_000)  # zeros over JPEG tile data: opens, but tiles do not decode
    (folder / "b_damaged.svs").write_bytes(bytes(damaged))
    (folder / "c_not_a_slide.png").write_bytes(b"this is not an image")
    cohort = extract_cohort(find_jobs(folder), encoder, settings(**CORE_SETTINGS), tmp_path / "out")
    results = by_id(cohort.results)
    for bad in ("a_truncated", "b_damaged", "c_not_a_slide"):
        assert results[bad].status == "error", results[bad]
        assert bad in results[bad].error
    assert results["d_core"].status == "done"  # after the failures, still extracted
    assert set(report_rows(tmp_path / "out" / "extraction_report.csv")) == set(results)
    assert [s.slide_id for s in load_manifest(tmp_path / "out" / "manifest.csv").slides] == ["d_core"]


def test_a_tile_that_fails_to_decode_in_a_worker_is_reported(tmp_path: Path, encoder: Encoder) -> None:
    data = bytearray(TCGA.read_bytes())
    data[100_000:2_500_000] = bytes(2_400_000)  # level-0 tile data only: the level-1 thumbnail still reads
    folder = slide_folder(tmp_path)
    (folder / "tcga_damaged.svs").write_bytes(bytes(data))
    level0 = settings(tile_um=Microns(48.0), assume_mpp=MicronsPerPixel(0.5), workers=1)  # 96 px → 64 px
    result = extract_cohort(find_jobs(folder), encoder, level0, tmp_path / "out").results[0]
    assert result.status == "error"
    assert result.error.startswith("slide 'tcga_damaged'") and "OpenSlideError" in result.error
    assert "DataLoader" not in result.error  # the cause, not the wrapper
    assert (tmp_path / "out" / "qc" / "tcga_damaged.png").is_file()
    assert not (tmp_path / "out" / "features").exists()


def _crash_on(name: str) -> Callable[[Path], openslide.AbstractSlide]:
    """open_slide, except that a tile-reading process opening `name` dies of a segmentation fault."""

    def opener(path: Path) -> openslide.AbstractSlide:
        if Path(path).name == name and get_worker_info() is not None:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
            os.kill(os.getpid(), signal.SIGSEGV)  # as a crash inside a slide library would
        return open_slide(path)

    return opener


def test_a_reader_crash_fails_that_slide_only(
    tmp_path: Path, encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = slide_folder(tmp_path)
    for name in ("a_core", "b_crash", "c_core", "d_core"):
        stained_core(folder / f"{name}.png")
    monkeypatch.setattr("fedpath.client.extract.open_slide", _crash_on("b_crash.png"))  # workers are forked
    cohort = extract_cohort(
        find_jobs(folder), encoder, settings(workers=2, **CORE_SETTINGS), tmp_path / "out"
    )
    results = by_id(cohort.results)
    assert results["b_crash"].status == "error"
    assert "crashed" in results["b_crash"].error and "b_crash" in results["b_crash"].error
    assert [results[n].status for n in ("a_core", "c_core", "d_core")] == [
        "done"
    ] * 3  # d was on the other worker
    assert list(report_rows(tmp_path / "out" / "extraction_report.csv")) == [
        "a_core",
        "b_crash",
        "c_core",
        "d_core",
    ]


def test_readers_run_at_a_lower_priority_than_the_encoder(
    tmp_path: Path, encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = tmp_path / "reader-niceness.txt"

    def opener(path: Path) -> openslide.AbstractSlide:
        seen.write_text(str(os.nice(0)))  # in the reading process
        return open_slide(path)

    folder = slide_folder(tmp_path)
    stained_core(folder / "core.png")
    monkeypatch.setattr("fedpath.client.extract.open_slide", opener)
    base = settings(workers=1, **CORE_SETTINGS)
    assert extract_cohort(find_jobs(folder), encoder, base, tmp_path / "o1").results[0].status == "done"
    assert int(seen.read_text()) == min(19, os.nice(0) + READER_NICE)  # a forked reader starts at ours
    unchanged = replace(base, reader_nice=0)
    assert extract_cohort(find_jobs(folder), encoder, unchanged, tmp_path / "o2").results[0].status == "done"
    assert int(seen.read_text()) == os.nice(0)


def test_several_workers_give_the_same_files_in_job_order(tmp_path: Path, encoder: Encoder) -> None:
    folder = slide_folder(tmp_path, CMU, TCGA, TINY)
    stained_core(folder / "core.png")
    base = settings(assume_mpp=MicronsPerPixel(ASSUMED_MPP), batch_size=5)
    alone = extract_cohort(find_jobs(folder), encoder, base, tmp_path / "w0")
    together = extract_cohort(find_jobs(folder), encoder, replace(base, workers=2), tmp_path / "w2")
    assert [r.slide_id for r in together.results] == [j.slide_id for j in find_jobs(folder)]
    assert [(r.status, r.tiles) for r in together.results] == [(r.status, r.tiles) for r in alone.results]
    assert list(report_rows(tmp_path / "w2" / "extraction_report.csv")) == [r.slide_id for r in alone.results]
    done = [r for r in alone.results if r.status == "done"]
    assert len(done) == 3
    for r in done:
        a, b = read_features(r.features), read_features(tmp_path / "w2" / "features" / f"{r.slide_id}.h5")
        np.testing.assert_array_equal(a.coords_px, b.coords_px)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-5)


def test_level0_decoded_once_gives_the_tiles_read_region_gives() -> None:
    slide = open_slide(CMU)
    info = describe_slide(slide, "cmu", CMU)
    side = thumbnail_side(slide.dimensions, TILE_UM / info.mpp)
    decoded = slide.read_region((0, 0), 0, slide.dimensions)
    thumb = thumbnail(slide, side)
    assert np.array_equal(np.asarray(thumb), np.asarray(thumbnail(slide, side, decoded)))
    grid = plan_tiles(
        info.width,
        info.height,
        info.mpp,
        info.level_downsamples,
        detect_tissue(thumb, slide.dimensions),
        tile_um=TILE_UM,
        tile_px=TILE_PX,
        min_tissue=MIN_TISSUE,
    )
    assert grid.read_level == 0 and len(grid) > 5
    fresh, cropped = TileReader(slide, grid), TileReader(slide, grid, decoded)
    assert torch.equal(fresh.batch(0, len(grid)), cropped.batch(0, len(grid)))


def test_resume_skips_finished_slides_and_overwrite_redoes_them(tmp_path: Path, encoder: Encoder) -> None:
    folder = slide_folder(tmp_path, CMU)
    out = tmp_path / "out"
    first = extract_cohort(find_jobs(folder), encoder, settings(), out).results[0]
    assert first.status == "done" and first.features is not None
    stamp = first.features.stat().st_mtime_ns

    again = extract_cohort(find_jobs(folder), encoder, settings(), out).results[0]
    assert (again.status, again.tiles) == ("skipped", first.tiles)
    assert first.features.stat().st_mtime_ns == stamp
    assert report_rows(out / "extraction_report.csv")["CMU-1-Small-Region"]["status"] == "skipped"

    changed = extract_cohort(find_jobs(folder), encoder, settings(min_tissue=0.9), out).results[0]
    assert changed.status == "error" and "--overwrite" in changed.error
    assert first.features.stat().st_mtime_ns == stamp

    redone = extract_cohort(
        find_jobs(folder), encoder, settings(min_tissue=0.9, overwrite=True), out
    ).results[0]
    assert redone.status == "done" and redone.tiles < first.tiles
    assert read_features(first.features).info.n_tiles == redone.tiles


class Interrupt(torch.nn.Module):
    """A model that behaves like a user pressing Ctrl-C during the forward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt


def test_ctrl_c_leaves_no_half_written_file(tmp_path: Path, encoder: Encoder) -> None:
    folder = slide_folder(tmp_path, CMU, TINY)
    out = tmp_path / "out"
    interrupting = replace(encoder, model=Interrupt())
    jobs = sorted(find_jobs(folder), key=lambda j: j.slide_id != TINY.stem)  # the tiny slide first
    with pytest.raises(KeyboardInterrupt):
        extract_cohort(jobs, interrupting, settings(workers=1), out)
    assert not list(out.rglob("*.part"))
    assert not (out / "features").exists()
    assert list(report_rows(out / "extraction_report.csv")) == [TINY.stem]  # what finished is kept


# -------------------------------------------------------------------------------- format edge cases


def test_tiny_slide_and_blank_image_give_no_tiles(tmp_path: Path, encoder: Encoder) -> None:
    folder = slide_folder(tmp_path, TINY)
    Image.new("RGB", (1200, 900), (245, 245, 242)).save(folder / "blank_glass.png")
    cohort = extract_cohort(
        find_jobs(folder), encoder, settings(assume_mpp=MicronsPerPixel(0.5)), tmp_path / "out"
    )
    results = by_id(cohort.results)
    assert results["openslide-python_small"].status == "no_tiles"
    assert "smaller than one tile" in results["openslide-python_small"].error
    assert results["blank_glass"].status == "no_tiles"
    assert "no tile has" in results["blank_glass"].error
    assert (tmp_path / "out" / "qc" / "blank_glass.png").is_file()  # look at why: the QC image is there
    assert not cohort.manifest_written


def test_plain_image_needs_and_uses_a_given_mpp(tmp_path: Path, encoder: Encoder) -> None:
    folder = tmp_path / "tma"
    folder.mkdir()
    stained_core(folder / "core_A1.png")
    missing = extract_cohort(find_jobs(folder), encoder, settings(), tmp_path / "o1").results[0]
    assert missing.status == "error" and "--assume-mpp" in missing.error
    done = extract_cohort(find_jobs(folder), encoder, settings(**CORE_SETTINGS), tmp_path / "o2").results[0]
    assert done.status == "done" and done.mpp_source == "assumed"
    assert 21 <= done.tiles <= 25  # all cells with ≥ 25 % stain: inner 9, edges 12, corners (25 %) borderline


def test_pyramid_level_choice() -> None:
    boxes_levels = (1.0, 2.0, 4.016129032258064, 8.086312118570184)
    assert best_level(boxes_levels, 1.0) == 0
    assert best_level(boxes_levels, 3.9) == 1
    assert best_level(boxes_levels, 4.0) == 2  # within the 1 % scanners' rounding
    assert best_level(boxes_levels, 100.0) == 3
    assert best_level((1.0,), 0.5) == 0  # upsampling reads level 0


def test_tissue_mask_finds_a_stained_disc() -> None:
    size = 400
    yy, xx = np.mgrid[:size, :size]
    disc = (xx - 200) ** 2 + (yy - 200) ** 2 < 120**2
    rgb = np.full((size, size, 3), 244, np.uint8)
    rgb[disc] = (180, 80, 170)
    tissue = detect_tissue(Image.fromarray(rgb), (size * 4, size * 4))
    assert tissue.downsample == (4.0, 4.0)
    assert abs(tissue.fraction - disc.mean()) < 0.01
    grid = plan_tiles(
        SlidePixels(size * 4),
        SlidePixels(size * 4),
        MicronsPerPixel(1.0),
        (1.0,),
        tissue,
        tile_um=Microns(400.0),
        tile_px=TilePixels(224),
        min_tissue=0.5,
    )
    assert len(grid) == 4  # the four central cells of the 4x4 grid of 400 px tiles


# ------------------------------------------------------------------------------------------- encoders


def test_no_weights_and_no_network_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(EncoderError, match=r"--weights PATH.*timm/resnet18\.a1_in1k.*--random-init"):
        load_encoder("resnet18", tile_px=TILE_PX)
    with pytest.raises(EncoderError, match="close names: resnet50"):
        load_encoder("resnet5", tile_px=TILE_PX, random_init=True)
    with pytest.raises(EncoderError, match="exclude each other"):
        load_encoder("resnet18", tile_px=TILE_PX, weights=CMU, random_init=True)


def test_cli_fails_at_once_without_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name, value in ENV_SET_BY_THE_CLI.items():
        monkeypatch.setenv(name, value)
    code = fedpath_main(["extract", str(DATA), "--out", str(tmp_path / "out"), "--encoder", "resnet18"])
    assert code == 2
    assert "--weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _save_resnet18_checkpoint(path: Path, seed: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = timm.create_model("resnet18", num_classes=1000).state_dict()  # with its head, as published
    save_file(state, str(path))
    return state


def test_weights_from_file_and_from_an_offline_hf_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "resnet18.safetensors"
    state = _save_resnet18_checkpoint(weights, seed=7)
    from_file = load_encoder("resnet18", tile_px=TILE_PX, weights=weights, device="cpu")
    assert from_file.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not from_file.random_init and from_file.dim == 512
    torch.testing.assert_close(from_file.model.state_dict()["conv1.weight"], state["conv1.weight"])

    # the layout huggingface_hub leaves after a download: refs/main names the snapshot holding the files
    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    shutil.copy(weights, repo / "snapshots" / revision / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    from_cache = load_encoder("resnet18", tile_px=TILE_PX, device="cpu")
    assert from_cache.weights_source == "hf-cache:timm/resnet18.a1_in1k"
    assert from_cache.weights_sha256 == from_file.weights_sha256
    tiles = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(from_cache.embed(tiles), from_file.embed(tiles))
