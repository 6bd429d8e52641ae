"""The consortium's signature on a Flower app bundle (FAB): made at the coordinator, checked at every site.

Flower's own app verification (`flower-supernode --trusted-entities`) accepts only signatures that the
SuperLink received from Flower Hub; an app submitted from a folder (`flwr run DIR`) carries none, so a node
with trusted entities refuses every local app, and a consortium that works offline cannot use it. fedpath
therefore signs the bundle itself, with the same primitive (Ed25519 over a SHA-256 digest):

* ``deploy init`` makes the consortium's app-signing key pair: ``app-signing.key`` (OpenSSH, 0600) for
  the coordinator, and its public key (``ssh-ed25519 AAAA... fedpath-app-signing``) in federation.toml
  under ``app-signers``, which every site holds.
* `fedpath run` writes the app folder, builds the bundle exactly as `flwr run` will (Flower's own builder),
  and adds ``fedpath-signature.json``: the key id, the time and an Ed25519 signature over the digest of
  every other file of the bundle (path and SHA-256 of its bytes, sorted; Flower's ``.info/CONTENT`` index is
  derived from the files and left out).
* At the site, before Flower unpacks the bundle or imports anything from it, `fedpath.client.trusted_apps`
  recomputes the digest from the received bytes and checks the signature with the keys of federation.toml.
  Any file added, removed or changed (a ClientApp of one's own, a different component, another run config
  in the bundle) breaks it.

Settings a run passes with ``--run-config`` are not part of the bundle; the site's own policy checks them.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

SIGNATURE_FILE = "fedpath-signature.json"
FLOWER_INDEX = ".info/CONTENT"  # written by Flower's builder from the other files
DIGEST_DOMAIN = b"fedpath-fab-v1\n"


class AppSignatureError(ValueError):
    """A bundle that is not signed by a trusted key, or a key that cannot be used; says which and why."""


@dataclass(frozen=True)
class SigningKeyPair:
    private_openssh: bytes
    public_openssh: bytes


def make_signing_key(comment: str = "fedpath-app-signing") -> SigningKeyPair:
    """A new Ed25519 key pair in OpenSSH format (the private key unencrypted: protect it with mode 0600)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return SigningKeyPair(private, public + b" " + comment.encode() + b"\n")


def key_id(public_openssh: str) -> str:
    """A short, stable name of a public key: ``fpk_`` + the first 16 hex digits of SHA-256 of its bytes."""
    parts = public_openssh.split()
    if len(parts) < 2 or parts[0] != "ssh-ed25519":
        raise AppSignatureError(f"not an Ed25519 public key in OpenSSH format: '{public_openssh[:40]}...'")
    return "fpk_" + hashlib.sha256(base64.b64decode(parts[1])).hexdigest()[:16]


def load_public_key(public_openssh: str) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_ssh_public_key(public_openssh.strip().encode())
    except (ValueError, TypeError) as err:
        raise AppSignatureError(f"unreadable app-signing public key ({err})") from err
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise AppSignatureError("the app-signing key must be Ed25519 (ssh-ed25519)")
    return key


def load_private_key(path: Path) -> tuple[ed25519.Ed25519PrivateKey, str]:
    """The signing key and the OpenSSH form of its public key."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise AppSignatureError(
            f"{path}: no such app-signing key; it is made by `fedpath deploy init` (coordinator/app-signing.key)"
        ) from None
    except (ValueError, TypeError, OSError) as err:
        raise AppSignatureError(f"{path}: not an OpenSSH private key ({err})") from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise AppSignatureError(f"{path}: the app-signing key must be Ed25519")
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return key, public.decode()


def bundle_files(fab: bytes) -> dict[str, bytes]:
    """The files of a bundle (a ZIP archive), by path."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            return {info.filename: archive.read(info) for info in archive.infolist() if not info.is_dir()}
    except (zipfile.BadZipFile, OSError) as err:
        raise AppSignatureError(f"the app bundle is not a ZIP archive ({err})") from err


def bundle_digest(files: Mapping[str, bytes]) -> bytes:
    """SHA-256 over the sorted (path, SHA-256 of content) of every file but the signature and Flower's index."""
    h = hashlib.sha256(DIGEST_DOMAIN)
    for path in sorted(files):
        if path in (SIGNATURE_FILE, FLOWER_INDEX):
            continue
        h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest() + b"\n")
    return h.digest()


def _message(digest: bytes, signed_at: str) -> bytes:
    return DIGEST_DOMAIN + digest + b"\n" + signed_at.encode()


def sign_app(app_dir: Path, key_file: Path) -> str:
    """Sign the app folder as `flwr run` will bundle it: writes SIGNATURE_FILE there; returns the key id."""
    from flwr.cli.build import build_fab_from_disk

    key, public = load_private_key(key_file)
    (app_dir / SIGNATURE_FILE).unlink(missing_ok=True)
    digest = bundle_digest(bundle_files(build_fab_from_disk(app_dir)))
    signed_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    record = {
        "key-id": key_id(public),
        "signed-at": signed_at,
        "digest": digest.hex(),
        "signature": base64.b64encode(key.sign(_message(digest, signed_at))).decode(),
    }
    (app_dir / SIGNATURE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    # The signature file itself is bundled: check that the bundle flwr will send still has the signed digest.
    if bundle_digest(bundle_files(build_fab_from_disk(app_dir))) != digest:
        raise AppSignatureError(f"{app_dir}: the bundle changed while it was signed; sign it again")
    return str(record["key-id"])


def verify_app(fab: bytes, signers: Mapping[str, str]) -> str:
    """Check a received bundle against the trusted public keys (key id → ``ssh-ed25519 ...``).

    Returns the id of the key that signed it; AppSignatureError otherwise (no signature, unknown key,
    bad signature: any change to any file of the bundle)."""
    if not signers:
        raise AppSignatureError("no trusted app-signing key is configured at this site")
    files = bundle_files(fab)
    if SIGNATURE_FILE not in files:
        raise AppSignatureError("the app is not signed (no fedpath-signature.json in the bundle)")
    try:
        record = json.loads(files[SIGNATURE_FILE])
        kid, signed_at = str(record["key-id"]), str(record["signed-at"])
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as err:
        raise AppSignatureError(f"the app's signature record is malformed ({err})") from err
    if kid not in signers:
        raise AppSignatureError(f"the app is signed by key {kid}, which this site does not trust")
    try:
        load_public_key(signers[kid]).verify(signature, _message(bundle_digest(files), signed_at))
    except InvalidSignature:
        raise AppSignatureError(
            f"the app's signature by {kid} does not match its files (the bundle was changed after signing)"
        ) from None
    return kid


def trusted_signers(public_keys: list[str]) -> dict[str, str]:
    """Key id → public key, for the keys listed in federation.toml's ``app-signers``."""
    return {key_id(k): k.strip() for k in public_keys}
