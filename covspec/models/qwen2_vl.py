"""Qwen2-VL / Qwen2.5-VL adapter: visual tokens after the merger, 3-D rotary positions (M-RoPE), pruning, rollback.

Positions. Qwen2-VL gives every prompt token a (temporal, height, width) position triple (``get_rope_index``):
text tokens count up on all three rows, the image's tokens share one temporal start and spread over the merged
patch grid, and the text after the image continues at ``max(position) + 1``. The prompt therefore consumes fewer
position values than it has tokens: the generated token at logical index ``seq_len`` gets position
``seq_len + rope_delta`` on all three rows, where ``rope_delta = max(pos) + 1 - L`` (negative) is fixed by the prompt.

The model itself keeps ``rope_deltas`` as mutable state from its last call; one model serves many sessions here, so
every forward passes explicit 3-D ``position_ids`` instead and the delta lives in the request's ``MRopeState``.
A pruned prefill passes the kept tokens with their *original* position triples (gaps allowed), so the kept tokens
and every later token see the positions they would have had without pruning (see NOTES-transformers
"Qwen2-VL / Qwen2.5-VL").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from transformers import DynamicCache

from covspec.models import kvcache
from covspec.models.base import (
    DecodeState,
    FusedPrefill,
    PromptInputs,
    biased_causal_mask,
    decode_mask,
    eos_id_list,
    merge_bias,
    require_unbiased,
    tree_offsets,
)
from covspec.models.llava import LlavaAdapter


@dataclass
class MRopeState(DecodeState):
    """A decode state whose next token's (3-D) position is ``seq_len + rope_delta`` on every row."""

    rope_delta: int = 0


