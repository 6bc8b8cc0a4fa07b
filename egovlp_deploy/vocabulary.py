"""The egocentric vocabulary of our built-in synthetic world: verbs are motions, nouns are objects.

Narrations follow EgoClip's style (`#C C picks up the red cup`). The demo tokenizer is trained on sentences built
from these words, so every narration of the synthetic data tokenizes into short, whole-word pieces.

Every verb is a motion that survives the training transform's horizontal flip (the EgoVLPv2 train transform):
up/down, away/toward (shrink/grow), spin, lid or cover opening. Left/right motions would be flipped into their
opposite, so there are none.
"""

from __future__ import annotations

import itertools

VERBS = {  # base form (the class name in meta.json) -> third person, as narrated
    "pick up": "picks up",
    "put down": "puts down",
    "push": "pushes",
    "pull": "pulls",
    "rotate": "rotates",
    "open": "opens",
    "close": "closes",
}
# Each pair differs only in the direction of time: one clip is the other played backwards (what EgoMCQ's
# intra-video questions test).
OPPOSITE = {
    "pick up": "put down",
    "put down": "pick up",
    "push": "pull",
    "pull": "push",
    "open": "close",
    "close": "open",
}
NOUNS = ("cup", "bowl", "box", "bottle", "plate", "pan", "book", "jar")
OPENABLE = ("box", "book", "jar")  # the nouns that can be opened and closed
COLOURS = ("red", "green", "blue", "yellow", "white", "orange", "purple", "cyan")
SCENES = ("kitchen", "table", "desk", "counter", "shelf", "workbench")
# Everyday words the world never renders, known to the demo tokenizer as whole words so free-text queries in demos
# (and `#C C opens the drawer`) stay short.
EXTRA_VERBS = {"lift": "lifts", "drop": "drops", "slide": "slides"}
EXTRA_NOUNS = ("knife", "drawer", "door", "phone")
EXTRA_COLOURS = ("black",)


def noun_classes() -> list[str]:
    """The noun classes of the synthetic world are coloured objects ("red cup"), not bare nouns.

    EgoNCE counts two clips as positives when they share a verb and a noun class. With bare nouns, "picks up the
    red cup" and "picks up the blue cup" would be positives of each other, and the loss would never ask for colour,
    which is what tells the objects of a scene apart in the benchmark's questions.
    """
    return [f"{colour} {noun}" for colour in COLOURS for noun in NOUNS]


def noun_class(colour: str, noun: str) -> int:
    return COLOURS.index(colour) * len(NOUNS) + NOUNS.index(noun)


def verbs_for(noun: str) -> tuple[str, ...]:
    """The verbs the synthetic world can act out on `noun` (open/close only on openable objects)."""
    if noun not in NOUNS:
        raise ValueError(f"unknown noun {noun!r}; the synthetic world has {', '.join(NOUNS)}")
    return tuple(v for v in VERBS if noun in OPENABLE or v not in ("open", "close"))


def narration(verb: str, colour: str, noun: str) -> str:
    """EgoClip-style narration, e.g. narration('pick up', 'red', 'cup') == '#C C picks up the red cup'."""
    return f"#C C {VERBS[verb]} the {colour} {noun}"


def corpus() -> list[str]:
    """Every narration of the synthetic world plus scene phrases: the demo tokenizer's training text."""
    lines = [narration(v, c, n) for v, c, n in itertools.product(VERBS, COLOURS, NOUNS)]
    lines += [f"#C C {VERBS[v]} the {n} on the {s}" for v, n, s in itertools.product(VERBS, NOUNS, SCENES)]
    lines += [f"#O the person {VERBS[v]} a {c} {n}" for v, c, n in itertools.product(VERBS, COLOURS, NOUNS[:4])]
    verbs, nouns, colours = [*VERBS.values(), *EXTRA_VERBS.values()], NOUNS + EXTRA_NOUNS, COLOURS + EXTRA_COLOURS
    lines += [
        f"#C C {v} the {c} {n}"
        for v, c, n in itertools.product(verbs, colours, nouns)
        if v in EXTRA_VERBS.values() or n in EXTRA_NOUNS or c in EXTRA_COLOURS
    ]
    lines += [f"#C C {v} the {n}" for v, n in itertools.product(verbs, nouns)]
    return lines
