#!/usr/bin/env bash
# Reproduce "One classifier for every sigma" (docs/results.md): from one pre-training (fmnist-xs, as in
# fashion_mnist_results.sh), three per-sigma classifiers (8 epochs each) against one classifier for
# sigma in {0.25, 0.5, 1.0} (8 epochs: a third of their fine-tuning), each certified on the same 500
# Fashion-MNIST test images (N = 10,000, alpha = 0.001, the same noise seeds), compared per sigma.
# The jobs run two at a time, one thread each (OMP_NUM_THREADS=1), as on the 2-core CPU we used.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/sigmas}
RESULTS=${RESULTS:-benchmarks/results/fashion-mnist/sigmas}
rrcm=$(realpath "${RRCM:-.venv/bin/rrcm}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$RESULTS"
SIGMAS="0.25 0.5 1.0"

finetune() {  # the per-sigma recipe of fashion_mnist_results.sh
    $rrcm finetune --init "$RUN/pretrain" --layer-decay 1.0 --epochs 8 --batch-size 256 "$@"
}
certify() {
    $rrcm certify --n0 100 --n 10000 --alpha 0.001 --skip 20 --max 500 --seed 0 "$@"
}

$rrcm pretrain --preset fmnist-xs --steps 1500 --batch-size 256 --out "$RUN/pretrain"
finetune --sigma 0.25 --out "$RUN/sigma-0.25" & first=$!
finetune --sigma 0.5 --out "$RUN/sigma-0.5"; wait $first
finetune --sigma 1.0 --out "$RUN/sigma-1.0" & first=$!
finetune --sigmas 0.25,0.5,1.0 --out "$RUN/sigmas"; wait $first
for s in $SIGMAS; do
    certify --model "$RUN/sigma-$s" --out "$RESULTS/separate-$s.tsv" & first=$!
    certify --model "$RUN/sigmas" --sigma "$s" --out "$RESULTS/shared-$s.tsv"; wait $first
done

# The tables: all three sigmas with their envelopes, then each sigma alone (its "difference" column is
# shared minus separate at that sigma); and the fine-tuning seconds each checkpoint records.
{
    echo "# One classifier for sigma in {0.25, 0.5, 1.0} (shared) against one per sigma (separate)"
    echo
    (cd "$RESULTS" && $rrcm analyze shared-{0.25,0.5,1.0}.tsv --versus separate-{0.25,0.5,1.0}.tsv \
        --labels "one classifier" "one per sigma" --plot shared-vs-separate.png)
    for s in $SIGMAS; do
        echo
        (cd "$RESULTS" && $rrcm analyze "shared-$s.tsv" --versus "separate-$s.tsv")
    done
    echo
    echo "| checkpoint | steps | fine-tuning seconds | noisy accuracy (1,000 test images, one draw) |"
    echo "|---|---|---|---|"
    for name in sigma-0.25 sigma-0.5 sigma-1.0 sigmas; do
        python3 -c "import json, sys; c = json.load(open(sys.argv[1])); print(f\"| {sys.argv[2]} | {c['steps']} | {c['train_seconds']:.0f} | {c['test_accuracy']} |\")" \
            "$RUN/$name/config.json" "$name"
    done
} | tee "$RESULTS/summary.md"
