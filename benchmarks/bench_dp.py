"""Per-patient DP-SGD: its cost per local epoch, and a privacy–utility table.

Cost (target: DP epoch ≤ 2.5 × non-DP epoch): one local epoch with and without DP, same bags, model and
(expected) batch size, alternating in this process; the ratio of medians is reported.

Utility (--utility): simulated FedProx federations on a synthetic cohort (Flower's simulation engine, the
real ClientApp/ServerApp), one per target ε ∈ {1, 4, 8} and one without DP (ε = ∞); held-out AUROC of the
final model on every site's test patients, pooled.

    python benchmarks/bench_dp.py [--patients 300] [--dim 384] [--batch 16] [--repeats 3] [--model abmil]
    python benchmarks/bench_dp.py --utility [--rounds 5] [--epsilons 1,4,8]
    python benchmarks/bench_dp.py --growth [--rounds 10] [--steps 3]
    python benchmarks/bench_dp.py --calibration [--repeats 3]

Growth (--growth; target: round 5 ÷ round 1 ≤ 1.2): a site's DP rounds as its ClientApp runs them, in one
process: σ calibrated for a target ε over the rounds left, `--steps` noisy steps, the round recorded in the
ledger; the wall time of each round (calibration + training + ledger). Opacus is imported before round 1.

Calibration (--calibration): a site's σ calibration (`calibrate_noise`) against the same search by halving the
bracket (how it searched before), on eight (ε, q, steps) settings, alternating in this process with the RDP
cache cleared before each; the ratio of the medians of the total times, and the ε computations each took.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
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
    parser.add_argument("--utility", action="store_true", help="privacy–utility table instead of epoch cost")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (--utility)")
    parser.add_argument("--epsilons", default="1,4,8", help="target ε per site (--utility)")
    parser.add_argument("--growth", action="store_true", help="DP round time against the round number")
    parser.add_argument("--steps", type=int, default=3, help="noisy steps per round (--growth)")
    parser.add_argument("--calibration", action="store_true", help="σ calibration against halving")
    args = parser.parse_args()
    if args.calibration:
        calibration(args)
        return
    if args.utility:
        utility(args)
        return
    if args.growth:
        growth(args)
        return

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


def growth(args: argparse.Namespace) -> None:
    import math

    from fedpath.client.privacy import DPConfig, PrivacyLedger, default_delta, plan_round
    from fedpath.client.training import TrainConfig, train_epochs
    from fedpath.common.accounting import epsilon_of
    from fedpath.common.bags import bags_from_manifest
    from fedpath.common.manifest import load_manifest
    from fedpath.common.mil import initial_model
    from fedpath.simulation.synth import SynthConfig, synthesize

    epsilon_of([(1.0, 0.5, 1)], 1e-5)  # imports Opacus's accountant before the first timed round
    rounds = max(args.rounds, 5)
    with tempfile.TemporaryDirectory() as tmp:
        cohort = SynthConfig(sites=2, slides=80, dim=32, size_skew=0, multi_slide_fraction=0)
        bags = bags_from_manifest(
            load_manifest(synthesize(Path(tmp) / "cohort", cohort, progress=False)).for_site("site-A")
        )
        ledger_file = Path(tmp) / "ledger.json"
        model = initial_model(args.model, in_dim=32, num_classes=2, seed=0)
        times = []
        for r in range(1, rounds + 1):
            start = time.perf_counter()
            ledger = PrivacyLedger(ledger_file, site="site-A", delta=default_delta(len(bags)))
            plan = plan_round(
                DPConfig(target_epsilon=8.0, expected_batch_size=8),
                ledger,
                patients=len(bags),
                epochs=1,
                steps=args.steps,
                rounds_left=rounds - r + 1,
            )
            stats = train_epochs(model, bags, TrainConfig(epochs=1, steps=args.steps, seed=r), privacy=plan)
            ledger.record(
                run="bench", round=r, noise_multiplier=plan.noise_multiplier, q=plan.sample_rate,
                steps=stats.steps, budget=math.inf,
            )  # fmt: skip
            times.append(time.perf_counter() - start)
    ratio = times[4] / times[0]
    print(f"{len(bags)} patients, {args.steps} DP steps a round; seconds per round: "
          + ", ".join(f"{t:.2f}" for t in times))  # fmt: skip
    print(f"round 5 / round 1: {ratio:.2f}  (target ≤ 1.2) -> {'PASS' if ratio <= 1.2 else 'FAIL'}")
    print(json.dumps({"seconds": times, "ratio_5_1": ratio, "steps": args.steps}))


def _halving(excess_of: Callable[[float], float]) -> float:
    """The baseline: the smallest σ within budget to 1e-4 by halving the bracket (fedpath before)."""
    low, high = 0.05, 1.0
    while excess_of(high) > 0:
        low, high = high, high * 2
    while high - low > 1e-4:
        mid = (low + high) / 2
        if excess_of(mid) > 0:
            low = mid
        else:
            high = mid
    return high


def calibration(args: argparse.Namespace) -> None:
    import random

    from fedpath.client import privacy
    from fedpath.common import accounting

    rng = random.Random(0)
    settings = [(8.0, 0.2, 30)] + [
        (rng.uniform(0.5, 10), rng.uniform(0.005, 0.5), rng.randint(1, 300)) for _ in range(7)
    ]
    real = accounting.epsilon_of
    counts = {"halving": 0, "fedpath": 0}
    current = ["fedpath"]

    def counted(history: list[tuple[float, float, int]], delta: float) -> float:
        counts[current[0]] += 1
        return real(history, delta)

    privacy.epsilon_of = counted  # type: ignore[assignment]  # this process only: counts ε computations
    real([(1.0, 0.5, 1)], 1e-5)  # Opacus's accountant imported before the first timing
    times: dict[str, list[float]] = {"halving": [], "fedpath": []}
    sigmas: dict[str, list[float]] = {"halving": [], "fedpath": []}
    for _ in range(args.repeats):
        for name in ("halving", "fedpath"):
            current[0], counts[name] = name, 0
            accounting._rdp_per_step.cache_clear()
            start = time.perf_counter()
            found = []
            for eps, q, steps in settings:
                if name == "fedpath":
                    found.append(privacy.calibrate_noise(eps, 1e-5, q, steps))
                else:
                    excess = lambda s, e=eps, q=q, n=steps: counted([(s, q, n)], 1e-5) - e  # noqa: E731
                    found.append(_halving(excess))
            times[name].append(time.perf_counter() - start)
            sigmas[name] = found
    privacy.epsilon_of = real
    ratio = statistics.median(times["fedpath"]) / statistics.median(times["halving"])
    largest = max(abs(a - b) for a, b in zip(sigmas["fedpath"], sigmas["halving"], strict=True))
    print(f"{len(settings)} calibrations: halving {statistics.median(times['halving']):.2f} s "
          f"({counts['halving']} ε computations), fedpath {statistics.median(times['fedpath']):.2f} s "
          f"({counts['fedpath']}); ratio {ratio:.2f}; largest σ difference {largest:.1e} (tolerance 1e-4)")  # fmt: skip
    print(json.dumps({"halving_s": times["halving"], "fedpath_s": times["fedpath"], "ratio": ratio,
                      "computations": counts, "largest_sigma_difference": largest}))  # fmt: skip


def utility(args: argparse.Namespace) -> None:
    import numpy as np

    from fedpath.client.training import predict
    from fedpath.common.bags import bags_from_manifest
    from fedpath.common.manifest import load_manifest, split_patients
    from fedpath.common.metrics import aggregate_by_patient, auroc, bootstrap_ci
    from fedpath.server.runfolder import RunFolder, load_model
    from fedpath.simulation.simulate import federation_config, simulate
    from fedpath.simulation.synth import SynthConfig, synthesize

    cohort = SynthConfig(sites=3, slides=600, dim=32, shift=0.5, size_skew=0.5, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = synthesize(Path(tmp) / "cohort", cohort, progress=False)
        m = load_manifest(manifest)
        splits = split_patients(m)
        test_bags = bags_from_manifest(m.for_patients(set().union(*(s.test for s in splits.values()))))
        train = {site: len(s.train) for site, s in splits.items()}
        for eps in [float(e) for e in args.epsilons.split(",")] + [float("inf")]:
            dp = {} if eps == float("inf") else {"dp_epsilon": eps, "dp_batch": args.batch}
            run = federation_config(
                manifest, run_dir=Path(tmp) / f"run-{eps}", num_server_rounds=args.rounds, local_epochs=1,
                lr=5e-3, proximal_mu=0.01, min_sites=3, seed=0, **dp,
            )  # fmt: skip
            start = time.perf_counter()
            simulate(run, sites=3, progress=None)
            seconds = time.perf_counter() - start
            model, _ = load_model(RunFolder(Path(run.run_dir)).model)
            pred = predict(model, test_bags)
            _, labels, probs = aggregate_by_patient(pred.patient_ids, pred.labels, pred.probs)
            est = bootstrap_ci(auroc, labels, probs)
            spent = [line["sites"] for line in RunFolder(Path(run.run_dir)).read_rounds()][-1]
            eps_spent = max((s["train"].get("epsilon", float("inf")) for s in spent.values()), default=np.inf)
            rows.append((eps, eps_spent, est, seconds))
            print(f"target ε {eps:>4}: held-out AUROC {est}  (largest ε spent by a site {eps_spent:.2f}, {seconds:.0f} s)",
                  flush=True)  # fmt: skip
    print(f"\nsynthetic cohort: {cohort.slides} slides, 3 sites (training patients {train}), dim {cohort.dim}, "
          f"shift {cohort.shift}; FedProx μ=0.01, {args.rounds} rounds × 1 local epoch, δ = min(1e-5, 1/(100·patients))")  # fmt: skip
    print("| target ε per site | ε spent (largest site) | held-out AUROC [95% CI] |")
    print("| ---: | ---: | --- |")
    for eps, spent_eps, est, _ in rows:
        print(f"| {eps:g} | {spent_eps:.2f} | {est} |")


if __name__ == "__main__":
    main()
