"""`fedpath compare`: local-only, pooled, FedAvg, FedProx and FedProx+DP on identical patient splits, under
leave-one-site-out, internal validation and/or patient-level cross-validation, over several seeds; resumable;
ends with the report. Every setting of `CompareConfig` is an option generated from its field."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpath.common.cli import Command, UserError
from fedpath.common.manifest_cli import add_class_options, declared_classes

if TYPE_CHECKING:
    from fedpath.simulation.cohorts import Cohort
    from fedpath.simulation.compare import CompareConfig, Outcome

COHORTS = ("manifest", "tcga", "tcga-region", "camelyon16", "synthetic", "musk1", "musk2")
MIL_COHORTS = ("musk1", "musk2")


def add_synthetic_options(
    p: argparse.ArgumentParser,
    *,
    sites: int,
    slides: int,
    dim: int,
    group: argparse._ArgumentGroup | None = None,
) -> None:
    """The few knobs of the strong-shift synthetic cohort (`fedpath synth` has them all), in `group` or in a
    group of their own."""
    g = group or p.add_argument_group(
        "synthetic cohort (strong site shift; `fedpath synth --help` for the model)"
    )
    g.add_argument("--sites", metavar="K", type=int, default=sites, help="sites")
    g.add_argument("--slides", metavar="N", type=int, default=slides, help="slides over all sites")
    g.add_argument("--dim", metavar="D", type=int, default=dim, help="tile feature dimension")
    g.add_argument("--shift", metavar="S", type=float, default=2.0, help="site shift strength (noise SDs)")
    g.add_argument(
        "--cohort-seed", metavar="S", type=int, default=0, help="seed of the cohort (synthetic, MUSK sites)"
    )


GRID_FIELDS = ("protocols", "methods", "seeds", "folds", "mu", "dp_epsilons", "dp_mu", "min_local_patients")
RESOURCE_FIELDS = ("cpus_per_site",)
OPTION_NAMES = {"protocols": "protocol"}  # CompareConfig field → option name, where they differ


def add_grid_options(
    p: argparse.ArgumentParser, *, methods: str, seeds: int, defaults: dict[str, Any] | None = None
) -> None:
    """One option per field of CompareConfig (type, default and help from the field): the grid (protocols,
    methods, seeds, folds, μ and ε), the training settings every method shares, and the simulation's CPUs.
    Unless the command set its own, the usage line says ``[options]``: listing them all would fill a screen.
    `defaults`: other defaults than CompareConfig's (a benchmark's settings)."""
    from fedpath.common.options import add_model_options
    from fedpath.simulation.compare import METHODS, PROTOCOLS, CompareConfig

    fields = list(CompareConfig.model_fields)
    groups = {
        "grid": [f for f in fields if f in GRID_FIELDS],
        "training (the same for every method)": [
            "rounds",
            *(f for f in fields if f not in GRID_FIELDS and f not in RESOURCE_FIELDS and f != "rounds"),
        ],
        "": [f for f in fields if f in RESOURCE_FIELDS],  # among the command's own options
    }
    for title, names in groups.items():
        add_model_options(
            p.add_argument_group(title) if title else p,
            CompareConfig,
            names,
            names=OPTION_NAMES,
            defaults={**(defaults or {}), "methods": methods, "seeds": seeds},
            helps={"protocols": ",".join(PROTOCOLS), "methods": _methods_help(methods, METHODS)},
            metavars={"protocols": "P[,P]", "methods": "M[,M]", "pooled_batches": "B"},
        )
    p.usage = p.usage or "%(prog)s [options]"


def _methods_help(default: str, known: Sequence[str]) -> str:
    """The methods beside the default ones (the default is shown after the help)."""
    others = [m for m in known if m not in default.split(",")]
    return f"or {','.join(others)}" if others else ",".join(known)


def compare_config(args: argparse.Namespace, **fixed: Any) -> CompareConfig:
    """The CompareConfig of the parsed options (`fixed` overrides them)."""
    from fedpath.common.options import build_model, model_values
    from fedpath.simulation.compare import CompareConfig

    return build_model(CompareConfig, {**model_values(args, CompareConfig), **fixed}, names=OPTION_NAMES)


def synthetic(args: argparse.Namespace, out: Path, *, replace_other: bool = False) -> Cohort:
    from pydantic import ValidationError

    from fedpath.simulation.cohorts import synthetic_cohort

    print(f"cohort: synthesizing {args.slides} slides at {args.sites} sites (shift {args.shift:g}) in {out}")
    try:
        return synthetic_cohort(
            out,
            sites=args.sites,
            slides=args.slides,
            dim=args.dim,
            seed=args.cohort_seed,
            shift=args.shift,
            replace_other=replace_other,
        )
    except ValidationError as err:
        raise UserError(f"invalid cohort settings: {err}") from err
    except FileExistsError as err:
        raise UserError(
            f"{out} holds a synthetic cohort with other settings, and the finished cells in "
            f"{out.parent} were trained on it: use another --out"
        ) from err


def run_and_report(
    cohort: Cohort,
    out: Path,
    config: CompareConfig,
    *,
    replace_other: bool = False,
    classes: tuple[str, ...] | None = None,
) -> Outcome:
    """Run the grid over `cohort`, print the headline per protocol and where the report went. `classes`: the
    class order --classes/--positive declare (None: the labels found, sorted)."""
    from dataclasses import asdict

    from fedpath.common.manifest import ManifestError
    from fedpath.simulation.cohorts import site_table
    from fedpath.simulation.compare import (
        CompareError,
        comparison_lines,
        format_headline,
        headline,
        run_comparison,
    )

    print(f"cohort: {len(cohort.sites)} sites")
    try:
        for line in site_table(
            cohort.manifest,
            val_fraction=config.val_fraction,
            split_seed=config.split_seed,
            classes=classes,
            min_local=config.min_local_patients,
        ):
            print(f"  {line}")
    except ManifestError as err:
        raise UserError(f"invalid manifest:\n{err}") from err
    for note in cohort.notes:
        print(f"  {note}")
    info = {k: v for k, v in asdict(cohort).items() if k != "manifest"} | {"manifest": str(cohort.manifest)}
    try:
        outcome = run_comparison(
            cohort.manifest, out, config, cohort=info, replace_other=replace_other, classes=classes
        )
    except CompareError as err:
        raise UserError(str(err)) from err
    for protocol in config.protocols:
        rows = headline(outcome.analysis or outcome.results, protocol)  # the report's own analysis
        if rows:
            label = {
                "loso": "LEAVE-ONE-SITE-OUT",
                "internal": "INTERNAL VALIDATION",
                "official": "THE COHORT'S OFFICIAL TEST SPLIT",
            }.get(protocol, f"CROSS-VALIDATION ({config.folds} folds of patients)")
            print(f"\n{label}\n{format_headline(rows, protocol)}")
            for line in comparison_lines(rows):
                print(line)
    print(
        f"\n{outcome.cells_run} cells run, {outcome.cells_skipped} already done; this run "
        f"{outcome.seconds:.0f} s, all finished jobs {outcome.sweep_seconds:.0f} s of training."
    )
    if outcome.overheads:
        print(overhead_line(outcome.overheads))
    if outcome.not_trained:
        print(f"{len(outcome.not_trained)} job(s) not trained, by rule (no cells in the report):")
        for line in outcome.not_trained:
            print(f"  {line}")
    if outcome.failed:
        print(
            f"{len(outcome.failed)} job(s) failed (their cells are missing from the report unless said):",
            file=sys.stderr,
        )
        for line in outcome.failed:
            print(f"  {line}", file=sys.stderr)
    print(f"report: {outcome.report}\n  (also {outcome.report.with_suffix('.md')}, {outcome.results})")
    return outcome


def overhead_line(overheads: Sequence[float]) -> str:
    """Flower's share of the federations run: the first (with the engine's start) and the later ones' mean."""
    first, later = overheads[0], overheads[1:]
    text = f"Flower overhead per federation (wall time outside its rounds): {first:.1f} s for the first"
    if later:
        text += f", {sum(later) / len(later):.1f} s on average for the {len(later)} after it (warm engine)"
    return text


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "%(prog)s --out DIR [--cohort C] [--manifest M | --mil-file F] [options]"
    p.add_argument(
        "--out", required=True, type=Path, help="run folder (cells/, jobs/, report); rerun to resume"
    )
    c = p.add_argument_group("cohort (synthetic: `fedpath synth --help` for the model)")
    c.add_argument(
        "--cohort", choices=COHORTS, metavar="C", default="manifest", help="one of " + ", ".join(COHORTS)
    )
    c.add_argument(  # its old name
        "--sites-from", dest="cohort", choices=COHORTS, help=argparse.SUPPRESS
    )
    c.add_argument("--manifest", type=Path, metavar="M", help="cohort manifest")
    c.add_argument(
        "--min-site-patients",
        metavar="N",
        type=int,
        default=20,
        help="tcga*: smaller sites → 'other'",
    )
    add_class_options(c)
    add_synthetic_options(p, sites=4, slides=160, dim=32, group=c)
    add_mil_options(c)
    add_grid_options(p, methods="local,pooled,fedavg,fedprox", seeds=3)
    p.add_argument(
        "--dry-run", action="store_true", help="print the cohort and every job's patients; run nothing"
    )


