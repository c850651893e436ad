"""Forking a request's KV cache without copying its prefix: take a suffix out, put it back later.

Branches of a draft share the prompt and every token before their root. A branch therefore keeps only its own
suffix: :func:`take_suffix` copies the cache entries from a position on (the shared prefix is never copied) and
:func:`graft` appends them again after the cache was cropped back to that position (``adapter.rollback``). Works on
any transformers cache whose layers hold ``keys``/``values`` shaped ``[batch, kv_heads, seq, head_dim]`` and grow
through ``cache.update`` (``DynamicCache``: every decode step concatenates anyway, so a graft costs what one decode
step's cache update costs). Positions are logical (``DecodeState.seq_len``); pruned visual tokens are accounted for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
