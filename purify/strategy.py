"""Recipe strategy names → Lightning strategies; DeepSpeed's real engine on GPU or, for tests, on CPU.

``build_strategy(name)`` maps ``auto | ddp | deepspeed_stage_{1,2,3}`` to what ``lightning.Trainer(strategy=...)``
takes. On GPU a DeepSpeed name becomes Lightning's own :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`.
Lightning refuses DeepSpeed on CPU, so a CPU run gets :class:`CPUDeepSpeedStrategy`, which only changes device
selection (see its docstring); the ZeRO engine, its partitioning and its checkpoints are DeepSpeed's own.

What a CPU DeepSpeed run needs, and what keeps DeepSpeed from JIT-compiling C++ ops (minutes on 2 cores):

- ``DS_ACCELERATOR=cpu`` before ``import deepspeed`` (DeepSpeed picks its accelerator once, at import).
  :class:`CPUDeepSpeedStrategy` sets it when unset and refuses to run if DeepSpeed already chose another.
- Process group backend ``gloo``.
- DeepSpeed's ``TorchBackend`` JIT-builds its shared-memory all-reduce op (``deepspeed_shm_comm``, ~50 s) whenever
  ``deepspeed.ops.__compatible_ops__`` calls it compatible; ZeRO training never uses it, so the CPU strategy marks
  it incompatible before ``deepspeed.init_distributed``.
- The optimizer is the torch one from ``configure_optimizers``. The DeepSpeed config must have no ``optimizer``
  block (DeepSpeed would build FusedAdam / DeepSpeedCPUAdam), and ``zero_force_ds_cpu_optimizer: false`` lets
  ZeRO-Offload take a torch optimizer instead of insisting on the compiled DeepSpeedCPUAdam.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

STRATEGIES = ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's :class:`DeepSpeedStrategy` with the CUDA-only device selection replaced for CPU processes.

    Overrides, and nothing else:

    - ``setup_environment``: skips the "only supported on CUDA GPUs" check (the rest is DDP's).
    - ``setup_distributed``: skips the check that device indices equal local ranks (CPU devices have no index) and
      marks DeepSpeed's shared-memory comm op incompatible so ``deepspeed.init_distributed`` does not JIT-build it.
    - ``root_device``: ``cpu:<local_rank>``; Lightning hands ``root_device.index`` to DeepSpeed as ``device_rank``,
      and ``None`` crashes the engine. Tensors moved to ``cpu:<n>`` land on plain ``cpu``.
    """

    def __init__(self, **kwargs: Any) -> None:
        """Args: ``kwargs`` of :class:`DeepSpeedStrategy`; ``process_group_backend`` defaults to ``"gloo"``."""
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(**kwargs)  # imports deepspeed
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise RuntimeError(
                f"DeepSpeed already chose accelerator {get_accelerator().device_name()!r}; set DS_ACCELERATOR=cpu "
                "before anything imports deepspeed"
            )

    def setup_environment(self) -> None:
        """DDP's environment setup, without DeepSpeedStrategy's CUDA-only check."""
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        """Init the (gloo) process group through DeepSpeed, without device-index checks or JIT comm ops."""
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        """``cpu:<local_rank>``, so that DeepSpeed gets a device rank (the index) for this process."""
        return torch.device("cpu", self.local_rank)


