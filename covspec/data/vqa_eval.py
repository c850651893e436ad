"""VQA accuracy with the answer normalization of the official VQA evaluation script.

The rules follow ``vqaEval.py`` of the VQA API (GT-Vision-Lab/VQA, PythonEvaluationTools), the script behind the
published VQAv2 numbers:

- **Prediction**: newlines and tabs become spaces, the ends are stripped, then punctuation is processed and finally
  digits, articles and contractions.
- **Punctuation**: each mark of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space
  (``"p "`` or ``" p"`` occurs) or when the text holds a digit-comma-digit group (``1,000``); otherwise it becomes a
  space. Then every period not followed by a digit is deleted (``"yes."`` -> ``"yes"``, ``"2.5"`` is kept).
  Apostrophes and colons are left alone.
- **Digits and articles**: lower-cased words; number words ``none`` / ``zero`` .. ``ten`` become digits; ``a``,
  ``an``, ``the`` are dropped; contractions written without their apostrophe get it back (``dont`` -> ``don't``).
- **Human answers** are *not* digit/article-normalized (the released annotations already are); only when the ten
  humans disagree is punctuation processing applied to them.
- **Accuracy**: the mean, over the ten leave-one-out subsets of nine human answers, of
  ``min(1, #humans in the subset who gave the prediction / 3)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["normalize_answer", "process_digit_article", "process_punctuation", "vqa_accuracy"]

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")
# Verbatim from the official script, including its quirk: "(?!<=\d)" is a negative *lookahead* for the text "<=" and
# a digit (almost always true), not the lookbehind it looks like, so a period is deleted unless a digit follows it.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official script passes re.UNICODE (32) where re.sub takes ``count``: at most 32 periods are deleted.
_PERIOD_MAX = 32
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})


# The official contraction table, entry for entry: a word written without (some of) its apostrophes -> with them.
# Kept as it is there, including the inverted entry somebody'd -> somebodyd, the identities let's and she's, and the
# capitalized keys (Im, Ive, Id've, I'dve) that never match because words are lower-cased first.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip


def process_punctuation(text: str) -> str:
    """The official punctuation rule (see the module docstring)."""
    out = text
    has_comma_number = _COMMA_DIGITS.search(text) is not None
    for p in _PUNCT:
        # The test looks at the *input* text, as the official script does, while replacements accumulate in ``out``.
        delete = p + " " in text or " " + p in text or has_comma_number
        out = out.replace(p, "" if delete else " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX)


def process_digit_article(text: str) -> str:
    """Lower-cased words with number words as digits, articles dropped and contractions restored."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """A predicted answer as the official script compares it: ``"Two dogs."`` -> ``"2 dogs"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one predicted answer against the human answers of one question (ten in VQAv2).

    Args:
        prediction: the model's answer, raw; it is normalized here.
        answers: the human answers as released (``annotations[i]["answers"][j]["answer"]``).

    Returns:
        The mean over the leave-one-out subsets of ``min(1, matches / 3)``, in [0, 1]; e.g. 0.3, 0.6, 0.9 and 1.0
        when 1, 2, 3 and 4+ of ten humans gave the normalized prediction.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(prediction)
    humans = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    matches = sum(a == pred for a in humans)
    # Leaving out human i removes one match exactly when human i gave the prediction.
    return sum(min(1.0, (matches - (a == pred)) / 3) for a in humans) / len(humans)
