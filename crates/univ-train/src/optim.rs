//! AdamW with the update of PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias
//! corrections) and a state that can be saved and restored exactly.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

/// AdamW settings; [`Default`] gives the official ones (lr 1e-4, weight decay 1e-5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (overridden per step by the schedule).
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-5,
        }
    }
}

struct Slot {
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named variables.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: BTreeMap<String, Slot>,
    step: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("cfg", &self.cfg)
            .field("params", &self.slots.len())
            .field("step", &self.step)
            .finish()
    }
}

impl AdamW {
    /// An optimiser over `vars` (name → variable) with zero moments.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut slots = BTreeMap::new();
        for (name, var) in vars {
            let m = var.as_tensor().zeros_like()?;
            let v = var.as_tensor().zeros_like()?;
            slots.insert(name, Slot { var, m, v });
        }
        Ok(AdamW {
            cfg,
            slots,
            step: 0,
        })
    }

    /// Optimiser steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Names of the optimised variables, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }

    /// Sets the learning rate of the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// One update from the gradients in `grads`. Variables without a gradient are left
    /// untouched (no decay either), as PyTorch skips parameters whose `grad` is `None`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let step_size = c.lr / bc1;
        let bc2_sqrt = bc2.sqrt();
        for slot in self.slots.values_mut() {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let p = slot.var.as_tensor();
            let decayed = p.affine(1.0 - c.lr * c.weight_decay, 0.0)?;
            slot.m = ((&slot.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = (slot.v.sqrt()? / bc2_sqrt)?.affine(1.0, c.eps)?;
            let upd = ((&slot.m / &denom)? * step_size)?;
            slot.var.set(&(decayed - upd)?)?;
        }
        Ok(())
    }

    /// The state as named tensors (`m.<name>`, `v.<name>`) and the step count.
    pub fn state(&self) -> (Vec<(String, Tensor)>, u64) {
        let mut out = Vec::with_capacity(2 * self.slots.len());
        for (name, s) in &self.slots {
            out.push((format!("m.{name}"), s.m.clone()));
            out.push((format!("v.{name}"), s.v.clone()));
        }
        (out, self.step)
    }

    /// Restores a state saved by [`state`](Self::state).
    ///
    /// # Errors
    /// [`Error::Shape`] when a moment is missing or has the wrong shape.
    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        step: u64,
    ) -> Result<()> {
        for (name, s) in self.slots.iter_mut() {
            for (prefix, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{prefix}.{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| Error::shape("optimizer state", format!("{key} is missing")))?;
                if t.dims() != s.var.as_tensor().dims() {
                    return Err(Error::shape(
                        "optimizer state",
                        format!(
                            "{key} has shape {:?}, the parameter {:?}",
                            t.dims(),
                            s.var.as_tensor().dims()
                        ),
                    ));
                }
                *dst = t.to_device(s.var.as_tensor().device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}
