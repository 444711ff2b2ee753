//! The stopping rule's state machine, row by row of its precedence table (docs/configuration.md,
//! "The stopping rule, step by step"), on scripted observations worked out by hand.

use candle_reliance::monitor::{
    CheckSignals, EarlyStopping, EarlyStoppingStrategy, Health, LabelWaveRule, Observation,
    StoppingRule, StoppingState, Warning,
};
use candle_reliance::{Decision, StopReason};

/// One epoch of a script: training-set changes, a check (metric, accuracy, probe-data changes,
/// health) and whether the budget ends.
#[derive(Clone)]
struct Epoch {
    training: Option<f64>,
    check: Option<CheckSignals>,
    end: bool,
}

fn train(changes: f64) -> Epoch {
    Epoch {
        training: Some(changes),
        check: None,
        end: false,
    }
}

fn check(metric: f64, accuracy: f64) -> Epoch {
    Epoch {
        training: None,
        check: Some(CheckSignals::new(metric, accuracy)),
        end: false,
    }
}

impl Epoch {
    /// Adds training-set changes.
    fn t(mut self, changes: f64) -> Self {
        self.training = Some(changes);
        self
    }
    /// Adds probe-data changes to the check.
    fn p(mut self, changes: f64) -> Self {
        let c = self.check.take().expect("a check");
        self.check = Some(c.with_prediction_changes(Some(changes)));
        self
    }
    fn health(mut self, h: Health) -> Self {
        let c = self.check.take().expect("a check");
        self.check = Some(c.with_health(h));
        self
    }
    fn last(mut self) -> Self {
        self.end = true;
        self
    }
}

fn rule(tolerance: f64, window: usize, patience: usize) -> StoppingRule {
    StoppingRule {
        tolerance,
        label_wave: LabelWaveRule { window, patience },
        ..Default::default()
    }
}

/// What one step must give: the decision's kind (`None`: continue) and the kept epoch after it.
type Want = (Option<&'static str>, Option<usize>);

fn kind(d: &Decision) -> Option<&'static str> {
    d.reason().map(|r| match r {
        StopReason::PredictionChangesRose { .. } => "prediction_changes_rose",
        StopReason::Collapsed { .. } => "collapsed",
        StopReason::NonFinite { .. } => "non_finite",
        StopReason::MaxEpochs { .. } => "max_epochs",
        StopReason::Custom { .. } => "custom",
    })
}

/// Steps `epochs` (epoch numbers from `from`) and returns per step the decision and kept epoch,
/// and the warnings raised.
fn run(
    es: &mut EarlyStopping,
    from: usize,
    epochs: &[Epoch],
) -> (Vec<(Decision, Option<usize>)>, Vec<Warning>) {
    let mut out = vec![];
    let mut warnings = vec![];
    for (i, e) in epochs.iter().enumerate() {
        let mut obs = Observation::new(from + i).with_training_changes(e.training);
        if let Some(c) = &e.check {
            obs = obs.with_check(c.clone());
        }
        if e.end {
            obs = obs.at_budget_end();
        }
        let d = es.step(&obs);
        warnings.extend(EarlyStoppingStrategy::take_warnings(es));
        out.push((d, es.kept_epoch()));
    }
    (out, warnings)
}

struct Row {
    /// The table's row.
    row: u32,
    name: &'static str,
    rule: StoppingRule,
    /// Epochs 1, 2, …
    epochs: Vec<Epoch>,
    want: Vec<Want>,
}

