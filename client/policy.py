"""A hospital's own privacy policy: the rules a run must meet before the site trains for it.

The policy is set at the site (`fedpath site start` options → keys of Flower's node config), never by the
coordinator. The ClientApp checks it before any training and records it with every round in the site's
privacy ledger. A round that breaks it is refused with the error code `POLICY_REFUSED` and a fixed reason
naming the rule and the two values compared (configuration, never patient data).

| field | node config key / `site start` option | rule |
| --- | --- | --- |
| require_dp | `policy-require-dp` | train only under per-patient DP |
| max_epsilon_run | `policy-max-epsilon-run` | the ε one run may spend at the site |
| max_epsilon_total | `privacy-budget` | the site's lifetime ε (its ledger's total) |
| min_noise | `policy-min-noise` | the smallest noise multiplier σ accepted |
| max_rounds | `policy-max-rounds` | the most federated rounds of a run |
| models | `policy-models` | the MIL models the site trains (comma-separated) |
| min_report_patients | `min-report-patients` | evaluation metrics only for groups of at least k patients |

A finite ε limit (total or per run) also refuses a run without DP: training without DP makes ε infinite.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedpath.common.accounting import DEFAULT_BUDGET_EPSILON

if TYPE_CHECKING:
    from fedpath.common.runconfig import RunConfig

# field → node config key; the `fedpath site start` option is the key with "--" in front
NODE_CONFIG_KEYS = {
    "require_dp": "policy-require-dp",
    "max_epsilon_run": "policy-max-epsilon-run",
    "max_epsilon_total": "privacy-budget",
    "min_noise": "policy-min-noise",
    "max_rounds": "policy-max-rounds",
    "models": "policy-models",
    "min_report_patients": "min-report-patients",
}


class PolicyError(ValueError):
    """A site policy that cannot be read; the message names the node config key and the option to fix."""


class PolicyRefused(Exception):
    """A round that breaks the site's policy. `reason` is fixed text: the rule and the values compared."""

    def __init__(self, rule: str, detail: str) -> None:
        self.rule = rule
        self.reason = f"refused by the site's policy ({rule}): {detail}"
        super().__init__(self.reason)