def build_strategy(
    name: str,
    *,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    deepspeed_config: dict[str, Any] | str | Path | None = None,
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    **deepspeed_kwargs: Any,
) -> str | Strategy:
    """The ``strategy=`` argument of ``lightning.Trainer`` for a recipe's strategy name.

    Args:
        name: One of :data:`STRATEGIES`.
        offload_optimizer: ZeRO-Offload of optimizer states to host memory (DeepSpeed only).
        offload_parameters: ZeRO-3 offload of parameters to host memory (``deepspeed_stage_3`` only).
        deepspeed_config: A DeepSpeed config (dict or JSON path) used instead of the one Lightning builds from the
            stage and offload flags; its ``zero_optimization.stage`` must match ``name`` and offload goes inside it.
        accelerator: ``trainer.accelerator``; ``cpu``, or ``auto`` without CUDA, gives :class:`CPUDeepSpeedStrategy`.
        devices: ``trainer.devices``; checked against the visible CUDA devices for GPU DeepSpeed.
        **deepspeed_kwargs: More :class:`DeepSpeedStrategy` arguments, e.g. ``exclude_frozen_parameters=True``.

    Returns:
        ``"auto"`` or ``"ddp"`` as is, else a configured DeepSpeed strategy.

    Raises:
        ValueError: For an unknown name, an impossible offload or device count, or a config that contradicts the
            name or has an ``optimizer`` block.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy: unknown strategy {name!r}; allowed: {', '.join(STRATEGIES)}")
    if not name.startswith("deepspeed"):
        if offload_optimizer or offload_parameters:
            raise ValueError(f"deepspeed.offload_*: offload needs a deepspeed_stage_* strategy, not {name!r}")
        if deepspeed_config is not None:  # it ran plain DDP while the record listed the DeepSpeed config
            raise ValueError(f"deepspeed.config: applies under a deepspeed_stage_* strategy, not {name!r}; set "
                             "strategy=deepspeed_stage_N (N the config's zero_optimization.stage) or remove it")
        return name
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"strategy: {name!r} needs DeepSpeed; pip install 'purify[deepspeed]'")
    stage = int(name[-1])
    if offload_parameters and stage != 3:
        raise ValueError(f"deepspeed.offload_parameters: parameter offload needs deepspeed_stage_3, not {name!r}")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and stage == 3 and (offload_optimizer or offload_parameters):
        raise ValueError(
            "deepspeed.offload_*: ZeRO-3 offload on a CPU-only run moves host memory to host memory; "
            "set deepspeed.offload_optimizer=false and deepspeed.offload_parameters=false, or run on GPU"
        )
    if not on_cpu:
        _check_gpu_devices(devices)
    config = _load_config(deepspeed_config, stage, offload_optimizer or offload_parameters)
    cls = CPUDeepSpeedStrategy if on_cpu else DeepSpeedStrategy
    strategy = cls(stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters,
                   config=config, **deepspeed_kwargs)
    strategy.config.setdefault("zero_allow_untested_optimizer", True)  # any torch optimizer, as Lightning's default
    strategy.config.setdefault("zero_force_ds_cpu_optimizer", False)  # offload with a torch optimizer, no CPUAdam JIT
    if isinstance(deepspeed_kwargs.get("logging_batch_size_per_gpu"), int):  # a user config lacks it, and Lightning
        # would read it off the train loader's batch_sampler, which purify's step-batch loader does not have
        strategy.config.setdefault("train_micro_batch_size_per_gpu", deepspeed_kwargs["logging_batch_size_per_gpu"])
    return strategy


def _load_config(config: dict[str, Any] | str | Path | None, stage: int, offload: bool) -> dict[str, Any] | None:
    """A user DeepSpeed config (dict or JSON path), checked against the strategy name and purify's optimizer rule."""
    if config is None:
        return None
    if not isinstance(config, dict):
        if not Path(config).is_file():
            raise ValueError(f"deepspeed.config: no such file {str(config)!r}; give a JSON path or a dict")
        config = json.loads(Path(config).read_text())
    config = dict(config)  # the strategy adds keys; leave the caller's dict alone
    if "optimizer" in config:
        raise ValueError("deepspeed.config.optimizer: remove the 'optimizer' block; the optimizer comes from "
                         "configure_optimizers (a DeepSpeed optimizer would be JIT-compiled)")
    if config.get("zero_optimization", {}).get("stage", 0) != stage:
        raise ValueError(f"deepspeed.config.zero_optimization.stage must be {stage} to match deepspeed_stage_{stage}")
    if offload:
        raise ValueError("deepspeed.offload_*: with deepspeed.config set, put offload in its zero_optimization block")
    return config


def _parse_devices(devices: int | str | list[int]) -> list[int] | int | None:
    """``trainer.devices`` as device indices (``"0,1"``, ``[0, 1]``), a count, or ``None`` for ``"auto"``/``-1``."""
    if devices in ("auto", -1, "-1"):
        return None
    if isinstance(devices, str) and "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()]
    return list(devices) if isinstance(devices, (list, tuple)) else int(devices)


def _check_gpu_devices(devices: int | str | list[int]) -> None:
    """Raise when ``trainer.devices`` (a count, ``"0,1"`` or ``[0, 1]``) needs more CUDA devices than are visible."""
    spec = _parse_devices(devices)
    if spec is None:
        return
    needed = max(spec) + 1 if isinstance(spec, list) else spec
    present = torch.cuda.device_count()
    if needed > present:
        raise ValueError(
            f"trainer.devices={devices!r} needs {needed} CUDA devices but {present} are visible; "
            f"set trainer.devices to at most {present} (or 'auto')"
        )


def world_size(accelerator: str = "auto", devices: int | str | list[int] = 1, num_nodes: int = 1) -> int:
    """Processes a run starts: ``trainer.devices`` (a count, ``"0,1"``, ``[0, 1]``, ``"auto"`` or ``-1``) on each of
    ``num_nodes`` nodes; ``"auto"``/``-1`` count the visible CUDA devices, or 1 on CPU (as Lightning does)."""
    spec = _parse_devices(devices)
    if spec is None:
        on_cpu = accelerator == "cpu" or not torch.cuda.is_available()
        per_node = 1 if on_cpu else torch.cuda.device_count()
    else:
        per_node = len(spec) if isinstance(spec, list) else spec
    return per_node * num_nodes


def check_global_batch(global_batch: int, world_size: int, accumulate: int,
                       key: str = "data.global_batch_size") -> int:
    """The per-device micro-batch size that makes ``global_batch`` exact.

    Args:
        global_batch: Samples per optimizer step, over all processes.
        world_size: Number of processes (``devices × num_nodes``).
        accumulate: ``trainer.accumulate_grad_batches``.
        key: The recipe key that gave ``global_batch``, for the message.

    Returns:
        ``global_batch // (world_size * accumulate)``.

    Raises:
        ValueError: When ``world_size × accumulate`` does not divide ``global_batch`` (one line: the key, the numbers
            and the fix).
    """
    per_step = world_size * accumulate
    if global_batch <= 0 or per_step <= 0 or global_batch % per_step:
        below = global_batch // max(per_step, 1) * per_step
        near = sorted({max(per_step, below), max(per_step, below + per_step)})
        raise ValueError(
            f"{key}: {global_batch} is not a positive multiple of world size {world_size} (trainer.devices × "
            f"trainer.num_nodes) × trainer.accumulate_grad_batches {accumulate} = {per_step}; set {key} to a "
            f"multiple of {per_step} (e.g. {' or '.join(map(str, near))}) or change trainer.devices, "
            "trainer.num_nodes or trainer.accumulate_grad_batches"
        )
    return global_batch // per_step
