//! The loop: batches from the loader, gradient accumulation over micro-batches, the AdamW
//! step under the schedule, and what follows a step (log row, checkpoint, validation, curves).

use std::collections::HashSet;
use std::time::Instant;

use candle_core::Tensor;

use super::{StepLog, Trainer, ValidationLog};
use crate::data::loader::spawn_loader;
use crate::distributed::rank_micro_batches;
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
        let per_step = self.micro_per_step();
        let end = match stop_after {
            Some(n) => (self.step + n).min(self.total_steps),
            None => self.total_steps,
        };
        let (rank, world) = self
            .group
            .as_ref()
            .map_or((0, 1), |g| (g.rank(), g.world_size()));
        let mut batches = spawn_loader(
            self.sampler.clone(),
            rank_micro_batches(self.step, end, acc, rank, world),
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
            // Loss sum and pair count of each class id.
            let mut per_class = vec![(0f32, 0usize); k + 1];
            let mut data_wait = 0f64;
            let mut diverged: Option<f32> = None;
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
                    diverged = Some(l);
                    break;
                }
                loss += l / per_step as f32;
                bce += parts.bce.to_scalar::<f32>()? / per_step as f32;
                dice += parts.dice.to_scalar::<f32>()? / per_step as f32;
                let bp = parts.bce_per_pair.to_vec1::<f32>()?;
                let dp = parts.dice_per_pair.to_vec1::<f32>()?;
                for (i, (_, c)) in parts.pairs.iter().enumerate() {
                    let e = &mut per_class[*c];
                    e.0 += bp[i] + dp[i];
                    e.1 += 1;
                }
                let scaled = if per_step > 1 {
                    (parts.total / per_step as f64)?
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
            if self.group.is_some() {
                let diverged_anywhere;
                (loss, bce, dice, diverged_anywhere) =
                    self.reduce_step(&mut grads, [loss, bce, dice], &mut per_class, diverged)?;
                if diverged_anywhere && diverged.is_none() {
                    // Another rank's loss was not finite.
                    diverged = Some(f32::NAN);
                }
            }
            if let Some(value) = diverged {
                return Err(Error::Diverged {
                    step: step0 + 1,
                    value,
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
                    .enumerate()
                    .filter(|(_, (_, n))| *n > 0)
                    .map(|(c, (s, n))| (c, s / n as f32))
                    .collect(),
                seconds: t0.elapsed().as_secs_f64(),
                data_wait,
            };
            self.history.push((self.step, loss));
            let main = self.is_main();
            if main {
                self.append_log(&log)?;
            }
            on_step(&log);
            let last = self.step == self.total_steps;
            let every = self.cfg.train.checkpoint_every;
            if main && (last || (every > 0 && self.step.is_multiple_of(every))) {
                self.save_checkpoint()?;
            }
            let epoch_done =
                (self.step * per_step).is_multiple_of(self.sampler.steps_per_epoch().max(1));
            let ve = self.cfg.train.validate_every;
            if main && !self.validation.is_empty() && ve > 0 {
                let epochs_done = self.epoch_of(self.step - 1) + 1;
                if (epoch_done && epochs_done.is_multiple_of(ve)) || last {
                    let v = self.validate()?;
                    self.append_validation(&v)?;
                    on_validation(&v);
                }
            }
            if main && (self.step.is_multiple_of(10) || last) {
                self.write_curves()?;
            }
        }
        Ok(())
    }
}

impl Trainer {
    /// Sums one step's figures and gradients over the ranks: `sums` (loss, BCE, Dice, already
    /// divided by the micro-batches of the whole step), the per-class sums and counts, whether
    /// any rank diverged, and the gradient of every trainable variable that has one on some
    /// rank (zeros stand in where a rank has none), as one flat buffer.
    fn reduce_step(
        &self,
        grads: &mut Option<candle_core::backprop::GradStore>,
        sums: [f32; 3],
        per_class: &mut [(f32, usize)],
        diverged: Option<f32>,
    ) -> Result<(f32, f32, f32, bool)> {
        let group = self.group.as_ref().expect("distributed");
        let trainable: HashSet<String> = self.opt.names().map(str::to_string).collect();
        let vars: Vec<_> = self
            .store
            .vars()
            .into_iter()
            .filter(|(n, _)| trainable.contains(n))
            .collect();
        let has = |t: &Tensor| grads.as_ref().is_some_and(|g| g.get(t).is_some());
        let mut figures: Vec<f32> = sums.to_vec();
        figures.push(diverged.is_some() as u8 as f32);
        for (s, n) in per_class.iter() {
            figures.push(*s);
            figures.push(*n as f32);
        }
        figures.extend(vars.iter().map(|(_, v)| has(v.as_tensor()) as u8 as f32));
        let n = figures.len();
        let reduced = group
            .all_reduce_sum(&[Tensor::from_vec(figures, n, &candle_core::Device::Cpu)?])?
            .remove(0)
            .to_vec1::<f32>()?;
        let diverged_anywhere = reduced[3] > 0.0;
        for (i, e) in per_class.iter_mut().enumerate() {
            *e = (reduced[4 + 2 * i], reduced[5 + 2 * i].round() as usize);
        }
        if diverged_anywhere {
            return Ok((reduced[0], reduced[1], reduced[2], true));
        }
        let present = &reduced[4 + 2 * per_class.len()..];
        let mut flat = Vec::new();
        let mut shapes = Vec::new();
        for ((_, v), p) in vars.iter().zip(present) {
            if *p == 0.0 {
                continue;
            }
            let t = v.as_tensor();
            let g = match grads.as_ref().and_then(|g| g.get(t)) {
                Some(g) => g.clone(),
                None => t.zeros_like()?,
            };
            flat.push(g.flatten_all()?);
            shapes.push((v.clone(), t.shape().clone()));
        }
        if !flat.is_empty() {
            let summed = group.all_reduce_sum(&[Tensor::cat(&flat, 0)?])?.remove(0);
            let store = grads
                .as_mut()
                .expect("not diverged: every rank has gradients");
            let mut at = 0;
            for (var, shape) in shapes {
                let len = shape.elem_count();
                let g = summed.narrow(0, at, len)?.reshape(shape)?;
                store.insert(var.as_tensor(), g);
                at += len;
            }
        }
        Ok((reduced[0], reduced[1], reduced[2], false))
    }
}
