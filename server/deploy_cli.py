"""`fedpath deploy init` (the consortium's keys, certificates and config) and `fedpath deploy register`.

`init` runs once, on the consortium administrator's machine, and writes one folder per destination::

    OUT/admin/            ca.key, ca.crt           stays with the administrator (offline); never copied
    OUT/coordinator/      ca.crt, server.pem, server.key, app-signing.key, federation.toml, sites/<SITE>.pub
    OUT/sites/<SITE>/     ca.crt, federation.toml, <SITE>.key, <SITE>.pub   → that hospital only

and prints the commands for the coordinator and for every site (also kept in OUT/commands.txt).

`register` runs on the coordinator and registers site public keys with the running SuperLink; the native
equivalent is ``flwr supernode register sites/H1.pub CONNECTION`` (printed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from pathlib import Path

from fedpath.common.cli import Command, UserError

SITE_DATA_EXAMPLE = "/data/manifest.csv"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = sub.add_parser(
        "init",
        help="create the consortium CA, coordinator certificate, site key pairs and federation.toml",
        description="Create a consortium: a CA, the coordinator's TLS certificate, one SuperNode key pair per "
        "site (ECDSA P-384, OpenSSH) and federation.toml, in one folder per machine. Prints what to copy "
        "where and the commands to run there.",
    )
    init.add_argument("--sites", required=True, help="comma-separated site names, e.g. H1,H2,H3")
    init.add_argument("--out", required=True, type=Path, help="new folder for everything written")
    init.add_argument(
        "--address", required=True, help="coordinator HOST:PORT as the sites reach it (in the certificate)"
    )
    init.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="other DNS name or IP of the coordinator (repeatable; localhost and 127.0.0.1 always included)",
    )
    init.add_argument("--name", default="fedpath", help="consortium name (CA subject, federation.toml)")
    init.add_argument(
        "--encoder", default="", help="tile encoder every site extracts with (pinned in the config)"
    )
    init.add_argument("--weights-sha256", default="", metavar="HEX", help="SHA-256 of the encoder's weights")
    init.add_argument("--days", type=int, default=825, help="validity of the coordinator certificate")
    init.add_argument("--ca-days", type=int, default=3650, help="validity of the CA certificate")

    reg = sub.add_parser(
        "register",
        help="register site public keys with the running SuperLink (wraps flwr supernode register)",
        description="Register sites' public keys (their .pub files) with the coordinator's SuperLink, which "
        "must run with --enable-supernode-auth. Run it on the coordinator. A key not registered is refused.",
    )
    reg.add_argument("public_keys", nargs="+", type=Path, metavar="SITE.pub", help="site public key files")
    reg.add_argument(
        "--superlink",
        default="127.0.0.1:9093",
        help="the SuperLink's local address on the coordinator (`server start --local-port`)",
    )
    reg.add_argument("--root-certificates", required=True, type=Path, help="the consortium's ca.crt")
    reg.add_argument(
        "--flwr-home", type=Path, help="Flower CLI folder keeping the connection (default: $FLWR_HOME)"
    )


def _run(args: argparse.Namespace) -> int:
    return {"init": _init, "register": _register}[args.action](args)


def _init(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from fedpath.common.appsign import make_signing_key
    from fedpath.common.consortium import FEDERATION_FILE, Federation, split_address, write_federation
    from fedpath.server import pki

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    signing = make_signing_key(f"fedpath-app-signing-{args.name}")
    try:
        federation = Federation(
            name=args.name,
            superlink=args.address,
            sites=sites,
            encoder=args.encoder,
            weights_sha256=args.weights_sha256,
            app_signers=[signing.public_openssh.decode().strip()],
        )
        host, port = split_address(args.address)
    except (ValidationError, ValueError) as err:
        raise UserError(f"invalid consortium settings: {err}") from err
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise UserError(
            f"{out} is not empty: a second CA would not be trusted by the sites set up with the first; "
            "choose a new --out (rotate a site key or renew the coordinator certificate as deploy/README.md says)"
        )
    names = [host, *[n for item in args.san for n in item.split(",")]]
    try:
        ca = pki.make_ca(args.name, days=args.ca_days)
        server_key, server_cert = pki.make_server_cert(ca, names, days=args.days)
    except pki.PKIError as err:
        raise UserError(str(err)) from err

    admin, coordinator = out / "admin", out / "coordinator"
    ca_pem = pki.cert_pem(ca.cert)
    pki.write_private(admin / "ca.key", pki.key_pem(ca.key))
    pki.write_public(admin / "ca.crt", ca_pem)
    pki.write_public(coordinator / "ca.crt", ca_pem)
    pki.write_public(coordinator / "server.pem", pki.cert_pem(server_cert))
    pki.write_private(coordinator / "server.key", pki.key_pem(server_key))
    pki.write_private(coordinator / "app-signing.key", signing.private_openssh)
    write_federation(coordinator / FEDERATION_FILE, federation)
    for site in sites:
        pair = pki.make_site_key(site)
        folder = out / "sites" / site
        pki.write_public(folder / "ca.crt", ca_pem)
        write_federation(folder / FEDERATION_FILE, federation)
        pki.write_private(folder / f"{site}.key", pair.private_openssh)
        pki.write_public(folder / f"{site}.pub", pair.public_openssh)
        pki.write_public(coordinator / "sites" / f"{site}.pub", pair.public_openssh)

    text = instructions(out, federation, port, sorted({*names, *pki.LOOPBACK_NAMES}))
    (out / "commands.txt").write_text(text, encoding="utf-8")
    print(text, end="")
    print(f"\nwritten: {out}/ (these instructions also in {out / 'commands.txt'})")
    return 0


def instructions(out: Path, federation: object, port: int, names: list[str]) -> str:
    """What to copy to which machine, and the commands to run there."""
    from fedpath.common.consortium import Federation

    assert isinstance(federation, Federation)
    sites = federation.sites
    pubs = " ".join(f"sites/{s}.pub" for s in sites)
    example = sites[0]
    lines = [
        f"consortium '{federation.name}': CA, coordinator certificate and {len(sites)} site key pairs",
        f"coordinator certificate valid for: {', '.join(names)}",
        "",
        "Copy each folder to one machine only (scp/USB); nothing else needs to travel:",
        f"  {out}/admin/        stays with you, offline: ca.key signs coordinator certificates; copy it nowhere",
        f"  {out}/coordinator/  -> the coordinator ({federation.superlink}): server.key is its TLS key and "
        "app-signing.key signs the apps the sites run (both 0600)",
    ]
    lines += [
        f"  {out}/sites/{s}/{' ' * max(0, 6 - len(s))} -> hospital {s} only: {s}.key is its identity (0600), "
        "with ca.crt and federation.toml"
        for s in sites
    ]
    local = "127.0.0.1:9093"
    lines += [
        "",
        "On the coordinator, in the copied coordinator/ folder (open TCP port "
        f"{port} to the sites; sites open no port). The sites' port serves only the Fleet API; operator "
        f"commands run on the coordinator itself, against the SuperLink's local address {local}:",
        f"  1. fedpath server start --host 0.0.0.0 --port {port} --local-port 9093 --tls ca.crt server.pem "
        "server.key --enable-supernode-auth --database state.db --isolation process",
        f"  2. flower-superexec --runtime-api-address {local} --root-certificates ca.crt    (second terminal)",
        f"  3. fedpath deploy register --superlink {local} --root-certificates ca.crt {pubs}",
        f"     (native: flwr supernode register sites/{example}.pub CONNECTION, once per site)",
        f"At each hospital, in its copied folder ({example} shown; its manifest lists its feature files):",
        f"  4. fedpath site check --federation federation.toml --manifest {SITE_DATA_EXAMPLE} --site {example} "
        f"--auth-key {example}.key",
        f"  5. fedpath site start --superlink {federation.superlink} --root-certificates ca.crt "
        f"--auth-key {example}.key --federation federation.toml --manifest {SITE_DATA_EXAMPLE} --site {example}",
        "     (the node runs only apps signed with the consortium's key in federation.toml)",
        "Then on the coordinator, once the sites are connected (D = the encoder's feature dimension):",
        f"  6. fedpath run --superlink {local} --root-certificates ca.crt --signing-key app-signing.key "
        f"--sites {len(sites)} --in-dim D --out runs/first",
        "",
        "Containers and systemd units for the same steps: deploy/ in the fedpath repository (deploy/README.md).",
    ]
    return "\n".join(lines) + "\n"


def _register(args: argparse.Namespace) -> int:
    from fedpath.common.processes import flwr_home
    from fedpath.server import flower_runtime as fr

    missing = [str(p) for p in [args.root_certificates, *args.public_keys] if not p.is_file()]
    if missing:
        raise UserError(f"no such file: {', '.join(missing)}")
    home = flwr_home(args.flwr_home)
    fr.write_connection(home, args.superlink, root_certificates=args.root_certificates)
    failed = 0
    for pub in args.public_keys:
        site = pub.name.removesuffix(".pub")
        cmd = [fr.executable("flwr"), "supernode", "register", str(pub.resolve()), fr.CONNECTION]
        cmd += ["--name", site, "--format", "json"]
        done = subprocess.run(cmd, env=fr.flower_env(home), capture_output=True, text=True, check=False)
        reply = _json_tail(done.stdout)
        if done.returncode == 0 and reply.get("success", True) and "node-id" in reply:
            print(f"site {site}: registered as node {reply['node-id']} ({pub})")
            continue
        failed += 1
        why = reply.get("error-message") or (done.stdout + done.stderr).strip() or f"exit {done.returncode}"
        print(f"site {site}: NOT registered ({pub}): {why}")
    print(
        f"native equivalent: FLWR_HOME={home} {shlex.join(['flwr', 'supernode', 'register', 'SITE.pub', fr.CONNECTION])}"
    )
    print(f"list registered sites: FLWR_HOME={home} flwr supernode list {fr.CONNECTION}")
    if failed:
        raise UserError(
            f"{failed} of {len(args.public_keys)} key(s) not registered: check that the SuperLink runs at "
            f"{args.superlink} with --enable-supernode-auth and that the key is not registered already"
        )
    return 0


def _json_tail(text: str) -> dict[str, object]:
    try:
        value = json.loads(text[text.index("{") :])
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


COMMAND = Command(
    name="deploy",
    help="consortium set-up: CA, certificates, site keys, config (init); register site keys (register)",
    description="Set up a federation that hospital IT can trust: TLS with the consortium's own CA, one "
    "authentication key per site, sites connecting outward only. See deploy/README.md.",
    add_arguments=_add_arguments,
    run=_run,
)
