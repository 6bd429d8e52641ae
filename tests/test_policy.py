"""A site's own privacy policy: parsed from the node config that `fedpath site start` writes, enforced by the
ClientApp before any training (code POLICY_REFUSED, a reason that names the rule and no data), recorded in the
ledger with every round; the budget re-checked when a round is recorded; `site privacy` and `site check`
reading the ledger the site writes."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args

from fedpath.client import app as client_module
from fedpath.client.app import app as client_app
from fedpath.client.policy import PolicyError, SitePolicy, add_policy_options
from fedpath.client.preflight import check_privacy_ledger
from fedpath.client.privacy import PrivacyLedger, ledger_path
from fedpath.client.site_cli import site_node_config
from fedpath.common.cli import UserError
from fedpath.common.mil import create_mil
from fedpath.common.runconfig import POLICY_REFUSED, PRIVACY_EXHAUSTED, RunConfig
from tests.helpers import run_cli, write_csv, write_feature_file

Node = dict[str, bool | float | int | str]
DIM = 6


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """One site, H1: 24 patients with one slide each (ids that must never appear in a reply)."""
    rows = []
    for p in range(24):
        name = f"H1-P{p:04d}-S1"
        write_feature_file(tmp_path / "data" / f"{name}.h5", n_tiles=6, dim=DIM, seed=p, slide_id=name)
        rows.append([name, f"H1-P{p:04d}", "H1", str(p % 2), f"{name}.h5"])
    header = ["slide_id", "patient_id", "site", "label", "features"]
    return write_csv(tmp_path / "data" / "manifest.csv", header, rows)


def ask(run: RunConfig, node_config: Node, server_round: int = 1, run_id: int = 1) -> Message:
    """Send one train message to fedpath's ClientApp, as a SuperNode would."""
    model = create_mil(run.model, in_dim=run.in_dim, num_classes=run.num_classes)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "config": ConfigRecord({"server-round": server_round, "proximal-mu": 0.0}),
        }
    )
    msg = Message(content=content, dst_node_id=1, message_type="train")
    return client_app(msg, Context(run_id, 1, node_config, RecordDict(), run.to_flower()))


@pytest.fixture
def trainings(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Counts the calls of the site's training function (it still trains)."""
    calls: list[bool] = []
    real = client_module.train_epochs

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("privacy") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "train_epochs", counted)
    return calls


def _ledger(manifest: Path) -> PrivacyLedger:
    return PrivacyLedger(ledger_path("H1", manifest=manifest), site="H1", delta=1e-5)


RUN = RunConfig(in_dim=DIM, local_epochs=1, max_tiles=0, batch_size=4)
DP = RUN.model_copy(update={"dp_noise": 1.0, "dp_batch": 4})
REFUSALS = [
    ("policy-require-dp", {"policy-require-dp": True}, RUN, "without DP"),
    ("policy-models", {"policy-models": "transmil"}, RUN, "model 'abmil' is not among this site's models"),
    ("policy-max-rounds", {"policy-max-rounds": 2}, RUN.model_copy(update={"num_server_rounds": 5}), "5 rounds > 2"),
    ("policy-min-noise", {"policy-min-noise": 2.0}, DP, "σ = 1 < 2"),
    ("policy-min-noise", {"policy-min-noise": 0.5}, RUN.model_copy(update={"dp_epsilon": 200.0}), "< 0.5"),
    ("policy-max-epsilon-run", {"policy-max-epsilon-run": 0.05}, DP, "> 0.05"),
    ("privacy-budget", {"privacy-budget": 4.0}, RUN, "a run without DP spends ε = ∞ > 4"),
]  # fmt: skip


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("rule", "policy", "run", "says"), REFUSALS, ids=[r[0] + f"-{i}" for i, r in enumerate(REFUSALS)]
)
def test_each_rule_refuses_before_training_with_its_code(
    site: Path, trainings: list[bool], rule: str, policy: Node, run: RunConfig, says: str
) -> None:
    reply = ask(run, {"manifest": str(site), "site": "H1", **policy})
    assert reply.has_error() and reply.error.code == POLICY_REFUSED, (
        reply.error if reply.has_error() else reply
    )
    assert not reply.has_content()
    reason = reply.error.reason
    assert f"refused by the site's policy ({rule})" in reason and says in reason, reason
    for data in ("H1-P", ".h5", "/", str(site.parent)):  # no patient, slide or path: config values only
        assert data not in reason
    assert trainings == []  # refused before any training
    assert _ledger(site).entries == []  # nothing trained, nothing recorded


