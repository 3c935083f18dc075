#!/usr/bin/env bash
# Launch `purify train` with torchrun: one process per GPU, on one node or several.
#
# Usage:
#   scripts/launch_torchrun.sh RECIPE [key=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: the GPUs `nvidia-smi -L` lists, else 1)
#   NNODES          nodes taking part (default 1)
#   NODE_RANK       this node's rank, 0 .. NNODES-1 (default 0)
#   MASTER_ADDR     address of the node with NODE_RANK 0 (default 127.0.0.1)
#   MASTER_PORT     a free TCP port on it (default 29500)
#   PYTHON          the interpreter with purify installed (default: python)
#
# Runs `$PYTHON -m torch.distributed.run --nnodes ... --nproc-per-node ... -m purify train RECIPE
# trainer.devices=$NPROC_PER_NODE trainer.num_nodes=$NNODES [key=value ...]`. Lightning reads the torchrun
# environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT); the recipe's `strategy` (ddp, deepspeed_stage_2/3)
# does the rest. Overrides given here come after the two set by the script, so they win.
# Multi-node: run the same command on every node with the same MASTER_ADDR, MASTER_PORT and NNODES, and
# NODE_RANK=0 .. NNODES-1 (or use scripts/launch_slurm.sbatch on a SLURM cluster).
#
# Example:
#   NPROC_PER_NODE=8 scripts/launch_torchrun.sh recipes/real/kd-smollm2-135m_from_smollm2-1.7b.yaml trainer.max_steps=100
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit $(( $# < 1 ? 2 : 0 ))
fi
recipe=$1
shift

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
nproc=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
nnodes=${NNODES:-1}

exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes "$nnodes" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$nproc" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m purify train "$recipe" "trainer.devices=$nproc" "trainer.num_nodes=$nnodes" "$@"
