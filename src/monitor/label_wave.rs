//! Label Wave (Yuan, Feng & Liu, ICLR 2024, *Early Stopping Against Label Noise Without
//! Validation Data*): a validation-free stopping criterion from the training loop's own
//! predictions. It counts the training examples whose arg-max prediction changes from one epoch
//! to the next; the count falls while the network learns and rises again once it starts fitting
//! wrong labels, and the criterion keeps the epoch at the first local minimum of its moving
//! average.
//!
//! Feed it the predictions of the forward passes the training loop already makes:
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candle_reliance::monitor::{LabelWave, LabelWaveRule, PredictionChanges};
//!
//! let mut changes = PredictionChanges::new(4);
//! let mut wave = LabelWave::new(LabelWaveRule::default());
//! for epoch in 1..=3 {
//!     // Per training batch: the samples' indices in the training set and the logits.
//!     let logits = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], &Device::Cpu)?;
//!     changes.record(&[0, 1, 2, 3], &logits)?;
//!     if let Some(n) = changes.end_epoch()? {
//!         assert_eq!(n, 0); // the same predictions as the epoch before
//!         wave.update(epoch, n as f64);
//!     }
//! }
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::error::bail;
use crate::invalid::{Checked, Invalid};
use crate::monitor::{Decision, StopReason};
use crate::Result;
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

/// Counts the training examples whose arg-max prediction differs from the previous epoch's, from
/// the logits of the training loop's own forward passes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PredictionChanges {
    previous: Vec<u32>,
    current: Vec<u32>,
    /// Predictions per example: `T` for a token-level task, 1 otherwise.
    #[serde(default = "one")]
    tokens: usize,
}

fn one() -> usize {
    1
}

/// Marks an example not yet seen in an epoch.
pub(crate) const UNSEEN: u32 = u32::MAX;

impl PredictionChanges {
    /// A counter for a training set of `samples` examples.
    pub fn new(samples: usize) -> Self {
        Self::with_tokens(samples, 1)
    }

    /// A counter for a token-level task: `samples` examples of `tokens` predictions each, from
    /// logits `(batch, tokens, classes)`; a change is counted per token.
    pub fn with_tokens(samples: usize, tokens: usize) -> Self {
        let tokens = tokens.max(1);
        Self {
            previous: vec![UNSEEN; samples * tokens],
            current: vec![UNSEEN; samples * tokens],
            tokens,
        }
    }

    /// Records one training batch: `indices[i]` is the training-set index of row `i` of
    /// `logits` `(batch, classes)` (`(batch, T, classes)` for a counter made by
    /// [`PredictionChanges::with_tokens`]). An example seen twice in an epoch keeps its last
    /// prediction.
    pub fn record(&mut self, indices: &[u32], logits: &Tensor) -> Result<()> {
        self.record_masked(indices, logits, None)
    }

    /// [`PredictionChanges::record`] for a token-level task whose batch is padded: tokens where
    /// `mask` (`(batch, T)`, any dtype) is zero are not recorded, so they never count as a
    /// change.
    pub fn record_masked(
        &mut self,
        indices: &[u32],
        logits: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<()> {
        let t = self.tokens;
        let rows = match (logits.dims(), t) {
            ([r, c], 1) if *c > 0 && mask.is_none() => *r,
            ([r, tt, c], _) if *c > 0 && *tt == t => *r,
            (d, 1) if mask.is_none() => bail!(
                Data,
                "prediction changes: logits must have shape (batch, classes), got {d:?}"
            ),
            (d, _) => bail!(
                Data,
                "prediction changes: logits must have shape (batch, {t}, classes), got {d:?}"
            ),
        };
        let keep = match mask {
            None => None,
            Some(m) if m.dims() == [rows, t] => {
                Some(crate::data::mask_values(m, "prediction changes")?)
            }
            Some(m) => bail!(
                Data,
                "prediction changes: the mask has shape {:?}, the logits {:?}",
                m.dims(),
                logits.dims()
            ),
        };
        if rows != indices.len() {
            bail!(
                Data,
                "prediction changes: {rows} rows of logits for {} indices",
                indices.len()
            );
        }
        let samples = self.current.len() / t;
        if let Some(bad) = indices.iter().find(|&&i| i as usize >= samples) {
            bail!(
                Data,
                "prediction changes: index {bad} is out of range for {samples} training examples"
            );
        }
        let pred = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
        for (row, &i) in indices.iter().enumerate() {
            for k in 0..t {
                let at = row * t + k;
                if keep.as_ref().is_none_or(|m| m[at]) {
                    self.current[i as usize * t + k] = pred[at];
                }
            }
        }
        Ok(())
    }

    /// Ends the epoch: the number of examples, seen in both this epoch and the one before, whose
    /// prediction changed; `None` after the first epoch (nothing to compare with).
    pub fn end_epoch(&mut self) -> Result<Option<usize>> {
        self.end_epoch_with(|_| Ok(()))
    }

    /// [`PredictionChanges::end_epoch`], with `merge` applied to this epoch's predictions after
    /// they are counted and before they become the next epoch's reference (a data-parallel run
    /// merges every rank's share there).
    pub(crate) fn end_epoch_with(
        &mut self,
        merge: impl FnOnce(&mut [u32]) -> Result<()>,
    ) -> Result<Option<usize>> {
        let seen_before = self.previous.iter().any(|&p| p != UNSEEN);
        if self.current.iter().all(|&p| p == UNSEEN) {
            bail!(
                Data,
                "prediction changes: no predictions were recorded this epoch"
            );
        }
        let changed = self
            .previous
            .iter()
            .zip(&self.current)
            .filter(|(&a, &b)| a != UNSEEN && b != UNSEEN && a != b)
            .count();
        merge(&mut self.current)?;
        std::mem::swap(&mut self.previous, &mut self.current);
        self.current.iter_mut().for_each(|p| *p = UNSEEN);
        Ok(seen_before.then_some(changed))
    }

    /// Predictions counted: training examples × tokens.
    pub fn len(&self) -> usize {
        self.current.len()
    }

    /// The predictions of the last ended epoch, per example (and token; `u32::MAX`: not seen):
    /// what the next epoch is compared with, and what to save for resuming.
    pub fn previous(&self) -> &[u32] {
        &self.previous
    }

    /// A counter that continues after an epoch whose predictions were `previous` (from
    /// [`PredictionChanges::previous`]).
    pub fn with_previous(previous: Vec<u32>) -> Self {
        Self::with_previous_tokens(previous, 1)
    }

    /// [`PredictionChanges::with_previous`] for a counter of `tokens` predictions per example.
    pub fn with_previous_tokens(previous: Vec<u32>, tokens: usize) -> Self {
        Self {
            current: vec![UNSEEN; previous.len()],
            previous,
            tokens: tokens.max(1),
        }
    }

    /// Whether any prediction was recorded since the last ended epoch.
    pub fn recorded(&self) -> bool {
        self.current.iter().any(|&p| p != UNSEEN)
    }

    /// Whether the training set is empty.
    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }
}

