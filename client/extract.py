"""Slides → tissue tiles → features: the site's preprocessing pipeline behind ``fedpath extract``.

Per slide: open it and settle its MPP, detect tissue on a thumbnail, plan a grid of physical-size tiles, draw
a QC thumbnail, then read the tiles in DataLoader worker processes (so reading overlaps with the encoder, and a
crash in a slide library takes down a worker, not the run) and write one feature file atomically.

Outputs under OUT: ``features/<slide_id>.h5`` (fedpath layout), ``qc/<slide_id>.png``, ``manifest.csv`` (the
slides with features) and ``extraction_report.csv`` (one row per slide). Manifest and report are rewritten
atomically after every slide, so a crash or Ctrl-C keeps what was finished. A slide whose feature file exists
with the same settings is skipped; with other settings it is an error unless ``overwrite``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, cast

import numpy as np
import openslide
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fedpath.client.encoders import Encoder
from fedpath.client.slides import SLIDE_SUFFIXES, SlideInfo, describe_slide, open_slide
from fedpath.client.tiling import TileGrid, plan_tiles
from fedpath.client.tissue import TissueMask, background_color, detect_tissue, thumbnail, thumbnail_side
from fedpath.common.atomic import atomic_path, write_text_atomic
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


class TileDataset(Dataset[torch.Tensor]):
    """The tiles of one slide as uint8 tensors (3, tile_px, tile_px); each worker opens its own handle."""

    def __init__(self, path: Path, grid: TileGrid) -> None:
        self.path = path
        self.coords = grid.coords_px
        self.level = grid.read_level
        self.read_size = grid.read_size
        self.tile_px = int(grid.tile_px)
        self._slide: openslide.AbstractSlide | None = None
        self._background = (255, 255, 255)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_slide": None}  # handles do not cross processes

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._slide is None:
            self._slide = open_slide(self.path)
            self._background = background_color(self._slide)
        x, y = (int(v) for v in self.coords[index])
        region = self._slide.read_region((x, y), self.level, (self.read_size, self.read_size))
        rgb = region.convert("RGB")
        alpha = region.getchannel("A")
        lowest, _ = cast(tuple[int, int], alpha.getextrema())  # one band: (min, max)
        if lowest < 255:  # outside the scanned area: fill with the slide's background
            rgb = Image.new("RGB", region.size, self._background)
            rgb.paste(region, mask=alpha)
        if self.read_size != self.tile_px:
            rgb = rgb.resize((self.tile_px, self.tile_px), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def embed_tiles(
    path: Path, grid: TileGrid, encoder: Encoder, settings: ExtractSettings, label: str
) -> np.ndarray:
    """Features (N, dim) float32 of the tiles of `grid` on the slide at `path`, in grid order."""
    dataset = TileDataset(path, grid)
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if settings.workers > 0 else None,
    )
    out = np.empty((len(grid), encoder.dim), dtype=np.float32)
    done = 0
    with tqdm(
        total=len(grid), desc=label, unit="tile", leave=False, position=1, disable=not settings.progress
    ) as bar:
        try:
            for batch in loader:
                out[done : done + len(batch)] = encoder.embed(batch).numpy()
                done += len(batch)
                bar.update(len(batch))
        finally:
            dataset.close()
    return out


# ----------------------------------------------------------------------------------------------- QC image


def draw_qc(thumb: Image.Image, tissue: TissueMask, grid: TileGrid, info: SlideInfo, path: Path) -> Path:
    """Save a PNG of the thumbnail with the tissue mask tinted green and the kept tiles outlined in blue."""
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
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=1)
    return path


# ------------------------------------------------------------------------------------------------ one slide


def settings_identity(
    encoder: Encoder, settings: ExtractSettings, info: SlideInfo
) -> dict[str, str | float | int]:
    """Everything that changes a slide's features; two runs with equal identities give the same file."""
    return {
        "encoder": encoder.name,
        "weights_sha256": encoder.weights_sha256,
        "amp": str(encoder.amp_dtype).removeprefix("torch.") if encoder.amp_dtype else "none",
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


def extract_slide(
    job: SlideJob, encoder: Encoder, settings: ExtractSettings, layout: OutputLayout
) -> SlideResult:
    """Extract one slide; every failure is returned as an `error` result naming the slide, never raised."""
    start = time.perf_counter()
    base = SlideResult(slide_id=job.slide_id, slide=job.path, status="error")
    slide: openslide.AbstractSlide | None = None
    try:
        slide = open_slide(job.path)
        info = describe_slide(
            slide, job.slide_id, job.path, manifest_mpp=job.mpp, assume_mpp=settings.assume_mpp
        )
        base = replace(base, mpp=float(info.mpp), mpp_source=info.mpp_source)
        identity = settings_identity(encoder, settings, info)
        sha = identity_sha256(identity)
        out = layout.features(job.slide_id)
        existing = None if settings.overwrite else _existing(out, sha)
        if existing is not None:
            same, n = existing
            if same:
                return replace(
                    base,
                    status="skipped",
                    tiles=n,
                    features=out,
                    qc=layout.qc(job.slide_id),
                    seconds=time.perf_counter() - start,
                )
            return replace(
                base,
                seconds=time.perf_counter() - start,
                error=(
                    f"slide '{job.slide_id}': {out} exists with other extraction settings; pass --overwrite to "
                    "replace it, or choose another --out"
                ),
            )
        thumb = thumbnail(slide, thumbnail_side(slide.dimensions, float(settings.tile_um / info.mpp)))
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
        qc = draw_qc(thumb, tissue, grid, info, layout.qc(job.slide_id))
        if len(grid) == 0:
            why = (
                "the slide is smaller than one tile"
                if min(info.width, info.height) < grid.size_level0
                else f"no tile has {settings.min_tissue:.0%} tissue (tissue covers {tissue.fraction:.1%})"
            )
            return replace(
                base,
                status="no_tiles",
                qc=qc,
                seconds=time.perf_counter() - start,
                error=f"slide '{job.slide_id}': no tiles: {why}; see {qc}",
            )
        features = embed_tiles(job.path, grid, encoder, settings, label=job.slide_id[:24])
        meta = FeatureMeta(
            slide_id=job.slide_id,
            encoder=encoder.name,
            weights_sha256=encoder.weights_sha256,
            tile_size_px=int(settings.tile_px),
            tile_size_um=float(settings.tile_um),
            slide_mpp=float(info.mpp),
            mpp_source=info.mpp_source,
            random_init=encoder.random_init,
            extra={
                "settings_sha256": sha,
                "settings": json.dumps(identity, sort_keys=True),
                "weights_source": encoder.weights_source,
                "read_level": grid.read_level,
                "tile_size_level0_px": float(grid.size_level0),
                "slide_width_px": int(info.width),
                "slide_height_px": int(info.height),
            },
        )
        write_features(out, features, grid.coords_px, meta, dtype=settings.dtype)
        return replace(
            base, status="done", tiles=len(grid), features=out, qc=qc, seconds=time.perf_counter() - start
        )
    except Exception as err:  # recorded in the report; the cohort goes on
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
        if "Traceback" in str(err):  # raised in a DataLoader worker: the last line is the original error
            message = f"slide '{job.slide_id}' ({job.path}): {lines[-1]}"
        elif job.slide_id in lines[0]:  # our own errors already name the slide
            message = lines[0]
        else:
            message = f"slide '{job.slide_id}' ({job.path}): {type(err).__name__}: {lines[0]}"
        return replace(base, error=message, seconds=time.perf_counter() - start)
    finally:
        if slide is not None:
            slide.close()


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


def extract_cohort(
    jobs: Sequence[SlideJob], encoder: Encoder, settings: ExtractSettings, out_dir: Path
) -> CohortResult:
    """Extract every job in order; report and manifest are rewritten after each slide."""
    layout = OutputLayout(Path(out_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    results: list[SlideResult] = []
    records: list[SlideRecord] = []
    with tqdm(total=len(jobs), desc="slides", unit="slide", position=0, disable=not settings.progress) as bar:
        for job in jobs:
            bar.set_postfix_str(job.slide_id[:32])
            result = extract_slide(job, encoder, settings, layout)
            results.append(result)
            if result.features is not None:
                records.append(manifest_record(job, result))
                write_manifest(layout.manifest, records)
            write_report(layout.report, results)
            bar.update()
    return CohortResult(results=results, layout=layout, manifest_written=bool(records))
