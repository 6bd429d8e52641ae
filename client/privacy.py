"""Per-patient differential privacy at a site: DP-SGD with Opacus, and a persistent (ε, δ) ledger.

The privacy unit is the **patient**: a patient's slides form one bag, each optimisation step takes a
Poisson sample of patients (each patient independently with probability q = expected patients per step ÷
patients at the site), every patient's gradient is clipped to `max_grad_norm` and Gaussian noise of
σ·max_grad_norm is added (Opacus `GradSampleModule` + `DPOptimizer`). The MIL models are mask-aware and
have no batch statistics, so a patient's gradient never depends on the other bags in its batch.

The ledger is a site-local JSON file that outlives runs and restarts: every round appends (σ, q, steps),
and ε is the RDP composition of the whole history at the ledger's δ. A site refuses a round whose planned
steps would take it past its budget.

FedProx under DP: the proximal term cannot go into the loss (the DP optimizer replaces gradients with
clipped, noised per-patient gradients), so after each noisy step the weights move toward the global model,
w ← w − lr·μ·(w − w_global): data-independent, so it costs no privacy.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import DataLoader

from fedpath.common.accounting import epsilon_of
from fedpath.common.atomic import write_text_atomic
from fedpath.common.bags import BagBatch, BagDataset, BagItem, collate_bags

if TYPE_CHECKING:  # Opacus takes seconds to import: only when a site actually trains or accounts with DP
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

LEDGER_VERSION = 1


class PrivacyError(Exception):
    """A DP setting or ledger that cannot be used; the message says what to change."""


class BudgetExhausted(PrivacyError):
    """Training this round would take the site past its privacy budget."""

    def __init__(self, site: str, spent: float, projected: float, budget: float) -> None:
        self.site, self.spent, self.projected, self.budget = site, spent, projected, budget
        super().__init__(
            f"site '{site}': privacy budget exhausted: ε spent {spent:.3f}, this round would reach "
            f"{projected:.3f} > budget {budget:.3f}; the site no longer trains (raise its budget only with "
            "its data owner's consent)"
        )


class DPConfig(BaseModel):
    """DP-SGD settings of a site. Give `noise_multiplier` (σ) or `target_epsilon`, not both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: float | None = Field(None, gt=0, description="σ: noise SD ÷ clipping norm")
    target_epsilon: float | None = Field(
        None, gt=0, description="calibrate σ so that the planned rounds spend this ε in total"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="per-patient gradient clipping norm C")
    expected_batch_size: int = Field(8, ge=1, description="expected patients per step (Poisson sampling)")
    budget_epsilon: float | None = Field(
        None, gt=0, description="the site's lifetime ε budget; default target_epsilon, else unlimited"
    )

    @model_validator(mode="after")
    def _one_noise_setting(self) -> DPConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "give exactly one of noise_multiplier (--dp-noise) and target_epsilon (--dp-epsilon)"
            )
        return self

    @property
    def budget(self) -> float:
        if self.budget_epsilon is not None:
            return self.budget_epsilon
        return self.target_epsilon if self.target_epsilon is not None else math.inf


def default_delta(patients: int) -> float:
    """δ = 1/(10·n): well below 1/n, so no single patient's record can be released outright."""
    return 1.0 / (10 * max(patients, 1))


def sample_rate(expected_batch_size: int, patients: int) -> float:
    """Poisson sampling probability of a patient per step: expected patients per step ÷ patients."""
    if patients < 1:
        raise PrivacyError("DP training needs at least one training patient")
    return min(1.0, expected_batch_size / patients)


def steps_per_epoch(q: float) -> int:
    """Steps of one epoch under Poisson sampling: each patient is seen once in expectation."""
    return max(1, round(1 / q))


History = list[tuple[float, float, int]]  # (σ, q, steps), Opacus's accountant history


def calibrate_noise(
    target_epsilon: float, delta: float, q: float, steps: int, prior: Sequence[tuple[float, float, int]] = ()
) -> float:
    """Smallest σ (to 1e-4) such that prior history + `steps` steps at (σ, q) spends at most `target_epsilon`."""
    spent = epsilon_of(prior, delta)
    if spent >= target_epsilon:
        raise PrivacyError(f"the ledger already spent ε={spent:.3f} ≥ target {target_epsilon}; nothing left")
    low, high = 0.05, 1.0
    while epsilon_of([*prior, (high, q, steps)], delta) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise PrivacyError(f"no noise level reaches ε={target_epsilon} in {steps} steps at q={q:.4f}")
    while high - low > 1e-4:
        mid = (low + high) / 2
        if epsilon_of([*prior, (mid, q, steps)], delta) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


@dataclass(frozen=True)
class LedgerEntry:
    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float  # cumulative, after this entry
    time: str


