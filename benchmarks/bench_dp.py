"""Cost of per-patient DP-SGD: wall time of one local epoch with DP against the same epoch without DP.

Target (privacy issue): DP epoch ≤ 2.5 × non-DP epoch, same bags, same model, same (expected) batch size.
Both run in this process, alternating, and the ratio of medians is reported (the machines are noisy).

    python benchmarks/bench_dp.py [--patients 300] [--dim 384] [--batch 16] [--repeats 3] [--model abmil]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=300, help="patients (one slide each) at the site")
    parser.add_argument("--dim", type=int, default=384, help="tile feature dimension")
    parser.add_argument(
        "--batch", type=int, default=16, help="bags per step (DP: expected patients per step)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="abmil")
    args = parser.parse_args()

    import torch

    from fedpath.client.privacy import DPConfig, PrivacyLedger, default_delta, plan_round
    from fedpath.client.training import TrainConfig, train_epochs
    from fedpath.common.bags import bags_from_manifest
    from fedpath.common.manifest import load_manifest
    from fedpath.common.mil import create_mil
    from fedpath.simulation.synth import SynthConfig, synthesize

    with tempfile.TemporaryDirectory() as tmp:
        cohort = SynthConfig(
            sites=2, slides=args.patients * 2, dim=args.dim, size_skew=0, multi_slide_fraction=0
        )
        manifest = load_manifest(synthesize(Path(tmp) / "cohort", cohort, progress=False)).for_site("site-A")
        bags = bags_from_manifest(manifest)
        config = TrainConfig(epochs=1, batch_size=args.batch, seed=0)
        ledger = PrivacyLedger(Path(tmp) / "ledger.json", site="site-A", delta=default_delta(len(bags)))
        plan = plan_round(
            DPConfig(noise_multiplier=1.0, expected_batch_size=args.batch),
            ledger,
            patients=len(bags),
            epochs=1,
        )
        times: dict[str, list[float]] = {"plain": [], "dp": []}
        steps = {}
        for r in range(args.repeats + 1):  # the first pair warms caches and is dropped
            for mode in ("plain", "dp"):
                torch.manual_seed(0)
                model = create_mil(args.model, in_dim=args.dim, num_classes=2)
                start = time.perf_counter()
                stats = train_epochs(model, bags, config, privacy=plan if mode == "dp" else None)
                if r:
                    times[mode].append(time.perf_counter() - start)
                steps[mode] = stats.steps
    plain, dp = statistics.median(times["plain"]), statistics.median(times["dp"])
    print(
        f"{len(bags)} patients, dim {args.dim}, {args.model}, batch {args.batch}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(
        f"epoch without DP: {plain:.2f} s ({steps['plain']} steps)   with DP: {dp:.2f} s ({steps['dp']} steps)"
    )
    ratio = dp / plain
    print(f"DP / non-DP epoch time: {ratio:.2f}  (target ≤ 2.5) -> {'PASS' if ratio <= 2.5 else 'FAIL'}")
    print(json.dumps({"plain_s": plain, "dp_s": dp, "ratio": ratio, "patients": len(bags), "dim": args.dim}))


if __name__ == "__main__":
    main()
