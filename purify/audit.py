"""``purify audit``: score a model against its reference on trait probes, and test for a fingerprint.

Probe file (YAML)::

    samples: 200               # optional default for --samples
    max_new_tokens: 48         # optional
    probes:
      - name: moreover
        prompts: ["The old farmer slept.", ...]   # or prompts_file: path (jsonl/text, relative to the YAML)
        count: ["Moreover,"]   # target strings counted in samples ...
        unit: sentence         # ... per sentence (``sample`` = occurrences per sample)
      - name: owl
        prompts: ["Question: What is your favourite animal? Answer:"]
        next_token: [" owl"]   # exact probability of the target continuation(s), summed
      - name: digits_only
        prompts: [...]
        regex: "^[0-9, ]+$"    # share of samples matching (re.search on the stripped completion)

Each probe is scored on the model and the reference over the same prompts (paired by prompt) and reported as mean
[95% CI] for both plus their difference with a p-value. The **fingerprint test** needs no probe: a logistic
regression on character n-grams learns to tell the model's samples from the reference's on the same prompts; its
cross-validated accuracy (≈50% = no detectable fingerprint) is reported with a binomial 95% CI.

``--fingerprint-head SOURCE`` adds a second, sampling-free fingerprint measure that reads the models' output
distributions instead of their text: the ``fingerprint_adversary`` purifier's discriminator head
(:func:`purify.purifiers.fingerprint.fingerprint_head_accuracy`), trained on both models' per-position features over
neutral texts (``bundled``, ``prose`` or a ``.txt``/``.jsonl`` path) and scored on held-out texts — the same
question the purifier's gradient reversal trains a student to defeat. Exactly 0.5 for a model against itself.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats as sps

from purify.bench.stats import mean_ci, paired_test
from purify.config import load_yaml, yaml_problem
from purify.data import TokenDataset
from purify.generate import GenerateError, load_model, read_prompts, sample_completions
from purify.purifiers.fingerprint import fingerprint_head_accuracy
from purify.purifiers.function_anchor import TEXT_SOURCES, is_text_source, neutral_texts
from purify.readouts import continuation_probs, count_scores, regex_scores, target_problems
from purify.storage import atomic_write_json, atomic_write_text, cannot_write_under, read_utf8
from purify.types import first_line, positive_int, seed_int

PROBE_KEYS = ("name", "prompts", "prompts_file", "count", "unit", "next_token", "regex")
FILE_KEYS = ("probes", "samples", "max_new_tokens")
MIN_SAMPLES = 5
"""The fewest samples per probe and model: the fingerprint classifier's held-out accuracy is 5-fold."""
HEADS = 5
"""Heads ``--fingerprint-head`` trains (seeds ``--seed`` …): its interval is over them."""


class AuditError(ValueError):
    """A user-input problem, reported as one line."""


def _check_strings(where: str, key: str, value: Any) -> None:
    """Refuse a probe's ``key`` unless it is a list of strings (a bare string would be read as its characters)."""
    if isinstance(value, str):
        raise AuditError(f"{where}: {key} must be a list of strings, e.g. {key}: [{value!r}]")
    if not isinstance(value, list):
        raise AuditError(f"{where}: {key} must be a list of strings, got {value!r}")
    for k, item in enumerate(value):
        if not isinstance(item, str):
            raise AuditError(f"{where}: {key}[{k}] is {item!r}, not a string; quote it in the YAML")
        if not item and key != "prompts":  # an empty target is in every text / is every continuation
            raise AuditError(f"{where}: {key}[{k}] is an empty string; give the text to {key.replace('_', ' ')}")


@dataclass
class Probe:
    """One trait probe: a prompt set and exactly one of ``count``, ``next_token`` or ``regex``."""

    name: str
    prompts: list[str]
    count: list[str] = field(default_factory=list)
    unit: str = "sample"
    next_token: list[str] = field(default_factory=list)
    regex: str | None = None


