//! The training configuration (`train.toml`).
//!
//! ```toml
//! [model]
//! backbone = "unet"        # "unet" or "swinunetr"
//! width = 32               # U-Net base width (32 official) or Swin feature size (48 official)
//! encoding = "learned"     # "learned" (rand_embedding) or "clip" (needs `embeddings`)
//! classes = 32             # output channels = embedding rows
//! # embeddings = "txt_encoding.safetensors"   # clip mode: (K, 512) rows
//! # init = "start.safetensors"               # start from these weights
//! # class_names = { 33 = "Bone Lesion" }     # names of classes beyond the 32 (or renamed)
//!
//! [data]
//! manifest = "datasets.toml"
//! cache = "cache"          # prepared cases
//! roi = [96, 96, 96]
//! num_samples = 2          # patches per case
//! cases_per_step = 1
//! sampling = "cases"       # or "uniform_datasets"
//! workers = 2              # loader threads
//!
//! [train]
//! output = "runs/demo"
//! steps = 1000             # or: epochs = 400
//! lr = 1e-4
//! weight_decay = 1e-5
//! warmup = 100             # in schedule units
//! schedule_unit = "epoch"  # the official loop steps the schedule once per epoch; or "step"
//! # schedule_length = 2000 # defaults to the run's length in schedule units
//! accumulate = 1           # micro-batches per optimiser step
//! dice = "per_slice"       # or "per_volume"
//! seed = 0
//! checkpoint_every = 100   # steps
//! validate_every = 10      # epochs (0: never)
//! freeze_backbone = false
//! # trainable = ["organ_embedding"]   # only variables with these name prefixes
//! ```
//! Relative paths start at the configuration file's folder.

use std::path::{Path, PathBuf};

use crate::data::loader::Sampling;
use crate::error::{Error, Result};
use crate::loss::DiceMode;

/// `[model]`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `unet` or `swinunetr`.
    #[serde(default = "default_backbone")]
    pub backbone: String,
    /// U-Net base width or Swin feature size.
    #[serde(default)]
    pub width: Option<usize>,
    /// `learned` or `clip`.
    #[serde(default = "default_encoding")]
    pub encoding: String,
    /// Output channels.
    #[serde(default = "default_classes")]
    pub classes: usize,
    /// CLIP class embeddings `(K, 512)` (clip mode).
    #[serde(default)]
    pub embeddings: Option<PathBuf>,
    /// Initial weights.
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// Names of classes by id (`class_names = { 33 = "Bone Lesion" }`), for classes beyond the
    /// 32 universal ones or to rename one; written into the checkpoints (`univ.classes`) so
    /// that `univ segment --classes` knows them.
    #[serde(default)]
    pub class_names: std::collections::BTreeMap<String, String>,
}

impl ModelSection {
    /// The configured class names as `(id, name)`, ids checked against the class count.
    ///
    /// # Errors
    /// A message for a key that is not an id of the model, or an empty name.
    pub fn class_names(&self) -> std::result::Result<Vec<(usize, String)>, String> {
        self.class_names
            .iter()
            .map(|(k, v)| match k.trim().parse::<usize>() {
                Ok(id) if (1..=self.classes).contains(&id) && !v.trim().is_empty() => {
                    Ok((id, v.trim().to_string()))
                }
                _ => Err(format!(
                    "model.class_names: {k:?} = {v:?}: keys must be class ids in 1..={} and \
                     names non-empty",
                    self.classes
                )),
            })
            .collect()
    }
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The dataset manifest.
    pub manifest: PathBuf,
    /// Cache folder for prepared cases.
    #[serde(default)]
    pub cache: Option<PathBuf>,
    /// Patch size.
    #[serde(default = "default_roi")]
    pub roi: [usize; 3],
    /// Patches per case.
    #[serde(default = "default_num_samples")]
    pub num_samples: usize,
    /// Cases per micro-batch.
    #[serde(default = "one")]
    pub cases_per_step: usize,
    /// How cases are chosen.
    #[serde(default)]
    pub sampling: Sampling,
    /// Loader threads.
    #[serde(default = "default_workers")]
    pub workers: usize,
}

/// When the schedule advances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleUnit {
    /// Once per epoch, before it (the official loop).
    #[default]
    Epoch,
    /// Once per optimiser step.
    Step,
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Output folder (checkpoints, logs, curves).
    pub output: PathBuf,
    /// Optimiser steps in all.
    #[serde(default)]
    pub steps: Option<u64>,
    /// Epochs in all (instead of steps).
    #[serde(default)]
    pub epochs: Option<u64>,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// AdamW weight decay.
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// Warm-up length in schedule units.
    #[serde(default)]
    pub warmup: u64,
    /// Schedule unit.
    #[serde(default)]
    pub schedule_unit: ScheduleUnit,
    /// Schedule length in schedule units (default: the run's length).
    #[serde(default)]
    pub schedule_length: Option<u64>,
    /// Micro-batches per optimiser step.
    #[serde(default = "one")]
    pub accumulate: usize,
    /// Dice variant.
    #[serde(default = "default_dice")]
    pub dice: String,
    /// Seed.
    #[serde(default)]
    pub seed: u64,
    /// Checkpoint period in steps (0: only at the end).
    #[serde(default = "default_ckpt")]
    pub checkpoint_every: u64,
    /// Validation period in epochs (0: never).
    #[serde(default)]
    pub validate_every: u64,
    /// Train only the head (controller, class encodings, `precls_conv`, `GAP`).
    #[serde(default)]
    pub freeze_backbone: bool,
    /// Train only the variables whose names start with one of these prefixes (empty: all),
    /// e.g. `["organ_embedding"]` to teach new classes through their encodings alone.
    #[serde(default)]
    pub trainable: Vec<String>,
    /// Where to train: `"cpu"` (the default), `"cuda"` or `"cuda:N"` (a build with the `cuda`
    /// feature); `univ train --device` overrides it.
    #[serde(default)]
    pub device: Option<String>,
}

