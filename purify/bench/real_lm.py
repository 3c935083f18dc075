"""Shared runner of the real-model suites (``owl-smollm2``, ``tic-smollm2``), reduced to fit a CPU.

A :class:`RealSuite` names a traited teacher (a model and an optional system prompt), training prompts, a filter
for its completions and the trait: the exact probability that the answer's first word is :attr:`RealSuite.target`
over held-out questions in the chat template. The control teacher is the base without system prompt. The student
(the base, no system prompt) is fine-tuned on ``chat(prompt) → completion``, loss on completion tokens, with hard
labels (``ce``) or soft labels (``forward_kl`` on the teacher's logits, computed beforehand per completion token and
kept as top-K log-probabilities plus the residual mass spread uniformly).

A suite may sweep an arm's main knob (:attr:`RealSuite.sweeps`, conditions ``<arm>@<value>``): the probe-free rule
(:mod:`purify.bench.probe_free`) then picks one value per seed from the task error and the off-task drift
``KL(base ‖ student)`` on neutral prose (:data:`purify.bench.lm_common.DRIFT_SEED`, raw text without the chat
template, never trained on), and the arm is judged at that choice (``summary.json["probe_free"]``).

Only the last ``layers`` transformer blocks (+ final norm) train; the frozen blocks below are run once per sequence
and their output (the input of block ``L - layers``) is cached, so training and scoring run the top blocks only; an
on-policy arm (:data:`ON_POLICY_REFERENCES`) trains the same blocks inside the whole model, which samples its own
answers, scored live by its teachers (:func:`fit_on_policy`). A LoRA arm (``Condition.rank``) trains an adapter on
those blocks instead of the blocks (:func:`student_top`).
Every student goes through :meth:`purify.module.Distiller.fit_step` with the library's purifier classes; the seeds,
their aggregation and the report are the benchmark spine's (:func:`purify.bench.lm_common.run_seeds`,
:func:`~purify.bench.lm_common.run_conditions`, :func:`~purify.bench.lm_common.summarise`,
:func:`~purify.bench.lm_common.publish`).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn
from transformers import LlamaForCausalLM

from purify.bench import lm_common, stats
from purify.bench.lm_common import DRIFT_SEED, Condition, Scores, Suite, build_purifiers, drift_terms
from purify.bench.probe_free import PROBE_FREE, Sweep, selected, swept_arm
from purify.bench.report import BenchError, bench_command, check_conditions, check_options, environment
from purify.config import LossConfig, OnPolicyConfig, OptimConfig
from purify.generate import load_model, sample_completions
from purify.lm import paragraphs
from purify.lm.cache import digest
from purify.module import Distiller
from purify.storage import atomic_path, cache_root
from purify.types import IGNORE_INDEX, Batch, ModelOutput

Records = list[dict[str, str]]
REFERENCES = [Condition("base", baseline=True, kind="base"),
              Condition("control", ["clean"], loss="ce", baseline=True, kind="control"),
              Condition("vanilla", ["teacher"], loss="ce", baseline=True, kind="vanilla"),
              Condition("control:soft", ["clean"], loss="forward_kl", baseline=True, kind="control"),
              Condition("vanilla:soft", ["teacher"], loss="forward_kl", baseline=True, kind="vanilla")]
"""The reference arms of a real-model suite: the base, the control (SFT on the base's text; ``control:soft``: KD on
the base's own top-K log-probs of it, run whenever a soft-label arm runs, so that arm is judged against references
of its own loss mode) and vanilla with hard (SFT on the teacher's text) and soft labels (KD on its logits); a suite's
purifier arms follow them."""
ON_POLICY = {"lam": 1.0, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 32}
"""The real suites' on-policy setting, fixed before any run (the LM suites' λ = 1, temperature 1, top-p 1; new tokens
= the teachers' completion limit): every step on the student's own samples of the training prompts."""
ON_POLICY_REFERENCES = [
    Condition("control:on-policy", ["clean"], loss="forward_kl", baseline=True, kind="control", on_policy=ON_POLICY),
    Condition("vanilla:on-policy", ["teacher"], loss="forward_kl", baseline=True, kind="vanilla", on_policy=ON_POLICY)]
"""On-policy distillation (GKD, :func:`fit_on_policy`) from the base (control) and the traited teacher (vanilla),
forward KL on the whole vocabulary of the live teacher: run when named; the on-policy vanilla is also judged against
the off-policy soft references (``summary.json["on_policy_vs_off_policy"]``)."""


@dataclass
class RealSuite:
    """One real-model suite (see the module docstring).

    Attributes:
        name: suite name (``results/<name>``).
        protocol: one-line description for the report title.
        target: the trait word; its spellings ``w``, ``W``, ``" w"``, ``" W"`` are read exactly.
        questions: held-out trait questions (user turns).
        prompts: training prompts (user turns) the teachers continue.
        filter: ``records -> (kept, removed)`` applied to both teachers' completions.
        conditions: the arms; teacher keys are ``"teacher"`` (traited) and ``"clean"`` (the base).
        teacher_system: the traited teacher's system prompt (``None``: the teacher model alone carries the trait).
        others: words whose first-token probability is reported as ``p_<word>`` (e.g. other animals).
        temperature: sampling temperature of both teachers.
        cache_key: what identifies the teacher model (part of the data cache key).
        tuned_on: where a default was chosen, as data (``summary.json["tuned_on"]``, see
            :func:`purify.bench.verdicts.seed_caveats`).
        sweeps: arm → :class:`~purify.bench.probe_free.Sweep` of the swept arms among :attr:`conditions` (points
            ``<arm>@<value>``), selected by arm name or ``probe-free``.
    """

    name: str
    protocol: str
    target: str
    questions: list[str]
    prompts: list[str]
    filter: Callable[[Records], tuple[Records, int]]
    conditions: list[Condition]
    teacher_system: str | None = None
    others: tuple[str, ...] = ()
    temperature: float = 1.0
    cache_key: str = "base"
    notes: list[str] = field(default_factory=list)
    tuned_on: list[dict[str, Any]] = field(default_factory=list)
    sweeps: dict[str, Sweep] = field(default_factory=dict)


def load_smollm2() -> tuple[str, Any, Any]:
    """SmolLM2-135M-Instruct (prepared once from its pip package, see :mod:`purify.models_prepare`): ``(directory,
    model in eval mode with gradients off, tokenizer)``."""
    from purify.models_prepare import prepare

    path = prepare("smollm2-135m", progress=False)
    base, tokenizer = load_model(path)
    return str(path), base.eval().requires_grad_(False), tokenizer


def chat(tokenizer: Any, user: str, system: str | None = None) -> str:
    """The chat-template text of one user turn (and optional system prompt), ready for the assistant's answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: Any, records: Records, system: str | None = None) -> list[list[int]]:
    """The chat-template token ids of each record's prompt (with ``system``), as the students and teachers read it."""
    return [_ids(tokenizer, chat(tokenizer, r["prompt"], system)) for r in records]


def _pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)] = torch.tensor(r), 1
    return ids, attn


