"""Validation of user inputs (image files, questions) with errors that name the problem."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from covspec.errors import InputError

MAX_QUESTION_CHARS = 512
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


def check_question(question: str, tokenizer=None, max_tokens: int = 64) -> str:
    """The stripped question; refuses empty and over-long ones.

    Raises:
        InputError: empty, longer than ``MAX_QUESTION_CHARS`` characters or ``max_tokens`` tokens.
    """
    text = " ".join(question.split())
    if not text:
        raise InputError("the question is empty")
    if len(text) > MAX_QUESTION_CHARS:
        raise InputError(f"the question is too long ({len(text)} characters, at most {MAX_QUESTION_CHARS})")
    if tokenizer is not None:
        special = [t for t in tokenizer.all_special_tokens if t and t in text]
        if special:
            raise InputError(f"the question contains the reserved token {special[0]!r}")
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > max_tokens:
            raise InputError(f"the question is too long ({n} tokens, at most {max_tokens})")
    return text
