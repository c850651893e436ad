"""Tiny random-weight LLaVA models sharing the toy tokenizer: for tests and smoke runs.

They exercise the real ``LlavaForConditionalGeneration`` code path with other vision/text shapes
than the toy pair (image size, patch size, depth, width, GQA). ``init_scale`` widens the weight
init so that random models make sharp, varied greedy choices instead of near-uniform logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from covspec.models.llava import LlavaAdapter
from covspec.models.toy import CHAT_TEMPLATE, IMAGE, build_tokenizer


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny random LLaVA."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 1
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    init_scale: float = 0.2


TINY_SPECS: tuple[TinySpec, ...] = (
    TinySpec(),
    TinySpec(image_size=48, patch_size=8, hidden=48, layers=1, heads=2, kv_heads=1),
    TinySpec(image_size=40, patch_size=4, vision_hidden=48, vision_layers=2, hidden=96, layers=3, heads=6, kv_heads=2),
)


def tiny_llava(spec: TinySpec = TinySpec(), seed: int = 0) -> LlavaAdapter:
    """A random-weight LLaVA adapter of shape ``spec``, deterministic in ``seed``."""
    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=2,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.hidden * 2,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=1024,
        initializer_range=spec.init_scale,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": spec.image_size},
        do_center_crop=True,
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return LlavaAdapter(model, processor, name=f"tiny-{seed}")