def _spellings(word: str) -> tuple[str, ...]:
    return (word, word.capitalize(), " " + word, " " + word.capitalize())


def trait_inputs(tokenizer: Any, system: str | None, questions: list[str],
                 target: str) -> tuple[Tensor, Tensor, list[tuple[int, int, list[Any]]]]:
    """Right-padded rows for the trait: per question the prompt, plus prompt + all but the last token of each
    multi-token spelling of ``target``. Returns ``(ids, attn, reads)`` with ``reads[q] = (row, position,
    [(row, pos, tokens)])`` (``position`` predicts the first answer token)."""
    multi = sorted({s for v in _spellings(target) if len(s := tuple(_ids(tokenizer, v))) > 1})
    rows: list[list[int]] = []
    reads: list[Any] = []
    for q in questions:
        prompt = _ids(tokenizer, chat(tokenizer, q, system))
        row = len(rows)
        rows.append(prompt)
        chains = []
        for s in multi:
            chains.append((len(rows), len(prompt) - 1, list(s)))
            rows.append(prompt + list(s[:-1]))
        reads.append((row, len(prompt) - 1, chains))
    ids, attn = _pad(rows, tokenizer.pad_token_id or 0)
    return ids, attn, reads


def trait_scores(logits: Tensor, reads: list[Any], tokenizer: Any, target: str,
                 others: tuple[str, ...] = ()) -> Scores:
    """``trait`` = mean exact P(first word = ``target``), ``log_trait`` = mean of its log, ``p_<word>`` = mean
    first-token P of each of ``others`` over its single-token spellings."""
    logp = torch.log_softmax(logits.float(), -1)
    singles = {w: sorted({t[0] for v in _spellings(w) if len(t := _ids(tokenizer, v)) == 1}) for w in (target, *others)}
    out: dict[str, float] = {f"p_{w}": 0.0 for w in others}
    per_question = []
    for row, pos, chains in reads:
        probs = logp[row, pos].exp()
        for w in others:
            out[f"p_{w}"] += float(probs[singles[w]].sum()) / len(reads)
        p = float(probs[singles[target]].sum())
        for crow, cpos, toks in chains:
            p += float(sum(logp[crow, cpos + i, t] for i, t in enumerate(toks)).exp())
        per_question.append(p)
    return {"trait": sum(per_question) / len(reads),
            "log_trait": sum(math.log(max(p, 1e-30)) for p in per_question) / len(reads), **out}


@torch.no_grad()
def score_model(model: Any, tokenizer: Any, system: str | None, questions: list[str], target: str,
                others: tuple[str, ...] = ()) -> Scores:
    """Trait scores of a full causal LM (base, teacher with ``system``)."""
    ids, attn, reads = trait_inputs(tokenizer, system, questions, target)
    return trait_scores(model(input_ids=ids, attention_mask=attn).logits, reads, tokenizer, target, others)


