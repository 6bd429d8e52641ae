"""Federation pieces that need no running Flower processes: run config, guard, run folder, proximal term, FAB."""

from __future__ import annotations

import math
import tomllib
import zipfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedpath.client.app import train as client_train
from fedpath.common.mil import create_mil
from fedpath.common.runconfig import RunConfig, RunConfigError, round_seed
from fedpath.common.wire import model_to_arrays
from fedpath.server.runfolder import Checkpoint, RunFolder, resume_conflicts
from fedpath.server.strategy import reply_problems, weighted_mean_finite
from tests.federation_helpers import make_cohort

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def federation_task_identity() -> Iterator[None]:
    """Messages are made inside a Flower task; give this process the identity a ClientApp process has."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def test_repo_flower_app_config_mirrors_run_config() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_flower()


def test_run_config_rejects_unknown_and_invalid_keys() -> None:
    assert RunConfig.from_flower({"proximal-mu": 0.5, "in-dim": 8}).proximal_mu == 0.5
    with pytest.raises(RunConfigError, match="proximal-nu"):
        RunConfig.from_flower({"proximal-nu": 0.5})
    with pytest.raises(RunConfigError, match="local-epochs"):
        RunConfig.from_flower({"local-epochs": 0})
    with pytest.raises(RunConfigError, match="in-dim"):
        RunConfig().require_model_shape()


def test_round_seed_depends_on_round_and_site_only() -> None:
    assert round_seed(0, 3, "site-A") == round_seed(0, 3, "site-A")
    assert len({round_seed(0, r, s) for r in (1, 2) for s in ("site-A", "site-B")}) == 4


def _reply(arrays: ArrayRecord, patients: int = 5) -> Message:
    sent = Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=7, message_type="train")
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"patients": patients, "loss": 0.5})})
    return Message(content=content, reply_to=sent)


def test_guard_names_nan_inf_shape_dtype_and_weight_problems() -> None:
    model = create_mil("abmil", in_dim=8, num_classes=2)
    reference = model_to_arrays(model)
    assert reply_problems(_reply(reference), reference) == []

    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(k for k, v in state.items() if v.dim() == 2)  # a weight matrix
    state[name][0, 0] = float("nan")
    assert any("NaN or Inf" in p and name in p for p in reply_problems(_reply(ArrayRecord(state)), reference))

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[name] = torch.zeros(3, 3)
    assert any("shape" in p for p in reply_problems(_reply(ArrayRecord(state)), reference))

    state = {k: v.clone().double() for k, v in model.state_dict().items()}
    assert any("dtype" in p for p in reply_problems(_reply(ArrayRecord(state)), reference))

    assert any("patients" in p for p in reply_problems(_reply(reference, patients=0), reference))


def test_evaluation_mean_skips_sites_without_an_auroc() -> None:
    records = [
        RecordDict({"m": MetricRecord({"patients": 3, "auroc": 0.9, "loss": 0.2})}),
        RecordDict({"m": MetricRecord({"patients": 1, "auroc": float("nan"), "loss": 0.6})}),
    ]
    mean = weighted_mean_finite(records, "patients")
    assert mean["auroc"] == pytest.approx(0.9)
    assert mean["loss"] == pytest.approx((3 * 0.2 + 0.6) / 4)


def test_run_folder_checkpoints_and_round_log_truncation(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    state = {"w": torch.arange(4.0)}
    for r in (1, 2):
        folder.save_checkpoint(Checkpoint(r, state, {"seed": 0}, {"run": 0}))
        folder.append_round({"round": r, "loss": float("nan")})
    folder.append_round({"round": 3})  # a crash after the log line but before round 3's checkpoint
    latest = folder.latest_checkpoint()
    assert latest is not None and latest.round == 2
    torch.testing.assert_close(latest.state_dict["w"], state["w"])
    folder.truncate_rounds(latest.round)
    assert [r["round"] for r in folder.read_rounds()] == [1, 2]
    assert folder.read_rounds()[0]["loss"] is None  # strict JSON: NaN written as null
    assert resume_conflicts({"seed": 0, "lr": 0.1}, {"seed": 1, "lr": 0.1}) == ["seed: 0 → 1"]


def _train_reply(manifest: Path, mu: float, global_state: dict[str, torch.Tensor]) -> float:
    """Distance ‖w_local − w_global‖ after one local round through the site's ClientApp handler."""
    run = RunConfig(in_dim=16, manifest=str(manifest), local_epochs=3, lr=1e-2)
    content = RecordDict(
        {"arrays": ArrayRecord(global_state), "config": ConfigRecord({"server-round": 1, "proximal-mu": mu})}
    )
    msg = Message(content=content, dst_node_id=1, message_type="train")
    context = Context(1, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), run.to_flower())
    reply = client_train(msg, context)
    assert reply.content.metric_records["metrics"]["patients"] > 0
    local = reply.content.array_records["arrays"].to_torch_state_dict()
    return math.sqrt(sum(float(((local[k] - global_state[k]) ** 2).sum()) for k in global_state))


def test_large_mu_keeps_the_local_model_closer_to_the_global_one(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "cohort", sites=2, slides=24, shift=0.5)
    torch.manual_seed(0)
    global_state = create_mil("abmil", in_dim=16, num_classes=2).state_dict()
    drift_plain = _train_reply(manifest, 0.0, global_state)
    drift_prox = _train_reply(manifest, 10.0, global_state)
    assert drift_plain > 0
    assert drift_prox < 0.5 * drift_plain, (drift_prox, drift_plain)


def test_repo_app_bundle_holds_code_only_and_fits_the_cap() -> None:
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    assert len(fab) < 10 * 1024 * 1024
    assert "client/app.py" in names and "server/app.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "runs/", ".venv/"))]
    assert not [n for n in names if Path(n).suffix in {".h5", ".svs", ".tif", ".tiff", ".pt", ".csv"}]
    assert np.all([n.endswith((".py", ".toml")) or n.startswith(".info/") for n in names])
