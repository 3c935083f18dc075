"""Fingerprint adversary: a discriminator tells the student's output distributions from its frozen base's on neutral
inputs, and gradient reversal makes the student indistinguishable from its base off-task.

Each step runs the student and its frozen base (``needs_base``) on the same batch of *neutral* inputs — the stream of
:mod:`purify.purifiers.function_anchor` (bundled / generated prose / a text file for language models, uniform noise
for vector models; never the distillation data). A small head (:class:`~purify.purifiers.adversary.DiscriminatorHead`,
``Linear → ReLU → Linear``) reads a per-position representation of each model's next-token distribution
(:func:`output_features`) and predicts student (1) vs base (0). A gradient-reversal layer of scale
``s(p) = weight · λ(p)`` (DANN ramp, :mod:`purify.purifiers.grl`) sits between the student's representation and the
head; the base's side is detached. One backward pass trains the head to tell the two apart and pushes the student
toward outputs from which it cannot: "learn the task, stay indistinguishable from the base elsewhere".

Representation (``features``):

- ``topk`` (default): the ``top_k`` largest log-probabilities, sorted descending — the shape of the distribution
  (confidence, entropy, how the head of the distribution falls off), independent of which tokens they are. The head
  has ``top_k`` inputs whatever the vocabulary size (a 49k-token LM costs the same as a 13-logit MLP), and the
  signal the 2026 on-policy study found to carry the trait lives in this high-probability head.
- ``logprobs``: the whole log-softmax ``(V,)`` — also sees *which* tokens move; the head grows with ``V``.

The loss term returned to the distiller is ``CE - CE.detach()``: zero in value (``train/loss`` stays comparable with
vanilla), with the gradient of ``CE`` for the head and ``-s(p)·∂CE`` for the student. Logs ``disc_acc`` (the head's
accuracy on this step's neutral batch before it learns from it; 0.5 = the student's fingerprint is invisible to it),
``disc_loss`` and ``grl_scale``. ``weight: 0`` trains the head as a probe of the drift without touching the student.

It needs no teacher weights (nor teacher outputs: only the student and its own frozen base), so it applies to API
teachers and logit caches, and it never sees the trait. :func:`fingerprint_head_accuracy` asks the same question
offline — train a fresh head on two models' representations over neutral inputs, report held-out accuracy — and is
``purify audit``'s second fingerprint measure. Shapes: logits ``(B, T, V)`` (LMs, shifted next-token) or
``(B, 1, V)`` / ``(B, V)`` (vector models); features ``(..., F)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from purify.purifiers.adversary import DiscriminatorHead
from purify.purifiers.base import PurifierConfig, PurifierContext, StudentPurifier
from purify.purifiers.function_anchor import NeutralInputs, NeutralInputsConfig
from purify.purifiers.grl import dann_lambda, reverse_gradient
from purify.types import Batch, ModelOutput

Features = Literal["topk", "logprobs"]


@dataclass
class FingerprintAdversaryConfig(NeutralInputsConfig, PurifierConfig):
    """Recipe entry ``{name: fingerprint_adversary, weight: 0.1, source: prose}`` (the neutral-input keys are
    :class:`~purify.purifiers.function_anchor.NeutralInputsConfig`'s)."""

    name: str = "fingerprint_adversary"
    weight: float = 0.1  # reversal strength: the student receives -weight·λ(p)·∂CE/∂features (0 = probe only)
    features: Features = "topk"  # topk: sorted top_k log-probs | logprobs: the whole log-softmax
    top_k: int = 32  # features: topk: how many (capped at the vocabulary size)
    hidden_dim: int = 64  # width of the head's hidden layer
    ramp: Literal["dann", "constant"] = "dann"  # λ(p) = 2/(1+exp(-10p)) - 1, or λ = 1

    def problems(self) -> list[str]:
        """Settings that cannot work, one ``"<key>: <problem>; <fix>"`` line each."""
        out = []
        if self.weight < 0:
            out.append(f"weight: must be >= 0, got {self.weight}; 0 trains the head as a probe only")
        if self.top_k < 1:
            out.append(f"top_k: must be >= 1, got {self.top_k}")
        if self.hidden_dim < 1:
            out.append(f"hidden_dim: must be >= 1, got {self.hidden_dim}")
        return out + self.neutral_problems()


def output_features(logits: Tensor, features: Features = "topk", top_k: int = 32) -> Tensor:
    """Per-position representation of a model's output distribution, float32.

    Args:
        logits: ``(..., V)``.
        features: ``topk`` (the ``min(top_k, V)`` largest log-probs, sorted descending) or ``logprobs`` (all ``V``).
        top_k: see ``features``.

    Returns:
        ``(..., F)`` with ``F = min(top_k, V)`` or ``V``; differentiable in ``logits``.
    """
    logp = logits.float().log_softmax(-1)
    if features == "logprobs":
        return logp
    return logp.topk(min(top_k, logp.shape[-1]), dim=-1, sorted=True).values


def feature_dim(vocab: int, features: Features = "topk", top_k: int = 32) -> int:
    """``F`` of :func:`output_features` for a vocabulary of ``vocab`` outputs."""
    return vocab if features == "logprobs" else min(top_k, vocab)


def head_loss(head: nn.Module, positive: Tensor, negative: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The discriminator's cross-entropy and accuracy: ``positive`` is class 1 (student), ``negative`` class 0 (base).

    Args:
        head: maps ``(..., F)`` to 2 class logits.
        positive: ``(..., F)`` features of the model to detect.
        negative: ``(..., F)`` features of the reference on the same inputs.
        mask: ``(...)`` real positions (``None``: all).

    Returns:
        ``(ce, acc)``: scalars, means over the real positions of both sides. Equal features get equal logits, so a
        model against itself scores exactly 0.5 (``argmax`` breaks the tie the same way on both sides).
    """
    logits = head(torch.stack([negative, positive]).float())  # (2, ..., 2)
    labels = torch.arange(2, device=logits.device).view(2, *[1] * (logits.dim() - 2)).expand(logits.shape[:-1])
    ce = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), reduction="none")
    correct = (logits.argmax(-1) == labels).float().reshape(-1)
    if mask is None:
        weight = torch.ones_like(ce)
    else:
        weight = torch.stack([mask, mask]).to(ce.dtype).reshape(-1)
    count = weight.sum().clamp_min(1.0)
    return (ce * weight).sum() / count, (correct * weight).sum() / count


def _vocab_size(model: nn.Module) -> int:
    """Number of outputs of a model's output layer."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else getattr(model, "head", None)
    if not isinstance(out, nn.Linear):
        raise ValueError(f"fingerprint_adversary: cannot infer the output size of {type(model).__name__}; it needs an "
                         "output nn.Linear (get_output_embeddings() or .head)")
    return out.out_features


class FingerprintAdversary(StudentPurifier):
    """Discriminator head on student-vs-base output features behind gradient reversal (module docstring).

    Needs no teacher weights and never sees the trait.

    Args:
        config: the validated recipe entry.
    """

    needs_base = True

    def __init__(self, config: FingerprintAdversaryConfig) -> None:
        super().__init__(config)
        self.neutral = NeutralInputs(config, "fingerprint_adversary")
        self.head: DiscriminatorHead | None = None

    def setup(self, ctx: PurifierContext) -> None:
        """Resolve the neutral stream and build the head for the student's output size."""
        self.neutral.setup(ctx)
        cfg = self.config
        vocab = _vocab_size(ctx.student)
        if cfg.outputs == "distilled" and ctx.logit_slice is not None:
            vocab = ctx.logit_slice[1] - ctx.logit_slice[0]
        device = next(ctx.student.parameters()).device
        self.head = DiscriminatorHead(feature_dim(vocab, cfg.features, cfg.top_k), cfg.hidden_dim, 2).to(device)

    def extra_loss(self, batch: Batch, student_output: ModelOutput, progress: float) -> Tensor:
        """Zero-valued term with the gradient of the head's cross-entropy (student features reversed by ``s(p)``).

        Args:
            batch: the distillation batch (only its device and, for noise, its input shape are read).
            student_output: unused (the head reads the student on neutral inputs).
            progress: training progress ``p ∈ [0, 1]`` for the ramp.
        """
        ctx, cfg = self.neutral.ctx, self.config
        if ctx is None or self.head is None:
            raise RuntimeError("fingerprint_adversary: call setup(ctx) first")
        neutral = self.neutral.next(batch)
        with torch.no_grad():
            base = output_features(self.neutral.run(ctx.base, neutral), cfg.features, cfg.top_k)  # type: ignore[arg-type]
        logits = self.neutral.run(ctx.student, neutral)
        scale = cfg.weight * (dann_lambda(progress) if cfg.ramp == "dann" else 1.0)
        student = reverse_gradient(output_features(logits, cfg.features, cfg.top_k), scale)
        ce, acc = head_loss(self.head, student, base, self.neutral.mask(logits, neutral))
        self.last_metrics = {"disc_loss": ce.detach(), "disc_acc": acc.detach(), "grl_scale": scale}
        return ce - ce.detach()


def _positions(logits: Tensor, batch: Batch) -> Tensor:
    """``(B, T)`` real next-token positions of a text batch, or all rows of a vector batch."""
    if "input_ids" in batch and logits.dim() == 3:
        return batch["target_mask"].bool()
    return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)


def fingerprint_head_accuracy(model: nn.Module, reference: nn.Module, batches: Sequence[Batch], *,
                              run: Callable[[nn.Module, Batch], Tensor] | None = None, features: Features = "topk",
                              top_k: int = 32, hidden_dim: int = 64, steps: int = 300, lr: float = 3e-3,
                              heldout: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Held-out accuracy of a fresh discriminator head telling ``model``'s outputs from ``reference``'s.

    Both models run on the same neutral inputs (``batches``); the head — the purifier's architecture, loss and
    features — is trained full-batch with Adam on the positions of a random ``1 - heldout`` share of the *inputs*
    and scored on the positions of the other inputs, both models' copies of each. ``model`` against itself gives
    exactly 0.5 (:func:`head_loss`).

    Args:
        model: the model to detect (class 1), e.g. a distilled student.
        reference: its reference (class 0), e.g. the student's base.
        batches: neutral batches (``input_ids``/``attention_mask``/``target_mask`` or ``x``).
        run: ``run(model, batch) -> logits``; default :func:`purify.models.model_forward`'s.
        features, top_k, hidden_dim: as the purifier's config.
        steps, lr: the head's training.
        heldout: share of inputs held out for scoring.
        seed: the split and the head's initialisation.

    Returns:
        ``{"accuracy", "per_input", "n_inputs", "n_positions"}``: mean held-out accuracy over positions, the accuracy
        of each held-out input (mean over its positions, both models), and how many inputs / positions were scored.

    Raises:
        ValueError: fewer than two inputs with a real position.
    """
    if run is None:
        from purify.models import model_forward

        def run(m: nn.Module, b: Batch) -> Tensor:
            return model_forward(m, b).logits

    rows: list[tuple[Tensor, Tensor]] = []  # per input: (model features (P, F), reference features (P, F))
    with torch.no_grad():
        for batch in batches:
            a, b = run(model, batch), run(reference, batch)
            keep = _positions(a, batch)
            keep = keep.reshape(keep.shape[0], -1)  # (B, P)
            fa = output_features(a, features, top_k).reshape(*keep.shape, -1)  # (B, P, F)
            fb = output_features(b, features, top_k).reshape(*keep.shape, -1)
            rows += [(fa[i][keep[i]], fb[i][keep[i]]) for i in range(keep.shape[0]) if keep[i].any()]
    if len(rows) < 2:
        raise ValueError(f"fingerprint head: needs at least 2 neutral inputs with a real position, got {len(rows)}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=gen).tolist()
    n_test = min(len(rows) - 1, max(1, round(heldout * len(rows))))
    test, train = order[:n_test], order[n_test:]
    pos = torch.cat([rows[i][0] for i in train])
    neg = torch.cat([rows[i][1] for i in train])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = DiscriminatorHead(pos.shape[-1], hidden_dim, 2).to(pos.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            head_loss(head, pos, neg)[0].backward()
            optimizer.step()
    per_input, positions = [], 0
    with torch.no_grad():
        for i in test:
            per_input.append(float(head_loss(head, rows[i][0], rows[i][1])[1]))
            positions += rows[i][0].shape[0]
    accuracy = sum(acc * rows[i][0].shape[0] for acc, i in zip(per_input, test)) / positions
    return {"accuracy": accuracy, "per_input": per_input, "n_inputs": len(test), "n_positions": positions}
