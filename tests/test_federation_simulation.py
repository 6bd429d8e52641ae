"""FedProx on Flower's simulation engine (real SuperLink, real Ray workers): resume, guard, site shift."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpath.client.training import TrainConfig, train_epochs
from fedpath.common.bags import bags_from_manifest
from fedpath.common.calibration import TEMPERATURES
from fedpath.common.manifest import load_manifest, split_patients
from fedpath.common.processes import _marked_pids
from fedpath.common.runconfig import RunConfig
from fedpath.server.federation import initial_weights
from fedpath.server.runfolder import RunFolder, load_checkpoint, load_model
from fedpath.simulation.simulate import SimulationEngine, SimulationResult, federation_config, simulate
from tests.federation_helpers import held_out_by_site, make_cohort, mean_auroc

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_ray")]

ROUNDS = 3
SETTINGS = {"local_epochs": 2, "lr": 5e-3, "proximal_mu": 0.01, "min_sites": 2, "seed": 7}


@pytest.fixture(autouse=True)
def federation_flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


@pytest.fixture(scope="module")
def federation_shift_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three sites with a strong per-site feature shift."""
    return make_cohort(tmp_path_factory.mktemp("shift"), sites=3, slides=90, shift=2.0)


@pytest.fixture(scope="module")
def federation_full_run(
    federation_shift_cohort: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimulationResult]:
    run = federation_config(
        federation_shift_cohort, run_dir=tmp_path_factory.mktemp("full"), num_server_rounds=ROUNDS, **SETTINGS
    )
    yield simulate(run, sites=3, progress=None)


