//! The training loop: batches from the loader, the partial-label loss, AdamW under the warm-up
//! cosine schedule, checkpoints that resume bit for bit, validation Dice, a CSV log and a PNG
//! of the curves.
//!
//! Output folder:
//! - `model.safetensors`: the latest weights under the official key names (what `univ segment
//!   --checkpoint` takes);
//! - `checkpoints/step_NNNNNNNN.safetensors` and `.state.safetensors` (optimiser moments, step,
//!   seed, configuration), `checkpoints/latest.json` naming the newest pair;
//! - `log.csv` (one row per step: lr, loss, BCE, Dice, per-class loss), `validation.csv`,
//!   `curves.png`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use univ_io::PreprocessOptions;
use univ_model::nets::{BackboneConfig, Encoding, SwinUnetrConfig, UnetConfig};
use univ_model::{UniversalConfig, UniversalModel};

use crate::config::{ScheduleUnit, TrainConfig};
use crate::data::augment::PatchOptions;
use crate::data::case::{CaseCache, PreparedCase};
use crate::data::loader::{Sampler, spawn_loader};
use crate::data::manifest::{Manifest, Role};
use crate::error::{Error, Result};
use crate::io::{load_safetensors, save_safetensors, write_atomic};
use crate::loss::{DiceMode, partial_label_loss};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::WarmupCosine;
use crate::vars::{InitReport, VarStore};

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

fn load_embeddings(path: &Path) -> Result<Tensor> {
    let (t, _) = load_safetensors(path, &Device::Cpu)?;
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
    Ok(t.to_dtype(DType::F32)?)
}

/// The crop rule and zoom flag of each training dataset.
pub type DatasetRules = Vec<(crate::data::presets::CropRule, bool)>;

/// Prepares (or reads from the cache) the training cases of a configuration, with the crop
/// rule and zoom flag of each training dataset.
///
/// # Errors
/// As [`Trainer::new`].
pub fn prepare_training_cases(
    cfg: &TrainConfig,
    note: &mut dyn FnMut(&str),
) -> Result<(Vec<PreparedCase>, DatasetRules)> {
    let (train, rules, _) = prepare_all(cfg, note)?;
    Ok((train, rules))
}

/// Training cases with their dataset rules, and validation cases.
type Prepared = (Vec<PreparedCase>, DatasetRules, Vec<PreparedCase>);

