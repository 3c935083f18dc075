"""Fingerprint adversary: a discriminator tells the student's output distributions from its frozen base's on neutral
inputs, and the student is pulled toward outputs from which it cannot.

Each step runs the student and its frozen base (``needs_base``) on the same batch of *neutral* inputs — the stream of
:mod:`purify.purifiers.function_anchor` (bundled / generated prose / a text file for language models, uniform noise
for vector models; never the distillation data). A small head (:class:`~purify.purifiers.adversary.DiscriminatorHead`,
``Linear → ReLU → Linear``) reads a per-position representation of each model's next-token distribution
(:func:`output_features`) and predicts student (1) vs base (0); the base's side is always detached. "Learn the task,
stay indistinguishable from the base elsewhere". The student's side of the game (``objective``), scaled by
``s(p) = weight · λ(p)`` (DANN ramp, :mod:`purify.purifiers.grl`, or ``ramp: constant``):

- ``match`` (default): the head trains on its cross-entropy over *detached* features; the student minimises
  ``s · ‖mean φ(student) − mean φ(base)‖²`` (:func:`mean_matching_loss`), ``φ`` the head's penultimate features
  ``ReLU(Linear(x))`` with the head's weights frozen for this term (feature matching, Salimans et al. 2016).
- ``confusion``: the head trains as above; the student minimises ``s ·`` the cross-entropy of the (frozen) head's
  prediction on its features against the uniform label 0.5/0.5 (:func:`confusion_loss`, ``≥ ln 2``; domain confusion,
  Tzeng et al. 2015).
- ``reverse``: one cross-entropy, a gradient-reversal layer of scale ``s`` between the student's features and the head
  (DANN, Ganin & Lempitsky 2015): the head descends it, the student ascends it.

What it does (``tests/test_fingerprint.py::test_objectives_on_a_finetuned_mlp``: the tiny aux-MLP, base ``mlp(0)``,
student its rank-2 fine-tune with seeds 1, 2, 3, trained with this term only — ``logprobs`` features, weight 1,
constant ramp, Adam lr 3e-3, 300 steps, purifier and head seed 0 — then a fresh head (:func:`fingerprint_head_accuracy`,
seed 0) and KL(base‖student) on 512 held-out noise inputs; 2-core x86_64 CPU): ``match`` takes the fresh head's
held-out accuracy from 1.0 to 0.59 / 0.50 / 0.50 and the KL from 0.130 / 0.042 / 0.041 to 0.003 / 0.001 / 0.002.
``reverse`` leaves the fresh head at 1.0 and *raises* the KL (to 0.98 / 1.50 / 1.59): the student learns to flip the
online head's answer rather than to look like its base (a known failure of plain reversal with a binary head).
``confusion`` holds the online head nearer 0.5 (logged ``disc_acc`` 0.50 / 0.82 / 0.76) but a fresh head still scores
1.0 and the KL rises too (to 0.17 / 0.26 / 0.12). Hence ``match`` is the default. With ``topk`` features (top 8,
fine-tune seed 1, ``test_matching_sorted_top_k_hides_the_shape_but_not_which_outputs_moved``) ``match`` takes a fresh
``topk`` head from 1.0 to 0.57 and the KL from 0.130 to 0.010, but a fresh ``logprobs`` head still scores 1.0: sorted
top-k cannot see which outputs moved.

Representation (``features``):

- ``topk`` (default): the ``top_k`` largest log-probabilities, sorted descending — the shape of the distribution
  (confidence, entropy, how the head of the distribution falls off), independent of which tokens they are. The head
  has ``top_k`` inputs whatever the vocabulary size (a 49k-token LM costs the same as a 13-logit MLP), and the
  signal the 2026 on-policy study found to carry the trait lives in this high-probability head.
- ``logprobs``: the whole log-softmax ``(V,)`` — also sees *which* tokens move; the head grows with ``V``.

The loss term returned to the distiller is zero in value, so ``train/loss`` shows the distillation loss alone and
stays comparable with vanilla: ``CE - CE.detach()`` for ``reverse`` (the gradient of ``CE`` for the head,
``-s·∂CE`` for the student), ``(CE - CE.detach()) + s·(term - term.detach())`` for ``match``/``confusion``. Logs
``disc_acc`` (the head's accuracy on this step's neutral batch before it learns from it; 0.5 = the student's
fingerprint is invisible to *this* head — a fresh head may still see it, see above), ``disc_loss``, ``grl_scale`` (the
student term's scale ``s``, whatever the objective) and, for ``match``/``confusion``, the unscaled term under its
name. ``weight: 0`` trains the head as a probe of the drift without touching the student. ``match`` and ``confusion``
read the head's weights outside its forward pass, so recipe validation refuses them under ``deepspeed_stage_3``.

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
from torch.func import functional_call

from purify.losses import reduce_loss
from purify.purifiers.adversary import DiscriminatorHead
from purify.purifiers.base import PurifierConfig, PurifierContext, StudentPurifier, output_layer
from purify.purifiers.function_anchor import NeutralInputs, NeutralInputsConfig, NeutralStreamState
from purify.purifiers.grl import dann_lambda, reverse_gradient
from purify.types import Batch, ModelOutput

Features = Literal["topk", "logprobs"]
Objective = Literal["reverse", "confusion", "match"]


@dataclass
class FingerprintAdversaryConfig(NeutralInputsConfig, PurifierConfig):
    """Recipe entry ``{name: fingerprint_adversary, weight: 0.1, source: prose}`` (the neutral-input keys are
    :class:`~purify.purifiers.function_anchor.NeutralInputsConfig`'s)."""

    name: str = "fingerprint_adversary"
    weight: float = 0.1  # the student's term's scale s(p) = weight·λ(p) (0 = probe only)
    features: Features = "topk"  # topk: sorted top_k log-probs | logprobs: the whole log-softmax
    top_k: int = 32  # features: topk: how many (capped at the vocabulary size)
    hidden_dim: int = 64  # width of the head's hidden layer
    ramp: Literal["dann", "constant"] = "dann"  # λ(p) = 2/(1+exp(-10p)) - 1, or λ = 1
    objective: Objective = "match"  # the student's term: match | confusion | reverse (module docstring)

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

    def recipe_problems(self, recipe: Any) -> list[str]:
        """The neutral inputs' checks; ``match``/``confusion`` read the head's weights outside its forward pass."""
        out = super().recipe_problems(recipe)
        if self.objective != "reverse" and recipe.strategy == "deepspeed_stage_3":
            out.append(f"objective: {self.objective!r} reads the head's weights outside its forward pass, which "
                       "ZeRO-3 partitions; use objective: reverse or strategy deepspeed_stage_2")
        return out


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
    stacked = torch.stack([negative, positive])
    logits = head(stacked.to(next(head.parameters()).dtype)).float()  # (2, ..., 2), in the head's dtype
    labels = torch.arange(2, device=logits.device).view(2, *[1] * (logits.dim() - 2)).expand(logits.shape[:-1])
    ce = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), reduction="none")
    correct = (logits.argmax(-1) == labels).float().reshape(-1)
    weight = torch.ones_like(ce) if mask is None else torch.stack([mask, mask]).to(ce.dtype).reshape(-1)
    return reduce_loss(ce, weight), reduce_loss(correct, weight)


