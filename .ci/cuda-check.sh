#!/usr/bin/env bash
# Build check of the `cuda` feature on a machine without a GPU: installs the pinned CUDA 13.0
# compiler from PyPI into a cache folder (once, .ci/cuda-toolkit.sh), compiles every kernels/*.cu
# to PTX with warnings as errors and assembles it with ptxas (no register spills), runs the
# kernels' source under the host emulation against the CPU ops (kernels/emu,
# tests/kernel_emulation*.rs), and runs
# `cargo check --features cuda --all-targets` and `--features nccl` in their own target dir.
#
#   bash .ci/cuda-check.sh            # cache in $CUDA_PIP_DIR (default: ~/.cache/candle-reliance/cuda-13.0.88)
#
# Fails loudly if anything cannot be installed or compiled; it never skips. See docs/cuda.md.
set -euo pipefail

cd "$(dirname "$0")/.."

start=$(date +%s)
# shellcheck source=.ci/cuda-toolkit.sh
source .ci/cuda-toolkit.sh

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
    # Assemble the PTX as the driver's JIT will on the GPU, so a kernel the driver would reject
    # at load time fails here. A register spill in these small kernels is a regression: fail.
    info=$(ptxas "-arch=sm_${CUDA_COMPUTE_CAP}" -O3 -Werror -v -o /dev/null "$out" 2>&1) || {
        echo "$info" >&2
        echo "cuda-check: ptxas rejected $out" >&2
        exit 1
    }
    if grep -Eq '[1-9][0-9]* bytes spill (stores|loads)' <<<"$info"; then
        echo "$info" >&2
        echo "cuda-check: $out spills registers" >&2
        exit 1
    fi
    regs=$(grep -o 'Used [0-9]* registers' <<<"$info" | awk '{print $2}' | sort -n | tail -1)
    echo "cuda-check: ptxas sm_${CUDA_COMPUTE_CAP} ok for $out (at most $regs registers, no spills)"
done

# The kernels' source run on the host against the CPU ops (kernels/README.md, "Host
# emulation"), without a GPU: clamp and noise one thread at a time (index arithmetic, the noise
# generator), stats with the threads of each block run concurrently as coroutines (barriers,
# warp shuffles, shared memory, f64 atomics; several thread schedules).
t_emu=$(date +%s)
g++ -std=c++17 -O2 -ffp-contract=off -Wall -Wextra -Werror -I"$CUDA/include" \
    -o target/cuda/kernel-emu kernels/emu/emulate.cpp
CANDLE_RELIANCE_KERNEL_EMU="$PWD/target/cuda/kernel-emu" \
    cargo test --test kernel_emulation --test kernel_emulation_stats -- --nocapture
echo "cuda-check: kernel emulation ok ($(($(date +%s) - t_emu)) s)"
t_ptx=$(date +%s)

CARGO_TARGET_DIR="${CARGO_TARGET_DIR_CUDA:-target/cuda}" \
    cargo check --features cuda --all-targets
t_nccl=$(date +%s)
# The NCCL collective, in the same target dir: only cudarc, candle-core/-nn and this crate are
# checked again (candle's kernels are not rebuilt).
CARGO_TARGET_DIR="${CARGO_TARGET_DIR_CUDA:-target/cuda}" \
    cargo check --features nccl --all-targets
end=$(date +%s)
echo "cuda-check: ok (install+ptx $((t_ptx - start)) s, cargo check cuda $((t_nccl - t_ptx)) s, nccl $((end - t_nccl)) s)"
