//! Data-parallel measurement with 2, 3 and 4 thread ranks against one process on the whole data.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::Linear;
use candle_reliance::collective::{Collective, ThreadGroup};
use candle_reliance::curves::{AblationCurve, AblationOrder, AblationSpec, Clamp};
use candle_reliance::rng::SplitMix64;
use candle_reliance::{Decision, Measurement, ProbeData, ProbeSet, ProbedLayer, RelianceMonitor};
use std::sync::Arc;

mod common;

const DEV: Device = Device::Cpu;

fn random(rng: &mut SplitMix64, dims: &[usize]) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();
    Tensor::from_vec(v, dims, &DEV)
}

/// The weights of an MLP 10 → 16 → 12 → 4, shared by every replica.
struct Weights(Vec<(Tensor, Tensor)>);

/// One rank's replica: its own probes around the shared weights.
struct Replica {
    fc1: Linear,
    fc2: ProbedLayer,
    fc3: ProbedLayer,
}

impl Module for Replica {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(xs)?.relu()?;
        let h = self.fc2.forward(&h)?.relu()?;
        self.fc3.forward(&h)
    }
}

impl Weights {
    fn new(seed: u64) -> Result<Self> {
        let mut rng = SplitMix64::new(seed);
        let dims = [(10, 16), (16, 12), (12, 4)];
        Ok(Self(
            dims.iter()
                .map(|&(i, o)| Ok((random(&mut rng, &[o, i])?, random(&mut rng, &[o])?)))
                .collect::<Result<_>>()?,
        ))
    }

    fn replica(&self) -> Result<(ProbeSet, Replica)> {
        let probes = ProbeSet::new();
        let l = |k: usize| Linear::new(self.0[k].0.clone(), Some(self.0[k].1.clone()));
        let model = Replica {
            fc1: l(0),
            fc2: probes.add("fc1")?.feeding(l(1)),
            fc3: probes.add("fc2")?.feeding(l(2)),
        };
        Ok((probes, model))
    }
}

/// 103 samples (no rank count divides it), labelled by the network with a fifth changed.
fn data(w: &Weights) -> Result<ProbeData> {
    let mut rng = SplitMix64::new(99);
    let xs = random(&mut rng, &[103, 10])?;
    let (_, model) = w.replica()?;
    let ys: Vec<u32> = model
        .forward(&xs)?
        .argmax(1)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|y| {
            if rng.below(5) == 0 {
                rng.below(4) as u32
            } else {
                y
            }
        })
        .collect();
    Ok(ProbeData::new(xs, Tensor::new(ys.as_slice(), &DEV)?)?)
}

