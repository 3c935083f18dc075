"""Training speed: online vs cached teachers, K=1 vs K=4 ensembles, purifiers, and purify's framework overhead.

Usage::

    python scripts/bench_speed.py [--rounds 40] [--warmup 4] [--threads 1] [--out results]

Writes ``results/speed.md`` and ``results/speed.json``. One process; every condition is a training step on the same
quickstart batches (random-init Llama student, hidden 64, 2 layers), timed interleaved in a shuffled order each round
(see bench_overhead.py), and each comparison is the median over rounds of the per-round ratio. Conditions:

- ``online_k1`` / ``cached_k1``: vanilla KD from tiny-llama-a (the student's size), online or from a top-8 cache;
- ``online_wide`` / ``cached_wide``: a teacher 4× wider and 2× deeper (hidden 256, 4 layers, random init);
- ``online_k4`` / ``cached_k4``: a mean ensemble of four student-sized teachers, online or from one 4-teacher cache;
- ``vanilla_k2`` and each purifier of bench_overhead.py on two online teachers;
- ``teacher_online`` / ``teacher_cached``: tiny-llama-a's forward alone, online or read from the cache;
- ``hand_k1``: a minimal hand-written PyTorch KD step (forward KL, AdamW) on a copy of the same student and teacher,
  against purify's ``Distiller.fit_step`` (``online_k1``): the framework's overhead.

The caches are written first (``purify.cache_writer.write_cache``); their size and write time are reported. CPU only.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bench_overhead import (
    CONDITIONS,
    ROOT,
    interleave,
    machine,
    make_distiller,
    paired,
    quickstart,
    quickstart_recipe,
    stepper,
)

from purify.cache import iter_teacher_specs
from purify.cache_writer import write_cache
from purify.models import build_model, model_forward

SIZED = "{config: {model_type: llama, hidden_size: %d, intermediate_size: %d, num_hidden_layers: %d, " \
        "num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 128}, tokenizer: tiny-llama-a, " \
        "seed: %d, name: %s}"
FOUR = ("{builtin: tiny-llama-a, name: tiny-llama-a}", "{builtin: tiny-llama-b, name: tiny-llama-b}",
        SIZED % (64, 128, 2, 1, "random-1"), SIZED % (64, 128, 2, 2, "random-2"))
WIDE = (SIZED % (256, 512, 4, 3, "wide"),)
COMPARISONS = {  # name: (numerator, denominator, what the ratio means)
    "cache speedup, student-sized teacher": ("online_k1", "cached_k1", "online / cached step time"),
    "cache speedup, 4x wider 2x deeper teacher": ("online_wide", "cached_wide", "online / cached step time"),
    "cache speedup, K=4 ensemble": ("online_k4", "cached_k4", "online / cached step time"),
    "teacher forward alone, online vs cache": ("teacher_online", "teacher_cached", "online / cached forward time"),
    "K=4 vs K=1 from cache": ("cached_k4", "cached_k1", "K=4 / K=1 step time"),
    "framework overhead (Distiller.fit_step vs hand loop)": ("online_k1", "hand_k1", "purify / hand step time"),
    **{f"{name} vs vanilla (2 teachers)": (name, "vanilla_k2", "purifier / vanilla step time")
       for name in CONDITIONS if name != "vanilla"},
}


def hand_stepper(student: torch.nn.Module, teacher: torch.nn.Module, lr: float, batches: list[dict]) -> Any:
    """The minimal PyTorch KD step purify is compared with: forward KL on the target positions, AdamW."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)

    def step(i: int) -> torch.Tensor:
        batch = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        with torch.no_grad():
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        loss = (kl * batch["target_mask"]).sum() / batch["num_items"]
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def teacher_stepper(teacher: torch.nn.Module, batches: list[dict]) -> Any:
    """A teacher's forward alone (no student, no loss), as the distiller runs it."""
    def step(i: int) -> torch.Tensor:
        with torch.no_grad():
            return model_forward(teacher, batches[i % len(batches)]).logits

    return step


def write_caches(directory: Path) -> dict[str, Any]:
    """Top-8 caches of the four student-sized teachers and of the wide teacher; their manifests and write times."""
    out = {}
    for name, teachers in (("four", FOUR), ("wide", WIDE)):
        start = time.perf_counter()
        manifest = write_cache(quickstart_recipe(teachers), directory / name, top_k=8)
        out[name] = {"seconds": time.perf_counter() - start, "manifest": manifest}
    return out


