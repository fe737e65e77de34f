#!/usr/bin/env bash
# Download, on the developer machine, the wheels the lent GPU machine lacks (it has Python
# 3.12, torch, transformers, safetensors, scipy, pillow, numba ... but no package index).
# They land in .whl/ (git-ignored through .git/info/exclude) and travel with `carry: [".whl"]`;
# bench/device/run_all.sh installs them there. Versions follow this project's lock on the CPU
# machine; together they stay under the device tool's 64 MiB carry limit.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PIP="${PIP:-python3 -m pip}"
rm -rf .whl && mkdir -p .whl
PKGS=(
  diffusers==0.42.1          # AutoencoderKLWan, attention dispatch, ModelMixin
  torchao==0.18.0            # int8 / fp8 levers
  imageio-ffmpeg==0.6.0      # ffmpeg binary (0.8 is 68 MB, over the carry limit)
  soundfile==0.14.0          # wav decode (bundles libsndfile)
  cffi==2.1.1 pycparser==3.12  # soundfile's binding (not on the device image)
  pyloudnorm==0.2.0          # official loudness normalisation
  ftfy==6.3.1 wcwidth==0.9.4  # UMT5 prompt cleaning
)
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  "${PKGS[@]}"
du -ch .whl/*.whl | tail -1
