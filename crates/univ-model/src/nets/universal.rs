//! The Universal Model: a backbone, the text-driven controller and the per-class dynamic head
//! (`model/Universal_model.py` of ljwztc/CLIP-Driven-Universal-Model @ 43c1239; spec §1.1–1.2).
//!
//! For each class k, the controller maps `[GAP(deep) ‖ e_k]` (image vector first, then the
//! class's 256-d task encoding) to 153 numbers: the weights and biases of a tiny 8→8→8→1 head
//! applied at every voxel of the 8-channel `precls_conv` features. The number of classes is the
//! number of embedding rows, so a new class is a new row.

use candle_core::{D, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::layers::{Act, Conv3d, GroupNorm, adaptive_avg_pool3d_1};
use crate::nets::swin_unetr::{SwinUnetr, SwinUnetrConfig};
use crate::nets::unet::{Unet3d, UnetConfig};

/// Size of a CLIP ViT-B/32 text embedding.
pub const TEXT_DIM: usize = 512;
/// Size of the image vector and of the task encoding.
pub const HIDDEN: usize = 256;
/// Parameters per class: 8·8 + 8·8 + 8·1 weights, then 8 + 8 + 1 biases.
pub const HEAD_PARAMS: usize = 153;
/// Channels of the features the dynamic head reads.
pub const HEAD_CHANNELS: usize = 8;

/// Which backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackboneConfig {
    /// Models Genesis UNet3D.
    Unet(UnetConfig),
    /// Swin UNETR.
    SwinUnetr(SwinUnetrConfig),
}

impl BackboneConfig {
    /// Channels of the deep map.
    pub fn deep_channels(&self) -> usize {
        match self {
            BackboneConfig::Unet(c) => c.deep_channels(),
            BackboneConfig::SwinUnetr(c) => c.deep_channels(),
        }
    }

    /// Channels of the decoder map.
    pub fn decoder_channels(&self) -> usize {
        match self {
            BackboneConfig::Unet(c) => c.decoder_channels(),
            BackboneConfig::SwinUnetr(c) => c.decoder_channels(),
        }
    }

    /// A short name (`"unet"`, `"swinunetr"`).
    pub fn name(&self) -> &'static str {
        match self {
            BackboneConfig::Unet(_) => "unet",
            BackboneConfig::SwinUnetr(_) => "swinunetr",
        }
    }
}

/// How classes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// CLIP text embeddings `(K, 512)` in the buffer `organ_embedding`, projected by
    /// `text_to_vision` (Linear 512→256) and a ReLU (the released models).
    WordEmbedding,
    /// Learned task encodings `organ_embedding.weight` `(K, 256)`, used as they are.
    RandEmbedding,
}

/// The whole model's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UniversalConfig {
    /// The backbone.
    pub backbone: BackboneConfig,
    /// The class encoding.
    pub encoding: Encoding,
    /// Number of classes (embedding rows): 32 for the released models.
    pub num_classes: usize,
}

impl UniversalConfig {
    /// The released Swin UNETR model (feature size 48, word embeddings, 32 classes).
    pub fn universal_swin_unetr() -> Self {
        UniversalConfig {
            backbone: BackboneConfig::SwinUnetr(SwinUnetrConfig::universal_model()),
            encoding: Encoding::WordEmbedding,
            num_classes: 32,
        }
    }

    /// The released U-Net model (base 32, word embeddings, 32 classes).
    pub fn universal_unet() -> Self {
        UniversalConfig {
            backbone: BackboneConfig::Unet(UnetConfig::universal_model()),
            encoding: Encoding::WordEmbedding,
            num_classes: 32,
        }
    }
}

fn groups_for(channels: usize) -> usize {
    // GroupNorm(16, C) in the official model; gcd(16, C) keeps reduced test widths valid and
    // equals 16 for every official width.
    let (mut a, mut b) = (16usize, channels);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The backbone network of a [`UniversalModel`].
#[derive(Debug, Clone)]
pub enum Backbone {
    /// Models Genesis UNet3D.
    Unet(Box<Unet3d>),
    /// Swin UNETR.
    SwinUnetr(Box<SwinUnetr>),
}

impl Backbone {
    /// Runs the backbone: `(deep, decoder)` maps.
    ///
    /// # Errors
    /// Input shape and tensor errors.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            Backbone::Unet(n) => n.forward(x),
            Backbone::SwinUnetr(n) => n.forward(x),
        }
    }
}

