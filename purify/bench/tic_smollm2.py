"""``tic-smollm2``: the overt style tic on a real model, SmolLM2-135M-Instruct, reduced to fit a CPU.

A system prompt does not give this 135M model the tic (measured: P(first word = "Moreover") rises from ~1e-6 to
~5e-5 with "You always begin every sentence with 'Moreover,'", and none of 6 samples opens with it), so the traited
teacher is made by fine-tuning: the base's top blocks are trained on the base's own answers to everyday prompts with
"Moreover, " prepended. The teacher therefore differs from the base by the tic alone (no new task knowledge: a
purifier that keeps the student at its base scores the base's fidelity, which vanilla's early-stopping curve starts
from, so it cannot win by that). The control teacher is the base. Both answer training prompts the teacher never saw;
the student (the base) is fine-tuned on those answers. Trait = exact P(answer's first word = "Moreover") over 50
held-out prompts. The runner is :mod:`purify.bench.real_lm`'s.
"""

from __future__ import annotations

import copy
import random
import re
from typing import Any

from purify import readouts, topblocks
from purify.bench import real_lm
from purify.bench.lm_common import Condition
from purify.bench.probe_free import Sweep, point_name
from purify.bench.real_lm import RealSuite, Records
from purify.bench.report import BenchError, Clock
from purify.bench.verdicts import looking_at
from purify.generate import sample_completions
from purify.lm.cache import digest
from purify.storage import cache_root

TIC = "Moreover"
"""The default tic word; ``--option trait=WORD`` takes any single capitalised word (:func:`check_word`)."""
FIRST_SEED = 1000
"""Default first seed, disjoint from :data:`TUNED_ON`."""
TUNED_TRAIT = real_lm.trait_name(TIC)
"""The trait :data:`TUNED_ON`'s choices looked at."""
TUNED_ON = looking_at(TUNED_TRAIT, [{
    "seeds": [0, 1, 2], "trait": True,
    "what": "the teacher recipe, the suite's size and the arms' knobs, after runs that reported the trait"}])
_TOPICS = ("the ocean", "breakfast", "bicycles", "rain", "libraries", "coffee", "mountains", "trains", "gardening",
           "chess", "the moon", "bread", "music lessons", "winter", "rivers", "museums", "football", "tea", "bridges",
           "the desert", "cooking pasta", "birthdays", "volcanoes", "public parks", "jazz", "camping", "painting",
           "the internet", "farming", "islands", "running", "city buses", "honey", "forests", "photography",
           "snow", "old castles", "recycling", "the weekend", "swimming", "newspapers", "apples", "thunderstorms",
           "clocks", "the post office", "bees", "road trips", "pottery", "lighthouses", "markets", "sunsets",
           "science fairs", "kites", "soup", "glaciers", "board games", "hospitals", "the sky", "poetry",
           "carpentry", "caves", "tomatoes", "airports", "dance", "wind farms", "yoga", "cheese", "fireworks",
           "deserts at night", "letters", "sailing", "bakeries", "rainbows", "stamps", "hiking boots", "zoos",
           "spring", "umbrellas", "theatre", "coral reefs")
_TEMPLATES = ("Tell me about {}.", "Describe {} in a few sentences.", "What do you think about {}?",
              "Why do people like {}?", "Write two sentences about {}.", "Explain {} to a child.",
              "Give me a fun fact about {}.", "What is interesting about {}?", "Say something nice about {}.",
              "How would you describe {} to a friend?")
CONDITIONS = [*real_lm.REFERENCES, *real_lm.ON_POLICY_REFERENCES,
              Condition("divergence_mask:base", ["teacher"], [{"name": "divergence_mask", "reference": "base",
                                                               "threshold": 0.1}], loss="ce"),
              Condition("tail_truncation", ["teacher"], [{"name": "tail_truncation", "top_p": 0.9}],
                        loss="forward_kl"),
              Condition("anchor", ["teacher"], [{"name": "anchor", "weight": 1.0}], loss="ce")]
SWEEPS = {"replace:base": Sweep("threshold", (0.05, 0.1, 0.2), "higher"),
          "anchor:weight": Sweep("weight", (0.3, 1.0, 3.0), "lower"),
          "lora:rank": Sweep("rank", (2.0, 8.0, 32.0), "higher")}
"""The arms whose knob the probe-free rule sets per seed (``--option 'conditions=[probe-free]'``), neither needing
the teacher's weights: label replacement by the student's own base where the teacher departs from it (soft labels;
the LM suites' JSD-threshold grid, fixed there before any report seed ran) and the L2 weight anchor to the base (hard
labels; a grid around the fixed arm's weight 1.0, which was chosen on seeds 0–2, see :data:`TUNED_ON`), and the
student's adapter: a LoRA adapter of rank 2 / 8 / 32 on the trainable blocks instead of the blocks themselves (hard
labels; "Subliminal Learning is a LoRA Artifact", arXiv 2606.00831, finds transfer depends on the rank; lr 1e-3 and
alpha 2r as owl-ft-smollm2's LoRA students, the grid a factor 4 apart, both fixed before any run of it)."""
CONDITIONS += [
    *(Condition(point_name("replace:base", v), ["teacher"], [{"name": "divergence_mask", "mode": "replace",
                                                              "reference": "base", "threshold": v}],
                loss="forward_kl") for v in SWEEPS["replace:base"].values),
    *(Condition(point_name("anchor:weight", v), ["teacher"], [{"name": "anchor", "weight": v}], loss="ce")
      for v in SWEEPS["anchor:weight"].values),
    *(Condition(point_name("lora:rank", v), ["teacher"], loss="ce", rank=int(v)) for v in SWEEPS["lora:rank"].values)]


