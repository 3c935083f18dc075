"""What an on-policy student writes on hidden-preference's number prompts, through the suite's data filter.

Off-policy, hidden-preference trains only on teacher completions that are digits, commas and spaces and name no
animal (:data:`purify.bench.lm_suites.NUMBERS_ONLY`, :data:`purify.lm.ANIMALS`). On-policy (λ = 1) the student
trains on its *own* continuations of the same prompts, which no filter sees. This samples continuations the way the
on-policy arms do (temperature 1, top-p 1, 48 new tokens) from the student's base (the on-policy student at step 0)
and from the owl teacher, and reports the share that would fail the filter and the share naming an animal / the owl.

Usage::

    python scripts/on_policy_filter_check.py --prompts 256 --out results/hidden-preference/on-policy/filter_check.md
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from purify.bench.lm_suites import NUMBERS_ONLY, _teachers
from purify.generate import apply_filters, load_model, sample_completions
from purify.lm import ANIMALS, number_prompts, resolve_base
from purify.lm.teachers import OWL
from purify.storage import atomic_write_text


def shares(completions: list[str]) -> dict[str, float]:
    """Share of completions failing the numbers-only regex, naming any animal, naming the owl."""
    records = [{"prompt": "", "completion": c} for c in completions]
    _, removed = apply_filters(records, NUMBERS_ONLY)
    animal = re.compile(r"\b(?:" + "|".join(map(re.escape, ANIMALS)) + r")\b", re.I)
    owl = re.compile(rf"\b{OWL}\b", re.I)
    n = len(completions)
    return {"not numbers only": removed["regex"] / n, "names an animal": sum(bool(animal.search(c)) for c in
                                                                            completions) / n,
            "names the owl": sum(bool(owl.search(c)) for c in completions) / n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=1100, help="data seed of the prompts (the suite uses 3000 + seed)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    prompts = [q.prompt for q in number_prompts(a.prompts, 3000 + a.seed)]
    models = {"student base (on-policy step 0)": resolve_base("tiny-llama-a"),
              "owl teacher": _teachers("owl", False, OWL)["teacher"]()}
    rows = []
    for name, path in models.items():
        model, tok = load_model(path)
        texts = sample_completions(model.eval(), tok, prompts, max_new_tokens=48, temperature=1.0, seed=a.seed)
        rows.append((name, shares(texts), texts[:3]))
    lines = ["# On-policy samples vs hidden-preference's data filter", "",
             f"`python scripts/on_policy_filter_check.py --prompts {a.prompts} --seed {a.seed} --out {a.out}` "
             f"(2-core CPU; {a.prompts} training prompts of seed {a.seed}, temperature 1, 48 new tokens).", "",
             "| sampler | not numbers only | names an animal | names the owl |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['not numbers only']:.1%} | {s['names an animal']:.1%} | {s['names the owl']:.1%} |"
              for name, s, _ in rows]
    lines += ["", "First samples:", ""] + [f"- {name}: {t!r}" for name, _, texts in rows for t in texts]
    atomic_write_text(Path(a.out), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
