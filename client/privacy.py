"""Per-patient differential privacy at a site: DP-SGD with Opacus, and a persistent (ε, δ) ledger.

The privacy unit is the **patient**: a patient's slides form one bag, each optimisation step takes a
Poisson sample of patients (each patient independently with probability q = expected patients per step ÷
patients at the site), every patient's gradient is clipped to `max_grad_norm` and Gaussian noise of
σ·max_grad_norm is added (Opacus `GradSampleModule` + `DPOptimizer`). The MIL models are mask-aware and
have no batch statistics, so a patient's gradient never depends on the other bags in its batch.

The ledger is a site-local JSON file that outlives runs and restarts: every round appends (σ, q, steps),
and ε is the RDP composition of the whole history at the ledger's δ. A round trained without DP is recorded
too, and voids the guarantee: ε = ∞ from then on. A site refuses a round whose planned steps would take it
past its budget, and re-checks on the ledger as it is on disk when it records the round (another run may
have spent in between). The ledger is tamper-evident: each entry carries the SHA-256 of the previous hash and
the entry, and an anchor file beside it keeps the last hash and the entry count, so an edited, truncated or
deleted ledger stops the site instead of starting over at ε = 0. Writers hold an exclusive lock
(`fcntl.flock` on a lock file beside the ledger) from the re-read to the atomic write.

The noise is drawn from a generator seeded from the operating system's CSPRNG in the site's process, never
from the run seed: the coordinator knows the run seed, the round and the site, and could otherwise regenerate
the noise and subtract it. Only the Poisson sampling of patients stays seeded (reproducible, and public
anyway in the analysis).

FedProx under DP: the proximal term cannot go into the loss (the DP optimizer replaces gradients with
clipped, noised per-patient gradients), so after each noisy step the weights move toward the global model,
w ← w − lr·μ·(w − w_global): data-independent, so it costs no privacy.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import DataLoader

from fedpath.common.accounting import DEFAULT_BUDGET_EPSILON, epsilon_of
from fedpath.common.atomic import write_text_atomic
from fedpath.common.bags import BagBatch, BagDataset, BagItem, collate_bags

if TYPE_CHECKING:  # Opacus takes seconds to import: only when a site actually trains or accounts with DP
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

LEDGER_VERSION = 2  # 2: hash-chained entries, rounds without DP, the site policy in force


class PrivacyError(Exception):
    """A DP setting or ledger that cannot be used; the message says what to change."""


class BudgetExhausted(PrivacyError):
    """Training this round would take the site past its privacy budget."""

    def __init__(
        self, site: str, spent: float, projected: float, budget: float, what: str = "privacy budget"
    ) -> None:
        self.site, self.spent, self.projected, self.budget = site, spent, projected, budget
        void = " (a round without DP is in the ledger: the guarantee is void)" if math.isinf(spent) else ""
        limit = "budget" if what == "privacy budget" else "limit"
        super().__init__(
            f"site '{site}': {what} exhausted: ε spent {spent:.3f}{void}, this round would reach "
            f"{projected:.3f} > {limit} {budget:.3f}; the site no longer trains (raise its budget only with "
            "its data owner's consent)"
        )


class LedgerTampered(PrivacyError):
    """The ledger on disk is not the one the site wrote: edited, truncated or missing."""


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
        None,
        gt=0,
        description=f"the site's lifetime ε budget; default target_epsilon, else {DEFAULT_BUDGET_EPSILON:g}",
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
        return self.target_epsilon if self.target_epsilon is not None else DEFAULT_BUDGET_EPSILON


def default_delta(patients: int) -> float:
    """δ = min(1e-5, 1/(100·n)) for n training patients.

    δ bounds the probability that the guarantee fails outright; "publish one random patient's record" is
    (0, 1/n)-DP, so δ must sit far below 1/n. 1e-5 is the usual DP-SGD choice (Abadi et al. 2016, Opacus) and
    at a hospital's scale (tens to thousands of patients) is 1000× or more below 1/n; 1/(100·n) keeps that
    margin at 100× for very large sites.
    """
    return min(1e-5, 1.0 / (100 * max(patients, 1)))


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
    """Smallest σ (to 1e-4) such that prior history + `steps` steps at (σ, q) spends at most `target_epsilon`.

    ε falls smoothly as σ grows, so the bracket [σ spending too much, σ within budget] is narrowed by the
    Illinois variant of regula falsi rather than by halving: 7-12 ε computations instead of 15-24, each a
    full Opacus RDP curve (about 0.1 s). Every probe stays at least half the tolerance inside the bracket, so
    the bracket closes to 1e-4 and the σ returned is one that was computed to be within budget."""
    spent = epsilon_of(prior, delta)
    if spent >= target_epsilon:
        raise PrivacyError(f"the ledger already spent ε={spent:.3f} ≥ target {target_epsilon}; nothing left")

    def excess(sigma: float) -> float:
        return epsilon_of([*prior, (sigma, q, steps)], delta) - target_epsilon

    tolerance = 1e-4
    low, high = 0.05, 1.0
    f_low: float | None = None  # excess at `low` (> 0), once computed
    f_high = excess(high)
    while f_high > 0:
        low, f_low, high = high, f_high, high * 2
        if high > 1e4:
            raise PrivacyError(f"no noise level reaches ε={target_epsilon} in {steps} steps at q={q:.4f}")
        f_high = excess(high)
    last = 0  # which end the previous probe replaced: -1 low, +1 high
    while high - low > tolerance:
        if f_low is None or not math.isfinite(f_low):
            probe = (low + high) / 2
        else:
            probe = high - f_high * (high - low) / (f_high - f_low)
            probe = min(max(probe, low + tolerance / 2), high - tolerance / 2)
        f_probe = excess(probe)
        if f_probe > 0:
            if last == -1:
                f_high /= 2  # Illinois: the end kept twice in a row weighs half, so it moves next
            low, f_low, last = probe, f_probe, -1
        else:
            if last == 1 and f_low is not None:
                f_low /= 2
            high, f_high, last = probe, f_probe, 1
    return high


@dataclass(frozen=True)
class LedgerEntry:
    """One round trained at the site. `dp` False: trained without DP (σ, q 0), ε = ∞ from then on."""

    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float  # cumulative, after this entry
    time: str
    dp: bool = True
    policy: dict[str, Any] = field(default_factory=dict)  # the site policy in force (client/policy.py)
    hash: str = ""  # chain_hash(previous entry's hash, this entry without this field)

    def body(self) -> dict[str, Any]:
        """The entry as hashed: every field but `hash`."""
        data = asdict(self)
        del data["hash"]
        return data


def chain_hash(previous: str, body: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over canonical JSON (sorted keys, no spaces) of the previous hash and an entry."""
    text = json.dumps({"previous": previous, "entry": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


_RESTORE = (
    "restore the ledger and its .anchor file from the site's backup (both, from the same backup); do not "
    "delete or reset them, that would forget the privacy already spent. The site does not train until then."
)


class PrivacyLedger:
    """A site's privacy spending, kept in a JSON file at the site (never sent anywhere).

    δ is fixed when the ledger is created; every later ε is reported at that δ. Beside the ledger: an anchor
    (`NAME.anchor`, entry count and last hash, written after the ledger on every round) and a lock file
    (`NAME.lock`). Loading verifies the chain and the anchor (LedgerTampered when they disagree).
    """

    def __init__(self, path: str | os.PathLike[str], *, site: str, delta: float) -> None:
        self.path = Path(path)
        self.site = site
        self._new_delta = delta
        self.delta = delta
        self.entries: list[LedgerEntry] = []
        # read under the shared lock: never between a writer's ledger and its anchor (its first above all)
        with self._lock(fcntl.LOCK_SH):
            self._load()

    @property
    def anchor_path(self) -> Path:
        return self.path.with_name(self.path.name + ".anchor")

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _genesis(self) -> str:
        # binds the site and δ into the chain: editing δ (and so every ε) breaks the first entry's hash
        return chain_hash("", {"site": self.site, "delta": self.delta})

    def _read_anchor(self) -> tuple[int, str] | None:
        if not self.anchor_path.exists():
            return None
        try:
            data = json.loads(self.anchor_path.read_text())
            return int(data["entries"]), str(data["last_hash"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerTampered(f"{self.anchor_path}: unreadable ledger anchor ({err}); {_RESTORE}") from err

    def _load(self) -> None:
        # the anchor first: a writer writes the ledger, then the anchor, so the ledger read next is never older
        self.delta, self.entries = self._new_delta, []
        anchor = self._read_anchor()
        if not self.path.exists():
            if anchor is not None:
                raise LedgerTampered(
                    f"{self.path}: the privacy ledger is missing, but its anchor {self.anchor_path.name} shows "
                    f"it held {anchor[0]} round(s); {_RESTORE}"
                )
            return
        try:
            data = json.loads(self.path.read_text())
            version = data.get("version")
            if version not in (1, LEDGER_VERSION):
                raise ValueError(f"version {version}, expected {LEDGER_VERSION}")
            delta = float(data["delta"])
            entries = [LedgerEntry(**e) for e in data["entries"]]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise PrivacyError(
                f"{self.path}: unreadable privacy ledger ({err}); do not delete it (that would forget spent "
                "privacy): restore it from backup or ask the site's data owner"
            ) from err
        if data.get("site") != self.site:
            raise PrivacyError(
                f"{self.path}: the ledger belongs to site '{data.get('site')}', not '{self.site}'"
            )
        self.delta = delta
        previous = self._genesis()
        for i, entry in enumerate(entries):
            expected = chain_hash(previous, entry.body())
            if version == 1:  # written before the chain: chained as found, and written as version 2 next time
                entries[i] = entry = LedgerEntry(**{**entry.body(), "hash": expected})
            elif entry.hash != expected:
                raise LedgerTampered(
                    f"{self.path}: entry {i + 1} of {len(entries)} (run {entry.run}, round {entry.round}) "
                    f"does not match the hash chain: the ledger was edited after it was written; {_RESTORE}"
                )
            previous = entry.hash
        if anchor is None and version == LEDGER_VERSION:
            raise LedgerTampered(f"{self.path}: its anchor {self.anchor_path.name} is missing; {_RESTORE}")
        if anchor is not None:
            count, last = anchor
            if len(entries) < count or (count > 0 and entries[count - 1].hash != last):
                raise LedgerTampered(
                    f"{self.path}: holds {len(entries)} round(s), but its anchor shows {count} ending in "
                    f"another hash: rounds were removed or rewritten; {_RESTORE}"
                )
        self.entries = entries

    @contextlib.contextmanager
    def _lock(self, kind: int) -> Iterator[None]:
        """Hold the lock file's flock (`fcntl.LOCK_SH` to read, `LOCK_EX` to write). A reader of a ledger that
        does not exist, or whose folder this account may not write, reads without it."""
        if kind == fcntl.LOCK_SH and not self.path.parent.is_dir():
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle = self.lock_path.open("a")
        except OSError:
            if kind != fcntl.LOCK_SH:
                raise
            yield
            return
        with handle:
            fcntl.flock(handle.fileno(), kind)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's exclusive lock, with the ledger re-read from disk: what is checked and written
        inside sees every round another run recorded meanwhile."""
        with self._lock(fcntl.LOCK_EX):
            self._load()
            yield

    @property
    def void(self) -> bool:
        """Whether a round without DP is in the ledger (no finite guarantee is left)."""
        return any(not e.dp for e in self.entries)

    @property
    def history(self) -> History:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries if e.dp]

    @property
    def epsilon(self) -> float:
        return math.inf if self.void else epsilon_of(self.history, self.delta)

    def projected(self, noise_multiplier: float, q: float, steps: int) -> float:
        if self.void:
            return math.inf
        return epsilon_of([*self.history, (noise_multiplier, q, steps)], self.delta)

    def run_epsilon(self, run: str, planned: Sequence[tuple[float, float, int]] = ()) -> float:
        """ε spent by the rounds of one run alone (plus `planned` steps), at the ledger's δ."""
        mine = [e for e in self.entries if e.run == run]
        if any(not e.dp for e in mine):
            return math.inf
        return epsilon_of(
            [*((e.noise_multiplier, e.sample_rate, e.steps) for e in mine), *planned], self.delta
        )

    def check(
        self,
        noise_multiplier: float,
        q: float,
        steps: int,
        budget: float,
        *,
        run: str = "",
        max_epsilon_run: float = math.inf,
    ) -> float:
        """The ε after the planned steps; BudgetExhausted if it would exceed `budget`, or if the run's own
        ε would exceed `max_epsilon_run`."""
        after = self.projected(noise_multiplier, q, steps)
        if after > budget + 1e-9:
            raise BudgetExhausted(self.site, self.epsilon, after, budget)
        if math.isfinite(max_epsilon_run):
            in_run = self.run_epsilon(run, [(noise_multiplier, q, steps)])
            if in_run > max_epsilon_run + 1e-9:
                raise BudgetExhausted(
                    self.site, self.run_epsilon(run), in_run, max_epsilon_run, what="per-run ε limit"
                )
        return after

    def record(
        self,
        *,
        run: str,
        round: int,
        noise_multiplier: float | None,
        q: float = 0.0,
        steps: int = 0,
        budget: float = math.inf,
        max_epsilon_run: float = math.inf,
        policy: Mapping[str, Any] | None = None,
    ) -> LedgerEntry:
        """Append one round, under the ledger's lock: re-read it, re-check `budget` and `max_epsilon_run` on
        what is on disk now (BudgetExhausted: the round must not be released), append, write the ledger and
        then its anchor atomically. `noise_multiplier` None: a round trained without DP (ε = ∞ from then on)."""
        with self.locked():
            if noise_multiplier is None:
                dp, epsilon, noise_multiplier, q = False, math.inf, 0.0, 0.0
            else:
                dp = True
                epsilon = self.check(
                    noise_multiplier, q, steps, budget, run=run, max_epsilon_run=max_epsilon_run
                )
            entry = LedgerEntry(
                run=run,
                round=round,
                noise_multiplier=noise_multiplier,
                sample_rate=q,
                steps=steps,
                epsilon=epsilon,
                time=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                dp=dp,
                policy=dict(policy or {}),
            )
            previous = self.entries[-1].hash if self.entries else self._genesis()
            entry = LedgerEntry(**{**entry.body(), "hash": chain_hash(previous, entry.body())})
            self.entries.append(entry)
            self._write()
        return entry

    def _write(self) -> None:
        payload: dict[str, Any] = {
            "version": LEDGER_VERSION,
            "site": self.site,
            "delta": self.delta,
            "accountant": "rdp (Opacus)",
            "unit": "patient",
            "entries": [asdict(e) for e in self.entries],
        }
        write_text_atomic(self.path, json.dumps(payload, indent=2) + "\n")
        anchor = {"site": self.site, "entries": len(self.entries), "last_hash": self.entries[-1].hash}
        write_text_atomic(self.anchor_path, json.dumps(anchor, indent=2) + "\n")


LEDGER_KEY = "privacy-ledger"  # node config key (`fedpath site start --privacy-ledger`)


def ledger_path(
    site: str,
    *,
    explicit: str | os.PathLike[str] | None = None,
    manifest: str | os.PathLike[str] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Where a site's ledger is: the one rule of `site start` (which passes it on in the node config), `site
    privacy`, `site check` and the ClientApp.

    1. `explicit`: `--privacy-ledger`, node config 'privacy-ledger';
    2. beside the site's manifest: MANIFEST_FOLDER/.fedpath-privacy/SITE.json;
    3. RUN_DIR/privacy/SITE.json: simulation, where one machine plays every site and nothing outlives the run.
    """
    if explicit is not None and str(explicit):
        return Path(explicit).expanduser().resolve()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in site)
    if manifest is not None and str(manifest):
        return Path(manifest).expanduser().resolve().parent / ".fedpath-privacy" / f"{safe}.json"
    if run_dir is not None and str(run_dir):
        return Path(run_dir) / "privacy" / f"{safe}.json"
    raise PrivacyError(
        f"site '{site}': no privacy ledger location: give --privacy-ledger or the site's manifest"
    )


def format_ledger(ledger: PrivacyLedger) -> str:
    """The ledger as a table: one line per round (DP or not), with the cumulative ε."""
    lines = [
        f"privacy ledger of site '{ledger.site}' ({ledger.path}): unit = patient, δ = {ledger.delta:.3g}, "
        "RDP accountant (Opacus), hash chain verified",
        f"{'run':<24} {'round':>5} {'σ':>7} {'q':>7} {'steps':>6} {'ε total':>8}  time",
    ]
    for e in ledger.entries:
        noise = f"{e.noise_multiplier:>7.3f} {e.sample_rate:>7.4f}" if e.dp else f"{'no DP':>7} {'—':>7}"
        lines.append(f"{e.run[:24]:<24} {e.round:>5} {noise} {e.steps:>6} {e.epsilon:>8.3f}  {e.time}")
    if not ledger.entries:
        lines.append("(nothing spent yet)")
    else:
        lines.append(
            f"spent: ε = {ledger.epsilon:.3f} at δ = {ledger.delta:.3g} over {len(ledger.entries)} rounds"
        )
        if ledger.void:
            first = next(e for e in ledger.entries if not e.dp)
            lines.append(
                f"no finite guarantee: run {first.run} round {first.round} trained without DP (ε = ∞ from then on)"
            )
        if ledger.entries[-1].policy:
            policy = ", ".join(f"{k}={v}" for k, v in ledger.entries[-1].policy.items())
            lines.append(f"site policy in force at the last round: {policy}")
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
    config: DPConfig,
    ledger: PrivacyLedger,
    *,
    patients: int,
    epochs: int,
    rounds_left: int = 1,
    steps: int | None = None,
) -> PrivatePlan:
    """Resolve σ for this round and check the budget (raises BudgetExhausted). The round takes `steps`
    noisy steps when given, else `epochs` passes' worth (1/q steps each).

    With `target_epsilon`, σ is calibrated so that this round and the `rounds_left − 1` after it, at the
    same σ, bring the ledger's total to the target.
    """
    q = sample_rate(config.expected_batch_size, patients)
    steps = steps or epochs * steps_per_epoch(q)
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


def noise_generator() -> torch.Generator:
    """The generator of one DP optimizer's noise, seeded with 64 bits from the OS's CSPRNG (`secrets`).

    Not from the run seed, nor from torch's global generator (`train_epochs` seeds that from the run seed):
    the coordinator knows the run seed, the round and the site, and could regenerate seeded noise and
    subtract it. The seed never leaves this process. torch has no CSPRNG-backed generator (torchcsprng, which
    Opacus's `PrivacyEngine(secure_mode=True)` needs, is unmaintained), so the seed is the secret.
    """
    return torch.Generator().manual_seed(secrets.randbits(64))


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
    per pass (an empty batch still takes a noisy step, as the analysis assumes). `seed` drives the Poisson
    sampling only; the noise comes from `noise_generator()`.
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
    private_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator(),
        # Opacus's floating-point-safe sampling (sum of 4 Gaussians, Mironov 2012 / arXiv:2112.05307): on the
        # optimizer it needs no torchcsprng (only PrivacyEngine(secure_mode=True) does)
        secure_mode=True,
    )
    return private_model, private_optimizer, loader


@torch.no_grad()
def proximal_step(model: nn.Module, anchor: Sequence[torch.Tensor], lr: float, mu: float) -> None:
    """w ← w − lr·μ·(w − w_global): FedProx's pull toward the global model, applied after a DP step."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p, g in zip(params, anchor, strict=True):
        p.sub_(lr * mu * (p - g.to(p.device)))
