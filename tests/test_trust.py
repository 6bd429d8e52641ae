"""The consortium's app signature (made at the coordinator, checked at a site before anything of the app is
unpacked), the Fleet-only gateway's request filter, and clean stops of the processes fedpath starts."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from fedpath.client.trusted_apps import (
    TRUST_ENV,
    UNSIGNED_ENV,
    AppRefused,
    check_app,
    signers_from_environment,
)
from fedpath.common.appsign import (
    SIGNATURE_FILE,
    AppSignatureError,
    key_id,
    make_signing_key,
    sign_app,
    trusted_signers,
    verify_app,
)
from fedpath.common.consortium import Federation, write_federation
from fedpath.common.processes import _marked_pids, start_process, supervise
from fedpath.common.runconfig import RunConfig
from fedpath.server import flower_runtime as fr
from fedpath.server.gateway import allowed


def _keys(tmp_path: Path, name: str = "k") -> tuple[Path, str]:
    pair = make_signing_key()
    key = tmp_path / f"{name}.key"
    key.write_bytes(pair.private_openssh)
    key.chmod(0o600)
    return key, pair.public_openssh.decode().strip()


def _bundle(app: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app)


def _rebundle(fab: bytes, change: dict[str, bytes | None]) -> bytes:
    """The same bundle with files replaced (bytes), added, or removed (None)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if info.filename in change:
                continue
            dst.writestr(info.filename, src.read(info))
        for name, content in change.items():
            if content is not None:
                dst.writestr(name, content)
    return out.getvalue()


@pytest.fixture
def signed_app(tmp_path: Path) -> tuple[bytes, dict[str, str]]:
    key, public = _keys(tmp_path)
    app = fr.write_app(tmp_path / "app", RunConfig(in_dim=16))
    kid = sign_app(app, key)
    assert kid == key_id(public)
    return _bundle(app), trusted_signers([public])


def test_a_signed_app_verifies_with_the_consortium_key(signed_app: tuple[bytes, dict[str, str]]) -> None:
    fab, signers = signed_app
    assert verify_app(fab, signers) == next(iter(signers))


def test_any_change_to_a_signed_app_is_refused(
    signed_app: tuple[bytes, dict[str, str]], tmp_path: Path
) -> None:
    fab, signers = signed_app
    files = {i.filename: i for i in zipfile.ZipFile(io.BytesIO(fab)).infolist()}
    pyproject = zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml")
    tampered = {
        "a ClientApp of its own": {"rogue.py": b"print('hi')\n"},
        "another component": {"pyproject.toml": pyproject.replace(b"fedpath.client.app:app", b"rogue:app")},
        "another run config": {"pyproject.toml": pyproject.replace(b"dp-noise = 0.0", b"dp-noise = 0.1")},
        "no signature": {SIGNATURE_FILE: None},
    }
    assert "pyproject.toml" in files and SIGNATURE_FILE in files
    for what, change in tampered.items():
        changed = _rebundle(fab, change)
        assert changed != fab, what
        with pytest.raises(AppSignatureError):
            verify_app(changed, signers)
    # signed, but by a key this site does not trust
    _, other = _keys(tmp_path, "other")
    with pytest.raises(AppSignatureError, match="does not trust"):
        verify_app(fab, trusted_signers([other]))
    # a signature record replayed onto another app: the digest no longer matches
    other_app = fr.write_app(tmp_path / "other-app", RunConfig(in_dim=32))
    signature = zipfile.ZipFile(io.BytesIO(fab)).read(SIGNATURE_FILE)
    (other_app / SIGNATURE_FILE).write_bytes(signature)
    with pytest.raises(AppSignatureError, match="does not match"):
        verify_app(_bundle(other_app), signers)


def test_the_site_refuses_before_unpacking_and_fails_closed(
    signed_app: tuple[bytes, dict[str, str]], tmp_path: Path
) -> None:
    fab, signers = signed_app
    lines: list[str] = []
    check_app(fab, signers, lines.append)
    assert "signed by" in lines[-1]
    with pytest.raises(AppRefused) as refused:
        check_app(_rebundle(fab, {"rogue.py": b"x = 1\n"}), signers, lines.append)
    assert "REFUSED" in lines[-1] and "nothing of this app was unpacked or run" in lines[-1]
    assert "not signed by the consortium" in str(refused.value)
    # trust comes from federation.toml; nothing configured, or no signers listed, refuses everything
    with pytest.raises(AppRefused, match="no trusted"):
        signers_from_environment({})
    empty = write_federation(tmp_path / "f.toml", Federation(name="c", superlink="h:1", sites=["A"]))
    with pytest.raises(AppRefused, match="no app-signers"):
        signers_from_environment({TRUST_ENV: str(empty)})
    public = next(iter(signers.values()))
    listed = write_federation(
        tmp_path / "g.toml", Federation(name="c", superlink="h:1", sites=["A"], app_signers=[public])
    )
    assert signers_from_environment({TRUST_ENV: str(listed)}) == signers
    assert signers_from_environment({UNSIGNED_ENV: "1"}) is None
    with pytest.raises(ValueError, match="app-signing public key"):
        Federation(name="c", superlink="h:1", sites=["A"], app_signers=["ecdsa-sha2-nistp384 AAAA"])


