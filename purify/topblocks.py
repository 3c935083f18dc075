"""A CPU-sized student of a real model: train only its top blocks, on cached inputs of those blocks.

:class:`Top` is the last ``k`` transformer blocks, final norm and (frozen, tied) head of a Llama; the frozen blocks
below run once per sequence (:func:`block_inputs`) and their output is cached, so training and scoring run the top
blocks only. :func:`sft_data` / :func:`collate` make Distiller batches of a chat prompt's completion (labels, the
completion-predicting positions, a teacher's top-K log-probabilities from :func:`teacher_targets` (a whole model) or
:func:`top_targets` (a :class:`Top`), spread back over the vocabulary); :func:`fit_top` trains a :func:`student_top`
(the blocks, or a LoRA adapter on them) through :meth:`purify.module.Distiller.fit_step` with any purifiers;
:func:`fit_on_policy` trains the same blocks inside the whole model on its own samples (on-policy distillation);
both read their settings from a :class:`TopSettings` (or a mapping with its fields, as the suites' ``cfg``);
:func:`finetune` and :func:`cached_top` make a traited teacher of the same shape. :func:`score_top` and
:func:`drift` read a trained :class:`Top`.

The real-model benchmark suites (:mod:`purify.bench.real_lm`) are built on it; it knows nothing of them.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn
from transformers import LlamaForCausalLM

from purify.config import LossConfig, OnPolicyConfig, OptimConfig
from purify.module import Distiller
from purify.purifiers import build_purifiers
from purify.readouts import Records, Scores, drift_terms, pad_rows, prompt_ids, token_ids, trait_scores
from purify.storage import atomic_path
from purify.types import IGNORE_INDEX, Batch, ModelOutput


class TopBlocksError(ValueError):
    """A cached set of top blocks does not match the model it is loaded into (one ``purify: error:`` line)."""


@dataclass(frozen=True)
class TopSettings:
    """How a top-blocks student trains (what :func:`fit_top`, :func:`fit_on_policy` and :func:`finetune` read).

    Attributes:
        layers: the top blocks that train (with the final norm).
        batch_size: examples per step.
        lr: learning rate of the blocks (AdamW).
        lora_lr: learning rate of a LoRA adapter on them (needed for ``rank > 0`` only).
    """

    layers: int
    batch_size: int
    lr: float
    lora_lr: float | None = None

    @classmethod
    def of(cls, cfg: TopSettings | Mapping[str, Any]) -> TopSettings:
        """``cfg`` itself, or these fields of a settings mapping (a suite's ``cfg``; other keys are ignored).

        Raises:
            TopBlocksError: a mapping that lacks ``layers``, ``batch_size`` or ``lr``.
        """
        if isinstance(cfg, cls):
            return cfg
        missing = [k for k in ("layers", "batch_size", "lr") if k not in cfg]
        if missing:
            raise TopBlocksError(f"top-blocks settings lack {', '.join(missing)} (give a TopSettings or a mapping "
                                 "with layers, batch_size, lr and, for a LoRA student, lora_lr)")
        return cls(int(cfg["layers"]), int(cfg["batch_size"]), float(cfg["lr"]), cfg.get("lora_lr"))


Settings = TopSettings | Mapping[str, Any]


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
        rows, attn = pad_rows(rows, 0)  # type: ignore[arg-type]
    out = []
    for s in range(0, len(rows), bs):
        hs = base.model(input_ids=rows[s:s + bs], attention_mask=attn[s:s + bs], output_hidden_states=True)
        h = hs.hidden_states[base.config.num_hidden_layers - k]
        out += [h[i, :int(attn[s + i].sum())].clone() for i in range(len(h))]
    return out


@torch.no_grad()
def teacher_targets(teacher: Any, rows: list[list[int]], n_prompt: list[int], top_k: int, bs: int = 16) -> list[Any]:
    """Per row, the teacher's top-K log-probs (and ids) at the positions predicting completion tokens."""
    ids, attn = pad_rows(rows, 0)
    out = []
    for s in range(0, len(rows), bs):
        logp = torch.log_softmax(teacher(input_ids=ids[s:s + bs], attention_mask=attn[s:s + bs]).logits.float(), -1)
        for i in range(len(logp)):
            r = s + i
            v, t = logp[i, n_prompt[r] - 1:len(rows[r]) - 1].topk(top_k, -1)
            out.append((v, t))
    return out


@torch.no_grad()
def top_targets(top: Top, data: dict[str, Any], k: int, bs: int = 16) -> list[tuple[Tensor, Tensor]]:
    """Per example of ``data``, the top-K log-probs (values, ids) of ``top`` at its completion-predicting positions,
    computed on the cached block inputs (valid for any model whose blocks below the top equal the base's)."""
    out = []
    for s in range(0, len(data["labels"]), bs):
        idx = list(range(s, min(s + bs, len(data["labels"]))))
        b = collate({"hidden": data["hidden"], "labels": data["labels"]}, idx, 1)
        logp = torch.log_softmax(top.logits(b["hidden"], b["attention_mask"], b["pos"]).float(), -1)
        for j, i in enumerate(idx):
            v, t = logp[j, :len(data["labels"][i])].topk(k, -1)
            out.append((v.contiguous(), t.contiguous()))
    return out


def full_logprobs(topk: tuple[Tensor, Tensor], vocab: int) -> Tensor:
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
            teacher[j, :len(lab)] = full_logprobs(data["teacher"][i], vocab)
    return {"hidden": hidden, "attention_mask": attn, "pos": pos, "labels": labels.masked_fill(mask == 0, -100),
            "target_mask": mask.float(), "teacher_logits": teacher, "index": torch.tensor(idx)}


def sft_data(base: Any, tokenizer: Any, records: Records, layers: int) -> dict[str, Any]:
    """Training examples of the student (no system prompt): completion token ids and cached block inputs."""
    prompts = prompt_ids(tokenizer, records)
    labels = [token_ids(tokenizer, r["completion"]) for r in records]
    return {"records": records, "labels": labels,
            "hidden": block_inputs(base, [p + c for p, c in zip(prompts, labels)], None, layers)}


def cached_top(path: Path, base: Any, layers: int, train: Callable[[], Top]) -> Top:
    """The base's top ``layers`` blocks as ``train()`` fine-tunes them, trained once and cached at ``path`` (the
    trained parameters only).

    Raises:
        TopBlocksError: ``path`` exists but does not hold exactly these trained blocks.
    """
    top = Top(base, layers)
    if path.exists():
        missing, unexpected = top.load_state_dict(torch.load(path, weights_only=True), strict=False)
        if unexpected or any(top.get_parameter(k).requires_grad for k in missing):
            raise TopBlocksError(f"{path} does not hold this teacher's trained blocks; delete it to rebuild")
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
                seed: int, on_point: Callable[[int, Top], None] | None, marks: Collection[int],
                current: Callable[[], Top]) -> None:
    """``steps`` ``Distiller.fit_step`` steps on ``batch(indices)`` of examples ``pool`` (batches of ``bs`` in a
    seeded shuffled order, the pool repeated as needed); ``on_point(step, current())`` after each step in ``marks``
    but the last."""
    opt, rng = dist.build_optimizer(), random.Random(seed)
    order: list[int] = []
    while len(order) < steps * bs:
        order += rng.sample(pool, len(pool))
    for step in range(steps):
        dist.fit_step(batch(order[step * bs:(step + 1) * bs]), opt, step / steps, step=step)
        if on_point and step + 1 in marks and step + 1 < steps:
            on_point(step + 1, current())


