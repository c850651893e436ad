"""Parallel branching: which continuations the device drafts while a block is verified, and which one matches.

Pure bookkeeping (no model, no cache): ``covspec.runtime.pipeline`` drafts the branches and owns the cache.

Words. A block x_0..x_{k-1} is in flight. The edge will answer with n accepted drafts (0..k) and one token c
(the correction at position n, or the bonus after all k). A *branch* bets on (n, c):

- the *main* branch bets on n = k and c = the draft's own next token after x_{k-1} (its guess of the bonus);
- an *alternative* branch at position j bets on n = j and c = the draft's second choice at j (the most probable
  token other than x_j; under greedy decoding the correction is the target's argmax, which differs from x_j).

Each branch then drafts the next block after its bet, with the same rule as any block. When the verdict arrives,
the device commits the accepted drafts and c exactly as without branching, then keeps the branch whose bet
matches (a *hit*): its drafts are the start of the next block, drafted from the very prefix that is now committed,
with their q rows, so they are verified like any other draft. No branch matching is a *miss*: everything drafted
during the wait is dropped.

Which alternatives. Up to ``budget - 1`` of them (the main branch takes one unit of the budget), at the block's
least confident positions, ranked by the draft's own estimate of the chance that the bet wins: the probability it
gives to reaching position j (the product of its confidences before j) times the probability of its second
choice at j. Third choices are bets too, ranked the same way: where the draft is torn three ways they outrank the
second choices of surer positions, and a device with time to spare drafts them after those. Branches whose bet is
EOS are never drafted (if c is EOS the answer ends anyway).

Exactness. A hit only decides *which* already drafted tokens are proposed next; each of them was drawn from q
given exactly the committed prefix, with device randomness the edge never sees, and is verified as usual. Under
greedy decoding the output is token-identical to the target's; under sampling the output distribution is the
target's (``tests/test_runtime_sampling.py`` runs the full path with branching on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DraftToken:
    """One drafted token and what verification and branching need of its position."""

    id: int
    q: torch.Tensor  # [V] the draft distribution it was drawn from (one-hot when greedy)
    conf: float  # the draft's top probability at this position (see covspec.decoding.drafting)
    second: int  # the most probable token other than ``id``
    second_p: float  # its probability
    third: int = -1  # the most probable token other than ``id`` and ``second`` (-1: not known)
    third_p: float = 0.0  # its probability


@dataclass
class Branch:
    """A bet (root, token) on the verdict, and the next block drafted after it."""

    root: int  # number of accepted drafts it bets on (the block length for the main branch)
    token: int  # the token c it bets the edge commits at ``root``
    score: float = 0.0  # the draft's estimate of the chance that the bet wins (ordering only)
    drafts: list[DraftToken] = field(default_factory=list)  # drafted after ``token``
    started: bool = False  # ``token`` was fed to the draft (only started branches can be kept)
    done: bool = False  # drafted as far as the next block would go
    kv: Any = None  # its cache suffix from the root on, while it is not the live path (runtime-owned)
    logits: torch.Tensor | None = None  # [V] next-token logits after its last fed token (runtime-owned)
    node: int = -1  # sent in a token tree: the index of its bet among the tree's nodes (runtime-owned)


def reach_probabilities(block: list[DraftToken]) -> list[float]:
    """P(reach j) ≈ Π_{i<j} conf_i for j = 0..k (the draft's own estimate; j = k: the whole block accepted)."""
    out = [1.0]
    for tok in block:
        out.append(out[-1] * tok.conf)
    return out


def plan_alternatives(
    block: list[DraftToken], count: int, eos_token_ids: int | frozenset[int], max_root: int | None = None
) -> list[Branch]:
    """The ``count`` alternative branches to draft for ``block``, most promising first.

    Args:
        block: the drafted tokens in flight.
        count: how many (the branch budget minus the main branch).
        eos_token_ids: the EOS id(s); bets on EOS are skipped.
        max_root: only positions j < max_root (a branch at j is useless once j + 1 tokens end the answer).

    Returns:
        Branches with ``root`` j, ``token`` the second (or third) choice z at j and ``score`` P(reach j)·q_j(z).
    """
    if count <= 0:
        return []
    eos = frozenset([eos_token_ids]) if isinstance(eos_token_ids, int) else eos_token_ids
    reach = reach_probabilities(block)
    limit = len(block) if max_root is None else min(len(block), max_root)
    ranked = [
        Branch(root=j, token=token, score=reach[j] * p)
        for j, tok in enumerate(block[:limit])
        for token, p in ((tok.second, tok.second_p), (tok.third, tok.third_p))
        if token >= 0 and token not in eos
    ]
    ranked.sort(key=lambda b: (-b.score, b.root))  # stable, ties to the earlier position
    return ranked[:count]


def match(branches: list[Branch], num_accepted: int, token: int) -> Branch | None:
    """The started branch whose bet is (``num_accepted``, ``token``), or None (a miss)."""
    for b in branches:
        if b.started and b.root == num_accepted and b.token == token:
            return b
    return None
