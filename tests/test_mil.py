import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedpath.common.mil import create_mil, list_mil
from fedpath.common.wire import load_arrays, model_to_arrays, update_problems

MODELS = ["abmil", "transformer"]


def as_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array.from_numpy_ndarray(v) for k, v in state.items()})


def test_registry_lists_known_models_on_unknown_name() -> None:
    assert set(MODELS) <= set(list_mil())
    with pytest.raises(ValueError, match="unknown MIL model 'clam'; known: abmil, transformer"):
        create_mil("clam", in_dim=8, num_classes=2)


@pytest.mark.parametrize("name", MODELS)
def test_padding_never_changes_the_output(name: str) -> None:
    torch.manual_seed(0)
    model = create_mil(name, in_dim=16, num_classes=3).eval()
    bag = torch.randn(1, 7, 16)
    alone = model(bag, torch.ones(1, 7, dtype=torch.bool))
    padded = torch.cat([bag, torch.randn(1, 5, 16) * 100], dim=1)  # padding with large garbage values
    mask = torch.tensor([[True] * 7 + [False] * 5])
    out = model(padded, mask)
    torch.testing.assert_close(out.logits, alone.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.attention[:, :7], alone.attention, rtol=1e-5, atol=1e-6)
    assert torch.all(out.attention[:, 7:] == 0)


@pytest.mark.parametrize("name", MODELS)
def test_batch_of_bags_matches_bags_alone(name: str) -> None:
    torch.manual_seed(1)
    model = create_mil(name, in_dim=8, num_classes=4).eval()
    bags = [torch.randn(n, 8) for n in (3, 9, 5)]
    feats = torch.zeros(3, 9, 8)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for i, b in enumerate(bags):
        feats[i, : len(b)] = b
        mask[i, : len(b)] = True
    out = model(feats, mask)
    assert out.logits.shape == (3, 4) and out.attention.shape == (3, 9)
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(3))
    for i, b in enumerate(bags):
        alone = model(b[None], torch.ones(1, len(b), dtype=torch.bool))
        torch.testing.assert_close(out.logits[i : i + 1], alone.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_attention_follows_the_signal_after_training(name: str) -> None:
    """A bag is positive when it holds one 'tumour' tile: after a little training, attention finds it."""
    torch.manual_seed(2)
    model = create_mil(name, in_dim=8, num_classes=2, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        x = torch.randn(16, 12, 8)
        y = torch.randint(0, 2, (16,))
        x[y == 1, 0, 0] += 6.0  # tile 0 of positive bags carries the signal
        loss = torch.nn.functional.cross_entropy(model(x, torch.ones(16, 12, dtype=torch.bool)).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = torch.randn(8, 12, 8)
    x[:, 0, 0] += 6.0
    att = model(x, torch.ones(8, 12, dtype=torch.bool)).attention
    assert float(att[:, 0].mean().detach()) > 3 / 12  # far above uniform attention


@pytest.mark.parametrize("name", MODELS)
def test_arrayrecord_round_trip_is_lossless(name: str) -> None:
    torch.manual_seed(3)
    model = create_mil(name, in_dim=10, num_classes=2)
    record = model_to_arrays(model)
    # through the wire representation: each Array rebuilt from the raw bytes, dtype and shape that travel
    rebuilt = ArrayRecord(
        array_dict={
            k: Array(dtype=v.dtype, shape=tuple(v.shape), stype=v.stype, data=bytes(v.data))
            for k, v in record.items()
        }
    )
    other = load_arrays(create_mil(name, in_dim=10, num_classes=2), rebuilt)
    for (k, a), (k2, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert k == k2 and a.dtype == b.dtype
        assert torch.equal(a, b), k
    assert update_problems(rebuilt, record) == []


def test_update_problems_names_what_is_wrong() -> None:
    model = create_mil("abmil", in_dim=4, num_classes=2)
    ref = model_to_arrays(model)
    state = {k: v.numpy().copy() for k, v in ref.items()}
    state["classifier.weight"][0, 0] = np.nan
    state["classifier.bias"] = np.zeros(5, dtype=np.float32)
    problems = update_problems(as_record(state), ref)
    assert "'classifier.weight' contains NaN or Inf" in problems
    assert "'classifier.bias' has shape (5,), expected (2,)" in problems
    del state["attention_w.bias"]
    assert any("missing arrays ['attention_w.bias']" in p for p in update_problems(as_record(state), ref))
