"""`fedpath compare`: local-only, pooled, FedAvg, FedProx and FedProx+DP on identical patient splits, under
leave-one-site-out and/or internal validation, over several seeds; resumable; ends with the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpath.common.cli import Command, UserError

if TYPE_CHECKING:
    from fedpath.simulation.cohorts import Cohort
    from fedpath.simulation.compare import CompareConfig, Outcome

COHORTS = ("manifest", "tcga", "camelyon16", "synthetic")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_synthetic_options(p: argparse.ArgumentParser, *, sites: int, slides: int, dim: int) -> None:
    """The few knobs of the strong-shift synthetic cohort (`fedpath synth` has them all)."""
    g = p.add_argument_group("synthetic cohort (strong site shift; `fedpath synth --help` for the model)")
    g.add_argument("--sites", metavar="K", type=int, default=sites, help="sites")
    g.add_argument("--slides", metavar="N", type=int, default=slides, help="slides over all sites")
    g.add_argument("--dim", metavar="D", type=int, default=dim, help="tile feature dimension")
    g.add_argument("--shift", metavar="S", type=float, default=2.0, help="site shift strength (noise SDs)")
    g.add_argument("--cohort-seed", metavar="S", type=int, default=0, help="seed of the synthetic cohort")


def add_grid_options(p: argparse.ArgumentParser, *, methods: str, seeds: int) -> None:
    """Protocols, methods, seeds and the training settings every method shares (defaults: CompareConfig's)."""
    from fedpath.simulation.compare import CompareConfig

    def default(name: str) -> Any:
        return CompareConfig.model_fields[name].default

    def listed(name: str) -> str:
        return ",".join(f"{v:g}" for v in default(name))

    g = p.add_argument_group("grid")
    g.add_argument("--protocol", metavar="P[,P]", type=_names, default="loso", help="loso, internal")
    g.add_argument(
        "--methods",
        metavar="M[,M]",
        type=_names,
        default=methods,
        help="local,pooled,fedavg,fedprox,fedprox-dp",
    )
    g.add_argument("--seeds", metavar="N", type=int, default=seeds, help="training seeds per cell")
    g.add_argument("--mu", metavar="MU[,MU]", type=_floats, default=listed("mu"), help="FedProx μ grid")
    g.add_argument(
        "--dp-epsilons",
        metavar="E[,E]",
        type=_floats,
        default=listed("dp_epsilons"),
        help="fedprox-dp ε grid",
    )
    t = p.add_argument_group("training (the same for every method)")
    t.add_argument("--rounds", metavar="R", type=int, default=default("rounds"), help="federated rounds")
    t.add_argument(
        "--local-epochs",
        metavar="E",
        type=int,
        default=default("local_epochs"),
        help="epochs per round",
    )
    t.add_argument("--lr", metavar="LR", type=float, default=default("lr"), help="AdamW learning rate")
    t.add_argument(
        "--batch-size", metavar="N", type=int, default=default("batch_size"), help="patients per step"
    )
    t.add_argument(
        "--max-tiles",
        metavar="N",
        type=int,
        default=default("max_tiles"),
        help="tiles per bag in training (0 = all)",
    )
    t.add_argument("--model", metavar="NAME", default=default("model"), help="MIL aggregator (abmil, ...)")
    t.add_argument(
        "--weight-decay", metavar="WD", type=float, default=default("weight_decay"), help="AdamW weight decay"
    )
    t.add_argument(
        "--val-fraction",
        metavar="F",
        type=float,
        default=default("val_fraction"),
        help="validation share per site",
    )
    t.add_argument(
        "--test-fraction",
        metavar="F",
        type=float,
        default=default("test_fraction"),
        help="test share per site (internal)",
    )
    t.add_argument("--train-seed", metavar="S", type=int, default=0, help="seed i trains with S + i")
    t.add_argument("--split-seed", metavar="S", type=int, default=0, help="internal seed i splits with S + i")
    t.add_argument(
        "--dp-clip", metavar="C", type=float, default=default("dp_clip"), help="per-patient clipping norm"
    )
    t.add_argument(
        "--dp-batch", metavar="N", type=int, default=0, help="patients per DP step (0: batch size)"
    )
    t.add_argument("--dp-delta", metavar="D", type=float, default=0.0, help="δ (0: min(1e-5, 1/(100·n)))")
    t.add_argument("--dp-budget", metavar="E", type=float, default=0.0, help="lifetime ε per site (0: the ε)")


def compare_config(args: argparse.Namespace, **fixed: Any) -> CompareConfig:
    from pydantic import ValidationError

    from fedpath.simulation.compare import CompareConfig

    values = {
        "protocols": args.protocol,
        "methods": args.methods,
        "seeds": args.seeds,
        "mu": args.mu,
        "dp_epsilons": args.dp_epsilons,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "max_tiles": args.max_tiles,
        "train_seed": args.train_seed,
        "split_seed": args.split_seed,
        "dp_clip": args.dp_clip,
        "dp_batch": args.dp_batch,
        "dp_delta": args.dp_delta,
        "dp_budget": args.dp_budget,
        "model": args.model,
        "weight_decay": args.weight_decay,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        **fixed,
    }
    try:
        return CompareConfig(**values)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise UserError(f"invalid settings: {problems}") from err


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
    cohort: Cohort, out: Path, config: CompareConfig, *, replace_other: bool = False
) -> Outcome:
    """Run the grid over `cohort`, print the headline per protocol and where the report went."""
    from dataclasses import asdict

    from fedpath.simulation.compare import (
        CompareError,
        comparison_lines,
        format_headline,
        headline,
        run_comparison,
    )

    sizes = ", ".join(f"{s} ({n})" for s, n in cohort.sites.items())
    print(f"cohort: {len(cohort.sites)} sites (patients): {sizes}")
    for note in cohort.notes:
        print(f"  {note}")
    info = {k: v for k, v in asdict(cohort).items() if k != "manifest"} | {"manifest": str(cohort.manifest)}
    try:
        outcome = run_comparison(cohort.manifest, out, config, cohort=info, replace_other=replace_other)
    except CompareError as err:
        raise UserError(str(err)) from err
    for protocol in config.protocols:
        rows = headline(outcome.results, protocol)
        if rows:
            label = "LEAVE-ONE-SITE-OUT" if protocol == "loso" else "INTERNAL VALIDATION"
            print(f"\n{label}\n{format_headline(rows, protocol)}")
            for line in comparison_lines(rows):
                print(line)
    print(
        f"\n{outcome.cells_run} cells run, {outcome.cells_skipped} already done; this run "
        f"{outcome.seconds:.0f} s, all finished jobs {outcome.sweep_seconds:.0f} s of training."
    )
    if outcome.failed:
        print(
            f"{len(outcome.failed)} job(s) failed (their cells are missing from the report):", file=sys.stderr
        )
        for line in outcome.failed:
            print(f"  {line}", file=sys.stderr)
    print(f"report: {outcome.report}\n  (also {outcome.report.with_suffix('.md')}, {outcome.results})")
    return outcome


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", required=True, type=Path, help="run folder (cells/, jobs/, report); rerun to resume"
    )
    c = p.add_argument_group("cohort")
    c.add_argument(
        "--cohort",
        "--sites-from",
        dest="cohort",
        choices=COHORTS,
        metavar="C",
        default="manifest",
        help="manifest|tcga|camelyon16|synthetic",
    )
    c.add_argument("--manifest", type=Path, metavar="M", help="cohort manifest (not with --cohort synthetic)")
    c.add_argument(
        "--min-site-patients", metavar="N", type=int, default=20, help="tcga: smaller sites → 'other'"
    )
    add_synthetic_options(p, sites=4, slides=160, dim=32)
    add_grid_options(p, methods="local,pooled,fedavg,fedprox", seeds=3)
    p.add_argument("--cpus-per-site", metavar="N", type=int, default=1, help="CPU cores per simulated site")


