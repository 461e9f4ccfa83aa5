#!/usr/bin/env bash
# From one label per slide to pixel maps: multiple-instance learning in front of NEGEV.
#
#   bash examples/mil_chain.sh slides.csv runs/mil-chain
#
# slides.csv has the columns path,label[,slide_mpp], one label per slide, e.g.
#   path,label
#   /data/slides/case-001.svs,tumour
#   /data/slides/case-002.svs,normal
# Slides labelled "normal" are fully negative (every patch is background). In a "tumour" slide only
# some patches are tumour: train-mil finds which, from the slide labels alone, so that stage 1 is
# not trained on the stroma of tumour slides labelled "tumour" (what --label alone stamps on every
# patch). At least two normal slides are needed (one validates the instance threshold).
# TRAIN_OPTS adds options to the two training commands (e.g. TRAIN_OPTS="--device cuda").
set -euo pipefail
SLIDES=${1:?usage: mil_chain.sh SLIDES_CSV [OUT]}
OUT=${2:-runs/mil-chain}
read -r -a TRAIN <<< "${TRAIN_OPTS:-}"

# 1. Patches of 224 px at 1 µm/px; each slide's label from the CSV goes into manifest.csv.
histo-wsl extract-patches "$SLIDES" --out "$OUT/patches" --mpp 1.0 --patch-size 224 \
  --min-tissue 0.5 --max-patches 2000 --workers 2

# 2. MIL on the slide labels: frozen ImageNet MobileNetV2 features per patch, a DSMIL network
#    (torchmil; pip install 'histo-wsl[mil]'). Writes instances.csv (a score per patch), slides.csv
#    (a score per slide, with the validation slide AUC in run.json) and pseudo-labels.csv: every
#    patch of a normal slide "normal", the patches of tumour slides that score at or above t_pos
#    "tumour" (t_pos: at most 2 % of the normal validation slides' patches reach it), the rest
#    left out.
histo-wsl train-mil "$OUT/patches" --negative-class normal --out "$OUT/mil" \
  --backbone mobilenetv2 --epochs 40 --negative-fpr 0.02

# 3. Stage 1: the CAM classifier on the pseudo labels (same slide split as train-mil). The CSV's
#    mpp column carries the patches' µm/px into the card, so localize reads slides at step 1's.
histo-wsl train-classifier "$OUT/mil/pseudo-labels.csv" --negative-class normal \
  --out "$OUT/cam" --backbone mobilenetv2 --epochs 30 "${TRAIN[@]}"

# 4. Stage 2: the NEGEV decoder from the classifier's CAM seeds and the normal patches.
histo-wsl train-decoder "$OUT/mil/pseudo-labels.csv" --classifier "$OUT/cam/best-loc.pt" \
  --negative-class normal --out "$OUT/negev" --epochs 30 "${TRAIN[@]}"

# 5. Whole-slide maps where there is tissue: <OUT>/maps/<slide>/<slide>.geojson and .prob.tif;
#    <slide>.json also carries the MIL model's slide score (mil.score, mil.predicted_class).
histo-wsl localize "$SLIDES" --model "$OUT/negev/best-loc.pt" --mil "$OUT/mil/mil.pt" \
  --out "$OUT/maps" --skip-errors
