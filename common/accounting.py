"""Privacy accounting both sides agree on: the RDP composition of sampled Gaussian mechanisms (Opacus).

Used by a site for its per-patient DP-SGD ledger and by the coordinator for client-level (central) DP.
Opacus is imported only when an ε is actually computed (it takes seconds to import).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

# δ of client-level DP: the unit is a whole site, so δ must be far below 1/(number of sites)
CENTRAL_DELTA = 1e-5
# Lifetime ε of a site's per-patient DP when neither the site (`--privacy-budget`) nor the run (dp-budget,
# dp-epsilon) sets one: never unlimited. 8 is the upper end of the budgets DP-SGD work reports as meaningful
# (Abadi et al. 2016; Opacus's examples); above it the bound on a membership-inference attacker's advantage
# is close to vacuous.
DEFAULT_BUDGET_EPSILON = 8.0
# How a site picks δ when the run does not set dp-delta (client/privacy.py default_delta), as reported.
DEFAULT_DELTA_RULE = "min(1e-5, 1/(100·training patients)) per site"


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε at `delta` of the RDP composition of (noise multiplier σ, sampling rate q, steps) entries
    (0 for an empty history): Opacus's RDPAccountant, computed the way it does (Σ steps × RDP(σ, q) over its
    default orders, then the optimal conversion), with each (σ, q)'s RDP computed once per process.

    A site's ledger gains one entry per round, each with its own calibrated σ; without the cache every round's
    calibration recomputed every earlier round's RDP at each step of its search, and round time grew with the
    round number."""
    if not history:
        return 0.0
    from opacus.accountants.analysis.rdp import get_privacy_spent

    total = np.zeros(len(_orders()))
    for sigma, q, steps in history:
        total += int(steps) * _rdp_per_step(float(sigma), float(q))
    eps, _ = get_privacy_spent(orders=_orders(), rdp=total, delta=delta)
    return float(eps)


@functools.cache
def _orders() -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant

    return tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at each order (read-only: shared by the cache)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(_orders())), dtype=float)
    rdp.setflags(write=False)
    return rdp
