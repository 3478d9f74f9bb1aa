#!/usr/bin/env bash
# A GPU session's one command: make CUTLASS's headers available, then run the suite
# (python -m benchmarks.suite: the gpu tests, then every benchmark, then one result file).
#
#   bash benchmarks/run_gpu.sh                    # --quick: < 8 min on an H100 (estimate); results in $OUT
#   bash benchmarks/run_gpu.sh --full --steps tests   # any benchmarks.suite options
#
# OUT: where results go (default ./gpu_out; on the device machine use $OUT so they come back).
# CUTLASS: the C++/CUDA library's convolutions need CUTLASS's headers, from the nvidia-cutlass wheel.
# The device machine has no network: carry the wheel in .whl/ (git-ignored; fetch it once with
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl nvidia-cutlass==4.2.0.0
# and name .whl in the device call's carry list). Unless CUTLASS_PATH is set or nvidia-cutlass is
# importable already, this installs .whl/nvidia_cutlass-*.whl (or $CUTLASS_WHEEL) with
# `pip install --no-deps --no-index --target $SITE` (default /tmp/site) and puts $SITE on PYTHONPATH.
# Without it the library builds without CUDA kernels: the suite's build step fails saying so and the
# benchmarks skip their cuda provider (recorded in their JSON).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/gpu_out}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

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
        --target "$SITE" "$wheel" || { echo "CUTLASS: installing $wheel failed"; return 1; }
    export PYTHONPATH="$PYTHONPATH:$SITE"
    echo "CUTLASS: installed $(basename "$wheel") into $SITE (on PYTHONPATH)"
}
cutlass_setup 2>&1 | tee "$OUT/cutlass.log"
# (the pipe ran cutlass_setup in a subshell: export its PYTHONPATH here too)
[[ -z ${CUTLASS_PATH:-} && -d $SITE/cutlass_library ]] && export PYTHONPATH="$PYTHONPATH:$SITE"

exec "$PY" -m benchmarks.suite --out "$OUT" "$@"
