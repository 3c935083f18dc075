"""Extra peak memory and time of the distillation loss + backward: the naive unchunked path vs the chunked default.

Usage::

    python scripts/bench_memory.py [--vocab 262144] [--positions 1024] [--reps 2] [--no-step] [--out results/memory]

Writes ``<out>.md`` and ``<out>.json``. Every case runs in a fresh subprocess (so one case's freed memory or
allocator state cannot hide another's peak): it builds float32 student logits (a leaf that requires grad), teacher
logits and weights of 1 at ``--positions × --vocab`` from seed 0, resets the kernel's peak-RSS counter
(``echo 5 > /proc/self/clear_refs``), reads ``VmRSS`` as the baseline, runs loss + backward once and reads ``VmHWM``.
``peak_ratio = (VmHWM − baseline) / bytes of one logits tensor``; the student's ``.grad`` (one logits tensor, also
produced by autograd) is part of the extra. A run on two positions first does torch's lazy initialisation.
The first full run is the measured one because the allocator keeps freed small blocks (the chunks' temporaries) in
its heap: after a full warm-up they would sit in the baseline. Time is the median wall time of ``--reps`` runs after
the measured one, with torch's default thread count.

"before" is the naive path (``distillation_loss(..., chunk_size=0)``: the per-position function and reduce_loss,
autograd through full ``(N, V)`` tensors); "after" the chunked default. The optional step cases run one whole
training step (forward of a tiny Llama student and teacher with a 262,144 vocabulary, loss, backward, AdamW) with
purify's loss, with the fused linear loss (``loss.fused_linear``: neither model's logits built) and with a
hand-written ``F.kl_div`` loop, and report their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOSSES = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.5}}
SEED = 0


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _measure(run: Any, reps: int) -> dict[str, Any]:
    """Peak-RSS reset, one measured run (memory), then ``reps`` timed runs; extra peak bytes and times."""
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    extra = _status("VmHWM") - base
    times = [first] if reps == 0 else []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"extra_peak_bytes": extra, "baseline_rss_bytes": base, "first_run_s": first, "times_s": times,
            "time_s": statistics.median(times)}


def child_loss(loss: str, path: str, n: int, vocab: int, reps: int) -> dict[str, Any]:
    import torch

    from purify.losses import distillation_loss

    g = torch.Generator().manual_seed(SEED)
    s = torch.randn(n, vocab, generator=g).requires_grad_(True)
    t = torch.randn(n, vocab, generator=g)
    w = torch.ones(n)
    chunk = 0 if path == "before" else None

    def run(rows: int = n) -> None:
        s.grad = None
        x = s[:rows] if rows < n else s
        distillation_loss(x, t[:rows], w[:rows], name=loss, chunk_size=chunk, **LOSSES[loss]).backward()

    run(2)  # torch's lazy initialisation (thread pool, kernels) happens before the baseline
    s.grad = None  # the warm-up's (N, V) gradient must not sit in the baseline: the measured run makes its own
    out = _measure(run, reps)
    out["logits_bytes"] = s.numel() * s.element_size()
    return out


def child_time(loss: str, n: int, vocab: int, reps: int) -> dict[str, Any]:
    """Both paths timed in one process, alternating (after, before, before, after, ...), so that load from other
    jobs on a shared machine hits both alike; medians and their ratio."""
    import torch

    from purify.losses import distillation_loss

    g = torch.Generator().manual_seed(SEED)
    s = torch.randn(n, vocab, generator=g).requires_grad_(True)
    t = torch.randn(n, vocab, generator=g)
    w = torch.ones(n)

    def run(chunk: int | None, rows: int = n) -> float:
        s.grad = None
        t0 = time.perf_counter()
        distillation_loss(s[:rows], t[:rows], w[:rows], name=loss, chunk_size=chunk, **LOSSES[loss]).backward()
        return time.perf_counter() - t0

    run(None, 2), run(0, 2)
    times: dict[str, list[float]] = {"after": [], "before": []}
    for rep in range(reps):
        order = ("after", "before") if rep % 2 == 0 else ("before", "after")
        for path in order:
            times[path].append(run(None if path == "after" else 0))
    med = {p: statistics.median(v) for p, v in times.items()}
    return {"times_s": times, "time_s": med, "speedup": med["before"] / med["after"]}


STEP_PATHS = ("purify", "naive", "fused")
"""The whole-step loops: purify's chunked loss on both models' logits, a hand-written ``F.kl_div`` loop, and the
fused linear loss (:mod:`purify.losses_fused`) on both models' last hidden states and output layers (no logits)."""


