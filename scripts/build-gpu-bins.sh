#!/usr/bin/env bash
# Builds, on a machine with no GPU, the two `--features cuda` binaries that scripts/gpu-check.sh
# runs on a GPU machine (which has no Rust), and puts them, stripped and xz-compressed, in
# target/cuda-bin:
#
#   cuda_tests.xz   the tests/cuda.rs test binary
#   bench_cuda.xz   examples/bench_cuda.rs
#
#   bash scripts/build-gpu-bins.sh           # then carry target/cuda-bin to the GPU machine
#
# Linking needs libcuda/libnvrtc/libcurand/libcublas/libcublasLt, which a machine without a GPU
# does not have: scripts/cuda-stubs.py writes link-time stand-ins with the real sonames (see
# docs/cuda.md). libcudart (linked by candle-kernels) is the real one from the PyPI toolkit.
# Fails on any error, and if the pair is too large to carry (a GPU run carries 64 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=.ci/cuda-toolkit.sh
source .ci/cuda-toolkit.sh

STUBS="$PWD/target/cuda-stubs"
TARGET="$PWD/target/cuda-link"
OUT="$PWD/target/cuda-bin"

cudarc_dir=$(cargo metadata --format-version 1 --features cuda |
    python3 -c 'import json, os, sys
pkgs = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
assert len(pkgs) == 1, f"expected one cudarc package, found {len(pkgs)}"
print(os.path.dirname(pkgs[0]["manifest_path"]))')
echo "build-gpu-bins: cudarc sources in $cudarc_dir"
python3 scripts/cuda-stubs.py "$cudarc_dir" "$STUBS"
ln -sf "$CUDA/lib/libcudart.so.13" "$STUBS/libcudart.so"

# Its own target dir: RUSTFLAGS differ from the CI check's, and would rebuild it all.
export CARGO_TARGET_DIR="$TARGET"
export RUSTFLAGS="-L native=$STUBS"
executables() { # cargo's JSON messages -> the paths of the executables built
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])'
}
tests_bin=$(cargo test --release --features cuda --test cuda --no-run --message-format=json |
    executables)
bench_bin=$(cargo build --release --features cuda --example bench_cuda --message-format=json |
    executables)
[[ -x "$tests_bin" && -x "$bench_bin" ]] || {
    echo "build-gpu-bins: cargo did not report both executables" >&2
    exit 1
}

rm -rf "$OUT"
mkdir -p "$OUT"
cp "$tests_bin" "$OUT/cuda_tests"
cp "$bench_bin" "$OUT/bench_cuda"
strip "$OUT/cuda_tests" "$OUT/bench_cuda"

# The binaries must ask for the real libraries by soname, and must not point at the stubs.
for b in "$OUT/cuda_tests" "$OUT/bench_cuda"; do
    needed=$(readelf -d "$b" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
    for want in libcuda.so.1 libcublas.so.13 libcurand.so.10 libcudart.so.13; do
        [[ " $needed" == *" $want "* ]] || {
            echo "build-gpu-bins: $b does not need $want (needs: $needed)" >&2
            exit 1
        }
    done
    if readelf -d "$b" | grep -qE '\((RPATH|RUNPATH)\)'; then
        echo "build-gpu-bins: $b has an rpath: $(readelf -d "$b" | grep -E 'R(UN)?PATH')" >&2
        exit 1
    fi
    # The GPU machine's C library must be at least this new (built here, run there).
    glibc=$(objdump -T "$b" | grep -oE 'GLIBC_[0-9.]+' | sort -uV | tail -1)
    echo "build-gpu-bins: $b: $(du -h "$b" | cut -f1), needs $needed(newest symbol version $glibc)"
done
# Smoke test against the stubs, whose cuInit reports "no device": the binaries load (every
# symbol resolves) and the tests take their no-device path.
smoke=$(LD_LIBRARY_PATH="$STUBS:$CUDA/lib" "$OUT/cuda_tests" --test-threads=1 --nocapture 2>&1) || {
    echo "$smoke" >&2
    echo "build-gpu-bins: cuda_tests failed against the stubs" >&2
    exit 1
}
grep -q "skipped: no CUDA device" <<<"$smoke" || {
    echo "$smoke" >&2
    echo "build-gpu-bins: cuda_tests did not report a missing device" >&2
    exit 1
}
echo "build-gpu-bins: cuda_tests runs against the stubs: $(grep -c 'skipped: no CUDA device' <<<"$smoke") tests skipped (no device)"

# Stripped, each binary is ~45 MiB, mostly candle's embedded PTX text; xz shrinks it ~8x, and
# gpu-check.sh unpacks it (with python3's lzma) before running.
python3 - "$OUT/cuda_tests" "$OUT/bench_cuda" <<'PY'
import lzma, os, sys
for path in sys.argv[1:]:
    with open(path, "rb") as f, lzma.open(path + ".xz", "wb", preset=6) as g:
        g.write(f.read())
    os.remove(path)
PY
total=$(du -cb "$OUT"/* | tail -1 | cut -f1)
if ((total > 48 * 1024 * 1024)); then
    echo "build-gpu-bins: $OUT holds $total bytes, too much to carry next to the tree" >&2
    exit 1
fi
echo "build-gpu-bins: ok, $((total / 1024 / 1024)) MiB in $OUT ($(ls "$OUT" | tr '\n' ' '))"
