"""Nothing identifying leaves a site: error replies hold a code and a fixed text, metrics need k patients, and a
run in which no site trained ends non-zero instead of presenting an untrained model.

The ClientApp is called through Flower's dispatch with real messages (as in test_deploy_federation); the
coordinator's strategy gets hand-made replies, including a hostile one; two real runs on Flower's simulation
engine check the whole path: every file the coordinator wrote and Flower's server log.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedpath.client import app as client_module
from fedpath.client.app import app as client_app
from fedpath.common.manifest import load_manifest, split_patients
from fedpath.common.mil import create_mil
from fedpath.common.runconfig import (
    INCOMPATIBLE_MODEL,
    PRIVACY_EXHAUSTED,
    SITE_DATA_ERROR,
    SITE_ERRORS,
    SITE_INTERNAL_ERROR,
    UNIT_WEIGHT_KEY,
    WEIGHT_KEY,
    RunConfig,
)
from fedpath.common.wire import model_to_arrays
from fedpath.server.federation import no_training_reasons
from fedpath.server.runfolder import RunFolder, render_model_card
from fedpath.server.strategy import GuardedFedProx
from fedpath.simulation.simulate import federation_config, simulate, sites_that_never_trained
from tests.federation_helpers import make_cohort

FEDPATH = str(Path(sys.executable).parent / "fedpath")
Node = dict[str, bool | float | int | str]


@pytest.fixture(autouse=True)
def site_errors_flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


def ask(kind: str, run: RunConfig, node_config: Node, model: torch.nn.Module | None = None) -> Message:
    """Send one train or evaluate message to fedpath's ClientApp, as a SuperNode would."""
    model = model or create_mil("abmil", in_dim=run.in_dim, num_classes=run.num_classes)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "config": ConfigRecord({"server-round": 1, "proximal-mu": 0.01}),
        }
    )
    msg = Message(content=content, dst_node_id=1, message_type=kind)
    return client_app(msg, Context(1, 1, node_config, RecordDict(), run.to_flower()))


def identifiers(manifest_path: Path, site: str) -> set[str]:
    """Everything that names a patient, slide or file of `site`: ids, file names, absolute paths."""
    manifest = load_manifest(manifest_path)
    out = set()
    for slide in manifest.slides:
        if slide.site == site:
            out |= {slide.patient_id, slide.slide_id}
            if slide.features is not None:
                out |= {Path(slide.features).name, str(slide.features)}
    return out


def break_site(manifest_path: Path, site: str) -> Path:
    """Overwrite the feature file of `site`'s first training patient with bytes that are not HDF5."""
    manifest = load_manifest(manifest_path)
    train = split_patients(manifest)[site].train
    slide = next(s for s in manifest.slides if s.patient_id in sorted(train)[0:1])
    assert slide.features is not None and slide.patient_id in Path(slide.features).name
    Path(slide.features).write_bytes(b"not an HDF5 file\n")
    return Path(slide.features)


def empty_bag(manifest_path: Path, site: str) -> None:
    """Make every slide of `site`'s first training patient a feature file with no tiles."""
    manifest = load_manifest(manifest_path)
    first = sorted(split_patients(manifest)[site].train)[0]
    for slide in (s for s in manifest.slides if s.patient_id == first):
        assert slide.features is not None
        with h5py.File(slide.features, "r+") as f:
            dim = f["features"].shape[-1]
            for name in list(f.keys()):
                shape = (0, dim) if name == "features" else (0, *f[name].shape[1:])
                del f[name]
                f.create_dataset(name, shape=shape, dtype=np.float32)


