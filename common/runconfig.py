"""The settings of one federated run, as both sides read them from Flower's run config.

A run config is the flat key → value table of ``[tool.flwr.app.config]`` (keys with hyphens, as Flower
writes them), possibly overridden with ``flwr run --run-config``. The coordinator (ServerApp) and every
site (ClientApp) parse it into the same typed `RunConfig`, so both agree on the model architecture, the
local training settings and the split; a misspelt or unknown key is an error, not a silently ignored one.

Also here: the names of what travels in a training or evaluation reply, the error codes of a reply (each
with one fixed text), and the per-round, per-site seed that makes a federated run reproducible (and a
resumed run equal to an uninterrupted one).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
from pydantic import ConfigDict, Field, ValidationError

from fedpath.common.settings import TrainingSettings

# Keys in a reply's MetricRecord. The strategy weights updates and metrics by WEIGHT_KEY.
WEIGHT_KEY = "patients"
# Key of the ConfigRecord in a reply that names the site (an aggregate fact, never patient data).
SITE_RECORD = "site"
SITE_NAME = "name"
# ...and, under this prefix, what the site's features state they were made with (`common.features.provenance`)
FEATURES_PREFIX = "features."
# With client-level DP every site weighs the same (the accounting assumes a plain mean of clipped updates).
UNIT_WEIGHT_KEY = "unit-weight"
# Error code of a training reply from a site whose privacy budget would be exceeded by the round.
PRIVACY_EXHAUSTED = 4701
# Error code of a training reply from a site whose own policy (client/policy.py) refuses the run's config.
POLICY_REFUSED = 4702
# Error codes of a reply from a site that failed. The reply's reason is the fixed text of SITE_ERRORS: it
# names no file, patient, slide or path; the detail (exception, traceback) stays in the site's own log.
SITE_DATA_ERROR = 4710  # the site's manifest or feature files could not be read
INCOMPATIBLE_MODEL = 4711  # the run's model does not fit the site's data (in-dim, classes, weights)
SITE_INTERNAL_ERROR = 4712  # anything else that failed at the site
SITE_ERRORS = {
    PRIVACY_EXHAUSTED: "the site's privacy budget is exhausted; it no longer trains in this federation",
    POLICY_REFUSED: "the site's own privacy policy refuses this run's settings (DP required, ε per run, "
    "minimum noise, rounds or model); the rule it broke is in the site's log",
    SITE_DATA_ERROR: "the site's data could not be read (manifest or feature files); "
    "the detail is in the site's log",
    INCOMPATIBLE_MODEL: "the run's model does not fit the site's data (feature dimension, classes or "
    "weights); the detail is in the site's log",
    SITE_INTERNAL_ERROR: "the site failed while handling the round; the detail is in the site's log",
}
# Train-reply metrics about a site's privacy spending: logged per site, never averaged across sites.
PRIVACY_METRICS = ("epsilon", "delta", "dp-noise", "dp-sample-rate", "dp-steps")


class RunConfigError(ValueError):
    """A run config that cannot be used; the message names the key and what to do."""


class RunConfig(TrainingSettings):
    """Settings of one federated run: the shared training settings (`TrainingSettings`: model, local work,
    optimiser, split, DP-SGD) and the run's own. Field names use underscores; in Flower's run config, hyphens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # federation (coordinator)
    num_server_rounds: int = Field(10, ge=1, description="federated rounds, resumed ones included")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx μ (0 = FedAvg)")
    fraction_train: float = Field(1.0, gt=0, le=1, description="share of connected sites asked to train")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="share of sites asked to evaluate")
    min_sites: int = Field(2, ge=1, description="sites needed to start a round and to aggregate it")
    round_timeout: float = Field(3600.0, gt=0, description="seconds to wait for the replies of one round")
    run_dir: str = Field("", description="absolute folder for checkpoints, round log, model, model card")
    resume: bool = Field(False, description="continue from the last checkpoint in run_dir")
    # model shape (both sides must agree)
    in_dim: int = Field(0, ge=0, description="tile feature dimension D (0 = not set)")
    num_classes: int = Field(2, ge=2)
    classes: str = Field("", description="class labels in index order, comma-separated ('' = not stated)")
    seed: int = Field(0, description="seed of the initial weights and of every site's local training")
    # per-patient differential privacy at every site (DP-SGD with Opacus); off while dp-noise and dp-epsilon
    # are both 0. A site's node config may set its own 'privacy-budget', 'privacy-ledger' and policy.
    dp_noise: float = Field(
        0.0, ge=0, description="DP-SGD noise multiplier σ (0 = off, or set by dp-epsilon)"
    )
    dp_epsilon: float = Field(0.0, ge=0, description="target ε per site over the run; σ calibrated (0 = off)")
    dp_lr: float = Field(0.05, gt=0, description="learning rate under DP (SGD with momentum 0.9)")
    # client-level (central) DP at the coordinator: Flower's server-side fixed-clipping wrapper
    central_dp_noise: float = Field(0.0, ge=0, description="client-level DP noise multiplier (0 = off)")
    central_dp_clip: float = Field(10.0, gt=0, description="client-level DP clipping norm of an update")
    # simulation only: the one manifest whose sites the simulated nodes play (partition id → site)
    manifest: str = Field("", description="simulation only: manifest whose sites the nodes play")

    @classmethod
    def from_flower(cls, run_config: Mapping[str, object]) -> RunConfig:
        """Parse Flower's run config (hyphenated keys)."""
        values = {str(k).replace("-", "_"): v for k, v in run_config.items()}
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            problems = "; ".join(
                f"'{'.'.join(str(x) for x in e['loc']).replace('_', '-')}': {e['msg']}" for e in err.errors()
            )
            raise RunConfigError(
                f"invalid run config ({problems}); fix [tool.flwr.app.config] or the --run-config override"
            ) from err

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """The run config as Flower writes it (hyphenated keys), e.g. for ``[tool.flwr.app.config]``."""
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}

    @property
    def private(self) -> bool:
        """Whether the sites train with per-patient DP-SGD."""
        return self.dp_noise > 0 or self.dp_epsilon > 0

    @property
    def class_labels(self) -> list[str]:
        """The class labels in index order: the stated ones, else the indices as text."""
        stated = [c for c in self.classes.split(",") if c] if self.classes else []
        return stated if len(stated) == self.num_classes else [str(i) for i in range(self.num_classes)]

    def require_model_shape(self) -> None:
        if self.in_dim <= 0:
            raise RunConfigError(
                "run config 'in-dim' is not set: pass the tile feature dimension of the cohort "
                "(e.g. --run-config 'in-dim=1024'; `fedpath manifest check` and feature files show it)"
            )


def round_seed(seed: int, server_round: int, site: str) -> int:
    """The seed of one site's local training in one round: a pure function of (seed, round, site name)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, server_round, zlib.crc32(site.encode())])
    return int(state.generate_state(1)[0])
