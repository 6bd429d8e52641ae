"""Flower's runtime with fedpath's defaults: the app folder, the SuperLink process, `flwr run`, waiting.

fedpath does not copy its code into the Flower App Bundle: the ServerApp and ClientApp are the installed
`fedpath.server.app:app` and `fedpath.client.app:app` (every site installs fedpath, which also carries the
feature extraction). The app folder that `flwr run` bundles is therefore only a ``pyproject.toml`` with the
run config (plus, for tests, a small module), far below Flower's 10 MB FAB cap and free of any data.

Defaults applied to every process started here: ``FLWR_HOME`` (Flower's app cache, connections and the
local SuperLink's state) points where the caller says, runtime dependency installation is off (a site
runs offline with the packages it has), and the update check is off.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from fedpath.common.appsign import SIGNATURE_FILE
from fedpath.common.processes import (
    FlowerProcess,
    FlowerRuntimeError,
    executable,
    flower_env,
    start_process,
)
from fedpath.common.runconfig import RunConfig
from fedpath.common.version import fedpath_version
from fedpath.server.runfolder import RunFolder

APP_NAME = "fedpath-federation"
SERVERAPP = "fedpath.server.app:app"
CLIENTAPP = "fedpath.client.app:app"
CONNECTION = "fedpath"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_app(
    app_dir: Path,
    run: RunConfig,
    *,
    clientapp: str = CLIENTAPP,
    serverapp: str = SERVERAPP,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a Flower app folder whose run config is `run` (a pyproject.toml and `extra_files`)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {
            "name": APP_NAME,
            "version": fedpath_version().split("+")[0],
            "description": "fedpath federated MIL training (FedProx); the code is the installed fedpath package",
            "license": "Apache-2.0",
            "dependencies": [f"fedpath=={fedpath_version()}"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedpath",
                    "components": {"serverapp": serverapp, "clientapp": clientapp},
                    "config": run.to_flower(),
                }
            }
        },
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    (app_dir / SIGNATURE_FILE).unlink(missing_ok=True)  # a signature of an earlier bundle would not match
    for name, text in (extra_files or {}).items():
        (app_dir / name).write_text(text, encoding="utf-8")
    return app_dir


def write_connection(
    flwr_home: Path, address: str, *, name: str = CONNECTION, root_certificates: Path | None = None
) -> str:
    """Add a SuperLink connection to $FLWR_HOME/config.toml (plain text unless root certificates are given)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    try:
        import tomllib

        data = tomllib.loads(path.read_text()) if path.exists() else {}
    except ValueError as err:
        raise FlowerRuntimeError(f"{path} is not valid TOML ({err}); fix or remove it") from err
    conn: dict[str, object] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(root_certificates.resolve())
    data.setdefault("superlink", {})[name] = conn
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return name


def superlink_command(
    *,
    host: str,
    port: int,
    simulation: bool,
    log_file: Path,
    database: Path | None = None,
    tls: Sequence[Path] | None = None,
    supernode_auth: bool = False,
    isolation: str = "subprocess",
) -> list[str]:
    """The `flower-superlink` command line with fedpath's defaults; `tls` = (ca.crt, server.pem, server.key);
    `supernode_auth` admits only SuperNodes whose public key was registered (needs TLS); `isolation="process"`
    leaves ServerApps to a separately started `flower-superexec` (`superexec_command`), so that a running
    ServerApp survives a restart of the SuperLink."""
    cmd = [executable("flower-superlink"), "--host", host, "--port", str(port)]
    cmd += ["--disable-runtime-dependency-installation", "--log-file", str(log_file)]
    if tls:
        ca, cert, key = tls
        cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    else:
        cmd.append("--insecure")
    if simulation:
        cmd.append("--simulation")
    if database is not None:
        cmd += ["--database", str(database)]
    if supernode_auth:
        if not tls:
            raise FlowerRuntimeError("SuperNode authentication needs TLS: give the TLS files")
        cmd.append("--enable-supernode-auth")
    if isolation != "subprocess":
        cmd += ["--isolation", isolation]
    return cmd


def superexec_command(runtime_address: str, *, root_certificates: Path | None = None) -> list[str]:
    """`flower-superexec` for a SuperLink started with isolation "process": it launches the ServerApp of
    every submitted run and, not being the SuperLink's child, outlives a SuperLink restart."""
    cmd = [executable("flower-superexec"), "--runtime-api-address", runtime_address]
    if root_certificates is None:
        return [*cmd, "--insecure"]
    return [*cmd, "--root-certificates", str(root_certificates)]


