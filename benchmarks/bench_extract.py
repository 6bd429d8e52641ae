"""End-to-end extraction throughput against the encoder's bare forward pass, in one process.

    python benchmarks/bench_extract.py [--encoder resnet18] [--batch-size 32] [--tile-mpp 0.5] [--repeats 3]

Ratio = tiles/s from slide to feature file (``extract_cohort``: open, tissue mask, tiling, QC image, reading in
DataLoader workers, encoding, atomic write) ÷ tiles/s of ``model(x)`` on ready tensors of the same shape and
batch size on the same device. Baseline and pipeline alternate slide by slide in the same process, ``--repeats`` times, and
the median ratio is reported: a noisy machine affects both sides of a pair alike. Random-init weights: speed does not
depend on the weight values. Slides: the real ones in tests/data/wsi (the TCGA slide at --assume-mpp).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedpath.client.extract_cli import prepare_environment

if TYPE_CHECKING:
    from fedpath.client.encoders import Encoder
    from fedpath.client.extract import ExtractSettings, SlideJob

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "wsi"
SLIDES = ("CMU-1-Small-Region.svs", "tcga-cr-7395-01a-01-ts1.svs")


def bare_forward(encoder: Encoder, n_tiles: int, batch_size: int, tile_px: int) -> float:
    """Tiles/s of the model's forward pass alone on `n_tiles` normalised tiles, in batches of `batch_size`."""
    import torch

    x = torch.randn(batch_size, 3, tile_px, tile_px, device=encoder.device)
    with torch.inference_mode():
        encoder.model(x[:2])  # warm-up
        start = time.perf_counter()
        done = 0
        while done < n_tiles:
            n = min(batch_size, n_tiles - done)
            encoder.model(x[:n]).float().cpu()
            done += n
    return n_tiles / (time.perf_counter() - start)


def end_to_end(jobs: list[SlideJob], encoder: Encoder, settings: ExtractSettings) -> tuple[float, int]:
    """(tiles/s, tiles) of a full extraction of `jobs` into a fresh temporary folder."""
    from fedpath.client.extract import extract_cohort

    with tempfile.TemporaryDirectory(prefix="fedpath-bench-") as tmp:
        start = time.perf_counter()
        cohort = extract_cohort(jobs, encoder, settings, Path(tmp))
        seconds = time.perf_counter() - start
    bad = [r.error for r in cohort.results if r.status != "done"]
    if bad:
        sys.exit(f"benchmark extraction failed: {bad}")
    tiles = sum(r.tiles for r in cohort.results)
    return tiles / seconds, tiles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="resnet18", help="timm model (random init)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument(
        "--tile-mpp", type=float, default=0.5, help="µm/px of a tile (0.5 = 20x, as the peers' table)"
    )
    p.add_argument("--assume-mpp", type=float, default=0.5, help="MPP for the TCGA slide, which has none")
    p.add_argument("--workers", type=int, help="tile-reading processes (default: as fedpath extract)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    prepare_environment()  # as `fedpath extract` does, before torch loads
    import torch

    from fedpath.client.encoders import load_encoder
    from fedpath.client.extract import ExtractSettings, SlideJob, default_workers
    from fedpath.common.units import Microns, MicronsPerPixel, TilePixels

    if args.workers is None:
        args.workers = default_workers()

    encoder = load_encoder(
        args.encoder, tile_px=TilePixels(args.tile_px), random_init=True, device=args.device
    )
    settings = ExtractSettings(
        tile_um=Microns(args.tile_mpp * args.tile_px),
        tile_px=TilePixels(args.tile_px),
        assume_mpp=MicronsPerPixel(args.assume_mpp),
        batch_size=args.batch_size,
        workers=args.workers,
        overwrite=True,
        progress=False,
    )
    jobs = [SlideJob(slide_id=Path(name).stem, path=DATA / name) for name in SLIDES]
    end_to_end(jobs, encoder, settings)  # warm-up: file cache, allocator, worker start
    # each slide's run is paired with a bare forward pass over as many tiles right after it, so load from
    # other processes hits both sides of a pair alike; the ratio of a repeat is Σ bare time / Σ pipeline time
    ratios, bares, e2es = [], [], []
    for _ in range(args.repeats):
        e2e_s = bare_s = 0.0
        tiles = 0
        for job in jobs:
            rate, n = end_to_end([job], encoder, settings)
            e2e_s += n / rate
            bare_s += n / bare_forward(encoder, n, args.batch_size, args.tile_px)
            tiles += n
        e2es.append(tiles / e2e_s)
        bares.append(tiles / bare_s)
        ratios.append(bare_s / e2e_s)
    print(
        f"encoder {args.encoder} (random init) on {encoder.device}, batch {args.batch_size}, "
        f"{args.tile_px} px tiles at {args.tile_mpp} µm/px, {args.workers} workers, "
        f"{torch.get_num_threads()} torch threads, {tiles} tiles from {len(jobs)} slides, {args.repeats} repeats"
    )
    print(f"bare forward: {statistics.median(bares):.1f} tiles/s")
    print(f"end to end:   {statistics.median(e2es):.1f} tiles/s")
    print(
        f"ratio (median of paired runs): {statistics.median(ratios):.3f}  [{', '.join(f'{r:.3f}' for r in ratios)}]"
    )


if __name__ == "__main__":
    main()
