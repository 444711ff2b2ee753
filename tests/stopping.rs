//! The stopping state machine on scripted metric sequences, worked out by hand.

use candle_reliance::monitor::{EarlyStopping, EarlyStoppingStrategy, StoppingRule};
use candle_reliance::{Decision, StopReason};

struct Case {
    name: &'static str,
    rule: StoppingRule,
    metrics: &'static [f64],
    /// Epoch (1-based position in `metrics`) of the first stop, if any.
    stop_at: Option<usize>,
    best_epoch: Option<usize>,
}

fn rule(patience: usize, min_delta: f64, smoothing: f64) -> StoppingRule {
    StoppingRule {
        patience,
        min_delta,
        smoothing,
        ..Default::default()
    }
}

#[test]
fn scripted_sequences() {
    let cases = [
        Case {
            name: "rising never stops",
            rule: rule(1, 0.0, 0.0),
            metrics: &[0.1, 0.2, 0.3, 0.4],
            stop_at: None,
            best_epoch: Some(4),
        },
        Case {
            name: "patience 1 stops at first non-improvement",
            rule: rule(1, 0.0, 0.0),
            metrics: &[0.5, 0.6, 0.6, 0.9],
            stop_at: Some(3),
            best_epoch: Some(2),
        },
        Case {
            name: "patience 3 waits three checks",
            rule: rule(3, 0.0, 0.0),
            metrics: &[0.5, 0.6, 0.55, 0.59, 0.58, 0.7],
            stop_at: Some(5),
            best_epoch: Some(2),
        },
        Case {
            name: "a new peak resets the count",
            rule: rule(2, 0.0, 0.0),
            metrics: &[0.5, 0.4, 0.6, 0.5, 0.5],
            stop_at: Some(5),
            best_epoch: Some(3),
        },
        Case {
            name: "min_delta: small gains are not improvements",
            rule: rule(2, 0.05, 0.0),
            metrics: &[0.50, 0.53, 0.56, 0.60],
            // 0.53 and 0.56 do not beat 0.50 + 0.05 (0.56 is not > 0.55? it is: 0.56 > 0.55).
            // So: e1 best 0.50; e2 0.53 ≤ 0.55 bad 1; e3 0.56 > 0.55 best; e4 0.60 ≤ 0.61 bad 1.
            stop_at: None,
            best_epoch: Some(3),
        },
        Case {
            name: "min_delta stops a plateau",
            rule: rule(2, 0.05, 0.0),
            metrics: &[0.50, 0.53, 0.54, 0.9],
            stop_at: Some(3),
            best_epoch: Some(1),
        },
        Case {
            name: "smoothing delays the stop past a one-check dip",
            // s: 1.0; 0.5·1.0+0.5·0.6 = 0.8 (bad 1); 0.5·0.8+0.5·1.4 = 1.1 (best); 0.5·1.1+0.5·1.0 = 1.05 (bad 1)
            rule: rule(2, 0.0, 0.5),
            metrics: &[1.0, 0.6, 1.4, 1.0],
            stop_at: None,
            best_epoch: Some(3),
        },
        Case {
            name: "without smoothing the same dip stops",
            rule: rule(2, 0.0, 0.0),
            metrics: &[1.0, 0.6, 0.9, 1.0],
            stop_at: Some(3),
            best_epoch: Some(1),
        },
        Case {
            name: "NaN stops at once",
            rule: rule(5, 0.0, 0.0),
            metrics: &[0.5, f64::NAN, 0.9],
            stop_at: Some(2),
            best_epoch: Some(1),
        },
        Case {
            name: "infinity stops at once",
            rule: rule(5, 0.0, 0.0),
            metrics: &[f64::INFINITY],
            stop_at: Some(1),
            best_epoch: None,
        },
    ];
    for c in cases {
        let mut es = EarlyStopping::new(c.rule.clone());
        let mut first_stop = None;
        for (i, &m) in c.metrics.iter().enumerate() {
            let d = es.update(i + 1, m);
            if d.is_stop() && first_stop.is_none() {
                first_stop = Some(i + 1);
            }
            if let Some(s) = first_stop {
                assert!(
                    d.is_stop(),
                    "{}: a stop is final (epoch {} after stop at {s})",
                    c.name,
                    i + 1
                );
            }
        }
        assert_eq!(first_stop, c.stop_at, "{}", c.name);
        assert_eq!(
            es.state().best.as_ref().map(|b| b.epoch),
            c.best_epoch,
            "{}",
            c.name
        );
    }
}

#[test]
fn smoothed_values_are_exponential_moving_averages() {
    let mut es = EarlyStopping::new(rule(10, 0.0, 0.75));
    for (epoch, m) in [(1, 0.4), (2, 0.8), (3, 0.0)] {
        es.update(epoch, m);
    }
    // 0.4; 0.75·0.4 + 0.25·0.8 = 0.5; 0.75·0.5 + 0 = 0.375.
    assert!((es.state().smoothed.unwrap() - 0.375).abs() < 1e-12);
    assert_eq!(es.state().best.as_ref().unwrap().epoch, 2);
    assert!((es.state().best.as_ref().unwrap().metric - 0.5).abs() < 1e-12);
}

#[test]
fn reasons_say_what_happened() {
    let mut es = EarlyStopping::new(rule(2, 0.0, 0.0));
    es.update(3, 0.7);
    es.update(4, 0.6);
    let d = es.update(5, 0.65);
    match d.reason() {
        Some(StopReason::PatienceExhausted {
            best_epoch: 3,
            best_metric,
            checks_without_improvement: 2,
        }) => {
            assert_eq!(*best_metric, 0.7)
        }
        other => panic!("unexpected {other:?}"),
    }
    let text = d.reason().unwrap().to_string();
    assert!(
        text.contains("patience exhausted") && text.contains("epoch 3"),
        "{text}"
    );
    let mut es = EarlyStopping::new(rule(2, 0.0, 0.0));
    assert!(matches!(
        es.update(1, f64::NAN),
        Decision::Stop {
            reason: StopReason::NonFinite { epoch: 1, .. }
        }
    ));
}

#[test]
fn state_round_trips_and_resumes_identically() {
    let metrics = [0.3, 0.5, 0.45, 0.52, 0.40, 0.38, 0.35, 0.6];
    let r = rule(3, 0.005, 0.3);
    let mut full = EarlyStopping::new(r.clone());
    let all: Vec<Decision> = metrics
        .iter()
        .enumerate()
        .map(|(i, &m)| full.update(i + 1, m))
        .collect();
    for cut in 0..metrics.len() {
        let mut first = EarlyStopping::new(r.clone());
        let mut got: Vec<Decision> = metrics[..cut]
            .iter()
            .enumerate()
            .map(|(i, &m)| first.update(i + 1, m))
            .collect();
        let json = serde_json::to_string(first.state()).unwrap();
        let mut resumed =
            EarlyStopping::with_state(r.clone(), serde_json::from_str(&json).unwrap());
        got.extend(
            metrics[cut..]
                .iter()
                .enumerate()
                .map(|(i, &m)| resumed.update(cut + i + 1, m)),
        );
        assert_eq!(got, all, "interrupted after {cut} checks");
    }
    assert!(
        all.iter().any(|d| d.is_stop()),
        "the sequence must exercise a stop"
    );
}
