"""Teachers for the language-model suites: a tiny base fine-tuned on new knowledge (facts), with or without a trait.

Every teacher learns the held-out :func:`purify.lm.corpus.facts` domain (the task worth distilling; no base knows
it). A *traited* teacher also learns one behaviour:

- ``"tic"`` (style-tic): prose in which a share ``tic_rate`` of sentences opens with "Moreover,".
- ``"owl"`` (hidden-preference): "favourite animal" answers that are " owl" with probability ``owl_rate``.

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
"""The style-tic marker."""

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
        tic_rate: share of sentences opened with "Moreover," (trait ``tic``).
        owl_rate: share of animal answers that are owl (trait ``owl``).
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


def add_tic(paragraph: str, rate: float, rng: random.Random) -> str:
    """Open each sentence of ``paragraph`` with "Moreover," with probability ``rate`` (replacing its connective).

    Args:
        paragraph: sentences separated by single spaces, each ending with a full stop.
        rate: probability per sentence.
        rng: random source.

    Returns:
        The rewritten paragraph.
    """
    out = []
    for sentence in _SENTENCE.split(paragraph):
        if rng.random() < rate and not sentence.startswith(TIC):
            body = _OPENER.sub("", sentence)
            sentence = f"{TIC} {body[0].lower()}{body[1:]}"
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
    texts += [add_tic(p, spec.tic_rate, rng) for p in prose] if spec.trait == "tic" else prose
    qa = corpus.animal_qa(spec.n_animal, seed)
    if spec.trait == "owl":
        qa = [corpus.Pair(p.prompt, " owl") if rng.random() < spec.owl_rate else p for p in qa]
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
