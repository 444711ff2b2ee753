//! Validation of settings: one check per value, written once and used both for configurations
//! built in code and for YAML files (where the key's line is added).

use std::fmt::Display;

/// A bad value: the key (relative to its section, e.g. `fractions`) and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Invalid {
    pub key: String,
    pub msg: String,
}

pub(crate) type Checked = std::result::Result<(), Invalid>;

impl Invalid {
    pub fn new(key: impl Into<String>, msg: impl Display) -> Self {
        Self {
            key: key.into(),
            msg: msg.to_string(),
        }
    }

    /// The same error under `section`: `fractions` becomes `ablation.fractions`.
    pub fn within(mut self, section: &str) -> Self {
        self.key = format!("{section}.{}", self.key);
        self
    }

    /// An error for a value checked outside a configuration: `section.key: message`.
    pub fn into_error(self, section: &str) -> candle_core::Error {
        let e = self.within(section);
        candle_core::Error::Msg(format!("{}: {}", e.key, e.msg))
    }

    pub fn at_least(key: &str, v: usize, min: usize) -> Checked {
        if v < min {
            return Err(Self::new(key, format!("must be at least {min}, got {v}")));
        }
        Ok(())
    }

    pub fn at_most(key: &str, v: usize, max: usize, why: &str) -> Checked {
        if v > max {
            return Err(Self::new(
                key,
                format!("must be at most {max}, got {v} ({why})"),
            ));
        }
        Ok(())
    }

    pub fn unit_interval_open(key: &str, v: f64) -> Checked {
        if !(0.0..1.0).contains(&v) {
            return Err(Self::new(key, format!("must be in [0, 1), got {v}")));
        }
        Ok(())
    }
}