def assert_names_nothing(reply: Message, code: int, names: set[str]) -> None:
    assert reply.has_error(), "the faulty site answered without an error"
    assert reply.error.code == code and reply.error.reason == SITE_ERRORS[code]
    assert not reply.has_content()  # no weights, no metrics: the code and its fixed text are all there is
    text = f"{reply.error.reason} {reply.error.code}"
    assert [n for n in names if n in text] == []
    for word in ("/", ".h5", "P0", "Traceback"):
        assert word not in reply.error.reason


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("fault", ["not-hdf5", "no-tiles"])
def test_faulty_site_replies_with_a_code_and_fixed_text_only(
    tmp_path: Path, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = make_cohort(tmp_path / "cohort", sites=2, slides=24, shift=0.5)
    names = identifiers(manifest, "site-A")
    (break_site if fault == "not-hdf5" else empty_bag)(manifest, "site-A")
    run = RunConfig(in_dim=16, local_epochs=1, max_tiles=0)
    node: Node = {"manifest": str(manifest), "site": "site-A"}
    with caplog.at_level(logging.ERROR, logger="fedpath.client.app"):
        reply = ask("train", run, node)
    assert_names_nothing(reply, SITE_DATA_ERROR, names)
    # the detail stays at the site: its own log names the file (this is what the reply must not carry)
    detail = "\n".join(r.getMessage() + str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert "site-A-P" in detail and "Traceback" not in reply.error.reason


@pytest.mark.usefixtures("task_identity")
def test_faulty_site_evaluation_and_other_failures_carry_their_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = make_cohort(tmp_path / "cohort", sites=2, slides=24, shift=0.5)
    names = identifiers(manifest, "site-A")
    run = RunConfig(in_dim=16, local_epochs=1)
    node: Node = {"manifest": str(manifest), "site": "site-A", "min-report-patients": 1}
    # incompatible model: the run's in-dim is not the site's feature dimension
    wide = RunConfig(in_dim=32, local_epochs=1)
    assert_names_nothing(ask("train", wide, node), INCOMPATIBLE_MODEL, names)
    assert_names_nothing(ask("evaluate", wide, node), INCOMPATIBLE_MODEL, names)
    # weights of another architecture than the run's
    other = create_mil("abmil", in_dim=8, num_classes=2)
    assert_names_nothing(ask("train", run, node, other), INCOMPATIBLE_MODEL, names)

    # anything else: an exception whose text names a patient and a file
    def boom(*_: object, **__: object) -> None:
        raise RuntimeError(f"patient site-A-P0001 broke training at {manifest}")

    monkeypatch.setattr(client_module, "train_epochs", boom)
    assert_names_nothing(ask("train", run, node), SITE_INTERNAL_ERROR, names)
    # a validation patient's file that is not HDF5 (k = 1, so evaluation reads it)
    m = load_manifest(manifest)
    val = split_patients(m)["site-A"].val
    for slide in m.slides:
        if slide.patient_id in val and slide.features is not None:
            Path(slide.features).write_bytes(b"\x00garbage")
    assert_names_nothing(ask("evaluate", run, node), SITE_DATA_ERROR, names)


@pytest.mark.usefixtures("task_identity")
def test_metrics_leave_only_for_at_least_k_patients(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "cohort", sites=2, slides=40, shift=0.5)
    splits = split_patients(load_manifest(manifest))["site-A"]
    n_train, n_val = len(splits.train), len(splits.val)
    assert 1 < n_val < n_train, (n_train, n_val)
    run = RunConfig(in_dim=16, local_epochs=1)

    def metrics(kind: str, k: int | None) -> dict[str, float]:
        node: Node = {"manifest": str(manifest), "site": "site-A"}
        if k is not None:
            node["min-report-patients"] = k
        reply = ask(kind, run, node)
        assert not reply.has_error(), reply.error
        return dict(reply.content.metric_records["metrics"])  # type: ignore[arg-type]

    # below k: the evaluate reply is the count and nothing else; the train reply has no loss
    below = metrics("evaluate", n_val + 1)
    assert below == {WEIGHT_KEY: n_val, UNIT_WEIGHT_KEY: 1}
    assert "loss" not in metrics("train", n_train + 1)
    assert metrics("train", n_train + 1)[WEIGHT_KEY] == n_train
    # at k: the metrics are sent
    at = metrics("evaluate", n_val)
    assert {"auroc", "balanced_accuracy", "loss"} <= set(at) and at[WEIGHT_KEY] == n_val
    assert np.isfinite(metrics("train", n_train)["loss"])
    # no node config key: k = 10
    assert set(metrics("evaluate", None)) == ({WEIGHT_KEY, UNIT_WEIGHT_KEY} if n_val < 10 else set(at))
    assert ("loss" in metrics("train", None)) == (n_train >= 10)


def _sent(node: int, kind: str) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=kind)


@pytest.mark.usefixtures("task_identity")
def test_coordinator_records_codes_and_its_own_text_never_the_sites() -> None:
    model = create_mil("abmil", in_dim=8, num_classes=2)
    reference = model_to_arrays(model)
    strategy = GuardedFedProx(reference=reference, proximal_mu=0.0, min_sites=2)
    leak = "bag 'site-B-P0001' has no tiles (/data/features/site-B-P0001-S1.h5)\nTraceback ..."

    def ok(node: int, metrics: dict[str, float]) -> Message:
        content = RecordDict({"arrays": reference, "metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
        return Message(content=content, reply_to=_sent(node, "train"))

    replies = [
        ok(1, {WEIGHT_KEY: 12, "loss": 0.5}),
        ok(2, {WEIGHT_KEY: 4}),  # below k: no loss
        Message(error=Error(code=SITE_DATA_ERROR, reason=leak), reply_to=_sent(3, "train")),
        Message(error=Error(code=PRIVACY_EXHAUSTED, reason=leak), reply_to=_sent(4, "train")),
        Message(error=Error(code=9999, reason=leak), reply_to=_sent(5, "train")),
        Message(error=Error(code=2, reason=leak), reply_to=_sent(6, "train")),  # Flower: ClientApp raised
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert metrics["loss"] == pytest.approx(0.5)  # averaged over the sites that sent it
    record = strategy.current
    assert record is not None and record.aggregated
    line = record.as_log_line()
    sites = line["sites"]
    assert (
        sites["node-3"]["code"] == SITE_DATA_ERROR
        and SITE_ERRORS[SITE_DATA_ERROR] in sites["node-3"]["reason"]
    )
    assert sites["node-4"]["status"] == "privacy-exhausted" and sites["node-4"]["code"] == PRIVACY_EXHAUSTED
    assert sites["node-5"]["reason"] == "error code 9999"
    assert "CLIENT_APP_RAISED_EXCEPTION" in sites["node-6"]["reason"]
    assert "P0001" not in str(line) and "/data" not in str(line) and "Traceback" not in str(line)

    strategy.aggregate_evaluate(
        1, [Message(error=Error(code=SITE_DATA_ERROR, reason=leak), reply_to=_sent(3, "evaluate"))]
    )
    assert "P0001" not in str(strategy.current.as_log_line())  # type: ignore[union-attr]


def test_no_training_reasons_name_each_sites_codes() -> None:
    run = RunConfig(in_dim=8, min_sites=2)
    refused = {"status": "failed", "code": SITE_DATA_ERROR, "reason": "error code 4710: data"}
    history = [
        {
            "round": r,
            "aggregated": False,
            "sites": {
                "site-A": refused,
                "site-B": {
                    "status": "privacy-exhausted",
                    "code": PRIVACY_EXHAUSTED,
                    "reason": "error code 4701",
                },
                "site-C": {"status": "ok", "train": {"patients": 3}},
            },
        }
        for r in (1, 2)
    ]
    reason = no_training_reasons(run, history)
    assert reason is not None and "no site trained" in reason
    assert "site-A: error code 4710: data (round 1, 2)" in reason
    assert "site-B: error code 4701 (round 1, 2)" in reason and "site-C: sent an update" in reason
    history[1]["aggregated"] = True
    assert no_training_reasons(run, history) is None


def _run_dir_text(run_dir: Path) -> str:
    """Every text the coordinator wrote: round log, model card, server log, Flower's own logs and state. Not
    the app bundle (code and run config) and not site-logs/, the simulated sites' own logs."""
    texts = []
    for path in sorted(run_dir.rglob("*")):
        top = path.relative_to(run_dir).parts[0]
        if path.is_file() and path.suffix != ".pt" and top not in ("app", "site-logs"):
            texts.append(path.read_bytes().decode("utf-8", "replace"))
    assert len(texts) >= 4, texts
    return "\n".join(texts)


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_run_with_a_faulty_site_records_no_identifier_anywhere(tmp_path: Path) -> None:
    """site-B's feature file of one training patient is not HDF5; its file name holds the patient id. Two
    rounds on Flower's simulation engine: site-A trains alone; nothing the coordinator received, logged or
    wrote names site-B's patients, slides or files."""
    manifest = make_cohort(tmp_path / "cohort", sites=2, slides=40, shift=0.5)
    broken = break_site(manifest, "site-B")
    names = identifiers(manifest, "site-B")
    run = federation_config(manifest, run_dir=tmp_path / "run", num_server_rounds=2, min_sites=1, seed=1)
    simulate(run, sites=2, progress=None)

    folder = RunFolder(tmp_path / "run")
    lines = folder.read_rounds()
    assert [line["round"] for line in lines] == [1, 2] and all(line["aggregated"] for line in lines)
    for line in lines:
        bad = line["sites"]["site-B"]
        assert bad["status"] == "failed" and bad["code"] == SITE_DATA_ERROR
        assert bad["reason"] == f"error code {SITE_DATA_ERROR}: {SITE_ERRORS[SITE_DATA_ERROR]}"
        assert line["sites"]["site-A"]["status"] == "ok"
    assert f"code {SITE_DATA_ERROR}" in folder.card_md.read_text() and folder.model.exists()
    # `fedpath simulate` exits 1 naming the site, and compare fails the job (simulation/simulate.py)
    never = sites_that_never_trained(lines, 2)
    assert list(never) == ["site-B"] and str(SITE_DATA_ERROR) in never["site-B"]
    assert sites_that_never_trained(lines, 3) == {
        "site-B": never["site-B"],
        "1 more site(s)": "never replied",
    }
    server_log = (tmp_path / "run" / "server.log").read_text()
    assert "site-B" in server_log and str(SITE_DATA_ERROR) in server_log  # the log does tell what happened
    everything = _run_dir_text(tmp_path / "run")
    assert broken.name in names and str(broken) in names
    assert sorted(n for n in names if n in everything) == []
    # the detail is not lost: the simulated site's own log names the file
    site_logs = "".join(p.read_text() for p in (tmp_path / "run" / "site-logs").glob("*.log"))
    assert broken.name in site_logs and "Traceback" in site_logs


def nan_features(manifest_path: Path, site: str) -> Path:
    """Fill the feature file of `site`'s first training patient with NaN: its header still reads (the check
    before a run starts passes), training on it fails."""
    manifest = load_manifest(manifest_path)
    first = sorted(split_patients(manifest)[site].train)[0]
    slide = next(s for s in manifest.slides if s.patient_id == first)
    assert slide.features is not None
    with h5py.File(slide.features, "r+") as f:
        f["features"][...] = np.nan
    return Path(slide.features)


def test_simulate_refuses_unreadable_feature_files_before_starting(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "cohort", sites=2, slides=24, shift=0.5)
    broken = break_site(manifest, "site-B")
    out = tmp_path / "run"
    cmd = [FEDPATH, "simulate", "--manifest", str(manifest), "--out", str(out), "--rounds", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    line = next(s.line for s in load_manifest(manifest).slides if s.features == broken)
    assert f"line {line}, column 'features': {broken}: not a readable HDF5 feature file" in done.stderr
    assert "nothing was started" in done.stderr and not out.exists()


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_run_in_which_no_site_trained_ends_non_zero_and_says_why(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "cohort", sites=2, slides=24, shift=0.5)
    for site in ("site-A", "site-B"):
        nan_features(manifest, site)
    out = tmp_path / "run"
    cmd = [FEDPATH, "simulate", "--manifest", str(manifest), "--out", str(out), "--rounds", "1"]
    done = subprocess.run([*cmd, "--min-sites", "1"], capture_output=True, text=True, timeout=600)
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    assert "no site trained" in said and "Final global model" not in said
    assert said.count(f"error code {SITE_DATA_ERROR}") >= 2 and "site-A" in said and "site-B" in said
    folder = RunFolder(out)
    assert not folder.model.exists()
    assert "Not a trained model" in folder.card_md.read_text()
    assert folder.latest_checkpoint().trained_rounds == 0  # type: ignore[union-attr]


def test_untrained_model_card_says_so() -> None:
    card = {
        "config": RunConfig(in_dim=8).model_dump(),
        "rounds": 1,
        "sites": ["site-A"],
        "model_file": None,
        "round_log": "rounds.jsonl",
        "fedpath_version": "0",
        "flwr_version": "0",
        "final_evaluation": {"sites": {}, "aggregate": {}},
        "no_site_trained": "no site trained: site-A: error code 4710",
    }
    text = render_model_card(card)
    assert "**Not a trained model.** no site trained: site-A: error code 4710" in text
    assert "weights: none" in text


def test_site_start_checks_its_files_before_flower_starts(tmp_path: Path) -> None:
    from tests.helpers import run_cli, write_csv, write_feature_file

    good = [write_feature_file(tmp_path / f"ok{i}.h5", slide_id=f"ok{i}") for i in range(4)]
    broken = tmp_path / "broken.h5"
    broken.write_text("not an HDF5 file")
    rows = [[f"ok{i}", f"p{i}", "H1", str(i % 2), str(f)] for i, f in enumerate(good)]
    rows.append(["bad", "p9", "H1", "1", str(broken)])
    manifest = write_csv(tmp_path / "m.csv", ["slide_id", "patient_id", "site", "label", "features"], rows)
    result = run_cli(
        "site", "start", "--manifest", str(manifest), "--superlink", "127.0.0.1:9", "--insecure",
        "--allow-unsigned-apps", timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        "nothing was started" in result.stderr and "broken.h5" in result.stderr and "line 6" in result.stderr
    )
    assert "SuperNode" not in result.stdout  # Flower was never started