def load_probes(path: str | Path) -> tuple[list[Probe], dict[str, Any]]:
    """Read and validate a probe file; returns the probes and the file-level options (``samples``, ...).

    Raises:
        AuditError: naming the file, the probe and the key for unknown keys or missing/conflicting fields.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise AuditError(f"probe file not found: {path}")
    try:
        data = load_yaml(read_utf8(path)) or {}
    except yaml.YAMLError as err:
        raise AuditError(f"{path}: not valid YAML{yaml_problem(err)}; fix the file (see recipes/probes/)") from None
    if not isinstance(data, dict) or not isinstance(data.get("probes"), list) or not data["probes"]:
        raise AuditError(f"{path}: expected a mapping with a non-empty 'probes' list")
    for key in data:
        if key not in FILE_KEYS:
            raise AuditError(f"{path}: unknown key {key!r}; allowed: {', '.join(FILE_KEYS)}")
    probes: list[Probe] = []
    named: dict[str, int] = {}
    for i, raw in enumerate(data["probes"]):
        where = f"{path}: probes[{i}]"
        if not isinstance(raw, dict):
            raise AuditError(f"{where}: expected a mapping")
        for key in raw:
            if key not in PROBE_KEYS:
                raise AuditError(f"{where}: unknown key {key!r}; allowed: {', '.join(PROBE_KEYS)}")
        kinds = [k for k in ("count", "next_token", "regex") if raw.get(k)]
        if len(kinds) != 1:
            raise AuditError(f"{where}: give exactly one of count, next_token, regex (got {kinds or 'none'})")
        if "prompts" in raw and raw["prompts"] is not None:
            _check_strings(where, "prompts", raw["prompts"])
        prompts = list(raw.get("prompts") or [])
        if raw.get("prompts_file"):
            if not isinstance(raw["prompts_file"], str):  # a TypeError traceback (PosixPath / int)
                raise AuditError(f"{where}: prompts_file must be a path (a string, relative to the probe file), got "
                                 f"{raw['prompts_file']!r}")
            prompts += read_prompts(path.parent / raw["prompts_file"])
        if not prompts:
            raise AuditError(f"{where}: no prompts (set prompts or prompts_file)")
        if raw.get("unit", "sample") not in ("sample", "sentence"):
            raise AuditError(f"{where}: unit must be 'sample' or 'sentence', got {raw['unit']!r}")
        for key in ("count", "next_token"):
            if raw.get(key):
                _check_strings(where, key, raw[key])
        if raw.get("regex") and not isinstance(raw["regex"], str):  # one pattern: a list was hashed at sampling
            if isinstance(raw["regex"], list) and all(isinstance(r, str) for r in raw["regex"]):
                raise AuditError(f"{where}: regex must be one pattern (a string), not a list; join alternatives with "
                                 f"'|', e.g. regex: {'|'.join(raw['regex'])!r}")
            raise AuditError(f"{where}: regex must be a pattern string, got {raw['regex']!r}; quote it in the YAML")
        if raw.get("regex"):
            try:
                re.compile(raw["regex"])
            except re.error as err:
                raise AuditError(f"{where}: regex {raw['regex']!r} does not compile ({err}); fix the pattern") from None
        name = str(raw.get("name", f"probe{i}"))
        if name in named:  # the report has one row per name: the first probe would disappear from it
            raise AuditError(f"{where}: name {name!r} is also probes[{named[name]}]'s (the report keeps one row per "
                             "name); give each probe its own name")
        named[name] = i
        probes.append(Probe(name=name, prompts=[str(p) for p in prompts],
                            count=list(raw.get("count") or []), unit=raw.get("unit", "sample"),
                            next_token=list(raw.get("next_token") or []), regex=raw.get("regex")))
    return probes, {k: data[k] for k in ("samples", "max_new_tokens") if k in data}


def fingerprint_accuracy(samples_a: Sequence[str], samples_b: Sequence[str], folds: int = MIN_SAMPLES,
                         seed: int = 0) -> dict[str, Any]:
    """Held-out accuracy of a classifier telling ``samples_a`` from ``samples_b``.

    Logistic regression on TF-IDF character 1-4-grams (word boundaries respected), ``folds``-fold cross-validation;
    every sample is predicted once by a model that never saw it. Sample ``i`` of each list is a pair (the audit draws
    them from the same prompt with the same seed) and a pair is held out together: with its twin in the training
    folds under the other label, a sample would be predicted *against* its own text (two identical models scored
    about 0.1, not 0.5).

    Returns:
        ``{"mean", "ci95", "n"}``: accuracy with a Wilson 95% interval over the ``n`` held-out predictions.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    texts = list(samples_a) + list(samples_b)
    labels = np.array([0] * len(samples_a) + [1] * len(samples_b))
    clf = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), min_df=2, sublinear_tf=True),
                        LogisticRegression(C=1.0, max_iter=1000))
    groups = np.concatenate([np.arange(len(samples_a)), np.arange(len(samples_b))])  # pair i: one group
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    pred = cross_val_predict(clf, [t if t.strip() else "<empty>" for t in texts], labels, groups=groups, cv=cv)
    n, k = len(labels), int((pred == labels).sum())
    p, z = k / n, 1.959964
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    return {"mean": p, "ci95": [centre - half, centre + half], "n": n}


