//! A scripted "training" whose reliance on single directions is known, for the monitor's tests:
//! at epoch e only k_e redundant hidden units per class carry the signal, so fewer units means
//! more reliance on each one and a lower ablation AUC.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarMap};
use candle_reliance::{Decision, ProbeData, ProbeSet, RelianceConfig, RelianceMonitor};
use std::path::Path;

pub const HIDDEN: usize = 16; // 8 units per class

/// Active units per class at each epoch (index 0 = epoch 1): rises to 8 at epoch 4, holds, falls.
pub const SCRIPT: [usize; 10] = [1, 2, 4, 8, 8, 4, 2, 1, 1, 1];

/// The training loop's predictions per epoch (index 0 = epoch 1): the first `TRAINING[e − 1]`
/// of the 64 samples are predicted class 1, the rest class 0. Changes from epoch 2 on: 32, 20,
/// 12 (the lowest, epoch 4), 15, 18, 24, 27, 30, 31.
pub const TRAINING: [usize; 10] = [0, 32, 12, 24, 9, 27, 3, 30, 0, 31];

/// Reports epoch `epoch`'s training predictions to the monitor (`observe`) in batches of 20,
/// only the samples of `rank` in a group of `world` (sample `i` belongs to rank `i % world`).
pub fn observe(
    monitor: &mut RelianceMonitor,
    epoch: usize,
    rank: usize,
    world: usize,
) -> Result<()> {
    let c = TRAINING[(epoch - 1).min(TRAINING.len() - 1)];
    let idx: Vec<u32> = (0..64u32).filter(|&i| i as usize % world == rank).collect();
    for batch in idx.chunks(20) {
        let logits: Vec<f32> = batch
            .iter()
            .flat_map(|&i| {
                if (i as usize) < c {
                    [0.0, 1.0]
                } else {
                    [1.0, 0.0]
                }
            })
            .collect();
        monitor.observe(
            batch,
            &Tensor::from_vec(logits, (batch.len(), 2), &Device::Cpu)?,
        )?;
    }
    Ok(())
}

pub struct Net {
    pub w1: Tensor,
    pub w2: Tensor,
    pub probe: candle_reliance::Probe,
}

impl Module for Net {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.probe.forward(&xs.matmul(&self.w1)?.relu()?)?;
        // Tie-break towards class 0 when everything is ablated.
        h.matmul(&self.w2)?
            .broadcast_add(&Tensor::new(&[1e-3f32, 0.0], xs.device())?)
    }
}

pub fn setup() -> Result<(VarMap, Net, ProbeSet, ProbeData)> {
    let d = Device::Cpu;
    let varmap = VarMap::new();
    let w1 = varmap.get((2, HIDDEN), "w1", Init::Const(0.0), DType::F32, &d)?;
    let w2 = varmap.get((HIDDEN, 2), "w2", Init::Const(0.0), DType::F32, &d)?;
    let probes = ProbeSet::new();
    let net = Net {
        w1,
        w2,
        probe: probes.add("hidden")?,
    };
    // Inputs (a, -a): class 0 for a > 0, class 1 for a < 0.
    let a: Vec<f32> = (0..64)
        .map(|i| {
            if i % 2 == 0 {
                1.0 + i as f32 / 64.0
            } else {
                -1.0 - i as f32 / 64.0
            }
        })
        .collect();
    let xs: Vec<f32> = a.iter().flat_map(|&v| [v, -v]).collect();
    let ys: Vec<u32> = a.iter().map(|&v| u32::from(v < 0.0)).collect();
    let data = ProbeData::new(
        Tensor::from_vec(xs, (64, 2), &d)?,
        Tensor::from_vec(ys, 64, &d)?,
    )?;
    Ok((varmap, net, probes, data))
}