class PrivacyLedger:
    """A site's privacy spending, kept in a JSON file beside its data (never sent anywhere).

    δ is fixed when the ledger is created; every later ε is reported at that δ.
    """

    def __init__(self, path: str | os.PathLike[str], *, site: str, delta: float) -> None:
        self.path = Path(path)
        self.site = site
        self.delta = delta
        self.entries: list[LedgerEntry] = []
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != LEDGER_VERSION:
                raise ValueError(f"version {data.get('version')}, expected {LEDGER_VERSION}")
            self.delta = float(data["delta"])
            self.entries = [LedgerEntry(**e) for e in data["entries"]]
        except (ValueError, KeyError, TypeError) as err:
            raise PrivacyError(
                f"{self.path}: unreadable privacy ledger ({err}); do not delete it (that would forget spent "
                "privacy): restore it from backup or ask the site's data owner"
            ) from err
        if data.get("site") != self.site:
            raise PrivacyError(
                f"{self.path}: the ledger belongs to site '{data.get('site')}', not '{self.site}'"
            )

    @property
    def history(self) -> History:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    @property
    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta)

    def projected(self, noise_multiplier: float, q: float, steps: int) -> float:
        return epsilon_of([*self.history, (noise_multiplier, q, steps)], self.delta)

    def check(self, noise_multiplier: float, q: float, steps: int, budget: float) -> float:
        """The ε after the planned steps; raises BudgetExhausted if it would exceed `budget`."""
        after = self.projected(noise_multiplier, q, steps)
        if after > budget + 1e-9:
            raise BudgetExhausted(self.site, self.epsilon, after, budget)
        return after

    def record(self, *, run: str, round: int, noise_multiplier: float, q: float, steps: int) -> LedgerEntry:
        """Append the steps just taken and write the ledger atomically; returns the new entry."""
        entry = LedgerEntry(
            run=run,
            round=round,
            noise_multiplier=noise_multiplier,
            sample_rate=q,
            steps=steps,
            epsilon=self.projected(noise_multiplier, q, steps),
            time=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        self.entries.append(entry)
        payload: dict[str, Any] = {
            "version": LEDGER_VERSION,
            "site": self.site,
            "delta": self.delta,
            "accountant": "rdp (Opacus)",
            "unit": "patient",
            "entries": [asdict(e) for e in self.entries],
        }
        write_text_atomic(self.path, json.dumps(payload, indent=2) + "\n")
        return entry


def default_ledger_path(manifest: str | os.PathLike[str], site: str) -> Path:
    """Where a site keeps its ledger unless told otherwise: beside its manifest, never in a run folder."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in site)
    return Path(manifest).resolve().parent / ".fedpath-privacy" / f"{safe}.json"


def format_ledger(ledger: PrivacyLedger) -> str:
    """The ledger as a table: one line per round trained under DP, with the cumulative ε."""
    lines = [
        f"privacy ledger of site '{ledger.site}' ({ledger.path}): unit = patient, δ = {ledger.delta:.3g}, "
        "RDP accountant (Opacus)",
        f"{'run':<24} {'round':>5} {'σ':>7} {'q':>7} {'steps':>6} {'ε total':>8}  time",
    ]
    for e in ledger.entries:
        lines.append(
            f"{e.run[:24]:<24} {e.round:>5} {e.noise_multiplier:>7.3f} {e.sample_rate:>7.4f} {e.steps:>6} "
            f"{e.epsilon:>8.3f}  {e.time}"
        )
    if not ledger.entries:
        lines.append("(nothing spent yet)")
    else:
        lines.append(
            f"spent: ε = {ledger.epsilon:.3f} at δ = {ledger.delta:.3g} over {len(ledger.entries)} rounds"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class PrivatePlan:
    """What one round of DP training at a site will do: σ, q, steps and the resulting ε."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_before: float
    epsilon_after: float
    max_grad_norm: float
    expected_batch_size: int


def plan_round(
    config: DPConfig, ledger: PrivacyLedger, *, patients: int, epochs: int, rounds_left: int = 1
) -> PrivatePlan:
    """Resolve σ for this round and check the budget (raises BudgetExhausted).

    With `target_epsilon`, σ is calibrated so that this round and the `rounds_left − 1` after it, at the
    same σ, bring the ledger's total to the target.
    """
    q = sample_rate(config.expected_batch_size, patients)
    steps = epochs * steps_per_epoch(q)
    if config.noise_multiplier is not None:
        sigma = config.noise_multiplier
    else:
        assert config.target_epsilon is not None
        if ledger.epsilon >= 0.99 * config.target_epsilon:  # what is left would need near-infinite noise
            raise BudgetExhausted(ledger.site, ledger.epsilon, ledger.epsilon, config.budget)
        sigma = calibrate_noise(
            config.target_epsilon, ledger.delta, q, steps * max(rounds_left, 1), ledger.history
        )
    after = ledger.check(sigma, q, steps, config.budget)
    return PrivatePlan(
        sigma, q, steps, ledger.delta, ledger.epsilon, after, config.max_grad_norm, config.expected_batch_size
    )


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: BagDataset,
    plan: PrivatePlan,
    *,
    dim: int,
    seed: int,
) -> tuple[GradSampleModule, DPOptimizer, DataLoader[BagBatch]]:
    """Wrap ordinary training for DP-SGD: per-patient gradients, clipping and noise, Poisson batches.

    Returns the wrapped model, the DP optimizer and a loader yielding `plan.steps // epochs` Poisson batches
    per pass (an empty batch still takes a noisy step, as the analysis assumes).
    """
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    generator = torch.Generator().manual_seed(seed)
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset),
        sample_rate=plan.sample_rate,
        generator=generator,
        steps=steps_per_epoch(plan.sample_rate),
    )

    def collate(items: Sequence[BagItem]) -> BagBatch:
        if items:
            return collate_bags(items)
        return BagBatch(
            torch.zeros(0, 1, dim),
            torch.zeros(0, 1, dtype=torch.bool),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
        )

    loader: DataLoader[BagBatch] = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)  # type: ignore[arg-type]
    private_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    noise = torch.Generator().manual_seed(seed + 1)
    private_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        loss_reduction="mean",
        generator=noise,
    )
    return private_model, private_optimizer, loader


@torch.no_grad()
def proximal_step(model: nn.Module, anchor: Sequence[torch.Tensor], lr: float, mu: float) -> None:
    """w ← w − lr·μ·(w − w_global): FedProx's pull toward the global model, applied after a DP step."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p, g in zip(params, anchor, strict=True):
        p.sub_(lr * mu * (p - g.to(p.device)))
