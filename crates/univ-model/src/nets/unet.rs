//! The U-Net backbone of the Universal Model: the Models Genesis `UNet3D` as the official
//! repository (ljwztc/CLIP-Driven-Universal-Model, `model/Unet.py` at commit 43c1239) defines
//! it: four down stages of two 3×3×3 convolutions with max pooling between them (channels
//! base·(1→2, 2→4, 4→8, 8→16)), and three up stages that up-sample 2×2×2, concatenate the skip
//! map and convolve twice.
//!
//! Every 3×3×3 convolution is followed by `ContBatchNorm3d`, which **always normalises with the
//! statistics of the current batch**, also at inference; we copy that. Key names mirror the
//! checkpoint: `down_tr64.ops.0.conv1.weight`, `down_tr64.ops.0.bn1.weight`, `up_tr256.up_conv.*`.

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::cpu::conv_transpose::{conv_transpose_planes, pack_transpose_weights};
use crate::cpu::correlate::{ConvWeights, correlate_chunked, pad_into};
use crate::error::{Error, Result};
use crate::layers::{Conv3d, Conv3dConfig, ConvTranspose3d, ConvTranspose3dConfig};
use crate::ops::conv::check_conv3d;
use crate::ops::norm::norm_act_owned;
use crate::ops::{Act, ExecPath, NormKind, max_pool3d_2, to_f32_vec, with_f32_slices};

/// Width of the U-Net.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnetConfig {
    /// Channels of the first convolution (32 in the official model).
    pub base: usize,
}

impl UnetConfig {
    /// The official width (base 32: deep map 512 channels, decoder map 64).
    pub fn universal_model() -> Self {
        UnetConfig { base: 32 }
    }

    /// Channels of the deep map fed to `GAP` (16 × base).
    pub fn deep_channels(&self) -> usize {
        16 * self.base
    }

    /// Channels of the decoder map fed to `precls_conv` (2 × base).
    pub fn decoder_channels(&self) -> usize {
        2 * self.base
    }
}

const BN_EPS: f64 = 1e-5;

/// Conv3d(3, pad 1, bias) → batch-statistics BatchNorm → ReLU.
#[derive(Debug, Clone)]
struct LuConv {
    conv: Conv3d,
    bn_weight: Tensor,
    bn_bias: Tensor,
}