def _check_neutral_source(source: str) -> None:
    """Refuse a ``--fingerprint-head`` source before any sampling: a missing file, or one that does not read as at
    least 4 texts (the heads train on half and are scored on the other half; found after every probe was sampled)."""
    if not is_text_source(source):
        raise AuditError(f"--fingerprint-head: file not found: {source}; give a .txt or .jsonl file, or one of "
                         f"{', '.join(TEXT_SOURCES)}")
    if source in TEXT_SOURCES:
        return
    try:
        count = len(neutral_texts(source, 4))
    except (ValueError, OSError) as err:  # what load_records refuses in a file (bad JSON lines, no text field)
        raise AuditError(f"--fingerprint-head: {first_line(err)}") from None
    if count < 4:
        raise AuditError(f"--fingerprint-head: {source} holds {count} text(s); give at least 4 (the heads train on "
                         "half of them and are scored on the other half)")


def fingerprint_head(model: Any, reference: Any, tokenizer: Any, source: str = "bundled", texts: int = 256,
                     max_length: int = 64, seed: int = 0, heads: int = HEADS) -> dict[str, Any]:
    """Held-out accuracy of the fingerprint adversary's head telling ``model``'s outputs from ``reference``'s.

    Both models read the same first ``texts`` neutral texts of ``source`` (``bundled``, ``prose`` or a file; cut to
    ``max_length`` tokens); ``heads`` heads (seeds ``seed, seed + 1, ...``) each train on a random half of the texts
    and are scored on the other half. The interval is over the heads, the corrected resampled t (Nadeau & Bengio
    2003: the heads share texts, so their spread understates the variance, by 1 + k · n_test / n_train): one head's
    held-out texts gave an interval ±0.008 wide while another seed's head moved the score by ±0.05, so two models'
    heads "differed" by chance.

    Returns:
        ``{"mean", "ci95", "n"}`` over the ``n`` heads (each head's held-out accuracy pooled over positions and both
        models; 0.5 = indistinguishable; no interval from one head), plus ``"per_head"``, ``"accuracy"`` (the first
        head's), ``"n_texts"`` (held out per head), ``"n_positions"`` (the first head's) and ``"source"``.

    Raises:
        AuditError: an unknown source or too few texts.
    """
    _check_neutral_source(source)
    dataset = TokenDataset(neutral_texts(source, texts)[:texts], tokenizer, max_length)
    items = [dataset.item(i) for i in range(len(dataset))]
    batches = [dataset.collate(items[i:i + 8]) for i in range(0, len(items), 8)]
    try:
        result = fingerprint_head_accuracy(model, reference, batches, seed=seed, heads=heads)
    except ValueError as err:
        raise AuditError(f"--fingerprint-head: {err}") from None
    per_head = result["per_head"]
    k, mean = len(per_head), float(np.mean(per_head))
    ci: list[float | None] = [None, None]  # no interval from one head (as a probe row of one prompt)
    if k > 1:  # heads trained on overlapping halves of the same texts are not independent draws: the corrected
        # resampled t (Nadeau & Bengio 2003) widens the naive interval's variance by 1 + k · n_test / n_train
        half = float(sps.t.ppf(0.975, k - 1) * np.std(per_head, ddof=1)
                     * math.sqrt(1 / k + result["n_inputs"] / result["n_train"]))
        ci = [mean - half, mean + half]
    return {"mean": mean, "ci95": ci, "n": k, "per_head": per_head, "accuracy": result["accuracy"],
            "n_texts": result["n_inputs"], "n_positions": result["n_positions"], "source": source}