fn rows() -> Vec<Row> {
    let nan = || Health::NonFinite("logits".into());
    let flat = || Health::Degenerate("one class".into());
    vec![
        Row {
            row: 1,
            name: "a stop is final: later steps repeat it, even healthy ones",
            rule: rule(0.1, 1, 5),
            epochs: vec![
                check(0.5, 0.5),
                check(f64::NAN, 0.9).health(nan()),
                check(0.9, 0.9),
            ],
            want: vec![
                (None, Some(1)),
                (Some("non_finite"), Some(1)),
                (Some("non_finite"), Some(1)),
            ],
        },
        Row {
            row: 3,
            name: "training changes feed Label Wave; probe-data changes are then ignored",
            // Window 1: lows 100 (1), 50 (2); 60, 70 no lower; patience 2 runs out at 2 + 2 = 4.
            // The probe data's 3, 2, 1, 0 would be new lows every time.
            rule: rule(0.1, 1, 2),
            epochs: vec![
                check(0.5, 0.5).t(100.0).p(3.0),
                check(0.5, 0.5).t(50.0).p(2.0),
                check(0.5, 0.5).t(60.0).p(1.0),
                check(0.5, 0.5).t(70.0).p(0.0),
            ],
            want: vec![
                (None, Some(1)),
                (None, Some(2)),
                (None, Some(3)),
                (Some("prediction_changes_rose"), Some(4)),
            ],
        },
        Row {
            row: 3,
            name: "training changes come in epochs without a check too",
            // Lows 100 (1), 50 (2); no check at 3–4; the stop at 4 keeps the last candidate, 2.
            rule: rule(0.1, 1, 2),
            epochs: vec![
                check(0.5, 0.5).t(100.0),
                check(0.5, 0.5).t(50.0),
                train(60.0),
                train(70.0),
            ],
            want: vec![
                (None, Some(1)),
                (None, Some(2)),
                (None, Some(2)),
                (Some("prediction_changes_rose"), Some(2)),
            ],
        },
        Row {
            row: 4,
            name: "a non-finite check stops at once and is never kept",
            rule: rule(0.1, 1, 5),
            epochs: vec![check(0.5, 0.5), check(0.6, 0.9).health(nan())],
            want: vec![(None, Some(1)), (Some("non_finite"), Some(1))],
        },
        Row {
            row: 4,
            name: "a non-finite first check keeps nothing",
            rule: rule(0.1, 1, 5),
            epochs: vec![check(f64::INFINITY, 0.5).health(nan())],
            want: vec![(Some("non_finite"), None)],
        },
        Row {
            row: 5,
            name: "degenerate checks are never candidates; a run of them as long as the patience \
                   stops",
            // Patience 2: degenerate since epoch 2; epoch 4 is 2 epochs later.
            rule: rule(0.1, 1, 2),
            epochs: vec![
                check(0.5, 0.5),
                check(0.9, 1.0).health(flat()),
                check(0.9, 1.0).health(flat()),
                check(0.9, 1.0).health(flat()),
            ],
            want: vec![
                (None, Some(1)),
                (None, Some(1)),
                (None, Some(1)),
                (Some("collapsed"), Some(1)),
            ],
        },
        Row {
            row: 5,
            name: "a healthy check ends a run of degenerate ones",
            rule: rule(0.1, 1, 2),
            epochs: vec![
                check(0.5, 0.5),
                check(0.9, 1.0).health(flat()),
                check(0.5, 0.4),
                check(0.9, 1.0).health(flat()),
                check(0.9, 1.0).health(flat()),
                check(0.9, 1.0).health(flat()),
            ],
            want: vec![
                (None, Some(1)),
                (None, Some(1)),
                (None, Some(1)),
                (None, Some(1)),
                (None, Some(1)),
                (Some("collapsed"), Some(1)),
            ],
        },
        Row {
            row: 6,
            name: "on the plateau the most accurate check is kept, the later among equals",
            // Training changes: a low at epoch 1 only. Peak 0.6 at 2, plateau ≥ 0.54: 0.55 (4)
            // and 0.58 (5) are on it; 0.50 (3) is not, however accurate.
            rule: rule(0.1, 1, 10),
            epochs: vec![
                check(0.50, 0.50).t(10.0),
                check(0.60, 0.60).t(20.0),
                check(0.50, 0.95).t(20.0),
                check(0.55, 0.70).t(20.0),
                check(0.58, 0.70).t(20.0),
            ],
            want: vec![
                (None, Some(1)),
                (None, Some(2)),
                (None, Some(2)),
                (None, Some(4)),
                (None, Some(5)),
            ],
        },
        Row {
            row: 6,
            name:
                "the plateau's floor belongs to it: with tolerance 0 a tie with the peak is on it",
            // A low at epoch 1 only; epoch 2 ties the peak and is more accurate.
            rule: rule(0.0, 1, 10),
            epochs: vec![check(0.5, 0.5).t(10.0), check(0.5, 0.9).t(20.0)],
            want: vec![(None, Some(1)), (None, Some(2))],
        },
        Row {
            row: 6,
            name: "below the plateau a new Label Wave low makes a candidate",
            // Falling metric; training lows at 1 (100), 3 (90), 4 (80). Epoch 4 is less
            // accurate than 3.
            rule: rule(0.1, 1, 10),
            epochs: vec![
                check(0.6, 0.5).t(100.0),
                check(0.5, 0.6).t(120.0),
                check(0.4, 0.7).t(90.0),
                check(0.3, 0.65).t(80.0),
            ],
            want: vec![
                (None, Some(1)),
                (None, Some(1)),
                (None, Some(3)),
                (None, Some(3)),
            ],
        },
        Row {
            row: 6,
            name: "before Label Wave has a low every check is a candidate",
            // Window 3: the first low (centre 2) is known at the third count (epoch 3), so
            // epoch 3 is neither on the plateau nor before a low, however accurate; the low's
            // centre, epoch 2, is the kept one already.
            rule: rule(0.1, 3, 10),
            epochs: vec![
                check(0.6, 0.5).t(100.0),
                check(0.3, 0.6).t(100.0),
                check(0.2, 0.9).t(100.0),
                check(0.1, 0.95).t(120.0),
            ],
            want: vec![
                (None, Some(1)),
                (None, Some(2)),
                (None, Some(2)),
                (None, Some(2)),
            ],
        },
        Row {
            row: 6,
            name: "a new peak raises the plateau; the kept check stays until a more accurate \
                   candidate",
            rule: rule(0.1, 1, 10),
            epochs: vec![
                check(0.50, 0.50).t(10.0),
                check(0.52, 0.80).t(20.0),
                check(0.90, 0.70).t(20.0),
                check(0.85, 0.75).t(20.0),
                check(0.84, 0.85).t(20.0),
            ],
            want: vec![
                (None, Some(1)),
                (None, Some(2)),
                (None, Some(2)),
                (None, Some(2)),
                (None, Some(5)),
            ],
        },
        Row {
            row: 6,
            name: "probe-data changes feed Label Wave when the loop reports none",
            // Lows 30 (2), 20 (3); 25, 26 no lower: patience 2 runs out at 3 + 2 = 5.
            rule: rule(0.1, 1, 2),
            epochs: vec![
                check(0.5, 0.5),
                check(0.5, 0.5).p(30.0),
                check(0.5, 0.6).p(20.0),
                check(0.3, 0.9).p(25.0),
                check(0.3, 0.9).p(26.0),
            ],
            want: vec![
                (None, Some(1)),
                (None, Some(2)),
                (None, Some(3)),
                (None, Some(3)),
                (Some("prediction_changes_rose"), Some(3)),
            ],
        },
        Row {
            row: 7,
            name: "Label Wave's centred window: a new low makes its centre a candidate, one \
                   epoch later",
            // Window 3 over epochs 2…: means 60 (centre 3, at 4), 50 (centre 4, at 5), 60, 90.
            // Patience 2 runs out at 4 + 1 + 2 = 7. Falling metric: candidates are epoch 1 (no
            // low yet, on the plateau), 2 and 3 (no low yet), then the lows' centres 3 (at 4)
            // and 4 (at 5); epochs 4–7 themselves are not, however accurate.
            rule: rule(0.1, 3, 2),
            epochs: vec![
                check(0.9, 0.1),
                check(0.5, 0.2).t(90.0),
                check(0.4, 0.3).t(60.0),
                check(0.3, 0.4).t(30.0),
                check(0.2, 0.5).t(60.0),
                check(0.1, 0.9).t(90.0),
                check(0.0, 0.9).t(120.0),
            ],
            want: vec![
                (None, Some(1)),
                (None, Some(2)),
                (None, Some(3)),
                (None, Some(3)),
                (None, Some(4)),
                (None, Some(4)),
                (Some("prediction_changes_rose"), Some(4)),
            ],
        },
        Row {
            row: 7,
            name: "the stop epoch itself is kept when it is a candidate",
            rule: rule(0.1, 1, 2),
            epochs: vec![
                check(0.5, 0.5).t(100.0),
                check(0.5, 0.5).t(50.0),
                check(0.5, 0.5).t(60.0),
                check(0.5, 0.9).t(70.0),
            ],
            want: vec![
                (None, Some(1)),
                (None, Some(2)),
                (None, Some(3)),
                (Some("prediction_changes_rose"), Some(4)),
            ],
        },
        Row {
            row: 8,
            name: "the budget's last epoch stops",
            rule: rule(0.1, 1, 5),
            epochs: vec![check(0.5, 0.5).t(100.0), check(0.5, 0.6).t(90.0).last()],
            want: vec![(None, Some(1)), (Some("max_epochs"), Some(2))],
        },
        Row {
            row: 7,
            name: "Label Wave's stop comes before the budget's on the same epoch",
            rule: rule(0.1, 1, 1),
            epochs: vec![check(0.5, 0.5).t(100.0), check(0.5, 0.4).t(110.0).last()],
            want: vec![(None, Some(1)), (Some("prediction_changes_rose"), Some(1))],
        },
        Row {
            row: 9,
            name: "otherwise training goes on",
            rule: rule(0.1, 1, 5),
            epochs: vec![train(100.0), check(0.5, 0.5), train(90.0)],
            want: vec![(None, None), (None, Some(2)), (None, Some(2))],
        },
    ]
}

