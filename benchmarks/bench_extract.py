"""End-to-end extraction throughput against the encoder's bare forward pass, in one process.

    python benchmarks/bench_extract.py [--cohort test|large|both] [--encoder resnet18] [--batch-size 32]
                                       [--tile-um 256 --tile-px 224 | --tile-mpp 0.5] [--repeats 5]

Ratio = tiles/s from slides to feature files (``extract_cohort``: open, tissue mask, tiling, QC image, reading in
worker processes, encoding, atomic writes, report) ÷ tiles/s of ``model(x)`` on ready tensors of the same shape
and batch size on the same device. Each repeat runs the whole cohort, then a bare forward pass over as many
tiles, so load from other processes hits both sides of a pair alike; the median ratio of the pairs is reported.
Random-init weights: speed does not depend on the weight values. Default tiles: fedpath's (256 µm into 224 px).

Cohorts:
- ``test``: the two real slides of tests/data/wsi (CMU-1-Small-Region and the TCGA slide at --assume-mpp), each
  four times under other names: 8 slides of 11-37 tiles, where the fixed cost of each slide weighs most.
- ``large``: two slides of the size a hospital scans (16,384 px square at 0.5 µm/px, ~8 x 8 mm of tissue, ~500
  tiles each), built by this script from the real pixels of those two slides (mirrored to fill the square) and
  written the way scanners write them: a tiled pyramidal TIFF with 256 px JPEG tiles and levels 1, 4, 16, 64,
  read through OpenSlide like any slide. Needs tifffile and imagecodecs (dev extras).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedpath.client.extract_cli import prepare_environment

if TYPE_CHECKING:
    from fedpath.client.encoders import Encoder
    from fedpath.client.extract import ExtractSettings, SlideJob

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "wsi"
SLIDES = ("CMU-1-Small-Region.svs", "tcga-cr-7395-01a-01-ts1.svs")
TEST_COPIES = 4
LARGE_SIDE = 16384
LARGE_MPP = 0.5
LARGE_DOWNSAMPLES = (1, 4, 16, 64)


def test_cohort(folder: Path) -> list[SlideJob]:
    """The real test slides, TEST_COPIES times each under distinct names (links to the same files)."""
    from fedpath.client.extract import SlideJob

    jobs = []
    for copy in range(TEST_COPIES):
        for name in SLIDES:
            link = folder / f"{Path(name).stem}-{copy}{Path(name).suffix}"
            link.symlink_to(DATA / name)
            jobs.append(SlideJob(slide_id=link.stem, path=link))
    return jobs


def large_slide(source: Path, out: Path) -> Path:
    """A LARGE_SIDE² px pyramidal JPEG-tiled TIFF at LARGE_MPP µm/px filled with `source`'s level-0 pixels.

    The source is mirrored into a 2 x 2 block and the block repeated, so tissue runs across the seams; its
    MPP is taken as LARGE_MPP (both sources are 20x scans, the TCGA one without metadata)."""
    import numpy as np
    import openslide
    import tifffile
    from PIL import Image

    with openslide.OpenSlide(str(source)) as slide:
        pixels = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    block = np.concatenate(
        [
            np.concatenate([pixels, pixels[:, ::-1]], axis=1),
            np.concatenate([pixels[::-1], pixels[::-1, ::-1]], axis=1),
        ],
        axis=0,
    )
    reps = (LARGE_SIDE // block.shape[0] + 1, LARGE_SIDE // block.shape[1] + 1, 1)
    level0 = np.ascontiguousarray(np.tile(block, reps)[:LARGE_SIDE, :LARGE_SIDE])
    with tifffile.TiffWriter(out) as tif:
        for i, ds in enumerate(LARGE_DOWNSAMPLES):
            level = level0 if ds == 1 else np.asarray(Image.fromarray(level0).reduce(ds))
            px_per_cm = 1e4 / (LARGE_MPP * ds)
            tif.write(
                level,
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": 85},
                photometric="rgb",
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
            )
    return out


def large_cohort(folder: Path) -> list[SlideJob]:
    from fedpath.client.extract import SlideJob

    jobs = []
    for name in SLIDES:
        path = large_slide(DATA / name, folder / f"large-{Path(name).stem}.tiff")
        jobs.append(SlideJob(slide_id=path.stem, path=path))
    return jobs


def bare_forward(encoder: Encoder, n_tiles: int, batch_size: int, tile_px: int) -> float:
    """Seconds of the model's forward pass alone on `n_tiles` random tiles, in batches of `batch_size`."""
    import torch

    x = torch.randn(batch_size, 3, tile_px, tile_px, device=encoder.device)
    with torch.inference_mode():
        encoder.model(x[:2])  # warm-up
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        done = 0
        while done < n_tiles:
            n = min(batch_size, n_tiles - done)
            encoder.model(x[:n]).float().cpu()
            done += n
    return time.perf_counter() - start


