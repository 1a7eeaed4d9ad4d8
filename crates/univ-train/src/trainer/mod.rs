//! The training loop: batches from the loader, the partial-label loss, AdamW under the warm-up
//! cosine schedule, checkpoints that resume bit for bit, validation Dice, a CSV log and a PNG
//! of the curves.
//!
//! The code is split by concern: `prepare.rs` (cases and embeddings), the loop with
//! gradient accumulation (`step.rs`), checkpoints and resuming (`checkpoints.rs`), logs
//! (`logs.rs`) and validation (`validation.rs`).
//!
//! Output folder:
//! - `model.safetensors`: the latest weights under the official key names (what `univ segment
//!   --checkpoint` takes);
//! - `checkpoints/step_NNNNNNNN.safetensors` and `.state.safetensors` (optimiser moments, step,
//!   seed, configuration), `checkpoints/latest.json` naming the newest pair;
//! - `log.csv` (one row per step: lr, loss, BCE, Dice, per-class loss), `validation.csv`,
//!   `curves.png`.

mod checkpoints;
mod logs;
mod prepare;
mod step;
mod validation;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use univ_model::nets::{BackboneConfig, Encoding, SwinUnetrConfig, UnetConfig};
use univ_model::{ClassTable, UniversalConfig, UniversalModel};

use crate::config::{ScheduleUnit, TrainConfig};
use crate::data::augment::PatchOptions;
use crate::data::case::PreparedCase;
use crate::data::loader::Sampler;
use crate::distributed::ProcessGroup;
use crate::error::{Error, Result};
use crate::loss::DiceMode;
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::WarmupCosine;
use crate::vars::{InitReport, VarStore};

pub use prepare::{DatasetRules, prepare_training_cases};
pub use validation::case_dice;

/// What one optimiser step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLog {
    /// 1-based step.
    pub step: u64,
    /// 0-based epoch the step belongs to.
    pub epoch: u64,
    /// Total steps of the run.
    pub total_steps: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Loss (BCE + Dice), averaged over micro-batches.
    pub loss: f32,
    /// BCE term.
    pub bce: f32,
    /// Dice term.
    pub dice: f32,
    /// Mean loss (BCE + Dice) per supervised class in this step.
    pub per_class: Vec<(usize, f32)>,
    /// Seconds the step took.
    pub seconds: f64,
    /// Of which seconds spent waiting for the data loader.
    pub data_wait: f64,
}

/// Validation Dice after an epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationLog {
    /// Steps done.
    pub step: u64,
    /// Epochs done.
    pub epoch: u64,
    /// Dice per class over the validation cases (voxels pooled per case, averaged over cases
    /// where the class is present in the reference or the prediction).
    pub per_class: Vec<(usize, f64)>,
    /// Mean over classes.
    pub mean: f64,
}

/// The trainer.
pub struct Trainer {
    cfg: TrainConfig,
    model_cfg: UniversalConfig,
    device: Device,
    store: VarStore,
    model: UniversalModel,
    opt: AdamW,
    sampler: Arc<Sampler>,
    validation: Vec<PreparedCase>,
    dice_mode: DiceMode,
    total_steps: u64,
    step: u64,
    history: Vec<(u64, f32)>,
    val_history: Vec<(u64, f64)>,
    init_report: InitReport,
    classes: ClassTable,
    group: Option<ProcessGroup>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("model", &self.model_cfg)
            .field("step", &self.step)
            .field("total_steps", &self.total_steps)
            .finish()
    }
}

/// Optimiser steps of a run whose steps take `accumulate × world` micro-batches each.
fn total_steps(cfg: &TrainConfig, micro_per_epoch: u64, world: u64) -> u64 {
    match (cfg.train.steps, cfg.train.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => (e * micro_per_epoch).div_ceil(cfg.train.accumulate as u64 * world),
        (None, None) => unreachable!("validated"),
    }
}

/// The model configuration a training configuration asks for.
///
/// # Errors
/// Invalid widths.
pub fn model_config(cfg: &TrainConfig) -> Result<UniversalConfig> {
    let backbone = match cfg.model.backbone.as_str() {
        "unet" => BackboneConfig::Unet(UnetConfig {
            base: cfg.model.width.unwrap_or(32),
        }),
        _ => BackboneConfig::SwinUnetr(SwinUnetrConfig::with_feature_size(
            cfg.model.width.unwrap_or(48),
        )),
    };
    let encoding = if cfg.model.encoding == "clip" {
        Encoding::WordEmbedding
    } else {
        Encoding::RandEmbedding
    };
    Ok(UniversalConfig {
        backbone,
        encoding,
        num_classes: cfg.model.classes,
    })
}

