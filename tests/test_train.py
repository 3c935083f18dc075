"""End-to-end training on a tiny aux-MLP: artifacts, exact resume, lineage hashes, atomic saves, NaN stop."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from purify.lineage import read_lineage
from purify.models import AuxMLP
from purify.module import Distiller
from purify.train import AtomicCheckpointIO, build_run, train


def student_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "student" / "model.safetensors")


def test_train_leaves_checkpoint_export_lineage_and_logs(mlp_recipe):
    out = train(mlp_recipe(steps=20))
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "checkpoints" / "lineage.json").is_file()
    assert (out / "logs" / "metrics.csv").read_text().startswith("epoch,step")
    record = read_lineage(out)
    assert record["step"] == 20 and record["teachers"][0]["sha256"]
    assert "val/kl" in record["metrics"]
    # the student moved away from its initial weights toward the teacher
    init = build_run(mlp_recipe(steps=20)).distiller.student.state_dict()
    trained = student_weights(out)
    assert all(not torch.equal(init[k], trained[k]) for k in init)


def test_resumed_run_equals_uninterrupted_run(mlp_recipe, tmp_path):
    full = train(mlp_recipe(steps=20, sub="full"))
    resumed = train(mlp_recipe(steps=20, sub="resumed", resume=str(full / "checkpoints" / "step10.ckpt")))
    a, b = student_weights(full), student_weights(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    la = read_lineage(full)["metrics"]["train/loss"]
    lb = read_lineage(resumed)["metrics"]["train/loss"]
    assert la == pytest.approx(lb, abs=1e-6)


def test_gradient_accumulation_gives_the_same_update(mlp_recipe):
    one = train(mlp_recipe(steps=5, sub="one", **{"data.batch_size": 32}))
    acc = train(mlp_recipe(steps=5, sub="acc", **{"data.batch_size": 16, "trainer.accumulate_grad_batches": 2}))
    a, b = student_weights(one), student_weights(acc)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_lineage_teacher_hash_changes_with_teacher_weights(mlp_recipe):
    spec = "[{arch: aux_mlp, seed: %d, kwargs: {in_dim: 16, hidden: [32, 32], n_aux: 3}}]"
    h7 = build_run(mlp_recipe(teachers=spec % 7)).lineage["teachers"][0]["sha256"]
    h7b = build_run(mlp_recipe(teachers=spec % 7)).lineage["teachers"][0]["sha256"]
    h8 = build_run(mlp_recipe(teachers=spec % 8)).lineage["teachers"][0]["sha256"]
    assert h7 == h7b != h8


def test_kill_during_save_leaves_previous_checkpoint_readable(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_non_finite_loss_stops_with_the_step_and_writes_nothing(tmp_path):
    teacher = AuxMLP(in_dim=4, hidden=[8], n_aux=2)
    with torch.no_grad():
        teacher.head.weight.fill_(float("nan"))
    distiller = Distiller(AuxMLP(in_dim=4, hidden=[8], n_aux=2), [teacher])
    batch = {"x": torch.rand(8, 4), "target_mask": torch.ones(8, 1)}
    loader = torch.utils.data.DataLoader([batch] * 4, batch_size=None)
    trainer = L.Trainer(max_steps=3, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck")])
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 0"):
        trainer.fit(distiller, train_dataloaders=loader)
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


def test_export_loads_back_into_the_architecture(mlp_recipe):
    out = train(mlp_recipe(steps=5))
    cfg = json.loads((out / "student" / "config.json").read_text())
    model = AuxMLP(**cfg["kwargs"])
    model.load_state_dict(student_weights(out))
