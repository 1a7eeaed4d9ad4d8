//! The Swin UNETR backbone of the Universal Model (`model/SwinUNETR.py` of the official
//! repository, ljwztc/CLIP-Driven-Universal-Model at commit 43c1239, built from MONAI 0.9.0's
//! blocks).
//!
//! Quirks copied for checkpoint parity: MONAI 0.9.0's patch merging concatenates the strided
//! sub-volumes in the order (000, 100, 010, 001, 101, 010, 001, 111) (two duplicated, two
//! unused); when a stage's side is not larger than the window, the window shrinks to the side
//! and the shift disappears, and the relative-position index is the top-left block of the 7³
//! table rather than one recomputed for the smaller window; shifted windows are masked with −100
//! between regions; stage outputs pass through a LayerNorm without parameters.

use candle_core::{D, DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::layers::{
    Conv3d, Conv3dConfig, ConvTranspose3d, ConvTranspose3dConfig, LayerNorm, Linear, LinearConfig,
    NormConfig,
};
use crate::ops::elementwise::add_act_owned;
use crate::ops::norm::norm_act_owned;
use crate::ops::{Act, ExecPath, NormKind, layer_norm, with_f32_slices};
use crate::runtime::stage;

/// Swin UNETR hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwinUnetrConfig {
    /// Feature size (48 in the official model; 12 and 24 are the smaller MONAI presets).
    pub feature_size: usize,
    /// Blocks per stage.
    pub depths: [usize; 4],
    /// Attention heads per stage.
    pub num_heads: [usize; 4],
    /// Window side (7).
    pub window: usize,
}

impl SwinUnetrConfig {
    /// The official configuration: feature size 48, depths (2, 2, 2, 2), heads (3, 6, 12, 24).
    pub fn universal_model() -> Self {
        Self::with_feature_size(48)
    }

    /// The official layout with another feature size.
    pub fn with_feature_size(feature_size: usize) -> Self {
        SwinUnetrConfig {
            feature_size,
            depths: [2, 2, 2, 2],
            num_heads: [3, 6, 12, 24],
            window: 7,
        }
    }

    /// Channels of the deep map fed to `GAP` (16 × feature size).
    pub fn deep_channels(&self) -> usize {
        16 * self.feature_size
    }

    /// Channels of the decoder map fed to `precls_conv` (the feature size).
    pub fn decoder_channels(&self) -> usize {
        self.feature_size
    }

    /// Checks that the widths fit the heads.
    ///
    /// # Errors
    /// [`Error::Config`] when a stage's width is not divisible by its head count.
    pub fn validate(&self) -> Result<()> {
        for (s, h) in self.num_heads.iter().enumerate() {
            let dim = self.feature_size << s;
            if *h == 0 || !dim.is_multiple_of(*h) {
                return Err(Error::Config(format!(
                    "stage {} width {dim} is not divisible by {h} heads",
                    s + 1
                )));
            }
        }
        if self.window == 0 {
            return Err(Error::Config("window must be positive".into()));
        }
        Ok(())
    }
}

const LN_EPS: f64 = 1e-5;
const LN: NormConfig = NormConfig {
    eps: LN_EPS,
    affine: true,
};
const IN_EPS: f64 = 1e-5;
const MASK_VALUE: f64 = -100.0;

/// The relative-position index of a `w³` window (row-major tokens), as `u32`.
fn relative_position_index(w: usize) -> Vec<u32> {
    let n = w * w * w;
    let coord = |t: usize| [t / (w * w), (t / w) % w, t % w];
    let m = 2 * w - 1;
    let mut out = Vec::with_capacity(n * n);
    for i in 0..n {
        let a = coord(i);
        for j in 0..n {
            let b = coord(j);
            let r = [0, 1, 2].map(|ax| a[ax] + w - 1 - b[ax]);
            out.push((r[0] * m * m + r[1] * m + r[2]) as u32);
        }
    }
    out
}

