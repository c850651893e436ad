"""Answer metrics: normalization, exact match and SQuAD-style token F1."""

from __future__ import annotations

import pytest

from covspec.data.metrics import exact_match, normalize, token_f1


def test_normalize_lowercases_and_drops_punctuation_and_spacing():
    assert normalize("The circle is red.") == ["the", "circle", "is", "red"]
    assert normalize("  THE   circle,is\tred!? ") == ["the", "circle", "is", "red"]
    assert normalize("There are 3 shapes: a...b") == ["there", "are", "3", "shapes", "a", "b"]
    assert normalize("") == []
    assert normalize(" .?! ") == []


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("The circle is red.", "The circle is red."),
        ("the circle is red", "The circle is red."),
        ("THE CIRCLE IS RED!", "The circle is red."),
        ("  The circle  is red .", "The circle is red."),
        ("The circle, is red?", "The circle is red."),
    ],
)
def test_exact_match_ignores_case_punctuation_and_spacing(prediction: str, reference: str):
    assert exact_match(prediction, reference) == 1.0
    assert token_f1(prediction, reference) == 1.0


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("The circle is blue.", "The circle is red."),
        ("The circle is red red.", "The circle is red."),
        ("red is circle The", "The circle is red."),  # same bag of words, wrong order
        ("The circle is", "The circle is red."),
        ("", "The circle is red."),
    ],
)
def test_exact_match_refuses_any_word_difference(prediction: str, reference: str):
    assert exact_match(prediction, reference) == 0.0


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The circle is blue.", "The circle is red.", 0.75),  # 3 of 4 words both ways
        ("The circle is", "The circle is red.", 2 * 1.0 * 0.75 / 1.75),  # precision 1, recall 3/4
        ("The circle is red and big.", "The circle is red.", 2 * (4 / 6) * 1.0 / (4 / 6 + 1)),  # recall 1
        ("red red", "red", 2 * 0.5 * 1.0 / 1.5),  # repeated words count once per occurrence in the reference
        ("red is circle The", "The circle is red.", 1.0),  # a bag of words: order does not count
        ("blue square", "The circle is red.", 0.0),
    ],
)
def test_token_f1_partial_overlap(prediction: str, reference: str, expected: float):
    assert token_f1(prediction, reference) == pytest.approx(expected)
    assert token_f1(reference, prediction) == pytest.approx(expected)  # F1 is symmetric


def test_empty_strings():
    assert exact_match("", "") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("...", "") == 1.0  # only punctuation normalizes to nothing
    assert token_f1("", "The circle is red.") == 0.0
    assert token_f1("The circle is red.", "") == 0.0
    assert token_f1("?", "red") == 0.0


def test_metrics_return_floats_in_unit_interval():
    for pred, ref in [("a b c", "b c d"), ("x", "y"), ("", ""), ("a", "a a a a")]:
        for value in (exact_match(pred, ref), token_f1(pred, ref)):
            assert isinstance(value, float)
            assert 0.0 <= value <= 1.0
