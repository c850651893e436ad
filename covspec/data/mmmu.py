"""MMMU from its official parquet files, one folder per subject (the Hugging Face dataset ``MMMU/MMMU``).

Layout under ``data.path``: ``<Subject>/<split>-00000-of-00001.parquet`` with ``<split>`` ``dev`` (config split
``train``), ``validation`` (``val``) or ``test`` (``test``; its answers are hidden, so it cannot be scored).
``data.subjects`` picks subjects (folder names, e.g. ``[Accounting, Art]``); empty means every folder that has the
split. ``data.path`` may also be one parquet file.

Columns used: ``id``, ``question``, ``options`` (a string holding a Python list literal, read with
``ast.literal_eval``), ``answer``, ``question_type`` (``multiple-choice`` or ``open``) and ``image_1`` ..
``image_7`` (``{"bytes": ..., "path": ...}``). Adapters take one image: ``multi_image="first"`` (the default, as
MMMU's reference evaluation of single-image models does) gives the model the row's first image; ``"concat"`` gives
it every image of the row side by side, left to right in column order (``FileSample.extra_images``).
Multiple-choice options are lettered A, B, ... and scored by choice extraction; open answers by MMMU's
normalized string / number match (:mod:`covspec.data.choices`). Prompts follow MMMU's reference evaluation.
"""

from __future__ import annotations

import ast
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covspec.config import MULTI_IMAGE
from covspec.data.sample import FileSample, check_dir, check_file
from covspec.errors import InputError

__all__ = ["IMAGE_COLUMNS", "MULTI_IMAGE", "SPLIT_FILES", "build_prompt", "load_mmmu", "parse_options"]

SPLIT_FILES = {"train": "dev", "val": "validation", "test": "test"}
COLUMNS = ("id", "question", "options", "answer", "question_type")
IMAGE_COLUMNS = tuple(f"image_{i}" for i in range(1, 8))
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
OPEN_SUFFIX = "Answer the question using a single word or phrase."


def build_prompt(question: str, options: dict[str, str]) -> str:
    """MMMU's reference prompt: options as ``(A) text`` lines, then the instruction for the question type."""
    if options:
        lines = "\n".join(f"({letter}) {text}" for letter, text in options.items())
        return f"{question.strip()}\n\n{lines}\n\n{CHOICE_SUFFIX}"
    return f"{question.strip()}\n\n{OPEN_SUFFIX}"


def parse_options(text: Any, where: str) -> list[str]:
    """The option texts of an ``options`` cell such as ``"['$6', '$7']"``; never evaluates code.

    Raises:
        InputError: the cell is not a Python literal list of strings or numbers.
    """
    if not isinstance(text, str):
        raise InputError(f"{where}: column 'options' must be a string holding a list literal, got {text!r}")
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise InputError(f"{where}: column 'options' is not a Python list literal: {text[:80]!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise InputError(f"{where}: column 'options' must be a list of strings, got {text[:80]!r}")
    return [str(v) for v in value]


def _answers(answer: str) -> tuple[str, ...]:
    """An open answer, or each of several when the cell holds a list literal (``"['24/7', '3.429']"``)."""
    if answer.startswith("["):
        try:
            value = ast.literal_eval(answer)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return (answer,)
        if isinstance(value, list) and value and all(isinstance(v, str | int | float) for v in value):
            return tuple(str(v) for v in value)
    return (answer,)


def _images(row: dict, where: str) -> list[bytes]:
    """The row's non-empty images, in column order (at least one)."""
    found = []
    for column in IMAGE_COLUMNS:
        cell = row.get(column)
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if isinstance(data, bytes) and data:
            found.append(data)
    if not found:
        raise InputError(f"{where}: no image ({', '.join(c for c in IMAGE_COLUMNS)} are all empty)")
    return found


def _files(root: Path, split: str, subjects: Sequence[str]) -> list[Path]:
    if root.suffix == ".parquet":
        return [check_file(root, "mmmu parquet file")]
    check_dir(root, "mmmu data.path directory")
    name = SPLIT_FILES[split]
    if not subjects:
        subjects = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob(f"{name}-*.parquet")))
        if not subjects:
            raise InputError(f"no MMMU subject folder in {root} has a {name}-*.parquet file (data.split={split})")
    files = []
    for subject in subjects:
        folder = root / subject
        if not folder.is_dir():
            raise InputError(f"mmmu subject {subject!r} (data.subjects) not found: no folder {folder}")
        found = sorted(folder.glob(f"{name}-*.parquet"))
        if not found:
            raise InputError(f"mmmu: no {name} parquet file in {folder} (expected {name}-00000-of-00001.parquet)")
        files += found
    return files