/// Weights of epoch `e`: units 0..8 read `a`, units 8..16 read `-a`; the first k of each group vote
/// for their class. A small epoch-specific offset makes every epoch's weights distinct.
pub fn weights(epoch: usize) -> Result<(Tensor, Tensor)> {
    let k = SCRIPT[(epoch - 1).min(SCRIPT.len() - 1)];
    let d = Device::Cpu;
    let mut w1 = vec![0f32; 2 * HIDDEN];
    for u in 0..HIDDEN {
        let row = usize::from(u >= 8);
        w1[row * HIDDEN + u] = 1.0 + epoch as f32 * 1e-3;
    }
    let mut w2 = vec![0f32; HIDDEN * 2];
    for u in 0..HIDDEN {
        let (class, i) = (u / 8, u % 8);
        if i < k {
            w2[u * 2 + class] = 1.0;
        }
    }
    Ok((
        Tensor::from_vec(w1, (2, HIDDEN), &d)?,
        Tensor::from_vec(w2, (HIDDEN, 2), &d)?,
    ))
}

pub fn train_epoch(varmap: &VarMap, epoch: usize) -> Result<()> {
    let (w1, w2) = weights(epoch)?;
    let vars = varmap.data().lock().unwrap();
    vars["w1"].set(&w1)?;
    vars["w2"].set(&w2)
}

pub fn config(dir: &Path, extra: &str) -> Result<RelianceConfig> {
    Ok(RelianceConfig::from_yaml_str(&format!(
        "schedule: {{check_every: 1, warmup_epochs: 1}}\n\
         ablation: {{fractions: 9, orders: 4, seed: 5}}\n\
         stopping: {{metric: auc, tolerance: 0.0, label_wave: {{window: 1, patience: 2}}}}\n\
         output: {{history_file: {h}, state_file: {s}}}\n{extra}",
        h = dir.join("hist.jsonl").display(),
        s = dir.join("state.json").display(),
    ))?)
}

pub fn values(varmap: &VarMap) -> Vec<(String, Vec<f32>)> {
    let vars = varmap.data().lock().unwrap();
    let mut v: Vec<_> = vars
        .iter()
        .map(|(k, var)| {
            (
                k.clone(),
                var.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The same network (sharing its weights) with a fresh probe set, as a resumed process builds it.
pub fn rebuilt(net: &Net) -> Result<(Net, ProbeSet)> {
    let probes = ProbeSet::new();
    let net = Net {
        w1: net.w1.clone(),
        w2: net.w2.clone(),
        probe: probes.add("hidden")?,
    };
    Ok((net, probes))
}

/// Runs epochs `from..=to`, reporting the training predictions, and returns the decisions.
pub fn run(
    monitor: &mut RelianceMonitor,
    varmap: &VarMap,
    net: &Net,
    from: usize,
    to: usize,
) -> Result<Vec<Decision>> {
    run_rank(monitor, varmap, net, from, to, 0, 1)
}

/// [`run`] on rank `rank` of a `world`-rank group: the rank reports its share of the training
/// predictions.
pub fn run_rank(
    monitor: &mut RelianceMonitor,
    varmap: &VarMap,
    net: &Net,
    from: usize,
    to: usize,
    rank: usize,
    world: usize,
) -> Result<Vec<Decision>> {
    let mut out = vec![];
    for epoch in from..=to {
        train_epoch(varmap, epoch)?;
        observe(monitor, epoch, rank, world)?;
        let d = monitor.on_epoch_end(epoch, net, varmap)?;
        let stop = d.is_stop();
        out.push(d);
        if stop {
            break;
        }
    }
    Ok(out)
}

/// The scripted run's state after epochs `1..=epochs`, its files written to `dir`.
pub fn state_after(dir: &Path, epochs: usize) -> Result<candle_reliance::MonitorState> {
    let (varmap, net, probes, data) = setup()?;
    let mut monitor = RelianceMonitor::new(config(dir, "")?, probes, data)?;
    run(&mut monitor, &varmap, &net, 1, epochs)?;
    Ok(monitor.state()?)
}