class FingerprintAdversary(NeutralStreamState, StudentPurifier):
    """Discriminator head on student-vs-base output features; the student matches, confuses or reverses it (module
    docstring).

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
        vocab = output_layer(ctx.student, "fingerprint_adversary").out_features
        if cfg.outputs == "distilled" and ctx.logit_slice is not None:
            vocab = ctx.logit_slice[1] - ctx.logit_slice[0]
        elif cfg.outputs == "undistilled" and ctx.logit_slice is not None:
            vocab -= ctx.logit_slice[1] - ctx.logit_slice[0]
        device = next(ctx.student.parameters()).device
        self.head = DiscriminatorHead(feature_dim(vocab, cfg.features, cfg.top_k), cfg.hidden_dim, 2).to(device)

    def extra_loss(self, batch: Batch, student_output: ModelOutput, progress: float) -> Tensor:
        """Zero-valued term: the gradient of the head's cross-entropy for the head, of ``objective`` for the student.

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
        mask = self.neutral.mask(logits, neutral)
        scale = cfg.weight * (dann_lambda(progress) if cfg.ramp == "dann" else 1.0)
        student = output_features(logits, cfg.features, cfg.top_k)
        dtype = next(self.head.parameters()).dtype  # the head's (float64 under .double(), bf16 under bf16-true)
        base, student = base.to(dtype), student.to(dtype)
        if cfg.objective == "reverse":
            ce, acc = head_loss(self.head, reverse_gradient(student, scale), base, mask)
            self.last_metrics = {"disc_loss": ce.detach(), "disc_acc": acc.detach(), "grl_scale": scale}
            return ce - ce.detach()
        ce, acc = head_loss(self.head, student.detach(), base, mask)  # the head learns from detached features only
        frozen = {name: p.detach() for name, p in self.head.named_parameters()}  # the student's term moves no head
        if cfg.objective == "confusion":
            term = confusion_loss(functional_call(self.head, frozen, (student,)), mask)
        else:
            first = self.head.net[0]  # the head's penultimate features: ReLU(Linear(x)), weights frozen here
            hidden = F.relu(F.linear(torch.stack([base, student]), first.weight.detach(), first.bias.detach()))
            term = mean_matching_loss(hidden[1], hidden[0], mask)
        self.last_metrics = {"disc_loss": ce.detach(), "disc_acc": acc.detach(), "grl_scale": scale,
                             cfg.objective: term.detach()}
        return (ce - ce.detach()) + scale * (term - term.detach())


