"""`fedpath site start`: connect this hospital to a federation (Flower's `flower-supernode`, fedpath defaults).

Before connecting, the site's manifest and feature files are checked here, so a wrong path or site name is
reported at once instead of as a failed round on the coordinator. The node then runs in the foreground
until stopped (Ctrl-C). Equivalent native command (printed at start)::

    flower-supernode --superlink HOST:PORT --insecure|--root-certificates ca.crt --port 9094 \\
        --node-config 'manifest="/abs/manifest.csv" site="H1"'
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from fedpath.common.cli import Command, UserError


def _add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = sub.add_parser(
        "start",
        help="check the site's data, then run a Flower SuperNode for it",
        description="Check the site's manifest and feature files, then run `flower-supernode` with the site's "
        "settings in its node config. Patient data never leaves this machine: only weights and aggregate "
        "metrics are sent.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    start.add_argument("--superlink", required=True, help="coordinator's SuperLink address HOST:PORT")
    start.add_argument("--manifest", required=True, type=Path, help="this site's cohort manifest (CSV)")
    start.add_argument("--site", default="", help="site name in the manifest (needed if it holds several)")
    tls = start.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", type=Path, help="CA certificate that signed the SuperLink's")
    tls.add_argument("--insecure", action="store_true", help="plain text, no TLS (tests on one machine only)")
    start.add_argument("--port", type=int, default=9094, help="local port of the node's runtime API")
    start.add_argument("--auth-key", type=Path, help="private key registered with the federation (site auth)")
    start.add_argument(
        "--flwr-home", type=Path, help="Flower's folder for installed apps (default: $FLWR_HOME)"
    )
    start.add_argument(
        "--privacy-budget", type=float, help="this site's lifetime ε budget under DP (default: the run's)"
    )
    start.add_argument(
        "--privacy-ledger",
        type=Path,
        help="privacy ledger file (default: .fedpath-privacy/ beside the manifest)",
    )
    privacy = sub.add_parser(
        "privacy",
        help="print this site's privacy ledger (ε spent per round, cumulative)",
        description="Print the site's differential-privacy ledger: every round trained under DP-SGD with its "
        "noise, sampling rate, steps and the cumulative ε (RDP accountant, patient-level, at the ledger's δ).",
    )
    where = privacy.add_mutually_exclusive_group(required=True)
    where.add_argument("--ledger", type=Path, help="the ledger file")
    where.add_argument("--manifest", type=Path, help="the site's manifest (ledger in its default place)")
    privacy.add_argument("--site", default="", help="site name (with --manifest, if it holds several)")
    check = sub.add_parser(
        "check",
        help="preflight before joining: data, encoder, site key, coordinator reachable and trusted",
        description="Check, before joining: the manifest, that every feature file reads, that they were made "
        "with the federation's encoder and weights, the site key, and that the coordinator is reachable "
        "outbound with a certificate signed by the consortium's CA. Each failure says what to do. The "
        "federation's settings come from federation.toml (`fedpath deploy init`); options override them. "
        "Exit status 1 when a check fails.",
    )
    check.add_argument("--manifest", required=True, type=Path, help="this site's cohort manifest (CSV)")
    check.add_argument("--site", default="", help="site name in the manifest (needed if it holds several)")
    check.add_argument("--federation", type=Path, help="the consortium's federation.toml (ca.crt beside it)")
    check.add_argument("--superlink", help="coordinator HOST:PORT (default: from --federation)")
    check.add_argument("--root-certificates", type=Path, help="consortium CA (default: from --federation)")
    check.add_argument("--encoder", help="expected encoder name (default: from --federation)")
    check.add_argument("--weights-sha256", metavar="HEX", help="expected encoder weights SHA-256 (idem)")
    check.add_argument("--auth-key", type=Path, help="this site's private key (SITE.key) to check")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the coordinator")


def supernode_command(args: argparse.Namespace, manifest: Path, site: str) -> list[str]:
    exe = Path(sys.executable).parent / "flower-supernode"
    cmd = [
        str(exe) if exe.exists() else "flower-supernode",
        "--superlink",
        args.superlink,
        "--port",
        str(args.port),
    ]
    cmd += ["--insecure"] if args.insecure else ["--root-certificates", str(args.root_certificates)]
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", str(args.auth_key)]
    node_config = f"manifest={_toml_string(str(manifest))} site={_toml_string(site)}"
    if args.privacy_budget is not None:
        node_config += f" privacy-budget={float(args.privacy_budget)!r}"
    if args.privacy_ledger is not None:
        node_config += f" privacy-ledger={_toml_string(str(args.privacy_ledger.resolve()))}"
    return [*cmd, "--node-config", node_config]


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _run(args: argparse.Namespace) -> int:
    actions = {"start": _start, "privacy": _privacy, "check": _check}
    return actions[args.action](args)


def _site_of(manifest: Path, site: str) -> str:
    """The named site, or the manifest's only site."""
    from fedpath.client.site import SiteConfigError, choose_site
    from fedpath.common.manifest import load_manifest

    try:
        return choose_site(load_manifest(manifest, check_files=False), site, how="choose one with --site")
    except SiteConfigError as err:
        raise UserError(str(err)) from err


