"""`purify train` in 2 processes on CPU (DDP, DeepSpeed ZeRO-2/3 through Lightning) equals the 1-process run.

Each run is a real subprocess of the CLI (Lightning re-executes it for rank 1), with the same global batch:
1 process × 16 examples vs 2 processes × 8. DeepSpeed runs its real engine on CPU (DS_ACCELERATOR=cpu, gloo).
"""

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.conftest import mlp_overrides

pytest.importorskip("deepspeed")


def run(tmp_path, name, *extra):
    recipe = tmp_path / "recipe.yaml"
    if not recipe.exists():
        OmegaConf.save(OmegaConf.from_dotlist(mlp_overrides(tmp_path / "unused", steps=10)), recipe)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "purify", "train", str(recipe), f"output_dir={tmp_path / name}",
           "trainer.accelerator=cpu", "trainer.checkpoint_every_n_steps=5", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(tmp_path / name / "student" / "model.safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return tmp, run(tmp, "single", "data.batch_size=16")


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_two_processes_equal_one(single, strategy):
    tmp, ref = single
    got = run(tmp, strategy, f"strategy={strategy}", "trainer.devices=2", "data.batch_size=8")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-4)


def test_zero2_resume_from_sharded_checkpoint_continues_exactly(single):
    tmp, _ = single
    args = ["strategy=deepspeed_stage_2", "trainer.devices=2", "data.batch_size=8"]
    full = run(tmp, "z2full", *args)
    ckpt = tmp / "z2full" / "checkpoints" / "step5.ckpt"
    assert ckpt.is_dir()  # DeepSpeed's sharded checkpoint directory
    resumed = run(tmp, "z2resumed", *args, f"resume={ckpt}")
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0)