def fit_top(base: Any, data: dict[str, Any], pool: list[int], cfg: Settings, steps: int, seed: int,
            loss: str = "ce", purifiers: Collection[dict[str, Any]] = (), teacher_names: list[str] | None = None,
            on_point: Callable[[int, Top], None] | None = None, marks: Collection[int] = (), rank: int = 0,
            metrics: dict[str, float] | None = None) -> Top:
    """Train a :func:`student_top` (``rank`` 0: the top ``cfg.layers`` blocks at ``cfg.lr``; else a LoRA adapter at
    ``cfg.lora_lr``; ``cfg``: :class:`TopSettings` or a mapping with its fields) on examples ``pool`` of ``data``
    (:func:`train_steps`); ``on_point(step, top)`` after each step in ``marks`` but the last; ``metrics`` (if given)
    receives each purifier metric's mean over the steps (:meth:`purify.module.Distiller.purifier_metric_means`).

    Raises:
        TopBlocksError: settings without a field they need (``lora_lr`` for a LoRA student).
    """
    s = TopSettings.of(cfg)
    if rank and s.lora_lr is None:
        raise TopBlocksError("a LoRA student (rank > 0) needs the settings' lora_lr")
    top = student_top(base, s.layers, rank, seed)
    dist = Distiller(top, [CachedTeacher()], loss=LossConfig(name=loss),
                     optim=OptimConfig(lr=s.lora_lr if rank else s.lr),  # type: ignore[arg-type]
                     purifiers=build_purifiers(purifiers), total_steps=steps,
                     teacher_names=teacher_names or ["teacher"])
    train_steps(dist, lambda idx: collate(data, idx, base.config.vocab_size), pool, s.batch_size, steps, seed,
                on_point, marks, lambda: top)
    if metrics is not None:
        metrics.update(dist.purifier_metric_means())
    return top.eval()


