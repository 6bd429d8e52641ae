"""Wall time of a simulated FedProx federation against pooled training with the same total local epochs,
and bytes a site sends per round against the fp32 size of the model.

Targets (federated-training issue):
* wall(FedProx simulation) ≤ 1.3 × wall(pooled training), pooled training taking at least 60 s;
* bytes received from a site per round ≤ 1.1 × fp32 parameter bytes.

Both runs use one synthetic cohort, the same patient split, model, batch size, tile cap and learning rate;
pooled trains `rounds × local_epochs` epochs on every site's training patients in this process (torch's
default threads), FedProx runs `rounds` rounds of `local_epochs` epochs on Flower's simulation engine (one
Ray worker per `--cpus-per-site` cores, SuperLink start to stop, per-round validation included).

Start-up overhead = time to the first round's start + the extra time of round 1 (Ray and worker start-up,
imports) over a later round + teardown. Per-round overhead = round wall time − the round's critical path of
site compute (site train + evaluate seconds packed onto the parallel workers), median over rounds ≥ 2.

    python benchmarks/bench_federation.py [--slides 800] [--rounds 10] [--local-epochs 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def critical_path(seconds: list[float], workers: int) -> float:
    """Makespan of the site jobs on `workers` parallel workers, longest job first (LPT)."""
    loads = [0.0] * max(1, workers)
    for s in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += s
    return max(loads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--slides", type=int, default=800, help="slides over all sites")
    p.add_argument("--dim", type=int, default=64, help="tile feature dimension")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--cpus-per-site", type=int, default=1)
    p.add_argument("--keep", type=Path, help="keep the cohort and runs here (default: a temp folder)")
    args = p.parse_args()

    import torch

    from fedpath.client.training import TrainConfig, train_epochs
    from fedpath.common.bags import bags_from_manifest
    from fedpath.common.manifest import load_manifest, split_patients
    from fedpath.common.mil import create_mil
    from fedpath.common.wire import arrays_nbytes, model_to_arrays
    from fedpath.simulation.simulate import federation_config, simulate
    from fedpath.simulation.synth import SynthConfig, synthesize

    root = args.keep or Path(tempfile.mkdtemp(prefix="fedpath-bench-fed-"))
    manifest_path = synthesize(
        root / "cohort", SynthConfig(sites=args.sites, slides=args.slides, dim=args.dim)
    )
    manifest = load_manifest(manifest_path)
    load_before = os.getloadavg()[0]

    run = federation_config(
        manifest_path,
        run_dir=root / f"fedprox-{int(time.time())}",
        num_server_rounds=args.rounds,
        local_epochs=args.local_epochs,
        min_sites=args.sites,
    )
    fed = simulate(run, sites=args.sites, cpus_per_site=args.cpus_per_site)

    splits = split_patients(manifest, val=run.val_fraction, test=run.test_fraction, seed=run.split_seed)
    bags = bags_from_manifest(manifest.for_patients(set().union(*(s.train for s in splits.values()))))
    torch.manual_seed(run.seed)
    model = create_mil(run.model, in_dim=run.in_dim, num_classes=run.num_classes)
    config = TrainConfig(
        epochs=args.rounds * args.local_epochs, lr=run.lr, batch_size=run.batch_size, max_tiles=run.max_tiles
    )
    t0 = time.perf_counter()
    train_epochs(model, bags, config, progress=True)
    pooled = time.perf_counter() - t0
    load_after = os.getloadavg()[0]

    rounds = fed.rounds
    workers = max(1, (os.cpu_count() or 1) // args.cpus_per_site)
    crit = [
        critical_path(
            [s["train"].get("seconds", 0.0) + s["evaluate"].get("seconds", 0.0) for s in r["sites"].values()],
            min(workers, args.sites),
        )
        for r in rounds
    ]
    overhead = [r["seconds"] - c for r, c in zip(rounds, crit, strict=True)]
    per_round = statistics.median(overhead[1:]) if len(rounds) > 1 else float("nan")
    first_start = rounds[0]["finished_at"] - rounds[0]["seconds"]
    to_first_round = first_start - fed.started_at
    teardown = fed.started_at + fed.seconds - rounds[-1]["finished_at"]
    startup = to_first_round + (overhead[0] - per_round) + teardown
    fp32 = arrays_nbytes(model_to_arrays(model))
    sent = [s["bytes_received"] for r in rounds for s in r["sites"].values()]

    result: dict[str, Any] = {
        "cohort": {"sites": args.sites, "slides": args.slides, "dim": args.dim, "train_patients": len(bags)},
        "epochs_total": args.rounds * args.local_epochs,
        "pooled_seconds": round(pooled, 1),
        "fedprox_seconds": round(fed.seconds, 1),
        "ratio_fedprox_over_pooled": round(fed.seconds / pooled, 3),
        "startup_overhead_seconds": round(startup, 1),
        "of_which_before_round_1": round(to_first_round, 1),
        "of_which_round_1_extra": round(overhead[0] - per_round, 1),
        "of_which_teardown": round(teardown, 1),
        "per_round_overhead_seconds_median": round(per_round, 2),
        "round_seconds": [r["seconds"] for r in rounds],
        "round_critical_compute_seconds": [round(c, 2) for c in crit],
        "fp32_parameter_bytes": fp32,
        "bytes_per_site_per_round_max": max(sent),
        "bytes_ratio_max": round(max(sent) / fp32, 4),
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    ok_time = fed.seconds <= 1.3 * pooled and pooled >= 60
    ok_bytes = max(sent) <= 1.1 * fp32
    print(
        f"wall ratio {fed.seconds / pooled:.2f} (target ≤ 1.3, pooled {pooled:.0f} s ≥ 60 s): {'OK' if ok_time else 'MISSED'}"
    )
    print(f"bytes ratio {max(sent) / fp32:.4f} (target ≤ 1.1): {'OK' if ok_bytes else 'MISSED'}")
    print(f"cohort and runs in {root}")


if __name__ == "__main__":
    main()
