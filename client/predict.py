"""Apply a finished model to a hospital's patients, offline, at the site: `fedpath predict`.

Input: a model (a run folder's ``model.pt``, or any checkpoint file) and the slides' feature files, named by a
manifest (slide, patient, site, label: the labels are used for nothing but the evaluation columns) or found in
a folder (fedpath, STAMP or CLAM/TRIDENT layout; each file a slide and its own patient). Output, written only
after every input was checked: ``predictions.csv`` with one row per slide and one per patient (a patient's
slides pooled into one bag, as in training), one probability column per class named by its label, the
predicted class and its uncertainty (1 − the highest probability), and the model's identity (run folder, round,
SHA-256 of the model file) in every row, and, when the model carries the calibration its sites agreed on
(`fedpath.common.calibration`), temperature-scaled probabilities, a conformal prediction set and an
``abstain`` flag (the set is not a single class); ``predict.json`` with the same identity, the inputs and what was
allowed. Features made with another encoder, weights or tile size than the model's training features are
refused, naming the slide and both values, unless the user allows it (recorded).

Nothing here leaves the site: it reads local files and writes into the given folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fedpath.common.atomic import write_text_atomic
from fedpath.common.calibration import Calibration, prediction_sets, refit_threshold
from fedpath.common.features import (
    FeatureFileError,
    FeatureFileInfo,
    TileFeatures,
    inspect_features,
    provenance,
    provenance_mismatch,
    read_features,
    read_matrix,
)
from fedpath.common.manifest import load_manifest
from fedpath.common.modelfile import Checkpoint, RunFolderError, load_model

FEATURE_SUFFIXES = (".h5", ".hdf5")
PREDICTIONS = "predictions.csv"
SUMMARY = "predict.json"


class PredictError(ValueError):
    """Input that cannot be predicted on; the message names the file (and slide) and what to do."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to apply, with what identifies it and what it was trained on."""

    model: nn.Module
    checkpoint: Checkpoint
    path: Path  # the model file
    sha256: str  # of the model file's bytes
    classes: list[str]  # class labels in index order
    calibration: Calibration | None = None  # temperature and conformal threshold the sites agreed on

    @property
    def run(self) -> str:
        return self.path.parent.name

    def identity(self) -> dict[str, Any]:
        return {"model_run": self.run, "model_round": self.checkpoint.round, "model_sha256": self.sha256}


@dataclass(frozen=True)
class Slide:
    slide_id: str
    patient_id: str
    features: Path
    label: str | None = None  # known label (manifest), for evaluation only
    slide_path: Path | None = None  # the whole-slide image, when known (heatmaps)


@dataclass
class SlideScores:
    """What the model computed for one bag (a slide, or a patient's slides): probabilities, tiles' attention."""

    probs: np.ndarray  # (C,)
    attention: np.ndarray  # (N,) over the bag's tiles, sums to 1
    evidence: dict[str, np.ndarray] = field(default_factory=dict)  # class label -> (N,) class-specific map


def load_for_prediction(path: Path) -> LoadedModel:
    """The model of a run folder (its ``model.pt``) or of a model/checkpoint file."""
    file = path / "model.pt" if path.is_dir() else path
    if not file.is_file():
        hint = (
            " (a run folder without model.pt: its run has not finished, or no site trained)"
            if path.is_dir()
            else ""
        )
        raise PredictError(f"{file}: no model file{hint}")
    try:
        model, ckpt = load_model(file)
    except (RunFolderError, KeyError, RuntimeError, ValueError) as err:
        raise PredictError(f"{file}: not a fedpath model file ({err})") from err
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    num_classes = int(ckpt.config.get("num_classes", 2))
    stated = [c for c in str(ckpt.config.get("classes") or "").split(",") if c]
    classes = stated if len(stated) == num_classes else [str(i) for i in range(num_classes)]
    calibration = Calibration.from_dict(ckpt.calibration) if ckpt.calibration else None
    return LoadedModel(model, ckpt, file.resolve(), digest, classes, calibration)


def slides_from_manifest(manifest: Path) -> list[Slide]:
    m = load_manifest(manifest)
    missing = [s for s in m.slides if s.features is None]
    if missing:
        raise PredictError(
            f"{manifest}: line {missing[0].line}, slide '{missing[0].slide_id}' has no features path; "
            "run `fedpath extract` first or fill the 'features' column"
        )
    return [
        Slide(s.slide_id, s.patient_id, s.features, s.label, s.slide)  # type: ignore[arg-type]
        for s in m.slides
    ]