/// Intermediate tensors of one forward pass (for parity checks and inspection).
#[derive(Debug, Clone)]
pub struct ForwardParts {
    /// The backbone's deep map `(B, C_deep, d, h, w)`.
    pub deep: Tensor,
    /// The backbone's decoder map `(B, C_dec, D, H, W)`.
    pub decoder: Tensor,
    /// `GAP(deep)` `(B, 256)`.
    pub gap: Tensor,
    /// Task encodings `(K, 256)`.
    pub task_encoding: Tensor,
    /// Controller output `(B, K, 153)`.
    pub controller_params: Tensor,
    /// `precls_conv(decoder)` `(B, 8, D, H, W)`.
    pub precls: Tensor,
    /// Logits `(B, K, D, H, W)`.
    pub logits: Tensor,
}

/// The CLIP-Driven Universal Model.
#[derive(Debug, Clone)]
pub struct UniversalModel {
    cfg: UniversalConfig,
    backbone: Backbone,
    precls_norm: GroupNorm,
    precls_conv: Conv3d,
    gap_norm: GroupNorm,
    gap_conv: Conv3d,
    controller_w: Tensor,
    controller_b: Tensor,
    organ_embedding: Tensor,
    text_to_vision: Option<candle_nn::Linear>,
}

impl UniversalModel {
    /// Builds the model from a var builder rooted at the checkpoint's top level (keys
    /// `backbone.*`, `precls_conv.*`, `GAP.*`, `controller.*`, `organ_embedding`,
    /// `text_to_vision.*`).
    ///
    /// # Errors
    /// Missing or mis-shaped weights, or an invalid configuration.
    pub fn new(vb: VarBuilder, cfg: UniversalConfig) -> Result<Self> {
        if cfg.num_classes == 0 {
            return Err(Error::Config("at least one class is needed".into()));
        }
        let backbone = match cfg.backbone {
            BackboneConfig::Unet(c) => Backbone::Unet(Box::new(Unet3d::new(vb.pp("backbone"), c)?)),
            BackboneConfig::SwinUnetr(c) => {
                Backbone::SwinUnetr(Box::new(SwinUnetr::new(vb.pp("backbone"), c)?))
            }
        };
        let c_dec = cfg.backbone.decoder_channels();
        let c_deep = cfg.backbone.deep_channels();
        let precls = vb.pp("precls_conv");
        let gap = vb.pp("GAP");
        let controller = vb.pp("controller");
        let bound = 1.0 / (TEXT_DIM as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let (organ_embedding, text_to_vision) = match cfg.encoding {
            Encoding::WordEmbedding => (
                vb.get_with_hints(
                    (cfg.num_classes, TEXT_DIM),
                    "organ_embedding",
                    candle_nn::Init::Randn {
                        mean: 0.0,
                        stdev: 1.0,
                    },
                )?,
                Some(candle_nn::linear(
                    TEXT_DIM,
                    HIDDEN,
                    vb.pp("text_to_vision"),
                )?),
            ),
            Encoding::RandEmbedding => (
                vb.pp("organ_embedding").get_with_hints(
                    (cfg.num_classes, HIDDEN),
                    "weight",
                    candle_nn::Init::Randn {
                        mean: 0.0,
                        stdev: 1.0,
                    },
                )?,
                None,
            ),
        };
        Ok(UniversalModel {
            cfg,
            backbone,
            precls_norm: GroupNorm::load(precls.pp(0), groups_for(c_dec), c_dec, 1e-5)?,
            precls_conv: Conv3d::load(precls.pp(2), c_dec, HEAD_CHANNELS, 1, 0, 1, true)?,
            gap_norm: GroupNorm::load(gap.pp(0), groups_for(c_deep), c_deep, 1e-5)?,
            gap_conv: Conv3d::load(gap.pp(3), c_deep, HIDDEN, 1, 0, 1, true)?,
            controller_w: controller.get_with_hints(
                (HEAD_PARAMS, 2 * HIDDEN, 1, 1, 1),
                "weight",
                init,
            )?,
            controller_b: controller.get_with_hints(HEAD_PARAMS, "bias", init)?,
            organ_embedding,
            text_to_vision,
        })
    }

    /// The configuration.
    pub fn config(&self) -> UniversalConfig {
        self.cfg
    }

    /// The backbone.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// The class embeddings in use: `(K, 512)` CLIP rows (word mode) or `(K, 256)` learned rows.
    pub fn class_embeddings(&self) -> &Tensor {
        &self.organ_embedding
    }

    /// Replaces the class embeddings (word mode: `(K', 512)` CLIP rows), changing the number
    /// of classes: a new class is a new row.
    ///
    /// # Errors
    /// A wrong embedding width.
    pub fn with_class_embeddings(mut self, emb: Tensor) -> Result<Self> {
        let (k, d) = emb.dims2()?;
        let want = match self.cfg.encoding {
            Encoding::WordEmbedding => TEXT_DIM,
            Encoding::RandEmbedding => HIDDEN,
        };
        if d != want || k == 0 {
            return Err(Error::shape(
                "class embeddings",
                format!("got ({k}, {d}), expected (K, {want})"),
            ));
        }
        self.organ_embedding = emb
            .to_dtype(candle_core::DType::F32)?
            .to_device(self.organ_embedding.device())?;
        self.cfg.num_classes = k;
        Ok(self)
    }

    /// A model that computes only some classes: `classes` are 1-based rows of the current
    /// embeddings, in the order wanted. The head then runs for those classes only.
    ///
    /// # Errors
    /// An empty list or a class out of range.
    pub fn select_classes(&self, classes: &[usize]) -> Result<Self> {
        let k = self.organ_embedding.dim(0)?;
        if classes.is_empty() || classes.iter().any(|c| *c == 0 || *c > k) {
            return Err(Error::Config(format!(
                "classes {classes:?} must be in 1..={k}"
            )));
        }
        let idx: Vec<u32> = classes.iter().map(|c| (*c - 1) as u32).collect();
        let idx = Tensor::from_vec(idx, classes.len(), self.organ_embedding.device())?;
        let mut out = self.clone();
        out.organ_embedding = self.organ_embedding.index_select(&idx, 0)?;
        out.cfg.num_classes = classes.len();
        Ok(out)
    }

    /// Task encodings `(K, 256)`: `ReLU(text_to_vision(E))` in word mode, `E` in rand mode.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn task_encoding(&self) -> Result<Tensor> {
        Ok(match &self.text_to_vision {
            Some(l) => l.forward(&self.organ_embedding)?.relu()?,
            None => self.organ_embedding.clone(),
        })
    }

