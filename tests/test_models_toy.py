"""The toy tokenizer and processor, and the shipped toy-target checkpoint as plain transformers sees it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from covspec.data.shapes import IMAGE_SIZE, load_split, make_sample
from covspec.models.loading import BUILTIN
from covspec.models.toy import NUM_VISUAL_TOKENS, SPECIAL_TOKENS, build_processor, build_tokenizer

TARGET = BUILTIN["toy-target"]


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved_processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(TARGET)


# -- tokenizer ---------------------------------------------------------------------------------------------------


def test_special_tokens(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
    )
    assert tokenizer.image_token == "<image>"
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert set(SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)
    assert tokenizer.convert_tokens_to_ids("<image>") == tokenizer.image_token_id
    # special tokens are single tokens even inside text
    assert tokenizer("<image>", add_special_tokens=False)["input_ids"] == [tokenizer.image_token_id]


def test_bos_is_prepended_and_unknown_words_are_unk(tokenizer):
    ids = tokenizer("The circle is red.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer("The hexagon is red.", add_special_tokens=False)["input_ids"][1] == tokenizer.unk_token_id


@pytest.mark.parametrize(
    "sentence",
    [
        "The circle is red.",
        "What color is the circle?",
        "The red object is a triangle.",
        "There is one shape in the image: a red circle in the top left.",
        "There are two shapes in the image: a red circle in the top left and a blue square in the center.",
        "USER: Where is the purple square? ASSISTANT:",
    ],
)
def test_decode_round_trips(tokenizer, sentence: str):
    ids = tokenizer(sentence)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence
    assert tokenizer.decode(ids[1:], skip_special_tokens=True) == sentence


def test_decode_skips_eos_and_pad(tokenizer):
    ids = tokenizer("The circle is red.", add_special_tokens=False)["input_ids"]
    padded = [tokenizer.pad_token_id, tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    assert tokenizer.decode(padded, skip_special_tokens=True) == "The circle is red."


# -- processor ---------------------------------------------------------------------------------------------------


def test_saved_tokenizer_matches_the_code(saved_processor, tokenizer):
    assert saved_processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert saved_processor.tokenizer.image_token_id == tokenizer.image_token_id


@pytest.mark.parametrize("index", range(3))
def test_saved_processor_expands_the_image_to_144_tokens(saved_processor, index: int):
    sample = make_sample("test", index)
    text = saved_processor.apply_chat_template(_messages(sample.question), add_generation_prompt=True)
    assert text == f"USER: <image> {sample.question} ASSISTANT:"
    enc = saved_processor(images=sample.image(), text=text, return_tensors="pt")
    ids = enc["input_ids"][0]
    image_id = saved_processor.tokenizer.image_token_id
    assert NUM_VISUAL_TOKENS == 144
    assert int((ids == image_id).sum()) == 144
    assert ids[0] == saved_processor.tokenizer.bos_token_id
    assert tuple(enc["pixel_values"].shape) == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    # the placeholders are one contiguous run right after "<bos> USER: " (the prompt the toy pair was trained on)
    positions = torch.nonzero(ids == image_id).flatten()
    assert positions.tolist() == list(range(4, 4 + 144))
    assert saved_processor.tokenizer.convert_ids_to_tokens(ids[:4].tolist()) == ["<bos>", "\u2581USER", ":", "\u2581"]


def test_build_processor_matches_the_saved_one(saved_processor):
    ours = build_processor()
    for sample in load_split("val", 2):
        text = ours.apply_chat_template(_messages(sample.question), add_generation_prompt=True)
        assert text == saved_processor.apply_chat_template(_messages(sample.question), add_generation_prompt=True)
        a = ours(images=sample.image(), text=text, return_tensors="pt")
        b = saved_processor(images=sample.image(), text=text, return_tensors="pt")
        assert torch.equal(a["input_ids"], b["input_ids"])
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"])


# -- plain transformers ------------------------------------------------------------------------------------------

_PLAIN = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path, image_path = sys.argv[1], sys.argv[2]
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    content = [{"type": "image"}, {"type": "text", "text": "How many shapes are there?"}]
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    enc = processor(images=Image.open(image_path), text=text, return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=8)
    print(json.dumps({
        "placeholders": int((enc["input_ids"] == model.config.image_token_id).sum()),
        "image_token_id": model.config.image_token_id,
        "tokenizer_image_token_id": processor.tokenizer.convert_tokens_to_ids("<image>"),
        "new_tokens": out.shape[1] - enc["input_ids"].shape[1],
        "covspec_imported": any(m == "covspec" or m.startswith("covspec.") for m in sys.modules),
    }))
    """
)


@pytest.mark.slow
def test_checkpoint_loads_with_plain_transformers(tmp_path: Path):
    image = tmp_path / "scene.png"
    make_sample("test", 2).image().save(image)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _PLAIN, str(TARGET), str(image)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["placeholders"] == 144
    assert result["image_token_id"] == result["tokenizer_image_token_id"]
    assert 1 <= result["new_tokens"] <= 8
    assert result["covspec_imported"] is False
