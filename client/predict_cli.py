"""`fedpath predict --model RUN --manifest M | --features DIR --out OUT`: apply a finished model at a site.

Only argparse at import: torch loads inside `_run`, so ``fedpath --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from fedpath.common.cli import Command, UserError

DESCRIPTION = (
    "Apply a finished model to patients at this site, offline. Writes OUT/predictions.csv (a row per slide and "
    "per patient: a probability per class, the predicted class, its uncertainty, the model's run, round and "
    "SHA-256) and OUT/predict.json; with --heatmaps, per slide where the slide file is reachable: an attention "
    "map over the thumbnail (PNG), the top and bottom tiles (JPEG), and every tile's scores as GeoJSON for "
    "QuPath. Features made with another encoder, weights or tile size than the model's are refused. "
    "Example: fedpath predict --model runs/fed --features feats/features --out preds/ --heatmaps --slides slides/"
)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(
        slides=None,
        manifest=None,
        features=None,
        allow_encoder_mismatch=False,
        heatmaps=False,
        coverage=None,
        recalibrate=None,
    )
    hide = argparse.SUPPRESS
    p.add_argument(
        "--model",
        type=Path,
        nargs="+",
        required=True,
        default=hide,
        help="run folder (its model.pt) or model file; several: an ensemble (mean, spread, union of sets)",
    )
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument(
        "--manifest", type=Path, help="cohort manifest: slide, patient, site, label, features, slide"
    )
    given.add_argument(
        "--features", type=Path, help="folder of feature files: each a slide and its own patient"
    )
    p.add_argument(
        "--slides", type=Path, help="with --features: folder of the whole-slide images (for --heatmaps)"
    )
    p.add_argument("--out", type=Path, required=True, default=hide, help="output folder")
    p.add_argument(
        "--heatmaps", action="store_true", help="attention heatmaps, top/bottom tiles and GeoJSON per slide"
    )
    p.add_argument("--top-k", type=int, default=8, help="tiles in each of the top and bottom galleries")
    p.add_argument("--coverage", type=float, help="of the prediction sets (default: the model's, 0.9)")
    p.add_argument(
        "--recalibrate",
        type=Path,
        metavar="MANIFEST",
        help="labelled patients of this site (other than those predicted): the prediction sets' threshold is "
        "refitted on them, so that their coverage holds here (at least 9 patients for 90 %%)",
    )
    p.add_argument(
        "--allow-encoder-mismatch",
        action="store_true",
        help="predict on features whose encoder, weights or tile size differ from the model's (recorded)",
    )


def _checked(
    pr: Any, models: list[Any], slides: list[Any], allow_mismatch: bool
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The slides' headers, checked against every model (`predict.check_inputs`), and the differences allowed
    by --allow-encoder-mismatch per slide, each said once across the models."""
    mismatches: dict[str, list[str]] = {}
    for model in models:
        infos, found_by_slide = pr.check_inputs(model, slides, allow_mismatch=allow_mismatch)
        for slide, found in found_by_slide.items():
            mismatches.setdefault(slide, []).extend(f for f in found if f not in mismatches.get(slide, []))
    return infos, mismatches


def _tile_side_px(info: Any) -> int:
    """A tile's side in level-0 pixels: its physical size over the slide's µm/px where both are known."""
    if info.tile_size_um and info.slide_mpp:
        return max(1, round(info.tile_size_um / info.slide_mpp))
    if info.tile_size_px:
        return int(info.tile_size_px)
    raise UserError(f"{info.path}: states neither its tile size in µm with the slide's µm/px nor in pixels")


