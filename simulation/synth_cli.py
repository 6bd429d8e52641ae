"""`fedpath synth`: write a synthetic multi-site cohort (feature files and a manifest)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpath.common.cli import Command, UserError

# option name → SynthConfig field, with the help text taken from the field's description
_OPTIONS = {
    "sites": "sites",
    "slides": "slides",
    "dim": "dim",
    "shift": "shift",
    "prevalence": "prevalence",
    "prevalence-skew": "prevalence_skew",
    "size-skew": "size_skew",
    "multi-slide-fraction": "multi_slide_fraction",
    "tiles-median": "tiles_median",
    "witness-min": "witness_min",
    "witness-max": "witness_max",
    "signal": "signal",
    "seed": "seed",
}


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="folder for features/, manifest.csv, cohort.json")
    add_cohort_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace a cohort with other settings in --out")


def add_cohort_options(p: argparse.ArgumentParser) -> None:
    from fedpath.simulation.synth import SynthConfig

    g = p.add_argument_group("synthetic cohort")
    for option, field in _OPTIONS.items():
        info = SynthConfig.model_fields[field]
        kind = type(info.default)
        g.add_argument(f"--{option}", type=kind, default=info.default, help=info.description or field)


def cohort_config(args: argparse.Namespace) -> object:
    from pydantic import ValidationError

    from fedpath.simulation.synth import SynthConfig

    try:
        return SynthConfig(**{field: getattr(args, field) for field in _OPTIONS.values()})
    except ValidationError as err:
        raise UserError(f"invalid cohort settings: {err}") from err


def _run(args: argparse.Namespace) -> int:
    from fedpath.simulation.synth import SynthConfig, synthesize

    config = cohort_config(args)
    assert isinstance(config, SynthConfig)
    try:
        manifest = synthesize(args.out, config, overwrite=args.overwrite)
    except FileExistsError as err:
        raise UserError(str(err)) from err
    print(f"synthetic cohort: {config.slides} slides at {config.sites} sites -> {manifest}")
    print(f"next: fedpath manifest check {manifest}")
    return 0


COMMAND = Command(
    name="synth",
    help="write a synthetic multi-site cohort (feature files + manifest)",
    description="Write a seeded synthetic multi-site cohort: real fedpath feature files and a manifest, with "
    "heavy-tailed site sizes, per-site prevalence, an affine per-site feature shift and bags in which a "
    "minority of tiles carries the label.",
    add_arguments=_add_arguments,
    run=_run,
)
