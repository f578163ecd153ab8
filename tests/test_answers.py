"""Free-generation answers: where an answer ends, normalisation, aliases, multiple choice, locality."""

from __future__ import annotations

import pytest
import torch

from mmke.data.schema import case_from_json, case_to_json
from mmke.eval import answer_matches, first_answer, normalize_answer, probe_result, same_answer
from mmke.models.scoring import ItemScore
from mmke.types import EditCase, EditFact, EditType, Probe, ProbeKind


@pytest.mark.parametrize(
    ("generated", "first"),
    [
        ("Paris. It is also the largest city", "Paris"),
        ("paris\nQuestion: what is", "paris"),
        ("  3.5 metres tall! yes", "3.5 metres tall"),
        ("Is it Rome? No", "Is it Rome"),
        ("", ""),
    ],
)
def test_the_first_answer_ends_at_a_newline_or_sentence_end(generated: str, first: str) -> None:
    assert first_answer(generated) == first


def test_normalisation_folds_case_punctuation_articles_spaces_and_number_words() -> None:
    assert normalize_answer("  The   Eiffel-Tower!! ") == "eiffel tower"
    assert normalize_answer("Three cats and an owl") == "3 cats and owl"
    assert normalize_answer("twenty") == normalize_answer("20")


@pytest.mark.parametrize(
    ("generated", "target", "aliases", "match"),
    [
        ("The Paris.", "paris", (), 1.0),
        ("paris is the capital", "Paris", (), 1.0),  # the answer, then more words
        ("parisian", "paris", (), 0.0),  # not a whole-word prefix
        ("", "paris", (), 0.0),
        ("Nothing. Paris", "paris", (), 0.0),  # only the first answer counts
        ("Lutetia, of course", "paris", ("lutetia",), 1.0),  # an alias the data gives
        ("three", "3", (), 1.0),
        ("It is paris", "paris", (), 0.0),  # the answer must start with the target
    ],
)
def test_answer_matches(generated: str, target: str, aliases: tuple[str, ...], match: float) -> None:
    assert answer_matches(generated, target, aliases) == match


def test_a_multiple_choice_answer_may_name_the_option_letter_or_its_text() -> None:
    options = ("pneumonia", "tuberculosis", "asthma")
    for said in ("B", "(b)", "b.", "B) tuberculosis", "Tuberculosis"):
        assert answer_matches(said, "tuberculosis", options=options) == 1.0, said
    for said in ("A", "d", "asthma"):
        assert answer_matches(said, "tuberculosis", options=options) == 0.0, said
    assert answer_matches("a red square", "a red square", options=options) == 1.0  # "a" is no letter here


def test_locality_by_generation_compares_with_the_unedited_answer_never_the_target() -> None:
    assert same_answer("Paris.", "paris! it is") == 1.0
    assert same_answer("Paris.", "Rome.") == 0.0
    probe = Probe(ProbeKind.TEXT_LOCALITY, "capital of france?", "london")  # the target is not asked
    score = ItemScore(torch.tensor([1]), torch.tensor([1]), torch.tensor([[1]]), 1.0, True, 0.1)
    r = probe_result(probe, score, score, generated="Paris", pre_generated="paris.")
    assert r.generated_match == 1.0 and r.pre_generated == "paris."


def test_aliases_round_trip_through_the_native_format() -> None:
    probe = Probe(ProbeKind.RELIABILITY, "who is this?", "mira talvek", aliases=("mira", "m. talvek"))
    case = EditCase("c1", EditType.VISUAL_ENTITY, EditFact("who is this?", "mira talvek"), (probe,))
    back = case_from_json(case_to_json(case))
    assert back.probes[0].aliases == ("mira", "m. talvek")
    with pytest.raises(Exception, match="field 'aliases' must be a list of non-empty strings"):
        case_from_json(
            {**case_to_json(case), "probes": [{**case_to_json(case)["probes"][0], "aliases": [""]}]}
        )
