"""Privacy accounting both sides agree on: the RDP composition of sampled Gaussian mechanisms (Opacus).

Used by a site for its per-patient DP-SGD ledger and by the coordinator for client-level (central) DP.
Opacus is imported only when an ε is actually computed (it takes seconds to import).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    (0 for an empty history)."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    # RDP composes additively and Opacus computes each entry as steps × RDP(σ, q): entries with the same (σ, q)
    # merge exactly, which keeps a long ledger (one entry per round) fast to account
    steps: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        steps[(float(s), float(q))] = steps.get((float(s), float(q)), 0) + int(n)
    accountant = RDPAccountant()
    accountant.history = [(s, q, n) for (s, q), n in steps.items()]
    return float(accountant.get_epsilon(delta=delta))
