"""The sample interface every benchmark yields, the sample of the file-based benchmarks, and their shared helpers.

Consumers (``covspec eval``, ``covspec bench``) see only :class:`BenchmarkSample`: an id, a split, a kind (the
per-kind breakdown: a shapes question kind, a VQA answer type, an MMBench category, an MMMU subject), the prompt
given to the model (``question``), the reference ``answer`` as text, the image, and ``score(prediction)`` with the
benchmark's own metric in [0, 1].
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from PIL import Image

from covspec.data.choices import choice_accuracy, open_answer_match
from covspec.data.vqa_eval import vqa_accuracy
from covspec.errors import InputError
from covspec.inputs import MAX_IMAGE_PIXELS, load_image

__all__ = ["METRICS", "BenchmarkSample", "FileSample", "check_dir", "check_file", "read_json", "select"]

METRICS = ("vqa_accuracy", "choice", "open")
"""``vqa_accuracy``: VQA accuracy against the human answers; ``choice``: the extracted option letter equals the
answer; ``open``: MMMU's open-answer match."""

T = TypeVar("T")


class BenchmarkSample(Protocol):
    """What consumers may rely on; :class:`covspec.data.shapes.Sample` and :class:`FileSample` both provide it."""

    @property
    def sample_id(self) -> str: ...
    @property
    def split(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def question(self) -> str: ...
    @property
    def answer(self) -> str: ...
    def image(self) -> Image.Image: ...
    def score(self, prediction: str) -> float: ...


@dataclass(frozen=True)
class FileSample:
    """One item of a benchmark read from local files (VQAv2, MMBench, MMMU)."""

    benchmark: str
    """``vqav2``, ``mmbench`` or ``mmmu``."""
    sample_id: str
    """The benchmark's own id: VQA ``question_id``, MMBench ``index``, MMMU ``id``."""
    split: str
    """The config split it was loaded for (``train`` / ``val`` / ``test``)."""
    kind: str
    """Group for per-kind results: VQA ``answer_type``, MMBench ``category``, MMMU subject."""
    question: str
    """The prompt given to the model: the question with hint, options and answer instruction."""
    answer: str
    """The reference as text: VQA ``multiple_choice_answer``, an option letter, or MMMU's open answer."""
    metric: str
    """One of ``METRICS``."""
    references: tuple[str, ...] = ()
    """VQA: every human answer (ten in VQAv2); open questions: every accepted answer."""
    options: tuple[tuple[str, str], ...] = ()
    """Multiple choice: (letter, option text) pairs in order."""
    source: str = ""
    """Where the sample comes from, for messages: ``"MMBench_DEV_EN.tsv row 17"``."""
    group: str = ""
    """MMBench CircularEval: the question's ``index``, shared by its rotated copies (scored together); else empty."""
    image_path: Path | None = None
    """The image file (VQAv2), or None when the image is embedded."""
    image_bytes: bytes | None = field(default=None, repr=False)
    """The encoded image (MMBench base64-decoded, MMMU parquet bytes), or None."""
    extra_images: tuple[bytes, ...] = field(default=(), repr=False)
    """More encoded images of a multi-image question (MMMU with ``data.multi_image=concat``): ``image()`` places
    them right of the first, left to right in their order, top-aligned on white."""

    def __post_init__(self) -> None:
        assert self.metric in METRICS, self.metric
        assert (self.image_path is None) != (self.image_bytes is None), "exactly one image source"

    def image(self) -> Image.Image:
        """The RGB image.

        Raises:
            InputError: the image file is missing or unreadable, or the embedded bytes are not an image; the message
                names the file, or the benchmark file and row.
        """
        if self.image_path is not None:
            return load_image(self.image_path)
        assert self.image_bytes is not None
        images = [self._decode(data, i) for i, data in enumerate((self.image_bytes, *self.extra_images), 1)]
        if len(images) == 1:
            return images[0]
        width, height = sum(im.width for im in images), max(im.height for im in images)
        if width * height > MAX_IMAGE_PIXELS:
            raise InputError(f"{self.source}: the {len(images)} images side by side are too large ({width}x{height})")
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        x = 0
        for im in images:
            canvas.paste(im, (x, 0))
            x += im.width
        return canvas

    def _decode(self, data: bytes, index: int) -> Image.Image:
        which = "the image" if not self.extra_images else f"image {index} of {1 + len(self.extra_images)}"
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise InputError(f"{self.source}: {which} is too large ({img.width}x{img.height})")
                return img.convert("RGB")
        except InputError:
            raise
        except Exception as exc:  # UnidentifiedImageError, OSError, DecompressionBombError, ...
            raise InputError(f"{self.source}: {which} cannot be decoded: {exc}") from exc

    def score(self, prediction: str) -> float:
        """The benchmark's metric for one prediction, in [0, 1]."""
        if self.metric == "vqa_accuracy":
            return vqa_accuracy(prediction, self.references)
        if self.metric == "choice":
            return choice_accuracy(prediction, self.answer, dict(self.options))
        return float(open_answer_match(prediction, self.references or (self.answer,)))


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared by the loaders. Every message names the file (and the row where there is one).


def check_file(path: Path, what: str) -> Path:
    """``path`` if it is an existing file; InputError naming it and ``what`` it should be otherwise."""
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a file")
    return path


def check_dir(path: Path, what: str) -> Path:
    """``path`` if it is an existing directory; InputError otherwise."""
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_dir():
        raise InputError(f"{what} {path} is not a directory")
    return path


def read_json(path: Path, what: str) -> Any:
    """The parsed JSON file; InputError naming the file (and line and column of a syntax error)."""
    check_file(path, what)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise InputError(f"{path.name}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}") from None


def select(items: Sequence[T], limit: int, offset: int, where: str) -> list[T]:
    """``items[offset : offset + limit]``; InputError naming ``where`` when that leaves nothing."""
    if offset >= len(items):
        raise InputError(f"{where} has {len(items)} samples; data.offset={offset} selects none")
    return list(items[offset : offset + limit])
