"""Selectors: from scores (or features) to the sorted indices of the visual tokens kept.

Every selector returns a LongTensor of exactly ``k`` distinct indices into the visual tokens 0..N-1, sorted
ascending, so that the kept tokens keep their original order and positions in the draft's sequence.
"""

from __future__ import annotations

import math

import torch

_EPS = 1e-12


def num_kept(num_tokens: int, keep_ratio: float, keep_count: int | None = None) -> int:
    """Tokens kept out of ``num_tokens``: ``keep_count`` if given, else ``round(keep_ratio * N)``; within [1, N]."""
    if keep_count is not None:
        return max(1, min(num_tokens, keep_count))
    return max(1, min(num_tokens, round(keep_ratio * num_tokens)))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[N] -> [k] sorted indices of the k highest scores (ties: lower index first)."""
    n = scores.shape[0]
    # A tiny index-dependent offset makes ties deterministic across platforms (torch.topk's order is not).
    tie = torch.arange(n, 0, -1, dtype=torch.float32) * (1e-7 / n)
    return torch.topk(scores.float() + tie, k, sorted=False).indices.sort().values


def weighted_sum(scores: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum_s w_s * score_s over the scores with a non-zero weight: [N]."""
    total = None
    for name, w in weights.items():
        if w:
            part = w * scores[name]
            total = part if total is None else total + part
    assert total is not None, "at least one weight must be non-zero"
    return total


def greedy_diverse(
    visual: torch.Tensor, k: int, quality: torch.Tensor | None = None, diversity: float = 1.0
) -> torch.Tensor:
    """Greedy max-min selection (DivPrune's farthest-point heuristic), optionally traded against a quality score.

    Step 1 takes the token with the highest ``quality`` (or, without one, the token farthest on average from the
    others); each later step takes ``argmax_i quality_i + diversity * min_{j in S} (1 - cos(x_i, x_j))``.

    Args:
        visual: [N, H] tokens.
        k: tokens to keep (1..N).
        quality: [N] optional per-token score in [0, 1] (e.g. relevance); None: pure diversity.
        diversity: weight of the min-distance term.

    Returns:
        [k] sorted indices.
    """
    u = visual.float()
    u = u / u.norm(dim=1, keepdim=True).clamp_min(_EPS)
    dist = 1 - u @ u.T  # [N, N] cosine distance
    base = torch.zeros(u.shape[0]) if quality is None else quality.float()
    first = int(torch.argmax(dist.mean(dim=1))) if quality is None else int(torch.argmax(base))
    chosen = [first]
    nearest = dist[first].clone()  # [N] distance to the closest chosen token
    taken = torch.zeros(u.shape[0], dtype=torch.bool)
    taken[first] = True
    for _ in range(k - 1):
        gain = (base + diversity * nearest).masked_fill(taken, -math.inf)
        i = int(torch.argmax(gain))
        chosen.append(i)
        taken[i] = True
        nearest = torch.minimum(nearest, dist[i])
    return torch.tensor(sorted(chosen), dtype=torch.long)


def grid_shape(num_tokens: int) -> tuple[int, int]:
    """(rows, cols) of the visual token grid: square when N is a perfect square, else one row (raster order)."""
    side = math.isqrt(num_tokens)
    return (side, side) if side * side == num_tokens else (1, num_tokens)


def uniform_grid(num_tokens: int, k: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """k tokens spread evenly over the 2-D patch grid (a centred lattice, strided in both directions).

    A lattice of r x c points (r * c >= k, aspect matching the grid) is laid over the grid at cell centres; when
    r * c > k, k of its points are taken at evenly spaced ranks. Returns [k] sorted distinct indices.
    """
    rows, cols = grid or grid_shape(num_tokens)
    assert rows * cols == num_tokens, (rows, cols, num_tokens)
    r = max(1, min(rows, round(math.sqrt(k * rows / cols))))
    c = min(cols, math.ceil(k / r))
    r = max(r, math.ceil(k / c))  # c was clipped to cols: take more rows (k <= rows * cols keeps r <= rows)
    ys = ((torch.arange(r) + 0.5) * rows / r).long()  # [r] distinct since r <= rows
    xs = ((torch.arange(c) + 0.5) * cols / c).long()  # [c]
    lattice = (ys[:, None] * cols + xs[None, :]).flatten()  # [r*c] sorted, distinct
    pick = torch.linspace(0, lattice.numel() - 1, k).round().long()  # distinct: spacing >= 1
    return lattice[pick]
