"""Training speed: online vs cached teachers, K=1 vs K=4 ensembles, purifiers, and purify's framework overhead.

Usage::

    python scripts/bench_speed.py [--rounds 40] [--warmup 4] [--threads 1] [--out results]
    python scripts/bench_speed.py --only processes [--process-repeats 3] [--process-steps 100]

Writes ``results/speed.md`` and ``results/speed.json``; ``--only processes`` runs just the "1 vs 2 processes" section
below and merges it into the existing files. In-process conditions: one process; every condition is a training step on
the same
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

1 vs 2 processes: ``purify train``'s own path (``build_run`` → ``make_trainer`` → ``Trainer.fit``) on the quickstart
recipe with ``data.global_batch_size`` fixed, so both runs see the same examples at every step: 1 process of 1 torch
thread against 2 DDP processes of 1 thread each on the CPU gloo path, each run a fresh subprocess (Lightning re-executes
this script for rank 1), runs alternated over repeats. Step time is the median interval between consecutive optimizer
steps after warmup (data loading, forward, backward, all-reduce, optimizer step); tokens/s is target tokens over the
measured steps divided by their total time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
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


PROCESS_RUNS = ((1, 1), (2, 1))
"""(processes, torch threads per process) of the 1 vs 2 processes section. 1 process × 2 threads is left out: on 2
cores shared with another job its OpenMP threads contend with that job (a dry run took about 3 s per step, 150× the
1-thread step), which measures the neighbour rather than purify."""
PROCESS_BATCHES = (16, 64)
"""Global batches (sequences per optimizer step) of that section: the quickstart's 16, and 4× that."""
PROCESSES_HEADING = "## 1 vs 2 processes"


def process_worker(args: argparse.Namespace) -> None:
    """One ``purify train``-path run of the quickstart recipe (every rank runs this); rank 0 writes the step times."""
    import lightning as L

    from purify.assembly import build_run, load_recipe
    from purify.train import make_trainer

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.tokens: list[int] = []

        def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
            self.ends.append(time.perf_counter())
            self.tokens.append(int(batch["num_items"]))

    torch.set_num_threads(args.threads)
    overrides = [f"trainer.devices={args.devices}", f"strategy={'ddp' if args.devices > 1 else 'auto'}",
                 "trainer.accelerator=cpu", f"data.global_batch_size={args.global_batch}",
                 f"trainer.max_steps={args.process_warmup + args.process_steps}", "trainer.limit_val_batches=0",
                 "trainer.enable_progress_bar=false", "export=false"]
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
    run = build_run(recipe)
    clock = StepClock()
    trainer = make_trainer(recipe, [clock], None)
    trainer.fit(run.distiller, datamodule=run.datamodule)
    if trainer.is_global_zero:
        ends = np.asarray(clock.ends[args.process_warmup - 1:])  # the interval before step w+1 onward
        intervals = np.diff(ends)
        tokens = clock.tokens[args.process_warmup:]
        Path(args.worker_out).write_text(json.dumps({
            "median_ms": 1e3 * float(np.median(intervals)), "tokens_per_s": sum(tokens) / float(ends[-1] - ends[0]),
            "tokens_per_step": float(np.mean(tokens)), "micro_batch": recipe.data.batch_size,
            "world_size": trainer.world_size}))