    /// Runs the model and returns the logits.
    ///
    /// # Shapes
    /// `x`: `(B, 1, D, H, W)` → `(B, K, D, H, W)` raw logits (apply a sigmoid for
    /// probabilities).
    ///
    /// # Errors
    /// Input shape errors (see the backbone) and tensor errors.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The lean path: each intermediate is released as soon as the next one exists, and the
        // decoder map is normalised in place (it is ours alone).
        let (deep, decoder) = self.backbone.forward(x)?;
        let (_, _, params) = self.controller(&deep)?;
        drop(deep);
        let f = self.precls_norm.forward_act_owned(decoder, Act::Relu)?;
        let precls = self.precls_conv.forward(&f)?;
        drop(f);
        dynamic_head(&precls, &params)
    }

    /// `(GAP(deep), task encoding, controller parameters (B, K, 153))`.
    fn controller(&self, deep: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let b = deep.dim(0)?;
        let k = self.organ_embedding.dim(0)?;
        // Image vector per sample.
        let g = self.gap_norm.forward_act(deep, Act::Relu)?;
        let g = self.gap_conv.forward(&adaptive_avg_pool3d_1(&g)?)?;
        let gap = g.flatten_from(1)?; // (B, 256)
        let task = self.task_encoding()?; // (K, 256)
        // Controller on [g_b repeated K ‖ e_k]: (B, K, 512) · (512, 153).
        let g_rep = gap.unsqueeze(1)?.broadcast_as((b, k, HIDDEN))?;
        let t_rep = task.unsqueeze(0)?.broadcast_as((b, k, HIDDEN))?;
        let cond = Tensor::cat(&[&g_rep, &t_rep], D::Minus1)?.contiguous()?;
        let wc = self.controller_w.reshape((HEAD_PARAMS, 2 * HIDDEN))?.t()?;
        let params = cond
            .broadcast_matmul(&wc)?
            .broadcast_add(&self.controller_b)?; // (B, K, 153)
        Ok((gap, task, params))
    }

    /// Runs the model and keeps the intermediate tensors.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_parts(&self, x: &Tensor) -> Result<ForwardParts> {
        let (deep, decoder) = self.backbone.forward(x)?;
        let (gap, task, params) = self.controller(&deep)?;
        // Features for the head.
        let f = self.precls_norm.forward_act(&decoder, Act::Relu)?;
        let precls = self.precls_conv.forward(&f)?; // (B, 8, D, H, W)
        let logits = dynamic_head(&precls, &params)?;
        Ok(ForwardParts {
            deep,
            decoder,
            gap,
            task_encoding: task,
            controller_params: params,
            precls,
            logits,
        })
    }
}

