#!/usr/bin/env bash
# One device call: the CUDA tests and the GPU benchmarks of recare, from a clean copy of the repository.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine (device tool: carry [".whl"], timeout_s 480)
#   GPU_CHECK_TINY=1 GPU_CHECK_PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh    # dry run on a CPU
#
# Runs the project from source (PYTHONPATH=src, no pip install of recare). Missing packages travel as wheels in
# .whl/ (benchmarks/README.md says which and how) and are installed into /tmp/site without network or deps.
# Each step has its own timeout, taken from what is left of a total budget (GPU_CHECK_BUDGET_S, default 450 s),
# so one hang cannot eat the rest; a step that no longer fits is skipped and says so. Everything lands in
# $OUT (./gpu-check-out when OUT is unset), 8 files at most:
#   summary.json  steps, environment, CUDA test results (from pytest's junit XML), headline figures vs targets
#   logs.txt      every step's output, in order
#   train_eager.json  train_compiled.json  generate.json  generate_compiled.json  careset.json  sync.json
#
# Environment: OUT, GPU_CHECK_BUDGET_S (450), GPU_CHECK_TINY (0; 1 = --tiny models on the CPU, a dry run),
# GPU_CHECK_PYTHON (python3), GPU_CHECK_SITE (/tmp/site), GPU_CHECK_SKIP (names of steps to skip).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/logs.txt
: >"$LOG"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
STEPS=$WORK/steps.tsv
: >"$STEPS"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
RESERVE=20 # seconds kept for the summary
TINY=${GPU_CHECK_TINY:-0}
PY=${GPU_CHECK_PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
SKIP=" ${GPU_CHECK_SKIP:-} "
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false

elapsed() { echo $(($(date +%s) - START)); }
say() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$LOG"; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$STEPS"; }

# step NAME CAP_S MIN_S COMMAND...: run COMMAND with timeout min(CAP_S, budget left); skip below MIN_S.
step() {
    local name=$1 cap=$2 min=$3
    shift 3
    if [[ $SKIP == *" $name "* ]]; then
        say "skip $name (GPU_CHECK_SKIP)"
        record "$name" 0 0 0 skipped
        return
    fi
    local left=$((BUDGET - $(elapsed) - RESERVE))
    local limit=$((cap < left ? cap : left))
    if ((limit < min)); then
        say "skip $name: ${left}s of the budget left, it needs ${min}s"
        record "$name" 0 0 "$limit" skipped
        return
    fi
    say "== $name (timeout ${limit}s): $*"
    local t0 rc status
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    record "$name" "$rc" $(($(date +%s) - t0)) "$limit" "$status"
    say "   $name: $status (exit $rc) after $(($(date +%s) - t0))s"
}

# --- wheels (diffusers, clip-anytorch: not in the GPU machine's image)
if compgen -G ".whl/*.whl" >/dev/null; then
    say "installing $(ls .whl/*.whl | wc -l) wheels into $SITE"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl >>"$LOG" 2>&1; then
        EXTRA=$SITE
    else
        say "wheel install FAILED (see logs.txt)"
    fi
else
    say "no .whl/ folder: using the packages that are installed"
fi
export PYTHONPATH="$ROOT/src:$ROOT/benchmarks${EXTRA:+:$EXTRA}${PYTHONPATH:+:$PYTHONPATH}"

if [[ $TINY == 1 ]]; then
    M=(--tiny --device cpu --threads 1)
    CARESET_IMAGES=20
    GEN=(--images 4 --batch-size 2 --rounds 1)
    TRAIN=(--e2e-steps 2)
else
    M=(--device cuda)
    CARESET_IMAGES=500
    GEN=(--images 16 --batch-size 8 --rounds 2)
    TRAIN=()
fi
has_field() { # has_field MODULE CLASS FIELD: does the dataclass have that field?
    "$PY" -c "import dataclasses, $1 as m; import sys; \
sys.exit(0 if '$3' in {f.name for f in dataclasses.fields(m.$2)} else 1)" 2>>"$LOG"
}

# --- the steps, most important first; the compiled runs last (their compilation takes minutes)
step env 60 5 "$PY" - "$WORK/env.json" <<'EOF'
import json, platform, subprocess, sys
import torch
env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
       "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    env.update(device=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
               memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
for name in ("diffusers", "transformers", "accelerate", "peft", "safetensors", "huggingface_hub", "triton"):
    try:
        env[name] = __import__(name).__version__
    except Exception as err:  # a missing package is what this records
        env[name] = f"MISSING: {type(err).__name__}: {err}"
try:
    import recare.models.tokenizer as tok
    env["clip_bpe"] = str(tok.find_bpe_file())
except Exception as err:
    env["clip_bpe"] = f"MISSING: {err}"
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as err:
    env["nvidia_smi"] = f"unavailable: {err}"
print(json.dumps(env, indent=2))
json.dump(env, open(sys.argv[1], "w"), indent=2)
EOF

step tests 150 30 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$WORK/tests.xml"
step train_eager 120 45 "$PY" benchmarks/bench_train.py "${M[@]}" "${TRAIN[@]}" --compile off \
    --json "$OUT/train_eager.json"
step generate 120 45 "$PY" benchmarks/bench_generate.py "${M[@]}" "${GEN[@]}" --recare-compile off \
    --json "$OUT/generate.json"
step careset 90 30 "$PY" benchmarks/bench_careset.py "${M[@]}" --images "$CARESET_IMAGES" \
    --json "$OUT/careset.json"
step sync 100 40 "$PY" benchmarks/sync_check.py "${M[@]}" --json "$OUT/sync.json"
if has_field recare.train.config TrainConfig compile; then
    step train_compiled 300 90 "$PY" benchmarks/bench_train.py "${M[@]}" "${TRAIN[@]}" --compile auto \
        --json "$OUT/train_compiled.json"
else
    say "skip train_compiled: TrainConfig has no 'compile' field"
    record train_compiled 0 0 0 skipped
fi
if has_field recare.generate.images GenerationConfig compile; then
    step generate_compiled 200 90 "$PY" benchmarks/bench_generate.py "${M[@]}" "${GEN[@]}" --recare-compile auto \
        --json "$OUT/generate_compiled.json"
else
    say "skip generate_compiled: GenerationConfig has no 'compile' field"
    record generate_compiled 0 0 0 skipped
fi

say "summary"
"$PY" benchmarks/gpu_check_summary.py --out "$OUT" --steps "$STEPS" --env "$WORK/env.json" \
    --junit "$WORK/tests.xml" --wall-s "$(elapsed)" 2>&1 | tee -a "$LOG"
rm -rf "$WORK"
say "done in $(elapsed)s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
