//! The typed error: real failures come back as the variant a caller would match on, with the
//! fields filled in, and `?` carries them into candle's and anyhow's results with the message
//! whole.

mod common;

use candle_core::{Device, Module, Tensor};
use candle_reliance::collective::{Collective, ThreadGroup};
use candle_reliance::{Error, ProbeData, ProbeSet, RelianceConfig, RelianceMonitor};
use common::scripted::*;

type TestResult = anyhow::Result<()>;

fn cpu() -> Device {
    Device::Cpu
}

#[test]
fn a_bad_yaml_value_is_a_config_error_with_its_key_and_line() -> TestResult {
    let text = "schedule: {check_every: 1}\nablation:\n  fractions: 0\n";
    match RelianceConfig::from_yaml_str(text) {
        Err(Error::Config { key, line, message }) => {
            assert_eq!(key.as_deref(), Some("ablation.fractions"));
            assert_eq!(line, Some(3), "{message}");
            assert!(message.contains("ablation.fractions"), "{message}");
        }
        other => panic!("expected Error::Config, got {other:?}"),
    }
    Ok(())
}

#[test]
fn an_unknown_yaml_key_is_a_config_error_with_its_line() -> TestResult {
    let text = "schedule: {check_every: 1}\nstopping:\n  patiance: 3\n";
    match RelianceConfig::from_yaml_str(text) {
        Err(Error::Config { line, message, .. }) => {
            assert_eq!(line, Some(3), "{message}");
            assert!(message.contains("patiance"), "{message}");
        }
        other => panic!("expected Error::Config, got {other:?}"),
    }
    Ok(())
}

#[test]
fn labels_of_the_wrong_shape_are_a_data_error() -> TestResult {
    let xs = Tensor::zeros((4, 3), candle_core::DType::F32, &cpu())?;
    // (N, T) labels are token labels; a third dimension is nothing.
    let ys = Tensor::zeros((4, 2, 1), candle_core::DType::U32, &cpu())?;
    match ProbeData::new(xs, ys) {
        Err(Error::Data { message }) => {
            assert!(message.contains("(N,) or (N, T)"), "{message}")
        }
        other => panic!("expected Error::Data, got {other:?}"),
    }
    Ok(())
}

#[test]
fn nan_inputs_are_a_non_finite_error() -> TestResult {
    let xs = Tensor::new(&[[0f32, 1.0], [f32::NAN, 2.0]], &cpu())?;
    let ys = Tensor::new(&[0u32, 1], &cpu())?;
    match ProbeData::new(xs, ys) {
        Err(Error::NonFinite { message }) => assert!(message.contains("NaN"), "{message}"),
        other => panic!("expected Error::NonFinite, got {other:?}"),
    }
    Ok(())
}