class Qwen2VLAdapter(FusedPrefill):
    """Wraps a loaded ``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``."""

    @staticmethod
    def scored_vocab(config, tokenizer) -> int:
        """The width of the logits this adapter returns: the tokenizer's ids, not the LM head's padded width
        (Qwen2.5-VL-3B: 151,936 rows, 7B: 152,064, one tokenizer of 151,665), so that draft and target agree on it
        and no text maps to padding."""
        return min(config.text_config.vocab_size, len(tokenizer))

    def __init__(self, model, processor, name: str = "qwen2-vl") -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.image_token_id: int = model.config.image_token_id
        self.vocab_size: int = self.scored_vocab(model.config, self.tokenizer)
        eos = eos_id_list(model.generation_config.eos_token_id, self.tokenizer)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.eos_token_id: int = eos[0]
        self.merge_size: int = model.config.vision_config.spatial_merge_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    # -- inputs -------------------------------------------------------------------------------

    def prompt_text(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def prepare(self, image: Image.Image, question: str) -> PromptInputs:
        enc = self.processor(images=image.convert("RGB"), text=self.prompt_text(question), return_tensors="pt")
        return self._inputs(enc["input_ids"][0], enc["pixel_values"], enc["image_grid_thw"])

    def prepare_from_ids(self, image: Image.Image, prompt_ids: list[int]) -> PromptInputs:
        """Inputs for ids tokenized elsewhere; each run of ``<|image_pad|>`` is resized to this model's count for
        ``image`` (a draft with another image processor may have expanded it to a different number)."""
        pixels = self.processor.image_processor(images=image.convert("RGB"), return_tensors="pt")
        grid = pixels["image_grid_thw"]  # [1, 3]
        n = int(grid[0].prod()) // self.merge_size**2
        ids: list[int] = []
        for i, tok in enumerate(prompt_ids):
            if tok != self.image_token_id:
                ids.append(tok)
            elif i == 0 or prompt_ids[i - 1] != self.image_token_id:
                ids.extend([self.image_token_id] * n)
        return self._inputs(torch.tensor(ids, dtype=torch.long), pixels["pixel_values"], grid)

    def _inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> PromptInputs:
        input_ids = input_ids.to(self.device)
        image_mask = input_ids == self.image_token_id
        return PromptInputs(
            input_ids=input_ids,
            pixel_values=pixel_values.to(self.device, self.dtype),  # [patches, C * T * p * p]
            image_mask=image_mask,
            extra={
                "image_grid_thw": grid_thw.to(self.device),  # [1, 3] (t, h, w) in patches
                "mm_token_type_ids": image_mask.long(),  # [L]: 0 text, 1 image (no video here)
            },
        )

    def mrope(self, inputs: PromptInputs) -> tuple[torch.Tensor, int]:
        """The prompt's M-RoPE positions [3, L] and ``rope_delta`` (next position = seq_len + rope_delta), computed
        by the model's ``get_rope_index`` once per ``inputs``.

        Raises:
            ValueError: the prompt's placeholder count does not match the image (e.g. two image runs).
        """
        if "positions" not in inputs.extra:
            grid = inputs.extra["image_grid_thw"]
            expected = int(grid.prod(-1).sum()) // self.merge_size**2
            if inputs.num_visual_tokens != expected:
                n = inputs.num_visual_tokens
                raise ValueError(f"prompt holds {n} image placeholders, the image has {expected} visual tokens")
            positions, delta = self.model.model.get_rope_index(
                inputs.input_ids[None], mm_token_type_ids=inputs.extra["mm_token_type_ids"][None], image_grid_thw=grid
            )  # [3, 1, L], [1, 1]
            inputs.extra["positions"], inputs.extra["rope_delta"] = positions[:, 0], int(delta)
        return inputs.extra["positions"], inputs.extra["rope_delta"]

    @property
    def num_image_tokens(self) -> int:
        """Most visual tokens one image can get (the processor's largest pixel budget); ``image_tokens`` gives the
        count for a given image."""
        ip = self.processor.image_processor
        return int(ip.size["longest_edge"]) // (ip.patch_size * ip.merge_size) ** 2

    def image_tokens(self, image: Image.Image) -> int:
        """Visual tokens of ``image`` after the merger."""
        grid = self.processor.image_processor(images=image.convert("RGB"), return_tensors="pt")["image_grid_thw"]
        return int(grid[0].prod()) // self.merge_size**2

    def visual_grid(self, inputs: PromptInputs) -> tuple[int, int]:
        """(rows, cols) of the visual tokens after the merger (raster order)."""
        _, h, w = (int(x) for x in inputs.extra["image_grid_thw"][0])
        return h // self.merge_size, w // self.merge_size

    def rope_positions(self, inputs: PromptInputs) -> torch.Tensor:
        """[3, 1, L] position ids of the full prompt (used by the attention probe)."""
        return self.mrope(inputs)[0][:, None]

    def model_inputs(self, inputs: PromptInputs) -> dict:
        """Keyword arguments of ``model(...)`` / ``model.generate(...)`` for the unpruned prompt (batch of one)."""
        return {
            "input_ids": inputs.input_ids[None],
            "pixel_values": inputs.pixel_values,
            "image_grid_thw": inputs.extra["image_grid_thw"],
            "mm_token_type_ids": inputs.extra["mm_token_type_ids"][None],
        }

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- forward passes ----------------------------------------------------------------------

    @torch.inference_mode()
    def visual_features(self, inputs: PromptInputs) -> torch.Tensor:
        """Visual tokens after the merger, in the language model's space: [N, H], computed once per ``inputs``."""
        if inputs.visual_features is None:
            out = self.model.model.get_image_features(
                pixel_values=inputs.pixel_values, image_grid_thw=inputs.extra["image_grid_thw"], return_dict=True
            )
            inputs.visual_features = torch.cat(list(out.pooler_output), dim=0)
        return inputs.visual_features

    @torch.inference_mode()
    def embed(self, inputs: PromptInputs) -> torch.Tensor:
        """Prompt embeddings with the visual features written into the placeholder rows: [L, H]."""
        embeds = self.model.get_input_embeddings()(inputs.input_ids).clone()  # [L, H]
        embeds[inputs.image_mask] = self.visual_features(inputs).to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def prefill(
        self, inputs: PromptInputs, keep: torch.Tensor | None = None, counts: torch.Tensor | None = None
    ) -> tuple[MRopeState, torch.Tensor]:
        cache = DynamicCache(config=self.model.config)
        length = int(inputs.input_ids.shape[0])
        positions, rope_delta = self.mrope(inputs)  # [3, L], int
        if counts is not None and keep is None:
            raise ValueError("counts need keep: they weight the kept visual tokens")
        bias = None
        if keep is None:
            kwargs = self.model_inputs(inputs)
            del kwargs["mm_token_type_ids"]  # only used to derive positions, which we pass
            out = self.model(**kwargs, position_ids=positions[:, None], cache=cache, use_cache=True, logits_to_keep=1)
            kept = length
        else:
            rows = LlavaAdapter.kept_positions(inputs, keep)  # [L_kept] sequence indices
            embeds = self.embed(inputs)[rows]
            bias = None if counts is None else merge_bias(inputs, rows, counts)
            out = self.model(
                inputs_embeds=embeds[None],
                position_ids=positions[:, rows][:, None],  # [3, 1, L_kept]: original positions, gaps allowed
                attention_mask=None if bias is None else biased_causal_mask(bias, 0, len(rows), embeds.dtype),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            kept = int(rows.shape[0])
        state = MRopeState(cache=cache, seq_len=length, pruned=length - kept, key_bias=bias, rope_delta=rope_delta)
        return state, out.logits[0, -1, : self.vocab_size]

    @torch.inference_mode()
    def prefill_fused_batch(
        self, inputs: list[PromptInputs], token_ids: list[torch.Tensor], parents: list[list[int] | None]
    ) -> list[tuple[MRopeState, torch.Tensor]]:
        """Prompts and their first blocks in one forward (``LlavaAdapter.prefill_fused_batch``), each block's rows at
        ``L + rope_delta`` + their depth on all three M-RoPE rows, as ``forward`` would place them."""
        embeds, positions, lengths, deltas = [], [], [], []
        for x, toks, tree in zip(inputs, token_ids, parents, strict=True):
            prompt_positions, rope_delta = self.mrope(x)  # [3, L]
            prompt = self.embed(x)
            block = self.model.get_input_embeddings()(toks.to(self.device)).to(prompt.dtype)
            n, k = int(prompt.shape[0]), int(toks.shape[0])
            after = n + rope_delta + tree_offsets(tree, k, self.device)
            embeds.append(torch.cat([prompt, block]))
            positions.append(torch.cat([prompt_positions, after.expand(3, k)], dim=1))
            lengths.append(k)
            deltas.append(rope_delta)
        b = kvcache.pad_fused(embeds, positions, parents, lengths, embeds[0].dtype)
        cache = DynamicCache(config=self.model.config)
        out = self.model(inputs_embeds=b.embeds, attention_mask=b.mask, position_ids=b.positions, cache=cache,
                         use_cache=True, logits_to_keep=max(lengths) + 1)  # fmt: skip
        split = kvcache.split_fused(b, cache, self.model.config, out.logits)
        return [(MRopeState(cache=own, seq_len=total, rope_delta=delta), rows[:, : self.vocab_size])
                for (own, rows), total, delta in zip(split, b.totals, deltas, strict=True)]  # fmt: skip

    def _positions(self, state: MRopeState, k: int) -> torch.Tensor:
        """[k] positions of the next k tokens (the same on the three M-RoPE rows)."""
        start = state.seq_len + state.rope_delta
        return torch.arange(start, start + k, device=self.device)

    @torch.inference_mode()
    def forward(self, state: MRopeState, token_ids: torch.Tensor, parents: list[int] | None = None) -> torch.Tensor:
        k = int(token_ids.shape[0])
        offsets = tree_offsets(parents, k, self.device)
        positions = self._positions(state, int(offsets.max()) + 1)[offsets]
        out = self.model(
            input_ids=token_ids.to(self.device)[None],
            position_ids=positions.expand(3, 1, k),
            attention_mask=decode_mask(state, k, self.model.dtype, parents, self.device),
            cache=state.cache,
            use_cache=True,
        )
        state.seq_len += k
        return out.logits[0, :, : self.vocab_size]

    @torch.inference_mode()
    def forward_batch(
        self, states: list[MRopeState], token_ids: list[torch.Tensor], parents: list[list[int] | None] | None = None
    ) -> list[torch.Tensor]:
        """Score ``token_ids[i]`` ([k_i]) after ``states[i]`` for every session in one batched forward.

        Same scheme as ``LlavaAdapter.forward_batch`` (``covspec.models.kvcache.pad_batch``), with each row's M-RoPE
        positions ``seq_len + rope_delta + arange(k)``.

        Returns:
            Per session, logits [k_i, V] (equal to ``forward`` up to float rounding).
        """
        if len(states) == 1 and len(token_ids) == 1:
            return [self.forward(states[0], token_ids[0], None if parents is None else parents[0])]
        require_unbiased(states)
        b = kvcache.pad_batch(states, token_ids, self.model.config, self.device, self._positions, parents,
                              self.model.dtype)  # fmt: skip
        out = self.model(input_ids=b.ids, attention_mask=b.mask, position_ids=b.positions.expand(3, -1, -1),
                         cache=b.cache, use_cache=True)  # fmt: skip
        kvcache.unpad_batch(b, states)
        return [out.logits[i, :n, : self.vocab_size] for i, n in enumerate(b.lengths)]

    def rollback(self, state: DecodeState, seq_len: int) -> None:
        kvcache.rollback(state, seq_len)
