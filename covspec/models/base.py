"""The adapter protocol every VLM family implements, and the per-request decode state.

An adapter wraps one loaded model and is stateless across requests: everything that belongs to
one request (KV cache, logical length, position bookkeeping) lives in a ``DecodeState`` that the
caller owns and passes in. This keeps one model serving many sessions (the edge) and makes
rollback explicit: it is cropping the cache to a length.

Lengths: ``seq_len`` counts *logical* positions consumed (prompt + scored tokens), ``cache_len``
counts entries in the KV cache. They differ by the number of visual tokens pruned at prefill;
the next token's position id is always ``seq_len`` (kept tokens retain their original positions,
see NOTES-transformers "Visual tokens and pruning").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image


@dataclass
class PromptInputs:
    """Model inputs for one image + question, built by the model's own processor."""

    input_ids: torch.Tensor  # [L] prompt ids, image placeholders expanded
    pixel_values: torch.Tensor  # [1, 3, H, W] (family-specific layout)
    image_mask: torch.Tensor  # [L] bool, True at visual token positions
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific (e.g. image_grid_thw)
    visual_features: torch.Tensor | None = field(default=None, repr=False, compare=False)
    """[N, H] projected visual tokens, memoized by the adapter's ``visual_features`` (a pruner scores them, then
    the pruned prefill reuses them: the vision tower runs once per request)."""

    @property
    def num_visual_tokens(self) -> int:
        return int(self.image_mask.sum())


@dataclass
class DecodeState:
    """One request's decoding state: KV cache plus logical/physical lengths."""

    cache: Any  # transformers Cache
    seq_len: int  # logical positions consumed so far (next position id)
    pruned: int = 0  # visual tokens dropped at prefill: cache_len == seq_len - pruned
    key_bias: torch.Tensor | None = None
    """[n] additive attention bias on the first n cache entries (the prefilled prompt): log of how many visual tokens
    each kept one stands for when pruning merges (``covspec.pruning.merge``), 0 on text; None: no bias."""

    @property
    def cache_len(self) -> int:
        return self.seq_len - self.pruned


