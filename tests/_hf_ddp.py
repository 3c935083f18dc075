"""``PurifyTrainer`` in 2 processes (``torchrun``, gloo, CPU) for tests/test_hf.py: each rank saves its student.

Run as a script, never imported by pytest: ``python -m torch.distributed.run --nproc_per_node N tests/_hf_ddp.py
OUT [adversary|anchor]``. With ``adversary`` the student also carries a discriminator head (a student-side purifier);
with ``anchor`` it trains 3 SGD steps on 4 rows with an anchor, one global batch of 4 whatever N (so N = 1 and N = 2
must land on the same weights).
"""

import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from purify import Adversary, AdversaryConfig, Anchor, AnchorConfig, PurifyTrainer

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
world = int(os.environ.get("WORLD_SIZE", 1))
steps = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2}
if "anchor" in sys.argv[2:]:  # every step is the whole data (4 rows), so the order the sampler picks cannot matter
    data, purifiers = data[:4], [Anchor(AnchorConfig(weight=1.0))]
    steps = {"max_steps": 3, "per_device_train_batch_size": 4 // world, "learning_rate": 0.5, "optim": "sgd",
             "lr_scheduler_type": "constant", "max_grad_norm": 0}
args = TrainingArguments(out, report_to=[], save_strategy="no", use_cpu=True,
                         ddp_backend="gloo" if world > 1 else None, seed=0, **steps)
trainer = PurifyTrainer(model=student, teachers=teachers, purifiers=purifiers, args=args, train_dataset=data)
trainer.train()
heads = {f"purifiers.{k}": v for k, v in trainer.distiller.purifiers.state_dict().items()}
torch.save({**student.state_dict(), **heads}, os.path.join(out, f"student.{os.environ['RANK']}.pt"))
# leave the process group before exit: a gloo group left to the interpreter's teardown sometimes aborted a rank
# ("terminate called without an active exception", exit -6) after the run had finished
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
