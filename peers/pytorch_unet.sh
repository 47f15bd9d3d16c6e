#!/bin/bash
# A peer: milesial/Pytorch-UNet (commit 21d7850) with its own scripts and defaults (RMSprop 1e-5, batch 1, images
# scaled by 0.5, cross-entropy + Dice, fp32, 10% of the training images held out for its own validation). It has no
# time budget: pytorch_unet_budget.py runs its train.py for SECONDS and saves the model as it stands when they end
# (as its epochs do), and that model predicts DATA_DIR/images/val with its predict.py, as
# PRED_DIR/<stem>.png for score_masks.py. Its model takes 3 channels: it gets RGB copies.
# SCALE (default 0.5, its own default) is its --scale, for training and prediction: the one that fits epochs into
# the budget is chosen on the tuning split (peers/compare.py --search). With compare.py's PEER_DEADLINE the budget
# ends then (the conversion inside it). Prints what it ran as one JSON line.
# usage: pytorch_unet.sh DATA_DIR PRED_DIR SECONDS [SCALE]
# env: PEER_PU_REPO (default /tmp/pytorch-unet: a clone of https://github.com/milesial/Pytorch-UNet at 21d7850),
#      PEER_PU_PYTHON (default /tmp/pu-venv/bin/python: peers/requirements-pytorch-unet.txt over the project's torch)
set -o pipefail
H=$(cd "$(dirname "$0")" && pwd)
[ $# -eq 3 ] || [ $# -eq 4 ] || { echo "usage: $0 DATA_DIR PRED_DIR SECONDS [SCALE]"; exit 2; }
DATA=$(cd "$1" && pwd) || exit 2; mkdir -p "$2" || exit 2; PRED=$(cd "$2" && pwd); BUDGET=$3; SCALE=${4:-0.5}
REPO=${PEER_PU_REPO:-/tmp/pytorch-unet}; PY=${PEER_PU_PYTHON:-/tmp/pu-venv/bin/python}
[ "$(git -C "$REPO" rev-parse --short=7 HEAD 2>/dev/null)" = 21d7850 ] \
  || { echo "peer Pytorch-UNet: $REPO is not a checkout of 21d7850 (see peers/README.md)"; exit 1; }

# its scripts read ./data/imgs, ./data/masks and write ./checkpoints: a fresh folder per run, beside PRED_DIR
W="$(dirname "$PRED")/pytorch-unet-work"; rm -rf "$W" && mkdir -p "$W" || exit 1
cp -r "$REPO"/{train.py,predict.py,evaluate.py,unet,utils} "$H/pytorch_unet_budget.py" "$W/" || exit 1
python -c "import sys; sys.path.insert(0, '$H/..'); from pathlib import Path; from fetch_real_data import plain_unet_layout; plain_unet_layout(Path('$DATA'), Path('$W/data'))" \
  || { echo "peer Pytorch-UNet: conversion failed"; exit 1; }

cd "$W" || exit 1
[ -z "$PEER_DEADLINE" ] || BUDGET=$(python3 -c "import time; print(max(1.0, $PEER_DEADLINE - time.time()))")
WANDB_MODE=disabled "$PY" pytorch_unet_budget.py "$BUDGET" --epochs 1000 --scale "$SCALE" > train.log 2>&1 \
  || { tail -5 train.log; echo "peer Pytorch-UNet: train.py failed"; exit 1; }
epochs=$(ls checkpoints/checkpoint_epoch*.pth 2>/dev/null | wc -l)
steps=$(grep '^{"steps"' train.log | tail -1 | sed 's/[^0-9]//g')
last=$(ls checkpoints/checkpoint_epoch*.pth 2>/dev/null | sort -V | tail -1)  # all its epochs within the budget
[ -f checkpoints/checkpoint_budget_end.pth ] && last=checkpoints/checkpoint_budget_end.pth
if [ -z "$last" ]; then  # the budget ended before its first optimiser step: no model to predict with
  echo "peer Pytorch-UNet: no training step in $BUDGET s: did not finish"
  touch "$PRED/DID_NOT_FINISH"  # compare.py reports the run as such, never as a score of 0
  echo "{\"epochs\": 0, \"steps\": 0, \"scale\": $SCALE, \"precision\": \"fp32\"}"
  exit 0
fi
inputs=(data/val/*); outputs=()
for f in "${inputs[@]}"; do outputs+=("$PRED/$(basename "${f%.*}").png"); done
"$PY" predict.py -m "$last" -i "${inputs[@]}" -o "${outputs[@]}" --scale "$SCALE" > predict.log 2>&1 \
  || { tail -5 predict.log; echo "peer Pytorch-UNet: predict.py failed"; exit 1; }
echo "peer Pytorch-UNet: predicted with $(basename "$last") ($epochs whole epochs, $steps steps in $BUDGET s)"
echo "{\"epochs\": $epochs, \"steps\": ${steps:-0}, \"scale\": $SCALE, \"batch\": 1, \"precision\": \"fp32\"}"
