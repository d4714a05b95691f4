#!/usr/bin/env bash
# One prepared GPU check of the whole project (issue 18): one command on the GPU machine.
#
#   bash tools/gpu_check.sh OUTDIR
#
# For the GPU machine as it is (Python 3.12, torch with CUDA, nvcc, CMake, ninja, scikit-build-core,
# pybind11, pytest; no network): installs the wheels carried in tools/wheels/ (bash
# tools/fetch_wheels.sh, beforehand, where a registry is reachable) and the packages offline into
# OUTDIR-independent folders under $TTT_CHECK_TMP (default /tmp/ttt_check; never the interpreter's
# own environment), builds ttt-cuda for this GPU's architecture only, and runs, every step under
# `timeout` and the whole within TTT_CHECK_BUDGET_S (default 450 s; the build within
# TTT_CHECK_BUILD_S, default 300 s; TTT_CHECK_ONLY="env install build cuda" runs only those steps):
#   env          nvidia-smi, torch, compute capability, compute-sanitizer
#   install      carried wheels + ttt-core, ttt-gemma, ttt-titans, ttt-moshi (no deps, no index)
#   build        ttt-cuda, TTT_ENABLE_CUDA=ON for sm_<cc> only (OFF without a GPU)
#   core|gemma|titans|moshi   each package's tests with TTT_TEST_DEVICE=cuda (torch backend on the
#                device; started during the build, without ttt-cuda installed)
#   cuda         ttt-cuda's device tests + test_registration.py with CUDA_LAUNCH_BLOCKING=1,
#                TTT_REQUIRE_GPU=1 (CUDA-graph capture, side stream, determinism included; the
#                C++ CPU path's tests are CI's)
#   sanitizers   compute-sanitizer memcheck / racecheck / synccheck / initcheck (beside `cuda`)
#   bench        benchmarks/cuda.py (ours vs torch eager / torch.compile / fla) -> bench_cuda.json
# OUTDIR gets one log per step, JUnit XML per test step, the benchmark JSON and summary.txt (one line
# per step: ok / FAILED (rc) / TIMEOUT / SKIPPED / NOT RUN, its seconds and test counts). A step
# that does not finish is reported as such, never hidden; the script exits 0 when all steps are ok
# or skipped for a stated reason, else 1.
set -u
OUT=${1:?usage: bash tools/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
BUDGET=${TTT_CHECK_BUDGET_S:-450}
BUILD_S=${TTT_CHECK_BUILD_S:-300}  # the build's own limit (16 cores: ~2-3 min for one arch)
ONLY=${TTT_CHECK_ONLY:-}           # e.g. "env install build bench": run only these steps
TMPD=${TTT_CHECK_TMP:-/tmp/ttt_check}
WHEELS=${TTT_WHEELS:-$ROOT/tools/wheels}
PREBUILT=${TTT_PREBUILT:-$ROOT/tools/prebuilt}  # optional: ttt_cuda-*.whl built for this GPU
SITE_PURE=$TMPD/site_pure  # ttt-core + integrations + carried wheels
SITE_CUDA=$TMPD/site_cuda  # ttt-cuda (built here)
T0=$(date +%s)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
rm -rf "$TMPD" && mkdir -p "$SITE_PURE" "$SITE_CUDA"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

export OUT ROOT PY TMPD WHEELS PREBUILT SITE_PURE SITE_CUDA

log() { echo "[gpu_check +$(($(date +%s) - T0))s] $*"; }
left() { echo $((BUDGET - ($(date +%s) - T0))); }

# record NAME STATUS SECONDS [DETAIL]: one summary line (steps run in the background call it too).
record() {
  local detail=""
  [ -f "$OUT/$1.xml" ] && detail=$("$PY" - "$OUT/$1.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
print(f"tests={n} passed={n - f - e - k} failed={f} errors={e} skipped={k}")
EOF
)
  printf '%-11s %-22s %5ss  %s %s\n' "$1" "$2" "$3" "$detail" "${4:-}" | tee -a "$SUMMARY"
}

# run_step NAME LIMIT_S CMD...: runs CMD (log: OUT/NAME.log) under timeout min(LIMIT, time left).
run_step() {
  local name=$1 limit=$2 rem start rc status
  shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
    record "$name" "SKIPPED: not in TTT_CHECK_ONLY" 0
    return
  fi
  rem=$(left)
  if [ "$rem" -lt 15 ]; then
    record "$name" "NOT RUN (budget spent)" 0
    return
  fi
  [ "$limit" -gt "$rem" ] && limit=$rem
  log "$name: start (limit ${limit}s)"
  start=$(date +%s)
  timeout -k 10 "$limit" bash -c '"$@"' _ "$@" >"$OUT/$name.log" 2>&1  # functions included
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (rc $rc)" ;;
  esac
  log "$name: $status"
  record "$name" "$status" $(($(date +%s) - start))
}

skip_step() { record "$1" "SKIPPED: $2" 0; }

# pytest_args NAME [PER_TEST_S]: the workspace config, JUnit XML, -v (a step stopped by its time
# limit writes no XML: its log still names every test it finished), a per-test limit if available,
# pytest-benchmark off (the image has it; beside xdist it warns, and our warnings are errors).
pytest_args() {
  local extra=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra=(--timeout="${2:-150}")
  echo -c pyproject.toml --rootdir . -p no:cacheprovider -p no:benchmark -v \
    --junitxml="$OUT/$1.xml" "${extra[@]}"
}

# ---- env ------------------------------------------------------------------------------------
env_report() {
  date -u
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "smem/block opt-in", p.shared_memory_per_block_optin, "memory", p.total_memory)
else:
    print("device: none (torch.cuda.is_available() is False)")
EOF
  command -v nvcc && nvcc --version | tail -1
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null ||
    echo "compute-sanitizer: not found"
  nproc
}
export -f env_report
run_step env 60 env_report
GPU_CC=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None; print(f'{c[0]}{c[1]}' if c else '')" 2>/dev/null)
export GPU_CC  # not CC: that names the C compiler to inductor and Triton
if [ -n "$GPU_CC" ]; then log "GPU: compute capability $GPU_CC"; else log "no GPU: device steps are skipped"; fi