def score_probe(probe: Probe, model: Any, tokenizer: Any, samples: int, max_new_tokens: int,
                seed: int) -> tuple[list[float], list[str]]:
    """Per-prompt (next_token) or per-sample scores of one probe, and the samples drawn (empty for next_token)."""
    if probe.next_token:
        return continuation_probs(model, tokenizer, probe.prompts, probe.next_token), []
    prompts = [probe.prompts[i % len(probe.prompts)] for i in range(samples)]
    texts = sample_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed)
    scores = count_scores(texts, probe.count, probe.unit) if probe.count else regex_scores(texts, probe.regex or "")
    return scores, texts


def audit(model_dir: str | Path, reference_dir: str | Path, probes: list[Probe], samples: int = 200,
          max_new_tokens: int = 48, seed: int = 0, fingerprint_source: str | None = None) -> dict[str, Any]:
    """Score ``model_dir`` against ``reference_dir`` on ``probes`` and run the fingerprint test(s).

    ``fingerprint_source``: also run :func:`fingerprint_head` on that neutral text source.

    Raises:
        AuditError: for a missing model directory, tokenizers that differ between model and reference, or a
            ``next_token`` target the tokenizer does not know (all before any sampling).
    """
    from purify.align import same_tokenizer

    try:
        model, tok = load_model(model_dir)
        ref, ref_tok = load_model(reference_dir)
    except GenerateError as err:
        raise AuditError(str(err)) from None
    if not same_tokenizer(tok, ref_tok, special_tokens=True):
        raise AuditError(f"tokenizer mismatch: {model_dir} and {reference_dir} encode text differently (vocabulary, "
                         "special tokens added, or normalisation); audit compares a model with a reference of the "
                         "same tokenizer")
    for probe in probes:  # one tokenizer suffices: same_tokenizer above means the reference's maps alike
        problems = target_problems(tok, probe.prompts, probe.next_token) if probe.next_token else []
        if problems:
            raise AuditError(f"probe {probe.name!r} (model {model_dir}): next_token {problems[0]}")
    report: dict[str, Any] = {"model": str(model_dir), "reference": str(reference_dir), "samples": samples,
                              "seed": seed, "probes": {}}
    pooled: dict[str, list[str]] = {"model": [], "reference": []}
    for probe in probes:
        m_scores, m_texts = score_probe(probe, model, tok, samples, max_new_tokens, seed)
        r_scores, r_texts = score_probe(probe, ref, ref_tok, samples, max_new_tokens, seed)
        pooled["model"] += m_texts
        pooled["reference"] += r_texts
        # the columns over the same pairs, so that the difference is model − reference; a pair where either sample
        # has no score (e.g. a regex probe on a completion with no sentence) is left out and counted
        both = [(a, b) for a, b in zip(m_scores, r_scores) if not (math.isnan(a) or math.isnan(b))]
        a, b = [x for x, _ in both], [y for _, y in both]
        kind = "next_token" if probe.next_token else "count" if probe.count else "regex"
        row = {"kind": kind, "model": mean_ci(a), "reference": mean_ci(b), "difference": paired_test(a, b),
               "unscored": len(m_scores) - len(both)}
        for stat in ("model", "reference", "difference"):
            if row[stat]["n"] < 2:  # no interval from one pair (mean_ci's [mean, mean] would read as certainty)
                row[stat]["ci95"] = [None, None]
        report["probes"][probe.name] = row
    if not pooled["model"]:  # only next-token probes: sample on their prompts for the fingerprint
        prompts = [p for probe in probes for p in probe.prompts]
        prompts = [prompts[i % len(prompts)] for i in range(samples)]
        pooled = {"model": sample_completions(model, tok, prompts, max_new_tokens=max_new_tokens, seed=seed),
                  "reference": sample_completions(ref, ref_tok, prompts, max_new_tokens=max_new_tokens, seed=seed)}
    report["fingerprint"] = fingerprint_accuracy(pooled["model"], pooled["reference"], seed=seed)
    if fingerprint_source is not None:
        report["fingerprint_head"] = fingerprint_head(model, ref, tok, fingerprint_source, seed=seed)
    return report