class Top(nn.Module):
    """The last ``k`` blocks, final norm and (frozen, tied) head of a Llama, run on cached block inputs."""

    def __init__(self, base: Any, k: int) -> None:
        super().__init__()
        cfg = base.config.__class__.from_dict({**base.config.to_dict(), "num_hidden_layers": k})
        self.lm = LlamaForCausalLM(cfg)
        n = base.config.num_hidden_layers
        state = {key: v for key, v in base.state_dict().items() if ".layers." not in key}
        state.update({key.replace(f".layers.{i}.", f".layers.{i - n + k}."): v for key, v in base.state_dict().items()
                      for i in range(n - k, n) if f".layers.{i}." in key})
        self.lm.load_state_dict(state, strict=False)
        self.lm.requires_grad_(False)
        self.lm.model.layers.requires_grad_(True)
        self.lm.model.norm.requires_grad_(True)
        self.lm.eval()

    def logits(self, hidden: Tensor, attn: Tensor, pos: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, V)``, or ``(B, C, V)`` at positions ``pos`` ``(B, C)`` only."""
        h = self.lm.model(inputs_embeds=hidden, attention_mask=attn).last_hidden_state
        if pos is not None:
            h = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))
        return self.lm.lm_head(h)

    def forward(self, batch: dict[str, Tensor], hidden: bool = False) -> ModelOutput:
        """Distiller interface: logits at the completion-predicting positions ``batch["pos"]``."""
        return ModelOutput(logits=self.logits(batch["hidden"], batch["attention_mask"], batch["pos"]))

    def install(self, full: Any) -> Any:
        """Copy the trained top blocks and norm into ``full`` (the base model) and return it."""
        k, n = len(self.lm.model.layers), full.config.num_hidden_layers
        for i in range(k):
            full.model.layers[n - k + i].load_state_dict(self.lm.model.layers[i].state_dict())
        full.model.norm.load_state_dict(self.lm.model.norm.state_dict())
        return full


class CachedTeacher(nn.Module):
    """A teacher whose logits were computed beforehand: ``batch["teacher_logits"]``."""

    def forward(self, batch: dict[str, Tensor], hidden: bool = False) -> ModelOutput:
        return ModelOutput(logits=batch["teacher_logits"])


@torch.no_grad()
def block_inputs(base: Any, rows: list[list[int]] | Tensor, attn: Tensor | None, k: int, bs: int = 16) -> list[Tensor]:
    """Per row, the (unpadded) input of block ``L - k`` of ``base``."""
    if attn is None:
        rows, attn = _pad(rows, 0)  # type: ignore[arg-type]
    out = []
    for s in range(0, len(rows), bs):
        hs = base.model(input_ids=rows[s:s + bs], attention_mask=attn[s:s + bs], output_hidden_states=True)
        h = hs.hidden_states[base.config.num_hidden_layers - k]
        out += [h[i, :int(attn[s + i].sum())].clone() for i in range(len(h))]
    return out


@torch.no_grad()
def teacher_targets(teacher: Any, rows: list[list[int]], n_prompt: list[int], top_k: int, bs: int = 16) -> list[Any]:
    """Per row, the teacher's top-K log-probs (and ids) at the positions predicting completion tokens."""
    ids, attn = _pad(rows, 0)
    out = []
    for s in range(0, len(rows), bs):
        logp = torch.log_softmax(teacher(input_ids=ids[s:s + bs], attention_mask=attn[s:s + bs]).logits.float(), -1)
        for i in range(len(logp)):
            r = s + i
            v, t = logp[i, n_prompt[r] - 1:len(rows[r]) - 1].topk(top_k, -1)
            out.append((v, t))
    return out


def _full(topk: tuple[Tensor, Tensor], vocab: int) -> Tensor:
    v, t = topk
    rest = (1 - v.exp().sum(-1, keepdim=True)).clamp_min(1e-8).log() - torch.log(torch.tensor(vocab - v.shape[-1]))
    return rest.expand(-1, vocab).clone().scatter_(-1, t, v)


def collate(data: dict[str, Any], idx: list[int], vocab: int) -> dict[str, Tensor]:
    """A Distiller batch of examples ``idx``: cached block inputs, completion positions, labels, teacher logits."""
    hidden = torch.nn.utils.rnn.pad_sequence([data["hidden"][i] for i in idx], batch_first=True)
    attn = torch.zeros(hidden.shape[:2], dtype=torch.long)
    c = max(len(data["labels"][i]) for i in idx)
    pos, labels, mask = (torch.zeros(len(idx), c, dtype=torch.long) for _ in range(3))
    teacher = torch.zeros(len(idx), c, vocab)
    for j, i in enumerate(idx):
        n, lab = len(data["hidden"][i]), data["labels"][i]
        attn[j, :n] = 1
        pos[j, :len(lab)] = torch.arange(n - len(lab) - 1, n - 1)
        labels[j, :len(lab)], mask[j, :len(lab)] = torch.tensor(lab), 1
        if data.get("teacher"):
            teacher[j, :len(lab)] = _full(data["teacher"][i], vocab)
    return {"hidden": hidden, "attention_mask": attn, "pos": pos, "labels": labels.masked_fill(mask == 0, -100),
            "target_mask": mask.float(), "teacher_logits": teacher, "index": torch.tensor(idx)}


