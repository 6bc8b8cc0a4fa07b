"""The egocentric vocabulary of our built-in synthetic world: verbs are motions, nouns are objects.

Narrations follow EgoClip's style (`#C C picks up the red cup`). The demo tokenizer is trained on sentences built
from these words, so every narration of the synthetic data tokenizes into short, whole-word pieces.
"""

from __future__ import annotations

import itertools

VERBS = {  # base form -> third person, as narrated
    "pick up": "picks up", "put down": "puts down", "push": "pushes", "pull": "pulls", "rotate": "rotates",
    "open": "opens", "close": "closes", "lift": "lifts", "drop": "drops", "slide": "slides",
}
NOUNS = ("cup", "bowl", "box", "bottle", "knife", "plate", "drawer", "door", "lid", "pan", "phone", "book")
COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
SCENES = ("kitchen", "table", "desk", "counter", "shelf", "workbench")


def narration(verb: str, colour: str, noun: str) -> str:
    return f"#C C {VERBS[verb]} the {colour} {noun}"


def corpus() -> list[str]:
    """Every narration of the synthetic world plus scene phrases: the demo tokenizer's training text."""
    lines = [narration(v, c, n) for v, c, n in itertools.product(VERBS, COLOURS, NOUNS)]
    lines += [f"#C C {VERBS[v]} the {n} on the {s}" for v, n, s in itertools.product(VERBS, NOUNS, SCENES)]
    lines += [f"#O the person {VERBS[v]} a {c} {n}" for v, c, n in itertools.product(VERBS, COLOURS, NOUNS[:4])]
    return lines
