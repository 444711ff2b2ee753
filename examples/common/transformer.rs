//! The small transformer encoder of the `sequence` and `tagging` examples and the stopping
//! benchmark: MNIST digits read as 28 tokens (rows) of 28 pixels, pre-norm encoder layers from
//! candle-nn layers, a probe in each feed-forward block after its ReLU, fused with the layer it
//! feeds. A classifier of whole digits, or ([`Transformer::tagger`]) of every token.

use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, linear, LayerNorm, Linear, VarBuilder};
use candle_reliance::{ProbeSet, ProbedLayer};

/// Tokens per digit (its rows) and pixels per token.
pub const TOKENS: usize = 28;
pub const PIXELS: usize = 28;

/// A pre-norm encoder layer: self-attention, then a feed-forward block whose hidden ReLU units
/// are probed (`ff2` is the probe fused with the layer that reads them).
pub struct EncoderLayer {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    ff1: Linear,
    ff2: ProbedLayer,
    heads: usize,
}

impl EncoderLayer {
    fn new(
        vb: VarBuilder,
        width: usize,
        heads: usize,
        probes: &ProbeSet,
        name: &str,
    ) -> Result<Self> {
        let ff = 2 * width;
        Ok(Self {
            ln1: layer_norm(width, 1e-5, vb.pp("ln1"))?,
            qkv: linear(width, 3 * width, vb.pp("qkv"))?,
            proj: linear(width, width, vb.pp("proj"))?,
            ln2: layer_norm(width, 1e-5, vb.pp("ln2"))?,
            ff1: linear(width, ff, vb.pp("ff1"))?,
            ff2: probes.add(name)?.feeding(linear(ff, width, vb.pp("ff2"))?),
            heads,
        })
    }

    fn attention(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (n, t, width) = xs.dims3()?;
        let dh = width / self.heads;
        // (N, T, 3·W) → three (N, heads, T, dh)
        let qkv = self
            .qkv
            .forward(xs)?
            .reshape((n, t, 3, self.heads, dh))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (
            qkv.get(0)?.contiguous()?,
            qkv.get(1)?.contiguous()?,
            qkv.get(2)?.contiguous()?,
        );
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (dh as f64).sqrt())?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((n, t, width))?;
        self.proj.forward(&out)
    }
}

impl Module for EncoderLayer {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = (xs + self.attention(&self.ln1.forward(xs)?)?)?;
        let hidden = self.ff1.forward(&self.ln2.forward(&xs)?)?.relu()?;
        // The probe sees (N, T, 2·W): each hidden unit at every position. `residual` is the
        // skip connection's add, which keeps a check one batched pass.
        let branch = self.ff2.forward(&hidden)?;
        self.ff2.residual(&xs, &branch)
    }
}

pub struct Transformer {
    embed: Linear,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    ln: LayerNorm,
    head: Linear,
    /// A tagger's head of each token's own state: logits `(N, T, 10)`.
    token_head: Option<Linear>,
}

impl Transformer {
    /// A classifier of whole digits: logits `(N, 10)`.
    pub fn new(
        vb: VarBuilder,
        width: usize,
        heads: usize,
        layers: usize,
        probes: &ProbeSet,
    ) -> Result<Self> {
        Self::build(vb, width, heads, layers, probes, false)
    }

    /// A tagger: logits `(N, 28, 10)`, one class per token, from that token's last state and
    /// the whole sequence's.
    #[allow(dead_code)] // Each example compiles this module; only `tagging` uses it.
    pub fn tagger(
        vb: VarBuilder,
        width: usize,
        heads: usize,
        layers: usize,
        probes: &ProbeSet,
    ) -> Result<Self> {
        Self::build(vb, width, heads, layers, probes, true)
    }

    fn build(
        vb: VarBuilder,
        w: usize,
        heads: usize,
        layers: usize,
        probes: &ProbeSet,
        per_token: bool,
    ) -> Result<Self> {
        Ok(Self {
            embed: linear(PIXELS, w, vb.pp("embed"))?,
            positions: vb.get_with_hints(
                (TOKENS, w),
                "positions",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            layers: (0..layers)
                .map(|i| {
                    EncoderLayer::new(
                        vb.pp(format!("layer{i}")),
                        w,
                        heads,
                        probes,
                        &format!("ff{i}"),
                    )
                })
                .collect::<Result<_>>()?,
            ln: layer_norm(w, 1e-5, vb.pp("ln"))?,
            head: linear(TOKENS * w, 10, vb.pp("head"))?,
            token_head: per_token
                .then(|| linear(w, 10, vb.pp("token_head")))
                .transpose()?,
        })
    }
}

impl Module for Transformer {
    /// `xs`: `(N, 784)` pixels, read as 28 tokens of 28.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let n = xs.dim(0)?;
        let tokens = self.embed.forward(&xs.reshape((n, TOKENS, PIXELS))?)?;
        let mut h = tokens.broadcast_add(&self.positions)?;
        for layer in &self.layers {
            h = layer.forward(&h)?;
        }
        let h = self.ln.forward(&h)?;
        // The classifier reads every token: a mean over them would start the network as a
        // classifier of the digit's column profile, blind to which row is where; it learned
        // slowly (47% test accuracy after 8 epochs on clean digits, 90-91% this way).
        let whole = self.head.forward(&h.flatten_from(1)?)?;
        match &self.token_head {
            // A token's logits: the whole sequence's plus its own state's. From its own state
            // alone (attention doing all the gathering) a tagger of the digit's class learned
            // slowly: 36-46% test token accuracy after 6 epochs on clean digits.
            Some(token) => token.forward(&h)?.broadcast_add(&whole.unsqueeze(1)?),
            None => Ok(whole),
        }
    }
}