def child_step(path: str, n: int, vocab: int, reps: int) -> dict[str, Any]:
    """One whole training step with ``path``'s loss (one of :data:`STEP_PATHS`); ``path == "time"`` times them all in
    this process, in rotating order, with the same models and optimizer."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from purify.losses import distillation_loss
    from purify.losses_fused import fused_linear_distillation_loss
    from purify.models import decoder_hidden, output_layer

    seq = 256
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=seq)
    torch.manual_seed(SEED)
    student, teacher = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (n // seq, seq), generator=torch.Generator().manual_seed(SEED))
    mask = torch.ones(ids.shape)

    def run(tokens: int = seq, which: str = path) -> None:
        opt.zero_grad(set_to_none=True)
        x = ids[:1, :tokens] if tokens < seq else ids
        if which == "fused":
            batch = {"input_ids": x, "attention_mask": torch.ones_like(x)}
            with torch.no_grad():
                t_hidden = decoder_hidden(teacher, batch)
            h = decoder_hidden(student, batch)
            (weight, bias), (t_weight, t_bias) = output_layer(student), output_layer(teacher)
            loss = fused_linear_distillation_loss(h, weight, bias, row_weight=mask[:x.shape[0], :x.shape[1] - 1],
                                                  teacher_hidden=t_hidden, teacher_weight=t_weight,
                                                  teacher_bias=t_bias, name="forward_kl")
            loss.backward()
            opt.step()
            return
        s_logits = student(input_ids=x).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits
        if which == "naive":
            loss = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                            reduction="none").sum(-1).mean()
        else:
            loss = distillation_loss(s_logits, t_logits, mask[:x.shape[0], :x.shape[1]], name="forward_kl")
        loss.backward()
        opt.step()

    if path == "time":
        for which in STEP_PATHS:
            run(2, which)
        times: dict[str, list[float]] = {p: [] for p in STEP_PATHS}
        for rep in range(reps):
            for which in STEP_PATHS[rep % 3:] + STEP_PATHS[:rep % 3]:
                t0 = time.perf_counter()
                run(seq, which)
                times[which].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        return {"times_s": times, "time_s": med, "time_ratio_purify_over_naive": med["purify"] / med["naive"],
                "time_ratio_fused_over_naive": med["fused"] / med["naive"]}
    run(2)  # lazy initialisation (and AdamW's state) before the baseline
    out = _measure(run, reps)
    out["logits_bytes"] = ids.numel() * vocab * 4
    return out


def _spawn(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"purify: error: case {args} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine(threads: int) -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "purify", "scripts/bench_memory.py"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads or torch.get_num_threads(), "gpu": None,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "git_sha": sha, "git_dirty_purify": bool(dirty)}


def _report(res: dict[str, Any], args: argparse.Namespace) -> str:
    gib = args.positions * args.vocab * 4 / 2**30
    lines = [
        "# Distillation loss memory: naive vs chunked (vs fused)",
        "",
        f"`{res['command']}` ({res['runtime_s']:.0f} s). Machine: {res['machine']['cpu']}, "
        f"{res['machine']['cores']} cores, no GPU, torch {res['machine']['torch']} "
        f"({res['machine']['torch_threads']} threads), git {res['machine']['git_sha'][:10]}. Seed {SEED}.",
        "",
        f"float32 logits of {args.positions} positions × V = {args.vocab:,} (one logits tensor = {gib:.2f} GiB), "
        "weights 1, temperature 1. `peak_ratio` = extra peak RSS of loss + backward / bytes of one logits tensor "
        "(the student's gradient, one logits tensor, included), measured on the first run. Time: median of "
        f"{args.time_reps} runs per path in one process, the paths in rotating order (so load from other jobs hits "
        "them alike).",
    ]
    if res["cases"]:
        lines += ["", "| loss | before: peak_ratio | after: peak_ratio | before: time (s) | after: time (s) "
                  "| speed-up |", "|---|---|---|---|---|---|"]
    for loss in LOSSES if res["cases"] else ():
        b, a, tm = res["cases"][f"{loss}:before"], res["cases"][f"{loss}:after"], res["timing"][loss]
        lines.append(f"| {loss}{' (beta 0.5)' if loss == 'jsd' else ''} | {b['peak_ratio']:.2f} | "
                     f"{a['peak_ratio']:.2f} | {tm['time_s']['before']:.2f} | {tm['time_s']['after']:.2f} | "
                     f"{tm['speedup']:.2f}x |")
    if "step" in res:
        st = res["step"]
        lines += [
            "",
            f"Whole training step (tiny Llama student and teacher: hidden 64, 1 layer, V = {args.vocab:,}; batch "
            f"{args.positions // 256} × 256 tokens; forward, loss, backward, AdamW), forward KL:",
            "",
            "| loop | extra peak / logits tensor | time (s) |",
            "|---|---|---|",
            f"| hand-written `F.kl_div` on full log-softmaxes | {st['naive']['peak_ratio']:.2f} | "
            f"{st['naive']['time_s']:.2f} |",
            f"| `purify.distillation_loss` (chunked) | {st['purify']['peak_ratio']:.2f} | "
            f"{st['purify']['time_s']:.2f} |",
            *([f"| `purify.fused_linear_distillation_loss` (`loss.fused_linear`: no logits built) | "
               f"{st['fused']['peak_ratio']:.2f} | {st['fused']['time_s']:.2f} |"] if "fused" in st else []),
            "",
            f"purify / naive: peak {st['peak_ratio_purify_over_naive']:.2f}, time "
            f"{st['time_ratio_purify_over_naive']:.2f}"
            + (f"; fused / naive: peak {st['peak_ratio_fused_over_naive']:.2f}, time "
               f"{st['time_ratio_fused_over_naive']:.2f}" if "fused" in st else "")
            + ". The chunked and naive steps' extra peak includes both models' logits (student with its graph, "
            "teacher) besides the loss; the fused step builds neither (the gradient of the output layer, one "
            "parameter's size, is there in every loop).",
        ]
    lines += [
        "",
        "How peak memory is measured: each case is a fresh subprocess. Once its inputs exist (for the step: models "
        "and AdamW state too) and a run on two positions has done torch's lazy initialisation, it resets the "
        "kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`), reads "
        "`VmRSS` as the baseline, runs loss + backward (the step) once and reads `VmHWM` from `/proc/self/status`. "
        "The first run is the measured one: glibc keeps freed small blocks (such as the chunks' 8 MiB "
        "temporaries) in its heap, which a warm-up would move into the baseline; tensors of a logits' size are "
        "mmap'ed and returned to the OS when freed. So the RSS peak is the peak of live tensors plus heap growth. "
        "The machine is shared with other jobs, so "
        "times carry noise of the order of tens of percent; peaks do not depend on load.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=0, help="timed runs after the measured one in the memory cases")
    ap.add_argument("--time-reps", type=int, default=4, help="interleaved timing runs per path")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    ap.add_argument("--no-step", action="store_true", help="skip the whole-training-step cases")
    ap.add_argument("--no-losses", action="store_true", help="skip the loss cases (the whole step only)")
    ap.add_argument("--out", default=str(ROOT / "results" / "memory"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, path = args.child
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if kind == "step":
            out = child_step(path, args.positions, args.vocab, args.reps)
        elif path == "time":
            out = child_time(kind, args.positions, args.vocab, args.time_reps)
        else:
            out = child_loss(kind, path, args.positions, args.vocab, args.reps)
        print(json.dumps(out))
        return 0
    start = time.perf_counter()
    res: dict[str, Any] = {"command": "python " + " ".join(["scripts/bench_memory.py", *sys.argv[1:]]),
                           "vocab": args.vocab, "positions": args.positions, "dtype": "float32", "seed": SEED,
                           "reps": args.reps, "machine": _machine(args.threads), "cases": {}}
    common = ["--vocab", str(args.vocab), "--positions", str(args.positions), "--threads", str(args.threads),
              "--reps", str(args.reps), "--time-reps", str(args.time_reps)]
    for loss in () if args.no_losses else LOSSES:
        for path in ("after", "before"):
            case = _spawn([loss, path, *common])
            case["peak_ratio"] = case["extra_peak_bytes"] / case["logits_bytes"]
            res["cases"][f"{loss}:{path}"] = case
            res["logits_bytes"] = case["logits_bytes"]
            print(f"{loss:>10} {path:>6}: peak_ratio {case['peak_ratio']:.2f}, {case['time_s']:.2f} s", flush=True)
        res["timing"] = res.get("timing", {})
        res["timing"][loss] = _spawn([loss, "time", *common])
        print(f"{loss:>10} interleaved: {res['timing'][loss]['time_s']}, speed-up "
              f"{res['timing'][loss]['speedup']:.2f}x", flush=True)
    if not args.no_step:
        st = {p: _spawn(["step", p, *common]) for p in STEP_PATHS}
        for p, case in st.items():
            case["peak_ratio"] = case["extra_peak_bytes"] / case["logits_bytes"]
            print(f"      step {p:>6}: peak_ratio {case['peak_ratio']:.2f}, {case['time_s']:.2f} s", flush=True)
        for p in ("purify", "fused"):
            st[f"peak_ratio_{p}_over_naive"] = st[p]["extra_peak_bytes"] / st["naive"]["extra_peak_bytes"]
        timed = _spawn(["step", "time", *common[:-4], "--reps", str(args.time_reps)])
        st["interleaved"] = timed
        for p in STEP_PATHS:
            st[p]["time_s"] = timed["time_s"][p]
        st["time_ratio_purify_over_naive"] = timed["time_ratio_purify_over_naive"]
        st["time_ratio_fused_over_naive"] = timed["time_ratio_fused_over_naive"]
        res["step"] = st
    res["runtime_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(_report(res, args))
    print(f"wrote {out}.md and {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
