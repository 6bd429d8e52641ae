"""Privacy accounting both sides agree on: the RDP composition of sampled Gaussian mechanisms (Opacus).

Used by a site for its per-patient DP-SGD ledger and by the coordinator for client-level (central) DP.
Opacus is imported only when an ε is actually computed (it takes seconds to import).
"""

from __future__ import annotations

from collections.abc import Sequence

# δ of client-level DP: the unit is a whole site, so δ must be far below 1/(number of sites)
CENTRAL_DELTA = 1e-5


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε at `delta` of the RDP composition of (noise multiplier σ, sampling rate q, steps) entries
    (0 for an empty history)."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta=delta))
