//! The learning-rate schedule of the official training: linear warm-up from 0, then cosine
//! annealing to 0 (the official `train.py`'s `LinearWarmupCosineAnnealingLR` from
//! `optimizers/lr_scheduler.py` with `warmup_start_lr = 0` and
//! `eta_min = 0`, in its closed form).

/// Linear warm-up then cosine annealing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupCosine {
    /// The peak learning rate (1e-4 officially).
    pub base_lr: f64,
    /// Warm-up length in scheduler steps (100 epochs officially).
    pub warmup: u64,
    /// Total length in scheduler steps (2000 epochs officially).
    pub total: u64,
}

impl WarmupCosine {
    /// The official schedule: base 1e-4, 100 warm-up epochs, 2000 epochs.
    pub fn official() -> Self {
        WarmupCosine {
            base_lr: 1e-4,
            warmup: 100,
            total: 2000,
        }
    }

    /// The learning rate after `t` scheduler steps (the official loop steps the scheduler
    /// once before each epoch, so epoch `e` trains with `t = e + 1`).
    ///
    /// `t < warmup`: `t · base / (warmup − 1)` (reaching the base at `t = warmup − 1`);
    /// afterwards `base · (1 + cos(π (t − warmup) / (total − warmup))) / 2`, and 0 past the end.
    pub fn lr(&self, t: u64) -> f64 {
        let base = self.base_lr;
        if t < self.warmup {
            if self.warmup <= 1 {
                return base;
            }
            return t as f64 * base / (self.warmup - 1) as f64;
        }
        if self.total <= self.warmup {
            return base;
        }
        if t >= self.total {
            return 0.0;
        }
        let frac = (t - self.warmup) as f64 / (self.total - self.warmup) as f64;
        0.5 * base * (1.0 + (std::f64::consts::PI * frac).cos())
    }
}
