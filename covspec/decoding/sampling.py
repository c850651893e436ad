"""Turning logits into the distributions p (target) and q (draft), and drawing tokens from them.

Both sides must build their distribution with :func:`probs_from_logits` and the same sampling
parameters: speculative sampling is lossless with respect to *that* p, so any difference in
temperature or top-p handling between draft and target would silently change what "lossless" means.
Greedy decoding is the temperature-0 case: p and q become one-hot and every rule of
:mod:`covspec.decoding.verify` reduces to the greedy one.
"""

from __future__ import annotations

import torch
from torch import Tensor


def probs_from_logits(logits: Tensor, temperature: float, top_p: float = 1.0) -> Tensor:
    """Sampling distribution over the vocabulary.

    Args:
        logits: ``[..., V]`` raw scores.
        temperature: 0 for greedy (one-hot at the argmax, ties to the lowest index like
            ``torch.argmax``); otherwise the softmax temperature.
        top_p: nucleus mass in ``(0, 1]``. Keeps the smallest set of most probable tokens whose mass
            is ``>= top_p`` (always at least the top token) and renormalizes. Among equal
            probabilities the lower index ranks first, so the kept set is deterministic.

    Returns:
        ``[..., V]`` probabilities (float32, or float64 for float64 logits), rows summing to 1.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if temperature == 0:
        one_hot = torch.zeros_like(logits, dtype=dtype)
        return one_hot.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax(logits.to(dtype) / temperature, dim=-1)  # [..., V]
    if top_p >= 1.0:
        return probs
    # Stable descending sort: ties keep index order, so the truncation is deterministic.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # [..., V]
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly better-ranked tokens
    drop = mass_before >= top_p  # never true for the first token (mass_before == 0 < top_p)
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample(probs: Tensor, generator: torch.Generator, num_samples: int | None = None) -> Tensor:
    """Draw tokens by inverse CDF, one uniform per draw (so randomness use is fixed per call).

    Tokens with probability 0 are never drawn (the search takes the first index whose cumulative
    mass exceeds the uniform), so a one-hot row always yields its hot index: greedy needs no branch.
    Rows need not be normalized.

    Args:
        probs: ``[V]`` or ``[B, V]`` (any leading dims) non-negative weights.
        generator: source of randomness, on ``probs.device``.
        num_samples: ``None`` for one token per row; ``n`` for ``n`` i.i.d. draws (with replacement).

    Returns:
        Long tensor ``[...]`` (``num_samples=None``) or ``[..., n]``; no host sync.
    """
    n = 1 if num_samples is None else num_samples
    # float64 cumsum: over a 150k vocabulary float32 rounding would bias the tail tokens.
    cdf = probs.to(torch.float64).cumsum(-1)  # [..., V]
    u = torch.rand((*probs.shape[:-1], n), generator=generator, device=probs.device, dtype=torch.float64)
    u = u * cdf[..., -1:]  # [..., n] in [0, total)
    tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)  # [..., n]
    return tokens.squeeze(-1) if num_samples is None else tokens