def sft_data(base: Any, tokenizer: Any, records: Records, layers: int) -> dict[str, Any]:
    """Training examples of the student (no system prompt): completion token ids and cached block inputs."""
    prompts = prompt_ids(tokenizer, records)
    labels = [_ids(tokenizer, r["completion"]) for r in records]
    return {"records": records, "labels": labels,
            "hidden": block_inputs(base, [p + c for p, c in zip(prompts, labels)], None, layers)}


def curve_marks(steps: int, points: int) -> set[int]:
    """The steps at which a scored vanilla is read: :func:`purify.bench.lm_common.curve_steps` plus every power of two
    from step 1 (a dense early curve: real-model traits are often learnt within the first few steps, and a purifier's
    frontier verdict must not be read across that jump); none when ``points`` is 0."""
    if not points:
        return set()
    return set(lm_common.curve_steps(steps, points)) | {2 ** k for k in range(steps.bit_length()) if 2 ** k <= steps}


def cached_top(path: Path, base: Any, layers: int, train: Callable[[], Top]) -> Top:
    """The base's top ``layers`` blocks as ``train()`` fine-tunes them, trained once and cached at ``path`` (the
    trained parameters only).

    Raises:
        BenchError: ``path`` exists but does not hold exactly these trained blocks.
    """
    top = Top(base, layers)
    if path.exists():
        missing, unexpected = top.load_state_dict(torch.load(path, weights_only=True), strict=False)
        if unexpected or any(top.get_parameter(k).requires_grad for k in missing):
            raise BenchError(f"{path} does not hold this teacher's trained blocks; delete it to rebuild")
        return top
    top = train()
    with atomic_path(path) as tmp:
        torch.save({k: p.detach() for k, p in top.named_parameters() if p.requires_grad}, tmp)
    return top


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The linear layers of a Llama block a LoRA student adapts."""


def student_top(base: Any, layers: int, rank: int, seed: int) -> Top:
    """A student: the base's top ``layers`` blocks, all trainable (``rank`` 0) or frozen under a LoRA adapter of
    rank ``rank`` (alpha = 2·rank, on every linear layer of the blocks; B = 0, so it starts at the base)."""
    torch.manual_seed(seed)
    top = Top(base, layers)
    if rank:
        top.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                           target_modules=LORA_TARGETS), top.lm)
        for name, p in top.named_parameters():
            p.requires_grad_("lora_" in name)
    return top


def train_steps(dist: Distiller, batch: Callable[[list[int]], Batch], pool: list[int], bs: int, steps: int,
                seed: int, on_point: Callable[[int, Top], None] | None, points: int,
                current: Callable[[], Top]) -> None:
    """``steps`` ``Distiller.fit_step`` steps on ``batch(indices)`` of examples ``pool`` (batches of ``bs`` in a
    seeded shuffled order, the pool repeated as needed); ``on_point(step, current())`` at the curve points
    (:func:`curve_marks`) before the last step."""
    opt, rng = dist.build_optimizer(), random.Random(seed)
    marks = curve_marks(steps, points)
    order: list[int] = []
    while len(order) < steps * bs:
        order += rng.sample(pool, len(pool))
    for step in range(steps):
        dist.fit_step(batch(order[step * bs:(step + 1) * bs]), opt, step / steps, step=step)
        if on_point and step + 1 in marks and step + 1 < steps:
            on_point(step + 1, current())


def fit_top(base: Any, data: dict[str, Any], pool: list[int], cfg: dict[str, Any], steps: int, seed: int,
            loss: str = "ce", purifiers: list[dict[str, Any]] = (), teacher_names: list[str] | None = None,
            on_point: Callable[[int, Top], None] | None = None, points: int = 0, rank: int = 0) -> Top:
    """Train a :func:`student_top` (``rank`` 0: the top ``cfg["layers"]`` blocks, lr ``cfg["lr"]``; else a LoRA
    adapter, lr ``cfg["lora_lr"]``) on examples ``pool`` of ``data`` (:func:`train_steps`); ``on_point(step, top)``
    at the curve points before the last step."""
    top = student_top(base, cfg["layers"], rank, seed)
    dist = Distiller(top, [CachedTeacher()], loss=LossConfig(name=loss),
                     optim=OptimConfig(lr=cfg["lora_lr"] if rank else cfg["lr"]),
                     purifiers=build_purifiers(purifiers), total_steps=steps,
                     teacher_names=teacher_names or ["teacher"])
    train_steps(dist, lambda idx: collate(data, idx, base.config.vocab_size), pool, cfg["batch_size"], steps, seed,
                on_point, points, lambda: top)
    return top.eval()


def full_batch(prompts: list[list[int]], labels: list[list[int]], idx: list[int], pad_id: int) -> Batch:
    """A whole-model batch of examples ``idx``: each chat prompt then its completion, right-padded; the loss covers
    the completion tokens (the collated layout of :class:`purify.data.TokenDataset`)."""
    ids, attn = _pad([prompts[i] + labels[i] for i in idx], pad_id)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(idx):
        mask[row, len(prompts[i]):len(prompts[i]) + len(labels[i])] = 1
    target_mask = mask[:, 1:].float()
    return {"input_ids": ids, "attention_mask": attn, "target_mask": target_mask,
            "labels": ids[:, 1:].masked_fill(target_mask == 0, IGNORE_INDEX)}


def fit_on_policy(base: Any, teachers: list[Any], tokenizer: Any, prompts: list[list[int]], labels: list[list[int]],
                  pool: list[int], cfg: dict[str, Any], steps: int, seed: int, cond: Condition,
                  on_point: Callable[[int, Top], None] | None = None, points: int = 0) -> Top:
    """Train an on-policy student (``cond.on_policy``, :mod:`purify.on_policy`): the whole base with only its top
    ``cfg["layers"]`` blocks and final norm trainable (as :func:`fit_top`'s), sampling its own completions of the
    pool's chat prompts, scored live by ``teachers`` (whole models, full vocabulary) through
    ``Distiller.fit_step``; the same seeded example order, steps and lr as :func:`fit_top`. Returns the trained
    blocks as a :class:`Top` (scored like every other student); ``on_point(step, top)`` at the curve points."""
    torch.manual_seed(seed)
    student = copy.deepcopy(base).requires_grad_(False)
    n, k = base.config.num_hidden_layers, cfg["layers"]
    student.model.layers[n - k:].requires_grad_(True)
    student.model.norm.requires_grad_(True)
    dist = Distiller(student, teachers, loss=LossConfig(name=cond.loss), optim=OptimConfig(lr=cfg["lr"]),
                     purifiers=build_purifiers(cond.purifiers), total_steps=steps, teacher_names=cond.teachers,
                     student_tokenizer=tokenizer, on_policy=OnPolicyConfig(**cond.on_policy), seed=seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_steps(dist, lambda idx: full_batch(prompts, labels, idx, pad), pool, cfg["batch_size"], steps, seed,
                on_point, points, lambda: Top(student, k).eval())
    return Top(student, k).eval()


def finetune(base: Any, tokenizer: Any, records: Records, cfg: dict[str, Any], epochs: int, lr: float) -> Top:
    """The base's top ``cfg["layers"]`` blocks fine-tuned with hard labels on ``records`` (``epochs`` epochs of batch
    ``cfg["batch_size"]`` at ``lr``, seed 0, at least one step): how a suite trains its traited teacher."""
    data = sft_data(base, tokenizer, records, cfg["layers"])
    steps = max(1, epochs * len(records) // cfg["batch_size"])
    return fit_top(base, data, list(range(len(records))), {**cfg, "lr": lr}, steps, seed=0)


def sample_kept(suite: str, role: str, model: Any, tokenizer: Any, prompts: list[str], *, system: str | None,
                keep: Callable[[Records], tuple[Records, int]], cfg: dict[str, Any], temperature: float, seed: int,
                need: int, progress: bool) -> tuple[Records, dict[str, int]]:
    """``model``'s completions of ``prompts`` (chat template with ``system``, up to ``cfg["max_new"]`` tokens) that
    ``keep`` keeps and that have at least one token, with their counts ``{role}_sampled`` and ``{role}_kept``.

    Raises:
        BenchError: fewer than ``need`` completions are kept.
    """
    texts = sample_completions(model, tokenizer, [chat(tokenizer, p, system) for p in prompts],
                               max_new_tokens=cfg["max_new"], temperature=temperature, seed=seed, batch_size=32,
                               progress=progress)
    kept, _ = keep([{"prompt": p, "completion": c} for p, c in zip(prompts, texts)])
    kept = [r for r in kept if _ids(tokenizer, r["completion"])]
    if len(kept) < need:
        raise BenchError(f"{suite}: only {len(kept)} of the {role} teacher's {len(texts)} completions passed the "
                         f"filter; raise n (now {cfg['n']}) or lower heldout (now {cfg['heldout']})")
    return kept, {f"{role}_sampled": len(texts), f"{role}_kept": len(kept)}


def _soft_targets(model: Any, tokenizer: Any, d: dict[str, Any], system: str | None, top_k: int) -> list[Any]:
    """``model``'s top-K targets on the completions of ``d`` (:func:`sft_data`), prompted with ``system``."""
    prompts = prompt_ids(tokenizer, d["records"], system)
    return teacher_targets(model, [p + c for p, c in zip(prompts, d["labels"])], [len(p) for p in prompts], top_k)


