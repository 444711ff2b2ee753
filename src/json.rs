//! Floats in the files the monitor writes. JSON has no NaN or infinity, and `serde_json` writes
//! them as `null`, which does not read back as a number: a single check with an unablated
//! accuracy of 0 (a normalized AUC of NaN) would make the history and the state unreadable.
//! These helpers write a non-finite value as the string `"NaN"`, `"inf"` or `"-inf"` and read it
//! back; `null` (files written before) reads as NaN.

use serde::{Deserialize, Deserializer, Serializer};

/// `#[serde(with = "crate::json::float")]` for an `f64`.
pub(crate) mod float {
    use super::*;

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if *v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Number(f64),
            Text(String),
            Null(()),
        }
        match Repr::deserialize(d)? {
            Repr::Number(v) => Ok(v),
            Repr::Null(()) => Ok(f64::NAN),
            Repr::Text(t) => match t.as_str() {
                "NaN" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                other => Err(serde::de::Error::custom(format!(
                    "expected a number, \"NaN\", \"inf\" or \"-inf\", got \"{other}\""
                ))),
            },
        }
    }
}

/// `#[serde(with = "crate::json::option")]` for an `Option<f64>`: `None` is `null`.
pub(crate) mod option {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => float::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "float")] f64);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    struct T {
        #[serde(with = "super::float")]
        a: f64,
        #[serde(with = "super::option", default)]
        b: Option<f64>,
    }

    #[test]
    fn non_finite_values_round_trip() {
        for (a, text) in [
            (f64::NAN, r#"{"a":"NaN","b":null}"#),
            (f64::INFINITY, r#"{"a":"inf","b":null}"#),
            (f64::NEG_INFINITY, r#"{"a":"-inf","b":null}"#),
            (0.25, r#"{"a":0.25,"b":null}"#),
        ] {
            let json = serde_json::to_string(&T { a, b: None }).unwrap();
            assert_eq!(json, text);
            let back: T = serde_json::from_str(&json).unwrap();
            assert!(back.a == a || (a.is_nan() && back.a.is_nan()), "{json}");
        }
        let t: T = serde_json::from_str(r#"{"a":null,"b":"inf"}"#).unwrap();
        assert!(t.a.is_nan() && t.b == Some(f64::INFINITY));
        let e = serde_json::from_str::<T>(r#"{"a":"many"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("many"), "{e}");
    }
}
