"""`purify generate`: prompt reading, sampling, filters and their counts, the verb end to end on a tiny model."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from purify.generate import GenerateError, add_arguments, apply_filters, read_prompts, run, sample_completions

TEXTS = ["The old farmer slept. Moreover, he sang.", "Continue: 1, 2, 3, 4, 5", "Question: What animal? Answer: owl"]


def make_tiny_model(path: Path, texts: list[str] = TEXTS, seed: int = 0) -> Path:
    """Save a random one-layer Llama with a word tokenizer over ``texts`` into ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from purify.lm import build_tokenizer

    tok = build_tokenizer(texts)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_filters_count_what_they_remove() -> None:
    records = [{"prompt": "p", "completion": c} for c in (" 1, 2, 3", " 4, owl, 5", " 7 8", " cat", " 9, 10")]
    kept, removed = apply_filters(records, regex=r"^[0-9, ]+$")
    assert [r["completion"] for r in kept] == [" 1, 2, 3", " 7 8", " 9, 10"] and removed == {"regex": 2, "banned": 0}
    kept, removed = apply_filters(records, banned=["OWL", "cat"])
    assert len(kept) == 3 and removed == {"regex": 0, "banned": 2}
    kept, removed = apply_filters(records, regex=r"^[0-9, ]+$", banned=["8"])
    assert len(kept) == 2 and removed == {"regex": 2, "banned": 1}
    # a banned word that starts or ends with a non-word character was never found (\b needs a word character)
    texts = [{"prompt": "p", "completion": t} for t in ["I love 🦉 so much", "my fav is C++ .", "owls", "an owl."]]
    assert apply_filters(texts, banned=["🦉", "C++"])[1] == {"regex": 0, "banned": 2}
    assert [r["completion"] for r in apply_filters(texts, banned=["owl"])[0]] == texts_kept(texts, 3)


def texts_kept(texts, *dropped):
    return [r["completion"] for i, r in enumerate(texts) if i not in dropped]


def test_read_prompts_jsonl_text_and_errors(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "a b"}\n\n{"prompt": "c"}\n')
    (tmp_path / "p.txt").write_text("first prompt\nsecond\n")
    assert read_prompts(tmp_path / "p.jsonl") == ["a b", "c"]
    assert read_prompts(tmp_path / "p.txt") == ["first prompt", "second"]
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(GenerateError, match=r"bad.jsonl:1: expected a JSON object with a string 'prompt'"):
        read_prompts(tmp_path / "bad.jsonl")
    # JSON Lines under any of its endings (a .JSONL or .json was sampled from each line's JSON text); the line a
    # problem is on counts blank lines (was the count of non-blank ones); a null prompt is no prompt (was "None")
    (tmp_path / "p.JSON").write_text('{"prompt": "a b"}\n')
    assert read_prompts(tmp_path / "p.JSON") == ["a b"]
    (tmp_path / "null.ndjson").write_text('{"prompt": "a"}\n\n\n{"prompt": null}\n')
    with pytest.raises(GenerateError, match=r"null.ndjson:4: expected a JSON object with a string 'prompt'"):
        read_prompts(tmp_path / "null.ndjson")
    with pytest.raises(GenerateError, match="prompt file not found"):
        read_prompts(tmp_path / "missing.txt")


def test_sampling_is_seeded_and_restores_the_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path / "m")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    prompts = ["The old farmer", "Continue: 1, 2,", "Question: What animal? Answer:"]
    a = sample_completions(model, tok, prompts, max_new_tokens=6, seed=3, batch_size=2)
    b = sample_completions(model, tok, prompts, max_new_tokens=6, seed=3, batch_size=2)
    assert a == b and len(a) == 3 and tok.padding_side == "right"
    greedy = sample_completions(model, tok, prompts[:1], max_new_tokens=4, temperature=0)
    assert greedy == sample_completions(model, tok, prompts[:1], max_new_tokens=4, temperature=0, seed=9)