# ---- install (offline) ------------------------------------------------------------------------
install_pure() {
  set -e
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install --no-deps --no-compile --target "$SITE_PURE" "$WHEELS"/*-none-any.whl
    local w  # binary wheels (PyAV) are for the GPU machine's Python: elsewhere (a dry run) skipped
    for w in "$WHEELS"/*.whl; do
      [[ $w == *-none-any.whl ]] && continue
      "$PY" -m pip install --no-deps --no-compile --target "$SITE_PURE" "$w" ||
        echo "skipped $(basename "$w"): not for this Python or platform"
    done
  else
    echo "no carried wheels in $WHEELS (bash tools/fetch_wheels.sh): continuing without them"
  fi
  export PYTHONPATH=$SITE_PURE${PYTHONPATH:+:$PYTHONPATH}
  local pkgs=(./packages/ttt-core ./packages/ttt-gemma ./packages/ttt-titans ./packages/ttt-moshi)
  "$PY" -m pip install --no-deps --no-build-isolation --no-compile --target "$SITE_PURE" "${pkgs[@]}"
  "$PY" -c "import ttt_core, ttt_gemma, ttt_titans, ttt_moshi; print('packages import')"
}
export -f install_pure
run_step install 120 install_pure
export PYTHONPATH=$SITE_PURE${PYTHONPATH:+:$PYTHONPATH}

# ---- build ttt-cuda (background) while the packages' device tests run -------------------------
if [ -n "$GPU_CC" ]; then  # exported: ttt-cuda's tests check the build carries these architectures
  export TTT_ENABLE_CUDA=ON TTT_CUDA_ARCHITECTURES="${GPU_CC}-real"
else
  export TTT_ENABLE_CUDA=OFF  # the CPU build: what a machine without a GPU can check
fi
build_cuda() {
  echo "TTT_ENABLE_CUDA=$TTT_ENABLE_CUDA TTT_CUDA_ARCHITECTURES=${TTT_CUDA_ARCHITECTURES:-}"
  # A wheel built beforehand for this Python and this GPU's architecture (tools/prebuilt/, see
  # tools/build_cuda_wheel.sh) saves the build's minutes; it must import and carry sm_<cc>,
  # else the script builds from source as usual.
  local tag whl
  tag=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
  whl=$(compgen -G "$PREBUILT/ttt_cuda-*-$tag-*.whl" | head -1)
  if [ -n "$GPU_CC" ] && [ -n "$whl" ]; then
    echo "prebuilt wheel: $whl"
    if "$PY" -m pip install --no-deps --no-compile --target "$SITE_CUDA" "$whl" &&
      PYTHONPATH=$SITE_CUDA${PYTHONPATH:+:$PYTHONPATH} "$PY" -c "
import ttt_cuda._C as C
assert C.WITH_CUDA, 'built without CUDA'
assert '$GPU_CC' in C.CUDA_ARCHITECTURES, C.CUDA_ARCHITECTURES
print('prebuilt ttt-cuda imports; architectures', C.CUDA_ARCHITECTURES)"; then
      return 0
    fi
    echo "prebuilt wheel unusable here: building from source"
    rm -rf "${SITE_CUDA:?}"/*
  fi
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PY" -m pip install -v --no-deps --no-build-isolation \
    --no-compile --target "$SITE_CUDA" -Cbuild-dir="$TMPD/build" ./packages/ttt-cuda
}
export -f build_cuda pytest_args
run_step build "$BUILD_S" build_cuda &
BUILD_PID=$!

package_tests() {  # NAME DIR [WORKERS]: that package's tests on the device (the switch)
  local par=()
  [ "${3:-1}" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null && par=(-n "$3")
  OMP_NUM_THREADS=2 TTT_TEST_DEVICE=cuda TTT_REQUIRE_GPU=1 "$PY" -m pytest $(pytest_args "$1") \
    "${par[@]}" "$2"
}
export -f package_tests
PKG_PIDS=()
for pkg in core gemma titans moshi; do
  if [ -n "$GPU_CC" ]; then
    workers=1
    [ "$pkg" = core ] && workers=4  # the longest (~140 s alone): four pytest-xdist workers
    run_step "$pkg" 240 package_tests "$pkg" "packages/ttt-$pkg/tests" "$workers" &
  else  # no GPU: the switch must skip every test with its reason (checked by the dry run)
    run_step "$pkg" 240 env TTT_TEST_DEVICE=cuda "$PY" -m pytest $(pytest_args "$pkg") -rs \
      "packages/ttt-$pkg/tests" &
  fi
  PKG_PIDS+=($!)
done
wait "$BUILD_PID"
export PYTHONPATH=$SITE_CUDA:$PYTHONPATH
BUILT=$("$PY" -c "import ttt_cuda; print(int(ttt_cuda.built_with_cuda()))" 2>/dev/null || echo none)
log "ttt-cuda built with CUDA: $BUILT"

# ---- ttt-cuda's tests (launch-blocking) beside the sanitizer runs ------------------------------
cuda_tests() {
  local require=0
  [ -n "$GPU_CC" ] && require=1
  local t=packages/ttt-cuda/tests  # the device tests + the build's registration (CI runs the rest)
  CUDA_LAUNCH_BLOCKING=1 TTT_REQUIRE_GPU=$require "$PY" -m pytest $(pytest_args cuda) -rs \
    $t/test_gpu.py $t/test_gpu_mlp.py $t/test_gpu_titans.py $t/test_registration.py
}
sanitizer_tests() {  # six sanitizer processes, three at a time where pytest-xdist is installed
  local par=()
  "$PY" -c "import xdist" 2>/dev/null && par=(-n 3)
  TTT_REQUIRE_GPU=1 "$PY" -m pytest $(pytest_args sanitizers 280) "${par[@]}" -rs \
    packages/ttt-cuda/tests/test_gpu_sanitizers.py
}
export -f cuda_tests sanitizer_tests
if [ "$BUILT" = none ]; then
  skip_step cuda "the ttt-cuda build did not import (see build.log)"
  skip_step sanitizers "the ttt-cuda build did not import (see build.log)"
else
  if [ "$BUILT" = 1 ]; then
    run_step sanitizers 270 sanitizer_tests &
    SAN_PID=$!
  else
    skip_step sanitizers "no GPU (or ttt-cuda built without nvcc)"
    SAN_PID=""
  fi
  run_step cuda 240 cuda_tests
  [ -n "$SAN_PID" ] && wait "$SAN_PID"
fi
for pid in "${PKG_PIDS[@]}"; do wait "$pid"; done

# ---- benchmark (alone on the GPU) -------------------------------------------------------------
if [ "$BUILT" = 1 ]; then
  rem=$(left)
  run_step bench $((rem - 5)) "$PY" benchmarks/cuda.py --deadline-s $((rem - 45)) \
    --out "$OUT/bench_cuda.json"
else
  skip_step bench "no GPU (or ttt-cuda built without nvcc): benchmarks/cuda.py needs one"
fi

log "done in $(($(date +%s) - T0))s; summary ($SUMMARY):"
cat "$SUMMARY"
if grep -qvE '^[a-z]+ +(ok|SKIPPED)' "$SUMMARY"; then exit 1; fi
