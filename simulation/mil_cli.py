"""`fedpath mil`: turn a multiple-instance table (MUSK1, MUSK2) into a multi-site fedpath cohort."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpath.common.cli import Command, UserError


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from fedpath.common.options import add_model_options
    from fedpath.simulation.cohorts import MilCohortConfig

    p.add_argument(
        "table", type=Path, help="the table: musk1.csv (no header) or musk2.tsv.gz (PMLB's clean2)"
    )
    p.add_argument("--out", required=True, type=Path, help="folder for features/, manifest.csv, cohort.json")
    p.add_argument("--name", help="prefix of the bag ids (default: the table's name, e.g. musk1)")
    add_model_options(p.add_argument_group("sites"), MilCohortConfig, MilCohortConfig.model_fields)
    p.add_argument("--overwrite", action="store_true", help="replace a cohort with other settings in --out")


def _run(args: argparse.Namespace) -> int:
    from fedpath.common.options import build_model, model_values
    from fedpath.simulation.cohorts import CohortError, MilCohortConfig, mil_cohort

    config = build_model(MilCohortConfig, model_values(args, MilCohortConfig), what="cohort settings")
    try:
        cohort = mil_cohort(args.table, args.out, config, name=args.name, overwrite=args.overwrite)
    except CohortError as err:
        raise UserError(str(err)) from err
    except FileExistsError as err:
        raise UserError(f"{err} (or --overwrite)") from err
    print(cohort.notes[0])
    print("sites (bags): " + ", ".join(f"{s} ({n})" for s, n in cohort.sites.items()))
    print(f"cohort: {cohort.manifest}")
    print(
        f"next: fedpath manifest check {cohort.manifest}\n"
        f"      fedpath compare --manifest {cohort.manifest} --protocol cv --out RUN"
    )
    return 0


COMMAND = Command(
    name="mil",
    help="turn a multiple-instance table (MUSK1, MUSK2) into a multi-site cohort",
    description="Convert a multiple-instance table into fedpath feature files (one per bag, its instances as "
    "tiles, raw values) and a manifest with one patient per bag, its sites dealt stratified by label: equal "
    "shares (round-robin) or unequal ones (--size-skew, as `fedpath synth`). For testing that MIL and "
    "federated training learn on real bags (the MUSK data are molecules, not pathology).",
    add_arguments=_add_arguments,
    run=_run,
)