impl Trainer {
    /// Prepares the data and builds the model and optimiser. `note` receives progress
    /// messages (case preparation).
    ///
    /// # Errors
    /// Configuration, data and checkpoint errors.
    pub fn new(cfg: TrainConfig, device: Device, mut note: impl FnMut(&str)) -> Result<Self> {
        cfg.validate()?;
        let model_cfg = model_config(&cfg)?;
        let side = match model_cfg.backbone {
            BackboneConfig::Unet(_) => 8,
            BackboneConfig::SwinUnetr(_) => 32,
        };
        if cfg.data.roi.iter().any(|r| r % side != 0) {
            return Err(Error::config(
                &cfg.path,
                format!(
                    "data.roi {:?}: this backbone needs multiples of {side}",
                    cfg.data.roi
                ),
            ));
        }
        let (train, rules, validation) = prepare::prepare_all(&cfg, &mut note)?;
        let mut init: HashMap<String, Tensor> = HashMap::new();
        // Class names: the universal ones, then those of the initial weights, then those of
        // the embedding file, then the configuration's.
        let mut names: Vec<String> = ClassTable::for_model(cfg.model.classes, None)
            .iter()
            .map(|c| c.name.clone())
            .collect();
        let mut name_rows = |given: &[String]| {
            for (slot, n) in names.iter_mut().zip(given) {
                *slot = n.clone();
            }
        };
        // Classes trained before this run (those of the initial weights: all of their rows
        // unless they say otherwise).
        let mut trained_before: Vec<usize> = Vec::new();
        if let Some(p) = &cfg.model.init {
            let ck = univ_model::Checkpoint::load(p)?;
            if let Some(n) = ck.class_names()? {
                name_rows(&n);
            }
            trained_before = match ck.trained_classes()? {
                Some(t) => t,
                None => (1..=ck.detect_config().map_or(0, |c| c.num_classes)).collect(),
            };
            init = ck.tensors;
        }
        if let Some(p) = &cfg.model.embeddings {
            let (e, emb_names) = prepare::load_embeddings(p)?;
            if let Some(n) = emb_names {
                name_rows(&n);
            }
            if e.dims() != [cfg.model.classes, univ_model::nets::TEXT_DIM] {
                return Err(Error::Checkpoint {
                    path: p.clone(),
                    reason: format!(
                        "embeddings {:?}, expected ({}, 512)",
                        e.dims(),
                        cfg.model.classes
                    ),
                });
            }
            init.insert("organ_embedding".into(), e);
        }
        let configured = cfg
            .model
            .class_names()
            .map_err(|e| Error::config(&cfg.path, e))?;
        for (id, name) in configured {
            names[id - 1] = name;
        }
        let mut trained: Vec<usize> = train
            .iter()
            .flat_map(|c| c.supervised.iter().copied())
            .chain(trained_before)
            .filter(|c| (1..=cfg.model.classes).contains(c))
            .collect();
        trained.sort_unstable();
        trained.dedup();
        let classes = ClassTable::for_model(cfg.model.classes, Some(&names)).with_trained(&trained);
        let store = VarStore::new(cfg.train.seed, init);
        let model = UniversalModel::new(store.var_builder(&device), model_cfg)?;
        let init_report = store.report();
        let trainable: Vec<_> = store
            .vars()
            .into_iter()
            .filter(|(n, _)| {
                !(model_cfg.encoding == Encoding::WordEmbedding && n == "organ_embedding")
            })
            .filter(|(n, _)| !(cfg.train.freeze_backbone && n.starts_with("backbone.")))
            .filter(|(n, _)| {
                cfg.train.trainable.is_empty()
                    || cfg
                        .train
                        .trainable
                        .iter()
                        .any(|p| n.starts_with(p.as_str()))
            })
            .collect();
        if trainable.is_empty() {
            return Err(Error::config(
                &cfg.path,
                format!(
                    "no variable is left to train (train.trainable = {:?}, freeze_backbone = {})",
                    cfg.train.trainable, cfg.train.freeze_backbone
                ),
            ));
        }
        let opt = AdamW::new(
            trainable,
            AdamWConfig {
                lr: cfg.train.lr,
                weight_decay: cfg.train.weight_decay,
                ..AdamWConfig::default()
            },
        )?;
        let sampler = Arc::new(Sampler {
            cases: Arc::new(train),
            dataset_rules: rules,
            patch: PatchOptions {
                roi: cfg.data.roi,
                num_samples: cfg.data.num_samples,
                ..PatchOptions::default()
            },
            cases_per_step: cfg.data.cases_per_step,
            num_classes: cfg.model.classes,
            seed: cfg.train.seed,
            sampling: cfg.data.sampling,
        });
        let total_steps = total_steps(&cfg, sampler.steps_per_epoch(), 1);
        let dice_mode = cfg.dice_mode()?;
        Ok(Trainer {
            cfg,
            model_cfg,
            device,
            store,
            model,
            opt,
            sampler,
            validation,
            dice_mode,
            total_steps,
            step: 0,
            history: Vec::new(),
            val_history: Vec::new(),
            init_report,
            classes,
            group: None,
        })
    }

