"""Answer metrics for the shapes benchmark: exact match and token F1 over normalized words."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

_WORD = re.compile(r"[a-z0-9]+")


def normalize(text: str) -> list[str]:
    """Lower-cased alphanumeric words; punctuation and spacing do not count."""
    return _WORD.findall(text.lower())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalized word sequences are equal, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-words F1 between the normalized prediction and reference."""
    pred, ref = normalize(prediction), normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def benchmark_score(scored: Iterable[tuple[str, float]]) -> float | None:
    """Mean of a benchmark's metric over its questions, from (group, score) per sample; None if there are none.

    Samples with an empty group are questions of their own. Samples sharing a group are copies of one question
    (MMBench CircularEval: its options rotated) and it scores the lowest of theirs: with 0/1 option accuracy, right
    only if every copy is right.
    """
    questions: dict[tuple[bool, str | int], float] = {}
    for i, (group, score) in enumerate(scored):
        key = (True, group) if group else (False, i)
        questions[key] = min(questions.get(key, score), score)
    return sum(questions.values()) / len(questions) if questions else None
