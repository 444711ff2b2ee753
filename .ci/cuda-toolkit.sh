#!/usr/bin/env bash
# Sourced, not run: installs the pinned CUDA 13.0 compiler from PyPI into a cache folder (once)
# and exports PATH, CUDA_HOME and CUDA_COMPUTE_CAP for it. Used by .ci/cuda-check.sh and
# scripts/build-gpu-bins.sh. Exits the caller on any failure; it never skips.
#
#   source .ci/cuda-toolkit.sh       # cache in $CUDA_PIP_DIR (default: ~/.cache/candle-reliance/cuda-13.0.88)
#
# After it: $CUDA is the toolkit root (bin/nvcc, include/, lib/libcudart.so.13).

# CUDA 13.0 Update 1 (nvcc V13.0.88). The GPUs' driver is CUDA 13.0: PTX from a newer nvcc
# does not load there, so these pins move only with the driver.
PKGS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-runtime==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
)
DIR="${CUDA_PIP_DIR:-$HOME/.cache/candle-reliance/cuda-13.0.88}"
CUDA="$DIR/nvidia/cu13"
STAMP="$DIR/.installed"
WANT="${PKGS[*]}"

if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" || ! -x "$CUDA/bin/nvcc" ]]; then
    echo "cuda-toolkit: installing ${PKGS[*]} into $DIR"
    rm -rf "$DIR"
    mkdir -p "$DIR"
    PIP=(python3 -m pip)
    "${PIP[@]}" --version >/dev/null
    "${PIP[@]}" install --quiet --disable-pip-version-check --no-deps --target "$DIR" "${PKGS[@]}"
    echo "$WANT" >"$STAMP"
else
    echo "cuda-toolkit: using cached toolkit in $DIR"
fi

# The layout the wheels give (checked, so a changed layout fails here and not later).
for f in bin/nvcc bin/ptxas bin/cudafe++ nvvm/bin/cicc nvvm/libdevice/libdevice.10.bc \
    include/cuda_runtime.h include/cuda_fp16.h include/cuda_bf16.h include/crt/host_config.h \
    include/cccl/cuda/std/version lib/libcudart.so.13; do
    [[ -e "$CUDA/$f" ]] || { echo "cuda-toolkit: missing $CUDA/$f" >&2; exit 1; }
done

export PATH="$CUDA/bin:$PATH"
export CUDA_HOME="$CUDA"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -2
nvcc --version | grep -q "release 13.0," || { echo "cuda-toolkit: nvcc is not 13.0" >&2; exit 1; }