def _table(path: Path):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged or foreign file
        raise InputError(f"{path}: not a readable parquet file: {err}") from None
    names = set(pf.schema_arrow.names)
    for column in COLUMNS:
        if column not in names:
            raise InputError(f"{path.parent.name}/{path.name}: missing column {column!r}")
    return pf, [c for c in COLUMNS + IMAGE_COLUMNS if c in names]


def _sample(row: dict, split: str, subject: str, where: str, multi_image: str = "first") -> FileSample:
    for column in ("id", "question", "answer", "question_type"):
        if not isinstance(row[column], str) or not row[column].strip():
            raise InputError(f"{where}: column {column!r} is empty")
    where = f"{where} (id {row['id']})"
    qtype = row["question_type"].strip()
    if qtype not in ("multiple-choice", "open"):
        raise InputError(f"{where}: question_type must be 'multiple-choice' or 'open', got {qtype!r}")
    answer = row["answer"].strip()
    images = _images(row, where)
    options: dict[str, str] = {}
    if qtype == "multiple-choice":
        texts = parse_options(row["options"], where)
        if not 2 <= len(texts) <= 26:
            raise InputError(f"{where}: a multiple-choice question needs 2..26 options, got {len(texts)}")
        options = dict(zip(string.ascii_uppercase, texts, strict=False))
        if answer not in options:
            raise InputError(f"{where}: answer {answer!r} is not one of the options {', '.join(options)}")
    return FileSample(
        benchmark="mmmu",
        sample_id=row["id"].strip(),
        split=split,
        kind=subject,
        question=build_prompt(row["question"], options),
        answer=answer,
        metric="choice" if options else "open",
        references=() if options else _answers(answer),
        options=tuple(options.items()),
        source=where,
        image_bytes=images[0],
        extra_images=tuple(images[1:]) if multi_image == "concat" else (),
    )


def load_mmmu(
    path: str | Path, split: str, limit: int, offset: int = 0, subjects: Sequence[str] = (), multi_image: str = "first"
) -> list[FileSample]:
    """``limit`` MMMU samples from ``offset``, subjects in order (sorted when all), rows in file order.

    Files before the selection are only counted (from their parquet metadata); only selected rows become samples.

    Args:
        path: the dataset folder (one folder per subject), or one parquet file.
        split: ``train`` (dev), ``val`` (validation) or ``test``.
        limit: most samples to return.
        offset: index of the first sample over the concatenated subjects.
        subjects: subject folder names; empty means all.
        multi_image: ``first`` (the row's first image) or ``concat`` (all its images side by side).

    Raises:
        InputError: a missing folder, file or column, or a malformed row (bad options literal, unknown question
            type, answer not among the options, no image); the message names the file and row (``row 1`` is the
            first row of the file).
    """
    if multi_image not in MULTI_IMAGE:
        raise InputError(f"multi_image must be one of {', '.join(MULTI_IMAGE)}, got {multi_image!r}")
    files = _files(Path(path), split, subjects)
    samples: list[FileSample] = []
    start, total = offset, 0  # start: rows still to skip before the selection begins
    for file in files:
        pf, columns = _table(file)
        n = pf.metadata.num_rows
        total += n
        if start >= n:
            start -= n
            continue
        take = min(n - start, limit - len(samples))
        rows = pf.read(columns=columns).slice(start, take).to_pylist()
        subject = file.parent.name
        for i, row in enumerate(rows, start + 1):
            samples.append(_sample(row, split, subject, f"mmmu {subject}/{file.name} row {i}", multi_image))
        start = 0
        if len(samples) >= limit:
            break
    if not samples:
        raise InputError(f"mmmu {path} has {total} samples for data.split={split}; data.offset={offset} selects none")
    return samples
