#!/usr/bin/env bash
# Build check of the `cuda` feature on a machine without a GPU: installs the pinned CUDA 13.0
# compiler from PyPI into a cache folder (once), compiles every kernels/*.cu to PTX with warnings
# as errors, and runs `cargo check --features cuda --all-targets` in its own target dir.
#
#   bash .ci/cuda-check.sh            # cache in $CUDA_PIP_DIR (default: ~/.cache/candle-reliance/cuda-13.0.88)
#
# Fails loudly if anything cannot be installed or compiled; it never skips. See docs/cuda.md.
set -euo pipefail

cd "$(dirname "$0")/.."

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

start=$(date +%s)
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" || ! -x "$CUDA/bin/nvcc" ]]; then
    echo "cuda-check: installing ${PKGS[*]} into $DIR"
    rm -rf "$DIR"
    mkdir -p "$DIR"
    PIP=(python3 -m pip)
    "${PIP[@]}" --version >/dev/null
    "${PIP[@]}" install --quiet --disable-pip-version-check --no-deps --target "$DIR" "${PKGS[@]}"
    echo "$WANT" >"$STAMP"
else
    echo "cuda-check: using cached toolkit in $DIR"
fi

# The layout the wheels give (checked, so a changed layout fails here and not later).
for f in bin/nvcc bin/ptxas bin/cudafe++ nvvm/bin/cicc nvvm/libdevice/libdevice.10.bc \
    include/cuda_runtime.h include/cuda_fp16.h include/cuda_bf16.h include/crt/host_config.h \
    include/cccl/cuda/std/version lib/libcudart.so.13; do
    [[ -e "$CUDA/$f" ]] || { echo "cuda-check: missing $CUDA/$f" >&2; exit 1; }
done

export PATH="$CUDA/bin:$PATH"
export CUDA_HOME="$CUDA"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -2
nvcc --version | grep -q "release 13.0," || { echo "cuda-check: nvcc is not 13.0" >&2; exit 1; }

ptx_dir="target/cuda/ptx"
mkdir -p "$ptx_dir"
shopt -s nullglob
kernels=(kernels/*.cu)
[[ ${#kernels[@]} -gt 0 ]] || { echo "cuda-check: no kernels/*.cu" >&2; exit 1; }
for cu in "${kernels[@]}"; do
    out="$ptx_dir/$(basename "${cu%.cu}").ptx"
    nvcc -ptx "-arch=sm_${CUDA_COMPUTE_CAP}" -O3 -std=c++17 -Werror all-warnings -Ikernels \
        -o "$out" "$cu"
    grep -q '^\.version 9\.0$' "$out" || { echo "cuda-check: $out is not PTX ISA 9.0" >&2; exit 1; }
    echo "cuda-check: $cu -> $out ($(grep -c '^\.visible \.entry' "$out") kernels)"
done

# The clamp and noise kernels' source run on the host against the CPU ops (kernels/README.md,
# "Host emulation"): index arithmetic and the noise generator, without a GPU.
t_emu=$(date +%s)
g++ -std=c++17 -O2 -ffp-contract=off -Wall -Wextra -Werror -I"$CUDA/include" \
    -o target/cuda/kernel-emu kernels/emu/emulate.cpp
CANDLE_RELIANCE_KERNEL_EMU="$PWD/target/cuda/kernel-emu" \
    cargo test --test kernel_emulation -- --nocapture
echo "cuda-check: kernel emulation ok ($(($(date +%s) - t_emu)) s)"
t_ptx=$(date +%s)

CARGO_TARGET_DIR="${CARGO_TARGET_DIR_CUDA:-target/cuda}" \
    cargo check --features cuda --all-targets
end=$(date +%s)
echo "cuda-check: ok (install+ptx $((t_ptx - start)) s, cargo check $((end - t_ptx)) s)"
