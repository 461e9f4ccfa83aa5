#!/usr/bin/env bash
# GlaS reproduction: stage 1 (CAM classifier) + stage 2 (NEGEV decoder) + evaluation on fold 0.
#
#   bash examples/glas_reproduce.sh /path/to/glas cpu runs/glas-cpu   # pretrained MobileNetV2, CPU
#   bash examples/glas_reproduce.sh /path/to/glas gpu runs/glas-gpu   # the papers' protocol (ResNet50)
#
# The GlaS folder is the challenge's release as histo-wsl reads it (train/ images and masks,
# splits/fold-K.csv); the CPU recipe needs torchvision's MobileNetV2 ImageNet weights in
# $TORCH_HOME/hub/checkpoints/, the GPU recipe ResNet50's. Both reuse finished stages when re-run.
# "cpu" runs the same commands as `python benchmarks/glas_negev.py --recipe cpu`, the recipe of the
# shipped default model (models/glas-negev-mobilenetv2).
set -euo pipefail
GLAS=${1:?usage: glas_reproduce.sh GLAS_DIR [cpu|gpu] [OUT]}
RECIPE=${2:-cpu}
OUT=${3:-runs/glas-$RECIPE}

if [ "$RECIPE" = cpu ]; then
  S1="--backbone mobilenetv2 --epochs 24 --batch-size 16 --lr 0.003 --step-size 16 --workers 1 --device cpu"
  S2="--epochs 20 --batch-size 16 --lr 0.1 --step-size 14 --seeds-fg 20 --seeds-bg 20 --seed-map knn --refine knn --workers 1 --device cpu"
else
  S1="--backbone resnet50 --epochs 1000 --batch-size 32 --lr 0.003 --step-size 250 --workers 8 --amp"
  S2="--epochs 1000 --batch-size 32 --lr 0.1 --step-size 250 --seeds-fg 1 --seeds-bg 1 --workers 8 --amp"
fi

[ -f "$OUT/cam/run.json" ] && grep -q '"status": "done"' "$OUT/cam/run.json" ||
  histo-wsl train-classifier "$GLAS" --fold 0 --out "$OUT/cam" --seed 0 $S1
[ -f "$OUT/negev/run.json" ] && grep -q '"status": "done"' "$OUT/negev/run.json" ||
  histo-wsl train-decoder "$GLAS" --fold 0 --classifier "$OUT/cam/best-cls.pt" --out "$OUT/negev" --seed 0 $S2
# CAM vs NEGEV on the 18 validation images of fold 0 (PxAP, Dice, F1+/F1-, report.html)
histo-wsl evaluate --compare "$OUT/cam/best-cls.pt" "$OUT/negev/best-loc.pt" \
  --data "$GLAS" --fold 0 --split val --out "$OUT/eval-val"
