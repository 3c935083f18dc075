"""`purify train` in 2 processes on CPU (DDP, DeepSpeed ZeRO-2/3 through Lightning) equals the 1-process run.

Each run is a real subprocess of the CLI (Lightning re-executes it for rank 1), with the same global batch:
1 process × 16 examples vs 2 processes × 8. DeepSpeed runs its real engine on CPU (DS_ACCELERATOR=cpu, gloo).
The ZeRO-3 run goes through tests/_train_probe.py, the same train path with a probe that records, on every rank,
where the frozen teachers live.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from purify.models import AuxMLP
from tests.conftest import mlp_overrides

pytest.importorskip("deepspeed")

PROBE = Path(__file__).with_name("_train_probe.py")
NO_PERSISTENCE = "deepspeed.config={zero_optimization: {stage: 3, stage3_param_persistence_threshold: 0}}"
"""ZeRO-3 keeps parameters below 1e5 elements whole on every rank after their first use (all of this toy's); with
the threshold at 0 every teacher parameter is released after each forward, as a large teacher's are."""


def run(tmp_path, name, *extra, probe=False):
    recipe = tmp_path / "recipe.yaml"
    if not recipe.exists():
        OmegaConf.save(OmegaConf.from_dotlist(mlp_overrides(tmp_path / "unused", steps=10)), recipe)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    entry = [str(PROBE)] if probe else ["-m", "purify", "train"]
    cmd = [sys.executable, *entry, str(recipe), f"output_dir={tmp_path / name}",
           "trainer.accelerator=cpu", "trainer.checkpoint_every_n_steps=5", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(tmp_path / name / "student" / "model.safetensors")


def stored_teacher_tensors(ckpt):
    """Names of teacher tensors in a DeepSpeed checkpoint directory's module-state files (any rank)."""
    files = sorted((ckpt / "checkpoint").glob("*model_states.pt"))
    assert files, f"no module states in {ckpt}"
    names = []
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=False)  # DeepSpeed's own file (config objects)
        names += [k for k in state["module"] if k.startswith("teachers.")]
        names += list(state.get("frozen_param_fragments") or {})  # ZeRO-3 stores frozen shards here
    return names


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return tmp, run(tmp, "single", "data.batch_size=16")


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2"])
def test_two_processes_equal_one(single, strategy):
    tmp, ref = single
    got = run(tmp, strategy, f"strategy={strategy}", "trainer.devices=2", "data.batch_size=8")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-4)
    # the logged loss and its parts are the global batch's (train/distill was rank 0's half alone), and validation
    # reads the same held-out examples, shared out between the processes (each read its own 8-example batches)
    one, two = (json.loads((tmp / n / "lineage.json").read_text())["metrics"] for n in ("single", strategy))
    for key in ("train/loss", "train/distill", "val/kl", "val/agreement"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key


ZERO3 = ("strategy=deepspeed_stage_3", "trainer.devices=2", "data.batch_size=8", NO_PERSISTENCE)


@pytest.fixture(scope="module")
def zero3(single):
    tmp, _ = single
    return run(tmp, "zero3", *ZERO3, probe=True)


def test_zero3_shards_teachers_in_configure_model_and_equals_one_process(single, zero3):
    tmp, ref = single
    got = zero3
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-4)
    teacher = AuxMLP(in_dim=16, hidden=[32, 32], n_aux=3)  # the recipe's teacher architecture
    full = sum(p.numel() for p in teacher.parameters())
    half = sum(math.ceil(p.numel() / 2) for p in teacher.parameters())  # each parameter padded to 2 equal shards
    for rank in (0, 1):
        info = json.loads((tmp / "zero3" / f"teachers.rank{rank}.json").read_text())
        # partitioned when configure_model returns, i.e. before DeepSpeed's engine (or the device) sees the model
        assert info["configure_model"] == {"teachers": 1, "local_numel": 0, "partitioned": True}
        assert info["numel"] == full  # ds_numel: the full size, known to every rank
        assert info["shard_numel"] == half  # this rank's ds_tensor: its half, not a replica
        assert info["local_numel"] == 0  # between forwards the module holds empty placeholders
        assert info["dtypes"] == ["torch.float32"]
        assert not info["requires_grad"] and not info["training"]
        assert info["student_in_optimizer"] and not info["in_optimizer"]
    lineage = [json.loads((tmp / name / "lineage.json").read_text())["teachers"][0]["sha256"]
               for name in ("single", "zero3")]
    assert lineage[0] == lineage[1]  # hashed from the full weights, built in configure_model


def test_zero2_resume_from_sharded_checkpoint_continues_exactly(single):
    tmp, _ = single
    args = ["strategy=deepspeed_stage_2", "trainer.devices=2", "data.batch_size=8"]
    full = run(tmp, "z2full", *args)
    ckpt = tmp / "z2full" / "checkpoints" / "step5.ckpt"
    assert ckpt.is_dir()  # DeepSpeed's sharded checkpoint directory
    assert stored_teacher_tensors(ckpt) == []  # the frozen teacher is rebuilt from the recipe, not stored
    resumed = run(tmp, "z2resumed", *args, f"resume={ckpt}")
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0)


