"""One federated run on the coordinator: start or resume, run the FedProx rounds, checkpoint and log every
round, and finish with the final model and its model card. Called by the ServerApp with Flower's `Grid`.

A run in which no round aggregated a training update (every site refused or failed: privacy budget, policy,
error) has no trained model: no model.pt is written, the model card says so and names what each site replied
(codes, never a site's own text), and the run ends with `NoSiteTrained`, so Flower marks it failed and the
command that followed it exits non-zero. Every checkpoint records how many rounds so far were aggregated.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpath.common.accounting import CENTRAL_DELTA, DEFAULT_BUDGET_EPSILON, DEFAULT_DELTA_RULE, epsilon_of
from fedpath.common.mil import initial_model
from fedpath.common.runconfig import UNIT_WEIGHT_KEY, WEIGHT_KEY, RunConfig, RunConfigError, round_seed
from fedpath.common.selection import SELECTION_RULE, Selection, best_round
from fedpath.common.version import fedpath_version
from fedpath.server.calibration import calibrate, read_calibration
from fedpath.server.runfolder import (
    Checkpoint,
    RunFolder,
    load_checkpoint,
)
from fedpath.server.standardization import read_standardization, standardize_initial
from fedpath.server.strategy import GuardedCentralDP, GuardedFedProx


class NoSiteTrained(RuntimeError):
    """No round of the run aggregated a training update; the message names each site's replies (codes)."""


@dataclass(frozen=True)
class Start:
    """Where a run begins: the weights and the number of rounds already done."""

    state_dict: dict[str, torch.Tensor]
    done_rounds: int


def run_folder(run: RunConfig) -> RunFolder:
    if not run.run_dir or not Path(run.run_dir).is_absolute():
        raise RunConfigError(
            f"run config 'run-dir' must be an absolute folder (got {run.run_dir!r}): the ServerApp runs from "
            "Flower's app cache, so a relative path would land there"
        )
    return RunFolder(Path(run.run_dir))


def initial_weights(run: RunConfig) -> dict[str, torch.Tensor]:
    """The round-0 global model, seeded by the run seed."""
    model = initial_model(run.model, in_dim=run.in_dim, num_classes=run.num_classes, seed=run.seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def plan_start(run: RunConfig, folder: RunFolder) -> Start:
    """Fresh start, or the last checkpoint when resuming (its settings must match this run's)."""
    latest = folder.resumable(run.model_dump(), resume=run.resume, rounds=run.num_server_rounds)
    if latest is None:
        if run.resume:
            log(INFO, "resume: no checkpoint in %s; starting from round 1", folder.root)
        return Start(initial_weights(run), 0)
    folder.truncate_rounds(latest.round)
    log(INFO, "resume: round %d checkpoint of %s; %d round(s) to go", latest.round, folder.root,
        run.num_server_rounds - latest.round)  # fmt: skip
    return Start(latest.state_dict, latest.round)


def run_federation(grid: Grid, run: RunConfig) -> RunFolder:
    """Run (or resume) the federation described by `run` and write everything to its run folder."""
    run.require_model_shape()
    folder = run_folder(run)
    folder.root.mkdir(parents=True, exist_ok=True)
    start = plan_start(run, folder)
    if start.done_rounds == 0:
        start = Start(standardize_initial(grid, run, start.state_dict, folder.root), 0)
    arrays = ArrayRecord(start.state_dict)
    remaining = run.num_server_rounds - start.done_rounds
    central = run.central_dp_noise > 0
    strategy = GuardedFedProx(
        reference=arrays,
        proximal_mu=run.proximal_mu,
        min_sites=run.min_sites,
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        round_offset=start.done_rounds,
        weighted_by_key=UNIT_WEIGHT_KEY if central else WEIGHT_KEY,
    )
    # Client-level DP: Flower's wrapper clips each site's update to central-dp-clip and adds Gaussian noise
    # to the mean; noise is sized for min-sites replies, so more replies only make it more private.
    top: Strategy = strategy
    if central:
        top = GuardedCentralDP(
            strategy, run.central_dp_noise, run.central_dp_clip, num_sampled_clients=run.min_sites
        )
    config = run.model_dump()
    history: list[dict[str, Any]] = folder.read_rounds()

    def after_round(server_round: int, global_arrays: ArrayRecord) -> MetricRecord | None:
        # Flower calls this before round 1 (server_round 0) and after every round's evaluation.
        if server_round == 0:
            return None
        record = strategy.current
        r = strategy.true_round(server_round)
        assert record is not None and record.round == r
        trained = [s for s, e in record.sites.items() if e.status == "ok" and e.train]
        seeds = {
            "run": run.seed,
            "split": run.split_seed,
            "sites": {s: round_seed(run.seed, r, s) for s in trained},
        }
        aggregated = sum(1 for line in history if line.get("aggregated")) + int(record.aggregated)
        folder.save_checkpoint(Checkpoint(r, global_arrays.to_torch_state_dict(), config, seeds, aggregated))
        line = record.as_log_line()
        if central:
            line["central_dp"] = central_dp_spent(run, r)
        folder.append_round(line)
        history.append(line)
        log(INFO, "round %d/%d done in %.1f s: checkpoint and round log in %s", r, run.num_server_rounds,
            line["seconds"], folder.root)  # fmt: skip
        return None

    started = time.perf_counter()
    final_state = start.state_dict
    if remaining > 0:
        result = top.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=remaining,
            timeout=run.round_timeout,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=after_round,
        )
        if len(result.arrays) > 0:
            final_state = result.arrays.to_torch_state_dict()
    log(INFO, "federation finished in %.1f s", time.perf_counter() - started)
    untrained = no_training_reasons(run, history)
    selection = select_round(history) if history and untrained is None else None
    if selection is not None:
        # the presented model is the best round's (common/selection.py), not necessarily the last one's
        state = final_state
        if selection.round != run.num_server_rounds:
            state = load_checkpoint(folder.checkpoint_path(selection.round)).state_dict
        seeds = {"run": run.seed, "split": run.split_seed}
        trained_then = sum(
            1 for line in history if line.get("aggregated") and line["round"] <= selection.round
        )
        features = agreed_features([line for line in history if line["round"] <= selection.round])
        calibration = calibrate(grid, run, state, folder.root)
        folder.save_model(
            Checkpoint(
                selection.round, state, config, seeds, trained_then, features,
                {} if calibration is None else calibration.to_dict(),
            )
        )  # fmt: skip
        log(INFO, "model.pt: %s", selection.why)
    else:
        folder.model.unlink(missing_ok=True)  # nothing may look like a trained model
    folder.write_model_card(model_card(run, folder, history, selection))
    if untrained is not None:
        log(ERROR, "%s; model card: %s", untrained, folder.card_md)
        raise NoSiteTrained(untrained)
    log(INFO, "final model: %s; model card: %s", folder.model, folder.card_md)
    return folder


