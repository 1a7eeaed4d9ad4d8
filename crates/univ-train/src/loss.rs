//! The partial-label loss of the Universal Model (the official `utils/loss.py`): binary cross-entropy with logits
//! plus soft Dice, each averaged over the (sample, class) pairs that the sample's dataset
//! supervises. Channels outside a sample's class list (stored as 255 in the official
//! post-label files) never enter the loss and get no gradient.
//!
//! The Dice term comes in the two variants of the official history: one Dice per slice along
//! the first spatial axis (what trained the released weights) and one Dice per volume.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// How the soft Dice is computed for one (sample, class) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiceMode {
    /// One Dice per slice along the first spatial axis, averaged over slices (the released
    /// models were trained with this).
    #[default]
    PerSlice,
    /// One Dice over the whole volume.
    PerVolume,
}

/// The loss of one batch, with its parts.
#[derive(Debug, Clone)]
pub struct LossParts {
    /// `bce + dice`, a scalar tensor attached to the graph (call `backward` on it).
    pub total: Tensor,
    /// The BCE term (scalar tensor).
    pub bce: Tensor,
    /// The Dice term (scalar tensor).
    pub dice: Tensor,
    /// The pairs in order: (sample, 1-based class).
    pub pairs: Vec<(usize, usize)>,
    /// BCE of each pair, `(P,)` (detached).
    pub bce_per_pair: Tensor,
    /// Dice loss of each pair, `(P,)` (detached).
    pub dice_per_pair: Tensor,
}

/// The partial-label loss.
///
/// `logits` and `target` are `(B, K, D, H, W)`; `classes[b]` lists the 1-based classes that
/// sample `b` supervises (its dataset's class list, [`crate::data::presets`]). Target values of supervised
/// channels are 0 or 1; other channels are ignored whatever they hold.
///
/// BCE of a pair is the mean over its voxels of `max(x, 0) − x·t + ln(1 + e^{−|x|})`; the
/// Dice loss of a pair is `1 − 2 Σ p·t / (Σ p + Σ t + 1)` with `p = σ(x)`, per slice or per
/// volume; each term is the mean over all pairs of the batch.
///
/// # Errors
/// Shape mismatches, a class out of range, or a batch with no supervised pair.
pub fn partial_label_loss(
    logits: &Tensor,
    target: &Tensor,
    classes: &[Vec<usize>],
    mode: DiceMode,
) -> Result<LossParts> {
    if matches!(logits.device(), candle_core::Device::Cpu) && logits.dtype() == DType::F32 {
        return fused::loss(logits, target, classes, mode);
    }
    partial_label_loss_composed(logits, target, classes, mode)
}

/// Checks shapes and class lists; returns the pairs (sample, class).
fn pairs_of(
    logits: &Tensor,
    target: &Tensor,
    classes: &[Vec<usize>],
) -> Result<Vec<(usize, usize)>> {
    let (b, k, _, _, _) = logits.dims5()?;
    if target.dims() != logits.dims() {
        return Err(Error::shape(
            "partial-label loss",
            format!(
                "logits {:?} and target {:?} differ",
                logits.dims(),
                target.dims()
            ),
        ));
    }
    if classes.len() != b {
        return Err(Error::shape(
            "partial-label loss",
            format!("{} class lists for a batch of {b}", classes.len()),
        ));
    }
    let mut pairs = Vec::new();
    for (i, list) in classes.iter().enumerate() {
        if let Some(c) = list.iter().find(|c| **c == 0 || **c > k) {
            return Err(Error::shape(
                "partial-label loss",
                format!("class {c} of sample {i} is outside 1..={k}"),
            ));
        }
        pairs.extend(list.iter().map(|c| (i, *c)));
    }
    if pairs.is_empty() {
        return Err(Error::shape(
            "partial-label loss",
            "no sample supervises any class",
        ));
    }
    Ok(pairs)
}

