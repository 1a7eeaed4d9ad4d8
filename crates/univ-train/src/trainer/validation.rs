//! Validation: Dice per supervised class of the validation cases, with the official sliding
//! window and the 0.5 threshold.

use std::collections::BTreeMap;

use candle_core::Device;
use univ_model::UniversalModel;

use super::{Trainer, ValidationLog};
use crate::data::case::PreparedCase;
use crate::error::Result;

impl Trainer {
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
