"""Calibration the sites agree on (common/calibration.py): sums and histograms instead of scores, the
temperature that a pooled fit would choose, conformal thresholds that err towards coverage, and coverage at a
synthetic hospital the model never saw; and `fedpath predict` applying what the model carries."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpath.client.predict import load_for_prediction, predict_slides, score_bag, slides_from_manifest
from fedpath.client.training import TrainConfig, predict, train_epochs
from fedpath.common.bags import bags_from_manifest
from fedpath.common.calibration import (
    BINS,
    EDGES,
    TEMPERATURES,
    Calibration,
    calibrated_probs,
    combine,
    conformal_threshold,
    prediction_sets,
    score_bins,
    site_statistics,
)
from fedpath.common.manifest import load_manifest, split_patients
from fedpath.common.mil import initial_model
from fedpath.common.modelfile import Checkpoint, save_checkpoint
from fedpath.common.runconfig import RunConfig
from fedpath.common.wire import calibration_from_reply, calibration_to_arrays
from tests.federation_helpers import make_cohort


def test_the_sites_sums_choose_what_pooled_scores_would() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    logits = np.stack(
        [np.zeros(300), 4.0 * (2 * labels - 1) + rng.normal(0, 4, 300)], axis=1
    )  # overconfident
    parts = [(f"site-{i}", *site_statistics(logits[i::3], labels[i::3])) for i in range(3)]
    pooled_nll, pooled_hist = site_statistics(logits, labels)
    np.testing.assert_allclose(sum(p[1] for p in parts), pooled_nll)
    np.testing.assert_array_equal(sum(p[2] for p in parts), pooled_hist)
    cal = combine(parts)
    assert cal is not None and cal.patients == 300 and cal.sites == ["site-0", "site-1", "site-2"]
    assert cal.temperature == pytest.approx(float(TEMPERATURES[np.argmin(pooled_nll)]))
    assert cal.temperature > 1 and cal.nll_after < cal.nll_before  # overconfident logits get softened
    # nothing per patient in what a site sends: sums per temperature and counts per bin
    nll, hist = parts[0][1], parts[0][2]
    assert nll.shape == (len(TEMPERATURES),) and hist.shape == (len(TEMPERATURES), BINS)
    back = calibration_from_reply(calibration_to_arrays(nll, hist), len(TEMPERATURES), BINS)
    np.testing.assert_array_equal(back[1], hist)
    with pytest.raises(ValueError, match="counts differ"):
        bad = hist.copy()
        bad[3, 0] += 1
        calibration_from_reply(calibration_to_arrays(nll, bad), len(TEMPERATURES), BINS)


def test_a_calibrated_model_keeps_its_temperature_at_one() -> None:
    rng = np.random.default_rng(1)
    p1 = rng.uniform(0.05, 0.95, 2000)
    labels = (rng.uniform(size=2000) < p1).astype(int)  # labels drawn from the stated probabilities
    logits = np.stack([np.zeros(2000), np.log(p1 / (1 - p1))], axis=1)
    cal = combine([("A", *site_statistics(logits, labels))])
    assert cal is not None and 0.8 <= cal.temperature <= 1.25


def test_conformal_threshold_errs_towards_coverage_by_at_most_one_bin() -> None:
    rng = np.random.default_rng(2)
    for scores in (rng.uniform(0, 1, 499), rng.exponential(1e-3, 499)):  # a poor model's scores, a good one's
        hist = np.bincount(score_bins(scores), minlength=BINS)
        q = conformal_threshold(hist, 0.9)
        exact = np.sort(scores)[math.ceil(500 * 0.9) - 1]
        above = EDGES[np.searchsorted(EDGES, exact)]  # the upper edge of exact's bin
        assert exact <= q <= above + 1e-15 and above <= exact * 1.08  # bins at most 8 % wide above 1e-6
    tiny = np.zeros(BINS, dtype=int)
    tiny[10] = 3  # 3 patients: ⌈4 × 0.9⌉ = 4 > 3, no threshold short of every class
    assert conformal_threshold(tiny, 0.9) == 1.0
    assert prediction_sets(np.array([[0.7, 0.3]]), 0.35) == [[0]]
    assert prediction_sets(np.array([[0.55, 0.45]]), 0.6) == [[0, 1]]  # cannot choose: abstain
    assert prediction_sets(np.array([[0.55, 0.45]]), 0.2) == [[]]  # nothing likely enough: abstain


def test_coverage_at_a_synthetic_hospital_no_site_saw_is_within_5_points(tmp_path: Path) -> None:
    """Train on three sites, calibrate from their validation patients through the sites' aggregates only,
    predict the fourth site's patients: the 90 % prediction sets cover 85-95 % of them."""
    manifest = make_cohort(tmp_path / "cohort", sites=4, slides=1200, shift=0.0, seed=5)
    m = load_manifest(manifest)
    held_out = m.sites[-1]
    splits = split_patients(m, val=0.5, test=0.0, seed=0)
    train = bags_from_manifest(m.for_patients({p for s in m.sites[:-1] for p in splits[s].train}))
    torch.manual_seed(0)
    model = initial_model("abmil", in_dim=bags_in_dim(manifest), num_classes=2, seed=0)
    train_epochs(model, train, TrainConfig(epochs=3, lr=3e-3, seed=0, max_tiles=64))
    stats = []
    for site in m.sites[:-1]:
        scored = predict(model, bags_from_manifest(m.for_patients(splits[site].val)))
        stats.append((site, *site_statistics(np.log(np.clip(scored.probs, 1e-12, 1)), scored.labels)))
    cal = combine(stats, 0.9)
    assert cal is not None and cal.patients >= 300
    test = predict(
        model, bags_from_manifest(m.for_patients({s.patient_id for s in m.slides if s.site == held_out}))
    )
    probs = calibrated_probs(np.log(np.clip(test.probs, 1e-12, 1)), cal.temperature)
    covered = [int(y) in s for y, s in zip(test.labels, prediction_sets(probs, cal.threshold), strict=True)]
    assert len(covered) >= 200
    assert abs(float(np.mean(covered)) - 0.9) <= 0.05, (np.mean(covered), cal)


