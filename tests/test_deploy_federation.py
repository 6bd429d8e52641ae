"""The deployment as hospital IT runs it, with real processes on loopback: the entry scripts of deploy/bin
(coordinator.sh: SuperLink with TLS, site authentication and a state database; superexec.sh; site.sh), keys
and certificates from `fedpath deploy init`, registration with `fedpath deploy register`, runs with
`fedpath run`. One coordinator serves every scenario of the module; each scenario submits its own run.

Also: what a site's ClientApp replies, inspected field by field, holds only the model weights, scalar
aggregate metrics and the site's name.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedpath.client.app import app as client_app
from fedpath.common.features import PROVENANCE_KEYS
from fedpath.common.manifest import load_manifest
from fedpath.common.mil import create_mil
from fedpath.common.runconfig import FEATURES_PREFIX, SITE_NAME, SITE_RECORD, WEIGHT_KEY, RunConfig
from fedpath.common.wire import arrays_nbytes, model_to_arrays
from fedpath.server import flower_runtime as fr
from fedpath.server.runfolder import RunFolder
from fedpath.simulation.synth import ENCODER_NAME
from tests.federation_helpers import (
    FlowerProcess,
    kill_hard,
    make_cohort,
    start_coordinator,
    start_site,
    start_superexec,
    supernodes,
    wait_for,
)

FEDPATH = str(Path(sys.executable).parent / "fedpath")
SITES = ("site-A", "site-B")


@dataclass
class Deployment:
    root: Path
    consortium: Path
    manifest: Path
    port: int
    local_port: int
    coordinator: FlowerProcess
    superexec: FlowerProcess
    sites: dict[str, FlowerProcess]
    intruder: FlowerProcess

    @property
    def address(self) -> str:
        """The sites' address: the Fleet gateway."""
        return f"127.0.0.1:{self.port}"

    @property
    def operator(self) -> str:
        """The SuperLink itself, reachable on the coordinator machine only."""
        return f"127.0.0.1:{self.local_port}"

    @property
    def keys(self) -> Path:
        return self.consortium / "coordinator"

    def site(self, name: str, *, preflight: bool = True) -> FlowerProcess:
        return start_site(
            name,
            self.consortium / "sites" / name,
            self.root / name,
            self.manifest,
            self.address,
            preflight=preflight,
        )

    def restart_coordinator(self) -> None:
        self.coordinator.stop()
        self.coordinator = start_coordinator(self.keys, self.root / "coordinator", self.port, self.local_port)

    def nodes(self) -> dict[str, str]:
        return supernodes(self.root / "admin")

    def run(self, name: str, rounds: int, min_sites: int) -> tuple[RunFolder, Path]:
        """Submit a run with `fedpath run --no-wait`; its folder is written by the ServerApp (superexec)."""
        out = self.root / name
        cmd = [FEDPATH, "run", "--superlink", self.operator, "--root-certificates", str(self.keys / "ca.crt")]
        cmd += ["--signing-key", str(self.keys / "app-signing.key")]
        cmd += ["--out", str(out), "--sites", "2", "--in-dim", "16", "--rounds", str(rounds)]
        cmd += ["--min-sites", str(min_sites), "--lr", "0.01", "--no-wait"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return RunFolder(out), out / "flwr-cli"

    def logs(self) -> str:
        return "\n".join(f"== {p}\n{p.read_text()[-2500:]}" for p in sorted(self.root.rglob("*.out")))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """deploy init for three sites; coordinator + superexec; site-A and site-B registered and started;
    site-C started with a valid key of the consortium that was never registered."""
    root = tmp_path_factory.mktemp("deployment")
    manifest = make_cohort(root / "cohort", sites=3, slides=60, shift=0.5)
    port, local_port = fr.free_port(), fr.free_port()
    init = [FEDPATH, "deploy", "init", "--sites", "site-A,site-B,site-C", "--address", f"127.0.0.1:{port}"]
    init += ["--encoder", ENCODER_NAME, "--weights-sha256", "synthetic", "--out", str(root / "consortium")]
    subprocess.run(init, check=True, capture_output=True, timeout=60)
    consortium = root / "consortium"
    keys = consortium / "coordinator"
    started: list[FlowerProcess] = []
    deployment: Deployment | None = None
    try:
        coordinator = start_coordinator(keys, root / "coordinator", port, local_port)
        started.append(coordinator)
        superexec = start_superexec(keys, root / "superexec", local_port)
        started.append(superexec)
        register = [FEDPATH, "deploy", "register", "--superlink", f"127.0.0.1:{local_port}"]
        register += ["--root-certificates"]
        register += [str(keys / "ca.crt"), "--flwr-home", str(root / "admin")]
        done = subprocess.run(
            [*register, *(str(keys / "sites" / f"{s}.pub") for s in SITES)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("registered as node") == 2
        deployment = Deployment(
            root, consortium, manifest, port, local_port, coordinator, superexec, {}, coordinator
        )
        for site in (*SITES, "site-C"):
            process = deployment.site(site)
            started.append(process)
            deployment.sites[site] = process
        deployment.intruder = deployment.sites.pop("site-C")
        yield deployment
    finally:
        # the scenarios replace processes they restart; stop() is a no-op on one already stopped
        later = [] if deployment is None else [deployment.coordinator, *deployment.sites.values()]
        for process in [*reversed(started), *later]:
            process.stop()


def _status(cli_home: Path) -> str:
    """Status of the one run submitted with this CLI home."""
    import json

    cmd = [fr.executable("flwr"), "ls", fr.CONNECTION, "--format", "json"]
    done = subprocess.run(cmd, env=fr.flower_env(cli_home), capture_output=True, text=True, timeout=60)
    runs = json.loads(done.stdout[done.stdout.index("{") :])["runs"]
    return str(sorted(runs, key=lambda r: r.get("created-at", ""))[-1]["status"])


@pytest.mark.slow
def test_unregistered_site_is_refused(deployment: Deployment) -> None:
    intruder = deployment.intruder
    wait_for(lambda: intruder.process.poll() is not None, 90, f"site-C to be refused\n{deployment.logs()}")
    assert intruder.process.returncode != 0
    assert "Exit Code: 305" in intruder.log_file.read_text()  # Flower: SuperNode refused by the SuperLink
    nodes = deployment.nodes()
    assert sorted(nodes.values()) == ["online", "online"], nodes  # the registered two, and no third


@pytest.mark.slow
def test_run_survives_a_coordinator_restart(deployment: Deployment) -> None:
    """Both registered sites train over TLS; the SuperLink is restarted during round 2 and the run, kept in
    its state database and driven by the separate SuperExec, completes with both sites in every round."""
    folder, cli_home = deployment.run("restart", rounds=2, min_sites=2)
    wait_for(lambda: len(folder.read_rounds()) >= 1, 180, f"round 1\n{deployment.logs()}")
    restarted_at = time.time()
    deployment.restart_coordinator()
    wait_for(lambda: folder.card_json.exists(), 240, f"the end of the run\n{deployment.logs()}", poll=1)
    wait_for(
        lambda: _status(cli_home) == "finished:completed", 60, f"status completed\n{deployment.logs()}", 3
    )

    lines = folder.read_rounds()
    assert [line["round"] for line in lines] == [1, 2]
    assert lines[0]["finished_at"] < restarted_at < lines[1]["finished_at"]  # round 2 spans the restart
    for line in lines:
        assert line["aggregated"]
        assert {s: e["status"] for s, e in line["sites"].items()} == {"site-A": "ok", "site-B": "ok"}
    # what travelled back from each site per round: the float32 weights plus a small envelope
    weights = arrays_nbytes(model_to_arrays(create_mil("abmil", in_dim=16, num_classes=2)))
    for line in lines:
        for entry in line["sites"].values():
            assert weights <= entry["bytes_received"] <= 1.05 * weights + 4096, entry


@pytest.mark.slow
def test_killed_site_is_left_out_then_rejoins(deployment: Deployment) -> None:
    """site-B is killed (SIGKILL, whole tree) during round 2: round 2 is aggregated from site-A alone
    (min-sites 1); site-B is restarted once the coordinator sees it offline and trains again in the rounds
    that start after it is back."""
    folder, cli_home = deployment.run("kill", rounds=4, min_sites=1)
    wait_for(lambda: len(folder.read_rounds()) >= 1, 180, f"round 1\n{deployment.logs()}")
    kill_hard(deployment.sites["site-B"])
    killed_at = time.time()
    wait_for(
        lambda: "offline" in deployment.nodes().values(), 150, "the coordinator to see site-B offline", 5
    )
    deployment.sites["site-B"] = deployment.site("site-B", preflight=False)
    wait_for(lambda: sorted(deployment.nodes().values()) == ["online", "online"], 90, "site-B back online", 1)
    back_at = time.time()
    wait_for(lambda: folder.card_json.exists(), 300, f"the end of the run\n{deployment.logs()}", poll=1)
    assert _status(cli_home) == "finished:completed"

    lines = folder.read_rounds()
    # sites whose training update went into the round (a site may still evaluate in a round it missed)
    ok = [{s for s, e in line["sites"].items() if e["status"] == "ok" and e["train"]} for line in lines]
    assert [line["round"] for line in lines] == [1, 2, 3, 4]
    assert ok[0] == {"site-A", "site-B"}
    assert lines[1]["finished_at"] > killed_at and ok[1] == {"site-A"} and lines[1]["aggregated"]
    assert lines[1]["aggregate"]["train"]["loss"] == pytest.approx(
        lines[1]["sites"]["site-A"]["train"]["loss"]
    )
    after = [i for i, line in enumerate(lines) if line["finished_at"] - line["seconds"] > back_at]
    assert after, f"no round started after site-B came back ({back_at}): {lines}"
    assert all(ok[i] == {"site-A", "site-B"} for i in after), ok


# --- the control surface: what someone holding only the CA certificate can do from the network -----------

ROGUE_CLIENTAPP = """
from pathlib import Path

from flwr.app import Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    Path({marker!r}).write_text(str(context.node_config))  # would read the site's manifest path, and more
    return Message(content=msg.content, reply_to=msg)
"""


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [fr.executable("flwr"), *args]
    return subprocess.run(cmd, env=fr.flower_env(home), capture_output=True, text=True, timeout=120)


def _rogue_app(folder: Path, marker: Path) -> Path:
    """A Flower app whose ClientApp is its own code: it writes `marker` if it ever runs at a site."""
    run = RunConfig(in_dim=16, num_server_rounds=1, min_sites=1, run_dir=str(folder / "out"))
    return fr.write_app(
        folder / "app",
        run,
        clientapp="rogue:app",
        extra_files={"rogue.py": ROGUE_CLIENTAPP.format(marker=str(marker))},
    )


@pytest.mark.slow
def test_control_api_is_refused_on_the_sites_address(deployment: Deployment, tmp_path: Path) -> None:
    """From the address the sites use, with the consortium's CA certificate and a valid (unregistered) site
    key, every Control API operation is refused: list runs, list/register/unregister nodes, submit a run,
    read logs. The operator's own address on the coordinator still serves them."""
    import httpx

    outsider = tmp_path / "outsider"
    ca = deployment.keys / "ca.crt"
    fr.write_connection(outsider, deployment.address, root_certificates=ca)
    site_c_pub = deployment.consortium / "sites" / "site-C" / "site-C.pub"
    marker = tmp_path / "rogue-ran"
    app = _rogue_app(tmp_path / "rogue", marker)
    nodes_before = deployment.nodes()
    attempts = {
        "ls": _flwr(outsider, "ls", fr.CONNECTION, "--format", "json"),
        "supernode list": _flwr(outsider, "supernode", "list", fr.CONNECTION, "--format", "json"),
        "supernode register": _flwr(
            outsider, "supernode", "register", str(site_c_pub), fr.CONNECTION, "--format", "json"
        ),
        "supernode unregister": _flwr(
            outsider, "supernode", "unregister", next(iter(nodes_before)), fr.CONNECTION, "--format", "json"
        ),
        "run": _flwr(outsider, "run", str(app), fr.CONNECTION, "--format", "json"),
        "log": _flwr(outsider, "log", "1", fr.CONNECTION),
    }
    for name, done in attempts.items():
        reply = done.stdout + done.stderr
        succeeded = done.returncode == 0 and '"success": false' not in done.stdout
        assert not succeeded, f"`flwr {name}` from the sites' address succeeded:\n{reply}"
        assert "run-id" not in done.stdout and "node-id" not in done.stdout, (name, reply)
    # the HTTP surface itself: Control and Runtime paths, the API docs, tricks with the path
    with httpx.Client(verify=str(ca), timeout=10) as client:
        base = f"https://{deployment.address}"
        for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/get-nodes", "/docs"):
            assert client.post(base + path, content=b"").status_code == 403, path
        assert client.post(base + "/v1/fleet/%2e%2e/control/list-runs", content=b"").status_code == 403
        assert client.post(base + "/v1/fleet/get-run?x=1", content=b"").status_code == 403
        assert client.get(base + "/health").is_success  # sites' preflight still sees a SuperLink
    # nothing changed: the same two registered nodes, no run of the outsider; the operator still works
    # (a node's status may go from registered to online meanwhile: its SuperNode connecting is no change)
    assert set(deployment.nodes()) == set(nodes_before)  # the same two nodes: none added, none removed
    listed = _flwr(deployment.root / "admin", "ls", fr.CONNECTION, "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "rogue" not in listed.stdout
    assert not marker.exists()
    assert "refused POST /v1/control/" in deployment.coordinator.log_file.read_text()


@pytest.mark.slow
def test_an_app_the_consortium_did_not_sign_never_runs_at_a_site(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Past the gateway (submitted on the coordinator itself, without the signing key), an app with its own
    ClientApp reaches the sites, and each refuses it before unpacking it: its code never runs."""
    marker = tmp_path / "rogue-ran"
    app = _rogue_app(tmp_path / "rogue", marker)
    submitted = _flwr(deployment.root / "admin", "run", str(app), fr.CONNECTION, "--format", "json")
    assert '"run-id"' in submitted.stdout, submitted.stdout + submitted.stderr
    run_id = submitted.stdout[submitted.stdout.index("{") :].split('"run-id":')[1].split(",")[0].strip(" }\n")

    def refused_everywhere() -> bool:
        return all("fedpath: REFUSED app" in p.log_file.read_text() for p in deployment.sites.values())

    try:
        wait_for(
            refused_everywhere, 180, f"both sites to refuse the unsigned app\n{deployment.logs()}", poll=1
        )
    finally:
        _flwr(deployment.root / "admin", "stop", run_id, fr.CONNECTION)
    assert not marker.exists(), "the rogue ClientApp ran at a site"
    for process in deployment.sites.values():
        log = process.log_file.read_text()
        assert "not signed" in log and "nothing of this app was unpacked or run" in log
    for site in deployment.sites:  # the node's app cache: the bundle was never unpacked there
        assert list((deployment.root / site).rglob("rogue.py")) == [], site


# --- what leaves the site ---------------------------------------------------------------------------------

ALLOWED_METRIC_TYPES = (int, float)


def leaks(reply: Message, model: torch.nn.Module, site: str, identifiers: set[str]) -> list[str]:
    """Everything in a ClientApp reply beyond the model's weights, scalar metrics, the site's name and what its
    features were made with."""
    problems = []
    content = reply.content
    expected_arrays = {"arrays"} if reply.metadata.message_type == "train" else set()
    if set(content.array_records) != expected_arrays:
        problems.append(f"array records {sorted(content.array_records)}, expected {sorted(expected_arrays)}")
    reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for record in content.array_records.values():
        shapes = {k: tuple(a.shape) for k, a in record.items()}
        if shapes != reference:
            problems.append(f"arrays other than the model's weights: {sorted(set(shapes) ^ set(reference))}")
    if set(content.metric_records) != {"metrics"}:
        problems.append(f"metric records {sorted(content.metric_records)}")
    for metrics in content.metric_records.values():
        for key, value in metrics.items():
            if not isinstance(value, ALLOWED_METRIC_TYPES) or isinstance(value, bool):
                problems.append(f"metric '{key}' is not a scalar: {type(value).__name__}")
    if WEIGHT_KEY not in content.metric_records.get("metrics", {}):
        problems.append(f"no '{WEIGHT_KEY}' count")
    configs = {name: dict(record) for name, record in content.config_records.items()}
    # the site's name and what its features state they were made with (encoder, weights checksum, tile size):
    # facts about the site's software, fixed keys, never about a patient
    allowed = {SITE_NAME} | {f"{FEATURES_PREFIX}{k}" for k in (*PROVENANCE_KEYS, "files_agree")}
    named = configs.get(SITE_RECORD, {})
    if set(configs) != {SITE_RECORD} or named.get(SITE_NAME) != site or set(named) - allowed:
        problems.append(f"config records beyond the site name and its features' provenance: {configs}")
    wire = recorddict_to_proto(content).SerializeToString()
    problems += [
        f"identifier '{i}' in the serialized reply" for i in sorted(identifiers) if i.encode() in wire
    ]
    return problems


def test_client_replies_hold_only_weights_and_aggregate_metrics(tmp_path: Path) -> None:
    """The ClientApp (Flower's dispatch, mods included) answers real train and evaluate messages; the replies
    are inspected record by record and byte by byte for slide and patient identifiers."""
    from flwr.supercore.task_identity import TaskIdentity

    manifest_path = make_cohort(tmp_path / "cohort", sites=2, slides=24, shift=0.5)
    manifest = load_manifest(manifest_path)
    identifiers = {s.slide_id for s in manifest.slides} | {s.patient_id for s in manifest.slides}
    run = RunConfig(in_dim=16, local_epochs=1)
    torch.manual_seed(0)
    model = create_mil("abmil", in_dim=16, num_classes=2)
    node_config: dict[str, bool | float | int | str] = {"manifest": str(manifest_path), "site": "site-A"}
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    try:
        for kind in ("train", "evaluate"):
            content = RecordDict(
                {
                    "arrays": ArrayRecord(model.state_dict()),
                    "config": ConfigRecord({"server-round": 1, "proximal-mu": 0.01}),
                }
            )
            msg = Message(content=content, dst_node_id=1, message_type=kind)
            context = Context(1, 1, node_config, RecordDict(), run.to_flower())
            reply = client_app(msg, context)
            assert not reply.has_error(), reply.error
            assert leaks(reply, model, "site-A", identifiers) == []
            if kind == "train":
                nbytes = len(recorddict_to_proto(reply.content).SerializeToString())
                assert nbytes <= 1.05 * arrays_nbytes(model_to_arrays(model)) + 4096
                # the inspection can fail: the same reply with one patient id or per-patient scores added
                doctored = Message(content=reply.content, reply_to=msg)
                doctored.content.config_records["extra"] = ConfigRecord({"patient": sorted(identifiers)[0]})
                assert any("identifier" in p for p in leaks(doctored, model, "site-A", identifiers))
                doctored.content.metric_records["metrics"]["scores"] = [0.1, 0.9]
                assert any("not a scalar" in p for p in leaks(doctored, model, "site-A", identifiers))
                doctored.content.config_records[SITE_RECORD]["features.first_patient"] = "x"
                assert any("beyond the site name" in p for p in leaks(doctored, model, "site-A", identifiers))
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
