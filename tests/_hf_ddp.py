"""``PurifyTrainer`` in 2 processes (``torchrun``, gloo, CPU) for tests/test_hf.py: each rank saves its student.

Run as a script, never imported by pytest: ``python -m torch.distributed.run --nproc_per_node 2 tests/_hf_ddp.py
OUT [adversary]``. With ``adversary`` the student also carries a discriminator head (a student-side purifier).
"""

import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from purify import Adversary, AdversaryConfig, PurifyTrainer

out = sys.argv[1]
cfg = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2)
torch.manual_seed(0)
student, teacher = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
g = torch.Generator().manual_seed(1)
data = []
for _ in range(8):
    ids = torch.randint(0, 20, (8,), generator=g)
    data.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids})
teachers, purifiers = [teacher], []
if "adversary" in sys.argv[2:]:  # a student-side purifier reading the hidden states, and its head
    teachers, purifiers = [teacher, LlamaForCausalLM(cfg)], [Adversary(AdversaryConfig(weight=0.5))]
args = TrainingArguments(out, max_steps=2, per_device_train_batch_size=2, report_to=[], save_strategy="no",
                         use_cpu=True, ddp_backend="gloo", learning_rate=1e-2, seed=0)
trainer = PurifyTrainer(model=student, teachers=teachers, purifiers=purifiers, args=args, train_dataset=data)
trainer.train()
heads = {f"purifiers.{k}": v for k, v in trainer.distiller.purifiers.state_dict().items()}
torch.save({**student.state_dict(), **heads}, os.path.join(out, f"student.{os.environ['RANK']}.pt"))
# leave the process group before exit: a gloo group left to the interpreter's teardown sometimes aborted a rank
# ("terminate called without an active exception", exit -6) after the run had finished
torch.distributed.barrier()
torch.distributed.destroy_process_group()