@pytest.mark.usefixtures("task_identity")
def test_a_refused_run_gets_no_feature_statistics_either(site: Path) -> None:
    """The standardisation query (before round 1) answers to the site's policy like a training round."""

    def query(run: RunConfig, node_config: Node) -> Message:
        msg = Message(
            content=RecordDict({"config": ConfigRecord({"server-round": 0})}),
            dst_node_id=1,
            message_type="query",
        )
        return client_app(msg, Context(1, 1, node_config, RecordDict(), run.to_flower()))

    allowed = query(RUN, {"manifest": str(site), "site": "H1"})
    assert not allowed.has_error() and len(allowed.content.array_records) == 1  # 17 training patients ≥ k
    refused = query(RUN, {"manifest": str(site), "site": "H1", "policy-require-dp": True})
    assert refused.has_error() and refused.error.code == POLICY_REFUSED
    assert "policy-require-dp" in refused.error.reason and "H1-P" not in refused.error.reason
    assert not refused.has_content()


@pytest.mark.usefixtures("task_identity")
def test_rounds_within_the_policy_train_and_are_recorded_with_it(site: Path, trainings: list[bool]) -> None:
    node: Node = {"manifest": str(site), "site": "H1", "policy-require-dp": True, "policy-min-noise": 0.8}
    node |= {
        "policy-models": "abmil",
        "policy-max-rounds": 3,
        "privacy-budget": 50.0,
        "min-report-patients": 5,
    }
    reply = ask(DP.model_copy(update={"num_server_rounds": 3}), node)
    assert not reply.has_error() and trainings == [True]
    entry = _ledger(site).entries[-1]
    assert entry.dp and entry.epsilon == reply.content["metrics"]["epsilon"]
    assert entry.policy == {
        "require_dp": True, "max_epsilon_run": None, "max_epsilon_total": 50.0, "min_noise": 0.8,
        "max_rounds": 3, "models": ["abmil"], "min_report_patients": 5,
    }  # fmt: skip


@pytest.mark.usefixtures("task_identity")
def test_round_without_dp_is_recorded_and_later_dp_runs_see_it(site: Path, trainings: list[bool]) -> None:
    reply = ask(RUN, {"manifest": str(site), "site": "H1"})
    assert not reply.has_error() and trainings == [False]
    ledger = _ledger(site)
    assert [(e.dp, e.round) for e in ledger.entries] == [(False, 1)] and math.isinf(ledger.epsilon)
    later = ask(DP, {"manifest": str(site), "site": "H1"}, run_id=2)
    assert later.has_error() and later.error.code == PRIVACY_EXHAUSTED and trainings == [False]


