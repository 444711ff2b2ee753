//! The monitor's files, written so that a crash at any point leaves them consistent with each
//! other (see `docs/usage.md`, "Faults and recovery"):
//!
//! - the state file is written last, atomically, and is authoritative;
//! - a history line is appended whole, in one write; on resume the history is rewritten from
//!   the state, dropping lines of checks the state never committed;
//! - the kept weights go to a snapshot file named by its epoch (`PATH.epochE`), tagged with that
//!   epoch inside; the previous one is removed only after the state naming the new one is
//!   committed, and `finish` moves the kept one to `PATH`;
//! - temporary files are removed on resume; existing files are moved aside by a fresh run, never
//!   overwritten;
//! - an advisory lock on each output folder keeps two monitors out of each other's files.

use crate::error::{fail, Error};
use crate::Result;
use candle_core::Tensor;
use candle_nn::VarMap;
use serde::Serialize;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub(crate) fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(what, path, e)
}

/// A place where a crash would leave the files half-written. With the `test-hooks` feature
/// (this crate's own tests only) the process aborts at the k-th such place when
/// `CANDLE_RELIANCE_ABORT_AT_WRITE=k` is set, so that the tests can crash a run at every write
/// and check what a resume makes of the files. Other builds compile it to nothing.
#[inline(always)]
pub(crate) fn fault_point() {
    #[cfg(feature = "test-hooks")]
    {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static LEFT: AtomicUsize = AtomicUsize::new(usize::MAX);
        static INIT: std::sync::Once = std::sync::Once::new();
        INIT.call_once(|| {
            if let Some(k) = std::env::var("CANDLE_RELIANCE_ABORT_AT_WRITE")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
            {
                LEFT.store(k, Ordering::SeqCst);
            }
        });
        if LEFT.fetch_sub(1, Ordering::SeqCst) == 1 {
            std::process::abort();
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Moves an existing file to the first free `NAME.N.bak`, returning where it went.
pub(crate) fn move_aside(path: &Path) -> Result<Option<PathBuf>> {
    if !path.exists() {
        return Ok(None);
    }
    for n in 1.. {
        let target = with_suffix(path, &format!(".{n}.bak"));
        if !target.exists() {
            std::fs::rename(path, &target).map_err(|e| io_err("move aside", path, e))?;
            return Ok(Some(target));
        }
    }
    unreachable!()
}

/// The folder `path` is in: its parent, or `.` for a bare file name.
pub(crate) fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The epoch snapshot files of `path` in its folder, `PATH.epoch<rest>`, with `<rest>`.
pub(crate) fn snapshot_files(path: &Path) -> std::io::Result<Vec<(PathBuf, String)>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(vec![]);
    };
    let prefix = format!("{name}.epoch");
    Ok(std::fs::read_dir(folder_of(path))?
        .flatten()
        .filter_map(|e| {
            let rest = e.file_name().to_str()?.strip_prefix(&prefix)?.to_string();
            Some((e.path(), rest))
        })
        .collect())
}

pub(crate) fn ensure_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => {
            std::fs::create_dir_all(p).map_err(|e| io_err("create directory", p, e))
        }
        _ => Ok(()),
    }
}

/// Checks now, not at the first write, that `path` can be written: its folder exists (or is
/// created) and takes a file, and `path` itself is not a folder.
pub(crate) fn check_writable(key: &str, path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::file(
            path,
            format!(
                "reliance config: {key}: {} is a directory, not a file",
                path.display()
            ),
        ));
    }
    ensure_parent(path)?;
    let probe = with_suffix(path, ".write-check");
    File::create(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| Error::Io {
            message: format!(
                "reliance config: {key}: cannot write next to {}: {e}",
                path.display()
            ),
            path: path.to_path_buf(),
            source: e,
        })
}

/// Appends one JSON line in a single write, so a crash leaves at most one cut line at the end,
/// and flushes it to the disk, so a power loss after the call cannot lose it.
pub(crate) fn append_json_line<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut line = serde_json::to_string(value).map_err(|e| fail!(Data, "{e}"))?;
    line.push('\n');
    fault_point();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_err("open", path, e))?;
    f.write_all(line.as_bytes())
        .and_then(|_| f.sync_data())
        .map_err(|e| io_err("write", path, e))
}

/// Writes through a temporary file (`PATH.tmp`, removed at the next start or resume if a crash
/// leaves it) and renames it over `path`, so the old content survives a crash mid-write. The
/// temporary file is flushed to the disk before the rename and the folder after it, so after a
/// power loss `path` holds either the old or the new content, never an empty or partial file.
pub(crate) fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    ensure_parent(path)?;
    let tmp = with_suffix(path, ".tmp");
    fault_point();
    write(&tmp)?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("flush to disk", &tmp, e))?;
    fault_point();
    std::fs::rename(&tmp, path).map_err(|e| io_err("replace", path, e))?;
    sync_folder(path)
}

