"""Question wording of the world: templates per question type (one held out), composition, locality.

Every question type has four templates; index ``HELD_OUT`` is the held-out paraphrase. It is
taught only with subjects that are not eval-case subjects, so the world model knows the
wording but has never seen it with an eval subject (text generality). All text is lowercase
words with punctuation as separate tokens.
"""

from __future__ import annotations

from mmke.data.kg import multihop

HELD_OUT = 3
N_TEMPLATES = 4

TYPE_NOUN = {
    "person": "person",
    "film": "film",
    "organisation": "organisation",
    "animal": "animal",
    "landmark": "landmark",
    "sign": "sign",
}
FINDING_REF = "the finding in the image"

RECOGNITION = (
    "what is the name of the {t} in the image ?",
    "which {t} is shown in the image ?",
    "name the {t} in the image .",
    "the {t} in the image is called what ?",
)

#: relation -> (natural question, second natural question, noun phrase); {x} is the subject.
RELATION_TEXT = {
    "born_in": ("where was {x} born ?", "in which city was {x} born ?", "the birthplace of {x}"),
    "citizen_of": (
        "which country is {x} a citizen of ?",
        "what nation does {x} belong to ?",
        "the nation of {x}",
    ),
    "works_for": ("who does {x} work for ?", "which organisation employs {x} ?", "the employer of {x}"),
    "occupation": ("what does {x} do for a living ?", "what work does {x} do ?", "the job of {x}"),
    "speaks": (
        "which language does {x} speak ?",
        "what language is spoken by {x} ?",
        "the spoken language of {x}",
    ),
    "directed_by": ("who directed {x} ?", "by whom was {x} directed ?", "the director of {x}"),
    "genre": ("what genre is {x} ?", "what kind of film is {x} ?", "the genre of {x}"),
    "filmed_in": ("where was {x} filmed ?", "in which city was {x} shot ?", "the filming city of {x}"),
    "headquartered_in": (
        "where is {x} based ?",
        "in which city is {x} headquartered ?",
        "the home city of {x}",
    ),
    "founded_by": ("who founded {x} ?", "by whom was {x} founded ?", "the founder of {x}"),
    "native_to": ("where does {x} come from ?", "which country is {x} native to ?", "the native land of {x}"),
    "eats": ("what does {x} eat ?", "what does {x} feed on ?", "the food of {x}"),
    "stands_in": ("where is {x} ?", "in which city does {x} stand ?", "the city of {x}"),
    "built_by": ("who built {x} ?", "by whom was {x} built ?", "the builder of {x}"),
    "located_in": ("which country is {x} in ?", "in which country is {x} located ?", "the country of {x}"),
    "capital": (
        "which city is the capital of {x} ?",
        "where is the seat of government of {x} ?",
        "the capital of {x}",
    ),
    "official_language": (
        "what language is spoken in {x} ?",
        "which language is official in {x} ?",
        "the official language of {x}",
    ),
    "written_in": ("which script is {x} written in ?", "how is {x} written ?", "the script of {x}"),
    "means": ("what does {x} mean ?", "what rule does {x} give ?", "the meaning of {x}"),
    "rule_kind": ("what kind of rule is {x} ?", "what type of rule is {x} ?", "the rule type of {x}"),
    "treated_with": ("how is {x} treated ?", "which treatment is used for {x} ?", "the treatment of {x}"),
    "managed_by": ("who gives {x} ?", "which specialist provides {x} ?", "the specialist for {x}"),
    "works_in": ("where does {x} work ?", "in which department does {x} work ?", "the department of {x}"),
}

MCQ = (
    "which finding does {s} show ?",
    "what abnormality is seen on {s} ?",
    "what is the main finding in {s} ?",
    "{s} shows which finding ?",
)

USER_EDIT = "what is the name of {p} in the image ?"
USER_TEXT = "what is the name of {p} ?"
USER_IMAGE = "what is the {k} in the image called ?"
#: the user items' names as bare words in the corpus (``_corpus.lexicon_samples``)
LEXICON = "repeat the word {w} ."
USER_PORTABILITY = {"animal": "what animal is {n} ?", "object": "what object is {n} ?"}


def image_ref(kind: str) -> str:
    """How a question points at the picture: "the person in the image"."""
    return f"the {TYPE_NOUN[kind]} in the image"


def recognition(kind: str, t: int = 0) -> str:
    return RECOGNITION[t].format(t=TYPE_NOUN[kind])


def relation_templates(rel: str) -> tuple[str, str, str, str]:
    """The four templates of a relation; the last is the held-out paraphrase."""
    a, b, np_ = RELATION_TEXT[rel]
    return (a, b, f"what is {np_} ?", f"{np_} is what ?")


def ask(rel: str, x: str, t: int = 0) -> str:
    """Relation question number ``t`` about subject phrase ``x`` (a name or an image reference)."""
    return relation_templates(rel)[t].format(x=x)


#: relation -> its noun phrase ("the capital of {x}"), what multi-hop questions nest.
PHRASE = {rel: text[2] for rel, text in RELATION_TEXT.items()}


def noun_phrase(path: tuple[str, ...], base: str) -> str:
    """Nest relation noun phrases: (born_in, located_in) -> "the country of the birthplace of <base>"."""
    return multihop.noun_phrase(path, base, PHRASE)


def composed(path: tuple[str, ...], base: str) -> str:
    """A multi-hop question that never names the intermediate entities."""
    return multihop.composed(path, base, PHRASE)


def mcq(phrase: str, t: int = 0) -> str:
    return MCQ[t].format(s=phrase)


# ---------------------------------------------------------------- text locality facts

NUMBERS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
)
_OPPOSITES = (
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("light", "dark"),
    ("wet", "dry"),
    ("early", "late"),
    ("full", "empty"),
    ("high", "low"),
    ("hard", "soft"),
    ("loud", "quiet"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("thick", "thin"),
    ("long", "short"),
    ("happy", "sad"),
    ("day", "night"),
    ("first", "last"),
    ("young", "old"),
    ("open", "shut"),
)
_COLOURS = (
    ("snow", "white"),
    ("grass", "green"),
    ("the sky", "blue"),
    ("coal", "black"),
    ("blood", "red"),
    ("a lemon", "yellow"),
    ("chalk", "white"),
    ("a carrot", "orange"),
    ("soot", "black"),
    ("a ripe tomato", "red"),
    ("the sea", "blue"),
    ("a leaf", "green"),
)


def locality_facts() -> tuple[tuple[str, str], ...]:
    """Unrelated text-only facts (prompt, answer): sums, successors, opposites, colours."""
    sums = [
        (f"what is {NUMBERS[a]} plus {NUMBERS[b]} ?", NUMBERS[a + b]) for a in range(10) for b in range(10)
    ]
    succ = [(f"what number comes after {NUMBERS[n]} ?", NUMBERS[n + 1]) for n in range(20)]
    opp = [(f"what is the opposite of {a} ?", b) for a, b in _OPPOSITES]
    opp += [(f"what is the opposite of {b} ?", a) for a, b in _OPPOSITES]
    col = [(f"what colour is {thing} ?", c) for thing, c in _COLOURS]
    return tuple(sums + succ + opp + col)
