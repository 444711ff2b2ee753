//! Fuzz-style property tests: whatever bytes the YAML configuration, the IDX reader and the
//! state and history readers are given, they return a value or an error — they never panic,
//! hang or allocate without bound. Bounded: a few hundred cases per reader.

#[path = "../examples/common/idx.rs"]
mod idx;

use candle_reliance::monitor::read_history;
use candle_reliance::{RelianceConfig, RelianceMonitor};
use proptest::prelude::*;

/// A valid configuration with every key, the seed of the mutations.
const EXAMPLE: &str = include_str!("../examples/reliance.yaml");

/// Text made of configuration-like pieces: keys, values, brackets, indentation.
fn yaml_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("stopping:".to_string()),
        Just("ablation:".to_string()),
        Just("noise:".to_string()),
        Just("  patience: ".to_string()),
        Just("  fractions: ".to_string()),
        Just("  orders: ".to_string()),
        Just("  tolerance: ".to_string()),
        Just("  metric: ".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just(", ".to_string()),
        Just("\n".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        Just("- ".to_string()),
        Just("'".to_string()),
        Just("~".to_string()),
        Just(".nan".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551616".to_string()),
        Just("1e308".to_string()),
        any::<u32>().prop_map(|v| v.to_string()),
        "[a-z_]{1,12}",
    ];
    prop::collection::vec(piece, 0..60).prop_map(|v| v.concat())
}

/// The example file with a run of bytes replaced.
fn mutated_example() -> impl Strategy<Value = String> {
    (
        0..EXAMPLE.len(),
        0..40usize,
        prop::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(at, cut, bytes)| {
            let mut b = EXAMPLE.as_bytes().to_vec();
            let end = (at + cut).min(b.len());
            b.splice(at..end, bytes);
            String::from_utf8_lossy(&b).into_owned()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn the_config_reader_never_panics(text in prop_oneof![yaml_like(), mutated_example(), ".{0,200}"]) {
        if let Ok(cfg) = RelianceConfig::from_yaml_str(&text) {
            // What parses is valid, and writes back to the same configuration.
            cfg.validate().unwrap();
            let again = RelianceConfig::from_yaml_str(&cfg.to_yaml_string().unwrap()).unwrap();
            prop_assert_eq!(again, cfg);
        }
    }

    #[test]
    fn the_idx_reader_never_panics(
        magic in prop_oneof![Just(0x801u32), Just(0x803u32), any::<u32>()],
        dims in prop::collection::vec(prop_oneof![0u32..40, any::<u32>()], 0..4),
        body in prop::collection::vec(any::<u8>(), 0..300),
        gzipped in any::<bool>(),
    ) {
        let mut bytes = magic.to_be_bytes().to_vec();
        for d in &dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend(&body);
        if gzipped {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&bytes).unwrap();
            bytes = e.finish().unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(img) = idx::read_idx_images(&p) {
            prop_assert_eq!(img.pixels.len(), img.count * img.rows * img.cols);
        }
        let _ = idx::read_idx_labels(&p);
    }

    #[test]
    fn the_state_and_history_readers_never_panic(
        text in prop_oneof![
            ".{0,300}",
            prop::collection::vec(prop_oneof![
                Just("{".to_string()), Just("}".to_string()), Just("[".to_string()),
                Just("]".to_string()), Just("\"epoch\":".to_string()), Just("\"stopping\":".to_string()),
                Just("\"history\":".to_string()), Just("null".to_string()), Just("\"NaN\"".to_string()),
                Just(",".to_string()), Just("\n".to_string()), any::<i64>().prop_map(|v| v.to_string()),
            ], 0..80).prop_map(|v| v.concat()),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        std::fs::write(&p, &text).unwrap();
        let _ = RelianceMonitor::load_state(&p);
        let _ = read_history(&p);
    }
}
