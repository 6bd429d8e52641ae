"""Per-patient DP inside a real simulated federation: ε per site per round in the round log and model card,
a site refused at its budget while the run goes on, the ledger surviving a restart, and a model that learns."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedpath.client.privacy import PrivacyLedger, default_delta, epsilon_of, sample_rate, steps_per_epoch
from fedpath.common.manifest import load_manifest, split_patients
from fedpath.common.runconfig import PRIVACY_EXHAUSTED, RunConfig
from fedpath.common.standardize import is_standardized
from fedpath.server.federation import initial_weights
from fedpath.server.runfolder import RunFolder, load_model
from fedpath.simulation.simulate import federation_config, simulate
from fedpath.simulation.synth import SynthConfig, synthesize
from tests.federation_helpers import held_out_by_site

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_ray")]

SIGMA, BATCH = 1.5, 8
# An easy cohort: one large site and one small one (which spends ε faster: more of its patients per step).
COHORT = SynthConfig(
    sites=2, slides=105, size_skew=2.0, dim=8, tiles_median=20, tiles_min=8, tiles_max=60, signal=4.0,
    witness_min=0.2, witness_max=0.4, shift=0.0, multi_slide_fraction=0.0, prevalence=0.5, prevalence_skew=0.0,
)  # fmt: skip
SETTINGS = {"local_epochs": 1, "local_steps": 0, "dp_lr": 0.05, "proximal_mu": 0.01, "min_sites": 1, "seed": 3,
            "dp_noise": SIGMA, "dp_batch": BATCH}  # fmt: skip


def epsilons(train_patients: int, rounds: int) -> list[float]:
    """The ε a site should report after each of `rounds` DP rounds (what its ledger must compose to)."""
    q = sample_rate(BATCH, train_patients)
    return [
        epsilon_of([(SIGMA, q, steps_per_epoch(q))] * k, default_delta(train_patients))
        for k in range(1, rounds + 1)
    ]


@pytest.fixture(autouse=True)
def privacy_flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


@dataclass(frozen=True)
class PrivateRuns:
    manifest: Path
    run_dir: Path
    train: dict[str, int]  # training patients per site
    large: str
    small: str
    budget: float


@pytest.fixture(scope="module")
def privacy_runs(tmp_path_factory: pytest.TempPathFactory) -> PrivateRuns:
    """Two rounds, then the run resumed (new processes, ledgers read back from disk) to four rounds."""
    manifest = synthesize(tmp_path_factory.mktemp("cohort"), COHORT, progress=False)
    splits = split_patients(load_manifest(manifest))
    train = {site: len(split.train) for site, split in splits.items()}
    large, small = sorted(train, key=train.__getitem__, reverse=True)
    small_eps = epsilons(train[small], 2)
    budget = (small_eps[0] + small_eps[1]) / 2  # the small site can train once, not twice
    assert epsilons(train[large], 4)[-1] < budget, "cohort no longer separates the sites' spending"
    run_dir = tmp_path_factory.mktemp("run")
    first = federation_config(manifest, run_dir=run_dir, num_server_rounds=2, dp_budget=budget, **SETTINGS)
    assert simulate(first, sites=2, progress=None).status == "finished:completed"
    resumed = first.model_copy(update={"num_server_rounds": 4, "resume": True})
    assert simulate(resumed, sites=2, progress=None).status == "finished:completed"
    return PrivateRuns(manifest, run_dir, train, large, small, budget)


def test_epsilon_per_site_per_round_composes_across_restarts(privacy_runs: PrivateRuns) -> None:
    runs = privacy_runs
    lines = RunFolder(runs.run_dir).read_rounds()
    assert [line["round"] for line in lines] == [1, 2, 3, 4]
    reported = [line["sites"][runs.large]["train"]["epsilon"] for line in lines]
    # strictly growing over all four rounds, across the restart between rounds 2 and 3, and equal to the
    # composition of every round so far: the resumed processes read the ledger back instead of starting at 0
    assert reported == pytest.approx(epsilons(runs.train[runs.large], 4), rel=1e-6)
    ledger = PrivacyLedger(runs.run_dir / "privacy" / f"{runs.large}.json", site=runs.large, delta=0.5)
    assert [e.round for e in ledger.entries] == [1, 2, 3, 4]
    assert ledger.delta == pytest.approx(default_delta(runs.train[runs.large]))
    assert len({e.run for e in ledger.entries}) == 2  # two Flower runs composed in one ledger


def test_site_stops_at_its_budget_and_the_run_goes_on(privacy_runs: PrivateRuns) -> None:
    runs = privacy_runs
    lines = RunFolder(runs.run_dir).read_rounds()
    small = [line["sites"][runs.small] for line in lines]
    assert small[0]["status"] == "ok" and small[0]["train"]["epsilon"] <= runs.budget
    for entry in small[1:]:
        assert entry["status"] == "privacy-exhausted"
        assert entry["code"] == PRIVACY_EXHAUSTED and "privacy budget is exhausted" in entry["reason"]
    assert all(line["aggregated"] for line in lines)  # the large site carried every round
    assert "epsilon" not in lines[0]["aggregate"]["train"]  # ε is per site, never averaged
    spent = PrivacyLedger(runs.run_dir / "privacy" / f"{runs.small}.json", site=runs.small, delta=0.5)
    assert [e.round for e in spent.entries] == [1] and spent.epsilon <= runs.budget
    card = (runs.run_dir / "model_card.md").read_text()
    assert "Differential privacy (per patient, at each site)" in card
    assert f"| {runs.small} | r1: " in card and "| 2 |" in card


def test_model_still_learns_under_dp(privacy_runs: PrivateRuns) -> None:
    runs = privacy_runs
    model, ckpt = load_model(RunFolder(runs.run_dir).model)
    by_site = held_out_by_site(model, runs.manifest, RunConfig.model_validate(ckpt.config))
    # chance is 0.5; stated margin: at least 0.2 above it on the large site's held-out patients
    assert by_site[runs.large][0] >= 0.7, by_site
    # the sites' feature sums are not covered by the DP accounting: no standardisation query under DP
    assert not is_standardized(model)
    assert "DP" in json.loads((runs.run_dir / "standardization.json").read_text())["why"]


def test_client_level_dp_adds_noise_and_accounts_for_it(tmp_path: Path) -> None:
    """Flower's server-side fixed-clipping wrapper is really in the loop: with a large noise multiplier the
    global model is swamped by noise, and the round log carries the client-level ε of each round."""
    manifest = synthesize(tmp_path / "cohort", COHORT, progress=False)
    noise, clip = 50.0, 1.0
    run = federation_config(
        manifest, run_dir=tmp_path / "run", num_server_rounds=2, local_epochs=1, min_sites=2, seed=3,
        central_dp_noise=noise, central_dp_clip=clip,
    )  # fmt: skip
    assert simulate(run, sites=2, progress=None).status == "finished:completed"
    folder = RunFolder(tmp_path / "run")
    lines = folder.read_rounds()
    spent = [line["central_dp"]["epsilon"] for line in lines]
    assert spent == pytest.approx([epsilon_of([(noise, 1.0, r)], 1e-5) for r in (1, 2)])
    assert spent[0] < spent[1]
    model, _ = load_model(folder.model)
    start = initial_weights(run)
    drift = max(float((p - start[k]).abs().max()) for k, p in model.state_dict().items())
    # noise of SD noise·clip/min_sites = 25 per coordinate per round; clipped updates alone move < clip
    assert drift > 10 * clip, drift
    assert "Client-level differential privacy" in folder.card_md.read_text()
    # the standardizer is not noised (it would be destroyed: scale near 0 or negative) and, under DP, not set
    assert not is_standardized(model)
