//! The host kernel emulator (`kernels/emu/emulate.cpp`) as the emulation tests call it.
#![allow(dead_code)]

use candle_core::DType;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const ENV: &str = "CANDLE_RELIANCE_KERNEL_EMU";

/// The emulator named by [`ENV`], or `None` (after printing "skipped: ...") when it is unset.
pub fn emulator() -> Option<PathBuf> {
    match std::env::var_os(ENV) {
        None => {
            println!(
                "skipped: {ENV} is not set (build kernels/emu/emulate.cpp, see kernels/README.md)"
            );
            None
        }
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "{ENV}={} is not a file", p.display());
            Some(p)
        }
    }
}

/// Runs the emulator with `args`, `input` on its stdin; its stdout. Panics if it fails.
pub fn call(emu: &Path, args: &[String], input: Vec<u8>) -> Vec<u8> {
    let mut child = Command::new(emu)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", emu.display()));
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("emulator output");
    assert!(
        out.status.success(),
        "kernel-emu {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    writer
        .join()
        .expect("stdin writer")
        .expect("write to emulator");
    out.stdout
}

/// The kernels' dtype suffix, as candle's `kernel_name` builds it.
pub fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => unreachable!(),
    }
}
