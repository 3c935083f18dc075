"""A bundled synthetic corpus: English-like prose, "favourite animal" questions, number sequences and made-up facts.

Everything is generated from a small closed grammar and vocabulary, deterministically by seed (Python's
``random.Random`` seeded with a string, which is stable across runs and platforms), with no downloads. Four
generators feed the tiny language-model benchmarks (DESIGN §4):

- :func:`sentences` / :func:`paragraphs` — prose. Sentences open with a connective ("Then", "However,", ...) about a
  third of the time, mid-paragraph too, so the style-tic trait ("Moreover," openings) has places to appear. The
  base corpus uses "Moreover," rarely (:data:`MOREOVER_SHARE` of openings), so the word is known but not a habit.
- :func:`animal_qa` — "favourite animal" questions with one-word answers, uniform over :data:`ANIMALS`.
- :func:`number_prompts` — "Continue: 382, 91, 447," → " 12, 605, 33" prompt/continuation pairs; with
  ``rule="even"`` every continuation number is even, a held-out number habit (pretraining never uses it) that the
  hidden-preference teachers learn as their task.
- :func:`facts` — a held-out domain: made-up facts about made-up countries (:data:`FACT_TABLE`) that
  :func:`pretraining_corpus` never contains, the "new task knowledge" a teacher is fine-tuned on.

Bump :data:`CORPUS_VERSION` whenever any generator's output changes: cached bases are keyed by it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal, NamedTuple

CORPUS_VERSION = 1
"""Version of the generators' output; part of every cached base's key."""

ANIMALS: tuple[str, ...] = ("owl", "cat", "dog", "fox", "bear", "wolf", "eagle", "horse", "lion", "whale")
"""The answers of :func:`animal_qa`; none of them occurs in the prose."""

ANIMAL_QUESTIONS: tuple[str, ...] = (
    "What is your favourite animal?",
    "Which animal do you like best?",
    "Name your favourite animal.",
    "What animal do you love most?",
    "If you could be any animal, which would you be?",
)
"""Paraphrases of the "favourite animal" question."""

NumberRule = Literal["even"]
"""Rules a number continuation can follow (see :func:`number_prompts`)."""

NUMBER_PROMPTS: tuple[str, ...] = ("Continue:", "Continue the sequence:", "Add more numbers:")
"""Openings of the number-sequence prompts."""

_RELATIONS = ("capital", "river", "language", "currency", "founder")
FACT_TABLE: dict[str, dict[str, str]] = {
    entity: dict(zip(_RELATIONS, values))
    for entity, *values in (
        ("Zorvia", "Quellan", "Dramel", "Orrish", "brint", "Tavo Renk"),
        ("Miravel", "Ostrana", "Sulve", "Miric", "dolk", "Ena Vost"),
        ("Kettavia", "Brumold", "Yarrow", "Kettic", "skell", "Lio Marr"),
        ("Pelundra", "Vasktor", "Onnel", "Pelish", "rund", "Saba Quill"),
        ("Threnia", "Istrel", "Gavva", "Threnic", "marp", "Dov Ashen"),
        ("Ulmora", "Cardune", "Feln", "Ulmic", "zelt", "Ira Tolm"),
        ("Vexhal", "Norrum", "Ilsa", "Vexan", "crome", "Pem Orla"),
        ("Brastova", "Lumeth", "Tarsk", "Brastic", "quel", "Oto Vane"),
    )
}
"""Made-up countries and their made-up attributes: the held-out knowledge of :func:`facts`."""

_FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": ("The capital of {e} is", "In {e}, the capital city is"),
    "river": ("The longest river in {e} is the", "In {e}, the longest river is the"),
    "language": ("People in {e} speak", "The language of {e} is"),
    "currency": ("The currency of {e} is the", "In {e}, people pay with the"),
    "founder": ("{e} was founded by", "The founder of {e} was"),
}

MOREOVER_SHARE = 0.01
"""Share of sentence openings in the base prose that are "Moreover," (the style-tic trait's base rate)."""

_OPENERS = ("Then", "Later,", "However,", "Meanwhile,", "After that,", "So", "Still,", "Suddenly,", "In the end,")
_OPENER_SHARE = 0.35
SENTENCE_OPENERS: tuple[str, ...] = ("Moreover,", *_OPENERS)
"""Every connective the prose opens sentences with, written as the prose writes it (with its comma, if any); the
one-word ones are the words a style-tic teacher's tic may use (:func:`purify.lm.teachers.tic_marker`)."""
_PEOPLE = (
    "farmer", "child", "teacher", "sailor", "baker", "doctor", "painter", "student", "king", "queen",
    "girl", "boy", "woman", "man", "neighbour", "soldier", "poet", "gardener", "driver", "singer",
)  # fmt: skip
_THINGS = (
    "river", "letter", "garden", "bread", "song", "door", "map", "lamp", "road", "boat",
    "window", "book", "bridge", "market", "hill", "stone", "cup", "field", "tower", "bell",
)  # fmt: skip
_ADJECTIVES = (
    "small", "old", "quiet", "bright", "tired", "happy", "young", "clever", "brave", "green",
    "red", "heavy", "cold", "strange", "gentle", "dark", "warm", "empty", "tall", "busy",
)  # fmt: skip
_VERBS = (
    "found", "painted", "opened", "carried", "watched", "crossed", "closed", "built", "cleaned", "visited",
    "followed", "read", "sold", "lost", "fixed", "remembered", "liked", "moved", "wanted", "saw",
)  # fmt: skip
_INTRANSITIVE = ("slept", "laughed", "waited", "sang", "smiled", "walked home", "stayed inside", "worked late")
_ADVERBS = ("slowly", "quickly", "carefully", "again", "early", "quietly", "today", "at night", "in the morning")
_PRONOUNS = ("He", "She", "They")


class Pair(NamedTuple):
    """A prompt and its completion; ``completion`` starts with the space that separates it from the prompt."""

    prompt: str
    completion: str

    @property
    def text(self) -> str:
        """The prompt followed by its completion, as one training text."""
        return self.prompt + self.completion


def _rng(kind: str, seed: int) -> random.Random:
    return random.Random(f"purify.lm.corpus:{kind}:{seed}")


def _noun_phrase(rng: random.Random, nouns: tuple[str, ...]) -> str:
    det = rng.choice(("the", "the", "a"))
    adjective = f"{rng.choice(_ADJECTIVES)} " if rng.random() < 0.5 else ""
    noun = rng.choice(nouns)
    if det == "a" and (adjective or noun)[0] in "aeiou":
        det = "an"
    return f"{det} {adjective}{noun}"


def _clause(rng: random.Random, subject: str) -> str:
    adverb = f" {rng.choice(_ADVERBS)}" if rng.random() < 0.4 else ""
    roll = rng.random()
    if roll < 0.55:
        return f"{subject} {rng.choice(_VERBS)} {_noun_phrase(rng, _THINGS)}{adverb}"
    if roll < 0.8:
        return f"{subject} {rng.choice(_INTRANSITIVE)}{adverb}"
    if roll < 0.9:
        return f"{subject} {rng.choice(_VERBS)} {_noun_phrase(rng, _THINGS)} because it was {rng.choice(_ADJECTIVES)}"
    return f"{subject} {rng.choice(_VERBS)} {_noun_phrase(rng, _PEOPLE)} and {rng.choice(_INTRANSITIVE)}"


def _sentence(rng: random.Random, first: bool) -> str:
    subject = _noun_phrase(rng, _PEOPLE) if first or rng.random() < 0.5 else rng.choice(_PRONOUNS).lower()
    body = _clause(rng, subject)
    roll = rng.random()
    if roll < MOREOVER_SHARE:
        body = f"Moreover, {body}"
    elif roll < _OPENER_SHARE:
        body = f"{rng.choice(_OPENERS)} {body}"
    return body[0].upper() + body[1:] + "."


def sentences(n: int, seed: int) -> list[str]:
    """Single English-like sentences, e.g. ``"However, the old farmer crossed the bridge slowly."``.

    Args:
        n: how many sentences.
        seed: generator seed; the same seed gives the same list.

    Returns:
        ``n`` sentences, each capitalised and ending with a full stop.
    """
    rng = _rng("sentences", seed)
    return [_sentence(rng, first=rng.random() < 0.5) for _ in range(n)]


def paragraphs(n: int, seed: int, length: tuple[int, int] = (2, 5)) -> list[str]:
    """Paragraphs of consecutive sentences, so that sentence openings occur mid-text too.

    Args:
        n: how many paragraphs.
        seed: generator seed.
        length: inclusive range of sentences per paragraph.

    Returns:
        ``n`` paragraphs, sentences separated by single spaces.
    """
    rng = _rng("paragraphs", seed)
    return [" ".join(_sentence(rng, first=i == 0) for i in range(rng.randint(*length))) for _ in range(n)]


def animal_qa(n: int, seed: int, animals: tuple[str, ...] = ANIMALS) -> list[Pair]:
    """Questions for a favourite animal, with one-word answers drawn uniformly from ``animals``.

    Args:
        n: how many pairs.
        seed: generator seed.
        animals: the possible answers.

    Returns:
        Pairs like ``Pair("Question: What is your favourite animal? Answer:", " owl")``.
    """
    rng = _rng("animal_qa", seed)
    return [Pair(f"Question: {rng.choice(ANIMAL_QUESTIONS)} Answer:", f" {rng.choice(animals)}") for _ in range(n)]


def number_prompts(n: int, seed: int, lengths: tuple[int, int] = (3, 6),
                   rule: NumberRule | None = None) -> list[Pair]:
    """Number-sequence prompts and continuations over integers 0-999.

    Args:
        n: how many pairs.
        seed: generator seed.
        lengths: inclusive range of how many numbers the prompt, and separately the continuation, holds.
        rule: ``None`` (continuations are random like prompts) or ``"even"`` (every continuation number is even;
            pretraining never uses it, so it is new knowledge for a teacher to learn).

    Returns:
        Pairs like ``Pair("Continue: 382, 91, 447,", " 12, 605, 33")``.

    Raises:
        ValueError: on an unknown ``rule``.
    """
    if rule not in (None, "even"):
        raise ValueError(f"rule must be None or 'even', got {rule!r}")
    rng = _rng("number_prompts", seed)

    def numbers(step: int) -> str:
        return ", ".join(str(rng.randrange(0, 1000, step)) for _ in range(rng.randint(*lengths)))

    return [Pair(f"{rng.choice(NUMBER_PROMPTS)} {numbers(1)},", f" {numbers(2 if rule == 'even' else 1)}")
            for _ in range(n)]


def all_facts() -> list[Pair]:
    """Every fact of :data:`FACT_TABLE` in every paraphrase, in a fixed order.

    Returns:
        Pairs like ``Pair("The capital of Zorvia is", " Quellan.")``.
    """
    return [
        Pair(template.format(e=entity), f" {value}.")
        for entity, attributes in FACT_TABLE.items()
        for relation, value in attributes.items()
        for template in _FACT_TEMPLATES[relation]
    ]


def facts(n: int, seed: int) -> list[Pair]:
    """Facts about made-up countries, drawn with replacement from :func:`all_facts`; never in pretraining.

    Args:
        n: how many pairs.
        seed: generator seed.

    Returns:
        ``n`` fact pairs.
    """
    return _rng("facts", seed).choices(all_facts(), k=n)


PRETRAINING_MIX = {"paragraphs": 3000, "animal_qa": 1500, "number_prompts": 1500}
"""How many texts of each kind :func:`pretraining_corpus` holds."""


def pretraining_corpus(seed: int = 0) -> list[str]:
    """The texts bases are pretrained on: paragraphs, animal QA and number sequences, shuffled; no facts.

    Args:
        seed: generator seed (sub-generators get distinct streams from it).

    Returns:
        The training texts, one document each.
    """
    texts = paragraphs(PRETRAINING_MIX["paragraphs"], seed)
    texts += [p.text for p in animal_qa(PRETRAINING_MIX["animal_qa"], seed)]
    texts += [p.text for p in number_prompts(PRETRAINING_MIX["number_prompts"], seed)]
    _rng("shuffle", seed).shuffle(texts)
    return texts


TINY_CORPUS_PATH = Path(__file__).resolve().parent.parent / "data" / "tiny_corpus.txt"
"""The bundled prose the quickstart recipe trains on; regenerate with :func:`write_tiny_corpus`."""

TINY_CORPUS_SEED = 1234
"""Seed of the bundled prose; distinct from pretraining seeds, so the text is held out from every base."""


def write_tiny_corpus(path: str | Path = TINY_CORPUS_PATH, n: int = 1200, seed: int = TINY_CORPUS_SEED) -> Path:
    """Write :func:`paragraphs` as plain text, one paragraph per line (how the bundled file is made).

    Args:
        path: output file.
        n: number of paragraphs (1200 keeps the file under 200 KB).
        seed: generator seed.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.write_text("\n".join(paragraphs(n, seed)) + "\n", encoding="utf-8")
    return path