    /// Makes this trainer one rank of a data-parallel run (see [`crate::distributed`]): every
    /// rank takes its share of each step's micro-batches, the gradients are summed over the
    /// ranks before each optimiser step, and only rank 0 writes the log, the curves, the
    /// checkpoints and runs validation. Rank 0's weights are copied to every rank here, and
    /// every rank must be at the same step (call it after [`resume`](Self::resume), on every
    /// rank, or before it on none).
    ///
    /// # Errors
    /// Ranks at different steps or with different variables, connection errors.
    pub fn set_process_group(&mut self, group: ProcessGroup) -> Result<()> {
        let vars = self.store.vars();
        let tensors: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let numel: usize = tensors.iter().map(Tensor::elem_count).sum();
        // What the ranks must agree on, compared with rank 0's.
        let mine = Tensor::new(
            &[self.step as f32, vars.len() as f32, numel as f32],
            &Device::Cpu,
        )?;
        let root = group.broadcast(std::slice::from_ref(&mine))?.remove(0);
        let differs = (mine
            .ne(&root)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?
            > 0.0) as u8 as f32;
        let flags = Tensor::new(&[differs], &Device::Cpu)?;
        let any = group.all_reduce_sum(&[flags])?.remove(0).to_vec1::<f32>()?[0];
        if any > 0.0 {
            let r = root.to_vec1::<f32>()?;
            return Err(Error::Distributed(format!(
                "the ranks disagree: rank 0 is at step {} with {} variables ({} values), rank {} \
                 at step {} with {} ({}) on at least one rank (resume on every rank or on none, \
                 with the same configuration)",
                r[0],
                r[1],
                r[2],
                group.rank(),
                self.step,
                vars.len(),
                numel
            )));
        }
        let copied = group.broadcast(&tensors)?;
        for ((_, v), t) in vars.iter().zip(&copied) {
            v.set(t)?;
        }
        let world = group.world_size() as u64;
        self.total_steps = total_steps(&self.cfg, self.sampler.steps_per_epoch(), world);
        self.group = Some(group);
        Ok(())
    }

    /// The run this trainer is a rank of, if any.
    pub fn process_group(&self) -> Option<&ProcessGroup> {
        self.group.as_ref()
    }

    /// `true` unless this trainer is a rank other than 0 of a distributed run.
    pub fn is_main(&self) -> bool {
        self.group.as_ref().is_none_or(ProcessGroup::is_main)
    }

    /// Processes in the run (1 when not distributed).
    fn world(&self) -> u64 {
        self.group.as_ref().map_or(1, |g| g.world_size() as u64)
    }

    /// Micro-batches per optimiser step over all ranks.
    fn micro_per_step(&self) -> u64 {
        self.cfg.train.accumulate as u64 * self.world()
    }

    /// Steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Steps of the whole run.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// The model configuration.
    pub fn model_config(&self) -> UniversalConfig {
        self.model_cfg
    }

    /// What initialisation from `model.init` did.
    pub fn init_report(&self) -> &InitReport {
        &self.init_report
    }

    /// The model's classes (names written into every checkpoint).
    pub fn class_table(&self) -> ClassTable {
        self.classes.clone()
    }

    /// Classes supervised by the training cases.
    pub fn taught_classes(&self) -> Vec<usize> {
        let mut c: Vec<usize> = self
            .sampler
            .cases
            .iter()
            .flat_map(|c| c.supervised.iter().copied())
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    }

    /// Names of the variables the optimiser updates.
    pub fn trainable(&self) -> Vec<String> {
        self.opt.names().map(str::to_string).collect()
    }

    /// The current weights, sorted by name (official key names).
    pub fn weights(&self) -> Vec<(String, Tensor)> {
        self.store.tensors()
    }

    /// Optimiser steps per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.sampler
            .steps_per_epoch()
            .div_ceil(self.micro_per_step())
            .max(1)
    }

    fn epoch_of(&self, step0: u64) -> u64 {
        step0 * self.micro_per_step() / self.sampler.steps_per_epoch().max(1)
    }

    fn schedule(&self) -> WarmupCosine {
        let units = match self.cfg.train.schedule_unit {
            ScheduleUnit::Epoch => self.epoch_of(self.total_steps - 1) + 1,
            ScheduleUnit::Step => self.total_steps,
        };
        WarmupCosine {
            base_lr: self.cfg.train.lr,
            warmup: self.cfg.train.warmup,
            total: self.cfg.train.schedule_length.unwrap_or(units),
        }
    }

    /// The learning rate of 0-based step `step0`.
    pub fn lr_at(&self, step0: u64) -> f64 {
        let t = match self.cfg.train.schedule_unit {
            ScheduleUnit::Epoch => self.epoch_of(step0) + 1,
            ScheduleUnit::Step => step0 + 1,
        };
        self.schedule().lr(t)
    }

    fn out(&self) -> &Path {
        &self.cfg.train.output
    }

    fn frozen_model(&self) -> Result<UniversalModel> {
        let map: HashMap<String, Tensor> = self.store.tensors().into_iter().collect();
        let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &self.device);
        Ok(UniversalModel::new(vb, self.model_cfg)?)
    }
}
