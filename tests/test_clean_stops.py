"""SIGTERM (a service manager's stop, `kill`, `docker stop`) to a fedpath command that started Flower processes
stops every one of them: the SuperLink, the gateway, SuperNodes, SuperExecs, ServerApps and Ray workers.
Real commands, real processes; each is found by an environment marker it inherits from the command."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from fedpath.common.processes import POLL_ENV, SUPEREXEC_POLL_S, FlowerProcess, _marked_pids, start_process
from fedpath.server import flower_runtime as fr
from tests.federation_helpers import make_cohort, wait_for

pytestmark = pytest.mark.slow

FEDPATH = str(Path(sys.executable).parent / "fedpath")
SERVER = [FEDPATH, "server", "start", "--insecure"]
SITE = [FEDPATH, "site", "start", "--insecure", "--allow-unsigned-apps"]


def _commands(process: FlowerProcess) -> dict[int, set[str]]:
    """Command names (the first three words of the command line) of the live processes in the tree of `process`."""
    out = {}
    for pid in _marked_pids(process.marker):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        out[pid] = {Path(a.decode(errors="replace")).name for a in argv[:3] if a}
    return out


def _names(process: FlowerProcess) -> set[str]:
    return set().union(*_commands(process).values())


def _pids_named(process: FlowerProcess, name: str) -> list[int]:
    return [pid for pid, names in _commands(process).items() if name in names]


def _environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e)


def _terminate_and_check(process: FlowerProcess, expected_code: int = 143) -> None:
    os.kill(process.process.pid, signal.SIGTERM)
    assert process.process.wait(90) == expected_code, process.log_file.read_text()[-3000:]
    wait_for(lambda: _marked_pids(process.marker) == [], 30, f"every process to stop: {_names(process)}")


def _polls(process: FlowerProcess) -> set[str | None]:
    """The SuperExec poll interval in the environment of each `flower-superexec` under `process`."""
    return {_environ(pid).get(POLL_ENV) for pid in _pids_named(process, "flower-superexec")}


def test_sigterm_to_simulate_stops_the_superlink_and_ray(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "cohort", sites=2, slides=16, shift=0.5)
    cmd = [FEDPATH, "simulate", "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--rounds", "50"]
    process = start_process(cmd, tmp_path, tmp_path / "simulate.out")
    try:
        wait_for(
            lambda: (
                {"flower-superlink", "flower-superexec"} <= _names(process)
                and any("ray" in n for n in _names(process))
            ),
            180,
            "the SuperLink and Ray workers",
            poll=1,
        )
        # the simulation engine's SuperExec asks for the next federation to launch five times a second
        assert _polls(process) == {str(SUPEREXEC_POLL_S)}
        _terminate_and_check(process)
    finally:
        process.stop()
    assert "stopped (SIGTERM)" in process.log_file.read_text()


def test_sigterm_to_server_and_site_start_stops_every_flower_process(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "cohort", sites=2, slides=12, shift=0.0)
    port, local_port = fr.free_port(), fr.free_port()
    server = start_process(
        [
            *SERVER,
            "--port",
            str(port),
            "--local-port",
            str(local_port),
            "--flwr-home",
            str(tmp_path / "link"),
        ],
        tmp_path / "link",
        tmp_path / "server.out",
    )
    site = None
    try:
        fr.wait_healthy(f"127.0.0.1:{port}", server.process, server.log_file)
        site = start_process(
            [
                *SITE,
                "--superlink",
                f"127.0.0.1:{port}",
                "--manifest",
                str(manifest),
                "--site",
                "site-A",
                "--port",
                str(fr.free_port()),
                "--flwr-home",
                str(tmp_path / "site"),
            ],
            tmp_path / "site",
            tmp_path / "site.out",
        )
        wait_for(lambda: {"flower-supernode", "flower-superexec"} <= _names(site), 120, "the node", poll=1)
        assert {"flower-superlink"} <= _names(server) and "fedpath.server.gateway" in _names(server)
        # a deployed site's SuperExec asks for work at Flower's own interval: asking faster costs CPU all day
        assert _polls(site) == {None}
        _terminate_and_check(site)
        _terminate_and_check(server)
    finally:
        for p in (site, server):
            if p is not None:
                p.stop()
