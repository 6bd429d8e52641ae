"""The consortium file ``federation.toml``: what every member must agree on before a site joins.

Written once by `fedpath deploy init` on the consortium's machine and copied, with the CA certificate, to the
coordinator and to every site. `fedpath site check` reads it to know where the coordinator is and which
encoder (name and weights checksum) the federation's features were extracted with. Keys, in TOML::

    name = "consortium"                       # the consortium's name (CA subject)
    superlink = "fl.example.org:8000"         # HOST:PORT every site connects to (outbound only)
    sites = ["H1", "H2"]                      # the sites a key pair was made for
    ca-certificate = "ca.crt"                 # relative to this file's folder
    encoder = "hf-hub:MahmoodLab/uni"         # tile encoder of every site's feature files ("" = not pinned)
    weights-sha256 = "3f1c..."                # SHA-256 of the encoder weights, as the feature files record it
    app-signers = ["ssh-ed25519 AAAA... fedpath-app-signing"]  # keys whose signed apps the sites run

An unknown or misspelt key is an error, not a silently ignored one.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedpath.common.atomic import write_text_atomic

FEDERATION_FILE = "federation.toml"
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ConsortiumFileError(ValueError):
    """A federation.toml that cannot be used; the message names the file and the key."""


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → (host, port); ValueError saying what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{address}' is not HOST:PORT (e.g. fl.example.org:8000)")
    return host.strip("[]"), int(port)


class Federation(BaseModel):
    """The contents of federation.toml (field names with underscores; in the file, hyphens)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    superlink: str = Field(description="HOST:PORT of the coordinator's SuperLink, as sites reach it")
    sites: list[str] = Field(min_length=1)
    ca_certificate: str = "ca.crt"
    encoder: str = ""
    weights_sha256: str = ""
    app_signers: list[str] = Field(
        default_factory=list, description="Ed25519 public keys (OpenSSH) whose signed app bundles sites run"
    )

    @field_validator("superlink")
    @classmethod
    def _address(cls, value: str) -> str:
        split_address(value)
        return value

    @field_validator("sites")
    @classmethod
    def _site_names(cls, value: list[str]) -> list[str]:
        bad = [s for s in value if not SITE_NAME_RE.match(s)]
        if bad:
            raise ValueError(
                f"site names {bad} must be letters, digits, '.', '_' or '-' (at most 63, not starting with a sign)"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"site names repeat: {value}")
        return value

    @field_validator("weights_sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        # Feature files record what their extractor wrote: a hex digest, or a word such as "synthetic".
        if value != value.strip() or " " in value:
            raise ValueError(f"'{value}' is not a checksum (a SHA-256 hex digest has no spaces)")
        return value.lower()

    @field_validator("app_signers")
    @classmethod
    def _signers(cls, value: list[str]) -> list[str]:
        from fedpath.common.appsign import AppSignatureError, load_public_key

        for key in value:
            try:
                load_public_key(key)
            except AppSignatureError as err:
                raise ValueError(str(err)) from err
        return value

    def to_toml(self) -> str:
        return tomli_w.dumps({k.replace("_", "-"): v for k, v in self.model_dump().items()})


def write_federation(path: str | os.PathLike[str], federation: Federation) -> Path:
    """Write federation.toml atomically, readable by everyone (it holds no secret)."""
    target = Path(path)
    header = "# fedpath consortium file (written by `fedpath deploy init`); no secrets in here.\n"
    write_text_atomic(target, header + federation.to_toml())
    target.chmod(0o644)
    return target


def load_federation(path: str | os.PathLike[str]) -> Federation:
    """Read federation.toml; ConsortiumFileError naming the file and the bad key."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConsortiumFileError(
            f"{p}: no such file; copy federation.toml from the consortium's `fedpath deploy init` output"
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConsortiumFileError(f"{p}: not a readable TOML file ({err})") from err
    try:
        return Federation.model_validate({k.replace("-", "_"): v for k, v in data.items()})
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(x).replace('_', '-') for x in e['loc']) or 'file'}: {e['msg']}"
            for e in err.errors()
        )
        raise ConsortiumFileError(f"{p}: {problems}") from err


def ca_certificate_path(federation_file: Path, federation: Federation) -> Path:
    """The CA certificate named in federation.toml, resolved against the file's folder."""
    ca = Path(federation.ca_certificate).expanduser()
    return ca if ca.is_absolute() else federation_file.resolve().parent / ca
