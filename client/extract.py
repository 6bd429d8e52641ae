"""Slides → tissue tiles → features: the site's preprocessing pipeline behind ``fedpath extract``.

Per slide: open it and settle its MPP, detect tissue on a thumbnail, plan a grid of physical-size tiles, draw
a QC thumbnail, read the tiles, encode them and write one feature file atomically. Everything up to reading runs
in worker processes (`CohortTiles`, one DataLoader for the whole cohort), a slide after the other per worker, so
the next slides are prepared and read while the encoder works on the current ones; the main process
(`CohortRun`) only encodes and writes. A crash in a slide library takes down a worker, not the run: the slides
the workers were on are retried alone, and one that crashes again is reported as an error.

Outputs under OUT: ``features/<slide_id>.h5`` (fedpath layout), ``qc/<slide_id>.png``, ``manifest.csv`` (the
slides with features) and ``extraction_report.csv`` (one row per slide). Manifest and report are rewritten
atomically after every slide, so a crash or Ctrl-C keeps what was finished. A slide whose feature file exists
with the same settings is skipped; with other settings it is an error unless ``overwrite``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import openslide
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from fedpath.client.encoders import Encoder
from fedpath.client.slides import SLIDE_SUFFIXES, SlideInfo, describe_slide, open_slide
from fedpath.client.tiling import TileGrid, plan_tiles, tile_read_level
from fedpath.client.tissue import (
    TissueMask,
    background_color,
    detect_tissue,
    thumbnail,
    thumbnail_level,
    thumbnail_side,
)
from fedpath.common.atomic import write_bytes_atomic, write_text_atomic
from fedpath.common.features import FeatureFileError, FeatureMeta, inspect_features, write_features
from fedpath.common.manifest import SlideRecord, load_manifest, write_manifest
from fedpath.common.units import Microns, MicronsPerPixel, TilePixels

Status = Literal["done", "skipped", "no_tiles", "error"]
REPORT_COLUMNS = (
    "slide_id",
    "status",
    "tiles",
    "seconds",
    "error",
    "slide",
    "features",
    "qc",
    "mpp",
    "mpp_source",
)
FOLDER_LABEL = "unknown"
"""Label of every slide found in a folder: the output manifest is valid, but labels must be filled in to train."""
PIPELINE_VERSION = "tissue=saturation-v1;grid=nonoverlap-v1;resize=bilinear"
QC_MAX_SIDE = 1024
DEFAULT_TILE_UM = Microns(256.0)
DEFAULT_TILE_PX = TilePixels(224)
TCGA_BARCODE = re.compile(r"^(TCGA-([A-Z0-9]{2})-[A-Z0-9]{4})", re.IGNORECASE)


READER_NICE = 10
"""Scheduling priority the reading processes lower themselves by (Unix `nice`). When the encoder's threads use
every core (a CPU encoder), a reader that preempts one of them stalls the others at their next barrier; at a
lower priority the readers take the cycles the encoder leaves and yield when it wakes. Measured on 2 cores,
end-to-end ÷ bare forward on a scanner-size slide (benchmarks/bench_extract.py, medians of 6 pairs each; single
pairs range 0.77-0.97 on that shared machine): 0.869 → 0.898 at nice 10, 0.835 → 0.876 at nice 19. Readers
that fall behind leave the encoder waiting, which frees its cores for them, so extraction does not starve
itself; on a machine busy with other programs the readers yield to those as well."""


def default_workers() -> int:
    """Tile-reading worker processes: one core is left to the encoder, at most 4."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class ExtractSettings:
    """How tiles are cut and encoded. tile_um: tile side in µm; tile_px: the encoder's tile side in px;
    min_tissue: least tissue fraction of a kept tile; assume_mpp: µm/px for slides without one."""

    tile_um: Microns = DEFAULT_TILE_UM
    tile_px: TilePixels = DEFAULT_TILE_PX
    min_tissue: float = 0.25
    assume_mpp: MicronsPerPixel | None = None
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    dtype: Literal["float32", "float16"] = "float32"
    overwrite: bool = False
    progress: bool = True
    reader_nice: int = READER_NICE