/// Flushes the folder `path` is in, so that a rename into it survives a power loss. (Unix:
/// elsewhere a folder cannot be opened as a file, and the rename's own durability is all there
/// is.)
pub(crate) fn sync_folder(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let dir = folder_of(path);
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err("flush to disk", dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Writes `bytes` as the whole content of `path` (the half-way fault point is where a crash
/// leaves a partial file).
fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| io_err("create", path, e))?;
    let half = bytes.len() / 2;
    f.write_all(&bytes[..half])
        .map_err(|e| io_err("write", path, e))?;
    fault_point();
    f.write_all(&bytes[half..])
        .map_err(|e| io_err("write", path, e))
}

/// `lines` as the whole content of `path`, atomically. Lines are never deleted: if the file
/// holds a complete line that `lines` would not — one beyond them or other than theirs (a last
/// line without its newline, cut by a crash, does not count) — it is first moved aside
/// (`NAME.N.bak`); returns where it went.
pub(crate) fn rewrite_json_lines<T: Serialize>(
    path: &Path,
    lines: &[T],
) -> Result<Option<PathBuf>> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&serde_json::to_string(l).map_err(|e| fail!(Data, "{e}"))?);
        text.push('\n');
    }
    let aside = if holds_more_than(path, &text)? {
        move_aside(path)?
    } else {
        None
    };
    write_atomic(path, |tmp| {
        std::fs::write(tmp, &text).map_err(|e| io_err("write", tmp, e))
    })?;
    Ok(aside)
}

/// Whether `path` holds a complete line that `text` as its whole content would not.
fn holds_more_than(path: &Path, text: &str) -> Result<bool> {
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        // Not text: keep it whatever it is.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Ok(true),
        Err(e) => return Err(io_err("read", path, e)),
    };
    // Complete lines only: up to the last newline.
    let complete = &old[..old.rfind('\n').map_or(0, |i| i + 1)];
    Ok(!text.starts_with(complete))
}

/// The snapshot file of epoch `epoch`.
pub(crate) fn snapshot_path(path: &Path, epoch: usize) -> PathBuf {
    with_suffix(path, &format!(".epoch{epoch}"))
}

/// The name of the tensor that tags a snapshot with its epoch.
const EPOCH_TAG: &str = "__candle_reliance.epoch";

/// Writes every variable of `varmap`, tagged with `epoch`, to [`snapshot_path`], atomically.
pub(crate) fn save_snapshot(varmap: &VarMap, path: &Path, epoch: usize) -> Result<()> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| fail!(Usage, "VarMap lock poisoned"))?;
    let tensors: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    drop(vars);
    save_snapshot_tensors(&tensors, path, epoch)
}

/// [`save_snapshot`] of weights already copied out of a `VarMap`.
pub(crate) fn save_snapshot_tensors(
    weights: &[(String, Tensor)],
    path: &Path,
    epoch: usize,
) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = weights.iter().cloned().collect();
    let device = candle_core::Device::Cpu;
    tensors.insert(EPOCH_TAG.into(), Tensor::new(&[epoch as u32], &device)?);
    let file = snapshot_path(path, epoch);
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| {
            Error::file(
                &file,
                format!(
                    "cannot serialize the weights of epoch {epoch} for {}: {e}",
                    file.display()
                ),
            )
        })?;
    write_atomic(&file, |tmp| write_bytes(tmp, &bytes)).map_err(|e| {
        e.context(format!(
            "restore_best.path: cannot write the weights of epoch {epoch} to {}",
            file.display()
        ))
    })
}

/// The kept weights of `epoch` as saved by [`save_snapshot`] (`PATH.epochE`, or `PATH` once
/// renamed there), on `device`, checked against their epoch tag; and the file they came from.
pub(crate) fn read_snapshot(
    path: &Path,
    epoch: usize,
    device: &candle_core::Device,
) -> Result<(
    PathBuf,
    std::collections::HashMap<String, candle_core::Tensor>,
)> {
    let named = snapshot_path(path, epoch);
    let file = if named.exists() {
        named
    } else {
        path.to_path_buf()
    };
    let mut saved = candle_core::safetensors::load(&file, device).map_err(|e| {
        Error::file(
            &file,
            format!("cannot load the kept weights {}: {e}", file.display()),
        )
    })?;
    let tag = saved
        .remove(EPOCH_TAG)
        .map(|t| t.to_device(&candle_core::Device::Cpu)?.to_vec1::<u32>())
        .transpose()?;
    if tag.as_deref() != Some(&[epoch as u32]) {
        let found = tag
            .and_then(|t| t.first().map(|e| e.to_string()))
            .unwrap_or_else(|| "(untagged)".into());
        return Err(Error::file(
            &file,
            format!(
                "{} holds the weights of epoch {found}, not of the kept epoch {epoch}",
                file.display()
            ),
        ));
    }
    Ok((file, saved))
}

