//! The YAML configuration: defaults, errors, validation of configurations built in code, round
//! trips, and the example file `examples/reliance.yaml`.

use candle_reliance::curves::{AblationOrder, Clamp, Fractions, NoiseSpec};
use candle_reliance::monitor::{LabelWaveRule, Metric, SnapshotMode};
use candle_reliance::RelianceConfig;
use std::path::{Path, PathBuf};

fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Whether `msg` says `line n` (and not `line n0`, `line n1`, ...).
fn mentions_line(msg: &str, n: usize) -> bool {
    let needle = format!("line {n}");
    msg.match_indices(&needle).any(|(i, _)| {
        !msg[i + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

fn parse_err(yaml: &str) -> String {
    match RelianceConfig::from_yaml_str(yaml) {
        Ok(cfg) => panic!("expected an error for\n{yaml}\ngot {cfg:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn empty_and_comment_only_documents_give_the_defaults() {
    for yaml in [
        "",
        "\n\n",
        "   \n",
        "# nothing but comments\n# stopping:\n#   patience: 5\n",
        "---\n# an empty document\n",
    ] {
        let cfg = RelianceConfig::from_yaml_str(yaml)
            .unwrap_or_else(|e| panic!("yaml {yaml:?} failed: {e}"));
        assert_eq!(cfg, RelianceConfig::default(), "yaml {yaml:?}");
    }
}

#[test]
fn defaults_are_the_documented_ones() {
    let d = RelianceConfig::default();
    assert_eq!(d.schedule.check_every, 1);
    assert_eq!(d.schedule.warmup_epochs, 2);
    assert_eq!(d.schedule.max_epochs, None);
    assert_eq!(d.data.subset_size, 1000);
    assert_eq!(d.data.seed, 0);
    assert_eq!(d.batching.batch_size, 512);
    assert_eq!(d.batching.max_batch_rows, None);
    assert_eq!(d.ablation.fractions, Fractions::Evenly(17));
    assert_eq!(d.ablation.clamp, Clamp::Zero);
    assert_eq!(
        d.ablation.order,
        AblationOrder::Random { orders: 3, seed: 0 }
    );
    assert!(!d.selectivity);
    assert_eq!(d.noise, None);
    let noise = NoiseSpec::default();
    assert_eq!(noise.scales.len(), 11);
    assert!((noise.scales[0] - 10f64.powf(-1.5)).abs() < 1e-12 && noise.scales[10] == 10.0);
    assert_eq!(noise.draws, 2);
    assert_eq!(noise.seed, 0);
    assert_eq!(d.stopping.metric, Metric::AgreementAuc);
    assert_eq!(d.stopping.tolerance, 0.03);
    assert_eq!(
        d.stopping.label_wave,
        LabelWaveRule {
            window: 3,
            patience: 5
        }
    );
    assert!(d.restore_best.enabled);
    assert_eq!(d.restore_best.mode, SnapshotMode::Memory);
    assert_eq!(
        d.restore_best.path,
        PathBuf::from("reliance-best.safetensors")
    );
    assert_eq!(d.output.history_file, None);
    assert_eq!(d.output.state_file, None);
    d.validate().expect("the defaults are valid");
}

#[test]
fn a_partial_file_keeps_the_other_defaults() {
    let cfg = RelianceConfig::from_yaml_str(
        "stopping:\n  label_wave:\n    patience: 7\nablation:\n  clamp: mean\n",
    )
    .unwrap();
    let mut want = RelianceConfig::default();
    // The Label Wave window keeps its documented default, 3.
    want.stopping.label_wave.patience = 7;
    want.ablation.clamp = Clamp::Mean;
    assert_eq!(cfg, want);
}

/// One bad input: the YAML, substrings the error must contain (the key, its section, the
/// offending value or the rule broken), and the line of the offending key or value where the
/// parser can know it.
struct Bad {
    yaml: &'static str,
    expect: &'static [&'static str],
    line: Option<usize>,
}

const BAD: &[Bad] = &[
    // Range checks. The offending key is the first of its section here; see
    // `checked_key_error_reports_the_line_of_the_key` for a key further down.
    Bad {
        yaml: "schedule:\n  warmup_epochs: 1\nstopping:\n  label_wave:\n    patience: 0\n",
        expect: &["stopping.label_wave.patience", "at least 1", "0"],
        line: Some(5),
    },
    Bad {
        yaml: "ablation:\n  fractions: [0.0, 0.5, 1.5]\n",
        expect: &["ablation", "fractions", "1.5", "[0, 1]"],
        line: Some(2),
    },
    Bad {
        yaml: "ablation:\n  fractions: [-0.25, 1.0]\n",
        expect: &["ablation", "fractions", "-0.25"],
        line: Some(2),
    },
    Bad {
        yaml: "ablation:\n  fractions: [0.0, 0.5, 0.25, 1.0]\n",
        expect: &["ablation", "fractions", "increasing"],
        line: Some(2),
    },
    Bad {
        yaml: "ablation:\n  fractions: [0.0, 0.5, 0.5, 1.0]\n",
        expect: &["ablation", "fractions", "increasing"],
        line: Some(2),
    },
    Bad {
        yaml: "ablation:\n  fractions: [0.5]\n",
        expect: &["ablation", "fractions", "at least 2"],
        line: Some(2),
    },
    Bad {
        yaml: "ablation:\n  orders: 0\n",
        expect: &["ablation", "orders", "at least 1"],
        line: Some(2),
    },
    Bad {
        yaml: "noise:\n  draws: 0\n",
        expect: &["noise", "draws", "at least 1"],
        line: Some(2),
    },
    Bad {
        yaml: "ablation:\n  fractions: 1\n",
        expect: &["ablation", "fractions", "at least 2"],
        line: Some(2),
    },
    Bad {
        yaml: "schedule:\n  check_every: 0\n",
        expect: &["schedule", "check_every", "at least 1"],
        line: Some(2),
    },
    Bad {
        yaml: "schedule:\n  max_epochs: 0\n",
        expect: &["schedule", "max_epochs", "at least 1"],
        line: Some(2),
    },
    Bad {
        yaml: "selectivity: true\n\n\ndata:\n  subset_size: 0\n",
        expect: &["data", "subset_size", "at least 1"],
        line: Some(5),
    },
    Bad {
        yaml: "batching:\n  batch_size: 0\n",
        expect: &["batching", "batch_size", "at least 1"],
        line: Some(2),
    },
    Bad {
        yaml: "batching:\n  max_batch_rows: 0\n",
        expect: &["batching", "max_batch_rows", "at least 1"],
        line: Some(2),
    },
    Bad {
        yaml: "stopping:\n  tolerance: -0.1\n",
        expect: &["stopping", "tolerance", "-0.1"],
        line: Some(2),
    },
    Bad {
        yaml: "stopping:\n  tolerance: .nan\n",
        expect: &["stopping", "tolerance", "NaN"],
        line: Some(2),
    },
    Bad {
        yaml: "stopping:\n  tolerance: 1.0\n",
        expect: &["stopping", "tolerance", "[0, 1)"],
        line: Some(2),
    },
    Bad {
        yaml: "stopping:\n  tolerance: -0.5\n",
        expect: &["stopping", "tolerance", "-0.5"],
        line: Some(2),
    },
    Bad {
        yaml: "noise:\n  scales: [0.0, 1.0]\n",
        expect: &["noise", "scales", "positive"],
        line: Some(2),
    },
    Bad {
        yaml: "noise:\n  scales: [-1.0, 1.0]\n",
        expect: &["noise", "scales", "-1"],
        line: Some(2),
    },
    Bad {
        yaml: "noise:\n  scales: [2.0, 1.0]\n",
        expect: &["noise", "scales", "increasing"],
        line: Some(2),
    },
    Bad {
        yaml: "noise:\n  scales: [0.1]\n",
        expect: &["noise", "scales", "at least 2"],
        line: Some(2),
    },
    Bad {
        yaml: "restore_best:\n  path: ''\n  mode: disk\n",
        expect: &["restore_best", "path", "empty"],
        line: Some(2),
    },
    Bad {
        yaml: "output:\n  history_file: ''\n",
        expect: &["output", "history_file", "empty"],
        line: Some(2),
    },
    Bad {
        yaml: "output:\n  state_file: ''\n",
        expect: &["output", "state_file", "empty"],
        line: Some(2),
    },
    // Unknown keys and variants.
    Bad {
        // The parser does not give a line for an unknown top-level key.
        yaml: "stoping:\n  patience: 2\n",
        expect: &["stoping", "stopping"],
        line: None,
    },
    Bad {
        yaml: "ablation:\n  fractions: 17\n  bogus: 1\n",
        expect: &["ablation", "bogus"],
        line: Some(3),
    },
    Bad {
        yaml: "stopping:\n  metric: auc\n  tolerence: 4\n",
        expect: &["stopping", "tolerence", "tolerance"],
        line: Some(3),
    },
    Bad {
        yaml: "ablation:\n  fractions: 3\n  clamp: median\n",
        expect: &["ablation", "clamp", "median", "zero", "mean"],
        line: Some(3),
    },
    Bad {
        yaml: "stopping:\n  tolerance: 0.1\n  metric: accuracy\n",
        expect: &["stopping", "metric", "accuracy", "normalized_auc"],
        line: Some(3),
    },
    Bad {
        yaml: "restore_best:\n  enabled: true\n  mode: cloud\n",
        expect: &["restore_best", "mode", "cloud", "memory", "disk"],
        line: Some(3),
    },
    // Wrong types.
    Bad {
        yaml: "schedule:\n  check_every: two\n",
        expect: &["schedule", "check_every", "two"],
        line: Some(2),
    },
    Bad {
        yaml: "stopping:\n  metric: auc\n  label_wave:\n    patience: -1\n",
        expect: &["stopping", "patience", "-1"],
        line: Some(4),
    },
    Bad {
        yaml: "data:\n  seed: 1.5\n",
        expect: &["data", "seed", "1.5"],
        line: Some(2),
    },
    Bad {
        yaml: "data:\n  seed: 18446744073709551616\n",
        expect: &["data", "seed", "18446744073709551616", "2^64"],
        line: Some(2),
    },
    Bad {
        yaml: "data:\n  seed: 1000000000000000000000000000000000000000\n",
        expect: &[
            "data",
            "seed",
            "1000000000000000000000000000000000000000",
            "2^64",
            "integer",
        ],
        line: Some(2),
    },
    Bad {
        yaml: "data:\n  seed: -3\n",
        expect: &["data", "seed", "-3", "not negative"],
        line: Some(2),
    },
    Bad {
        yaml: "data:\n  seed: 1\nselectivity: maybe\n",
        expect: &["selectivity", "maybe"],
        line: Some(3),
    },
    Bad {
        yaml: "ablation:\n  clamp: mean\n  order: sideways\n",
        expect: &["ablation", "order", "sideways", "most_selective_first"],
        line: Some(3),
    },
    Bad {
        yaml: "ablation:\n  fractions: some\n",
        expect: &["ablation", "fractions", "some", "list of fractions"],
        line: Some(2),
    },
    Bad {
        yaml: "noise:\n  scales: [0.1, 1.0]\n  repeats: 2\n",
        expect: &["noise", "repeats", "draws"],
        line: Some(3),
    },
    Bad {
        yaml: "output:\n  history_file: []\n",
        expect: &["output", "history_file", "sequence"],
        line: Some(2),
    },
    // A section given as something other than a mapping.
    Bad {
        yaml: "data:\n  seed: 1\nstopping: 3\n",
        expect: &["stopping", "3"],
        line: Some(3),
    },
    Bad {
        yaml: "schedule:\n  - 1\n",
        expect: &["schedule", "sequence"],
        line: Some(2),
    },
    // Not YAML: the list opened on line 2 is never closed.
    Bad {
        yaml: "stopping:\n  tolerance: [1, 2\n",
        expect: &["]"],
        line: Some(2),
    },
];

#[test]
fn bad_inputs_name_the_key_and_the_line() {
    assert!(BAD.len() >= 18);
    let mut failures = Vec::new();
    for (i, case) in BAD.iter().enumerate() {
        let msg = parse_err(case.yaml);
        let missing: Vec<&str> = case
            .expect
            .iter()
            .copied()
            .filter(|s| !msg.contains(s))
            .collect();
        let line_ok = !matches!(case.line, Some(n) if !mentions_line(&msg, n));
        if !missing.is_empty() || !line_ok {
            failures.push(format!(
                "case {i}:\n--- yaml ---\n{}--- error ---\n{msg}\n--- missing: {missing:?}{}",
                case.yaml,
                match case.line {
                    Some(n) if !line_ok => format!(", line {n}"),
                    _ => String::new(),
                }
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

#[test]
fn errors_start_with_the_same_prefix() {
    for case in BAD {
        let msg = parse_err(case.yaml);
        assert!(
            msg.starts_with("reliance config: "),
            "yaml:\n{}error: {msg}",
            case.yaml
        );
    }
}

/// A range check on a key that is not the first of its section should give that key's line.
#[test]
fn checked_key_error_reports_the_line_of_the_key() {
    for (yaml, line) in [
        (
            "stopping:\n  metric: auc\n  label_wave:\n    patience: 0\n",
            4,
        ),
        ("stopping:\n  label_wave: {window: 3, patience: 0}\n", 2),
        ("restore_best:\n  mode: disk\n  path: ''\n", 3),
        ("stopping:\n  metric: auc\n\n\n  tolerance: 1.0\n", 5),
    ] {
        let msg = parse_err(yaml);
        assert!(mentions_line(&msg, line), "yaml:\n{yaml}error: {msg}");
    }
}

/// Range-check errors name the dotted key path, like type errors do.
#[test]
fn checked_key_error_names_the_dotted_path() {
    let msg = parse_err("stopping:\n  label_wave: {patience: 0}\n");
    assert!(msg.contains("stopping.label_wave.patience"), "{msg}");
}

#[test]
fn validate_names_the_bad_key_of_a_config_built_in_code() {
    type Edit = fn(&mut RelianceConfig);
    let cases: &[(&str, Edit)] = &[
        ("stopping.label_wave.patience", |c| {
            c.stopping.label_wave.patience = 0
        }),
        ("stopping.label_wave.window", |c| {
            c.stopping.label_wave.window = 4
        }),
        ("stopping.tolerance", |c| c.stopping.tolerance = -1.0),
        ("stopping.tolerance", |c| c.stopping.tolerance = f64::NAN),
        ("stopping.tolerance", |c| c.stopping.tolerance = 1.0),
        ("schedule.check_every", |c| c.schedule.check_every = 0),
        ("schedule.max_epochs", |c| c.schedule.max_epochs = Some(0)),
        ("data.subset_size", |c| c.data.subset_size = 0),
        ("ablation.fractions", |c| {
            c.ablation.fractions = Fractions::Evenly(1)
        }),
        ("ablation.fractions", |c| {
            c.ablation.fractions = Fractions::Explicit(vec![0.0, 2.0])
        }),
        ("ablation.orders", |c| {
            c.ablation.order = AblationOrder::Random { orders: 0, seed: 0 }
        }),
        ("batching.batch_size", |c| c.batching.batch_size = 0),
        ("batching.max_batch_rows", |c| {
            c.batching.max_batch_rows = Some(0)
        }),
        ("noise.scales", |c| {
            c.noise = Some(NoiseSpec::default().with_scales(vec![1.0, 0.5]))
        }),
        ("noise.draws", |c| {
            c.noise = Some(NoiseSpec::default().with_draws(0))
        }),
        ("restore_best.path", |c| {
            c.restore_best.mode = SnapshotMode::Disk;
            c.restore_best.path = PathBuf::new();
        }),
    ];
    for (key, edit) in cases {
        let mut cfg = RelianceConfig::default();
        edit(&mut cfg);
        let msg = match cfg.validate() {
            Ok(()) => panic!("expected an error naming {key} for {cfg:?}"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains(key), "expected {key} in: {msg}");
    }
}

#[test]
fn validate_accepts_a_good_config_built_in_code() {
    let mut cfg = RelianceConfig::default();
    cfg.stopping.label_wave.patience = 1;
    cfg.stopping.tolerance = 0.9;
    cfg.ablation.fractions = Fractions::Explicit(vec![0.0, 0.5, 1.0]);
    cfg.noise = Some(NoiseSpec::default().with_scales(vec![0.1, 1.0]));
    cfg.restore_best.mode = SnapshotMode::Disk;
    cfg.validate().unwrap();
    // An empty path is rejected whatever the mode, as when parsing.
    cfg.restore_best.mode = SnapshotMode::Memory;
    cfg.restore_best.path = PathBuf::new();
    let msg = cfg.validate().unwrap_err().to_string();
    assert!(msg.contains("restore_best.path"), "{msg}");
}

const EVERY_KEY: &str = "\
schedule:
  check_every: 2
  warmup_epochs: 5
  max_epochs: 40
data:
  subset_size: 256
  seed: 7
batching:
  batch_size: 128
  max_batch_rows: 4096
ablation:
  fractions: [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
  clamp: mean
  order: random
  orders: 5
  seed: 11
noise:
  scales: [0.01, 0.1, 1.0, 10.0]
  draws: 4
  seed: 13
selectivity: true
stopping:
  metric: auc
  tolerance: 0.05
  label_wave:
    window: 5
    patience: 6
restore_best:
  enabled: false
  mode: disk
  path: runs/best.safetensors
output:
  history_file: runs/history.jsonl
  state_file: runs/state.json
";

#[test]
fn a_file_setting_every_key_round_trips() {
    let cfg = RelianceConfig::from_yaml_str(EVERY_KEY).unwrap();
    assert_eq!(cfg.schedule.check_every, 2);
    assert_eq!(cfg.schedule.warmup_epochs, 5);
    assert_eq!(cfg.schedule.max_epochs, Some(40));
    assert_eq!(cfg.data.subset_size, 256);
    assert_eq!(cfg.data.seed, 7);
    assert_eq!(cfg.batching.batch_size, 128);
    assert_eq!(cfg.batching.max_batch_rows, Some(4096));
    assert_eq!(
        cfg.ablation.fractions,
        Fractions::Explicit(vec![0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
    );
    assert_eq!(cfg.ablation.clamp, Clamp::Mean);
    assert_eq!(
        cfg.ablation.order,
        AblationOrder::Random {
            orders: 5,
            seed: 11
        }
    );
    assert!(cfg.selectivity);
    let noise = cfg
        .noise
        .clone()
        .expect("the noise section turns the curve on");
    assert_eq!(noise.scales, vec![0.01, 0.1, 1.0, 10.0]);
    assert_eq!(noise.draws, 4);
    assert_eq!(noise.seed, 13);
    assert_eq!(cfg.stopping.metric, Metric::Auc);
    assert_eq!(cfg.stopping.tolerance, 0.05);
    assert_eq!(
        cfg.stopping.label_wave,
        LabelWaveRule {
            window: 5,
            patience: 6
        }
    );
    assert!(!cfg.restore_best.enabled);
    assert_eq!(cfg.restore_best.mode, SnapshotMode::Disk);
    assert_eq!(
        cfg.restore_best.path,
        PathBuf::from("runs/best.safetensors")
    );
    assert_eq!(
        cfg.output.history_file,
        Some(PathBuf::from("runs/history.jsonl"))
    );
    assert_eq!(
        cfg.output.state_file,
        Some(PathBuf::from("runs/state.json"))
    );

    let yaml = cfg.to_yaml_string().unwrap();
    let back = RelianceConfig::from_yaml_str(&yaml)
        .unwrap_or_else(|e| panic!("re-parsing failed: {e}\n{yaml}"));
    assert_eq!(back, cfg, "\n{yaml}");
}

#[test]
fn the_defaults_round_trip() {
    let d = RelianceConfig::default();
    let yaml = d.to_yaml_string().unwrap();
    assert_eq!(RelianceConfig::from_yaml_str(&yaml).unwrap(), d, "\n{yaml}");
}

/// Section → keys, from a YAML mapping (a top-level scalar or null has no keys).
fn keys_of(yaml: &str) -> Vec<(String, Vec<String>)> {
    let v: serde_norway::Value = serde_norway::from_str(yaml).unwrap();
    let top = v.as_mapping().expect("a mapping");
    top.iter()
        .map(|(section, body)| {
            let keys = body.as_mapping().map_or(vec![], |m| {
                m.keys().map(|k| k.as_str().unwrap().to_string()).collect()
            });
            (section.as_str().unwrap().to_string(), keys)
        })
        .collect()
}

/// Every key there is: the defaults with the optional noise section present.
fn every_key() -> Vec<(String, Vec<String>)> {
    let cfg = RelianceConfig {
        noise: Some(NoiseSpec::default()),
        ..Default::default()
    };
    keys_of(&cfg.to_yaml_string().unwrap())
}

fn example_text() -> String {
    let path = manifest_path("examples/reliance.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_example_file_shows_every_key_in_order() {
    let all = keys_of(&RelianceConfig::default().to_yaml_string().unwrap());
    let example = keys_of(&example_text());
    assert_eq!(example, all);
}

#[test]
fn the_example_file_differs_from_the_defaults_only_in_its_output_files() {
    let cfg = RelianceConfig::from_yaml_file(manifest_path("examples/reliance.yaml")).unwrap();
    assert_eq!(
        cfg.output.history_file,
        Some(PathBuf::from("reliance-out/history.jsonl"))
    );
    assert_eq!(
        cfg.output.state_file,
        Some(PathBuf::from("reliance-out/state.json"))
    );
    assert_eq!(cfg.stopping.label_wave.patience, 5);
    assert_eq!(cfg.stopping.metric, Metric::AgreementAuc);
    assert_eq!(cfg.ablation.fractions, Fractions::Evenly(17));
    assert_eq!(cfg.restore_best.mode, SnapshotMode::Memory);

    let mut want = RelianceConfig::default();
    want.output.history_file = Some("reliance-out/history.jsonl".into());
    want.output.state_file = Some("reliance-out/state.json".into());
    assert_eq!(cfg, want);
}

#[test]
fn the_documentation_mentions_every_key() {
    let path = manifest_path("docs/configuration.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for (section, keys) in every_key() {
        assert!(doc.contains(&format!("`{section}:`")), "section {section}");
        for key in keys {
            assert!(
                doc.contains(&format!("| `{key}` |")),
                "{section}.{key} has no table row"
            );
        }
    }
}

#[test]
fn a_missing_file_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-reliance.yaml");
    let msg = RelianceConfig::from_yaml_file(&path)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn a_bad_file_is_an_error_naming_the_path_the_key_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "# comment\nstopping:\n  tolerance: 2\n").unwrap();
    let msg = RelianceConfig::from_yaml_file(&path)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("tolerance"), "{msg}");
    assert!(mentions_line(&msg, 3), "{msg}");
}

#[test]
fn a_good_file_parses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.yaml");
    std::fs::write(&path, EVERY_KEY).unwrap();
    assert_eq!(
        RelianceConfig::from_yaml_file(&path).unwrap(),
        RelianceConfig::from_yaml_str(EVERY_KEY).unwrap()
    );
}

#[test]
fn the_schedule_counts_epochs_from_one() {
    let sched = |check_every, warmup_epochs| {
        let mut cfg = RelianceConfig::default();
        cfg.schedule.check_every = check_every;
        cfg.schedule.warmup_epochs = warmup_epochs;
        (1..=10)
            .filter(|&e| cfg.schedule.is_check_epoch(e))
            .collect::<Vec<_>>()
    };
    assert_eq!(sched(1, 2), [2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert_eq!(sched(3, 2), [2, 5, 8]);
    assert_eq!(sched(2, 1), [1, 3, 5, 7, 9]);
    // No epoch 0: a warmup of 0 behaves as 1.
    assert_eq!(sched(2, 0), [1, 3, 5, 7, 9]);
}

#[test]
fn a_section_header_with_nothing_under_it_gives_that_sections_defaults() {
    let cfg = RelianceConfig::from_yaml_str(
        "ablation:\n  # clamp: mean\nnoise:\n  # draws: 3\nstopping:\n  tolerance: 0.04\n",
    )
    .unwrap();
    assert_eq!(cfg.ablation, RelianceConfig::default().ablation);
    assert_eq!(
        cfg.noise, None,
        "an empty noise section leaves the noise curve off"
    );
    assert_eq!(cfg.stopping.tolerance, 0.04);
    let on = RelianceConfig::from_yaml_str("noise: {}\n").unwrap();
    assert_eq!(on.noise, Some(NoiseSpec::default()));
}

/// Keys of the stopping rule of 0.1 are refused with what replaced them, at their line; an empty
/// or partial `label_wave:` section takes the documented defaults (window 3, patience 5).
#[test]
fn keys_of_earlier_versions_say_what_replaced_them() {
    for key in [
        "patience: 8",
        "smoothing: 0.0",
        "keep: peak",
        "accuracy_drop: 0.1",
        "fallback: none",
    ] {
        let yaml = format!("stopping:\n  metric: auc\n  {key}\n");
        let msg = parse_err(&yaml);
        let name = key.split(':').next().unwrap();
        assert!(
            msg.contains(&format!("`{name}` was removed in 0.2.0"))
                && msg.contains("docs/configuration.md"),
            "{msg}"
        );
        assert!(mentions_line(&msg, 3) || mentions_line(&msg, 2), "{msg}");
    }
    for yaml in [
        "stopping:\n  label_wave:\n",
        "stopping:\n  label_wave: {}\n",
    ] {
        let cfg = RelianceConfig::from_yaml_str(yaml).unwrap();
        assert_eq!(cfg.stopping.label_wave, LabelWaveRule::default(), "{yaml}");
    }
    let cfg = RelianceConfig::from_yaml_str("stopping:\n  label_wave: {window: 1}\n").unwrap();
    assert_eq!(
        cfg.stopping.label_wave,
        LabelWaveRule {
            window: 1,
            patience: 5
        }
    );
}
