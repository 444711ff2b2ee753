//! The small ResNet of the `resnet` example and the stopping benchmark: convolution → batch norm
//! → ReLU with identity skips, a probe after each residual block on its whole output (a unit is
//! a feature map). It has batch norm, so it is a `ModuleT`.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{
    batch_norm, conv2d_no_bias, linear, BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig, Linear,
    VarBuilder,
};
use candle_reliance::{Probe, ProbeSet};

/// 3 × 3 convolution (padding 1) → batch norm.
pub struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBn {
    fn new(vb: VarBuilder, inputs: usize, outputs: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d_no_bias(inputs, outputs, 3, cfg, vb.pp("conv"))?,
            bn: batch_norm(outputs, BatchNormConfig::default(), vb.pp("bn"))?,
        })
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.bn.forward_t(&self.conv.forward(xs)?, train)
    }
}

/// A basic residual block: relu(x + bn(conv(relu(bn(conv(x)))))), its output probed.
pub struct Block {
    a: ConvBn,
    b: ConvBn,
    probe: Probe,
}

impl Block {
    fn new(vb: VarBuilder, channels: usize, probe: Probe) -> Result<Self> {
        Ok(Self {
            a: ConvBn::new(vb.pp("a"), channels, channels)?,
            b: ConvBn::new(vb.pp("b"), channels, channels)?,
            probe,
        })
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let branch = self
            .b
            .forward_t(&self.a.forward_t(xs, train)?.relu()?, train)?;
        // The probe sees the block's output, which the next block's skip carries too.
        self.probe.forward(&(xs + branch)?.relu()?)
    }
}

pub struct ResNet {
    stem: ConvBn,
    block1: Block,
    down: ConvBn,
    block2: Block,
    head: Linear,
}

impl ResNet {
    pub fn new(vb: VarBuilder, c: usize, probes: &ProbeSet) -> Result<Self> {
        Ok(Self {
            stem: ConvBn::new(vb.pp("stem"), 1, c)?,
            block1: Block::new(vb.pp("block1"), c, probes.add("block1")?)?,
            down: ConvBn::new(vb.pp("down"), c, 2 * c)?,
            block2: Block::new(vb.pp("block2"), 2 * c, probes.add("block2")?)?,
            head: linear(2 * c, 10, vb.pp("head"))?,
        })
    }
}

impl ModuleT for ResNet {
    /// `xs`: `(N, 784)` pixels of 28 × 28 images.
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let n = xs.dim(0)?;
        let h = self
            .stem
            .forward_t(&xs.reshape((n, 1, 28, 28))?, train)?
            .relu()?;
        let h = self.block1.forward_t(&h, train)?; // (N, c, 28, 28)
        let h = self.down.forward_t(&h.max_pool2d(2)?, train)?.relu()?; // (N, 2c, 14, 14)
        let h = self.block2.forward_t(&h, train)?;
        self.head.forward(&h.mean((2, 3))?)
    }
}
