#!/usr/bin/env bash
# Build, here, the ttt-cuda wheel tools/gpu_check.sh installs on the GPU machine instead of building
# there (minutes of lent GPU time saved). The extension links no torch (pybind11 + static cudart),
# so it needs nvcc, CMake, ninja and the target machine's Python minor version only:
#
#   bash tools/build_cuda_wheel.sh PYTHON [ARCH]   # e.g. ~/.pyenv/versions/3.12.1/bin/python 90
#
# PYTHON must have scikit-build-core and pybind11 installed; ARCH (default 90: H100/H200) is the
# one architecture built. The wheel lands in tools/prebuilt/ (ignored by git, carried by `run`).
# gpu_check.sh checks that it imports and carries sm_<cc> there, and builds from source if not.
set -euo pipefail
PY=${1:?usage: bash tools/build_cuda_wheel.sh PYTHON [ARCH]}
ARCH=${2:-90}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
rm -f "$ROOT"/tools/prebuilt/ttt_cuda-*.whl
TTT_ENABLE_CUDA=ON TTT_CUDA_ARCHITECTURES="${ARCH}-real" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PY" -m pip wheel --no-deps --no-build-isolation \
  -w "$ROOT/tools/prebuilt" -Cbuild-dir="$ROOT/build/cuda_wheel_$ARCH" "$ROOT/packages/ttt-cuda"
ls -l "$ROOT"/tools/prebuilt/
