"""LLaVA-family adapter (the toy pair and real ``LlavaForConditionalGeneration`` checkpoints).

The unpruned prefill calls the model exactly as ``generate`` does (ids + pixel values), so greedy
decoding through the adapter is token-identical to ``model.generate(do_sample=False)``. A pruned
prefill writes the visual features into the prompt embeddings, keeps the chosen visual positions
and every text position, and passes their *original* position ids (gaps allowed) so that the kept
tokens and every later token see the positions they would have had without pruning.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache, LlavaForConditionalGeneration

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


class LlavaAdapter(FusedPrefill):
    """Wraps a loaded ``LlavaForConditionalGeneration`` and its processor."""

    @staticmethod
    def scored_vocab(config, tokenizer) -> int:
        """The width of the logits this adapter returns, from the model's config and tokenizer (no weights needed)."""
        return config.text_config.vocab_size

    def __init__(self, model: LlavaForConditionalGeneration, processor, name: str = "llava") -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.image_token_id: int = model.config.image_token_id
        self.vocab_size: int = self.scored_vocab(model.config, self.tokenizer)
        eos = eos_id_list(model.generation_config.eos_token_id, self.tokenizer)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.eos_token_id: int = eos[0]
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    # -- inputs -------------------------------------------------------------------------------

    def prompt_text(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def _fit(self, image: Image.Image) -> Image.Image:
        """RGB, resized to the vision tower's size when the processor itself does not resize (toy pair)."""
        image = image.convert("RGB")
        if getattr(self.processor.image_processor, "do_resize", True):
            return image
        size = self.model.config.vision_config.image_size
        return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)

    def prepare(self, image: Image.Image, question: str) -> PromptInputs:
        enc = self.processor(images=self._fit(image), text=self.prompt_text(question), return_tensors="pt")
        return self._inputs(enc["input_ids"][0], enc["pixel_values"])

    def prepare_from_ids(self, image: Image.Image, prompt_ids: list[int]) -> PromptInputs:
        """Inputs for ids tokenized elsewhere; each run of image placeholders is resized to this model's count
        (a draft with another vision tower expands ``<image>`` to a different number of placeholders)."""
        pixel_values = self.processor.image_processor(images=self._fit(image), return_tensors="pt")["pixel_values"]
        ids: list[int] = []
        for i, tok in enumerate(prompt_ids):
            if tok != self.image_token_id:
                ids.append(tok)
            elif i == 0 or prompt_ids[i - 1] != self.image_token_id:
                ids.extend([self.image_token_id] * self.num_image_tokens)
        return self._inputs(torch.tensor(ids, dtype=torch.long), pixel_values)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image (one tile, the ``default`` strategy drops CLS)."""
        vision = self.model.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        return n if self.model.config.vision_feature_select_strategy == "default" else n + 1

    def _inputs(self, input_ids: torch.Tensor, pixel_values) -> PromptInputs:
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = torch.from_numpy(np.stack(pixel_values))
        return PromptInputs(
            input_ids=input_ids.to(self.device),
            pixel_values=pixel_values.to(self.device, self.dtype),
            image_mask=(input_ids == self.image_token_id).to(self.device),
        )

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- forward passes ----------------------------------------------------------------------

    @torch.inference_mode()
    def visual_features(self, inputs: PromptInputs) -> torch.Tensor:
        """Projected visual tokens in the language model's space: [N, H], computed once per ``inputs``."""
        if inputs.visual_features is None:
            out = self.model.model.get_image_features(pixel_values=inputs.pixel_values, return_dict=True)
            inputs.visual_features = torch.cat(list(out.pooler_output), dim=0)
        return inputs.visual_features

    @torch.inference_mode()
    def visual_features_batch(self, inputs: list[PromptInputs]) -> None:
        """``visual_features`` of several prompts in one vision-tower call (memoized on each)."""
        todo = [x for x in inputs if x.visual_features is None]
        if len(todo) < 2:
            for x in todo:
                self.visual_features(x)
            return
        out = self.model.model.get_image_features(pixel_values=torch.cat([x.pixel_values for x in todo]),
                                                  return_dict=True)  # fmt: skip
        for x, features in zip(todo, out.pooler_output, strict=True):
            x.visual_features = features

    @torch.inference_mode()
    def embed(self, inputs: PromptInputs) -> torch.Tensor:
        """Prompt embeddings with the visual features written into the placeholder rows: [L, H]."""
        embeds = self.model.get_input_embeddings()(inputs.input_ids)  # [L, H]
        embeds = embeds.clone()
        embeds[inputs.image_mask] = self.visual_features(inputs).to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def prefill(
        self, inputs: PromptInputs, keep: torch.Tensor | None = None, counts: torch.Tensor | None = None
    ) -> tuple[DecodeState, torch.Tensor]:
        cache = DynamicCache(config=self.model.config)
        length = int(inputs.input_ids.shape[0])
        if counts is not None and keep is None:
            raise ValueError("counts need keep: they weight the kept visual tokens")
        if keep is None:
            out = self.model(
                input_ids=inputs.input_ids[None],
                pixel_values=inputs.pixel_values,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return DecodeState(cache=cache, seq_len=length), out.logits[0, -1]
        positions = self.kept_positions(inputs, keep)  # [L_kept]
        embeds = self.embed(inputs)[positions]
        bias = None if counts is None else merge_bias(inputs, positions, counts)
        out = self.model(
            inputs_embeds=embeds[None],
            position_ids=positions[None],
            attention_mask=None if bias is None else biased_causal_mask(bias, 0, len(positions), embeds.dtype),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        state = DecodeState(cache=cache, seq_len=length, pruned=length - int(positions.shape[0]), key_bias=bias)
        return state, out.logits[0, -1]

    @torch.inference_mode()
    def prefill_fused_batch(
        self, inputs: list[PromptInputs], token_ids: list[torch.Tensor], parents: list[list[int] | None]
    ) -> list[tuple[DecodeState, torch.Tensor]]:
        """Prompts, each followed by its first block (``token_ids[i]``, a chain or the tree ``parents[i]``; may be
        empty), in one forward: rows left-padded (``kvcache.pad_fused``), one vision-tower call; each state holds its
        own rows of the batched cache. Per prompt: the state and logits [k + 1, V] (``FusedPrefill.prefill_fused``)."""
        embeds, positions, lengths = [], [], []
        self.visual_features_batch(inputs)
        for x, toks, tree in zip(inputs, token_ids, parents, strict=True):
            prompt = self.embed(x)
            block = self.model.get_input_embeddings()(toks.to(self.device)).to(prompt.dtype)
            n, k = int(prompt.shape[0]), int(toks.shape[0])
            embeds.append(torch.cat([prompt, block]))
            after = n + tree_offsets(tree, k, self.device)
            positions.append(torch.cat([torch.arange(n, device=self.device), after])[None])
            lengths.append(k)
        b = kvcache.pad_fused(embeds, positions, parents, lengths, embeds[0].dtype)
        cache = DynamicCache(config=self.model.config)
        out = self.model(inputs_embeds=b.embeds, attention_mask=b.mask, position_ids=b.positions[0], cache=cache,
                         use_cache=True, logits_to_keep=max(lengths) + 1)  # fmt: skip
        return [(DecodeState(cache=own, seq_len=total), rows)
                for (own, rows), total in zip(kvcache.split_fused(b, cache, self.model.config, out.logits), b.totals,
                                              strict=True)]  # fmt: skip

    @staticmethod
    def kept_positions(inputs: PromptInputs, keep: torch.Tensor) -> torch.Tensor:
        """Sequence positions kept: every text position and the visual positions chosen by ``keep``."""
        visual_positions = torch.nonzero(inputs.image_mask).flatten()  # [N]
        mask = ~inputs.image_mask.clone()
        mask[visual_positions[keep.to(visual_positions.device)]] = True
        return torch.nonzero(mask).flatten()

    @torch.inference_mode()
    def forward(self, state: DecodeState, token_ids: torch.Tensor, parents: list[int] | None = None) -> torch.Tensor:
        k = int(token_ids.shape[0])
        position_ids = (state.seq_len + tree_offsets(parents, k, self.device))[None]
        out = self.model(
            input_ids=token_ids.to(self.device)[None],
            position_ids=position_ids,
            attention_mask=decode_mask(state, k, self.model.dtype, parents, self.device),
            cache=state.cache,
            use_cache=True,
        )
        state.seq_len += k
        return out.logits[0]

    @torch.inference_mode()
    def forward_batch(
        self, states: list[DecodeState], token_ids: list[torch.Tensor], parents: list[list[int] | None] | None = None
    ) -> list[torch.Tensor]:
        """Score ``token_ids[i]`` ([k_i]) after ``states[i]`` for every session in one batched forward.

        ``parents[i]``: session i's tokens form a token tree (see ``forward``); the mask is then 4-D.

        Sessions have different cache lengths and block lengths: each session's keys/values are left-padded to the
        longest cache and its new tokens right-padded to the longest block; a 2-D attention mask zeroes both pads
        and every row carries its own position ids (gaps from pruning included). Afterwards each state holds its
        own rows of the batched cache (views, no copy) and is extended by k_i exactly as ``forward`` would
        (``covspec.models.kvcache.pad_batch``).

        Returns:
            Per session, logits [k_i, V] (equal to ``forward`` up to float rounding, ~1e-6).
        """
        if len(states) == 1 and len(token_ids) == 1:
            return [self.forward(states[0], token_ids[0], None if parents is None else parents[0])]
        require_unbiased(states)
        b = kvcache.pad_batch(states, token_ids, self.model.config, self.device,
                      lambda s, k: torch.arange(s.seq_len, s.seq_len + k, device=self.device),
                      parents, self.model.dtype)  # fmt: skip
        out = self.model(input_ids=b.ids, attention_mask=b.mask, position_ids=b.positions, cache=b.cache,
                         use_cache=True)  # fmt: skip
        kvcache.unpad_batch(b, states)
        return [out.logits[i, :n] for i, n in enumerate(b.lengths)]

    def rollback(self, state: DecodeState, seq_len: int) -> None:
        kvcache.rollback(state, seq_len)
