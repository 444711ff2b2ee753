//! The crate's error: what went wrong, in variants a caller can match on.
//!
//! Every fallible function of the crate returns [`Result`]. Its [`Error`] converts into
//! [`candle_core::Error`] and, being a [`std::error::Error`], into `anyhow::Error`, so `?` works in
//! a training loop that returns either:
//!
//! ```
//! use candle_reliance::RelianceConfig;
//!
//! // A loop returning candle's result.
//! fn candle_loop() -> candle_core::Result<()> {
//!     let _config = RelianceConfig::from_yaml_str("schedule: {check_every: 2}")?;
//!     Ok(())
//! }
//!
//! // A loop returning anyhow's.
//! fn anyhow_loop() -> anyhow::Result<()> {
//!     let _config = RelianceConfig::from_yaml_str("schedule: {check_every: 2}")?;
//!     Ok(())
//! }
//!
//! // Matching on what went wrong.
//! match RelianceConfig::from_yaml_str("schedule: {chek_every: 2}") {
//!     Err(candle_reliance::Error::Config { line, .. }) => assert_eq!(line, Some(1)),
//!     other => panic!("expected a configuration error, got {other:?}"),
//! }
//! # candle_loop().unwrap();
//! # anyhow_loop().unwrap();
//! ```
//!
//! The message of every variant ([`Display`](std::fmt::Display)) is the whole story, naming the
//! key, file, probe or rank; the fields repeat the parts a program would act on.

use std::path::PathBuf;

/// What went wrong. New variants may be added in minor versions.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A setting is invalid: a YAML key that does not exist or has a bad value, a value built in
    /// code out of range, or a configuration file too large to be one.
    Config {
        /// The key as `section.key` (`ablation.fractions`), where one is known.
        key: Option<String>,
        /// The line of the YAML text, where the value came from YAML.
        line: Option<usize>,
        /// The whole message.
        message: String,
    },
    /// Input data or a tensor has the wrong shape, type or contents: probe data whose labels
    /// are not `(N,)` u32, logits of the wrong shape, a label out of range.
    Data {
        /// The whole message.
        message: String,
    },
    /// A probe was used wrongly or saw something it cannot measure: an unknown or duplicate
    /// name, a probe run twice in one forward pass or never reached, a width that changes.
    Probe {
        /// The probe's name, where one probe is at fault.
        probe: Option<String>,
        /// The whole message.
        message: String,
    },
    /// A file could not be read, written, renamed or removed.
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
        /// The whole message.
        message: String,
    },
    /// A file was read but cannot be used: a state or history that does not parse, a snapshot
    /// missing a weight, an output folder locked by another run.
    File {
        /// The file.
        path: PathBuf,
        /// The whole message.
        message: String,
    },
    /// A saved state cannot be continued by this monitor: other settings, probe data or probes,
    /// a format this version does not read, a state that contradicts its history.
    Resume {
        /// The whole message, naming what differs.
        message: String,
    },
    /// A data-parallel rank failed, or the ranks disagree (different settings, epochs, types).
    Rank {
        /// The failing rank, where one is known.
        rank: Option<usize>,
        /// The whole message.
        message: String,
    },
    /// Values that must be finite are not: probe data holding NaN or an infinity.
    NonFinite {
        /// The whole message.
        message: String,
    },
    /// A call out of order: a strategy given after the first epoch, a measurement while another
    /// runs.
    Usage {
        /// The whole message.
        message: String,
    },
    /// An error from candle itself: a tensor operation or the model's forward pass failed.
    Candle(candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Config { message, .. }
            | Error::Data { message }
            | Error::Probe { message, .. }
            | Error::Io { message, .. }
            | Error::File { message, .. }
            | Error::Resume { message }
            | Error::Rank { message, .. }
            | Error::NonFinite { message }
            | Error::Usage { message } => f.write_str(message),
            Error::Candle(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Candle(e) => Some(e),
            _ => None,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// For `?` in a function returning [`candle_core::Result`]: the message is kept whole.
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(e) => e,
            e => candle_core::Error::Wrapped(Box::new(e)),
        }
    }
}

impl Error {
    /// Adds `context` in front of the message (`probe \`h\`: …`), keeping the variant.
    pub(crate) fn context(self, context: impl std::fmt::Display) -> Self {
        self.map_message(|m| format!("{context}: {m}"))
    }

    /// The same error with its message rewritten by `f`.
    pub(crate) fn map_message(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            Error::Config { key, line, message } => Error::Config {
                key,
                line,
                message: f(message),
            },
            Error::Data { message } => Error::Data {
                message: f(message),
            },
            Error::Probe { probe, message } => Error::Probe {
                probe,
                message: f(message),
            },
            Error::Io {
                path,
                source,
                message,
            } => Error::Io {
                path,
                source,
                message: f(message),
            },
            Error::File { path, message } => Error::File {
                path,
                message: f(message),
            },
            Error::Resume { message } => Error::Resume {
                message: f(message),
            },
            Error::Rank { rank, message } => Error::Rank {
                rank,
                message: f(message),
            },
            Error::NonFinite { message } => Error::NonFinite {
                message: f(message),
            },
            Error::Usage { message } => Error::Usage {
                message: f(message),
            },
            Error::Candle(e) => Error::Candle(candle_core::Error::Msg(f(e.to_string()))),
        }
    }

    /// A probe error naming the probe.
    pub(crate) fn probe(name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Probe {
            probe: Some(name.into()),
            message: message.into(),
        }
    }

    /// A failed file operation: `cannot {what} {path}: {e}`.
    pub(crate) fn io(what: &str, path: &std::path::Path, e: std::io::Error) -> Self {
        Error::Io {
            message: format!("cannot {what} {}: {e}", path.display()),
            path: path.to_path_buf(),
            source: e,
        }
    }

    /// A file that was read but cannot be used.
    pub(crate) fn file(path: &std::path::Path, message: impl Into<String>) -> Self {
        Error::File {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// `fail!(Variant, "format", args…)`: an [`Error`] with its message; other fields `None`.
macro_rules! fail {
    (Config, $($arg:tt)*) => {
        $crate::error::Error::Config { key: None, line: None, message: format!($($arg)*) }
    };
    (Probe, $($arg:tt)*) => {
        $crate::error::Error::Probe { probe: None, message: format!($($arg)*) }
    };
    (Rank, $($arg:tt)*) => {
        $crate::error::Error::Rank { rank: None, message: format!($($arg)*) }
    };
    ($kind:ident, $($arg:tt)*) => {
        $crate::error::Error::$kind { message: format!($($arg)*) }
    };
}

/// `bail!(Variant, "format", args…)`: returns [`fail!`]'s error.
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::error::fail!($kind, $($arg)*))
    };
}

pub(crate) use {bail, fail};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_the_variant_and_prefixes_the_message() {
        let e = Error::probe("h", "unit count changed").context("probe `h`");
        assert!(matches!(&e, Error::Probe { probe: Some(p), .. } if p == "h"));
        assert_eq!(e.to_string(), "probe `h`: unit count changed");
    }

    #[test]
    fn into_candle_keeps_the_message_and_a_candle_error_is_not_wrapped_twice() {
        let e: candle_core::Error = fail!(Resume, "other {}", "settings").into();
        assert_eq!(e.to_string(), "other settings");
        let c = candle_core::Error::Msg("shape mismatch".into());
        let back: candle_core::Error = Error::from(c).into();
        assert!(matches!(back, candle_core::Error::Msg(m) if m == "shape mismatch"));
    }
}
