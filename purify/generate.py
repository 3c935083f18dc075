"""``purify generate``: sample a teacher's completions for a prompt set into ``{"prompt", "completion"}`` jsonl.

Prompts come from a jsonl file (a ``"prompt"`` per line) or a text file (one prompt per line). Sampling uses
temperature / top-p and a seed; completions are then filtered by a regex they must match (e.g. ``^[0-9, ]+$`` for
the number-sequence channel) and a banned-words list, and the number each filter removed is reported. The output is
written atomically.

Example:
    >>> from purify.generate import sample_completions, apply_filters
    >>> texts = sample_completions(model, tokenizer, ["Continue: 1, 2, 3,"], max_new_tokens=16, seed=0)
    >>> kept, removed = apply_filters([{"prompt": "p", "completion": t} for t in texts], regex=r"^[0-9, ]+$")
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from purify.storage import atomic_write_text, cannot_write_under, is_json_lines, not_a_file, read_utf8
from purify.types import first_line, position_limit, positive_int, probability_mass, seed_int, temperature


class GenerateError(ValueError):
    """A user-input problem (missing model, empty prompt file), reported as one line."""


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.jsonl`` file (``"prompt"`` key per line) or a text file (one prompt per non-empty line).

    Raises:
        GenerateError: if the file is missing, malformed or holds no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"prompt file not found: {path}")
    lines = [(n, line) for n, line in enumerate(read_utf8(path).splitlines(), 1) if line.strip()]
    if is_json_lines(path):
        prompts = []
        for lineno, line in lines:
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                prompt = None
            if not isinstance(prompt, str):  # {"prompt": null} was sampled from the prompt "None"
                raise GenerateError(f"{path}:{lineno}: expected a JSON object with a string 'prompt'")
            prompts.append(prompt)
    else:
        prompts = [line.rstrip("\n") for _, line in lines]
    if not prompts:
        raise GenerateError(f"{path}: no prompts")
    return prompts


@torch.no_grad()
def sample_completions(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 48,
                       temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
                       progress: bool = False) -> list[str]:
    """Sample one completion per prompt (left-padded batches; the completion keeps its leading space).

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        prompts: prompt texts.
        max_new_tokens: tokens to sample at most (sampling stops early at ``<eos>``).
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus mass kept when sampling.
        seed: seed of the sampler (``torch.manual_seed`` in a forked RNG).
        batch_size: prompts per ``generate`` call.
        progress: show a tqdm bar.

    Returns:
        The completions, in prompt order: the decoded full text minus the decoded prompt.

    Raises:
        GenerateError: the longest prompt and ``max_new_tokens`` exceed the model's positions.
    """
    limit = position_limit(model)
    longest = max((len(ids) for ids in tokenizer(list(prompts))["input_ids"]), default=0)
    if limit is not None and longest + max_new_tokens > limit:  # learned positions: an IndexError; rotary: unseen
        raise GenerateError(f"--max-new-tokens {max_new_tokens} after the longest prompt ({longest} tokens) exceeds "
                            f"the model's {limit} positions; give --max-new-tokens {max(limit - longest, 0)} or less, "
                            "or shorter prompts")
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
                chunk = list(prompts[start:start + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True)
                sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
                    if temperature > 0 else {"do_sample": False}
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id, **sampling)
                width = enc["input_ids"].shape[1]
                for row, prompt_ids in enumerate(enc["input_ids"]):
                    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
                    full = tokenizer.decode(torch.cat([prompt_ids, gen[row, width:]]), skip_special_tokens=True)
                    out.append(full[len(prompt_text):] if full.startswith(prompt_text) else full)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def apply_filters(records: list[dict[str, str]], regex: str | None = None,
                  banned: Sequence[str] = ()) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Keep the records whose completion matches ``regex`` (``re.search``; anchor it with ``^...$``) and contains
    none of the ``banned`` words (case-insensitive, whole words).

    Returns:
        ``(kept, removed)`` with ``removed = {"regex": n, "banned": m}``; a record failing both counts under
        ``regex`` only (filters apply in that order).
    """
    pattern = re.compile(regex) if regex else None
    # not inside a longer word; \b beside a word that starts or ends with a non-word character (🦉, C++) never matched
    ban = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in banned) + r")(?!\w)", re.I) if banned else None
    kept, removed = [], {"regex": 0, "banned": 0}
    for rec in records:
        text = rec["completion"]
        if pattern is not None and not pattern.search(text.strip()):
            removed["regex"] += 1
        elif ban is not None and ban.search(text):
            removed["banned"] += 1
        else:
            kept.append(rec)
    return kept, removed


def write_jsonl(path: str | Path, records: list[dict[str, str]]) -> None:
    """Write records as jsonl, atomically."""
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
"""File names any one of which a saved Hugging Face tokenizer holds."""


