"""`fedpath site check`: everything a site can verify on its own before it joins a federation.

Each check is a plain function that returns `Check` results (name, ok, detail, what to do), so a test or
another tool can call it without the command line:

* `check_manifest`       the manifest is valid and holds the site
* `check_feature_files`  every feature file of the site opens, with one feature dimension
* `check_encoder`        every file was made with the federation's encoder and weights (name + SHA-256)
* `check_auth_key`       the site's key is an ECDSA P-384 OpenSSH private key that only its owner can read
* `check_privacy_ledger` the site's privacy ledger (where `site start` would write it) is intact: its hash
                         chain and anchor verify; prints ε spent and the site policy of its last round
* `check_coordinator`    the SuperLink's name resolves, its port accepts an outbound connection, its TLS
                         certificate is signed by the consortium's CA and valid for that name, and it
                         answers as a Flower SuperLink (HTTPS ``/health``)

Nothing here sends patient data anywhere: the coordinator check opens one TLS connection and asks ``/health``.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpath.client.site import SiteConfigError, choose_site
from fedpath.common.consortium import split_address
from fedpath.common.features import FeatureFileError, FeatureFileInfo, inspect_features
from fedpath.common.manifest import Manifest, ManifestError, load_manifest

MAX_LISTED = 5


@dataclass(frozen=True)
class Check:
    """One preflight result. `ok` None = not checked (nothing to compare with); `fix` says what to do."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""

    def render(self) -> str:
        mark = {True: " OK ", False: "FAIL", None: "SKIP"}[self.ok]
        text = f"[{mark}] {self.name}: {self.detail}"
        return text + (f"\n       what to do: {self.fix}" if self.fix and self.ok is not True else "")


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def check_manifest(manifest: Path, site: str) -> tuple[Check, Manifest | None]:
    """The manifest loads (feature files exist) and holds `site` (or only one site when `site` is "")."""
    name = "manifest"
    try:
        full = load_manifest(manifest)
    except ManifestError as err:
        fix = "correct the lines named above (see `fedpath manifest check`), then run this check again"
        return Check(name, False, str(err), fix), None
    try:
        chosen = choose_site(full, site, how="name this site with --site")
    except SiteConfigError as err:
        return Check(name, False, str(err), "name this site with --site"), None
    mine = full.for_site(chosen)
    patients = len(mine.patients())
    detail = f"{manifest}: site {chosen}, {len(mine.slides)} slides, {patients} patients"
    return Check(name, True, detail), mine


def check_feature_files(manifest: Manifest) -> tuple[Check, list[FeatureFileInfo]]:
    """Every feature file of the manifest opens as HDF5 with tile features, all of one dimension."""
    name = "feature files"
    infos: list[FeatureFileInfo] = []
    bad: list[str] = []
    for slide in manifest.slides:
        if slide.features is None:
            bad.append(f"{slide.slide_id}: no features path (extract it first)")
            continue
        try:
            infos.append(inspect_features(slide.features))
        except (FeatureFileError, OSError) as err:
            bad.append(str(err))
    if bad:
        fix = (
            "make the files readable by the account that runs the site (chown/chmod), or re-extract the "
            "slides named (`fedpath extract`)"
        )
        return Check(
            name, False, f"{len(bad)} of {len(manifest.slides)} unreadable: {_listed(bad)}", fix
        ), infos
    dims = Counter(info.dim for info in infos)
    if len(dims) > 1:
        odd = [f"{i.path} (dim {i.dim})" for i in infos if i.dim != dims.most_common(1)[0][0]]
        detail = f"feature dimensions differ: {dict(dims)}; {_listed(odd)}"
        return Check(name, False, detail, "re-extract those slides with the federation's encoder"), infos
    dim = next(iter(dims))
    tiles = sum(i.n_tiles for i in infos)
    return Check(name, True, f"{len(infos)} files readable, {dim}-dimensional features, {tiles} tiles"), infos


