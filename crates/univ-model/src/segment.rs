//! Segmentation of a whole volume: preprocessing, sliding-window inference, thresholds,
//! post-processing, and mapping the masks back onto the input grid.

use std::time::Instant;

use candle_core::Device;
use univ_io::{ClassMask, Interpolation, PreprocessOptions, PreprocessRecord, Volume};

use crate::error::{Error, Result};
use crate::inferers::{SlidingWindowOptions, sliding_window_inference, volume_to_network_layout};
use crate::nets::UniversalModel;
use crate::postprocess::{PostprocessOptions, organ_post_process_masks};

/// Universal classes whose lesions are reported (tumours and the kidney cyst).
pub const LESION_CLASSES: [usize; 7] = [26, 27, 28, 29, 30, 31, 32];

/// Settings of [`segment`]; [`Default`] gives the official pipeline for all classes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SegmentOptions {
    /// Preprocessing (the official one by default); `None` when the volume is already
    /// preprocessed (RAS, 1.5 mm, intensities in [0, 1]); results then stay on its grid.
    pub preprocess: Option<PreprocessOptions>,
    /// Sliding-window settings.
    pub window: SlidingWindowOptions,
    /// Universal class ids (1-based rows of the model's embeddings) to compute; empty = all.
    pub classes: Vec<usize>,
    /// Probability threshold per class id (strict `>`); classes not listed use 0.5.
    pub thresholds: Vec<(usize, f32)>,
    /// Post-processing rules.
    pub postprocess: PostprocessOptions,
    /// Keep the sigmoid probabilities (quantised to 0..=255) on the input grid.
    pub keep_probabilities: bool,
    /// Keep the stitched logits on the network grid.
    pub keep_logits: bool,
    /// The device the network runs on.
    pub device: Device,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions {
            preprocess: Some(PreprocessOptions::universal_model()),
            window: SlidingWindowOptions::default(),
            classes: Vec::new(),
            thresholds: Vec::new(),
            postprocess: PostprocessOptions::default(),
            keep_probabilities: false,
            keep_logits: false,
            device: Device::Cpu,
        }
    }
}

/// The stitched logits of every computed class on the network grid.
#[derive(Debug, Clone)]
pub struct NetworkLogits {
    /// `(K, X, Y, Z)` in C order (Z fastest).
    pub data: Vec<f32>,
    /// `[K, X, Y, Z]`.
    pub shape: [usize; 4],
}

/// Probabilities (× 255) of some voxels of a grid of `n`: (voxel, value) pairs while they take
/// less room than one byte per voxel, then a whole map (so never more than `n` bytes).
enum SparseProbs {
    Pairs(usize, Vec<u32>, Vec<u8>),
    Dense(Vec<u8>),
}

impl SparseProbs {
    fn new(n: usize) -> Self {
        SparseProbs::Pairs(n, Vec::new(), Vec::new())
    }

    fn set(&mut self, v: usize, p: u8) {
        match self {
            SparseProbs::Pairs(n, idx, val) => {
                // Five bytes a pair, plus the vectors' spare capacity: go dense at n/10 pairs.
                if idx.len() >= *n / 10 {
                    let mut dense =
                        std::mem::replace(self, SparseProbs::Dense(Vec::new())).into_dense();
                    dense[v] = p;
                    *self = SparseProbs::Dense(dense);
                } else {
                    idx.push(v as u32);
                    val.push(p);
                }
            }
            SparseProbs::Dense(d) => d[v] = p,
        }
    }

    fn into_dense(self) -> Vec<u8> {
        match self {
            SparseProbs::Pairs(n, idx, val) => {
                let mut d = vec![0u8; n];
                for (v, p) in idx.into_iter().zip(val) {
                    d[v as usize] = p;
                }
                d
            }
            SparseProbs::Dense(d) => d,
        }
    }
}

/// What [`segment`] produces.
#[derive(Debug, Clone)]
pub struct Segmentation {
    /// The computed class ids, in output order.
    pub classes: Vec<usize>,
    /// The label map on the input grid, with the input's geometry: class ids painted in
    /// increasing order, so tumours and cysts (26–32) lie over their organ; 0 elsewhere.
    pub label_map: Volume<u8>,
    /// One mask per class on the input grid (compact: bits over its bounding box).
    pub masks: Vec<ClassMask>,
    /// Sigmoid probabilities × 255 on the input grid, per class, when asked for
    /// ([`SegmentOptions::keep_probabilities`]).
    pub probabilities: Vec<Option<Volume<u8>>>,
    /// For the lesion classes (26–32): the probability × 255 at each voxel of the class's
    /// mask, in [`ClassMask::voxels`] order (for the lesion report); `None` for other classes.
    pub lesion_probabilities: Vec<Option<Vec<u8>>>,
    /// The logits on the network grid, when asked for.
    pub logits: Option<NetworkLogits>,
    /// What preprocessing did (absent without preprocessing).
    pub record: Option<PreprocessRecord>,
    /// Number of windows run.
    pub windows: usize,
    /// Seconds per stage, in order.
    pub timings: Vec<(String, f64)>,
    /// The process's peak resident memory (bytes) at the end of each stage, in order (`None`
    /// where the system does not report it).
    pub peak_memory: Vec<(String, Option<u64>)>,
    /// Notes: rules that could not be applied, suspicious input.
    pub notes: Vec<String>,
}