def biased_causal_mask(key_bias: torch.Tensor, past: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D additive attention mask [1, 1, k, past + k] for k new tokens after ``past`` cache entries.

    Causal among the new tokens; every past entry visible, the first ``len(key_bias)`` of them (and of the new ones,
    at prefill, where past = 0) shifted by ``key_bias``. transformers passes a 4-D mask to the attention as is.
    """
    total = past + k
    n = min(int(key_bias.shape[0]), total)
    row = torch.nn.functional.pad(key_bias[:n].to(dtype), (0, total - n))  # [total]
    if k == 1:  # a decode step: nothing to hide
        return row.view(1, 1, 1, total)
    mask = row.expand(k, total).clone()
    future = torch.ones(k, k, dtype=torch.bool, device=key_bias.device).triu(1)
    mask[:, past:].masked_fill_(future, torch.finfo(dtype).min)
    return mask[None, None]


def tree_mask(parents: list[int], past: int, key_bias: torch.Tensor | None, dtype: torch.dtype,
              device: torch.device | str) -> torch.Tensor:  # fmt: skip
    """The 4-D additive mask [1, 1, k, past + k] of a token tree after ``past`` cache entries: every past entry
    visible (shifted by ``key_bias`` where given), and among the new tokens each sees itself and its ancestors
    (``covspec.decoding.tree``). A chain's parents give ``biased_causal_mask``."""
    from covspec.decoding.tree import ancestors

    k = len(parents)
    mask = torch.zeros(k, past + k, dtype=dtype, device=device)
    if key_bias is not None:
        n = min(int(key_bias.shape[0]), past)
        mask[:, :n] = key_bias[:n].to(dtype=dtype, device=device)
    mask[:, past:].masked_fill_(~ancestors(parents, device), torch.finfo(dtype).min)
    return mask[None, None]


def fused_tree_mask(length: int, parents: list[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The 4-D additive mask [1, 1, L + k, L + k] of a prompt of ``length`` L followed by a token tree of k nodes in
    one forward (``prefill_fused``): causal over the prompt; each node sees the whole prompt, its ancestors and
    itself (as ``tree_mask`` after a prefilled cache)."""
    k = len(parents)
    mask = torch.full((length + k, length + k), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask[:length, :length].triu_(1)  # zeros on and below the diagonal: the causal prompt
    mask[length:, :length] = 0
    mask[length:, length:] = tree_mask(parents, 0, None, dtype, device)[0, 0]
    return mask[None, None]


def tree_offsets(parents: list[int] | None, k: int, device: torch.device | str) -> torch.Tensor:
    """[k] position offsets of k new tokens: 0..k-1 for a chain (``parents`` None), each node's depth in a tree."""
    if parents is None:
        return torch.arange(k, device=device)
    from covspec.decoding.tree import depths

    return torch.tensor(depths(parents), dtype=torch.long, device=device)


def decode_mask(state: DecodeState, k: int, dtype: torch.dtype, parents: list[int] | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor | None:  # fmt: skip
    """The attention mask of k new tokens on ``state``: None (the model's own causal mask) unless it was prefilled
    with merge counts, then ``biased_causal_mask`` with its key bias; a token tree (``parents``) always gets
    ``tree_mask``."""
    if parents is not None:
        return tree_mask(parents, state.cache_len, state.key_bias, dtype, device)
    if state.key_bias is None:
        return None
    return biased_causal_mask(state.key_bias, state.cache_len, k, dtype)


def require_unbiased(states: list[DecodeState]) -> None:
    """Batched forwards pad sessions to one 2-D mask, which cannot carry a per-session key bias."""
    if any(s.key_bias is not None for s in states):
        raise ValueError("batched forwards do not take merged-pruned states (key_bias); forward them one by one")


def merge_bias(inputs: PromptInputs, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[len(rows)] key bias of a pruned prompt: log(count) at each kept visual row (``counts`` in kept order), 0 on
    text rows. ``rows`` are the kept sequence positions (``LlavaAdapter.kept_positions``)."""
    visual = inputs.image_mask[rows]
    if int(visual.sum()) != int(counts.shape[0]):
        raise ValueError(f"counts has {int(counts.shape[0])} entries for {int(visual.sum())} kept visual tokens")
    if bool((counts < 1).any()):
        raise ValueError("every kept visual token stands for at least itself: counts must be >= 1")
    bias = torch.zeros(int(rows.shape[0]), dtype=torch.float32, device=rows.device)
    bias[visual] = torch.log(counts.to(torch.float32).to(rows.device))
    return bias


def eos_id_list(configured: int | list[int] | None, tokenizer: Any) -> list[int]:
    """Every id that ends generation, in configured order: ``generation_config.eos_token_id`` (an id or a list, as
    chat models such as Qwen2-VL ship ``[<|im_end|>, <|endoftext|>]``), else the tokenizer's. ``generate`` stops at
    any of them."""
    ids = configured if configured is not None else tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if not ids:
        raise ValueError("the model has no end-of-sequence id (generation_config.eos_token_id and the tokenizer's)")
    return [int(i) for i in ids]


def cut_at_eos(tokens: list[int], eos_token_ids: frozenset[int]) -> list[int]:
    """``tokens`` up to (without) the first end-of-sequence id."""
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos_token_ids), tokens)


class FusedPrefill:
    """``prefill_fused`` and ``prefill_batch`` of an adapter, from its ``prefill_fused_batch`` (several prompts, each
    followed by its first block, in one forward): one fused prompt is a batch of one, a batched prefill is a fused
    batch with empty blocks."""

    def prefill_fused_batch(
        self, inputs: list[PromptInputs], token_ids: list[torch.Tensor], parents: list[list[int] | None]
    ) -> list[tuple[DecodeState, torch.Tensor]]:
        raise NotImplementedError

    def prefill_fused(
        self, inputs: PromptInputs, token_ids: torch.Tensor, parents: list[int] | None = None
    ) -> tuple[DecodeState, torch.Tensor]:
        """Unpruned prefill and the scoring of a first block in **one** forward: ``prefill`` then ``forward(state,
        token_ids, parents)`` up to float rounding, without the second forward's fixed cost (the edge's first
        verification round). The prompt rows attend causally, the block's rows to the whole prompt and (a token
        tree, ``parents``) to their ancestors, at their depth's positions.

        Returns:
            The state (prompt + k entries, as after ``forward``) and logits [k + 1, V]: row 0 at the last prompt
            position (``prefill``'s), row i + 1 after token i (``forward``'s row i).
        """
        return self.prefill_fused_batch([inputs], [token_ids], [parents])[0]

    def prefill_batch(self, inputs: list[PromptInputs]) -> list[tuple[DecodeState, torch.Tensor]]:
        """Unpruned prefill of several prompts in one forward (rows left-padded, each state holding its own rows of
        the batched cache); equal to ``prefill`` per prompt up to float rounding."""
        empty = [torch.zeros(0, dtype=torch.long) for _ in inputs]
        return [(state, rows[-1]) for state, rows in self.prefill_fused_batch(inputs, empty, [None] * len(inputs))]


@runtime_checkable
class VLMAdapter(Protocol):
    """What covspec needs from a vision-language model."""

    vocab_size: int
    eos_token_id: int  # the first end-of-sequence id (what a finished stream is padded with)
    eos_token_ids: frozenset[int]  # every id that ends generation (``generation_config.eos_token_id`` may list several)

    def prepare(self, image: Image.Image, question: str) -> PromptInputs:
        """Build the prompt (chat template) and pixel inputs for one image and question."""
        ...

    def prepare_from_ids(self, image: Image.Image, prompt_ids: list[int]) -> PromptInputs:
        """Inputs for already-tokenized prompt ids (the edge receives ids, not text)."""
        ...

    def visual_features(self, inputs: PromptInputs) -> torch.Tensor:
        """Projected visual tokens in the language model's space: [N, H] (memoized on ``inputs``)."""
        ...

    def embed(self, inputs: PromptInputs) -> torch.Tensor:
        """Prompt embeddings with visual tokens written in: [L, H]."""
        ...

    def prefill(
        self, inputs: PromptInputs, keep: torch.Tensor | None = None, counts: torch.Tensor | None = None
    ) -> tuple[DecodeState, torch.Tensor]:
        """Prefill the prompt, keeping only visual positions in ``keep`` (all if None).

        Args:
            inputs: the prompt.
            keep: [n_kept] sorted indices into the visual tokens (0..N-1) to keep.
            counts: [n_kept] how many visual tokens each kept one stands for (>= 1), or None. Every later query
                then attends to a kept token as to ``count`` copies of it (an additive log-count bias on its key,
                kept in ``DecodeState.key_bias`` for the decode steps): proportional attention, which gives the
                dropped tokens' attention mass to their representatives.

        Returns:
            The new state and the logits at the last prompt position: [V].
        """
        ...

    def forward(self, state: DecodeState, token_ids: torch.Tensor, parents: list[int] | None = None) -> torch.Tensor:
        """Score ``token_ids`` [k] at the next k positions in one forward; extends the state by k entries.

        With ``parents`` the k tokens are a token tree (``covspec.decoding.tree``): node i gets the position of its
        depth and attends to the cache and its ancestors only. ``covspec.models.kvcache.keep_nodes`` then keeps the
        accepted path's entries.

        Returns:
            logits [k, V]: row i is the distribution after token_ids[: i + 1] (in a tree: after the path to node i).
        """
        ...

    def rollback(self, state: DecodeState, seq_len: int) -> None:
        """Drop every position at or after ``seq_len`` from the state (crop the KV cache)."""
        ...
