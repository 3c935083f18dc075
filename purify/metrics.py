"""Fidelity metrics (torchmetrics, so they sum correctly across batches and ranks).

``FidelityMetrics`` accumulates, over real target positions: KL(teacher‖student), top-1 agreement between student
and teacher, and the student's negative log-likelihood of the data (perplexity = exp of its mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from purify.losses import IGNORE_INDEX, forward_kl


class FidelityMetrics(Metric):
    """KL(teacher‖student), top-1 agreement and perplexity over masked positions.

    ``update(student_logits, teacher_logits, mask, labels=None)`` with logits ``(..., V)``, mask ``(...)``.
    ``compute()`` returns ``{"kl", "agreement", "perplexity"}``, summed over the processes of a distributed run
    (kl and agreement NaN without a masked position, perplexity NaN without labels).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("kl_sum", "agree_sum", "count", "nll_sum", "nll_count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, labels: Tensor | None = None) -> None:
        m = mask > 0
        s, t = student_logits.float(), teacher_logits.float()
        self.kl_sum += forward_kl(s, t)[m].sum().double()
        self.agree_sum += (s.argmax(-1) == t.argmax(-1))[m].sum().double()
        self.count += m.sum().double()
        if labels is not None:
            valid = m & (labels != IGNORE_INDEX)
            nll = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1).clamp_min(0), reduction="none")
            self.nll_sum += nll.reshape(labels.shape)[valid].sum().double()
            self.nll_count += valid.sum().double()

    def compute(self) -> dict[str, Tensor]:
        nan = torch.tensor(float("nan"))
        ppl = (self.nll_sum / self.nll_count).exp() if self.nll_count > 0 else nan
        kl, agreement = (self.kl_sum / self.count, self.agree_sum / self.count) if self.count > 0 else (nan, nan)
        return {"kl": kl.float(), "agreement": agreement.float(), "perplexity": ppl.float()}
