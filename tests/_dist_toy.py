"""A tiny distillation run (Llama student ← frozen Llama teacher) for tests/test_strategy.py.

Run as a script, never imported by pytest: Lightning's DDP/DeepSpeed launcher re-executes ``sys.argv`` once per extra
process (with ``LOCAL_RANK`` set), so the run must be a standalone entry point. Rank 0 writes ``result.json`` (the
global-batch loss of every step, teacher shard sizes) and ``student.pt`` (the consolidated student state dict).

    python tests/_dist_toy.py --strategy deepspeed_stage_3 --devices 2 --out DIR [--checkpoint] [--resume CKPT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from purify.strategy import build_strategy

GLOBAL_BATCH, SAMPLES, SEQ, VOCAB, STEPS = 4, 20, 8, 64, 10
DATA = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(123))


def tiny_llama() -> LlamaForCausalLM:
    """Llama with hidden size 16, 2 layers, 64-token vocabulary: 7,248 parameters."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config)


def initial_state(seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights, built outside any ``deepspeed.zero.Init`` (HF's init is a no-op on partitioned params)."""
    torch.manual_seed(seed)
    return tiny_llama().state_dict()


def gathered(module: torch.nn.Module, modifier_rank: int | None = None):
    """All of ``module``'s parameters in full on every rank (a no-op unless they are ZeRO-3 partitioned)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank)


class ToyDistill(pl.LightningModule):
    """Student trained on CE + KL(teacher ‖ student); the teacher is frozen and, under ZeRO-3, sharded."""

    def __init__(self) -> None:
        super().__init__()
        self.initial = {"student": initial_state(0), "teacher": initial_state(1)}
        self.record: dict = {"losses": {}}

    def configure_model(self) -> None:
        """Runs under ``deepspeed.zero.Init`` for ZeRO-3, so each rank only keeps its shard of every parameter."""
        self.student, self.teacher = tiny_llama(), tiny_llama()
        for name in ("student", "teacher"):
            module = getattr(self, name)
            with gathered(module, modifier_rank=0):  # rank 0's values are broadcast and re-partitioned on exit
                module.load_state_dict(self.initial[name])
        self.teacher.requires_grad_(False).eval()

    def on_train_start(self) -> None:
        """Record the teacher's sizes: full (``ds_numel``), this rank's shard (``ds_tensor``), module-visible."""
        params = list(self.teacher.parameters())
        self.record["teacher"] = {
            "numel": sum(p.ds_numel for p in params) if hasattr(params[0], "ds_numel") else None,
            "shard_numel": sum(p.ds_tensor.numel() for p in params) if hasattr(params[0], "ds_tensor") else None,
            "local_numel": sum(p.numel() for p in params),
            "full_numel": sum(t.numel() for t in self.initial["teacher"].values()),
        }

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Global batch k of ``DATA`` at step k; rank r takes its rows r, r+W, ... (equal per-rank batches).

        The batch follows ``global_step``, which a checkpoint restores, not the dataloader position, which it does not:
        Lightning restarts a plain (non-stateful) dataloader from its first batch on resume.
        """
        start = self.global_step % (SAMPLES // GLOBAL_BATCH) * GLOBAL_BATCH
        ids = DATA[start : start + GLOBAL_BATCH][self.global_rank :: self.trainer.world_size]
        with torch.no_grad():
            teacher_logp = self.teacher(input_ids=ids).logits.log_softmax(-1)
        out = self.student(input_ids=ids, labels=ids)
        kl = F.kl_div(out.logits.log_softmax(-1), teacher_logp, log_target=True, reduction="none").sum(-1).mean()
        loss = out.loss + kl  # means over equal-size per-rank batches: DDP's grad average = global-batch mean
        global_loss = self.trainer.strategy.reduce(loss.detach().clone(), reduce_op="mean")  # reduce is in place
        self.record["losses"][self.global_step + 1] = global_loss.item()
        return loss

    def on_train_end(self) -> None:
        """Keep the consolidated student (every rank joins the all-gather)."""
        with gathered(self.student):
            self.record["student"] = {k: v.detach().clone() for k, v in self.student.state_dict().items()}

    def train_dataloader(self) -> DataLoader:
        """Only a clock: the batch is a function of ``global_step`` (see ``training_step``)."""
        return DataLoader(range(STEPS))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", action="store_true", help="save a checkpoint every 5 steps")
    parser.add_argument("--resume", type=Path, help="checkpoint to resume from")
    args = parser.parse_args()

    callbacks = [ModelCheckpoint(args.out / "ckpt", every_n_train_steps=5, save_top_k=-1)] if args.checkpoint else []
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, max_steps=STEPS, logger=False, callbacks=callbacks,
        strategy=build_strategy(args.strategy, accelerator="cpu", devices=args.devices),
        enable_checkpointing=args.checkpoint, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=args.out, use_distributed_sampler=False,
    )
    model = ToyDistill()
    trainer.fit(model, ckpt_path=args.resume)
    if trainer.is_global_zero:
        torch.save(model.record.pop("student"), args.out / "student.pt")
        (args.out / "result.json").write_text(json.dumps(model.record))


if __name__ == "__main__":
    main()
