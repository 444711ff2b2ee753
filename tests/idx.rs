//! The IDX reader the examples share (`examples/common/idx.rs`) on hostile files: sizes that
//! overflow, gzip that inflates without end, images of the wrong size, empty sets.

#[path = "../examples/common/idx.rs"]
mod idx;

use std::io::Write;
use std::path::Path;

fn idx_bytes(magic: u32, dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(body);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn sizes_that_overflow_are_errors() {
    // 4 × 2³¹ × 2³¹ wrapped to 0 in release builds: the file loaded "fine" and panicked later.
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "a-images-idx3-ubyte",
        &idx_bytes(0x803, &[4, 1 << 31, 1 << 31], &[]),
    );
    let e = idx::read_idx_images(&p).unwrap_err().to_string();
    assert!(
        e.contains("more than") && e.contains("bytes of data"),
        "{e}"
    );
}

#[test]
fn gzip_is_inflated_no_further_than_the_header_promises() {
    // 1 000 labels promised, 64 MB of zeros behind them, a small file: inflating it all cost
    // gigabytes before the error.
    let dir = tempfile::tempdir().unwrap();
    let body = vec![0u8; 64 << 20];
    let bomb = gz(&idx_bytes(0x801, &[1000], &body));
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    let p = write(dir.path(), "a-labels-idx1-ubyte.gz", &bomb);
    let t = std::time::Instant::now();
    let e = idx::read_idx_labels(&p).unwrap_err().to_string();
    assert!(e.contains("holds more"), "{e}");
    assert!(t.elapsed().as_secs_f64() < 1.0, "{:?}", t.elapsed());
    // The exact file reads, plain or gzipped; a short one is an error.
    let exact = idx_bytes(0x801, &[3], &[1, 2, 3]);
    let p = write(dir.path(), "b-labels-idx1-ubyte.gz", &gz(&exact));
    assert_eq!(idx::read_idx_labels(&p).unwrap(), vec![1, 2, 3]);
    let p = write(dir.path(), "c-labels-idx1-ubyte", &exact[..10]);
    let e = idx::read_idx_labels(&p).unwrap_err().to_string();
    assert!(e.contains("holds 2"), "{e}");
}

#[test]
fn images_must_be_28_by_28_and_sets_not_empty() {
    let dev = candle_core::Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "x-images-idx3-ubyte",
        &idx_bytes(0x803, &[4, 2, 3], &[0; 24]),
    );
    write(
        dir.path(),
        "x-labels-idx1-ubyte",
        &idx_bytes(0x801, &[4], &[0, 1, 2, 3]),
    );
    let e = idx::load_mnist_dir(dir.path(), 1, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("6 pixels") && e.contains("28×28"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "x-images-idx3-ubyte",
        &idx_bytes(0x803, &[0, 28, 28], &[]),
    );
    write(
        dir.path(),
        "x-labels-idx1-ubyte",
        &idx_bytes(0x801, &[0], &[]),
    );
    let e = idx::load_mnist_dir(dir.path(), 1, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("0 samples, too few"), "{e}");
}