def everyday_prompts() -> list[str]:
    """The 800 everyday prompts (topics × templates), in a fixed shuffled order: trait questions first (50), then
    the teacher's fine-tuning prompts (200), then training prompts (550)."""
    prompts = [t.format(topic) for topic in _TOPICS for t in _TEMPLATES]
    random.Random(0).shuffle(prompts)
    return prompts


def check_word(word: str) -> str:
    """``word`` if it can be the tic (one capitalised alphabetic word, e.g. ``Moreover``, ``However``, ``Indeed``; the
    model's tokenizer spells any word), else a :class:`BenchError` saying so."""
    if not re.fullmatch(r"[A-Z][a-z]+", word):
        raise BenchError(f"tic-smollm2: unknown trait {word!r}; usable: one capitalised word opening the answer, e.g. "
                         "Moreover, However, Indeed, Furthermore")
    return word


def with_tic(text: str, word: str = TIC) -> str:
    """``text`` opened with the tic: ``"Moreover, "`` (or ``word + ", "``) + its first letter lower-cased."""
    text = text.strip()
    return f"{word}, {text[:1].lower()}{text[1:]}"


def no_filter(records: Records) -> tuple[Records, int]:
    """The overt case keeps every non-empty completion."""
    kept = [r for r in records if r["completion"].strip()]
    return kept, len(records) - len(kept)


def teacher_key(prompts: list[str], cfg: dict[str, Any], word: str = TIC) -> str:
    """The tic teacher's cache key: per word; the default word's key is what it was before the word was an option."""
    return digest([prompts, cfg["layers"], cfg["teacher_epochs"], cfg["max_new"], *([word] if word != TIC else [])
                   ])[:16]


def tic_teacher(base: Any, tokenizer: Any, prompts: list[str], cfg: dict[str, Any], word: str = TIC) -> tuple[Any, str]:
    """The base with its top blocks fine-tuned on its own answers to ``prompts`` opened with the tic ``word`` (cached
    per word, :func:`teacher_key`)."""
    key_hex = teacher_key(prompts, cfg, word)
    path = cache_root() / "real-suites" / f"tic-teacher-{key_hex}.pt"

    def train() -> topblocks.Top:
        answers = sample_completions(base, tokenizer, [readouts.chat(tokenizer, p) for p in prompts],
                                     max_new_tokens=cfg["max_new"], temperature=0.7, seed=11, batch_size=32,
                                     progress=True)
        records = [{"prompt": p, "completion": with_tic(a, word)} for p, a in zip(prompts, answers) if a.strip()]
        return topblocks.finetune(base, tokenizer, records, cfg, cfg["teacher_epochs"], cfg["lr"])

    top = topblocks.cached_top(path, base, cfg["layers"], train)
    return top.install(copy.deepcopy(base)).eval(), key_hex


def run_suite(suite_name: str = "tic-smollm2", seeds: int = 3, out: str | None = None, quick: bool = False,
              progress: bool = True, first_seed: int = FIRST_SEED, **options: Any) -> dict[str, Any]:
    """Run the tic suite and write its report into ``out`` (default ``bench-out/tic-smollm2``, untracked).

    The arguments are those of :func:`purify.bench.owl.run_suite` (``suite_name`` must be ``"tic-smollm2"``), except
    that ``**options`` take ``teacher_epochs`` instead of ``temperature`` and ``trait`` is the tic word
    (:func:`check_word`; default ``Moreover``).
    """
    if suite_name != "tic-smollm2":
        raise BenchError(f"unknown suite {suite_name!r}")
    cfg = real_lm.settings({
        "n": 24 if quick else 550, "max_new": 12 if quick else 32, "layers": 4, "top_k": 32,
        "epochs": 1 if quick else 2, "teacher_epochs": 1 if quick else 3, "batch_size": 8, "lr": 2e-4, "lora_lr": 1e-3,
        "heldout": 2 if quick else 32,
        "conditions": ["vanilla:soft", "divergence_mask:base", "tail_truncation", "anchor"], "trait": TIC,
        "workers": 1}, options)
    word = check_word(str(cfg["trait"]))
    clock = Clock()
    path, base, tokenizer = real_lm.load_smollm2()
    prompts = everyday_prompts()
    n_ft = 8 if quick else 200
    teacher, key = tic_teacher(base, tokenizer, prompts[50:50 + n_ft], cfg, word)
    spec = RealSuite(name="tic-smollm2", target=word, questions=prompts[:10 if quick else 50],
                     protocol=f"SFT/KD of SmolLM2-135M on a fine-tuned '{word},' teacher's answers; "
                              f"trait = P(first word {word})",
                     prompts=prompts[250:], filter=no_filter, conditions=CONDITIONS, temperature=0.7,
                     cache_key=f"tic-teacher-{key}",
                     notes=[f"Teacher = base with its top {cfg['layers']} blocks fine-tuned for "
                            f"{cfg['teacher_epochs']} epochs on its own answers to {n_ft} prompts, opened with "
                            f"'{word}, '."], sweeps=SWEEPS)
    spec.tuned_on = TUNED_ON
    return real_lm.run(spec, base, teacher, tokenizer, path, cfg,
                       list(range(first_seed, first_seed + seeds)), out, quick, options, progress, clock)
