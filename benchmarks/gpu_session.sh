#!/usr/bin/env bash
# The GPU session: one command on the device machine (one H100/H200, 16 CPU cores; its python3
# has torch, triton, torchvision, tabulate, setuptools, pytest, pytest-xdist, pytest-timeout;
# nothing can be downloaded there). Everything it writes goes under $OUT.
#
#   first run (device call, timeout_s 600):  bash benchmarks/gpu_session.sh          (= first)
#   re-run what failed or was cut:           bash benchmarks/gpu_session.sh STEP...
#   a longer cap for a re-run:               GPU_SESSION_CAP_TRAIN_STEP=200 bash benchmarks/gpu_session.sh train-step
#
# A session has ~15 minutes of device time in all (machine start-up and idle time included) and
# one command may run 10: so one prepared command of at most 9 minutes (`first`), then, if time
# is left, one short command that re-runs what failed. `first` runs the steps in order of
# importance, each under its own cap (`timeout`): a step that runs long is killed at its cap
# and costs only itself; every step runs even when one before it failed; each writes its result
# file as soon as it ends, and $OUT/<gpu>-summary.md is rewritten after every step, so whatever
# stops the command later, what ran is there. A step may use the time that earlier steps left
# unused (its deadline is the sum of the caps up to it); none can take a later step's time.
#
# Budget of `first`, in seconds (estimates: nothing here has run on a GPU yet; the summary's
# "ran s" column is the first measurement, so correct these caps from it):
#   setup        30  editable install without network (~10 s), GPU name and versions (one torch
#                    import), nvidia-smi
#   tests       150  pytest -m gpu: 109 tests, compiling (Triton, Inductor) far more than
#                    computing, spread over 4 pytest-xdist workers; they autotune one config per
#                    launch (tests/conftest.py) and compile no full ViT-B (2 blocks of its widths)
#   kernels      75  4 ViT-B/16 shapes (M = 256*197) x bf16, fp32 x 90%, 50% at block 64: 44 timed
#                    rows (ours, cuBLAS, torch.sparse BSR; 2:4 cuSPARSELt in bf16) of ~60 calls;
#                    our kernel autotunes its whole set (up to 7 configs) per shape, compiling
#                    each config once per dtype; torch.sparse compiles its Triton kernels once
#   vit-bf16    110  ViT-B/16, batch 256, bf16, 90% / block 64: dense eager, dense torch.compile,
#                    backend="sparse": two ViT-B compiles (~40-50 s each, Inductor on 16 cores)
#   vit-fp32     75  the seed's setting, fp32 with TF32 off, 80% / block 64: dense eager and
#                    backend="sparse": one ViT-B compile
#   train-step   80  Supermask ViT-B/16, batch 64, bf16, 90% / tile 64: dense torch.compile and
#                    backend="sparse" (forward + backward compiles), the eager rows as gradient
#                    references; likely to be cut: re-run it alone (above) if so
#   sum         520  + the kill grace of the last step (5 s) and the summary: < 540 s = 9 minutes
# Each compiled benchmark row compiles its model once and reuses it for every timed call.
# Later issues' GPU checks (conv layers, the AOTInductor package round trip on CUDA, the N:M
# paths) belong in gpu-marked tests of a few seconds each: step `tests` runs them.
#
# Steps (any of them, in any order, after setup): tests, kernels, vit-bf16, vit-fp32,
# train-step, train-step-amp (the training step under torch.autocast(bf16) with fp32 weights, the
# seed recipe's --amp: not in `first`, whose 9 minutes it does not fit; the re-run's step once
# `first` has passed), export-cuda (issue 22: a block-sparse MLP packaged with
# sparse_compile.aoti_compile_and_package on the GPU, loaded in a fresh process: output, no
# compile at load, load time, and whether our Triton kernel is compiled into the package; an
# AOTInductor CUDA compile, ~60 s; not in `first` either: `bash benchmarks/gpu_session.sh
# export-cuda` as the re-run, or with it); `quick` = tests
# kernels. The caps can be overridden per step: GPU_SESSION_CAP_<STEP> (upper case, '-' as
# '_'), GPU_SESSION_CAP_SETUP; GPU_SESSION_KILL_GRACE (seconds between TERM and KILL);
# GPU_SESSION_PYTEST_WORKERS (0: no xdist); GPU_SESSION_COMMIT names the commit in the summary
# where the device's copy has no .git (`GPU_SESSION_COMMIT=abc1234 bash ...`). The dry run of
# the plumbing on CPU: tests/test_benchmarks.py -k gpu_session (stand-ins for python3 and
# nvidia-smi, a few seconds).
#
# Files under $OUT (at most 8 come back from the device machine; <gpu> is e.g. h100):
#   <gpu>-session.log     everything printed (install log on failure, nvidia-smi, versions, steps)
#   <gpu>-summary.md      GPU, versions, and per step: cap, time taken, status, file
#   <gpu>-pytest-gpu.txt  pytest's whole output (--tb=long), the first failure printed after it
#   <gpu>-kernels.md, <gpu>-vit-bf16.md, <gpu>-vit-fp32.md, <gpu>-train-step.md (-amp.md),
#   <gpu>-export-cuda.md:
#                         each benchmark's --output (command, versions, tables, raw times)
# Exit status: the first failed step's (pytest's; a benchmark's: 1 for a wrong or failed row of
# ours; 124 for a step killed at its cap); 2 for an unknown step. Turning $OUT into
# benchmarks/results/<gpu>.md on the development machine, right after the run:
#   bash benchmarks/gpu_session.sh report FILES_AT     (see report below, and benchmarks/results/README.md)
set -uo pipefail
cd "$(dirname "$0")/.."

