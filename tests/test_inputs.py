"""Input validation: every bad image file or question is an InputError whose message names the file or problem."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from covspec.data.shapes import make_sample
from covspec.errors import CovspecError, InputError
from covspec.inputs import MAX_QUESTION_CHARS, check_question, load_image
from covspec.models.toy import build_tokenizer


@pytest.fixture
def png(tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    make_sample("test", 0).image().save(path)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny, valid-looking 1-bit PNG that declares ``width`` x ``height`` pixels (no pixel data needed to open)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


# -- load_image --------------------------------------------------------------------------------------------------


def test_valid_png_loads_as_the_rendered_rgb_image(png: Path):
    image = load_image(png)
    assert image.mode == "RGB"
    assert image.tobytes() == make_sample("test", 0).image().tobytes()
    assert load_image(str(png)).tobytes() == image.tobytes()  # str paths too


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_are_converted_to_rgb(tmp_path: Path, mode: str):
    path = tmp_path / f"{mode}.png"
    make_sample("test", 1).image().convert(mode).save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (96, 96)


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.png"
    with pytest.raises(InputError, match="does not exist") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_directory(tmp_path: Path):
    with pytest.raises(InputError, match="is not a file") as info:
        load_image(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_text_file_is_not_an_image(tmp_path: Path):
    path = tmp_path / "notes.png"
    path.write_text("what color is the circle?\n", encoding="utf-8")
    with pytest.raises(InputError, match="is not an image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_empty_file_is_not_an_image(tmp_path: Path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="is not an image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_png(png: Path, tmp_path: Path):
    data = png.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot be read") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value)


def test_image_with_too_many_pixels(tmp_path: Path):
    path = _png_header_only(tmp_path / "big.png", 9000, 8000)  # 72 MP: over our limit, under PIL's bomb limits
    with pytest.raises(InputError, match=r"too large \(9000x8000\)") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_decompression_bomb_is_an_input_error(tmp_path: Path):
    path = _png_header_only(tmp_path / "bomb.png", 20000, 10000)  # a 60-byte file declaring 200 MP
    with pytest.raises(InputError, match=r"(too large|cannot be read)"):
        load_image(path)


def test_png_with_corrupt_chunk_length_is_an_input_error(png: Path, tmp_path: Path):
    data = bytearray(png.read_bytes())
    idat = data.index(b"IDAT") - 4  # the 4-byte length field before the chunk type
    (length,) = struct.unpack(">I", data[idat : idat + 4])
    data[idat : idat + 4] = struct.pack(">I", length // 2)
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as info:
        load_image(path)
    assert str(path) in str(info.value)


# -- check_question ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("question", ["", " ", "   \t\n  "])
def test_empty_question(question: str):
    with pytest.raises(InputError, match="the question is empty"):
        check_question(question)


def test_question_too_long_in_characters():
    with pytest.raises(InputError, match=rf"too long \(600 characters, at most {MAX_QUESTION_CHARS}\)"):
        check_question("a" * 600)
    assert check_question("a" * MAX_QUESTION_CHARS) == "a" * MAX_QUESTION_CHARS


def test_question_too_long_in_tokens():
    tokenizer = build_tokenizer()
    ok = " ".join(["red"] * 64)
    assert check_question(ok, tokenizer) == ok
    with pytest.raises(InputError, match=r"too long \(65 tokens, at most 64\)"):
        check_question(ok + " red", tokenizer)
    with pytest.raises(InputError, match=r"too long \(11 tokens, at most 10\)"):
        check_question(" ".join(["red"] * 11), tokenizer, max_tokens=10)


def test_question_whitespace_is_normalized():
    assert check_question("  What   color\tis\nthe circle?  ") == "What color is the circle?"
    # the limit applies to the normalized text, so padding does not count against it
    padded = " " * 300 + "a" * MAX_QUESTION_CHARS + " " * 300
    assert check_question(padded) == "a" * MAX_QUESTION_CHARS


def test_input_errors_are_user_errors():
    assert issubclass(InputError, CovspecError)


def test_benchmark_prompts_keep_their_lines_and_get_a_model_sized_limit():
    from types import SimpleNamespace

    from covspec.inputs import MAX_PROMPT_CHARS, question_token_limit

    prompt = "Hint: shapes.\n\n  Question:  which  color?\nA. red\nB. blue  "
    assert check_question(prompt, keep_lines=True, max_chars=MAX_PROMPT_CHARS) == (
        "Hint: shapes.\nQuestion: which color?\nA. red\nB. blue"
    )
    long = "x" * (MAX_QUESTION_CHARS + 100)
    assert check_question(long, max_chars=MAX_PROMPT_CHARS) == long

    def adapter(context):
        return SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(
            max_position_embeddings=context))))  # fmt: skip

    assert question_token_limit(adapter(512)) == 64  # the toy pair
    assert question_token_limit(adapter(4096)) == 512  # LLaVA-1.5
    assert question_token_limit(adapter(128_000)) == 4096  # Qwen2.5-VL