#[test]
fn an_output_path_under_a_file_is_an_io_error_naming_the_folder() -> TestResult {
    let dir = tempfile::tempdir()?;
    let blocker = dir.path().join("not-a-folder");
    std::fs::write(&blocker, "a file where a folder should be")?;
    let (_, _, probes, data) = setup()?;
    let mut cfg = config(dir.path(), "")?;
    cfg.output.history_file = Some(blocker.join("history.jsonl"));
    match RelianceMonitor::new(cfg, probes, data) {
        Err(e @ Error::Io { .. }) => {
            let Error::Io { path, source, .. } = &e else {
                unreachable!()
            };
            assert_eq!(path, &blocker);
            // The operating system's error is the source.
            let from_source = std::error::Error::source(&e).map(|s| s.to_string());
            assert_eq!(from_source, Some(source.to_string()));
            assert!(e.to_string().contains("not-a-folder"), "{e}");
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_state_file_that_does_not_parse_is_a_file_error_naming_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state.json");
    std::fs::write(&state, "{\"format\": 2, \"epoch")?;
    match RelianceMonitor::load_state(&state) {
        Err(Error::File { path, message }) => {
            assert_eq!(path, state);
            assert!(message.contains("state.json"), "{message}");
        }
        other => panic!("expected Error::File, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_resume_with_other_settings_is_a_resume_error_naming_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let state = state_after(dir.path(), 2)?;
    let (_, _, probes, data) = setup()?;
    let mut other = config(dir.path(), "")?;
    other.stopping.tolerance = 0.25;
    match RelianceMonitor::resume(other, probes, data, state) {
        Err(Error::Resume { message }) => {
            assert!(message.contains("stopping.tolerance"), "{message}")
        }
        other => panic!("expected Error::Resume, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_failed_peer_is_a_rank_error_naming_it() -> TestResult {
    let mut ranks = ThreadGroup::new(2)?;
    let second = ranks.pop().unwrap();
    let first = ranks.pop().unwrap();
    second.abort("out of memory");
    let mut buf = [1.0f64];
    match first.all_reduce_sum_f64(&mut buf) {
        Err(Error::Rank { rank, message }) => {
            assert_eq!(rank, Some(1));
            assert!(message.contains("out of memory"), "{message}");
        }
        other => panic!("expected Error::Rank, got {other:?}"),
    }
    Ok(())
}

/// A probe whose width is 3 for a batch of 4 samples and 2 for any other.
struct Narrowing {
    probe: candle_reliance::Probe,
}

impl Module for Narrowing {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let width = if xs.dim(0)? == 4 { 3 } else { 2 };
        let h = self.probe.forward(&xs.narrow(1, 0, width)?)?;
        h.sum_keepdim(1)?
            .broadcast_as((xs.dim(0)?, 2))?
            .contiguous()
    }
}

#[test]
fn a_probe_failing_inside_the_models_forward_is_a_probe_error_naming_it() -> TestResult {
    // The error crosses the model's own forward, which returns candle's error: the measurement
    // still reports the probe's. Ten samples in batches of 4: widths 3, 3, then 2.
    let probes = ProbeSet::new();
    let model = Narrowing {
        probe: probes.add("h")?,
    };
    let xs = Tensor::arange(0f32, 30.0, &cpu())?.reshape((10, 3))?;
    let ys: Vec<u32> = (0..10).map(|i| i % 2).collect();
    let data = ProbeData::new(xs, Tensor::new(ys, &cpu())?)?;
    let m = candle_reliance::Measurement::new(&model, &probes, &data).with_batch_size(4);
    match m.statistics() {
        Err(Error::Probe { probe, message }) => {
            assert_eq!(probe.as_deref(), Some("h"));
            assert!(message.contains("3 then 2"), "{message}");
        }
        other => panic!("expected Error::Probe, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_model_that_fails_on_its_own_is_a_candle_error() -> TestResult {
    let probes = ProbeSet::new();
    let probe = probes.add("h")?;
    // A matmul of mismatched shapes: candle's own error, passed on as it is.
    let model = move |xs: &Tensor| {
        probe.forward(&xs.matmul(&Tensor::zeros((5, 2), xs.dtype(), xs.device())?)?)
    };
    let xs = Tensor::zeros((4, 3), candle_core::DType::F32, &cpu())?;
    let data = ProbeData::new(xs, Tensor::new(&[0u32, 1, 0, 1], &cpu())?)?;
    let m = candle_reliance::Measurement::new(&model, &probes, &data);
    match m.statistics() {
        Err(Error::Candle(e)) => assert!(e.to_string().contains("shape"), "{e}"),
        other => panic!("expected Error::Candle, got {other:?}"),
    }
    Ok(())
}

#[test]
fn question_mark_keeps_the_message_in_candle_and_anyhow_results() {
    fn candle_loop() -> candle_core::Result<RelianceConfig> {
        Ok(RelianceConfig::from_yaml_str("stopping: {patiance: 3}")?)
    }
    fn anyhow_loop() -> anyhow::Result<RelianceConfig> {
        Ok(RelianceConfig::from_yaml_str("stopping: {patiance: 3}")?)
    }
    let direct = RelianceConfig::from_yaml_str("stopping: {patiance: 3}")
        .unwrap_err()
        .to_string();
    assert!(direct.contains("patiance"), "{direct}");
    assert_eq!(candle_loop().unwrap_err().to_string(), direct);
    let through_anyhow = anyhow_loop().unwrap_err();
    assert_eq!(through_anyhow.to_string(), direct);
    // anyhow keeps the typed error: a caller can still match on it.
    assert!(matches!(
        through_anyhow.downcast_ref::<Error>(),
        Some(Error::Config { .. })
    ));
}
