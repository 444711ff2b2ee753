//! The monitor's files, written safely: existing files are moved aside, never overwritten by a
//! fresh run; state and snapshots are replaced atomically; history lines are appended whole.

use candle_core::Result;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

pub(crate) fn io_err(what: &str, path: &Path, e: std::io::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("cannot {what} {}: {e}", path.display()))
}

/// Moves an existing file to the first free `NAME.N.bak`, returning where it went.
pub(crate) fn move_aside(path: &Path) -> Result<Option<PathBuf>> {
    if !path.exists() {
        return Ok(None);
    }
    for n in 1.. {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}.bak"));
        let target = PathBuf::from(name);
        if !target.exists() {
            std::fs::rename(path, &target).map_err(|e| io_err("move aside", path, e))?;
            return Ok(Some(target));
        }
    }
    unreachable!()
}

pub(crate) fn ensure_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => {
            std::fs::create_dir_all(p).map_err(|e| io_err("create directory", p, e))
        }
        _ => Ok(()),
    }
}

/// Appends one JSON line and flushes it, so a crash loses at most the line being written.
pub(crate) fn append_json_line<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let line = serde_json::to_string(value).map_err(candle_core::Error::msg)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_err("open", path, e))?;
    writeln!(f, "{line}").map_err(|e| io_err("write", path, e))?;
    f.flush().map_err(|e| io_err("write", path, e))
}

/// Writes through a temporary file and renames it over `path`, so the old content survives a
/// crash mid-write.
pub(crate) fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    ensure_parent(path)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| io_err("replace", path, e))
}