#[test]
fn every_row_of_the_table() {
    for r in rows() {
        assert_eq!(r.epochs.len(), r.want.len(), "row {}: {}", r.row, r.name);
        let mut es = EarlyStopping::new(r.rule.clone());
        let (got, _) = run(&mut es, 1, &r.epochs);
        let got: Vec<Want> = got.iter().map(|(d, k)| (kind(d), *k)).collect();
        assert_eq!(got, r.want, "row {}: {}", r.row, r.name);
    }
}

#[test]
fn row_2_an_epoch_not_after_the_last_is_ignored() {
    let mut es = EarlyStopping::new(rule(0.1, 1, 2));
    run(
        &mut es,
        1,
        &[check(0.5, 0.5).t(100.0), check(0.5, 0.9).t(50.0)],
    );
    let before = es.state().clone();
    let obs = Observation::new(2)
        .with_training_changes(Some(10.0))
        .with_check(CheckSignals::new(0.9, 1.0));
    assert_eq!(es.step(&obs), Decision::Continue);
    assert_eq!(es.state(), &before, "nothing changed");
    assert_eq!(es.kept_epoch(), Some(2));
}

#[test]
fn stop_reasons_carry_what_decided() {
    // Row 7's centred window: the low 50 at centre 4, known at 5, patience 2.
    let mut es = EarlyStopping::new(rule(0.1, 3, 2));
    let changes = [90.0, 60.0, 30.0, 60.0, 90.0, 120.0];
    let epochs: Vec<Epoch> = std::iter::once(check(0.5, 0.5))
        .chain(changes.iter().map(|&c| check(0.5, 0.5).t(c)))
        .collect();
    let (got, _) = run(&mut es, 1, &epochs);
    assert_eq!(
        got.last().unwrap().0,
        Decision::Stop {
            reason: StopReason::PredictionChangesRose {
                lowest_epoch: 4,
                lowest: 50.0,
                epochs_since: 2,
                kept_epoch: Some(7),
                plateau_end: Some(7),
            }
        }
    );
    let text = got.last().unwrap().0.reason().unwrap().to_string();
    assert!(
        text.contains("no new low for 2 epochs since 50.0 at epoch 4")
            && text.contains("plateau until epoch 7")
            && text.contains("keeping epoch 7"),
        "{text}"
    );

    let mut es = EarlyStopping::new(rule(0.1, 1, 2));
    let (got, _) = run(
        &mut es,
        1,
        &[
            check(0.5, 0.5),
            check(0.5, 0.5).health(Health::Degenerate("one class".into())),
            check(0.5, 0.5).health(Health::Degenerate("one class".into())),
            check(0.5, 0.5).health(Health::Degenerate("every unit silent".into())),
        ],
    );
    assert_eq!(
        got[3].0.reason(),
        Some(&StopReason::Collapsed {
            epoch: 4,
            what: "every unit silent".into(),
            kept_epoch: Some(1)
        })
    );
}

