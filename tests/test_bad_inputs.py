"""The bad-input table: every user mistake ends in `purify: error:` lines naming it, exit 2, no traceback, and no
directory that looks like a finished run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from purify.cli import main
from purify.lm import build_tokenizer
from tests._lm_recipe import tiny_lm_overrides
from tests.conftest import mlp_overrides

TEXTS = ["the cat sat on the mat", "a dog ran far", "birds sing at dawn", "we go home now"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny LM recipe's pieces: a saved char tokenizer and a good jsonl."""
    root = tmp_path_factory.mktemp("lm")
    build_tokenizer(TEXTS, kind="char").save_pretrained(root / "tok")
    (root / "good.jsonl").write_text("".join(json.dumps({"prompt": t[:4], "completion": t[4:]}) + "\n" for t in TEXTS))
    (root / "empty.jsonl").write_text("")
    (root / "nocompletion.jsonl").write_text('{"prompt": "the cat"}\n')
    (root / "notjson.jsonl").write_text('{"prompt": "a", "completion": "b"}\nthis is not json\n')
    (root / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9", "completion": "cr\u00e8me"}\n'.encode("latin-1"))
    return root


def lm_args(root: Path, out: Path, **extra: object) -> list[str]:
    return tiny_lm_overrides(root / "tok", root / "good.jsonl", out, **{
        "trainer.max_steps": 4, "trainer.val_check_interval": 2, "trainer.checkpoint_every_n_steps": 2, **extra})


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def looks_finished(out: Path) -> bool:
    """A directory a reader could take for a finished run: an export, or lineage without a failure mark."""
    lineage = out / "lineage.json"
    if (out / "student").exists():
        return True
    return lineage.is_file() and json.loads(lineage.read_text()).get("status") != "failed"


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    """A real checkpoint of the MLP recipe (trained 4 steps), to damage in several ways."""
    out = tmp_path_factory.mktemp("good") / "run"
    assert main(["train", str(_write_recipe(out.parent, mlp_overrides(out, steps=4)))]) == 0
    return out / "checkpoints" / "last.ckpt"


def _write_recipe(directory: Path, overrides: list[str]) -> Path:
    from omegaconf import OmegaConf

    path = directory / "recipe.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(overrides), path)
    return path


def _damaged(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "garbage":  # 4 KB of noise in the middle of the file (inside tensor bytes)
        mid = len(data) // 2
        data[mid:mid + 4096] = torch.randint(0, 256, (min(4096, len(data) - mid),), dtype=torch.uint8).numpy().tobytes()
    elif how == "truncated":
        data = data[: len(data) // 3]
    elif how == "header":
        data[:64] = b"\x00" * 64
    dst.write_bytes(bytes(data))
    return dst


CASES = {
    "two bad keys": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", **{"trainer.max_stepz": 3, "data.batchsize": 2}),
                     [r"trainer\.max_stepz: unknown key; did you mean 'max_steps'",
                      r"data\.batchsize: unknown key; did you mean 'batch_size'"]),
    "schema and semantic problems together": (
        lambda lm, tmp, ck: mlp_overrides(tmp / "o", **{"trainer.max_stepz": 3, "optim.lr": -1,
                                                        "purifiers": "[{name: anchr}]"}),
        [r"trainer\.max_stepz: unknown key", r"optim\.lr: must be a finite number > 0, got -1",
         r"purifiers\[0\]\.name: unknown purifier"]),
    "wrong type": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", **{"trainer.max_steps": "abc"}),
                   [r"trainer\.max_steps: .*'abc'"]),
    "config values transformers refuses": (lambda lm, tmp, ck: lm_args(lm, tmp / "o", **{
        "student.config.hidden_size": 1.5, "teachers.0.config.num_attention_heads": 3}),
        [r"student\.config: .*'hidden_size' expected int, got float .*; see the model type's transformers config",
         r"teachers\[0\]\.config: .*hidden size \(16\) is not a multiple of the number of attention heads \(3\)"]),
    "negative seeds": (lambda lm, tmp, ck: lm_args(lm, tmp / "o", **{"seed": -1, "student.seed": 2**32}),
                       [r"error: seed: must be a seed, an integer in \[0, 2\*\*32\), got -1",
                        r"student\.seed: must be a seed, an integer in \[0, 2\*\*32\), got 4294967296"]),
    "missing data file": (lambda lm, tmp, ck: lm_args(lm, tmp / "o", **{"data.train": tmp / "nope.jsonl"}),
                          [r"data\.train: file not found: .*nope\.jsonl"]),
    "empty jsonl": (lambda lm, tmp, ck: lm_args(lm, tmp / "o", **{"data.train": lm / "empty.jsonl"}),
                    [r"empty\.jsonl: no records; the data set is empty"]),
    "record without completion": (lambda lm, tmp, ck: lm_args(lm, tmp / "o",
                                                               **{"data.train": lm / "nocompletion.jsonl"}),
                                  [r"nocompletion\.jsonl:1: expected an object with a string 'completion'"]),
    "non-JSON line": (lambda lm, tmp, ck: lm_args(lm, tmp / "o", **{"data.train": lm / "notjson.jsonl"}),
                      [r"notjson\.jsonl:2: invalid JSON"]),
    "missing checkpoint": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", resume=tmp / "nope.ckpt"),
                           [r"resume: checkpoint not found: .*nope\.ckpt"]),
    "damaged checkpoint": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", steps=8,
                                                             resume=_damaged(ck, tmp / "g.ckpt", "garbage")),
                           [r"resume: .*g\.ckpt (is damaged|cannot be read|holds non-finite)"]),
    "truncated checkpoint": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", steps=8,
                                                               resume=_damaged(ck, tmp / "t.ckpt", "truncated")),
                             [r"resume: .*t\.ckpt cannot be read as a checkpoint "
                              r".*truncated, damaged or not a checkpoint"]),
    "corrupted header": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", steps=8,
                                                           resume=_damaged(ck, tmp / "h.ckpt", "header")),
                         [r"resume: .*h\.ckpt cannot be read as a checkpoint"]),
    "foreign file": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", steps=8, resume=_foreign(tmp)),
                     [r"resume: .*foreign\.ckpt is not a Lightning checkpoint"]),
    "other model's checkpoint": (lambda lm, tmp, ck: mlp_overrides(
        tmp / "o", steps=8, resume=ck, student="{arch: aux_mlp, kwargs: {in_dim: 16, hidden: [64], n_aux: 3}}"),
        [r"resume: .*last\.ckpt was written for another model"]),
    "checkpoint without the recipe's purifier head": (lambda lm, tmp, ck: mlp_overrides(
        tmp / "o", steps=8, resume=ck, purifiers="[{name: fingerprint_adversary, weight: 1.0, batch_size: 8}]"),
        [r"resume: .*last\.ckpt was written for another model \(\d+ tensors are missing, e\.g\. purifiers\.0\."]),
    "DeepSpeed checkpoint without DeepSpeed": (lambda lm, tmp, ck: mlp_overrides(
        tmp / "o", steps=8, resume=_deepspeed_layout(tmp / "ds.ckpt")),
        [r"resume: .*ds\.ckpt is a DeepSpeed checkpoint \(a directory of shards\); resume it with the strategy"]),
    "single-file checkpoint under DeepSpeed": (lambda lm, tmp, ck: mlp_overrides(
        tmp / "o", steps=8, resume=ck, strategy="deepspeed_stage_1"),
        [r"resume: .*last\.ckpt is a single-file checkpoint; deepspeed_stage_1 resumes only its own sharded"]),
    "output_dir is a file": (lambda lm, tmp, ck: mlp_overrides(_file(tmp / "taken")),
                             [r"output_dir: .*taken is an existing file"]),
    "output_dir under a file": (lambda lm, tmp, ck: mlp_overrides(_file(tmp / "taken") / "run"),
                                [r"output_dir: .*taken is an existing file; give a directory path"]),
    "data not UTF-8": (lambda lm, tmp, ck: tiny_lm_overrides(lm / "tok", lm / "latin1.jsonl", tmp / "o"),
                       [r"latin1\.jsonl: not UTF-8 text \(byte 0xe9 at offset 15\); save it as UTF-8"]),
    "huge learning rate": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", steps=6, **{"optim.lr": 1e30}),
                           [r"non-finite loss .* at step \d+"]),
    "unknown purifier": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", purifiers="[{name: anchr}]"),
                         [r"purifiers\[0\]\.name: unknown purifier 'anchr'; did you mean 'anchor'"]),
    "purifier without a name": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", purifiers="[{weight: 1}]"),
                                [r"purifiers\[0\]\.name: missing; every purifier entry needs a name, one of "
                                 r"adversary, anchor"]),
    "output_dir holds a finished run": (lambda lm, tmp, ck: mlp_overrides(ck.parent.parent),
                                        [r"output_dir: .* already holds a run \(lineage\.json\); give a new "
                                         r"output_dir, or resume=.*last\.ckpt to continue that one"]),
    "resume at max_steps": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", steps=4, resume=ck),
                            [r"resume: .*last\.ckpt is at step 4, and trainer\.max_steps is 4: nothing left to "
                             r"train; raise trainer\.max_steps above 4"]),
    "Lightning refuses a trainer setting": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", **{
        "trainer.precision": "bogus"}), [r"trainer: .*bogus"]),
    "a precision whose package is not installed": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", **{
        "trainer.precision": "transformer-engine"}), [r"^purify: error: trainer: .*transformer_engine"]),  # traceback
    "out-of-range trainer and optimizer numbers": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", **{
        "trainer.val_check_interval": 0, "trainer.devices": 0, "trainer.gradient_clip_val": -1,
        "optim.weight_decay": -1, "scheduler.warmup_steps": -3, "trainer.limit_val_batches": -1}),
        [r"trainer\.val_check_interval: must be >= 1, got 0", r"trainer\.devices: must be >= 1, -1 \(all\)",
         r"trainer\.gradient_clip_val: must be a finite number > 0, or null", r"optim\.weight_decay: must be a "
         r"finite number >= 0, got -1", r"scheduler\.warmup_steps: must be >= 0, got -3",
         r"trainer\.limit_val_batches: must be >= 0"]),
    "optimizer settings torch would refuse or quietly change": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", **{
        "optim.betas": "[0.9]", "optim.head_lr": 0}),
        [r"optim\.head_lr: must be a finite number > 0, or null for optim\.lr, got 0",
         r"optim\.betas: expected two numbers in \[0, 1\) \(Adam's beta1, beta2\), got \[0\.9\]"]),
    "output_dir holds a logit cache": (lambda lm, tmp, ck: lm_args(lm, _cache_dir(tmp / "o")),  # trained into it
        [r"output_dir: .*o holds a logit cache \(manifest\.json\); give the run a directory of its own"]),
    "one record: nothing to hold out for validation": (lambda lm, tmp, ck: lm_args(lm, tmp / "o", **{
        "data.train": _one_record(tmp)}),  # validated on its one training record, silently
        [r"data\.train: .*one\.jsonl has 1 record\(s\): too few to hold out val_fraction 0\.1 for "
         r"validation and train on the rest; give more records, data\.val, or val_fraction: 0 with "
         r"trainer\.limit_val_batches=0 \(no validation\)"]),
    "val_fraction 0 with validation on": (lambda lm, tmp, ck: lm_args(lm, tmp / "o", **{"data.val_fraction": 0}),
        [r"data\.val_fraction: 0 holds out nothing, and validation would then read training data; give data\.val"]),
    "a teacher with fewer logits than the tokenizer has tokens": (lambda lm, tmp, ck: lm_args(lm, tmp / "o", teachers=(
        "[{config: {model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
        f"num_attention_heads: 2, num_key_value_heads: 2, vocab_size: 20}}, tokenizer: {lm / 'tok'}, seed: 1}}]")),
        [r"teachers: the student and its teachers return logits of different widths \(student (\d+), teachers\[0\] "
         r"20\), and the narrowest holds fewer than the tokenizer's \1 tokens; give models that score the same "
         r"vocabulary"]),
    "logit_slice past the model's logits": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", **{
        "loss.logit_slice": "[0, 500]"}), [r"loss\.logit_slice: \[0, 500\] reaches past the \d+ logits of"]),
    "a typo inside student.config": (lambda lm, tmp, ck: lm_args(lm, tmp / "o", **{
        "student.config.hiden_size": 32}),
        [r"^purify: error: student\.config\.hiden_size: unknown key for a llama config; "
         r"did you mean 'hidden_size'\?$"]),
    "typos inside two models' configs, both at once": (lambda lm, tmp, ck: lm_args(lm, tmp / "o", **{
        "student.config.hiden_size": 32, "teachers.0.config.num_hiden_layers": 2}),  # were found one model at a time
        [r"student\.config\.hiden_size: unknown key for a llama config; did you mean 'hidden_size'",
         r"teachers\[0\]\.config\.num_hiden_layers: unknown key for a llama config; did you mean 'num_hidden_layers'"]),
    "a typo in an arch's kwargs": (lambda lm, tmp, ck: mlp_overrides(
        tmp / "o", student="{arch: aux_mlp, kwargs: {in_dim: 16, hiden: [32], n_aux: 3}}"),
        [r"^purify: error: student\.kwargs: unknown parameter 'hiden'; did you mean 'hidden'\? aux_mlp accepts "
         r"in_dim=64, hidden=\(256, 256\), n_classes=10, n_aux=3$"]),
    "an arch kwarg of the wrong type": (lambda lm, tmp, ck: mlp_overrides(tmp / "o", teachers=(
        "[{arch: aux_mlp, kwargs: {in_dim: 16, hidden: abc, n_aux: 3}}]")),
        [r"^purify: error: teachers\[0\]\.kwargs: aux_mlp cannot be built from \{.*'hidden': 'abc'.*\} \(TypeError: "
         r".*\); aux_mlp accepts in_dim=64, hidden=\(256, 256\), n_classes=10, n_aux=3$"]),
}


