"""Visual-token scores: pure functions of tensors, one score per visual token, each normalized to [0, 1].

Notation: ``X`` [N, H] are the draft's visual tokens (projected into the language model's embedding space, the
rows the draft would prefill), ``E`` [T, H] the embeddings of the question tokens, ``A`` [heads, R, N] attention
weights of R query rows over the N visual tokens (from a cheap probe, see ``covspec.pruning.probe``).
Higher is better for every score: the selector keeps the tokens with the highest (weighted) scores.

- **query relevance** (how much the question aligns with / attends to the token):
  embedding form  ``rel_i = max_t cos(x_i, e_t)`` (``embedding_relevance``);
  attention form  ``rel_i = mean_{h, r} A[h, r, i]`` (``attention_relevance``, question rows only).
- **token activity** (how strongly the token is activated): ``act_i = ||x_i||_2`` (``token_activity``), or the
  attention it receives from every row (``attention_received``).
- **low-rank dependency** (how much of the token the *other* tokens do not explain): the ridge leave-one-out
  residual of the unit-normalized token ``u_i = x_i / ||x_i||``,
  ``d_i = min_b ||u_i - sum_{j != i} b_j u_j||^2 + lam ||b||^2 = lam * l_i / (1 - l_i)``, where
  ``l_i = u_i^T (U^T U + lam I)^{-1} u_i`` is the ridge leverage score (``lowrank_dependency``). A token with
  k exact copies has ``d = lam / (k - 1 + lam)``; a token orthogonal to all others has ``d = 1``.

``minmax`` maps each raw score to [0, 1] so that the joint weights compare like with like.
"""

from __future__ import annotations

import torch

_EPS = 1e-12
DEFAULT_RIDGE = 0.05
"""lam of ``lowrank_dependency``, relative to the unit norm of each token."""


def minmax(scores: torch.Tensor) -> torch.Tensor:
    """[N] -> [N] in [0, 1]: (s - min) / (max - min); all zeros when every score is equal."""
    lo, hi = torch.aminmax(scores)
    return (scores - lo) / (hi - lo).clamp_min(_EPS)


def embedding_relevance(visual: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Query relevance in the language model's embedding space.

    Args:
        visual: [N, H] visual tokens.
        query: [T, H] embeddings of the question tokens (T >= 1).

    Returns:
        [N] in [0, 1]: min-max normalized ``max_t cos(x_i, e_t)`` (the best-aligned question token counts).
    """
    if query.shape[0] == 0:
        raise ValueError("embedding_relevance needs at least one question token")
    v = visual.float()
    q = query.float()
    v = v / v.norm(dim=1, keepdim=True).clamp_min(_EPS)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(_EPS)
    return minmax((v @ q.T).amax(dim=1))  # [N]


def attention_relevance(attn: torch.Tensor) -> torch.Tensor:
    """Query relevance from attention weights of the question rows.

    Args:
        attn: [heads, R, N] attention of R question rows over the N visual tokens (a probe's rows, softmax over
            the whole prefix, restricted to the visual columns).

    Returns:
        [N] in [0, 1]: min-max normalized mean over heads and rows.
    """
    return minmax(attn.float().mean(dim=(0, 1)))


def token_activity(visual: torch.Tensor) -> torch.Tensor:
    """Token activity as activation magnitude: [N, H] -> [N] in [0, 1], min-max normalized ``||x_i||_2``."""
    return minmax(visual.float().norm(dim=1))


def attention_received(attn: torch.Tensor) -> torch.Tensor:
    """Token activity as attention received (FastV): [heads, R, N] -> [N] in [0, 1] (mean over heads and rows)."""
    return minmax(attn.float().mean(dim=(0, 1)))


def cosine_gram(visual: torch.Tensor) -> torch.Tensor:
    """[N, H] -> [N, N] cosine similarities ``U U^T`` of the unit-normalized tokens (shared by the low-rank score and
    the greedy selection)."""
    u = visual.float()
    u = u / u.norm(dim=1, keepdim=True).clamp_min(_EPS)
    return u @ u.T


def lowrank_dependency(
    visual: torch.Tensor, ridge: float = DEFAULT_RIDGE, gram: torch.Tensor | None = None
) -> torch.Tensor:
    """How much of each token the others cannot explain (ridge leave-one-out residual); redundant tokens score low.

    The residual is ``d_i = lam l_i / (1 - l_i)`` with the ridge leverage ``l_i = u_i^T (U^T U + lam I)^-1 u_i``
    ``= 1 - lam [(K + lam I)^-1]_ii`` (``K = U U^T``): one Cholesky factorization in the smaller of the feature
    space (H x H) and the token space (N x N, or a given ``gram``).

    Args:
        visual: [N, H] visual tokens.
        ridge: lam > 0; smaller separates near-duplicates more sharply.
        gram: [N, N] ``cosine_gram(visual)`` if already computed (the token-space route is then used).

    Returns:
        [N] in [0, 1].
    """
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge!r}")
    n, h = visual.shape
    if gram is None and h < n:  # feature space: l_i = u_i^T (U^T U + lam I)^-1 u_i
        u = visual.float()
        u = u / u.norm(dim=1, keepdim=True).clamp_min(_EPS)
        a = u.T @ u  # [H, H]
        a.diagonal().add_(ridge)
        leverage = ((u @ torch.cholesky_inverse(torch.linalg.cholesky(a))) * u).sum(dim=1).clamp_(0, 1 - 1e-6)
        return minmax(leverage / (1 - leverage))  # lam l / (1 - l), the constant lam vanishes in the normalization
    a = (cosine_gram(visual) if gram is None else gram).clone()  # token space: d_i = 1 / [(K + lam I)^-1]_ii - lam
    a.diagonal().add_(ridge)
    inv_diag = torch.cholesky_inverse(torch.linalg.cholesky(a)).diagonal()  # [N]
    return minmax(1 / inv_diag)
