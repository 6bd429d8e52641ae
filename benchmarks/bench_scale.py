"""Simulated federations of 4, 16 and 40 sites with the same patients per site: wall time per round, peak memory
of the whole process tree, and how both grow with the number of sites; and whether planning a 40-site grid
opens any feature file.

Each federation runs FedProx for `--rounds` rounds on one warm `SimulationEngine` (its SuperLink, its Ray head,
the simulation process and the ClientApp actors) with `--cpus-per-site` cores per simulated site. Memory is
sampled every 0.2 s as the summed RSS of this process and every process the engine started (shared pages,
e.g. Ray's object store, count once per process that maps them: an upper bound). Time per round is the
round log's seconds (training, evaluation and aggregation at every site); round 1, which also starts the
ClientApp actors, is shown apart and left out of the mean.

Targets (issue 15): 40 sites ÷ 4 sites in wall time per round per site ≤ 1.3; peak RSS grows no faster than
the sites' data (feature bytes on disk); planning a 40-site LOSO grid opens no feature file.

    python benchmarks/bench_scale.py [--out runs/bench_scale] [--sites 4,16,40] [--patients-per-site 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any


def tree_rss(markers: list[str]) -> int:
    """Summed resident memory (bytes) of this process and every process carrying one of `markers`."""
    import os

    from fedpath.common.processes import _marked_pids

    pids = {os.getpid()}
    for marker in markers:
        pids |= set(_marked_pids(marker))
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class PeakSampler:
    def __init__(self, markers: list[str]) -> None:
        self.markers, self.peak, self._stop = markers, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.markers))
            time.sleep(0.2)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def planning_opens_no_features(manifest: Path) -> tuple[int, float]:
    """Feature files opened (and seconds taken) by loading the manifest and planning a LOSO grid over it."""
    import h5py

    from fedpath.common.manifest import load_manifest
    from fedpath.simulation.compare import CompareConfig, plan

    opened = []
    original = h5py.File.__init__

    def counting(self: Any, name: Any, *args: Any, **kwargs: Any) -> None:
        opened.append(name)
        original(self, name, *args, **kwargs)

    h5py.File.__init__ = counting
    try:
        t0 = time.perf_counter()
        jobs = plan(load_manifest(manifest), CompareConfig(methods=("local", "pooled", "fedprox"), seeds=3))
        seconds = time.perf_counter() - t0
    finally:
        h5py.File.__init__ = original
    assert jobs
    return len(opened), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench_scale"), help="scratch folder (emptied)")
    p.add_argument("--sites", type=str, default="4,16,40", help="federation sizes, comma-separated")
    p.add_argument("--patients-per-site", type=int, default=10)
    p.add_argument("--dim", type=int, default=64, help="tile feature dimension")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--cpus-per-site", type=int, default=1)
    args = p.parse_args()
    sizes = [int(s) for s in args.sites.split(",")]

    from fedpath.simulation.cohorts import synthetic_cohort
    from fedpath.simulation.simulate import SimulationEngine, federation_config, simulate

    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = []
    with SimulationEngine(out / "engine") as engine:
        markers = [m.marker for m in (engine.link, engine.ray) if m is not None]
        for k in sizes:
            cohort = synthetic_cohort(
                out / f"cohort-{k}", sites=k, slides=k * args.patients_per_site, dim=args.dim, seed=0,
                size_skew=0.0, multi_slide_fraction=0.0, shift=1.0,
            )  # fmt: skip
            data = sum(f.stat().st_size for f in (out / f"cohort-{k}").rglob("*.h5"))
            opened, plan_s = planning_opens_no_features(cohort.manifest)
            run = federation_config(
                cohort.manifest, run_dir=out / f"run-{k}", num_server_rounds=args.rounds, min_sites=k, seed=0
            )
            with PeakSampler(markers) as sampler:
                result = simulate(
                    run, sites=k, cpus_per_site=args.cpus_per_site, engine=engine, progress=None
                )
            seconds = [float(r["seconds"]) for r in result.rounds]
            later = statistics.mean(seconds[1:]) if len(seconds) > 1 else seconds[0]
            rows.append((k, data, seconds[0], later, sampler.peak, result.overhead, opened, plan_s))
            print(
                f"{k:3d} sites: data {data / 2**20:.1f} MiB, round 1 {seconds[0]:.1f} s, later rounds "
                f"{later:.2f} s ({later / k:.3f} s per site), peak RSS {sampler.peak / 2**30:.2f} GiB, "
                f"overhead {result.overhead:.1f} s; planning a LOSO grid opened {opened} feature files "
                f"({plan_s:.2f} s)",
                flush=True,
            )
    k0, d0, _, t0, m0, *_ = rows[0]
    print(f"\nrelative to {k0} sites:")
    for k, d, _, t, m, _, opened, _ in rows[1:]:
        per_site = (t / k) / (t0 / k0)
        print(
            f"  {k:3d} sites: wall per round per site ×{per_site:.2f} (target ≤ 1.3 — "
            f"{'met' if per_site <= 1.3 else 'MISSED'}); peak RSS ×{m / m0:.2f} against data ×{d / d0:.2f} "
            f"({'met' if m / m0 <= d / d0 else 'MISSED'}); planning opened {opened} feature files"
        )


if __name__ == "__main__":
    main()
