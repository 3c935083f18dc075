"""purify.strategy: recipe names → Lightning strategies, their checks, and DeepSpeed's real engine on CPU.

The multi-process tests run ``tests/_dist_toy.py`` (a tiny Llama student distilled from a frozen tiny Llama teacher) as
a subprocess: Lightning's launcher re-executes that script for rank 1, 2 processes on 2 CPU cores over gloo. Every run
uses the same global batch of 4, so each must reproduce the single-process loss curve and final student.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from purify.strategy import STRATEGIES, CPUDeepSpeedStrategy, build_strategy, check_global_batch, world_size

TOY = Path(__file__).with_name("_dist_toy.py")
TOL = {"rtol": 0, "atol": 1e-4}


def run_toy(out: Path, strategy: str = "auto", devices: int = 1, *extra: str) -> dict:
    """Run the toy to completion; returns its losses by step, teacher shard sizes and final student state dict."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(TOY), "--strategy", strategy, "--devices", str(devices), "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads((out / "result.json").read_text())
    result["losses"] = {int(step): loss for step, loss in result["losses"].items()}
    result["student"] = torch.load(out / "student.pt")
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_toy(tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("zero3")
    return {**run_toy(out, "deepspeed_stage_3", 2, "--checkpoint"), "out": out}


def assert_same_run(run: dict, reference: dict) -> None:
    assert list(run["losses"]) == list(range(1, 11))
    torch.testing.assert_close(list(run["losses"].values()), list(reference["losses"].values()), **TOL)
    assert run["student"].keys() == reference["student"].keys()
    for name, tensor in reference["student"].items():
        torch.testing.assert_close(run["student"][name], tensor, **TOL, msg=name)


# --- names and checks (in-process, fast) ---


def test_auto_and_ddp_pass_through_as_names() -> None:
    assert build_strategy("auto") == "auto"
    assert build_strategy("ddp") == "ddp"


def test_unknown_name_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'deepspeed_stage_4'.*" + ", ".join(STRATEGIES)):
        build_strategy("deepspeed_stage_4")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_cpu_deepspeed_is_the_cpu_subclass_with_torch_optimizer_allowed(stage: int) -> None:
    strategy = build_strategy(f"deepspeed_stage_{stage}", accelerator="cpu")
    assert isinstance(strategy, CPUDeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == stage
    assert strategy.config["zero_force_ds_cpu_optimizer"] is False
    assert strategy.process_group_backend == "gloo"


@pytest.mark.parametrize("offload", [{"offload_optimizer": True}, {"offload_parameters": True}])
def test_zero3_offload_refused_on_cpu(offload: dict) -> None:
    with pytest.raises(ValueError, match="deepspeed.offload_.*CPU-only.*offload_optimizer=false"):
        build_strategy("deepspeed_stage_3", accelerator="cpu", **offload)


def test_zero2_optimizer_offload_allowed_on_cpu() -> None:
    strategy = build_strategy("deepspeed_stage_2", accelerator="cpu", offload_optimizer=True)
    assert strategy.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_parameter_offload_needs_stage_3() -> None:
    with pytest.raises(ValueError, match="offload_parameters.*needs deepspeed_stage_3"):
        build_strategy("deepspeed_stage_2", accelerator="cpu", offload_parameters=True)


def test_offload_needs_deepspeed() -> None:
    with pytest.raises(ValueError, match="offload needs a deepspeed_stage"):
        build_strategy("ddp", offload_optimizer=True)
    # a DeepSpeed config beside strategy auto/ddp trained plain DDP while the record listed the config
    for name in ("auto", "ddp"):
        with pytest.raises(ValueError, match=f"deepspeed.config: applies under a deepspeed_stage_\\* strategy, not "
                                             f"'{name}'; set strategy=deepspeed_stage_N"):
            build_strategy(name, deepspeed_config={"zero_optimization": {"stage": 2}})


@pytest.mark.parametrize("devices", [4, "4", "0,3", [0, 3]])
def test_gpu_deepspeed_refuses_more_devices_than_present(monkeypatch: pytest.MonkeyPatch, devices: object) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"trainer.devices=.* needs 4 CUDA devices but 2 are visible"):
        build_strategy("deepspeed_stage_2", accelerator="gpu", devices=devices)


def test_deepspeed_config_dict_or_json_path(tmp_path: Path) -> None:
    config = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    for given in (config, tmp_path / "ds.json", str(tmp_path / "ds.json")):
        strategy = build_strategy("deepspeed_stage_2", accelerator="cpu", deepspeed_config=given)
        assert strategy.config["zero_optimization"]["reduce_bucket_size"] == 1000


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, "remove the 'optimizer' block"),
        ({"zero_optimization": {"stage": 3}}, "stage must be 2 to match deepspeed_stage_2"),
        ("missing.json", "no such file"),
    ],
)
def test_deepspeed_config_checks(config: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_strategy("deepspeed_stage_2", accelerator="cpu", deepspeed_config=config)


def test_check_global_batch() -> None:
    assert check_global_batch(32, world_size=2, accumulate=4) == 4
    message = r"^data.global_batch_size: 10 .* world size 2 .*\.accumulate_grad_batches 4 = 8; set "
    message += r"data.global_batch_size to a multiple of 8 \(e.g. 8 or 16\)"
    with pytest.raises(ValueError, match=message):
        check_global_batch(10, world_size=2, accumulate=4)
    with pytest.raises(ValueError, match="positive multiple"):
        check_global_batch(0, world_size=1, accumulate=1)


@pytest.mark.parametrize(("devices", "num_nodes", "expected"),
                         [(2, 1, 2), ("3", 1, 3), ("0,1", 2, 4), ([0, 3], 1, 2), ("auto", 2, 2), (-1, 1, 1)])
def test_world_size_counts_processes_on_cpu(devices: object, num_nodes: int, expected: int) -> None:
    assert world_size("cpu", devices, num_nodes) == expected


def test_world_size_auto_counts_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert world_size("gpu", "auto", 2) == 8


def test_user_deepspeed_config_gets_the_micro_batch() -> None:
    """Lightning would read it off the train loader's batch_sampler, which purify's step-batch loader lacks."""
    strategy = build_strategy("deepspeed_stage_3", accelerator="cpu", logging_batch_size_per_gpu=8,
                              deepspeed_config={"zero_optimization": {"stage": 3}})
    assert strategy.config["train_micro_batch_size_per_gpu"] == 8
    given = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 2}
    strategy = build_strategy("deepspeed_stage_3", accelerator="cpu", logging_batch_size_per_gpu=8,
                              deepspeed_config=given)
    assert strategy.config["train_micro_batch_size_per_gpu"] == 2


