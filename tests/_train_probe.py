"""``purify train`` with a probe on the teachers, for tests/test_train_distributed.py.

Run as a script, never imported by pytest: Lightning's launcher re-executes ``sys.argv`` for every extra process, so
the probe is installed on every rank. It is the real train path (``load_recipe`` → ``purify.train.train``); the
probe only wraps ``Distiller.configure_model`` (to see whether the teachers are partitioned when it returns, i.e.
before DeepSpeed's engine is built) and adds ``Distiller.on_train_start``, which writes ``teachers.rank<R>.json``
into ``output_dir``: that, the teachers' full size (``ds_numel`` under ZeRO-3), this rank's shard (``ds_tensor``),
the module-visible size, dtypes, whether any teacher parameter needs a gradient or is in the optimizer (and, so that
this check is not vacuous, whether every student parameter is), and whether any teacher is in training mode.

    python tests/_train_probe.py RECIPE [key=value ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from purify.assembly import load_recipe
from purify.module import Distiller
from purify.train import train


def optimized(trainer) -> set[int]:
    """ids of the module parameters the optimizer updates (DeepSpeed's ZeRO optimizers keep them in 16-bit groups)."""
    ids = set()
    for opt in trainer.optimizers:
        groups = [g["params"] for g in opt.param_groups]
        groups += list(getattr(opt, "fp16_groups", [])) + list(getattr(opt, "bit16_groups", []))
        ids |= {id(p) for group in groups for p in group}
    return ids


def teacher_params(self: Distiller) -> list:
    return [p for t in self.teachers for p in t.parameters()]


_configure_model = Distiller.configure_model


def configure_model(self: Distiller) -> None:
    _configure_model(self)
    params = teacher_params(self)
    self.probe = {"teachers": len(self.teachers), "local_numel": sum(p.numel() for p in params),
                  "partitioned": bool(params) and all(hasattr(p, "ds_id") for p in params)}


def record_teachers(self: Distiller) -> None:
    params = teacher_params(self)
    ids = optimized(self.trainer)
    info = {
        "configure_model": getattr(self, "probe", None),
        "numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "shard_numel": sum(p.ds_tensor.numel() for p in params) if all(hasattr(p, "ds_tensor") for p in params)
        else None,
        "local_numel": sum(p.numel() for p in params),
        "dtypes": sorted({str(p.dtype) for p in params}),
        "requires_grad": any(p.requires_grad for p in params),
        "in_optimizer": any(id(p) in ids for p in params),
        "student_in_optimizer": all(id(p) in ids for p in self.student.parameters()),
        "training": any(m.training for t in self.teachers for m in t.modules()),
    }
    out = Path(self.trainer.default_root_dir) / f"teachers.rank{self.global_rank}.json"
    out.write_text(json.dumps(info))


if __name__ == "__main__":
    Distiller.configure_model = configure_model  # type: ignore[method-assign]
    Distiller.on_train_start = record_teachers  # type: ignore[method-assign]
    train(load_recipe(sys.argv[1], sys.argv[2:]))
