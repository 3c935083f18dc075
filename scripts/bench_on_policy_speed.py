"""On-policy vs off-policy distillation step time (issue #15), and what the student's sampling costs.

Usage::

    python scripts/bench_on_policy_speed.py [--threads 1] [--out results]

Two settings, each in this one process: ``quickstart`` (recipes/quickstart.yaml: random-init Llama student, hidden 64,
2 layers, tiny-llama-a teacher, batches of 16 × ≤64 tokens, 40 rounds after 4 warmup) and ``smollm2``
(SmolLM2-135M-Instruct student, ``{packaged: smollm2-135m}``, teacher a perturbed copy of it, batches of 4 × ≤64
tokens, 6 rounds after 1 warmup). Every condition is ``Distiller.fit_step`` with the generalized JSD (β = 0.5) on the
same batches, one shared student and one AdamW optimizer, timed interleaved in a shuffled order each round
(bench_overhead.py's ``interleave``):

- ``off``: off-policy (no ``on_policy``);
- ``lam0.5``: on-policy with λ = 0.5 (steps decided by the seeded rule of :mod:`purify.on_policy`, keyed on the round);
- ``lam1``: every step on-policy (the cost of one on-policy step).

Sampling: temperature 1, top-p 1, 32 new tokens (fewer where the student samples its end-of-text), from each row's
prompt (the bundled corpus has empty prompts: ``<bos>`` only). Reported: λ = 0.5 / off-policy as the ratio of mean
step times over the same rounds (with the realised share of on-policy steps), λ = 1 / off-policy as the median of
per-round paired ratios (IQR), the sampled tokens per second of ``generate`` (KV cache on) and sampling's share of an
on-policy step. Writes (replaces) the section "## On-policy vs off-policy" of ``results/speed.md`` and
``results/speed_on_policy.json``. CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_overhead import interleave, machine, paired

from purify.assembly import load_recipe
from purify.config import LossConfig, OnPolicyConfig
from purify.data import DistillDataModule
from purify.models import build_model
from purify.module import Distiller
from purify.on_policy import is_on_policy_step
from purify.storage import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## On-policy vs off-policy"
MAX_NEW = 32
SETTINGS = {
    "quickstart": {"overrides": [], "rounds": 40, "warmup": 4, "perturbed_teacher": False},
    "smollm2": {"overrides": ["student={packaged: smollm2-135m, config: null, tokenizer: null, name: smollm2-135m}",
                              "teachers=[{packaged: smollm2-135m}]",
                              "data.batch_size=4", "data.max_length=64"],
                "rounds": 6, "warmup": 1, "perturbed_teacher": True},
}


def measure(name: str, setting: dict[str, Any]) -> dict[str, Any]:
    """Time the three conditions of one setting; returns its numbers."""
    torch.manual_seed(0)
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", setting["overrides"])
    student = build_model(recipe.student, 0)
    if setting["perturbed_teacher"]:  # a copy of the student, perturbed: same vocabulary, a teacher's cost
        teacher = build_model(recipe.student, 0).module
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
    else:
        teacher = build_model(recipe.teachers[0], 0).module
    teacher.eval().requires_grad_(False)
    data = DistillDataModule(recipe.data, student.tokenizer, 0)
    data.setup()
    stream = iter(data.train_dataloader())
    batches = [next(stream) for _ in range(8)]
    model = student.module.train()
    loss = LossConfig(name="jsd", beta=0.5)
    distillers = {
        cond: Distiller(model, [teacher], loss=loss, optim=recipe.optim, total_steps=1000,
                        student_tokenizer=student.tokenizer, seed=0,
                        on_policy=None if lam is None else OnPolicyConfig(lam=lam, max_new_tokens=MAX_NEW))
        for cond, lam in (("off", None), ("lam0.5", 0.5), ("lam1", 1.0))}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    sampled: dict[str, list[dict[str, float]]] = {k: [] for k in distillers}

    def step(cond: str, d: Distiller) -> Any:
        def call(i: int) -> None:
            d.fit_step(batches[i % len(batches)], optimizer, 0.5, step=i)
            metrics = d.on_policy.last_metrics if d.on_policy is not None else {}
            if metrics.get("on_policy") and i >= setting["warmup"]:
                sampled[cond].append({k: metrics[k] for k in ("sampled_tokens", "sampled_tokens_per_s")})
        return call

    start = time.perf_counter()
    times = interleave({k: step(k, d) for k, d in distillers.items()}, setting["rounds"], setting["warmup"])
    wall = time.perf_counter() - start
    rounds = range(setting["warmup"], setting["warmup"] + setting["rounds"])
    share_on = float(np.mean([is_on_policy_step(0, r, 0.5) for r in rounds]))
    mean = {k: float(np.mean(v)) for k, v in times.items()}
    full = sampled["lam1"]
    sample_s = [s["sampled_tokens"] / s["sampled_tokens_per_s"] for s in full]
    return {
        "setting": name, "student": student.name, "parameters": sum(p.numel() for p in model.parameters()),
        "batch": recipe.data.batch_size, "max_length": recipe.data.max_length, "max_new_tokens": MAX_NEW,
        "rounds": setting["rounds"], "warmup": setting["warmup"], "wall_s": round(wall, 1),
        "target_tokens_off": float(np.mean([b["target_mask"].sum() for b in batches])),
        "sampled_tokens_on": float(np.mean([s["sampled_tokens"] for s in full])),
        "mean_step_ms": {k: 1e3 * v for k, v in mean.items()},
        "median_step_ms": {k: 1e3 * float(np.median(v)) for k, v in times.items()},
        "share_on_policy_lam0.5": share_on,
        "ratio_lam0.5": mean["lam0.5"] / mean["off"],
        "ratio_lam1": paired(times, "lam1", "off"),
        "sampled_tokens_per_s": float(np.median([s["sampled_tokens_per_s"] for s in full])),
        "sampling_share_of_on_policy_step": float(np.median(sample_s) / np.median(times["lam1"])),
    }


def replace_section(text: str, lines: list[str]) -> str:
    """``text`` with its "## On-policy vs off-policy" section (up to the next ``## `` heading) replaced by
    ``lines``, or ``lines`` appended."""
    block = "\n".join(lines).rstrip("\n") + "\n"
    if f"\n{SECTION}\n" not in text:
        return text.rstrip("\n") + "\n\n" + block
    head, rest = text.split(f"\n{SECTION}\n", 1)
    tail = rest.split("\n## ", 1)
    return head.rstrip("\n") + "\n\n" + block + ("\n## " + tail[1] if len(tail) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=sorted(SETTINGS), action="append", default=None)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [measure(name, SETTINGS[name]) for name in (args.only or SETTINGS)]
    command = " ".join(["python", "scripts/bench_on_policy_speed.py", *(argv if argv is not None else sys.argv[1:])])
    info = {"machine": machine(), "threads": args.threads, "command": command, "settings": results}
    out = Path(args.out)
    atomic_write_text(out / "speed_on_policy.json", json.dumps(info, indent=2) + "\n")
    m = info["machine"]
    lines = [SECTION, "",
             f"Written by `{command}` (raw numbers in `speed_on_policy.json`). Machine: {m['cpu']}, "
             f"{m['logical_cores']} logical cores shared with other jobs, torch {m['torch']} on {args.threads} "
             "thread(s), no GPU. `Distiller.fit_step` with the generalized JSD (β = 0.5), one shared student and "
             "AdamW; conditions interleaved in a shuffled order each round. On-policy steps sample up to "
             f"{MAX_NEW} new tokens per row (temperature 1, top-p 1, KV cache) from each prompt (the bundled corpus: "
             "`<bos>` only).", "",
             "| setting | student | batch | off-policy step (ms) | λ = 0.5 step (ms) | λ = 0.5 / off | λ = 1 / off "
             "(IQR) | sampled tokens/s | sampling share of an on-policy step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        q = r["ratio_lam1"]
        lines.append(
            f"| {r['setting']} | {r['student']} ({r['parameters'] / 1e6:.1f}M) | {r['batch']} × ≤{r['max_length']} | "
            f"{r['mean_step_ms']['off']:.1f} | {r['mean_step_ms']['lam0.5']:.1f} | {r['ratio_lam0.5']:.2f} "
            f"({r['share_on_policy_lam0.5']:.0%} of steps on-policy) | {q['ratio']:.2f} ({q['ratio_q25']:.2f}–"
            f"{q['ratio_q75']:.2f}) | {r['sampled_tokens_per_s']:,.0f} | {r['sampling_share_of_on_policy_step']:.0%} |")
    lines += ["",
              "λ = 0.5 / off is the ratio of mean step times over the same rounds (which steps are on-policy is the "
              "seeded rule; the realised share is given); λ = 1 / off is the median of per-round paired ratios. "
              "Sampled tokens/s counts the tokens `generate` produced per second of sampling (the student's forward "
              "passes with a KV cache, one token per row at a time). "
              + " ".join(f"{r['setting']}: {r['target_tokens_off']:.0f} target tokens per off-policy batch, "
                         f"{r['sampled_tokens_on']:.0f} sampled (target) tokens per on-policy batch, {r['rounds']} "
                         f"rounds after {r['warmup']} warmup, {r['wall_s']:.0f} s." for r in results), ""]
    speed = out / "speed.md"
    text = speed.read_text() if speed.is_file() else "# Training speed\n"
    atomic_write_text(speed, replace_section(text, lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