# --- 2 processes, gloo, real engines (slow) ---


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(single: dict, tmp_path: Path) -> None:
    assert_same_run(run_toy(tmp_path, "ddp", 2), single)


@pytest.mark.slow
def test_zero2_two_processes_match_single_process(single: dict, tmp_path: Path) -> None:
    assert_same_run(run_toy(tmp_path, "deepspeed_stage_2", 2), single)


@pytest.mark.slow
def test_zero3_shards_the_frozen_teacher_and_matches_single_process(single: dict, zero3: dict) -> None:
    teacher = zero3["teacher"]
    assert teacher["numel"] == teacher["full_numel"]  # ds_numel: the full size, known to every rank
    assert teacher["local_numel"] == 0  # the module's tensors are empty placeholders outside a forward
    assert teacher["full_numel"] / 2 <= teacher["shard_numel"] < teacher["full_numel"] / 2 + 64  # ~half (+padding)
    assert_same_run(zero3, single)


@pytest.mark.slow
def test_zero3_checkpoint_consolidates_to_the_single_process_student(single: dict, zero3: dict) -> None:
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    ckpt = convert_zero_checkpoint_to_fp32_state_dict(zero3["out"] / "ckpt" / "epoch=0-step=10.ckpt",
                                                      zero3["out"] / "consolidated.pt")
    for name, tensor in single["student"].items():
        torch.testing.assert_close(ckpt["state_dict"][f"student.{name}"], tensor, **TOL, msg=name)


@pytest.mark.slow
def test_zero3_resume_continues_exactly(zero3: dict, tmp_path: Path) -> None:
    resumed = run_toy(tmp_path, "deepspeed_stage_3", 2, "--resume", str(zero3["out"] / "ckpt" / "epoch=0-step=5.ckpt"))
    assert list(resumed["losses"]) == list(range(6, 11))
    torch.testing.assert_close(list(resumed["losses"].values()), [zero3["losses"][s] for s in range(6, 11)], **TOL)
    for name, tensor in zero3["student"].items():
        torch.testing.assert_close(resumed["student"][name], tensor, **TOL, msg=name)
