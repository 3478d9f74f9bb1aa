#!/usr/bin/env bash
# Everything a GPU session runs: about 20 minutes on an H100 machine, so with a 10-minute limit per
# device call run it as three calls (benchmarks/README.md, "More than one device call"):
#
#   STEPS="env build tests"                                  # ~7 min
#   STEPS="env build bench main train"     OUT=gpu_out/bench # ~8 min (+ the build on a cold machine)
#   STEPS="env build bandwidth epilogue"   OUT=gpu_out/ext   # ~6 min
#
#   bash benchmarks/run_gpu.sh        # all steps; logs and results under $OUT (default ./gpu_out)
#
# Steps, each under `timeout` and logged to $OUT; a failing step does not stop the others, but the
# script exits 1 at the end if any step failed or timed out. A summary table is printed last.
#   env        nvidia-smi -L, Python / torch / triton / CUDA / cuDNN versions, torchvision, free memory
#   build      python -m resnet_fused.build: JIT-builds the C++/CUDA library (the "cuda" backend) into
#              torch's extension cache, then fails unless it has CUDA kernels. Later steps reuse the
#              cache (a no-op rebuild), so it comes first in every call that uses the library; a
#              machine kept warm between calls keeps the cache.
#   tests      tests/test_gpu.py + tests/test_gpu_train.py (+ tests/test_gpu_ext.py where present)
#              (-m gpu) as SHARDS pytest processes split by -k (cifar + dtype-less tests, fp16, bf16,
#              fp32 in the test ids: Triton compiles on one CPU core per process, and compiling is
#              most of the files' time), and at the same time the rest of the suite (-m "not gpu") on
#              the GPU without TRITON_INTERPRET; all end before the benchmarks start
#   bench      python -m benchmarks.bench_blocks --quick --out $OUT
#   main       python -m resnet_fused --device cuda --dtype fp16 --channels-last --batch 256
#   train      python -m benchmarks.bench_train --quick --out $OUT (training step: eager vs fused vs
#              torch.compile; it starts no provider after 150 s and rewrites its results after each case)
#   bandwidth  python -m benchmarks.bench_bandwidth --quick --out $OUT (memory-bound kernels vs copy)
#   epilogue   python -m benchmarks.bench_conv_epilogue --quick --out $OUT (fused conv vs cuDNN's conv
#              alone; starts no provider after 120 s, rewrites its results after each case)
#
# CUTLASS: the build needs CUTLASS's headers, from the nvidia-cutlass wheel. The device machine has
# no network: the caller carries the wheel in .whl/ (git-ignored; fetch it once where pip works with
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl nvidia-cutlass==4.2.0.0
# and name .whl in the device call's carry list). Unless CUTLASS_PATH is set or nvidia-cutlass is
# importable already, the script installs .whl/nvidia_cutlass-*.whl (or $CUTLASS_WHEEL) with
# `pip install --no-deps --no-index --target $SITE` (default /tmp/site) and puts $SITE on PYTHONPATH
# for every step. Without it the library builds without CUDA kernels, the build step fails with
# that reason and the cuda provider is skipped (recorded) by the benchmarks.
#
# Environment knobs: OUT; SHARDS (4, or 1 for one plain pytest process); STEPS (default
# "env build tests bench main train bandwidth epilogue"); T_BUILD / T_TESTS / T_BENCH / T_MAIN /
# T_TRAIN / T_BANDWIDTH / T_EPILOGUE (seconds per step, default 240 / 270 / 200 / 80 / 170 / 150 /
# 170); DEADLINE (seconds for the whole script, default 580 so one 10-minute device call always ends
# with its summary: a step gets at most what is left, so later steps may be cut short or skipped;
# split the steps over calls as above); CUTLASS_WHEEL, SITE (above); ARCHIVE (a path: pack $OUT into
# this .tar.gz at the end, for a caller that can take back only a few files: e.g.
# `ARCHIVE=$OUT/gpu_out.tar.gz OUT=/tmp/gpu_out bash benchmarks/run_gpu.sh`).
# No network: the repository runs from PYTHONPATH; the only install is the carried CUTLASS wheel.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}  # later processes reuse earlier tuning
unset TRITON_INTERPRET                                        # real kernels, compiled for the GPU
PY=${PYTHON:-python}
SHARDS=${SHARDS:-4}
STEPS=${STEPS:-"env build tests bench main train bandwidth epilogue"}
T_BUILD=${T_BUILD:-240}
T_TESTS=${T_TESTS:-270}
T_BENCH=${T_BENCH:-200}
T_MAIN=${T_MAIN:-80}
T_TRAIN=${T_TRAIN:-170}
T_BANDWIDTH=${T_BANDWIDTH:-150}
T_EPILOGUE=${T_EPILOGUE:-170}
DEADLINE=${DEADLINE:-580}
SITE=${SITE:-/tmp/site}
ARCHIVE=${ARCHIVE:-}
START=$(date +%s)