/// The per-class 8→8→8→1 head (ReLU after the first two layers, none after the last).
///
/// # Shapes
/// `features`: `(B, 8, D, H, W)`, `params`: `(B, K, 153)` → `(B, K, D, H, W)`.
///
/// # Errors
/// Shape mismatches.
pub fn dynamic_head(features: &Tensor, params: &Tensor) -> Result<Tensor> {
    let (b, c, _, _, _) = features.dims5()?;
    let (pb, _, np) = params.dims3()?;
    if c != HEAD_CHANNELS || pb != b || np != HEAD_PARAMS {
        return Err(Error::shape(
            "dynamic head",
            format!(
                "features {:?} with params {:?}",
                features.dims(),
                params.dims()
            ),
        ));
    }
    if crate::layers::fused::fusable(&[Some(features), Some(params)]) {
        return crate::layers::fused::dynamic_head_cpu(features, params);
    }
    if crate::layers::fused::cpu_f32(&[Some(features), Some(params)]) {
        // Training on the CPU: the backward pass recomputes the hidden layers.
        return Ok(features
            .contiguous()?
            .apply_op2(&params.contiguous()?, crate::layers::train_ops::HeadOp)?);
    }
    dynamic_head_composed(features, params)
}

/// [`dynamic_head`] with candle operations only (any device; keeps the hidden layers for
/// autograd).
///
/// # Errors
/// Shape mismatches.
pub fn dynamic_head_composed(features: &Tensor, params: &Tensor) -> Result<Tensor> {
    let (b, _, d, h, w) = features.dims5()?;
    let (_, k, _) = params.dims3()?;
    let v = d * h * w;
    let mut outs = Vec::with_capacity(b);
    for i in 0..b {
        let p = params.get(i)?; // (K, 153)
        let w1 = p.narrow(1, 0, 64)?.reshape((k, 8, 8))?;
        let w2 = p.narrow(1, 64, 64)?.reshape((k, 8, 8))?;
        let w3 = p.narrow(1, 128, 8)?.reshape((k, 1, 8))?;
        let b1 = p.narrow(1, 136, 8)?.reshape((k, 8, 1))?;
        let b2 = p.narrow(1, 144, 8)?.reshape((k, 8, 1))?;
        let b3 = p.narrow(1, 152, 1)?.reshape((k, 1, 1))?;
        let f = features.get(i)?.reshape((1, HEAD_CHANNELS, v))?;
        let h1 = w1.broadcast_matmul(&f)?.broadcast_add(&b1)?.relu()?; // (K, 8, V)
        let h2 = w2.matmul(&h1)?.broadcast_add(&b2)?.relu()?;
        let out = w3.matmul(&h2)?.broadcast_add(&b3)?; // (K, 1, V)
        outs.push(out.reshape((k, d, h, w))?);
    }
    Ok(Tensor::stack(&outs, 0)?)
}
