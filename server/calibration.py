"""The coordinator's side of the calibration the sites agree on (`fedpath.common.calibration`).

After the last round, with the presented weights chosen, every connected site is asked (a Flower query message,
action ``calibration``) for its aggregates over its validation patients: per temperature an NLL sum and a
histogram of nonconformity scores. The coordinator adds them up, keeps the temperature with the lowest NLL and
the conformal threshold for the default coverage, and stores both (with the pooled histogram) in the model file,
where `fedpath predict` finds them. ``calibration.json`` in the run folder says which sites contributed.

A site that replies with an error, malformed aggregates or none (fewer than its k validation patients) is left
out and named. Runs with DP skip it: the validation histograms are not covered by their accounting.
"""

from __future__ import annotations

import json
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedpath.common.atomic import write_text_atomic
from fedpath.common.calibration import BINS, DEFAULT_COVERAGE, TEMPERATURES, Calibration, combine
from fedpath.common.runconfig import RunConfig
from fedpath.common.wire import calibration_from_reply
from fedpath.server.queries import ask_every_site

CALIBRATION_FILE = "calibration.json"
ACTION = "calibration"


def ask_sites(
    grid: Grid, run: RunConfig, state: dict[str, torch.Tensor]
) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], dict[str, str]]:
    """Every connected site's calibration aggregates for the weights `state`; (by site, site → why none)."""
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": 0})})
    answered, missing = ask_every_site(grid, run, content, f"{MessageType.QUERY}.{ACTION}")
    got: list[tuple[str, np.ndarray, np.ndarray]] = []
    for name, reply in answered:
        sent = next(iter(reply.content.array_records.values()), None)
        if sent is None:
            missing[name] = "sent no aggregates (fewer validation patients than its k)"
            continue
        try:
            nll, histogram = calibration_from_reply(sent, len(TEMPERATURES), BINS)
        except ValueError as err:
            missing[name] = f"malformed aggregates ({err})"
            continue
        got.append((name, nll, histogram))
    return sorted(got, key=lambda item: item[0]), missing


def calibrate(grid: Grid, run: RunConfig, state: dict[str, torch.Tensor], folder: Path) -> Calibration | None:
    """The calibration of the presented weights from the sites' aggregates (None: a DP run, or no site sent
    any); writes ``calibration.json``."""
    summary: dict[str, Any] = {"calibrated": False}
    result = None
    if run.private or run.central_dp_noise > 0:
        summary["why"] = "a run with DP: the sites' validation histograms are not covered by its accounting"
    else:
        got, missing = ask_sites(grid, run, state)
        summary["left_out"] = missing
        for site, why in missing.items():
            log(WARNING, "calibration: site %s left out: %s", site, why)
        result = combine(got, DEFAULT_COVERAGE)
        if result is None:
            summary["why"] = "no site sent aggregates"
        else:
            summary |= {"calibrated": True, **result.to_dict()}
            summary.pop("histogram")
            log(INFO, "calibration: temperature %.3g (validation NLL %.3f → %.3f), conformal threshold %.3f for "
                "%.0f %% coverage, from %d validation patients at %s", result.temperature, result.nll_before,
                result.nll_after, result.threshold, 100 * result.coverage, result.patients,
                ", ".join(result.sites))  # fmt: skip
    if not summary["calibrated"]:
        log(
            WARNING,
            "calibration: none (%s); predict will report the model's own probabilities",
            summary["why"],
        )
    write_text_atomic(folder / CALIBRATION_FILE, json.dumps(summary, indent=1) + "\n")
    return result


def read_calibration(folder: Path) -> dict[str, Any] | None:
    path = folder / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.exists() else None
