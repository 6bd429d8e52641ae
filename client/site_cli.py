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
from pathlib import Path

from fedpath.client.policy import add_policy_options
from fedpath.common.cli import Command, UserError

# One rule for where the ledger is (fedpath.client.privacy.ledger_path), the same option in every command.
LEDGER_HELP = "privacy ledger (default .fedpath-privacy/SITE.json by the manifest; same in every command)"


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
    trust = start.add_mutually_exclusive_group(required=True)
    trust.add_argument(
        "--federation",
        type=Path,
        help="the consortium's federation.toml: only apps signed by its app-signers run at this site",
    )
    trust.add_argument(
        "--allow-unsigned-apps",
        action="store_true",
        help="run any app the coordinator sends (a test federation on one machine only)",
    )
    start.add_argument(
        "--flwr-home", type=Path, help="Flower's folder for installed apps (default: $FLWR_HOME)"
    )
    start.add_argument("--privacy-ledger", type=Path, metavar="FILE", help=LEDGER_HELP)
    add_policy_options(start)
    privacy = sub.add_parser(
        "privacy",
        help="print this site's privacy ledger (ε spent per round, cumulative)",
        description="Print the site's differential-privacy ledger: every round trained under DP-SGD with its "
        "noise, sampling rate, steps and the cumulative ε (RDP accountant, patient-level, at the ledger's δ).",
    )
    privacy.add_argument("--manifest", type=Path, help="the site's manifest (as given to `site start`)")
    privacy.add_argument("--site", default="", help="site name (with --manifest, if it holds several)")
    privacy.add_argument("--privacy-ledger", "--ledger", type=Path, metavar="FILE", help=LEDGER_HELP)
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
    check.add_argument("--privacy-ledger", type=Path, metavar="FILE", help=LEDGER_HELP)


def supernode_command(args: argparse.Namespace, manifest: Path, site: str) -> list[str]:
    from fedpath.common.processes import executable

    cmd = [
        executable("flower-supernode"),
        "--superlink",
        args.superlink,
        "--port",
        str(args.port),
    ]
    cmd += ["--insecure"] if args.insecure else ["--root-certificates", str(args.root_certificates)]
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", str(args.auth_key)]
    return [*cmd, "--node-config", site_node_config(args, manifest, site)]


def site_node_config(args: argparse.Namespace, manifest: Path, site: str) -> str:
    """The node config of `site start`: manifest, site, the ledger's path (always, resolved here by the one
    rule so that the ClientApp writes where `site privacy` looks) and the site policy. Stops (UserError) on an
    invalid policy or a ledger that is missing or altered: the node must not join with it."""
    from fedpath.client.policy import PolicyError, policy_from_args
    from fedpath.client.privacy import LEDGER_KEY, PrivacyError, PrivacyLedger, ledger_path

    try:
        policy = policy_from_args(args)
        path = ledger_path(site, explicit=args.privacy_ledger, manifest=manifest)
        PrivacyLedger(path, site=site, delta=0.0)  # verifies the chain and the anchor
        path.parent.mkdir(parents=True, exist_ok=True)
    except (PolicyError, PrivacyError) as err:
        raise UserError(str(err)) from err
    except OSError as err:
        raise UserError(f"{path.parent}: cannot create the privacy ledger's folder ({err})") from err
    if not os.access(path.parent, os.W_OK):
        raise UserError(
            f"{path.parent}: not writable, but every round is recorded in the privacy ledger there; give "
            "--privacy-ledger FILE in a folder this account can write (e.g. the site's state folder)"
        )
    items = [f"manifest={_toml_string(str(manifest))}", f"site={_toml_string(site)}"]
    items += [f"{LEDGER_KEY}={_toml_string(str(path))}", *policy.to_node_config()]
    return " ".join(items)


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

    from fedpath.client.privacy import PrivacyError, PrivacyLedger, format_ledger, ledger_path
    from fedpath.common.manifest import ManifestError

    if args.manifest is None and args.privacy_ledger is None:
        raise UserError("give the site's --manifest, or --privacy-ledger FILE (as given to `site start`)")
    try:
        if args.manifest is not None:
            site = _site_of(args.manifest.resolve(), args.site)
        else:
            site = str(json.loads(args.privacy_ledger.read_text()).get("site", ""))
        path = ledger_path(site, explicit=args.privacy_ledger, manifest=args.manifest)
        ledger = PrivacyLedger(path, site=site, delta=0.0)  # verifies the chain; a missing one with an anchor
    except FileNotFoundError as err:
        raise UserError(f"{args.privacy_ledger}: no such ledger") from err
    except (PrivacyError, ManifestError, json.JSONDecodeError) as err:
        raise UserError(str(err)) from err
    if not ledger.entries:
        print(
            f"no privacy ledger of site '{site}' at {path}: nothing recorded there. If the site was started "
            "with --privacy-ledger (deploy/bin/site.sh: $FEDPATH_STATE/privacy/SITE.json), pass the same option"
        )
        return 0
    print(format_ledger(ledger))
    return 0