#[test]
fn warnings_are_raised_once_each() {
    // The metric leaves its plateau after epoch 1 (tolerance 0.1) while the training changes
    // keep falling: at epoch 3 it has been off for the patience (2) and Label Wave's newest low
    // (epoch 3) is after the plateau's end.
    let mut es = EarlyStopping::new(rule(0.1, 1, 2));
    let (_, warnings) = run(
        &mut es,
        1,
        &[
            check(0.9, 0.5).t(100.0),
            check(0.5, 0.6).t(90.0),
            check(0.4, 0.7).t(80.0),
            check(0.3, 0.8).t(70.0),
            check(0.2, 0.9).t(60.0).last(),
        ],
    );
    assert_eq!(
        warnings,
        [
            Warning::RelianceUninformative {
                epoch: 3,
                plateau_end: 1,
                lowest_epoch: 3
            },
            Warning::NoRiseWithinBudget { epoch: 5 },
        ]
    );
    // Agreeing signals raise nothing: the metric off its plateau after Label Wave's low.
    let mut es = EarlyStopping::new(rule(0.1, 1, 2));
    let (got, warnings) = run(
        &mut es,
        1,
        &[
            check(0.5, 0.5).t(100.0),
            check(0.6, 0.6).t(50.0),
            check(0.4, 0.7).t(60.0),
            check(0.3, 0.8).t(70.0),
        ],
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(kind(&got[3].0), Some("prediction_changes_rose"));
    assert_eq!(got[3].1, Some(2));
}

#[test]
fn a_saved_state_resumes_identically_at_every_cut() {
    let r = rule(0.05, 3, 2);
    let script: Vec<Epoch> = vec![
        check(0.50, 0.50),
        check(0.60, 0.55).t(90.0),
        check(0.58, 0.60).t(60.0).p(12.0),
        check(0.55, 0.70).t(30.0),
        check(0.61, 0.65).t(60.0),
        check(0.40, 0.90).t(90.0),
        check(0.39, 0.95).t(120.0),
        check(0.38, 0.99).t(150.0),
    ];
    let mut whole = EarlyStopping::new(r.clone());
    let (want, want_warnings) = run(&mut whole, 1, &script);
    assert!(want.iter().any(|(d, _)| d.is_stop()), "the script stops");
    for cut in 0..script.len() {
        let mut first = EarlyStopping::new(r.clone());
        let (mut got, mut warnings) = run(&mut first, 1, &script[..cut]);
        let json = serde_json::to_string(first.state()).unwrap();
        let state: StoppingState = serde_json::from_str(&json).unwrap();
        let mut resumed = EarlyStopping::with_state(r.clone(), state);
        let (rest, rest_warnings) = run(&mut resumed, cut + 1, &script[cut..]);
        got.extend(rest);
        warnings.extend(rest_warnings);
        assert_eq!(got, want, "cut after epoch {cut}");
        assert_eq!(warnings, want_warnings, "cut after epoch {cut}");
        assert_eq!(resumed.state(), whole.state(), "cut after epoch {cut}");
    }
}

#[test]
fn bad_rules_are_refused_naming_the_key() {
    for (rule, key) in [
        (rule(1.0, 3, 5), "stopping.tolerance"),
        (rule(-0.1, 3, 5), "stopping.tolerance"),
        (rule(0.03, 2, 5), "stopping.label_wave.window"),
        (rule(0.03, 0, 5), "stopping.label_wave.window"),
        (rule(0.03, 1001, 5), "stopping.label_wave.window"),
        (rule(0.03, 3, 0), "stopping.label_wave.patience"),
        (rule(0.03, 3, usize::MAX), "stopping.label_wave.patience"),
    ] {
        let e = rule.validate().unwrap_err().to_string();
        assert!(e.contains(key), "{key}: {e}");
    }
    assert!(StoppingRule::default().validate().is_ok());
}

#[test]
fn an_accuracy_that_falls_by_more_than_the_swing_warns_once() {
    // Consecutive checks' accuracies on the probe data: 0.80 → 0.75 falls 6.25% and 0.75 →
    // 0.70 falls 6.7% (under 8%, though 12.5% below 0.80: only consecutive checks count);
    // 0.70 → 0.64 falls 8.6%: the warning, naming both checks; 0.64 → 0.50 falls again,
    // but a warning is raised once per run.
    assert_eq!(candle_reliance::monitor::ACCURACY_SWING, 0.08);
    let mut es = EarlyStopping::new(rule(0.1, 1, 5));
    let (got, warnings) = run(
        &mut es,
        1,
        &[
            check(0.5, 0.80),
            check(0.5, 0.75),
            check(0.5, 0.70),
            check(0.5, 0.64),
            check(0.5, 0.50),
        ],
    );
    assert!(got.iter().all(|(d, _)| *d == Decision::Continue));
    assert_eq!(
        warnings,
        [Warning::AccuracyUnstable {
            epoch: 4,
            accuracy: 0.64,
            previous_epoch: 3,
            previous_accuracy: 0.70,
        }]
    );
    let text = warnings[0].to_string();
    assert!(
        text.contains("fell from 0.700 (epoch 3) to 0.640") && text.contains("more than 8%"),
        "{text}"
    );
    // An epoch without a check is skipped over, and a degenerate check's accuracy counts: the
    // fall from epoch 1 to the degenerate epoch 3 (0.9 → 0.8, 11%) warns.
    let mut es = EarlyStopping::new(rule(0.1, 1, 5));
    let mut obs = Observation::new(1).with_check(check(0.5, 0.9).check.unwrap());
    es.step(&obs);
    es.step(&Observation::new(2));
    obs = Observation::new(3).with_check(
        check(0.5, 0.8)
            .health(Health::Degenerate("one class".into()))
            .check
            .unwrap(),
    );
    es.step(&obs);
    assert_eq!(
        EarlyStoppingStrategy::take_warnings(&mut es),
        [Warning::AccuracyUnstable {
            epoch: 3,
            accuracy: 0.8,
            previous_epoch: 1,
            previous_accuracy: 0.9,
        }]
    );
    // A steady or rising accuracy never warns.
    let mut es = EarlyStopping::new(rule(0.1, 1, 5));
    let (_, warnings) = run(
        &mut es,
        1,
        &[
            check(0.5, 0.5),
            check(0.5, 0.6),
            check(0.5, 0.6),
            check(0.5, 0.7),
        ],
    );
    assert!(warnings.is_empty(), "{warnings:?}");
}