/// `f` on every rank of a `world`-rank thread group, each with its own replica.
fn on_ranks<T: Send>(
    w: &Weights,
    world: usize,
    f: impl Fn(&Replica, &ProbeSet, &dyn Collective) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let group = ThreadGroup::new(world)?;
    let replicas = (0..world)
        .map(|_| w.replica())
        .collect::<Result<Vec<_>>>()?;
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .zip(&replicas)
            .map(|(rank, (probes, model))| {
                let f = &f;
                s.spawn(move || f(model, probes, rank))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn spec(clamp: Clamp) -> AblationSpec {
    AblationSpec::default()
        .with_fractions(9)
        .with_clamp(clamp)
        .with_order(AblationOrder::Random { orders: 3, seed: 5 })
}

#[test]
fn sharded_zero_clamp_curves_equal_the_single_process_curve() -> Result<()> {
    let w = Weights::new(1)?;
    let data = data(&w)?;
    let (probes, model) = w.replica()?;
    let single = Measurement::new(&model, &probes, &data);
    let want = single.ablation_curve(&spec(Clamp::Zero))?;
    let want_stats = single.statistics()?.clone();
    // The curve falls: the comparison is not between constants.
    assert!(want.accuracy[0] > want.accuracy[want.accuracy.len() - 1]);
    for world in [2, 3, 4] {
        // Small chunks, so that every rank's shard is cut into several forwards.
        let got = on_ranks(&w, world, |model, probes, c| {
            let m = Measurement::new(model, probes, &data)
                .with_collective(c)
                .with_batch_size(7)
                .with_max_batch_rows(100);
            Ok((
                m.ablation_curve(&spec(Clamp::Zero))?,
                m.statistics()?.clone(),
            ))
        })?;
        for (rank, (curve, stats)) in got.iter().enumerate() {
            assert_eq!(
                curve.per_order, want.per_order,
                "world {world}, rank {rank}"
            );
            assert_eq!(curve.agreement_per_order, want.agreement_per_order);
            assert_eq!(stats.accuracy, want_stats.accuracy);
            assert_eq!(stats.predictions, want_stats.predictions);
            assert_eq!(stats.class_counts, want_stats.class_counts);
            assert!(
                !stats.batch_dependent,
                "rank {rank} called its replica batch-dependent"
            );
            // Means: chunks (7 samples here, 512 in the single process) round their partial sums
            // differently, at f32 precision.
            for (a, b) in stats.probes.iter().zip(&want_stats.probes) {
                for (x, y) in a.value.mean.iter().zip(&b.value.mean) {
                    assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn sharded_single_unit_ablations_equal_the_single_process_ones() -> Result<()> {
    let w = Weights::new(2)?;
    let data = data(&w)?;
    let sets: Vec<Vec<usize>> = (0..28).map(|u| vec![u]).collect();
    let (probes, model) = w.replica()?;
    let want = Measurement::new(&model, &probes, &data).ablation_accuracies(&sets, Clamp::Zero)?;
    for world in [2, 3, 4] {
        let got = on_ranks(&w, world, |model, probes, c| {
            Measurement::new(model, probes, &data)
                .with_collective(c)
                .ablation_accuracies(&sets, Clamp::Zero)
                .map_err(Into::into)
        })?;
        assert!(got.iter().all(|g| g == &want), "world {world}");
    }
    Ok(())
}

/// The mean clamp uses unit means summed in other chunks and across ranks; they agree to about
/// 1e-7 relative (f32 partial sums), and a prediction can move only where two logits lie that
/// close: at most a sample per point is a loose bound.
#[test]
fn sharded_mean_clamp_curves_agree_within_a_sample() -> Result<()> {
    let w = Weights::new(3)?;
    let data = data(&w)?;
    let (probes, model) = w.replica()?;
    let want = Measurement::new(&model, &probes, &data).ablation_curve(&spec(Clamp::Mean))?;
    let close = |a: &AblationCurve| {
        a.per_order
            .iter()
            .flatten()
            .zip(want.per_order.iter().flatten())
            .all(|(x, y)| (x - y).abs() <= 1.0 / data.len() as f64 + 1e-12)
    };
    for world in [2, 3, 4] {
        let got = on_ranks(&w, world, |model, probes, c| {
            Measurement::new(model, probes, &data)
                .with_collective(c)
                .ablation_curve(&spec(Clamp::Mean))
                .map_err(Into::into)
        })?;
        assert!(got.iter().all(close), "world {world}");
        // Every rank sees the same curve.
        assert!(got.iter().all(|g| g.per_order == got[0].per_order));
    }
    Ok(())
}

#[test]
fn more_ranks_than_samples_is_an_error_on_every_rank() -> Result<()> {
    let w = Weights::new(4)?;
    let data = data(&w)?.subset(3, 0)?;
    let got = on_ranks(&w, 4, |model, probes, c| {
        Ok(Measurement::new(model, probes, &data)
            .with_collective(c)
            .statistics()
            .map(|_| ())
            .unwrap_err()
            .to_string())
    })?;
    assert!(
        got.iter()
            .all(|e| e.contains("4 ranks") && e.contains("3 probe samples")),
        "{got:?}"
    );
    Ok(())
}

#[test]
fn all_reduce_of_unequal_buffers_fails_on_every_rank() -> Result<()> {
    let group = ThreadGroup::new(2)?;
    let errors: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .map(|r| {
                s.spawn(move || {
                    let mut buf = vec![1u64; 2 + r.rank()];
                    r.all_reduce_sum_u64(&mut buf).is_err()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(errors, vec![true, true]);
    // Sums in f64 are the same bits on every rank.
    let sums: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .map(|r| {
                s.spawn(move || {
                    let mut buf = vec![0.1 * (r.rank() + 1) as f64, 1e16];
                    r.all_reduce_sum_f64(&mut buf)
                        .map(|_| buf)
                        .map_err(Into::into)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Result<_>>()
    })?;
    assert_eq!(sums[0], vec![0.1 + 0.2, 2e16]);
    assert_eq!(sums[0], sums[1]);
    Ok(())
}

/// A rank's decisions, kept epoch and final weights (by variable name).
type RankOutcome = (Vec<Decision>, Option<usize>, Vec<(String, Vec<f32>)>);

/// The scripted training with one process's monitor writing to `dir`, epochs 1–10.
fn single_process(dir: &std::path::Path) -> Result<RankOutcome> {
    use common::scripted::*;
    let (varmap, net, probes, data) = setup()?;
    let mut monitor = RelianceMonitor::new(config(dir, "")?, probes, data)?;
    let decisions = run(&mut monitor, &varmap, &net, 1, 10)?;
    let kept = monitor.finish(&varmap)?;
    Ok((decisions, kept, values(&varmap)))
}

/// `f` on every member of a new `world`-rank thread group, each on its own thread.
fn each_rank<T: Send>(world: usize, f: impl Fn(ThreadGroup) -> Result<T> + Sync) -> Result<Vec<T>> {
    let group = ThreadGroup::new(world)?;
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|rank| {
                let f = &f;
                s.spawn(move || f(rank))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Every rank of a `world`-rank group runs the scripted training with a ranked monitor writing
/// to `dir`; `poison(rank, epoch, varmap)` may spoil a rank's weights after an epoch. Returns
/// each rank's decisions, kept epoch and final weights.
fn scripted_ranks(
    world: usize,
    dir: &std::path::Path,
    poison: impl Fn(usize, usize, &candle_nn::VarMap) -> Result<()> + Sync,
) -> Result<Vec<RankOutcome>> {
    use common::scripted::*;
    each_rank(world, |rank| {
        let r = rank.rank();
        let (varmap, net, probes, data) = setup()?;
        let mut monitor =
            RelianceMonitor::new_ranked(config(dir, "")?, probes, data, Arc::new(rank))?;
        let mut decisions = vec![];
        for epoch in 1..=10 {
            train_epoch(&varmap, epoch)?;
            poison(r, epoch, &varmap)?;
            observe(&mut monitor, epoch, r, world)?;
            let d = monitor.on_epoch_end(epoch, &net, &varmap)?;
            let stop = d.is_stop();
            decisions.push(d);
            if stop {
                break;
            }
        }
        let kept = monitor.finish(&varmap)?;
        Ok((decisions, kept, values(&varmap)))
    })
}

#[test]
fn ranked_monitors_decide_as_one_process_and_only_rank_0_writes() -> Result<()> {
    let single_dir = tempfile::tempdir().unwrap();
    let (want, want_kept, want_weights) = single_process(single_dir.path())?;
    assert!(want.last().unwrap().is_stop() && want_kept.is_some());
    for world in [2, 3, 4] {
        let dir = tempfile::tempdir().unwrap();
        let got = scripted_ranks(world, dir.path(), |_, _, _| Ok(()))?;
        for (rank, (decisions, kept, weights)) in got.iter().enumerate() {
            assert_eq!(decisions, &want, "world {world}, rank {rank}");
            assert_eq!(kept, &want_kept);
            assert_eq!(weights, &want_weights, "rank {rank} restored other weights");
        }
        // Rank 0's history and state, with the single process's checks; nothing else.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with(".candle-reliance.lock"))
            .collect();
        names.sort();
        assert_eq!(names, ["hist.jsonl", "state.json"], "world {world}");
        let read = |d: &std::path::Path| -> Result<Vec<(usize, f64, bool, Decision)>> {
            Ok(
                candle_reliance::monitor::read_history(d.join("hist.jsonl"))?
                    .into_iter()
                    .map(|r| (r.epoch, r.value, r.kept, r.decision))
                    .collect(),
            )
        };
        assert_eq!(read(dir.path())?, read(single_dir.path())?);
    }
    Ok(())
}

#[test]
fn non_finite_weights_on_one_rank_stop_every_rank() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let got = scripted_ranks(3, dir.path(), |rank, epoch, varmap| {
        if rank == 1 && epoch == 3 {
            let vars = varmap.data().lock().unwrap();
            let w = &vars["w2"];
            w.set(&(w.as_tensor() * f64::NAN)?)?;
        }
        Ok(())
    })?;
    for (rank, (decisions, _, _)) in got.iter().enumerate() {
        assert_eq!(
            decisions.len(),
            3,
            "rank {rank} ran {} epochs",
            decisions.len()
        );
        let reason = decisions[2]
            .reason()
            .map(|r| r.to_string())
            .unwrap_or_default();
        assert!(
            reason.contains("weights on rank(s) [1]"),
            "rank {rank}: {reason}"
        );
        assert_eq!(decisions[2], got[0].0[2], "rank {rank} decided otherwise");
    }
    Ok(())
}

/// A small MLP trained for real (SGD on 160 samples, a third of the labels random, up to 60
/// epochs) and its weights after every epoch recorded; then one process and 2, 3 and 4 thread
/// ranks each run a monitor over that trajectory. The ranks must make the single process's
/// decisions, check by check, with the same metric values (zero clamp: exactly the same
/// curves). The trajectory itself may differ in its last bits from one test run to the next
/// (candle's parallel CPU ops), so the stop epoch is not fixed; 60 epochs of memorizing make a
/// stop certain.
#[test]
fn ranked_monitors_on_a_trained_mlp_decide_as_one_process() -> Result<()> {
    use candle_core::{DType, Var};
    use candle_nn::{linear, Optimizer, VarBuilder, VarMap, SGD};
    use candle_reliance::RelianceConfig;

    // The replicas' architecture, wider (10 → 32 → 24 → 4) to memorize, with its weights as
    // variables of `varmap`.
    fn mlp(varmap: &VarMap) -> Result<(ProbeSet, Replica)> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &DEV);
        let probes = ProbeSet::new();
        let model = Replica {
            fc1: linear(10, 32, vb.pp("fc1"))?,
            fc2: probes.add("fc1")?.feeding(linear(32, 24, vb.pp("fc2"))?),
            fc3: probes.add("fc2")?.feeding(linear(24, 4, vb.pp("fc3"))?),
        };
        Ok((probes, model))
    }
    fn set_all(varmap: &VarMap, values: &[(String, Tensor)]) -> Result<()> {
        let vars = varmap.data().lock().unwrap();
        for (name, v) in values {
            vars[name].set(v)?;
        }
        Ok(())
    }

    // Data: a random teacher's classes, a third of them replaced by random ones.
    let mut rng = SplitMix64::new(11);
    let xs = random(&mut rng, &[160, 10])?;
    let teacher = random(&mut rng, &[10, 4])?;
    let clean: Vec<u32> = xs.matmul(&teacher)?.argmax(1)?.to_vec1()?;
    let labels: Vec<u32> = clean
        .iter()
        .map(|&c| {
            if rng.below(3) == 0 {
                rng.below(4) as u32
            } else {
                c
            }
        })
        .collect();
    let ys = Tensor::new(labels.as_slice(), &DEV)?;
    let data = ProbeData::new(xs.clone(), ys.clone())?;

    // Training, one process; every epoch's weights recorded.
    let varmap = VarMap::new();
    let (_, model) = mlp(&varmap)?;
    let vars: Vec<Var> = varmap.all_vars();
    let mut sgd = SGD::new(vars, 0.5)?;
    let mut trajectory: Vec<Vec<(String, Tensor)>> = vec![];
    for _ in 0..60 {
        for b in 0..5 {
            let x = xs.narrow(0, b * 32, 32)?;
            let y = ys.narrow(0, b * 32, 32)?;
            let loss = candle_nn::loss::cross_entropy(&model.forward(&x)?, &y)?;
            sgd.backward_step(&loss)?;
        }
        let vars = varmap.data().lock().unwrap();
        trajectory.push(
            vars.iter()
                .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
                .collect::<Result<_>>()?,
        );
    }

    let config = || -> Result<RelianceConfig> {
        Ok(RelianceConfig::from_yaml_str(
            "schedule: {check_every: 1, warmup_epochs: 1}\n\
             ablation: {fractions: 9, orders: 3, seed: 5}\n\
             stopping: {tolerance: 0.03}\n",
        )?)
    };
    // One monitor over the trajectory; `rank` None is the single process.
    let follow = |rank: Option<ThreadGroup>| -> Result<Vec<(Decision, f64, f64)>> {
        let varmap = VarMap::new();
        let (probes, model) = mlp(&varmap)?;
        let mut monitor = match rank {
            None => RelianceMonitor::new(config()?, probes, data.clone())?,
            Some(r) => RelianceMonitor::new_ranked(config()?, probes, data.clone(), Arc::new(r))?,
        };
        let mut out = vec![];
        for (e, values) in trajectory.iter().enumerate() {
            set_all(&varmap, values)?;
            let d = monitor.check(e + 1, &model)?;
            let r = monitor.history().last().unwrap();
            out.push((d.clone(), r.value, r.unablated_accuracy));
            if d.is_stop() {
                break;
            }
        }
        Ok(out)
    };
    let want = follow(None)?;
    assert!(
        want.last().unwrap().0.is_stop(),
        "the trajectory must exercise a stop"
    );
    let values: Vec<f64> = want.iter().map(|w| w.1).collect();
    assert!(
        values.windows(2).any(|w| w[0] != w[1]),
        "the metric must move over training: {values:?}"
    );
    for world in [2, 3, 4] {
        let got = each_rank(world, |rank| follow(Some(rank)))?;
        for (rank, g) in got.iter().enumerate() {
            assert_eq!(g, &want, "world {world}, rank {rank}");
        }
    }
    Ok(())
}

/// A ranked run with disk snapshots interrupted after epoch 5 (the kept epoch 5 already on disk)
/// and resumed on every rank from rank 0's state file: the ranks decide as the uninterrupted
/// single process (each reporting its share of the training predictions, summed over the
/// ranks), and every rank restores epoch 5's weights — the other ranks from rank 0's snapshot
/// file, which they read when resuming.
#[test]
fn resumed_ranked_runs_decide_and_restore_as_one_process() -> Result<()> {
    use common::scripted::*;
    let single_dir = tempfile::tempdir().unwrap();
    let (want, want_kept, want_weights) = single_process(single_dir.path())?;
    assert_eq!((want.len(), want_kept), (6, Some(5)));

    for world in [2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let best = dir.path().join("best.safetensors");
        let extra = format!("restore_best: {{mode: disk, path: {}}}\n", best.display());
        let cfg = config(dir.path(), &extra)?;
        let interrupt_after = 5;
        // First sitting: epochs 1..=5 on every rank, then the processes end.
        let first: Vec<Vec<Decision>> = each_rank(world, |rank| {
            let r = rank.rank();
            let (varmap, net, probes, data) = setup()?;
            let mut m = RelianceMonitor::new_ranked(cfg.clone(), probes, data, Arc::new(rank))?;
            run_rank(&mut m, &varmap, &net, 1, interrupt_after, r, world)
        })?;
        // Second sitting: every rank resumes from rank 0's state file.
        let state = RelianceMonitor::load_state(dir.path().join("state.json"))?;
        let second: Vec<RankOutcome> = each_rank(world, |rank| {
            let r = rank.rank();
            let (varmap, net, probes, data) = setup()?;
            let mut m = RelianceMonitor::resume_ranked(
                cfg.clone(),
                probes,
                data,
                state.clone(),
                Arc::new(rank),
            )?;
            let d = run_rank(&mut m, &varmap, &net, interrupt_after + 1, 10, r, world)?;
            let kept = m.finish(&varmap)?;
            Ok((d, kept, values(&varmap)))
        })?;
        for rank in 0..world {
            let mut decisions = first[rank].clone();
            decisions.extend(second[rank].0.clone());
            assert_eq!(decisions, want, "world {world}, rank {rank}");
            assert_eq!(second[rank].1, want_kept, "world {world}, rank {rank}");
            assert_eq!(
                second[rank].2, want_weights,
                "world {world}, rank {rank}: epoch 5's weights"
            );
        }
    }
    Ok(())
}

/// The scripted run's state after epochs `1..=epochs`.
fn scripted_state(epochs: usize) -> Result<candle_reliance::MonitorState> {
    common::scripted::state_after(tempfile::tempdir().unwrap().path(), epochs)
}

/// Every rank of a group resumes from `states[rank]`; each rank's error text, or "resumed".
fn resume_each(states: &[candle_reliance::MonitorState]) -> Result<Vec<String>> {
    use common::scripted::*;
    each_rank(states.len(), |rank| {
        let state = states[rank.rank()].clone();
        let out = tempfile::tempdir().unwrap();
        let (_, _, probes, data) = setup()?;
        let cfg = config(out.path(), "")?;
        Ok(
            match RelianceMonitor::resume_ranked(cfg, probes, data, state, Arc::new(rank)) {
                Ok(_) => "resumed".to_string(),
                Err(e) => e.to_string(),
            },
        )
    })
}

#[test]
fn ranks_resuming_from_different_states_all_fail() -> Result<()> {
    let later = scripted_state(3)?;
    // The same run's state one epoch earlier on rank 2.
    let earlier = scripted_state(2)?;
    let results = resume_each(&[later.clone(), later.clone(), earlier])?;
    for (rank, r) in results.iter().enumerate() {
        assert!(r.contains("different states"), "rank {rank}: {r}");
    }
    // States that differ only in the probe data's or the training loop's last predictions
    // (which decide the next prediction changes) fail the same way.
    for field in ["predictions", "training_predictions"] {
        let mut other = later.clone();
        let p = match field {
            "predictions" => other.predictions.as_mut(),
            _ => other.training_predictions.as_mut(),
        }
        .expect("the scripted run records both");
        p[0] = 1 - p[0];
        for (rank, r) in resume_each(&[later.clone(), other])?.iter().enumerate() {
            assert!(r.contains("different states"), "{field}: rank {rank}: {r}");
        }
    }
    Ok(())
}

/// Ranks that disagree about the training predictions they report fail together, each with the
/// same error, rather than hanging or deciding apart: a rank that reports none in an epoch, and
/// a sample reported by two ranks.
#[test]
fn ranks_that_report_predictions_apart_all_fail() -> Result<()> {
    use common::scripted::*;
    for case in ["one rank silent", "a sample on two ranks"] {
        let dir = tempfile::tempdir().unwrap();
        let results: Vec<String> = each_rank(2, |rank| {
            let r = rank.rank();
            let (varmap, net, probes, data) = setup()?;
            let mut monitor =
                RelianceMonitor::new_ranked(config(dir.path(), "")?, probes, data, Arc::new(rank))?;
            train_epoch(&varmap, 1)?;
            observe(&mut monitor, 1, r, 2)?;
            monitor.on_epoch_end(1, &net, &varmap)?;
            train_epoch(&varmap, 2)?;
            match case {
                "one rank silent" if r == 1 => {}
                "a sample on two ranks" => observe(&mut monitor, 2, 0, 1)?, // every sample
                _ => observe(&mut monitor, 2, r, 2)?,
            }
            Ok(match monitor.on_epoch_end(2, &net, &varmap) {
                Ok(d) => format!("decided {d:?}"),
                Err(e) => e.to_string(),
            })
        })?;
        let want = match case {
            "one rank silent" => "1 of 2 ranks reported predictions in epoch 2",
            _ => "was reported by 2 ranks in epoch 2",
        };
        for (rank, r) in results.iter().enumerate() {
            assert!(r.contains(want), "{case}, rank {rank}: {r}");
        }
    }
    Ok(())
}

/// Runs `f(rank)` for every rank of a 2-rank group on detached threads and returns each rank's
/// error text (`None` for success); a rank still waiting after 30 s fails the test instead of
/// hanging it.
fn two_ranks_within_a_deadline(
    f: impl Fn(ThreadGroup) -> Result<()> + Send + Sync + 'static,
) -> Vec<Option<String>> {
    let f = Arc::new(f);
    let (tx, rx) = std::sync::mpsc::channel();
    for rank in ThreadGroup::new(2).unwrap() {
        let (f, tx) = (f.clone(), tx.clone());
        std::thread::spawn(move || {
            let r = rank.rank();
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(rank)));
            let text = match out {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("panicked".to_string()),
            };
            let _ = tx.send((r, text));
        });
    }
    let mut got = vec![None; 2];
    for _ in 0..2 {
        let (r, text) = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a rank is still waiting after 30 s: the group hangs");
        got[r] = text;
    }
    got
}

/// The scripted run on one rank of a group, with `fault(rank, epoch)` run before each epoch's
/// report; epochs 1 to 4.
fn scripted_rank_with(
    rank: ThreadGroup,
    dir: std::path::PathBuf,
    fault: impl Fn(usize, usize, &mut RelianceMonitor) -> Result<bool>,
) -> Result<()> {
    use common::scripted::*;
    let r = rank.rank();
    let (varmap, net, probes, data) = setup()?;
    let mut monitor = RelianceMonitor::new_ranked(config(&dir, "")?, probes, data, Arc::new(rank))?;
    for epoch in 1..=4 {
        train_epoch(&varmap, epoch)?;
        observe(&mut monitor, epoch, r, 2)?;
        if !fault(r, epoch, &mut monitor)? {
            continue; // this rank skips the epoch's report
        }
        monitor.on_epoch_end(epoch, &net, &varmap)?;
    }
    Ok(())
}

/// A model whose forward fails.
struct Broken;

impl Module for Broken {
    fn forward(&self, _: &Tensor) -> Result<Tensor> {
        candle_core::bail!("broken forward")
    }
}

#[test]
fn a_rank_whose_check_fails_makes_the_others_fail_naming_it() {
    // At epoch 3 rank 1's model fails in the middle of the check, between two all-reduces that
    // rank 0 waits in: rank 0 must get an error naming rank 1 and its error.
    let dir = tempfile::tempdir().unwrap().keep();
    let got = two_ranks_within_a_deadline(move |rank| {
        scripted_rank_with(rank, dir.clone(), |r, epoch, m| {
            if r == 1 && epoch == 3 {
                m.check(3, &Broken)?;
            }
            Ok(true)
        })
    });
    let (e0, e1) = (got[0].clone().unwrap(), got[1].clone().unwrap());
    assert!(e1.contains("broken forward"), "{e1}");
    assert!(
        e0.contains("rank 1") && e0.contains("epoch 3") && e0.contains("broken forward"),
        "{e0}"
    );
}

#[test]
fn a_rank_that_panics_makes_the_others_fail_naming_it() {
    let dir = tempfile::tempdir().unwrap().keep();
    let got = two_ranks_within_a_deadline(move |rank| {
        scripted_rank_with(rank, dir.clone(), |r, epoch, _| {
            if r == 1 && epoch == 2 {
                panic!("rank 1 fails");
            }
            Ok(true)
        })
    });
    assert_eq!(got[1].as_deref(), Some("panicked"));
    let e0 = got[0].clone().unwrap();
    assert!(e0.contains("rank 1") && e0.contains("panicked"), "{e0}");
}

#[test]
fn a_rank_that_skips_an_epoch_makes_every_rank_fail() {
    // Rank 1 does not report epoch 2: at rank 0's epoch 2 it reports epoch 3. Neither rank may
    // wait forever or mix the two epochs' sums.
    let dir = tempfile::tempdir().unwrap().keep();
    let got = two_ranks_within_a_deadline(move |rank| {
        scripted_rank_with(rank, dir.clone(), |r, epoch, _| Ok(!(r == 1 && epoch == 2)))
    });
    for (r, e) in got.iter().enumerate() {
        let e = e.clone().unwrap_or_else(|| panic!("rank {r} did not fail"));
        assert!(
            e.contains("different epochs") || e.contains("rank 1"),
            "rank {r}: {e}"
        );
    }
    let e0 = got[0].clone().unwrap();
    assert!(e0.contains("[2, 3]") || e0.contains("rank 1"), "{e0}");
}

#[test]
fn a_dropped_rank_fails_the_others_calls_and_a_finished_group_is_quiet() -> Result<()> {
    let mut ranks = ThreadGroup::new(3)?;
    let last = ranks.pop().unwrap();
    // Ranks 0 and 1 wait for rank 2, which is dropped: both fail, naming it (detached threads
    // and a deadline, so that a hang fails the test instead of holding it).
    let (tx, rx) = std::sync::mpsc::channel();
    for r in ranks {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = [1u64];
            let _ = tx.send(r.all_reduce_sum_u64(&mut buf).map_err(|e| e.to_string()));
        });
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(last);
    for _ in 0..2 {
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a rank still waits for a dropped one after 30 s");
        let e = got.expect_err("an all-reduce without rank 2 cannot succeed");
        assert!(e.contains("rank 2") && e.contains("left"), "{e}");
    }
    // A clone keeps its rank in the group: dropping the other handle is not leaving.
    let ranks = ThreadGroup::new(2)?;
    let keep = ranks[1].clone();
    drop(ranks[1].clone());
    let sums = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let mut b = [1u64];
            ranks[0].all_reduce_sum_u64(&mut b).map(|_| b[0])
        });
        let b = s.spawn(|| {
            let mut b = [2u64];
            keep.all_reduce_sum_u64(&mut b).map(|_| b[0])
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!((sums.0?, sums.1?), (3, 3));
    Ok(())
}

#[test]
fn ranks_given_different_settings_or_data_all_fail_naming_them() {
    // Rank 1 draws its ablation orders from another seed: one mixed curve if not refused.
    let dir = tempfile::tempdir().unwrap().keep();
    let got = two_ranks_within_a_deadline(move |rank| {
        use common::scripted::*;
        let r = rank.rank();
        let (_, _, probes, data) = setup()?;
        let mut cfg = config(&dir, "")?;
        if r == 1 {
            if let AblationOrder::Random { seed, .. } = &mut cfg.ablation.order {
                *seed += 1;
            }
        }
        RelianceMonitor::new_ranked(cfg, probes, data, Arc::new(rank))
            .map(|_| ())
            .map_err(Into::into)
    });
    for (r, e) in got.iter().enumerate() {
        let e = e.clone().unwrap_or_else(|| panic!("rank {r} started"));
        assert!(
            e.contains("different ablation") && !e.contains("stopping"),
            "rank {r}: {e}"
        );
    }
    // Rank 1 measures other probe data.
    let dir = tempfile::tempdir().unwrap().keep();
    let got = two_ranks_within_a_deadline(move |rank| {
        use common::scripted::*;
        let (_, _, probes, data) = setup()?;
        let data = if rank.rank() == 1 {
            ProbeData::new((data.xs() * 2.0)?, data.labels().clone())?
        } else {
            data
        };
        RelianceMonitor::new_ranked(config(&dir, "")?, probes, data, Arc::new(rank))
            .map(|_| ())
            .map_err(Into::into)
    });
    for (r, e) in got.iter().enumerate() {
        let e = e.clone().unwrap_or_else(|| panic!("rank {r} started"));
        assert!(e.contains("different probe data"), "rank {r}: {e}");
    }
}

#[test]
fn a_rank_that_cannot_start_fails_the_others_naming_it() {
    // Rank 0's history file is a folder: it cannot start; rank 1 must not wait for it.
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::create_dir_all(dir.join("hist.jsonl")).unwrap();
    let got = two_ranks_within_a_deadline(move |rank| {
        use common::scripted::*;
        let (_, _, probes, data) = setup()?;
        RelianceMonitor::new_ranked(config(&dir, "")?, probes, data, Arc::new(rank))
            .map(|_| ())
            .map_err(Into::into)
    });
    let (e0, e1) = (got[0].clone().unwrap(), got[1].clone().unwrap());
    assert!(e0.contains("is a directory"), "{e0}");
    assert!(
        e1.contains("rank 0") && e1.contains("is a directory"),
        "{e1}"
    );
}
