"""Feature standardisation the sites agree on: moments, their combination, the model's buffers, the wire."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedpath.client.training import TrainConfig, train_epochs
from fedpath.common.bags import Bag
from fedpath.common.features import FeatureMeta, write_features
from fedpath.common.mil import create_mil
from fedpath.common.standardize import (
    combine,
    is_standardized,
    moments_of,
    set_standardization,
    standardizer_of,
)
from fedpath.common.wire import MOMENTS_COUNT, model_to_arrays, moments_from_reply, moments_to_arrays
from fedpath.server.strategy import GuardedFedProx


def _bags(root: Path, blocks: list[np.ndarray], site: str) -> list[Bag]:
    bags = []
    for i, x in enumerate(blocks):
        meta = FeatureMeta(f"{site}-{i}", "test", "none", 224, 112.0, 0.5)
        coords = np.zeros((len(x), 2), dtype=np.int64)
        path = write_features(root / f"{site}-{i}.h5", x.astype(np.float32), coords, meta)
        bags.append(Bag(f"{site}-{i}", (path,), i % 2, f"{site}-{i}", site))
    return bags


def test_sites_moments_combine_to_the_pooled_mean_and_sd(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = [rng.normal(50, 0.01, size=(n, 6)) for n in (5, 40)]
    b = [rng.normal(49, 3.0, size=(n, 6)) for n in (7,)]
    a[0][:, 5] = b[0][:, 5] = a[1][:, 5] = 2.0  # a constant dimension
    site_a, site_b = _bags(tmp_path, a, "a"), _bags(tmp_path, b, "b")
    mean, scale = combine([moments_of(site_a), moments_of(site_b)]).standardization()
    everything = np.concatenate(a + b).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mean, everything.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(scale[:5], everything[:, :5].std(axis=0), rtol=1e-6)
    assert scale[5] == 1.0  # constant: centred, not divided

    model = create_mil("abmil", in_dim=6, num_classes=2)
    assert not is_standardized(model)
    set_standardization(model, combine([moments_of(site_a), moments_of(site_b)]))
    assert is_standardized(model)
    z = standardizer_of(model)(torch.from_numpy(everything).float())
    np.testing.assert_allclose(z[:, :5].mean(0).numpy(), 0.0, atol=1e-3)
    np.testing.assert_allclose(z[:, :5].std(0, unbiased=False).numpy(), 1.0, atol=1e-3)
    # the statistics are part of the state dict, so they travel and are checkpointed with the weights
    assert {"standardize.mean", "standardize.scale"} <= set(model.state_dict())
    # and training does not move them
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("standardize.")}
    train_epochs(model, site_a + site_b, TrainConfig(steps=3, lr=1e-2))
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_training_counts_optimizer_steps_whatever_the_site_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tiny = _bags(tmp_path, [rng.normal(size=(8, 4)) for _ in range(3)], "tiny")
    large = _bags(tmp_path, [rng.normal(size=(8, 4)) for _ in range(30)], "large")
    for bags in (tiny, large):
        stats = train_epochs(create_mil("abmil", in_dim=4, num_classes=2), bags, TrainConfig(steps=7))
        assert stats.steps == 7
    called: list[int] = []
    train_epochs(
        create_mil("abmil", in_dim=4, num_classes=2),
        tiny,
        TrainConfig(steps=6, batch_size=2),
        every=(3, called.append),
    )
    assert called == [1, 2]
    # epochs as before: one step per epoch at a site of 3 patients with batches of 8
    assert train_epochs(create_mil("abmil", in_dim=4, num_classes=2), tiny, TrainConfig(epochs=2)).steps == 2


def _stats_reply(total: np.ndarray, squares: np.ndarray, count: object) -> tuple[ArrayRecord, MetricRecord]:
    return ArrayRecord({"sum": Array(total), "sum-of-squares": Array(squares)}), MetricRecord(
        {MOMENTS_COUNT: count}
    )  # type: ignore[dict-item]


def test_a_sites_statistics_reply_is_checked_before_it_is_used(tmp_path: Path) -> None:
    moments = moments_of(_bags(tmp_path, [np.arange(12.0).reshape(4, 3)], "s"))
    arrays = moments_to_arrays(moments)
    got = moments_from_reply(arrays, MetricRecord({MOMENTS_COUNT: moments.count}), 3)
    np.testing.assert_array_equal(got.total, moments.total)
    good = np.ones(3)
    for arrays, metrics, why in (
        (*_stats_reply(good, good, 0), "positive integer"),
        (*_stats_reply(good, good, 2.5), "positive integer"),
        (*_stats_reply(np.ones(4), good, 4), "must be 3 floats"),
        (*_stats_reply(np.array([1.0, np.nan, 1.0]), good, 4), "NaN"),
        (*_stats_reply(good, -good, 4), "negative"),
    ):
        with pytest.raises(ValueError, match=why):
            moments_from_reply(arrays, metrics, 3)


@pytest.mark.usefixtures("task_identity")
def test_aggregation_keeps_the_agreed_standardisation(tmp_path: Path) -> None:
    model = create_mil("abmil", in_dim=4, num_classes=2)
    set_standardization(
        model, moments_of(_bags(tmp_path, [np.random.default_rng(2).normal(5, 2, (9, 4))], "s"))
    )
    reference = model_to_arrays(model)
    strategy = GuardedFedProx(reference=reference, proximal_mu=0.0, min_sites=2)
    replies = []
    for node, shift in ((1, 1.0), (2, 3.0)):
        state = {k: v.clone() + shift for k, v in model.state_dict().items()}  # a site moved everything
        content = RecordDict(
            {"arrays": ArrayRecord(state), "metrics": MetricRecord({"patients": 4})}  # type: ignore[arg-type]
        )
        msg = Message(content=content, dst_node_id=node, message_type="train")
        replies.append(Message(content=content, reply_to=msg))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    after = arrays.to_torch_state_dict()
    for name in ("standardize.mean", "standardize.scale"):
        torch.testing.assert_close(after[name], model.state_dict()[name])
    torch.testing.assert_close(after["classifier.bias"], model.state_dict()["classifier.bias"] + 2.0)
