#!/usr/bin/env bash
# Reproduce "Several sigmas: cascaded smoothing" (docs/several-sigmas.md): the cascade over sigma 1.0, 0.5,
# 0.25 (p0 = 0.5) on 500 Fashion-MNIST test images (every 20th), N = 10,000 per stage, alpha = 0.001:
# - with the bundled per-sigma classifiers, against their single-sigma runs (benchmarks/results/fashion-mnist/
#   rrcm-*.tsv, each at the full alpha, made by fashion_mnist_results.sh);
# - with one classifier for every sigma, fine-tuned from the bundled sigma = 0.5 classifier's encoder for 400
#   steps, with and without the diversity term (--diversity 3: votes spread where noisy copies miss the label),
#   the diverse one also at each single sigma, and its cascade at p0 = 0.7.
# Jobs run two at a time, one thread each, as on the 2-core CPU we used: about 3 hours there.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/cascade}
RESULTS=${RESULTS:-benchmarks/results/fashion-mnist/cascade}
rrcm=$(realpath "${RRCM:-.venv/bin/rrcm}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$RESULTS"

finetune() {
    $rrcm finetune --init rrcm/weights/fashion-mnist/sigma-0.5 --sigmas 0.25,0.5,1.0 --steps 400 --seed 0 \
        --eval-images 1000 "$@"
}
certify() {
    $rrcm certify --n0 100 --n 10000 --alpha 0.001 --skip 20 --max 500 --seed 0 --precision fp32 "$@"
}

finetune --diversity 0 --out "$RUN/shared" & first=$!
finetune --diversity 3 --out "$RUN/diverse"; wait $first
certify --model fashion-mnist --sigma 0.25,0.5,1 --out "$RESULTS/bundled.tsv" & first=$!
certify --model "$RUN/shared" --compile --sigma 0.25,0.5,1 --out "$RESULTS/shared.tsv"; wait $first
certify --model "$RUN/diverse" --compile --sigma 0.25,0.5,1 --out "$RESULTS/diverse.tsv" & first=$!
certify --model "$RUN/diverse" --compile --sigma 1.0 --out "$RESULTS/diverse-1.0.tsv"; wait $first
certify --model "$RUN/diverse" --compile --sigma 0.25 --out "$RESULTS/diverse-0.25.tsv" & first=$!
certify --model "$RUN/diverse" --compile --sigma 0.5 --out "$RESULTS/diverse-0.5.tsv"; wait $first
certify --model "$RUN/diverse" --compile --sigma 0.25,0.5,1 --p0 0.7 --out "$RESULTS/diverse-p0.7.tsv"

# The tables: each cascade against its classifiers' single sigmas and their envelope ("difference": the
# cascade minus the best single sigma at each radius), then the two one-for-every-sigma cascades side by side.
radii="0 0.25 0.5 0.75 1 1.5 2 2.5"
{
    echo "# Cascaded smoothing over sigma 1.0 > 0.5 > 0.25 (p0 = 0.5)"
    echo
    echo "## Bundled per-sigma classifiers: the cascade against each single sigma"
    (cd "$RESULTS" && $rrcm analyze bundled.tsv --versus ../rrcm-{0.25,0.5,1.0}.tsv --radii $radii \
        --labels "bundled rRCM" "bundled rRCM" --plot bundled.png)
    echo
    echo "## One classifier for every sigma, with the diversity term: the cascade against each single sigma"
    (cd "$RESULTS" && $rrcm analyze diverse.tsv --versus diverse-{0.25,0.5,1.0}.tsv --radii $radii)
    echo
    echo "## The diversity term: cascade with it (diverse) against without (shared), same budget"
    (cd "$RESULTS" && $rrcm analyze diverse.tsv --versus shared.tsv --radii $radii)
    echo
    echo "## A stricter threshold: p0 = 0.7 against 0.5, the diverse classifier"
    (cd "$RESULTS" && $rrcm analyze diverse-p0.7.tsv --versus diverse.tsv --radii $radii)
} | tee "$RESULTS/summary.md"