@pytest.mark.usefixtures("task_identity")
def test_budget_spent_by_another_run_during_training_withholds_the_update(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both runs pass the check at round start; the one that records second finds the budget spent and must not
    send its update."""
    real = client_module.train_epochs
    trained: list[bool] = []

    def train_while_another_run_spends(*args: Any, **kwargs: Any) -> Any:
        _ledger(site).record(run="other", round=1, noise_multiplier=0.6, q=0.5, steps=10)
        trained.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "train_epochs", train_while_another_run_spends)
    reply = ask(DP, {"manifest": str(site), "site": "H1", "privacy-budget": 10.0})
    assert trained == [True]  # the check at round start passed
    assert reply.has_error() and reply.error.code == PRIVACY_EXHAUSTED and not reply.has_content()
    assert [e.run for e in _ledger(site).entries] == ["other"]  # the withheld round is not recorded


def test_default_dp_budget_applies_without_one_anywhere() -> None:
    assert client_module.privacy_config(DP, SitePolicy()).budget == 8.0
    assert client_module.privacy_config(DP.model_copy(update={"dp_budget": 5.0}), SitePolicy()).budget == 5.0
    site_lower = SitePolicy(max_epsilon_total=2.0)
    assert client_module.privacy_config(DP.model_copy(update={"dp_budget": 5.0}), site_lower).budget == 2.0


def test_policy_from_site_start_options_reaches_the_node_config(site: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--privacy-ledger", type=Path)
    add_policy_options(parser)
    given = ["--policy-require-dp", "--privacy-budget", "4", "--policy-models", "abmil,transmil"]
    given += ["--policy-max-epsilon-run", "1.5", "--policy-min-noise", "0.9", "--policy-max-rounds", "20"]
    given += ["--min-report-patients", "12", "--privacy-ledger", str(tmp_path / "state" / "H1.json")]
    args = parser.parse_args(given)
    node = parse_config_args([site_node_config(args, site, "H1")])
    assert node["privacy-ledger"] == str((tmp_path / "state" / "H1.json").resolve())
    policy = SitePolicy.from_node_config(node)
    assert policy == SitePolicy(
        require_dp=True, max_epsilon_total=4.0, models=("abmil", "transmil"), max_epsilon_run=1.5,
        min_noise=0.9, max_rounds=20, min_report_patients=12,
    )  # fmt: skip
    # without --privacy-ledger the node config still names the ledger: where `site privacy --manifest` looks
    bare = parse_config_args([site_node_config(parser.parse_args([]), site, "H1")])
    assert bare["privacy-ledger"] == str(ledger_path("H1", manifest=site))
    assert SitePolicy.from_node_config(bare) == SitePolicy()
    with pytest.raises(PolicyError, match=r"unknown site policy key.*policy-max-epsilon"):
        SitePolicy.from_node_config({"policy-max-epsilon": 3.0})
    with pytest.raises(PolicyError, match="'policy-min-noise'"):
        SitePolicy.from_node_config({"policy-min-noise": -1.0})


def test_site_start_refuses_a_tampered_ledger(site: Path) -> None:
    ledger = _ledger(site)
    ledger.record(run="r", round=1, noise_multiplier=1.0, q=0.1, steps=10)
    ledger.path.unlink()
    parser = argparse.ArgumentParser()
    parser.add_argument("--privacy-ledger", type=Path)
    add_policy_options(parser)
    with pytest.raises(UserError, match="missing, but its anchor"):
        site_node_config(parser.parse_args([]), site, "H1")
    check = check_privacy_ledger(ledger.path, "H1")
    assert check.ok is False and "restore" in check.fix


def test_site_privacy_reads_the_ledger_the_site_writes(site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state" / "H1.json"  # as deploy/bin/site.sh: the ledger away from the (read-only) data
    PrivacyLedger(state, site="H1", delta=1e-5).record(
        run="r",
        round=1,
        noise_multiplier=1.0,
        q=0.1,
        steps=10,
        policy=SitePolicy(require_dp=True).as_record(),
    )
    shown = run_cli("site", "privacy", "--manifest", str(site), "--privacy-ledger", str(state))
    assert shown.returncode == 0, shown.stderr
    assert "hash chain verified" in shown.stdout and "require_dp=True" in shown.stdout
    elsewhere = run_cli("site", "privacy", "--manifest", str(site))
    assert elsewhere.returncode == 0 and "pass the same option" in elsewhere.stdout
    assert "spent no privacy" not in elsewhere.stdout
    data = json.loads(state.read_text())
    data["entries"][0]["steps"] = 1
    state.write_text(json.dumps(data))
    tampered = run_cli("site", "privacy", "--privacy-ledger", str(state))
    assert tampered.returncode != 0 and "edited" in tampered.stderr and "restore" in tampered.stderr


def test_policy_needs_no_torch() -> None:
    """`fedpath site start --help` builds the policy options: importing them must stay light."""
    import subprocess
    import sys

    code = "import sys, fedpath.client.site_cli; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert torch is not None
