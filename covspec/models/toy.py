"""The embedded toy VLM pair: tokenizer, processor and LLaVA configs for draft and target.

Both models are real ``LlavaForConditionalGeneration`` (CLIP vision tower + projector + Llama
language model) built from small configs; ``pipelines/train_toy.py`` trains them on the shapes
benchmark. The tokenizer is a word-level ``tokenizers`` model over the benchmark's vocabulary.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from covspec.data.shapes import IMAGE_SIZE, vocabulary

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<bos>", "<eos>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
PATCH_SIZE = 8
NUM_VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 144

# The prompt: "<bos>USER: <image>*144 What color is the circle? ASSISTANT:"; bos comes from the
# tokenizer's post-processor, the image placeholders from the processor's expansion of <image>.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>{% elif content['type'] == 'text' %} {{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)

# Sizes chosen so that the target is clearly stronger and >= 4x costlier per decode step. The draft's vision tower has
# the target's shape: the shipped draft starts from (and keeps) the target's trained tower (docs/toy-models.md); it runs
# once per request, at prefill, so it does not change the decode step's cost.
TOY_SIZES: dict[str, dict[str, int]] = {
    "target": {"v_hidden": 128, "v_layers": 2, "v_heads": 4, "hidden": 192, "layers": 8, "heads": 4, "inter": 512},
    "draft": {"v_hidden": 128, "v_layers": 2, "v_heads": 4, "hidden": 128, "layers": 1, "heads": 4, "inter": 512},
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the benchmark vocabulary (Metaspace words, punctuation split off)."""
    words = vocabulary()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for piece in [f"\u2581{w}" for w in words] + [".", "?", ":", ",", "\u2581"]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """A LlavaProcessor whose chat template is the toy prompt and whose images need no resizing."""
    tokenizer = tokenizer or build_tokenizer()
    image_processor = CLIPImageProcessorPil(
        do_resize=False,
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        size={"shortest_edge": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def toy_config(role: str, tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaConfig:
    """LlavaConfig of the toy ``role`` ("target" or "draft")."""
    tokenizer = tokenizer or build_tokenizer()
    s = TOY_SIZES[role]
    vision = CLIPVisionConfig(
        hidden_size=s["v_hidden"],
        intermediate_size=s["v_hidden"] * 4,
        num_hidden_layers=s["v_layers"],
        num_attention_heads=s["v_heads"],
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=s["v_hidden"],
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=NUM_VISUAL_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # last layer: no wasted vision compute
        tie_word_embeddings=True,
    )
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config
