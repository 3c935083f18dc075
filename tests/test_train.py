"""End-to-end training on a tiny aux-MLP: artifacts, exact resume, lineage hashes, atomic saves, NaN stop."""

import contextlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from purify.assembly import build_run
from purify.checkpoint import VerifiedCheckpointIO
from purify.lineage import read_lineage
from purify.models import AuxMLP, state_sha256
from purify.module import Distiller
from purify.purifiers.anchor import Anchor, AnchorConfig
from purify.train import train


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
    io = VerifiedCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, path)

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
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


@pytest.mark.parametrize(("strategy", "precision", "dtype"), [
    ("deepspeed_stage_1", "bf16-mixed", torch.bfloat16),
    ("deepspeed_stage_2", "bf16-true", torch.bfloat16),
    ("deepspeed_stage_2", "32-true", torch.float32),
    ("ddp", "bf16-mixed", torch.float32),  # autocast's business; only DeepSpeed keeps a bf16 teacher replica
])
def test_deepspeed_bf16_runs_keep_frozen_bf16_teachers(mlp_recipe, strategy, precision, dtype):
    run = build_run(mlp_recipe(strategy=strategy, **{"trainer.precision": precision, "trainer.accelerator": "cpu"}))
    run.distiller.configure_model()  # what Lightning calls before the strategy wraps the model
    teacher = run.distiller.teachers[0]
    assert {p.dtype for p in teacher.parameters()} == {dtype}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert {p.dtype for p in run.distiller.student.parameters()} == {torch.float32}  # the strategy's to cast
    assert run.lineage["teachers"][0]["sha256"] == state_sha256(build_run(mlp_recipe()).teachers[0].module)


def test_bf16_teacher_targets_and_loss_are_float32():
    from transformers import LlamaConfig, LlamaForCausalLM

    from purify.losses import forward_kl

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    student, teacher = LlamaForCausalLM(config), LlamaForCausalLM(config)
    distiller = Distiller(student, [teacher], teacher_dtype=torch.bfloat16)
    distiller.configure_model()
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 32, (3, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": torch.ones(3, 8),
             "num_items": torch.tensor(24)}
    targets = distiller.teacher_targets(batch, torch.bfloat16)  # the dtype of a bf16 student's logits
    assert targets.logits.dtype == torch.float32 and targets.weight.dtype == torch.float32
    loss, _ = distiller.compute_loss(batch, progress=0.0)
    assert loss.dtype == torch.float32
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1]  # bf16 logits (upcast exactly inside forward_kl)
        s = student(input_ids=ids).logits[:, :-1]
    assert t.dtype == torch.bfloat16
    torch.testing.assert_close(loss.detach(), forward_kl(s, t).sum() / 24, atol=1e-6, rtol=1e-6)