# pytest that turns timeout's SIGTERM into KeyboardInterrupt: a timed-out run still prints its
# summary and writes its junit XML
PYTEST=("$PY" -c 'import signal, sys, pytest
signal.signal(signal.SIGTERM, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))')
PYTEST_OPTS=(-p no:cacheprovider -rfE --durations=15)

ROWS=()
FAILED=0
row() {  # name status seconds note
    ROWS+=("$(printf '%-26s %-12s %6s  %s' "$1" "$2" "$3" "$4")")
    case $2 in PASS) ;; *) FAILED=1 ;; esac
}
status_of() {
    case $1 in 0) echo PASS ;; 124 | 137) echo TIMEOUT ;; 5) echo "NO-TESTS" ;; *) echo "FAIL(rc=$1)" ;; esac
}
elapsed() { echo $(($(date +%s) - START)); }
budget() {  # the step's cap, cut to what is left before DEADLINE (10 s kept for the summary)
    local left=$((DEADLINE - $(elapsed) - 10))
    ((left < $1)) && echo "$left" || echo "$1"
}
pytest_summary() {  # the counts line of a pytest log ("3 failed, 60 passed in 99.1s")
    grep -E "[0-9]+ (passed|failed|error|errors|skipped|deselected)|no tests ran" "$1" 2>/dev/null | tail -n 1 \
        | sed -e 's/=//g' -e 's/^ *//' -e 's/ *$//'
}
want() { [[ " $STEPS " == *" $1 "* ]]; }
banner() { echo; echo "=== [$(elapsed)s] $*"; }

# foreground step: name cap log command... (output to the terminal and the log)
run_fg() {
    local name=$1 cap=$2 log=$3 limit t0 rc
    shift 3
    limit=$(budget "$cap")
    if ((limit < 20)); then
        row "$name" SKIPPED 0 "no time left before DEADLINE=$DEADLINE s"
        return
    fi
    banner "$name (timeout ${limit}s): $*"
    t0=$(date +%s)
    timeout -k 20 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    row "$name" "$(status_of "$rc")" $(($(date +%s) - t0)) "${log#"$ROOT"/}"
}

# background step: name limit log command... (output to the log; rc and seconds to log.rc)
run_bg() {
    local name=$1 limit=$2 log=$3
    shift 3
    echo "  start $name (timeout ${limit}s) -> ${log#"$ROOT"/}"
    (
        t0=$(date +%s)
        timeout -k 20 "$limit" "$@" >"$log" 2>&1
        echo "$? $(($(date +%s) - t0))" >"$log.rc"
    ) &
}

echo "run_gpu.sh: OUT=$OUT SHARDS=$SHARDS STEPS='$STEPS' DEADLINE=${DEADLINE}s"

# ------------------------------------------------------------------------------------- CUTLASS
# In the main shell (not a pipe), so PYTHONPATH reaches every later step.
cutlass_setup() {
    if [[ -n ${CUTLASS_PATH:-} ]]; then
        echo "CUTLASS: CUTLASS_PATH=$CUTLASS_PATH"
        return 0
    fi
    if "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("cutlass_library") is None)'; then
        echo "CUTLASS: the nvidia-cutlass package is importable"
        return 0
    fi
    local wheel=${CUTLASS_WHEEL:-$(ls "$ROOT"/.whl/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)}
    if [[ -z $wheel || ! -f $wheel ]]; then
        echo "CUTLASS: not found, and no .whl/nvidia_cutlass-*.whl carried: the library will build without CUDA kernels"
        return 1
    fi
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$wheel" \
        || { echo "CUTLASS: installing $wheel failed"; return 1; }
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
    echo "CUTLASS: installed $(basename "$wheel") into $SITE (on PYTHONPATH)"
}
cutlass_setup >"$OUT/cutlass.log" 2>&1
cat "$OUT/cutlass.log"