WRITES_NOTHING = [case for case in CASES if case != "huge learning rate"]
"""Every refusal but a run that diverges while training is made before anything is written (a logit slice past the
model's logits too: it was found at the first forward, after the run directory was written)."""


def _cache_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text("{}")
    return path


def _one_record(tmp: Path) -> Path:
    (tmp / "one.jsonl").write_text(json.dumps({"prompt": "The boy", "completion": " opened a book."}) + "\n")
    return tmp / "one.jsonl"


def _foreign(tmp: Path) -> Path:
    torch.save({"weights": torch.ones(3)}, tmp / "foreign.ckpt")
    return tmp / "foreign.ckpt"


def _deepspeed_layout(path: Path) -> Path:
    (path / "checkpoint").mkdir(parents=True)  # what a ZeRO checkpoint "step2.ckpt" is: a directory of shards
    return path


def _file(path: Path) -> Path:
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_one_line_each_and_no_finished_run(case, lm, good_checkpoint, tmp_path, capsys):
    make, patterns = CASES[case]
    code, lines = run_cli(["train", str(_write_recipe(tmp_path, make(lm, tmp_path, good_checkpoint)))], capsys)
    assert code == 2, lines
    assert lines and all(line.startswith("purify: error: ") for line in lines), lines
    assert len(lines) == len(patterns), lines
    for pattern in patterns:
        assert any(re.search(pattern, line) for line in lines), (pattern, lines)
    out = tmp_path / "o"
    assert not (out.exists() and looks_finished(out))
    if case in WRITES_NOTHING:  # refused before training: no half-written directory at all
        assert not (out / "lineage.json").exists() and not (out / "recipe.yaml").exists()