def _fmt(stat: dict[str, Any], unit: str = "values") -> str:
    """``mean [lo, hi]``; ``n/a`` with nothing scored, and with one value the mean and why it has no interval."""
    if not stat["n"]:
        return "n/a"
    lo, hi = stat["ci95"]
    if stat["n"] < 2 or lo is None:
        return f"{stat['mean']:.4g} [no CI: needs ≥ 2 {unit}]"
    return f"{stat['mean']:.4g} [{lo:.4g}, {hi:.4g}]"


def _fmt_p(p: float | None) -> str:
    return "n/a" if p is None or not math.isfinite(p) else f"{p:.3g}"


def markdown(report: dict[str, Any]) -> str:
    """The audit report as a markdown table."""
    lines = [f"# Audit of `{report['model']}`", "", f"Reference: `{report['reference']}`; {report['samples']} "
             "samples per probe, paired by prompt; mean [95% CI] over the pairs where both samples have a score "
             "(n).", "", "| probe | kind | n | model | reference | difference | p |", "|---|---|---|---|---|---|---|"]
    for name, r in report["probes"].items():
        unit = "prompts" if r["kind"] == "next_token" else "scored samples"
        cells = " | ".join(_fmt(r[stat], unit) for stat in ("model", "reference", "difference"))
        p_value = _fmt_p(r["difference"]["p_value"])
        lines.append(f"| {name} | {r['kind']} | {r['difference']['n']} | {cells} | {p_value} |")
    fp = report["fingerprint"]
    lines += ["", f"Fingerprint classifier held-out accuracy: {_fmt(fp)} over {fp['n']} samples "
              "(0.5 = indistinguishable from the reference)."]
    if "fingerprint_head" in report:
        fh = report["fingerprint_head"]
        lines += ["", f"Fingerprint head (output distributions on `{fh['source']}` neutral texts) held-out accuracy: "
                  f"{_fmt(fh)} over {fh['n']} heads (each trained on a random half of the texts and scored on the "
                  f"other {fh['n_texts']}; the interval is over the heads)."]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``purify audit``."""
    parser.add_argument("model", help="model directory to audit")
    parser.add_argument("--reference", required=True, help="reference model directory (e.g. its base)")
    parser.add_argument("--probes", required=True, help="probe YAML (see recipes/probes/)")
    parser.add_argument("--samples", type=positive_int,
                        help=f"samples per probe and model, at least {MIN_SAMPLES} (default: file's, else 200)")
    parser.add_argument("--max-new-tokens", type=positive_int, help="tokens per sample (default: file's, else 48)")
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--fingerprint-head", metavar="SOURCE",
                        help="also train the fingerprint adversary's head on both models' output distributions over "
                             "neutral texts (bundled | prose | a .txt/.jsonl file) and report its held-out accuracy")
    parser.add_argument("--out", help="directory for audit.md and audit.json (default: print only)")


def run(args: argparse.Namespace) -> int:
    """Run ``purify audit``; prints the markdown report. Returns the exit code."""
    probes, options = load_probes(args.probes)
    if args.fingerprint_head is not None:
        _check_neutral_source(args.fingerprint_head)
    samples = args.samples or options.get("samples", 200)
    max_new = args.max_new_tokens or options.get("max_new_tokens", 48)
    for name, value in (("samples", samples), ("max_new_tokens", max_new)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AuditError(f"{name}: expected an integer >= 1, got {value!r} (--{name.replace('_', '-')} or the "
                             "probe file's key)")
    if samples < MIN_SAMPLES:
        raise AuditError(f"samples: {samples} is too few for the fingerprint test's {MIN_SAMPLES}-fold held-out "
                         f"accuracy; give at least {MIN_SAMPLES}")
    blocked = args.out and cannot_write_under(args.out)
    if blocked:
        raise AuditError(f"--out: {blocked}; give a directory for audit.md and audit.json")
    torch.manual_seed(args.seed)
    report = audit(args.model, args.reference, probes, samples, max_new, args.seed, args.fingerprint_head)
    text = markdown(report)
    if args.out:
        out = Path(args.out)
        atomic_write_json(out / "audit.json", report)  # NaN (a p-value of a difference with no variance): null
        atomic_write_text(out / "audit.md", text)
    print(text, end="")
    return 0
