//! Shared pieces of the evaluation examples: the shipped MNIST data, a seeded MLP with probes,
//! a training epoch, test evaluation and a small seeded RNG. (Each example uses only some.)
#![allow(dead_code)]

pub mod idx;
pub mod resnet;
pub mod transformer;

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, D};
// `ModuleT` for candle-nn's Dropout.
use candle_nn::{linear, loss, Dropout, Linear, Optimizer, VarBuilder, VarMap};
use candle_reliance::{ProbeSet, ProbedLayer};
use idx::{load_mnist_dir, Mnist};

/// The 10 000 shipped digits: 8 000 for training, the last 2 000 as the test set.
pub fn mnist() -> Result<Mnist> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/data");
    if !std::path::Path::new(dir)
        .join("mnist-10k-images-idx3-ubyte.gz")
        .exists()
    {
        // The crates.io package leaves the digits out (they are data, not code).
        candle_core::bail!(
            "{dir}/mnist-10k-images-idx3-ubyte.gz is missing: the 10,000 MNIST digits the \
             examples train on ship in the repository's data/ folder, not in the crates.io \
             package; run the examples from a clone of the repository (data/README.md says \
             where the digits come from)"
        );
    }
    load_mnist_dir(dir, 2000, &Device::Cpu)
}

/// The crate's seeded generator, for initialization, shuffling and label noise.
pub use candle_reliance::rng::SplitMix64 as Rng;

/// Re-initializes every variable from `seed` (candle's CPU initializers cannot be seeded):
/// weights of a layer with fan-in `f` uniform in ±1/√f, as candle's default Linear init.
/// Normalization variables (a name with a part starting with `bn` or `ln`: batch and layer norm,
/// whose scales start at one) keep their own initialization.
pub fn seeded_init(varmap: &VarMap, seed: u64) -> Result<()> {
    let vars = varmap.data().lock().unwrap();
    let norm = |n: &str| {
        n.split('.')
            .any(|p| p.starts_with("bn") || p.starts_with("ln"))
    };
    let mut names: Vec<&String> = vars.keys().filter(|n| !norm(n)).collect();
    names.sort();
    let mut rng = Rng::new(seed);
    for name in names {
        let var = &vars[name];
        let dims = var.dims().to_vec();
        // weight (out, in, ...): fan-in is everything after dim 0; bias (out,): use its layer's
        // weight fan-in when known, else 1.
        let fan_in = if dims.len() > 1 {
            dims[1..].iter().product::<usize>()
        } else {
            let w = name.replace(".bias", ".weight");
            vars.get(&w).map_or(1, |w| w.dims()[1..].iter().product())
        };
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
            .collect();
        var.set(&Tensor::from_vec(v, dims, var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// MLP 784 → hidden … → 10 with ReLU, a probe after every hidden activation (fused with the
/// layer that reads it) and optional dropout after each activation (training only).
pub struct Mlp {
    pub layers: Vec<Linear>,
    /// `layers[i + 1]` behind the probe after activation `i`.
    pub fused: Vec<ProbedLayer>,
    pub dropout: Option<Dropout>,
}

impl Mlp {
    pub fn new(
        varmap: &VarMap,
        hidden: &[usize],
        dropout: f32,
        probes: &ProbeSet,
        seed: u64,
    ) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let mut dims = vec![784];
        dims.extend_from_slice(hidden);
        dims.push(10);
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, d)| linear(d[0], d[1], vb.pp(format!("fc{}", i + 1))))
            .collect::<Result<Vec<_>>>()?;
        let fused = (0..hidden.len())
            .map(|i| {
                let layer = probes
                    .add(format!("fc{}", i + 1))?
                    .feeding(layers[i + 1].clone());
                // The ReLU after every hidden layer but the last fused layer's (the logits).
                Ok(if i + 1 < hidden.len() {
                    layer.then_relu()
                } else {
                    layer
                })
            })
            .collect::<Result<_>>()?;
        seeded_init(varmap, seed)?;
        Ok(Self {
            layers,
            fused,
            dropout: (dropout > 0.0).then(|| Dropout::new(dropout)),
        })
    }

    /// The same network with every ReLU called in the forward instead of fused (for benchmarks).
    pub fn with_relu_outside(mut self) -> Self {
        for f in &mut self.fused {
            *f = f.probe().clone().feeding(f.layer().clone());
        }
        self
    }
}

impl Mlp {
    /// Forward pass; dropout is active only when `train`.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.layers[0].forward(xs)?.relu()?;
        for (i, next) in self.fused.iter().enumerate() {
            // Dropout before the probe: the same network, as probes are identities in training
            // and dropout is one at evaluation.
            if let Some(d) = &self.dropout {
                h = d.forward_t(&h, train)?;
            }
            h = next.forward(&h)?;
            // A hidden layer's ReLU: its fused layer's step, or called here.
            if i + 1 < self.fused.len() && next.after().is_empty() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, false)
    }
}

