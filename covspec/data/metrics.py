"""Answer metrics for the shapes benchmark: exact match and token F1 over normalized words."""

from __future__ import annotations

import re
from collections import Counter

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
