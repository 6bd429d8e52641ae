"""`fedpath predict` as a person at a hospital would use it: extract the real CMU slide (tiny random-init
encoder), apply a model, open what it wrote; a model of another encoder is refused; a patient's slides are
pooled as in training; the training sites' feature provenance travels into the model."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import torch
from PIL import Image

from fedpath.client.predict import (
    check_inputs,
    load_for_prediction,
    predict_slides,
    score_bag,
    slides_from_manifest,
)
from fedpath.client.site import IncompatibleSite, SiteData, check_compatible
from fedpath.common.cli import main as fedpath_main
from fedpath.common.features import FeatureFileError, inspect_features, provenance, read_features
from fedpath.common.mil import initial_model
from fedpath.common.modelfile import Checkpoint, save_checkpoint
from fedpath.common.runconfig import RunConfig
from fedpath.server.federation import agreed_features
from tests.helpers import write_csv, write_feature_file

CMU = Path(__file__).parent / "data" / "wsi" / "CMU-1-Small-Region.svs"
CLASSES = "benign,tumour"


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CMU slide through `fedpath extract` (resnet18, random weights, 64 px tiles of 128 µm)."""
    root = tmp_path_factory.mktemp("extract")
    slides = root / "slides"
    slides.mkdir()
    shutil.copy(CMU, slides / CMU.name)
    code = fedpath_main(
        ["extract", str(slides), "--out", str(root / "out"), "--encoder", "resnet18", "--random-init",
         "--tile-px", "64", "--tile-um", "128", "--workers", "0"]
    )  # fmt: skip
    assert code == 0
    return root


