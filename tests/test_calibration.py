"""Calibration the sites agree on (common/calibration.py): sums and histograms instead of scores, the
temperature that a pooled fit would choose, conformal thresholds that err towards coverage, and coverage at a
synthetic hospital the model never saw; and `fedpath predict` applying what the model carries."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpath.client.predict import load_for_prediction, predict_slides, score_bag, slides_from_manifest
from fedpath.client.training import Predictions, TrainConfig, predict, train_epochs
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
    refit_threshold,
    score_bins,
    site_statistics,
    split_threshold,
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
    cal, test = calibrated_at_three_sites(
        make_cohort(tmp_path / "cohort", sites=4, slides=1200, shift=0.0, seed=5)
    )
    assert cal.patients >= 300
    probs = calibrated_probs(np.log(np.clip(test.probs, 1e-12, 1)), cal.temperature)
    covered = [int(y) in s for y, s in zip(test.labels, prediction_sets(probs, cal.threshold), strict=True)]
    assert len(covered) >= 200
    assert abs(float(np.mean(covered)) - 0.9) <= 0.05, (np.mean(covered), cal)


def calibrated_at_three_sites(manifest: Path) -> tuple[Calibration, Predictions]:
    """A model trained on the first three sites' training patients, the calibration those sites agree on from
    their validation patients (through aggregates only), and the model's predictions at the fourth site."""
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
    assert cal is not None
    return cal, predict(
        model, bags_from_manifest(m.for_patients({s.patient_id for s in m.slides if s.site == held_out}))
    )


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


