#!/usr/bin/env bash
# Multi-GPU training with DistributedDataParallel: one process per GPU on one node.
#
#   bash examples/torchrun_train.sh /path/to/glas 4
#
# The batch size is per process (4 GPUs x 8 = 32 images a step, the papers' batch); checkpoints,
# summary.csv and run.json are written by rank 0 only; --resume continues an interrupted run.
set -euo pipefail
DATA=${1:?usage: torchrun_train.sh DATA [GPUS]}
GPUS=${2:-4}
torchrun --standalone --nproc_per_node "$GPUS" -m histo_wsl train-classifier "$DATA" --fold 0 \
  --backbone resnet50 --epochs 1000 --batch-size 8 --lr 0.003 --step-size 250 \
  --out runs/glas-cam-r50-ddp
torchrun --standalone --nproc_per_node "$GPUS" -m histo_wsl train-decoder "$DATA" --fold 0 \
  --classifier runs/glas-cam-r50-ddp/best-cls.pt --epochs 1000 --batch-size 8 --lr 0.1 \
  --step-size 250 --out runs/glas-negev-r50-ddp