def _run(args: argparse.Namespace) -> int:
    from fedpath.simulation.cohorts import CohortError, derive_cohort

    out: Path = args.out.resolve()
    config = compare_config(args, cpus_per_site=args.cpus_per_site)
    if args.cohort == "synthetic":
        if args.manifest is not None:
            raise UserError("--manifest and --cohort synthetic exclude each other: pick one cohort")
        cohort = synthetic(args, out / "cohort")
    else:
        if args.manifest is None:
            raise UserError(
                "give the cohort: --manifest M (sites from its site column, or with --cohort "
                "tcga|camelyon16), or --cohort synthetic"
            )
        try:
            cohort = derive_cohort(
                args.manifest, out / "cohort.csv", source=args.cohort, min_patients=args.min_site_patients
            )
        except CohortError as err:
            raise UserError(str(err)) from err
    outcome = run_and_report(cohort, out, config)
    return 1 if outcome.failed else 0


COMMAND = Command(
    name="compare",
    help="compare local, pooled, FedAvg, FedProx(+DP) across sites (leave-one-site-out); resumable",
    description="Train every method on identical patient splits; test at hospitals it never saw (loso) "
    "and/or on the sites' own test patients (internal). Federations run the real apps on Flower's "
    "simulation engine. Finished cells are kept in --out/cells (a rerun resumes); ends with the report.",
    add_arguments=_add_arguments,
    run=_run,
)
