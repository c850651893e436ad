"""VQAv2 from its official files: questions JSON, annotations JSON and the COCO image folder.

Layout under ``data.path`` (the official file names; ``<coco>`` is ``train2014`` or ``val2014``)::

    v2_OpenEnded_mscoco_<coco>_questions.json   {"questions": [{"image_id", "question", "question_id"}, ...]}
    v2_mscoco_<coco>_annotations.json           {"annotations": [{"question_id", "image_id", "answers": [10 x
                                                  {"answer", "answer_id", ...}], "multiple_choice_answer",
                                                  "answer_type", "question_type"}, ...]}
    <coco>/COCO_<coco>_<image_id:012d>.jpg      (or <image_id:012d>.jpg; the folder may also be images/<coco>,
                                                  images/ or data.path itself)

A questions or annotations file under another name is used when it is the only ``*<coco>_questions.json`` /
``*<coco>_annotations.json`` there. Samples follow the questions file's order; the metric is VQA accuracy
(:mod:`covspec.data.vqa_eval`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from covspec.data.sample import FileSample, check_dir, read_json, select
from covspec.errors import ConfigError, InputError

__all__ = ["COCO_SPLITS", "PROMPT_SUFFIX", "load_vqav2"]

COCO_SPLITS = {"train": "train2014", "val": "val2014"}
PROMPT_SUFFIX = "Answer the question using a single word or phrase."


def _find(root: Path, official: str, pattern: str, what: str) -> Path:
    path = root / official
    if path.is_file():
        return path
    found = sorted(p for p in root.glob(pattern) if p.is_file())
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(p.name for p in found)
        raise InputError(f"several VQAv2 {what} files in {root} ({names}); keep one, or name it {official}")
    raise InputError(f"VQAv2 {what} file not found: {path}")


def _image_path(root: Path, coco: str, image_id: int, qid: int) -> Path:
    names = (f"COCO_{coco}_{image_id:012d}.jpg", f"{image_id:012d}.jpg")
    folders = (root / coco, root / "images" / coco, root / "images", root)
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise InputError(
        f"vqav2: image of question_id {qid} not found: {folders[0] / names[0]} "
        f"(also looked for {names[1]} and in {', '.join(str(f) for f in folders[1:])})"
    )


def _entries(data: Any, key: str, path: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise InputError(f"vqav2 {path.name}: expected an object with a {key!r} list")
    return data[key]


def _field(entry: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise InputError(f"{where}: missing key {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value.strip()):
        raise InputError(f"{where}: {key!r} must be a {'non-empty string' if kind is str else kind.__name__}, "
                         f"got {value!r}")  # fmt: skip
    return value


def _index_annotations(annotations: list, path: Path) -> dict[int, tuple[int, dict]]:
    index: dict[int, tuple[int, dict]] = {}
    for i, entry in enumerate(annotations, 1):
        qid = _field(entry, "question_id", int, f"vqav2 {path.name} annotation {i}")
        index[qid] = (i, entry)
    return index


def _answers(entry: dict, where: str) -> tuple[str, ...]:
    answers = entry.get("answers")
    if not isinstance(answers, list) or not answers:
        raise InputError(f"{where}: 'answers' must be a non-empty list, got {answers!r}")
    out = []
    for j, a in enumerate(answers, 1):
        if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
            raise InputError(f"{where}: answer {j} must be an object with a string 'answer', got {a!r}")
        out.append(a["answer"])
    return tuple(out)


def load_vqav2(path: str | Path, split: str, limit: int, offset: int = 0) -> list[FileSample]:
    """``limit`` VQAv2 samples of ``split`` from ``offset``, in the questions file's order.

    Args:
        path: the directory holding the questions and annotations files and the image folder.
        split: ``train`` (train2014) or ``val`` (val2014); the test answers are not public.
        limit: most samples to return.
        offset: index of the first question.

    Raises:
        ConfigError: ``split`` is ``test``.
        InputError: a missing file or image, invalid JSON, a malformed entry or a question without annotation; the
            message names the file and the entry.
    """
    if split not in COCO_SPLITS:
        raise ConfigError(
            f"data.split must be 'train' or 'val' for data.benchmark=vqav2 (VQAv2 test answers are not public), "
            f"got {split!r}"
        )
    coco = COCO_SPLITS[split]
    root = check_dir(Path(path), "vqav2 data.path directory")
    qpath = _find(root, f"v2_OpenEnded_mscoco_{coco}_questions.json", f"*{coco}_questions.json", "questions")
    apath = _find(root, f"v2_mscoco_{coco}_annotations.json", f"*{coco}_annotations.json", "annotations")
    questions = _entries(read_json(qpath, "VQAv2 questions file"), "questions", qpath)
    chosen = select(questions, limit, offset, f"vqav2 {qpath.name}")
    annotations = _index_annotations(_entries(read_json(apath, "VQAv2 annotations file"), "annotations", apath), apath)
    samples = []
    for i, entry in enumerate(chosen, offset + 1):
        where = f"vqav2 {qpath.name} question {i}"
        qid = _field(entry, "question_id", int, where)
        image_id = _field(entry, "image_id", int, where)
        question = _field(entry, "question", str, where)
        if qid not in annotations:
            raise InputError(f"vqav2 {apath.name}: question_id {qid} has no annotation")
        row, ann = annotations[qid]
        awhere = f"vqav2 {apath.name} annotation {row} (question_id {qid})"
        if ann.get("image_id", image_id) != image_id:
            raise InputError(f"{awhere}: image_id {ann['image_id']!r} differs from the question's {image_id}")
        answers = _answers(ann, awhere)
        mc = ann.get("multiple_choice_answer")
        samples.append(
            FileSample(
                benchmark="vqav2",
                sample_id=str(qid),
                split=split,
                kind=str(ann.get("answer_type") or "unknown"),
                question=f"{question.strip()}\n{PROMPT_SUFFIX}",
                answer=mc if isinstance(mc, str) and mc else Counter(answers).most_common(1)[0][0],
                metric="vqa_accuracy",
                references=answers,
                source=where,
                image_path=_image_path(root, coco, image_id, qid),
            )
        )
    return samples