fn prepare_all(cfg: &TrainConfig, note: &mut dyn FnMut(&str)) -> Result<Prepared> {
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

const STATE_SUFFIX: &str = ".state.safetensors";

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
        let (train, rules, validation) = prepare_all(&cfg, &mut note)?;
        let mut init: HashMap<String, Tensor> = HashMap::new();
        if let Some(p) = &cfg.model.init {
            init = univ_model::Checkpoint::load(p)?.tensors;
        }
        if let Some(p) = &cfg.model.embeddings {
            let e = load_embeddings(p)?;
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
        let micro_per_epoch = sampler.steps_per_epoch();
        let acc = cfg.train.accumulate as u64;
        let total_steps = match (cfg.train.steps, cfg.train.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => (e * micro_per_epoch).div_ceil(acc),
            (None, None) => unreachable!("validated"),
        };
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
        })
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
            .div_ceil(self.cfg.train.accumulate as u64)
            .max(1)
    }

    fn epoch_of(&self, step0: u64) -> u64 {
        step0 * self.cfg.train.accumulate as u64 / self.sampler.steps_per_epoch().max(1)
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

    /// Runs training until the last step, or until `stop_after` more steps have run (then
    /// returns without a final checkpoint, as a crash would). `on_step` sees every step,
    /// `on_validation` every validation.
    ///
    /// # Errors
    /// [`Error::Diverged`] for a non-finite loss (naming the step), data and I/O errors.
    pub fn run(
        &mut self,
        stop_after: Option<u64>,
        mut on_step: impl FnMut(&StepLog),
        mut on_validation: impl FnMut(&ValidationLog),
    ) -> Result<()> {
        std::fs::create_dir_all(self.out().join("checkpoints"))
            .map_err(|e| Error::file(self.out(), e))?;
        let acc = self.cfg.train.accumulate as u64;
        let end = match stop_after {
            Some(n) => (self.step + n).min(self.total_steps),
            None => self.total_steps,
        };
        let mut batches = spawn_loader(
            self.sampler.clone(),
            self.step * acc,
            end * acc,
            self.cfg.data.workers,
        );
        let roi = self.cfg.data.roi;
        let k = self.cfg.model.classes;
        while self.step < end {
            let t0 = Instant::now();
            let step0 = self.step;
            let lr = self.lr_at(step0);
            self.opt.set_lr(lr);
            let mut grads: Option<candle_core::backprop::GradStore> = None;
            let (mut loss, mut bce, mut dice) = (0f32, 0f32, 0f32);
            let mut per_class: BTreeMap<usize, (f32, usize)> = BTreeMap::new();
            let mut data_wait = 0f64;
            for _ in 0..acc {
                let tw = Instant::now();
                let batch = batches.next().ok_or_else(|| {
                    Error::config(&self.cfg.path, "the data loader stopped early")
                })?;
                data_wait += tw.elapsed().as_secs_f64();
                let b = batch.batch;
                let x =
                    Tensor::from_vec(batch.image, (b, 1, roi[0], roi[1], roi[2]), &self.device)?;
                let t =
                    Tensor::from_vec(batch.target, (b, k, roi[0], roi[1], roi[2]), &self.device)?;
                let logits = self.model.forward(&x)?;
                let parts = partial_label_loss(&logits, &t, &batch.classes, self.dice_mode)?;
                let l = parts.total.to_scalar::<f32>()?;
                if !l.is_finite() {
                    return Err(Error::Diverged {
                        step: step0 + 1,
                        value: l,
                    });
                }
                loss += l / acc as f32;
                bce += parts.bce.to_scalar::<f32>()? / acc as f32;
                dice += parts.dice.to_scalar::<f32>()? / acc as f32;
                let bp = parts.bce_per_pair.to_vec1::<f32>()?;
                let dp = parts.dice_per_pair.to_vec1::<f32>()?;
                for (i, (_, c)) in parts.pairs.iter().enumerate() {
                    let e = per_class.entry(*c).or_insert((0.0, 0));
                    e.0 += bp[i] + dp[i];
                    e.1 += 1;
                }
                let scaled = if acc > 1 {
                    (parts.total / acc as f64)?
                } else {
                    parts.total
                };
                let g = scaled.backward()?;
                grads = Some(match grads {
                    None => g,
                    Some(mut sum) => {
                        for (_, var) in self.store.vars() {
                            if let Some(gi) = g.get(var.as_tensor()) {
                                let s = match sum.get(var.as_tensor()) {
                                    Some(prev) => (prev + gi)?,
                                    None => gi.clone(),
                                };
                                sum.insert(var.as_tensor(), s);
                            }
                        }
                        sum
                    }
                });
            }
            self.opt
                .step(grads.as_ref().expect("at least one micro-batch"))?;
            self.step += 1;
            let log = StepLog {
                step: self.step,
                epoch: self.epoch_of(step0),
                total_steps: self.total_steps,
                lr,
                loss,
                bce,
                dice,
                per_class: per_class
                    .into_iter()
                    .map(|(c, (s, n))| (c, s / n as f32))
                    .collect(),
                seconds: t0.elapsed().as_secs_f64(),
                data_wait,
            };
            self.append_log(&log)?;
            self.history.push((self.step, loss));
            on_step(&log);
            let last = self.step == self.total_steps;
            let every = self.cfg.train.checkpoint_every;
            if last || (every > 0 && self.step.is_multiple_of(every)) {
                self.save_checkpoint()?;
            }
            let epoch_done =
                (self.step * acc).is_multiple_of(self.sampler.steps_per_epoch().max(1));
            let ve = self.cfg.train.validate_every;
            if !self.validation.is_empty() && ve > 0 {
                let epochs_done = self.epoch_of(self.step - 1) + 1;
                if (epoch_done && epochs_done.is_multiple_of(ve)) || last {
                    let v = self.validate()?;
                    self.append_validation(&v)?;
                    on_validation(&v);
                }
            }
            if self.step.is_multiple_of(10) || last {
                self.write_curves()?;
            }
        }
        Ok(())
    }

    /// Dice per supervised class of the validation cases, with the sliding window of the
    /// official inference (overlap 0.5, Gaussian) and the 0.5 threshold, no post-processing.
    ///
    /// # Errors
    /// Model errors.
    pub fn validate(&self) -> Result<ValidationLog> {
        let model = self.frozen_model()?;
        let mut sums: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
        for case in &self.validation {
            for (c, d) in case_dice(&model, case, self.cfg.data.roi, &self.device)? {
                if let Some(d) = d {
                    let e = sums.entry(c).or_insert((0.0, 0));
                    e.0 += d;
                    e.1 += 1;
                }
            }
        }
        let per_class: Vec<(usize, f64)> = sums
            .into_iter()
            .map(|(c, (s, n))| (c, s / n as f64))
            .collect();
        let mean = if per_class.is_empty() {
            f64::NAN
        } else {
            per_class.iter().map(|(_, d)| d).sum::<f64>() / per_class.len() as f64
        };
        Ok(ValidationLog {
            step: self.step,
            epoch: self.epoch_of(self.step.max(1) - 1) + 1,
            per_class,
            mean,
        })
    }

    fn append_log(&self, log: &StepLog) -> Result<()> {
        let classes: Vec<String> = log
            .per_class
            .iter()
            .map(|(c, l)| format!("{c}:{l:.6}"))
            .collect();
        append_csv(
            &self.out().join("log.csv"),
            "step,epoch,lr,loss,bce,dice,seconds,data_wait,class_losses",
            &format!(
                "{},{},{:.6e},{:.6},{:.6},{:.6},{:.3},{:.3},{}",
                log.step,
                log.epoch,
                log.lr,
                log.loss,
                log.bce,
                log.dice,
                log.seconds,
                log.data_wait,
                classes.join(";")
            ),
        )
    }

    fn append_validation(&mut self, v: &ValidationLog) -> Result<()> {
        self.val_history.push((v.step, v.mean));
        let classes: Vec<String> = v
            .per_class
            .iter()
            .map(|(c, d)| format!("{c}:{d:.4}"))
            .collect();
        append_csv(
            &self.out().join("validation.csv"),
            "step,epoch,mean_dice,class_dice",
            &format!("{},{},{:.4},{}", v.step, v.epoch, v.mean, classes.join(";")),
        )
    }

    fn model_metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("format".into(), "univ-train".into());
        m.insert("step".into(), self.step.to_string());
        m.insert(
            "model".into(),
            serde_json::to_string(&self.cfg.model).unwrap_or_default(),
        );
        m
    }

    fn resume_key(&self) -> String {
        let c = &self.cfg;
        serde_json::json!({
            "model": {"backbone": c.model.backbone, "width": c.model.width,
                      "encoding": c.model.encoding, "classes": c.model.classes},
            "data": {"roi": c.data.roi, "num_samples": c.data.num_samples,
                     "cases_per_step": c.data.cases_per_step, "sampling": c.data.sampling},
            "train": {"lr": c.train.lr, "weight_decay": c.train.weight_decay,
                      "warmup": c.train.warmup, "accumulate": c.train.accumulate,
                      "dice": c.train.dice, "seed": c.train.seed,
                      "freeze_backbone": c.train.freeze_backbone,
                      "trainable": c.train.trainable},
        })
        .to_string()
    }

    /// Writes a checkpoint (weights, optimiser state) and `model.safetensors`; returns the
    /// weights file.
    ///
    /// # Errors
    /// I/O and tensor errors.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let dir = self.out().join("checkpoints");
        std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e))?;
        let name = format!("step_{:08}", self.step);
        let weights = dir.join(format!("{name}.safetensors"));
        let state = dir.join(format!("{name}{STATE_SUFFIX}"));
        let tensors = self.store.tensors();
        save_safetensors(&weights, &tensors, self.model_metadata())?;
        let (moments, step) = self.opt.state();
        let mut meta = HashMap::new();
        meta.insert("step".into(), step.to_string());
        meta.insert("seed".into(), self.cfg.train.seed.to_string());
        meta.insert("resume_key".into(), self.resume_key());
        save_safetensors(&state, &moments, meta)?;
        save_safetensors(
            &self.out().join("model.safetensors"),
            &tensors,
            self.model_metadata(),
        )?;
        let latest = serde_json::json!({ "step": self.step, "weights": format!("{name}.safetensors"),
            "state": format!("{name}{STATE_SUFFIX}") });
        write_atomic(&dir.join("latest.json"), latest.to_string().as_bytes())?;
        Ok(weights)
    }

    /// Continues from the newest checkpoint in the output folder; returns its step, or `None`
    /// when there is none. Log rows after that step (from a run that went further before it
    /// stopped) are dropped, so the log matches the resumed run.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when the checkpoint does not fit this configuration.
    pub fn resume(&mut self) -> Result<Option<u64>> {
        let dir = self.out().join("checkpoints");
        let latest = dir.join("latest.json");
        if !latest.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&latest).map_err(|e| Error::file(&latest, e))?;
        let bad = |reason: String| Error::Checkpoint {
            path: latest.clone(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("unreadable: {e}")))?;
        let (Some(wname), Some(sname)) = (v["weights"].as_str(), v["state"].as_str()) else {
            return Err(bad("no weights/state entries".into()));
        };
        let (weights, _) = load_safetensors(&dir.join(wname), &self.device)?;
        let (state, meta) = load_safetensors(&dir.join(sname), &self.device)?;
        let step: u64 = meta
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("the state file has no step".into()))?;
        if meta.get("resume_key") != Some(&self.resume_key()) {
            return Err(bad(format!(
                "the configuration changed since this checkpoint (saved: {}, now: {})",
                meta.get("resume_key").cloned().unwrap_or_default(),
                self.resume_key()
            )));
        }
        self.store.set_all(&weights).map_err(bad)?;
        self.opt.load_state(&state, step)?;
        self.step = step;
        self.truncate_logs(step)?;
        Ok(Some(step))
    }

    fn truncate_logs(&mut self, step: u64) -> Result<()> {
        for (file, is_val) in [("log.csv", false), ("validation.csv", true)] {
            let path = self.out().join(file);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let mut kept = String::new();
            for (i, line) in text.lines().enumerate() {
                let s: Option<u64> = line.split(',').next().and_then(|s| s.parse().ok());
                let cols: Vec<&str> = line.split(',').collect();
                if i == 0 || s.is_some_and(|s| s <= step) {
                    kept.push_str(line);
                    kept.push('\n');
                    if i > 0 {
                        if is_val {
                            if let (Some(s), Some(m)) =
                                (s, cols.get(2).and_then(|m| m.parse().ok()))
                            {
                                self.val_history.push((s, m));
                            }
                        } else if let (Some(s), Some(l)) =
                            (s, cols.get(3).and_then(|m| m.parse().ok()))
                        {
                            self.history.push((s, l));
                        }
                    }
                }
            }
            write_atomic(&path, kept.as_bytes())?;
        }
        Ok(())
    }

    /// Draws `curves.png`: training loss per step (with a moving average) and validation
    /// mean Dice.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_curves(&self) -> Result<()> {
        let path = self.out().join("curves.png");
        let png = crate::plot::curves(&self.history, &self.val_history)
            .encode_png()
            .map_err(|e| Error::file(&path, e))?;
        write_atomic(&path, &png)
    }
}

