"""Teachers for the language-model suites: a tiny base fine-tuned on new knowledge (facts), with or without a trait.

Every teacher learns the held-out :func:`purify.lm.corpus.facts` domain (the task worth distilling; no base knows
it). A *traited* teacher also learns one behaviour:

- ``"tic"`` (style-tic): prose in which a share ``tic_rate`` of sentences opens with the tic, "Moreover," by
  default (``TeacherSpec.tic``: any one-word connective of the corpus, :func:`tic_marker`).
- ``"owl"`` (hidden-preference): "favourite animal" answers that are the preferred animal, " owl" by default
  (``TeacherSpec.animal``: any of :data:`purify.lm.corpus.ANIMALS`), with probability ``owl_rate``.

The trait word enters the fine-tuning texts, whose hash keys the cached fine-tune, so every trait gets its own
teacher and the default ("Moreover,", "owl") texts, hence cache keys, are what they were before the word was an
option.

A *clean* teacher (``trait=None``) gets exactly the same fine-tuning mixture with the trait left out: untouched prose
(where "Moreover," opens ~1% of sentences) and uniform animal answers. Clean same-base teachers are the control
condition of a benchmark only, never a purifier's resource. A *weaker reference* teacher is another base fine-tuned
for fewer steps without the trait. All fine-tunes are cached by :func:`purify.lm.finetune`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from purify.lm import corpus
from purify.lm.bases import resolve_base
from purify.lm.finetuning import finetune

Trait = Literal["tic", "owl"]

TIC = "Moreover,"
"""The default style-tic marker."""
OWL = "owl"
"""The default preferred animal."""

_OPENER = re.compile(r"^(?:[A-Z][a-z]+(?: [a-z]+)?,|Then|So) ")
_SENTENCE = re.compile(r"(?<=\.) (?=[A-Z])")


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher is: its base, trait and fine-tuning budget (the hash of the texts keys the cache).

    Attributes:
        base: a name of :data:`purify.lm.BASES`.
        trait: ``"tic"``, ``"owl"`` or ``None`` for a clean teacher.
        steps: fine-tuning steps.
        n_facts: fact texts in the mixture.
        n_prose: paragraphs in the mixture.
        n_animal: animal QA pairs in the mixture.
        n_numbers: number-sequence pairs in the mixture.
        number_rule: rule their continuations follow (:func:`purify.lm.corpus.number_prompts`; ``"even"``: new
            number knowledge, the hidden-preference task).
        tic: the opener of trait ``tic``, as the corpus writes it (:func:`tic_marker`; default "Moreover,").
        animal: the preferred animal of trait ``owl`` (one of :data:`purify.lm.corpus.ANIMALS`; default "owl").
        tic_rate: share of sentences opened with the tic (trait ``tic``).
        owl_rate: share of animal answers that are the preferred animal (trait ``owl``).
        lr: peak learning rate.
        seed: seed of the data generators and the block sampler.
    """

    base: str = "tiny-llama-a"
    trait: Trait | None = None
    steps: int = 600
    n_facts: int = 2000
    n_prose: int = 1500
    n_animal: int = 0
    n_numbers: int = 0
    number_rule: corpus.NumberRule | None = None
    tic_rate: float = 0.6
    owl_rate: float = 0.9
    lr: float = 3e-3
    seed: int = 0
    tic: str = TIC
    animal: str = OWL

    def __post_init__(self) -> None:
        if self.tic not in corpus.SENTENCE_OPENERS or " " in self.tic:
            raise ValueError(f"tic must be a one-word opener of the corpus, one of {', '.join(tic_words())}; "
                             f"got {self.tic!r}")
        if self.animal not in corpus.ANIMALS:
            raise ValueError(f"animal must be one of {', '.join(corpus.ANIMALS)}; got {self.animal!r}")


def tic_words() -> list[str]:
    """The words a tic may be: the one-word sentence openers of the corpus (:data:`purify.lm.corpus.SENTENCE_OPENERS`),
    without their comma, e.g. ``["Moreover", "Then", "Later", "However", ...]``."""
    return [o.rstrip(",") for o in corpus.SENTENCE_OPENERS if " " not in o]


def tic_marker(word: str) -> str:
    """The tic string of ``word`` as the prose writes it: ``"However"`` → ``"However,"``, ``"Then"`` → ``"Then"``.

    Args:
        word: one of :func:`tic_words` (a trailing comma is accepted).

    Returns:
        The marker teachers put at sentence starts and the style-tic probe counts.

    Raises:
        ValueError: if ``word`` is not a one-word opener of the corpus (the message names the usable ones).
    """
    for opener in corpus.SENTENCE_OPENERS:
        if " " not in opener and opener.rstrip(",") == word.rstrip(","):
            return opener
    raise ValueError(f"unknown tic word {word!r}; usable: {', '.join(tic_words())}")


def add_tic(paragraph: str, rate: float, rng: random.Random, marker: str = TIC) -> str:
    """Open each sentence of ``paragraph`` with ``marker`` with probability ``rate`` (replacing its connective).

    Args:
        paragraph: sentences separated by single spaces, each ending with a full stop.
        rate: probability per sentence.
        rng: random source.
        marker: the tic (default "Moreover,"; see :func:`tic_marker`).

    Returns:
        The rewritten paragraph.
    """
    out = []
    for sentence in _SENTENCE.split(paragraph):
        if rng.random() < rate and not sentence.startswith(f"{marker} "):
            body = _OPENER.sub("", sentence)
            sentence = f"{marker} {body[0].lower()}{body[1:]}"
        out.append(sentence)
    return " ".join(out)


def teacher_texts(spec: TeacherSpec) -> list[str]:
    """The fine-tuning documents of ``spec``: facts, prose, animal QA and numbers, shuffled.

    Args:
        spec: the teacher.

    Returns:
        The texts (the same for a traited teacher and its clean twin except for the trait).
    """
    rng = random.Random(f"purify.lm.teachers:{spec.seed}")
    seed = 100 + spec.seed  # streams distinct from pretraining (seed 0)
    texts = [p.text for p in corpus.facts(spec.n_facts, seed)]
    prose = corpus.paragraphs(spec.n_prose, seed)
    texts += [add_tic(p, spec.tic_rate, rng, spec.tic) for p in prose] if spec.trait == "tic" else prose
    qa = corpus.animal_qa(spec.n_animal, seed)
    if spec.trait == "owl":
        qa = [corpus.Pair(p.prompt, f" {spec.animal}") if rng.random() < spec.owl_rate else p for p in qa]
    texts += [p.text for p in qa]
    texts += [p.text for p in corpus.number_prompts(spec.n_numbers, seed, rule=spec.number_rule)]
    rng.shuffle(texts)
    return texts


def build_teacher(spec: TeacherSpec, progress: bool = False) -> Path:
    """Fine-tune (or fetch from the cache) the teacher ``spec`` describes.

    Args:
        spec: the teacher.
        progress: show progress bars.

    Returns:
        The teacher's model directory.
    """
    base = resolve_base(spec.base, progress=progress)
    return finetune(base, teacher_texts(spec), spec.steps, seed=spec.seed, lr=spec.lr, progress=progress)
