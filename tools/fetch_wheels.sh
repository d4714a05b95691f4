#!/usr/bin/env bash
# Fetch (here, with registry access) the wheels tools/gpu_check.sh installs offline on the GPU
# machine (Python 3.12, x86-64, no network): only what its image lacks. Pure-Python wheels but av.
#
#   bash tools/fetch_wheels.sh            # into tools/wheels/ (ignored by git, carried by `run`)
#   bash tools/fetch_wheels.sh DIR
#
# - hatchling + trove-classifiers + tomlkit: the build backend of ttt-core, ttt-gemma, ttt-titans, ttt-moshi
#   (installed with --no-build-isolation; packaging, pathspec and pluggy are on the image)
# - flash-linear-attention + fla-core: chunk_ttt_linear, the Triton TTT-Linear benchmarks/cuda.py
#   times beside ours (einops, transformers and triton are on the image)
# - moshi 0.2.13 (--no-deps: it pins torch<2.10; what it imports is on the image)
# - gymnasium + farama-notifications: ttt_gemma.reacher imports gymnasium (its test is CPU-only
#   under the switch, but the module must import for collection)
# - av (PyAV, a binary wheel for CPython 3.12 manylinux x86-64, ~35 MB: FFmpeg inside): ttt-gemma's
#   LeRobot video features and test_train_images.py
set -euo pipefail
DEST="${1:-$(dirname "$0")/wheels}"
mkdir -p "$DEST"
PY=${PYTHON:-python3}
WHEELS=(
  "hatchling==1.33.0" "trove-classifiers==2026.9.21.13" "tomlkit==0.15.2"
  "flash-linear-attention==0.6.0" "fla-core==0.6.0"
  "moshi==0.2.13"
  "gymnasium==1.4.0" "farama-notifications==0.0.6"
)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation py --abi none --platform any -d "$DEST" "${WHEELS[@]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$DEST" "av==19.0.2"
ls -l "$DEST"
du -sh "$DEST"
