"""`fedpath simulate`: a local FedProx federation on Flower's simulation engine, one site per manifest site."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedpath.common.cli import Command, UserError
from fedpath.common.manifest_cli import add_class_options, declared_classes
from fedpath.server.server_cli import add_training_options, check_run_folder, run_settings


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "%(prog)s --manifest M --out DIR [options]"
    p.add_argument("--manifest", required=True, type=Path, help="cohort manifest; every site becomes a node")
    p.add_argument(
        "--sites-from",
        "--cohort",
        dest="sites_from",
        metavar="S",
        choices=("manifest", "tcga", "tcga-region", "camelyon16"),
        default="manifest",
        help="sites from: manifest (its site column), tcga (barcodes → institution), tcga-region (FLamby's "
        "TCGA-BRCA regions), camelyon16 (hospital table)",
    )
    p.add_argument(
        "--min-site-patients",
        metavar="N",
        type=int,
        default=20,
        help="tcga, tcga-region: smaller sites → 'other'",
    )
    add_class_options(p)
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, round log, model, card)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_training_options(p)
    p.add_argument("--cpus-per-site", metavar="N", type=int, default=1, help="CPU cores per simulated site")


def _run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from fedpath.common.cohortcheck import precheck
    from fedpath.common.manifest import ManifestError, load_manifest
    from fedpath.server.runfolder import RunFolder, load_model
    from fedpath.simulation.cohorts import site_table
    from fedpath.simulation.simulate import (
        SimulationError,
        federation_config,
        held_out_auroc,
        simulate,
        sites_that_never_trained,
    )

    out: Path = args.out.resolve()
    if args.sites_from != "manifest":
        from fedpath.simulation.cohorts import CohortError, derive_cohort

        try:
            cohort = derive_cohort(
                args.manifest, out / "cohort.csv", source=args.sites_from, min_patients=args.min_site_patients
            )
        except CohortError as err:
            raise UserError(str(err)) from err
        for note in cohort.notes:
            print(note)
        print(f"sites derived ({args.sites_from}) into {cohort.manifest}")
        args.manifest = cohort.manifest
    classes = declared_classes(args, args.manifest)
    try:
        manifest = load_manifest(args.manifest, classes=classes)
    except ManifestError as err:
        raise UserError(f"invalid manifest:\n{err}") from err
    sites = manifest.sites
    problems = precheck(manifest)
    if problems:
        raise UserError(problems)
    try:
        run = federation_config(
            args.manifest, run_dir=out, resume=args.resume, classes=classes, **run_settings(args, len(sites))
        )
    except ValidationError as err:
        raise UserError(f"invalid settings: {err}") from err
    check_run_folder(RunFolder(out), run)
    table = site_table(
        args.manifest, val_fraction=run.val_fraction, test_fraction=run.test_fraction, split_seed=run.split_seed,
        local=False, classes=classes,
    )  # fmt: skip
    for line in table:
        print(f"  {line}")
    print(
        f"FedProx (μ={run.proximal_mu}) over {len(sites)} sites ({', '.join(sites)}), {run.num_server_rounds} rounds"
    )
    try:
        result = simulate(run, sites=len(sites), cpus_per_site=args.cpus_per_site)
    except SimulationError as err:
        raise UserError(str(err)) from err
    model, _ = load_model(RunFolder(out).model)
    print("\nFinal global model, held-out test patients of each site:")
    print(f"{'site':<12} {'patients':>8} {'positive':>8} {'AUROC':>7}")
    for row in held_out_auroc(model, args.manifest, run):
        print(f"{row.site:<12} {row.patients:>8} {row.positives:>8} {row.auroc:>7.3f}")
    folder = RunFolder(out)
    print(
        f"\ndone in {result.seconds:.0f} s; outputs in {out}/ ({folder.model.name}, {folder.card_md.name}, "
        f"{folder.round_log.name}, checkpoints/, server.log)"
    )
    never = sites_that_never_trained(result.rounds, len(sites))
    if never:
        for site, why in never.items():
            print(f"site {site} trained in no round ({why}); its log: {out / 'site-logs'}", file=sys.stderr)
        print("the model was trained without them: exit 1", file=sys.stderr)
        return 1
    return 0


COMMAND = Command(
    name="simulate",
    help="simulated FedProx federation: one site per manifest site",
    description="Run a FedProx federation on Flower's simulation engine, one simulated site per site of the "
    "manifest, with the same ServerApp and ClientApp as a real deployment. Every round is checkpointed and "
    "logged in --out; --resume continues an interrupted run from its last checkpoint. To compare it with "
    "local-only and pooled training at held-out sites, use `fedpath compare`.",
    add_arguments=_add_arguments,
    run=_run,
)
