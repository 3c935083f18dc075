"""Gradient reversal (Ganin & Lempitsky 2015, "Unsupervised domain adaptation by backpropagation") and its ramp.

The layer is the identity in the forward pass and multiplies the incoming gradient by ``-scale`` in the backward
pass. Put between features and a discriminator head, one backward pass of ``L_task + L_disc`` trains the head to
*minimise* ``L_disc`` while pushing the features to *maximise* it: the min-max of domain-adversarial training with a
single optimizer (which is all Lightning's DeepSpeed strategy allows).

Example::

    features = extractor(x)                                  # (B, H)
    logits = head(GradientReversal(scale=0.1)(features))     # head learns; extractor unlearns
    (task_loss + F.cross_entropy(logits, lineage)).backward()
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, autograd, nn


class _ReverseGradient(autograd.Function):
    """``y = x`` forward; ``∂L/∂x = -scale · ∂L/∂y`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * -ctx.scale, None


def reverse_gradient(x: Tensor, scale: float) -> Tensor:
    """Identity on ``x`` (any shape) whose gradient is multiplied by ``-scale``.

    Args:
        x: features, any shape.
        scale: reversal strength ``≥ 0``; ``0`` lets a head learn from ``x`` without any gradient reaching it.

    Returns:
        A view of ``x`` with the reversed-gradient autograd node.

    Raises:
        ValueError: ``scale`` negative or not finite (a negative one would help the head's adversary, not reverse it).
    """
    if not (scale >= 0 and math.isfinite(scale)):
        raise ValueError(f"reverse_gradient: scale must be a finite number >= 0, got {scale}")
    return _ReverseGradient.apply(x, scale)


class GradientReversal(nn.Module):
    """Module form of :func:`reverse_gradient`; set :attr:`scale` between steps to follow a ramp.

    Args:
        scale: reversal strength ``≥ 0``.
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return reverse_gradient(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """DANN's reversal ramp ``λ(p) = 2 / (1 + exp(-γ p)) - 1``: 0 at the start, ≈1 by the end of training.

    Keeps the reversed gradient off while the discriminator's early guesses are noise.

    Args:
        progress: training progress ``p ∈ [0, 1]``.
        gamma: steepness ``γ`` (10 in the paper).

    Returns:
        ``λ(p) ∈ [0, 1)``; ``λ(0) = 0``, ``λ(1) ≈ 0.99991``.
    """
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0
