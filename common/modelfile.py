"""A model file: the global weights of one round with the run config and seeds, as the coordinator writes them
(``RUN/checkpoints/round-NNNN.pt``, ``RUN/model.pt``) and as a site reads one to apply the model to new patients.

Stored with ``torch.save`` as tensors and plain values only, and read with ``weights_only=True``: loading a
model file never unpickles code. `features` records what the training sites' feature files were made with
(encoder, weights checksum, tile size), so that `fedpath predict` can refuse features of another encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpath.common.atomic import atomic_path
from fedpath.common.mil import create_mil


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked; the message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """Global weights after `round` (0 = the initial weights), with the run config and seeds."""

    round: int
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    seeds: dict[str, Any]
    # rounds up to this one that aggregated a training update (0: still the initial weights; None: unknown)
    trained_rounds: int | None = None
    # the training sites' feature provenance (encoder, weights_sha256, tile_size_px, tile_size_um); {} unknown
    features: dict[str, Any] = field(default_factory=dict)
    # temperature and conformal threshold the sites agreed on (`fedpath.common.calibration`); {} none
    calibration: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "round": ckpt.round,
                "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
                "config": ckpt.config,
                "seeds": ckpt.seeds,
                "trained_rounds": ckpt.trained_rounds,
                "features": ckpt.features,
                "calibration": ckpt.calibration,
            },
            tmp,
        )


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint or final model file (tensors and plain values only: no code is unpickled)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunFolderError(
            f"cannot read checkpoint {path} ({err}); delete it to resume from the one before"
        ) from err
    trained = data.get("trained_rounds")
    return Checkpoint(
        int(data["round"]),
        data["state_dict"],
        dict(data["config"]),
        dict(data["seeds"]),
        None if trained is None else int(trained),
        dict(data.get("features") or {}),
        dict(data.get("calibration") or {}),
    )


def load_model(path: Path) -> tuple[nn.Module, Checkpoint]:
    """The MIL model of a checkpoint or final model file, built from its run config, in eval mode."""
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    model = create_mil(cfg["model"], in_dim=int(cfg["in_dim"]), num_classes=int(cfg["num_classes"]))
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.eval(), ckpt
