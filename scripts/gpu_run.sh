#!/usr/bin/env bash
# One prepared run on a lent GPU machine (issue 14): install this checkout offline, then
#   1. every CUDA test (pytest -m cuda),
#   2. `rrcm bench` on rrcm-b-imagenet and rrcm-b-cifar,
#   3. the diffusion-denoised-smoothing cost ratio (benchmarks/dds_ratio.py) and the sampler/counting parts,
#   4. pre-training images/s of rrcm-b-cifar in bf16 (`rrcm pretrain` on random CIFAR-10-format data).
# Each step has its own time budget (all of them together 530 s of the 9 minutes the run may take, so it fits
# one 10-minute command); a step that fails or runs out of time never stops the next one; a summary ends the log.
#
#   bash scripts/gpu_run.sh              # on the GPU machine, with its python3 (torch, triton, onnx; no network)
#   bash scripts/gpu_run.sh --rehearse   # the same steps on a CPU with tiny sizes, in under 3 minutes (CI runs it)
#
# Results go to $OUT (a temporary folder when unset), at most 8 files, none in subfolders:
#   gpu_run.log                     everything printed, the summary last
#   pytest-cuda.xml                 JUnit report of step 1
#   <tag>-rrcm-b-imagenet.json      what `rrcm bench --json` wrote; <tag> is gpu-h200 on an H200, rehearsal-cpu
#   <tag>-rrcm-b-cifar.json         in a rehearsal (where the presets are tiny and fmnist-xs)
#   <tag>-dds.json, <tag>-parts.json, <tag>-pretrain.jsonl (the trainer's log.jsonl)
# Python: $PYTHON if set, else python3 (in a rehearsal .venv/bin/python when there is one). The GPU machine
# gets `pip install --no-deps --no-build-isolation --no-index -e .` into that python; a rehearsal runs the same
# install into a throwaway virtual environment that sees the packages of that python, so CI proves the install
# works offline without touching the environment it runs in.
set -uo pipefail
cd "$(dirname "$0")/.."

REHEARSE=0
case "${1:-}" in
    --rehearse) REHEARSE=1 ;;
    "") ;;
    *) echo "usage: bash scripts/gpu_run.sh [--rehearse]" >&2; exit 2 ;;
esac
OUT=${OUT:-$(mktemp -d -t rrcm-gpu-run.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d -t rrcm-gpu-work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

if [ "$REHEARSE" = 1 ]; then
    DEFAULT_PY=python3; [ -x .venv/bin/python ] && DEFAULT_PY=.venv/bin/python
    PY=${PYTHON:-$DEFAULT_PY}
    DEVICE=cpu TOTAL=170
    IMAGENET=(--preset tiny --configs reference,fp32,bf16 --seconds 0.3)
    CIFAR=(--preset fmnist-xs --configs reference,onnxruntime --seconds 0.3)
    DDS=(--tiny --seconds 0.3)
    PRETRAIN=(--preset tiny --patch-size 4 --steps 4 --batch-size 16 --log-every 2 --precision bf16)
    PYTEST=(-q)
    BUDGET_TESTS=75 BUDGET_IMAGENET=30 BUDGET_CIFAR=30
else
    PY=${PYTHON:-python3}
    DEVICE=cuda TOTAL=540
    # Most telling first: a step cut short keeps what it measured (bench rewrites its JSON after each configuration).
    IMAGENET=(--preset rrcm-b-imagenet --configs reference,bf16-compile-graphs,bf16,fp32,bf16-compile,reference-tf32,fp16,bf16-torch-sampler,fp8-compile-graphs --seconds 2)
    CIFAR=(--preset rrcm-b-cifar --batch 4000 --configs reference,bf16-compile-graphs,bf16,fp32 --seconds 2)
    DDS=(--seconds 2)
    PRETRAIN=(--preset rrcm-b-cifar --steps 60 --batch-size 256 --log-every 20 --precision bf16)
    PYTEST=(-v --durations=15)  # the log shows how far a step cut short got, and what takes the time
    BUDGET_TESTS=170 BUDGET_IMAGENET=140 BUDGET_CIFAR=60
fi
export PYTHONUNBUFFERED=1

declare -a SUMMARY=()
DEADLINE=$((SECONDS + TOTAL))

step() {  # step NAME BUDGET COMMAND...: run COMMAND for at most BUDGET seconds (less if the run's time is short)
    local name=$1 budget=$2 start=$SECONDS status rc
    shift 2
    local left=$((DEADLINE - SECONDS))
    ((budget > left)) && budget=$left
    if ((budget < 5)); then
        SUMMARY+=("$(printf '%-16s %-30s' "$name" "not run: no time left")")
        return
    fi
    echo
    echo "=== $name: at most ${budget} s: $(printf '%q ' "$@" | cut -c1-300)"
    timeout -k 10 "$budget" "$@"
    rc=$?
    case $rc in
        0) status=passed ;;
        124 | 137) status="timed out after ${budget} s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    SUMMARY+=("$(printf '%-16s %-30s %4d s' "$name" "$status" $((SECONDS - start)))")
}