def test_zero3_resume_rebuilds_sharded_teachers_and_continues_exactly(single, zero3):
    tmp, _ = single
    ckpt = tmp / "zero3" / "checkpoints" / "step5.ckpt"
    assert ckpt.is_dir()  # DeepSpeed's sharded checkpoint directory
    assert stored_teacher_tensors(ckpt) == []  # neither placeholders nor shards: rebuilt from the recipe on resume
    resumed = run(tmp, "z3resumed", *ZERO3, f"resume={ckpt}")
    for key in zero3:
        torch.testing.assert_close(resumed[key], zero3[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("extra, message", [
    (("trainer.max_steps=5",), r"resume: .*step5\.ckpt is at step 5, and trainer\.max_steps is 5: nothing left to "
                               r"train"),
    (("student={arch: aux_mlp, kwargs: {in_dim: 16, hidden: [64], n_aux: 3}}",),
     r"resume: .*step5\.ckpt was written for another model \(\d+ tensors it holds do not fit, e\.g\. student\."),
    (("resume={empty}",), r"resume: .*empty\.ckpt is not a DeepSpeed checkpoint \(no checkpoint/\*model_states\.pt"),
])
def test_a_deepspeed_resume_is_checked_before_anything_is_written(single, zero3, extra, message):
    """Under DeepSpeed a checkpoint of another model failed inside the fit with a traceback, one at max_steps trained
    nothing and exported a run marked finished, and a directory that is no checkpoint left a failed run behind: all
    three are one line now, before the output directory exists."""
    tmp, _ = single
    (tmp / "empty.ckpt").mkdir(exist_ok=True)
    out = tmp / f"refused-{len(list(tmp.glob('refused-*')))}"
    args = [a.replace("{empty}", str(tmp / "empty.ckpt")) for a in extra]
    step5 = tmp / "zero3" / "checkpoints" / "step5.ckpt"
    resume = [] if any(a.startswith("resume=") for a in args) else [f"resume={step5}"]
    assert_refused(tmp / "recipe.yaml", out, message, *ZERO3, *resume, *args)


def assert_refused(recipe, out, message, *extra):
    """``purify train`` refuses with exit 2 and one ``purify: error:`` line matching ``message``, writing nothing."""
    cmd = [sys.executable, "-m", "purify", "train", str(recipe), f"output_dir={out}", "trainer.accelerator=cpu", *extra]
    proc = subprocess.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"},
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("purify: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not out.exists()


@pytest.mark.parametrize("damage, message", [
    ("drop", r"resume: .*step5\.ckpt lacks rank 1's optim states \(checkpoint/zero_pp_rank_1_mp_rank_00_optim_states"
             r"\.pt; it was written by 2 processes\)"),
    ("cut", r"resume: .*zero_pp_rank_0_mp_rank_00_optim_states\.pt is truncated or damaged"),
])
def test_a_deepspeed_checkpoint_missing_or_cutting_short_a_shard_is_refused_first(single, zero3, tmp_path, damage,
                                                                                    message):
    """A kill during a ZeRO save leaves a directory without (or with half of) one rank's shard: that rank failed
    inside the fit (a gloo 'connection closed' on the other) after the run's record had been rewritten as failed."""
    import shutil

    tmp, _ = single
    ckpt = shutil.copytree(tmp / "zero3" / "checkpoints" / "step5.ckpt", tmp_path / "step5.ckpt")
    if damage == "drop":
        (ckpt / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    else:
        shard = ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        shard.write_bytes(shard.read_bytes()[:-100])
    assert_refused(tmp / "recipe.yaml", tmp_path / "out", message, *ZERO3, f"resume={ckpt}")


def test_purifier_metrics_are_the_mean_over_the_processes(single):
    """A purifier's metrics (tail truncation's kept mass: per batch) were rank 0's half of the global batch."""
    tmp, _ = single
    purifier = "purifiers=[{name: tail_truncation, top_k: 2}]"
    run(tmp, "trunc1", "data.batch_size=16", purifier)
    run(tmp, "trunc2", "strategy=ddp", "trainer.devices=2", "data.batch_size=8", purifier)
    one, two = (json.loads((tmp / n / "lineage.json").read_text())["metrics"] for n in ("trunc1", "trunc2"))
    key = "purify/0_tail_truncation/kept_mass"
    assert one[key] < 0.999 and two[key] == pytest.approx(one[key], rel=1e-5)


def _gather_metrics(rank, path):
    import torch.distributed as dist

    from purify.module import mean_over_ranks

    dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=2)
    mine = {"a": torch.tensor(1.0 + rank), **({"only_rank1": torch.tensor(5.0)} if rank else {})}
    (Path(path) / f"out{rank}.json").write_text(json.dumps(mean_over_ranks(mine)))
    dist.destroy_process_group()


def test_mean_over_ranks_takes_keys_some_ranks_lack(tmp_path):
    """Keys logged on one rank only average over that rank (Lightning's per-key sync_dist would hang there)."""
    torch.multiprocessing.spawn(_gather_metrics, args=(str(tmp_path),), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"out{rank}.json").read_text()) == {"a": 1.5, "only_rank1": 5.0}