def end_to_end(jobs: list[SlideJob], encoder: Encoder, settings: ExtractSettings) -> tuple[float, int]:
    """(seconds, tiles) of a full extraction of `jobs` into a fresh temporary folder."""
    from fedpath.client.extract import extract_cohort

    with tempfile.TemporaryDirectory(prefix="fedpath-bench-") as tmp:
        start = time.perf_counter()
        cohort = extract_cohort(jobs, encoder, settings, Path(tmp))
        seconds = time.perf_counter() - start
    bad = [r.error for r in cohort.results if r.status != "done"]
    if bad:
        sys.exit(f"benchmark extraction failed: {bad}")
    return seconds, sum(r.tiles for r in cohort.results)


@dataclass(frozen=True)
class Pairs:
    tiles: int
    e2e_s: list[float]
    bare_s: list[float]

    @property
    def ratios(self) -> list[float]:
        return [b / e for b, e in zip(self.bare_s, self.e2e_s, strict=True)]


def measure(
    jobs: list[SlideJob], encoder: Encoder, settings: ExtractSettings, repeats: int, tile_px: int
) -> Pairs:
    end_to_end(jobs, encoder, settings)  # warm-up: file cache, allocator
    e2e, bare = [], []
    tiles = 0
    for _ in range(repeats):
        seconds, tiles = end_to_end(jobs, encoder, settings)
        e2e.append(seconds)
        bare.append(bare_forward(encoder, tiles, settings.batch_size, tile_px))
    return Pairs(tiles=tiles, e2e_s=e2e, bare_s=bare)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", choices=("test", "large", "both"), default="both")
    p.add_argument("--encoder", default="resnet18", help="timm model (random init)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--tile-um", type=float, default=256.0, help="tile side in µm (fedpath's default)")
    p.add_argument(
        "--tile-mpp", type=float, help="µm/px of a tile instead of --tile-um (0.5: the peers' table)"
    )
    p.add_argument("--assume-mpp", type=float, default=0.5, help="MPP for the TCGA slide, which has none")
    p.add_argument("--workers", type=int, help="tile-reading processes (default: as fedpath extract)")
    p.add_argument(
        "--reader-nice", type=int, help="priority drop of the readers (default: as fedpath extract)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    prepare_environment()  # as `fedpath extract` does, before torch loads
    import torch

    from fedpath.client.encoders import load_encoder
    from fedpath.client.extract import ExtractSettings, default_workers
    from fedpath.common.units import Microns, MicronsPerPixel, TilePixels

    workers = default_workers() if args.workers is None else args.workers
    tile_um = args.tile_mpp * args.tile_px if args.tile_mpp else args.tile_um
    encoder = load_encoder(
        args.encoder, tile_px=TilePixels(args.tile_px), random_init=True, device=args.device
    )
    settings = ExtractSettings(
        tile_um=Microns(tile_um),
        tile_px=TilePixels(args.tile_px),
        assume_mpp=MicronsPerPixel(args.assume_mpp),
        batch_size=args.batch_size,
        workers=workers,
        overwrite=True,
        progress=False,
    )
    if args.reader_nice is not None:
        settings = replace(settings, reader_nice=args.reader_nice)
    print(
        f"encoder {args.encoder} (random init) on {encoder.device}, batch {args.batch_size}, {tile_um:g} µm → "
        f"{args.tile_px} px tiles, {workers} reading workers at nice +{settings.reader_nice}, {torch.get_num_threads()} torch threads, "
        f"{args.repeats} repeats"
    )
    with tempfile.TemporaryDirectory(prefix="fedpath-bench-slides-") as tmp:
        cohorts = {}
        if args.cohort in ("test", "both"):
            cohorts["test"] = test_cohort(Path(tmp))
        if args.cohort in ("large", "both"):
            start = time.perf_counter()
            cohorts["large"] = large_cohort(Path(tmp))
            print(f"built {len(cohorts['large'])} large slides in {time.perf_counter() - start:.0f} s")
        for name, jobs in cohorts.items():
            pairs = measure(jobs, encoder, settings, args.repeats, args.tile_px)
            e2e_rate = statistics.median(pairs.tiles / s for s in pairs.e2e_s)
            bare_rate = statistics.median(pairs.tiles / s for s in pairs.bare_s)
            ratios = pairs.ratios
            print(
                f"{name} cohort: {len(jobs)} slides, {pairs.tiles} tiles; bare forward {bare_rate:.1f} tiles/s, "
                f"end to end {e2e_rate:.1f} tiles/s; ratio (median of pairs) {statistics.median(ratios):.3f} "
                f"[{', '.join(f'{r:.3f}' for r in ratios)}]",
                flush=True,
            )


if __name__ == "__main__":
    main()