/// [`partial_label_loss`] with candle operations only (any device; keeps its intermediate
/// tensors for autograd). The CPU uses a fused operation with the same values.
///
/// # Errors
/// As [`partial_label_loss`].
pub fn partial_label_loss_composed(
    logits: &Tensor,
    target: &Tensor,
    classes: &[Vec<usize>],
    mode: DiceMode,
) -> Result<LossParts> {
    let (_, _, d, h, w) = logits.dims5()?;
    let pairs = pairs_of(logits, target, classes)?;
    let mut xs = Vec::new();
    let mut ts = Vec::new();
    for (i, list) in classes.iter().enumerate() {
        if list.is_empty() {
            continue;
        }
        let idx: Vec<u32> = list.iter().map(|c| (*c - 1) as u32).collect();
        let idx = Tensor::from_vec(idx, list.len(), logits.device())?;
        xs.push(logits.get(i)?.index_select(&idx, 0)?);
        ts.push(target.get(i)?.index_select(&idx, 0)?);
    }
    let p = pairs.len();
    let x = Tensor::cat(&xs, 0)?.reshape((p, d * h * w))?;
    let t = Tensor::cat(&ts, 0)?
        .detach()
        .to_dtype(DType::F32)?
        .reshape((p, d * h * w))?;
    // Stable BCE with logits.
    let softplus = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    let bce = (x.relu()? - (&x * &t)?)?.add(&softplus)?.mean(1)?; // (P,)
    let prob = candle_nn::ops::sigmoid(&x)?;
    let (slices, per) = match mode {
        DiceMode::PerSlice => (d, h * w),
        DiceMode::PerVolume => (1, d * h * w),
    };
    let prob = prob.reshape((p, slices, per))?;
    let t3 = t.reshape((p, slices, per))?;
    let inter = (&prob * &t3)?.sum(2)?;
    let den = (prob.sum(2)? + t3.sum(2)?)?.affine(1.0, 1.0)?;
    let dice = (inter.affine(2.0, 0.0)? / den)?
        .affine(-1.0, 1.0)?
        .mean(1)?; // (P,)
    let bce_term = bce.mean(0)?;
    let dice_term = dice.mean(0)?;
    let total = (&bce_term + &dice_term)?;
    Ok(LossParts {
        total,
        bce: bce_term,
        dice: dice_term,
        pairs,
        bce_per_pair: bce.detach(),
        dice_per_pair: dice.detach(),
    })
}

mod fused {
    //! The loss as one CPU operation: its output is the per-pair BCE and Dice values, and its
    //! backward pass writes the gradient of the logits directly (zero outside the supervised
    //! channels), without the dozen `(pairs, voxels)` intermediates of the composed version.

    use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
    use rayon::prelude::*;

    use univ_model::ops::{storage_f32, with_f32_slices};

    use super::{DiceMode, LossParts, pairs_of};
    use crate::error::Result;

    struct LossOp {
        pairs: Vec<(usize, usize)>,
        k: usize,
        slices: usize,
        per: usize,
    }

    #[inline]
    fn sigmoid(x: f32) -> f64 {
        1.0 / (1.0 + (-f64::from(x)).exp())
    }

    /// Per pair: (BCE mean, Dice loss, per-slice (I, S + T + 1)).
    fn pair_stats(x: &[f32], t: &[f32], slices: usize, per: usize) -> (f64, f64, Vec<(f64, f64)>) {
        let mut bce = 0f64;
        let mut sl = Vec::with_capacity(slices);
        for s in 0..slices {
            let (mut i, mut ps, mut ts) = (0f64, 0f64, 0f64);
            for j in s * per..(s + 1) * per {
                let xv = f64::from(x[j]);
                let tv = f64::from(t[j]);
                bce += xv.max(0.0) - xv * tv + (-xv.abs()).exp().ln_1p();
                let p = sigmoid(x[j]);
                i += p * tv;
                ps += p;
                ts += tv;
            }
            sl.push((i, ps + ts + 1.0));
        }
        let dice = sl.iter().map(|(i, den)| 1.0 - 2.0 * i / den).sum::<f64>() / slices as f64;
        (bce / (slices * per) as f64, dice, sl)
    }

