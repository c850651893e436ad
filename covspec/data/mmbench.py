"""MMBench from its official TSV: one row per question, the image inline as base64.

Columns: ``index, question, hint, A, B, C, D, answer, category, image`` (others, such as ``l2-category``, ``split``
or ``source``, are ignored; option columns may run past D). An empty option cell (``NaN`` as pandas writes it) means
the question has fewer options. As in the TSVs that VLMEvalKit distributes, an ``image`` cell of at most 64
characters may hold the ``index`` of another row whose image it shares.

``data.path`` is the TSV itself, or a directory holding exactly one TSV for the split (``val``: a name with
``_DEV``, e.g. ``MMBench_DEV_EN.tsv``; ``test``: ``_TEST``). Test TSVs carry no answers and are refused. Each sample is
scored by the option letter extracted from the answer (:mod:`covspec.data.choices`) against ``answer``.

**CircularEval** (``data.circular=true``, MMBench's official protocol): a question with N options is asked N times,
its option texts rotated by 0..N-1 places under the same letters (the answer letter moves with its text); the copies
share ``group`` = the row's ``index`` (ids ``index``, ``index@1``, ...), and the question counts as right only if
every copy is (:func:`covspec.data.metrics.benchmark_score`). ``data.limit`` and ``data.offset`` count questions.
"""

from __future__ import annotations

import base64
import binascii
import csv
import string
from pathlib import Path

from covspec.data.sample import FileSample, check_file, select
from covspec.errors import ConfigError, InputError

__all__ = ["PROMPT_SUFFIX", "SPLIT_TAGS", "build_prompt", "load_mmbench"]

SPLIT_TAGS = {"val": "DEV", "test": "TEST"}
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
REQUIRED = ("index", "question", "answer", "image", "A", "B")
_IMAGE_REF_MAX = 64  # VLMEvalKit's rule: a shorter image cell is the index of the row holding the image
_MISSING = {"", "nan", "NaN"}  # pandas writes NaN as an empty cell; "nan" if written by str()


def build_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """``[hint]\\nquestion\\nA. ...\\nB. ...\\n<instruction>``, the LLaVA evaluation prompt for MMBench."""
    lines = [hint.strip()] if hint else []
    lines.append(question.strip())
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    lines.append(PROMPT_SUFFIX)
    return "\n".join(lines)


def _find_tsv(path: Path, split: str) -> Path:
    if path.is_file() or not path.exists():
        return check_file(path, "mmbench TSV file")
    tag = SPLIT_TAGS[split]
    found = sorted(p for p in path.glob("*.tsv") if f"_{tag}" in p.stem.upper())
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(p.name for p in found)
        raise InputError(f"several MMBench {tag} TSVs in {path} ({names}); set data.path to one of them")
    raise InputError(f"no MMBench TSV for data.split={split} in {path} (expected a name like MMBench_{tag}_EN.tsv)")


def _cell(value: str | None) -> str | None:
    """The cell's text, or None for an empty / NaN cell."""
    if value is None or value.strip() in _MISSING:
        return None
    return value


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    # Base64 images are far longer than csv's default field limit (128 KiB); this setting is process-wide.
    csv.field_size_limit(2**31 - 1)
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read {path}: {err}") from None
    if not rows:
        raise InputError(f"{path.name} is empty: expected a header row with columns {', '.join(REQUIRED)}")
    header = [h.strip() for h in rows[0]]
    for column in REQUIRED:
        if column not in header:
            hint = " (test TSVs carry no answers; use the dev TSV, data.split=val)" if column == "answer" else ""
            raise InputError(f"{path.name}: missing column {column!r}{hint}")
    return header, rows[1:]


def _decode_image(cell: str, where: str) -> bytes:
    try:
        data = base64.b64decode(cell.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where}: column 'image' is not valid base64") from None
    if not data:
        raise InputError(f"{where}: column 'image' is empty")
    return data


def rotations(options: dict[str, str], answer: str) -> list[tuple[dict[str, str], str]]:
    """CircularEval's copies of a question: (options, answer letter) with the texts shifted by 0..N-1 places."""
    letters, texts = list(options), list(options.values())
    correct = texts[letters.index(answer)]
    out = []
    for shift in range(len(letters)):
        rotated = texts[shift:] + texts[:shift]
        out.append((dict(zip(letters, rotated, strict=True)), letters[rotated.index(correct)]))
    return out


def load_mmbench(path: str | Path, split: str, limit: int, offset: int = 0, circular: bool = False) -> list[FileSample]:
    """``limit`` MMBench questions from ``offset``, in file order (with ``circular``, each as its rotated copies).

    Args:
        path: the TSV file, or a directory holding one TSV for ``split``.
        split: ``val`` (the dev TSV) or ``test``; MMBench has no train split.
        limit: most questions to return.
        offset: index of the first data row.
        circular: CircularEval: every question once per rotation of its options, grouped by ``index``.

    Raises:
        ConfigError: ``split`` is ``train``.
        InputError: a missing file or column, or a malformed row; the message names the file and row (``row 1`` is
            the first row after the header).
    """
    if split not in SPLIT_TAGS:
        raise ConfigError(f"data.split must be 'val' (dev) or 'test' for data.benchmark=mmbench, got {split!r}")
    tsv = _find_tsv(Path(path), split)
    header, rows = _read(tsv)
    col = {name: i for i, name in enumerate(header)}
    letters = [c for c in string.ascii_uppercase if c in col]
    images = {r[col["index"]].strip(): r[col["image"]] for r in rows if len(r) == len(header)}
    samples = []
    for number, row in enumerate(select(rows, limit, offset, tsv.name), offset + 1):
        where = f"{tsv.name} row {number}"
        if len(row) != len(header):
            raise InputError(f"{where}: expected {len(header)} tab-separated fields, got {len(row)}")
        cells = {name: _cell(row[i]) for name, i in col.items()}
        for column in ("index", "question", "answer", "image"):
            if cells[column] is None:
                raise InputError(f"{where}: column {column!r} is empty")
        index = cells["index"].strip()
        where = f"{tsv.name} row {number} (index {index})"
        options = {c: cells[c].strip() for c in letters if cells[c] is not None}
        if len(options) < 2:
            raise InputError(f"{where}: needs at least 2 options, got {len(options)}")
        answer = cells["answer"].strip()
        if answer not in options:
            raise InputError(f"{where}: answer {answer!r} is not one of the options {', '.join(options)}")
        image = cells["image"].strip()
        if len(image) <= _IMAGE_REF_MAX:
            if image not in images or len(images[image].strip()) <= _IMAGE_REF_MAX:
                raise InputError(f"{where}: column 'image' is neither base64 image data nor the index of a row with it")
            image = images[image]
        image_bytes = _decode_image(image, where)
        copies = rotations(options, answer) if circular else [(options, answer)]
        for shift, (shown, letter) in enumerate(copies):
            samples.append(
                FileSample(
                    benchmark="mmbench",
                    sample_id=index if shift == 0 else f"{index}@{shift}",
                    split=split,
                    kind=(cells.get("category") or "mmbench").strip(),
                    question=build_prompt(cells["question"], shown, cells.get("hint")),
                    answer=letter,
                    metric="choice",
                    options=tuple(shown.items()),
                    source=where if shift == 0 else f"{where}, rotation {shift}",
                    image_bytes=image_bytes,
                    group=index if circular else "",
                )
            )
    return samples