def full_batch(prompts: list[list[int]], labels: list[list[int]], idx: list[int], pad_id: int) -> Batch:
    """A whole-model batch of examples ``idx``: each chat prompt then its completion, right-padded; the loss covers
    the completion tokens (the collated layout of :class:`purify.data.TokenDataset`)."""
    ids, attn = pad_rows([prompts[i] + labels[i] for i in idx], pad_id)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(idx):
        mask[row, len(prompts[i]):len(prompts[i]) + len(labels[i])] = 1
    target_mask = mask[:, 1:].float()
    return {"input_ids": ids, "attention_mask": attn, "target_mask": target_mask,
            "labels": ids[:, 1:].masked_fill(target_mask == 0, IGNORE_INDEX)}


def fit_on_policy(base: Any, teachers: list[Any], tokenizer: Any, prompts: list[list[int]], labels: list[list[int]],
                  pool: list[int], cfg: Settings, steps: int, seed: int, *, on_policy: dict[str, Any],
                  loss: str = "forward_kl", purifiers: Collection[dict[str, Any]] = (),
                  teacher_names: list[str] | None = None, on_point: Callable[[int, Top], None] | None = None,
                  marks: Collection[int] = (), metrics: dict[str, float] | None = None) -> Top:
    """Train an on-policy student (``on_policy``: :class:`purify.config.OnPolicyConfig` fields,
    :mod:`purify.on_policy`): the whole base with only its top ``cfg.layers`` blocks and final norm trainable (as
    :func:`fit_top`'s), sampling its own completions of the pool's chat prompts, scored live by ``teachers`` (whole
    models, full vocabulary) through ``Distiller.fit_step``; the same seeded example order, steps and lr as
    :func:`fit_top`. Returns the trained blocks as a :class:`Top` (scored like every other student);
    ``on_point(step, top)`` after each step in ``marks`` but the last; ``metrics`` as for :func:`fit_top`."""
    s = TopSettings.of(cfg)
    torch.manual_seed(seed)
    student = copy.deepcopy(base).requires_grad_(False)
    n, k = base.config.num_hidden_layers, s.layers
    student.model.layers[n - k:].requires_grad_(True)
    student.model.norm.requires_grad_(True)
    dist = Distiller(student, teachers, loss=LossConfig(name=loss), optim=OptimConfig(lr=s.lr),
                     purifiers=build_purifiers(purifiers), total_steps=steps,
                     teacher_names=teacher_names or ["teacher"],
                     student_tokenizer=tokenizer, on_policy=OnPolicyConfig(**on_policy), seed=seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_steps(dist, lambda idx: full_batch(prompts, labels, idx, pad), pool, s.batch_size, steps, seed,
                on_point, marks, lambda: Top(student, k).eval())
    if metrics is not None:
        metrics.update(dist.purifier_metric_means())
    return Top(student, k).eval()


def finetune(base: Any, tokenizer: Any, records: Records, cfg: Settings, epochs: int, lr: float) -> Top:
    """The base's top ``cfg.layers`` blocks fine-tuned with hard labels on ``records`` (``epochs`` epochs of batch
    ``cfg.batch_size`` at ``lr``, seed 0, at least one step): how a suite trains its traited teacher."""
    s = dataclasses.replace(TopSettings.of(cfg), lr=lr)
    data = sft_data(base, tokenizer, records, s.layers)
    steps = max(1, epochs * len(records) // s.batch_size)
    return fit_top(base, data, list(range(len(records))), s, steps, seed=0)


def stack_hidden(hidden: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-padded block inputs and their attention mask."""
    h = torch.nn.utils.rnn.pad_sequence(hidden, batch_first=True)
    attn = torch.zeros(h.shape[:2], dtype=torch.long)
    for i, x in enumerate(hidden):
        attn[i, :len(x)] = 1
    return h, attn


Neutral = list[tuple[Tensor, Tensor, Tensor, Tensor]]
"""Batches of neutral text: ``(block inputs, attention mask, the base's logits, token ids)``
(:func:`neutral_inputs`)."""


def neutral_inputs(base: Any, tokenizer: Any, layers: int, texts: list[str], bs: int = 8) -> Neutral:
    """Neutral ``texts`` (raw, no chat template) as batches of ``bs`` (:data:`Neutral`), for :func:`drift` and
    :func:`neutral_scores`."""
    rows = [token_ids(tokenizer, t) for t in texts]
    hidden = block_inputs(base, rows, None, layers)
    top = Top(base, layers)
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), bs):
            h, attn = stack_hidden(hidden[s:s + bs])
            ids = torch.zeros_like(attn, dtype=torch.long)
            for row, r in enumerate(rows[s:s + bs]):
                ids[row, :len(r)] = torch.tensor(r, dtype=torch.long)
            out.append((h, attn, top.logits(h, attn), ids))
    return out


@torch.no_grad()
def neutral_scores(top: Top, neutral: Neutral) -> dict[str, float]:
    """What a student's logits on the neutral paragraphs (:func:`neutral_inputs`: held out from every training text)
    say, from one forward per batch: ``drift``, its off-task drift from its base (mean ``KL(base ‖ student)`` per
    next-token position, :func:`purify.readouts.drift_terms`), and ``prose_ppl``, its perplexity there (``exp`` of the
    mean next-token negative log-likelihood: a guard against a student that forgets language, which the real-model
    suites declare, :data:`purify.bench.real_lm.GUARDS`)."""
    kl, nll = [], []
    for h, attn, b, ids in neutral:
        logits = top.logits(h, attn)
        kl.append(drift_terms(b, logits, attn))
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        nll.append(-logp.gather(-1, ids[:, 1:, None])[..., 0][attn[:, 1:].bool()])
    return {"drift": float(torch.cat(kl).mean()), "prose_ppl": float(torch.cat(nll).mean().exp())}


@torch.no_grad()
def score_top(top: Top, tokenizer: Any, data: dict[str, Any], heldout: list[int], vocab: int, target: str,
              others: tuple[str, ...] = ()) -> Scores:
    """Trait ``target`` (and ``p_<word>`` of ``others``) on the cached trait inputs ``data["trait"]``, and fidelity:
    KL(teacher || student), top-1 agreement on the held-out examples ``heldout`` of ``data["teacher"]``."""
    scores = trait_scores(top.logits(*stack_hidden(data["trait"]["hidden"])), data["trait"]["reads"], tokenizer,
                          target, others)
    b = collate(data["teacher"], heldout, vocab)
    s = torch.log_softmax(top(b).logits.float(), -1)
    t = b["teacher_logits"]
    m = b["target_mask"].bool()
    kl = (t.exp() * (t - s)).sum(-1)[m].mean()
    agree = (s.argmax(-1) == t.argmax(-1)).float()[m].mean()
    return {**scores, "task_error": float(kl), "fidelity_kl": float(kl), "agreement": float(agree)}