def test_malformed_yaml_names_line_and_column(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("student:\n  arch: aux_mlp\nteachers: [\n  {arch: aux_mlp}\ntrainer: {max_steps: 3\n")
    code, lines = run_cli(["train", str(path)], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"purify: error: recipe: cannot parse {path} at line ") and ", column " in lines[0]


def test_a_failed_run_is_marked_failed_and_lineage_show_says_so(tmp_path, capsys):
    out = tmp_path / "o"
    code, _ = run_cli(["train", str(_write_recipe(tmp_path, mlp_overrides(out, steps=6, **{"optim.lr": 1e30})))],
                      capsys)
    assert code == 2
    record = json.loads((out / "lineage.json").read_text())
    assert record["status"] == "failed" and "non-finite loss" in record["error"]
    assert main(["lineage", "show", str(out)]) == 0
    assert "status: failed" in capsys.readouterr().out


def test_from_the_command_line_there_is_no_traceback(tmp_path):
    recipe = _write_recipe(tmp_path, mlp_overrides(tmp_path / "o", **{"trainer.max_stepz": 3, "optim.lrr": 1}))
    proc = subprocess.run([sys.executable, "-m", "purify", "train", str(recipe)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 2
    assert all(line.startswith("purify: error: ") for line in lines)


def test_garbage_inside_tensor_bytes_is_caught_by_the_recorded_sha256(tmp_path):
    """torch.load reads such a file without complaint (the bug: NaNs restored silently); the digest refuses it."""
    from purify.checkpoint import CheckpointError, VerifiedCheckpointIO

    io, path = VerifiedCheckpointIO(), tmp_path / "x.ckpt"
    io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.full((1024,), 1.2345)}}, path)
    data = path.read_bytes()
    needle = torch.tensor([1.2345] * 4).numpy().tobytes()
    at = data.index(needle)
    path.write_bytes(data[:at] + b"\xff" * 16 + data[at + 16:])  # NaNs in the middle of the tensor's bytes
    assert torch.isnan(torch.load(path, weights_only=True)["state_dict"]["w"]).any()  # loads "fine"
    with pytest.raises(CheckpointError, match=r"x\.ckpt is damaged: its tensors do not match the sha256"):
        io.load_checkpoint(path)


