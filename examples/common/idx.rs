//! Reading MNIST in its IDX file format, plain or gzipped, from a local folder (no download).
//!
//! A folder holds either the standard files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
//! `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally `.gz`) or a single set
//! `*-images-idx3-ubyte[.gz]` + `*-labels-idx1-ubyte[.gz]` (such as the 10,000 digits shipped in
//! this crate's `data/`), which is split into train and test by [`load_mnist_dir`]. Shared by the
//! examples and the tests; not part of the library.

#![allow(dead_code)] // each user of this shared file needs only some of it

use candle_core::{Device, Result, Tensor};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Images of an IDX3 file.
#[derive(Debug, Clone)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Rows per image.
    pub rows: usize,
    /// Columns per image.
    pub cols: usize,
    /// `count · rows · cols` bytes, row-major.
    pub pixels: Vec<u8>,
}

fn err(path: &Path, msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {msg}", path.display()))
}

/// The most bytes of pixels or labels a file may announce (the full MNIST training images are
/// 47 MB).
const MAX_BODY: usize = 1 << 30;

/// Reads an IDX file — gunzipped when it starts with the gzip magic — checking its header
/// (`magic`, then `dims` big-endian sizes) before the body: the body is read, and inflated, no
/// further than the header promises, so a small file cannot claim or inflate to gigabytes.
fn read_idx(path: &Path, magic: u32, dims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let file = std::fs::File::open(path).map_err(|e| err(path, e))?;
    let mut raw = std::io::BufReader::new(file);
    let gz = std::io::BufRead::fill_buf(&mut raw)
        .map_err(|e| err(path, e))?
        .starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(raw))
    } else {
        Box::new(raw)
    };
    let corrupt = |e: std::io::Error| err(path, format!("unreadable (corrupt gzip data?): {e}"));
    let need = 4 + 4 * dims;
    let mut head = vec![0u8; need];
    let mut got = 0;
    while got < need {
        match reader.read(&mut head[got..]).map_err(corrupt)? {
            0 => break,
            n => got += n,
        }
    }
    if got < need {
        return Err(err(
            path,
            format!("too short for an IDX header ({got} bytes)"),
        ));
    }
    let word = |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if word(0) != magic {
        return Err(err(
            path,
            format!("IDX magic is {:#010x}, expected {magic:#010x}", word(0)),
        ));
    }
    let shape: Vec<usize> = (0..dims).map(|d| word(4 + 4 * d) as usize).collect();
    let body = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&b| b <= MAX_BODY)
        .ok_or_else(|| {
            err(
                path,
                format!("header announces {shape:?}: more than {MAX_BODY} bytes of data"),
            )
        })?;
    // One byte past the promise tells a longer body from an exact one.
    let mut data = Vec::with_capacity(body.min(1 << 24));
    reader
        .take(body as u64 + 1)
        .read_to_end(&mut data)
        .map_err(corrupt)?;
    if data.len() != body {
        return Err(err(
            path,
            format!(
                "header announces {shape:?} ({body} bytes of data) but the file holds {}",
                if data.len() > body {
                    "more".to_string()
                } else {
                    data.len().to_string()
                }
            ),
        ));
    }
    Ok((shape, data))
}

/// Reads an IDX3 image file (magic `0x00000803`).
pub fn read_idx_images(path: impl AsRef<Path>) -> Result<IdxImages> {
    let (s, pixels) = read_idx(path.as_ref(), 0x0803, 3)?;
    Ok(IdxImages {
        count: s[0],
        rows: s[1],
        cols: s[2],
        pixels,
    })
}

/// Reads an IDX1 label file (magic `0x00000801`).
pub fn read_idx_labels(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    Ok(read_idx(path.as_ref(), 0x0801, 1)?.1)
}

/// Images as `(N, rows·cols)` f32 in `[0, 1]` and labels as `(N,)` u32.
#[derive(Debug, Clone)]
pub struct MnistSplit {
    /// `(N, 784)` pixel intensities scaled to `[0, 1]`.
    pub images: Tensor,
    /// `(N,)` digit labels.
    pub labels: Tensor,
}

impl MnistSplit {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.images.dims()[0]
    }

    /// Whether the split is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Train and test splits.
#[derive(Debug, Clone)]
pub struct Mnist {
    /// Training samples.
    pub train: MnistSplit,
    /// Held-out test samples.
    pub test: MnistSplit,
}

