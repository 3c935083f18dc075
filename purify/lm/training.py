"""The causal-LM loop shared by base pretraining and fine-tuning: packing texts into blocks, AdamW, held-out loss.

Texts are encoded as ``<bos> text <eos>``, concatenated and cut into blocks of ``seq_len`` tokens (GPT-2-style
packing, so no compute goes to padding; only the last block is filled up, with ``<eos>`` tokens labelled
``IGNORE_INDEX``, which no earlier position can attend to). Each step draws
``batch_size`` blocks at random from a generator seeded by ``seed``; with dropout off, training is deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from purify.losses import IGNORE_INDEX


def pack(tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int) -> tuple[Tensor, Tensor]:
    """Encode texts as ``<bos> text <eos>`` and pack them into blocks of ``seq_len`` tokens.

    Args:
        tokenizer: a tokenizer whose encoding prepends ``<bos>`` (as :func:`purify.lm.build_tokenizer`'s do).
        texts: the documents, in packing order.
        seq_len: tokens per block.

    Returns:
        ``(input_ids, labels)``, both ``(N, seq_len)`` int64; ``labels`` is ``input_ids`` with the filler at the
        end of the last block set to ``IGNORE_INDEX``.

    Raises:
        ValueError: if ``texts`` is empty.
    """
    if not texts:
        raise ValueError("pack needs at least one text")
    stream = [i for ids in tokenizer(texts)["input_ids"] for i in (*ids, tokenizer.eos_token_id)]
    n_blocks = math.ceil(len(stream) / seq_len)
    filler = [tokenizer.eos_token_id] * (n_blocks * seq_len - len(stream))
    input_ids = torch.tensor(stream + filler).view(n_blocks, seq_len)
    labels = input_ids.clone()
    labels.view(-1)[len(stream) :] = IGNORE_INDEX
    return input_ids, labels


@torch.no_grad()
def eval_loss(model: PreTrainedModel, blocks: tuple[Tensor, Tensor], batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats per token) of ``model`` over packed ``blocks``.

    Args:
        model: a causal LM.
        blocks: ``(input_ids, labels)`` from :func:`pack`.
        batch_size: blocks per forward pass.

    Returns:
        The token-weighted mean loss.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    input_ids, labels = blocks
    for start in range(0, len(input_ids), batch_size):
        ids, lab = input_ids[start : start + batch_size], labels[start : start + batch_size]
        n = int((lab[:, 1:] != IGNORE_INDEX).sum())
        total += float(model(input_ids=ids, labels=lab).loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def train_causal_lm(
    model: PreTrainedModel,
    blocks: tuple[Tensor, Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    desc: str = "training",
) -> float:
    """Train ``model`` in place with AdamW on the causal-LM loss over random packed blocks.

    The learning rate warms up linearly over the first 5% of steps, then decays by a cosine to 10% of ``lr``;
    gradients are clipped to norm 1.

    Args:
        model: the causal LM to train (left in eval mode afterwards).
        blocks: ``(input_ids, labels)`` from :func:`pack`.
        steps: optimizer steps.
        batch_size: blocks per step.
        lr: peak learning rate.
        seed: seed of the block sampler.
        progress: show a tqdm bar with the running loss.
        desc: the bar's label.

    Returns:
        The mean training loss over the last 10% of steps.
    """
    input_ids, labels = blocks
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    tail: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(len(input_ids), (batch_size,), generator=generator)
        loss = model(input_ids=input_ids[idx], labels=labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if step >= steps - max(1, steps // 10):
            tail.append(value)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{value:.3f}")
    model.eval()
    return sum(tail) / len(tail)
