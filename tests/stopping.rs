//! The stopping state machine on scripted metric sequences, worked out by hand.

use candle_reliance::monitor::{
    EarlyStopping, EarlyStoppingStrategy, Fallback, Keep, LabelWaveRule, StoppingRule,
};
use candle_reliance::{Decision, StopReason};

struct Case {
    name: &'static str,
    rule: StoppingRule,
    metrics: &'static [f64],
    /// Epoch (1-based position in `metrics`) of the first stop, if any.
    stop_at: Option<usize>,
    kept: Option<usize>,
}

fn rule(tolerance: f64, patience: usize, smoothing: f64) -> StoppingRule {
    StoppingRule {
        tolerance,
        patience,
        smoothing,
        ..Default::default()
    }
}

#[test]
fn scripted_sequences() {
    let peak = |mut r: StoppingRule| {
        r.keep = Keep::Peak;
        r
    };
    let cases = [
        Case {
            name: "rising never stops",
            rule: rule(0.0, 1, 0.0),
            metrics: &[0.1, 0.2, 0.3, 0.4],
            stop_at: None,
            kept: Some(4),
        },
        Case {
            name: "tolerance 0, patience 1: the first check below the peak stops",
            rule: rule(0.0, 1, 0.0),
            metrics: &[0.5, 0.6, 0.59, 0.9],
            stop_at: Some(3),
            kept: Some(2),
        },
        Case {
            name: "tolerance 0: a tie with the peak is on the plateau",
            rule: rule(0.0, 1, 0.0),
            metrics: &[0.5, 0.6, 0.6, 0.4],
            stop_at: Some(4),
            kept: Some(3),
        },
        Case {
            name: "dips within the tolerance are on the plateau; the last of them is kept",
            // Peak 0.60; the plateau is ≥ 0.57: 0.58, 0.59 on it; 0.55 (1 epoch), 0.54 (2).
            rule: rule(0.05, 2, 0.0),
            metrics: &[0.50, 0.60, 0.58, 0.59, 0.55, 0.54],
            stop_at: Some(6),
            kept: Some(4),
        },
        Case {
            name: "keep: peak keeps the highest check instead",
            rule: peak(rule(0.05, 2, 0.0)),
            metrics: &[0.50, 0.60, 0.58, 0.59, 0.55, 0.54],
            stop_at: Some(6),
            kept: Some(2),
        },
        Case {
            name: "a return to the plateau resets the patience",
            // 0.5 below 0.57 (1 epoch); 0.58 back on it; 0.5, 0.5 below for 1, 2 epochs.
            rule: rule(0.05, 2, 0.0),
            metrics: &[0.6, 0.5, 0.58, 0.5, 0.5],
            stop_at: Some(5),
            kept: Some(3),
        },
        Case {
            name: "the tolerance is a share of the peak",
            // Peak 2.0; the plateau is ≥ 1.8: 1.85 on it, 1.79 not.
            rule: rule(0.1, 1, 0.0),
            metrics: &[2.0, 1.85, 1.79],
            stop_at: Some(3),
            kept: Some(2),
        },
        Case {
            name: "smoothing delays the stop past a one-check dip",
            // s: 1.0 (peak); 0.5·1.0 + 0.5·0.6 = 0.8 (below, 1 epoch); 0.5·0.8 + 0.5·1.4 = 1.1
            // (peak); 0.5·1.1 + 0.5·1.0 = 1.05 (below, 1 epoch).
            rule: rule(0.0, 2, 0.5),
            metrics: &[1.0, 0.6, 1.4, 1.0],
            stop_at: None,
            kept: Some(3),
        },
        Case {
            name: "without smoothing the same dip stops",
            rule: rule(0.0, 2, 0.0),
            metrics: &[1.0, 0.6, 0.9, 1.0],
            stop_at: Some(3),
            kept: Some(1),
        },
        Case {
            name: "NaN stops at once",
            rule: rule(0.0, 5, 0.0),
            metrics: &[0.5, f64::NAN, 0.9],
            stop_at: Some(2),
            kept: Some(1),
        },
        Case {
            name: "infinity stops at once",
            rule: rule(0.0, 5, 0.0),
            metrics: &[f64::INFINITY],
            stop_at: Some(1),
            kept: None,
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
        assert_eq!(es.kept_epoch(), c.kept, "{}", c.name);
    }
}

#[test]
fn patience_counts_epochs_between_sparse_checks() {
    // Checks every other epoch: the peak at epoch 2, then below it at 4 (2 epochs) and 6 (4).
    let mut es = EarlyStopping::new(rule(0.0, 3, 0.0));
    assert!(!es.update(2, 0.5).is_stop());
    assert!(!es.update(4, 0.4).is_stop());
    assert!(es.update(6, 0.4).is_stop());
    assert_eq!(es.kept_epoch(), Some(2));
}

#[test]
fn the_update_that_keeps_its_epoch_says_so() {
    let mut es = EarlyStopping::new(rule(0.05, 3, 0.0));
    let kept: Vec<bool> = [0.5, 0.6, 0.58, 0.5, 0.59]
        .iter()
        .enumerate()
        .map(|(i, &m)| {
            es.update(i + 1, m);
            es.kept_last()
        })
        .collect();
    // 0.5 and 0.6 are peaks, 0.58 on the plateau (≥ 0.57), 0.5 below it, 0.59 on it again.
    assert_eq!(kept, [true, true, true, false, true]);
}

#[test]
fn degenerate_checks_are_never_kept_and_stop_after_the_patience() {
    let mut es = EarlyStopping::new(rule(0.0, 2, 0.0));
    es.update(1, 0.5);
    es.update(2, 0.6);
    // A degenerate network would have the highest metric of all; it is not even looked at.
    assert!(!es.degenerate(3, "silent").is_stop());
    assert!(!es.kept_last());
    match es.degenerate(4, "silent").reason() {
        Some(StopReason::Collapsed {
            epoch: 4,
            kept_epoch: Some(2),
            what,
        }) => assert_eq!(what, "silent"),
        r => panic!("unexpected {r:?}"),
    }
    // Degenerate from the first check: nothing is kept, the patience counts from that check.
    let mut es = EarlyStopping::new(rule(0.0, 2, 0.0));
    assert!(!es.degenerate(2, "one class").is_stop());
    assert!(!es.degenerate(3, "one class").is_stop());
    assert!(matches!(
        es.degenerate(4, "one class").reason(),
        Some(StopReason::Collapsed {
            kept_epoch: None,
            ..
        })
    ));
    assert_eq!(es.kept_epoch(), None);
}

#[test]
fn smoothed_values_are_exponential_moving_averages() {
    let mut es = EarlyStopping::new(rule(0.0, 10, 0.75));
    for (epoch, m) in [(1, 0.4), (2, 0.8), (3, 0.0)] {
        es.update(epoch, m);
    }
    // 0.4; 0.75·0.4 + 0.25·0.8 = 0.5; 0.75·0.5 + 0 = 0.375.
    assert!((es.state().smoothed.unwrap() - 0.375).abs() < 1e-12);
    let peak = es.state().peak.clone().unwrap();
    assert_eq!(peak.epoch, 2);
    assert!((peak.metric - 0.5).abs() < 1e-12);
}

#[test]
fn reasons_say_what_happened() {
    let mut es = EarlyStopping::new(rule(0.0, 2, 0.0));
    es.update(3, 0.7);
    es.update(4, 0.6);
    let d = es.update(5, 0.65);
    match d.reason() {
        Some(StopReason::Declined {
            peak_epoch: 3,
            peak,
            kept_epoch: 3,
            epochs_below: 2,
        }) => {
            assert_eq!(*peak, 0.7)
        }
        other => panic!("unexpected {other:?}"),
    }
    let text = d.reason().unwrap().to_string();
    assert!(
        text.contains("reliance rose") && text.contains("epoch 3") && text.contains("2 epochs"),
        "{text}"
    );
    let mut es = EarlyStopping::new(rule(0.0, 2, 0.0));
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
    let r = rule(0.05, 3, 0.3);
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

/// `Keep::MostAccurateNearPeak` fed metrics and unablated accuracies, worked out by hand.
#[test]
fn most_accurate_plateau_check_is_kept() {
    struct AccCase {
        name: &'static str,
        checks: &'static [(f64, Option<f64>)],
        kept: usize,
        /// Whether each update kept its own epoch (the monitor's moment to snapshot).
        kept_last: &'static [bool],
    }
    let cases = [
        AccCase {
            name: "the most accurate of the plateau checks",
            // Peak 0.60 (epoch 2); plateau ≥ 0.57: epochs 2, 3, 4; epoch 5 below it.
            checks: &[
                (0.50, Some(0.70)),
                (0.60, Some(0.80)),
                (0.58, Some(0.90)),
                (0.59, Some(0.85)),
                (0.55, Some(0.99)),
            ],
            kept: 3,
            kept_last: &[true, true, true, false, false],
        },
        AccCase {
            name: "an equally accurate later check replaces the kept one",
            checks: &[(0.60, Some(0.80)), (0.59, Some(0.80)), (0.58, Some(0.79))],
            kept: 2,
            kept_last: &[true, true, false],
        },
        AccCase {
            name: "a kept check that a new peak leaves below the plateau is replaced",
            // Epoch 1 (0.58, acc 0.95) is kept; the peak 0.70 at epoch 2 puts the plateau at
            // ≥ 0.665, so epoch 1 is off it and epoch 2 is kept though less accurate; epoch 3
            // (0.69, acc 0.90) beats it.
            checks: &[(0.58, Some(0.95)), (0.70, Some(0.60)), (0.69, Some(0.90))],
            kept: 3,
            kept_last: &[true, true, true],
        },
        AccCase {
            name: "a new peak that is less accurate does not replace a kept check still on the plateau",
            // Peak 0.60 then 0.61: the plateau ≥ 0.5795 keeps epoch 1 (0.60, acc 0.9) on it.
            checks: &[(0.60, Some(0.90)), (0.61, Some(0.80))],
            kept: 1,
            kept_last: &[true, false],
        },
        AccCase {
            name: "without accuracies: the last check on the plateau",
            checks: &[(0.60, Some(0.90)), (0.59, None), (0.40, Some(1.0))],
            kept: 2,
            kept_last: &[true, true, false],
        },
        AccCase {
            name: "a NaN accuracy counts as unknown",
            checks: &[(0.60, Some(0.90)), (0.59, Some(f64::NAN))],
            kept: 2,
            kept_last: &[true, true],
        },
    ];
    for c in cases {
        // The accuracy guard off: some of these checks lose more than 10% of the accuracy.
        let mut es = EarlyStopping::new(StoppingRule {
            accuracy_drop: 1.0,
            ..rule(0.05, 5, 0.0)
        });
        assert_eq!(es.rule().keep, Keep::MostAccurateNearPeak, "the default");
        let kept_last: Vec<bool> = c
            .checks
            .iter()
            .enumerate()
            .map(|(i, &(m, a))| {
                es.update_check(i + 1, m, a);
                es.kept_last()
            })
            .collect();
        assert_eq!(es.kept_epoch(), Some(c.kept), "{}", c.name);
        assert_eq!(kept_last, c.kept_last, "{}", c.name);
    }
}

#[test]
fn most_accurate_keep_resumes_identically() {
    let checks = [
        (0.50, 0.6),
        (0.60, 0.7),
        (0.59, 0.8),
        (0.61, 0.75),
        (0.60, 0.78),
        (0.50, 0.9),
        (0.49, 0.95),
        (0.48, 0.97),
    ];
    let r = rule(0.03, 2, 0.0);
    let run = |es: &mut EarlyStopping, from: usize, part: &[(f64, f64)]| -> Vec<Decision> {
        part.iter()
            .enumerate()
            .map(|(i, &(m, a))| es.update_check(from + i + 1, m, Some(a)))
            .collect()
    };
    let mut full = EarlyStopping::new(r.clone());
    let all = run(&mut full, 0, &checks);
    // Peak 0.61 at epoch 4: plateau ≥ 0.5917 holds epochs 2, 4, 5 (epoch 3's 0.59 falls off);
    // epoch 5 (acc 0.78) is the most accurate of them; 6 and 7 below it stop at 7.
    assert_eq!(full.kept_epoch(), Some(5));
    assert!(all[6].is_stop() && !all[5].is_stop());
    for cut in 0..checks.len() {
        let mut first = EarlyStopping::new(r.clone());
        let mut got = run(&mut first, 0, &checks[..cut]);
        let json = serde_json::to_string(first.state()).unwrap();
        let mut resumed =
            EarlyStopping::with_state(r.clone(), serde_json::from_str(&json).unwrap());
        got.extend(run(&mut resumed, cut, &checks[cut..]));
        assert_eq!(got, all, "interrupted after {cut} checks");
        assert_eq!(
            resumed.kept_epoch(),
            Some(5),
            "interrupted after {cut} checks"
        );
    }
}

/// One epoch of a scripted run with the Label Wave fallback: prediction changes since the
/// previous check (none at the first), then the check's metric.
type Step = (Option<f64>, f64);

/// Feeds `steps` from epoch 2 on as the monitor does (changes, then the check); per epoch the
/// decision, the kept epoch and whether the update kept its own epoch.
fn feed(
    es: &mut EarlyStopping,
    from: usize,
    steps: &[Step],
) -> Vec<(Decision, Option<usize>, bool)> {
    steps
        .iter()
        .enumerate()
        .map(|(i, &(changes, metric))| {
            let epoch = from + i;
            if let Some(n) = changes {
                es.update_changes(epoch, n);
            }
            let d = es.update_check(epoch, metric, None);
            (d, es.kept_epoch(), es.kept_last())
        })
        .collect()
}

fn fallback_rule() -> StoppingRule {
    StoppingRule {
        tolerance: 0.05,
        patience: 2,
        label_wave: LabelWaveRule {
            window: 3,
            patience: 2,
        },
        ..Default::default()
    }
}

/// The metric falls from its first check (epoch 2) on; changes fall to a low and rise.
/// Label Wave (window 3): means 80 (centre 4, known at 5), 60 (centre 5, at 6), 50 (centre 6,
/// at 7), then 53.3, 70, 90: the low is centre 6, kept as epoch 7 (the window's last epoch);
/// its patience 2 runs out at epoch 6 + 1 + 2 = 9. The reliance patience ran out at epoch 4.
const FALLING: &[Step] = &[
    (None, 0.60),
    (Some(100.0), 0.55),
    (Some(80.0), 0.50),
    (Some(60.0), 0.45),
    (Some(40.0), 0.40),
    (Some(50.0), 0.35),
    (Some(70.0), 0.30),
    (Some(90.0), 0.25),
    (Some(110.0), 0.20),
];

#[test]
fn label_wave_decides_while_the_metric_never_rose() {
    let mut es = EarlyStopping::new(fallback_rule());
    assert_eq!(es.rule().fallback, Fallback::LabelWave, "the default");
    let got = feed(&mut es, 2, FALLING);
    let kept: Vec<Option<usize>> = got.iter().map(|g| g.1).collect();
    // Epochs 2–4: the reliance rule's first check; from 5 on, Label Wave's newest low.
    assert_eq!(
        kept,
        [2, 2, 2, 5, 6, 7, 7, 7, 7].map(Some),
        "kept epoch after each check"
    );
    let kept_last: Vec<bool> = got.iter().map(|g| g.2).collect();
    assert_eq!(
        kept_last,
        [true, false, false, true, true, true, false, false, false]
    );
    let stops: Vec<bool> = got.iter().map(|g| g.0.is_stop()).collect();
    assert_eq!(stops.iter().position(|&s| s), Some(7), "stops at epoch 9");
    match got[7].0.reason() {
        Some(StopReason::FellBackToLabelWave {
            lowest_epoch: 6,
            lowest,
            kept_epoch: 7,
            epochs_below: 7,
        }) => assert!((lowest - 50.0).abs() < 1e-12),
        other => panic!("unexpected {other:?}"),
    }
    let text = got[7].0.reason().unwrap().to_string();
    assert!(
        text.contains("never rose") && text.contains("keeping epoch 7"),
        "{text}"
    );

    // Without the fallback the same checks stop at epoch 4, keeping the first check.
    let mut alone = EarlyStopping::new(StoppingRule {
        fallback: Fallback::None,
        ..fallback_rule()
    });
    let got = feed(&mut alone, 2, FALLING);
    assert!(got[2].0.is_stop() && !got[1].0.is_stop());
    assert_eq!(alone.kept_epoch(), Some(2));
    // Without any changes fed, nothing falls back either.
    let mut blind = EarlyStopping::new(fallback_rule());
    let no_changes: Vec<Step> = FALLING.iter().map(|&(_, m)| (None, m)).collect();
    let got = feed(&mut blind, 2, &no_changes);
    assert!(got[2].0.is_stop());
    assert_eq!(blind.kept_epoch(), Some(2));
}

#[test]
fn a_rise_above_the_first_check_hands_back_to_the_reliance_rule() {
    // Label Wave's low: mean 80 centred on 4, kept as epoch 5; (80, 60, 200) at 6 is higher.
    // At epoch 6 the metric rises above the first check: the reliance rule keeps epoch 6 (a
    // new peak 0.65; plateau ≥ 0.6175), then 7 (0.64, the end of the plateau, no accuracies);
    // 8 and 9 below it stop at 9 with the reliance rule's reason.
    let steps: &[Step] = &[
        (None, 0.60),
        (Some(100.0), 0.55),
        (Some(80.0), 0.50),
        (Some(60.0), 0.50),
        (Some(200.0), 0.65),
        (Some(200.0), 0.64),
        (Some(200.0), 0.50),
        (Some(200.0), 0.40),
    ];
    let mut es = EarlyStopping::new(fallback_rule());
    let got = feed(&mut es, 2, steps);
    let kept: Vec<Option<usize>> = got.iter().map(|g| g.1).collect();
    assert_eq!(kept, [2, 2, 2, 5, 6, 7, 7, 7].map(Some));
    assert!(got[..7].iter().all(|g| !g.0.is_stop()));
    match got[7].0.reason() {
        Some(StopReason::Declined {
            peak_epoch: 6,
            kept_epoch: 7,
            epochs_below: 2,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert!(es.state().rose && !es.falling_back());
}

#[test]
fn the_fallback_resumes_identically() {
    let r = fallback_rule();
    let mut full = EarlyStopping::new(r.clone());
    let all = feed(&mut full, 2, FALLING);
    for cut in 0..FALLING.len() {
        let mut first = EarlyStopping::new(r.clone());
        let mut got = feed(&mut first, 2, &FALLING[..cut]);
        let json = serde_json::to_string(first.state()).unwrap();
        let mut resumed =
            EarlyStopping::with_state(r.clone(), serde_json::from_str(&json).unwrap());
        got.extend(feed(&mut resumed, 2 + cut, &FALLING[cut..]));
        assert_eq!(got, all, "interrupted after {cut} checks");
    }
}

#[test]
fn a_bad_label_wave_section_is_named() {
    let mut r = fallback_rule();
    r.label_wave.window = 4;
    let e = r.validate().unwrap_err().to_string();
    assert!(e.contains("label_wave") && e.contains("window"), "{e}");
}

#[test]
fn an_unstable_check_is_never_kept_nor_a_peak() {
    // (metric, accuracy). Best accuracy before epoch 3 is 0.70: below 0.9 · 0.70 = 0.63 a check is
    // unstable. Epoch 3 (0.30) is, and its metric spike 0.90 is ignored: the peak stays 0.55
    // (plateau ≥ 0.5225), epoch 4 (0.54, acc 0.72) is kept, 5 and 6 below stop at 6.
    let checks = [
        (0.50, 0.60),
        (0.55, 0.70),
        (0.90, 0.30),
        (0.54, 0.72),
        (0.40, 0.75),
        (0.40, 0.76),
    ];
    let run = |accuracy_drop: f64| {
        let mut es = EarlyStopping::new(StoppingRule {
            tolerance: 0.05,
            patience: 2,
            accuracy_drop,
            ..Default::default()
        });
        let stop = checks
            .iter()
            .enumerate()
            .map(|(i, &(m, a))| es.update_check(i + 1, m, Some(a)))
            .position(|d| d.is_stop())
            .map(|i| i + 1);
        (es, stop)
    };
    let (es, stop) = run(0.1);
    assert_eq!(
        es.rule().accuracy_drop,
        StoppingRule::default().accuracy_drop,
        "the default"
    );
    assert_eq!((stop, es.kept_epoch()), (Some(6), Some(4)));
    match &es.state().stopped {
        Some(StopReason::Declined {
            peak_epoch: 2,
            kept_epoch: 4,
            epochs_below: 2,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(es.state().best_accuracy, Some(0.76));
    // Off (1): the spike is the peak and is kept; 4 and 5 below it stop at 5.
    let (es, stop) = run(1.0);
    assert_eq!((stop, es.kept_epoch()), (Some(5), Some(3)));
    // 0.64 is within 10% of 0.70: not unstable, so the same spike would be the peak.
    let mut es = EarlyStopping::new(StoppingRule::default());
    es.update_check(1, 0.55, Some(0.70));
    es.update_check(2, 0.90, Some(0.64));
    assert_eq!(es.state().peak.as_ref().map(|p| p.epoch), Some(2));
    for bad in [0.0, -0.1, 1.5, f64::NAN] {
        let r = StoppingRule {
            accuracy_drop: bad,
            ..Default::default()
        };
        let e = r.validate().unwrap_err().to_string();
        assert!(e.contains("accuracy_drop"), "{e}");
    }
}

#[test]
fn label_wave_never_keeps_an_unstable_or_degenerate_check() {
    // Label Wave without a moving average (window 1): each new low of the changes is kept, unless
    // that epoch's check is unstable (epoch 4: accuracy 0.50 < 0.9 · 0.81) or degenerate
    // (epoch 6); the kept epoch then stays where it was.
    let mut es = EarlyStopping::new(StoppingRule {
        tolerance: 0.05,
        patience: 10,
        label_wave: LabelWaveRule {
            window: 1,
            patience: 5,
        },
        ..Default::default()
    });
    let mut kept = vec![];
    es.update_check(2, 0.60, Some(0.80));
    kept.push(es.kept_epoch());
    for (epoch, changes, metric, acc) in [
        (3, 100.0, 0.55, 0.81),
        (4, 50.0, 0.50, 0.50),
        (5, 40.0, 0.50, 0.82),
    ] {
        es.update_changes(epoch, changes);
        es.update_check(epoch, metric, Some(acc));
        kept.push(es.kept_epoch());
    }
    es.update_changes(6, 10.0);
    es.degenerate(6, "one predicted class");
    kept.push(es.kept_epoch());
    assert_eq!(kept, [2, 3, 3, 5, 5].map(Some));
    assert!(!es.kept_last());
    // Label Wave's own low moved with the counts all the same.
    assert_eq!(es.state().wave.lowest, Some((6, 10.0)));
}
