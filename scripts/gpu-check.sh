#!/usr/bin/env bash
# GPU check of the `cuda` feature, for a machine with an NVIDIA GPU and the CUDA 13.0 libraries
# but no Rust and no network. Runs two binaries built elsewhere by scripts/build-gpu-bins.sh (see
# docs/cuda.md, "Building what the GPU machine runs") and prints a short table:
#
#   target/cuda-bin/cuda_tests.xz    the tests/cuda.rs test binary (CUDA vs CPU, bit-exact clamp)
#   target/cuda-bin/bench_cuda.xz    examples/bench_cuda.rs (bandwidth + MNIST MLP GPU vs CPU)
#
#   bash scripts/gpu-check.sh [BIN_DIR]
#
# Exit status: non-zero if a binary is missing, cannot load its libraries, or a check fails or
# runs past GPU_CHECK_LIMIT_S seconds (default 240 per binary). With $OUT set, the raw test log
# and bench JSON are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/cuda-bin}"
# scripts/build-gpu-bins.sh leaves them xz-compressed (to fit what a run can carry): unpack.
UNPACKED=/tmp/candle-reliance-gpu-bin
mkdir -p "$UNPACKED"
for name in cuda_tests bench_cuda; do
    if [[ -f "$BIN/$name.xz" ]]; then
        python3 -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as f, open(sys.argv[2], "wb") as g:
    shutil.copyfileobj(f, g)' "$BIN/$name.xz" "$UNPACKED/$name"
        chmod +x "$UNPACKED/$name"
    elif [[ -f "$BIN/$name" ]]; then
        cp "$BIN/$name" "$UNPACKED/$name"
    else
        echo "gpu-check: missing $BIN/$name.xz (build it with scripts/build-gpu-bins.sh)" >&2
        exit 1
    fi
done
TESTS="$UNPACKED/cuda_tests"
BENCH="$UNPACKED/bench_cuda"

# Libraries the binaries link (cudarc's dynamic linking): libcuda.so.1 (driver), and
# libcudart/libcublas/libcublasLt/libnvrtc .so.13 and libcurand.so.10 from a CUDA 13 toolkit,
# or from the nvidia-* wheels that PyTorch/CuPy install.
extra=()
for d in "${CUDA_HOME:-/usr/local/cuda}/lib64" /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 \
    /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [[ -d "$d" ]] && extra+=("$d")
done
if command -v python3 >/dev/null; then
    while IFS= read -r d; do [[ -n "$d" ]] && extra+=("$d"); done < <(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for d in sorted(set(os.path.dirname(p) for p in glob.glob(os.path.join(r, "nvidia", "**", "lib*.so*"), recursive=True))):
        print(d)
PY
)
fi
if [[ ${#extra[@]} -gt 0 ]]; then
    LD_LIBRARY_PATH="$(IFS=:; echo "${extra[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
fi
for b in "$TESTS" "$BENCH"; do
    if ldd "$b" | grep -q "not found"; then
        echo "gpu-check: $b cannot find:" >&2
        ldd "$b" | grep "not found" >&2
        exit 1
    fi
done
echo "== libraries"
ldd "$TESTS" | grep -E "libcuda|libcublas|libcurand|libcudart|libnvrtc" || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "gpu-check: nvidia-smi not available"

# A hung kernel must not use up a lent machine's time: each binary gets a time limit, and what
# ran before it still reaches the table.
LIMIT_S="${GPU_CHECK_LIMIT_S:-240}"
status=0
echo "== tests/cuda.rs"
if timeout "$LIMIT_S" "$TESTS" --test-threads=1 --nocapture 2>&1 | tee /tmp/gpu-check-tests.log; then
    tests_result="pass"
else
    tests_result="FAIL"; status=1
fi
grep -q "skipped: no CUDA device" /tmp/gpu-check-tests.log && { tests_result="SKIPPED (no device)"; status=1; }

echo "== bench_cuda"
if timeout "$LIMIT_S" "$BENCH" --data data --reps 20 >/tmp/gpu-check-bench.json 2>/tmp/gpu-check-bench.err; then
    bench_ok=1
else
    bench_ok=0; status=1; cat /tmp/gpu-check-bench.err >&2
fi

# Reference copy bandwidth from CuPy, when present (same size as the bench's output).
cupy_gbps=$(python3 - <<'PY' 2>/dev/null || echo "n/a"
import cupy as cp
a = cp.ones(16 * 4096 * 1024, dtype=cp.float32); b = cp.empty_like(a)
s, e = cp.cuda.Event(), cp.cuda.Event()
cp.copyto(b, a); cp.cuda.Device().synchronize()
t = []
for _ in range(20):
    s.record(); cp.copyto(b, a); e.record(); e.synchronize(); t.append(cp.cuda.get_elapsed_time(s, e))
t.sort(); print(f"{2 * a.nbytes / (t[len(t) // 2] / 1e3) / 1e9:.0f}")
PY
)

python3 - "$tests_result" "$bench_ok" "$cupy_gbps" <<'PY' || status=1
import json, sys
tests, bench_ok, cupy = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
print()
print(f"{'check':34} {'result':>24}")
print(f"{'tests/cuda.rs (CUDA vs CPU)':34} {tests:>24}")
if not bench_ok:
    print(f"{'bench_cuda':34} {'FAIL':>24}"); sys.exit(0)
r = json.load(open("/tmp/gpu-check-bench.json"))
bw, m = r["bandwidth"], r["mnist"]
print(f"{'op (256 MiB f32 activations)':34} {'ms':>10} {'GB/s':>13}")
labels = {"clamp": "clamp, later probe (L*M rows in)"}
for k in ["d2d_copy", "clamp_expand", "clamp", "noise_expand", "unit_sums"]:
    print(f"{labels.get(k, k):34} {bw[k]['ms']:>10.3f} {bw[k]['gbps']:>13.0f}")
print(f"{'cupy copy (reference)':34} {'':>10} {cupy:>13}")
print(f"{'clamp_expand / d2d_copy':34} {bw['clamp_expand']['gbps'] / bw['d2d_copy']['gbps']:>24.2f}")
print(f"MNIST MLP 784-256-256-10, {m['samples']} samples, trained {m['train_s']:.1f} s on GPU")
for d in ["cuda", "cpu"]:
    x = m[d]
    print(f"  {d:5} acc {x['train_accuracy']:.4f}  ablation AUC {x['ablation_auc']:.4f} ({x['ablation_s']:.2f} s)"
          f"  noise AUC {x['noise_auc']:.4f} ({x['noise_s']:.2f} s)  batched {x['batched']}")
c = m["cuda"]
print(f"  GPU check (ablation + noise curves) / one training epoch of {m['epoch_s']:.2f} s: "
      f"{(c['ablation_s'] + c['noise_s']) / m['epoch_s']:.2f}")
print(f"  max |Δ accuracy|: ablation {m['max_abs_diff_ablation']:.4f}, noise {m['max_abs_diff_noise']:.4f}"
      f"  -> {'ok' if m['ok'] else 'FAIL'}")
if not m["ok"]:
    sys.exit(1)
PY
# On the lent machine, $OUT is the folder whose files come back: keep the raw logs there too.
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
    cp /tmp/gpu-check-tests.log /tmp/gpu-check-bench.json /tmp/gpu-check-bench.err "$OUT"/ 2>/dev/null || true
fi
exit $status
