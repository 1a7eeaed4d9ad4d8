//! The data of a run: the training and validation cases of the manifest, prepared once and
//! cached, and the CLIP class embeddings of the configuration.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use univ_io::PreprocessOptions;

use crate::config::TrainConfig;
use crate::data::case::{CaseCache, PreparedCase};
use crate::data::manifest::{Manifest, Role};
use crate::error::{Error, Result};
use crate::io::load_safetensors;

/// The `(K, 512)` CLIP embeddings of a safetensors file (`embeddings`, or its only tensor),
/// with the class names of its metadata (`names`, as `univ embed` writes them).
pub(super) fn load_embeddings(path: &Path) -> Result<(Tensor, Option<Vec<String>>)> {
    let (t, meta) = load_safetensors(path, &Device::Cpu)?;
    let names = meta.get("names").and_then(|v| serde_json::from_str(v).ok());
    let t = match t.get("embeddings") {
        Some(e) => e.clone(),
        None if t.len() == 1 => t.into_values().next().expect("one tensor"),
        None => {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                reason: "expected one tensor, or one named `embeddings`".into(),
            });
        }
    };
    Ok((t.to_dtype(DType::F32)?, names))
}

/// The crop rule and zoom flag of each training dataset.
pub type DatasetRules = Vec<(crate::data::presets::CropRule, bool)>;

/// Prepares (or reads from the cache) the training cases of a configuration, with the crop
/// rule and zoom flag of each training dataset.
///
/// # Errors
/// As [`Trainer::new`](super::Trainer::new).
pub fn prepare_training_cases(
    cfg: &TrainConfig,
    note: &mut dyn FnMut(&str),
) -> Result<(Vec<PreparedCase>, DatasetRules)> {
    let (train, rules, _) = prepare_all(cfg, note)?;
    Ok((train, rules))
}

/// Training cases with their dataset rules, and validation cases.
pub(super) type Prepared = (Vec<PreparedCase>, DatasetRules, Vec<PreparedCase>);

pub(super) fn prepare_all(cfg: &TrainConfig, note: &mut dyn FnMut(&str)) -> Result<Prepared> {
    let manifest = Manifest::load(&cfg.data.manifest)?;
    let cache = CaseCache::new(
        cfg.data
            .cache
            .clone()
            .unwrap_or_else(|| cfg.train.output.join("cache")),
    );
    let opts = PreprocessOptions::universal_model();
    let mut train = Vec::new();
    let mut rules = Vec::new();
    let mut val = Vec::new();
    for d in &manifest.datasets {
        if let Some(c) = d.rules.supervised.iter().find(|c| **c > cfg.model.classes) {
            return Err(Error::config(
                &manifest.path,
                format!(
                    "dataset {} supervises class {c}, but the model has {} classes",
                    d.name, cfg.model.classes
                ),
            ));
        }
        let index = rules.len();
        if d.role == Role::Train {
            rules.push((d.rules.crop, d.rules.zoom));
        }
        for c in &d.cases {
            let t0 = Instant::now();
            let case = cache.get(
                &c.id,
                index,
                &c.image,
                &c.label,
                &d.rules,
                &opts,
                cfg.data.roi,
            )?;
            note(&format!(
                "{} case {} ready: {:?} voxels ({:.1} s)",
                if d.role == Role::Train {
                    "training"
                } else {
                    "validation"
                },
                c.id,
                case.shape,
                t0.elapsed().as_secs_f64()
            ));
            match d.role {
                Role::Train => train.push(case),
                Role::Validation => val.push(case),
            }
        }
    }
    if train.is_empty() {
        return Err(Error::config(&manifest.path, "no training cases"));
    }
    Ok((train, rules, val))
}