@pytest.mark.parametrize("make, message", [
    (lambda: __import__("purify").TailTruncation(__import__("purify").TailTruncationConfig(top_k=0)),
     r"tail_truncation\.top_k: must be >= 1, got 0"),
    (lambda: __import__("purify").TailTruncation(__import__("purify").TailTruncationConfig(top_k=-1, top_p=2.0)),
     r"tail_truncation\.top_k: must be >= 1, got -1\ntail_truncation\.top_p: 2\.0 is not in \(0, 1\]"),
    (lambda: __import__("purify").Anchor(__import__("purify").AnchorConfig(weight=-1.0)),
     r"anchor\.weight: must be >= 0"),
    (lambda: __import__("purify").Anchor(__import__("purify").AnchorConfig(weight="0.1")),  # was a bare TypeError
     r"anchor\.weight: '0\.1' is a str; give a float"),
])
def test_library_configs_validate_at_construction(make, message):
    from purify.types import RecipeError

    with pytest.raises(RecipeError, match=message):
        make()


def test_outputs_follow_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(["train", str(_write_recipe(tmp_path, mlp_overrides(out, steps=2)))]) == 0
    finally:
        os.umask(old)
    for path in [out / "lineage.json", out / "checkpoints" / "last.ckpt", out / "student" / "model.safetensors"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((out / "student").stat().st_mode) == 0o755


def test_a_quoted_exception_is_its_first_lines_cut_at_a_word():
    """What an error line quotes of another exception: never an IndexError on an empty message (it was
    ``str(err).splitlines()[0]`` in several places), blank lines skipped, long text cut at a word and marked."""
    from purify.types import first_line

    assert first_line(ValueError()) == "ValueError"
    assert first_line(ValueError("\n  bad width\n\nheads do not divide it\n")) == "bad width"
    assert first_line(ValueError("bad width\nheads do not divide it"), lines=2) == "bad width heads do not divide it"
    assert first_line(ValueError("alpha beta gamma delta"), limit=12) == "alpha beta …"
    assert first_line(ValueError("x" * 30), limit=10) == "x" * 10 + " …"  # no word to cut at
    assert first_line("") == ""


def test_logit_width_is_read_from_the_model_and_otherwise_checked_at_the_first_forward():
    """A model that says how many logits it returns (AuxMLP, a Hugging Face head) has ``loss.logit_slice`` checked
    before anything is written; one that does not is checked at its first forward, with the same message."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from purify.config import LossConfig, RecipeError
    from purify.models import AuxMLP, logit_width
    from purify.module import Distiller
    from purify.types import ModelOutput

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=37, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert logit_width(AuxMLP(in_dim=4, hidden=[8], n_classes=10, n_aux=3)) == 13 and logit_width(llama) == 37

    class Silent(torch.nn.Module):  # a plain-torch model that does not say its width
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 5)

        def forward(self, batch, hidden=False):
            return ModelOutput(logits=self.lin(batch["x"])[:, None, :], hidden=None)

    assert logit_width(Silent()) is None
    distiller = Distiller(Silent(), [Silent()], loss=LossConfig(logit_slice=[2, 9]))
    with pytest.raises(RecipeError, match=re.escape("loss.logit_slice: [2, 9] reaches past the 5 logits of Silent; "
                                                    "give [start, stop) with stop <= 5")):
        distiller.run_model(distiller.student, {"x": torch.zeros(2, 4), "target_mask": torch.ones(2, 1)})


# ------------------------------------------------------------------ the same refusals for library users
@pytest.mark.parametrize("make, message", [
    (lambda P: P.DivergenceMask(P.DivergenceMaskConfig(mode="replace", reference="base", flag="logratios")),
     r"divergence_mask.flag: Invalid value 'logratios', expected one of \['divergence', 'logratio', 'random'\]"),
    (lambda P: P.Adversary(P.AdversaryConfig(pool="max")), r"adversary.pool: Invalid value 'max'"),
    (lambda P: P.FunctionAnchor(P.FunctionAnchorConfig(direction="forwards")),
     r"function_anchor.direction: Invalid value 'forwards'"),
    (lambda P: P.Ensemble(P.EnsembleConfig(combine="median")), r"ensemble.combine: Invalid value 'median'"),
])
def test_a_misspelt_choice_in_a_purifier_config_is_refused_in_python(make, message):
    """Built in Python, a misspelt choice ran another one silently (``flag="logratios"`` trained the random placebo);
    the recipe's check now runs on construction too."""
    import purify

    with pytest.raises(purify.RecipeError, match=message):
        make(purify)


@pytest.mark.parametrize("entry, message", [
    ("{name: anchor, weight: .nan}", r"^purifiers\[0\]\.weight: must be a finite number, got nan$"),
    ("{name: adversary, weight: .inf, target: source}", r"^purifiers\[0\]\.weight: must be a finite number, got inf$"),
    ("{name: delta_projection, strength: .nan}", r"^purifiers\[0\]\.strength: must be a finite number, got nan$"),
    ("{name: delta_projection, max_relative_delta: .nan}",
     r"^purifiers\[0\]\.max_relative_delta: must be a finite number or inf, got nan$"),
    ("{name: function_anchor, noise_high: .inf}", r"^purifiers\[0\]\.noise_high: must be a finite number, got inf$"),
    ("{name: tail_truncation, top_p: .nan}", r"^purifiers\[0\]\.top_p: must be a finite number, got nan$"),
    ("{name: divergence_mask, reference: base, threshold: .nan}",
     r"^purifiers\[0\]\.threshold: must be a finite number, got nan$"),
])
def test_a_non_finite_purifier_number_is_refused_at_load(tmp_path, entry, message):
    """A NaN passed every ``x < 0`` check (the run then stopped on a non-finite loss, or, for a threshold, compared
    false everywhere and trained as vanilla); now it is refused by name before anything runs."""
    from purify.assembly import load_recipe
    from purify.types import RecipeError

    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(None, mlp_overrides(tmp_path, purifiers=f"[{entry}]"))
    assert "\n" not in str(err.value)


def test_non_finite_purifier_numbers_are_refused_in_python_and_inf_only_where_it_switches_a_check_off():
    import purify

    with pytest.raises(purify.RecipeError, match=r"^anchor\.weight: must be a finite number, got nan$"):
        purify.Anchor(purify.AnchorConfig(weight=float("nan")))
    with pytest.raises(purify.RecipeError, match=r"^delta_projection\.strength: must be a finite number, got inf$"):
        purify.DeltaProjection(purify.DeltaProjectionConfig(strength=float("inf")))
    with pytest.raises(purify.RecipeError, match=r"^ensemble\.weights: must be finite numbers, got \[1\.0, nan\]$"):
        purify.Ensemble(purify.EnsembleConfig(weights=[1.0, float("nan")]))
    purify.DeltaProjection(purify.DeltaProjectionConfig(max_relative_delta=float("inf")))  # no shared-init check


def test_one_purifier_instance_serving_two_distillers_is_refused_when_the_first_is_used_again():
    """The second Distiller's set-up took the instance over, and the first went on without a word: its anchor then
    pulled the second student (the first one's got no anchor gradient at all). Using them one after the other stays allowed, and a
    deepcopy of a Distiller keeps its own pairing."""
    import copy

    from purify import Anchor, AnchorConfig, AuxMLP, Distiller, RecipeError

    def step(d):
        d.fit_step({"x": torch.rand(4, 4), "target_mask": torch.ones(4, 1)}, d.build_optimizer(), 0.0)

    shared = Anchor(AnchorConfig(weight=1.0))
    first = Distiller(AuxMLP(in_dim=4, hidden=[8]), [AuxMLP(in_dim=4, hidden=[8])], purifiers=[shared])
    step(first)
    twin = copy.deepcopy(first)
    second = Distiller(AuxMLP(in_dim=4, hidden=[8]), [AuxMLP(in_dim=4, hidden=[8])], purifiers=[shared])
    step(second)  # one after the other: fine
    assert shared._models[0] is second.student
    with pytest.raises(RecipeError, match=r"^purifiers\[0\]: this anchor instance was set up by another Distiller "
                                          r"after this one; .*copy\.deepcopy\(purifier\)"):
        step(first)
    step(twin)


def test_a_distiller_built_in_python_refuses_what_a_recipe_would():
    from purify import AuxMLP, Distiller, RecipeError
    from purify.config import LossConfig

    student, teacher = AuxMLP(in_dim=4, hidden=[8]), AuxMLP(in_dim=4, hidden=[8])
    for kwargs, message in [
        ({"loss": LossConfig(temperature=0)}, r"loss.temperature: must be a finite number > 0, got 0"),
        ({"loss": LossConfig(logit_slice=[2, 1])}, r"loss.logit_slice: expected \[start, stop\)"),
        ({"loss": LossConfig(hard_label_weight=-1)}, r"loss.hard_label_weight: must be a finite number >= 0"),
        ({"teacher_weights": [1.0, 1.0]}, r"teacher_weights: 2 given for 1 teachers"),
        # accepted, then a plain ValueError at the first fit_step
        ({"loss": LossConfig(name="foo")}, r"loss.name: unknown loss 'foo'; expected one of \['forward_kl', "),
    ]:
        with pytest.raises(RecipeError, match=message):
            Distiller(student, [teacher], **kwargs)


def test_a_weight_editing_purifier_on_a_lora_student_says_why_in_python():
    """delta_projection on a peft LoRA student built in Python failed with "parameter names differ"; it now says
    what recipe validation says (it edits full weights, which the adapter keeps frozen)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from purify import DeltaProjection, DeltaProjectionConfig, Distiller, RecipeError, TargetPurifier

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2)
    student = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(RecipeError, match=r"purifiers\[0\]\.name: delta_projection edits the student's full weights, "
                                          r"which student\.lora freezes"):  # at construction, as a recipe says it
        Distiller(student, [LlamaForCausalLM(cfg)], purifiers=[DeltaProjection(DeltaProjectionConfig())])

    class NoConfig(TargetPurifier):  # a user's purifier without a PurifierConfig: the stack is checked entry by entry
        def transform_targets(self, batch, teacher_outputs, targets):
            return targets

    with pytest.raises(RecipeError, match=r"^purifiers\[1\]\.name: delta_projection edits the student's full weights"):
        Distiller(student, [LlamaForCausalLM(cfg)], purifiers=[NoConfig(), DeltaProjection(DeltaProjectionConfig())])


def test_purify_trainer_gives_the_purifiers_its_tokenizer(tmp_path):
    """A text-sourced function anchor under PurifyTrainer said the student had no tokenizer although
    ``processing_class`` was given; the Distiller now gets it."""
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from purify import FunctionAnchor, FunctionAnchorConfig, PurifyTrainer

    tok = build_tokenizer(TEXTS, kind="char")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    ids = tok(TEXTS[0], return_tensors="pt")["input_ids"][0]
    trainer = PurifyTrainer(model=LlamaForCausalLM(cfg), teachers=[LlamaForCausalLM(cfg)], processing_class=tok,
                            purifiers=[FunctionAnchor(FunctionAnchorConfig(source="bundled", batch_size=2))],
                            args=TrainingArguments(str(tmp_path / "o"), max_steps=2, per_device_train_batch_size=2,
                                                   report_to=[], save_strategy="no", use_cpu=True),
                            train_dataset=[{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}] * 4)
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.distiller.tokenizers["student_tokenizer"] is tok


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_real_config_keys_are_accepted_and_the_recipes_configs_too(model_type, tmp_path):
    """The unknown-key check of ``student.config`` knows the config class's fields, its defaults' attributes and what
    transformers reads from ``**kwargs`` (``rope_theta``, ``torch_dtype``), so real keys and the shipped recipes'
    configs pass; a model with several of them still builds."""
    import yaml

    from purify.config import ModelSpec
    from purify.models import build_model, config_key_problems

    real = {"model_type": model_type, "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "tie_word_embeddings": True, "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 5e4,
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", "use_cache": False,
            "initializer_range": 0.01, "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_dropout": 0.0}
    assert config_key_problems(real, "student") == []
    build_tokenizer(TEXTS, kind="char").save_pretrained(tmp_path / "tok")
    model = build_model(ModelSpec(config=real, tokenizer=str(tmp_path / "tok")), seed=0).module
    assert model.config.hidden_size == 16 and model.config.tie_word_embeddings
    with pytest.warns(UserWarning, match=r"teachers\[1\]\.config\.zzz_unheard_of: not a field purify knows"):
        # a key close to no field may be one the config reads some other way: warned about, not refused
        assert config_key_problems({**real, "hiden_size": 8, "zzz_unheard_of": 1}, "teachers[1]") == [
            f"teachers[1].config.hiden_size: unknown key for a {model_type} config; did you mean 'hidden_size'?"]
    for key in ("rotary_pct", "rotary_emb_base"):  # read from **kwargs by gpt_neox's config (Pythia's keys)
        assert config_key_problems({"model_type": "gpt_neox", key: 0.25}, "student") == []
    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("**/*.yaml"))
    configs = [(f"{path.name}:{where}", spec["config"]) for path in recipes
               for where, spec in _model_specs(yaml.safe_load(path.read_text())) if spec.get("config")]
    assert configs and all(config_key_problems(cfg, where) == [] for where, cfg in configs), configs


def _model_specs(recipe: object) -> list[tuple[str, dict]]:
    if not isinstance(recipe, dict):
        return []
    specs = [("student", recipe.get("student"))] + [(f"teachers[{i}]", t) for i, t in
                                                    enumerate(recipe.get("teachers") or [])]
    return [(where, spec) for where, spec in specs if isinstance(spec, dict)]


def _aux():
    from purify import AuxMLP

    return AuxMLP(16, [8], n_aux=3)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def _stack(loss="forward_kl", teachers=1):
    from purify.config import LossConfig

    return dict(student=_aux(), teachers=[_aux() for _ in range(teachers)], loss=LossConfig(name=loss,
                                                                                          logit_slice=[0, 13]))


def _config(name: str, **values):
    import purify.config

    return getattr(purify.config, name)(**values)


@pytest.mark.parametrize("make, message", [
    # a recipe refuses each of these by name; a Distiller built in Python trained on (PurifyTrainer: NaN weights)
    (lambda p: p.Distiller(**_stack("reverse_kl"), purifiers=[p.TailTruncation(p.TailTruncationConfig(top_k=2))]),
     r"purifiers\[0\]\.name: tail_truncation gives some tokens zero target mass, which loss\.name: reverse_kl"),
    (lambda p: p.Distiller(**_stack(teachers=2), purifiers=[p.TailTruncation(p.TailTruncationConfig(top_k=1)),
                                                            p.Ensemble(p.EnsembleConfig())]),
     r"purifiers\[1\]\.name: ensemble rebuilds the targets .* discard what tail_truncation \(purifiers\[0\]\) did"),
    (lambda p: p.Distiller(**_stack(), purifiers=[p.Ensemble(p.EnsembleConfig())]),
     r"purifiers\[0\]\.teachers: ensemble needs at least 2 teachers \(got 1\)"),
    (lambda p: p.Distiller(_tiny_llama(), [_tiny_llama()], purifiers=[p.FunctionAnchor(p.FunctionAnchorConfig())]),
     r"purifiers\[0\]\.source: 'auto' reads text with the student's tokenizer, and none was given; pass "
     r"student_tokenizer= \(PurifyTrainer: processing_class=\)"),
    (lambda p: (lambda s: p.Distiller(s, [s]))(_aux()),
     r"teachers\[0\]: shares \d+ parameter\(s\) with the student \(e\.g\. .*\); a teacher is frozen"),
    (lambda p: p.Distiller(**_stack(), purifiers=p.Anchor(p.AnchorConfig())),
     r"purifiers must be a list of purifiers .*, got Anchor; build each"),
    (lambda p: p.Distiller(**_stack(), purifiers=[p.AnchorConfig()]),
     r"purifiers must be a list of purifiers .*, got \['AnchorConfig'\]"),
    (lambda p: p.Distiller(_aux(), [_aux()], loss={"name": "jsd"}),
     r"Distiller: loss must be a LossConfig, got dict; give LossConfig\(\.\.\.\)"),
    # each of these was an AttributeError or TypeError deep in the checks, or at the first step
    (lambda p: p.Distiller("gpt2", [_aux()]), r"Distiller: student must be a torch module .*, got str"),
    (lambda p: p.Distiller(_aux(), [_aux(), "gpt2"]), r"Distiller: teachers\[1\] must be a torch module .*, got str"),
    (lambda p: p.Distiller(_aux(), [_aux()], on_policy={"lam": 0.5}),
     r"Distiller: on_policy must be an OnPolicyConfig, got dict"),
    (lambda p: p.Distiller(_aux(), [_aux()], loss=_config("LossConfig", temperature="2", logit_slice=[10, 13])),
     r"^loss\.temperature: '2' is a str; give a float$"),
    (lambda p: p.Distiller(_aux(), [_aux()], loss=_config("LossConfig", logit_slice=[10.5, 13])),
     r"^loss\.logit_slice\[0\]: Value '10\.5' of type 'float' could not be converted to Integer"),
    (lambda p: p.Distiller(_aux(), [_aux()], loss=_config("LossConfig", logit_slice=[10, 13]),
                           optim=_config("OptimConfig", lr="1e-3")),
     r"^optim\.lr: '1e-3' is a str; give a float$"),
    (lambda p: p.Anchor({"weight": -1.0}),
     r"^Anchor: takes its config dataclass \(AnchorConfig\(\.\.\.\)\), not a dict"),
])
def test_a_distiller_built_in_python_is_checked_as_a_recipe_is(make, message):
    import purify

    with pytest.raises(ValueError, match=message):
        make(purify)


def test_a_plain_loop_steps_the_distillers_schedule():
    """``scheduler=`` was validated, then ignored outside Lightning: warmup + linear decay kept lr 0.01 every step."""
    from purify import Distiller
    from purify.config import LossConfig, OptimConfig, SchedulerConfig

    d = Distiller(_aux(), [_aux()], loss=LossConfig(logit_slice=[10, 13]), optim=OptimConfig(lr=1e-2),
                  scheduler=SchedulerConfig(name="linear", warmup_steps=5), total_steps=10)
    d.setup_purifiers()
    opt = d.build_optimizer()
    batch = {"x": torch.rand(4, 16), "target_mask": torch.ones(4, 1)}
    with pytest.raises(ValueError, match=r"scheduler \(linear, warmup 5\) would be ignored; pass "
                                         r"scheduler=distiller\.build_scheduler\(optimizer\)"):
        d.fit_step(batch, opt, progress=0.0)
    scheduler, lrs = d.build_scheduler(opt), []
    for step in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        d.fit_step(batch, opt, progress=step / 10, scheduler=scheduler)
    assert lrs == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01, 0.01, 0.008, 0.006, 0.004, 0.002])


def test_a_warmup_as_long_as_the_run_is_warned_about_and_a_plain_loop_decay_needs_total_steps():
    """``warmup_steps >= `` the planned steps was silent: the learning rate never reached ``optim.lr``. A linear or
    cosine schedule in a plain loop without ``total_steps`` decayed over 1 step: lr 0 from the second on, silently
    (the README's own plain-loop advice led there)."""
    import warnings

    from purify import Distiller
    from purify.config import LossConfig, SchedulerConfig

    def scheduler(warmup: int, total: int | None, name: str = "cosine") -> list[str]:
        d = Distiller(_aux(), [_aux()], loss=LossConfig(logit_slice=[10, 13]),
                      scheduler=SchedulerConfig(name=name, warmup_steps=warmup), total_steps=total)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d.build_scheduler(d.build_optimizer())
        return [str(w.message) for w in caught if "warmup" in str(w.message)]

    assert scheduler(5, 10) == [] and scheduler(3, None, "constant") == []  # a constant one needs no plan
    (message,) = scheduler(10, 4)
    assert message.startswith("scheduler.warmup_steps (10) >= the 4 optimizer step(s) this run plans: the learning "
                              "rate rises to 0.4 x optim.lr by the last step")
    for name in ("linear", "cosine"):
        with pytest.raises(ValueError, match=rf"^Distiller\.build_scheduler: a {name} schedule decays over the run's "
                                             r"optimizer steps, which a plain loop must give: Distiller\(\.\.\., "
                                             r"total_steps=N\)$"):
            scheduler(0, None, name)
    for bad in (-5, 2.5, True):
        with pytest.raises(ValueError, match=rf"total_steps: must be an int >= 0 .* got {bad!r}"):
            Distiller(_aux(), [_aux()], loss=LossConfig(logit_slice=[10, 13]), total_steps=bad)
    zero = Distiller(_aux(), [_aux()], loss=LossConfig(logit_slice=[10, 13]), total_steps=0)  # a zero-step suite's
    assert zero._planned_steps() == 1  # what Lightning's step / planned steps divides by


def test_progress_outside_zero_to_one_is_refused():
    """A step index given as ``progress`` (30) ran the adversary at full strength at once, skipping its ramp; -1
    failed inside reverse_gradient, naming its ``scale``."""
    from purify import Adversary, AdversaryConfig, Distiller
    from purify.config import LossConfig

    d = Distiller(_aux(), [_aux(), _aux()], loss=LossConfig(logit_slice=[10, 13]),
                  purifiers=[Adversary(AdversaryConfig())])
    batch = {"x": torch.rand(8, 16), "target_mask": torch.ones(8, 1)}
    for bad in (30, -1, float("nan")):
        with pytest.raises(ValueError, match=r"^Distiller: progress must be a number in \[0, 1\] \(optimizer step / "
                                             r"planned steps\), got "):
            d.fit_step(batch, d.build_optimizer(), progress=bad)
    d.fit_step(batch, d.build_optimizer(), progress=1)


def test_a_batch_without_target_mask_names_it():
    """``fit_step`` on ``{"x": ...}`` alone was a bare KeyError: 'target_mask'."""
    from purify import Distiller
    from purify.config import LossConfig

    d = Distiller(_aux(), [_aux()], loss=LossConfig(logit_slice=[10, 13]))
    d.setup_purifiers()
    with pytest.raises(ValueError, match=r"the batch has no 'target_mask' \(it has \['x'\]\)"):
        d.fit_step({"x": torch.rand(4, 16)}, d.build_optimizer(), progress=0.0)


def test_a_purifier_of_the_users_own_is_checked_by_its_contract_not_refused():
    """A user's own config class (or a subclass of a shipped one with a field more) was looked up among the shipped
    purifiers ("unknown purifier 'scale'"); its contract still joins the stack's checks."""
    from dataclasses import dataclass

    from purify import Anchor, AnchorConfig, Distiller, Ensemble, EnsembleConfig
    from purify.config import LossConfig
    from purify.purifiers.base import Contract, PurifierConfig, TargetPurifier

    @dataclass
    class ScaleConfig(PurifierConfig):
        name: str = "scale"
        factor: float = 0.5

        def contract(self) -> Contract:
            return Contract(edits_targets=True)

    class Scale(TargetPurifier):
        def __init__(self, config):
            super().__init__(config)

        def transform_targets(self, batch, teacher_outputs, targets):
            return targets

    @dataclass
    class MyAnchorConfig(AnchorConfig):
        extra: int = 3

    loss = LossConfig(logit_slice=[0, 13])
    Distiller(_aux(), [_aux()], loss=loss, purifiers=[Scale(ScaleConfig()), Anchor(MyAnchorConfig())])
    with pytest.raises(ValueError, match=r"purifiers\[1\]\.name: ensemble rebuilds the targets .* scale \(purifiers"):
        Distiller(_aux(), [_aux(), _aux()], loss=loss, purifiers=[Scale(ScaleConfig()), Ensemble(EnsembleConfig())])


def test_build_purifier_refuses_a_config_of_another_purifier_or_a_dict():
    """``build_purifier(AnchorConfig(name="ensemble"))`` built an Ensemble from an anchor's settings; a dict was an
    AttributeError."""
    from purify.purifiers import AnchorConfig, build_purifier
    from purify.types import RecipeError

    with pytest.raises(RecipeError, match=r"^build_purifier: AnchorConfig\(name='ensemble'\); give EnsembleConfig"):
        build_purifier(AnchorConfig(name="ensemble"))
    with pytest.raises(RecipeError, match=r"^build_purifier: takes a config dataclass"):
        build_purifier({"name": "anchor"})
    assert type(build_purifier(AnchorConfig())).__name__ == "Anchor"


def test_a_temperature_the_loss_ignores_is_warned_about():
    """``loss.name: mse`` or ``ce`` with a temperature trained at 1.0, silently."""
    import warnings

    from purify import Distiller
    from purify.config import LossConfig

    for name, said in (("mse", True), ("ce", True), ("forward_kl", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Distiller(_aux(), [_aux()], loss=LossConfig(name=name, temperature=2.0,
                                                        logit_slice=None if name == "ce" else [10, 13]))
        assert any(f"loss.temperature (2.0) does nothing with loss.name {name}" in str(w.message)
                   for w in caught) is said


def test_numpy_numbers_are_numbers_to_a_distiller_and_the_library_checks():
    """A sweep's np.logspace learning rate, an np.int64 step count: refused as "not a supported primitive type" (the
    config type check goes through omegaconf) or as no int, though they worked before the checks."""
    import numpy as np

    from purify import Distiller, keep_mask
    from purify.config import LossConfig, OptimConfig, SchedulerConfig
    from purify.losses import forward_kl

    d = Distiller(_aux(), [_aux()], loss=LossConfig(logit_slice=[10, 13], temperature=np.float32(2.0)),
                  optim=OptimConfig(lr=np.float64(1e-3)), scheduler=SchedulerConfig(warmup_steps=np.int64(2)),
                  total_steps=np.int64(10))
    d.fit_step({"x": torch.rand(4, 16), "target_mask": torch.ones(4, 1)}, d.build_optimizer(),
               progress=np.float32(0.5), scheduler=d.build_scheduler(d.build_optimizer()))
    logits = torch.randn(2, 5)
    assert keep_mask(torch.log_softmax(logits, -1), top_k=np.int64(2)).sum().item() == 4
    assert torch.isfinite(forward_kl(logits, logits, temperature=np.float32(2.0))).all()
