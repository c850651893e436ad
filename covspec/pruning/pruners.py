"""Pruners: the joint CoVSpec pruner and the baselines behind one interface, built from ``cfg.pruning``.

A pruner runs on the device before the draft's prefill and needs nothing from the edge. ``select(adapter,
inputs)`` returns the sorted indices (into the visual tokens 0..N-1) of the tokens the draft keeps, or None to keep
them all (keep ratio 1.0, or a count >= N). The kept tokens keep their original positions in the draft's sequence
(``VLMAdapter.prefill(inputs, keep=...)``).

| method    | keeps                                                                            | needs            |
|-----------|----------------------------------------------------------------------------------|------------------|
| joint     | per lattice cell, the best ``w_r rel + w_a act + w_l lowrank`` (or greedy, topk) | features, probe* |
| random    | a uniform random subset (seeded)                                                 | nothing          |
| uniform   | an even lattice over the patch grid (strided in both directions)                 | nothing          |
| attention | the most attention received at decoder layer K (FastV-like probe, all rows)      | probe            |
| diversity | greedy max-min cosine distance (DivPrune-like)                                   | features         |

(*) relevance is the question rows' attention at decoder layer 0 (``relevance="attention"``, default: a partial
forward of one layer's q/k projections) or embedding-space similarity (``relevance="embedding"``: no forward).
Scores: ``covspec.pruning.scores``; selectors: ``covspec.pruning.select``; measurements: docs/pruning.md.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from covspec.config import PRUNING_METHODS, PruningConfig
from covspec.errors import ConfigError
from covspec.models.base import PromptInputs, VLMAdapter
from covspec.pruning import scores as S
from covspec.pruning.probe import probe_attention, question_embeddings, question_rows, visual_positions
from covspec.pruning.select import (
    greedy_diverse,
    num_kept,
    representation_counts,
    stratified_top,
    top_k,
    uniform_grid,
    weighted_sum,
)

SCORE_NAMES = ("relevance", "activity", "lowrank")
RELEVANCE_KINDS = ("attention", "embedding")
SELECTIONS = ("stratified", "greedy", "topk")


def visual_grid(adapter: VLMAdapter, inputs: PromptInputs) -> tuple[int, int] | None:
    """(rows, cols) of the visual tokens if the adapter knows it (``adapter.visual_grid(inputs)``), else None (the
    selectors then assume a square grid when N is a perfect square)."""
    grid = getattr(adapter, "visual_grid", None)
    return grid(inputs) if callable(grid) else None


@runtime_checkable
class Pruner(Protocol):
    """Chooses the visual tokens the draft keeps."""

    name: str
    keep_ratio: float

    def count(self, num_tokens: int) -> int:
        """How many of ``num_tokens`` visual tokens ``select`` keeps (``num_tokens``: it returns None)."""
        ...

    def select(self, adapter: VLMAdapter, inputs: PromptInputs) -> torch.Tensor | None:
        """[k] sorted distinct indices into the visual tokens 0..N-1, or None to keep every token."""
        ...

    def counts(self, adapter: VLMAdapter, inputs: PromptInputs, keep: torch.Tensor | None) -> torch.Tensor | None:
        """[k] how many visual tokens each kept one stands for, for the draft's proportional attention
        (``VLMAdapter.prefill(..., counts=)``); None when the pruner does not merge or keeps everything."""
        ...


def _check_ratio(keep_ratio: float, keep_count: int | None) -> None:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, int | float) or not math.isfinite(keep_ratio):
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if keep_count is not None and (isinstance(keep_count, bool) or not isinstance(keep_count, int) or keep_count < 1):
        raise ValueError(f"keep_count must be an integer >= 1 or None, got {keep_count!r}")


class _Pruner:
    """Shared plumbing: keep-count arithmetic, the identity shortcut and merging.

    ``merge``: the dropped tokens are not simply lost: each is assigned to its most similar kept token
    (``select.representation_counts``) and the draft attends to a kept token as to that many copies of it
    (``counts``, applied by the adapter's prefill as a log-count key bias). Training-free; docs/pruning.md.
    """

    name = "base"

    def __init__(self, keep_ratio: float = 1.0, keep_count: int | None = None, merge: bool = False) -> None:
        _check_ratio(keep_ratio, keep_count)
        if not isinstance(merge, bool):
            raise ValueError(f"merge must be true or false, got {merge!r}")
        self.keep_ratio = float(keep_ratio)
        self.keep_count = keep_count
        self.merge = merge

    def count(self, num_tokens: int) -> int:
        return num_kept(num_tokens, self.keep_ratio, self.keep_count)

    def select(self, adapter: VLMAdapter, inputs: PromptInputs) -> torch.Tensor | None:
        n = inputs.num_visual_tokens
        k = self.count(n)
        if k >= n:
            return None
        keep = self._choose(adapter, inputs, n, k)
        assert keep.shape == (k,), (self.name, keep.shape, k)
        return keep

    @torch.inference_mode()
    def counts(self, adapter: VLMAdapter, inputs: PromptInputs, keep: torch.Tensor | None) -> torch.Tensor | None:
        if not self.merge or keep is None:
            return None
        return representation_counts(adapter.visual_features(inputs), keep)

    def _choose(self, adapter: VLMAdapter, inputs: PromptInputs, n: int, k: int) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        amount = f"keep_count={self.keep_count}" if self.keep_count is not None else f"keep_ratio={self.keep_ratio:g}"
        return f"{type(self).__name__}({amount}{', merge=True' if self.merge else ''})"


class JointPruner(_Pruner):
    """CoVSpec's pruner: query relevance, token activity and low-rank dependency, weighted into one joint score,
    then a selection.

    ``joint_i = w_r rel_i + w_a act_i + w_l lowrank_i`` (each score min-max normalized to [0, 1]). Selections:

    - ``stratified`` (default): the patch grid is cut into k cells around an even lattice and each cell keeps its
      best-scoring token (``select.stratified_top``): the kept set stays spatially representative, which a pruned
      draft (whose kept tokens get no re-weighting) needs, and the scores pick the informative token of each region;
    - ``greedy``: step t keeps ``argmax_i joint_i + diversity * novelty_i(S_t)``, trading the joint score against
      redundancy with the tokens already kept (``select.greedy_diverse``);
    - ``topk``: the k best joint scores.

    Args:
        keep_ratio: fraction of visual tokens kept, in (0, 1].
        weights: ``{"relevance": w_r, "activity": w_a, "lowrank": w_l}``, each >= 0, not all zero; a zero weight
            skips that score's computation.
        keep_count: a fixed number of tokens instead of a ratio.
        relevance: ``"attention"`` (question rows' attention at ``probe_layer``) or ``"embedding"`` (cosine
            similarity with the question's input embeddings).
        probe_layer: decoder layer of the attention probe (0: the first; layers below it run in full).
        ridge: lam of the low-rank dependency score.
        selection: ``stratified``, ``greedy`` or ``topk`` (above).
        diversity: ``greedy`` only: weight of the novelty term (normalized cosine distance to the closest kept token).
    """

    name = "joint"

    def __init__(
        self,
        keep_ratio: float = 1.0,
        weights: dict[str, float] | None = None,
        keep_count: int | None = None,
        relevance: str = "attention",
        probe_layer: int = 0,
        ridge: float = S.DEFAULT_RIDGE,
        selection: str = "stratified",
        diversity: float = 1.0,
        merge: bool = False,
    ) -> None:
        super().__init__(keep_ratio, keep_count, merge)
        weights = dict(zip(SCORE_NAMES, (1.0, 0.5, 0.5), strict=True) if weights is None else weights)
        if set(weights) != set(SCORE_NAMES):
            raise ValueError(f"weights must have exactly the keys {', '.join(SCORE_NAMES)}, got {sorted(weights)}")
        for key, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                raise ValueError(f"weights.{key} must be a finite number >= 0, got {w!r}")
        if not any(weights.values()):
            raise ValueError("weights must not all be zero")
        if relevance not in RELEVANCE_KINDS:
            raise ValueError(f"relevance must be one of {', '.join(RELEVANCE_KINDS)}, got {relevance!r}")
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if isinstance(diversity, bool) or not isinstance(diversity, int | float) or not 0 < diversity < math.inf:
            raise ValueError(f"diversity must be a finite number > 0, got {diversity!r}")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.relevance = relevance
        self.probe_layer = probe_layer
        self.ridge = ridge
        self.selection = selection
        self.diversity = float(diversity)

    def scores(
        self, adapter: VLMAdapter, inputs: PromptInputs, gram: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The normalized scores with a non-zero weight: name -> [N] in [0, 1]."""
        w = self.weights
        out: dict[str, torch.Tensor] = {}
        visual = adapter.visual_features(inputs)  # [N, H], cached on inputs for the prefill
        if w["relevance"]:
            if self.relevance == "attention":
                attn = probe_attention(adapter, inputs, self.probe_layer, question_rows(inputs))  # [heads, T, L]
                out["relevance"] = S.attention_relevance(attn[:, :, visual_positions(inputs)])
            else:
                out["relevance"] = S.embedding_relevance(visual, question_embeddings(adapter, inputs))
        if w["activity"]:
            out["activity"] = S.token_activity(visual)
        if w["lowrank"]:
            out["lowrank"] = S.lowrank_dependency(visual, self.ridge, gram)
        return out

    @torch.inference_mode()
    def _choose(self, adapter: VLMAdapter, inputs: PromptInputs, n: int, k: int) -> torch.Tensor:
        visual = adapter.visual_features(inputs)
        greedy = self.selection == "greedy"
        gram = S.cosine_gram(visual) if greedy or self.weights["lowrank"] else None  # [N, N], shared
        joint = weighted_sum(self.scores(adapter, inputs, gram), self.weights)  # [N]
        if self.selection == "stratified":
            return stratified_top(joint, k, visual_grid(adapter, inputs))
        if greedy:
            return greedy_diverse(visual, k, joint, self.diversity, gram)
        return top_k(joint, k)


class RandomPruner(_Pruner):
    """A uniform random subset; the generator is seeded once and advances with every request."""

    name = "random"

    def __init__(
        self, keep_ratio: float = 1.0, keep_count: int | None = None, seed: int = 0, merge: bool = False
    ) -> None:
        super().__init__(keep_ratio, keep_count, merge)
        self.generator = torch.Generator().manual_seed(seed)

    def _choose(self, adapter: VLMAdapter, inputs: PromptInputs, n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator)[:k].sort().values


class UniformPruner(_Pruner):
    """An even lattice over the patch grid (square grids; otherwise evenly strided in raster order)."""

    name = "uniform"

    def _choose(self, adapter: VLMAdapter, inputs: PromptInputs, n: int, k: int) -> torch.Tensor:
        return uniform_grid(n, k, visual_grid(adapter, inputs))


class AttentionPruner(_Pruner):
    """FastV-like: the attention each visual token receives at decoder layer ``layer``, averaged over heads and
    every query row (a probe pass of the first ``layer`` + 1 layers; FastV uses K = 2)."""

    name = "attention"

    def __init__(
        self, keep_ratio: float = 1.0, keep_count: int | None = None, layer: int = 2, merge: bool = False
    ) -> None:
        super().__init__(keep_ratio, keep_count, merge)
        self.layer = layer

    @torch.inference_mode()
    def _choose(self, adapter: VLMAdapter, inputs: PromptInputs, n: int, k: int) -> torch.Tensor:
        attn = probe_attention(adapter, inputs, self.layer)  # [heads, L, L]
        return top_k(S.attention_received(attn[:, :, visual_positions(inputs)]), k)


class DiversityPruner(_Pruner):
    """DivPrune-like: greedy max-min cosine distance between the kept visual tokens."""

    name = "diversity"

    @torch.inference_mode()
    def _choose(self, adapter: VLMAdapter, inputs: PromptInputs, n: int, k: int) -> torch.Tensor:
        return greedy_diverse(adapter.visual_features(inputs), k)


def choose(
    pruner: Pruner, adapter: VLMAdapter, inputs: PromptInputs, lossy: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the draft prefills with: ``(keep, counts)`` = ``pruner.select`` and, unless ``lossy`` (the
    ``prune_target`` mode, where the target gets the kept tokens alone and so does the draft), ``pruner.counts``."""
    keep = pruner.select(adapter, inputs)
    return keep, None if lossy else pruner.counts(adapter, inputs, keep)


PRUNERS: dict[str, type[_Pruner]] = {
    cls.name: cls for cls in (JointPruner, RandomPruner, UniformPruner, AttentionPruner, DiversityPruner)
}
"""Pruner classes by ``pruning.method`` (every method but ``none``)."""
assert set(PRUNERS) | {"none"} == set(PRUNING_METHODS)


def build_pruner(cfg: PruningConfig, seed: int = 0) -> Pruner | None:
    """The pruner of ``cfg`` (validated; errors name the ``pruning.*`` key); None for ``method: none``.

    ``seed`` seeds the random baseline.
    """
    cfg.validate("pruning")
    if cfg.method == "none":
        return None
    try:
        if cfg.method == "joint":
            w = cfg.weights
            weights = {"relevance": w.relevance, "activity": w.activity, "lowrank": w.lowrank}
            # Merging hands the dropped tokens' attention to their representatives, so the selection can keep the
            # informative and mutually distinct tokens (greedy); without it the kept set itself must stay spatially
            # representative (stratified). Measured: docs/pruning.md.
            selection = "greedy" if cfg.merge else "stratified"
            return JointPruner(cfg.keep_ratio, weights, selection=selection, merge=cfg.merge)
        if cfg.method == "random":
            return RandomPruner(cfg.keep_ratio, seed=seed, merge=cfg.merge)
        return PRUNERS[cfg.method](cfg.keep_ratio, merge=cfg.merge)
    except ValueError as err:
        raise ConfigError(f"pruning: {err}") from None