def confusion_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy of 2-class logits ``(..., 2)`` against the uniform label (0.5, 0.5), mean over real positions.

    ``≥ ln 2``, with equality exactly where the head says 0.5/0.5 (domain confusion, Tzeng et al. 2015).
    """
    ce = -logits.float().log_softmax(-1).mean(-1)
    return ce.mean() if mask is None else reduce_loss(ce, mask.to(ce.dtype))


def mean_matching_loss(student: Tensor, base: Tensor, mask: Tensor | None = None) -> Tensor:
    """``‖mean(student) − mean(base)‖²`` over the real positions of ``(..., D)`` features (feature matching)."""
    if mask is None:
        diff = student.reshape(-1, student.shape[-1]).mean(0) - base.reshape(-1, base.shape[-1]).mean(0)
    else:
        weight = mask.to(student.dtype).unsqueeze(-1)
        count = weight.sum().clamp_min(1.0)
        diff = ((student - base) * weight).reshape(-1, student.shape[-1]).sum(0) / count
    return diff.pow(2).sum()


def _positions(logits: Tensor, batch: Batch) -> Tensor:
    """``(B, T)`` real next-token positions of a text batch, or all rows of a vector batch."""
    if "input_ids" in batch and logits.dim() == 3:
        return batch["target_mask"].bool()
    return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)


def fingerprint_head_accuracy(model: nn.Module, reference: nn.Module, batches: Sequence[Batch], *,
                              run: Callable[[nn.Module, Batch], Tensor] | None = None, features: Features = "topk",
                              top_k: int = 32, hidden_dim: int = 64, steps: int = 300, lr: float = 3e-3,
                              heldout: float = 0.5, seed: int = 0, heads: int = 1) -> dict[str, Any]:
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
        heads: train this many heads, seeds ``seed, seed + 1, ...`` (each its own split and initialisation: how much
            the answer owes to one head's draw); the models run once.

    Returns:
        ``{"accuracy", "per_input", "n_inputs", "n_train", "n_positions", "per_head"}``: the first head's mean
        held-out accuracy over positions, the accuracy of each of its held-out inputs (mean over its positions, both
        models), how many inputs it scored and trained on and positions it scored, and every head's accuracy.

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
    results = [_one_head(rows, hidden_dim, steps, lr, heldout, seed + k) for k in range(heads)]
    return {**results[0], "per_head": [r["accuracy"] for r in results]}


def _one_head(rows: list[tuple[Tensor, Tensor]], hidden_dim: int, steps: int, lr: float, heldout: float,
              seed: int) -> dict[str, Any]:
    """One head of :func:`fingerprint_head_accuracy` on the inputs' features ``rows``, split and initialised by
    ``seed``."""
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
    return {"accuracy": accuracy, "per_input": per_input, "n_inputs": len(test), "n_train": len(train),
            "n_positions": positions}