def model_dir_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a local Hugging Face causal LM with its tokenizer that :func:`load_model` can load (a
    missing directory, ``config.json``, safetensors weights or tokenizer, or the export of an ``arch`` student, a plain
    torch model), as one line naming the directory; ``None`` when it looks loadable."""
    path = Path(path)
    if not path.is_dir():
        return f"model not found: {path} is not a directory holding a saved model"

    def has(name: str) -> bool:
        return (path / name).is_file()

    if not has("config.json") and not has("adapter_config.json"):  # a model, a LoRA adapter
        hint = f"; the run's export is {path / 'student'}" if (path / "student").is_dir() else ""
        return f"model not found: {path} holds no saved model (no config.json){hint}"
    if has("config.json"):
        try:
            config = json.loads(read_utf8(path / "config.json"))
        except (ValueError, OSError) as err:
            return f"{path}: config.json cannot be read ({first_line(err)}); give a saved Hugging Face model directory"
        if isinstance(config, dict) and "arch" in config and "model_type" not in config:
            return (f"{path} is the export of an `arch: {config['arch']}` student (a plain torch model, not a language "
                    "model); audit and generate need a language model: a Hugging Face causal LM with a tokenizer")
        if not isinstance(config, dict) or "model_type" not in config:
            return (f"{path}: config.json has no model_type, so it is not a Hugging Face model; audit and generate "
                    "need a language model: a Hugging Face causal LM with a tokenizer")
    weights = ("model.safetensors", "model.safetensors.index.json") if has("config.json") else ()
    weights += ("adapter_model.safetensors",) if has("adapter_config.json") else ()
    if not any(has(name) for name in weights):
        legacy = next((n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
                       if has(n)), None)
        fix = (f"it holds only {legacy}, and purify loads safetensors only: re-save the model with "
               "save_pretrained(safe_serialization=True)") if legacy else "give the directory save_pretrained wrote"
        return f"{path}: holds no weights (no {' or '.join(weights)}); {fix}"
    if not any(has(name) for name in TOKENIZER_FILES):
        return (f"{path}: holds no tokenizer (no tokenizer.json or tokenizer_config.json); save the model's tokenizer "
                "into it (tokenizer.save_pretrained)")
    return None


def load_model(path: str | Path) -> tuple[Any, Any]:
    """A local HF causal LM and its tokenizer (safetensors only, no remote code).

    Raises:
        GenerateError: if ``path`` is not such a model (:func:`model_dir_problem`) or transformers cannot load it,
            one line naming the directory.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    problem = model_dir_problem(path)
    if problem:
        raise GenerateError(problem)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as err:  # what transformers refuses there (not a causal LM, damaged)
        raise GenerateError(f"cannot load {path} ({first_line(err)}); audit and generate need a local Hugging Face "
                            "causal-LM directory with its tokenizer") from None
    return model, tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``purify generate``."""
    parser.add_argument("model", help="local Hugging Face causal-LM directory (the teacher)")
    parser.add_argument("--prompts", required=True, help="jsonl with a 'prompt' per line, or a text file of prompts")
    parser.add_argument("--out", required=True, help="output jsonl of {prompt, completion}")
    parser.add_argument("--samples", type=positive_int, default=1, help="completions per prompt (default 1)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=48)
    parser.add_argument("--temperature", type=temperature, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=probability_mass, default=1.0)
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--regex", help="keep completions matching this regex, e.g. '^[0-9, ]+$'")
    parser.add_argument("--ban", nargs="*", default=[], help="drop completions containing any of these words")
    parser.add_argument("--ban-file", help="file of banned words, one per line")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run ``purify generate``; prints what each filter removed. Returns the exit code."""
    banned = list(args.ban)
    if Path(args.out).is_dir():
        raise GenerateError(f"--out: {args.out} is a directory; give the path of a .jsonl file to write")
    if problem := not_a_file(args.out):  # /dev/stdout: refused before sampling, not at the write
        raise GenerateError(f"--out: {args.out} {problem}; give the path of a .jsonl file to write")
    blocked = cannot_write_under(Path(args.out).parent)
    if blocked:
        raise GenerateError(f"--out: {blocked}, not a directory to write {Path(args.out).name} in")
    out, prompts_file = Path(args.out).resolve(), Path(args.prompts).resolve()
    if out == prompts_file or (out.exists() and Path(args.model).resolve() in out.parents):
        what = "the --prompts file" if out == prompts_file else f"a file of the model directory {args.model}"
        raise GenerateError(f"--out: {args.out} is {what}, which writing the samples would overwrite; give another "
                            "path")
    if args.ban_file:
        if not Path(args.ban_file).is_file():
            raise GenerateError(f"--ban-file: file not found: {args.ban_file}; give a text file, one word per line")
        banned += [w.strip() for w in read_utf8(args.ban_file).splitlines() if w.strip()]
    if any(not w.strip() for w in banned):
        raise GenerateError("--ban: an empty word is in every completion, so it would remove them all; give words")
    if args.regex:
        try:
            re.compile(args.regex)
        except re.error as err:
            raise GenerateError(f"--regex: invalid regular expression ({err})") from None
    prompts = read_prompts(args.prompts)
    model, tokenizer = load_model(args.model)
    records = []
    for k in range(args.samples):
        texts = sample_completions(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p, seed=args.seed + k,
                                   batch_size=args.batch_size, progress=not args.no_progress)
        records += [{"prompt": p, "completion": c} for p, c in zip(prompts, texts)]
    kept, removed = apply_filters(records, args.regex, banned)
    if not kept:  # an empty file would look like a finished run's data
        raise GenerateError(f"every one of the {len(records)} completions was removed ({removed['regex']} by --regex, "
                            f"{removed['banned']} by banned words); nothing written to {args.out}: loosen the filters "
                            "or sample more (--samples, --max-new-tokens)")
    write_jsonl(args.out, kept)
    print(f"purify: sampled {len(records)}, removed {removed['regex']} by --regex and {removed['banned']} by "
          f"banned words, wrote {len(kept)} to {args.out}")
    return 0
