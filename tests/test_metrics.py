import numpy as np
import pytest
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


def test_binary_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 1)  # rounding makes many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc(y, np.stack([1 - s, s], 1)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auroc(np.zeros(5), np.arange(5.0)))


def test_multiclass_auroc_is_macro_one_vs_rest() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)


def test_balanced_accuracy_matches_sklearn() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 100)
    p = rng.dirichlet(np.ones(3), 100)
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))


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


def test_roc_curve_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50)
    s = np.round(rng.random(50), 1)
    fpr, tpr = roc_curve(y, s)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


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
