"""Shared fixtures: tiny recipes that train in seconds on 2 CPU cores, offline."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Two shared cores: one torch thread per test process is steadier and faster than two that contend. Lightning
    is imported here, outside any test's captured output: its loggers' stream handlers bind the ``sys.stderr`` of the
    moment, and one bound inside a ``capsys`` test writes to a closed stream in every later test."""
    import lightning.pytorch  # noqa: F401
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp_overrides(out_dir, steps: int = 20, **extra: object) -> list[str]:
    """Dotlist for a tiny aux-MLP distillation on noise (no tokenizer, no files)."""
    spec = "{arch: aux_mlp, kwargs: {in_dim: 16, hidden: [32, 32], n_aux: 3}}"
    items = {
        "student": spec,
        "teachers": "[{arch: aux_mlp, seed: 7, kwargs: {in_dim: 16, hidden: [32, 32], n_aux: 3}}]",
        "data.train": "noise", "data.noise_dim": 16, "data.num_samples": 256, "data.batch_size": 16,
        "loss.logit_slice": "[10, 13]",
        "trainer.max_steps": steps, "trainer.val_check_interval": 10, "trainer.checkpoint_every_n_steps": 10,
        "trainer.enable_progress_bar": False, "trainer.log_every_n_steps": 5,
        "output_dir": str(out_dir),
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture
def mlp_recipe(tmp_path):
    from purify.assembly import load_recipe

    def make(steps: int = 20, sub: str = "run", **extra: object):
        return load_recipe(None, mlp_overrides(tmp_path / sub, steps, **extra))

    return make
