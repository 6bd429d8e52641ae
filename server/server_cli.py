"""`fedpath server start` (the coordinator's SuperLink) and `fedpath run` (submit a FedProx run to it).

Both wrap Flower's own commands with fedpath's defaults; the native equivalents are printed and documented:

    flower-superlink --host 0.0.0.0 --port 8000 --disable-runtime-dependency-installation \\
        --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key --database state.db
    flwr run APP_DIR CONNECTION   (APP_DIR: a pyproject.toml whose [tool.flwr.app.config] is the run config)
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from fedpath.common.cli import Command, UserError
from fedpath.common.manifest_cli import add_class_options, declared_classes


def _add_server_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = sub.add_parser(
        "start",
        help="run the coordinator's SuperLink (wraps flower-superlink)",
        description="Run Flower's SuperLink in the foreground with fedpath's defaults: runtime dependency "
        "installation off, a state database so runs and registrations survive a restart, and TLS unless "
        "--insecure.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    start.add_argument(
        "--host", default="127.0.0.1", help="interface of the sites' address (0.0.0.0 for real sites)"
    )
    start.add_argument("--port", type=int, default=8000, help="the sites' port: Fleet API only (the gateway)")
    start.add_argument(
        "--local-port",
        type=int,
        default=9093,
        help="the SuperLink itself, on 127.0.0.1 only: `fedpath run`, `deploy register`, flwr and the "
        "SuperExec connect here, from the coordinator machine",
    )
    start.add_argument("--database", type=Path, help="SuperLink state file (default: none, state in memory)")
    start.add_argument(
        "--isolation",
        choices=("subprocess", "process"),
        default="subprocess",
        help="process: ServerApps run from a separate flower-superexec (deploy/bin/superexec.sh) and survive "
        "a SuperLink restart",
    )
    start.add_argument(
        "--enable-supernode-auth",
        action="store_true",
        help="admit only sites whose key was registered (`fedpath deploy register`); needs --tls",
    )
    tls = start.add_mutually_exclusive_group(required=True)
    tls.add_argument(
        "--tls", nargs=3, type=Path, metavar=("CA_CRT", "SERVER_PEM", "SERVER_KEY"), help="TLS files"
    )
    tls.add_argument("--insecure", action="store_true", help="plain text, no TLS (tests on one machine only)")
    start.add_argument(
        "--flwr-home", type=Path, help="Flower's folder for apps and logs (default: $FLWR_HOME)"
    )


def _run_server(args: argparse.Namespace) -> int:
    from fedpath.common.processes import flwr_home, start_process, supervise
    from fedpath.server.flower_runtime import superlink_command, wait_healthy
    from fedpath.server.gateway import gateway_command

    home = flwr_home(args.flwr_home)
    log_file = home / "superlink.log"
    if args.enable_supernode_auth and args.insecure:
        raise UserError(
            "--enable-supernode-auth needs TLS: replace --insecure with --tls CA_CRT SERVER_PEM SERVER_KEY"
        )
    missing = [str(p) for p in (args.tls or []) if not p.is_file()]
    if missing:
        raise UserError(
            f"TLS file not found: {', '.join(missing)} (made by `fedpath deploy init`, coordinator/)"
        )
    if args.port == args.local_port:
        raise UserError(f"--port and --local-port must differ (both {args.port})")
    if args.enable_supernode_auth and args.database is None:
        print("note: without --database, site registrations are lost when the SuperLink restarts", flush=True)
    tls = tuple(p.resolve() for p in args.tls) if args.tls else None
    # Flower serves its Control API (submit runs, register keys) on the same socket as the Fleet API and has no
    # login on it: the SuperLink listens on loopback only, the sites reach it through the Fleet-only gateway.
    cmd = superlink_command(
        host="127.0.0.1",
        port=args.local_port,
        simulation=False,
        log_file=log_file,
        database=args.database.resolve() if args.database else None,
        tls=tls,
        supernode_auth=args.enable_supernode_auth,
        isolation=args.isolation,
    )
    gateway = gateway_command(host=args.host, port=args.port, upstream_port=args.local_port, tls=tls)
    home.mkdir(parents=True, exist_ok=True)
    print("running:", shlex.join(cmd), flush=True)
    link = start_process(cmd, home, None)
    try:
        wait_healthy(
            f"127.0.0.1:{args.local_port}", link.process, log_file, root_certificates=tls[0] if tls else None
        )
    except BaseException:
        link.stop()
        raise
    print("running:", shlex.join(gateway), flush=True)
    fleet = start_process(gateway, home, None)
    probe = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    try:
        wait_healthy(
            f"{probe}:{args.port}", fleet.process, log_file, root_certificates=tls[0] if tls else None
        )
    except BaseException:
        fleet.stop()
        link.stop()
        raise
    print(
        f"sites connect to {args.host}:{args.port} (Fleet API only); operator commands on this machine use "
        f"127.0.0.1:{args.local_port}; log in {log_file}; stop with Ctrl-C",
        flush=True,
    )
    if args.isolation == "process":
        print(
            f"ServerApps are started by a separate flower-superexec (deploy/bin/superexec.sh) connected to "
            f"127.0.0.1:{args.local_port}",
            flush=True,
        )
    # A service manager (systemd, docker stop) sends SIGTERM: both processes, and all they started, stop.
    return supervise([link, fleet], say=lambda line: print(f"coordinator: {line}", flush=True))


# The shared training settings (fedpath.common.settings) that `fedpath run` and `simulate` expose; their
# type, default and help come from the field.
SHARED_OPTIONS = ("local_epochs", "local_steps", "standardize", "lr", "batch_size", "max_tiles", "model")
SHARED_DP_OPTIONS = ("dp_clip", "dp_delta", "dp_batch", "dp_budget")
RUN_OPTION_NAMES = {"num_server_rounds": "rounds", "proximal_mu": "mu"}
# the other RunConfig fields that these commands set from an option of the same name
RUN_OPTIONS = ("num_server_rounds", "proximal_mu", "fraction_train", "split_seed", "dp_noise", "dp_epsilon",
               "dp_lr", "central_dp_noise", "central_dp_clip")  # fmt: skip


def add_training_options(p: argparse.ArgumentParser) -> None:
    """Federation and local-training options (`fedpath run`, `fedpath simulate`): type, default and help from
    the fields of RunConfig and of the shared TrainingSettings."""
    from fedpath.common.options import add_model_options
    from fedpath.common.runconfig import RunConfig
    from fedpath.common.settings import TrainingSettings

    g = p.add_argument_group("federation")
    add_model_options(g, RunConfig, ("num_server_rounds", "proximal_mu"), names=RUN_OPTION_NAMES,
                      metavars={"num_server_rounds": "R", "proximal_mu": "MU"})  # fmt: skip
    add_model_options(g, TrainingSettings, SHARED_OPTIONS)
    g.add_argument(
        "--min-sites",
        metavar="N",
        type=int,
        default=None,
        help="sites needed per round (default: all but one)",
    )
    add_model_options(g, RunConfig, ("fraction_train",), helps={"fraction_train": "share of sites asked to "
                      "train per round"})  # fmt: skip
    g.add_argument(
        "--train-seed", metavar="S", type=int, default=0, help="seed of initial weights and local training"
    )
    add_model_options(g, TrainingSettings, ("split_seed",))
    dp = p.add_argument_group("per-patient differential privacy at each site (DP-SGD, Opacus)")
    noise = dp.add_mutually_exclusive_group()
    noise.add_argument("--dp-noise", type=float, default=0.0, metavar="Z", help="noise multiplier σ")
    noise.add_argument(
        "--dp-epsilon",
        type=float,
        default=0.0,
        metavar="E",
        help="target ε per site over the run (σ calibrated)",
    )
    add_model_options(dp, RunConfig, ("dp_lr",), helps={"dp_lr": "lr under DP (SGD, momentum 0.9)"})
    add_model_options(dp, TrainingSettings, SHARED_DP_OPTIONS)
    add_model_options(dp, RunConfig, ("central_dp_noise", "central_dp_clip"), helps={
        "central_dp_noise": "client-level DP noise at the coordinator (see README)",
        "central_dp_clip": "update clipping norm",
    })  # fmt: skip


def run_settings(args: argparse.Namespace, sites: int) -> dict[str, object]:
    """RunConfig fields from the options of `add_training_options` (`sites`: sites expected)."""
    min_sites = args.min_sites if args.min_sites is not None else max(1, sites - 1)
    if not 1 <= min_sites <= sites:
        raise UserError(f"--min-sites {min_sites} must be between 1 and the {sites} sites of the federation")
    return {
        **{field: getattr(args, field) for field in (*RUN_OPTIONS, *SHARED_OPTIONS, *SHARED_DP_OPTIONS)},
        "min_sites": min_sites,
        "seed": args.train_seed,
    }


def check_run_folder(folder: object, run: object) -> None:
    """Refuse to overwrite a run, or to resume one with other settings, before anything starts."""
    from fedpath.common.runconfig import RunConfig
    from fedpath.server.runfolder import RunFolder, RunFolderError

    assert isinstance(folder, RunFolder) and isinstance(run, RunConfig)
    try:
        folder.resumable(run.model_dump(), resume=run.resume, rounds=run.num_server_rounds)
    except RunFolderError as err:
        raise UserError(str(err)) from err


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "%(prog)s --superlink H:P (--root-certificates CA | --insecure) --out DIR --sites K --in-dim D [options]"
    p.add_argument("--superlink", required=True, help="SuperLink address HOST:PORT")
    tls = p.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", type=Path, help="CA certificate that signed the SuperLink's")
    tls.add_argument("--insecure", action="store_true", help="plain text, no TLS (tests on one machine only)")
    p.add_argument(
        "--out", required=True, type=Path, help="run folder on the SuperLink's machine (made absolute)"
    )
    p.add_argument("--sites", required=True, type=int, help="number of sites expected in the federation")
    p.add_argument("--in-dim", required=True, type=int, help="tile feature dimension of the sites' features")
    p.add_argument("--num-classes", metavar="C", type=int, default=2, help="label classes")
    add_class_options(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-wait", action="store_true", help="submit and return; follow with `flwr log`")
    p.add_argument(
        "--signing-key",
        type=Path,
        metavar="KEY",
        help="app-signing key (sites run only signed apps)",
    )
    add_training_options(p)


def run_classes(args: argparse.Namespace) -> tuple[str, ...]:
    """The run's class labels in index order from --classes/--positive (the coordinator sees no labels, so
    --positive needs --classes); () when neither is given: the sites state theirs."""
    classes = declared_classes(args, None)
    if classes and args.num_classes not in (2, len(classes)):  # 2: the default
        raise UserError(f"--classes names {len(classes)} classes but --num-classes says {args.num_classes}")
    if classes is not None and len(classes) < 2:
        raise UserError(f"--classes {args.classes}: a task needs at least 2 classes")
    return classes or ()


def _run_run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from fedpath.common.runconfig import RunConfig
    from fedpath.server import flower_runtime as fr
    from fedpath.server.runfolder import RunFolder

    started_at = time.time()
    out: Path = args.out.resolve()
    classes = run_classes(args)
    try:
        run = RunConfig(
            in_dim=args.in_dim,
            num_classes=len(classes) if classes else args.num_classes,
            classes=",".join(classes),
            run_dir=str(out),
            resume=args.resume,
            **run_settings(args, args.sites),
        )
    except ValidationError as err:
        raise UserError(f"invalid settings: {err}") from err
    folder = RunFolder(out)
    check_run_folder(folder, run)
    # The flwr CLI keeps its connection list in $FLWR_HOME; a private one keeps the user's untouched.
    cli_home = out / "flwr-cli"
    app = fr.write_app(out / "app", run)
    if args.signing_key is not None:
        from fedpath.common.appsign import AppSignatureError, sign_app

        try:
            signer = sign_app(app, args.signing_key)
        except AppSignatureError as err:
            raise UserError(str(err)) from err
        print(f"app signed with {signer} ({args.signing_key})")
    else:
        print(
            "note: unsigned app (no --signing-key): sites that enforce the consortium's signature refuse it"
        )
    fr.write_connection(cli_home, args.superlink, root_certificates=args.root_certificates)
    try:
        run_id = fr.submit_run(app, cli_home)
    except fr.FlowerRuntimeError as err:
        raise UserError(str(err)) from err
    print(
        f"run {run_id} submitted to {args.superlink}: FedProx μ={run.proximal_mu}, {run.num_server_rounds} rounds"
    )
    print(f"native equivalent: FLWR_HOME={cli_home} flwr run {app} {fr.CONNECTION} --stream")
    if args.no_wait:
        print(f"follow it with: FLWR_HOME={cli_home} flwr log {run_id} {fr.CONNECTION}")
        return 0
    status = fr.follow_run(run_id, cli_home, folder, run.num_server_rounds, print, started_at=started_at)
    (out / "server.log").write_text(fr.run_logs(run_id, cli_home))
    untrained = folder.no_training(since=started_at)
    if untrained:
        raise UserError(f"run {run_id}: {untrained}; no model was written (see {out / 'model_card.md'})")
    if status != "finished:completed":
        raise UserError(f"run {run_id} ended as '{status}'; see {out / 'server.log'}")
    print(f"run {run_id} completed; outputs in {out}/ (model.pt, model_card.md, rounds.jsonl, checkpoints/)")
    return 0


SERVER_COMMAND = Command(
    name="server",
    help="coordinator: run the federation's SuperLink (wraps flower-superlink)",
    description="Commands for the federation's coordinator.",
    add_arguments=_add_server_arguments,
    run=_run_server,
)


RUN_COMMAND = Command(
    name="run",
    help="coordinator: submit a FedProx run to the SuperLink and follow it (wraps flwr run)",
    description="Submit fedpath's FedProx federation to a running SuperLink (`fedpath server start`) and wait "
    "for it, printing each finished round. Checkpoints, round log, final model and model card go to --out on "
    "the SuperLink's machine.",
    add_arguments=_add_run_arguments,
    run=_run_run,
)
