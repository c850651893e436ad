"""Forking a request's KV cache without copying its prefix: take a suffix out, put it back later.

Branches of a draft share the prompt and every token before their root. A branch therefore keeps only its own
suffix: :func:`take_suffix` copies the cache entries from a position on (the shared prefix is never copied) and
:func:`graft` appends them again after the cache was cropped back to that position (``adapter.rollback``). Works on
any transformers cache whose layers hold ``keys``/``values`` shaped ``[batch, kv_heads, seq, head_dim]`` and grow
through ``cache.update`` (``DynamicCache``: every decode step concatenates anyway, so a graft costs what one decode
step's cache update costs). Positions are logical (``DecodeState.seq_len``); pruned visual tokens are accounted for.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from covspec.models.base import DecodeState


@dataclass
class KVSuffix:
    """Cache entries of a run of positions, per layer: ``keys[i]``/``values[i]`` are ``[B, H, n, D]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def __len__(self) -> int:
        return int(self.keys[0].shape[-2]) if self.keys else 0


def take_suffix(state: DecodeState, start: int) -> KVSuffix:
    """A copy of the cache entries at logical positions ``start .. state.seq_len - 1`` (the state is unchanged)."""
    if not state.pruned <= start <= state.seq_len:
        raise ValueError(f"suffix start {start} outside the cache (positions {state.pruned}..{state.seq_len})")
    i = start - state.pruned
    layers = state.cache.layers
    # clone: a view would keep the whole (soon replaced) cache tensor alive; the suffix alone is small.
    return KVSuffix([layer.keys[..., i:, :].clone() for layer in layers],
                    [layer.values[..., i:, :].clone() for layer in layers])  # fmt: skip


def graft(state: DecodeState, suffix: KVSuffix, length: int | None = None) -> None:
    """Append the first ``length`` positions of ``suffix`` (all by default) at the end of the cache.

    The caller guarantees that the suffix was taken at position ``state.seq_len`` of a cache holding the same
    prefix (rotary positions are baked into the keys).
    """
    n = len(suffix) if length is None else length
    if not 0 <= n <= len(suffix):
        raise ValueError(f"cannot graft {n} positions from a suffix of {len(suffix)}")
    if n == 0:
        return
    for idx, (keys, values) in enumerate(zip(suffix.keys, suffix.values, strict=True)):
        state.cache.update(keys[..., :n, :], values[..., :n, :], idx)
    state.seq_len += n


def rollback(state: DecodeState, seq_len: int) -> None:
    """Drop every logical position at or after ``seq_len`` (crop the cache); the adapters' ``rollback``."""
    if seq_len > state.seq_len:
        raise ValueError(f"cannot roll forward: state has {state.seq_len} positions, asked {seq_len}")
    drop = state.seq_len - seq_len
    if drop:
        state.cache.crop(-drop)  # transformers 5.x: a negative count of entries to remove
        state.seq_len = seq_len


@dataclass
class PaddedBatch:
    """Several sessions' next blocks as one batched forward's inputs (see :func:`pad_batch`)."""

    ids: torch.Tensor  # [B, k_max] blocks, right-padded
    mask: torch.Tensor  # [B, width + k_max] 2-D attention mask: 0 on the left pad of caches and the right pad of blocks
    positions: torch.Tensor  # [B, k_max] each row's next positions (from ``next_positions``)
    cache: object  # DynamicCache with every session's keys/values left-padded to ``width``
    past: list[int]  # cache entries per session
    lengths: list[int]  # k_i
    width: int