fn default_backbone() -> String {
    "unet".into()
}
fn default_encoding() -> String {
    "learned".into()
}
fn default_classes() -> usize {
    32
}
fn default_roi() -> [usize; 3] {
    [96; 3]
}
fn default_num_samples() -> usize {
    2
}
fn one() -> usize {
    1
}
fn default_workers() -> usize {
    2
}
fn default_lr() -> f64 {
    1e-4
}
fn default_wd() -> f64 {
    1e-5
}
fn default_dice() -> String {
    "per_slice".into()
}
fn default_ckpt() -> u64 {
    100
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `[model]`.
    pub model: ModelSection,
    /// `[data]`.
    pub data: DataSection,
    /// `[train]`.
    pub train: TrainSection,
    /// The file it came from (not part of the TOML).
    #[serde(skip)]
    pub path: PathBuf,
}

impl TrainConfig {
    /// Reads a configuration file; relative paths are made relative to its folder.
    ///
    /// # Errors
    /// [`Error::Config`] naming the file and the problem.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
        Self::parse(&text, &base, path)
    }

    /// Parses configuration text with relative paths resolved against `base`.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn parse(text: &str, base: &Path, path: &Path) -> Result<Self> {
        let mut cfg: TrainConfig =
            toml::from_str(text).map_err(|e| Error::config(path, e.to_string()))?;
        cfg.path = path.to_path_buf();
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut cfg.data.manifest);
        if let Some(c) = cfg.data.cache.as_mut() {
            fix(c);
        }
        fix(&mut cfg.train.output);
        if let Some(p) = cfg.model.embeddings.as_mut() {
            fix(p);
        }
        if let Some(p) = cfg.model.init.as_mut() {
            fix(p);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`Error::Config`] for the first invalid value.
    pub fn validate(&self) -> Result<()> {
        let bad = |r: String| Err(Error::config(&self.path, r));
        if !["unet", "swinunetr"].contains(&self.model.backbone.as_str()) {
            return bad(format!(
                "model.backbone {:?}: use unet or swinunetr",
                self.model.backbone
            ));
        }
        if !["learned", "clip"].contains(&self.model.encoding.as_str()) {
            return bad(format!(
                "model.encoding {:?}: use learned or clip",
                self.model.encoding
            ));
        }
        if self.model.encoding == "clip"
            && self.model.embeddings.is_none()
            && self.model.init.is_none()
        {
            return bad(
                "model.encoding = clip needs model.embeddings (or init weights that hold them)"
                    .into(),
            );
        }
        if self.model.classes == 0 || self.model.classes > 255 {
            return bad(format!(
                "model.classes {} must be in 1..=255",
                self.model.classes
            ));
        }
        if self.data.roi.iter().any(|r| *r == 0 || r % 8 != 0) {
            return bad(format!(
                "data.roi {:?}: each side must be a positive multiple of 8",
                self.data.roi
            ));
        }
        if self.data.num_samples == 0 || self.data.cases_per_step == 0 || self.train.accumulate == 0
        {
            return bad("num_samples, cases_per_step and accumulate must be at least 1".into());
        }
        // One micro-batch of patches with its targets (f32 image + one channel per class)
        // must fit the default limits before anything is allocated.
        let batch = self
            .data
            .num_samples
            .saturating_mul(self.data.cases_per_step);
        let r = self.data.roi;
        if let Err(e) = univ_io::Limits::default().check_grid(
            "a batch of data.roi patches",
            [r[0].saturating_mul(batch), r[1], r[2]],
            4 * (self.model.classes + 1),
        ) {
            return bad(format!(
                "data.roi {r:?} × {batch} patch(es) per step is too large: {e}; use smaller \
                 patches (96³ is the official size)"
            ));
        }
        match (self.train.steps, self.train.epochs) {
            (Some(0), _) | (_, Some(0)) => return bad("train.steps/epochs must be positive".into()),
            (Some(_), Some(_)) => return bad("give train.steps or train.epochs, not both".into()),
            (None, None) => return bad("give train.steps or train.epochs".into()),
            _ => {}
        }
        if !(self.train.lr > 0.0 && self.train.lr.is_finite()) || self.train.weight_decay < 0.0 {
            return bad("train.lr must be positive and weight_decay non-negative".into());
        }
        self.model
            .class_names()
            .map_err(|e| Error::config(&self.path, e))?;
        self.dice_mode()?;
        Ok(())
    }

    /// The Dice variant.
    ///
    /// # Errors
    /// An unknown name.
    pub fn dice_mode(&self) -> Result<DiceMode> {
        match self.train.dice.as_str() {
            "per_slice" => Ok(DiceMode::PerSlice),
            "per_volume" => Ok(DiceMode::PerVolume),
            other => Err(Error::config(
                &self.path,
                format!("train.dice {other:?}: use per_slice or per_volume"),
            )),
        }
    }
}