/// Effective window and shift for a grid (MONAI's `get_window_size`).
fn window_and_shift(dims: [usize; 3], window: usize, shift: usize) -> ([usize; 3], [usize; 3]) {
    let mut ws = [window; 3];
    let mut sh = [shift; 3];
    for a in 0..3 {
        if dims[a] <= window {
            ws[a] = dims[a];
            sh[a] = 0;
        }
    }
    (ws, sh)
}

/// `(B, D, H, W, C)` → `(B·nW, wd·wh·ww, C)`.
fn window_partition(x: &Tensor, ws: [usize; 3]) -> Result<Tensor> {
    let (b, d, h, w, c) = x.dims5()?;
    Ok(x.reshape(vec![
        b,
        d / ws[0],
        ws[0],
        h / ws[1],
        ws[1],
        w / ws[2],
        ws[2],
        c,
    ])?
    .permute(vec![0, 1, 3, 5, 2, 4, 6, 7])?
    .contiguous()?
    .reshape((
        b * (d / ws[0]) * (h / ws[1]) * (w / ws[2]),
        ws[0] * ws[1] * ws[2],
        c,
    ))?)
}

/// The inverse of [`window_partition`].
fn window_reverse(x: &Tensor, ws: [usize; 3], dims: [usize; 4]) -> Result<Tensor> {
    let [b, d, h, w] = dims;
    let c = x.dim(D::Minus1)?;
    Ok(x.reshape(vec![
        b,
        d / ws[0],
        h / ws[1],
        w / ws[2],
        ws[0],
        ws[1],
        ws[2],
        c,
    ])?
    .permute(vec![0, 1, 4, 2, 5, 3, 6, 7])?
    .contiguous()?
    .reshape((b, d, h, w, c))?)
}

/// The shifted-window attention mask `(nW, N, N)` for padded dims (0 within a region, −100
/// between regions), MONAI's `compute_mask`.
fn attention_mask(
    dims: [usize; 3],
    ws: [usize; 3],
    sh: [usize; 3],
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let label = |ax: usize, i: usize| -> usize {
        if sh[ax] == 0 {
            2
        } else if i < dims[ax] - ws[ax] {
            0
        } else if i < dims[ax] - sh[ax] {
            1
        } else {
            2
        }
    };
    let (nd, nh, nw) = (dims[0] / ws[0], dims[1] / ws[1], dims[2] / ws[2]);
    let n = ws[0] * ws[1] * ws[2];
    let mut mask = Vec::with_capacity(nd * nh * nw * n * n);
    let mut regions = vec![0usize; n];
    for a in 0..nd {
        for b in 0..nh {
            for c in 0..nw {
                for t in 0..n {
                    let (z, y, x) = (t / (ws[1] * ws[2]), (t / ws[2]) % ws[1], t % ws[2]);
                    regions[t] = label(0, a * ws[0] + z) * 9
                        + label(1, b * ws[1] + y) * 3
                        + label(2, c * ws[2] + x);
                }
                for i in 0..n {
                    for j in 0..n {
                        mask.push(if regions[i] == regions[j] {
                            0f32
                        } else {
                            MASK_VALUE as f32
                        });
                    }
                }
            }
        }
    }
    Ok(Tensor::from_vec(mask, (nd * nh * nw, n, n), dev)?)
}

#[derive(Debug, Clone)]
struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    bias_table: Tensor,
    heads: usize,
    window: usize,
}

impl WindowAttention {
    fn new(vb: VarBuilder, dim: usize, heads: usize, window: usize) -> Result<Self> {
        let m = 2 * window - 1;
        Ok(WindowAttention {
            qkv: Linear::load(vb.pp("qkv"), dim, 3 * dim, LinearConfig::default())?,
            proj: Linear::load(vb.pp("proj"), dim, dim, LinearConfig::default())?,
            bias_table: vb.get_with_hints(
                (m * m * m, heads),
                "relative_position_bias_table",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            heads,
            window,
        })
    }

    /// `x`: `(B·nW, N, C)`; `mask`: `(nW, N, N)`. Windows are attended a group at a time so
    /// that the `(windows, heads, N, N)` scores stay near 64 MB (all of them at once would be
    /// 0.5 GB, twice, for a 96³ input at the first stage).
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_in_groups(x, mask, 64 << 20)
    }

