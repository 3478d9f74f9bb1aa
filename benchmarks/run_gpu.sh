#!/usr/bin/env bash
# A GPU session's one command: make CUTLASS's headers available, then run the suite
# (python -m benchmarks.suite: env, build, precompile, smoke, models, wrn, peaks, layers).
#
#   bash benchmarks/run_gpu.sh                        # default: one call of <= 8 min (470 s deadline)
#   bash benchmarks/run_gpu.sh --steps build tests    # the gpu test suite: a separate, second call
#   bash benchmarks/run_gpu.sh --full --steps ...     # any benchmarks.suite options
#
# OUT: where results go (default ./gpu_out; on the device machine $OUT, so they come back). The
# device machine returns at most 8 files, so $OUT gets exactly: the combined JSON, CSV and markdown,
# up to three PNG charts (models, wrn, layers), suite.log (everything echoed) and
# <stem>_parts.tar.gz (every step's log and per-benchmark files, from $PARTS, default
# /tmp/resnet_fused_parts). All of them are rewritten after every step: a call stopped at its
# limit returns what had finished.
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
PARTS=${PARTS:-/tmp/resnet_fused_parts}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the device image: python3 holds PyTorch
mkdir -p "$OUT" "$PARTS"
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
cutlass_setup 2>&1 | tee "$PARTS/cutlass.log" "$OUT/suite.log"
# (the pipe ran cutlass_setup in a subshell: export its PYTHONPATH here too)
[[ -z ${CUTLASS_PATH:-} && -d $SITE/cutlass_library ]] && export PYTHONPATH="$PYTHONPATH:$SITE"

set -o pipefail
"$PY" -m benchmarks.suite --out "$OUT" --parts "$PARTS" --pack "$@" 2>&1 | tee -a "$OUT/suite.log"