def wait_healthy(
    address: str,
    process: subprocess.Popen[bytes],
    log_file: Path,
    timeout: float = 60.0,
    *,
    root_certificates: Path | None = None,
) -> None:
    """Wait until the SuperLink answers its health check (over TLS, verified with `root_certificates`)."""
    import ssl

    import httpx

    url = f"{'https' if root_certificates else 'http'}://{address}/health"
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=str(root_certificates)) if root_certificates else False
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerRuntimeError(
                f"flower-superlink exited with code {process.returncode}; see {log_file}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0, verify=verify).is_success:
                return
        time.sleep(0.2)
    raise FlowerRuntimeError(
        f"flower-superlink did not answer on {address} within {timeout:.0f} s; see {log_file}"
    )


def start_superlink(
    flwr_home: Path, *, simulation: bool, host: str = "127.0.0.1", port: int | None = None,
    database: Path | None = None, env: Mapping[str, str] | None = None,
) -> FlowerProcess:  # fmt: skip
    """Start a plain-text SuperLink on loopback (simulation engine or deployment) and wait until it answers.
    `env` replaces `flower_env(flwr_home)` (the simulation engine adds the Ray cluster's address)."""
    port = port or free_port(host)
    log_file = flwr_home / "superlink.log"
    cmd = superlink_command(host=host, port=port, simulation=simulation, log_file=log_file, database=database)
    link = start_process(cmd, flwr_home, flwr_home / "superlink.out", env=env)
    link.address = f"{host}:{port}"
    try:
        wait_healthy(link.address, link.process, link.log_file)
    except BaseException:
        link.stop()
        raise
    return link


def start_ray_head(
    flwr_home: Path, temp_dir: Path, *, cpus: int | None = None, timeout: float = 180.0
) -> FlowerProcess:
    """Start a one-machine Ray cluster (a head node) for simulations to attach to through ``RAY_ADDRESS``;
    returns once it accepts drivers, with its address in `.address`.

    Flower's simulation engine runs on Ray and starts a private Ray instance for every run unless
    ``RAY_ADDRESS`` names a cluster (Ray's own convention): a head started once saves each later run Ray's
    start and shutdown. Its ports are chosen free (several heads and a user's own cluster can coexist), its
    session files go to `temp_dir` (not Ray's shared default, so ``ray.init(address="auto")`` elsewhere never
    finds it), usage statistics are off, and it carries fedpath's process marker, so `stop()` ends it and
    everything it started (never `ray stop`, which would stop every Ray cluster of the user).
    """
    host = "127.0.0.1"
    port, client_port, agent_port = free_port(host), free_port(host), free_port(host)
    cmd = [
        executable("ray"), "start", "--head", "--node-ip-address", host, "--port", str(port),
        "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent_port),
        "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp_dir),
    ]  # fmt: skip
    if cpus is not None:
        cmd += ["--num-cpus", str(cpus)]
    env = {**flower_env(flwr_home), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = start_process(cmd, flwr_home, flwr_home / "ray-head.log", env=env)
    head.address = f"{host}:{port}"
    try:
        code = head.process.wait(timeout)  # `ray start` returns once the head is up; its daemons stay
    except subprocess.TimeoutExpired:
        code = None
    if code != 0:
        head.stop()
        raise FlowerRuntimeError(
            f"the Ray head node did not start ({'timed out' if code is None else f'exit {code}'}); "
            f"see {head.log_file}"
        )
    return head


def ray_agents(head: FlowerProcess) -> list[int]:
    """The agents the raylets of a Ray head started here run (Ray's dashboard and runtime-env agents), found
    while the raylets live: their children, and any process naming one in ``RAY_RAYLET_PID``. Needed because an
    agent can lose fedpath's marker from its environment (Ray rewrites its process title over it) and outlive
    its raylet, so `FlowerProcess.stop` does not find it. Linux /proc only."""
    from fedpath.common.processes import _marked_pids, pids_with_environment

    raylets = set()
    for pid in _marked_pids(head.marker):
        with contextlib.suppress(OSError):
            if b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes():
                raylets.add(pid)
    agents = set(pids_with_environment({f"RAY_RAYLET_PID={pid}".encode() for pid in raylets}))
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(_stat_fields(int(entry.name))[1]) in raylets:  # its parent
                agents.add(int(entry.name))
    return sorted(agents)


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the process name ("pid (name) state ppid ..."; the name may hold spaces and
    parentheses, so the fields start after the last ')'): state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def stop_ray_agents(agents: Sequence[int], timeout: float = 10.0) -> None:
    """SIGKILL the agents `ray_agents` found before their head was stopped, until none is left."""
    left = list(agents)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        left = [pid for pid in left if Path(f"/proc/{pid}/stat").exists() and not _zombie(pid)]


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError):
        return _stat_fields(pid)[0] == "Z"
    return False


def flwr_cli(args: Sequence[str], flwr_home: Path) -> tuple[int, str]:
    """Flower's own command line (`flwr ARGS`) run in this process, with FLWR_HOME and the rest of
    `flower_env` set for the call: the same commands and output without starting a process, which costs about
    a second each (Python, typer and flwr imported again), several times per federation. Returns the exit
    code and what the command wrote (stdout and stderr)."""
    from flwr.cli.app import app as flwr_app
    from typer.testing import CliRunner

    env = {k: v for k, v in flower_env(flwr_home).items() if os.environ.get(k) != v}
    json_out = io.StringIO()  # `--format json` prints to sys.__stdout__, past any redirection: take it here
    with _FLWR_CLI_LOCK:
        saved, sys.__stdout__ = sys.__stdout__, json_out  # type: ignore[misc,assignment]
        try:
            result = CliRunner().invoke(flwr_app, list(args), env=env, catch_exceptions=True)
        finally:
            sys.__stdout__ = saved  # type: ignore[misc]
    # Ctrl-C or SIGTERM (fedpath's `Terminated`) during the call: click turns it into "Aborted!" and exit 1;
    # raise it again so the command unwinds and stops its processes as it would outside the call
    cause: BaseException | None = result.exception
    while cause is not None:
        if isinstance(cause, KeyboardInterrupt):
            raise cause
        cause = cause.__cause__ or cause.__context__
    text = result.output + json_out.getvalue()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += f"\n{type(result.exception).__name__}: {result.exception}"
    return result.exit_code, text


_FLWR_CLI_LOCK = threading.Lock()  # CliRunner swaps the process's stdout and environment for the call


def _json_reply(text: str) -> Any:
    return json.loads(text[text.index("{") : text.rindex("}") + 1])


def submit_run(
    app_dir: Path, flwr_home: Path, *, connection: str = CONNECTION, federation_config: str | None = None
) -> int:
    """`flwr run APP CONNECTION`; returns the run id."""
    args = ["run", str(app_dir), connection, "--format", "json"]
    if federation_config:
        args += ["--federation-config", federation_config]
    code, text = flwr_cli(args, flwr_home)
    try:
        return int(_json_reply(text)["run-id"])
    except (ValueError, KeyError, TypeError):
        raise FlowerRuntimeError(f"`flwr run` did not start the run (exit {code}):\n{text}") from None


def run_status(run_id: int, flwr_home: Path, *, connection: str = CONNECTION) -> str:
    """The run's status as `flwr ls` reports it, e.g. 'running', 'finished:completed', 'finished:failed'."""
    code, text = flwr_cli(["ls", connection, "--run-id", str(run_id), "--format", "json"], flwr_home)
    try:
        return str(_json_reply(text)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise FlowerRuntimeError(f"`flwr ls` failed (exit {code}):\n{text}") from None


def run_logs(run_id: int, flwr_home: Path, *, connection: str = CONNECTION) -> str:
    """The run's log (ServerApp output) as `flwr log --show` returns it."""
    return flwr_cli(["log", str(run_id), connection, "--show"], flwr_home)[1]


def describe_round(line: dict[str, Any], total: int) -> str:
    """One progress line: round, sites, train loss, validation AUROC, seconds, problems."""
    agg = line["aggregate"]
    bad = [f"{s} {e['status']}" for s, e in line["sites"].items() if e["status"] != "ok"]

    def num(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    text = (
        f"round {line['round']}/{total}: {len(line['sites'])} sites, train loss {num(agg['train'].get('loss'))}, "
        f"val AUROC {num(agg['evaluate'].get('auroc'))}, {line['seconds']:.1f} s"
    )
    return text + (f" ({', '.join(bad)})" if bad else "")


CARD_WRITTEN = "card-written"
"""What `follow_run(until_card=True)` returns when the run wrote its model card: done, its teardown going on."""


def follow_run(
    run_id: int,
    flwr_home: Path,
    folder: RunFolder,
    total_rounds: int,
    say: Callable[[str], None],
    *,
    started_at: float,
    connection: str = CONNECTION,
    timeout: float = 24 * 3600,
    until_card: bool = False,
) -> str:
    """Print each round as its line appears in the run folder's round log; return the run's final status, or
    with `until_card` CARD_WRITTEN as soon as the ServerApp has written the model card (the last thing it
    writes), without waiting for Flower's teardown of the run (its final status is then the caller's to ask).

    The round log is only visible where the ServerApp writes it (the SuperLink's machine); elsewhere only the
    status is followed. `flwr ls` runs in this process (`flwr_cli`, one Control API request): it is asked every
    5 s, and every half second once the run has written its model card (the run is then shutting down).
    """
    seen = len(folder.read_rounds())
    deadline = time.monotonic() + timeout
    last_check = time.monotonic()
    status = "running"
    while time.monotonic() < deadline:
        finishing = all(
            f.exists() and f.stat().st_mtime >= started_at for f in (folder.card_json, folder.card_md)
        )
        lines = folder.read_rounds()  # after the card check: a card seen means every round line is there
        for line in lines[seen:]:
            say(describe_round(line, total_rounds))
        seen = max(seen, len(lines))
        if finishing and until_card:
            return CARD_WRITTEN
        if finishing or time.monotonic() - last_check > 5:
            status, last_check = run_status(run_id, flwr_home, connection=connection), time.monotonic()
            if status.startswith("finished"):
                return status
        time.sleep(0.5)
    raise FlowerRuntimeError(f"run {run_id} still '{status}' after {timeout:.0f} s")
