"""`fedpath report RUN_DIR`: (re-)render a run folder's comparison report from its predictions."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedpath.common.cli import Command, UserError


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir",
        type=Path,
        metavar="RUN_DIR",
        help="run folder holding predictions.csv (rounds.csv, validation.csv, training.csv and settings.json "
        "are used when present)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples per 95%% CI (fewer: faster, rougher intervals)",
    )


def _run(args: argparse.Namespace) -> int:
    from fedpath.simulation.report import ReportError, write_report

    if args.bootstrap < 10:
        raise UserError(f"--bootstrap {args.bootstrap}: need at least 10 resamples for a 95% CI")
    started = time.perf_counter()
    try:
        paths = write_report(args.run_dir, n_boot=args.bootstrap, progress=lambda msg: print(msg, flush=True))
    except ReportError as err:
        raise UserError(str(err)) from err
    print(
        f"report written in {time.perf_counter() - started:.0f} s:\n"
        f"  {paths.html} (self-contained, open in a browser)\n"
        f"  {paths.markdown} (with {len(paths.plots)} plots in {paths.markdown.parent / 'plots'})\n"
        f"  {paths.results} (one row per protocol × method × test site × seed)"
    )
    return 0


COMMAND = Command(
    name="report",
    help="render a run folder's cross-site comparison report (report.md, report.html, results.csv)",
    description="Read RUN_DIR/predictions.csv (and rounds.csv, validation.csv, training.csv, settings.json "
    "where present) and write results.csv, report.md with PNG plots and a self-contained report.html into "
    "RUN_DIR: AUROC with bootstrap 95% CIs per held-out site and method, sensitivity and specificity at a "
    "threshold chosen on validation, the internal-vs-external generalization gap, convergence, ROC curves, "
    "calibration and the privacy-utility curve. Methods that did not learn are marked and left out of the "
    "findings.",
    add_arguments=_add_arguments,
    run=_run,
)
