"""Tiny random-weight VLMs of every supported family, built locally (no hub): for tests and smoke runs.

``tiny_llava`` exercises the real ``LlavaForConditionalGeneration`` code path with other vision/text
shapes than the toy pair (image size, patch size, depth, width, GQA); ``tiny_llava_next`` builds
LLaVA-NeXT (CLIP + Llama, anyres tiles) and LLaVA-OneVision (SigLIP + Qwen2, anyres_max_9 pooling);
``tiny_qwen2_vl`` builds Qwen2-VL and Qwen2.5-VL (merger, M-RoPE, window attention). All share the toy
word-level vocabulary (Qwen's with its vision tokens), and their processors are built from PIL image
processors, so no torchvision is needed. ``TINY_FAMILIES`` maps each ``model_type`` to a builder
``(seed, device) -> adapter``. ``init_scale`` widens the weight init so that random models make sharp,
varied greedy choices instead of near-uniform logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
from covspec.models.toy import BOS, CHAT_TEMPLATE, EOS, IMAGE, PAD, UNK, build_tokenizer


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
    intermediate: int | None = None
    """The language model's MLP width; None: twice ``hidden``."""


TINY_SPECS: tuple[TinySpec, ...] = (
    TinySpec(),
    TinySpec(image_size=48, patch_size=8, hidden=48, layers=1, heads=2, kv_heads=1),
    TinySpec(image_size=40, patch_size=4, vision_hidden=48, vision_layers=2, hidden=96, layers=3, heads=6, kv_heads=2),
)


def tiny_llava(spec: TinySpec = TinySpec(), seed: int = 0, device: str = "cpu") -> LlavaAdapter:
    """A random-weight LLaVA adapter of shape ``spec``, deterministic in ``seed``, on ``device``."""
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
        intermediate_size=spec.intermediate or spec.hidden * 2,
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
    model = LlavaForConditionalGeneration(config).eval().to(device)
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


# -- other families: Qwen2-VL / Qwen2.5-VL, LLaVA-NeXT, LLaVA-OneVision ------------------------------------------

VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
QWEN_SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD)

# "USER: <|vision_start|><|image_pad|><|vision_end|> What color is the circle? ASSISTANT:" (the processor expands
# <|image_pad|> to the image's merged-patch count, as Qwen's own template does).
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(IMAGE, VISION_START + IMAGE_PAD + VISION_END)


@dataclass(frozen=True)
class TinyQwenSpec:
    """Shape of a tiny random Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``)."""

    version: str = "2.5"
    max_side: int = 64  # the processor resizes images to at most max_side**2 pixels
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    init_scale: float = 0.2
    lm_head_pad: int = 0  # LM-head rows beyond the tokenizer's ids (real checkpoints pad their heads)


@dataclass(frozen=True)
class TinyAnyresSpec:
    """Shape of a tiny random LLaVA-NeXT (``family="llava_next"``: CLIP + Llama) or LLaVA-OneVision
    (``"llava_onevision"``: SigLIP + Qwen2, ``anyres_max_9`` pooling)."""

    family: str = "llava_next"
    tile_size: int = 32
    patch_size: int = 8
    pinpoints: tuple[tuple[int, int], ...] = ((32, 64), (64, 32), (64, 64))
    vision_hidden: int = 32
    vision_layers: int = 1
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    init_scale: float = 0.2
    lm_head_pad: int = 0  # LM-head rows beyond the tokenizer's ids (real checkpoints pad their heads)


def build_qwen_tokenizer():
    """The toy word-level vocabulary with Qwen's vision tokens (no BOS is prepended, as in Qwen)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from covspec.data.shapes import vocabulary

    vocab = {tok: i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
    for piece in [f"\u2581{w}" for w in vocabulary()] + [".", "?", ":", ",", "\u2581"]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={
            "image_token": IMAGE_PAD,
            "video_token": VIDEO_PAD,
            "vision_start_token": VISION_START,
            "vision_end_token": VISION_END,
        },
        padding_side="left",
    )


def _mrope_section(head_dim: int) -> list[int]:
    """(temporal, height, width) split of the rotary frequencies: sums to head_dim / 2, as M-RoPE requires."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _generation_config(tokenizer) -> GenerationConfig:
    return GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )


