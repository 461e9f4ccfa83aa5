#!/usr/bin/env bash
# A lab workflow, from slides with slide-level labels to QuPath annotations (no masks needed).
#
#   bash examples/lab_workflow.sh slides.csv runs/lab [annotations/]
#
# slides.csv has the columns path,label[,slide_mpp], e.g.
#   path,label
#   /data/slides/case-001.svs,tumour
#   /data/slides/case-002.svs,normal
# Slides labelled "normal" are fully negative: every patch from them is background, the negative
# evidence NEGEV uses. Other labels are the classes whose regions are localized.
# annotations/ (optional) holds regions drawn in QuPath, one <slide>.geojson per slide: the maps are
# then scored against them.
# TRAIN_OPTS and LOCALIZE_OPTS add options to the training and localize commands (e.g.
# TRAIN_OPTS="--device cuda --batch-size 32"); the last value of a repeated option wins.
set -euo pipefail
SLIDES=${1:?usage: lab_workflow.sh SLIDES_CSV [OUT] [ANNOTATIONS_DIR]}
OUT=${2:-runs/lab}
ANNOTATIONS=${3:-}
read -r -a TRAIN <<< "${TRAIN_OPTS:-}"
read -r -a LOCALIZE <<< "${LOCALIZE_OPTS:-}"

# 1. Patches of 224 px at 1 µm/px (about 10x) where at least half the patch is tissue; the label of
#    each slide goes into manifest.csv. Check <OUT>/patches/<slide>/tissue.png for the tissue found.
histo-wsl extract-patches "$SLIDES" --out "$OUT/patches" --mpp 1.0 --patch-size 224 \
  --min-tissue 0.5 --max-patches 2000 --workers 2 --skip-errors

# 2. Stage 1: a CAM classifier on the patch labels (validation split drawn per slide). Without
#    masks, best-loc.pt is the epoch of best validation accuracy (the closing summary says so).
histo-wsl train-classifier "$OUT/patches" --negative-class normal --out "$OUT/cam" \
  --backbone mobilenetv2 --epochs 30 "${TRAIN[@]}"

# 3. Stage 2: the NEGEV decoder from the classifier's CAM seeds and the normal patches. Without
#    masks, best-loc.pt is the last epoch of the fixed schedule.
histo-wsl train-decoder "$OUT/patches" --classifier "$OUT/cam/best-loc.pt" \
  --negative-class normal --out "$OUT/negev" --epochs 30 "${TRAIN[@]}"

# 4. Whole-slide maps where there is tissue: <OUT>/maps/<slide>/<slide>.geojson and .prob.tif.
histo-wsl localize "$SLIDES" --model "$OUT/negev/best-loc.pt" --out "$OUT/maps" --skip-errors \
  "${LOCALIZE[@]}"

# 5. In QuPath: open a slide, then File > Import objects (or drag and drop) and choose
#    <OUT>/maps/<slide>/<slide>.geojson: the regions appear as annotations of the class, with
#    "Area µm^2" and "Mean probability" measurements. The probability map <slide>.prob.tif is a
#    pyramidal TIFF at the output resolution that QuPath and OpenSlide viewers open over the slide.
#    Regions drawn or corrected in QuPath and exported as GeoJSON are scored here:
if [ -n "$ANNOTATIONS" ]; then
  histo-wsl evaluate --predictions "$OUT/maps" --annotations "$ANNOTATIONS" --out "$OUT/eval"
fi