def slides_from_folder(folder: Path, slides_dir: Path | None = None) -> list[Slide]:
    """Every feature file in `folder` (not recursive) as a slide of its own patient, named by its file stem;
    the whole-slide image is looked up in `slides_dir` by the same stem (any extension)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FEATURE_SUFFIXES)
    if not files:
        raise PredictError(f"{folder}: no feature files (*.h5) in this folder")
    images = {}
    if slides_dir is not None:
        images = {
            p.stem: p
            for p in sorted(slides_dir.iterdir())
            if p.is_file() and p.suffix.lower() not in FEATURE_SUFFIXES
        }
    return [Slide(p.stem, p.stem, p, None, images.get(p.stem)) for p in files]


def check_inputs(
    loaded: LoadedModel, slides: Sequence[Slide], *, allow_mismatch: bool
) -> tuple[dict[str, FeatureFileInfo], dict[str, list[str]]]:
    """Headers of every slide's feature file, checked against the model before anything is computed: readable,
    at least one tile, the model's feature dimension, and the encoder/weights/tile size the model's training
    features stated. Returns the headers and, when allowed, the mismatches (slide -> differences)."""
    in_dim = int(loaded.checkpoint.config["in_dim"])
    expected = loaded.checkpoint.features
    seen: dict[str, Slide] = {}
    infos: dict[str, FeatureFileInfo] = {}
    mismatches: dict[str, list[str]] = {}
    for slide in slides:
        if slide.slide_id in seen:
            raise PredictError(
                f"slide '{slide.slide_id}' is listed twice ({seen[slide.slide_id].features}, {slide.features})"
            )
        seen[slide.slide_id] = slide
        try:
            info = inspect_features(slide.features)
        except FeatureFileError as err:
            raise PredictError(f"slide '{slide.slide_id}': {err}") from err
        if info.n_tiles < 1:
            raise PredictError(f"slide '{slide.slide_id}': {slide.features} holds no tiles; re-extract it")
        if info.dim != in_dim:
            raise PredictError(
                f"slide '{slide.slide_id}': {slide.features} has {info.dim}-dimensional features but the model "
                f"takes {in_dim}: extract with the model's encoder"
            )
        differ = provenance_mismatch(expected, provenance(info))
        if differ and not allow_mismatch:
            raise PredictError(
                f"slide '{slide.slide_id}' ({slide.features}) was not made like the model's training features: "
                f"{'; '.join(differ)}. Re-extract with the model's encoder, or pass --allow-encoder-mismatch "
                "(recorded in predict.json) if you know they are equivalent"
            )
        if differ:
            mismatches[slide.slide_id] = differ
        infos[slide.slide_id] = info
    return infos, mismatches


def score_bag(
    model: nn.Module,
    features: np.ndarray,
    *,
    evidence: bool | Sequence[int] | Literal["predicted"] = False,
    temperature: float = 1.0,
) -> SlideScores:
    """Probabilities softmax(logits / temperature) and attention of one bag (`model` in eval mode); with
    `evidence` (True: every class; a list: those classes; "predicted": the bag's most probable class), per
    class the tiles' attention × gradient map: a tile's attention times its positive gradient × input evidence
    for that class's logit (zero where the tile speaks against the class). Each class costs a backward pass."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None]
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    if evidence is False:
        with torch.no_grad():
            out = model(x, mask)
        return SlideScores(torch.softmax(out.logits / temperature, -1)[0].numpy(), out.attention[0].numpy())
    x.requires_grad_(True)
    out = model(x, mask)
    attention = out.attention[0].detach().numpy()
    probs = torch.softmax(out.logits.detach() / temperature, -1)[0].numpy()
    if evidence == "predicted":
        classes = [int(probs.argmax())]
    else:
        classes = list(range(out.logits.shape[-1])) if evidence is True else [int(k) for k in evidence]
    maps = {}
    for i, k in enumerate(classes):
        (grad,) = torch.autograd.grad(out.logits[0, k], x, retain_graph=i < len(classes) - 1)
        contribution = (grad[0] * x[0]).sum(-1).detach().numpy()
        maps[str(k)] = attention * np.maximum(contribution, 0.0)
    return SlideScores(probs, attention, maps)


@dataclass(frozen=True)
class _Row:
    level: str
    patient: str
    slide: str
    tiles: int
    label: str | None


@dataclass(frozen=True)
class _Scored:
    probs: np.ndarray  # (C,) the members' mean
    spread: np.ndarray | None  # (C,) SD across the members; None for one model
    members: list[int] | None  # the prediction set; None when a member carries no calibration


def check_ensemble(models: Sequence[LoadedModel]) -> None:
    """Models applied together must take the same features and name the same classes in the same order."""
    first = models[0]
    for other in models[1:]:
        for what, a, b in (
            ("classes", first.classes, other.classes),
            ("in_dim", first.checkpoint.config.get("in_dim"), other.checkpoint.config.get("in_dim")),
        ):
            if a != b:
                raise PredictError(
                    f"{other.path} has {what} {b} but {first.path} has {a}: an ensemble's models must agree"
                )


def identity(models: Sequence[LoadedModel]) -> dict[str, Any]:
    """Run, round and SHA-256 of the model, or of each model of an ensemble joined by ';'."""
    ids = [m.identity() for m in models]
    return {k: ";".join(str(i[k]) for i in ids) for k in ids[0]}


def _row(models: Sequence[LoadedModel], what: _Row, scored: _Scored) -> dict[str, Any]:
    classes = models[0].classes
    probs = scored.probs
    k = int(np.argmax(probs))
    if scored.members is None:  # uncalibrated: no prediction set, no abstention
        chosen, abstain = "", ""
    else:
        chosen = "|".join(classes[c] for c in scored.members)
        abstain = "false" if len(scored.members) == 1 else "true"
    return {
        "level": what.level,
        "patient_id": what.patient,
        "slide_id": what.slide,
        "tiles": what.tiles,
        **{f"prob_{c}": f"{float(p):.6f}" for c, p in zip(classes, probs, strict=True)},
        "predicted": classes[k],
        "uncertainty": f"{1.0 - float(probs[k]):.6f}",
        "spread": "" if scored.spread is None else f"{float(scored.spread[k]):.6f}",
        "prediction_set": chosen,
        "abstain": abstain,
        "label": "" if what.label is None else what.label,
        **identity(models),
    }


_Patients = dict[str, tuple[_Scored, int, set[str | None]]]  # patient → scores, tiles, labels of their slides


def predict_slides(
    loaded: LoadedModel | Sequence[LoadedModel],
    slides: Sequence[Slide],
    *,
    on_slide: Callable[[Slide, np.ndarray | None, np.ndarray, SlideScores], None] | None = None,
    progress: Callable[[int], object] | None = None,
    evidence: bool = False,
    coverage: float | None = None,
    infos: Mapping[str, FeatureFileInfo] | None = None,
    scored_patients: _Patients | None = None,
) -> list[dict[str, Any]]:
    """Rows of predictions.csv: every slide, then every patient (all its slides' tiles in one bag, as in
    training), with the model's calibration when it has one (`coverage`: of the prediction sets, default the
    model's). Several models (an ensemble, e.g. seeds) give the mean probability, its SD across the models
    (``spread``) and the union of their conformal sets (covering at least as often as each model's; none when
    a model carries no calibration). `on_slide(slide, coords_px or None, features, scores)` sees each slide's
    scores: the members' mean attention and, with `evidence`, the mean attention × gradient map of the
    predicted class (heatmaps). `infos`: the headers from `check_inputs`. `scored_patients`, when given, is
    filled with each patient's scores as computed (not rounded into a row), their tiles and their labels."""
    models = [loaded] if isinstance(loaded, LoadedModel) else list(loaded)
    check_ensemble(models)
    thresholds = [
        None if m.calibration is None else m.calibration.threshold_for(coverage or m.calibration.coverage)
        for m in models
    ]

    temperatures = [1.0 if m.calibration is None else m.calibration.temperature for m in models]
    for m in models:
        m.model.eval()

    def score(features: np.ndarray, with_evidence: bool) -> tuple[SlideScores, _Scored]:
        members = list(zip(models, temperatures, strict=True))
        if with_evidence and len(models) == 1:
            outs = [score_bag(models[0].model, features, evidence="predicted", temperature=temperatures[0])]
        else:
            outs = [score_bag(m.model, features, temperature=t) for m, t in members]
            if with_evidence:  # the ensemble's predicted class: then each member's map of it
                k = int(np.mean([o.probs for o in outs], axis=0).argmax())
                outs = [score_bag(m.model, features, evidence=[k], temperature=t) for m, t in members]
        stacked = np.stack([o.probs for o in outs])
        stated = [t for t in thresholds if t is not None]
        sets = None
        if len(stated) == len(outs):
            sets = sorted(
                {c for o, t in zip(outs, stated, strict=True) for c in prediction_sets(o.probs, t)[0]}
            )
        mean = SlideScores(
            stacked.mean(axis=0),
            np.mean([o.attention for o in outs], axis=0),
            {k: np.mean([o.evidence[k] for o in outs], axis=0) for k in outs[0].evidence},
        )
        return mean, _Scored(mean.probs, stacked.std(axis=0) if len(outs) > 1 else None, sets)

    rows: list[dict[str, Any]] = []
    known = infos or {}
    slides_of = Counter(s.patient_id for s in slides)
    # a patient of several slides is scored on all their tiles in one bag once the last slide is read; only
    # such a patient's tiles wait in memory, and only until then
    waiting: dict[str, list[np.ndarray]] = {}
    patients: _Patients = {} if scored_patients is None else scored_patients

    def read(slide: Slide) -> TileFeatures:  # coordinates only for heatmaps
        info = known.get(slide.slide_id) or inspect_features(slide.features)
        if on_slide is None:
            return TileFeatures(read_matrix(info), None, None, info)
        return read_features(slide.features, info)

    def prefetched(slide: Slide) -> bool:
        # The next slide is read by a thread while the model scores this one when its matrix can be read as
        # plain bytes (a fedpath file, or any uncompressed one): that read lets the model run. h5py's reads hold
        # the GIL, and a reader thread using them only stalled the model (benchmarks/bench_predict.py).
        info = known.get(slide.slide_id)
        return on_slide is None and info is not None and info.extent is not None

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedpath-read")
    ahead: Future[TileFeatures] | None = None
    try:
        for i, slide in enumerate(slides):
            tiles = read(slide) if ahead is None else ahead.result()
            ahead = (
                pool.submit(read, slides[i + 1])
                if i + 1 < len(slides) and prefetched(slides[i + 1])
                else None
            )
            scores, scored = score(tiles.features, evidence)
            what = _Row("slide", slide.patient_id, slide.slide_id, len(tiles.features), slide.label)
            rows.append(_row(models, what, scored))
            pid = slide.patient_id
            _, counted, labels = patients.get(pid, (scored, 0, set()))
            patients[pid] = (scored, counted + len(tiles.features), labels | {slide.label})
            if slides_of[pid] > 1:
                waiting.setdefault(pid, []).append(tiles.features)
                if len(waiting[pid]) == slides_of[pid]:
                    _, pooled = score(np.concatenate(waiting.pop(pid)), False)
                    patients[pid] = (pooled, *patients[pid][1:])
            if on_slide is not None:
                on_slide(slide, tiles.coords_px, tiles.features, scores)
            if progress is not None:
                progress(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for pid, (scored, counted, labels) in patients.items():
        label = next(iter(labels)) if len(labels) == 1 else None
        rows.append(_row(models, _Row("patient", pid, "", counted, label), scored))
    return rows


def recalibrate(
    loaded: LoadedModel,
    slides: Sequence[Slide],
    *,
    coverage: float | None = None,
    infos: Mapping[str, FeatureFileInfo] | None = None,
) -> LoadedModel:
    """The model with its conformal threshold refitted on this hospital's labelled patients (`slides`, from a
    manifest with labels), at the model's temperature: split conformal on patients like the ones it will be
    applied to, which the federation's threshold, fitted at other hospitals, is not (`refit_threshold`).
    Patients are scored as in `predict_slides` (a patient's slides in one bag)."""
    if loaded.calibration is None:
        raise PredictError(
            f"{loaded.path} carries no calibration to refit (a DP run, or an older model): "
            "it gives no prediction sets; leave out --recalibrate"
        )
    # the patients' probabilities at the model's temperature as computed, not as rounded into predictions.csv
    patients: _Patients = {}
    predict_slides(loaded, slides, infos=infos, scored_patients=patients)
    labelled = {pid: next(iter(labels)) for pid, (_, _, labels) in patients.items() if len(labels) == 1}
    unlabelled = [pid for pid in patients if labelled.get(pid) not in loaded.classes]
    if unlabelled:
        raise PredictError(
            f"{len(unlabelled)} of {len(patients)} patients to recalibrate on have no label among the model's "
            f"classes {loaded.classes} (first: '{unlabelled[0]}'); every patient needs one, the same on all their "
            "slides"
        )
    probs = np.array([scored.probs for scored, _, _ in patients.values()], dtype=np.float64)
    labels = np.array([loaded.classes.index(str(labelled[pid])) for pid in patients])
    try:
        calibration = refit_threshold(loaded.calibration, probs, labels, coverage)
    except ValueError as err:
        raise PredictError(str(err)) from err
    return replace(loaded, calibration=calibration)


def write_outputs(out: Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> tuple[Path, Path]:
    """predictions.csv and predict.json, each written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / PREDICTIONS, buffer.getvalue())
    write_text_atomic(out / SUMMARY, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return out / PREDICTIONS, out / SUMMARY
