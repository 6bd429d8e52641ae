"""Deployment kit: `fedpath deploy init` (CA, coordinator certificate, site keys), `fedpath site check`
(each failure with its fix, and the all-OK case against a real TLS SuperLink), and the deploy/ files."""

from __future__ import annotations

import ipaddress
import re
import shutil
import socket
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from cryptography.x509.verification import PolicyBuilder, Store

from fedpath.client.preflight import Check, check_auth_key, check_coordinator, run_checks
from fedpath.common.consortium import ConsortiumFileError, load_federation
from fedpath.common.features import FeatureMeta, write_features
from fedpath.server import flower_runtime as fr
from tests.federation_helpers import DEPLOY_BIN, start_coordinator
from tests.helpers import run_cli, write_csv

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SHA = "ab" * 32


def _init(out: Path, *extra: str, sites: str = "H1,H2", address: str = "fl.example.org:8443") -> Path:
    done = run_cli("deploy", "init", "--sites", sites, "--address", address, "--out", str(out), *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="module")
def deploy_consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _init(
        tmp_path_factory.mktemp("consortium") / "c",
        "--san",
        "10.1.2.3",
        "--encoder",
        "enc-A",
        "--weights-sha256",
        SHA,
    )


def test_init_certificate_chain_verifies_for_every_name(deploy_consortium: Path) -> None:
    ca = x509.load_pem_x509_certificate((deploy_consortium / "admin" / "ca.crt").read_bytes())
    leaf = x509.load_pem_x509_certificate((deploy_consortium / "coordinator" / "server.pem").read_bytes())
    store = Store([ca])
    for name in (x509.DNSName("fl.example.org"), x509.DNSName("localhost")):
        PolicyBuilder().store(store).build_server_verifier(name).verify(leaf, [])
    for ip in ("10.1.2.3", "127.0.0.1"):
        PolicyBuilder().store(store).build_server_verifier(x509.IPAddress(ipaddress.ip_address(ip))).verify(
            leaf, []
        )
    with pytest.raises(x509.verification.VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("evil.example.org")).verify(leaf, [])
    other_ca = x509.load_pem_x509_certificate(
        (_init(deploy_consortium.parent / "other") / "admin" / "ca.crt").read_bytes()
    )
    with pytest.raises(x509.verification.VerificationError):
        PolicyBuilder().store(Store([other_ca])).build_server_verifier(x509.DNSName("localhost")).verify(
            leaf, []
        )
    # the site's copy of the CA is the CA, and the coordinator's TLS key belongs to its certificate
    assert (deploy_consortium / "sites" / "H1" / "ca.crt").read_bytes() == ca.public_bytes(
        serialization.Encoding.PEM
    )
    key = load_pem_private_key((deploy_consortium / "coordinator" / "server.key").read_bytes(), None)
    assert key.public_key() == leaf.public_key()


