"""Validation of user inputs (image files, questions) with errors that name the problem."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from covspec.errors import InputError

MAX_QUESTION_CHARS = 512  # a question typed by a user (covspec generate)
MAX_PROMPT_CHARS = 16_384  # a benchmark prompt (hint, question and options)


def question_token_limit(adapter) -> int:
    """Most tokens a question may have for ``adapter``: an eighth of its language model's context, 64..4096
    (the toy pair, 512 positions: 64)."""
    config = getattr(getattr(adapter, "model", None), "config", None)
    text = getattr(config, "text_config", config)
    context = getattr(text, "max_position_embeddings", 512) or 512
    return max(64, min(4096, int(context) // 8))


MAX_IMAGE_PIXELS = 64_000_000


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` as an RGB image.

    Raises:
        InputError: the file is missing, unreadable or not an image.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"image file {str(p)!r} does not exist")
    if not p.is_file():
        raise InputError(f"image path {str(p)!r} is not a file")
    try:
        with Image.open(p) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InputError(f"image file {str(p)!r} is too large ({img.width}x{img.height})")
            return img.convert("RGB")
    except UnidentifiedImageError as exc:
        raise InputError(f"image file {str(p)!r} is not an image PIL can read") from exc
    except InputError:
        raise
    except Exception as exc:  # OSError, SyntaxError (broken chunks), DecompressionBombError, ...
        raise InputError(f"image file {str(p)!r} cannot be read: {exc}") from exc


def check_question(
    question: str, tokenizer=None, max_tokens: int = 64, *, max_chars: int = MAX_QUESTION_CHARS,
    keep_lines: bool = False,
) -> str:  # fmt: skip
    """The stripped question; refuses empty and over-long ones.

    Whitespace runs become one space; with ``keep_lines`` line breaks stay (benchmark prompts with one option
    per line) and only blank lines go.

    Raises:
        InputError: empty, longer than ``max_chars`` characters or ``max_tokens`` tokens.
    """
    if keep_lines:
        text = "\n".join(" ".join(line.split()) for line in question.splitlines() if line.strip())
    else:
        text = " ".join(question.split())
    if not text:
        raise InputError("the question is empty")
    if len(text) > max_chars:
        raise InputError(f"the question is too long ({len(text)} characters, at most {max_chars})")
    if tokenizer is not None:
        special = [t for t in tokenizer.all_special_tokens if t and t in text]
        if special:
            raise InputError(f"the question contains the reserved token {special[0]!r}")
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > max_tokens:
            raise InputError(f"the question is too long ({n} tokens, at most {max_tokens})")
    return text