def _privacy(args: argparse.Namespace) -> int:
    import json

    from fedpath.client.privacy import PrivacyError, PrivacyLedger, default_ledger_path, format_ledger
    from fedpath.common.manifest import ManifestError

    try:
        if args.ledger is not None:
            path = args.ledger
            if not path.exists():
                raise UserError(f"{path}: no such ledger")
            site = str(json.loads(path.read_text()).get("site", ""))
        else:
            site = _site_of(args.manifest.resolve(), args.site)
            path = default_ledger_path(args.manifest, site)
            if not path.exists():
                print(f"site '{site}' has spent no privacy yet (no ledger at {path})")
                return 0
        ledger = PrivacyLedger(path, site=site, delta=0.0)
    except (PrivacyError, ManifestError, json.JSONDecodeError) as err:
        raise UserError(str(err)) from err
    print(format_ledger(ledger))
    return 0


def _check(args: argparse.Namespace) -> int:
    from fedpath.client.preflight import run_checks
    from fedpath.common.consortium import ConsortiumFileError, ca_certificate_path, load_federation

    superlink, ca_file, encoder, weights = (
        args.superlink,
        args.root_certificates,
        args.encoder,
        args.weights_sha256,
    )
    if args.federation is not None:
        try:
            federation = load_federation(args.federation)
        except ConsortiumFileError as err:
            raise UserError(str(err)) from err
        superlink = superlink or federation.superlink
        ca_file = ca_file or ca_certificate_path(args.federation, federation)
        encoder = federation.encoder if encoder is None else encoder
        weights = federation.weights_sha256 if weights is None else weights
    if not superlink:
        raise UserError("give --federation federation.toml or --superlink HOST:PORT")
    results = run_checks(
        args.manifest.resolve(),
        args.site,
        superlink=superlink,
        ca_file=ca_file,
        encoder=encoder or "",
        weights_sha256=weights or "",
        auth_key=args.auth_key,
        timeout=args.timeout,
    )
    for result in results:
        print(result.render())
    failed = [r.name for r in results if r.ok is False]
    if failed:
        print(
            f"site check: {len(failed)} problem(s) ({', '.join(failed)}); fix them before `fedpath site start`"
        )
        return 1
    print(f"site check: ready to join {superlink}")
    return 0


def _start(args: argparse.Namespace) -> int:
    from fedpath.client.site import SiteConfigError, SiteRef, load_site
    from fedpath.common.features import FeatureFileError
    from fedpath.common.manifest import ManifestError
    from fedpath.common.runconfig import RunConfig

    manifest = args.manifest.resolve()
    try:
        site = _site_of(manifest, args.site)
        data = load_site(SiteRef(manifest, site), RunConfig())
    except (ManifestError, SiteConfigError, FeatureFileError) as err:
        raise UserError(str(err)) from err
    if (
        shutil.which("flower-supernode") is None
        and not (Path(sys.executable).parent / "flower-supernode").exists()
    ):
        raise UserError("flower-supernode not found: install fedpath with its dependencies (flwr)")
    print(
        f"site {site}: {len(data.train)} training and {len(data.val)} validation patients, "
        f"{data.in_dim}-dimensional features ({manifest})"
    )
    cmd = supernode_command(args, manifest, site)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if args.flwr_home:
        env["FLWR_HOME"] = str(args.flwr_home.resolve())
    print("running:", shlex.join(cmd), flush=True)
    process = subprocess.Popen(cmd, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait(30)
        print(f"site {site}: node stopped")
        return 130


COMMAND = Command(
    name="site",
    help="run this hospital's node of a federation (wraps flower-supernode)",
    description="Commands for a hospital taking part in a federation.",
    add_arguments=_add_arguments,
    run=_run,
)
