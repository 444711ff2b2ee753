#!/usr/bin/env python3
"""Link-time stand-ins for the CUDA libraries candle links, for building `--features cuda`
binaries on a machine with no GPU and no CUDA libraries.

candle enables cudarc's `dynamic-linking`, so every `--features cuda` binary is linked with
`-lcuda -lnvrtc -lcurand -lcublas -lcublasLt`. This writes, into OUT_DIR, one small shared
library per name that has the real library's soname (plus a link named by the soname) and
defines every function cudarc's bindings declare for it. The binary records the sonames only; on
the GPU machine the dynamic loader binds every symbol to the real driver and libraries. The stubs
are never carried. Each stub function returns an error status (the driver's is
CUDA_ERROR_NO_DEVICE), so a binary run against them here behaves as on a machine without a GPU:
`cuInit` fails and nothing else is reached. build-gpu-bins.sh uses that as a smoke test.

    python3 scripts/cuda-stubs.py CUDARC_SRC_DIR OUT_DIR

CUDARC_SRC_DIR is the cudarc crate's folder (the one holding `src/`); build-gpu-bins.sh finds
it with `cargo metadata`.
"""
import os
import re
import subprocess
import sys

# cudarc module -> (link name, soname of the CUDA 13 library on the GPU machine, error status).
LIBS = {
    "driver": ("cuda", "libcuda.so.1", 100),  # CUDA_ERROR_NO_DEVICE
    "nvrtc": ("nvrtc", "libnvrtc.so.13", 7),  # NVRTC_ERROR_INTERNAL_ERROR
    "curand": ("curand", "libcurand.so.10", 201),  # CURAND_STATUS_NOT_INITIALIZED
    "cublas": ("cublas", "libcublas.so.13", 1),  # CUBLAS_STATUS_NOT_INITIALIZED
    "cublaslt": ("cublasLt", "libcublasLt.so.13", 1),
}

# The `not(dynamic-loading)` arm of each binding: `extern "C" { fn NAME(`.
EXTERN_FN = re.compile(r'extern "C" \{\s*fn (\w+)\(')


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for module, (link, soname, status) in LIBS.items():
        path = os.path.join(src, "src", module, "sys", "mod.rs")
        try:
            text = open(path, encoding="utf-8").read()
        except OSError as e:
            print(f"cuda-stubs: cannot read {path}: {e}", file=sys.stderr)
            return 1
        names = sorted(set(EXTERN_FN.findall(text)))
        if not names:
            print(f"cuda-stubs: no extern functions found in {path}", file=sys.stderr)
            return 1
        c_file = os.path.join(out, f"{link}.c")
        with open(c_file, "w", encoding="utf-8") as f:
            f.write(f"/* Link-time stand-in for {soname}; generated from {path}. */\n")
            for name in names:
                f.write(f"int {name}(void) {{ return {status}; }}\n")
        lib = os.path.join(out, f"lib{link}.so")
        subprocess.run(
            ["cc", "-shared", "-fPIC", "-O0", f"-Wl,-soname,{soname}", "-o", lib, c_file],
            check=True,
        )
        link_path = os.path.join(out, soname)
        if os.path.lexists(link_path):
            os.remove(link_path)
        os.symlink(f"lib{link}.so", link_path)
        print(f"cuda-stubs: {lib} ({soname}, {len(names)} functions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