class SitePolicy(BaseModel):
    """The privacy rules of one site; the defaults accept any run (DP under the default budget)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # descriptions are the `site start --help` lines: one short line each (the rules are in the docstring)
    require_dp: bool = Field(False, description="train only under per-patient DP")
    max_epsilon_run: float | None = Field(None, gt=0, description="most ε one run may spend here")
    max_epsilon_total: float | None = Field(
        None, gt=0, description=f"lifetime ε (the run's if lower; default {DEFAULT_BUDGET_EPSILON:g})"
    )
    min_noise: float | None = Field(None, gt=0, description="smallest noise multiplier σ accepted")
    max_rounds: int | None = Field(None, ge=1, description="most rounds a run may have")
    models: tuple[str, ...] = Field((), description="MIL models trained here (a,b; default any)")
    min_report_patients: int = Field(10, ge=1, description="fewest patients a metric is sent for")

    @field_validator("models", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """`a,b` (option and node config) → ("a", "b")."""
        if isinstance(value, str):
            return tuple(m.strip() for m in value.split(",") if m.strip())
        return value

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> SitePolicy:
        """The policy in Flower's node config (keys in NODE_CONFIG_KEYS; absent = default)."""
        known = set(NODE_CONFIG_KEYS.values())
        unknown = sorted(k for k in node_config if str(k).startswith("policy-") and k not in known)
        if unknown:
            raise PolicyError(
                f"node config: unknown site policy key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))} "
                "(see `fedpath site start --help`)"
            )
        values: dict[str, Any] = {}
        for name, key in NODE_CONFIG_KEYS.items():
            if key in node_config:
                values[name] = node_config[key]
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            problems = "; ".join(
                f"'{NODE_CONFIG_KEYS.get(str(e['loc'][0]), e['loc'][0])}': {e['msg']}" for e in err.errors()
            )
            raise PolicyError(
                f"node config: invalid site policy ({problems}); fix the matching `fedpath site start` option"
            ) from err

    def to_node_config(self) -> list[str]:
        """`key=value` items (TOML values, as in `flower-supernode --node-config`) for the fields set."""
        items = []
        for name in sorted(self.model_fields_set):
            value = getattr(self, name)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = '"' + ",".join(value) + '"'
            else:
                text = repr(value)
            items.append(f"{NODE_CONFIG_KEYS[name]}={text}")
        return items

    def as_record(self) -> dict[str, Any]:
        """The policy as recorded in the ledger with every round."""
        return self.model_dump(mode="json")

    def check_run(self, run: RunConfig, server_round: int) -> None:
        """Refuse (PolicyRefused) a round whose run config breaks a rule that the config alone decides."""
        if self.models and run.model not in self.models:
            raise PolicyRefused(
                "policy-models",
                f"model '{run.model}' is not among this site's models ({', '.join(self.models)})",
            )
        rounds = max(run.num_server_rounds, server_round)
        if self.max_rounds is not None and rounds > self.max_rounds:
            raise PolicyRefused("policy-max-rounds", f"the run has {rounds} rounds > {self.max_rounds}")
        if not run.private:
            if self.require_dp:
                raise PolicyRefused(
                    "policy-require-dp", "the run trains without DP (dp-noise = dp-epsilon = 0)"
                )
            for name in ("max_epsilon_total", "max_epsilon_run"):
                limit = getattr(self, name)
                if limit is not None:
                    raise PolicyRefused(NODE_CONFIG_KEYS[name], f"a run without DP spends ε = ∞ > {limit:g}")
        if run.dp_noise > 0:
            self.check_noise(run.dp_noise)

    def check_noise(self, noise_multiplier: float) -> None:
        """Refuse a noise multiplier σ below the policy's minimum (given, or calibrated from dp-epsilon)."""
        if self.min_noise is not None and noise_multiplier < self.min_noise:
            raise PolicyRefused("policy-min-noise", f"σ = {noise_multiplier:.4g} < {self.min_noise:g}")

    def check_run_epsilon(self, run_epsilon: float) -> None:
        """Refuse a round after which the run's own ε would exceed the per-run limit."""
        if self.max_epsilon_run is not None and run_epsilon > self.max_epsilon_run + 1e-9:
            shown = "∞" if math.isinf(run_epsilon) else f"{run_epsilon:.3f}"
            raise PolicyRefused(
                "policy-max-epsilon-run", f"this run would reach ε = {shown} > {self.max_epsilon_run:g}"
            )


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    """One `--KEY` option per SitePolicy field (KEY its node config key), generated from the fields. An option
    not given is absent from the namespace (SUPPRESS), so the policy keeps its own default."""
    group = parser.add_argument_group(
        "site privacy policy (checked before every round; recorded in the ledger)"
    )
    metavars = {"max_rounds": "N", "min_report_patients": "K", "models": "NAMES", "min_noise": "Z"}
    for name, info in SitePolicy.model_fields.items():
        option, dest = f"--{NODE_CONFIG_KEYS[name]}", f"policy_{name}"
        default = info.get_default()
        text = (info.description or "") + (
            f" (default {default})" if default not in (None, (), False) else ""
        )
        if name == "require_dp":
            group.add_argument(option, dest=dest, action="store_true", default=argparse.SUPPRESS, help=text)
            continue
        kind = {"max_rounds": int, "min_report_patients": int, "models": str}.get(name, float)
        group.add_argument(
            option,
            dest=dest,
            type=kind,
            metavar=metavars.get(name, "E"),
            default=argparse.SUPPRESS,
            help=text,
        )


def policy_from_args(args: argparse.Namespace) -> SitePolicy:
    """The SitePolicy of the options given (add_policy_options); PolicyError names the option."""
    values: dict[str, Any] = {}
    for name in SitePolicy.model_fields:
        value = getattr(args, f"policy_{name}", None)
        if value is not None:
            values[name] = value
    try:
        return SitePolicy.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(
            f"--{NODE_CONFIG_KEYS.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in err.errors()
        )
        raise PolicyError(f"invalid site policy: {problems}") from err