def measure_processes(args: argparse.Namespace) -> dict[str, Any]:
    """Every (global batch, processes, threads) run ``args.process_repeats`` times, alternated; medians over repeats."""
    runs: dict[str, list[dict[str, Any]]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.process_repeats):
            for batch in PROCESS_BATCHES:
                order = PROCESS_RUNS if repeat % 2 == 0 else PROCESS_RUNS[::-1]
                for processes, threads in order:
                    out = Path(tmp) / f"{batch}-{processes}-{threads}-{repeat}.json"
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--devices", str(processes),
                           "--threads", str(threads), "--global-batch", str(batch), "--worker-out", str(out),
                           "--process-steps", str(args.process_steps), "--process-warmup", str(args.process_warmup)]
                    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                           "PYTHONWARNINGS": "ignore"}
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
                    if proc.returncode:
                        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                    name = f"global{batch}_p{processes}_t{threads}"
                    runs.setdefault(name, []).append(json.loads(out.read_text()))
                    print(f"{name} repeat {repeat}: {runs[name][-1]}", flush=True)
    table = {}
    for name, rows in runs.items():
        table[name] = {"median_ms": float(np.median([r["median_ms"] for r in rows])),
                       "tokens_per_s": float(np.median([r["tokens_per_s"] for r in rows])),
                       "tokens_per_s_runs": [r["tokens_per_s"] for r in rows],
                       **{k: rows[0][k] for k in ("tokens_per_step", "micro_batch", "world_size")}}
    for batch in PROCESS_BATCHES:
        one, two = table[f"global{batch}_p1_t1"], table[f"global{batch}_p2_t1"]
        table[f"global{batch}_speedup_2p_vs_1p"] = {"ratio": two["tokens_per_s"] / one["tokens_per_s"],
                                                    "meaning": "2 processes / 1 process (1 thread each) tokens/s"}
    return {"command": " ".join(["python scripts/bench_speed.py", *sys.argv[1:]]), "repeats": args.process_repeats,
            "steps": args.process_steps, "warmup": args.process_warmup, "runs": table,
            "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]}}


def processes_section(info: dict[str, Any], result: dict[str, Any]) -> str:
    """The "1 vs 2 processes" section of speed.md."""
    runs = result["runs"]
    lines = [PROCESSES_HEADING, "",
             f"Written by `{result['command']}`. Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch "
             f"{info['torch']}, no GPU; **the 2 cores were shared with another job while this ran**, so absolute "
             "numbers are noisy and 2 processes can only gain what the other job leaves idle (1-minute load average "
             f"{result['load_average_1min']['before']:.1f} before the runs, {result['load_average_1min']['after']:.1f} "
             "after). `purify train`'s path "
             "(build_run → make_trainer → Trainer.fit) on the quickstart recipe (tiny-llama-a teacher, hidden-64 "
             "student) with `data.global_batch_size` fixed: every run sees the same examples at every step. DDP runs "
             f"on the CPU gloo backend. Each run is a fresh process group: {result['warmup']} warmup steps, then "
             f"{result['steps']} timed; {result['repeats']} repeats, alternated; medians over repeats (tokens/s of "
             "each repeat in the last column). 1 process × 2 threads is not in the table: on these shared cores its "
             "OpenMP threads contend with the other job (about 3 s per step in a dry run), which measures the "
             "neighbour, not purify.", "",
             "| global batch | processes × threads | micro-batch per process | median step (ms) | target tokens/s | "
             "runs (tokens/s) |", "|---|---|---|---|---|---|"]
    for batch in PROCESS_BATCHES:
        for processes, threads in PROCESS_RUNS:
            r = runs[f"global{batch}_p{processes}_t{threads}"]
            each = ", ".join(f"{v:,.0f}" for v in r["tokens_per_s_runs"])
            lines.append(f"| {batch} | {processes} × {threads} | {r['micro_batch']} | {r['median_ms']:.1f} | "
                         f"{r['tokens_per_s']:,.0f} | {each} |")
    speedups = ", ".join(f"{runs[f'global{b}_speedup_2p_vs_1p']['ratio']:.2f}× at global batch {b}"
                         for b in PROCESS_BATCHES)
    lines += ["", f"2 processes vs 1 (1 thread each), tokens/s: {speedups} (ideal 2×). Where the second process "
              "loses is not separated here (the other job's share of the cores, gloo's all-reduce of the student's "
              "gradients, DDP's per-step synchronisation)."]
    return "\n".join(lines) + "\n"


def merge_processes(out: Path, info: dict[str, Any], result: dict[str, Any]) -> None:
    """Put the section into ``speed.json`` (key ``processes``) and ``speed.md`` (replacing an earlier one)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "speed.json", out / "speed.md"
    data = json.loads(json_path.read_text()) if json_path.is_file() else {"machine": info}
    data["processes"] = result
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md = md_path.read_text().split(PROCESSES_HEADING)[0].rstrip() + "\n\n" if md_path.is_file() else ""
    md_path.write_text(md + processes_section(info, result))


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
    parser.add_argument("--only", choices=["processes"], help="run only this section and merge it into --out")
    parser.add_argument("--skip-processes", action="store_true", help="leave out the 1 vs 2 processes section")
    parser.add_argument("--process-repeats", type=int, default=3)
    parser.add_argument("--process-steps", type=int, default=100)
    parser.add_argument("--process-warmup", type=int, default=10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one run of the section
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--global-batch", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        process_worker(args)
        return 0
    if args.only == "processes":
        info = machine()
        merge_processes(args.out, info, measure_processes(args))
        return 0
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
    if not args.skip_processes:
        merge_processes(args.out, info, measure_processes(args))
    print(json.dumps(comps, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
