"""``vqa_accuracy`` and ``token_f1`` give MMKU-Bench's numbers (``evaluation/eval_acc_f1.py``, ``tools.py``).

MMKU-Bench scores the whole generated output against one gold answer: VQAEval's normalisation
then whole-word containment (1 or 0), and SQuAD token F1. Every expected value below is what
MMKU-Bench's own scripts give for that pair (checked by running them on these pairs), their
quirks included: the gold loses its apostrophes, a gold of only articles matches any word, and
SQuAD deletes punctuation rather than spacing it.
"""

from __future__ import annotations

import pytest

from mmke.eval.answers import token_f1, vqa_accuracy, vqa_normalize

# ---------------------------------------------------------------- VQA accuracy (VQAEval)


@pytest.mark.parametrize(
    ("generated", "gold", "score"),
    [
        # punctuation: deleted when that character stands next to a space anywhere in the text ...
        ("e-mail - sent", "email", 1.0),
        ("e-mail - sent", "e mail", 0.0),
        # ... replaced by a space when it never does
        ("e-mail sent", "e mail", 1.0),
        ("e-mail sent", "email", 0.0),
        ("what?yes", "what yes", 1.0),
        # a digit-comma-digit anywhere deletes every punctuation character ("1,000" -> "1000")
        ("1,000 people, roughly", "1000", 1.0),
        ("x-ray in 1,000 cases", "xray", 1.0),
        ("x-ray in 1,000 cases", "x ray", 0.0),
        # a period goes unless a digit follows it
        ("version 3.5 came", "3.5", 1.0),
        ("It is the Eiffel Tower.", "Eiffel Tower", 1.0),
        # number words zero..ten (and "none") become digits, on both sides; "eleven" does not
        ("There are two moons.", "2", 1.0),
        ("There are 2 moons.", "two", 1.0),
        ("none of them", "0", 1.0),
        ("ten", "10", 1.0),
        ("eleven", "11", 0.0),
        # articles dropped, lower case, newlines and tabs are spaces
        ("The answer is a dog", "the dog", 1.0),
        ("Paris\nFrance", "paris\tfrance", 1.0),
        # whole-word containment in the whole output, not a substring and not only its start
        ("Well, I believe the city is Tromsø, in Norway.", "Tromsø", 1.0),
        ("eiffeltower", "Eiffel Tower", 0.0),
        ("catalog", "cat", 0.0),
        ("Big Ben (London)", "London", 1.0),
    ],
)
def test_vqa_accuracy_follows_vqaeval(generated: str, gold: str, score: float) -> None:
    assert vqa_accuracy(generated, gold) == score


def test_vqa_normalize_deletes_glued_and_spaces_free_punctuation() -> None:
    assert vqa_normalize("e-mail - sent") == "email sent"
    assert vqa_normalize("e-mail sent") == "e mail sent"
    assert vqa_normalize("The 1,000 x-rays.") == "1000 xrays"
    assert vqa_normalize("Three of the  cats\tleft.") == "3 of cats left"


def test_vqa_accuracy_any_alias_counts() -> None:
    assert vqa_accuracy("It is Elizabeth Tower, I think", "Big Ben", ("Elizabeth Tower",)) == 1.0
    assert vqa_accuracy("It is Elizabeth Tower, I think", "Big Ben") == 0.0
    assert vqa_accuracy("It is the clock tower", "Big Ben", ("Elizabeth Tower",)) == 0.0


@pytest.mark.parametrize(("generated", "gold"), [("He said dont", "don't"), ("isnt it", "isn't")])
def test_vqa_accuracy_expands_contractions(generated: str, gold: str) -> None:
    assert vqa_accuracy(generated, gold) == 1.0


@pytest.mark.parametrize(
    ("generated", "gold", "score"),
    [
        ("obrien won", "O'Brien", 1.0),
        ("O'Brien won", "O'Brien", 0.0),
        ("I think it's Paris", "it's Paris", 0.0),
    ],
)
def test_vqa_accuracy_drops_apostrophes_from_the_gold(generated: str, gold: str, score: float) -> None:
    assert vqa_accuracy(generated, gold) == score


@pytest.mark.parametrize(("generated", "gold"), [("The answer: A", "A"), ("anything", "the")])
def test_vqa_accuracy_a_gold_of_only_articles_matches_any_word(generated: str, gold: str) -> None:
    assert vqa_accuracy(generated, gold) == 1.0


# ---------------------------------------------------------------- token F1 (SQuAD)


@pytest.mark.parametrize(
    ("generated", "gold", "f1"),
    [
        ("Marta Lindqvist", "Marta Lindqvist", 1.0),
        # "the" dropped: 4 predicted tokens, 2 shared -> P 1/2, R 1
        ("The coach is Marta Lindqvist", "Marta Lindqvist", 2 / 3),
        # overlap is a multiset: the second "paris" is not shared
        ("paris paris", "paris", 2 / 3),
        ("a dog", "the dog", 1.0),
        ("Big Ben (London)", "London", 0.5),
        ("Paris, France", "Paris France", 1.0),
        # number words are not digits in F1 (only VQAEval maps them)
        ("two", "2", 0.0),
        # nothing left on one side: 1 only when both are empty
        ("The.", "the", 1.0),
        ("the", "Paris", 0.0),
    ],
)
def test_token_f1_is_squad_f1(generated: str, gold: str, f1: float) -> None:
    assert token_f1(generated, gold) == pytest.approx(f1)


def test_token_f1_takes_the_best_alias() -> None:
    assert token_f1("Elizabeth Tower", "Big Ben", ("Elizabeth Tower",)) == 1.0
    assert token_f1("the Elizabeth clock", "Big Ben", ("Elizabeth Tower", "clock")) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("generated", "gold", "f1"),
    [
        ("U.S. president", "U.S.", 2 / 3),
        ("version 3.5 came", "3.5", 0.5),
        ("well-known", "well known", 0.0),
        ("1,000 people, roughly", "1000", 0.5),
        ("He said dont", "don't", 0.5),
        ("the-end", "end", 0.0),
    ],
)
def test_token_f1_deletes_punctuation(generated: str, gold: str, f1: float) -> None:
    assert token_f1(generated, gold) == pytest.approx(f1)