def test_at_a_shifted_hospital_recalibrating_on_its_own_patients_restores_coverage(tmp_path: Path) -> None:
    """The sites' threshold is fitted on patients unlike a shifted hospital's and need not cover there; refitted
    on half of that hospital's labelled patients (`refit_threshold`, what `predict --recalibrate` does), the
    90 % sets cover the other half within 5 points, on average over random halves as split conformal
    promises."""
    cal, test = calibrated_at_three_sites(
        make_cohort(tmp_path / "cohort", sites=4, slides=800, shift=3.0, seed=7)
    )
    logits = np.log(np.clip(test.probs, 1e-12, 1))
    n = len(test.labels)
    assert n >= 150

    def coverage(threshold: float, rows: np.ndarray) -> float:
        probs = calibrated_probs(logits[rows], cal.temperature)
        sets = prediction_sets(probs, threshold)
        return float(np.mean([int(y) in s for y, s in zip(test.labels[rows], sets, strict=True)]))

    sites_threshold = coverage(cal.threshold, np.arange(n))
    rng = np.random.default_rng(0)
    refitted = []
    for _ in range(20):
        order = rng.permutation(n)
        half, rest = order[: n // 2], order[n // 2 :]
        local = refit_threshold(cal, calibrated_probs(logits[half], cal.temperature), test.labels[half])
        assert local.temperature == cal.temperature and local.patients == n // 2 and local.sites == ["local"]
        refitted.append(coverage(local.threshold, rest))
    assert abs(float(np.mean(refitted)) - 0.9) <= 0.05, (np.mean(refitted), sites_threshold)
    # the premise: the sites' own threshold misses the target here by more than the refitted one does
    assert abs(sites_threshold - 0.9) > abs(float(np.mean(refitted)) - 0.9), (sites_threshold, refitted)


def test_predict_recalibrate_refits_on_the_sites_labelled_patients_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from fedpath.common.cli import main as fedpath_main
    from fedpath.common.features import read_features
    from tests.helpers import write_csv, write_feature_file

    header = ["slide_id", "patient_id", "site", "label", "features"]
    rows = []
    for i in range(30):
        path = write_feature_file(tmp_path / f"s{i}.h5", n_tiles=5, dim=8, seed=i, slide_id=f"s{i}")
        rows.append([f"s{i}", f"P{i}", "H9", "b" if i % 3 else "a", str(path)])
    local = write_csv(tmp_path / "local.csv", header, rows[:20])
    new = write_csv(tmp_path / "new.csv", header, rows[20:])
    run = RunConfig(in_dim=8, num_classes=2, classes="a,b")
    model = initial_model(run.model, in_dim=8, num_classes=2, seed=1)
    hist = np.zeros(BINS, dtype=int)
    hist[3] = 60  # the sites' scores all tiny: a threshold that covers almost nobody here
    cal = Calibration(2.0, 0.9, conformal_threshold(hist, 0.9), 60, hist.tolist(), 0.7, 0.6, ["H1", "H2"])
    file = tmp_path / "run" / "model.pt"
    file.parent.mkdir()
    save_checkpoint(file, Checkpoint(3, model.state_dict(), run.model_dump(), {}, 3, {}, cal.to_dict()))

    base = ["predict", "--model", str(file), "--manifest", str(new)]
    assert fedpath_main([*base, "--out", str(tmp_path / "fed")]) == 0
    assert fedpath_main([*base, "--out", str(tmp_path / "out"), "--recalibrate", str(local)]) == 0
    printed = capsys.readouterr().out
    assert "refitted on 20 labelled patients of this site" in printed
    summary = json.loads((tmp_path / "out" / "predict.json").read_text())
    # the threshold of the local patients' own scores at the model's temperature, T = 2 (one slide each)
    loaded = load_for_prediction(file)
    exact = np.array(
        [
            score_bag(loaded.model.eval(), read_features(Path(r[4])).features, temperature=2.0).probs
            for r in rows[:20]
        ]
    )
    labels = np.array([("a", "b").index(r[3]) for r in rows[:20]])
    expected = refit_threshold(cal, exact, labels).threshold
    assert summary["calibration"][0]["threshold"] == pytest.approx(expected, abs=1e-12)
    assert summary["calibration"][0]["calibration_sites"] == ["local"]
    assert summary["recalibrated_on"].endswith("local.csv")
    assert expected > cal.threshold  # the site's scores are larger than the sites' were
    with (tmp_path / "fed" / "predictions.csv").open() as f:
        fed_sets = [r["prediction_set"] for r in csv.DictReader(f)]
    with (tmp_path / "out" / "predictions.csv").open() as f:
        local_sets = [r["prediction_set"] for r in csv.DictReader(f)]
    assert sum(map(bool, local_sets)) > sum(map(bool, fed_sets))  # fewer empty sets than before

    few = write_csv(tmp_path / "few.csv", header, rows[:8])
    assert fedpath_main([*base, "--out", str(tmp_path / "x"), "--recalibrate", str(few)]) == 2
    assert (
        "8 labelled patients cannot calibrate 90 % prediction sets: it takes at least 9"
        in capsys.readouterr().err
    )
    unlabelled = write_csv(tmp_path / "nolabel.csv", header, [[*r[:3], "", r[4]] for r in rows[:12]])
    assert fedpath_main([*base, "--out", str(tmp_path / "y"), "--recalibrate", str(unlabelled)]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert fedpath_main([*base, "--out", str(tmp_path / "z"), "--recalibrate", str(new)]) == 0
    assert "10 patients are both predicted and recalibrated on" in capsys.readouterr().err


def test_minimum_patients_is_the_fewest_that_give_a_threshold_below_one() -> None:
    from fedpath.common.calibration import minimum_patients

    for coverage in (0.5, 0.8, 0.9, 0.95, 0.99, 0.123, 0.7777):
        n = minimum_patients(coverage)
        assert math.ceil((n + 1) * coverage) <= n and math.ceil(n * coverage) > n - 1
    assert (minimum_patients(0.9), minimum_patients(0.95)) == (9, 19)
    assert minimum_patients(0.9999999999) > 10**9  # found at once, not counted up to
    with pytest.raises(ValueError, match="8 labelled patients cannot calibrate 90 %"):
        split_threshold(np.zeros(8), 0.9)
