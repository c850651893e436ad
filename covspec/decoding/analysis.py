"""Analytic expectations for speculative decoding (Leviathan et al., 2023), for reporting beside measurements.

With per-token acceptance rate alpha (assumed i.i.d.), draft length gamma, and costs in units of one target
decode step (draft step c, verification of a block v, link round trip r):

    E[tokens per round] = (1 - alpha^(gamma + 1)) / (1 - alpha)
    time per round      = gamma * c + v + r
    speedup bound       = E[tokens per round] / time per round      (target-only: 1 token per unit)

With v = 1 and r = 0 this is the paper's bound; v > 1 and r > 0 account for a block verify costing more than one
decode step and for the device-edge round trip that speculation pays every round and target-only streaming does not.
"""

from __future__ import annotations


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """Expected committed tokens per round (accepted drafts + the bonus/correction)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def alpha_from_acceptance_length(mean_acceptance_length: float, gamma: int, tol: float = 1e-9) -> float:
    """The i.i.d. acceptance rate whose expected acceptance length is the measured one (bisection)."""
    target = min(max(mean_acceptance_length, 1.0), gamma + 1.0)
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if expected_tokens_per_round(mid, gamma) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def speedup_bound(alpha: float, gamma: int, cost_ratio: float, verify_cost: float = 1.0, rtt: float = 0.0) -> float:
    """Expected speedup over target-only decoding; costs in target decode steps (see module docstring)."""
    return expected_tokens_per_round(alpha, gamma) / (gamma * cost_ratio + verify_cost + rtt)