/// Loads the snapshot of `epoch` into `varmap`: from `PATH.epochE`, or from `PATH` once
/// `finish` has moved it there. The file's epoch tag must be `epoch`; every variable must be in
/// it. Nothing is set unless all of it loads.
pub(crate) fn load_snapshot(varmap: &VarMap, path: &Path, epoch: usize) -> Result<PathBuf> {
    let device = varmap
        .data()
        .lock()
        .map_err(|_| fail!(Usage, "VarMap lock poisoned"))?
        .values()
        .next()
        .map(|v| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let (file, saved) = read_snapshot(path, epoch, &device)?;
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| fail!(Usage, "VarMap lock poisoned"))?;
    if let Some(missing) = vars.keys().find(|k| !saved.contains_key(*k)) {
        return Err(Error::file(
            &file,
            format!("{} has no `{missing}`", file.display()),
        ));
    }
    drop(vars);
    varmap.clone().set(saved.iter())?;
    Ok(file)
}

/// Removes temporary files left by a crash (`PATH.epochE.tmp`) and, unless `tmp_only`, the
/// snapshot files `PATH.epochE` of the epochs not in `keep`.
pub(crate) fn remove_stale_snapshots(path: &Path, keep: &[usize], tmp_only: bool) -> Result<()> {
    // A folder that cannot be read holds nothing this run could have left.
    let Ok(found) = snapshot_files(path) else {
        return Ok(());
    };
    for (file, rest) in found {
        let stale = match rest.strip_suffix(".tmp") {
            Some(_) => true,
            None => {
                !tmp_only
                    && rest
                        .parse::<usize>()
                        .ok()
                        .is_some_and(|e| !keep.contains(&e))
            }
        };
        if stale {
            fault_point();
            std::fs::remove_file(&file).map_err(|e| io_err("remove", &file, e))?;
        }
    }
    Ok(())
}

/// Removes `PATH.tmp`, left by a crash in [`write_atomic`].
pub(crate) fn remove_tmp(path: &Path) -> Result<()> {
    let tmp = with_suffix(path, ".tmp");
    if tmp.exists() {
        std::fs::remove_file(&tmp).map_err(|e| io_err("remove", &tmp, e))?;
    }
    Ok(())
}

/// An advisory lock on an output folder, held while the monitor lives (the operating system
/// releases it when the process ends, however it ends).
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

/// The lock file of a folder.
pub(crate) const LOCK_FILE: &str = ".candle-reliance.lock";

/// Takes the lock of the folder `path` is in; an error names the process holding it.
pub(crate) fn lock_dir(path: &Path) -> Result<DirLock> {
    let dir = folder_of(path);
    std::fs::create_dir_all(dir).map_err(|e| io_err("create directory", dir, e))?;
    let lock = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock)
        .map_err(|e| io_err("open lock file", &lock, e))?;
    // A lock that this process itself holds may be a descriptor a child process being spawned
    // copied (between its fork and its exec) from a monitor this process has since dropped:
    // try again for up to a second before calling it another monitor's.
    let mut result = file.try_lock();
    for _ in 0..20 {
        if !matches!(result, Err(std::fs::TryLockError::WouldBlock)) {
            break;
        }
        let mut holder = String::new();
        let _ = File::open(&lock).and_then(|mut f| f.read_to_string(&mut holder));
        if holder.trim() != std::process::id().to_string() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        result = file.try_lock();
    }
    match result {
        Ok(()) => {
            let _ = file.set_len(0);
            let _ = write!(file, "{}", std::process::id());
            Ok(DirLock { _file: file })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = File::open(&lock).and_then(|mut f| f.read_to_string(&mut holder));
            let holder = holder.trim();
            let holder = if holder.is_empty() { "unknown" } else { holder };
            Err(Error::file(
                &lock,
                format!(
                    "another reliance monitor (process {holder}) is writing to {}; \
                     give this run its own output folder or wait for that one to end",
                    dir.display()
                ),
            ))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io_err("lock", &lock, e)),
    }
}
