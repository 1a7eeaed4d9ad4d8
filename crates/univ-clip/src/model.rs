//! The CLIP text transformer with its projection: OpenAI's `encode_text`, in candle.
//!
//! Pre-norm transformer with a causal mask over token embeddings plus learned positions; the
//! final LayerNorm; the hidden state at the end token (the argmax of the ids, since 49407 is the
//! largest id) projected by `text_projection` without bias or normalisation. Keys are Hugging
//! Face's (`text_model.*`, `text_projection.weight`).

use std::path::Path;

use candle_core::{D, DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use crate::error::{Error, Result};

/// The activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x · sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// The exact GELU.
    Gelu,
}

/// Text tower hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ClipTextConfig {
    /// Vocabulary size (49,408).
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Context length (77).
    pub max_position_embeddings: usize,
    /// Output (projection) width.
    pub projection_dim: usize,
    /// MLP activation.
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_act() -> Activation {
    Activation::QuickGelu
}

fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// ViT-B/32's text tower: 512 wide, 12 layers, 8 heads, 512-d output.
    pub fn vit_b_32() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            projection_dim: 512,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }

    /// ViT-L/14's text tower: 768 wide, 12 layers, 12 heads, 768-d output.
    pub fn vit_l_14() -> Self {
        ClipTextConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_attention_heads: 12,
            projection_dim: 768,
            ..Self::vit_b_32()
        }
    }

    /// Reads a Hugging Face `config.json`: a text config (`CLIPTextConfig`), or a full
    /// `CLIPConfig` whose `text_config` it takes (with the top-level `projection_dim`).
    ///
    /// # Errors
    /// [`Error::File`] for an unreadable or incomplete file.
    pub fn from_hf_config(path: impl AsRef<Path>) -> Result<Self> {
        let p = path.as_ref();
        let text = std::fs::read_to_string(p).map_err(|e| Error::file(p, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(p, e))?;
        let mut tc = v.get("text_config").cloned().unwrap_or_else(|| v.clone());
        if tc.get("projection_dim").is_none()
            && let Some(pd) = v.get("projection_dim")
        {
            tc["projection_dim"] = pd.clone();
        }
        let cfg: ClipTextConfig = serde_json::from_value(tc)
            .map_err(|e| Error::file(p, format!("not a CLIP text config: {e}")))?;
        cfg.validate().map_err(|e| Error::file(p, e))?;
        Ok(cfg)
    }

    /// Checks that the sizes are consistent.
    ///
    /// # Errors
    /// [`Error::Invalid`] describing the problem.
    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Invalid(format!(
                "hidden size {} is not divisible by {} heads",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Layer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// Everything one forward pass gives.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `(N, L, hidden)` after the final LayerNorm.
    pub last_hidden_state: Tensor,
    /// `(N, hidden)` at the end token.
    pub pooled: Tensor,
    /// `(N, projection_dim)`: `pooled · text_projectionᵀ`, OpenAI's `encode_text`.
    pub text_embeds: Tensor,
}

/// The CLIP text encoder with its projection.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    cfg: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    projection: Linear,
}

impl ClipTextModel {
    /// Builds the model from a var builder at the checkpoint's top level.
    ///
    /// # Errors
    /// Missing or mis-shaped weights.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let ln = |vb: VarBuilder| candle_nn::layer_norm(h, cfg.layer_norm_eps, vb);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = tm.pp("encoder").pp("layers").pp(i);
                let a = l.pp("self_attn");
                Ok(Layer {
                    ln1: ln(l.pp("layer_norm1"))?,
                    q: candle_nn::linear(h, h, a.pp("q_proj"))?,
                    k: candle_nn::linear(h, h, a.pp("k_proj"))?,
                    v: candle_nn::linear(h, h, a.pp("v_proj"))?,
                    out: candle_nn::linear(h, h, a.pp("out_proj"))?,
                    ln2: ln(l.pp("layer_norm2"))?,
                    fc1: candle_nn::linear(h, cfg.intermediate_size, l.pp("mlp").pp("fc1"))?,
                    fc2: candle_nn::linear(cfg.intermediate_size, h, l.pp("mlp").pp("fc2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipTextModel {
            cfg: cfg.clone(),
            token_embedding: candle_nn::embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?,
            position_embedding: emb
                .pp("position_embedding")
                .get((cfg.max_position_embeddings, h), "weight")?,
            layers,
            final_ln: ln(tm.pp("final_layer_norm"))?,
            projection: candle_nn::linear_no_bias(h, cfg.projection_dim, vb.pp("text_projection"))?,
        })
    }

    /// Loads `config.json` and the safetensors weights (`model.safetensors`, or every
    /// `*.safetensors` file) from a folder.
    ///
    /// # Errors
    /// [`Error::File`] for missing files, [`Error::Weights`] for weights that do not fit.
    pub fn from_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let d = dir.as_ref();
        let cfg = ClipTextConfig::from_hf_config(d.join("config.json"))?;
        let mut files: Vec<_> = std::fs::read_dir(d)
            .map_err(|e| Error::file(d, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::file(d, "no .safetensors weights"));
        }
        Self::from_safetensors(&files, &cfg, device)
    }

    /// Loads weights from safetensors files.
    ///
    /// # Errors
    /// [`Error::Weights`] naming the missing or mis-shaped tensor.
    pub fn from_safetensors(
        files: &[impl AsRef<Path>],
        cfg: &ClipTextConfig,
        device: &Device,
    ) -> Result<Self> {
        let first = files
            .first()
            .map(|p| p.as_ref().to_path_buf())
            .unwrap_or_default();
        // SAFETY: the files are memory-mapped read-only and not modified while in use.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, DType::F32, device) }
            .map_err(|e| Error::file(&first, e))?;
        Self::new(vb, cfg).map_err(|e| match e {
            Error::Candle(c) => Error::Weights {
                path: first,
                reason: c.to_string(),
            },
            other => other,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn token_device(&self) -> &Device {
        self.position_embedding.device()
    }

    /// Runs the encoder.
    ///
    /// # Shapes
    /// `ids`: `(N, L)` integer token ids with `L` ≤ the context → hidden `(N, L, H)`, pooled
    /// `(N, H)`, embeddings `(N, P)`.
    ///
    /// # Errors
    /// Ids longer than the context, or tensor errors.
    pub fn forward(&self, ids: &Tensor) -> Result<ClipTextOutput> {
        let (n, l) = ids.dims2()?;
        if l > self.cfg.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "{l} tokens, more than the {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let ids = ids.to_dtype(DType::U32)?;
        let mut x = self
            .token_embedding
            .forward(&ids)?
            .broadcast_add(&self.position_embedding.narrow(0, 0, l)?)?;
        let heads = self.cfg.num_attention_heads;
        let hd = self.cfg.hidden_size / heads;
        let mask: Vec<f32> = (0..l)
            .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (l, l), ids.device())?;
        for layer in &self.layers {
            let h = layer.ln1.forward(&x)?;
            let split = |t: Tensor| -> candle_core::Result<Tensor> {
                t.reshape((n, l, heads, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = split((layer.q.forward(&h)? * (hd as f64).powf(-0.5))?)?;
            let k = split(layer.k.forward(&h)?)?;
            let v = split(layer.v.forward(&h)?)?;
            let att = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            let o = att
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((n, l, self.cfg.hidden_size))?;
            x = (x + layer.out.forward(&o)?)?;
            let h = layer.fc1.forward(&layer.ln2.forward(&x)?)?;
            let h = match self.cfg.hidden_act {
                Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
                Activation::Gelu => h.gelu_erf()?,
            };
            x = (x + layer.fc2.forward(&h)?)?;
        }
        let last = self.final_ln.forward(&x)?;
        // End token = the largest id (first occurrence), as OpenAI pools.
        let eot = ids.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let pooled = Tensor::stack(
            &eot.iter()
                .enumerate()
                .map(|(i, p)| last.i((i, *p as usize)))
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        let text_embeds = self.projection.forward(&pooled)?;
        Ok(ClipTextOutput {
            last_hidden_state: last,
            pooled,
            text_embeds,
        })
    }

    /// OpenAI's `encode_text`: `(N, L)` ids → `(N, projection_dim)` embeddings.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn encode_text(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward(ids)?.text_embeds)
    }
}