def agreed_features(history: list[dict[str, Any]]) -> dict[str, Any]:
    """What the features of the sites that trained state they were made with: the statement most of them
    share, ``sites_agree`` False (and the sites' statements) when they differ; {} when none stated any."""
    stated: dict[str, dict[str, Any]] = {}
    for line in history:
        for site, entry in line.get("sites", {}).items():
            if entry.get("status") == "ok" and entry.get("train") and entry.get("features"):
                stated[site] = {k: v for k, v in entry["features"].items() if k != "files_agree"}
    if not stated:
        return {}
    counts = Counter(json.dumps(v, sort_keys=True) for v in stated.values())
    most = json.loads(counts.most_common(1)[0][0])
    files_agree = all(
        e.get("features", {}).get("files_agree", True)
        for line in history
        for e in line.get("sites", {}).values()
    )
    out = {**most, "sites_agree": len(counts) == 1, "files_agree": files_agree}
    if len(counts) > 1:
        out["sites"] = stated
    return out


def select_round(history: list[dict[str, Any]]) -> Selection:
    """The round whose global model is presented, by the one rule of `fedpath.common.selection`, among the
    rounds that aggregated a training update."""
    trained = [line for line in history if line.get("aggregated")] or history
    return best_round([(int(line["round"]), line["aggregate"]["evaluate"].get("loss")) for line in trained])


def no_training_reasons(run: RunConfig, history: list[dict[str, Any]]) -> str | None:
    """Why no round in the round log aggregated a training update, site by site (None when one did)."""
    if any(line.get("aggregated") for line in history):
        return None
    replies: dict[str, dict[str, list[str]]] = {}  # site → what it replied → rounds
    for line in history:
        for site, entry in line["sites"].items():
            if entry["status"] != "ok":
                what = entry.get("reason") or entry["status"]
            else:
                what = "sent an update" if entry.get("train") else "sent no training reply"
            replies.setdefault(site, {}).setdefault(what, []).append(str(line["round"]))
    sites = [
        f"{site}: " + "; ".join(f"{what} (round {', '.join(rounds)})" for what, rounds in whats.items())
        for site, whats in sorted(replies.items())
    ]
    return (
        f"no site trained: none of the {len(history)} round(s) aggregated a training update "
        f"(min-sites={run.min_sites}), so there is no trained model and no model.pt. "
        + (" | ".join(sites) or "No site replied.")
    )


