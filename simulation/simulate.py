"""A local federation on Flower's simulation engine: one simulated site per manifest site.

The same ServerApp and ClientApp as in deployment run here; only the engine differs. A private SuperLink
(simulation mode, plain text on loopback, runtime dependency installation off) is started for the run with
``FLWR_HOME`` inside the run folder, and stopped with everything it started when the run ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpath.common.bags import feature_dim
from fedpath.common.features import FeatureFileError
from fedpath.common.manifest import load_manifest
from fedpath.common.runconfig import RunConfig
from fedpath.server import flower_runtime as fr
from fedpath.server.runfolder import RunFolder


class SimulationError(RuntimeError):
    """The simulated run failed; the message names the log to read."""


@dataclass(frozen=True)
class SimulationResult:
    run_dir: Path
    status: str
    seconds: float  # wall time of the whole simulation, SuperLink start to stop
    started_at: float  # time.time() when the simulation began
    rounds: list[dict[str, Any]]


def federation_config(manifest: str | Path, *, run_dir: Path, **settings: Any) -> RunConfig:
    """The run config of a simulated federation over the sites of `manifest` (model shape read from it)."""
    m = load_manifest(manifest)
    try:
        in_dim = feature_dim(m)
    except FeatureFileError as err:
        raise SimulationError(str(err)) from err
    return RunConfig(
        in_dim=in_dim,
        num_classes=m.num_classes,
        manifest=str(Path(manifest).resolve()),
        run_dir=str(run_dir.resolve()),
        **settings,
    )


def simulate(
    run: RunConfig,
    *,
    sites: int,
    cpus_per_site: int = 1,
    app_dir: Path | None = None,
    extra_files: dict[str, str] | None = None,
    clientapp: str = fr.CLIENTAPP,
    timeout: float = 24 * 3600,
    progress: Callable[[str], None] | None = print,
) -> SimulationResult:
    """Run the federation `run` on the simulation engine with `sites` simulated nodes; wait for it.

    `clientapp`/`extra_files` replace the ClientApp (tests use this for a misbehaving site). Raises
    `SimulationError` when the run fails, and when no round aggregated a training update (the message names
    each site's reply codes, as the model card does).
    """
    say = progress or (lambda _: None)
    started_at, t0 = time.time(), time.perf_counter()
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = run_dir / "flwr"
    app = fr.write_app(app_dir or run_dir / "app", run, clientapp=clientapp, extra_files=extra_files)
    folder = RunFolder(run_dir)
    link = fr.start_superlink(flwr_home, simulation=True)
    try:
        fr.write_connection(flwr_home, link.address)
        try:
            run_id = fr.submit_run(
                app,
                flwr_home,
                federation_config=f"num-supernodes={sites} client-resources-num-cpus={cpus_per_site}",
            )
        except fr.FlowerRuntimeError as err:
            raise SimulationError(str(err)) from err
        say(
            f"simulation: run {run_id} on a local SuperLink ({link.address}), {sites} sites; logs in {flwr_home}"
        )
        status = fr.follow_run(
            run_id, flwr_home, folder, run.num_server_rounds, say, started_at=started_at, timeout=timeout
        )
        log_path = run_dir / "server.log"
        log_path.write_text(fr.run_logs(run_id, flwr_home))
    finally:
        link.stop()
    seconds = time.perf_counter() - t0
    untrained = folder.no_training(since=started_at)
    if untrained:
        raise SimulationError(f"run {run_id}: {untrained}; see {folder.card_md} and {log_path}")
    if status != "finished:completed":
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise SimulationError(f"run {run_id} ended as '{status}'; see {log_path}:\n{tail}")
    return SimulationResult(run_dir, status, seconds, started_at, folder.read_rounds())


@dataclass(frozen=True)
class HeldOut:
    """A model's result on one site's held-out test patients (patient level)."""

    site: str
    patients: int
    positives: int
    auroc: float


def held_out_auroc(model: Any, manifest: str | Path, run: RunConfig) -> list[HeldOut]:
    """AUROC of `model` on each site's test patients, with the split every engine uses."""
    from fedpath.client.training import predict_patients
    from fedpath.common.manifest import split_patients
    from fedpath.common.metrics import auroc

    m = load_manifest(manifest)
    splits = split_patients(m, val=run.val_fraction, test=run.test_fraction, seed=run.split_seed)
    rows = []
    for site in m.sites:
        _, labels, probs = predict_patients(model, m.for_patients(splits[site].test))
        if not len(labels):
            rows.append(HeldOut(site, 0, 0, float("nan")))
            continue
        rows.append(HeldOut(site, len(labels), int((labels == 1).sum()), auroc(labels, probs)))
    return rows
