//! The text-driven head of the Universal Model (`model/Universal_model.py` of the official
//! repository): for each class k, the *controller* maps `[GAP(deep) ‖ e_k]` (the image vector,
//! then the class's 256-d task encoding) to 153 numbers, the weights and biases of a tiny
//! 8→8→8→1 network that the *dynamic head* applies at every voxel of the 8-channel
//! `precls_conv` features. The number of classes is the number of embedding rows, so a new
//! class is a new row.
//!
//! Keys: `precls_conv.{0,2}.*` (GroupNorm, 1×1×1 conv to 8 channels), `GAP.{0,3}.*` (GroupNorm,
//! 1×1×1 conv to 256), `controller.*` (a 1×1×1 conv 512 → 153, used as a matmul),
//! `organ_embedding` (word mode: a `(K, 512)` buffer of CLIP embeddings) with
//! `text_to_vision.*` (Linear 512 → 256), or `organ_embedding.weight` (learned `(K, 256)`).

use candle_core::{D, DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::layers::{Conv3d, Conv3dConfig, GroupNorm, NormConfig};
use crate::ops::{Act, adaptive_avg_pool3d_1};

pub use crate::ops::head::{HEAD_CHANNELS, HEAD_PARAMS};

/// Size of a CLIP ViT-B/32 text embedding.
pub const TEXT_DIM: usize = 512;
/// Size of the image vector and of the task encoding.
pub const HIDDEN: usize = 256;

/// How classes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// CLIP text embeddings `(K, 512)` in the buffer `organ_embedding`, projected by
    /// `text_to_vision` (Linear 512→256) and a ReLU (the released models).
    WordEmbedding,
    /// Learned task encodings `organ_embedding.weight` `(K, 256)`, used as they are.
    RandEmbedding,
}

impl Encoding {
    /// The width of one class embedding row.
    pub fn row_width(self) -> usize {
        match self {
            Encoding::WordEmbedding => TEXT_DIM,
            Encoding::RandEmbedding => HIDDEN,
        }
    }
}

/// `GroupNorm(16, C)` in the official model; `gcd(16, C)` keeps reduced test widths valid and
/// equals 16 for every official width.
fn groups_for(channels: usize) -> usize {
    let (mut a, mut b) = (16usize, channels);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// What the controller makes of one deep map.
#[derive(Debug, Clone)]
pub struct ControllerOutput {
    /// `GAP(deep)` `(B, 256)`.
    pub gap: Tensor,
    /// Task encodings `(K, 256)`.
    pub task_encoding: Tensor,
    /// The dynamic head's parameters `(B, K, 153)`.
    pub params: Tensor,
}

/// The controller, the class embeddings and the feature projection of the dynamic head.
#[derive(Debug, Clone)]
pub struct UniversalHead {
    encoding: Encoding,
    precls_norm: GroupNorm,
    precls_conv: Conv3d,
    gap_norm: GroupNorm,
    gap_conv: Conv3d,
    controller_w: Tensor,
    controller_b: Tensor,
    organ_embedding: Tensor,
    text_to_vision: Option<candle_nn::Linear>,
}

impl UniversalHead {
    /// Loads the head for a backbone whose decoder map has `c_dec` channels and whose deep map
    /// has `c_deep`, with `num_classes` embedding rows.
    ///
    /// # Errors
    /// Missing or mis-shaped weights.
    pub fn new(
        vb: VarBuilder,
        c_dec: usize,
        c_deep: usize,
        encoding: Encoding,
        num_classes: usize,
    ) -> Result<Self> {
        let precls = vb.pp("precls_conv");
        let gap = vb.pp("GAP");
        let controller = vb.pp("controller");
        let bound = 1.0 / (TEXT_DIM as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let randn = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let (organ_embedding, text_to_vision) = match encoding {
            Encoding::WordEmbedding => (
                vb.get_with_hints((num_classes, TEXT_DIM), "organ_embedding", randn)?,
                Some(candle_nn::linear(
                    TEXT_DIM,
                    HIDDEN,
                    vb.pp("text_to_vision"),
                )?),
            ),
            Encoding::RandEmbedding => (
                vb.pp("organ_embedding")
                    .get_with_hints((num_classes, HIDDEN), "weight", randn)?,
                None,
            ),
        };
        let one = Conv3dConfig::default();
        let norm = NormConfig::default();
        Ok(UniversalHead {
            encoding,
            precls_norm: GroupNorm::load(precls.pp(0), groups_for(c_dec), c_dec, norm)?,
            precls_conv: Conv3d::load(precls.pp(2), c_dec, HEAD_CHANNELS, 1, one)?,
            gap_norm: GroupNorm::load(gap.pp(0), groups_for(c_deep), c_deep, norm)?,
            gap_conv: Conv3d::load(gap.pp(3), c_deep, HIDDEN, 1, one)?,
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

    /// The number of classes (embedding rows).
    pub fn num_classes(&self) -> usize {
        self.organ_embedding.dim(0).unwrap_or(0)
    }

    /// The class embeddings in use: `(K, 512)` CLIP rows (word mode) or `(K, 256)` learned rows.
    pub fn class_embeddings(&self) -> &Tensor {
        &self.organ_embedding
    }

    /// Replaces the class embeddings (rows of [`Encoding::row_width`]).
    ///
    /// # Errors
    /// A wrong embedding width, or no rows.
    pub fn set_class_embeddings(&mut self, emb: Tensor) -> Result<()> {
        let (k, d) = emb.dims2()?;
        let want = self.encoding.row_width();
        if d != want || k == 0 {
            return Err(Error::shape(
                "class embeddings",
                format!("got ({k}, {d}), expected (K, {want})"),
            ));
        }
        self.organ_embedding = emb
            .to_dtype(DType::F32)?
            .to_device(self.organ_embedding.device())?;
        Ok(())
    }

    /// Keeps only the embedding rows `rows` (0-based), in that order.
    ///
    /// # Errors
    /// A row out of range.
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        let idx = Tensor::from_vec(rows.to_vec(), rows.len(), self.organ_embedding.device())?;
        self.organ_embedding = self.organ_embedding.index_select(&idx, 0)?;
        Ok(())
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

    /// The controller on a deep map `(B, C_deep, d, h, w)`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn controller(&self, deep: &Tensor) -> Result<ControllerOutput> {
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
        Ok(ControllerOutput {
            gap,
            task_encoding: task,
            params,
        })
    }

    /// `precls_conv(decoder)`: the 8-channel features the dynamic head reads.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn features(&self, decoder: &Tensor) -> Result<Tensor> {
        let f = self.precls_norm.forward_act(decoder, Act::Relu)?;
        Ok(self.precls_conv.forward(&f)?)
    }

    /// [`features`](Self::features) of a decoder map the caller owns alone: at inference it
    /// is normalised in place, and released once the convolution has read it.
    pub(crate) fn features_owned(&self, decoder: Tensor) -> Result<Tensor> {
        let f = self.precls_norm.forward_act_owned(decoder, Act::Relu)?;
        Ok(self.precls_conv.forward(&f)?)
    }
}