impl LuConv {
    fn new(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        let conv = Conv3d::load(
            vb.pp("conv1"),
            cin,
            cout,
            3,
            Conv3dConfig {
                padding: 1,
                ..Conv3dConfig::default()
            },
        )?;
        let bn = vb.pp("bn1");
        Ok(LuConv {
            conv,
            bn_weight: bn.get_with_hints(cout, "weight", candle_nn::Init::Const(1.0))?,
            bn_bias: bn.get_with_hints(cout, "bias", candle_nn::Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_concat(&[x])
    }

    /// The block on the channel-wise concatenation of `inputs`.
    fn forward_concat(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let timer = crate::runtime::stage("unet/conv");
        let y = if inputs.len() == 1 {
            self.conv.forward(inputs[0])?
        } else {
            self.conv.forward_concat(inputs)?
        };
        drop(timer);
        self.norm_act(y)
    }

    /// The normalisation and activation of a convolution output `y` that was just made (it
    /// is normalised in place at inference).
    fn norm_act(&self, y: Tensor) -> Result<Tensor> {
        let _timer = crate::runtime::stage("unet/norm+relu");
        norm_act_owned(
            y,
            NormKind::Batch,
            Some(&self.bn_weight),
            Some(&self.bn_bias),
            BN_EPS,
            Act::Relu,
        )
    }
}

/// Two LuConvs (`ops.0`, `ops.1`).
#[derive(Debug, Clone)]
struct TwoConvs {
    a: LuConv,
    b: LuConv,
}

impl TwoConvs {
    fn new(vb: VarBuilder, cin: usize, mid: usize, cout: usize) -> Result<Self> {
        Ok(TwoConvs {
            a: LuConv::new(vb.pp("ops").pp(0), cin, mid)?,
            b: LuConv::new(vb.pp("ops").pp(1), mid, cout)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.b.forward(&self.a.forward(x)?)
    }
}

#[derive(Debug, Clone)]
struct UpTransition {
    up: ConvTranspose3d,
    ops: TwoConvs,
}

impl UpTransition {
    fn new(vb: VarBuilder, cin: usize, skip: usize, cout: usize) -> Result<Self> {
        Ok(UpTransition {
            up: ConvTranspose3d::load(
                vb.pp("up_conv"),
                cin,
                cin,
                2,
                ConvTranspose3dConfig::default(),
            )?,
            ops: TwoConvs::new(vb, cin + skip, cout, cout)?,
        })
    }

    /// Takes its inputs by value so that they are released after the first convolution.
    fn forward(&self, x_owned: Tensor, skip_owned: Tensor) -> Result<Tensor> {
        let (x, skip) = (&x_owned, &skip_owned);
        // At inference the up-sampled map is made a few planes at a time as the first
        // convolution needs them; otherwise that convolution reads [up, skip] without a
        // concatenated copy.
        let timer = crate::runtime::stage("unet/up+conv");
        let y = up_then_concat_conv(&self.up, x, skip, &self.ops.a.conv)?;
        drop(timer);
        let y = match y {
            Some(y) => self.ops.a.norm_act(y)?,
            None => {
                let up = self.up.forward(x)?;
                self.ops.a.forward_concat(&[&up, skip])?
            }
        };
        drop((x_owned, skip_owned));
        self.ops.b.forward(&y)
    }
}

/// `conv([up(x) ‖ skip])` (the stride-1 `conv` over the channel-wise concatenation of the
/// up-sampled `x` and `skip`) for one sample at inference on the CPU, without materialising the
/// up-sampled map: its planes are computed a few at a time, as the convolution's padded input
/// needs them (at full resolution the map would be 453 MB). `None` when this path does not
/// apply (tracked tensors, another device, a batch, a strided `conv`); the caller then composes
/// the two operations.
///
/// # Errors
/// Shape mismatches between `x`, `skip` and the two weights.
pub fn up_then_concat_conv(
    upconv: &ConvTranspose3d,
    x: &Tensor,
    skip: &Tensor,
    conv: &Conv3d,
) -> Result<Option<Tensor>> {
    let path = ExecPath::of(&[
        Some(x),
        Some(skip),
        Some(upconv.weight()),
        upconv.bias(),
        Some(conv.weight()),
        conv.bias(),
    ]);
    if conv.config().stride != 1
        || path != ExecPath::CpuInference
        || x.rank() != 5
        || skip.rank() != 5
        || x.dim(0)? != 1
        || skip.dim(0)? != 1
    {
        return Ok(None);
    }
    let (_, ci, d, h, wd) = x.dims5()?;
    let (wci, co, kd, kh, kw) = upconv.weight().dims5()?;
    let (_, cs, sd, sh, sw) = skip.dims5()?;
    let (o, cc, ckd, ckh, ckw) = conv.weight().dims5()?;
    let up = [d * kd, h * kh, wd * kw];
    if wci != ci || up != [sd, sh, sw] || cc != co + cs {
        return Err(Error::shape(
            "up-convolution + convolution",
            format!(
                "input {:?} with weight {:?}, skip {:?}, convolution weight {:?}",
                x.dims(),
                upconv.weight().dims(),
                skip.dims(),
                conv.weight().dims()
            ),
        ));
    }
    let pad = [conv.config().padding; 3];
    check_conv3d(&skip.narrow(1, 0, 1)?, &conv.weight().narrow(1, 0, 1)?, pad)?;
    let wt = pack_transpose_weights(&to_f32_vec(upconv.weight())?, ci, co, [kd, kh, kw]);
    let bt = upconv.bias().map(to_f32_vec).transpose()?;
    let k = [ckd, ckh, ckw];
    let wv = to_f32_vec(conv.weight())?;
    let bc = conv.bias().map(to_f32_vec).transpose()?;
    let od = [
        up[0] + 2 * pad[0] + 1 - k[0],
        up[1] + 2 * pad[1] + 1 - k[1],
        up[2] + 2 * pad[2] + 1 - k[2],
    ];
    let mut out = vec![0f32; o * od.iter().product::<usize>()];
    let (x, skip) = (x.contiguous()?, skip.contiguous()?);
    let (hw, vol) = (up[1] * up[2], up[0] * up[1] * up[2]);
    with_f32_slices(&[&x, &skip], |datas| {
        let (xv, sv) = (datas[0], datas[1]);
        // Up-sampled planes of the current block, reused from block to block.
        let mut planes: Vec<f32> = Vec::new();
        correlate_chunked(
            cc,
            up,
            pad,
            ConvWeights::Raw(&wv),
            o,
            k,
            bc.as_deref(),
            &mut out,
            |pz0, np, dst| {
                let zlo = pz0.saturating_sub(pad[0]).min(up[0]);
                let zhi = (pz0 + np).saturating_sub(pad[0]).min(up[0]);
                let (iz0, iz1) = (zlo / kd, zhi.div_ceil(kd));
                let nloc = (iz1 - iz0) * kd;
                planes.resize(co * nloc * hw, 0.0);
                if iz1 > iz0 {
                    let _timer = crate::runtime::stage("unet/up planes");
                    conv_transpose_planes(
                        xv,
                        [ci, d, h, wd],
                        &wt,
                        co,
                        [kd, kh, kw],
                        bt.as_deref(),
                        iz0..iz1,
                        &mut planes,
                    );
                }
                let planes = &planes;
                pad_into(
                    |c, z| {
                        if c < co {
                            let zl = z - iz0 * kd;
                            &planes[(c * nloc + zl) * hw..(c * nloc + zl + 1) * hw]
                        } else {
                            let c = c - co;
                            &sv[c * vol + z * hw..c * vol + (z + 1) * hw]
                        }
                    },
                    cc,
                    up,
                    pad,
                    pz0,
                    np,
                    dst,
                )
            },
        );
    })?;
    Ok(Some(Tensor::from_vec(
        out,
        (1, o, od[0], od[1], od[2]),
        &Device::Cpu,
    )?))
}

/// The UNet3D backbone: returns `(deep, decoder)` maps.
#[derive(Debug, Clone)]
pub struct Unet3d {
    cfg: UnetConfig,
    down64: TwoConvs,
    down128: TwoConvs,
    down256: TwoConvs,
    down512: TwoConvs,
    up256: UpTransition,
    up128: UpTransition,
    up64: UpTransition,
}

impl Unet3d {
    /// Builds the backbone from `vb` (its keys start at `down_tr64`, ...).
    ///
    /// # Errors
    /// Missing or mis-shaped weights; a base width of 0.
    pub fn new(vb: VarBuilder, cfg: UnetConfig) -> Result<Self> {
        let b = cfg.base;
        if b == 0 {
            return Err(Error::Config("U-Net base width must be positive".into()));
        }
        Ok(Unet3d {
            cfg,
            down64: TwoConvs::new(vb.pp("down_tr64"), 1, b, 2 * b)?,
            down128: TwoConvs::new(vb.pp("down_tr128"), 2 * b, 2 * b, 4 * b)?,
            down256: TwoConvs::new(vb.pp("down_tr256"), 4 * b, 4 * b, 8 * b)?,
            down512: TwoConvs::new(vb.pp("down_tr512"), 8 * b, 8 * b, 16 * b)?,
            up256: UpTransition::new(vb.pp("up_tr256"), 16 * b, 8 * b, 8 * b)?,
            up128: UpTransition::new(vb.pp("up_tr128"), 8 * b, 4 * b, 4 * b)?,
            up64: UpTransition::new(vb.pp("up_tr64"), 4 * b, 2 * b, 2 * b)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> UnetConfig {
        self.cfg
    }

    /// Runs the backbone.
    ///
    /// # Shapes
    /// `x`: `(B, 1, D, H, W)` with sides divisible by 8 → deep `(B, 16·base, D/8, H/8, W/8)`,
    /// decoder `(B, 2·base, D, H, W)`.
    ///
    /// # Errors
    /// Sides not divisible by 8, or tensor errors.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, c, d, h, w) = x.dims5()?;
        if c != 1 || d % 8 != 0 || h % 8 != 0 || w % 8 != 0 {
            return Err(Error::shape(
                "UNet3D",
                format!(
                    "input must be (B, 1, D, H, W) with sides divisible by 8, got {:?}",
                    x.dims()
                ),
            ));
        }
        let skip64 = self.down64.forward(x)?;
        let pool = |x: &Tensor| {
            let _timer = crate::runtime::stage("unet/pool");
            max_pool3d_2(x)
        };
        let skip128 = self.down128.forward(&pool(&skip64)?)?;
        let skip256 = self.down256.forward(&pool(&skip128)?)?;
        let deep = self.down512.forward(&pool(&skip256)?)?;
        // Each skip map (and the map below it) is released as soon as its stage has used it.
        let u = self.up256.forward(deep.clone(), skip256)?;
        let u = self.up128.forward(u, skip128)?;
        let dec = self.up64.forward(u, skip64)?;
        Ok((deep, dec))
    }
}