def _run(args: argparse.Namespace) -> int:
    from fedpath.client.extract_cli import prepare_environment

    prepare_environment()
    from tqdm import tqdm

    from fedpath.client import predict as pr
    from fedpath.common.features import FeatureFileError
    from fedpath.common.manifest import ManifestError

    if args.top_k < 1:
        raise UserError("--top-k must be at least 1")
    if args.coverage is not None and not 0 < args.coverage < 1:
        raise UserError(f"--coverage must be between 0 and 1 (e.g. 0.9), got {args.coverage}")
    if args.slides is not None and args.features is None:
        raise UserError("--slides goes with --features (a manifest names each slide in its 'slide' column)")
    try:
        models = [pr.load_for_prediction(path) for path in args.model]
        pr.check_ensemble(models)
        loaded = models[0]
        if args.manifest is not None:
            slides = pr.slides_from_manifest(args.manifest)
        else:
            if not args.features.is_dir():
                raise UserError(f"--features {args.features}: not a folder")
            slides = pr.slides_from_folder(args.features, args.slides)
        infos, mismatches = _checked(pr, models, slides, args.allow_encoder_mismatch)
        recalibration_mismatches: dict[str, list[str]] = {}
        if args.recalibrate is not None:
            local = pr.slides_from_manifest(args.recalibrate)
            local_infos, recalibration_mismatches = _checked(pr, models, local, args.allow_encoder_mismatch)
            models = [pr.recalibrate(m, local, coverage=args.coverage, infos=local_infos) for m in models]
            loaded = models[0]
            both = {s.patient_id for s in local} & {s.patient_id for s in slides}
            if both:
                print(
                    f"WARNING: {len(both)} patients are both predicted and recalibrated on: their prediction "
                    "sets cover them by construction; recalibrate on other patients of this site",
                    file=sys.stderr,
                )
    except (pr.PredictError, ManifestError, FeatureFileError) as err:
        raise UserError(str(err)) from err
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a folder")
    for which, allowed in (("", mismatches), ("recalibration ", recalibration_mismatches)):
        for slide, listed in allowed.items():
            print(
                f"WARNING: {which}slide '{slide}': {'; '.join(listed)} (allowed by --allow-encoder-mismatch)",
                file=sys.stderr,
            )

    drawn: dict[str, dict[str, str | None]] = {}
    on_slide = None
    if args.heatmaps:
        from fedpath.client.heatmaps import write_heatmaps

        sides = {slide.slide_id: _tile_side_px(infos[slide.slide_id]) for slide in slides}  # checked first

        def on_slide(slide: Any, coords: Any, _features: Any, scores: Any) -> None:
            if coords is None:
                drawn[slide.slide_id] = {"png": None, "geojson": None, "gallery": None}
                print(f"heatmaps: slide '{slide.slide_id}' skipped: its feature file has no tile coordinates")
                return
            maps = {"attention": scores.attention}
            k = int(next(iter(scores.evidence)))  # the class whose map was computed: the predicted one
            label = loaded.classes[k]
            maps[f"attention_x_gradient_{label}"] = scores.evidence[str(k)]
            files = write_heatmaps(
                args.out / "heatmaps",
                slide.slide_id,
                coords,
                sides[slide.slide_id],
                maps,
                slide.slide_path,
                top_k=args.top_k,
                title=f"predicted {label} (p = {float(scores.probs[k]):.2f})",
            )
            drawn[slide.slide_id] = {
                "png": None if files.png is None else str(files.png),
                "geojson": str(files.geojson),
                "gallery": None if files.gallery is None else str(files.gallery),
            }

    with tqdm(total=len(slides), unit="slide", desc="predict", disable=None) as bar:
        try:
            rows = pr.predict_slides(
                models,
                slides,
                on_slide=on_slide,
                progress=bar.update,
                evidence=args.heatmaps,
                coverage=args.coverage,
                infos=infos,
            )
        except FeatureFileError as err:  # a file changed or broken since it was checked: nothing is written
            raise UserError(f"{err} (nothing was written to {args.out})") from err
    summary = {
        **pr.identity(models),
        "model_files": [str(m.path) for m in models],
        "classes": loaded.classes,
        "training_features": loaded.checkpoint.features,
        "input": str((args.manifest or args.features).resolve()),
        "slides": len(slides),
        "patients": sum(1 for r in rows if r["level"] == "patient"),
        "allow_encoder_mismatch": bool(args.allow_encoder_mismatch),
        "encoder_mismatches": mismatches,
        "recalibration_encoder_mismatches": recalibration_mismatches,
        "heatmaps": drawn,
        "calibration": [_calibration_summary(m, args.coverage) for m in models],
        "recalibrated_on": None if args.recalibrate is None else str(args.recalibrate.resolve()),
    }
    csv_path, json_path = pr.write_outputs(args.out, rows, summary)
    patients = [r for r in rows if r["level"] == "patient"]
    counts = Counter(r["predicted"] for r in patients)
    print(
        f"{len(slides)} slides, {len(patients)} patients; predicted "
        + ", ".join(f"{c}: {counts.get(c, 0)}" for c in loaded.classes)
    )
    for m in models:
        print(f"model: {m.path} (run {m.run}, round {m.checkpoint.round}, sha256 {m.sha256[:12]}…)")
    if len(models) > 1:
        print(
            f"ensemble of {len(models)} models: mean probability, 'spread' = SD across them, union of their sets"
        )
    if all(m.calibration is not None for m in models):
        abstained = sum(1 for r in patients if r["abstain"] == "true")
        temperatures = ", ".join(f"{m.calibration.temperature:.3g}" for m in models if m.calibration)
        where = (
            "fitted at the training sites"
            if args.recalibrate is None
            else f"refitted on {loaded.calibration.patients} labelled patients of this site"  # type: ignore[union-attr]
        )
        print(
            f"calibrated: temperature {temperatures}; prediction sets at "
            f"{100 * (args.coverage or loaded.calibration.coverage):.0f} % coverage, {where}; "  # type: ignore[union-attr]
            f"abstained on {abstained} of {len(patients)} patients"
        )
    else:
        print("not calibrated: a model carries no calibration; no prediction sets")
    _print_evaluation(patients, loaded.classes)
    if args.heatmaps:
        reachable = sum(1 for d in drawn.values() if d["png"])
        print(
            f"heatmaps: {reachable} of {len(drawn)} slides drawn over the slide (others: GeoJSON only) in {args.out / 'heatmaps'}"
        )
    print(f"outputs: {csv_path}, {json_path}")
    return 0


def _calibration_summary(loaded: Any, coverage: float | None) -> dict[str, Any] | str:
    cal = loaded.calibration
    if cal is None:
        return (
            "none: the model carries no calibration (a DP run, or an older model); probabilities are its own"
        )
    chosen = coverage or cal.coverage
    return {
        "temperature": cal.temperature,
        "coverage": chosen,
        "threshold": cal.threshold_for(chosen),
        "calibration_patients": cal.patients,
        "calibration_sites": cal.sites,
    }


def _print_evaluation(patients: list[dict[str, Any]], classes: list[str]) -> None:
    """With known labels (a manifest), patient-level AUROC: a check that the model works here."""
    import numpy as np

    from fedpath.common.metrics import auroc

    known = [r for r in patients if r["label"] in classes]
    if len(known) < 2:
        return
    labels = np.array([classes.index(r["label"]) for r in known])
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in known])
    value = auroc(labels, probs if len(classes) > 2 else probs[:, 1])
    if np.isfinite(value):
        print(f"patients with a known label: {len(known)}, AUROC {value:.3f}")


COMMAND = Command(
    name="predict",
    help="site: apply a finished model to patients (probabilities, uncertainty, heatmaps)",
    add_arguments=_add_arguments,
    run=_run,
    description=DESCRIPTION,
)