@dataclass(frozen=True)
class SlideJob:
    """A slide to extract; `record` is its input-manifest row, None for a slide found in a folder."""

    slide_id: str
    path: Path
    mpp: float | None = None
    record: SlideRecord | None = None


@dataclass(frozen=True)
class SlideResult:
    """One report row. status: done, skipped (finished before, same settings), no_tiles or error."""

    slide_id: str
    slide: Path
    status: Status
    tiles: int = 0
    seconds: float = 0.0
    error: str = ""
    features: Path | None = None
    qc: Path | None = None
    mpp: float | None = None
    mpp_source: str = ""


@dataclass(frozen=True)
class OutputLayout:
    """Where the outputs of a run go, under `root`."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def report(self) -> Path:
        return self.root / "extraction_report.csv"

    def features(self, slide_id: str) -> Path:
        return self.root / "features" / f"{file_stem(slide_id)}.h5"

    def qc(self, slide_id: str) -> Path:
        return self.root / "qc" / f"{file_stem(slide_id)}.png"


def file_stem(slide_id: str) -> str:
    """A slide id made safe as a file name (path separators and odd characters become '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", slide_id).lstrip(".") or "_"


# ------------------------------------------------------------------------------------------------ inputs


def jobs_from_folder(folder: Path) -> list[SlideJob]:
    """The slides directly inside `folder` (not its sub-folders: MRXS keep their data there), by name."""
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    return [SlideJob(slide_id=p.stem, path=p) for p in paths]


def jobs_from_manifest(path: Path) -> list[SlideJob]:
    """One job per row of a cohort manifest with a `slide` column (ManifestError when invalid)."""
    manifest = load_manifest(path, require="slide", check_files=False)
    return [
        SlideJob(slide_id=r.slide_id, path=r.slide, mpp=r.mpp, record=r)
        for r in manifest.slides
        if r.slide is not None
    ]


def find_jobs(source: Path) -> list[SlideJob]:
    """Jobs from a folder of slides or a manifest CSV; ValueError when empty or two slides share a file name."""
    jobs = jobs_from_folder(source) if source.is_dir() else jobs_from_manifest(source)
    if not jobs:
        raise ValueError(f"{source}: no slides found (looked for {', '.join(sorted(SLIDE_SUFFIXES))})")
    seen: dict[str, SlideJob] = {}
    for job in jobs:
        stem = file_stem(job.slide_id)
        if stem in seen:
            raise ValueError(
                f"slides {seen[stem].path} and {job.path} would both write features/{stem}.h5; "
                "give them distinct slide ids in a manifest"
            )
        seen[stem] = job
    return jobs


def manifest_record(job: SlideJob, result: SlideResult) -> SlideRecord:
    """The output-manifest row of an extracted slide: its input row (or ids derived from a TCGA file name)."""
    mpp = result.mpp if result.mpp_source in ("manifest", "assumed") else None
    if job.record is not None:
        return replace(job.record, features=result.features, slide=job.path, mpp=mpp)
    barcode = TCGA_BARCODE.match(job.slide_id)
    patient, site = (
        (barcode.group(1).upper(), barcode.group(2).upper()) if barcode else (job.slide_id, "site")
    )
    return SlideRecord(
        slide_id=job.slide_id,
        patient_id=patient,
        site=site,
        label=FOLDER_LABEL,
        label_index=0,
        features=result.features,
        slide=job.path,
        mpp=mpp,
        line=0,
    )


# ----------------------------------------------------------------------------------------------- reading

DECODED_LEVEL_MAX_PX = 32 * 1024 * 1024
"""A slide whose thumbnail and tiles both come from level 0 (small one-level slides: biopsies, TMA cores) has
level 0 decoded once for both when it has at most this many pixels (4 bytes each while it is held). Only level 0:
on coarser levels OpenSlide places regions with sub-pixel precision, so a crop would differ from read_region."""


class TileReader:
    """Cuts the tiles of `grid` from an open slide as uint8 arrays (tile_px, tile_px, 3).

    decoded: the whole of level 0 (RGBA, as read_region returns it) when it is already in memory and the tiles
    are read from level 0; they are then cropped from it, pixel for pixel what read_region returns, instead of
    decoded a second time.
    """

    def __init__(
        self, slide: openslide.AbstractSlide, grid: TileGrid, decoded: Image.Image | None = None
    ) -> None:
        self.slide = slide
        self.grid = grid
        self.decoded = decoded
        self.background = background_color(slide)

    def region(self, index: int) -> Image.Image:
        """Tile `index` as read from its pyramid level, before resizing (RGBA)."""
        x, y = (int(v) for v in self.grid.coords_px[index])
        size = self.grid.read_size
        if self.decoded is None:
            return self.slide.read_region((x, y), self.grid.read_level, (size, size))
        return self.decoded.crop((x, y, x + size, y + size))  # level 0: what read_region returns

    def tile(self, index: int) -> np.ndarray:
        region = self.region(index)
        rgb = region.convert("RGB")
        alpha = region.getchannel("A")
        lowest, _ = cast(tuple[int, int], alpha.getextrema())  # one band: (min, max)
        if lowest < 255:  # outside the scanned area: fill with the slide's background
            rgb = Image.new("RGB", region.size, self.background)
            rgb.paste(region, mask=alpha)
        if rgb.size != (self.grid.tile_px, self.grid.tile_px):
            rgb = rgb.resize((self.grid.tile_px, self.grid.tile_px), Image.Resampling.BILINEAR)
        return np.asarray(rgb)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Tiles [start, stop) as one contiguous uint8 tensor (n, 3, tile_px, tile_px)."""
        tiles = np.stack([self.tile(i) for i in range(start, stop)])
        return torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------- QC image


def draw_qc(thumb: Image.Image, tissue: TissueMask, grid: TileGrid, info: SlideInfo) -> bytes:
    """PNG of the thumbnail with the tissue mask tinted green and the kept tiles outlined in blue."""
    scale = min(1.0, QC_MAX_SIDE / max(thumb.size))
    size = (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale)))
    base = thumb.resize(size, Image.Resampling.BILINEAR)
    mask = Image.fromarray(tissue.mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    tinted = Image.blend(base, Image.new("RGB", size, (0, 170, 0)), 0.35)
    img = Image.composite(tinted, base, mask)
    draw = ImageDraw.Draw(img)
    sx, sy = size[0] / info.width, size[1] / info.height
    side = grid.size_level0
    for x, y in grid.coords_px:
        draw.rectangle((x * sx, y * sy, (x + side) * sx - 1, (y + side) * sy - 1), outline=(0, 60, 255))
    draw.text(
        (4, 4),
        f"{info.slide_id}: {len(grid)} tiles of {float(grid.tile_um):g} um, "
        f"{info.mpp:.4g} um/px ({info.mpp_source})",
        fill=(0, 0, 0),
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ one slide


def encoder_identity(encoder: Encoder) -> dict[str, str]:
    """What of the encoder changes a slide's features."""
    return {
        "encoder": encoder.name,
        "weights_sha256": encoder.weights_sha256,
        "amp": str(encoder.amp_dtype).removeprefix("torch.") if encoder.amp_dtype else "none",
    }


def settings_identity(
    encoder: dict[str, str], settings: ExtractSettings, info: SlideInfo
) -> dict[str, str | float | int]:
    """Everything that changes a slide's features; two runs with equal identities give the same file."""
    return {
        **encoder,
        "tile_um": float(settings.tile_um),
        "tile_px": int(settings.tile_px),
        "min_tissue": float(settings.min_tissue),
        "slide_mpp": float(info.mpp),
        "dtype": settings.dtype,
        "pipeline": PIPELINE_VERSION,
    }


def identity_sha256(identity: dict[str, str | float | int]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _existing(path: Path, sha: str) -> tuple[bool, int] | None:
    """(same settings?, tiles) of an existing feature file, or None when it is missing or unreadable."""
    if not path.exists():
        return None
    try:
        info = inspect_features(path)
    except FeatureFileError:
        return None  # a foreign or broken file: extracting again replaces it
    return info.attrs.get("settings_sha256") == sha, info.n_tiles


def error_message(job: SlideJob, err: BaseException) -> str:
    """One line naming the slide and the cause (our own errors name the slide already)."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    if job.slide_id in first:
        return first
    return f"slide '{job.slide_id}' ({job.path}): {type(err).__name__}: {first}"


# What a tile-reading worker sends the encoding process, in this order per slide: either Planned, then Tiles
# batches in grid order, or Ended alone. An Ended after Tiles (a tile failed to decode) cancels the slide.


@dataclass(frozen=True)
class Planned:
    """A slide ready for encoding: its tiles follow in batches."""

    index: int
    started: float
    info: SlideInfo
    identity: dict[str, str | float | int]
    grid: TileGrid
    qc_png: bytes


@dataclass(frozen=True)
class Tiles:
    """Tiles [start, start + len(tiles)) of slide `index`, uint8 (n, 3, tile_px, tile_px)."""

    index: int
    start: int
    tiles: torch.Tensor

    def pin_memory(self) -> Tiles:  # called by the DataLoader's pinning thread when the encoder is on a GPU
        return replace(self, tiles=self.tiles.pin_memory())


@dataclass(frozen=True)
class Ended:
    """A slide that ends without (further) tiles: skipped, no_tiles or error; seconds count from `started`."""

    index: int
    started: float
    result: SlideResult
    qc_png: bytes | None = None


Item = Planned | Tiles | Ended


class CohortTiles(IterableDataset[Item]):
    """The slides `order` (indices into `jobs`), each opened, planned and read in a worker process.

    Worker k of n takes order[k::n], one slide after the other, so the preparation of a slide (thumbnail,
    tissue, grid, QC image) overlaps the encoding of the slides before it, and worker processes live for the
    whole cohort. Every failure of a slide is sent as an `Ended` error; the worker goes on with its next slide.
    """

    def __init__(
        self,
        jobs: Sequence[SlideJob],
        order: Sequence[int],
        encoder: dict[str, str],
        settings: ExtractSettings,
        layout: OutputLayout,
    ) -> None:
        self.jobs = list(jobs)
        self.order = list(order)
        self.encoder = encoder
        self.settings = settings
        self.layout = layout

    def __iter__(self) -> Iterator[Item]:
        worker = get_worker_info()
        k, n = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index in self.order[k::n]:
            yield from self.slide_items(index)

    def slide_items(self, index: int) -> Iterator[Item]:
        job, settings = self.jobs[index], self.settings
        started = time.monotonic()
        base = SlideResult(slide_id=job.slide_id, slide=job.path, status="error")
        qc_png: bytes | None = None
        slide: openslide.AbstractSlide | None = None
        try:
            slide = open_slide(job.path)
            info = describe_slide(
                slide, job.slide_id, job.path, manifest_mpp=job.mpp, assume_mpp=settings.assume_mpp
            )
            base = replace(base, mpp=float(info.mpp), mpp_source=info.mpp_source)
            identity = settings_identity(self.encoder, settings, info)
            out = self.layout.features(job.slide_id)
            existing = None if settings.overwrite else _existing(out, identity_sha256(identity))
            if existing is not None:
                same, n = existing
                result = (
                    replace(base, status="skipped", tiles=n, features=out, qc=self.layout.qc(job.slide_id))
                    if same
                    else replace(
                        base,
                        error=(
                            f"slide '{job.slide_id}': {out} exists with other extraction settings; pass "
                            "--overwrite to replace it, or choose another --out"
                        ),
                    )
                )
                yield Ended(index, started, result)
                return
            grid, decoded, qc_png, tissue_fraction = self.plan(slide, info)
            if len(grid) == 0:
                why = (
                    "the slide is smaller than one tile"
                    if min(info.width, info.height) < grid.size_level0
                    else f"no tile has {settings.min_tissue:.0%} tissue (tissue covers {tissue_fraction:.1%})"
                )
                message = f"slide '{job.slide_id}': no tiles: {why}; see {self.layout.qc(job.slide_id)}"
                yield Ended(index, started, replace(base, status="no_tiles", error=message), qc_png)
                return
            yield Planned(index, started, info, identity, grid, qc_png)
            reader = TileReader(slide, grid, decoded)
            for start in range(0, len(grid), settings.batch_size):
                yield Tiles(index, start, reader.batch(start, min(start + settings.batch_size, len(grid))))
        except Exception as err:  # recorded in the report; the cohort goes on
            yield Ended(index, started, replace(base, error=error_message(job, err)), qc_png)
        finally:
            if slide is not None:
                slide.close()

    def plan(
        self, slide: openslide.AbstractSlide, info: SlideInfo
    ) -> tuple[TileGrid, Image.Image | None, bytes, float]:
        """(grid, level 0 when decoded whole for thumbnail and tiles alike, QC PNG, tissue fraction of the
        slide): tissue on a thumbnail, then the tile grid (read from `read_level`: plan_tiles uses the same
        rule)."""
        settings = self.settings
        side = thumbnail_side(slide.dimensions, float(settings.tile_um / info.mpp))
        level = thumbnail_level(slide, side)
        read_level = tile_read_level(info.level_downsamples, info.mpp, settings.tile_um, settings.tile_px)
        level_w, level_h = slide.level_dimensions[level]
        decoded = None
        if level == read_level == 0 and level_w * level_h <= DECODED_LEVEL_MAX_PX:
            decoded = slide.read_region((0, 0), level, (level_w, level_h))  # once, for thumbnail and tiles
        thumb = thumbnail(slide, side, decoded)
        tissue = detect_tissue(thumb, slide.dimensions)
        grid = plan_tiles(
            info.width,
            info.height,
            info.mpp,
            info.level_downsamples,
            tissue,
            tile_um=settings.tile_um,
            tile_px=settings.tile_px,
            min_tissue=settings.min_tissue,
        )
        return grid, decoded, draw_qc(thumb, tissue, grid, info), tissue.fraction


def _pass_through(item: Any) -> Any:
    """collate_fn for items the dataset has batched already (torch types it for lists of samples)."""
    return item


def _lower_priority(nice: int, worker_id: int) -> None:
    """worker_init_fn: lower this reading process's priority by `nice` (where the OS has `nice`)."""
    if nice > 0 and hasattr(os, "nice"):
        os.nice(nice)


def _loader(dataset: CohortTiles, workers: int, pin_memory: bool, nice: int) -> DataLoader[Item]:
    return DataLoader(
        dataset,
        batch_size=None,
        collate_fn=_pass_through,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
        in_order=False,  # take whichever worker is ready: one slow slide does not stall the others
        worker_init_fn=functools.partial(_lower_priority, nice),
    )


WORKER_CRASH = re.compile(
    r"DataLoader worker \(pids?(?:\(s\))? [^)]*\) (?:exited unexpectedly|is killed by signal)"
)
"""torch's messages when a DataLoader worker process dies."""


class WorkerCrash(Exception):
    """A tile-reading process died (a crash inside a slide library)."""


# --------------------------------------------------------------------------------------------- the cohort


def _relative(path: Path | None, base: Path) -> str:
    if path is None:
        return ""
    try:
        return os.path.relpath(path.resolve(), base.resolve())
    except ValueError:
        return str(path)


def write_report(path: Path, results: Sequence[SlideResult]) -> None:
    """The extraction report CSV (REPORT_COLUMNS), written atomically; paths relative to its folder."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(REPORT_COLUMNS)
    for r in results:
        writer.writerow(
            [
                r.slide_id,
                r.status,
                r.tiles,
                f"{r.seconds:.2f}",
                r.error,
                _relative(r.slide, path.parent),
                _relative(r.features, path.parent),
                _relative(r.qc, path.parent),
                "" if r.mpp is None else f"{r.mpp:.6g}",
                r.mpp_source,
            ]
        )
    write_text_atomic(path, buf.getvalue())


@dataclass(frozen=True)
class CohortResult:
    results: list[SlideResult]
    layout: OutputLayout
    manifest_written: bool

    def count(self, status: Status) -> int:
        return sum(r.status == status for r in self.results)


@dataclass
class _Open:
    """A slide being encoded."""

    plan: Planned
    features: np.ndarray
    done: int = 0


class CohortRun:
    """The encoding side of an extraction: feature files, QC images, report and manifest, in the main process."""

    def __init__(
        self, jobs: Sequence[SlideJob], encoder: Encoder, settings: ExtractSettings, layout: OutputLayout
    ) -> None:
        self.jobs = list(jobs)
        self.encoder = encoder
        self.settings = settings
        self.layout = layout
        self.results: dict[int, SlideResult] = {}
        self.open: dict[int, _Open] = {}
        self.slides_bar = tqdm(
            total=len(jobs), desc="slides", unit="slide", position=0, disable=not settings.progress
        )
        self.tiles_bar = tqdm(unit="tile", leave=False, position=1, disable=not settings.progress)
        self.bar_slide = -1

    def run(self) -> None:
        """Extract every job; after a reader crash, the slides it may have been reading are retried alone."""
        pending = list(range(len(self.jobs)))
        workers = self.settings.workers
        try:
            while pending:
                try:
                    self.consume(pending, workers)
                except WorkerCrash as crash:
                    suspects = self.in_flight(pending, workers)
                    for index in suspects:
                        try:
                            self.consume([index], 1)
                        except WorkerCrash:
                            self.end_with_crash(index, crash)
                pending = [i for i in pending if i not in self.results]
        finally:
            self.tiles_bar.close()
            self.slides_bar.close()

    def in_flight(self, pending: list[int], workers: int) -> list[int]:
        """The slide each worker was on when one died: its first unfinished slide of its share."""
        return [
            share[0]
            for k in range(max(1, workers))
            if (share := [i for i in pending[k :: max(1, workers)] if i not in self.results])
        ]

    def consume(self, order: list[int], workers: int) -> None:
        dataset = CohortTiles(self.jobs, order, encoder_identity(self.encoder), self.settings, self.layout)
        loader = _loader(
            dataset, workers, pin_memory=self.encoder.device.type == "cuda", nice=self.settings.reader_nice
        )
        try:
            for item in loader:
                if isinstance(item, Planned):
                    self.start(item)
                elif isinstance(item, Tiles):
                    self.encode(item)
                else:
                    self.end(item)
        except RuntimeError as err:
            if WORKER_CRASH.search(str(err)):
                self.open.clear()  # what the dead worker had sent of its slide is incomplete
                raise WorkerCrash(str(err)) from err
            raise

    def start(self, plan: Planned) -> None:
        self.open[plan.index] = _Open(plan, np.empty((len(plan.grid), self.encoder.dim), dtype=np.float32))
        write_bytes_atomic(self.layout.qc(plan.info.slide_id), plan.qc_png)

    def encode(self, batch: Tiles) -> None:
        slide = self.open[batch.index]
        n = len(batch.tiles)
        slide.features[batch.start : batch.start + n] = self.encoder.embed(batch.tiles).numpy()
        slide.done += n
        self.show_progress(batch.index, slide)
        if slide.done == len(slide.plan.grid):
            self.finish(self.open.pop(batch.index))

    def show_progress(self, index: int, slide: _Open) -> None:
        if self.bar_slide != index:
            self.bar_slide = index
            self.tiles_bar.reset(total=len(slide.plan.grid))
            self.tiles_bar.set_description_str(slide.plan.info.slide_id[:24])
        self.tiles_bar.n = slide.done
        self.tiles_bar.refresh()

    def finish(self, slide: _Open) -> None:
        plan, settings = slide.plan, self.settings
        job, info, grid = self.jobs[plan.index], plan.info, plan.grid
        out = self.layout.features(job.slide_id)
        meta = FeatureMeta(
            slide_id=job.slide_id,
            encoder=self.encoder.name,
            weights_sha256=self.encoder.weights_sha256,
            tile_size_px=int(settings.tile_px),
            tile_size_um=float(settings.tile_um),
            slide_mpp=float(info.mpp),
            mpp_source=info.mpp_source,
            random_init=self.encoder.random_init,
            extra={
                "settings_sha256": identity_sha256(plan.identity),
                "settings": json.dumps(plan.identity, sort_keys=True),
                "weights_source": self.encoder.weights_source,
                "read_level": grid.read_level,
                "tile_size_level0_px": float(grid.size_level0),
                "slide_width_px": int(info.width),
                "slide_height_px": int(info.height),
            },
        )
        write_features(out, slide.features, grid.coords_px, meta, dtype=settings.dtype)
        result = SlideResult(
            slide_id=job.slide_id,
            slide=job.path,
            status="done",
            tiles=len(grid),
            features=out,
            qc=self.layout.qc(job.slide_id),
            mpp=float(info.mpp),
            mpp_source=info.mpp_source,
        )
        self.record(plan.index, plan.started, result)

    def end(self, ended: Ended) -> None:
        self.open.pop(ended.index, None)  # a slide cancelled after some of its tiles were encoded
        result = ended.result
        if ended.qc_png is not None:
            qc = self.layout.qc(result.slide_id)
            write_bytes_atomic(qc, ended.qc_png)
            result = replace(result, qc=qc)
        self.record(ended.index, ended.started, result)

    def end_with_crash(self, index: int, crash: WorkerCrash) -> None:
        job = self.jobs[index]
        message = (
            f"slide '{job.slide_id}' ({job.path}): the slide reader crashed on this slide, twice ({crash}); "
            "the file may be corrupt or need a newer OpenSlide"
        )
        result = SlideResult(slide_id=job.slide_id, slide=job.path, status="error", error=message)
        self.record(index, time.monotonic(), result)

    def record(self, index: int, started: float, result: SlideResult) -> None:
        """Keep a slide's result and rewrite the report and manifest (job order) at once."""
        self.results[index] = replace(result, seconds=time.monotonic() - started)
        done = sorted(self.results)
        records = [
            manifest_record(self.jobs[i], self.results[i])
            for i in done
            if self.results[i].features is not None
        ]
        if records:
            write_manifest(self.layout.manifest, records)
        write_report(self.layout.report, [self.results[i] for i in done])
        self.slides_bar.set_postfix_str(result.slide_id[:32])
        self.slides_bar.update()


def extract_cohort(
    jobs: Sequence[SlideJob], encoder: Encoder, settings: ExtractSettings, out_dir: Path
) -> CohortResult:
    """Extract every job; report and manifest (in job order) are rewritten after each slide."""
    layout = OutputLayout(Path(out_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    run = CohortRun(jobs, encoder, settings, layout)
    run.run()
    results = [run.results[i] for i in range(len(jobs))]
    return CohortResult(
        results=results, layout=layout, manifest_written=any(r.features is not None for r in results)
    )