/// Parameters of [`LabelWave`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabelWaveRule {
    /// Epochs in the centred moving average of the change counts (odd, ≥ 1): the value of
    /// epoch `e` is the mean of epochs `e − w/2 … e + w/2`, known at epoch `e + w/2`. Default 3.
    pub window: usize,
    /// Epochs after the moving average's lowest point is known before stopping (≥ 1). Default 5.
    pub patience: usize,
}

impl Default for LabelWaveRule {
    fn default() -> Self {
        Self {
            window: 3,
            patience: 5,
        }
    }
}

impl LabelWaveRule {
    /// Checks the values, naming the first bad key.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|e| e.into_error("label_wave"))
    }

    pub(crate) fn check(&self) -> Checked {
        Invalid::at_least("window", self.window, 1)?;
        Invalid::at_most(
            "window",
            self.window,
            MAX_WINDOW,
            "epochs in the moving average",
        )?;
        if self.window.is_multiple_of(2) {
            return Err(Invalid::new(
                "window",
                format!("must be odd (a centred average), got {}", self.window),
            ));
        }
        Invalid::at_least("patience", self.patience, 1)?;
        Invalid::at_most("patience", self.patience, MAX_PATIENCE, "epochs")
    }
}

/// The largest `window` accepted: a moving average over more epochs than any training run has
/// would never produce a value.
pub const MAX_WINDOW: usize = 999;

/// The largest `patience` accepted (epochs).
pub const MAX_PATIENCE: usize = 1_000_000;

/// Everything [`LabelWave`] remembers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LabelWaveState {
    /// `(epoch, changes)` fed so far.
    pub changes: Vec<(usize, f64)>,
    /// The epoch with the lowest moving average so far, and that average.
    pub lowest: Option<(usize, f64)>,
    /// Set once a stop was decided; later updates repeat it.
    pub stopped: Option<StopReason>,
}

/// The Label Wave criterion: the first local minimum of the moving average of prediction
/// changes, confirmed by `patience` epochs without a lower value. Feed it one count per epoch
/// (from [`PredictionChanges::end_epoch`]), epochs increasing by one.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelWave {
    rule: LabelWaveRule,
    state: LabelWaveState,
}

impl LabelWave {
    /// A fresh criterion.
    pub fn new(rule: LabelWaveRule) -> Self {
        Self {
            rule,
            state: LabelWaveState::default(),
        }
    }

    /// Continues from a saved state.
    pub fn with_state(rule: LabelWaveRule, state: LabelWaveState) -> Self {
        Self { rule, state }
    }

    /// The state, for saving.
    pub fn state(&self) -> &LabelWaveState {
        &self.state
    }

    /// The epoch the criterion keeps: the lowest moving average so far.
    pub fn kept_epoch(&self) -> Option<usize> {
        self.state.lowest.map(|(e, _)| e)
    }
}

impl LabelWave {
    /// Feeds the number of changed predictions between epoch `epoch − 1` and `epoch`.
    pub fn update(&mut self, epoch: usize, changes: f64) -> Decision {
        if let Some(reason) = &self.state.stopped {
            return Decision::Stop {
                reason: reason.clone(),
            };
        }
        self.state.changes.push((epoch, changes));
        let (w, h) = (self.rule.window, self.rule.window / 2);
        let c = &self.state.changes;
        if c.len() >= w {
            // The window that ends now is centred on the epoch `h` entries back.
            let tail = &c[c.len() - w..];
            let mean = tail.iter().map(|(_, v)| v).sum::<f64>() / w as f64;
            let centre = tail[h].0;
            if self.state.lowest.is_none_or(|(_, low)| mean < low) {
                self.state.lowest = Some((centre, mean));
            }
        }
        match self.state.lowest {
            Some((low_epoch, low)) if epoch >= low_epoch + h + self.rule.patience => {
                let reason = StopReason::PredictionChangesRose {
                    lowest_epoch: low_epoch,
                    lowest: low,
                    epochs_since: epoch - low_epoch - h,
                    kept_epoch: Some(low_epoch),
                    plateau_end: None,
                };
                self.state.stopped = Some(reason.clone());
                Decision::Stop { reason }
            }
            _ => Decision::Continue,
        }
    }
}