def check_encoder(infos: Sequence[FeatureFileInfo], encoder: str, weights_sha256: str) -> Check:
    """All files name the federation's encoder and weights checksum (those given; "" = not pinned)."""
    name = "encoder"
    if not encoder and not weights_sha256:
        fix = "pin them in federation.toml (encoder, weights-sha256) or pass --encoder and --weights-sha256"
        return Check(name, None, "the federation pins no encoder: nothing to compare with", fix)
    expected = f"{encoder or '(any encoder)'} with weights {weights_sha256 or '(any)'}"
    found = Counter((i.encoder or "", (i.weights_sha256 or "").lower()) for i in infos)
    wrong = [
        i
        for i in infos
        if (encoder and (i.encoder or "") != encoder)
        or (weights_sha256 and (i.weights_sha256 or "").lower() != weights_sha256.lower())
    ]
    if not infos:
        return Check(name, False, "no readable feature file to check", "fix the feature files first")
    if wrong:
        kinds = "; ".join(
            f"{n} made with {e or '?'} / weights {s or '?'}" for (e, s), n in found.most_common()
        )
        detail = f"{len(wrong)} of {len(infos)} files differ from the federation's {expected}: {kinds}"
        fix = (
            f"re-extract these slides with `fedpath extract --encoder {encoder or 'NAME'}` using the weights "
            f"file whose SHA-256 is {weights_sha256 or 'the federation’s'} (e.g. {wrong[0].path})"
        )
        return Check(name, False, detail, fix)
    return Check(name, True, f"all {len(infos)} files made with {expected}")