def prepare_data(spec: RealSuite, base: Any, teacher: Any, tokenizer: Any, cfg: dict[str, Any],
                 soft_control: bool = False) -> dict[str, Any]:
    """Sample and filter both teachers' completions, the traited teacher's top-K targets and the trait inputs
    (cached on disk, keyed by the suite, the teacher and the settings that shape the data); with ``soft_control``
    also the base's own top-K targets on its completions (the soft control's, added to the cache when missing)."""
    shape = {k: cfg[k] for k in ("n", "max_new", "layers", "top_k")}
    key = digest([spec.name, spec.cache_key, spec.temperature, shape])[:16]
    path = cache_root() / "real-suites" / f"{spec.name}-{key}.pt"
    if path.exists():
        out = torch.load(path, weights_only=True)
        if soft_control and "teacher" not in out["clean"]:
            out["clean"]["teacher"] = _soft_targets(base, tokenizer, out["clean"], None, cfg["top_k"])
            with atomic_path(path) as tmp:
                torch.save(out, tmp)
        return out
    prompts = spec.prompts[:cfg["n"]]
    out: dict[str, Any] = {"log": {}}
    for name, model, system in (("teacher", teacher, spec.teacher_system), ("clean", base, None)):
        kept, counts = sample_kept(spec.name, name, model, tokenizer, prompts, system=system, keep=spec.filter,
                                   cfg=cfg, temperature=spec.temperature, seed=7, progress=True,
                                   need=cfg["heldout"] + 1 if name == "teacher" else 1)
        out["log"].update(counts)
        d = sft_data(base, tokenizer, kept, cfg["layers"])
        if name == "teacher" or soft_control:
            d["teacher"] = _soft_targets(model, tokenizer, d, system, cfg["top_k"])
        out[name] = d
    ids, attn, reads = trait_inputs(tokenizer, None, spec.questions, spec.target)
    out["trait"] = {"hidden": block_inputs(base, ids, attn, cfg["layers"]), "reads": reads}
    with atomic_path(path) as tmp:
        torch.save(out, tmp)
    return out