def _check(args: argparse.Namespace) -> int:
    from fedpath.client.preflight import run_checks
    from fedpath.common.consortium import ConsortiumFileError, ca_certificate_path, load_federation

    signers: list[str] | None = None
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
        signers = federation.app_signers
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
        privacy_ledger=args.privacy_ledger,
        app_signers=signers,
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
    from fedpath.client.trusted_apps import (
        TRUST_ENV,
        UNSIGNED_ENV,
        AppRefused,
        install_launcher,
        signers_from_environment,
    )
    from fedpath.common.cohortcheck import precheck
    from fedpath.common.features import FeatureFileError
    from fedpath.common.manifest import ManifestError, load_manifest
    from fedpath.common.processes import (
        FlowerRuntimeError,
        flower_env,
        flwr_home,
        start_process,
        supervise,
    )
    from fedpath.common.runconfig import RunConfig

    manifest = args.manifest.resolve()
    try:
        site = _site_of(manifest, args.site)
        data = load_site(SiteRef(manifest, site), RunConfig())
        # the cheap part of `manifest check --deep` (headers, paths), here, before Flower starts
        problems = precheck(load_manifest(manifest).for_site(site))
    except (ManifestError, SiteConfigError, FeatureFileError) as err:
        raise UserError(str(err)) from err
    if problems:
        raise UserError(problems)
    trust = {UNSIGNED_ENV: "1"} if args.allow_unsigned_apps else {TRUST_ENV: str(args.federation.resolve())}
    try:
        signers = signers_from_environment(trust)
        cmd = supernode_command(args, manifest, site)
    except (AppRefused, FlowerRuntimeError) as err:
        raise UserError(str(err)) from err
    print(
        f"site {site}: {len(data.train)} training and {len(data.val)} validation patients, "
        f"{data.in_dim}-dimensional features ({manifest})"
    )
    if signers is None:
        print(f"site {site}: WARNING: --allow-unsigned-apps: this node runs any app the coordinator sends")
    else:
        print(f"site {site}: runs only apps signed by {', '.join(sorted(signers))} ({args.federation})")
    home = flwr_home(args.flwr_home)
    # The node starts its ClientApps as `flwr-clientapp` from PATH: the site's launcher checks the signature.
    launcher = install_launcher(home / "fedpath-bin")
    print("running:", shlex.join(cmd), flush=True)
    env = flower_env(home) | trust
    env["PATH"] = os.pathsep.join([str(launcher.parent), env["PATH"]])
    node = start_process(cmd, home, None, env=env)  # its log goes to this terminal / the journal
    code = supervise([node], say=lambda line: print(f"site {site}: {line}", flush=True))
    print(f"site {site}: node stopped")
    return code


COMMAND = Command(
    name="site",
    help="run this hospital's node of a federation (wraps flower-supernode)",
    description="Commands for a hospital taking part in a federation.",
    add_arguments=_add_arguments,
    run=_run,
)
