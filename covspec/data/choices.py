"""Scoring free-form answers to multiple-choice questions (MMBench, MMMU) and to MMMU's open questions.

Multiple choice: :func:`extract_choice` reads which option letter a free-form answer picks, trying rules from the
most to the least explicit and taking the first that names exactly one offered letter:

1. the whole answer is a letter: ``"B"``, ``"(B)"``, ``"b."``;
2. an explicit statement: ``"The answer is B."``, ``"Answer: (C)"``, ``"option D"`` (the last one wins);
3. a leading letter with a delimiter: ``"B. a red apple"``, ``"(B) red"``, ``"B: red"``;
4. one parenthesized letter anywhere: ``"I think (C) fits"``;
5. one capital letter standing alone as a word, not counting ``A`` / ``I`` used as an article or pronoun
   (``"A dog is ..."``, ``"I think ..."``);
6. the option text itself: the one option whose words occur in the answer (the longest when one option's text
   contains another's, ``"dark red"`` over ``"red"``).

No match scores 0 (MMMU's reference code guesses at random instead; a benchmark run must be reproducible).

Open answers (MMMU): :func:`open_answer_match` follows the MMMU reference evaluation: the answer's key phrases (in
each line, the shortest tail after "is", "so", "therefore", "answer", ..., or after "=" in the last line) and the
numbers in them are compared with the reference; numbers match when equal after rounding to 2 decimals (``"2.50"`` =
``"2.5"``, ``"1,000"`` = ``"1000"``), text matches when the lower-cased reference occurs in a key phrase (a
one-character reference must stand alone as a word).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

__all__ = ["choice_accuracy", "extract_choice", "open_answer_match"]

_BARE = re.compile(r"\(?([A-Za-z])\)?[.:)]?")
_STATED = re.compile(r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z0-9'])")
_LEADING = re.compile(r"\(?([A-Z])(?:[.:)]|\)\.?)(?:\s|$)")
_PAREN = re.compile(r"\(([A-Z])\)")
_LONE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
_WORD = re.compile(r"[a-z0-9]+")
_AFTER_LETTER = frozenset({"or", "and", "nor", "is", "was", "because", "since"})


def _is_article_or_pronoun(text: str, start: int) -> bool:
    """Whether the capital ``A`` or ``I`` at ``start`` begins an ordinary phrase ("A dog", "I think").

    A letter followed by a lower-case word is read as an article or pronoun unless that word is one that follows an
    option letter ("A or B", "A is correct").
    """
    if text[start] not in "AI":
        return False
    following = re.match(r"\s+([a-z]+)", text[start + 1 :])
    return following is not None and following.group(1) not in _AFTER_LETTER


def _one(letters: Sequence[str], options: Mapping[str, str]) -> str | None:
    found = {letter for letter in letters if letter in options}
    return found.pop() if len(found) == 1 else None


def _by_text(prediction: str, options: Mapping[str, str]) -> str | None:
    said = " " + " ".join(_WORD.findall(prediction.lower())) + " "
    hits = {}
    for letter, text in options.items():
        words = " ".join(_WORD.findall(str(text).lower()))
        if words and f" {words} " in said:
            hits[letter] = words
    if len(hits) == 1:
        return next(iter(hits))
    if hits:  # several: keep the one whose text contains every other hit's ("dark red" over "red")
        longest = max(hits, key=lambda k: len(hits[k]))
        if all(f" {hits[k]} " in f" {hits[longest]} " for k in hits):
            return longest
    return None


def extract_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter that a free-form answer picks, or None when it picks none or several.

    Args:
        prediction: the model's answer.
        options: option letter -> option text, e.g. ``{"A": "cat", "B": "dog"}``.

    Returns:
        One key of ``options``, or None.
    """
    text = prediction.strip()
    bare = _BARE.fullmatch(text)
    if bare:
        letter = bare.group(1).upper()
        return letter if letter in options else None
    stated = [m.group(1) for m in _STATED.finditer(text) if not _is_article_or_pronoun(text, m.start(1))]
    stated = [letter for letter in stated if letter in options]
    if stated:
        return stated[-1]
    leading = _LEADING.match(text)
    if leading and leading.group(1) in options:
        return leading.group(1)
    for letters in (
        _PAREN.findall(text),
        [m.group(1) for m in _LONE.finditer(text) if not _is_article_or_pronoun(text, m.start(1))],
    ):
        letter = _one(letters, options)
        if letter is not None:
            return letter
    return _by_text(text, options)


def choice_accuracy(prediction: str, answer: str, options: Mapping[str, str]) -> float:
    """1.0 if the answer picks the option letter ``answer``, else 0.0."""
    return float(extract_choice(prediction, options) == answer)


# ---------------------------------------------------------------------------------------------------------------
# Open answers.

_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_NUMBER = re.compile(
    r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])"  # 1,000 or 12,345.6
    r"|-?\d+(?:\.\d+)?[eE][+-]?\d+"  # 1.5e-3
    r"|-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d)"  # 12, 2.5, .5
)
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}


def _number(text: str) -> float | None:
    try:
        value = float(text.strip().replace(",", ""))
    except ValueError:
        return None
    return round(value, 2) if math.isfinite(value) else None


def _key_phrases(prediction: str) -> list[str]:
    """Per line, the shortest tail after an answer indicator, lower-cased; the whole answer if none."""
    text = prediction.strip().strip(".").lower()
    # The reference splits on ". " before a capital letter, but after lower-casing, so in effect only on newlines;
    # we split the same way so that scores stay comparable.
    sentences = text.split("\n")
    phrases = []
    for i, sentence in enumerate(sentences):
        indicators = (*_INDICATORS, "=") if i == len(sentences) - 1 else _INDICATORS
        tails = [sentence.split(ind)[-1].strip() for ind in indicators if ind in sentence]
        tails = [t for t in tails if t and t not in _TRIVIAL]
        if tails:
            phrases.append(min(tails, key=len))
    return phrases or [text]


def _golds(reference: str | Sequence[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else [str(r) for r in reference]


def open_answer_match(prediction: str, reference: str | Sequence[str]) -> bool:
    """Whether a free-form answer states the reference of an open question (MMMU rules, see the module docstring).

    Args:
        prediction: the model's answer.
        reference: the reference answer, or several accepted ones.
    """
    phrases = _key_phrases(prediction)
    numbers = {n for p in phrases for m in _NUMBER.finditer(p) if (n := _number(m.group())) is not None}
    numbers |= {n for p in phrases if (n := _number(p)) is not None}
    for gold in _golds(reference):
        value = _number(gold)
        if value is not None:
            if value in numbers:
                return True
            continue
        want = gold.strip().lower()
        if not want:
            continue
        if len(want) == 1:
            if any(re.search(rf"(?<!\w){re.escape(want)}(?!\w)", p) for p in phrases):
                return True
        elif any(want in p for p in phrases):
            return True
    return False
