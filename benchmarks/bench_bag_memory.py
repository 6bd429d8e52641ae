"""Peak memory of one training epoch: a 1,000-slide cohort against a 100-slide cohort of the same bag sizes.

Target (foundation issue): peak RSS(1,000 slides) ≤ 1.2 × peak RSS(100 slides), i.e. bags are read from
their feature files on demand and the cohort is never held in memory.

The 100 slides are a seeded random subset of the 1,000, so both share one bag-size distribution. Each epoch
runs in a fresh process (peak RSS only grows within a process), alternating 100 / 1,000 for `--repeats`.

    python benchmarks/bench_bag_memory.py [--dim 768] [--repeats 2] [--workers 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _one_epoch(manifest_path: str, n_slides: int, workers: int, queue: Any) -> None:
    import numpy as np
    import torch

    from fedpath.client.training import TrainConfig, train_epochs
    from fedpath.common.bags import bags_from_manifest
    from fedpath.common.features import inspect_features
    from fedpath.common.manifest import load_manifest

    torch.set_num_threads(1)
    manifest = load_manifest(manifest_path)
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(len(manifest.slides), size=n_slides, replace=False))
    slides = [manifest.slides[i] for i in chosen]
    bags = bags_from_manifest(manifest.for_patients({s.patient_id for s in slides}), by="slide")
    bags = [b for b in bags if b.bag_id in {s.slide_id for s in slides}]
    assert slides[0].features is not None
    dim = inspect_features(slides[0].features).dim
    from fedpath.common.mil import create_mil

    model = create_mil("abmil", in_dim=dim, num_classes=2)
    start = time.perf_counter()
    train_epochs(model, bags, TrainConfig(epochs=1, num_workers=workers))
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if workers else 0
    tiles = sum(inspect_features(p).n_tiles for b in bags for p in b.paths)
    queue.put(
        {
            "slides": len(bags),
            "tiles": tiles,
            "peak_mib": (peak_kib + children_kib) / 1024,
            "seconds": seconds,
        }
    )


def measure(manifest: Path, n_slides: int, workers: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_one_epoch, args=(str(manifest), n_slides, workers, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"epoch over {n_slides} slides failed (exit {proc.exitcode})")
    return dict(result)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=768, help="tile feature dimension (768 = ViT-B features)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per cohort size")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument(
        "--keep", type=Path, help="build the cohort here and keep it (default: a temp folder)"
    )
    args = parser.parse_args()

    from fedpath.simulation.synth import SynthConfig, synthesize

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        config = SynthConfig(sites=4, slides=1000, dim=args.dim, tiles_median=150, seed=0)
        manifest = synthesize(folder / "cohort", config, progress=False)
        on_disk = sum(p.stat().st_size for p in (folder / "cohort" / "features").iterdir()) / 2**20
        runs: dict[int, list[dict[str, float]]] = {100: [], 1000: []}
        for _ in range(args.repeats):
            for n in (100, 1000):
                runs[n].append(measure(manifest, n, args.workers))
                r = runs[n][-1]
                print(
                    f"{n:>5} slides  {int(r['tiles']):>8} tiles  peak RSS {r['peak_mib']:7.1f} MiB  {r['seconds']:.1f} s"
                )
    small = statistics.median(r["peak_mib"] for r in runs[100])
    large = statistics.median(r["peak_mib"] for r in runs[1000])
    ratio = large / small
    print(f"\nfeature files on disk for 1,000 slides: {on_disk:.0f} MiB (dim {args.dim})")
    print(
        f"peak RSS ratio 1,000 / 100 slides: {ratio:.3f}  (target ≤ 1.2) -> {'PASS' if ratio <= 1.2 else 'FAIL'}"
    )
    print(
        json.dumps(
            {
                "peak_mib_100": small,
                "peak_mib_1000": large,
                "ratio": ratio,
                "dim": args.dim,
                "workers": args.workers,
                "disk_mib_1000": on_disk,
            }
        )
    )


if __name__ == "__main__":
    main()
