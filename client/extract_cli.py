"""`fedpath extract INPUT --out DIR --encoder NAME`: whole-slide images → tissue tiles → feature files.

Only argparse at import: torch, timm and OpenSlide load inside `_run`, so ``fedpath --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedpath.common.cli import Command, UserError

DESCRIPTION = (
    "Cut tissue tiles of a physical size from whole-slide images and encode them with a timm model. "
    "INPUT: a folder of slides (any format OpenSlide reads; png/jpg with an MPP) or a cohort manifest CSV with "
    "a 'slide' column. Writes OUT/features/<slide>.h5, OUT/qc/<slide>.png, OUT/manifest.csv, "
    "OUT/extraction_report.csv. Slides from a folder get label 'unknown' (TCGA patient and site from the "
    "name): fill in labels before training. Reruns skip finished slides. Exit 0: all done; 1: a slide failed "
    "(see the report); 2: usage error. Example: fedpath extract slides/ --out feats/ --encoder resnet50 "
    "--weights resnet50.safetensors"
)


def prepare_environment() -> None:
    """Defaults that must be in the environment before torch loads; settings the user made win."""
    # no downloads, ever: a hospital runs offline, and a hung download is worse than a clear error
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # tile-reading workers share the cores with torch's OpenMP threads; spin-waiting threads then stall each
    # other (forward passes 2-5x slower on a busy 2-core machine), while passive waiting costs little
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _add_arguments(p: argparse.ArgumentParser) -> None:
    # options without a meaningful default hide the launcher's "(default: None)" to keep --help on one screen
    quiet = {
        "weights": None,
        "random_init": False,
        "model_kwargs": None,
        "tile_mpp": None,
        "assume_mpp": None,
        "workers": None,
        "no_amp": False,
        "float16": False,
        "overwrite": False,
    }
    p.set_defaults(**quiet)
    hide = argparse.SUPPRESS
    p.add_argument("input", type=Path, help="folder of slides, or manifest CSV with a 'slide' column")
    p.add_argument("--out", type=Path, required=True, default=hide, help="output folder")
    enc = p.add_argument_group("encoder")
    enc.add_argument(
        "--encoder",
        required=True,
        default=hide,
        metavar="NAME",
        help="timm model, e.g. resnet50, hf-hub:MahmoodLab/uni",
    )
    enc.add_argument(
        "--weights",
        type=Path,
        default=hide,
        metavar="PATH",
        help="weights file (default: the offline Hugging Face cache)",
    )
    enc.add_argument("--random-init", action="store_true", default=hide, help="random weights: tests, demos")
    enc.add_argument("--model-kwargs", metavar="JSON", default=hide, help="extra timm.create_model arguments")
    tiles = p.add_argument_group("tiles")
    tiles.add_argument("--tile-um", type=_positive_float, default=256.0, metavar="UM", help="tile side in µm")
    tiles.add_argument(
        "--tile-mpp",
        type=_positive_float,
        default=hide,
        metavar="MPP",
        help="tile resolution in µm/px (replaces --tile-um)",
    )
    tiles.add_argument(
        "--tile-px", type=int, default=224, metavar="PX", help="tile side as the encoder sees it"
    )
    tiles.add_argument("--min-tissue", type=float, default=0.25, metavar="F", help="least tissue fraction")
    tiles.add_argument(
        "--assume-mpp",
        type=_positive_float,
        default=hide,
        metavar="MPP",
        help="µm/px at level 0 for slides whose metadata has none",
    )
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) or a torch device")
    run.add_argument("--batch-size", type=int, default=64, metavar="N", help="tiles per forward pass")
    run.add_argument(
        "--workers",
        type=int,
        default=hide,
        metavar="N",
        help="tile-reading processes (default: cores - 1, at most 4)",
    )
    run.add_argument("--no-amp", action="store_true", default=hide, help="full precision on GPU")
    run.add_argument("--float16", action="store_true", default=hide, help="store features as float16")
    run.add_argument("--overwrite", action="store_true", default=hide, help="redo slides already done")


def _run(args: argparse.Namespace) -> int:
    prepare_environment()
    from fedpath.client.encoders import EncoderError, load_encoder, parse_model_kwargs
    from fedpath.client.extract import ExtractSettings, default_workers, extract_cohort, find_jobs
    from fedpath.common.manifest import ManifestError
    from fedpath.common.units import Microns, MicronsPerPixel, TilePixels

    if args.tile_px < 8:
        raise UserError(f"--tile-px {args.tile_px} is too small; use at least 8 (usually 224)")
    if not 0 <= args.min_tissue <= 1:
        raise UserError(f"--min-tissue {args.min_tissue} must be a fraction between 0 and 1")
    if not args.input.exists():
        raise UserError(f"{args.input}: no such folder or manifest")
    tile_um = args.tile_mpp * args.tile_px if args.tile_mpp else args.tile_um
    try:
        jobs = find_jobs(args.input)
    except (ManifestError, ValueError) as err:
        raise UserError(str(err)) from err
    try:
        encoder = load_encoder(
            args.encoder,
            tile_px=TilePixels(args.tile_px),
            weights=args.weights,
            random_init=args.random_init,
            model_kwargs=parse_model_kwargs(args.model_kwargs),
            device=args.device,
            amp=not args.no_amp,
        )
    except EncoderError as err:
        raise UserError(str(err)) from err
    settings = ExtractSettings(
        tile_um=Microns(tile_um),
        tile_px=TilePixels(args.tile_px),
        min_tissue=args.min_tissue,
        assume_mpp=None if args.assume_mpp is None else MicronsPerPixel(args.assume_mpp),
        batch_size=args.batch_size,
        workers=default_workers() if args.workers is None else args.workers,
        dtype="float16" if args.float16 else "float32",
        overwrite=args.overwrite,
    )
    print(
        f"{len(jobs)} slides, encoder {encoder.name} ({encoder.dim} features, {encoder.weights_source}) on "
        f"{encoder.device}, tiles of {tile_um:g} µm at {args.tile_px} px",
        file=sys.stderr,
    )
    cohort = extract_cohort(jobs, encoder, settings, args.out)

    failed = [r for r in cohort.results if r.status == "error"]
    for r in failed:
        print(f"error: {r.error}", file=sys.stderr)
    for r in cohort.results:
        if r.status == "no_tiles":
            print(f"warning: {r.error}", file=sys.stderr)
    layout = cohort.layout
    print(
        f"{cohort.count('done')} done, {cohort.count('skipped')} skipped (already done), "
        f"{cohort.count('no_tiles')} without tiles, {len(failed)} failed"
    )
    print(f"features: {layout.root / 'features'}")
    print(f"QC images: {layout.root / 'qc'}")
    print(f"manifest: {layout.manifest if cohort.manifest_written else '(none: no slide has features)'}")
    print(f"report: {layout.report}")
    return 1 if failed or not cohort.manifest_written else 0


COMMAND = Command(
    name="extract",
    help="whole-slide images → tissue tiles → feature files",
    description=DESCRIPTION,
    add_arguments=_add_arguments,
    run=_run,
)
