//! The partial-label loss of the Universal Model (spec §6.1): binary cross-entropy with logits
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
/// sample `b` supervises (its dataset's class list, spec §4.4). Target values of supervised
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
    let (b, k, d, h, w) = logits.dims5()?;
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
    let mut xs = Vec::new();
    let mut ts = Vec::new();
    for (i, list) in classes.iter().enumerate() {
        if list.is_empty() {
            continue;
        }
        if let Some(c) = list.iter().find(|c| **c == 0 || **c > k) {
            return Err(Error::shape(
                "partial-label loss",
                format!("class {c} of sample {i} is outside 1..={k}"),
            ));
        }
        let idx: Vec<u32> = list.iter().map(|c| (*c - 1) as u32).collect();
        let idx = Tensor::from_vec(idx, list.len(), logits.device())?;
        xs.push(logits.get(i)?.index_select(&idx, 0)?);
        ts.push(target.get(i)?.index_select(&idx, 0)?);
        pairs.extend(list.iter().map(|c| (i, *c)));
    }
    if pairs.is_empty() {
        return Err(Error::shape(
            "partial-label loss",
            "no sample supervises any class",
        ));
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