def model_file(path: Path, in_dim: int, features: dict[str, object], *, classes: str = CLASSES) -> Path:
    run = RunConfig(in_dim=in_dim, num_classes=2, classes=classes, run_dir=str(path.parent))
    model = initial_model(run.model, in_dim=in_dim, num_classes=2, seed=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, Checkpoint(7, model.state_dict(), run.model_dump(), {"run": 0}, 7, dict(features)))
    return path


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_predict_on_the_real_slide_writes_rows_heatmap_and_geojson(
    extracted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h5 = extracted / "out" / "features" / "CMU-1-Small-Region.h5"
    info = inspect_features(h5)
    model = model_file(tmp_path / "run" / "model.pt", info.dim, {**provenance(info), "sites_agree": True})
    out = tmp_path / "pred"
    code = fedpath_main(
        ["predict", "--model", str(model.parent), "--features", str(h5.parent), "--slides",
         str(extracted / "slides"), "--out", str(out), "--heatmaps", "--top-k", "3"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert "1 slides, 1 patients" in said and "round 7" in said

    got = rows(out / "predictions.csv")
    assert [r["level"] for r in got] == ["slide", "patient"]
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    for r in got:
        p = np.array([float(r["prob_benign"]), float(r["prob_tumour"])])
        assert p.sum() == pytest.approx(1.0, abs=1e-5) and (p >= 0).all()
        assert r["predicted"] == ["benign", "tumour"][int(p.argmax())]
        assert float(r["uncertainty"]) == pytest.approx(1 - p.max(), abs=1e-5)
        assert (r["model_run"], r["model_round"], r["model_sha256"]) == ("run", "7", sha)
        assert int(r["tiles"]) == info.n_tiles
    # one slide per patient: the patient's bag is the slide's
    assert got[0]["prob_tumour"] == got[1]["prob_tumour"]
    summary = json.loads((out / "predict.json").read_text())
    assert summary["model_sha256"] == sha and summary["classes"] == ["benign", "tumour"]
    assert summary["allow_encoder_mismatch"] is False and summary["encoder_mismatches"] == {}

    drawn = summary["heatmaps"]["CMU-1-Small-Region"]
    png = Image.open(drawn["png"])
    assert png.size[0] > 100 and png.size[1] > 100
    geo = json.loads(Path(drawn["geojson"]).read_text())
    width, height = openslide.OpenSlide(str(CMU)).dimensions
    assert len(geo["features"]) == info.n_tiles
    for feature in geo["features"]:
        ring = np.array(feature["geometry"]["coordinates"][0], dtype=float)
        assert (ring[:, 0] >= 0).all() and (ring[:, 0] <= width).all()
        assert (ring[:, 1] >= 0).all() and (ring[:, 1] <= height).all()
        normalised = [v for k, v in feature["properties"]["measurements"].items() if not k.endswith("_raw")]
        assert normalised and all(0.0 <= v <= 1.0 for v in normalised)
    assert len(list(Path(drawn["gallery"]).glob("*.jpg"))) == 6


def test_features_of_another_encoder_are_refused_naming_slide_and_values(
    extracted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h5 = extracted / "out" / "features" / "CMU-1-Small-Region.h5"
    info = inspect_features(h5)
    stated = {**provenance(info), "encoder": "vit_large_patch16_224", "tile_size_um": 256.0}
    model = model_file(tmp_path / "run" / "model.pt", info.dim, stated)
    out = tmp_path / "pred"
    args = ["predict", "--model", str(model), "--features", str(h5.parent), "--out", str(out)]
    assert fedpath_main(args) == 2
    err = capsys.readouterr().err
    assert "CMU-1-Small-Region" in err and "vit_large_patch16_224" in err and "resnet18" in err
    assert "tile_size_um" in err and "--allow-encoder-mismatch" in err
    assert not out.exists()  # checked before anything is written

    assert fedpath_main([*args, "--allow-encoder-mismatch"]) == 0
    summary = json.loads((out / "predict.json").read_text())
    assert summary["allow_encoder_mismatch"] is True
    assert any("vit_large_patch16_224" in d for d in summary["encoder_mismatches"]["CMU-1-Small-Region"])


def test_wrong_dimension_and_missing_model_say_what_to_do(
    extracted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h5 = extracted / "out" / "features" / "CMU-1-Small-Region.h5"
    model = model_file(tmp_path / "run" / "model.pt", 16, {})
    out = tmp_path / "pred"
    assert (
        fedpath_main(["predict", "--model", str(model), "--features", str(h5.parent), "--out", str(out)]) == 2
    )
    assert "512-dimensional" in capsys.readouterr().err and not out.exists()
    empty = tmp_path / "unfinished"
    empty.mkdir()
    assert (
        fedpath_main(["predict", "--model", str(empty), "--features", str(h5.parent), "--out", str(out)]) == 2
    )
    assert "no model file" in capsys.readouterr().err


def test_a_patients_slides_are_pooled_as_in_training(tmp_path: Path) -> None:
    rows_ = []
    for i, (patient, label) in enumerate([("P1", "tumour"), ("P1", "tumour"), ("P2", "benign")]):
        path = write_feature_file(tmp_path / f"s{i}.h5", n_tiles=5 + i, dim=8, seed=i, slide_id=f"s{i}")
        rows_.append([f"s{i}", patient, "H1", label, str(path)])
    manifest = write_csv(tmp_path / "m.csv", ["slide_id", "patient_id", "site", "label", "features"], rows_)
    loaded = load_for_prediction(model_file(tmp_path / "run" / "model.pt", 8, {}))
    got = predict_slides(loaded, slides_from_manifest(manifest))
    patients = {r["patient_id"]: r for r in got if r["level"] == "patient"}
    assert [r["slide_id"] for r in got if r["level"] == "slide"] == ["s0", "s1", "s2"]
    assert patients["P1"]["tiles"] == 11 and patients["P1"]["label"] == "tumour"
    pooled = np.concatenate([read_features(tmp_path / f"s{i}.h5").features for i in (0, 1)])
    expected = score_bag(loaded.model, pooled).probs
    assert float(patients["P1"]["prob_tumour"]) == pytest.approx(float(expected[1]), abs=1e-6)
    slide_p2 = next(r for r in got if r["slide_id"] == "s2")
    assert patients["P2"]["prob_tumour"] == slide_p2["prob_tumour"]


def test_slides_read_ahead_give_the_same_rows_and_a_broken_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the headers checked first (as the command does), the next slide is read by a thread while the model
    scores this one, as plain bytes: the rows are those of reading each file in turn through h5py, and a file
    broken after the check is named."""
    rows_ = []
    for i in range(5):
        path = write_feature_file(tmp_path / f"s{i}.h5", n_tiles=4 + i, dim=8, seed=i, slide_id=f"s{i}")
        rows_.append([f"s{i}", f"P{i // 2}", "H1", "tumour", str(path)])
    manifest = write_csv(tmp_path / "m.csv", ["slide_id", "patient_id", "site", "label", "features"], rows_)
    loaded = load_for_prediction(model_file(tmp_path / "run" / "model.pt", 8, {"encoder": "test"}))
    slides = slides_from_manifest(manifest)
    infos, _ = check_inputs(loaded, slides, allow_mismatch=False)
    assert all(info.extent is not None for info in infos.values())
    through_h5py = {
        slide: replace(info, extent=None) for slide, info in infos.items()
    }  # read in turn, by h5py
    assert predict_slides(loaded, slides, infos=infos) == predict_slides(loaded, slides, infos=through_h5py)

    with h5py.File(tmp_path / "s3.h5", "r+") as f:  # NaN written in place: same size, a new mtime
        f["features"][1, 2] = np.nan
    with pytest.raises(FeatureFileError, match=r"s3\.h5: features contain NaN"):
        predict_slides(loaded, slides, infos=infos)
    # the command: a clear error naming the file, nothing written
    out = tmp_path / "out"
    code = fedpath_main(
        ["predict", "--model", str(tmp_path / "run"), "--manifest", str(manifest), "--out", str(out)]
    )
    assert code == 2 and not out.exists()
    assert "s3.h5: features contain NaN or Inf; re-extract this slide" in capsys.readouterr().err


def test_attention_x_gradient_is_zero_where_a_tile_speaks_against_the_class() -> None:
    torch.manual_seed(0)
    model = initial_model("abmil", in_dim=8, num_classes=2, seed=0).eval()
    features = np.random.default_rng(1).normal(size=(20, 8)).astype(np.float32)
    scores = score_bag(model, features, evidence=True)
    assert scores.attention.sum() == pytest.approx(1.0, abs=1e-5)
    for k in ("0", "1"):  # never negative; zero at the tiles that speak against the class, positive elsewhere
        assert (scores.evidence[k] >= 0).all()
        assert (scores.evidence[k] == 0).any() and (scores.evidence[k] > 0).any()
    # the same tiles are not evidence for both classes of a two-class softmax model everywhere
    assert not np.allclose(scores.evidence["0"], scores.evidence["1"])
    assert np.allclose(score_bag(model, features).probs, scores.probs, atol=1e-6)


def test_sites_state_their_features_and_the_model_keeps_what_they_agree_on() -> None:
    ok = {"status": "ok", "train": {"patients": 3}}
    same = {"encoder": "resnet18", "weights_sha256": "abc", "tile_size_px": 224, "files_agree": True}
    history = [{"round": 1, "sites": {"A": {**ok, "features": same}, "B": {**ok, "features": same}}}]
    agreed = agreed_features(history)
    assert agreed["encoder"] == "resnet18" and agreed["sites_agree"] and agreed["files_agree"]
    other = {**same, "encoder": "uni"}
    history.append({"round": 2, "sites": {"A": {**ok, "features": same}, "C": {**ok, "features": other}}})
    mixed = agreed_features(history)
    assert mixed["sites_agree"] is False and mixed["sites"]["C"]["encoder"] == "uni"
    failed = {"status": "failed", "train": {}, "features": other}
    assert agreed_features([{"round": 1, "sites": {"A": {**ok, "features": same}, "C": failed}}])[
        "sites_agree"
    ]


def test_a_site_whose_labels_differ_from_the_runs_classes_is_incompatible() -> None:
    run = RunConfig(in_dim=8, num_classes=2, classes="LUAD,LUSC")
    site = SiteData("H1", [], [], 0, 8, 2, ("luad", "lusc"))
    with pytest.raises(IncompatibleSite, match="luad"):
        check_compatible(site, run)
    check_compatible(SiteData("H2", [], [], 0, 8, 2, ("LUAD", "LUSC")), run)
    check_compatible(SiteData("H3", [], [], 0, 8, 2, ("a", "b")), RunConfig(in_dim=8))  # no classes stated


def test_stamp_and_trident_feature_folders_are_predicted_and_checked(tmp_path: Path) -> None:
    """A folder of STAMP and CLAM/TRIDENT files (their own layouts, read unchanged): one row per slide and per
    patient; the STAMP file's extractor is checked against the model's encoder like a fedpath file's."""
    import h5py

    from fedpath.client.predict import PredictError, check_inputs, slides_from_folder

    folder = tmp_path / "feats"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with h5py.File(folder / "stamp-slide.h5", "w") as f:
        f["feats"] = rng.normal(size=(4, 8)).astype(np.float16)
        f["coords"] = np.array([[0.0, 0.0], [256.0, 0.0], [0.0, 256.0], [256.0, 256.0]])
        f.attrs.update({"extractor": "uni", "tile_size_um": 256.0})
    with h5py.File(folder / "trident-slide.h5", "w") as f:
        f["features"] = rng.normal(size=(1, 3, 8)).astype(np.float32)
        f.create_dataset("coords", data=np.array([[[0, 0], [448, 0], [0, 448]]])).attrs["patch_size"] = 448
    loaded = load_for_prediction(model_file(tmp_path / "run" / "model.pt", 8, {"encoder": "uni"}))
    slides = slides_from_folder(folder)
    infos, mismatches = check_inputs(loaded, slides, allow_mismatch=False)
    assert set(infos) == {"stamp-slide", "trident-slide"} and mismatches == {}
    got = predict_slides(loaded, slides, infos=infos)
    assert [(r["level"], r["patient_id"], r["tiles"]) for r in got] == [
        ("slide", "stamp-slide", 4), ("slide", "trident-slide", 3),
        ("patient", "stamp-slide", 4), ("patient", "trident-slide", 3),
    ]  # fmt: skip
    other = load_for_prediction(model_file(tmp_path / "other" / "model.pt", 8, {"encoder": "conch"}))
    with pytest.raises(PredictError, match=r"stamp-slide.*encoder: model 'conch', features 'uni'"):
        check_inputs(other, slides, allow_mismatch=False)
