#!/usr/bin/env bash
# rRCM against the Gaussian-augmentation baseline on Fashion-MNIST, trained on one GPU in a few minutes:
# one prepared command for a lent GPU machine (an H200 with torch installed and no network), sized by time.
#
#   bash scripts/gpu_fashion_mnist.sh                 the real run: CUDA, at most 9 minutes of wall time
#   bash scripts/gpu_fashion_mnist.sh --preset fmnist-s --minutes 4     a second, shorter call
#   bash scripts/gpu_fashion_mnist.sh --rehearse      every step on the CPU at tiny budgets, in under 3 minutes (CI)
# Options: --preset NAME (fmnist-xs), --minutes M (9, or 2.5 with --rehearse, where 5 is enough for the stricter
# matching of step 3 as well; the whole script's wall time), --data-dir DIR
# (default .data/fashion-mnist if present, else /usr/share/datasets/fashion-mnist), --rehearse.
# Environment: OUT (where the results go; a new temporary folder if unset), WORK (run folders; temporary),
# PYTHON (default .venv/bin/python if present, else python3).
#
# Steps, each time-boxed (timeout), its output appended to $OUT/run.log as it goes; a failing step is
# recorded in summary.json and never stops the others:
#   0. rrcm importable, or installed offline: pip install --no-deps --no-build-isolation --no-index -e .
#   1. pre-train the preset for a fixed time (--time-budget: a few timed steps fix the step count, so the
#      LR, EMA and Karras-grid schedules run their whole course), batch 4096, lr 2e-3 (the CPU recipe's
#      5e-4 at batch 256, scaled by sqrt(4096/256)), the paper's recipe otherwise;
#   2. fine-tune an rRCM classifier for sigma 0.25, 0.5, 1.0 from it (batch 1024, lr 1e-3, no layer decay:
#      docs/results.md's recipe at a GPU batch), each for T_f seconds;
#   3. the baseline (--from-scratch, the same fine-tuning recipe) for each sigma, matched in GPU time: the
#      three baselines together get the pre-training's plus the three fine-tunings' measured training
#      seconds, i.e. baseline(s) = T_pre / 3 + T_f(s) (one pre-training serves every sigma, as a user pays
#      it). The stricter matching, baseline(s) = T_pre + T_f(s), runs afterwards only if the time left
#      holds it (it needs 2 T_pre more than the rule, about 5 minutes here): summary.json says which;
#   4. certify 500 test images (every 20th) at n0 = 100, N = 10,000, alpha = 0.001 with each classifier on
#      the GPU (the six in parallel processes), then `rrcm analyze ... --versus ...` (versus.md), the plot
#      (certified-accuracy.png) and summary.json (budgets, steps, epochs, images/s, noisy accuracy,
#      certified accuracy per radius, ACR, every step's exit status and wall time).
# Budget arithmetic (--minutes 9 = 540 s; the steps' deadline is 515 s): setup ~15 s; pre-training
# T_pre = 150 s (TOTAL * 150 / 540) plus ~10 s of start-up (import, CUDA, data; measured on the way as S);
# certification reserve 60 s (6 x 500 images x 10,100 samples = 30M forwards of a 0.15M-parameter model:
# seconds of GPU time, the rest start-up) and 25 s for analysis and packing. T_f then comes from the time
# left after pre-training: 3 (T_f + S) + 3 (T_pre / 3 + T_f + S) <= left, i.e.
# T_f = (left - 6 S - T_pre) / 6, about 10 s (at most T_pre / 3). The throughput (images/s) is measured by each command,
# not assumed here; the steps and epochs it bought are in summary.json.
# $OUT (the device tool brings back at most 8 files, 16 MiB each): run.log, summary.json, versus.md,
# certified-accuracy.png, results.tar.gz (every run's config.json and log.jsonl, the TSVs and their
# sidecars, and the weights that fit in 15 MiB).
# On the device machine: copy /usr/share/datasets/fashion-mnist to .data/fashion-mnist (ignored by git via
# .git/info/exclude) and carry it: run(command="bash scripts/gpu_fashion_mnist.sh", carry=[".data/fashion-mnist"]).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