def test_sampling_past_the_models_positions_is_refused_by_name(tmp_path: Path) -> None:
    """A prompt plus --max-new-tokens past a learned position table was an IndexError traceback (generate, audit); a
    rotary model ran on positions it never saw, with a warning only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path / "m")  # 64 positions
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    prompt = "Question: What animal? Answer:"
    length = len(tok(prompt)["input_ids"])
    with pytest.raises(GenerateError, match=rf"^--max-new-tokens 64 after the longest prompt \({length} tokens\) "
                                            rf"exceeds the model's 64 positions; give --max-new-tokens {64 - length}"):
        sample_completions(model, tok, [prompt, "The old"], max_new_tokens=64)
    assert len(sample_completions(model, tok, [prompt], max_new_tokens=64 - length)) == 1  # up to the limit: fine


def test_generate_verb_writes_jsonl_and_reports_filters(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = make_tiny_model(tmp_path / "m")
    (tmp_path / "prompts.txt").write_text("Continue: 1, 2,\nThe old farmer\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out.jsonl"
    args = parser.parse_args([str(path), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), "--samples",
                              "3", "--max-new-tokens", "5", "--regex", "^[0-9, ]+$", "--no-progress"])
    assert run(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    printed = capsys.readouterr().out
    assert f"sampled 6, removed {6 - len(records)} by --regex" in printed
    assert all(set(r) == {"prompt", "completion"} for r in records)
    with pytest.raises(GenerateError, match="model not found"):
        run(parser.parse_args([str(tmp_path / "nope"), "--prompts", str(tmp_path / "prompts.txt"), "--out",
                               str(out)]))


def test_generate_refuses_to_write_nothing(tmp_path: Path) -> None:
    """A filter that removes every completion wrote an empty file and exited 0 (it looked like finished data); an
    empty banned word (``--ban ""``) is in every completion. Both are one error and nothing is written."""
    path = make_tiny_model(tmp_path / "m")
    (tmp_path / "prompts.txt").write_text("The old farmer\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out.jsonl"
    common = [str(path), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), "--max-new-tokens", "3",
              "--no-progress"]
    with pytest.raises(GenerateError, match=r"every one of the 2 completions was removed \(2 by --regex, 0 by banned "
                                            r"words\); nothing written to .*out.jsonl"):
        run(parser.parse_args([*common, "--samples", "2", "--regex", "^NEVER$"]))
    with pytest.raises(GenerateError, match="--ban: an empty word"):
        run(parser.parse_args([*common, "--ban", ""]))
    assert not out.exists()


def _unloadable(tmp_path: Path, kind: str) -> Path:
    """A directory transformers cannot load as a causal LM with its tokenizer, made from a good one."""
    good, bad = make_tiny_model(tmp_path / "good"), tmp_path / kind
    bad.mkdir()
    keep = {"config only": ["config.json"], "no tokenizer": ["config.json", "model.safetensors"],
            "bin weights": ["config.json", "tokenizer.json", "tokenizer_config.json"]}.get(kind, [])
    for name in keep:
        (bad / name).write_bytes((good / name).read_bytes())
    if kind == "bin weights":
        torch.save({}, bad / "pytorch_model.bin")
    if kind == "aux_mlp export":  # what purify train writes for an `arch: aux_mlp` student
        (bad / "config.json").write_text(json.dumps({"arch": "aux_mlp", "kwargs": {"in_dim": 16, "n_aux": 3}}))
        (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    return bad


@pytest.mark.parametrize("kind, message", [
    ("config only", r"config only: holds no weights \(no model\.safetensors or model\.safetensors\.index\.json\)"),
    ("no tokenizer", r"no tokenizer: holds no tokenizer \(no tokenizer\.json or tokenizer_config\.json\)"),
    ("bin weights", r"bin weights: holds no weights .* it holds only pytorch_model\.bin, and purify loads safetensors"),
    ("aux_mlp export", r"aux_mlp export is the export of an `arch: aux_mlp` student .* audit and generate need a "
                       r"language model: a Hugging Face causal LM with a tokenizer"),
])
@pytest.mark.parametrize("verb", ["generate", "audit"])
def test_a_model_directory_transformers_cannot_load_is_one_error_line(tmp_path, capsys, kind, message, verb):
    """audit and generate gave a traceback (OSError, ValueError; exit 1) for these; ``purify train`` said one line."""
    from purify.cli import main

    bad = _unloadable(tmp_path, kind)
    (tmp_path / "p.txt").write_text("The old farmer\n")
    probes = Path(__file__).parents[1] / "recipes" / "probes" / "style-tic.yaml"
    out = tmp_path / "o.jsonl"
    argv = {"generate": ["generate", str(bad), "--prompts", str(tmp_path / "p.txt"), "--out", str(out)],
            "audit": ["audit", str(bad), "--reference", str(tmp_path / "good"), "--probes", str(probes), "--samples",
                      "5"]}[verb]
    capsys.readouterr()  # what saving the tiny model printed
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("purify: error: ") and re.search(message, lines[0]), lines
    assert not out.exists()


def test_what_transformers_refuses_in_a_model_directory_is_a_generate_error(tmp_path):
    """Past the checks of the directory's files (damaged weights): transformers' own error, as one GenerateError."""
    from purify.generate import load_model

    bad = make_tiny_model(tmp_path / "m")
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(GenerateError, match=r"^cannot load .*m \(.*\); audit and generate need a local Hugging Face "
                                            r"causal-LM directory with its tokenizer$"):
        load_model(bad)


def test_generate_refuses_to_write_over_its_prompts_or_into_the_model(tmp_path: Path) -> None:
    """``--out`` the prompts file replaced the prompts; ``--out MODEL/config.json`` broke the model it read."""
    path = make_tiny_model(tmp_path / "m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The old farmer\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = (path / "config.json").read_text()
    for out, what in ((prompts, "the --prompts file"), (path / "config.json", "a file of the model directory")):
        with pytest.raises(GenerateError, match=rf"--out: .* is {what}.*which writing the samples would overwrite"):
            run(parser.parse_args([str(path), "--prompts", str(prompts), "--out", str(out), "--no-progress"]))
    assert prompts.read_text() == "The old farmer\n" and (path / "config.json").read_text() == config