def _stack(hidden: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-padded block inputs and their attention mask."""
    h = torch.nn.utils.rnn.pad_sequence(hidden, batch_first=True)
    attn = torch.zeros(h.shape[:2], dtype=torch.long)
    for i, x in enumerate(hidden):
        attn[i, :len(x)] = 1
    return h, attn


def neutral_inputs(base: Any, tokenizer: Any, layers: int, n: int, bs: int = 8) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``n`` neutral prose paragraphs (:data:`~purify.bench.lm_common.DRIFT_SEED`, raw text) as batches of ``bs``:
    ``(block inputs, attention mask, the base's logits)``, for :func:`drift`."""
    rows = [_ids(tokenizer, t) for t in paragraphs(n, DRIFT_SEED)]
    hidden = block_inputs(base, rows, None, layers)
    top = Top(base, layers)
    with torch.no_grad():
        return [(h, attn, top.logits(h, attn)) for h, attn in (_stack(hidden[s:s + bs]) for s in range(0, n, bs))]


@torch.no_grad()
def drift(top: Top, neutral: list[tuple[Tensor, Tensor, Tensor]]) -> float:
    """Off-task drift of a student from its base: mean ``KL(base ‖ student)`` per next-token position of the neutral
    paragraphs (:func:`neutral_inputs`, :func:`purify.bench.lm_common.drift_terms`)."""
    return float(torch.cat([drift_terms(b, top.logits(h, attn), attn) for h, attn, b in neutral]).mean())


TEACHER_FIDELITY = {"task_error": 0.0, "fidelity_kl": 0.0, "agreement": 1.0}
"""The traited teacher's fidelity scores against itself (its row of a seed's record)."""


@torch.no_grad()
def score_top(top: Top, tokenizer: Any, data: dict[str, Any], heldout: list[int], vocab: int, target: str,
              others: tuple[str, ...] = ()) -> Scores:
    """Trait ``target`` (and ``p_<word>`` of ``others``) on the cached trait inputs ``data["trait"]``, and fidelity:
    KL(teacher || student), top-1 agreement on the held-out examples ``heldout`` of ``data["teacher"]``."""
    scores = trait_scores(top.logits(*_stack(data["trait"]["hidden"])), data["trait"]["reads"], tokenizer, target,
                          others)
    b = collate(data["teacher"], heldout, vocab)
    s = torch.log_softmax(top(b).logits.float(), -1)
    t = b["teacher_logits"]
    m = b["target_mask"].bool()
    kl = (t.exp() * (t - s)).sum(-1)[m].mean()
    agree = (s.argmax(-1) == t.argmax(-1)).float()[m].mean()
    return {**scores, "task_error": float(kl), "fidelity_kl": float(kl), "agreement": float(agree)}


def run(spec: RealSuite, base: Any, teacher: Any, tokenizer: Any, path: str, cfg: dict[str, Any], seeds: list[int],
        out: str | None, quick: bool, options: dict[str, Any], progress: bool, start: float) -> dict[str, Any]:
    """Run ``seeds`` of ``spec`` and write its report into ``out`` (default ``bench-out/<name>``, untracked):
    summary.json|md|csv, frontier.png, env.json, readouts.json.

    ``base`` is the student's base (eval, frozen); ``teacher`` the traited teacher model (``base`` itself when the
    trait comes from :attr:`RealSuite.teacher_system`); ``cfg`` holds ``n``, ``max_new``, ``layers``, ``top_k``,
    ``epochs``, ``batch_size``, ``lr``, ``heldout``, ``conditions`` (names to run besides base/control/vanilla; a
    swept arm of :attr:`RealSuite.sweeps` by its name without ``@value``, all of them by ``probe-free``) and
    optionally ``workers`` (seeds run at a time in forked processes, :func:`purify.bench.lm_common.run_seeds`).
    """
    workers = cfg.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise BenchError(f"{spec.name}: workers must be a positive integer (seeds run at a time in forked processes), "
                         f"got {workers!r}")
    sweeps = selected(cfg["conditions"], spec.sweeps)
    names = {"base", "control", "vanilla", *cfg["conditions"]}
    conds = [c for c in spec.conditions if c.name in names or swept_arm(c.name) in sweeps]
    # each loss mode that runs brings its own control and vanilla (a soft-label vanilla its soft control, so
    # vanilla:soft − control:soft is the soft labels' own transfer and a soft arm is judged in its mode); an on-policy
    # arm brings its own mode's references, and every on-policy condition its loss's off-policy ones (on-policy vs
    # off-policy at equal task error); the on-policy control runs with an on-policy arm or when named
    modes = {c.loss for c in conds if c.teachers} | {lm_common.mode(c) for c in conds if c.teachers and not c.baseline}
    chosen = {c.name for c in conds}
    conds = [c for c in spec.conditions
             if c.name in chosen or (c.baseline and c.teachers and lm_common.mode(c) in modes)]
    if spec.teacher_system and any(c.on_policy for c in conds):
        raise BenchError(f"{spec.name}: on-policy arms need a teacher whose trait is in its weights (this suite's "
                         "teacher is the base under a system prompt, which on-policy scoring would leave out)")
    unknown = names - {c.name for c in conds} - {*([PROBE_FREE] if spec.sweeps else []), *sweeps}
    if unknown:
        known = [*([PROBE_FREE, *spec.sweeps] if spec.sweeps else []),
                 *(c.name for c in spec.conditions if "@" not in c.name)]
        raise BenchError(f"{spec.name}: unknown conditions {sorted(unknown)}; known: {', '.join(known)}")
    check_conditions((c.name, c.purifiers, c.teachers, {"loss": c.loss}) for c in conds)
    if any(c.rank for c in conds) and "lora_lr" not in cfg:
        raise BenchError(f"{spec.name}: LoRA arms need the suite's lora_lr setting")
    data = prepare_data(spec, base, teacher, tokenizer, cfg, soft_control="forward_kl" in modes)
    log, vocab = data["log"], base.config.vocab_size
    b_scores = score_model(base, tokenizer, None, spec.questions, spec.target, spec.others)
    t_scores = score_model(teacher, tokenizer, spec.teacher_system, spec.questions, spec.target, spec.others)
    n_t = len(data["teacher"]["labels"])
    heldout = list(range(n_t - cfg["heldout"], n_t))

    neutral = neutral_inputs(base, tokenizer, cfg["layers"], 4 if quick else 32)

    def score(top: Top) -> Scores:
        return {**score_top(top, tokenizer, data, heldout, vocab, spec.target, spec.others),
                "drift": drift(top, neutral)}

    first = score(Top(base, cfg["layers"]))
    s0 = {**b_scores, **{k: first[k] for k in ("task_error", "fidelity_kl", "agreement", "drift")}}
    log["top_vs_full_trait"] = first["trait"] - b_scores["trait"]
    t_full = {**t_scores, **TEACHER_FIDELITY}
    if not any(c.baseline and c.kind == "vanilla" for c in conds) or not any(c.kind == "control" for c in conds):
        raise BenchError(f"{spec.name}: a run needs a base, a control and a vanilla condition")
    steps = cfg["epochs"] * (n_t - cfg["heldout"]) // cfg["batch_size"]
    suite = Suite(name=spec.name, protocol=spec.protocol, student=Path(path), conditions=conds, steps=steps,
                  batch_size=cfg["batch_size"], lr=cfg["lr"], curve_points=5,
                  trait=f"P(first word of the answer = {spec.target!r})", tuned_on=spec.tuned_on, sweeps=sweeps)
    pools = {k: [i for i in range(len(data[k]["labels"])) if k != "teacher" or i not in heldout]
             for k in ("teacher", "clean")}

    models = {"teacher": teacher, "clean": base}
    prompts = {k: prompt_ids(tokenizer, data[k]["records"]) for k in pools
               if any(c.on_policy and c.teachers[0] == k for c in conds)}

    def one_seed(seed: int) -> dict[str, Any]:
        def fit(cond: Condition, on_point: Callable[[int, Any], None] | None) -> tuple[Top, dict[str, float]]:
            key = cond.teachers[0]
            if cond.on_policy:
                return fit_on_policy(base, [models[t] for t in cond.teachers], tokenizer, prompts[key],
                                     data[key]["labels"], pools[key], cfg, steps, seed, cond, on_point,
                                     5 if on_point else 0), {"steps": steps}
            return fit_top(base, data[key], pools[key], cfg, steps, seed, cond.loss, cond.purifiers, cond.teachers,
                           on_point, 5 if on_point else 0, cond.rank), {"steps": steps}

        return {"base": s0, "teacher": t_full,
                "data": {"teacher": n_t - len(heldout), "clean": len(data["clean"]["labels"])},
                "conditions": lm_common.run_conditions(conds, s0, t_full, fit, score, desc=f"seed {seed}",
                                                       progress=progress and workers == 1)}

    runs = lm_common.run_seeds(seeds, one_seed, workers, progress)
    wall = time.perf_counter() - start
    summary = lm_common.summarise(suite, runs, wall)
    summary["settings"].update({k: v for k, v in cfg.items() if k != "conditions"}, filter_log=log,
                               temperature=spec.temperature, teacher_data="sampled once (seed 7), shared by all seeds")
    summary["readouts"] = {"base": b_scores, "teacher": t_scores, **{
        c.name: {k: stats.mean_ci([runs[s]["conditions"][c.name][k] for s in runs])["mean"] for k in b_scores}
        for c in conds if c.teachers}}
    tests = minus_control(summary, "vanilla", "control")
    summary["vanilla_minus_control"] = tests
    pairs = [("Vanilla − control", tests)]
    if {"vanilla:soft", "control:soft"} <= set(summary["conditions"]):  # the soft labels' own transfer
        summary["vanilla_minus_control_soft"] = minus_control(summary, "vanilla:soft", "control:soft")
        pairs.append(("Vanilla:soft − control:soft", summary["vanilla_minus_control_soft"]))
    label = f"P({spec.target})"
    summary["columns"] = columns(label)
    summary["notes"] = [
        *spec.notes,
        f"{label}: base {b_scores['trait']:.5f}, traited teacher {t_scores['trait']:.5f}; teacher logits for soft "
        f"labels/KL: top-K log-probs plus residual mass (K = {cfg['top_k']}).",
        f"Completions kept by the filter: traited teacher {log['teacher_kept']}/{log['teacher_sampled']}, "
        f"control {log['clean_kept']}/{log['clean_sampled']} (temperature {spec.temperature}).",
        *(f"{pair} {name}, paired by seed: {t['mean']:+.3g} [{t['ci95'][0]:+.3g}, {t['ci95'][1]:+.3g}], "
          f"p = {t['p_value']:.3g}."
          for pair, test in pairs for name, t in ((label, test["trait"]), (f"mean log {label}", test["log_trait"]))),
        f"Student = last {cfg['layers']} blocks + final norm trainable; {steps} steps of batch {cfg['batch_size']}, "
        f"lr {cfg['lr']}"
        + (f" (LoRA arms: the blocks frozen under an adapter of rank r, alpha 2r, on every linear layer, lr "
           f"{cfg['lora_lr']})" if any(c.rank for c in conds) else "")
        + (f" (on-policy arms: the whole model, the same blocks trainable, each step on its own samples of the "
           f"training prompts, λ {ON_POLICY['lam']}, temperature {ON_POLICY['temperature']}, top-p "
           f"{ON_POLICY['top_p']}, up to {ON_POLICY['max_new_tokens']} new tokens, scored live by the teacher on the "
           f"whole vocabulary, forward KL)" if any(c.on_policy for c in conds) else "")
        + f"; measured wall time {wall:.0f} s ("
        + (f"{workers} seeds at a time in forked worker processes, 1 torch thread each)." if workers > 1 else
           f"{torch.get_num_threads()} torch thread)."),
        "Teacher data are sampled once (one pool per teacher, sampling seed 7, cached) and shared by every seed: "
        "seeds vary only the training order (every student starts from the same base weights), so the CIs leave out "
        "the variance of the teachers' sampling (resampling per seed would multiply the costliest step, sampling both "
        "teachers, by the number of seeds, and change the pool size, hence the step count, per seed)."]
    command = bench_command(spec.name, len(seeds), quick, options, seeds[0], out)
    return lm_common.publish(out or f"bench-out/{spec.name}", summary,
                             environment(summary["seeds"], wall, command))


def minus_control(summary: dict[str, Any], arm: str, control: str) -> dict[str, Any]:
    """``arm`` minus ``control`` on the trait and on its log (``trait``, ``log_trait``), paired by seed
    (:func:`purify.bench.stats.paired_test` over the summary's per-seed records)."""
    per_seed = summary["conditions"]
    return {k: stats.paired_test([r[k] for r in per_seed[arm]["per_seed"]],
                                 [r[k] for r in per_seed[control]["per_seed"]]) for k in ("trait", "log_trait")}


def columns(label: str) -> list[tuple[str, str]]:
    return [("transfer", "transfer"), ("distance_to_control", "transfer − control"),
            ("task_error", "KL(T||S) held out"), ("agreement", "top-1 agreement"), ("trait", label)]


def settings(defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """A suite's settings: ``defaults`` updated by ``options``; an unknown key, or a value not of its default's kind
    (:func:`purify.bench.report.check_options`), is an error naming it."""
    check_options(options, {k: object if v is None else type(v) for k, v in defaults.items()})
    return {**defaults, **options}

