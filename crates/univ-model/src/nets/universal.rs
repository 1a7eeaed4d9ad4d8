//! The Universal Model: a backbone (U-Net or Swin UNETR) whose deep map drives the
//! text-driven controller and whose decoder map feeds the dynamic head ([`crate::nets::head`]).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::classes::ClassTable;
use crate::error::{Error, Result};
use crate::nets::head::{Encoding, UniversalHead};
use crate::nets::swin_unetr::{SwinUnetr, SwinUnetrConfig};
use crate::nets::unet::{Unet3d, UnetConfig};
use crate::ops::dynamic_head;

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
    head: UniversalHead,
    classes: ClassTable,
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
        let head = UniversalHead::new(
            vb,
            cfg.backbone.decoder_channels(),
            cfg.backbone.deep_channels(),
            cfg.encoding,
            cfg.num_classes,
        )?;
        Ok(UniversalModel {
            cfg,
            backbone,
            head,
            classes: ClassTable::for_model(cfg.num_classes, None),
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

    /// The controller and dynamic head.
    pub fn head(&self) -> &UniversalHead {
        &self.head
    }

    /// The classes of the output channels, in channel order (the universal classes unless
    /// the checkpoint named others; see [`crate::Checkpoint::class_names`]).
    pub fn classes(&self) -> &ClassTable {
        &self.classes
    }

    /// The model with another class table (one class per embedding row).
    ///
    /// # Errors
    /// [`Error::Config`] when the table has another number of classes.
    pub fn with_class_table(mut self, classes: ClassTable) -> Result<Self> {
        if classes.len() != self.head.num_classes() {
            return Err(Error::Config(format!(
                "{} class names for {} class rows",
                classes.len(),
                self.head.num_classes()
            )));
        }
        self.classes = classes;
        Ok(self)
    }

    /// The class embeddings in use: `(K, 512)` CLIP rows (word mode) or `(K, 256)` learned rows.
    pub fn class_embeddings(&self) -> &Tensor {
        self.head.class_embeddings()
    }

    /// Replaces the class embeddings (word mode: `(K', 512)` CLIP rows), changing the number
    /// of classes: a new class is a new row. The class table keeps the names of the rows that
    /// remain; new rows are named by `names` where given (see [`ClassTable::for_model`]).
    ///
    /// # Errors
    /// A wrong embedding width.
    pub fn with_class_embeddings(mut self, emb: Tensor, names: Option<&[String]>) -> Result<Self> {
        self.head.set_class_embeddings(emb)?;
        let k = self.head.num_classes();
        let mut known: Vec<String> = self.classes.iter().map(|c| c.name.clone()).collect();
        if let Some(n) = names {
            for (i, name) in n.iter().enumerate() {
                match known.get_mut(i) {
                    Some(slot) => *slot = name.clone(),
                    None => known.push(name.clone()),
                }
            }
        }
        known.truncate(k);
        self.classes = ClassTable::for_model(k, Some(&known));
        self.cfg.num_classes = k;
        Ok(self)
    }

    /// A model that computes only some classes: `classes` are 1-based rows of the current
    /// embeddings, in the order wanted. The head then runs for those classes only.
    ///
    /// # Errors
    /// An empty list or a class out of range.
    pub fn select_classes(&self, classes: &[usize]) -> Result<Self> {
        let k = self.head.num_classes();
        if classes.is_empty() || classes.iter().any(|c| *c == 0 || *c > k) {
            return Err(Error::Config(format!(
                "classes {classes:?} must be in 1..={k}"
            )));
        }
        let rows: Vec<usize> = classes.iter().map(|c| *c - 1).collect();
        let mut out = self.clone();
        out.head
            .select_rows(&rows.iter().map(|r| *r as u32).collect::<Vec<_>>())?;
        out.classes = self.classes.select_rows(&rows);
        out.cfg.num_classes = classes.len();
        Ok(out)
    }

    /// Task encodings `(K, 256)`: `ReLU(text_to_vision(E))` in word mode, `E` in rand mode.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn task_encoding(&self) -> Result<Tensor> {
        self.head.task_encoding()
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
        let timer = crate::runtime::stage("backbone");
        let (deep, decoder) = self.backbone.forward(x)?;
        drop(timer);
        let timer = crate::runtime::stage("head/controller");
        let params = self.head.controller(&deep)?.params;
        drop((deep, timer));
        let timer = crate::runtime::stage("head/precls");
        let precls = self.head.features_owned(decoder)?;
        drop(timer);
        let _timer = crate::runtime::stage("head/dynamic");
        dynamic_head(&precls, &params)
    }

    /// Runs the model and keeps the intermediate tensors.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_parts(&self, x: &Tensor) -> Result<ForwardParts> {
        let timer = crate::runtime::stage("backbone");
        let (deep, decoder) = self.backbone.forward(x)?;
        drop(timer);
        let _timer = crate::runtime::stage("text-driven head");
        let c = self.head.controller(&deep)?;
        let precls = self.head.features(&decoder)?; // (B, 8, D, H, W)
        let logits = dynamic_head(&precls, &c.params)?;
        Ok(ForwardParts {
            deep,
            decoder,
            gap: c.gap,
            task_encoding: c.task_encoding,
            controller_params: c.params,
            precls,
            logits,
        })
    }
}