REHEARSE=0 PRESET=fmnist-xs MINUTES="" DATA_DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rehearse) REHEARSE=1 ;;
        --preset) PRESET=${2:?--preset needs a name}; shift ;;
        --minutes) MINUTES=${2:?--minutes needs a number}; shift ;;
        --data-dir) DATA_DIR=${2:?--data-dir needs a folder}; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_fashion_mnist.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$DATA_DIR" ]; then
    DATA_DIR=/usr/share/datasets/fashion-mnist
    [ -d .data/fashion-mnist ] && DATA_DIR=$ROOT/.data/fashion-mnist
fi
PY=${PYTHON:-}
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=$ROOT/.venv/bin/python; } || PY=python3
OUT=${OUT:-$(mktemp -d -t rrcm-gpu-out.XXXXXX)}
WORK=${WORK:-$(mktemp -d -t rrcm-gpu-work.XXXXXX)}
mkdir -p "$OUT" "$WORK/cert"
: > "$OUT/run.log"
: > "$WORK/status.tsv"
SIGMAS="0.25 0.5 1.0"
PRE_LR=2e-3 FT_LR=1e-3
if [ "$REHEARSE" = 1 ]; then  # the same steps on 2 CPU cores: small batches, seconds of training, 10 images
    DEV=cpu TOTAL=$(awk -v m="${MINUTES:-2.5}" 'BEGIN { print int(m * 60) }') T_PRE=6 PRE_BATCH=64 FT_BATCH=64 EVAL=100 CERT_RESERVE=40 FINAL_RESERVE=20 T_F_MIN=2
    CERT=(--n0 20 --n 200 --skip 1000 --max 10 --batch 220)
    export OMP_NUM_THREADS=1
else
    DEV=cuda PRE_BATCH=4096 FT_BATCH=1024 EVAL=1000 CERT_RESERVE=60 FINAL_RESERVE=25 T_F_MIN=5
    TOTAL=$(awk -v m="${MINUTES:-9}" 'BEGIN { print int(m * 60) - 25 }')  # 25 s for a last kill (15 s) and the summary
    T_PRE=$(awk -v t="$TOTAL" 'BEGIN { print int((t + 25) * 150 / 540) }')
    CERT=(--n0 100 --n 10000 --skip 20 --max 500 --batch 10000)
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15 PRESET REHEARSE DEV TOTAL
LINEBUF=""
command -v stdbuf >/dev/null && LINEBUF="stdbuf -oL"

say() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/run.log"; }

record() {  # NAME EXIT WALL_SECONDS BUDGET NOTE: one line of status.tsv, read by summarize
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$WORK/status.tsv"
    say "$1: exit $2 after $3 s${5:+ ($5)}"
}

run_step() {  # NAME LIMIT BUDGET CMD...: CMD time-boxed to LIMIT s (and to the deadline), output into run.log
    local name=$1 limit=$2 budget=$3 left=$((TOTAL - SECONDS)) t0=$SECONDS rc shown
    shift 3
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        record "$name" skipped 0 "$budget" "out of time"
        return 1
    fi
    shown="$*"
    say "$name: start (time limit ${limit} s): ${shown#"$PY" -m }"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | $LINEBUF tr '\r' '\n' | sed -u "s/^/[$name] /" >> "$OUT/run.log"
    rc=${PIPESTATUS[0]}
    record "$name" "$rc" $((SECONDS - t0)) "$budget" "$([ "$rc" = 124 ] && echo "timed out")"
    return "$rc"
}

config_value() {  # RUN KEY: a value of RUN's config.json, empty if none
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], ""))' "$WORK/$1/config.json" "$2" 2>/dev/null
}

calc() { awk "BEGIN { print $* }"; }

