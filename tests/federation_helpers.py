"""Cohorts and evaluation shared by the federation tests (real Flower, loopback, tiny synthetic sites)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedpath.client.training import predict
from fedpath.common.bags import bags_from_manifest
from fedpath.common.manifest import load_manifest, split_patients
from fedpath.common.metrics import aggregate_by_patient, auroc
from fedpath.common.processes import _marked_pids as marked_pids
from fedpath.common.runconfig import RunConfig
from fedpath.server.flower_runtime import (
    CONNECTION,
    FlowerProcess,
    executable,
    flower_env,
    free_port,
    start_process,
    wait_healthy,
)
from fedpath.simulation.synth import SynthConfig, synthesize

# Small and easy enough to learn in a few local epochs, large enough for a held-out AUROC per site.
EASY = {
    "dim": 16,
    "tiles_median": 60,
    "tiles_max": 200,
    "signal": 3.0,
    "witness_min": 0.1,
    "witness_max": 0.3,
}


def make_cohort(root: Path, *, sites: int, slides: int, shift: float, seed: int = 0) -> Path:
    config = SynthConfig(
        sites=sites, slides=slides, shift=shift, size_skew=0.0, prevalence_skew=0.0, seed=seed, **EASY
    )
    return synthesize(root, config, progress=False)


def held_out_by_site(
    model: torch.nn.Module, manifest: Path, run: RunConfig
) -> dict[str, tuple[float, float]]:
    """(AUROC, mean cross-entropy) per site on its validation and test patients: patients no site trained on."""
    m = load_manifest(manifest)
    splits = split_patients(m, val=run.val_fraction, test=run.test_fraction, seed=run.split_seed)
    out = {}
    for site in m.sites:
        bags = bags_from_manifest(m.for_patients(splits[site].val | splits[site].test))
        pred = predict(model, bags)
        _, labels, probs = aggregate_by_patient(pred.patient_ids, pred.labels, pred.probs)
        out[site] = (auroc(labels, probs), pred.loss)
    return out


def mean_auroc(by_site: dict[str, tuple[float, float]]) -> float:
    values = [a for a, _ in by_site.values() if np.isfinite(a)]
    assert values, f"no site has both classes among its held-out patients: {by_site}"
    return float(np.mean(values))


def mean_loss(by_site: dict[str, tuple[float, float]]) -> float:
    return float(np.mean([loss for _, loss in by_site.values()]))


# --- deployment: the entry scripts of deploy/bin run bare-metal, as the containers and systemd units run them ---

DEPLOY_BIN = Path(__file__).resolve().parents[1] / "deploy" / "bin"


def script_command(script: str, settings: dict[str, str]) -> list[str]:
    """`env K=V ... bash deploy/bin/SCRIPT`: an entry script with its settings in the environment."""
    return ["env", *(f"{k}={v}" for k, v in settings.items()), "bash", str(DEPLOY_BIN / script)]


def start_coordinator(keys: Path, state: Path, port: int, local_port: int) -> FlowerProcess:
    """deploy/bin/coordinator.sh on loopback (TLS, site authentication, state database): the SuperLink on
    127.0.0.1:`local_port`, the Fleet gateway on 127.0.0.1:`port`; waits until both answer."""
    settings = {"FEDPATH_KEYS": str(keys), "FEDPATH_STATE": str(state), "FEDPATH_HOST": "127.0.0.1"}
    settings |= {"FEDPATH_PORT": str(port), "FEDPATH_LOCAL_PORT": str(local_port)}
    log = state / f"coordinator-{time.monotonic_ns()}.out"
    link = start_process(script_command("coordinator.sh", settings), state, log)
    try:
        for p in (local_port, port):
            wait_healthy(f"127.0.0.1:{p}", link.process, log, root_certificates=keys / "ca.crt")
    except BaseException:
        link.stop()
        raise
    return link


def start_superexec(keys: Path, state: Path, local_port: int) -> FlowerProcess:
    """deploy/bin/superexec.sh: runs the ServerApps of the coordinator started by `start_coordinator`."""
    settings = {"FEDPATH_KEYS": str(keys), "FEDPATH_STATE": str(state), "FEDPATH_LOCAL_PORT": str(local_port)}
    return start_process(script_command("superexec.sh", settings), state, state / "superexec.out")


def start_site(
    site: str, keys: Path, state: Path, manifest: Path, superlink: str, *, preflight: bool = True
) -> FlowerProcess:
    """deploy/bin/site.sh for `site` (its keys folder from `deploy init`), node API on a free loopback port."""
    settings = {
        "FEDPATH_SITE": site,
        "FEDPATH_SUPERLINK": superlink,
        "FEDPATH_KEYS": str(keys),
        "FEDPATH_STATE": str(state),
        "FEDPATH_MANIFEST": str(manifest),
        "FEDPATH_NODE_PORT": str(free_port()),
        "FEDPATH_PREFLIGHT": "1" if preflight else "0",
    }
    log = state / f"site-{time.monotonic_ns()}.out"
    return start_process(script_command("site.sh", settings), state, log)


def supernodes(flwr_home: Path) -> dict[str, str]:
    """Node id → status ('online', 'offline', 'registered', ...) as `flwr supernode list` reports them."""
    cmd = [executable("flwr"), "supernode", "list", CONNECTION, "--format", "json"]
    done = subprocess.run(cmd, env=flower_env(flwr_home), capture_output=True, text=True, timeout=60)
    try:
        reply = json.loads(done.stdout[done.stdout.index("{") :])
        return {str(n["node-id"]): str(n["status"]) for n in reply["nodes"]}
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"flwr supernode list failed:\n{done.stdout}\n{done.stderr}") from None


def kill_hard(process: FlowerProcess) -> None:
    """SIGKILL a process and everything it started, at once: a crash or a power cut, not a clean stop."""
    for pid in [process.process.pid, *marked_pids(process.marker)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    process.process.wait(10)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