def dry_run(args: argparse.Namespace, config: CompareConfig) -> int:
    """The cohort and the grid, from a cohort made in a temporary folder: nothing is written into --out."""
    import tempfile

    from fedpath.common.manifest import ManifestError, load_manifest
    from fedpath.simulation.cohorts import CohortError, derive_cohort, site_table
    from fedpath.simulation.compare import CompareError, describe_plan

    with tempfile.TemporaryDirectory(prefix="fedpath-dry-run-") as tmp:
        try:
            if args.cohort == "synthetic":
                cohort = synthetic(args, Path(tmp) / "cohort")
            elif args.cohort in MIL_COHORTS:
                cohort = musk(args, Path(tmp) / "cohort")
            else:
                if args.manifest is None:  # --cohort camelyon16: plan FLamby's split from the shipped table
                    args.manifest = camelyon16_plan_manifest(Path(tmp) / "camelyon16.csv")
                    print(
                        "no --manifest: the shipped CAMELYON16 table (399 slides, no features: a plan only)"
                    )
                cohort = derive_cohort(
                    args.manifest,
                    Path(tmp) / "cohort.csv",
                    source=args.cohort,
                    min_patients=args.min_site_patients,
                )
            classes = declared_classes(args, cohort.manifest)
            table = site_table(
                cohort.manifest,
                val_fraction=config.val_fraction,
                split_seed=config.split_seed,
                classes=classes,
                min_local=config.min_local_patients,
            )
            grid = describe_plan(load_manifest(cohort.manifest, classes=classes), config)
        except (CohortError, CompareError, ManifestError) as err:
            raise UserError(str(err)) from err
    print(f"cohort: {len(cohort.sites)} sites")
    for line in [*table, *cohort.notes]:
        print(f"  {line}")
    print("\n".join(grid))
    return 0