summarize() {  # summary.json and results.tar.gz from what the steps left in $WORK
    "$PY" - "$WORK" "$OUT" <<'PYEOF' || say "summary: failed"
import json, os, sys, tarfile
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
env = os.environ
sigmas = ["0.25", "0.5", "1.0"]
steps = {}
for line in (work / "status.tsv").read_text().splitlines():
    name, code, wall, budget, note = line.split("\t")
    steps[name] = {"exit": int(code) if code.lstrip("-").isdigit() else code, "wall_seconds": int(wall),
                   **({"time_budget": float(budget)} if budget else {}), **({"note": note} if note else {})}
failures = [f"{name}: {s.get('note') or 'exit ' + str(s['exit'])}" for name, s in steps.items() if s["exit"] != 0]
RUN_KEYS = ("step", "steps", "epochs", "train_seconds", "images_per_s", "time_budget", "seconds_per_step",
            "test_accuracy", "test_images")


def run(name: str) -> dict:
    entry = dict(steps.get(name, {"exit": "not run"}))
    config = work / name / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        entry.update({k: c[k] for k in RUN_KEYS if k in c})
    log = work / name / "log.jsonl"
    if log.is_file():
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        losses = [r for r in lines if "loss" in r]
        if losses:
            entry["final_loss"] = losses[-1]["loss"]
    return entry


runs = {name: run(name) for name in ["pretrain"] + [f"{m}-{s}" for m in ("rrcm", "base", "strict") for s in sigmas]
        if name == "pretrain" or name in steps}
certified = {}
try:
    from rrcm.engine.analyze import DEFAULT_RADII, read_results
    for tsv in sorted((work / "cert").glob("*.tsv")):
        result = read_results(tsv)
        certified[tsv.stem] = {
            **steps.get(f"cert-{tsv.stem}", {}), "images": len(result.idx), "acr": round(result.acr(), 4),
            "certified_accuracy": {f"{r:g}": round(float(a), 4) for r, a in zip(DEFAULT_RADII, result.accuracy(DEFAULT_RADII))}}
except Exception as e:  # a half-written TSV must not cost the rest of the summary
    failures.append(f"reading the certificates: {type(e).__name__}: {e}")
used = {name: runs[name].get("train_seconds") for name in runs}
summary = {
    "preset": env["PRESET"], "rehearsal": env["REHEARSE"] == "1", "device": env["DEVICE_NAME"], "torch": env["TORCH_VERSION"],
    "wall_seconds": int(env["ELAPSED"]), "wall_limit_seconds": int(env["TOTAL"]),
    "budgets": {
        "rule": "the three baselines together get the measured training seconds of the pre-training and the three rRCM "
                "fine-tunings: baseline(sigma) = T_pre / 3 + T_f(sigma)",
        "pretrain": {"budget": runs["pretrain"].get("time_budget"), "used": used["pretrain"]},
        **{f"{m}-{s}": {"budget": runs.get(f"{m}-{s}", {}).get("time_budget"), "used": used.get(f"{m}-{s}")}
           for m in ("rrcm", "base", "strict") for s in sigmas if f"{m}-{s}" in runs},
        "strict": env.get("STRICT_NOTE", ""),
    },
    "recipe": {"pretrain": {"batch_size": int(env["PRE_BATCH"]), "lr": float(env["PRE_LR"])},
               "finetune": {"batch_size": int(env["FT_BATCH"]), "lr": float(env["FT_LR"]), "layer_decay": 1.0},
               "certify": env["CERT_ARGS"]},
    "runs": runs, "certified": certified, "failures": failures,
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

# Everything small of every run, the certificates, and the weights while the archive stays under 15 MiB.
limit, left_out = 15 * 2**20, []
with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
    for path in sorted(work.glob("*/config.json")) + sorted(work.glob("*/log.jsonl")) + sorted((work / "cert").glob("*")):
        tar.add(path, arcname=str(path.relative_to(work)))
    for name in [f"rrcm-{s}" for s in sigmas] + ["pretrain"] + [f"base-{s}" for s in sigmas] + [f"strict-{s}" for s in sigmas]:
        weights = work / name / "model.safetensors"
        if weights.is_file():
            tar.fileobj.flush()
            if (out / "results.tar.gz").stat().st_size + weights.stat().st_size < limit:
                tar.add(weights, arcname=f"{name}/model.safetensors")
            else:
                left_out.append(name)
if left_out:
    summary["weights_left_out"] = left_out
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
PYEOF
}

present() {  # METHOD: the certificate files of METHOD's classifiers, one per sigma that has one
    local s
    for s in $SIGMAS; do
        [ -s "$WORK/cert/$1-$s.tsv" ] && echo "$1-$s.tsv"
    done
}

analyze() {  # NAME FILES... [--versus FILES...]: `rrcm analyze` in the certificates' folder; its table into versus.md
    local name=$1
    shift
    (cd "$WORK/cert" && run_step "$name" 60 "" "$PY" -m rrcm analyze "$@")
    grep "^\[$name\] " "$OUT/run.log" | sed "s/^\[$name\] //" >> "$OUT/versus.md"
}

finish() {  # the analysis, summary.json and the archive; the table printed last; exit 1 if a step failed
    local rrcm base strict
    rrcm=$(present rrcm) base=$(present base) strict=$(present strict)
    : > "$OUT/versus.md"
    if [ -n "$rrcm" ] && [ -n "$base" ]; then
        analyze analyze $rrcm --versus $base --plot "$OUT/certified-accuracy.png"
    elif [ -n "$rrcm$base" ]; then
        analyze analyze $rrcm $base --plot "$OUT/certified-accuracy.png"
    else
        record analyze skipped 0 "" "no certificates"
    fi
    if [ -n "$rrcm" ] && [ -n "$strict" ]; then
        printf '\nStricter matching, each baseline with the whole pre-training time:\n' >> "$OUT/versus.md"
        analyze analyze-strict $rrcm --versus $strict
    fi
    ELAPSED=$SECONDS summarize
    cat "$OUT/versus.md"
    say "done in ${SECONDS} s: $OUT holds $(cd "$OUT" && echo *)"
    if awk -F'\t' '$2 != 0 { bad = 1 } END { exit !bad }' "$WORK/status.tsv"; then
        say "failed steps: $(awk -F'\t' '$2 != 0 { printf "%s ", $1 }' "$WORK/status.tsv")(see summary.json and run.log)"
        exit 1
    fi
}

say "gpu_fashion_mnist.sh: preset $PRESET on $DEV, at most $TOTAL s; data $DATA_DIR; out $OUT; work $WORK"

# 0. rrcm importable (installed offline if not)
if ! "$PY" -c "import rrcm.train" 2>/dev/null; then
    run_step install 120 "" "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT"
fi
read -r TORCH_VERSION DEVICE_NAME < <("$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo "unknown unknown")
export TORCH_VERSION DEVICE_NAME PRE_BATCH FT_BATCH PRE_LR FT_LR CERT_ARGS="${CERT[*]}"
COMMON=(--data-dir "$DATA_DIR" --device "$DEV" --seed 0)
FINETUNE=(--batch-size "$FT_BATCH" --lr "$FT_LR" --layer-decay 1.0 --eval-images "$EVAL" "${COMMON[@]}")

# 1. pre-training, for T_PRE seconds of training
t0=$SECONDS
run_step pretrain $((T_PRE + 120)) "$T_PRE" "$PY" -m rrcm pretrain --preset "$PRESET" --time-budget "$T_PRE" \
    --batch-size "$PRE_BATCH" --lr "$PRE_LR" --log-every 50 --out "$WORK/pretrain" "${COMMON[@]}"
PRE_USED=$(config_value pretrain train_seconds)
PRE_USED=${PRE_USED:-$T_PRE}  # a failed pre-training still sizes the baselines by its budget
START_UP=$(calc "$SECONDS - $t0 - $PRE_USED")  # per command: imports, CUDA, data, saving
START_UP=$(calc "($START_UP < 3) ? 3 : $START_UP")
LEFT=$((TOTAL - SECONDS - CERT_RESERVE - FINAL_RESERVE))
T_F=$(calc "int(($LEFT - 6 * $START_UP - $PRE_USED) / 6)")
T_F_MAX=$(calc "int($PRE_USED / 3)")  # at most each sigma's share of the pre-training; time beyond goes to step 3's strict runs
T_F=$(calc "($T_F > $T_F_MAX) ? $T_F_MAX : $T_F")
T_F=$(calc "($T_F < $T_F_MIN) ? $T_F_MIN : $T_F")
say "pre-training used ${PRE_USED} s, start-up ${START_UP} s a command: ${T_F} s for each rRCM fine-tuning"

# 2. rRCM fine-tuning from the pre-trained encoder
for s in $SIGMAS; do
    if [ -f "$WORK/pretrain/config.json" ]; then
        run_step "rrcm-$s" $((T_F + 90)) "$T_F" "$PY" -m rrcm finetune --init "$WORK/pretrain" --sigma "$s" \
            --time-budget "$T_F" --out "$WORK/rrcm-$s" "${FINETUNE[@]}"
    else
        record "rrcm-$s" skipped 0 "$T_F" "no pre-trained encoder"
    fi
done

# 3. baselines matched in training time: T_pre / 3 + T_f(sigma)
for s in $SIGMAS; do
    used=$(config_value "rrcm-$s" train_seconds)
    budget=$(calc "$PRE_USED / 3 + ${used:-$T_F}")
    run_step "base-$s" "$(calc "int($budget + 90)")" "$budget" "$PY" -m rrcm finetune --from-scratch --preset "$PRESET" \
        --sigma "$s" --time-budget "$budget" --out "$WORK/base-$s" "${FINETUNE[@]}"
done
ELAPSED=$SECONDS summarize

# 4. certification of every classifier, in parallel processes
certify_all() {  # NAME...: each finished classifier certified, all at once, within the time left
    local name limit=$((TOTAL - SECONDS - FINAL_RESERVE))
    for name in "$@"; do
        if [ -f "$WORK/$name/model.safetensors" ]; then
            OMP_NUM_THREADS=1 run_step "cert-$name" "$limit" "" "$PY" -m rrcm certify --model "$WORK/$name" \
                --alpha 0.001 --seed 0 --precision fp32 --backend torch --data-dir "$DATA_DIR" --device "$DEV" "${CERT[@]}" \
                --out "$WORK/cert/$name.tsv" &
        else
            record "cert-$name" skipped 0 "" "no classifier"
        fi
    done
    wait
}
t0=$SECONDS
certify_all rrcm-0.25 rrcm-0.5 rrcm-1.0 base-0.25 base-0.5 base-1.0
CERT_WALL=$((SECONDS - t0))

# The stricter matching (each baseline gets the whole pre-training) if the time left holds it.
NEED=$(calc "int(3 * ($PRE_USED + $T_F + $START_UP) + $CERT_WALL + $FINAL_RESERVE)")
if [ "$NEED" -le $((TOTAL - SECONDS)) ]; then
    STRICT_NOTE="run: baseline(sigma) = T_pre + T_f(sigma)"
    for s in $SIGMAS; do
        used=$(config_value "rrcm-$s" train_seconds)
        budget=$(calc "$PRE_USED + ${used:-$T_F}")
        run_step "strict-$s" "$(calc "int($budget + 90)")" "$budget" "$PY" -m rrcm finetune --from-scratch \
            --preset "$PRESET" --sigma "$s" --time-budget "$budget" --out "$WORK/strict-$s" "${FINETUNE[@]}"
    done
    certify_all strict-0.25 strict-0.5 strict-1.0
else
    STRICT_NOTE="not run: baseline(sigma) = T_pre + T_f(sigma) needs about $NEED s more, $((TOTAL - SECONDS)) s were left"
fi
say "strict matching: $STRICT_NOTE"
export STRICT_NOTE
finish
