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
    pub fn into_error(self, section: &str) -> crate::Error {
        let e = self.within(section);
        crate::Error::Config {
            message: format!("{}: {}", e.key, e.msg),
            key: Some(e.key),
            line: None,
        }
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

/// `#[serde(deserialize_with = "crate::invalid::seed")]`: a seed is an integer in
/// `0 … 2^64 − 1`; a negative number, a float or a string is an error saying so. (An integer past
/// `u64` is refused by the parser itself, whose message names the value and the line.)
pub(crate) fn seed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a seed: an integer from 0 to 18446744073709551615")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("a seed is not negative, got {v}")))
        }
        fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| {
                E::custom(format!(
                    "a seed is at most 18446744073709551615 (2^64 − 1), got {v}"
                ))
            })
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u64, E> {
            // YAML reads an integer too long for 128 bits as a float.
            Err(E::custom(format!(
                "a seed is an integer from 0 to 2^64 − 1, got {v}"
            )))
        }
        fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<u64, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format!("a seed is an integer from 0 to 2^64 − 1, got {v}")))
        }
    }
    d.deserialize_any(V)
}
