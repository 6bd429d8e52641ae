"""Does federated training learn what pooled training learns, and more than a hospital alone? Leave-one-site-out
over 3 seeds on two cohorts with unequal sites:

(a) synthetic: ``fedpath synth --sites 5 --slides 80 --size-skew 1.5 --seed 3`` (its default site shift);
(b) MUSK1 (real bags: molecules as bags of conformations) dealt into 5 unequal sites (shares ∝ (k+1)^-1,
    stratified by label).

Printed per cohort: mean held-out AUROC of FedProx, pooled and the best single hospital (the report's choice,
`fedpath.simulation.headline`), and, paired on the same held-out sites, pooled − FedProx (target ≤ 0.03) and
FedProx − best hospital (target ≥ 0). Every method uses the same splits, initial weights and budget; FedProx
runs the real apps on Flower's simulation engine. Every `CompareConfig` setting is an option; run folders are
resumable.

    python benchmarks/bench_learning.py [--quick] [--out runs/bench_learning] [--musk1 F] [--rounds 10 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

MIL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mil"  # ../shared/data/mil
TARGETS = {"pooled − fedprox": ("≤", 0.03), "fedprox − best hospital": ("≥", 0.0)}
DEFAULTS: dict[str, Any] = {"protocols": "loso", "methods": "local,pooled,fedprox", "seeds": 3}
# smoke run: 3 sites (3 federations a cohort), 1 seed, 2 rounds: proves the path, says nothing of the targets
QUICK: dict[str, Any] = {"seeds": 1, "rounds": 2}
QUICK_SITES = 3


def _meets(value: float, target: tuple[str, float]) -> bool:
    return math.isfinite(value) and (value <= target[1] if target[0] == "≤" else value >= target[1])


def summarise(results: Path) -> dict[str, Any]:
    """Mean held-out AUROC of FedProx, pooled and the best hospital, and the paired differences."""
    from fedpath.simulation.headline import BEST_HOSPITAL, comparison, load_results, paired_difference

    table = comparison(load_results(results), "loso")
    fed = table.best([r.method for r in table if r.method.startswith("fedprox(")])
    pooled = next((r for r in table if r.method == "pooled"), None)
    best = table.row(BEST_HOSPITAL)
    out: dict[str, Any] = {
        "mean_auroc": {r.label: round(r.mean, 4) for r in (fed, pooled, best) if r is not None},
        "best_hospital": table.best_hospital_why,
    }
    if fed is not None and pooled is not None:
        out["pooled − fedprox"] = round(paired_difference(pooled, fed)[0], 4)
    if fed is not None and best is not None:
        out["fedprox − best hospital"] = round(paired_difference(fed, best)[0], 4)
    for name, target in TARGETS.items():
        if name in out:
            out[f"meets {name} {target[0]} {target[1]:g}"] = _meets(out[name], target)
    return out


def main() -> None:
    from fedpath.simulation.compare_cli import add_grid_options, compare_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench_learning"), help="run folders (resumable)")
    p.add_argument("--musk1", type=Path, default=MIL_DATA / "musk1.csv", help="the MUSK1 table")
    p.add_argument("--cohorts", default="synth,musk1", help="which of synth,musk1")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_SITES} sites a cohort, {QUICK}")
    add_grid_options(p, methods=DEFAULTS["methods"], seeds=DEFAULTS["seeds"], defaults=DEFAULTS)
    args = p.parse_args()

    from fedpath.simulation.cohorts import MilCohortConfig, mil_cohort
    from fedpath.simulation.compare import run_comparison
    from fedpath.simulation.synth import SynthConfig, synthesize

    config = compare_config(args, **(QUICK if args.quick else {}))
    sites = QUICK_SITES if args.quick else 5
    out = args.out.resolve() / ("quick" if args.quick else "full")
    started = time.perf_counter()
    summary: dict[str, Any] = {"config": config.model_dump(), "quick": args.quick, "cohorts": {}}
    for name in args.cohorts.split(","):
        root = out / name
        if name == "synth":
            synth = SynthConfig(sites=sites, slides=80 if sites == 5 else 48, size_skew=1.5, seed=3)
            manifest = synthesize(root / "cohort", synth, progress=False)
            note = f"fedpath synth {synth.sites} sites, {synth.slides} slides, size skew 1.5, seed 3"
        else:
            cohort = mil_cohort(
                args.musk1, root / "cohort", MilCohortConfig(sites=sites, size_skew=1.0), name=name
            )
            manifest, note = cohort.manifest, cohort.notes[0]
        print(f"\n== {name}: {note}")
        outcome = run_comparison(manifest, root, config, cohort={"notes": [note]})
        result = summarise(outcome.results)
        result["failed jobs"] = outcome.failed
        summary["cohorts"][name] = result
        print(f"{name}: mean AUROC at the held-out site ({config.seeds} seed(s))")
        for label, value in result["mean_auroc"].items():
            print(f"  {label:<40} {value:.3f}")
        for key, target in TARGETS.items():
            if key in result:
                verdict = "meets" if _meets(result[key], target) else "misses"
                print(f"  {key:<40} {result[key]:+.3f}  (target {target[0]} {target[1]:g}: {verdict})")
    path = out / "bench_learning.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwall time {time.perf_counter() - started:.0f} s; summary: {path}; run folders: {out}")


if __name__ == "__main__":
    main()
