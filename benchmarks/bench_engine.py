"""Flower's fixed cost per simulated federation, private engine against a grid's warm engine, and a LOSO grid's
wall time against the pure training time of its cells.

Part 1 (overhead). The same small federation (a synthetic cohort, a few rounds) runs `--federations` times on
a private engine each (a SuperLink and a Ray head started and stopped per run: what every federation of a
grid paid before), then as many times on one warm `SimulationEngine` (what `fedpath compare` does now), in one
process. A run's overhead is its wall time minus the seconds of its rounds (the rounds' training, evaluation
and aggregation). Target (issue 15): ≤ 5 s per federation after the first.

Part 2 (grid). The demo's leave-one-site-out grid (local, pooled, FedProx) on a synthetic cohort of `--sites`
sites: the whole grid's wall time ÷ the pure training time of its cells (a baseline's job time; a
federation's job time minus its overhead). Target: ≤ 1.5 on the 5-site demo cohort.

    python benchmarks/bench_engine.py [--out runs/bench_engine] [--federations 4] [--sites 5]

Each invocation starts from an empty --out (the grid would otherwise skip finished cells).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


def overhead_part(out: Path, federations: int, rounds: int) -> dict[str, list[float]]:
    from fedpath.simulation.cohorts import synthetic_cohort
    from fedpath.simulation.simulate import SimulationEngine, federation_config, simulate

    cohort = synthetic_cohort(out / "cohort", sites=3, slides=60, dim=16, seed=0, shift=1.0)

    def config(name: str, seed: int) -> object:
        return federation_config(
            cohort.manifest, run_dir=out / name, num_server_rounds=rounds, min_sites=3, seed=seed
        )

    result: dict[str, list[float]] = {
        "private": [], "warm": [], "private_rounds": [], "warm_rounds": [], "warm_process_cli": [], "engine_stop": [],
    }  # fmt: skip
    for i in range(federations):
        run = simulate(config(f"private-{i}", i), sites=3, progress=None)  # type: ignore[arg-type]
        result["private"].append(run.overhead)
        result["private_rounds"].append(run.seconds - run.overhead)
        print(f"private engine, federation {i + 1}: wall {run.seconds:.1f} s, overhead {run.overhead:.1f} s")
    t0 = time.perf_counter()
    with SimulationEngine(out / "engine") as engine:
        started = time.perf_counter() - t0
        # on the warm engine, federations alternate between Flower's CLI in this process (fedpath's way) and
        # one `flwr` process per command (the way before): the A/B of the in-process CLI, same engine
        for i in range(2 * federations):
            in_process = i % 2 == 0
            with _cli(in_process):
                run = simulate(config(f"warm-{i}", i), sites=3, engine=engine, progress=None)  # type: ignore[arg-type]
            overhead = run.overhead + (started if i == 0 else 0.0)  # the engine starts for the first run
            result["warm" if in_process else "warm_process_cli"].append(overhead)
            if in_process:
                result["warm_rounds"].append(run.seconds - run.overhead)
            how = "flwr CLI in process" if in_process else "a flwr process per command"
            print(
                f"warm engine, federation {i + 1} ({how}): wall {run.seconds:.1f} s, overhead {overhead:.1f} s"
            )
        t1 = time.perf_counter()
    result["engine_stop"] = [time.perf_counter() - t1]  # once per grid, after the last federation
    return result


@contextlib.contextmanager
def _cli(in_process: bool) -> Iterator[None]:
    """fedpath's Flower CLI calls as they are (in this process), or each in a `flwr` process of its own."""
    from fedpath.common.processes import executable, flower_env
    from fedpath.server import flower_runtime

    def process_cli(args: Sequence[str], flwr_home: Path) -> tuple[int, str]:
        done = subprocess.run(
            [executable("flwr"), *args],
            env=flower_env(flwr_home),
            capture_output=True,
            text=True,
            check=False,
        )
        return done.returncode, done.stdout + done.stderr

    own = flower_runtime.flwr_cli
    if not in_process:
        flower_runtime.flwr_cli = process_cli
    try:
        yield
    finally:
        flower_runtime.flwr_cli = own


def grid_part(out: Path, sites: int, rounds: int) -> tuple[float, float, list[float]]:
    from fedpath.simulation.cohorts import synthetic_cohort
    from fedpath.simulation.compare import CompareConfig, run_comparison

    cohort = synthetic_cohort(out / "grid-cohort", sites=sites, slides=40 * sites, dim=32, seed=0, shift=1.0)
    config = CompareConfig(methods=("local", "pooled", "fedprox"), seeds=1, rounds=rounds)
    outcome = run_comparison(cohort.manifest, out / "grid", config, n_boot=200, say=lambda _: None)
    if outcome.failed:
        raise SystemExit(f"the grid failed: {outcome.failed}")
    pure = outcome.sweep_seconds - sum(outcome.overheads)
    return outcome.seconds, pure, outcome.overheads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench_engine"), help="scratch folder (emptied)")
    p.add_argument("--federations", type=int, default=4, help="federations per engine kind (part 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per federation (part 1)")
    p.add_argument("--sites", type=int, default=5, help="sites of the grid's cohort (part 2)")
    p.add_argument("--grid-rounds", type=int, default=10, help="FedProx rounds in the grid (part 2)")
    p.add_argument("--skip-grid", action="store_true", help="part 1 only")
    args = p.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    o = overhead_part(out, args.federations, args.rounds)
    private, warm = o["private"], o["warm"]
    later = warm[1:] or warm
    print(
        f"\noverhead per federation: private engine mean {statistics.mean(private):.1f} s "
        f"(min {min(private):.1f}, max {max(private):.1f}); warm engine first {warm[0]:.1f} s, "
        f"after it mean {statistics.mean(later):.1f} s (min {min(later):.1f}, max {max(later):.1f})"
    )
    print(
        f"warm ÷ private, federations after the first: {statistics.mean(later) / statistics.mean(private):.2f} "
        f"(target: ≤ 5 s after the first — {'met' if statistics.mean(later) <= 5 else 'MISSED'})"
    )
    by_process = o["warm_process_cli"]
    print(
        f"warm engine, a flwr process per CLI command (as before): mean {statistics.mean(by_process):.1f} s "
        f"(min {min(by_process):.1f}, max {max(by_process):.1f}); Flower's CLI in this process ÷ a process per "
        f"command: {statistics.mean(later) / statistics.mean(by_process):.2f}; the engine's stop after the "
        f"last: {o['engine_stop'][0]:.1f} s"
    )
    print(
        f"rounds' own seconds per federation: private {statistics.mean(o['private_rounds']):.1f} s, "
        f"warm {statistics.mean(o['warm_rounds']):.1f} s"
    )
    if args.skip_grid:
        return
    wall, pure, overheads = grid_part(out, args.sites, args.grid_rounds)
    print(
        f"\nLOSO grid, {args.sites} sites (local, pooled, FedProx × {args.grid_rounds} rounds): wall {wall:.0f} s, "
        f"pure training {pure:.0f} s, ratio {wall / pure:.2f} (target ≤ 1.5 — {'met' if wall / pure <= 1.5 else 'MISSED'}); "
        f"federation overheads {', '.join(f'{x:.1f}' for x in overheads)} s"
    )


if __name__ == "__main__":
    main()