/// Appends one row to a CSV file, writing the header first when the file is new.
fn append_csv(path: &Path, header: &str, row: &str) -> Result<()> {
    let new = !path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::file(path, e))?;
    let text = if new {
        format!("{header}\n{row}\n")
    } else {
        format!("{row}\n")
    };
    f.write_all(text.as_bytes())
        .map_err(|e| Error::file(path, e))
}

/// Dice per supervised class of one prepared case (`None` when the class is absent from both
/// the reference and the prediction).
///
/// # Errors
/// Model errors.
pub fn case_dice(
    model: &UniversalModel,
    case: &PreparedCase,
    roi: [usize; 3],
    device: &Device,
) -> Result<Vec<(usize, Option<f64>)>> {
    use univ_model::inferers::{SlidingWindowOptions, sliding_window_inference};
    let classes = case.supervised.clone();
    let sel = model.select_classes(&classes)?;
    let opts = SlidingWindowOptions {
        roi,
        ..SlidingWindowOptions::default()
    };
    let plane = case.shape[1] * case.shape[2];
    let k = classes.len();
    let mut counts = vec![(0usize, 0usize, 0usize); k]; // (pred, truth, both)
    sliding_window_inference(
        &case.image,
        case.shape,
        &opts,
        device,
        |x| sel.forward(x),
        |x0, planes| {
            let n = planes.len() / (k * plane);
            for (j, c) in classes.iter().enumerate() {
                for i in 0..n {
                    let base = (x0 + i) * plane;
                    let src = &planes[(j * n + i) * plane..(j * n + i + 1) * plane];
                    for (v, logit) in src.iter().enumerate() {
                        let p = *logit > 0.0;
                        let t = case.is_class(base + v, *c);
                        counts[j].0 += p as usize;
                        counts[j].1 += t as usize;
                        counts[j].2 += (p && t) as usize;
                    }
                }
            }
            Ok(())
        },
        |_, _| {},
    )?;
    Ok(classes
        .iter()
        .zip(counts)
        .map(|(c, (p, t, b))| {
            let d = if p + t == 0 {
                None
            } else {
                Some(2.0 * b as f64 / (p + t) as f64)
            };
            (*c, d)
        })
        .collect())
}
