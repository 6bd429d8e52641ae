"""The consortium's keys and certificates, made with the `cryptography` package.

* **CA** — a self-signed ECDSA P-384 certificate authority, ``ca.key`` + ``ca.crt``. Only the certificate
  travels (to the coordinator and every site, which trust the coordinator through it); the key stays with
  the consortium's administrator and is needed again only to issue a new coordinator certificate.
* **Coordinator TLS certificate** — ``server.pem`` + ``server.key`` (ECDSA P-384), signed by the CA, with the
  coordinator's DNS names and IP addresses as subject alternative names (always ``localhost``, ``127.0.0.1``
  and ``::1`` too, for the coordinator's own `flwr` commands), extended key usage serverAuth.
* **Site key pairs** — ECDSA P-384 in OpenSSH format, as Flower's SuperNode authentication expects:
  ``H1.key`` (the private key, given to `flower-supernode --auth-supernode-private-key`) and ``H1.pub``
  (``ecdsa-sha2-nistp384 AAAA... fedpath-site-H1``, registered with `flwr supernode register`).

Private keys are written atomically with mode 0600 (never readable by another account, not even for a
moment); certificates and public keys with 0644.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpath.common.atomic import atomic_path

CURVE = ec.SECP384R1
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class PKIError(ValueError):
    """A key or certificate that cannot be made or read; the message says what to do."""


def write_private(path: Path, data: bytes) -> Path:
    """Write a private key atomically with mode 0600 (set on the temporary file, before the rename)."""
    with atomic_path(path) as tmp:
        tmp.chmod(0o600)
        tmp.write_bytes(data)
    return path


def write_public(path: Path, data: bytes) -> Path:
    """Write a certificate or public key atomically with mode 0644."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        tmp.chmod(0o644)
    return path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def make_ca(consortium: str, days: int = 3650) -> CertificateAuthority:
    """A self-signed ECDSA P-384 CA for the consortium, valid `days` days, that may sign only end certificates."""
    key = ec.generate_private_key(CURVE())
    name = _name(f"{consortium} consortium CA", consortium)
    start = _now() - dt.timedelta(minutes=5)  # tolerate small clock differences between machines
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return CertificateAuthority(key, cert)


def subject_alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses (told apart by parsing) plus the loopback names, without repeats."""
    out: list[x509.GeneralName] = []
    for raw in [*names, *LOOPBACK_NAMES]:
        name = raw.strip().strip("[]")
        if not name:
            continue
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            if not all(part.replace("-", "").replace("_", "").isalnum() for part in name.split(".")):
                raise PKIError(f"'{raw}' is neither a DNS name nor an IP address") from None
            entry = x509.DNSName(name.lower())
        if entry not in out:
            out.append(entry)
    return out


def make_server_cert(
    ca: CertificateAuthority, names: Sequence[str], days: int = 825
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The coordinator's TLS key and certificate for `names` (DNS names or IPs; loopback always added)."""
    if not names:
        raise PKIError("the coordinator certificate needs at least one host name or IP address")
    key = ec.generate_private_key(CURVE())
    sans = subject_alt_names(names)
    start = _now() - dt.timedelta(minutes=5)
    organization = ca.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(str(names[0]), str(organization)))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA384())
    )
    return key, cert


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the SuperLink reads it at start without a passphrase): protect it by mode 0600."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class SiteKeyPair:
    """A site's SuperNode authentication key pair, both halves in OpenSSH format."""

    site: str
    private_openssh: bytes
    public_openssh: bytes


def make_site_key(site: str) -> SiteKeyPair:
    """An ECDSA P-384 key pair for `site`; the public key's comment is ``fedpath-site-<site>``."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return SiteKeyPair(site, private, public + f" fedpath-site-{site}\n".encode())
