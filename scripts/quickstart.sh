#!/usr/bin/env bash
# Install rrcm and everything its tests use (scripts/install.sh: system packages, then .venv with CPU torch),
# certify a few test images with the bundled classifier (rrcm demo), then train and certify a small rRCM on
# Fashion-MNIST end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/quickstart}

bash scripts/install.sh
rrcm=.venv/bin/rrcm

$rrcm demo
$rrcm pretrain --preset tiny --steps 600 --batch-size 128 --out "$RUN/pretrain"
$rrcm finetune --init "$RUN/pretrain" --sigma 0.25 --steps 600 --batch-size 128 --out "$RUN/sigma-0.25"
$rrcm certify --model "$RUN/sigma-0.25" --n0 100 --n 2000 --alpha 0.001 --skip 100 --max 50 --out "$RUN/certify-0.25.tsv"
$rrcm analyze "$RUN/certify-0.25.tsv" --radii 0 0.1 0.25 0.5