# pytest_summary FILE: what pytest said at its end (slowest tests, failures, counts).
pytest_summary() {
    awk '/^=+ (short test summary info|slowest [0-9]+ durations) =+$/ { p = 1 } p' "$1" | tail -n 60
}

# print_first_failure FILE: the first report of pytest's FAILURES or ERRORS section, whole.
print_first_failure() {
    local first
    first=$(awk '
        /^=+ (FAILURES|ERRORS) =+$/ { in_section = 1; next }
        in_section && /^___+ [^_ ].* ___+$/ { if (n++) exit; p = 1 }  # not the "_ _ _" between frames
        in_section && /^=+ .* =+$/ { exit }
        p' "$1")
    echo
    if [ -n "$first" ]; then
        echo "--- the first failure (whole; every failure is in $(basename "$1")) ---"
        printf '%s\n' "$first"
    else
        echo "--- no failure report in $(basename "$1") (killed before pytest wrote it?); its last lines: ---"
        tail -n 40 "$1"
    fi
}

# report FOLDER [RESULTS]: on the development machine, right after the run, the device tool's
# copy of $OUT (FOLDER) becomes RESULTS/<gpu>.md (default benchmarks/results): the summary (command,
# commit, versions, steps), pytest's summary and first failure, every benchmark file (command,
# facts, tables, raw per-call times), and the targets to fill in; the session log and pytest's
# whole output are copied beside it.
if [ "${1:-}" = report ]; then
    src=${2:?usage: bash benchmarks/gpu_session.sh report FOLDER [RESULTS_DIR]}
    dest=${3:-benchmarks/results}
    summary=$(ls "$src"/*-summary.md 2> /dev/null | head -1)
    [ -n "$summary" ] || { echo "no <gpu>-summary.md in $src" >&2; exit 1; }
    gpu=$(basename "$summary" -summary.md)
    report="$dest/$gpu.md"
    mkdir -p "$dest"
    {
        cat "$summary"
        echo
        echo "Raw output beside this file: \`$gpu-session.log\` (everything the run printed), \`$gpu-pytest-gpu.txt\`."
        echo
        echo "## Targets (issue 19)"
        echo
        echo "Filled in by hand from the tables below (\`vs dense\`, \`% of floor\`, \`vs compile\`, \`vs eager\`, \`vs dense compile\`):"
        echo
        echo "| target | measured | met |"
        echo "|---|---|---|"
        echo "| kernel bf16 b64 90% >= 6x cuBLAS, >= 1.5x torch.sparse BSR, >= 60% of floor (per shape) | | |"
        echo "| ViT-B/16 bf16 90% / b64 >= 2.5x dense torch.compile | | |"
        echo "| seed: fp32 (TF32 off) 80% / b64 >= 2x dense eager | | |"
        echo "| 2:4 >= 1.2x cuBLAS, or dense chosen | | |"
        echo "| Supermask training step bf16 90% / tile 64 >= 1.8x dense torch.compile | | |"
        if [ -f "$src/$gpu-pytest-gpu.txt" ]; then
            echo
            echo "## pytest -m gpu"
            echo
            echo '```'
            pytest_summary "$src/$gpu-pytest-gpu.txt"
            grep -q "^=.* \(FAILURES\|ERRORS\) =" "$src/$gpu-pytest-gpu.txt" && print_first_failure "$src/$gpu-pytest-gpu.txt"
            echo '```'
        fi
        for step in kernels vit-bf16 vit-fp32 train-step train-step-amp export-cuda; do
            [ -f "$src/$gpu-$step.md" ] || continue
            echo
            sed 's/^#/##/' "$src/$gpu-$step.md"  # its headings one level down
        done
    } > "$report"
    for raw in session.log pytest-gpu.txt; do
        [ -f "$src/$gpu-$raw" ] && cp "$src/$gpu-$raw" "$dest/"
    done
    echo "wrote $report"
    exit 0
fi

OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
started=$(date +%s)
command="bash benchmarks/gpu_session.sh ${*:-first}"
GRACE=${GPU_SESSION_KILL_GRACE:-5}

ALL_STEPS="tests kernels vit-bf16 vit-fp32 train-step train-step-amp export-cuda"
FIRST_STEPS="tests kernels vit-bf16 vit-fp32 train-step"
declare -A CAP=([setup]=30 [tests]=150 [kernels]=75 [vit-bf16]=110 [vit-fp32]=75 [train-step]=80 [train-step-amp]=80 [export-cuda]=120)
case "${1:-first}" in
    first) steps=$FIRST_STEPS ;;
    quick) steps="tests kernels" ;;
    *) steps="$*" ;;
esac
for wanted in $steps; do
    case " $ALL_STEPS " in *" $wanted "*) ;; *) echo "unknown step '$wanted': use first, quick or any of: $ALL_STEPS" >&2; exit 2 ;; esac
done

# The GPU's short name (h100, h200, a100) names the files; one torch import also gives the versions.
info=$(timeout 60 python3 -c "
import platform, torch, triton, torchvision
n = torch.cuda.get_device_name()
print(next((w for w in n.split() if w[:1] in 'AHBL' and w[1:2].isdigit()), 'gpu').lower())
print(f'{n} (sm{\"\".join(map(str, torch.cuda.get_device_capability()))}); torch {torch.__version__}, CUDA {torch.version.cuda}, '
      f'triton {triton.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}, '
      f'cuSPARSELt {torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else \"not available\"}')
" 2>&1)
gpu=$(printf '%s\n' "$info" | head -1)
case "$gpu" in [a-z]*[0-9]*) versions=$(printf '%s\n' "$info" | sed -n 2p) ;; *) versions="unknown: $(printf '%s\n' "$info" | tail -1)"; gpu=gpu ;; esac
case "$gpu" in *[!a-z0-9]*) gpu=gpu ;; esac

exec > >(tee -a "$OUT/$gpu-session.log") 2>&1
tee_pid=$!
summary="$OUT/$gpu-summary.md"
rows=""
status=0
echo "GPU session $(date -u +%Y-%m-%dT%H:%M:%SZ): $command; steps: setup $steps"
echo "GPU: $gpu; $versions"

write_summary() {
    {
        echo "# GPU session: $gpu"
        echo
        echo "- command: \`$command\`, started $(date -u -d "@$started" +%Y-%m-%dT%H:%M:%SZ)"
        echo "- commit: ${GPU_SESSION_COMMIT:-$(git rev-parse --short HEAD 2> /dev/null || echo "unknown (set GPU_SESSION_COMMIT)")}"
        echo "- device: $versions"
        echo "- nvidia-smi: ${smi:-not run}"
        echo
        echo "| step | cap s | ran s | status | file |"
        echo "|---|---|---|---|---|"
        printf '%b' "$rows"
    } > "$summary"
}

deadline=$started
# run_step NAME FUNCTION: runs FUNCTION with $cap set to the seconds this step may take.
run_step() {
    local name=$1 fn=$2 var own now begin rc took result
    var="GPU_SESSION_CAP_$(echo "$name" | tr 'a-z-' 'A-Z_')"
    own=${!var:-${CAP[$name]}}
    deadline=$((deadline + own))
    now=$(date +%s)
    cap=$((deadline - now))
    [ "$cap" -lt 1 ] && cap=1
    echo
    echo "=== [$(date -u +%H:%M:%S)] step $name: cap ${cap} s (its own ${own} s; ends by $((deadline - started)) s into the session)"
    begin=$now
    step_file=""
    "$fn"
    rc=$?
    took=$(($(date +%s) - begin))
    case $rc in
        0) result="ok" ;;
        # timeout's statuses: 124 after TERM (INT), 137 when KILL was needed; 137 before the cap
        # is a kill from elsewhere (the kernel's OOM killer).
        124 | 137) if [ "$took" -ge "$cap" ]; then result="TIMED OUT: killed at its cap"; rc=124; else result="FAILED (exit $rc)"; fi ;;
        *) result="FAILED (exit $rc)" ;;
    esac
    echo "=== [$(date -u +%H:%M:%S)] step $name: $result after ${took} s${step_file:+ -> $step_file}"
    [ -n "$step_file" ] && [ ! -e "$OUT/$step_file" ] && step_file="none ($step_file not written)"
    [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
    rows+="| $name | $cap | $took | $result | ${step_file:--} |\n"
    write_summary
    return $rc
}

# capped CMD...: CMD under this step's cap; TERM (or $CAP_SIGNAL) at the cap, KILL $GRACE s later.
capped() { timeout -s "${CAP_SIGNAL:-TERM}" -k "$GRACE" "$cap" "$@"; }

step_setup() {
    # The editable install needs setuptools >= 64 with bdist_wheel (setuptools >= 70, or the wheel
    # package) on the device. Fallback: build the wheel on the dev machine (`echo /.whl/ >>
    # .git/info/exclude; pip wheel --no-deps -w .whl .`) and name .whl in the run's carry.
    if ! capped python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /tmp/gpu_session_install.log 2>&1; then
        cat /tmp/gpu_session_install.log
        ls .whl/sparse_compile-*.whl > /dev/null 2>&1 || { echo "install failed, no .whl to fall back on"; return 1; }
        capped python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/sparse_compile-*.whl || return 1
        export PYTHONPATH=/tmp/site
    fi
    capped python3 -c "import importlib.metadata as m; assert 'sparse' in [e.name for e in m.entry_points(group='torch_dynamo_backends')], 'backend not registered'" || return 1
    smi=$(capped nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>&1 | head -1)
    echo "nvidia-smi: $smi"
}

step_tests() {
    local file="$OUT/$gpu-pytest-gpu.txt" workers=() per_test=() rc
    step_file=$(basename "$file")
    # pytest-xdist: the tests compile (Triton, Inductor) far more than they compute; 4 workers
    # with 4 Inductor compile threads each share the 16 cores. pytest-timeout: a test that hangs
    # fails alone (its traceback in the file) instead of costing the step.
    if [ "${GPU_SESSION_PYTEST_WORKERS:-4}" -gt 0 ] && python3 -c "import xdist" 2> /dev/null; then
        workers=(-n "${GPU_SESSION_PYTEST_WORKERS:-4}")
    fi
    python3 -c "import pytest_timeout" 2> /dev/null && per_test=(--timeout 120)
    # Every gpu test runs (no -x); --tb=long keeps each traceback whole in the file. At the cap
    # pytest gets SIGINT: it stops and still writes the failures so far.
    TORCHINDUCTOR_COMPILE_THREADS=4 CAP_SIGNAL=INT GRACE=$((GRACE + 5)) capped \
        python3 -m pytest -m gpu -p no:cacheprovider --tb=long -rfEs --durations=15 --durations-min=1 \
        ${workers[@]+"${workers[@]}"} ${per_test[@]+"${per_test[@]}"} > "$file" 2>&1
    rc=$?
    # What pytest said at the end (failures, slowest tests, counts), then the first failure whole.
    pytest_summary "$file"
    [ "$rc" -eq 0 ] || print_first_failure "$file"
    return $rc
}

# bench NAME MODULE FLAGS...: python -m benchmarks.MODULE, its --output file named after NAME.
bench() {
    local name=$1 module=$2
    shift 2
    step_file="$gpu-$name.md"
    capped python3 -m "benchmarks.$module" "$@" --output "$OUT/$step_file"
}
step_kernels() { bench kernels kernels --dtype bfloat16,float32 --sparsity 0.9,0.5 --blocksize 64; }
step_vit_bf16() { bench vit-bf16 vit --dtype bfloat16 --sparsity 0.9 --blocksize 64 --variants eager,compile,sparse; }
step_vit_fp32() { bench vit-fp32 vit --dtype float32 --sparsity 0.8 --blocksize 64 --variants eager,sparse; }
step_train_step() {
    bench train-step train_step --dtype bfloat16 --batch-size 64 --sparsity 0.9 --blocksize 64 \
        --variants dense-compile,sparse
}
step_train_step_amp() {
    bench train-step-amp train_step --amp --batch-size 64 --sparsity 0.9 --blocksize 64 --variants dense-compile,sparse
}
step_export_cuda() { bench export-cuda export_cuda --dtype float16 --sparsity 0.9 --blocksize 64; }

finish() {
    echo
    echo "=== done in $(($(date +%s) - started)) s, exit status $status; files in $OUT:"
    ls "$OUT"
    echo
    cat "$summary"
    exec >&- 2>&-
    wait "$tee_pid" 2> /dev/null
    exit "$status"
}

if ! run_step setup step_setup; then
    echo "setup failed: no step can run"
    finish
fi
for name in $steps; do
    run_step "$name" "step_${name//-/_}"
done
finish
