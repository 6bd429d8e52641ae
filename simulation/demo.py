"""`fedpath demo`: a small leave-one-site-out comparison on a synthetic cohort with strong site shift.

Each site is held out in turn; local-only models (one per remaining site), a pooled model and a FedProx
federation (the real ServerApp and ClientApp on Flower's simulation engine) train on the other sites'
training patients, with the same initial weights and epoch budget, and are tested on every patient of the
held-out site. It is `fedpath compare --cohort synthetic` with small defaults (one seed) and a folder that a
rerun with other settings replaces; it ends with the headline table and the path of the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpath.common.cli import Command
from fedpath.simulation.compare_cli import (
    add_grid_options,
    add_synthetic_options,
    compare_config,
    run_and_report,
    synthetic,
)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo folder (cohort, cells, report)")
    add_synthetic_options(p, sites=4, slides=160, dim=32)
    add_grid_options(p, methods="local,pooled,fedprox", seeds=1)


def _run(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    config = compare_config(args)
    cohort = synthetic(args, out / "cohort", replace_other=True)
    outcome = run_and_report(cohort, out, config, replace_other=True)
    return 1 if outcome.failed else 0


COMMAND = Command(
    name="demo",
    help="synthetic cohort, leave-one-site-out: local-only vs pooled vs a simulated FedProx federation",
    description="Synthesize a multi-site cohort with strong site shift; hold out each site in turn, train "
    "local-only, pooled and FedProx (Flower's simulation engine) models on the other sites, and test them on "
    "every patient of the held-out site. Prints the headline table and writes report.html; a rerun reuses "
    "finished cells. `fedpath compare` runs the full grid (more seeds, FedAvg, μ and ε grids, internal).",
    add_arguments=_add_arguments,
    run=_run,
)
