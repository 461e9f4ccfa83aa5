#!/usr/bin/env bash
# Scale-out on SLURM: one job array, each task localizing its shard of the slides.
#
#   sbatch --array=0-15 examples/slurm_localize.sh /data/slides runs/negev/best-loc.pt maps
#
# Shards split the inputs deterministically (sorted by path); every task writes into the same
# output folder, its own run.shard-K-of-N.json, and skips slides already finished, so a failed
# task is simply resubmitted. The same works for extract-patches.
#SBATCH --job-name=histo-wsl-localize
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
set -euo pipefail
SLIDES=${1:?usage: slurm_localize.sh SLIDES MODEL OUT}
MODEL=${2:?model}
OUT=${3:?out}
N=${SLURM_ARRAY_TASK_COUNT:?run with sbatch --array}
K=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0} + 1))
histo-wsl localize "$SLIDES" --model "$MODEL" --out "$OUT" --shard "$K/$N" --skip-errors \
  --workers "${SLURM_CPUS_PER_TASK:-4}" --json > "$OUT.shard-$K-of-$N.summary.json"