def test_init_site_keys_are_openssh_p384_and_private_files_0600(deploy_consortium: Path) -> None:
    for site in ("H1", "H2"):
        folder = deploy_consortium / "sites" / site
        pub = (folder / f"{site}.pub").read_text()
        assert pub.startswith("ecdsa-sha2-nistp384 ") and pub.rstrip().endswith(f"fedpath-site-{site}")
        assert (deploy_consortium / "coordinator" / "sites" / f"{site}.pub").read_text() == pub
        key = load_ssh_private_key((folder / f"{site}.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
        derived = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        assert pub.split()[:2] == derived.decode().split()
    if shutil.which("ssh-keygen"):  # OpenSSH itself reads the private key and derives the same public key
        derived_by_openssh = subprocess.run(
            ["ssh-keygen", "-y", "-f", str(deploy_consortium / "sites" / "H1" / "H1.key")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        h1_pub = (deploy_consortium / "sites" / "H1" / "H1.pub").read_text()
        assert derived_by_openssh.split()[:2] == h1_pub.split()[:2]
    private = {"admin/ca.key", "coordinator/server.key", "coordinator/app-signing.key"}
    private |= {"sites/H1/H1.key", "sites/H2/H2.key"}
    for path in deploy_consortium.rglob("*"):
        if path.is_file():
            mode = stat.S_IMODE(path.stat().st_mode)
            rel = str(path.relative_to(deploy_consortium))
            assert mode == (0o600 if rel in private else 0o644), (rel, oct(mode))
    assert not list(deploy_consortium.rglob(".*.part"))  # atomic writes leave no temporary file


def test_init_gives_each_machine_only_its_own_files(deploy_consortium: Path) -> None:
    def names(folder: Path) -> set[str]:
        return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}

    assert names(deploy_consortium / "sites" / "H1") == {"ca.crt", "federation.toml", "H1.key", "H1.pub"}
    coordinator = names(deploy_consortium / "coordinator")
    assert coordinator == {
        "ca.crt",
        "server.pem",
        "server.key",
        "app-signing.key",
        "federation.toml",
        "sites/H1.pub",
        "sites/H2.pub",
    }
    assert names(deploy_consortium / "admin") == {"ca.crt", "ca.key"}
    federation = load_federation(deploy_consortium / "sites" / "H1" / "federation.toml")
    assert federation.superlink == "fl.example.org:8443" and federation.sites == ["H1", "H2"]
    assert (federation.encoder, federation.weights_sha256) == ("enc-A", SHA)
    # the sites trust exactly the key the coordinator signs apps with
    from fedpath.common.appsign import key_id, load_private_key, trusted_signers

    _, public = load_private_key(deploy_consortium / "coordinator" / "app-signing.key")
    assert trusted_signers(federation.app_signers) == {key_id(public): federation.app_signers[0]}
    commands = (deploy_consortium / "commands.txt").read_text()
    for needed in (
        "--enable-supernode-auth",
        "--database",
        "fedpath deploy register",
        "flwr supernode register",
        "fedpath site check",
        "fedpath site start",
        "--auth-key H1.key",
        "ca.key",
        "--isolation process",
        "flower-superexec",
        "--local-port 9093",
        "--federation federation.toml",
        "--signing-key app-signing.key",
    ):
        assert needed in commands, needed


def test_init_refuses_a_used_folder_and_bad_site_names(deploy_consortium: Path, tmp_path: Path) -> None:
    done = run_cli("deploy", "init", "--sites", "H1", "--address", "x:1", "--out", str(deploy_consortium))
    assert done.returncode == 2 and "not empty" in done.stderr
    done = run_cli("deploy", "init", "--sites", "H1,H1", "--address", "x:1", "--out", str(tmp_path / "a"))
    assert done.returncode == 2 and "repeat" in done.stderr
    done = run_cli("deploy", "init", "--sites", "H 1", "--address", "x:1", "--out", str(tmp_path / "b"))
    assert done.returncode == 2 and "site names" in done.stderr
    done = run_cli("deploy", "init", "--sites", "H1", "--address", "x", "--out", str(tmp_path / "c"))
    assert done.returncode == 2 and "HOST:PORT" in done.stderr
    assert not (tmp_path / "a").exists()


def test_federation_file_rejects_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "federation.toml"
    path.write_text('name = "c"\nsuperlink = "h:1"\nsites = ["A"]\nencodr = "x"\n')
    with pytest.raises(ConsortiumFileError, match="encodr"):
        load_federation(path)


# --- fedpath site check -------------------------------------------------------------------------------


def _site(
    root: Path, *, encoder: str = "enc-A", sha: str = SHA, odd: dict[str, tuple[str, str]] | None = None
) -> Path:
    """A one-site manifest (H1, 6 slides of 3 patients) whose feature files name `encoder` and `sha`;
    `odd` gives some slides another (encoder, sha)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(6):
        enc, checksum = (odd or {}).get(f"s{i}", (encoder, sha))
        meta = FeatureMeta(f"s{i}", enc, checksum, tile_size_px=224, tile_size_um=256.0, slide_mpp=0.5)
        feats = np.random.default_rng(i).normal(size=(5, 8)).astype(np.float32)
        write_features(root / f"s{i}.h5", feats, np.zeros((5, 2), np.int64), meta)
        rows.append([f"s{i}", f"p{i // 2}", "H1", str(i % 2), f"s{i}.h5"])
    return write_csv(root / "manifest.csv", ["slide_id", "patient_id", "site", "label", "features"], rows)


def _by_name(results: list[Check]) -> dict[str, Check]:
    return {r.name: r for r in results}


def test_check_reports_a_bad_manifest_with_its_line(tmp_path: Path) -> None:
    manifest = _site(tmp_path / "d")
    manifest.write_text(manifest.read_text().replace("s3.h5", "missing.h5"))
    results = _by_name(run_checks(manifest, "H1", superlink="127.0.0.1:1", ca_file=None))
    bad = results["manifest"]
    assert bad.ok is False and "line 5" in bad.detail and "missing.h5" in bad.detail and bad.fix
    assert results["feature files"].ok is None and results["encoder"].ok is None
    results = _by_name(run_checks(_site(tmp_path / "e"), "H9", superlink="127.0.0.1:1", ca_file=None))
    assert results["manifest"].ok is False and "H1" in results["manifest"].detail


def test_check_reports_an_unreadable_feature_file(tmp_path: Path) -> None:
    manifest = _site(tmp_path / "d")
    (tmp_path / "d" / "s4.h5").write_bytes(b"not an HDF5 file")
    files = _by_name(run_checks(manifest, "H1", superlink="127.0.0.1:1", ca_file=None))["feature files"]
    assert files.ok is False and "1 of 6" in files.detail and "s4.h5" in files.detail
    assert "readable" in files.fix and "fedpath extract" in files.fix


def test_check_reports_encoder_and_checksum_mismatches(tmp_path: Path) -> None:
    manifest = _site(tmp_path / "d", odd={"s1": ("enc-B", SHA), "s2": ("enc-A", "cd" * 32)})
    results = _by_name(
        run_checks(manifest, "H1", superlink="127.0.0.1:1", ca_file=None, encoder="enc-A", weights_sha256=SHA)
    )
    encoder = results["encoder"]
    assert encoder.ok is False and "2 of 6" in encoder.detail and "enc-B" in encoder.detail
    assert (
        "cd" * 32 in encoder.detail
        and "fedpath extract --encoder enc-A" in encoder.fix
        and SHA in encoder.fix
    )
    # only the checksum pinned: the other encoder name alone is no mismatch, the other checksum is
    only_sha = _by_name(run_checks(manifest, "H1", superlink="127.0.0.1:1", ca_file=None, weights_sha256=SHA))
    assert only_sha["encoder"].ok is False and "1 of 6" in only_sha["encoder"].detail
    clean = _by_name(
        run_checks(
            _site(tmp_path / "ok"),
            "H1",
            superlink="127.0.0.1:1",
            ca_file=None,
            encoder="enc-A",
            weights_sha256=SHA.upper(),
        )
    )
    assert clean["encoder"].ok is True and clean["feature files"].ok is True and clean["manifest"].ok is True
    assert (
        _by_name(run_checks(_site(tmp_path / "ok"), "H1", superlink="h:1", ca_file=None))["encoder"].ok
        is None
    )


def test_check_site_key_format_and_permissions(deploy_consortium: Path, tmp_path: Path) -> None:
    key = tmp_path / "H1.key"
    shutil.copy(deploy_consortium / "sites" / "H1" / "H1.key", key)
    key.chmod(0o600)
    assert check_auth_key(key).ok is True
    key.chmod(0o644)
    loose = check_auth_key(key)
    assert loose.ok is False and loose.fix == f"chmod 600 {key}"
    missing = check_auth_key(tmp_path / "nope.key")
    assert missing.ok is False and "deploy init" in missing.fix
    if shutil.which("ssh-keygen"):
        # a key made by OpenSSH (how a site rotates its key) passes; an Ed25519 one is refused
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tmp_path / "new")],
            check=True,
        )
        assert check_auth_key(tmp_path / "new").ok is True
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "ed")], check=True
        )
        ed = check_auth_key(tmp_path / "ed")
        assert ed.ok is False and "P-384" in ed.detail


def test_check_reports_unresolvable_refused_and_silent_coordinators(deploy_consortium: Path) -> None:
    ca = deploy_consortium / "sites" / "H1" / "ca.crt"
    dns = _by_name(check_coordinator("no-such-host.invalid:8443", ca, timeout=2))
    assert dns["coordinator reachable"].ok is False and "DNS" in dns["coordinator reachable"].detail
    assert "resolvable" in dns["coordinator reachable"].fix
    assert dns["certificate trusted"].ok is None and dns["SuperLink answers"].ok is None

    refused = _by_name(check_coordinator(f"127.0.0.1:{fr.free_port()}", ca, timeout=2))[
        "coordinator reachable"
    ]
    assert refused.ok is False and "refused" in refused.detail and "not running" in refused.fix

    with socket.socket() as silent:  # accepts TCP (kernel backlog) but never answers: not a SuperLink
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        results = _by_name(check_coordinator(f"127.0.0.1:{port}", ca, timeout=1))
    assert results["coordinator reachable"].ok is True
    assert results["certificate trusted"].ok is False and "timeout" in results["certificate trusted"].detail


@pytest.fixture(scope="module")
def deploy_superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A real SuperLink started by deploy/bin/coordinator.sh (TLS, site auth, state database) on loopback."""
    root = tmp_path_factory.mktemp("superlink")
    port = fr.free_port()
    consortium = _init(root / "c", address=f"127.0.0.1:{port}", sites="H1")
    federation = consortium / "sites" / "H1" / "federation.toml"
    federation.write_text(
        federation.read_text()
        .replace('encoder = ""', 'encoder = "enc-A"')
        .replace('weights-sha256 = ""', f'weights-sha256 = "{SHA}"')
    )
    link = start_coordinator(consortium / "coordinator", root / "state", port, fr.free_port())
    try:
        yield consortium, f"127.0.0.1:{port}"
    finally:
        link.stop()


def test_check_all_ok_against_a_real_tls_superlink(
    deploy_superlink: tuple[Path, str], tmp_path: Path
) -> None:
    consortium, address = deploy_superlink
    site = consortium / "sites" / "H1"
    manifest = _site(tmp_path / "data")
    done = run_cli(
        "site",
        "check",
        "--federation",
        str(site / "federation.toml"),
        "--manifest",
        str(manifest),
        "--site",
        "H1",
        "--auth-key",
        str(site / "H1.key"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    # manifest, feature files, encoder, privacy ledger, site key, app signature and the 3 coordinator checks
    assert len(lines) == 9 and all(line.startswith("[ OK ]") for line in lines), done.stdout
    assert f"ready to join {address}" in done.stdout
    assert re.search(
        r"certificate trusted: signed by the consortium CA, valid until .* \(\d+ days left\)", done.stdout
    )


def test_check_refuses_a_coordinator_signed_by_another_ca(
    deploy_superlink: tuple[Path, str], tmp_path: Path
) -> None:
    _, address = deploy_superlink
    other = _init(tmp_path / "other", address=address)
    results = _by_name(check_coordinator(address, other / "sites" / "H1" / "ca.crt", timeout=5))
    trust = results["certificate trusted"]
    assert results["coordinator reachable"].ok is True
    assert (
        trust.ok is False
        and "untrusted certificate" in trust.detail
        and "same `fedpath deploy init`" in trust.fix
    )
    # through the command: exit status 1 and the fix printed
    manifest = _site(tmp_path / "data")
    done = run_cli(
        "site",
        "check",
        "--manifest",
        str(manifest),
        "--superlink",
        address,
        "--root-certificates",
        str(other / "sites" / "H1" / "ca.crt"),
    )
    assert (
        done.returncode == 1 and "[FAIL] certificate trusted" in done.stdout and "what to do:" in done.stdout
    )


# --- deploy/ files ------------------------------------------------------------------------------------


def test_entry_scripts_parse_and_are_executable() -> None:
    scripts = sorted(DEPLOY_BIN.glob("*.sh"))
    assert {s.name for s in scripts} == {"coordinator.sh", "superexec.sh", "site.sh"}
    for script in scripts:
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"


def test_site_script_stops_when_preflight_fails(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(DEPLOY_BIN / "site.sh")],
        env={
            **fr.flower_env(tmp_path / "home"),
            "FEDPATH_SITE": "H1",
            "FEDPATH_SUPERLINK": "127.0.0.1:1",
            "FEDPATH_KEYS": str(tmp_path / "keys"),
            "FEDPATH_STATE": str(tmp_path / "state"),
            "FEDPATH_MANIFEST": str(tmp_path / "missing.csv"),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "preflight failed" in done.stderr, done.stdout + done.stderr
    assert "[FAIL] manifest" in done.stdout or "federation.toml" in done.stderr


def test_dockerfiles_compose_and_units_reference_files_that_exist() -> None:
    for name in ("Dockerfile.coordinator", "Dockerfile.site"):
        text = (DEPLOY / name).read_text()
        base = re.search(r"^FROM (\S+)", text, re.M)
        assert base and re.search(r":[\w.-]+(@sha256:[0-9a-f]{64})?$", base.group(1)), (
            f"{name}: unpinned base"
        )
        assert re.search(r"flwr\[simulation\]==1\.42\.\d+", text), f"{name}: flwr not pinned"
        assert "FEDPATH_VERSION" in text
        for src in re.findall(r"^COPY (?:--\S+ )*(\S+) ", text, re.M):
            assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
        entry = re.search(r"^ENTRYPOINT \[\"([^\"]+)\"", text, re.M)
        assert entry and (DEPLOY / "bin" / Path(entry.group(1)).name).exists()
    compose = (DEPLOY / "compose.yaml").read_text()
    for ref in re.findall(r"dockerfile: (\S+)", compose):
        assert (REPO / ref).exists(), ref  # relative to the build context, the repository root
    assert compose.count("ports:") == 1, "only the coordinator publishes a port"
    for service in ("coordinator", "superexec", "site-a", "site-b"):
        assert re.search(rf"^  {service}:", compose, re.M), service
    for unit in ("fedpath-coordinator.service", "fedpath-superexec.service", "fedpath-site.service"):
        text = (DEPLOY / "systemd" / unit).read_text()
        script = re.search(r"^ExecStart=\S*/(\w+\.sh)", text, re.M)
        assert script and (DEPLOY / "bin" / script.group(1)).exists(), unit
        assert "EnvironmentFile=" in text and "User=fedpath" in text
    assert (DEPLOY / "systemd" / "fedpath-site.env").exists()
    runbook = (DEPLOY / "README.md").read_text()
    for topic in ("Ports", "What leaves the site", "rotate", "restart", "flwr supernode register"):
        assert topic.lower() in runbook.lower(), topic
    assert (
        tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["fedpath.commands"][
            "deploy"
        ]
        == "fedpath.server.deploy_cli:COMMAND"
    )