def tiny_qwen2_vl(spec: TinyQwenSpec = TinyQwenSpec(), seed: int = 0, device: str = "cpu"):
    """A random-weight Qwen2-VL / Qwen2.5-VL adapter of shape ``spec``, deterministic in ``seed``."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from covspec.models.processors import image_only
    from covspec.models.qwen2_vl import Qwen2VLAdapter

    if spec.version not in ("2", "2.5"):
        raise ValueError(f"TinyQwenSpec.version must be '2' or '2.5', got {spec.version!r}")
    tokenizer = build_qwen_tokenizer()
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in (("image", IMAGE_PAD), ("video", VIDEO_PAD), ("start", VISION_START), ("end", VISION_END))
    }
    mrope_section = _mrope_section(spec.hidden // spec.heads)
    text = dict(
        vocab_size=len(tokenizer) + spec.lm_head_pad,
        hidden_size=spec.hidden,
        intermediate_size=spec.hidden * 2,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=1024,
        initializer_range=spec.init_scale,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        depth=spec.vision_layers,
        num_heads=2,
        patch_size=spec.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        initializer_range=spec.init_scale,
    )
    if spec.version == "2":
        vision |= dict(embed_dim=spec.vision_hidden, hidden_size=spec.hidden)
        config_cls, model_cls, processor_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:
        # Window attention over 2 x 2 merged patches in every block but the last (full attention), as in 2.5.
        vision |= dict(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            out_hidden_size=spec.hidden,
            window_size=4 * spec.patch_size,
            fullatt_block_indexes=[spec.vision_layers - 1],
        )
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        processor_cls = Qwen2_5_VLProcessor
    config = config_cls(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"],
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval().to(device)
    model.generation_config = _generation_config(tokenizer)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": (2 * spec.patch_size) ** 2, "longest_edge": spec.max_side**2},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = image_only(processor_cls)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE
    )
    return Qwen2VLAdapter(model, processor, name=f"tiny-qwen{spec.version}-vl-{seed}")


def tiny_llava_next(spec: TinyAnyresSpec = TinyAnyresSpec(), seed: int = 0, device: str = "cpu"):
    """A random-weight LLaVA-NeXT or LLaVA-OneVision adapter of shape ``spec``, deterministic in ``seed``."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from covspec.models.llava_next import LlavaNextAdapter
    from covspec.models.processors import image_only

    if spec.family not in ("llava_next", "llava_onevision"):
        raise ValueError(f"TinyAnyresSpec.family must be llava_next or llava_onevision, got {spec.family!r}")
    tokenizer = build_tokenizer()
    if spec.family == "llava_onevision":
        # Its processor counts <video> tokens in every prompt: without one in the vocabulary, <unk> would count.
        tokenizer.add_tokens(["<video>"], special_tokens=True)
    pinpoints = [list(p) for p in spec.pinpoints]
    tile = spec.tile_size
    vision = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=2,
        image_size=tile,
        patch_size=spec.patch_size,
    )
    text = dict(
        vocab_size=len(tokenizer) + spec.lm_head_pad,
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
    common = dict(
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
    )
    if spec.family == "llava_onevision":
        common["video_token_index"] = tokenizer.convert_tokens_to_ids("<video>")
    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], image_grid_pinpoints=pinpoints)
    if spec.family == "llava_next":  # CLIP (drops CLS: "default") + Llama
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(**vision),
            text_config=LlamaConfig(**text),
            vision_feature_select_strategy="default",
            **common,
        )
        model_cls = LlavaNextForConditionalGeneration
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, **norm
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=spec.patch_size,
            vision_feature_select_strategy="default",
            chat_template=CHAT_TEMPLATE,
            num_additional_image_tokens=1,
        )
    else:  # SigLIP (no CLS: "full") + Qwen2
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision),
            text_config=Qwen2Config(**text),
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            **common,
        )
        model_cls = LlavaOnevisionForConditionalGeneration
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, **norm)
        processor = image_only(LlavaOnevisionProcessor)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_image_tokens=(tile // spec.patch_size) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            chat_template=CHAT_TEMPLATE,
            video_token="<video>",
        )
    torch.manual_seed(seed)
    model = model_cls(config).eval().to(device)
    model.generation_config = _generation_config(tokenizer)
    return LlavaNextAdapter(model, processor, name=f"tiny-{spec.family}-{seed}")


ONEVISION = TinyAnyresSpec(family="llava_onevision", pinpoints=((32, 64), (64, 32), (64, 64), (128, 128)))
"""A OneVision whose 96 px images get 4 x 4 tiles: more than ``anyres_max_9`` allows, so the packing pools them."""

TINY_FAMILIES: dict[str, Callable[..., Any]] = {
    "llava": lambda seed=0, device="cpu": tiny_llava(TinySpec(), seed, device),
    "llava_next": lambda seed=0, device="cpu": tiny_llava_next(TinyAnyresSpec(), seed, device),
    "llava_onevision": lambda seed=0, device="cpu": tiny_llava_next(ONEVISION, seed, device),
    "qwen2_vl": lambda seed=0, device="cpu": tiny_qwen2_vl(TinyQwenSpec(version="2"), seed, device),
    "qwen2_5_vl": lambda seed=0, device="cpu": tiny_qwen2_vl(TinyQwenSpec(version="2.5"), seed, device),
}
"""``model_type`` -> ``builder(seed=0, device="cpu")`` of a tiny adapter of that family (one shape each)."""
