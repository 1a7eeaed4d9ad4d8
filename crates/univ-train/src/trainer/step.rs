//! The loop: batches from the loader, gradient accumulation over micro-batches, the AdamW
//! step under the schedule, and what follows a step (log row, checkpoint, validation, curves).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;

use super::{StepLog, Trainer, ValidationLog};
use crate::data::loader::spawn_loader;
use crate::error::{Error, Result};
use crate::loss::partial_label_loss;

impl Trainer {
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
}