# ------------------------------------------------------------------------------------------ env
if want env; then
    banner "env"
    {
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,temperature.gpu,clocks.sm,clocks.max.sm \
            --format=csv
        git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "git: no repository here"
        timeout 60 "$PY" - <<'EOF'
import platform, sys
import torch
print(f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"cuDNN {torch.backends.cudnn.version()} | cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as exc:
    print(f"triton: import failed ({type(exc).__name__}: {exc})")
try:
    import torchvision
    print(f"torchvision {torchvision.__version__}")
except Exception as exc:
    print(f"torchvision: not importable ({type(exc).__name__}); its tests skip")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    print(f"{torch.cuda.device_count()} GPU(s); 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
else:
    print("torch.cuda.is_available() is False: the gpu tests will all be skipped", file=sys.stderr)
    sys.exit(1)
EOF
    } 2>&1 | tee "$OUT/env.log"
    rc=${PIPESTATUS[0]}
    row env "$(status_of "$rc")" "$(elapsed)" "${OUT#"$ROOT"/}/env.log"
fi

# ---------------------------------------------------------------------------------------- build
if want build; then
    # builds (or reuses) the library; then insists on its CUDA kernels, which are the point here
    run_fg build "$T_BUILD" "$OUT/build.log" "$PY" -c 'import sys
from resnet_fused import _ext, build
rc = build.main([])
err = _ext.cuda_error()
print("CUDA kernels: " + ("yes" if err is None else "NO: " + str(err)))
sys.exit(1 if (rc or err) else 0)'
fi

# ---------------------------------------------------------------------------------------- tests
if want tests && (($(budget "$T_TESTS") < 20)); then
    row tests SKIPPED 0 "no time left before DEADLINE=$DEADLINE s"
elif want tests; then
    limit=$(budget "$T_TESTS")
    GPU_FILES=(tests/test_gpu.py tests/test_gpu_train.py)
    [[ -f tests/test_gpu_ext.py ]] && GPU_FILES+=(tests/test_gpu_ext.py)
    banner "tests: ${GPU_FILES[*]} in $SHARDS process(es), the rest of the suite beside them (timeout ${limit}s)"
    if [[ $SHARDS == 1 ]]; then
        NAMES=(gpu)
        EXPRS=("")
    else
        # exclusive and exhaustive: each test id matches exactly one expression
        NAMES=(gpu-cifar+misc gpu-fp16 gpu-bf16 gpu-fp32)
        EXPRS=("cifar or not (fp16 or bf16 or fp32)" "fp16 and not cifar" "bf16 and not (cifar or fp16)"
               "fp32 and not (cifar or fp16 or bf16)")
    fi
    for i in "${!NAMES[@]}"; do
        args=(-v -m gpu "${GPU_FILES[@]}" --junitxml="$OUT/test_${NAMES[$i]}.xml" "${PYTEST_OPTS[@]}")
        [[ -n ${EXPRS[$i]} ]] && args+=(-k "${EXPRS[$i]}")
        run_bg "tests ${NAMES[$i]}" "$limit" "$OUT/test_${NAMES[$i]}.log" "${PYTEST[@]}" "${args[@]}"
    done
    NAMES+=(suite)
    run_bg "tests suite" "$limit" "$OUT/test_suite.log" "${PYTEST[@]}" -q -m "not gpu" \
        --junitxml="$OUT/test_suite.xml" "${PYTEST_OPTS[@]}"
    wait
    for name in "${NAMES[@]}"; do
        log="$OUT/test_$name.log"
        read -r rc secs <"$log.rc" 2>/dev/null || { rc=1; secs=0; }
        echo "--- $name: $(status_of "$rc") in ${secs}s: $(pytest_summary "$log")"
        grep -E "^(FAILED|ERROR) " "$log" | head -n 40
        row "tests $name" "$(status_of "$rc")" "$secs" "$(pytest_summary "$log")"
    done
fi

# ---------------------------------------------------------------------------------- benchmarks
if want bench; then
    run_fg bench "$T_BENCH" "$OUT/bench_blocks.log" "$PY" -m benchmarks.bench_blocks --quick --out "$OUT"
fi
if want main; then
    run_fg "main resnet50 b256" "$T_MAIN" "$OUT/main.log" "$PY" -m resnet_fused --device cuda --dtype fp16 \
        --channels-last --batch 256 --json "$OUT/main_resnet50_fp16_cl_b256.json"
fi
if want train; then
    run_fg train "$T_TRAIN" "$OUT/bench_train.log" "$PY" -m benchmarks.bench_train --quick --out "$OUT"
fi
if want bandwidth; then
    run_fg bandwidth "$T_BANDWIDTH" "$OUT/bench_bandwidth.log" "$PY" -m benchmarks.bench_bandwidth --quick --out "$OUT"
fi
if want epilogue; then
    run_fg epilogue "$T_EPILOGUE" "$OUT/bench_conv_epilogue.log" "$PY" -m benchmarks.bench_conv_epilogue --quick \
        --out "$OUT"
fi

# ------------------------------------------------------------------------------------- summary
{
    echo
    echo "=== summary ($(elapsed)s; logs and results in $OUT)"
    printf '%-26s %-12s %6s  %s\n' step status secs "log / pytest counts"
    printf '%s\n' "${ROWS[@]}"
    ((FAILED)) && echo "SOME STEPS FAILED" || echo "ALL STEPS PASSED"
} | tee "$OUT/summary.txt"
if [[ -n $ARCHIVE ]]; then
    mkdir -p "$(dirname "$ARCHIVE")" && tar -czf "$ARCHIVE" -C "$OUT" . && echo "packed $OUT into $ARCHIVE"
fi
exit "$FAILED"
