"""One owner for the Flower processes fedpath starts, at a site or at the coordinator.

`start_process` starts a Flower command (SuperLink, SuperNode, the Fleet gateway) with fedpath's environment
(`flower_env`) and a marker inherited by everything it starts in turn; `FlowerProcess.stop` stops the whole
tree, found by that marker (Flower detaches its SuperExec, ServerApp and simulation processes into new
sessions, and Ray forks more, so a process group does not reach them). `supervise` runs processes in the
foreground until one exits or SIGTERM/SIGINT arrives, and then stops all of them: what `fedpath site start`
and `fedpath server start` do, so that a service manager's stop leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class FlowerRuntimeError(RuntimeError):
    """A Flower process or command that failed; the message points to its log."""


def executable(name: str) -> str:
    """A Flower command from this Python environment (beside the interpreter), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FlowerRuntimeError(
            f"`{name}` not found: install fedpath's dependencies (flwr[simulation]) first"
        )
    return found


def flwr_home(given: Path | None) -> Path:
    """Flower's folder for a command: the one given, else $FLWR_HOME, else Flower's own default ~/.flwr."""
    return (given or Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))).resolve()


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: FLWR_HOME set, runtime dependency install and update check off,
    and this environment's scripts first on PATH (the SuperLink starts `flower-superexec` by name)."""
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(flwr_home.resolve())
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Ray gives a starting worker 60 s to register; a ClientApp actor imports torch first, and on a busy machine
    # (seen: three test workers on two cores) that can take longer, which fails the whole simulated run
    env.setdefault("RAY_worker_register_timeout_seconds", "300")
    return env


# The SuperExec that a SuperLink starts asks it for work to launch once a second by default, so a simulated
# federation waits half a second on average before it starts. The simulation engine (short-lived, one machine)
# asks five times a second (`simulation_env`). Deployed SuperLinks and SuperNodes keep Flower's second: asking
# five times a second costs an idle site 8.1 % of a core against 4.9 % (SuperNode and its SuperExec, measured),
# around the clock, to save 0.4 s per ClientApp launch.
SUPEREXEC_POLL_S = 0.2
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def simulation_env(flwr_home: Path) -> dict[str, str]:
    """`flower_env` for the simulation engine's SuperLink: its SuperExec asks for work every
    `SUPEREXEC_POLL_S` seconds (unless the user's environment sets the interval)."""
    env = flower_env(flwr_home)
    env.setdefault(POLL_ENV, str(SUPEREXEC_POLL_S))
    return env


MARKER = "FEDPATH_FLOWER_PROCESS"


def pids_with_environment(entries: set[bytes]) -> list[int]:
    """Processes (other than this one) whose environment holds one of `entries` (``NAME=value``). Linux /proc
    only."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if entries & set((entry / "environ").read_bytes().split(b"\0")):
                pids.append(int(entry.name))
    return [p for p in pids if p != os.getpid()]


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries MARKER_<marker>: the ones started here and all their descendants
    (Flower detaches its SuperExec, ServerApp and simulation processes into new sessions, and Ray forks more,
    so a process group does not reach them; an inherited environment variable does). Linux /proc only."""
    return pids_with_environment({f"{MARKER}_{marker}=1".encode()})


@dataclass
class FlowerProcess:
    """A Flower process started here (SuperLink or SuperNode) with everything it starts in turn."""

    process: subprocess.Popen[bytes]
    marker: str
    log_file: Path
    address: str = ""

    def stop(self, timeout: float = 20.0, *, grace: float = 5.0) -> None:
        """Stop the process and every descendant (ServerApp, SuperExec, ClientApps, simulation engine, Ray):
        SIGTERM, and SIGKILL to what is left after `grace` seconds."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self._signal_tree(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _marked_pids(self.marker):
            time.sleep(0.1)
        # SIGKILL until none is left on three scans in a row: a dying parent can start a child after the sweep
        # that killed it (Ray's raylet starts and restarts its agents), and such a child carries the marker too
        deadline, empty = time.monotonic() + 15.0, 0
        while empty < 3 and time.monotonic() < deadline:
            empty = 0 if self._signal_tree(signal.SIGKILL) else empty + 1
            time.sleep(0.3)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)

    def _signal_tree(self, sig: signal.Signals) -> bool:
        """Send `sig` to every live process of the tree; whether there was any."""
        pids = _marked_pids(self.marker)
        if self.process.poll() is None:
            pids.append(self.process.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        return bool(pids)


def start_process(
    cmd: Sequence[str],
    flwr_home: Path,
    log_file: Path | None,
    *,
    env: Mapping[str, str] | None = None,
) -> FlowerProcess:
    """Start a Flower command with `env` (default `flower_env(flwr_home)`) and a marker that lets `stop` find
    all its descendants. Output goes to `log_file`, or to this process's own output when it is None."""
    marker = uuid.uuid4().hex
    environment = dict(flower_env(flwr_home) if env is None else env)
    # One variable per marker, so a process tree started inside another (site.sh → `fedpath site start` →
    # flower-supernode) stays findable by the outer one's marker too.
    environment[f"{MARKER}_{marker}"] = "1"
    if log_file is None:
        process = subprocess.Popen(list(cmd), env=environment, start_new_session=True)
        return FlowerProcess(process, marker, Path(os.devnull))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        process = subprocess.Popen(
            list(cmd), env=environment, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return FlowerProcess(process, marker, log_file)


def supervise(processes: Sequence[FlowerProcess], say: Callable[[str], None] = print) -> int:
    """Wait until one of `processes` exits, or SIGTERM/SIGINT arrives; then stop all of them with everything
    they started. Returns the exit code of the process that ended, or 128 + the signal number."""
    received: list[int] = []

    def note(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        while not received:
            ended = [p for p in processes if p.process.poll() is not None]
            if ended:
                code = ended[0].process.returncode
                args = ended[0].process.args
                name = Path(str(args[0] if isinstance(args, list | tuple) else args)).name
                say(f"{name} exited with code {code}; stopping the others")
                break
            time.sleep(0.2)
    finally:
        for process in reversed(processes):
            process.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        say(f"stopped by {signal.Signals(received[0]).name}; every process it started is stopped too")
        return 128 + received[0]
    return code
