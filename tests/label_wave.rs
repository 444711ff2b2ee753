//! Label Wave and its prediction-change counter on hand-worked sequences.

use candle_core::{Device, Result, Tensor};
use candle_reliance::monitor::{LabelWave, LabelWaveRule, PredictionChanges};
use candle_reliance::StopReason;

/// Logits whose arg-max is `classes[i]` for row i (two classes).
fn logits(classes: &[u32]) -> Result<Tensor> {
    let v: Vec<f32> = classes
        .iter()
        .flat_map(|&c| if c == 0 { [1.0, 0.0] } else { [0.0, 1.0] })
        .collect();
    Tensor::from_vec(v, (classes.len(), 2), &Device::Cpu)
}

#[test]
fn changes_count_examples_whose_prediction_moved() -> Result<()> {
    let mut c = PredictionChanges::new(4);
    c.record(&[0, 1, 2, 3], &logits(&[0, 1, 0, 1])?)?;
    assert_eq!(
        c.end_epoch()?,
        None,
        "nothing to compare the first epoch with"
    );
    // In two batches, in another order: only example 1 moved (1 → 0).
    c.record(&[2, 0], &logits(&[0, 0])?)?;
    c.record(&[1, 3], &logits(&[0, 1])?)?;
    assert_eq!(c.end_epoch()?, Some(1));
    // Examples 2 and 3 unseen this epoch: only 0 and 1 are compared; 0 moved (0 → 1).
    c.record(&[0, 1], &logits(&[1, 0])?)?;
    assert_eq!(c.end_epoch()?, Some(1));
    // Compared with the epoch just before only (as the reference implementation does): 2 and 3
    // were not seen in epoch 3, so nothing is compared.
    c.record(&[2, 3, 2], &logits(&[1, 0, 0])?)?;
    assert_eq!(c.end_epoch()?, Some(0));
    // An example seen twice keeps its last prediction: 2 is 0 (its last row), as in epoch 4;
    // 3 moved (0 → 1).
    c.record(&[2, 3, 2], &logits(&[1, 1, 0])?)?;
    assert_eq!(c.end_epoch()?, Some(1));
    Ok(())
}

#[test]
fn changes_reject_bad_input() -> Result<()> {
    let mut c = PredictionChanges::new(2);
    let e = c
        .record(&[0, 5], &logits(&[0, 1])?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("index 5 is out of range for 2"), "{e}");
    let e = c.record(&[0], &logits(&[0, 1])?).unwrap_err().to_string();
    assert!(e.contains("2 rows of logits for 1 indices"), "{e}");
    let e = c
        .record(
            &[0],
            &Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu)?,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("(batch, classes)"), "{e}");
    let e = c.end_epoch().unwrap_err().to_string();
    assert!(e.contains("no predictions"), "{e}");
    Ok(())
}

#[test]
fn label_wave_keeps_the_first_low_of_the_centred_average() {
    // Window 3, patience 2. Changes from epoch 2: 10, 8, 6, 7, 9, 9, 5.
    // The average centred on epoch e is known at e + 1:
    //   e3 = (10 + 8 + 6) / 3 = 8 (at epoch 4), e4 = (8 + 6 + 7) / 3 = 7 (at 5, the low),
    //   e5 = 22 / 3 (at 6), e6 = 25 / 3 (at 7): 2 epochs since the low was known → stop at 7.
    let mut w = LabelWave::new(LabelWaveRule {
        window: 3,
        patience: 2,
    });
    let changes = [10.0, 8.0, 6.0, 7.0, 9.0, 9.0, 5.0];
    let mut stop = None;
    for (i, &n) in changes.iter().enumerate() {
        let epoch = i + 2;
        let d = w.update(epoch, n);
        if d.is_stop() && stop.is_none() {
            stop = Some(epoch);
            match d.reason() {
                Some(StopReason::PredictionChangesRose {
                    lowest_epoch: 4,
                    lowest,
                    epochs_since: 2,
                    kept_epoch: Some(4),
                    plateau_end: None,
                }) => assert!((lowest - 7.0).abs() < 1e-12),
                r => panic!("unexpected {r:?}"),
            }
        }
    }
    assert_eq!(stop, Some(7));
    assert_eq!(w.kept_epoch(), Some(4));
    // Window 1 is the raw count: lowest 6 at epoch 4, stop 2 epochs later.
    let mut w = LabelWave::new(LabelWaveRule {
        window: 1,
        patience: 2,
    });
    let stops: Vec<bool> = changes
        .iter()
        .enumerate()
        .map(|(i, &n)| w.update(i + 2, n).is_stop())
        .collect();
    assert_eq!(stops, [false, false, false, false, true, true, true]);
    assert_eq!(w.kept_epoch(), Some(4));
}

#[test]
fn label_wave_windows_must_be_odd() {
    let e = LabelWaveRule {
        window: 4,
        patience: 1,
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("label_wave.window") && e.contains("odd"), "{e}");
}
