"""The prepared GPU check (issue #17, item 7): a bf16 student step's model FLOPs utilisation (MFU) at SmolLM2-135M
scale and, where the SmolLM2 model is on the machine, the full covert-suite configuration on one seed.

Usage::

    python scripts/gpu_check.py --out DIR [--covert-budget 420]     # on a GPU machine, ≈ 9 min in all
    python scripts/gpu_check.py --device cpu --tiny --out DIR --covert-budget 0   # what the tests run

**MFU.** A student of SmolLM2-135M's architecture (:data:`SMOLLM2_135M`: 30 blocks, width 576, 9 heads, vocabulary
49,152, tied head; random weights — MFU does not depend on their values, and no model file is needed) and a teacher of
the same shape, one :meth:`purify.module.Distiller.fit_step` per step (forward KL on the whole vocabulary, AdamW,
student weights fp32 under bf16 autocast, teacher in bf16) on ``--batch`` × ``--length`` random tokens. Model FLOPs
per step (:func:`step_flops`, PaLM's convention, causal attention not halved): the student's training
``6·N + 12·l·d·T`` and the teacher's forward ``2·N + 4·l·d·T`` per token, with ``N`` the weights of every linear layer
(the head included), ``l`` blocks, ``d`` the attention width and ``T`` the sequence length. MFU = those FLOPs per
second of the median step over the device's dense bf16 peak (:data:`PEAK_BF16`; ``null`` on a device not in it, the
achieved TFLOP/s are still written).

**Covert suite.** ``purify bench owl-ft-smollm2 --seeds 1 --option scale=full`` (12,000 prompts per seed, whole-model
students, the LoRA rank sweep, ``device=cuda``) in a child process with ``--covert-budget`` seconds; it needs the
prepared SmolLM2-135M model (``purify models prepare smollm2-135m``, or ``PURIFY_CACHE`` holding it). When the model
is missing, or the budget runs out, that is what the report says (a budget-stopped run leaves no summary).

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``, naming the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from purify.bench.report import environment
from purify.config import LossConfig, OptimConfig
from purify.module import Distiller

SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                "tie_word_embeddings": True, "rope_theta": 100000.0}
"""SmolLM2-135M-Instruct's shape (134.5M parameters), as its GGUF header gives it."""
TINY = {**SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512}
"""A shape for the CPU test of this script."""
PEAK_BF16 = {"H100": 989.4e12, "H100 PCIe": 756.5e12, "H100 NVL": 835.5e12, "H200": 989.4e12, "GH200": 989.4e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12}
"""Dense bf16 tensor-core peak (FLOP/s) by the longest of these names inside the device's name (NVIDIA data
sheets; the H100 without a suffix is the SXM part)."""


def linear_weights(model: nn.Module) -> int:
    """``N``: the weights of every linear layer (a tied head counted once, as the head's matrix product)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def step_flops(n: int, layers: int, width: int, batch: int, length: int) -> float:
    """Model FLOPs of one distillation step: student training plus teacher forward over ``batch × length`` tokens."""
    per_token = (6 * n + 12 * layers * width * length) + (2 * n + 4 * layers * width * length)
    return float(per_token * batch * length)


def peak(device_name: str) -> float | None:
    """The dense bf16 peak of ``device_name`` (:data:`PEAK_BF16`), ``None`` when unknown."""
    hits = [k for k in PEAK_BF16 if k in device_name]
    return PEAK_BF16[max(hits, key=len)] if hits else None


def mfu(device: str, shape: dict[str, Any], batch: int, length: int, steps: int, warmup: int) -> dict[str, Any]:
    """Time ``steps`` Distiller steps after ``warmup`` ones; the median step's achieved FLOP/s and MFU."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape)
    student = LlamaForCausalLM(cfg).to(device).train()
    teacher = LlamaForCausalLM(cfg).to(device, torch.bfloat16).eval()
    dist = Distiller(student, [teacher], loss=LossConfig(name="forward_kl"), optim=OptimConfig(lr=1e-5),
                     total_steps=steps + warmup)
    opt = dist.build_optimizer()
    ids = torch.randint(0, cfg.vocab_size, (batch, length), device=device)
    mask = torch.ones(batch, length - 1, device=device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": mask, "labels": ids[:, 1:]}
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            dist.fit_step(data, opt, progress=i / (warmup + steps))
        sync()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[warmup:])
    n = linear_weights(student)
    flops = step_flops(n, cfg.num_hidden_layers, cfg.hidden_size, batch, length)
    name = torch.cuda.get_device_name(torch.device(device)) if cuda else "cpu"
    top = peak(name) if cuda else None
    return {"device": name, "shape": shape, "linear_weights": n, "batch": batch, "length": length, "steps": steps,
            "warmup": warmup, "median_step_s": step, "step_flops": flops, "achieved_tflops": flops / step / 1e12,
            "peak_bf16_tflops": top and top / 1e12, "mfu": top and flops / step / top,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}