/// Reads one image file and its label file into a split; the counts must agree and every label
/// must be a digit.
pub fn load_split(images: &Path, labels: &Path, device: &Device) -> Result<MnistSplit> {
    let img = read_idx_images(images)?;
    let lab = read_idx_labels(labels)?;
    if img.count != lab.len() {
        candle_core::bail!(
            "{} holds {} images but {} holds {} labels",
            images.display(),
            img.count,
            labels.display(),
            lab.len()
        );
    }
    if let Some(bad) = lab.iter().find(|&&l| l > 9) {
        return Err(err(labels, format!("label {bad} is not a digit 0–9")));
    }
    let dim = img.rows * img.cols;
    let px: Vec<f32> = img.pixels.iter().map(|&p| p as f32 / 255.0).collect();
    Ok(MnistSplit {
        images: Tensor::from_vec(px, (img.count, dim), device)?,
        labels: Tensor::from_vec(
            lab.into_iter().map(u32::from).collect::<Vec<_>>(),
            img.count,
            device,
        )?,
    })
}

fn find(dir: &Path, stem_suffix: &str) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let name = name.strip_suffix(".gz").unwrap_or(name);
            name.ends_with(stem_suffix)
        })
        .collect();
    found.sort();
    Ok(found)
}

fn pick(dir: &Path, prefix: &str, suffix: &str) -> Option<PathBuf> {
    [format!("{prefix}{suffix}"), format!("{prefix}{suffix}.gz")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
}

/// Loads MNIST from `dir`. With the standard four files, `train-*` is the training split and
/// `t10k-*` the test split. With a single image/label set, its last `test_size` samples are the
/// test split and the rest the training split.
pub fn load_mnist_dir(dir: impl AsRef<Path>, test_size: usize, device: &Device) -> Result<Mnist> {
    let dir = dir.as_ref();
    let std_files = (
        pick(dir, "train", "-images-idx3-ubyte"),
        pick(dir, "train", "-labels-idx1-ubyte"),
        pick(dir, "t10k", "-images-idx3-ubyte"),
        pick(dir, "t10k", "-labels-idx1-ubyte"),
    );
    if let (Some(ti), Some(tl), Some(vi), Some(vl)) = std_files {
        let (train, test) = (load_split(&ti, &tl, device)?, load_split(&vi, &vl, device)?);
        for (split, file) in [(&train, &ti), (&test, &vi)] {
            let pixels = split.images.dims()[1];
            if pixels != 28 * 28 {
                candle_core::bail!(
                    "{}: images of {pixels} pixels; MNIST-format sets have 28×28",
                    file.display()
                );
            }
        }
        return Ok(Mnist { train, test });
    }
    let images = find(dir, "-images-idx3-ubyte")?;
    let labels = find(dir, "-labels-idx1-ubyte")?;
    let (images, labels) = match (images.as_slice(), labels.as_slice()) {
        ([i], [l]) => (i.clone(), l.clone()),
        _ => candle_core::bail!(
            "{}: expected the standard MNIST files (train-/t10k-images-idx3-ubyte[.gz], \
             train-/t10k-labels-idx1-ubyte[.gz]) or exactly one *-images-idx3-ubyte[.gz] and one \
             *-labels-idx1-ubyte[.gz]; found {} image and {} label files",
            dir.display(),
            images.len(),
            labels.len()
        ),
    };
    let all = load_split(&images, &labels, device)?;
    let pixels = all.images.dims()[1];
    if pixels != 28 * 28 {
        candle_core::bail!(
            "{}: images of {pixels} pixels; MNIST-format sets have 28×28",
            images.display()
        );
    }
    let n = all.len();
    if n < 2 {
        candle_core::bail!(
            "{}: {n} samples, too few to split into a training and a test set",
            images.display()
        );
    }
    if test_size == 0 || test_size >= n {
        candle_core::bail!(
            "test_size must be in 1..{n} for {} samples, got {test_size}",
            n
        );
    }
    let cut = n - test_size;
    let part = |start, len| -> Result<MnistSplit> {
        Ok(MnistSplit {
            images: all.images.narrow(0, start, len)?,
            labels: all.labels.narrow(0, start, len)?,
        })
    };
    Ok(Mnist {
        train: part(0, cut)?,
        test: part(cut, test_size)?,
    })
}
