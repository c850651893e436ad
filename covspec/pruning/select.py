"""Selectors: from scores (or features) to the sorted indices of the visual tokens kept.

Every selector returns a LongTensor of exactly ``k`` distinct indices into the visual tokens 0..N-1, sorted
ascending, so that the kept tokens keep their original order and positions in the draft's sequence.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from covspec.pruning.scores import cosine_gram, minmax

_EPS = 1e-12
_TAKEN = -1e9  # novelty of a kept token: never the argmax again (finite, so diversity * _TAKEN stays finite)


def num_kept(num_tokens: int, keep_ratio: float, keep_count: int | None = None) -> int:
    """Tokens kept out of ``num_tokens``: ``keep_count`` if given, else ``round(keep_ratio * N)``; within [1, N]."""
    if keep_count is not None:
        return max(1, min(num_tokens, keep_count))
    return max(1, min(num_tokens, round(keep_ratio * num_tokens)))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[N] -> [k] sorted indices of the k highest scores (ties: lower index first)."""
    # A stable sort makes ties deterministic (torch.topk's choice among equal values is not specified).
    return torch.sort(scores, descending=True, stable=True).indices[:k].sort().values


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
    visual: torch.Tensor,
    k: int,
    quality: torch.Tensor | None = None,
    diversity: float = 1.0,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy selection trading a per-token quality against redundancy with the tokens already kept.

    Step t keeps ``argmax_i quality_i + diversity * novelty_i(S)`` over the tokens not yet kept, where
    ``novelty_i(S) = min_{j in S} (1 - cos(x_i, x_j)) / max_{a,b} (1 - cos(x_a, x_b))`` is the normalized cosine
    distance to the closest kept token (0 for a duplicate of a kept token, 1 for the most distant pair). Without a
    quality this is DivPrune's max-min (farthest-point) heuristic, started from the token farthest on average from
    the others; with one, the first token is the best-quality one.

    Args:
        visual: [N, H] tokens.
        k: tokens to keep (1..N).
        quality: [N] optional per-token score (e.g. the joint score); None: pure diversity.
        diversity: weight of the novelty term (> 0).
        gram: [N, N] cosine similarities (``scores.cosine_gram(visual)``) if already computed.

    Returns:
        [k] sorted indices.
    """
    if not diversity > 0:
        raise ValueError(f"diversity must be > 0, got {diversity!r}")
    dist = (1 - (cosine_gram(visual) if gram is None else gram)).clamp_min_(0)  # [N, N] cosine distance
    dist = (dist / dist.max().clamp_min(_EPS)).cpu().numpy()
    # The loop runs k times on [N] vectors: numpy's per-call cost is a fraction of torch's at these sizes.
    base = np.zeros(dist.shape[0], dtype=np.float32) if quality is None else quality.float().cpu().numpy()
    first = int(np.argmax(dist.mean(axis=1) if quality is None else base))
    chosen = [first]
    nearest = dist[first].copy()  # [N] novelty of every token w.r.t. the kept set
    nearest[first] = _TAKEN
    for _ in range(k - 1):
        i = int(np.argmax(base + diversity * nearest))
        chosen.append(i)
        np.minimum(nearest, dist[i], out=nearest)
        nearest[i] = _TAKEN
    chosen.sort()
    return torch.tensor(chosen, dtype=torch.long)


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


@functools.lru_cache(maxsize=64)
def lattice_cells(num_tokens: int, k: int, grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch grid cut into k cells around the k points of ``uniform_grid`` (nearest point, ties to the lower).

    Returns:
        cell: [N] the cell (0..k-1) of every token; centrality: [N] in [0, 1], 1 at the cell's lattice point,
        falling with the squared distance to it. Memoized: it depends only on the geometry.
    """
    rows, cols = grid or grid_shape(num_tokens)
    points = uniform_grid(num_tokens, k, (rows, cols))  # [k]
    ty, tx = torch.arange(num_tokens) // cols, torch.arange(num_tokens) % cols
    d2 = (ty[:, None] - points[None] // cols) ** 2 + (tx[:, None] - points[None] % cols) ** 2  # [N, k]
    nearest, cell = d2.min(dim=1)
    centrality = 1 - nearest.float() / max(float(nearest.max()), 1.0)
    return cell, centrality


def stratified_top(scores: torch.Tensor, k: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Spatially stratified selection: in each of the k ``lattice_cells``, the token with the highest score.

    The kept set covers the image as evenly as the uniform baseline (every region keeps one token, so the
    proportions of objects and background, and where things are, survive), while the score decides *which* token
    of each region survives. Near-ties go to the token closest to the cell's lattice point, so a flat region
    keeps its uniform-lattice token.

    Args:
        scores: [N] per-token scores (higher is better).
        k: tokens to keep (1..N).
        grid: (rows, cols) of the patch grid; default ``grid_shape(N)``.

    Returns:
        [k] sorted indices, one per cell.
    """
    n = scores.shape[0]
    cell, centrality = lattice_cells(n, k, grid)
    # On the CPU, where the (memoized) lattice lives: scores of a GPU draft come over once, [N] floats.
    s = minmax(scores.double().cpu()) + 1e-6 * centrality.double()  # [N] in [0, 1 + 1e-6]
    order = torch.argsort(cell.double() * 2 - s)  # grouped by cell, best first within each
    grouped = cell[order]
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = grouped[1:] != grouped[:-1]
    return order[first].sort().values


def representation_counts(features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[k] how many visual tokens each kept token stands for: itself, plus every dropped token whose most
    cosine-similar kept token it is (ToMe-style assignment; ties go to the first kept token). Sums to N.

    Args:
        features: [N, H] the visual tokens (the draft's projected features).
        keep: [k] distinct indices into 0..N-1.
    """
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    owner = (unit @ unit[keep].T).argmax(dim=-1)  # [N]: index into keep
    owner[keep] = torch.arange(int(keep.shape[0]), device=owner.device)  # a kept token represents itself
    return torch.bincount(owner, minlength=int(keep.shape[0])).to(torch.float32)