def check_auth_key(path: Path) -> Check:
    """The site's SuperNode key: an ECDSA P-384 private key in OpenSSH format, readable by its owner only."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    name = "site key"
    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        return Check(
            name, False, f"{path}: no such file", "copy SITE.key from deploy init's sites/SITE/ folder"
        )
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        fix = "use the SITE.key made by `fedpath deploy init` (OpenSSH format, no passphrase)"
        return Check(name, False, f"{path}: not an OpenSSH private key ({err})", fix)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
        fix = "make an ECDSA P-384 key (`ssh-keygen -t ecdsa -b 384 -N ''`) and have it registered"
        return Check(name, False, f"{path}: {kind} key, Flower's site authentication needs ECDSA P-384", fix)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return Check(name, False, f"{path}: mode {mode:o}, readable by others", f"chmod 600 {path}")
    return Check(name, True, f"{path}: ECDSA P-384, mode 600")


def _cert_summary(cert: Mapping[str, object]) -> str:
    until = str(cert.get("notAfter", "?"))
    try:
        left = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(until), dt.UTC) - dt.datetime.now(dt.UTC)
        return f"valid until {until} ({left.days} days left)"
    except ValueError:
        return f"valid until {until}"


def check_coordinator(address: str, ca_file: Path, timeout: float = 10.0) -> list[Check]:
    """Resolve, connect, verify TLS against `ca_file`, ask /health. Stops at the first failure; the checks not
    reached are reported as not checked."""
    reach, trust, answer = "coordinator reachable", "certificate trusted", "SuperLink answers"
    pending = [reach, trust, answer]

    def stop(failed: Check) -> list[Check]:
        done = pending.index(failed.name)
        return [*results, failed, *(Check(n, None, "not checked (see above)") for n in pending[done + 1 :])]

    results: list[Check] = []
    try:
        host, port = split_address(address)
    except ValueError as err:
        return stop(
            Check(reach, False, str(err), 'set superlink = "HOST:PORT" in federation.toml or --superlink')
        )
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        fix = (
            f"ask IT to make '{host}' resolvable from this machine (DNS or hosts file), or use the coordinator's "
            "IP address if its certificate lists it"
        )
        return stop(Check(reach, False, f"DNS: cannot resolve '{host}' ({err.strerror})", fix))
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        fix = f"the coordinator is not running or listens on another port: ask its admin; check {address}"
        return stop(Check(reach, False, f"connection refused by {address}: nothing listens there", fix))
    except TimeoutError:
        fix = f"ask IT to allow outbound TCP from this machine to {address} (firewall or proxy drops it)"
        return stop(Check(reach, False, f"timeout: no answer from {address} within {timeout:g} s", fix))
    except OSError as err:
        fix = f"check this machine's network route to {address} with IT"
        return stop(Check(reach, False, f"cannot connect to {address}: {err.strerror or err}", fix))
    results.append(Check(reach, True, f"outbound TCP to {address} connects"))

    try:
        context = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as err:
        fix = "copy ca.crt from your site folder of the consortium's `fedpath deploy init`"
        sock.close()
        return stop(Check(trust, False, f"CA certificate {ca_file} unreadable ({err})", fix))
    with sock:
        try:
            tls = context.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as err:
            if (
                "hostname" in (err.verify_message or "").lower()
                or "match" in (err.verify_message or "").lower()
            ):
                fix = f"connect with a name or IP in the coordinator's certificate, or have it reissued for '{host}'"
            else:
                fix = (
                    f"the coordinator's certificate is not signed by {ca_file}: use the ca.crt from the same "
                    "`fedpath deploy init` as the coordinator's (ask the consortium's admin)"
                )
            return stop(Check(trust, False, f"untrusted certificate: {err.verify_message}", fix))
        except TimeoutError:
            fix = f"something at {address} accepts TCP but does not complete TLS: is it the coordinator?"
            return stop(Check(trust, False, f"timeout in the TLS handshake after {timeout:g} s", fix))
        except (ssl.SSLError, OSError) as err:
            fix = f"{address} does not speak TLS (a SuperLink started with --insecure, or another service)"
            return stop(Check(trust, False, f"TLS handshake failed: {err}", fix))
        with tls:
            cert = tls.getpeercert() or {}
            results.append(Check(trust, True, f"signed by the consortium CA, {_cert_summary(cert)}"))
            try:
                request = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                tls.sendall(request.encode())
                status = tls.recv(256).split(b"\r\n", 1)[0].decode("latin-1")
            except OSError as err:
                status = f"no answer ({err})"
    if " 200" not in status:
        fix = f"{address} is not a running Flower SuperLink: ask the coordinator's admin"
        return stop(Check(answer, False, f"/health answered '{status}'", fix))
    results.append(Check(answer, True, "Flower SuperLink /health: 200 OK"))
    return results


def check_app_signers(app_signers: Sequence[str] | None) -> Check:
    """The keys whose signed apps this site will run (federation.toml's app-signers)."""
    from fedpath.common.appsign import AppSignatureError, trusted_signers

    name = "app signature"
    fix = "use the consortium's federation.toml from `fedpath deploy init` (it lists app-signers)"
    if app_signers is None:
        return Check(name, None, "no federation.toml given: the site start needs --federation", fix)
    try:
        signers = trusted_signers(list(app_signers))
    except AppSignatureError as err:
        return Check(name, False, str(err), fix)
    if not signers:
        return Check(
            name, False, "federation.toml lists no app-signers: the node would refuse every app", fix
        )
    return Check(name, True, f"the node runs only apps signed by {', '.join(sorted(signers))}")


def check_privacy_ledger(path: Path, site: str) -> Check:
    """The ledger at `path` (fedpath.client.privacy.ledger_path) is absent (a new site) or verifies."""
    from fedpath.client.privacy import PrivacyError, PrivacyLedger

    name = "privacy ledger"
    try:
        ledger = PrivacyLedger(path, site=site, delta=0.0)
    except PrivacyError as err:
        return Check(name, False, str(err), "restore the ledger and its .anchor from the site's backup")
    if not ledger.entries:
        return Check(name, True, f"{path}: none yet (created at the site's first round)")
    policy = ledger.entries[-1].policy
    shown = ", ".join(f"{k}={v}" for k, v in policy.items() if v not in (None, [], False))
    detail = (
        f"{path}: {len(ledger.entries)} rounds, hash chain verified, ε = {ledger.epsilon:.3f} at "
        f"δ = {ledger.delta:.3g}; policy at the last round: {shown or 'defaults'}"
    )
    return Check(name, True, detail)


def run_checks(
    manifest: Path,
    site: str,
    *,
    superlink: str,
    ca_file: Path | None,
    encoder: str = "",
    weights_sha256: str = "",
    auth_key: Path | None = None,
    timeout: float = 10.0,
    app_signers: Sequence[str] | None = None,
    privacy_ledger: Path | None = None,
) -> list[Check]:
    """All checks in order; later data checks are skipped when the manifest cannot be read. The ledger is
    looked for where `site start` with the same `privacy_ledger` (or none) writes it."""
    from fedpath.client.privacy import ledger_path

    results: list[Check] = []
    manifest_check, mine = check_manifest(manifest, site)
    results.append(manifest_check)
    if mine is None:
        results += [
            Check(n, None, "not checked (fix the manifest first)")
            for n in ("feature files", "encoder", "privacy ledger")
        ]
    else:
        files_check, infos = check_feature_files(mine)
        results += [files_check, check_encoder(infos, encoder, weights_sha256)]
        chosen = mine.sites[0]
        path = ledger_path(chosen, explicit=privacy_ledger, manifest=manifest)
        results.append(check_privacy_ledger(path, chosen))
    if auth_key is not None:
        results.append(check_auth_key(auth_key))
    results.append(check_app_signers(app_signers))
    if ca_file is None:
        fix = "give --federation federation.toml (with ca.crt beside it) or --root-certificates ca.crt"
        results.append(
            Check("certificate trusted", False, "no CA certificate to verify the coordinator", fix)
        )
    else:
        results += check_coordinator(superlink, ca_file, timeout)
    return results
