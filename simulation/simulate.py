"""A local federation on Flower's simulation engine: one simulated site per manifest site.

The same ServerApp and ClientApp as in deployment run here; only the engine differs: a SuperLink in
simulation mode (plain text on loopback, runtime dependency installation off) and a Ray head node, started
for one run with ``FLWR_HOME`` inside the run folder, or once for a grid of runs (`SimulationEngine`), and
stopped with everything they started when the run or the grid ends.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedpath.common.bags import feature_dim
from fedpath.common.features import FeatureFileError
from fedpath.common.manifest import load_manifest
from fedpath.common.processes import FlowerProcess, simulation_env
from fedpath.common.runconfig import RunConfig
from fedpath.server import flower_runtime as fr
from fedpath.server.runfolder import RunFolder


class SimulationError(RuntimeError):
    """The simulated run failed; the message names the log to read."""


@dataclass(frozen=True)
class SimulationResult:
    run_dir: Path
    status: str
    seconds: float  # wall time of the run (with a private engine, its start and stop included)
    started_at: float  # time.time() when the simulation began
    rounds: list[dict[str, Any]]
    overhead: float = 0.0  # seconds of this run that were not its rounds (Flower start-up and shutdown)


def federation_config(
    manifest: str | Path, *, run_dir: Path, classes: Sequence[str] | None = None, **settings: Any
) -> RunConfig:
    """The run config of a simulated federation over the sites of `manifest` (model shape read from it);
    `classes`: their declared order (--classes, --positive), else the labels found, sorted."""
    m = load_manifest(manifest, classes=classes)
    try:
        in_dim = feature_dim(m)
    except FeatureFileError as err:
        raise SimulationError(str(err)) from err
    return RunConfig(
        in_dim=in_dim,
        num_classes=m.num_classes,
        classes=",".join(m.classes),
        manifest=str(Path(manifest).resolve()),
        run_dir=str(run_dir.resolve()),
        **settings,
    )


class SimulationEngine:
    """Flower's simulation engine, started once for several runs: a SuperLink in simulation mode and a Ray
    head node that every run's simulation process attaches to, so a run after the first pays neither start.

    Each run is still a separate Flower run (`flwr run`): its own ServerApp process, ClientApp actors and
    run config, exactly as with a private engine. A run is done for `simulate` once its ServerApp has written
    the model card; Flower's teardown of it (about 2.5 s) then goes on while the next run starts, and
    `settle` collects its final status and full log (`problems` lists a run that did not end as completed).
    With ``RAY_ADDRESS`` set (the user's own Ray cluster, as
    Ray documents it, or the test suite's), runs attach to that cluster and no head is started. Use it as a
    context manager (fedpath's commands turn SIGTERM into an exception, so leaving it stops the engine).
    """

    def __init__(self, home: Path, *, cpus: int | None = None) -> None:
        self.home = home.resolve()  # FLWR_HOME of the SuperLink and the `flwr` commands, and their logs
        self.cpus = cpus  # CPU cores the Ray head offers (default: all)
        self.link: FlowerProcess | None = None
        self.ray: FlowerProcess | None = None
        self.ray_address = os.environ.get("RAY_ADDRESS", "")
        self.runs = 0
        self.start_seconds = 0.0  # how long the last start took (SuperLink and Ray head)
        self._ray_temp: Path | None = None
        self.pending: list[tuple[int, Path]] = []  # (run id, its server.log): runs still in Flower's teardown
        self.problems: list[str] = []  # runs that did not end as completed after their model card
        self._told = 0  # problems already handed to a caller of `settle`

    def settle(self, *, wait: bool = True, timeout: float = 300.0) -> list[str]:
        """Collect the runs that `simulate` returned at their model card: each one's final status and its full
        log (into its server.log), once Flower has ended it; `wait`: until every one has (else only those
        ended already). Returns, and keeps in `problems`, a line for each run that did not end as completed:
        its model and card were written, so it is said, not hidden."""
        self._settle(wait=wait, timeout=timeout)
        self._told = len(self.problems)
        return self.problems

    def _settle(self, *, wait: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.pending:
            still = []
            for run_id, log_path in self.pending:
                try:
                    status = fr.run_status(run_id, self.home)
                    ended = status.startswith("finished")
                    if ended:
                        log_path.write_text(fr.run_logs(run_id, self.home))
                except fr.FlowerRuntimeError:  # Flower's answer about it failed this time: asked again later
                    ended = False
                if not ended:
                    still.append((run_id, log_path))
                    continue
                if status != "finished:completed":
                    self.problems.append(
                        f"run {run_id} ended as '{status}' after writing its model and card (those are "
                        f"complete; its cells stand); see {log_path}"
                    )
            self.pending = still
            if not wait or not still:
                break
            if time.monotonic() > deadline:
                self.problems += [
                    f"run {r} had not ended {timeout:.0f} s after its model card" for r, _ in still
                ]
                self.pending = []
                break
            time.sleep(0.5)

    def start(self) -> SimulationEngine:
        if self.link is not None:
            return self
        self.home.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            if not self.ray_address:
                # Ray's session files under a short private folder (its socket paths must stay short)
                self._ray_temp = Path(tempfile.mkdtemp(prefix="fedpath-ray-"))
                self.ray = fr.start_ray_head(self.home, self._ray_temp, cpus=self.cpus)
                self.ray_address = self.ray.address
            env = {**simulation_env(self.home), "RAY_ADDRESS": self.ray_address}
            self.link = fr.start_superlink(self.home, simulation=True, env=env)
            fr.write_connection(self.home, self.link.address)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        """Stop the SuperLink and the Ray head with every process they started."""
        if self.link is not None:
            self.link.stop()
        if self.ray is not None:
            agents = fr.ray_agents(self.ray)
            self.ray.stop(grace=1.0)  # a Ray cluster of this engine holds nothing worth a graceful end
            fr.stop_ray_agents(agents)
        if self.ray is not None:
            self.ray_address = ""
        self.link = self.ray = None
        if self._ray_temp is not None:
            shutil.rmtree(self._ray_temp, ignore_errors=True)
            self._ray_temp = None

    def __enter__(self) -> SimulationEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None and self.pending and self.link is not None:
                self._settle(wait=True, timeout=60.0)  # leaving normally: the last runs end before the engine
            for problem in self.problems[self._told :]:  # nobody asked `settle`: said here, not lost
                print(f"WARNING: {problem}", file=sys.stderr)
        finally:
            self.stop()


def simulate(
    run: RunConfig,
    *,
    sites: int,
    cpus_per_site: int = 1,
    engine: SimulationEngine | None = None,
    app_dir: Path | None = None,
    extra_files: dict[str, str] | None = None,
    clientapp: str = fr.CLIENTAPP,
    timeout: float = 24 * 3600,
    progress: Callable[[str], None] | None = print,
    _wait_for_teardown: bool = False,
) -> SimulationResult:
    """Run the federation `run` on the simulation engine with `sites` simulated nodes; wait for it.

    `engine` is a started `SimulationEngine` shared with other runs (the run is done once its model card is
    written: see `SimulationEngine.settle`); without one, a private engine is started in the run folder and
    stopped afterwards. `clientapp`/`extra_files` replace the ClientApp (tests
    use this for a misbehaving site). Raises `SimulationError` when the run fails, and when no round
    aggregated a training update (the message names each site's reply codes, as the model card does).
    """
    if engine is None:
        t0 = time.perf_counter()
        try:
            with SimulationEngine(Path(run.run_dir) / "flwr") as own:
                result = simulate(
                    run, sites=sites, cpus_per_site=cpus_per_site, engine=own, app_dir=app_dir,
                    extra_files=extra_files, clientapp=clientapp, timeout=timeout, progress=progress,
                    _wait_for_teardown=True,
                )  # fmt: skip
        except fr.FlowerRuntimeError as err:
            raise SimulationError(str(err)) from err
        total = time.perf_counter() - t0  # the private engine's start and stop belong to this run
        return replace(result, seconds=total, overhead=result.overhead + total - result.seconds)
    if engine.link is None:
        raise SimulationError("the simulation engine is not started (use it in a `with` block)")
    say = progress or (lambda _: None)
    started_at, t0 = time.time(), time.perf_counter()
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = engine.home
    app = fr.write_app(app_dir or run_dir / "app", run, clientapp=clientapp, extra_files=extra_files)
    folder = RunFolder(run_dir)
    rounds_before = len(folder.read_rounds())
    try:
        run_id = fr.submit_run(
            app,
            flwr_home,
            federation_config=f"num-supernodes={sites} client-resources-num-cpus={cpus_per_site}",
        )
    except fr.FlowerRuntimeError as err:
        raise SimulationError(str(err)) from err
    engine.runs += 1
    engine._settle(wait=False, timeout=0.0)  # earlier runs whose teardown ended meanwhile
    say(
        f"simulation: run {run_id} on a local SuperLink ({engine.link.address}), {sites} sites; "
        f"logs in {flwr_home}"
    )
    status = fr.follow_run(
        run_id, flwr_home, folder, run.num_server_rounds, say, started_at=started_at, timeout=timeout,
        until_card=not _wait_for_teardown,
    )  # fmt: skip
    untrained = folder.no_training(since=started_at)
    if status == fr.CARD_WRITTEN and untrained:  # it fails: its end and whole log come with the error
        status = fr.follow_run(
            run_id, flwr_home, folder, run.num_server_rounds, say, started_at=started_at, timeout=timeout
        )
    log_path = run_dir / "server.log"
    log_path.write_text(fr.run_logs(run_id, flwr_home))  # with the run still ending: `settle` rewrites it
    if status == fr.CARD_WRITTEN:
        engine.pending.append((run_id, log_path))
        status = "finished:completed"  # as far as its outputs go; Flower's final word is `settle`'s
    seconds = time.perf_counter() - t0
    if untrained:
        raise SimulationError(f"run {run_id}: {untrained}; see {folder.card_md} and {log_path}")
    if status != "finished:completed":
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise SimulationError(f"run {run_id} ended as '{status}'; see {log_path}:\n{tail}")
    rounds = folder.read_rounds()
    training = sum(float(r.get("seconds") or 0.0) for r in rounds[rounds_before:])
    return SimulationResult(run_dir, status, seconds, started_at, rounds, max(0.0, seconds - training))


def sites_that_never_trained(rounds: list[dict[str, Any]], sites: int) -> dict[str, str]:
    """Sites whose training update went into no round, with the reason of their last round; a site that never
    replied at all shows as 'never replied' (the round log names only sites that did). Empty: every site
    trained at least once."""
    trained = {s for line in rounds for s, e in line["sites"].items() if e["status"] == "ok" and e["train"]}
    last: dict[str, str] = {}
    for line in rounds:
        for site, entry in line["sites"].items():
            if site not in trained:
                last[site] = entry.get("reason") or entry["status"]
    missing = sites - len(trained) - len(last)
    if missing > 0:
        last[f"{missing} more site(s)"] = "never replied"
    return last


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

    m = load_manifest(manifest, classes=run.class_labels if run.classes else None)
    splits = split_patients(m, val=run.val_fraction, test=run.test_fraction, seed=run.split_seed)
    rows = []
    for site in m.sites:
        _, labels, probs = predict_patients(model, m.for_patients(splits[site].test))
        if not len(labels):
            rows.append(HeldOut(site, 0, 0, float("nan")))
            continue
        rows.append(HeldOut(site, len(labels), int((labels == 1).sum()), auroc(labels, probs)))
    return rows