    /// [`forward`](Self::forward) with scores of at most about `score_bytes` at once.
    fn forward_in_groups(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        score_bytes: usize,
    ) -> Result<Tensor> {
        let (bw, n, _) = x.dims3()?;
        let per_window = (self.heads * n * n * 4).max(1);
        if bw * per_window <= score_bytes {
            return self.forward_group(x, mask);
        }
        let nw = mask.map_or(Ok(bw), |m| m.dim(0))?;
        let group = (score_bytes / per_window).clamp(1, nw);
        let mut outs = Vec::new();
        for b0 in (0..bw).step_by(nw) {
            for w0 in (0..nw).step_by(group) {
                let len = group.min(nw - w0);
                let m = mask.map(|m| m.narrow(0, w0, len)).transpose()?;
                outs.push(self.forward_group(&x.narrow(0, b0 + w0, len)?, m.as_ref())?);
            }
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// The relative position bias `(1, heads, N, N)` of windows of `N` tokens. The quirk: the
    /// first N rows and columns of the full window's index table.
    fn position_bias(&self, n: usize) -> Result<Tensor> {
        let full = relative_position_index(self.window);
        let nf = self.window.pow(3);
        let idx: Vec<u32> = (0..n)
            .flat_map(|i| full[i * nf..i * nf + n].to_vec())
            .collect();
        let idx = Tensor::from_vec(idx, n * n, self.bias_table.device())?;
        Ok(self
            .bias_table
            .index_select(&idx, 0)?
            .reshape((n, n, self.heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?)
    }

    /// [`forward`](Self::forward) on one group of windows (`mask` has one row per window of
    /// the group, or divides the group evenly).
    fn forward_group(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (bw, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let timer = stage("swin/block/attention/qkv linear");
        let qkv = self.qkv.forward(x)?;
        drop(timer);
        let bias = self.position_bias(n)?;
        if ExecPath::of(&[Some(&qkv), Some(&bias), mask]) == ExecPath::CpuInference {
            // Scores, bias, mask, softmax and the product with v fused per (window, head).
            let timer = stage("swin/block/attention/fused attention");
            let mut ts = vec![qkv.contiguous()?, bias.contiguous()?];
            if let Some(m) = mask {
                ts.push(m.contiguous()?);
            }
            let refs: Vec<&Tensor> = ts.iter().collect();
            let nw = mask.map(|m| m.dim(0)).transpose()?;
            let out = with_f32_slices(&refs, |d| {
                crate::cpu::attention::window_attention(
                    d[0],
                    [bw, n, self.heads, hd],
                    (hd as f64).powf(-0.5) as f32,
                    d[1],
                    nw.map(|nw| (d[2], nw)),
                )
            })?;
            drop(timer);
            let out = Tensor::from_vec(out, (bw, n, c), x.device())?;
            let _timer = stage("swin/block/attention/projection linear");
            return Ok(self.proj.forward(&out)?);
        }
        let qkv = qkv
            .reshape((bw, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let timer = stage("swin/block/attention/split heads");
        let q = (qkv.get(0)?.contiguous()? * (hd as f64).powf(-0.5))?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        drop(timer);
        let timer = stage("swin/block/attention/scores QK^T");
        let mut attn = q.matmul(&k.t()?.contiguous()?)?; // (BW, h, N, N)
        drop(timer);
        let timer = stage("swin/block/attention/bias + mask");
        attn = attn.broadcast_add(&bias)?;
        if let Some(m) = mask {
            let nw = m.dim(0)?;
            attn = attn
                .reshape((bw / nw, nw, self.heads, n, n))?
                .broadcast_add(&m.unsqueeze(1)?.unsqueeze(0)?)?
                .reshape((bw, self.heads, n, n))?;
        }
        drop(timer);
        let timer = stage("swin/block/attention/softmax");
        let attn = candle_nn::ops::softmax(&attn, D::Minus1)?;
        drop(timer);
        let timer = stage("swin/block/attention/AV + merge heads");
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((bw, n, c))?;
        drop(timer);
        let _timer = stage("swin/block/attention/projection linear");
        Ok(self.proj.forward(&out)?)
    }
}

#[derive(Debug, Clone)]
struct SwinBlock {
    norm1: LayerNorm,
    attn: WindowAttention,
    norm2: LayerNorm,
    linear1: Linear,
    linear2: Linear,
    shifted: bool,
    window: usize,
}

impl SwinBlock {
    fn new(vb: VarBuilder, dim: usize, heads: usize, window: usize, shifted: bool) -> Result<Self> {
        let bias = LinearConfig::default();
        Ok(SwinBlock {
            norm1: LayerNorm::load(vb.pp("norm1"), dim, LN)?,
            attn: WindowAttention::new(vb.pp("attn"), dim, heads, window)?,
            norm2: LayerNorm::load(vb.pp("norm2"), dim, LN)?,
            linear1: Linear::load(vb.pp("mlp").pp("linear1"), dim, 4 * dim, bias)?,
            linear2: Linear::load(vb.pp("mlp").pp("linear2"), 4 * dim, dim, bias)?,
            shifted,
            window,
        })
    }

    /// `x`: `(B, D, H, W, C)` channels-last.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, d, h, w, _) = x.dims5()?;
        let shift = if self.shifted { self.window / 2 } else { 0 };
        let (ws, sh) = window_and_shift([d, h, w], self.window, shift);
        let shortcut = x;
        let timer = stage("swin/block/norm1");
        let mut y = self.norm1.forward(x)?;
        drop(timer);
        let timer = stage("swin/block/pad, shift, partition");
        let pads = [0, 1, 2].map(|a| (ws[a] - [d, h, w][a] % ws[a]) % ws[a]);
        for (a, p) in pads.iter().enumerate() {
            if *p > 0 {
                y = y.pad_with_zeros(1 + a, 0, *p)?;
            }
        }
        let dp = [d + pads[0], h + pads[1], w + pads[2]];
        let any_shift = sh.iter().any(|s| *s > 0);
        if any_shift {
            for a in 0..3 {
                y = y.roll(-(sh[a] as i32), 1 + a)?;
            }
        }
        let windows = window_partition(&y, ws)?;
        drop(timer);
        let timer = stage("swin/block/attention");
        let attn = self
            .attn
            .forward(&windows, if any_shift { mask } else { None })?;
        drop(timer);
        let timer = stage("swin/block/reverse, unshift, crop, residual");
        let mut y = window_reverse(&attn, ws, [b, dp[0], dp[1], dp[2]])?;
        if any_shift {
            for a in 0..3 {
                y = y.roll(sh[a] as i32, 1 + a)?;
            }
        }
        if pads.iter().any(|p| *p > 0) {
            y = y
                .narrow(1, 0, d)?
                .narrow(2, 0, h)?
                .narrow(3, 0, w)?
                .contiguous()?;
        }
        let x = (shortcut + y)?;
        drop(timer);
        let timer = stage("swin/block/norm2");
        let n2 = self.norm2.forward(&x)?;
        drop(timer);
        let timer = stage("swin/block/mlp linear1");
        let h1 = self.linear1.forward(&n2)?;
        drop(timer);
        let timer = stage("swin/block/mlp gelu");
        let h1 = crate::ops::gelu(&h1)?;
        drop(timer);
        let _timer = stage("swin/block/mlp linear2 + residual");
        let m = self.linear2.forward(&h1)?;
        Ok((x + m)?)
    }
}

/// MONAI 0.9.0's patch merging: 8 strided sub-volumes in the legacy order, LayerNorm, Linear.
#[derive(Debug, Clone)]
struct PatchMerging {
    norm: LayerNorm,
    reduction: Linear,
}

impl PatchMerging {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(PatchMerging {
            norm: LayerNorm::load(vb.pp("norm"), 8 * dim, LN)?,
            reduction: Linear::load(
                vb.pp("reduction"),
                8 * dim,
                2 * dim,
                LinearConfig { bias: false },
            )?,
        })
    }

    /// `(B, D, H, W, C)` → `(B, D/2, H/2, W/2, 2C)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, d, h, w, c) = x.dims5()?;
        let mut x = x.clone();
        for (a, s) in [d, h, w].iter().enumerate() {
            if s % 2 == 1 {
                x = x.pad_with_zeros(1 + a, 0, 1)?;
            }
        }
        let (d2, h2, w2) = (d.div_ceil(2), h.div_ceil(2), w.div_ceil(2));
        let v = x.reshape(vec![b, d2, 2, h2, 2, w2, 2, c])?;
        let pick = |i: usize, j: usize, k: usize| -> Result<Tensor> {
            Ok(v.narrow(2, i, 1)?
                .narrow(4, j, 1)?
                .narrow(6, k, 1)?
                .reshape((b, d2, h2, w2, c))?)
        };
        // (D, H, W) parities in MONAI 0.9.0's order.
        let order = [
            (0, 0, 0),
            (1, 0, 0),
            (0, 1, 0),
            (0, 0, 1),
            (1, 0, 1),
            (0, 1, 0),
            (0, 0, 1),
            (1, 1, 1),
        ];
        let parts: Vec<Tensor> = order
            .iter()
            .map(|&(i, j, k)| pick(i, j, k))
            .collect::<Result<_>>()?;
        let cat = Tensor::cat(&parts, D::Minus1)?;
        Ok(self.reduction.forward(&self.norm.forward(&cat)?)?)
    }
}

#[derive(Debug, Clone)]
struct BasicLayer {
    blocks: Vec<SwinBlock>,
    downsample: PatchMerging,
    window: usize,
}

impl BasicLayer {
    fn new(vb: VarBuilder, dim: usize, depth: usize, heads: usize, window: usize) -> Result<Self> {
        let blocks = (0..depth)
            .map(|i| SwinBlock::new(vb.pp("blocks").pp(i), dim, heads, window, i % 2 == 1))
            .collect::<Result<_>>()?;
        Ok(BasicLayer {
            blocks,
            downsample: PatchMerging::new(vb.pp("downsample"), dim)?,
            window,
        })
    }

    /// `(B, C, D, H, W)` → `(B, 2C, D/2, H/2, W/2)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, d, h, w) = x.dims5()?;
        let (ws, sh) = window_and_shift([d, h, w], self.window, self.window / 2);
        let dp = [0, 1, 2].map(|a| [d, h, w][a].div_ceil(ws[a]) * ws[a]);
        let mask = if sh.iter().any(|s| *s > 0) {
            Some(attention_mask(dp, ws, sh, x.device())?.to_dtype(x.dtype())?)
        } else {
            None
        };
        let timer = stage("swin/layer permutes");
        let mut y = x.permute((0, 2, 3, 4, 1))?.contiguous()?;
        drop(timer);
        for blk in &self.blocks {
            let _timer = stage("swin/block");
            y = blk.forward(&y, mask.as_ref())?;
        }
        let timer = stage("swin/patch merging");
        let y = self.downsample.forward(&y)?;
        drop(timer);
        let _timer = stage("swin/layer permutes");
        Ok(y.permute((0, 4, 1, 2, 3))?.contiguous()?)
    }
}

/// LayerNorm over channels without parameters, on a channels-first map.
fn proj_out(x: &Tensor) -> Result<Tensor> {
    let y = x.permute((0, 2, 3, 4, 1))?;
    let y = layer_norm(&y, None, None, LN_EPS)?;
    Ok(y.permute((0, 4, 1, 2, 3))?.contiguous()?)
}

/// The Swin transformer encoder (`swinViT`).
#[derive(Debug, Clone)]
pub struct SwinTransformer {
    patch_embed: Conv3d,
    layers: Vec<BasicLayer>,
}

impl SwinTransformer {
    fn new(vb: VarBuilder, cfg: &SwinUnetrConfig) -> Result<Self> {
        let fs = cfg.feature_size;
        let patch = Conv3dConfig {
            stride: 2,
            ..Conv3dConfig::default()
        };
        let patch_embed = Conv3d::load(vb.pp("patch_embed").pp("proj"), 1, fs, 2, patch)?;
        let layers = (0..4)
            .map(|s| {
                BasicLayer::new(
                    vb.pp(format!("layers{}", s + 1)).pp(0),
                    fs << s,
                    cfg.depths[s],
                    cfg.num_heads[s],
                    cfg.window,
                )
            })
            .collect::<Result<_>>()?;
        Ok(SwinTransformer {
            patch_embed,
            layers,
        })
    }

    /// The five normalised hidden states: `fs@D/2, 2fs@D/4, 4fs@D/8, 8fs@D/16, 16fs@D/32`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let timer = stage("swin/patch embedding");
        let mut cur = self.patch_embed.forward(x)?;
        drop(timer);
        let timer = stage("swin/hidden-state norms");
        let mut out = vec![proj_out(&cur)?];
        drop(timer);
        for layer in &self.layers {
            cur = layer.forward(&cur)?;
            let _timer = stage("swin/hidden-state norms");
            out.push(proj_out(&cur)?);
        }
        Ok(out)
    }
}

/// MONAI's `UnetResBlock` with instance norm (no affine) and LeakyReLU(0.01).
#[derive(Debug, Clone)]
struct ResBlock {
    conv1: Conv3d,
    conv2: Conv3d,
    conv3: Option<Conv3d>,
}

impl ResBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        let k3 = Conv3dConfig {
            padding: 1,
            bias: false,
            ..Conv3dConfig::default()
        };
        let k1 = Conv3dConfig {
            bias: false,
            ..Conv3dConfig::default()
        };
        Ok(ResBlock {
            conv1: Conv3d::load(vb.pp("conv1").pp("conv"), cin, cout, 3, k3)?,
            conv2: Conv3d::load(vb.pp("conv2").pp("conv"), cout, cout, 3, k3)?,
            conv3: if cin != cout {
                Some(Conv3d::load(vb.pp("conv3").pp("conv"), cin, cout, 1, k1)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_concat(&[x])
    }

    /// The block on the channel-wise concatenation of `inputs` (read without a copy).
    fn forward_concat(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        // Every tensor normalised here was just made by a convolution: normalised in place.
        let inorm = |t: Tensor, act| norm_act_owned(t, NormKind::Instance, None, None, IN_EPS, act);
        let conv = |c: &Conv3d| -> Result<Tensor> {
            if inputs.len() == 1 {
                Ok(c.forward(inputs[0])?)
            } else {
                c.forward_concat(inputs)
            }
        };
        let timer = stage("res block/conv1 + norm");
        let y = inorm(conv(&self.conv1)?, Act::LeakyRelu(0.01))?;
        drop(timer);
        let timer = stage("res block/conv2 + norm");
        let y = inorm(self.conv2.forward(&y)?, Act::Identity)?;
        drop(timer);
        let timer = stage("res block/conv3 + norm");
        let res = match &self.conv3 {
            Some(c) => inorm(conv(c)?, Act::Identity)?,
            None if inputs.len() == 1 => inputs[0].clone(),
            None => Tensor::cat(inputs, 1)?,
        };
        drop(timer);
        let _timer = stage("res block/residual add");
        add_act_owned(y, &res, Act::LeakyRelu(0.01))
    }
}

#[derive(Debug, Clone)]
struct UpBlock {
    transp: ConvTranspose3d,
    block: ResBlock,
}

impl UpBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Ok(UpBlock {
            transp: ConvTranspose3d::load(
                vb.pp("transp_conv").pp("conv"),
                cin,
                cout,
                2,
                ConvTranspose3dConfig { bias: false },
            )?,
            block: ResBlock::new(vb.pp("conv_block"), 2 * cout, cout)?,
        })
    }

    fn forward(&self, x: &Tensor, skip: &Tensor) -> Result<Tensor> {
        let timer = stage("up block/transposed conv");
        let up = self.transp.forward(x)?;
        drop(timer);
        self.block.forward_concat(&[&up, skip])
    }
}

/// The Swin UNETR backbone: returns `(deep, decoder)` = `(encoder10(hs4), decoder1(...))`.
#[derive(Debug, Clone)]
pub struct SwinUnetr {
    cfg: SwinUnetrConfig,
    swin: SwinTransformer,
    encoder1: ResBlock,
    encoder2: ResBlock,
    encoder3: ResBlock,
    encoder4: ResBlock,
    encoder10: ResBlock,
    decoder5: UpBlock,
    decoder4: UpBlock,
    decoder3: UpBlock,
    decoder2: UpBlock,
    decoder1: UpBlock,
}

/// Every intermediate map of one backbone pass.
#[derive(Debug, Clone)]
pub struct SwinUnetrParts {
    /// The five normalised Swin hidden states.
    pub hidden_states: Vec<Tensor>,
    /// `encoder10(hs4)`, the deep map.
    pub dec4: Tensor,
    /// The full-resolution decoder map.
    pub out: Tensor,
}

impl SwinUnetr {
    /// Builds the backbone from `vb` (keys `swinViT.*`, `encoder1.*`, ..., `decoder1.*`).
    ///
    /// # Errors
    /// Missing or mis-shaped weights, or an invalid configuration.
    pub fn new(vb: VarBuilder, cfg: SwinUnetrConfig) -> Result<Self> {
        cfg.validate()?;
        let fs = cfg.feature_size;
        Ok(SwinUnetr {
            cfg,
            swin: SwinTransformer::new(vb.pp("swinViT"), &cfg)?,
            encoder1: ResBlock::new(vb.pp("encoder1").pp("layer"), 1, fs)?,
            encoder2: ResBlock::new(vb.pp("encoder2").pp("layer"), fs, fs)?,
            encoder3: ResBlock::new(vb.pp("encoder3").pp("layer"), 2 * fs, 2 * fs)?,
            encoder4: ResBlock::new(vb.pp("encoder4").pp("layer"), 4 * fs, 4 * fs)?,
            encoder10: ResBlock::new(vb.pp("encoder10").pp("layer"), 16 * fs, 16 * fs)?,
            decoder5: UpBlock::new(vb.pp("decoder5"), 16 * fs, 8 * fs)?,
            decoder4: UpBlock::new(vb.pp("decoder4"), 8 * fs, 4 * fs)?,
            decoder3: UpBlock::new(vb.pp("decoder3"), 4 * fs, 2 * fs)?,
            decoder2: UpBlock::new(vb.pp("decoder2"), 2 * fs, fs)?,
            decoder1: UpBlock::new(vb.pp("decoder1"), fs, fs)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> SwinUnetrConfig {
        self.cfg
    }

    /// Runs the backbone and keeps the intermediate maps.
    ///
    /// # Shapes
    /// `x`: `(B, 1, D, H, W)`, each side divisible by 32 → `dec4`: `(B, 16fs, D/32, …)`,
    /// `out`: `(B, fs, D, H, W)`.
    ///
    /// # Errors
    /// A side not divisible by 32 (named in the message), or tensor errors.
    pub fn forward_parts(&self, x: &Tensor) -> Result<SwinUnetrParts> {
        let (_, c, d, h, w) = x.dims5()?;
        if c != 1 || d % 32 != 0 || h % 32 != 0 || w % 32 != 0 {
            return Err(Error::shape(
                "SwinUNETR",
                format!(
                    "input must be (B, 1, D, H, W) with every side divisible by 32, got {:?}",
                    x.dims()
                ),
            ));
        }
        let x = if x.dtype() == DType::F32 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        let timer = stage("swin");
        let hs = self.swin.forward(&x)?;
        drop(timer);
        let timer = stage("convolutional encoders (res blocks)");
        let enc0 = self.encoder1.forward(&x)?;
        let enc1 = self.encoder2.forward(&hs[0])?;
        let enc2 = self.encoder3.forward(&hs[1])?;
        let enc3 = self.encoder4.forward(&hs[2])?;
        let dec4 = self.encoder10.forward(&hs[4])?;
        drop(timer);
        let _timer = stage("convolutional decoders (up-sampling, res blocks)");
        let dec3 = self.decoder5.forward(&dec4, &hs[3])?;
        let dec2 = self.decoder4.forward(&dec3, &enc3)?;
        let dec1 = self.decoder3.forward(&dec2, &enc2)?;
        let dec0 = self.decoder2.forward(&dec1, &enc1)?;
        let out = self.decoder1.forward(&dec0, &enc0)?;
        Ok(SwinUnetrParts {
            hidden_states: hs,
            dec4,
            out,
        })
    }

    /// Runs the backbone: `(deep, decoder)`.
    ///
    /// # Errors
    /// As [`forward_parts`](Self::forward_parts).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let p = self.forward_parts(x)?;
        Ok((p.dec4, p.out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_index_matches_the_swin_formula() {
        let idx = relative_position_index(7);
        assert_eq!(idx.len(), 343 * 343);
        // Token 0 against itself: (6·13 + 6)·13 + 6 = 1098, the centre of the 13³ table.
        assert_eq!(idx[0], 1098);
        // Token 0 (0,0,0) against token 342 (6,6,6): offset (-6,-6,-6) → 0.
        assert_eq!(idx[342], 0);
        assert_eq!(idx[342 * 343], 2196);
        assert!(idx.iter().all(|v| *v < 2197));
    }

    #[test]
    fn shifted_mask_separates_regions() {
        let m = attention_mask([14, 14, 14], [7; 3], [3; 3], &candle_core::Device::Cpu).unwrap();
        assert_eq!(m.dims(), &[8, 343, 343]);
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The first window is one region: no masking.
        assert!(v[..343 * 343].iter().all(|x| *x == 0.0));
        // The last window mixes 8 regions.
        let last = &v[7 * 343 * 343..];
        assert!(last.iter().any(|x| *x == -100.0));
        assert_eq!(last[0], 0.0);
    }

    #[test]
    fn attention_in_groups_of_windows_matches_all_at_once() {
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &candle_core::Device::Cpu);
        let att = WindowAttention::new(vb, 6, 2, 2).unwrap();
        // Two samples of four 2×2×2 windows each, with a shift mask over a 4×4×2 volume.
        let mask = attention_mask([4, 4, 2], [2; 3], [1, 1, 0], &candle_core::Device::Cpu).unwrap();
        assert_eq!(mask.dim(0).unwrap(), 4);
        let x = Tensor::randn(0f32, 1.0, (8, 8, 6), &candle_core::Device::Cpu).unwrap();
        let all = att.forward_in_groups(&x, Some(&mask), usize::MAX).unwrap();
        for budget in [1, 2 * 8 * 8 * 4 * 3] {
            let grouped = att.forward_in_groups(&x, Some(&mask), budget).unwrap();
            let d = (&all - &grouped)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-6, "budget {budget}: {d}");
        }
        let plain = att.forward_in_groups(&x, None, usize::MAX).unwrap();
        let grouped = att.forward_in_groups(&x, None, 1).unwrap();
        let d = (&plain - &grouped)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
