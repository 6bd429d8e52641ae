"""The coordinator's side of the feature standardisation the sites agree on (fedpath.common.standardize).

Before round 1 of a fresh run, every connected site is asked (a Flower query message) for the tile count,
per-dimension sum and sum of squares over its training patients; the coordinator adds them up and stores the
pooled mean and SD in the initial model's `FeatureStandardizer`. From then on they travel with the weights,
and aggregation keeps them as set (`frozen_arrays`): no site's update can move them.

A site that replies with an error, with malformed sums, or with none (fewer than its k training patients,
or a run with per-patient DP) is left out and named in the log and in ``standardization.json``. When no site
sends sums the model stays unstandardised, and the log says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedpath.common.atomic import write_text_atomic
from fedpath.common.mil import create_mil
from fedpath.common.runconfig import RunConfig
from fedpath.common.standardize import FeatureMoments, combine, set_standardization
from fedpath.common.wire import MOMENTS_COUNT, moments_from_reply
from fedpath.server.queries import ask_every_site

STANDARDIZATION_FILE = "standardization.json"


def frozen_arrays(names: Iterable[str]) -> list[str]:
    """The state-dict names of the standardizer's buffers: aggregation keeps them as the coordinator set."""
    return [n for n in names if n.endswith(("standardize.mean", "standardize.scale"))]


def keep_standardization(arrays: ArrayRecord, reference: ArrayRecord) -> None:
    """Put the coordinator's standardizer buffers (from `reference`) back into aggregated `arrays`, in place:
    the agreed standardisation, not an average of the sites' copies nor noise added to it."""
    for name in frozen_arrays(reference):
        arrays[name] = reference[name]


def ask_sites(grid: Grid, run: RunConfig) -> tuple[list[tuple[str, FeatureMoments]], dict[str, str]]:
    """Every connected site's moments; (contributions by site name, site → why it gave none). Waits for
    min-sites nodes as the strategy's first round does (Flower's own `sample_nodes`)."""
    content = RecordDict({"config": ConfigRecord({"server-round": 0})})
    answered, missing = ask_every_site(grid, run, content, MessageType.QUERY)
    got: list[tuple[str, FeatureMoments]] = []
    for name, reply in answered:
        metrics = next(iter(reply.content.metric_records.values()), None)
        if metrics is None or MOMENTS_COUNT not in metrics:
            missing[name] = "sent no statistics (fewer training patients than its k, or a DP run)"
            continue
        arrays = next(iter(reply.content.array_records.values()), None)
        try:
            if arrays is None:
                raise ValueError("no arrays")
            got.append((name, moments_from_reply(arrays, metrics, run.in_dim)))
        except ValueError as err:
            missing[name] = f"malformed statistics ({err})"
    return sorted(got, key=lambda pair: pair[0]), missing


def standardize_initial(
    grid: Grid, run: RunConfig, state: dict[str, torch.Tensor], folder: Path
) -> dict[str, torch.Tensor]:
    """The initial weights with the standardizer set from the sites' pooled moments (unchanged when the run
    has standardisation off, trains with per-patient DP, or no site sent moments). Writes
    ``standardization.json`` (sites, tile count) into the run folder."""
    summary: dict[str, Any] = {"standardized": False}
    if not run.standardize:
        summary["why"] = "standardize is off in the run config"
    elif run.private or run.central_dp_noise > 0:
        summary["why"] = "a run with DP: the sites' feature sums are not covered by its accounting"
    else:
        got, missing = ask_sites(grid, run)
        summary |= {"sites": [name for name, _ in got], "left_out": missing}
        if got:
            pooled = combine(m for _, m in got)
            model = create_mil(run.model, in_dim=run.in_dim, num_classes=run.num_classes)
            model.load_state_dict(state)
            set_standardization(model, pooled)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            summary |= {"standardized": True, "tiles": pooled.count}
        else:
            summary["why"] = "no site sent statistics"
    for site, why in summary.get("left_out", {}).items():
        log(WARNING, "standardisation: site %s left out: %s", site, why)
    if summary["standardized"]:
        log(INFO, "standardisation: feature mean and SD from %d tiles at %d site(s): %s", summary["tiles"],
            len(summary["sites"]), ", ".join(summary["sites"]))  # fmt: skip
    else:
        log(WARNING, "standardisation: features are used as they are (%s)", summary["why"])
    write_text_atomic(folder / STANDARDIZATION_FILE, json.dumps(summary, indent=1) + "\n")
    return state


def read_standardization(folder: Path) -> dict[str, Any] | None:
    path = folder / STANDARDIZATION_FILE
    return json.loads(path.read_text()) if path.exists() else None