def camelyon16_plan_manifest(path: Path) -> Path:
    """A manifest of every CAMELYON16 slide in fedpath's shipped table (slide id, label, a slide path that need
    not exist), for a dry run: the plan needs the slides, their hospitals and labels, not their files."""
    import csv
    import io

    from fedpath.simulation.cohorts import camelyon16_labels

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide_id", "label", "slide"])
    for slide_id, label in camelyon16_labels().items():
        writer.writerow([slide_id, label, f"{slide_id}.tif"])
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def add_mil_options(g: argparse._ArgumentGroup) -> None:
    """The MUSK cohorts' table and site sizes (their sites: --sites; their dealing seed: --cohort-seed)."""
    from fedpath.common.options import add_model_options
    from fedpath.simulation.cohorts import MilCohortConfig

    g.add_argument("--mil-file", type=Path, metavar="F", help="musk1|musk2: musk1.csv or musk2.tsv.gz")
    add_model_options(g, MilCohortConfig, ["size_skew"])


def musk(args: argparse.Namespace, out: Path) -> Cohort:
    """The MUSK cohort named by --cohort, converted from --mil-file into `out` (reused when already there)."""
    from fedpath.common.options import build_model
    from fedpath.simulation.cohorts import CohortError, MilCohortConfig, mil_cohort

    if args.mil_file is None:
        raise UserError(
            f"--cohort {args.cohort} needs --mil-file F: the {args.cohort.upper()} table "
            f"({'musk1.csv' if args.cohort == 'musk1' else 'musk2.tsv.gz'})"
        )
    config = build_model(
        MilCohortConfig,
        {"sites": args.sites, "size_skew": args.size_skew, "seed": args.cohort_seed},
        names={"seed": "cohort-seed"},
        what="cohort settings",
    )
    print(f"cohort: {args.cohort} from {args.mil_file}, {config.sites} sites, in {out}")
    try:
        return mil_cohort(args.mil_file, out, config, name=args.cohort)
    except CohortError as err:
        raise UserError(str(err)) from err
    except FileExistsError as err:
        raise UserError(
            f"{err}: the finished cells in {out.parent} were trained on that cohort; use another --out"
        ) from err


def _run(args: argparse.Namespace) -> int:
    from fedpath.simulation.cohorts import CohortError, derive_cohort

    out: Path = args.out.resolve()
    config = compare_config(args)
    made = args.cohort == "synthetic" or args.cohort in MIL_COHORTS
    if made and args.manifest is not None:
        raise UserError(f"--manifest and --cohort {args.cohort} exclude each other: pick one cohort")
    if args.dry_run:
        if not made and args.manifest is None and args.cohort != "camelyon16":
            raise UserError(
                "give the cohort to plan: --manifest M, --cohort synthetic, --cohort camelyon16 (its shipped "
                "table) or --cohort musk1|musk2"
            )
        return dry_run(args, config)
    if args.cohort == "synthetic":
        cohort = synthetic(args, out / "cohort")
    elif args.cohort in MIL_COHORTS:
        cohort = musk(args, out / "cohort")
    else:
        if args.manifest is None:
            raise UserError(
                "give the cohort: --manifest M (sites from its site column, or with --cohort "
                "tcga|tcga-region|camelyon16), --cohort synthetic, or --cohort musk1|musk2 --mil-file F"
            )
        try:
            cohort = derive_cohort(
                args.manifest, out / "cohort.csv", source=args.cohort, min_patients=args.min_site_patients
            )
        except CohortError as err:
            raise UserError(str(err)) from err
    outcome = run_and_report(cohort, out, config, classes=declared_classes(args, cohort.manifest))
    return 1 if outcome.failed else 0


COMMAND = Command(
    name="compare",
    help="compare local, pooled, FedAvg, FedProx(+DP) across sites (leave-one-site-out, cv); resumable",
    description="All methods on one patient split: loso, internal, official or cv; resumable.",
    add_arguments=_add_arguments,
    run=_run,
)
