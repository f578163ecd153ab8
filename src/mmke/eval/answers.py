"""Free-generation answers: where an answer ends, how it is normalised, and when it matches.

Greedy decoding runs for a fixed token budget (the run's ``max_new_tokens``, never the target's
length, which would leak it), so a model usually goes on past its answer. ``first_answer`` keeps
the first answer only: the text up to the first newline, then up to the first sentence end (a
``.``, ``!`` or ``?`` followed by a space or the end; "3.5" is not a sentence end). An answer
matches a target when, normalised, it is the target or starts with it as whole words; any alias
the data gives counts as the target, and for a multiple-choice probe the option's letter does
too. Locality by generation compares the edited model's answer with the unedited model's,
never with a reference answer.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

#: Number words a generated answer may use for a digit target ("three" for "3").
_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
)
_TENS = {
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "sixty": "60",
    "seventy": "70",
    "eighty": "80",
    "ninety": "90",
}
NUMBER_WORDS = {word: str(i) for i, word in enumerate(_UNITS.split(" "))} | _TENS

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LETTER = re.compile(r"^\(?([a-e])\)?(?:[.):]|$)")


def first_answer(text: str) -> str:
    """The first answer in a generation: up to the first newline, then the first sentence end."""
    line = text.strip().split("\n", 1)[0]
    end = _SENTENCE_END.search(line)
    return (line[: end.start()] if end else line).strip()


def normalize_answer(text: str) -> str:
    """Lower case, number words as digits, no punctuation or articles, single spaces (SQuAD-style)."""
    text = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    words = [NUMBER_WORDS.get(w, w) for w in _ARTICLES.sub(" ", text).split()]
    return " ".join(words)


def _starts_with(answer: str, target: str) -> bool:
    return bool(target) and (answer == target or answer.startswith(target + " "))


def option_of(answer: str, options: Sequence[str]) -> str | None:
    """The option a multiple-choice answer names by its letter ("B", "(b)", "b."), if any."""
    hit = _LETTER.match(answer.strip().lower())
    if hit is None:
        return None
    index = ord(hit.group(1)) - ord("a")
    return options[index] if index < len(options) else None


def answer_matches(
    generated: str, target: str, aliases: Sequence[str] = (), options: Sequence[str] = ()
) -> float:
    """1.0 when the first answer of ``generated`` is the target (or an alias, or, for multiple
    choice, the target's option letter), normalised, possibly followed by more words; else 0.0."""
    answer = first_answer(generated)
    named = option_of(answer, options) if options else None
    said = normalize_answer(named if named is not None else answer)
    return 1.0 if any(_starts_with(said, normalize_answer(t)) for t in (target, *aliases)) else 0.0


def same_answer(before: str, after: str) -> float:
    """Generation locality: 1.0 when the edited model's first answer equals the unedited one's, normalised."""
    return 1.0 if normalize_answer(first_answer(before)) == normalize_answer(first_answer(after)) else 0.0


# ---------------------------------------------------------------- MMKU-Bench's measures
# MMKU-Bench scores the whole generated output (no first-answer cut) against one reference, by
# VQAEval's normalisation and whole-word containment, and by SQuAD token F1
# (``evaluation/eval_acc_f1.py``; docs/research/issue25_mmqake_mmku_multimededit.md).

_VQA_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_VQA_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
#: VQAEval's period rule as it runs: its look-behind is mistyped, so every "." not before a digit
#: goes, and ``re.UNICODE`` lands in the count argument, so only the first 32 do.
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_PERIOD_COUNT = int(re.UNICODE)
_VQA_NUMBERS = {"none": "0"} | {w: d for w, d in NUMBER_WORDS.items() if int(d) <= 10}
#: VQAEval writes contractions typed without their apostrophe with it ("dont" -> "don't"); these
#: are the common English ones (words that are also plain words, "its", "well", "ill", are not).
_NEGATED = ("do", "does", "did", "is", "are", "was", "were", "have", "has", "had", "can", "could")
_NEGATED += ("would", "should", "wo", "must", "need", "ca", "ai")
_PRONOUNS = ("i'm", "i've", "you're", "you've", "you'll", "you'd", "we've", "they're", "they've")
_PRONOUNS += ("they'll", "they'd", "he's", "she's", "that's", "what's", "there's", "who's", "where's")
_CONTRACTIONS = {w.replace("'", ""): w for w in (*(f"{v}n't" for v in _NEGATED), *_PRONOUNS)}


def vqa_normalize(text: str) -> str:
    """VQAEval's answer processing: punctuation, periods, lower case, number words 0-10, articles,
    contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        glued = (p + " " in text or " " + p in text) or _VQA_COMMA_NUMBER.search(text) is not None
        out = out.replace(p, "" if glued else " ")
    out = _VQA_PERIOD.sub("", out, count=_VQA_PERIOD_COUNT)
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split() if w not in ("a", "an", "the")]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(generated: str, target: str, aliases: Sequence[str] = ()) -> float:
    """1.0 when the target (or an alias), normalised, appears as whole words in the whole output.

    As MMKU-Bench scores it: the reference loses its apostrophes first (its ``normalize_text``), and
    a reference that normalises to nothing ("a") is an empty pattern, found next to any word.
    """
    said = vqa_normalize(generated)
    for gold in (target, *aliases):
        g = vqa_normalize(gold.strip().replace("'", ""))
        if re.search(r"\b" + re.escape(g) + r"\b", said):
            return 1.0
    return 0.0


def _squad_words(text: str) -> list[str]:
    """SQuAD's normalisation: lower case, punctuation deleted (not spaced), no articles."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return _ARTICLES.sub(" ", text).split()


def token_f1(generated: str, target: str, aliases: Sequence[str] = ()) -> float:
    """SQuAD token F1 of the whole output against the target, the best over the target and aliases."""
    said = _squad_words(generated)
    return max(_f1(said, _squad_words(g)) for g in (target, *aliases))


def _f1(said: list[str], gold: list[str]) -> float:
    if not said or not gold:
        return float(said == gold)
    same = sum((Counter(said) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(said), same / len(gold)
    return 2 * precision * recall / (precision + recall)