def covert(out: Path, budget: int) -> dict[str, Any]:
    """The full covert-suite configuration on one seed in a child process, stopped after ``budget`` seconds."""
    if budget <= 0:
        return {"ran": False, "why": "not asked for (--covert-budget 0)"}
    # one seed: the CLI asks for three (a verdict needs them), so the child calls the suite itself
    call = (f"from purify.bench import owl_finetuned as s; s.run_suite(seeds=1, out={str(out / 'owl-ft-full')!r}, "
            "progress=False, scale='full')")
    command = [sys.executable, "-c", call]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"ran": False, "why": f"stopped by the budget after {budget} s", "command": " ".join(command[1:])}
    wall = time.perf_counter() - t0
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    summary = out / "owl-ft-full" / "summary.json"
    found = json.loads(summary.read_text()) if done.returncode == 0 and summary.is_file() else None
    return {"ran": done.returncode == 0, "rc": done.returncode, "wall_seconds": wall, "command": " ".join(command[1:]),
            "tail": tail, "vanilla_minus_control": found and found.get("vanilla_minus_control")}


def report(result: dict[str, Any]) -> str:
    """``gpu_check.md``."""
    m, c = result["mfu"], result["covert"]
    why = c.get("why") or f"exit {c.get('rc')}: {' / '.join(c.get('tail') or [])}"
    env = result["environment"]
    lines = ["# GPU check", "", f"Written by `{env['command']}` on **{m['device']}** "
             f"(torch {env['versions']['torch']}, git {env['git']}).", "",
             f"- bf16 Distiller step, student of shape {m['shape']['num_hidden_layers']} blocks × width "
             f"{m['shape']['hidden_size']}, vocabulary {m['shape']['vocab_size']} ({m['linear_weights'] / 1e6:.1f}M "
             f"linear weights), batch {m['batch']} × {m['length']} tokens: median step {m['median_step_s'] * 1e3:.1f} "
             f"ms over {m['steps']} steps, {m['achieved_tflops']:.1f} TFLOP/s of model FLOPs → MFU "
             + (f"**{m['mfu']:.1%}** of {m['peak_bf16_tflops']:.0f} TFLOP/s" if m["mfu"] is not None
                else "n/a (no bf16 peak known for this device)") + ".",
             "- Covert suite (owl-ft-smollm2, scale=full, one seed): "
             + (f"ran in {c['wall_seconds']:.0f} s; vanilla − control: {json.dumps(c['vanilla_minus_control'])}"
                if c["ran"] else f"not run: {why}")
             + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.json|md (and the covert run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model shape (the CPU test)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--covert-budget", type=int, default=420, help="seconds for the covert suite (0: skip)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    start = time.perf_counter()
    result = {"mfu": mfu(args.device, TINY if args.tiny else SMOLLM2_135M, args.batch, args.length, args.steps,
                         args.warmup)}
    print(json.dumps(result["mfu"], indent=1), flush=True)
    result["covert"] = covert(out, args.covert_budget)
    result["environment"] = environment([], time.perf_counter() - start, command)  # machine, versions, git sha
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
