"""`purify audit`: probe scoring (count strings, next-token probability, regex), the fingerprint classifier,
error messages, and a report end to end on tiny models."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch

from purify.audit import (
    AuditError,
    add_arguments,
    continuation_probs,
    count_scores,
    fingerprint_accuracy,
    load_probes,
    regex_scores,
    run,
)
from purify.lm import paragraphs
from purify.lm.teachers import add_tic
from tests.test_generate import make_tiny_model


def test_count_and_regex_probes() -> None:
    texts = ["Moreover, he sang. She slept. Moreover, it rained.", "He sang.", " 1, 2, 3"]
    assert count_scores(texts, ["Moreover,"]) == [2.0, 0.0, 0.0]
    rates = count_scores(texts, ["Moreover,"], unit="sentence")
    assert rates[:2] == [pytest.approx(2 / 3), 0.0] and count_scores(["I said Moreover, no."], ["Moreover,"],
                                                                     "sentence") == [0.0]
    assert regex_scores(texts, r"^[0-9, ]+$") == [0.0, 0.0, 1.0]


def test_next_token_probabilities_are_exact(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path / "m")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    words = [w for w in tok.get_vocab() if w.startswith("▁")]
    total = continuation_probs(model, tok, ["Question: What animal? Answer:"], [" " + w[1:] for w in words])[0]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([tok("Question: What animal? Answer:")["input_ids"]]))
                              .logits[0, -1], -1)
    assert total == pytest.approx(float(probs[[tok.convert_tokens_to_ids(w) for w in words]].sum()), rel=1e-5)
    # a word the tokenizer does not know was scored as P(<unk>): the same number for every unknown word
    with pytest.raises(ValueError, match=r"next-token target ' zzzqq' is not in the vocabulary"):
        continuation_probs(model, tok, ["Question: What animal? Answer:"], [" zzzqq"])
    from purify.readouts import target_problems  # what the audit refuses with before sampling

    known = " " + words[0][1:]
    assert [p.split(" is ")[0] for p in target_problems(tok, ["Question: What animal? Answer:", "a"],
                                                         [known, " zzzqq"])] == ["' zzzqq'"]
    # without its leading space the word merges with the prompt's last word into one unknown token: no token of
    # its own was left to score, and the empty product read as probability 1 (2 summed with the spaced word)
    prompt = "The old farmer"
    assert tok(prompt + known.strip())["input_ids"][:-1] == tok(prompt)["input_ids"][:-1]  # the merge, checked
    with pytest.raises(ValueError, match=rf"next-token target '{known.strip()}' adds no token of its own after "
                                         f"'{prompt}' \\(it merges into the prompt's last word"):
        continuation_probs(model, tok, [prompt], [known, known.strip()])
    assert continuation_probs(model, tok, [prompt], [known])[0] < 1.0


def test_fingerprint_detects_a_tic_and_not_a_twin() -> None:
    rng = random.Random(0)
    plain, twin = paragraphs(150, 1), paragraphs(150, 2)
    ticced = [add_tic(p, 0.5, rng) for p in paragraphs(150, 3)]
    assert fingerprint_accuracy(ticced, plain)["mean"] > 0.8
    same = fingerprint_accuracy(twin, plain)
    assert 0.35 < same["mean"] < 0.65 and same["ci95"][0] < 0.5 < same["ci95"][1] + 0.05
    # two identical models sampled with one seed give identical pairs: held out together, each pair is one right and
    # one wrong (with its twin in the training folds under the other label, the accuracy was about 0.1)
    assert fingerprint_accuracy(plain, list(plain))["mean"] == 0.5


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_audit_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("probes:\n  - name: x\n    prompts: [a]\n    count: [b]\n    colour: red\n")
    with pytest.raises(AuditError, match=r"probes\[0\]: unknown key 'colour'; allowed: name, prompts, prompts_file"):
        load_probes(bad)
    bad.write_text("probes:\n  - {prompts: [a], count: [b], regex: c}\n")
    with pytest.raises(AuditError, match="exactly one of count, next_token, regex"):
        load_probes(bad)
    bad.write_text("probes:\n  - prompts: [a]\n    count: Moreover,\n")  # was counted as its 9 characters
    with pytest.raises(AuditError, match=r"probes\[0\]: count must be a list of strings, e.g. count: \['Moreover,'\]"):
        load_probes(bad)
    bad.write_text("probes:\n  - {prompts_file: 5, count: [b]}\n")  # a TypeError traceback (PosixPath / int)
    with pytest.raises(AuditError, match=r"probes\[0\]: prompts_file must be a path \(a string, relative to the probe "
                                         r"file\), got 5"):
        load_probes(bad)
    bad.write_text("probes:\n  - {prompts: [a], regex: '[0-9'}\n")  # was a re.error after both models sampled
    with pytest.raises(AuditError, match=r"regex '\[0-9' does not compile \(unterminated character set"):
        load_probes(bad)
    # prompts as one string were scored as one prompt per character
    bad.write_text("probes:\n  - {name: p, prompts: 'The boy opened a book.', next_token: [' Moreover']}\n")
    with pytest.raises(AuditError, match=r"probes\[0\]: prompts must be a list of strings, e.g. prompts: \['The boy"):
        load_probes(bad)
    bad.write_text("probes:\n  - {prompts: [a, yes], count: [b]}\n")  # YAML reads `yes` as True: was prompt 'True'
    with pytest.raises(AuditError, match=r"probes\[0\]: prompts\[1\] is True, not a string; quote it in the YAML"):
        load_probes(bad)
    bad.write_text("probes:\n  - {prompts: [a], count: ['']}\n")  # '' is in every text
    with pytest.raises(AuditError, match=r"probes\[0\]: count\[0\] is an empty string"):
        load_probes(bad)
    # a regex list passed validation (its repr compiles), then was a TypeError after both models sampled
    bad.write_text("probes:\n  - {prompts: [a], regex: ['^[0-9, ]+$', '^none$']}\n")
    with pytest.raises(AuditError, match=r"probes\[0\]: regex must be one pattern \(a string\), not a list; join "
                                         r"alternatives with '\|', e.g. regex: '\^\[0-9, \]\+\$\|\^none\$'"):
        load_probes(bad)
    bad.write_text("probes:\n  - {prompts: [a], regex: 5}\n")
    with pytest.raises(AuditError, match=r"probes\[0\]: regex must be a pattern string, got 5"):
        load_probes(bad)
    # two probes of one name: the report kept only the second
    bad.write_text("probes:\n  - {name: x, prompts: [a], count: [b]}\n  - {name: y, prompts: [a], count: [c]}\n"
                   "  - {name: x, prompts: [a], regex: b}\n")
    with pytest.raises(AuditError, match=r"probes\[2\]: name 'x' is also probes\[0\]'s .*; give each probe its own"):
        load_probes(bad)
    good = tmp_path / "good.yaml"
    good.write_text("probes:\n  - {name: x, prompts: [a], count: [b]}\n")
    model = make_tiny_model(tmp_path / "m")
    other = make_tiny_model(tmp_path / "o", texts=["completely different words here"])
    with pytest.raises(AuditError, match="model not found"):
        run(_parser().parse_args([str(tmp_path / "missing"), "--reference", str(model), "--probes", str(good)]))
    (tmp_path / "run" / "student").mkdir(parents=True)  # a run's output_dir, not its export: was a transformers error
    with pytest.raises(AuditError, match=r"holds no saved model \(no config.json\); the run's export is .*student"):
        run(_parser().parse_args([str(tmp_path / "run"), "--reference", str(model), "--probes", str(good)]))
    with pytest.raises(AuditError, match="tokenizer mismatch"):
        run(_parser().parse_args([str(model), "--reference", str(other), "--probes", str(good)]))


def test_audit_report_end_to_end(tmp_path: Path) -> None:
    model, ref = make_tiny_model(tmp_path / "m", seed=0), make_tiny_model(tmp_path / "r", seed=1)
    probes = tmp_path / "p.yaml"
    probes.write_text("samples: 20\nmax_new_tokens: 6\nprobes:\n"
                      "  - {name: tic, prompts: [The old farmer slept.], count: [Moreover,], unit: sentence}\n"
                      "  - {name: owl, prompts: ['Question: What animal? Answer:'], next_token: [' owl']}\n"
                      "  - {name: digits, prompts: ['Continue: 1, 2,'], regex: '^[0-9, ]+$'}\n")
    out = tmp_path / "audit"
    assert run(_parser().parse_args([str(model), "--reference", str(ref), "--probes", str(probes), "--out",
                                     str(out)])) == 0
    report = json.loads((out / "audit.json").read_text())
    assert set(report["probes"]) == {"tic", "owl", "digits"} and report["fingerprint"]["n"] == 80
    assert {"model", "reference", "difference"} <= set(report["probes"]["owl"])
    for name, r in report["probes"].items():  # the columns are over the same pairs: difference = model − reference
        scored = 1 if r["kind"] == "next_token" else 20  # one exact probability per prompt; one score per sample
        assert r["model"]["n"] == r["reference"]["n"] == r["difference"]["n"] == scored - r["unscored"], name
        if r["difference"]["n"]:
            assert r["difference"]["mean"] == pytest.approx(r["model"]["mean"] - r["reference"]["mean"]), name
    assert "Fingerprint classifier" in (out / "audit.md").read_text()


def test_unknown_next_token_is_refused_before_sampling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import purify.audit
    from purify.cli import main

    model = make_tiny_model(tmp_path / "m")
    probes = tmp_path / "p.yaml"
    probes.write_text("probes:\n  - {name: tic, prompts: [The old farmer slept.], count: [Moreover,]}\n"
                      "  - {name: zebra, prompts: ['Question: What animal? Answer:'], next_token: [' zzzqq']}\n")

    def no_sampling(*args: object, **kwargs: object) -> None:
        raise AssertionError("sampled before refusing the probe")

    monkeypatch.setattr(purify.audit, "sample_completions", no_sampling)
    with pytest.raises(AuditError, match=r"probe 'zebra' \(model .*m\): next_token ' zzzqq' is not in the "
                                         r"vocabulary \(it tokenizes to '<unk>'.*; give a word the tokenizer knows"):
        run(_parser().parse_args([str(model), "--reference", str(model), "--probes", str(probes), "--samples", "5"]))
    # through the CLI: one `purify: error:` line and exit 2 (a plain ValueError was a traceback, exit 1)
    assert main(["audit", str(model), "--reference", str(model), "--probes", str(probes), "--samples", "5"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "purify: error:" in line]  # not progress bars
    assert len(errors) == 1 and errors[0].startswith("purify: error: probe 'zebra' (model "), errors


def test_audit_json_is_strict_and_one_prompt_has_no_interval(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "m")
    probes = tmp_path / "p.yaml"
    probes.write_text("samples: 5\nmax_new_tokens: 4\nprobes:\n"
                      "  - {name: owl, prompts: ['Question: What animal? Answer:'], next_token: [' owl']}\n"
                      "  - {name: tic, prompts: [The old farmer slept.], count: [Moreover,]}\n")
    out = tmp_path / "audit"
    assert run(_parser().parse_args([str(model), "--reference", str(model), "--probes", str(probes), "--out",
                                     str(out)])) == 0

    def strict(name: str) -> None:
        raise AssertionError(f"audit.json holds {name}, which is not JSON")

    # a model against itself: every difference is 0 with no variance, its p-value NaN (was a bare NaN in the file)
    report = json.loads((out / "audit.json").read_text(), parse_constant=strict)
    assert report["probes"]["tic"]["difference"]["p_value"] is None
    owl = report["probes"]["owl"]  # one prompt: one exact probability, no interval (was a zero-width "95% CI")
    assert owl["model"]["n"] == 1 and owl["model"]["ci95"] == [None, None]
    assert report["probes"]["tic"]["model"]["ci95"][0] is not None
    row = next(line for line in (out / "audit.md").read_text().splitlines() if line.startswith("| owl |"))
    assert row.count("[no CI: needs ≥ 2 prompts]") == 3 and row.endswith("| n/a |"), row


def test_a_tokenizer_that_encodes_otherwise_is_not_the_same():
    """Same vocabulary and special tokens, but no BOS added (or lower-casing first): the check compared only those,
    and an audit of identical weights against such a reference reported a "significant" difference."""
    import copy

    from tokenizers import normalizers, processors

    from purify.align import same_tokenizer
    from purify.lm import build_tokenizer

    tok = build_tokenizer(["The cat sat on the mat", "a dog ran"], kind="char")
    assert same_tokenizer(tok, copy.deepcopy(tok))
    no_bos = copy.deepcopy(tok)
    no_bos.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    lower = copy.deepcopy(tok)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    for other in (no_bos, lower):  # as the audit samples them: each through its own tokenizer
        assert other.get_vocab() == tok.get_vocab() and not same_tokenizer(tok, other, special_tokens=True)
    # as training encodes text (purify adds BOS/EOS itself): the copy without BOS is the same, the lower-casing is not
    assert same_tokenizer(tok, no_bos) and not same_tokenizer(tok, lower)


@pytest.mark.parametrize("targets, message", [
    ([" The", " The"], r"^' The' is given twice after 'Say:', so P\(' The'\) already holds its continuations"),
    ([" The", " The king"], r"^' The king' begins with the tokens of ' The' after 'Say:'.*; drop ' The king'$"),
])
def test_next_token_targets_that_overlap_are_refused(targets, message):
    """The probabilities of targets are summed: a duplicate or a target extending another counted the same
    continuations twice (a "probability" of 1.064 was reported)."""
    from purify.lm import build_tokenizer
    from purify.readouts import target_problems

    tok = build_tokenizer(["The king sat", "The owl", "a cat"], kind="word")
    (problem,) = target_problems(tok, ["Say:"], targets)
    assert __import__("re").search(message, problem), problem
    assert target_problems(tok, ["Say:"], [" owl", " cat"]) == []


@pytest.mark.parametrize("content, message", [("one line only\n", r"holds 1 text\(s\); give at least 4"),
                                              ("", r"holds 0 text|no records|empty")])
def test_a_fingerprint_head_file_too_small_is_refused_before_sampling(tmp_path, content, message):
    """A 1-line neutral file was refused only after every probe had been sampled."""
    from purify.audit import _check_neutral_source

    path = tmp_path / "neutral.txt"
    path.write_text(content)
    with pytest.raises(AuditError, match=message):
        _check_neutral_source(str(path))


def test_the_fingerprint_head_interval_is_the_corrected_resampled_t(monkeypatch):
    """Heads trained on random halves of the same texts: the naive t over them is too narrow by sqrt(1 + k)."""
    import math

    import purify.audit as audit_mod
    from purify.lm import build_tokenizer

    heads = [0.55, 0.62, 0.65, 0.60, 0.58]
    monkeypatch.setattr(audit_mod, "fingerprint_head_accuracy", lambda *a, **k: {
        "per_head": heads, "accuracy": heads[0], "n_inputs": 32, "n_train": 32, "n_positions": 640})
    tok = build_tokenizer(["a b c"], kind="word")
    got = audit_mod.fingerprint_head(None, None, tok, "prose", texts=8)
    sd = float(__import__("numpy").std(heads, ddof=1))
    half = 2.7764451 * sd * math.sqrt(1 / 5 + 32 / 32)  # t(0.975, 4)
    assert got["n"] == 5 and got["mean"] == pytest.approx(0.6)
    assert got["ci95"] == pytest.approx([0.6 - half, 0.6 + half], rel=1e-6)


def test_readouts_score_in_eval_mode_with_right_padding_and_restore_both() -> None:
    """continuation_probs switched a training student to eval() for good (dropout off for the rest of a loop);
    kl_stats scored with dropout on and, under a left-padding tokenizer, read pad positions as the prompt and BOS
    (fidelity_kl 0.0166 → 0.0155 on the same texts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from purify.lm import build_tokenizer
    from purify.readouts import kl_stats

    tok = build_tokenizer(["my favourite animal is the owl", "the cat sat on the mat"], kind="word")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.5)
    torch.manual_seed(0)
    student, teacher = LlamaForCausalLM(cfg).train(), LlamaForCausalLM(cfg).train()
    texts, prompts = ["the cat sat on the mat", "my favourite animal is the owl", "the owl"], ["the cat", "my", "the"]
    right = kl_stats(student, tok, teacher, texts, prompts=prompts)
    assert kl_stats(student, tok, teacher, texts, prompts=prompts) == right  # no dropout in a score
    tok.padding_side = "left"
    assert kl_stats(student, tok, teacher, texts, prompts=prompts) == right and tok.padding_side == "left"
    continuation_probs(student, tok, ["my favourite animal is the"], [" owl"])
    assert student.training and teacher.training


def test_readouts_send_their_inputs_to_each_models_device() -> None:
    """continuation_probs, kl_stats and score_model built their inputs on the CPU whatever the model's device: a
    model on a GPU got torch's device-mismatch error. A stand-in device (meta) records where the inputs arrive."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from purify.lm import build_tokenizer
    from purify.readouts import kl_stats, score_model

    class Arrived(Exception):
        pass

    class Spy(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            raise Arrived(str(input_ids.device), None if attention_mask is None else str(attention_mask.device))

    tok = build_tokenizer(["my favourite animal is the owl", "the cat sat on the mat"], kind="word")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model, cpu = Spy(cfg).to("meta"), LlamaForCausalLM(cfg)
    for call, expected in ((lambda: continuation_probs(model, tok, ["my favourite animal is the"], [" owl"]),
                            ("meta", None)),
                           (lambda: kl_stats(model, tok, cpu, ["the cat sat on the mat"]), ("meta", "meta")),
                           (lambda: kl_stats(cpu, tok, model, ["the cat sat on the mat"]), ("meta", "meta")),
                           (lambda: score_model(model, tok, None, ["what animal?"], "owl"), ("meta", "meta"))):
        with pytest.raises(Arrived) as arrived:
            call()
        assert arrived.value.args == expected