def model_card(
    run: RunConfig, folder: RunFolder, history: list[dict[str, Any]], selection: Selection | None
) -> dict[str, Any]:
    """Config, sites, rounds and metrics of the run (from the whole round log, resumed parts included);
    `selection`: the round model.pt holds (None: no model)."""
    sites = sorted({s for line in history for s in line["sites"]})
    last = history[-1] if history else {"sites": {}, "aggregate": {"evaluate": {}}}
    rejected = [
        {"round": line["round"], "site": s, "reason": e.get("reason", "")}
        for line in history
        for s, e in line["sites"].items()
        if e["status"] != "ok"
    ]
    untrained = no_training_reasons(run, history)
    if selection is not None:
        last = next(line for line in history if line["round"] == selection.round)
    return {
        "config": run.model_dump(),
        "trained": untrained is None,
        "no_site_trained": untrained,
        "privacy": privacy_summary(run, history),
        "standardization": read_standardization(folder.root),
        "calibration": read_calibration(folder.root) if selection is not None else None,
        "rounds": len(history),
        "sites": sites,
        "selected_round": None if selection is None else selection.round,
        "selection": None if selection is None else selection.why,
        "selection_rule": SELECTION_RULE,
        "features": agreed_features(
            [line for line in history if selection is None or line["round"] <= selection.round]
        ),
        "final_evaluation": {
            "round": last.get("round"),
            "sites": {s: e.get("evaluate", {}) for s, e in last["sites"].items()},
            "aggregate": last["aggregate"].get("evaluate", {}),
        },
        "train_loss_by_round": [line["aggregate"]["train"].get("loss") for line in history],
        "rejected": rejected,
        "model_file": folder.model.name if untrained is None else None,
        "round_log": folder.round_log.name,
        "fedpath_version": fedpath_version(),
        "flwr_version": flwr.__version__,
    }


def central_dp_spent(run: RunConfig, rounds: int) -> dict[str, float]:
    """Client-level (ε, δ) after `rounds` noisy aggregations, the unit being a whole site. Every round is
    counted as a full release (no amplification by sampling sites: with a handful of hospitals there is
    none to speak of)."""
    return {
        "epsilon": epsilon_of([(run.central_dp_noise, 1.0, rounds)], CENTRAL_DELTA),
        "delta": CENTRAL_DELTA,
        "noise_multiplier": run.central_dp_noise,
        "clip": run.central_dp_clip,
    }


def privacy_summary(run: RunConfig, history: list[dict[str, Any]]) -> dict[str, Any]:
    """DP settings and each site's cumulative ε after every round it trained (from the round log)."""
    settings = {
        "per_patient_dp": run.private,
        "noise_multiplier": run.dp_noise or None,
        "target_epsilon": run.dp_epsilon or None,
        "clip": run.dp_clip,
        "delta": run.dp_delta or DEFAULT_DELTA_RULE,
        "expected_patients_per_step": run.dp_batch or run.batch_size,
        "budget": run.dp_budget or run.dp_epsilon or f"{DEFAULT_BUDGET_EPSILON:g} unless a site sets its own",
    }
    epsilon: dict[str, dict[int, float]] = {}
    delta: dict[str, float] = {}  # the δ each site reports (its ledger's, fixed when the ledger was created)
    exhausted: dict[str, int] = {}
    for line in history:
        for site, entry in line["sites"].items():
            if "epsilon" in entry.get("train", {}) and entry["status"] == "ok":
                epsilon.setdefault(site, {})[line["round"]] = entry["train"]["epsilon"]
                delta[site] = entry["train"].get("delta", delta.get(site))
            if entry["status"] == "privacy-exhausted":
                exhausted.setdefault(site, line["round"])
    central = {line["round"]: line["central_dp"]["epsilon"] for line in history if "central_dp" in line}
    return {
        "settings": settings,
        "epsilon_by_site_and_round": epsilon,
        "delta_by_site": delta,
        "exhausted_from_round": exhausted,
        "client_level": {"settings": central_dp_spent(run, 0), "epsilon_by_round": central}
        if central
        else None,
    }