def test_the_signed_digest_ignores_only_the_signature_and_flowers_index(
    signed_app: tuple[bytes, dict[str, str]],
) -> None:
    fab, signers = signed_app
    record = json.loads(zipfile.ZipFile(io.BytesIO(fab)).read(SIGNATURE_FILE))
    assert set(record) == {"key-id", "signed-at", "digest", "signature"}
    # Flower's own index is derived from the files: rewriting it alone changes nothing that runs
    assert verify_app(_rebundle(fab, {".info/CONTENT": b"anything"}), signers)


@pytest.mark.parametrize(
    ("method", "path", "query", "ok"),
    [
        ("POST", "/v1/fleet/pull-messages", b"", True),
        ("POST", "/v1/fleet/push-object", b"", True),
        ("GET", "/health", b"", True),
        ("POST", "/v1/control/start-run", b"", False),
        ("POST", "/v1/control/register-node", b"", False),
        ("POST", "/v1/runtime/pull-messages", b"", False),
        ("GET", "/docs", b"", False),
        ("GET", "/openapi.json", b"", False),
        ("GET", "/v1/fleet/pull-messages", b"", False),
        ("POST", "/v1/fleet/../control/list-runs", b"", False),
        ("POST", "/v1/fleet/pull-messages/x", b"", False),
        ("POST", "/v1/fleet/get-run", b"a=1", False),
        ("POST", "/health", b"", False),
    ],
)
def test_the_gateway_passes_only_the_fleet_api(method: str, path: str, query: bytes, ok: bool) -> None:
    assert allowed(method, path, query) is ok


def _tree_script(tmp_path: Path) -> Path:
    """A process that starts a detached grandchild in a new session (as Flower's SuperExec and Ray do)."""
    script = tmp_path / "tree.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        "time.sleep(600)\n"
    )
    return script


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_a_supervising_command_stops_every_process_it_started(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """`supervise` (site start, server start) stops the whole tree, detached grandchildren included."""
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "from fedpath.common.processes import start_process, supervise\n"
        f"p = start_process([sys.executable, {str(_tree_script(tmp_path))!r}], Path({str(tmp_path)!r}), None)\n"
        f"Path({str(tmp_path / 'marker')!r}).write_text(p.marker)\n"
        "sys.exit(supervise([p]))\n"
    )
    command = subprocess.Popen([sys.executable, str(runner)], start_new_session=True)
    marker_file = tmp_path / "marker"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        marker_file.exists() and len(_marked_pids(marker_file.read_text())) >= 2
    ):
        time.sleep(0.2)
    marker = marker_file.read_text()
    assert len(_marked_pids(marker)) >= 2, "the child and its detached grandchild should be running"
    os.kill(command.pid, sig)
    assert command.wait(60) == 128 + sig
    assert _marked_pids(marker) == []


def test_supervise_stops_the_others_when_one_exits(tmp_path: Path) -> None:
    quick = start_process([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path, tmp_path / "a.out")
    slow = start_process([sys.executable, str(_tree_script(tmp_path))], tmp_path, tmp_path / "b.out")
    assert supervise([slow, quick], say=lambda _: None) == 3
    assert _marked_pids(slow.marker) == [] and slow.process.poll() is not None


def test_sigterm_to_any_fedpath_command_runs_its_cleanup(tmp_path: Path) -> None:
    """The launcher turns SIGTERM into the same clean stop as Ctrl-C: `finally` blocks (which stop the
    SuperLink and everything under it in `fedpath simulate`, `compare`, `demo`) run, exit status 143."""
    script = tmp_path / "cmd.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fedpath.common.cli import Command, main\n"
        "def run(args):\n"
        "    try:\n"
        f"        Path({str(tmp_path / 'started')!r}).write_text('')\n"
        "        time.sleep(600)\n"
        "    finally:\n"
        f"        Path({str(tmp_path / 'cleaned')!r}).write_text('')\n"
        "    return 0\n"
        "import fedpath.common.cli as cli\n"
        "cli.discover_commands = lambda: [Command(name='x', help='x', add_arguments=lambda p: None, run=run)]\n"
        "sys.exit(main(['x']))\n"
    )
    command = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (tmp_path / "started").exists():
        time.sleep(0.1)
    command.send_signal(signal.SIGTERM)
    _, err = command.communicate(timeout=60)
    assert command.returncode == 143, err
    assert (tmp_path / "cleaned").exists()
    assert "stopped" in err
