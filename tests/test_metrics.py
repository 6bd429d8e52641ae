import warnings

import numpy as np
import pytest
from scipy.stats import bootstrap
from sklearn.calibration import calibration_curve
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from fedpath.common.metrics import (
    aggregate_by_patient,
    auroc,
    balanced_accuracy,
    bootstrap_ci,
    expected_calibration_error,
    reliability_curve,
    roc_curve,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("seed", range(20))
def test_binary_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.3 * y, int(rng.integers(0, 3)))  # rounding makes many ties
    if len(set(y)) < 2:
        return
    expected = roc_auc_score(y, s)
    assert auroc(y, s) == pytest.approx(expected, abs=1e-12)
    assert auroc(y, np.stack([1 - s, s], 1)) == pytest.approx(expected, abs=1e-12)


def test_auroc_is_nan_with_one_class() -> None:
    assert np.isnan(auroc(np.zeros(5), np.arange(5.0)))
    assert np.isnan(auroc(np.full(4, 2), _softmax(np.zeros((4, 3)))))


@pytest.mark.parametrize("seed", range(20))
def test_multiclass_auroc_is_macro_one_vs_rest(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n, c = int(rng.integers(30, 300)), int(rng.integers(3, 6))
    y = np.r_[np.arange(c), rng.integers(0, c, n - c)]  # every class present, as sklearn requires
    p = _softmax(rng.normal(size=(n, c)) + np.eye(c)[y])
    if seed % 2:  # repeated rows: ties within every class's scores, across labels
        p = p[rng.integers(0, n // 4, n)]
    expected = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert auroc(y, p) == pytest.approx(expected, abs=1e-12)


def test_multiclass_auroc_averages_the_classes_present() -> None:
    # a bootstrap resample can lack a class: sklearn then refuses, ours averages the classes that are there
    rng = np.random.default_rng(7)
    y = rng.choice([0, 2], 80)
    p = _softmax(rng.normal(size=(80, 3)) + np.eye(3)[y])
    expected = np.mean([roc_auc_score(y == k, p[:, k]) for k in (0, 2)])
    assert auroc(y, p) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_balanced_accuracy_matches_sklearn(classes: int) -> None:
    rng = np.random.default_rng(classes)
    y = rng.integers(0, classes, 100)
    p = rng.dirichlet(np.ones(classes), 100)
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p.argmax(1)), abs=1e-12)
    if classes == 2:  # a binary score is thresholded at 0.5, as the arg-max of (1 - s, s)
        s = np.round(p[:, 1], 1)
        assert balanced_accuracy(y, s) == pytest.approx(balanced_accuracy_score(y, s > 0.5), abs=1e-12)


def test_balanced_accuracy_edge_cases() -> None:
    # one class in the labels: that class's recall, as sklearn (which warns about the other predicted class)
    y, p = np.array([1, 1, 1, 1]), np.array([0.9, 0.2, 0.7, 0.6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert balanced_accuracy(y, p) == balanced_accuracy_score(y, p > 0.5) == 0.75
    assert np.isnan(balanced_accuracy(np.zeros(0, dtype=int), np.zeros((0, 2))))


def test_ece_by_hand() -> None:
    # two bins used: confidence 0.9 (3 of 4 right → |0.75-0.9|) and 0.6 (1 of 2 right → |0.5-0.6|)
    y = np.array([1, 1, 1, 0, 1, 1])
    p1 = np.array([0.9, 0.9, 0.9, 0.9, 0.6, 0.4])
    expected = 4 / 6 * 0.15 + 2 / 6 * 0.1
    assert expected_calibration_error(y, p1) == pytest.approx(expected)
    conf, acc, n = reliability_curve(y, p1)
    assert n.tolist() == [2, 4] and acc.tolist() == [0.5, 0.75]
    np.testing.assert_allclose(conf, [0.6, 0.9])
    perfect = np.array([1, 0])
    assert expected_calibration_error(perfect, np.array([1.0, 0.0])) == 0.0
    assert expected_calibration_error(np.zeros(0, dtype=int), np.zeros((0, 2))) == 0.0


@pytest.mark.parametrize(
    ("classes", "n_bins", "decimals"), [(2, 10, None), (3, 10, 1), (4, 15, None), (2, 20, 2)]
)
def test_reliability_curve_matches_sklearn_calibration_curve(
    classes: int, n_bins: int, decimals: int | None
) -> None:
    # top-label reliability is the calibration curve of "prediction correct" against the confidence
    rng = np.random.default_rng(n_bins + classes)
    y = rng.integers(0, classes, 400)
    p = _softmax(2 * rng.normal(size=(400, classes)) + np.eye(classes)[y])
    if decimals is not None:  # confidences on bin edges (0.6, 0.7, …)
        p[:, 0] = np.round(p[:, 0], decimals)
        p[:, 1:] *= ((1 - p[:, 0]) / p[:, 1:].sum(1))[:, None]
    conf, acc, n = reliability_curve(y, p, n_bins)
    correct = (p.argmax(1) == y).astype(float)
    sk_acc, sk_conf = calibration_curve(correct, p.max(1), n_bins=n_bins, strategy="uniform")
    np.testing.assert_allclose(conf, sk_conf, rtol=0, atol=1e-12)
    np.testing.assert_allclose(acc, sk_acc, rtol=0, atol=1e-12)
    assert n.sum() == len(y) and (n > 0).all()
    ece = np.sum(n / len(y) * np.abs(acc - conf))
    assert expected_calibration_error(y, p, n_bins) == pytest.approx(ece, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_roc_curve_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(3 + seed)
    y = rng.integers(0, 2, 50)
    s = np.round(rng.random(50), 1)
    fpr, tpr = roc_curve(y, s)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert len(fpr) == len(np.unique(s)) + 1  # every distinct threshold, and the origin
    np.testing.assert_array_equal(roc_curve(y, np.stack([1 - s, s], 1))[1], tpr)


def test_roc_curve_with_one_class_gives_zero_rates_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fpr, tpr = roc_curve(np.zeros(4, dtype=int), np.array([0.1, 0.4, 0.4, 0.8]))
        assert fpr.tolist() == [0, 0.25, 0.75, 1] and tpr.tolist() == [0, 0, 0, 0]
        fpr, tpr = roc_curve(np.ones(3, dtype=int), np.array([0.2, 0.5, 0.9]))
        assert fpr.tolist() == [0, 0, 0, 0] and tpr.tolist() == [0, 1 / 3, 2 / 3, 1]


def test_patient_aggregation_averages_slides() -> None:
    patients, labels, scores = aggregate_by_patient(
        ["p1", "p2", "p1", "p3"], np.array([1, 0, 1, 0]), np.array([0.8, 0.1, 0.4, 0.3])
    )
    assert patients == ["p1", "p2", "p3"]
    assert labels.tolist() == [1, 0, 0]
    np.testing.assert_allclose(scores[:, 1], [0.6, 0.1, 0.3])


def test_bootstrap_ci_brackets_the_estimate_and_narrows_with_data() -> None:
    rng = np.random.default_rng(4)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        return y, rng.normal(size=n) + y

    small = bootstrap_ci(auroc, *sample(40), seed=0)
    large = bootstrap_ci(auroc, *sample(1000), seed=0)
    for est in (small, large):
        assert est.low <= est.value <= est.high
    assert (large.high - large.low) < (small.high - small.low) / 2
    assert 0.70 < large.value < 0.82  # true AUROC of N(1,1) vs N(0,1) is Φ(1/√2) ≈ 0.76
    y, s = sample(60)
    assert bootstrap_ci(auroc, y, s, seed=5) == bootstrap_ci(auroc, y, s, seed=5)
    one_class = bootstrap_ci(auroc, np.ones(10), rng.random(10))
    assert np.isnan(one_class.value) and np.isnan(one_class.low)


def _scipy_ci(y: np.ndarray, s: np.ndarray, seed: int) -> tuple[float, float]:
    ci = bootstrap(
        (y, s),
        auroc,
        paired=True,
        vectorized=False,
        method="percentile",
        n_resamples=1000,
        confidence_level=0.95,
        random_state=np.random.default_rng(seed),
    ).confidence_interval
    return float(ci.low), float(ci.high)


def test_bootstrap_ci_is_scipys_percentile_bootstrap_but_skips_undefined_resamples() -> None:
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, 100)
    s = rng.normal(size=100) + y
    ours = bootstrap_ci(auroc, y, s, seed=3)
    assert (ours.low, ours.high) == pytest.approx(_scipy_ci(y, s, 3), abs=1e-12)
    # 2 positives in 14 patients: some resamples hold no positive; scipy's interval is then NaN, ours is not
    y = np.r_[np.zeros(12, dtype=int), 1, 1]
    s = rng.random(14)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's DegenerateDataWarning
        assert np.isnan(_scipy_ci(y, s, 0)).all()
    small = bootstrap_ci(auroc, y, s, seed=0)
    assert 0 <= small.low <= small.value <= small.high <= 1