def test_teacher_dtype_applies_in_a_plain_loop_after_the_purifiers_saw_full_precision():
    seen = {}

    class Spy(Anchor):  # records the dtype a purifier's setup sees
        def setup(self, ctx):
            seen["dtype"] = next(ctx.teachers[0].parameters()).dtype
            super().setup(ctx)

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    student, teacher = LlamaForCausalLM(config), LlamaForCausalLM(config)
    distiller = Distiller(student, [teacher], teacher_dtype=torch.bfloat16, purifiers=[Spy(AnchorConfig(weight=1e-3))])
    ids = torch.randint(0, 32, (3, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": torch.ones(3, 8)}
    distiller.fit_step(batch, distiller.build_optimizer(), 0.0)
    assert seen["dtype"] == torch.float32  # the purifiers set up at full precision
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}  # was left float32 outside Lightning


def test_fit_step_trains_a_student_given_in_eval_mode_with_its_dropout_on():
    """A from_pretrained student arrives in eval(): a plain loop trained it with dropout off (Lightning's fit switches
    it, on_train_start); the teachers stay in eval()."""
    student, teacher = AuxMLP(in_dim=4, n_aux=3).eval(), AuxMLP(in_dim=4, n_aux=3)
    distiller = Distiller(student, [teacher])
    distiller.fit_step({"x": torch.rand(8, 4), "target_mask": torch.ones(8, 1)}, distiller.build_optimizer(), 0.0)
    assert all(m.training for m in student.modules()) and not any(m.training for m in teacher.modules())


def test_load_from_checkpoint_restores_the_student_and_the_purifier_heads(tmp_path):
    """README: a Lightning checkpoint loads back with the models built as for the run."""
    import copy

    from purify.config import LossConfig
    from purify.purifiers.adversary import Adversary, AdversaryConfig

    torch.manual_seed(0)
    teachers, student = [AuxMLP(in_dim=16, n_aux=3) for _ in range(2)], AuxMLP(in_dim=16, n_aux=3)
    fresh = copy.deepcopy(student)

    def distiller(model):
        return Distiller(model, teachers, loss=LossConfig(logit_slice=[10, 13]),
                         purifiers=[Adversary(AdversaryConfig(weight=0.1))])

    trained = distiller(student)
    batches = [{"x": torch.rand(32, 16) * 2 - 1, "target_mask": torch.ones(32, 1)} for _ in range(4)]
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(trained, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    path = next(tmp_path.rglob("*.ckpt"))
    back = Distiller.load_from_checkpoint(path, student=fresh, teachers=teachers, loss=LossConfig(logit_slice=[10, 13]),
                                          purifiers=[Adversary(AdversaryConfig(weight=0.1))])
    assert back.student is fresh and list(back.purifiers.parameters())  # the heads are built and filled
    for a, b in zip([*student.parameters(), *trained.purifiers.parameters()],
                    [*fresh.parameters(), *back.purifiers.parameters()], strict=True):
        assert torch.equal(a, b)


def test_global_target_count_survives_bf16_input_casting(mlp_recipe):
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision

    from purify.data import DistillDataModule

    recipe = mlp_recipe(**{"data.batch_size": 257})  # 257 targets: not a bf16 number (it rounds to 256)
    data = DistillDataModule(recipe.data, None, recipe.seed)
    data.setup("fit")
    batch = DeepSpeedPrecision("bf16-mixed").convert_input(next(iter(data.train_dataloader())))  # as Lightning does
    assert batch["x"].dtype == torch.bfloat16
    assert batch["num_items"].item() == 257


@pytest.mark.parametrize("purifier", ["{name: function_anchor, weight: 1.0, batch_size: 8, outputs: undistilled}",
                                      "{name: fingerprint_adversary, weight: 1.0, batch_size: 8, ramp: constant}",
                                      "{name: divergence_mask, reference: base, flag: random, rate: 0.3}"])
def test_resumed_run_with_a_neutral_input_stream_equals_uninterrupted_run(mlp_recipe, purifier):
    """A purifier's own random stream (neutral inputs: generator and text order; the random flag's generator) is
    part of the checkpoint."""
    extra = {"purifiers": f"[{purifier}]"}
    full = train(mlp_recipe(steps=20, sub="full", **extra))
    resumed = train(mlp_recipe(steps=20, sub="resumed", resume=str(full / "checkpoints" / "step10.ckpt"), **extra))
    a, b = student_weights(full), student_weights(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_a_run_killed_while_saving_a_checkpoint_resumes_in_place_from_its_latest_one(mlp_recipe):
    """checkpoints/lineage.json is written as a save begins: a launch killed before the file landed (a SIGKILL, an
    out-of-memory kill, a full disk) left the record one save ahead of every checkpoint, and each in-place resume was
    refused, the one its advice named included."""
    import json

    from purify.train import latest_checkpoint

    run = train(mlp_recipe(steps=20, sub="k"))
    record = run / "checkpoints" / "lineage.json"
    ahead = {**json.loads(record.read_text()), "step": 30}  # the save at step 30 never landed
    record.write_text(json.dumps(ahead))
    latest = latest_checkpoint(run / "checkpoints")
    assert latest is not None and latest.name in ("last.ckpt", "step20.ckpt")
    train(mlp_recipe(steps=40, sub="k", resume=str(latest)))
    assert read_lineage(run)["status"] == "finished" and read_lineage(run)["step"] == 40


def test_a_run_is_never_rewound_or_replaced_by_a_resume(mlp_recipe, tmp_path):
    from purify.types import RecipeError

    full = train(mlp_recipe(steps=20, sub="full"))
    other = train(mlp_recipe(steps=10, sub="other"))
    before = {p: p.read_bytes() for p in full.rglob("*") if p.is_file()}
    with pytest.raises(RecipeError, match=r"resume: .*step10\.ckpt is at step 10, but .*full holds that run up to step "
                                          r"20; resuming there would overwrite it: give a new output_dir to replay "
                                          r"from step 10, or resume=.*full/checkpoints/last\.ckpt to continue"):
        train(mlp_recipe(steps=20, sub="full", resume=str(full / "checkpoints" / "step10.ckpt")))
    with pytest.raises(RecipeError, match=r"resume: .*other/checkpoints/last\.ckpt is not a checkpoint of .*full, "
                                          r"which already holds another run; give a new output_dir"):
        train(mlp_recipe(steps=20, sub="full", resume=str(other / "checkpoints" / "last.ckpt")))
    # a changed recipe continued in place would leave a record of one run that never was (teachers, loss, seed …)
    with pytest.raises(RecipeError, match=r"resume: the recipe differs from the one .*full was trained with "
                                          r"\(loss.name, seed\); continuing in place would record one run that never "
                                          r"was: give a new output_dir"):
        train(mlp_recipe(steps=30, sub="full", resume=str(full / "checkpoints" / "last.ckpt"),
                         **{"loss.name": "reverse_kl", "seed": 5}))
    assert {p: p.read_bytes() for p in full.rglob("*") if p.is_file()} == before  # nothing written

    # from its latest checkpoint a run continues in place: its logs kept, no `-v1` checkpoint copies; its directory
    # however spelt (a relative or otherwise spelt output_dir was "a recipe that differs (output_dir)")
    train(mlp_recipe(steps=30, sub="full", resume=str(full / "checkpoints" / "last.ckpt"),
                     output_dir=f"{full.parent}/./{full.name}/"))
    record = read_lineage(full)
    assert record["status"] == "finished" and record["step"] == 30
    # each launch and the length it planned its schedule over (the first 20 steps followed a 20-step plan)
    assert record["segments"] == [{"resume": None, "from_step": 0, "max_steps": 20},
                                  {"resume": str(full / "checkpoints" / "last.ckpt"), "from_step": 20, "max_steps": 30}]
    assert (full / "logs" / "metrics.csv").read_bytes() == before[full / "logs" / "metrics.csv"]
    resumed_steps = [int(r.split(",")[1]) for r in (full / "logs" / "resumed-1" / "metrics.csv").read_text()
                     .splitlines()[1:] if r.split(",")[1]]
    assert resumed_steps and min(resumed_steps) >= 20
    assert sorted(p.name for p in (full / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt", "step10.ckpt", "step20.ckpt", "step30.ckpt"]


def test_a_run_started_from_another_runs_checkpoint_records_that_run_and_the_checkpoints_tensors(mlp_recipe):
    """Its record said the whole run used its own (changed) loss from the random init, and named the checkpoint by
    path only (a last.ckpt that its run then rewrites); now it carries the checkpoint's step and tensor sha256 and the
    source run's record, and keeps them when it is continued in place."""
    import torch

    from purify.checkpoint import INTEGRITY_KEY

    source = train(mlp_recipe(steps=10, sub="source"))
    ckpt = source / "checkpoints" / "step10.ckpt"
    resumed = train(mlp_recipe(steps=14, sub="resumed", resume=str(ckpt), **{"loss.name": "reverse_kl"}))
    record = read_lineage(resumed)
    origin = record["resumed_from"]
    assert origin["checkpoint"] == str(ckpt.resolve()) and origin["step"] == 10 and origin["run"] == str(source)
    assert origin["tensors_sha256"] == torch.load(ckpt, weights_only=True)[INTEGRITY_KEY]["sha256"]
    assert origin["run_lineage"]["recipe"]["loss"]["name"] == "forward_kl" and record["recipe"]["loss"]["name"] == \
        "reverse_kl"
    assert record["segments"] == [{"resume": str(ckpt), "from_step": 10, "max_steps": 14}]
    train(mlp_recipe(steps=16, sub="resumed", resume=str(resumed / "checkpoints" / "last.ckpt"),
                     **{"loss.name": "reverse_kl"}))
    again = read_lineage(resumed)
    assert again["resumed_from"] == origin and [s["from_step"] for s in again["segments"]] == [10, 14]
    from purify.lineage import format_lineage  # `purify lineage show` says so too (it printed neither)

    shown = format_lineage(again).splitlines()
    assert f"resumed from: {ckpt.resolve()} (step 10 of run {source}; trained there with teacher(s) " in \
        next(line for line in shown if line.startswith("resumed from:"))
    assert shown[[i for i, line in enumerate(shown) if line.startswith("resumed from:")][0]].endswith(
        ", loss forward_kl)")
    assert [line for line in shown if line.startswith("launch:")] == [
        f"launch: from step 10 (max_steps 14), resumed from {ckpt}",
        f"launch: from step 14 (max_steps 16), resumed from {resumed / 'checkpoints' / 'last.ckpt'}"]
    assert any(line.startswith("loss: name=reverse_kl") for line in shown)
    # the checkpoint carries its run's record: a damaged lineage.json beside it, or a copy of it in another run's
    # checkpoints/ (which was credited to that run, with its teacher and loss), still names the run that trained it
    (source / "lineage.json").write_text('{"damaged": ')
    other = read_lineage(train(mlp_recipe(steps=12, sub="other", resume=str(ckpt))))
    assert other["resumed_from"]["run_lineage"]["recipe"]["loss"]["name"] == "forward_kl"
    assert other["resumed_from"]["run"] == str(source) and other["resumed_from"]["step"] == 10
    import shutil

    copied = resumed / "checkpoints" / "copied.ckpt"  # a run trained with reverse_kl
    shutil.copy(ckpt, copied)
    third = read_lineage(train(mlp_recipe(steps=12, sub="third", resume=str(copied))))
    assert third["resumed_from"]["run"] == str(source) and third["resumed_from"]["checkpoint"] == str(copied)
    assert third["resumed_from"]["run_lineage"]["recipe"]["loss"]["name"] == "forward_kl"


def test_a_checkpoints_record_says_which_validation_its_metrics_come_from(mlp_recipe):
    """A checkpoint is written before its own step's validation, so checkpoints/lineage.json carried the previous
    validation's val/* under the checkpoint's step, and `purify lineage show` printed them as that step's."""
    from purify.lineage import format_lineage

    out = train(mlp_recipe(steps=20, sub="val"))
    at_checkpoint = read_lineage(out / "checkpoints" / "lineage.json")
    assert at_checkpoint["step"] == 20 and at_checkpoint["validated_at_step"] == 10 and "val/kl" in \
        at_checkpoint["metrics"]
    assert "(val/* from the validation at step 10)" in format_lineage(at_checkpoint)
    final = read_lineage(out)
    assert final["validated_at_step"] == 20 and "val/* from" not in format_lineage(final)


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signalled_run_exits_with_the_signals_code_and_says_it_failed(tmp_path, sig, code):
    """A scheduler's SIGTERM made Lightning end the fit with a code-less SystemExit: the shell saw a success."""
    import signal
    import subprocess
    import sys
    import time

    from omegaconf import OmegaConf

    from tests.conftest import mlp_overrides

    out, recipe = tmp_path / "o", tmp_path / "recipe.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(mlp_overrides(out, steps=10**6, **{"trainer.checkpoint_every_n_steps": 5})),
                   recipe)
    # output to files, not pipes: a child blocked writing to a full pipe nobody reads yet would stall the test
    log = tmp_path / "stderr.txt"
    with open(tmp_path / "stdout.txt", "w") as stdout, open(log, "w") as stderr:
        # SIGINT back to its default in the child: a test run started in the background of a non-interactive shell
        # (`make test &`) ignores SIGINT, the child inherits that, and Python then never raises KeyboardInterrupt
        proc = subprocess.Popen([sys.executable, "-m", "purify", "train", str(recipe)], stdout=stdout, stderr=stderr,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "step5.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and (out / "checkpoints" / "step5.ckpt").exists(), log.read_text()[-2000:]
        proc.send_signal(getattr(signal, sig))
        try:
            proc.wait(timeout=240)
        finally:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert f"purify: error: train: stopped by {sig} at step" in lines[-1]
    assert "says status: failed; resume=" in lines[-1]
    assert "Traceback" not in err
    record = read_lineage(out)
    assert record["status"] == "failed" and record["error"] == f"stopped by {sig}"


def test_a_sigterm_while_exporting_fails_the_run_and_resume_finishes_it(tmp_path, mlp_recipe):
    """After the fit Lightning's handler is gone: a SIGTERM during the export killed the process with lineage.json
    saying running and no error line; and the resume=last.ckpt the SIGINT message named was refused ("nothing left
    to train"). Now: exit 143, one line, status failed; that resume exports the run without training."""

    from omegaconf import OmegaConf

    from tests.conftest import mlp_overrides

    out, recipe = tmp_path / "run", tmp_path / "recipe.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(mlp_overrides(out, steps=10)), recipe)
    line = _sigterm_while(tmp_path, recipe, "purify.train", "export_student")
    assert line.startswith("purify: error: train: stopped by SIGTERM while exporting (training had finished, step "
                           "10); ") and line.endswith("checkpoints/last.ckpt to export it"), line
    failed = read_lineage(out)
    assert failed["status"] == "failed" and not (out / "student").exists()
    train(mlp_recipe(steps=10, sub="run", resume=str(out / "checkpoints" / "last.ckpt")))  # was "nothing left"
    record = read_lineage(out)
    assert record["status"] == "finished" and record["step"] == 10 and (out / "student" / "lineage.json").is_file()
    # the metrics of the launch that trained it, with the step of their validation: they were the last checkpoint's
    # record's, written as that save began (an earlier validation's val/*), without validated_at_step
    assert failed["validated_at_step"] == 10 and failed["metrics"] != {}
    assert (record["metrics"], record["validated_at_step"]) == (failed["metrics"], 10)
    saved = read_lineage(out / "checkpoints" / "lineage.json")  # written before step 10's (the only) validation
    assert "val/kl" in record["metrics"] and "val/kl" not in saved["metrics"]
    # killed outright while exporting (SIGKILL after a SIGTERM's grace period): lineage.json still says running
    import json
    import shutil

    shutil.rmtree(out / "student")
    (out / "lineage.json").write_text(json.dumps({**record, "status": "running"}))
    train(mlp_recipe(steps=10, sub="run", resume=str(out / "checkpoints" / "last.ckpt")))
    assert read_lineage(out)["status"] == "finished" and (out / "student" / "lineage.json").is_file()
    # a finished run at its max_steps is still refused: there is nothing to train or export
    from purify.types import RecipeError

    with pytest.raises(RecipeError, match=r"is at step 10, and trainer.max_steps is 10: nothing left to train"):
        train(mlp_recipe(steps=10, sub="run", resume=str(out / "checkpoints" / "last.ckpt")))

def test_a_ddp_run_left_unexported_is_finished_in_place(tmp_path):
    """Under DDP the ranks Lightning launches start after rank 0 rewrote lineage.json (status running): they refused
    the resume at max_steps ("nothing left to train"), Lightning killed rank 0, and the run was left running for good.
    The launch's first process decides; every rank follows."""
    import json
    import shutil
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from tests.conftest import mlp_overrides

    out, recipe = tmp_path / "o", tmp_path / "recipe.yaml"
    ddp = ["strategy=ddp", "trainer.devices=2", "data.batch_size=8"]
    OmegaConf.save(OmegaConf.from_dotlist(mlp_overrides(out, steps=4, **{"trainer.checkpoint_every_n_steps": 2})
                                          + ddp), recipe)
    first = subprocess.run([sys.executable, "-m", "purify", "train", str(recipe)], capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.rmtree(out / "student")  # as if killed outright while exporting
    (out / "lineage.json").write_text(json.dumps({**read_lineage(out), "status": "running"}))
    again = subprocess.run([sys.executable, "-m", "purify", "train", str(recipe),
                            f"resume={out / 'checkpoints' / 'last.ckpt'}"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert read_lineage(out)["status"] == "finished" and (out / "student" / "lineage.json").is_file()

def test_a_sigterm_to_a_ddp_job_stops_every_rank_with_one_line(tmp_path):
    """Lightning's SIGTERM handler broadcast from rank 0 inside the handler: signalled while rank 0 wrote a checkpoint
    (rank 1 waiting at the barrier after it), the job hung for good; a SIGTERM at another moment printed rank 1's
    connection traceback. Every rank now stops at the same step: exit 143, one line, lineage failed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from omegaconf import OmegaConf

    from tests.conftest import mlp_overrides

    out, recipe = tmp_path / "o", tmp_path / "recipe.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(mlp_overrides(out, steps=10**6, **{"trainer.checkpoint_every_n_steps": 5})
                                          + ["strategy=ddp", "trainer.devices=2", "data.batch_size=8"]), recipe)
    log = tmp_path / "stderr.txt"
    with open(tmp_path / "stdout.txt", "w") as stdout, open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "purify", "train", str(recipe)], stdout=stdout, stderr=stderr,
                                start_new_session=True)  # its own process group: the signal reaches both ranks
        try:
            deadline = time.monotonic() + 240
            while not (out / "checkpoints" / "step5.ckpt").exists() and proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, log.read_text()[-2000:]
            os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does; here while rank 0 writes last.ckpt
            proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    err = log.read_text()
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("purify: error:")]
    assert len(lines) == 1 and "stopped by SIGTERM at step" in lines[0], lines  # rank 0 says it, once
    assert read_lineage(out)["status"] == "failed"


def test_a_process_count_change_under_a_global_batch_is_no_recipe_change(tmp_path):
    """Documented as allowed, always refused: data.batch_size, derived per process from data.global_batch_size,
    changed with trainer.devices and was not exempt."""
    from purify.assembly import load_recipe
    from purify.config import to_yaml
    from purify.train import _changed_keys

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    ddp = ["strategy=ddp", "trainer.accelerator=cpu", "data.global_batch_size=16"]
    two = load_recipe(recipe, [*ddp, "trainer.devices=2"])
    (tmp_path / "recipe.yaml").write_text(to_yaml(two))
    one = load_recipe(recipe, [*ddp, "trainer.devices=1"])
    assert (two.data.batch_size, one.data.batch_size) == (8, 16)
    assert _changed_keys(tmp_path, one) == []
    assert _changed_keys(tmp_path, load_recipe(recipe, [*ddp, "trainer.devices=1", "seed=3"])) == ["seed"]


def test_continuing_in_place_on_data_with_other_contents_is_refused(tmp_path):
    """The recipe text was compared, the files it names were not: a run resumed on rewritten data at the same path
    trained on, and its record then named only the new file's sha256 for every step."""
    from purify.assembly import load_recipe
    from purify.types import RecipeError

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    data, out = tmp_path / "d.jsonl", tmp_path / "run"
    write = lambda verb: data.write_text("".join(  # noqa: E731
        json.dumps({"prompt": "The boy", "completion": f" {verb} a book {i}."}) + "\n" for i in range(40)))
    write("opened")
    small = [f"data.train={data}", f"output_dir={out}", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
             "trainer.checkpoint_every_n_steps=2", "trainer.enable_progress_bar=false"]
    train(load_recipe(recipe, [*small, "trainer.max_steps=2"]))
    more = load_recipe(recipe, [*small, "trainer.max_steps=4", f"resume={out / 'checkpoints' / 'last.ckpt'}"])
    write("closed")
    with pytest.raises(RecipeError, match=rf"resume: data file {data} changed since {out} was trained \(same path, "
                                          r"other contents"):
        train(more)
    write("opened")  # restored: the run continues in place
    assert read_lineage(train(more))["step"] == 4


def test_a_purifiers_source_file_with_other_contents_is_a_changed_input():
    """A function anchor's neutral text rewritten at the same path between launches went unnoticed: the continued
    run's record named only the new file's sha256."""
    from purify.train import _changed_contents

    record = {"purifiers": [{"name": "function_anchor", "source": "n.txt", "source_sha256": "aa"}, {"name": "anchor"}]}
    assert _changed_contents(record, record) == []
    other = {"purifiers": [{**record["purifiers"][0], "source_sha256": "bb"}, {"name": "anchor"}]}
    assert _changed_contents(record, other) == ["purifiers[0]'s source n.txt"]


def test_a_second_launch_into_a_directory_another_is_writing_is_refused(mlp_recipe, tmp_path):
    """Two launches started together both passed the existing-run check and wrote one directory (one recipe.yaml
    beside the other's lineage.json, a mixed metrics.csv, "run written" exit 0)."""
    import fcntl
    import os

    from purify.types import RecipeError

    recipe = mlp_recipe(steps=2, sub="shared")
    out = Path(recipe.output_dir)
    out.mkdir(parents=True)
    fd = os.open(out, os.O_RDONLY)  # what the first launch holds while it writes the run
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(RecipeError, match=rf"output_dir: another launch is writing {out} right now; wait for it"):
            train(recipe)
        assert list(out.iterdir()) == []  # nothing written
    finally:
        os.close(fd)
    assert read_lineage(train(recipe))["status"] == "finished"  # and once it ended, the launch goes ahead


def test_a_file_system_that_cannot_lock_does_not_stop_a_launch(mlp_recipe, monkeypatch):
    """Some Lustre/NFS mounts refuse flock altogether (ENOLCK, EOPNOTSUPP): that is not another launch."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert read_lineage(train(mlp_recipe(steps=2, sub="nolock")))["status"] == "finished"


def test_continuing_a_finished_run_without_export_is_refused_while_its_old_export_is_there(mlp_recipe):
    """student/ stayed the step-10 model beside a lineage.json that said finished at step 12."""
    from purify.types import RecipeError

    out = train(mlp_recipe(steps=10, sub="exported"))
    more = mlp_recipe(steps=12, sub="exported", resume=str(out / "checkpoints" / "last.ckpt"), export="false")
    with pytest.raises(RecipeError, match=r"export: false would leave .*exported's student \(an earlier step's "
                                          r"export\) beside the continued run's record"):
        train(more)
    import shutil

    shutil.move(out / "student", out.parent / "step10-student")
    assert read_lineage(train(more))["step"] == 12 and not (out / "student").exists()


def test_a_float16_run_that_overflows_names_the_precision(tmp_path):
    """A 16-true run that diverged was told to lower the learning rate or check the data."""
    teacher = AuxMLP(in_dim=4, hidden=[8], n_aux=2)
    with torch.no_grad():
        teacher.head.weight.fill_(1e5)  # logits past float16's range
    distiller = Distiller(AuxMLP(in_dim=4, hidden=[8], n_aux=2), [teacher])
    batch = {"x": torch.rand(8, 4), "target_mask": torch.ones(8, 1)}
    loader = torch.utils.data.DataLoader([batch] * 4, batch_size=None)
    trainer = L.Trainer(max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, precision="16-true",
                        accelerator="cpu")
    with pytest.raises(FloatingPointError, match=r"Under trainer\.precision 16-true, float16 overflows easily"):
        trainer.fit(distiller, train_dataloaders=loader)


def test_the_checkpoint_to_continue_from_is_the_furthest_on(tmp_path):
    """A kill between Lightning's writes of step10.ckpt and last.ckpt left last.ckpt at step 5: the advice named
    last.ckpt, which resuming in place refuses as behind the run (a loop); the furthest checkpoint is named now."""
    from purify.train import latest_checkpoint

    torch.save({"global_step": 5}, tmp_path / "step5.ckpt")
    torch.save({"global_step": 5}, tmp_path / "last.ckpt")
    assert latest_checkpoint(tmp_path) == tmp_path / "last.ckpt"  # up to date: last.ckpt, as before
    torch.save({"global_step": 10}, tmp_path / "step10.ckpt")
    assert latest_checkpoint(tmp_path) == tmp_path / "step10.ckpt"
    torch.save({"global_step": 10}, tmp_path / "last.ckpt")
    assert latest_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    (tmp_path / "last.ckpt").unlink()
    (tmp_path / "last.ckpt").mkdir()  # a DeepSpeed directory cut short (no states): no checkpoint to continue from
    assert latest_checkpoint(tmp_path) == tmp_path / "step10.ckpt"


@pytest.mark.parametrize("strategy", ["auto", "ddp"])
def test_inside_a_slurm_job_lightnings_requeue_is_off(mlp_recipe, monkeypatch, strategy):
    """Lightning's SLURMEnvironment(auto_requeue=True) answered SIGUSR1 (the usual --signal=USR1 pre-emption set-up)
    by writing hpc_ckpt_1.ckpt into the run directory and requeueing the job, whose command line no resume check let
    through; purify continues its runs with resume=."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from purify.train import make_trainer

    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "purify", "SLURM_NTASKS_PER_NODE": "1",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242",
                       "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1"}.items():
        monkeypatch.setenv(key, value)
    trainer = make_trainer(mlp_recipe(strategy=strategy), [], None)
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
    # with Lightning's requeue off nothing handled SIGUSR1 (--signal=USR1@90): its default action killed the run
    # without a line; during the fit it is a SIGTERM, which stops it at a step's end
    import os
    import signal

    from purify.train import _slurm_usr1_as_sigterm

    seen: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with _slurm_usr1_as_sigterm():
            os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_sigterm_while_the_fit_is_set_up_fails_the_run_with_one_line(tmp_path, mlp_recipe):
    """Lightning installs its SIGTERM handler at the end of the fit's set-up (strategy, configure_model, the
    checkpoint's restore — minutes for a large model): a SIGTERM before it killed the process with exit 143, no line,
    and lineage.json saying running (a finished run being continued lost its finished record)."""

    from omegaconf import OmegaConf

    from tests.conftest import mlp_overrides

    out = train(mlp_recipe(steps=10, sub="run"))
    recipe = tmp_path / "recipe.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(mlp_overrides(out, steps=20, resume=out / "checkpoints" / "last.ckpt")),
                   recipe)
    line = _sigterm_while(tmp_path, recipe, "purify.checkpoint", "VerifiedCheckpointIO.load_checkpoint")
    assert line.startswith("purify: error: train: stopped by SIGTERM at step 10; ") and \
        line.endswith("checkpoints/last.ckpt to continue"), line
    record = read_lineage(out)
    assert (record["status"], record["step"], record["error"]) == ("failed", 10, "stopped by SIGTERM")
    train(mlp_recipe(steps=20, sub="run", resume=str(out / "checkpoints" / "last.ckpt")))
    assert read_lineage(out)["status"] == "finished" and read_lineage(out)["step"] == 20


@pytest.mark.parametrize("full_at", [20, 10])
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_the_run_resumes_in_place(mlp_recipe, monkeypatch,
                                                                                         capsys, tmp_path, full_at):
    """An OSError (No space left on device) from a checkpoint write was a 60-line traceback, exit 1; and the record,
    written as the save began, said a step no checkpoint held, which refused every resume."""
    import errno

    from omegaconf import OmegaConf

    import purify.checkpoint
    from purify.cli import main
    from tests.conftest import mlp_overrides

    save = purify.checkpoint.VerifiedCheckpointIO.save_checkpoint

    def full(self, checkpoint, path, *args, **kwargs):
        if checkpoint["global_step"] >= full_at:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(self, checkpoint, path, *args, **kwargs)

    monkeypatch.setattr(purify.checkpoint.VerifiedCheckpointIO, "save_checkpoint", full)
    out, recipe = tmp_path / "run", tmp_path / "recipe.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(mlp_overrides(out, steps=30)), recipe)
    assert main(["train", str(recipe)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("purify: error: train: cannot write (") and \
        f"No space left on device) at step {full_at}; " in err[0], err
    if full_at == 10:  # no checkpoint yet
        assert err[0].endswith("free space or fix the file system, then start it again (no checkpoint was written "
                               "yet)"), err
        return
    assert err[0].endswith("says status: failed; free space or fix the file system, then resume=" +
                           str(out / "checkpoints" / "last.ckpt") + " to continue"), err  # last.ckpt: step 10
    assert read_lineage(out)["status"] == "failed"
    monkeypatch.setattr(purify.checkpoint.VerifiedCheckpointIO, "save_checkpoint", save)
    train(mlp_recipe(steps=30, sub="run", resume=str(out / "checkpoints" / "last.ckpt")))
    assert read_lineage(out)["status"] == "finished" and read_lineage(out)["step"] == 30


def test_a_deepspeed_runs_advice_and_resume_check_read_the_same_furthest_whole_checkpoint(tmp_path):
    """latest_checkpoint could not read a DeepSpeed directory's step and always advised last.ckpt, which the resume
    check refused when a further step<N> directory was whole (a kill between Lightning's two saves); a directory cut
    short (a shard missing) is no checkpoint to continue from."""
    from purify.train import _resumable, latest_checkpoint

    def deepspeed(name: str, step: int, whole: bool = True) -> None:
        states = tmp_path / name / "checkpoint"
        states.mkdir(parents=True)
        torch.save({"global_step": step, "param_shapes": [{"student.w": (2, 2)}], "dp_world_size": 1},
                   states / "mp_rank_00_model_states.pt")
        if whole:
            torch.save({}, states / "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    deepspeed("last.ckpt", 100)
    deepspeed("step100.ckpt", 100)
    assert latest_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    assert _resumable(tmp_path) == (100, tmp_path / "last.ckpt")
    deepspeed("step200.ckpt", 200)
    assert latest_checkpoint(tmp_path) == tmp_path / "step200.ckpt"
    assert _resumable(tmp_path) == (200, tmp_path / "step200.ckpt")
    deepspeed("step300.ckpt", 300, whole=False)  # killed while its shards were written
    assert latest_checkpoint(tmp_path) == tmp_path / "step200.ckpt"
    assert _resumable(tmp_path) == (200, tmp_path / "step200.ckpt")


def test_stopped_exports_in_a_row_keep_the_metrics_of_the_launch_that_trained(mlp_recipe, monkeypatch):
    """An export-only relaunch wrote its running and failed records without metrics: a second stopped export lost
    val/* and validated_at_step again, and the finished record took an earlier validation's from the checkpoint."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import purify.train
    from purify.types import TrainingStopped

    export = purify.train.export_student

    def stopped(*args, **kwargs):
        raise SIGTERMException()

    monkeypatch.setattr(purify.train, "export_student", stopped)
    with pytest.raises(TrainingStopped):
        train(mlp_recipe(steps=10, sub="run"))
    out = Path(mlp_recipe(steps=10, sub="run").output_dir)
    trained = read_lineage(out)
    assert trained["validated_at_step"] == 10 and "val/kl" in trained["metrics"]
    again = mlp_recipe(steps=10, sub="run", resume=str(out / "checkpoints" / "last.ckpt"))
    with pytest.raises(TrainingStopped):  # stopped while exporting, a second time
        train(again)
    record = read_lineage(out)
    assert record["status"] == "failed" and (record["metrics"], record["validated_at_step"]) == (
        trained["metrics"], 10)
    monkeypatch.setattr(purify.train, "export_student", export)
    record = read_lineage(train(again))
    assert record["status"] == "finished" and (record["metrics"], record["validated_at_step"]) == (
        trained["metrics"], 10)


def test_purifys_sigterm_handler_steps_aside_while_lightnings_is_installed(mlp_recipe):
    """Lightning's handler calls the handler it found after its own: without the guard purify's would raise in the
    middle of a step (a checkpoint write, a collective) instead of letting Lightning stop the fit at the step's end."""
    import os
    import signal

    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from purify.train import _sigterm_raises, make_trainer

    trainer, noted = make_trainer(mlp_recipe(), [], None), []
    with _sigterm_raises(trainer):
        ours = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _HandlersCompose([lambda signum, frame: noted.append(signum), ours]))
        os.kill(os.getpid(), signal.SIGTERM)  # as during the fit: Lightning notes it, purify's does nothing
        assert noted == [signal.SIGTERM]
        signal.signal(signal.SIGTERM, ours)  # Lightning's teardown puts it back
        with pytest.raises(SIGTERMException):
            os.kill(os.getpid(), signal.SIGTERM)
    # the fit's is armed only once its processes have met (SigtermAtStepEnd.setup): in the rendezvous a Python handler
    # cannot run, and a SIGTERM to a launch whose ranks never meet waited out the rendezvous timeout
    before = signal.getsignal(signal.SIGTERM)
    with _sigterm_raises(trainer, armed=False) as arm:
        assert signal.getsignal(signal.SIGTERM) is before
        arm()
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_export_removes_what_a_killed_export_left_beside_it(mlp_recipe):
    """A SIGKILL while exporting left .student.tmp-* (a complete-looking model) beside student/ for good."""
    recipe = mlp_recipe(steps=5, sub="run")
    out = Path(recipe.output_dir)
    out.mkdir(parents=True)
    (out / ".student.tmp-killed").mkdir()
    (out / ".student.tmp-killed" / "model.safetensors").write_text("half")
    train(recipe)
    assert (out / "student" / "lineage.json").is_file() and not list(out.glob(".student*"))


def _sigterm_while(tmp_path: Path, recipe: Path, module: str, attribute: str) -> str:
    """Run ``purify train recipe`` in a process where ``module``'s ``attribute`` (``"f"`` or ``"Class.f"``) first
    marks that it was reached and waits; SIGTERM it there; assert exit 143 without a traceback; return its last
    stderr line."""
    import signal
    import subprocess
    import sys
    import time

    marker, log = tmp_path / "reached", tmp_path / "stderr.txt"
    *owner, name = attribute.split(".")
    code = (f"import importlib, pathlib, sys, time\nowner = importlib.import_module({module!r})\n"
            f"for part in {owner!r}:\n    owner = getattr(owner, part)\nreal = getattr(owner, {name!r})\n"
            f"def slow(*a, **k):\n    pathlib.Path({str(marker)!r}).touch()\n    time.sleep(120)\n"
            f"    return real(*a, **k)\nsetattr(owner, {name!r}, slow)\nfrom purify.cli import main\n"
            f"sys.exit(main(['train', {str(recipe)!r}]))")
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 240
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert marker.exists(), log.read_text()[-2000:]
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    return err.strip().splitlines()[-1]