def pad_batch(
    states: list[DecodeState], token_ids: list[torch.Tensor], config, device, next_positions,
    parents: list[list[int] | None] | None = None, dtype: torch.dtype = torch.float32,
) -> PaddedBatch:  # fmt: skip
    """Inputs of one forward scoring ``token_ids[i]`` after ``states[i]`` for sessions of different lengths.

    ``next_positions(state, k)`` gives the [k] position ids following ``state`` (1-D positions, or one M-RoPE row).
    ``parents[i]``, when given, makes session i's tokens a token tree (``covspec.decoding.tree``): its rows get
    their depth's position and the mask becomes 4-D (``dtype``, additive), each node seeing its own session's
    cache, its ancestors and itself. Without trees the mask stays 2-D and the model builds the causal part.
    """
    from transformers import DynamicCache

    from covspec.decoding.tree import ancestors, chain, depths

    if len(states) != len(token_ids):
        raise ValueError(f"{len(states)} states but {len(token_ids)} token blocks")
    lengths = [int(t.shape[0]) for t in token_ids]
    if min(lengths, default=1) < 1:
        raise ValueError("every session needs at least one token to score")
    trees = parents if parents is not None and any(p is not None for p in parents) else None
    past = [s.cache_len for s in states]
    width, k_max, batch = max(past), max(lengths), len(states)
    if trees is None:
        mask = torch.zeros(batch, width + k_max, dtype=torch.long, device=device)
    else:
        mask = torch.full((batch, 1, k_max, width + k_max), torch.finfo(dtype).min, dtype=dtype, device=device)
    ids = torch.zeros(batch, k_max, dtype=torch.long, device=device)
    positions = torch.zeros(batch, k_max, dtype=torch.long, device=device)
    for i, (state, toks) in enumerate(zip(states, token_ids, strict=True)):
        n = lengths[i]
        ids[i, :n] = toks.to(device)
        positions[i] = next_positions(state, k_max)
        if trees is None:
            mask[i, width - past[i] : width] = 1
            mask[i, width : width + n] = 1
            continue
        tree = trees[i] if trees[i] is not None else chain(n)
        if len(tree) != n:
            raise ValueError(f"session {i}: {len(tree)} parents for {n} tokens")
        positions[i, :n] = positions[i, torch.tensor(depths(tree), device=device)]
        mask[i, 0, :, width - past[i] : width] = 0
        mask[i, 0, :n, width : width + n].masked_fill_(ancestors(tree, device), 0)
        mask[i, 0, n:, width:].fill_(0)  # pad queries (discarded) see everything: no row is fully masked
    cache = DynamicCache(config=config)
    n_layers = len(states[0].cache.layers)
    if len(cache.layers) == n_layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_filled_layer([s.cache.layers[i] for s in states], past, width, width + k_max)
                        for i in range(n_layers)]  # fmt: skip
    else:  # other layer kinds (a sliding window, ...) keep their own update: pad, concatenate, let them append
        for i in range(n_layers):
            layers = [s.cache.layers[i] for s in states]
            pad = torch.nn.functional.pad
            cache.update(torch.cat([pad(x.keys, (0, 0, width - n, 0)) for x, n in zip(layers, past, strict=True)]),
                         torch.cat([pad(x.values, (0, 0, width - n, 0)) for x, n in zip(layers, past, strict=True)]),
                         i)  # fmt: skip
    return PaddedBatch(ids, mask, positions, cache, past, lengths, width)


