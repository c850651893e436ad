"""Adapter-facing glue: what the scores need from a draft VLM, computed cheaply and without the edge.

- ``question_rows`` / ``question_embeddings``: the prompt's text tokens after the image (the question and the
  template tail) and their input embeddings (one embedding-table lookup, no forward pass).
- ``probe_attention``: attention weights of chosen query rows at one layer of the draft's language model, from a
  partial pass: layers below ``layer`` run in full (sdpa, causal), and at ``layer`` only the pre-norm and the
  q/k projections run, for the requested rows only (no values, no output projection, no MLP, no LM head). At
  ``layer=0`` it costs one RMSNorm and one k-projection over the prompt, a small fraction of a prefill.

Works for Llama-style language models (LLaVA's, Qwen2's, Mistral's: ``layers``, ``rotary_emb``, ``q_proj``,
``k_proj``, optional ``q_norm``/``k_norm``) with 1-D positions ``0..L-1``. An adapter whose model uses other rotary
positions (M-RoPE: Qwen2-VL, Qwen2.5-VL) provides them as ``adapter.rope_positions(inputs)`` (``[3, 1, L]``); its
``rotary_emb`` folds the three rows into one cos/sin table, applied as usual.
"""

from __future__ import annotations

import weakref

import torch
from transformers.models.llama.modeling_llama import rotate_half

from covspec.models.base import PromptInputs, VLMAdapter


def language_model(adapter: VLMAdapter):
    """The decoder stack (``LlamaModel``-like) of a ``*ForConditionalGeneration`` VLM."""
    lm = getattr(adapter.model.model, "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise TypeError(f"{type(adapter.model).__name__}: no model.language_model with decoder layers to probe")
    return lm


def visual_positions(inputs: PromptInputs) -> torch.Tensor:
    """[N] sequence positions of the visual tokens."""
    return torch.nonzero(inputs.image_mask).flatten()


def question_rows(inputs: PromptInputs) -> torch.Tensor:
    """[T] positions of the text tokens after the last visual token (the question, then the template tail)."""
    last = int(visual_positions(inputs)[-1])
    rows = torch.arange(last + 1, inputs.input_ids.shape[0], device=inputs.input_ids.device)
    if rows.numel() == 0:
        raise ValueError("the prompt has no text after the image: nothing to score query relevance against")
    return rows


@torch.inference_mode()
def question_embeddings(adapter: VLMAdapter, inputs: PromptInputs) -> torch.Tensor:
    """[T, H] input embeddings of the question rows."""
    return adapter.model.get_input_embeddings()(inputs.input_ids[question_rows(inputs)])


@torch.inference_mode()
def probe_attention(
    adapter: VLMAdapter, inputs: PromptInputs, layer: int = 0, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention weights of ``rows`` over the whole prompt at decoder layer ``layer`` (clamped to the last).

    Args:
        adapter: the draft.
        inputs: the prompt (unpruned).
        layer: decoder layer index; the layers below it run in full.
        rows: [R] query positions; None: every position.

    Returns:
        [heads, R, L] float32 softmax weights (each row sums to 1 over the positions it may attend to).
    """
    lm = language_model(adapter)
    layer = max(0, min(layer, len(lm.layers) - 1))
    h = adapter.embed(inputs)[None]  # [1, L, H]
    length = h.shape[1]
    pos = torch.arange(length, device=h.device)[None]  # [1, L]
    rope_positions = getattr(adapter, "rope_positions", None)
    if rope_positions is None:
        cos, sin = _rope(lm, h, length)  # [1, L, d] each
    else:
        cos, sin = lm.rotary_emb(h, rope_positions(inputs))  # M-RoPE: [3, 1, L] positions -> [1, L, d] each
    if layer > 0:
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=pos)
        for block in lm.layers[:layer]:
            h = block(h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
    block = lm.layers[layer]
    attn = block.self_attn
    x = block.input_layernorm(h)  # [1, L, H]
    rows = pos[0] if rows is None else rows.to(h.device)
    d = attn.head_dim
    q = attn.q_proj(x[:, rows]).view(1, rows.numel(), -1, d)  # [1, R, heads, d]
    k = attn.k_proj(x).view(1, length, -1, d)  # [1, L, kv_heads, d]
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    q = q * cos[:, rows, None].transpose(1, 2) + rotate_half(q) * sin[:, rows, None].transpose(1, 2)
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: [1, heads, L, d]
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling  # [1, heads, R, L]
    future = pos[0][None, :] > rows[:, None]  # [R, L]
    return torch.softmax(scores.masked_fill_(future, float("-inf")), dim=-1)[0]


_ROPE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # language model -> {(L, dtype, device): (cos, sin)}


def _rope(lm, h: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for positions 0..L-1, memoized per model and length (prompts of one template repeat lengths)."""
    tables = _ROPE.setdefault(lm, {})
    key = (length, h.dtype, h.device)
    if key not in tables:
        if len(tables) > 64:
            tables.clear()
        tables[key] = lm.rotary_emb(h, torch.arange(length, device=h.device)[None])
    return tables[key]
