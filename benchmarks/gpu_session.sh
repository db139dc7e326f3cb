#!/usr/bin/env bash
# Everything a GPU session measures, in one call on the device machine (its Python has torch,
# triton, torchvision, tabulate, setuptools; nothing can be downloaded there):
#
#   device run:  OUT=$OUT bash benchmarks/gpu_session.sh [quick | STEP...]
#
# 1. installs this checkout without dependencies or network (editable, so the `sparse` backend
#    entry point exists), 2. runs the gpu-marked tests, 3. writes the kernel table and the ViT
#    tables (one file per dtype) and the training-step table as benchmarks/results-style markdown under $OUT.
# `quick` runs the tests and the kernel table only. STEPs (any of tests, kernels, vit-bf16,
# vit-fp32, train-step) run those alone: one device call is limited to 10 minutes, so a session
# splits the work, e.g. `quick`, then `vit-bf16`, `vit-fp32 train-step`. Results are copied back by the device tool;
# commit them under benchmarks/results/. Every step runs even when one before it failed (a
# failed test should not cost the session its tables); the exit status is that of the first
# step that failed (pytest's, or a benchmark's: 1 for a wrong or a failed row of ours).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The editable install needs setuptools >= 64 with bdist_wheel (setuptools >= 70, or the wheel
# package) on the device. Fallback: build the wheel on the dev machine (`echo /.whl/ >>
# .git/info/exclude; pip wheel --no-deps -w .whl .`) and name .whl in the run's carry.
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1; then
    ls .whl/sparse_compile-*.whl > /dev/null 2>&1 || { cat "$OUT/install.log"; echo "install failed, no .whl to fall back on"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/sparse_compile-*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -c "import importlib.metadata as m; assert 'sparse' in [e.name for e in m.entry_points(group='torch_dynamo_backends')], 'backend not registered'" || exit 1

gpu=$(python3 -c "import torch; n = torch.cuda.get_device_name(); print(next((w for w in n.split() if w[:1] in 'AHBL' and w[1:2].isdigit()), 'gpu').lower())")
echo "GPU: $gpu"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/$gpu-nvidia-smi.txt"

status=0
step() {  # runs "$@" (a pipeline's status is its first failing command's: pipefail), keeps the first failure
    "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "FAILED (exit $rc): ${STEP_NAME:-$1}" >&2
        [ "$status" -eq 0 ] && status=$rc
    fi
}
run_pytest() { python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/$gpu-pytest-gpu.txt"; }
run_bench() { local name=$1 lines=$2; shift 2; python3 -m "benchmarks.$name" "$@" 2>&1 | tail -"$lines"; }
plot() {  # --plot FILE where matplotlib exists (an optional extra: the device may not have it)
    python3 -c "import matplotlib" 2> /dev/null && echo "--plot $OUT/$1"
}

ALL_STEPS="tests kernels vit-bf16 vit-fp32 train-step"
case "${1:-}" in
    "") steps=$ALL_STEPS ;;
    quick) steps="tests kernels" ;;
    *) steps="$*" ;;
esac
for wanted in $steps; do
    case " $ALL_STEPS " in *" $wanted "*) ;; *) echo "unknown step '$wanted': use quick or any of: $ALL_STEPS" >&2; exit 2 ;; esac
done
wants() { case " $steps " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

wants tests && STEP_NAME="pytest -m gpu" step run_pytest
wants kernels && STEP_NAME="benchmarks.kernels" step run_bench kernels 40 --output "$OUT/$gpu-kernels.md" $(plot "$gpu-kernels.png")
wants vit-bf16 && STEP_NAME="benchmarks.vit bf16" step run_bench vit 30 --dtype bfloat16 --output "$OUT/$gpu-vit-bf16.md" $(plot "$gpu-vit-bf16.png")
wants vit-fp32 && STEP_NAME="benchmarks.vit fp32" step run_bench vit 30 --dtype float32 --output "$OUT/$gpu-vit-fp32.md" $(plot "$gpu-vit-fp32.png")
# Issue 10 GPU target: ViT-B/16, bf16, batch 64 (the GPU defaults), 90%, tile 64 only: the full
# sweep (13 compiles of ViT-B) would not fit one device call.
wants train-step && STEP_NAME="benchmarks.train_step" step run_bench train_step 40 --sparsity 0.9 --blocksize 64 --output "$OUT/$gpu-train-step.md"
exit $status