/// AdamW without weight decay (the evaluation's optimizer) over `vars`.
pub fn adamw(vars: Vec<candle_core::Var>, lr: f64) -> Result<candle_nn::AdamW> {
    candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
}

/// One epoch of minibatch training in a seeded order; `forward_train` is the model's forward in
/// training mode. Returns the mean training loss.
pub fn train_epoch(
    forward_train: impl Fn(&Tensor) -> Result<Tensor>,
    opt: &mut impl Optimizer,
    xs: &Tensor,
    ys: &Tensor,
    batch: usize,
    rng: &mut Rng,
) -> Result<f64> {
    let n = xs.dim(0)?;
    let mut order: Vec<u32> = (0..n as u32).collect();
    rng.shuffle(&mut order);
    let (mut sum, mut count) = (0.0, 0);
    for b in order.chunks(batch) {
        let idx = Tensor::new(b, xs.device())?;
        let logits = forward_train(&xs.index_select(&idx, 0)?)?;
        let l = loss::cross_entropy(&logits, &ys.index_select(&idx, 0)?)?;
        opt.backward_step(&l)?;
        sum += l.to_scalar::<f32>()? as f64;
        count += 1;
    }
    Ok(sum / count as f64)
}

/// Mean cross-entropy and accuracy of `model` on `(xs, ys)`.
pub fn evaluate(model: &impl Module, xs: &Tensor, ys: &Tensor) -> Result<(f64, f64)> {
    let n = xs.dim(0)?;
    let (mut loss_sum, mut correct) = (0.0, 0.0);
    for start in (0..n).step_by(2000) {
        let len = 2000.min(n - start);
        let (x, y) = (xs.narrow(0, start, len)?, ys.narrow(0, start, len)?);
        let logits = model.forward(&x)?;
        loss_sum += loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64 * len as f64;
        correct += logits
            .argmax(D::Minus1)?
            .eq(&y)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok((loss_sum / n as f64, correct / n as f64))
}

/// Mean and sample standard deviation.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// Output folder of the evaluation examples (`docs/results/` unless `RESULTS_DIR` says otherwise).
pub fn results_dir() -> std::path::PathBuf {
    std::env::var_os("RESULTS_DIR")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/results"))
        })
}

/// The monitor configuration of the model examples: `path`, or examples/reliance.yaml with its
/// output files under `reliance-out/{name}/`.
pub fn example_config(
    path: Option<&std::path::Path>,
    name: &str,
) -> anyhow::Result<candle_reliance::RelianceConfig> {
    use candle_reliance::RelianceConfig;
    Ok(match path {
        Some(path) => RelianceConfig::from_yaml_file(path)?,
        None => {
            let mut c = RelianceConfig::from_yaml_file(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/reliance.yaml"
            ))?;
            c.output.history_file = Some(format!("reliance-out/{name}/history.jsonl").into());
            c.output.state_file = Some(format!("reliance-out/{name}/state.json").into());
            c
        }
    })
}

/// `tracing` to the terminal (colours only on one), or as JSON lines; `RUST_LOG` filters.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_target(false)
            .with_ansi(ansi)
            .init();
    }
}