    impl CustomOp2 for LossOp {
        fn name(&self) -> &'static str {
            "partial-label-loss"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let x = storage_f32(s1, l1, "partial-label loss logits")?;
            let t = storage_f32(s2, l2, "partial-label loss target")?;
            let v = self.slices * self.per;
            let stats: Vec<(f64, f64)> = self
                .pairs
                .par_iter()
                .map(|(b, c)| {
                    let off = (b * self.k + c - 1) * v;
                    let (bce, dice, _) =
                        pair_stats(&x[off..off + v], &t[off..off + v], self.slices, self.per);
                    (bce, dice)
                })
                .collect();
            let p = self.pairs.len();
            let mut out = vec![0f32; 2 * p];
            for (i, (bce, dice)) in stats.iter().enumerate() {
                out[i] = *bce as f32;
                out[p + i] = *dice as f32;
            }
            Ok((CpuStorage::F32(out), Shape::from(vec![2 * p])))
        }

        fn bwd(
            &self,
            logits: &Tensor,
            target: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
            let g = grad.to_vec1::<f32>()?;
            let dx = with_f32_slices(&[logits, target], |s| self.backward(s[0], s[1], &g))?;
            Ok((
                Some(Tensor::from_vec(dx, logits.shape(), logits.device())?),
                None,
            ))
        }
    }

    impl LossOp {
        /// The gradient of the logits given the gradient `g` of the per-pair values.
        fn backward(&self, x: &[f32], t: &[f32], g: &[f32]) -> Vec<f32> {
            let p = self.pairs.len();
            let v = self.slices * self.per;
            let mut dx = vec![0f32; x.len()];
            // Each pair owns one channel of one sample: disjoint slices of dx.
            let mut owners: Vec<Option<usize>> = vec![None; x.len() / v];
            for (i, (b, c)) in self.pairs.iter().enumerate() {
                owners[b * self.k + c - 1] = Some(i);
            }
            dx.par_chunks_mut(v).enumerate().for_each(|(ch, dst)| {
                let Some(i) = owners[ch] else {
                    return;
                };
                let off = ch * v;
                let (xs, ts) = (&x[off..off + v], &t[off..off + v]);
                let (_, _, sl) = pair_stats(xs, ts, self.slices, self.per);
                let gb = f64::from(g[i]) / v as f64;
                let gd = f64::from(g[p + i]) / self.slices as f64;
                for s in 0..self.slices {
                    let (inter, den) = sl[s];
                    for j in s * self.per..(s + 1) * self.per {
                        let pr = sigmoid(xs[j]);
                        let tv = f64::from(ts[j]);
                        let d_dice = -2.0 * (tv * den - inter) / (den * den);
                        dst[j] = (gb * (pr - tv) + gd * d_dice * pr * (1.0 - pr)) as f32;
                    }
                }
            });
            dx
        }
    }

    pub(super) fn loss(
        logits: &Tensor,
        target: &Tensor,
        classes: &[Vec<usize>],
        mode: DiceMode,
    ) -> Result<LossParts> {
        let pairs = pairs_of(logits, target, classes)?;
        let (_, k, d, h, w) = logits.dims5()?;
        let (slices, per) = match mode {
            DiceMode::PerSlice => (d, h * w),
            DiceMode::PerVolume => (1, d * h * w),
        };
        let op = LossOp {
            pairs: pairs.clone(),
            k,
            slices,
            per,
        };
        let target = target.detach().to_dtype(DType::F32)?.contiguous()?;
        let out = logits.contiguous()?.apply_op2(&target, op)?;
        let p = pairs.len();
        let bce = out.narrow(0, 0, p)?;
        let dice = out.narrow(0, p, p)?;
        let bce_term = bce.mean(0)?;
        let dice_term = dice.mean(0)?;
        let total = (&bce_term + &dice_term)?;
        Ok(LossParts {
            total,
            bce: bce_term,
            dice: dice_term,
            pairs,
            bce_per_pair: bce.detach(),
            dice_per_pair: dice.detach(),
        })
    }
}
