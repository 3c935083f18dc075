"""Framework and purifier overheads at real scale: SmolLM2-135M-Instruct as the student, in one process.

Usage::

    python scripts/bench_smollm2_speed.py [--rounds 8] [--warmup 2] [--threads 2] [--batch 4] [--length 64]

Ratios (the median over rounds of per-round paired ratios, conditions interleaved in a shuffled order each round, as in
bench_overhead.py): ``Distiller.fit_step`` against a hand-written KD step (forward KL, AdamW) on the same model and
batch — the framework's overhead, goal ≤ 1.05× — and each purifier's step against vanilla with the same two teachers
(goals: adversary ≤ 1.10×, divergence mask and tail truncation ≤ 1.05×). The teachers are two perturbed copies of the
student (same architecture and vocabulary, 49,152 tokens), so the numbers measure purify and its purifiers at this
model and vocabulary size, not a teacher's cost. All conditions share one student and one AdamW optimizer (its state
is per parameter, so the step's work is the same and memory stays one optimizer's). Batches: the bundled corpus in the
student's tokenizer. Appends a section to ``results/speed.md`` and writes ``results/speed_smollm2.json``. CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_overhead import CONDITIONS, interleave, machine, paired

from purify.assembly import load_recipe
from purify.config import structured
from purify.data import DistillDataModule
from purify.models import build_model, model_forward
from purify.module import Distiller
from purify.purifiers import PURIFIERS, build_purifier
from purify.storage import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"framework": 1.05, "adversary": 1.10, "divergence_mask": 1.05, "tail_truncation": 1.05}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = ["student.config=null", "student.packaged=smollm2-135m", "teachers=[{packaged: smollm2-135m}]",
                 f"data.batch_size={args.batch}", f"data.max_length={args.length}"]
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
    student = build_model(recipe.student, 0)
    teachers = []
    for seed in (1, 2):
        t = build_model(recipe.student, 0).module
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in t.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
        teachers.append(t.eval().requires_grad_(False))
    data = DistillDataModule(recipe.data, student.tokenizer, 0)
    data.setup()
    stream = iter(data.train_dataloader())
    batches = [next(stream) for _ in range(4)]
    model = student.module.train()

    distillers: dict[str, Distiller] = {}
    for name, entries in {"vanilla_k1": None, **CONDITIONS}.items():
        purifiers = [build_purifier(structured(PURIFIERS[e["name"]][0], e)) for e in entries or []]
        distillers[name] = Distiller(model, teachers[:1] if entries is None else teachers, loss=recipe.loss,
                                     purifiers=purifiers, optim=recipe.optim, total_steps=1000)
        distillers[name].setup_purifiers()
    params = [p for p in model.parameters() if p.requires_grad]
    params += [p for d in distillers.values() for pur in d.purifiers for p in pur.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def hand(i: int) -> None:
        batch = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        with torch.no_grad():
            t = teachers[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        mask = batch["target_mask"]
        kl = F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                      reduction="none").sum(-1)
        ((kl * mask).sum() / mask.sum()).backward()
        optimizer.step()

    def step(d: Distiller) -> Any:
        return lambda i: d.fit_step(batches[i % len(batches)], optimizer, progress=0.5)

    steps = {"hand_k1": hand, **{name: step(d) for name, d in distillers.items()}}
    assert model_forward(model, batches[0]).logits.shape[-1] == 49152
    load_before = os.getloadavg()
    times = interleave(steps, args.rounds, args.warmup)
    load_after = os.getloadavg()
    stats = {"framework": paired(times, "vanilla_k1", "hand_k1"),
             **{name: paired(times, name, "vanilla") for name in CONDITIONS if name != "vanilla"}}
    tokens = float(sum(b["target_mask"].sum() for b in batches) / len(batches))
    info = {"machine": machine(), "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
            "batch": args.batch, "max_length": args.length, "target_tokens_per_batch": tokens,
            "median_step_s": {k: float(sorted(v)[len(v) // 2]) for k, v in times.items()}, "ratios": stats,
            "load_average_1min": {"before": load_before[0], "after": load_after[0]},
            "command": " ".join(["python", "scripts/bench_smollm2_speed.py",
                                 *(argv if argv is not None else sys.argv[1:])])}
    out = Path(args.out)
    atomic_write_text(out / "speed_smollm2.json", json.dumps(info, indent=2) + "\n")
    lines = ["", "## SmolLM2-135M scale", "",
             f"Written by `{info['command']}` (raw numbers in `speed_smollm2.json`). Machine: "
             f"{info['machine']['cpu']}, {info['machine']['logical_cores']} cores, no GPU, torch "
             f"{info['machine']['torch']}, {args.threads} torch threads, shared with other jobs (1-minute load "
             f"average {load_before[0]:.1f} before the timed steps, {load_after[0]:.1f} after; ratios are paired "
             "per round). Student "
             f"SmolLM2-135M-Instruct (134.5M parameters, vocabulary 49,152), batches of {args.batch} × ≤{args.length} "
             f"tokens ({tokens:.0f} target tokens), AdamW; teachers: two perturbed copies of the student.", "",
             "| comparison | median ratio | IQR | goal | met |", "|---|---|---|---|---|"]
    labels = {"framework": "Distiller.fit_step vs hand-written KD step (1 teacher)"}
    for name, s in stats.items():
        goal = GOALS.get(name)
        met = "—" if goal is None else ("yes" if s["ratio"] <= goal else "no")
        lines.append(f"| {labels.get(name, f'{name} vs vanilla (2 teachers)')} | {s['ratio']:.3f} | "
                     f"{s['ratio_q25']:.3f}–{s['ratio_q75']:.3f} | {'—' if goal is None else f'≤ {goal:.2f}'} | "
                     f"{met} |")
    lines.append("")
    lines.append("Median step (s): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(info["median_step_s"].items())))
    speed = out / "speed.md"
    text = speed.read_text() if speed.is_file() else "# Training speed\n"
    head, found, rest = text.partition("\n## SmolLM2-135M scale\n")
    tail = rest[rest.find("\n## "):] if found and "\n## " in rest else ""  # later sections are kept
    text = head.rstrip("\n") + "\n" + "\n".join(lines) + "\n" + tail
    atomic_write_text(speed, text)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