class _InPlaceLayer(DynamicLayer):
    """One layer of a batched forward's cache, allocated at the forward's full width once.

    ``DynamicLayer.update`` concatenates: the whole batched cache would be copied again inside the forward, after
    it was copied once to pad it. Here the padded caches are written into one buffer of ``width + k_max`` columns
    and the forward's new keys/values go into its last columns in place, so a batched step copies each session's
    cache exactly once (profiled: the copies were over half of a batch-8 decode step of the toy target on this CPU).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
        super().__init__()
        self._kbuf, self._vbuf = keys, values
        self.keys, self.values = keys[..., :filled, :], values[..., :filled, :]
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, k = int(self.keys.shape[-2]), int(key_states.shape[-2])
        if n + k > self._kbuf.shape[-2]:  # more than the forward was sized for: the plain (copying) path
            return super().update(key_states, value_states, *args, **kwargs)
        self._kbuf[..., n : n + k, :].copy_(key_states)
        self._vbuf[..., n : n + k, :].copy_(value_states)
        self.keys, self.values = self._kbuf[..., : n + k, :], self._vbuf[..., : n + k, :]
        return self.keys, self.values


def _filled_layer(layers: list, past: list[int], width: int, capacity: int) -> _InPlaceLayer:
    """Every session's keys/values of one layer, left-padded with zeros to ``width``, in a buffer of ``capacity``
    columns (the values' pad must be finite: a masked column gets weight 0, and 0 * NaN would be NaN)."""
    k0 = layers[0].keys
    shape = (len(layers), int(k0.shape[1]), capacity, int(k0.shape[-1]))
    keys = k0.new_empty(shape)
    values = layers[0].values.new_empty(shape)
    for i, (layer, n) in enumerate(zip(layers, past, strict=True)):
        pad = width - n
        if pad:
            keys[i, :, :pad].zero_()
            values[i, :, :pad].zero_()
        keys[i, :, pad:width].copy_(layer.keys[0])
        values[i, :, pad:width].copy_(layer.values[0])
    return _InPlaceLayer(keys, values, width)


@dataclass
class FusedBatch:
    """Several prompts, each followed by its first block, as one batched forward's inputs (:func:`pad_fused`)."""

    embeds: torch.Tensor  # [B, width, H], left-padded
    positions: torch.Tensor  # [P, B, width]: each row's positions (P = 1, or 3 for M-RoPE); 0 on the pad
    mask: torch.Tensor  # [B, width] 2-D (chains only) or [B, 1, width, width] additive (any token tree)
    totals: list[int]  # L_i + k_i
    lengths: list[int]  # k_i
    width: int


def pad_fused(
    embeds: list[torch.Tensor], positions: list[torch.Tensor], parents: list[list[int] | None], lengths: list[int],
    dtype: torch.dtype,
) -> FusedBatch:  # fmt: skip
    """Inputs of one forward over prompts and their first blocks (``prefill_fused`` batched).

    ``embeds[i]``: [L_i + k_i, H], the prompt's embeddings then the block's; ``positions[i]``: [P, L_i + k_i];
    ``lengths[i]``: k_i; ``parents[i]``: the block's token tree or None (a chain). Rows are left-padded to one width,
    so every row ends at the last column and the last k_i + 1 logits of row i are its own. Without trees the mask is
    2-D (the model adds the causal part); with any tree it is 4-D: each row's prompt causal, its block's nodes seeing
    the prompt and their ancestors (``covspec.models.base.fused_tree_mask``), pad queries only themselves (no row is
    fully masked)."""
    from covspec.decoding.tree import chain
    from covspec.models.base import fused_tree_mask

    totals = [int(e.shape[0]) for e in embeds]
    width, batch = max(totals), len(embeds)
    device = embeds[0].device
    out = embeds[0].new_zeros(batch, width, int(embeds[0].shape[-1]))
    pos = torch.zeros(int(positions[0].shape[0]), batch, width, dtype=torch.long, device=device)
    trees = any(p is not None for p in parents)
    if trees:
        mask = torch.full((batch, 1, width, width), torch.finfo(dtype).min, dtype=dtype, device=device)
    else:
        mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    for i, (e, p, tree, k) in enumerate(zip(embeds, positions, parents, lengths, strict=True)):
        o = width - totals[i]
        out[i, o:] = e
        pos[:, i, o:] = p
        if not trees:
            mask[i, o:] = 1
            continue
        mask[i, 0, o:, o:] = fused_tree_mask(totals[i] - k, tree if tree is not None else chain(k), dtype, device)[0, 0]
        mask[i, 0, range(o), range(o)] = 0
    return FusedBatch(out, pos, mask, totals, list(lengths), width)


def split_fused(batch: FusedBatch, cache, config, logits: torch.Tensor) -> list[tuple[object, torch.Tensor]]:
    """Per row: its own cache (views of the batched one, the left pad dropped) and its last k_i + 1 logits."""
    from transformers import DynamicCache

    out = []
    for i, (total, k) in enumerate(zip(batch.totals, batch.lengths, strict=True)):
        own = DynamicCache(config=config)
        for layer_idx, merged in enumerate(cache.layers):
            o = batch.width - total
            own.update(merged.keys[i : i + 1, :, o:], merged.values[i : i + 1, :, o:], layer_idx)
        out.append((own, logits[i, logits.shape[1] - (k + 1) :]))
    return out


def keep_nodes(state: DecodeState, start: int, nodes: list[int]) -> None:
    """Keep, of the cache entries from logical position ``start`` on, only those at offsets ``nodes`` (in order):
    after a token tree was scored, the accepted path's entries become a plain chain. Each kept entry was computed
    at its depth's position attending to its ancestors only, so the result equals the cache of scoring the path
    alone (up to float rounding)."""
    if not state.pruned <= start <= state.seq_len:
        raise ValueError(f"start {start} outside the cache (positions {state.pruned}..{state.seq_len})")
    i0, extra = start - state.pruned, state.seq_len - start
    if any(not 0 <= n < extra for n in nodes) or any(b <= a for a, b in itertools.pairwise(nodes)):
        raise ValueError(f"nodes {nodes} must be increasing offsets below {extra}")
    if nodes == list(range(len(nodes))):
        rollback(state, start + len(nodes))
        return
    index = torch.tensor(nodes, dtype=torch.long, device=state.cache.layers[0].keys.device) + i0
    for layer in state.cache.layers:
        layer.keys = torch.cat([layer.keys[..., :i0, :], layer.keys.index_select(-2, index)], dim=-2)
        layer.values = torch.cat([layer.values[..., :i0, :], layer.values.index_select(-2, index)], dim=-2)
    state.seq_len = start + len(nodes)


def unpad_batch(batch: PaddedBatch, states: list[DecodeState]) -> None:
    """After the forward: each state holds its own rows of the batched cache (views, no copy), extended by k_i."""
    for i, state in enumerate(states):
        start, stop = batch.width - batch.past[i], batch.width + batch.lengths[i]
        for own, merged in zip(state.cache.layers, batch.cache.layers, strict=True):
            own.keys = merged.keys[i : i + 1, :, start:stop]
            own.values = merged.values[i : i + 1, :, start:stop]
        state.seq_len += batch.lengths[i]