fn sigmoid_u8(l: f32) -> u8 {
    let p = 1.0 / (1.0 + (-l).exp());
    (p * 255.0).round() as u8
}

/// Segments a CT volume (see the module docs). `progress(done, total)` is called after each
/// window.
///
/// # Errors
/// Preprocessing errors (no foreground, NaN voxels), invalid classes, model errors.
pub fn segment(
    image: &Volume<f32>,
    model: &UniversalModel,
    opts: &SegmentOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Segmentation> {
    let mut timings = Vec::new();
    let mut notes = Vec::new();
    let t = Instant::now();
    let k_all = model.config().num_classes;
    let classes: Vec<usize> = if opts.classes.is_empty() {
        (1..=k_all).collect()
    } else {
        opts.classes.clone()
    };
    let model = if classes.len() == k_all && classes.iter().enumerate().all(|(i, c)| *c == i + 1) {
        model.clone()
    } else {
        model.select_classes(&classes)?
    };
    let (pre_image, record) = match &opts.preprocess {
        Some(p) => {
            let pre = univ_io::preprocess(image.clone(), None, p)
                .map_err(|e| Error::Config(e.to_string()))?;
            (pre.image, Some(pre.record))
        }
        None => {
            let (lo, hi) = image.min_max();
            if lo < -0.01 || hi > 1.01 {
                notes.push(format!(
                    "the volume's intensities span {lo}..{hi}, not the preprocessed 0..1 range"
                ));
            }
            (image.clone(), None)
        }
    };
    timings.push(("preprocess".to_string(), t.elapsed().as_secs_f64()));
    let mut peak_memory = vec![(
        "preprocess".to_string(),
        crate::runtime::peak_resident_bytes(),
    )];

    let t = Instant::now();
    let dims = pre_image.shape();
    let n = dims.iter().product::<usize>();
    let k = classes.len();
    let threshold = |c: usize| {
        opts.thresholds
            .iter()
            .find(|(id, _)| *id == c)
            .map_or(0.5f32, |(_, t)| *t)
    };
    // Threshold on the logit: sigmoid(l) > t  <=>  l > logit(t).
    let cut: Vec<f32> = classes
        .iter()
        .map(|c| {
            let t = threshold(*c).clamp(1e-6, 1.0 - 1e-6);
            (t / (1.0 - t)).ln()
        })
        .collect();
    // Probability maps: whole ones when asked for; for the lesion classes otherwise only at the
    // voxels over the threshold (post-processing only removes voxels, so that covers the final
    // masks), as (voxel, probability × 255) pairs.
    let keep_prob: Vec<bool> = classes.iter().map(|_| opts.keep_probabilities).collect();
    let lesion: Vec<bool> = classes.iter().map(|c| LESION_CLASSES.contains(c)).collect();
    let sparse_ok = u32::try_from(n).is_ok();
    let mut sparse_probs: Vec<SparseProbs> = (0..k).map(|_| SparseProbs::new(n)).collect();
    // One bit per voxel and class while the windows run (32 classes of a 10-million-voxel
    // grid: 42 MB instead of 335 MB of booleans); unpacked for the post-processing, when the
    // network's memory is free again.
    let words = n.div_ceil(64);
    let mut masks_pre: Vec<Vec<u64>> = vec![vec![0u64; words]; k];
    let mut probs_pre: Vec<Vec<u8>> = keep_prob
        .iter()
        .zip(&lesion)
        .map(|(keep, les)| {
            if *keep || (*les && !sparse_ok) {
                vec![0u8; n]
            } else {
                Vec::new()
            }
        })
        .collect();
    let mut logits = opts.keep_logits.then(|| vec![0f32; k * n]);
    let input = volume_to_network_layout(&pre_image);
    let mut windows = 0;
    let (nx, ny, nz) = (dims[0], dims[1], dims[2]);
    sliding_window_inference(
        &input,
        dims,
        &opts.window,
        &opts.device,
        |x| model.forward(x),
        |x0, planes| {
            let m = planes.len() / (k * ny * nz);
            for c in 0..k {
                for i in 0..m {
                    let x = x0 + i;
                    for y in 0..ny {
                        let src = ((c * m + i) * ny + y) * nz;
                        for z in 0..nz {
                            let l = planes[src + z];
                            let v = x + nx * (y + ny * z);
                            if l > cut[c] {
                                masks_pre[c][v / 64] |= 1 << (v % 64);
                            }
                            if !probs_pre[c].is_empty() {
                                probs_pre[c][v] = sigmoid_u8(l);
                            } else if lesion[c] && l > cut[c] {
                                sparse_probs[c].set(v, sigmoid_u8(l));
                            }
                        }
                        if let Some(buf) = logits.as_mut() {
                            let dst = ((c * nx + x) * ny + y) * nz;
                            buf[dst..dst + nz].copy_from_slice(&planes[src..src + nz]);
                        }
                    }
                }
            }
            Ok(())
        },
        |d, total| {
            windows = d;
            progress(d, total)
        },
    )?;
    timings.push(("sliding window".to_string(), t.elapsed().as_secs_f64()));
    peak_memory.push((
        "sliding window".into(),
        crate::runtime::peak_resident_bytes(),
    ));

    // Post-processing by universal class id.
    let t = Instant::now();
    let max_id = classes.iter().copied().max().unwrap_or(0).max(32);
    let mut by_id: Vec<ClassMask> = vec![ClassMask::empty(dims); max_id];
    for (c, m) in classes.iter().zip(masks_pre) {
        by_id[c - 1] = ClassMask::from_fn(dims, |v| m[v / 64] >> (v % 64) & 1 == 1);
    }
    let mut order = classes.clone();
    order.sort_unstable();
    for (tumour, organs) in [(26usize, [2usize, 3].as_slice()), (27, [6].as_slice())] {
        if opts.postprocess.tumour_in_organ
            && classes.contains(&tumour)
            && !organs.iter().all(|o| classes.contains(o))
        {
            notes.push(format!("class {tumour} is kept only inside its organ (classes {organs:?}), which was not computed: it will be empty"));
        }
    }
    let (processed, pnotes) = organ_post_process_masks(&by_id, dims, &order, &opts.postprocess);
    drop(by_id);
    notes.extend(pnotes);
    timings.push(("post-process".to_string(), t.elapsed().as_secs_f64()));
    peak_memory.push(("post-process".into(), crate::runtime::peak_resident_bytes()));

    // Back onto the input grid.
    let t = Instant::now();
    let to_input = |data: Vec<u8>| -> Result<Volume<u8>> {
        let v = pre_image
            .with_data(data)
            .map_err(|e| Error::Config(e.to_string()))?;
        match &record {
            Some(r) => r
                .invert(&v, Interpolation::Nearest)
                .map_err(|e| Error::Config(e.to_string())),
            None => Ok(v),
        }
    };
    let mut masks = Vec::with_capacity(k);
    let mut probabilities = Vec::with_capacity(k);
    let mut lesion_probabilities = Vec::with_capacity(k);
    // Painted in increasing class order; the first class's volume gives the input grid.
    let mut paint: Vec<usize> = (0..k).collect();
    paint.sort_by_key(|i| classes[*i]);
    let mut label_map: Option<Volume<u8>> = None;
    for (i, c) in classes.iter().enumerate() {
        let m = to_input(processed[c - 1].to_u8())?;
        let mask = ClassMask::from_u8(m.data(), m.shape());
        if label_map.is_none() {
            label_map = Some(
                m.with_data(vec![0u8; m.len()])
                    .map_err(|e| Error::Config(e.to_string()))?,
            );
        }
        let full = std::mem::take(&mut probs_pre[i]);
        let full = if full.is_empty() {
            None
        } else {
            Some(to_input(full)?)
        };
        lesion_probabilities.push(if !lesion[i] {
            None
        } else if let Some(p) = &full {
            Some(mask.voxels().map(|v| p.data()[v]).collect())
        } else {
            // The pairs put back on a transient map, taken to the input grid, read at the mask.
            let dense = std::mem::replace(&mut sparse_probs[i], SparseProbs::new(0)).into_dense();
            let p = to_input(dense)?;
            Some(mask.voxels().map(|v| p.data()[v]).collect())
        });
        probabilities.push(if keep_prob[i] { full } else { None });
        masks.push(mask);
    }
    let mut label_map = match label_map {
        Some(l) => l,
        None => to_input(vec![0u8; n])?,
    };
    {
        let lab = label_map.data_mut();
        for i in paint {
            let id = classes[i].min(255) as u8;
            for v in masks[i].voxels() {
                lab[v] = id;
            }
        }
    }
    timings.push((
        "map back to the input grid".to_string(),
        t.elapsed().as_secs_f64(),
    ));
    peak_memory.push((
        "map back to the input grid".into(),
        crate::runtime::peak_resident_bytes(),
    ));
    Ok(Segmentation {
        classes,
        label_map,
        masks,
        probabilities,
        lesion_probabilities,
        logits: logits.map(|data| NetworkLogits {
            data,
            shape: [k, nx, ny, nz],
        }),
        record,
        windows,
        timings,
        peak_memory,
        notes,
    })
}
