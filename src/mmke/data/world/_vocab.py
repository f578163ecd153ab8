"""Fixed plain-English word lists of the world: professions, genres, foods, film titles, sign meanings."""

from __future__ import annotations

PROFESSIONS = (
    "baker",
    "painter",
    "pilot",
    "doctor",
    "farmer",
    "singer",
    "teacher",
    "sailor",
    "writer",
    "judge",
)
GENRES = ("drama", "comedy", "western", "musical", "horror", "thriller", "fantasy", "mystery")
FOODS = ("fish", "grass", "seeds", "insects", "fruit", "leaves", "meat", "nectar")
FILM_ADJECTIVES = (
    "silent",
    "red",
    "last",
    "hidden",
    "broken",
    "golden",
    "dark",
    "long",
    "cold",
    "lost",
    "quiet",
    "wild",
)
FILM_NOUNS = (
    "river",
    "moon",
    "garden",
    "road",
    "crown",
    "winter",
    "harbor",
    "mirror",
    "storm",
    "letter",
    "island",
    "forest",
)
ORG_SUFFIXES = ("group", "works", "labs", "guild", "company", "union")
LANDMARK_SUFFIXES = ("tower", "bridge", "gate", "temple", "arch", "dome")

#: rule kind -> sixteen two-word meanings of signs, gestures and symbols of that kind.
SIGN_MEANINGS = {
    "prohibition": (
        "no entry",
        "no parking",
        "no swimming",
        "no fishing",
        "no dogs",
        "no bikes",
        "no smoking",
        "no photos",
        "no camping",
        "no fires",
        "no horns",
        "no trucks",
        "no diving",
        "no running",
        "no shouting",
        "no food",
    ),
    "warning": (
        "beware ice",
        "beware rocks",
        "beware deer",
        "beware waves",
        "beware wires",
        "beware floods",
        "beware bees",
        "beware bulls",
        "beware cliffs",
        "beware snakes",
        "beware falls",
        "beware wind",
        "beware trains",
        "beware ducks",
        "beware mud",
        "beware sand",
    ),
    "instruction": (
        "wear helmets",
        "wear masks",
        "use stairs",
        "stay seated",
        "wash hands",
        "keep quiet",
        "stand back",
        "hold rails",
        "close gates",
        "show tickets",
        "walk bikes",
        "lock doors",
        "leash dogs",
        "carry water",
        "pay here",
        "queue here",
    ),
    "direction": (
        "turn left",
        "turn right",
        "go straight",
        "go back",
        "keep left",
        "keep right",
        "exit here",
        "enter here",
        "go up",
        "go down",
        "stop here",
        "park here",
        "cross here",
        "wait here",
        "slow down",
        "speed up",
    ),
    "ruling": (
        "stop play",
        "free kick",
        "time out",
        "game over",
        "play on",
        "penalty kick",
        "corner kick",
        "goal kick",
        "throw in",
        "foul play",
        "yellow card",
        "red card",
        "offside",
        "hand ball",
        "drop ball",
        "fair catch",
    ),
}


def sign_meanings(n: int) -> list[tuple[str, str]]:
    """The first ``n`` (meaning, rule kind) pairs, interleaving kinds so small worlds get every kind."""
    kinds = list(SIGN_MEANINGS)
    out = [(SIGN_MEANINGS[k][i], k) for i in range(16) for k in kinds]
    return out[:n]