def bags_in_dim(manifest: Path) -> int:
    from fedpath.common.bags import feature_dim

    return feature_dim(load_manifest(manifest))


def test_predict_applies_the_models_temperature_and_sets(tmp_path: Path) -> None:
    from tests.helpers import write_csv, write_feature_file

    rows = []
    for i in range(6):
        path = write_feature_file(tmp_path / f"s{i}.h5", n_tiles=6, dim=8, seed=i, slide_id=f"s{i}")
        rows.append([f"s{i}", f"P{i}", "H1", "b" if i % 2 else "a", str(path)])
    manifest = write_csv(tmp_path / "m.csv", ["slide_id", "patient_id", "site", "label", "features"], rows)
    run = RunConfig(in_dim=8, num_classes=2, classes="a,b")
    model = initial_model(run.model, in_dim=8, num_classes=2, seed=1)
    hist = np.zeros(BINS, dtype=int)
    hist[np.searchsorted(EDGES, 0.5) - 1] = 50  # every calibration score just under 0.5
    cal = Calibration(2.0, 0.9, conformal_threshold(hist, 0.9), 50, hist.tolist(), 0.7, 0.6, ["H1"])
    file = tmp_path / "run" / "model.pt"
    file.parent.mkdir()
    save_checkpoint(file, Checkpoint(3, model.state_dict(), run.model_dump(), {}, 3, {}, cal.to_dict()))
    loaded = load_for_prediction(file)
    assert loaded.calibration == cal
    got = predict_slides(loaded, slides_from_manifest(manifest))
    for r in got[:6]:
        from fedpath.common.features import read_features

        expected = score_bag(
            loaded.model, read_features(tmp_path / f"{r['slide_id']}.h5").features, temperature=2.0
        )
        assert float(r["prob_b"]) == pytest.approx(float(expected.probs[1]), abs=1e-6)
        members = [c for c in ("a", "b") if 1 - float(r[f"prob_{c}"]) <= cal.threshold + 1e-9]
        assert r["prediction_set"] == "|".join(members)
        assert r["abstain"] == ("false" if len(members) == 1 else "true")
    # a lower coverage gives a smaller threshold: never a larger set
    narrow = predict_slides(loaded, slides_from_manifest(manifest), coverage=0.5)
    for wide_row, narrow_row in zip(got, narrow, strict=True):
        assert set(filter(None, narrow_row["prediction_set"].split("|"))) <= set(
            filter(None, wide_row["prediction_set"].split("|"))
        )


def test_an_ensemble_gives_the_mean_its_spread_and_the_union_of_sets(tmp_path: Path) -> None:
    from fedpath.client.predict import PredictError, check_ensemble
    from tests.helpers import write_csv, write_feature_file

    rows = []
    for i in range(4):
        path = write_feature_file(tmp_path / f"s{i}.h5", n_tiles=6, dim=8, seed=i, slide_id=f"s{i}")
        rows.append([f"s{i}", f"P{i}", "H1", "a", str(path)])
    manifest = write_csv(tmp_path / "m.csv", ["slide_id", "patient_id", "site", "label", "features"], rows)
    members = []
    for seed, (temperature, threshold) in enumerate([(1.0, 0.5), (2.0, 0.3)]):
        run = RunConfig(in_dim=8, num_classes=2, classes="a,b")
        model = initial_model(run.model, in_dim=8, num_classes=2, seed=seed)
        cal = Calibration(temperature, 0.9, threshold, 40, [0] * BINS, 0.7, 0.6, ["H1"])
        file = tmp_path / f"run-{seed}" / "model.pt"
        file.parent.mkdir()
        save_checkpoint(file, Checkpoint(2, model.state_dict(), run.model_dump(), {}, 2, {}, cal.to_dict()))
        members.append(load_for_prediction(file))
    got = predict_slides(members, slides_from_manifest(manifest))
    from fedpath.common.features import read_features

    for r in got[:4]:
        feats = read_features(tmp_path / f"{r['slide_id']}.h5").features
        each = [
            score_bag(m.model, feats, temperature=t).probs for m, t in zip(members, (1.0, 2.0), strict=True)
        ]
        assert float(r["prob_b"]) == pytest.approx(float(np.mean([p[1] for p in each])), abs=1e-6)
        k = ["a", "b"].index(r["predicted"])
        assert float(r["spread"]) == pytest.approx(float(np.std([p[k] for p in each])), abs=1e-6)
        union = sorted({c for p, t in zip(each, (0.5, 0.3), strict=True) for c in prediction_sets(p, t)[0]})
        assert r["prediction_set"] == "|".join("ab"[c] for c in union)
        assert r["model_run"] == "run-0;run-1" and r["model_sha256"].count(";") == 1
    other = RunConfig(in_dim=8, num_classes=2, classes="x,y")
    file = tmp_path / "other" / "model.pt"
    file.parent.mkdir()
    model = initial_model(other.model, in_dim=8, num_classes=2, seed=0)
    save_checkpoint(file, Checkpoint(1, model.state_dict(), other.model_dump(), {}, 1, {}, {}))
    with pytest.raises(PredictError, match="classes"):
        check_ensemble([members[0], load_for_prediction(file)])