# CIFAR-10 python batches of random images (5 x 1000 training, 1000 test) in the folder named by argv[1].
RANDOM_CIFAR=$(cat <<'EOF'
import pickle, sys
from pathlib import Path

import numpy as np

root, rng = Path(sys.argv[1]), np.random.default_rng(0)
root.mkdir(parents=True, exist_ok=True)
for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    batch = {"data": rng.integers(0, 256, (1000, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, 1000).tolist()}
    (root / name).write_bytes(pickle.dumps(batch, protocol=2))
EOF
)

summary() {  # the figures that answer the issue's goals, from the JSON files written
    "$PY" - "$OUT" "$TAG" <<'EOF'
import json, sys
from pathlib import Path

out, tag = Path(sys.argv[1]), sys.argv[2]
def read(name):
    try:
        return json.loads((out / f"{tag}-{name}").read_text())
    except (OSError, ValueError):
        return None
for model in ("rrcm-b-imagenet", "rrcm-b-cifar"):
    result = read(f"{model}.json")
    timed = [c for c in (result or {}).get("configurations", []) if "samples_per_s" in c]
    if timed:
        best = max(timed, key=lambda c: c["samples_per_s"])
        speedup, bf16 = best["speedup"], result["peak_flops"].get("bfloat16")
        frac = bf16 and best["samples_per_s"] * result["model"]["flop_per_sample"] / bf16  # the goal's limit: bf16
        print(f"bench {result['model']['name']}: best {best['name']} {best['samples_per_s']:,.0f} samples/s, "
              f"{'-' if speedup is None else f'{speedup:.2f}'}x the reference, "
              f"{'' if frac is None else f'{100 * frac:.0f}% of the bf16 limit, '}"
              f"{best['s_per_image_at_n']:.3g} s/image at n={result['n']:,}")
dds = read("dds.json")
for name, ratio in (dds or {}).get("ratio_to_rrcm", {}).items():
    print(f"DDS {name}: {ratio:.1f}x rRCM's cost per sample (measured; the paper says 85x)")
try:
    last = json.loads((out / f"{tag}-pretrain.jsonl").read_text().splitlines()[-1])
    print(f"pre-training: {last['images_per_s']:,.1f} images/s in the last log window (up to step {last['step']})")
except (OSError, ValueError, IndexError, KeyError):
    pass
EOF
}

main() {
    echo "rrcm gpu_run: $( ((REHEARSE)) && echo "rehearsal on the CPU" || echo "CUDA run"), $(date -u +%FT%TZ), $(uname -n)"
    echo "python: $PY ($("$PY" --version 2>&1)); results in $OUT"
    if ! ((REHEARSE)); then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv 2>&1
        # The machine has no datasets: the tests that certify Fashion-MNIST test images read the copy the caller
        # carried in .data/fashion-mnist (benchmarks/GPU.md), from where rrcm looks by default.
        fmnist=/usr/share/datasets/fashion-mnist
        if [ ! -e "$fmnist" ] && [ -d .data/fashion-mnist ]; then
            mkdir -p "$(dirname "$fmnist")" && ln -s "$PWD/.data/fashion-mnist" "$fmnist"
        fi
    fi

    if ((REHEARSE)); then  # a throwaway environment that sees $PY's packages, but not its install of rrcm
        "$PY" -m venv --without-pip "$WORK/venv" &&
            "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
                >"$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/base.pth"
        PY=$WORK/venv/bin/python
    fi
    step install 30 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
    TAG=rehearsal-cpu
    ((REHEARSE)) || TAG=gpu-$("$PY" -c 'import torch; print((torch.cuda.get_device_name().lower().replace("nvidia", "").split() or ["unknown"])[0])' 2>/dev/null || echo unknown)
    "$PY" -c 'import rrcm, torch; print(f"rrcm {rrcm.__version__} from {rrcm.__file__}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")'

    step tests "$BUDGET_TESTS" "$PY" -m pytest -m cuda "${PYTEST[@]}" -p no:cacheprovider --junitxml="$OUT/pytest-cuda.xml"
    step bench-imagenet "$BUDGET_IMAGENET" "$PY" -m rrcm bench --device "$DEVICE" "${IMAGENET[@]}" --json "$OUT/$TAG-rrcm-b-imagenet.json"
    step bench-cifar "$BUDGET_CIFAR" "$PY" -m rrcm bench --device "$DEVICE" "${CIFAR[@]}" --json "$OUT/$TAG-rrcm-b-cifar.json"
    step dds 50 "$PY" benchmarks/dds_ratio.py --device "$DEVICE" "${DDS[@]}" --json "$OUT/$TAG-dds.json"
    step parts 15 "$PY" -m pytest benchmarks/test_bench_gpu.py -q -p no:cacheprovider --benchmark-only --benchmark-enable \
        --benchmark-json="$OUT/$TAG-parts.json"
    step pretrain-data 10 "$PY" -c "$RANDOM_CIFAR" "$WORK/cifar"
    step pretrain 55 "$PY" -m rrcm pretrain "${PRETRAIN[@]}" --dataset cifar10 --data-dir "$WORK/cifar" --device "$DEVICE" \
        --save-every 0 --out "$WORK/pretrain"
    cp "$WORK/pretrain/log.jsonl" "$OUT/$TAG-pretrain.jsonl" 2>/dev/null

    echo
    echo "=== summary ($((SECONDS)) s in all; budget $TOTAL s)"
    printf '%s\n' "${SUMMARY[@]}"
    summary
    ! printf '%s\n' "${SUMMARY[@]}" | grep -qv " passed "
}

main 2>&1 | tee "$OUT/gpu_run.log"
exit "${PIPESTATUS[0]}"
