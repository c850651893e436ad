"""LLaVA-NeXT and LLaVA-OneVision adapter: anyres tiles, the model's own feature packing, pruning, rollback.

Both models cut the image into a base tile plus a grid of high-resolution tiles (``image_grid_pinpoints``), run the
vision tower per tile, then *pack* the features: the tile grid is unpadded back to the image's aspect ratio, a
learned ``image_newline`` token ends every row, and the base tile's tokens come first (OneVision also pools large
grids down to ``anyres_max_N`` tiles). The prompt holds one ``<image>`` placeholder per packed feature, so the count
depends on the image size. The visual tokens here are exactly those packed features (newline tokens included): a
pruning ``keep`` indexes the visual placeholder positions 0..N-1 in prompt order.

The language model uses 1-D positions, so prefill (pruned or not), ``forward``, ``forward_batch`` and rollback are
``LlavaAdapter``'s; only the inputs (tiles, ``image_sizes``) and the feature call differ, and logits are cut to the
tokenizer's ids (``vocab_size``): checkpoints of one family pad their LM heads to different widths.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import DynamicCache

from covspec.models.base import DecodeState, PromptInputs
from covspec.models.llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    """Wraps a loaded ``LlavaNextForConditionalGeneration`` or ``LlavaOnevisionForConditionalGeneration``."""

    def __init__(self, model, processor, name: str = "llava-next") -> None:
        super().__init__(model, processor, name)

    @staticmethod
    def scored_vocab(config, tokenizer) -> int:
        """The tokenizer's ids, not the LM head's padded width: draft and target must agree on the logits' width."""
        return min(config.text_config.vocab_size, len(tokenizer))

    def prepare(self, image: Image.Image, question: str) -> PromptInputs:
        enc = self.processor(images=image.convert("RGB"), text=self.prompt_text(question), return_tensors="pt")
        return self._encoded(enc)

    def prepare_from_ids(self, image: Image.Image, prompt_ids: list[int]) -> PromptInputs:
        """Inputs for ids tokenized elsewhere; each run of image placeholders is resized to this model's count for
        ``image`` (another vision tower or tile layout packs a different number of features)."""
        enc = self.processor(images=image.convert("RGB"), text=self.processor.image_token, return_tensors="pt")
        n = int((enc["input_ids"][0] == self.image_token_id).sum())
        ids: list[int] = []
        for i, tok in enumerate(prompt_ids):
            if tok != self.image_token_id:
                ids.append(tok)
            elif i == 0 or prompt_ids[i - 1] != self.image_token_id:
                ids.extend([self.image_token_id] * n)
        enc["input_ids"] = torch.tensor([ids], dtype=torch.long)
        return self._encoded(enc)

    def _encoded(self, enc) -> PromptInputs:
        inputs = self._inputs(enc["input_ids"][0], enc["pixel_values"])  # pixel_values: [1, tiles, 3, H, W]
        inputs.extra["image_sizes"] = enc["image_sizes"].to(self.device)  # [1, 2] (height, width)
        if "batch_num_images" in enc:  # OneVision
            inputs.extra["batch_num_images"] = enc["batch_num_images"].to(self.device)
        return inputs

    def image_tokens(self, image: Image.Image) -> int:
        """Packed visual tokens of ``image`` (base tile, unpadded high-resolution tiles and newline tokens)."""
        enc = self.processor(images=image.convert("RGB"), text=self.processor.image_token, return_tensors="pt")
        return int((enc["input_ids"][0] == self.image_token_id).sum())

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens of one tile (the base tile); ``image_tokens`` gives the packed count for a given image."""
        return super().num_image_tokens

    def model_inputs(self, inputs: PromptInputs) -> dict:
        """Keyword arguments of ``model(...)`` / ``model.generate(...)`` for the unpruned prompt (batch of one)."""
        return {"input_ids": inputs.input_ids[None], "pixel_values": inputs.pixel_values, **inputs.extra}

    def visual_features_batch(self, inputs: list[PromptInputs]) -> None:
        """One vision-tower call per prompt: images pack different numbers of tiles."""
        for x in inputs:
            self.visual_features(x)

    @torch.inference_mode()
    def visual_features(self, inputs: PromptInputs) -> torch.Tensor:
        """Packed visual tokens in the language model's space: [N, H], computed once per ``inputs``."""
        if inputs.visual_features is None:
            out = self.model.model.get_image_features(
                pixel_values=inputs.pixel_values, image_sizes=inputs.extra["image_sizes"], return_dict=True
            )
            inputs.visual_features = torch.cat(list(out.pooler_output), dim=0)
        return inputs.visual_features

    @torch.inference_mode()
    def prefill(
        self, inputs: PromptInputs, keep: torch.Tensor | None = None, counts: torch.Tensor | None = None
    ) -> tuple[DecodeState, torch.Tensor]:
        if keep is not None or counts is not None:
            state, logits = super().prefill(inputs, keep, counts)  # kept positions' embeddings, original position ids
            return state, logits[: self.vocab_size]
        cache = DynamicCache(config=self.model.config)
        out = self.model(**self.model_inputs(inputs), cache=cache, use_cache=True, logits_to_keep=1)
        state = DecodeState(cache=cache, seq_len=int(inputs.input_ids.shape[0]))
        return state, out.logits[0, -1, : self.vocab_size]

    def prefill_fused_batch(
        self, inputs: list[PromptInputs], token_ids: list[torch.Tensor], parents: list[list[int] | None]
    ) -> list[tuple[DecodeState, torch.Tensor]]:
        return [(state, logits[:, : self.vocab_size])
                for state, logits in super().prefill_fused_batch(inputs, token_ids, parents)]  # fmt: skip

    def forward(self, state: DecodeState, token_ids: torch.Tensor, parents: list[int] | None = None) -> torch.Tensor:
        return super().forward(state, token_ids, parents)[:, : self.vocab_size]

    def forward_batch(
        self, states: list[DecodeState], token_ids: list[torch.Tensor], parents: list[list[int] | None] | None = None
    ) -> list[torch.Tensor]:
        return [logits[:, : self.vocab_size] for logits in super().forward_batch(states, token_ids, parents)]