def test_uninterrupted_run_writes_checkpoints_log_model_and_card(
    federation_full_run: SimulationResult, federation_shift_cohort: Path
) -> None:
    folder = RunFolder(federation_full_run.run_dir)
    assert folder.checkpoint_rounds() == [1, 2, 3]
    lines = folder.read_rounds()
    assert [line["round"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert sorted(line["sites"]) == ["site-A", "site-B", "site-C"]
        assert all(s["status"] == "ok" and s["train"]["patients"] > 0 for s in line["sites"].values())
        assert line["seconds"] > 0 and line["bytes_received"] > 0
    card = folder.card_md.read_text()
    assert "site-A, site-B, site-C" in card and "FedProx" in card
    # model.pt holds the weights of the round with the lowest aggregate validation loss, not the last round's
    losses = {line["round"]: line["aggregate"]["evaluate"]["loss"] for line in lines}
    best = min(losses, key=lambda r: (losses[r], r))
    _, final = load_model(folder.model)
    assert final.round == best, (losses, final.round)
    saved = load_checkpoint(folder.checkpoint_path(best)).state_dict
    for name, tensor in saved.items():
        torch.testing.assert_close(final.state_dict[name], tensor)
    assert f"round {best} of {ROUNDS}: lowest validation loss" in card
    # what the sites' features state they were made with travels into the model (for `fedpath predict`)
    assert final.features["encoder"] == "synthetic" and final.features["weights_sha256"] == "synthetic"
    assert final.features["sites_agree"] is True and "features: encoder `synthetic`" in card
    assert all(line["sites"]["site-A"]["features"]["encoder"] == "synthetic" for line in lines)
    # and the class labels, in index order, are the run's (a site with other labels is refused)
    assert final.config["classes"] == ",".join(load_manifest(federation_shift_cohort).classes) != ""
    # the calibration the sites agreed on from their validation patients' aggregates (common/calibration.py)
    manifest = load_manifest(federation_shift_cohort)
    run = RunConfig(**final.config)
    splits = split_patients(manifest, val=run.val_fraction, test=run.test_fraction, seed=run.split_seed)
    cal = final.calibration
    assert cal["patients"] == sum(len(splits[s].val) for s in manifest.sites)
    assert cal["sites"] == ["site-A", "site-B", "site-C"] and sum(cal["histogram"]) == cal["patients"]
    assert cal["temperature"] in TEMPERATURES.tolist() and 0 < cal["threshold"] <= 1
    assert cal["nll_after"] <= cal["nll_before"] + 1e-12
    assert "calibration: temperature" in card


def test_resumed_run_equals_uninterrupted_run(
    federation_shift_cohort: Path,
    federation_full_run: SimulationResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Also the warm engine of a grid: both runs on one SuperLink and one Ray head of the engine's own, which
    is gone with everything it started when the engine stops."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_dir = tmp_path / "interrupted"
    first = federation_config(federation_shift_cohort, run_dir=run_dir, num_server_rounds=1, **SETTINGS)
    resumed = federation_config(
        federation_shift_cohort, run_dir=run_dir, num_server_rounds=ROUNDS, resume=True, **SETTINGS
    )
    with SimulationEngine(tmp_path / "engine") as engine:
        address = engine.ray_address
        assert engine.ray is not None and engine._ray_temp is not None
        markers, ray_temp = [engine.ray.marker, engine.link.marker], engine._ray_temp  # type: ignore[union-attr]
        simulate(first, sites=3, engine=engine, progress=None)  # the coordinator stops after round 1
        assert RunFolder(run_dir).checkpoint_rounds() == [1]
        simulate(resumed, sites=3, engine=engine, progress=None)
        assert engine.ray_address == address and engine.runs == 2
        # a run is done for a grid at its model card; its end, checked after, was clean, and its whole log
        # (the ServerApp's last line comes after the card) replaces the one written at the card
        assert engine.settle() == [] and engine.pending == []
        assert "final model:" in (run_dir / "server.log").read_text()
        drivers = list((ray_temp / "session_latest" / "logs").glob("python-core-driver-*.log"))
        assert len(drivers) == 2, drivers  # each run's simulation process attached to the engine's Ray head
    assert all(_marked_pids(m) == [] for m in markers) and not ray_temp.exists()

    folder = RunFolder(run_dir)
    assert folder.checkpoint_rounds() == [1, 2, 3]
    assert [line["round"] for line in folder.read_rounds()] == [1, 2, 3]
    _, got = load_model(folder.model)
    _, want = load_model(RunFolder(federation_full_run.run_dir).model)
    assert got.state_dict.keys() == want.state_dict.keys()
    for name in want.state_dict:
        torch.testing.assert_close(got.state_dict[name], want.state_dict[name], rtol=1e-5, atol=1e-6)
    # and training did move the weights (the equality above is not two untouched initialisations)
    start = initial_weights(resumed)
    assert max(float((want.state_dict[k] - start[k]).abs().max()) for k in start) > 1e-3


def test_site_sending_nan_weights_is_rejected_and_named(
    federation_shift_cohort: Path, tmp_path: Path
) -> None:
    app_module = Path(__file__).with_name("federation_nan_site.py").read_text()
    run = federation_config(
        federation_shift_cohort, run_dir=tmp_path / "nan", num_server_rounds=2, **SETTINGS
    )
    simulate(
        run,
        sites=3,
        clientapp="federation_nan_site:app",
        extra_files={"federation_nan_site.py": app_module},
        progress=None,
    )
    folder = RunFolder(Path(run.run_dir))
    lines = folder.read_rounds()
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        bad = line["sites"]["site-B"]
        assert bad["status"] == "rejected" and "NaN" in bad["reason"]
        assert line["aggregated"] and {line["sites"][s]["status"] for s in ("site-A", "site-C")} == {"ok"}
    assert "site-B" in folder.card_md.read_text()
    model, _ = load_model(folder.model)
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())
    assert "site site-B" in (Path(run.run_dir) / "server.log").read_text()


def test_fedprox_beats_the_worst_local_only_model(
    federation_shift_cohort: Path, federation_full_run: SimulationResult
) -> None:
    run = federation_config(
        federation_shift_cohort, run_dir=federation_full_run.run_dir, num_server_rounds=ROUNDS, **SETTINGS
    )
    fedprox, _ = load_model(RunFolder(federation_full_run.run_dir).model)
    fed_auroc = mean_auroc(held_out_by_site(fedprox, federation_shift_cohort, run))

    manifest = load_manifest(federation_shift_cohort)
    splits = split_patients(manifest, val=run.val_fraction, test=run.test_fraction, seed=run.split_seed)
    local = {}
    for site in manifest.sites:
        torch.manual_seed(run.seed)
        from fedpath.common.mil import create_mil

        model = create_mil(run.model, in_dim=run.in_dim, num_classes=run.num_classes)
        config = TrainConfig(epochs=ROUNDS * run.local_epochs, lr=run.lr, seed=run.seed)
        train_epochs(model, bags_from_manifest(manifest.for_patients(splits[site].train)), config)
        local[site] = mean_auroc(held_out_by_site(model, federation_shift_cohort, run))
    worst = min(local.values())
    assert fed_auroc > worst, f"FedProx {fed_auroc:.3f} vs local-only {local}"
    assert np.isfinite(fed_auroc)
