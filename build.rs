//! Compiles `kernels/*.cu` to PTX with nvcc when the `cuda` feature is on; does nothing otherwise.
//!
//! nvcc is found like candle finds it: `$NVCC`, then `nvcc` on `PATH`, then `$CUDA_HOME/bin/nvcc`.
//! The target is `sm_$CUDA_COMPUTE_CAP` (accepts `90`, `90a`, `sm_90`, `9.0`), `sm_90` by default.
//! The PTX is written to `$OUT_DIR/<name>.ptx` and embedded by `src/ops/cuda.rs`. See docs/cuda.md.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP", "NVCC_CCBIN"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = find_nvcc();
    let arch = compute_arch();
    check_version(&nvcc);

    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ directory")
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
    }
    for src in sources
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
    {
        let stem = src.file_stem().expect("file name").to_string_lossy();
        let out = out_dir.join(format!("{stem}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.arg("-ptx")
            .arg(format!("-arch={arch}"))
            .args(["-O3", "-std=c++17", "-Werror", "all-warnings", "-Ikernels"])
            .arg("-o")
            .arg(&out)
            .arg(src);
        if let Ok(ccbin) = std::env::var("NVCC_CCBIN") {
            cmd.arg("-ccbin").arg(ccbin);
        }
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        if !status.success() {
            panic!("nvcc failed on {} ({status}): {cmd:?}", src.display());
        }
    }
}

fn find_nvcc() -> PathBuf {
    if let Some(nvcc) = std::env::var_os("NVCC") {
        return PathBuf::from(nvcc);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let nvcc = dir.join("nvcc");
            if nvcc.is_file() {
                return nvcc;
            }
        }
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let nvcc = Path::new(&home).join("bin").join("nvcc");
        if nvcc.is_file() {
            return nvcc;
        }
    }
    panic!(
        "the `cuda` feature needs nvcc (CUDA 13.0): set NVCC, put nvcc on PATH or set CUDA_HOME; \
         see docs/cuda.md"
    );
}

/// `sm_NN[a]` from `CUDA_COMPUTE_CAP`, `sm_90` when unset.
fn compute_arch() -> String {
    let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") else {
        return "sm_90".to_string();
    };
    let c = cap.trim().to_ascii_lowercase();
    let c = c.strip_prefix("sm_").unwrap_or(&c).replace('.', "");
    let digits = c.trim_end_matches(|ch: char| ch.is_ascii_alphabetic());
    if digits.len() < 2 || !digits.chars().all(|ch| ch.is_ascii_digit()) {
        panic!("CUDA_COMPUTE_CAP={cap:?}: expected e.g. 90, 90a, sm_90 or 9.0");
    }
    format!("sm_{c}")
}

/// PTX from a newer toolkit than the driver's does not load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION);
/// the target GPUs run a CUDA 13.0 driver, so warn about any other nvcc.
fn check_version(nvcc: &Path) {
    match Command::new(nvcc).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            if !text.contains("release 13.0,") {
                let line = text.lines().find(|l| l.contains("release")).unwrap_or("?");
                println!(
                    "cargo:warning=nvcc is not CUDA 13.0 ({}): its PTX may not load on a CUDA \
                     13.0 driver",
                    line.trim()
                );
            }
        }
        _ => panic!("`{} --version` failed", nvcc.display()),
    }
}