def conditions(directory: Path) -> tuple[dict[str, Any], int]:
    """Every condition's step function, and the target tokens of the first batch."""
    recipe, student, teachers, batches = quickstart()
    steps = {name: stepper(*make_distiller(recipe, student.module, [t.module for t in teachers], entries), batches)
             for name, entries in CONDITIONS.items()}
    steps["vanilla_k2"] = steps.pop("vanilla")
    four = [build_model(spec, recipe.seed).module for spec in quickstart_recipe(FOUR).teachers]
    wide = build_model(quickstart_recipe(WIDE).teachers[0], recipe.seed).module
    cached = [build_model(spec, recipe.seed).module for spec in iter_teacher_specs(directory / "four")]
    cached_wide = build_model(next(iter_teacher_specs(directory / "wide")), recipe.seed).module
    ensemble = CONDITIONS["ensemble"]
    for name, models, entries in (("online_k1", four[:1], []), ("cached_k1", cached[:1], []),
                                  ("online_wide", [wide], []), ("cached_wide", [cached_wide], []),
                                  ("online_k4", four, ensemble), ("cached_k4", cached, ensemble)):
        steps[name] = stepper(*make_distiller(recipe, student.module, models, entries), batches)
    steps["hand_k1"] = hand_stepper(copy.deepcopy(student.module), four[0], recipe.optim.lr, batches)
    for name, teacher in (("teacher_online", four[0]), ("teacher_cached", cached[0])):
        steps[name] = teacher_stepper(teacher, batches)
    return steps, int(sum(b["target_mask"].sum() for b in batches) / len(batches))


def report(info: dict[str, Any], result: dict[str, Any], args: argparse.Namespace) -> str:
    caches = result["caches"]
    four = caches["four"]["manifest"]
    lines = ["# Training speed", "",
             f"Written by `python scripts/bench_speed.py --rounds {args.rounds} --warmup {args.warmup} --threads "
             f"{args.threads}` (raw numbers in `speed.json`). Machine: {info['cpu']}, {info['logical_cores']} "
             f"logical cores, torch {info['torch']} on {info['torch_threads']} thread(s). **CPU only: GPU MFU was "
             "not measured** (no GPU in this session). The machine was shared with other heavy jobs while this ran: "
             "conditions are interleaved in a shuffled order every round and each ratio is the median of per-round "
             "(paired) ratios, with its interquartile range; absolute times are noisy.", "",
             "Student: quickstart (random-init Llama, hidden 64, 2 layers, vocabulary 255); batches of 16 sequences "
             f"of up to 64 tokens, {result['target_tokens']} target tokens per batch on average. "
             "Tokens/s counts target tokens per training step.", "",
             "| condition | median step (ms) | target tokens/s |", "|---|---|---|"]
    lines += [f"| {name} | {c['median_ms']:.1f} | {c['tokens_per_s']:,.0f} |"
              for name, c in result["conditions"].items()]
    lines += ["", "| comparison | ratio | IQR | meaning |", "|---|---|---|---|"]
    lines += [f"| {name} | {c['ratio']:.3f} | {c['ratio_q25']:.3f}–{c['ratio_q75']:.3f} | {c['meaning']} |"
              for name, c in result["comparisons"].items()]
    c = result["conditions"]
    bound = c["online_k1"]["median_ms"] / (c["online_k1"]["median_ms"] - c["teacher_online"]["median_ms"]
                                          + c["teacher_cached"]["median_ms"])
    speedups = {n: comp["ratio"] for n, comp in result["comparisons"].items() if n.startswith("cache speedup")}
    met = [n.removeprefix("cache speedup, ") for n, r in speedups.items() if r >= 2.0]
    lines += ["", "Reading a teacher from the cache costs "
              f"{c['teacher_cached']['median_ms']:.2f} ms per batch against {c['teacher_online']['median_ms']:.1f} ms "
              "for its forward, so training from a cache takes the teacher out of the step, and the saving is the "
              f"teacher's share of the step. With a teacher of the student's size the bound is about {bound:.2f}× here "
              "(online step / (online step − teacher forward + cache read)): a 2× speedup needs teachers that cost at "
              "least as much as the student's forward, backward and optimizer step together. Goal ≥ 2× met: "
              f"{', '.join(met) if met else 'in no condition'}."]
    lines += ["", "## Cache size", "",
              f"Top-{four['k']} caches of the bundled corpus ({four['data']['train']['positions']} train + "
              f"{four['data']['val']['positions']} validation target tokens), ids {four['id_dtype']}, log-probs and "
              f"tail mass float16: {four['bytes_per_token_per_teacher']:.1f} bytes per token and teacher on disk "
              f"(arrays, .npy headers and indexes; the arrays alone are {4 * four['k'] + 2} bytes), against "
              f"{4 * four['teachers'][0]['vocab_size']} bytes for float32 logits of this 255-token vocabulary. "
              f"Writing took {caches['four']['seconds']:.1f} s for 4 student-sized teachers and "
              f"{caches['wide']['seconds']:.1f} s for the wide one."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        caches = write_caches(Path(tmp))
        steps, tokens = conditions(Path(tmp))
        times = interleave(steps, args.rounds, args.warmup)
    conds = {name: {"median_ms": 1e3 * float(np.median(t)), "tokens_per_s": tokens / float(np.median(t))}
             for name, t in sorted(times.items())}
    comps = {name: {**paired(times, a, b), "meaning": meaning} for name, (a, b, meaning) in COMPARISONS.items()}
    info = machine()
    result = {"machine": info, "gpu_mfu": "not measured (CPU-only session)", "rounds": args.rounds,
              "target_tokens": tokens, "conditions": conds, "comparisons": comps,
              "caches": {name: {"seconds": c["seconds"], **{k: c["manifest"][k] for k in
                                                             ("k", "id_dtype", "bytes", "bytes_per_token_per_teacher")}}
                         for name, c in caches.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "speed.md").write_text(report(info, {**result, "caches": caches}, args))
    print(json.dumps(comps, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
