//! Segmentation of a whole volume: preprocessing, sliding-window inference, thresholds,
//! post-processing, and mapping the masks back onto the input grid.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use univ_io::{ClassMask, Interpolation, PreprocessOptions, PreprocessRecord, Volume};

use crate::classes::{ClassInfo, UNIVERSAL_COUNT};
use crate::error::{Error, Result};
use crate::inferers::{
    SlidingWindowOptions, sliding_window_inference, sliding_window_inference_on_device,
    volume_to_network_layout,
};
use crate::nets::UniversalModel;
use crate::postprocess::{PostprocessOptions, organ_post_process_masks};

/// Settings of [`segment`]; [`Default`] gives the official pipeline for all classes.
#[derive(Debug, Clone)]
pub struct SegmentOptions {
    /// Preprocessing (the official one by default); `None` when the volume is already
    /// preprocessed (RAS, 1.5 mm, intensities in [0, 1]); results then stay on its grid.
    pub preprocess: Option<PreprocessOptions>,
    /// Sliding-window settings.
    pub window: SlidingWindowOptions,
    /// Class ids of the model's class table to compute, in output order; empty = the classes
    /// the checkpoint was trained on ([`crate::ClassInfo::trained`]).
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
    /// Limits on every grid the segmentation makes (preprocessing, the blend, the kept maps,
    /// the mapping back); they replace those of [`preprocess`](Self::preprocess) and
    /// [`window`](Self::window).
    pub limits: univ_io::Limits,
    /// A token that stops the segmentation before its next window when cancelled (from
    /// another thread, or a progress callback); [`segment`] then returns
    /// [`Error::Cancelled`]. `None`: not cancellable.
    pub cancel: Option<Cancel>,
}

/// A cancellation token shared between the work and whoever may stop it: clones share one
/// flag.
#[derive(Debug, Clone, Default)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels the work holding this token (or a clone of it).
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// `true` once [`cancel`](Self::cancel) was called on it or a clone.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
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
            limits: univ_io::Limits::default(),
            cancel: None,
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

/// The result of one class.
#[derive(Debug, Clone)]
pub struct ClassResult {
    /// The class (id, name, kind, ...).
    pub info: ClassInfo,
    /// Its mask on the input grid (compact: bits over its bounding box).
    pub mask: ClassMask,
    /// Sigmoid probabilities × 255 on the input grid, when asked for
    /// ([`SegmentOptions::keep_probabilities`]).
    pub probabilities: Option<Volume<u8>>,
    /// For lesion classes (tumours, cysts): the probability × 255 at each voxel of the mask,
    /// in [`ClassMask::voxels`] order (for the lesion report); `None` for other classes.
    pub lesion_probabilities: Option<Vec<u8>>,
}

impl ClassResult {
    /// The class id.
    pub fn id(&self) -> usize {
        self.info.id
    }

    /// The display name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Voxels in the mask.
    pub fn voxels(&self) -> usize {
        self.mask.count()
    }
}

/// What [`segment`] produces.
#[derive(Debug, Clone)]
pub struct Segmentation {
    /// The computed classes, in output order.
    pub classes: Vec<ClassResult>,
    /// The label map on the input grid, with the input's geometry: class ids painted in
    /// increasing order, so tumours and cysts (26–32) lie over their organ; 0 elsewhere.
    pub label_map: Volume<u8>,
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
    /// The GPU's memory at the end of the sliding window, its pool's peak counted from the
    /// window's start (`None` on the CPU; see [`crate::runtime::gpu_memory`]).
    pub gpu_memory: Option<crate::runtime::GpuMemory>,
    /// Notes: rules that could not be applied, suspicious input.
    pub notes: Vec<String>,
}

/// What the blended planes of logits leave behind while the windows run: a bit per voxel and
/// class over the threshold, the probabilities that are kept (whole maps, or pairs at the
/// lesion classes' voxels over the threshold), the logits when asked for.
struct Absorbed {
    dims: [usize; 3],
    masks: Vec<Vec<u64>>,
    probs: Vec<Vec<u8>>,
    sparse: Vec<SparseProbs>,
    lesion: Vec<bool>,
    logits: Option<Vec<f32>>,
}

impl Absorbed {
    /// Takes planes `x0..x0+m` of every class, `(K, m, Y, Z)` in C order, read through
    /// `above(c, i)` (element `i` over class `c`'s threshold) and `prob(c, i)` (its probability
    /// × 255), with the logits themselves when they are kept.
    fn planes(
        &mut self,
        x0: usize,
        m: usize,
        above: impl Fn(usize, usize) -> bool,
        prob: impl Fn(usize, usize) -> u8,
        planes: Option<&[f32]>,
    ) {
        let [nx, ny, nz] = self.dims;
        for c in 0..self.masks.len() {
            for i in 0..m {
                let x = x0 + i;
                for y in 0..ny {
                    let src = ((c * m + i) * ny + y) * nz;
                    for z in 0..nz {
                        let over = above(c, src + z);
                        let v = x + nx * (y + ny * z);
                        if over {
                            self.masks[c][v / 64] |= 1 << (v % 64);
                        }
                        if !self.probs[c].is_empty() {
                            self.probs[c][v] = prob(c, src + z);
                        } else if self.lesion[c] && over {
                            self.sparse[c].set(v, prob(c, src + z));
                        }
                    }
                    if let (Some(buf), Some(planes)) = (self.logits.as_mut(), planes) {
                        let dst = ((c * nx + x) * ny + y) * nz;
                        buf[dst..dst + nz].copy_from_slice(&planes[src..src + nz]);
                    }
                }
            }
        }
    }
}

fn sigmoid_u8(l: f32) -> u8 {
    let p = 1.0 / (1.0 + (-l).exp());
    (p * 255.0).round() as u8
}

impl Segmentation {
    /// The result of a class given by id (`"6"`), name, slug or prompt name (`"liver"`,
    /// `"Liver Tumor"`, `"liver_tumor"`).
    pub fn class(&self, name_or_id: &str) -> Option<&ClassResult> {
        self.classes.iter().find(|c| c.info.matches(name_or_id))
    }

    /// The result of a class id.
    pub fn class_by_id(&self, id: usize) -> Option<&ClassResult> {
        self.classes.iter().find(|c| c.info.id == id)
    }

    /// The computed class ids, in output order.
    pub fn ids(&self) -> Vec<usize> {
        self.classes.iter().map(ClassResult::id).collect()
    }

    /// The volume of one voxel of the input grid, in mL.
    pub fn voxel_volume_ml(&self) -> f64 {
        let m = univ_io::geometry::linear_part(self.label_map.affine());
        univ_io::geometry::det3(&m).abs() / 1000.0
    }

    /// The volume of a class's mask in mL (`None` for a class not computed).
    pub fn volume_ml(&self, name_or_id: &str) -> Option<f64> {
        self.class(name_or_id)
            .map(|c| c.voxels() as f64 * self.voxel_volume_ml())
    }
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
    let table = model.classes().clone();
    // By default the classes the checkpoint was trained on; others only when asked for by
    // name, and then with a note.
    let classes: Vec<usize> = if opts.classes.is_empty() {
        table.trained_ids()
    } else {
        opts.classes.clone()
    };
    if classes.is_empty() {
        return Err(Error::Config(
            "the checkpoint names no class it was trained on; ask for classes explicitly".into(),
        ));
    }
    let mut rows = Vec::with_capacity(classes.len());
    for c in &classes {
        let row = table.row_of(*c).ok_or_else(|| {
            Error::Config(format!(
                "class {c} is not one of the model's classes ({})",
                table.describe()
            ))
        })?;
        rows.push(row + 1);
    }
    for c in classes
        .iter()
        .filter_map(|c| table.get(*c))
        .filter(|c| !c.trained)
    {
        notes.push(format!(
            "class {} ({}) was not trained by this checkpoint: its mask is not meaningful",
            c.id, c.name
        ));
    }
    let infos: Vec<ClassInfo> = rows
        .iter()
        .map(|r| table.row(r - 1).expect("a row").clone())
        .collect();
    let model = if rows.len() == table.len() && rows.iter().enumerate().all(|(i, r)| *r == i + 1) {
        model.clone()
    } else {
        model.select_classes(&rows)?
    };
    let (pre_image, record) = match &opts.preprocess {
        Some(p) => {
            let p = PreprocessOptions {
                limits: opts.limits,
                ..p.clone()
            };
            let pre = univ_io::preprocess(image.clone(), None, &p)?;
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
    // The maps kept whole: logits (f32) and probabilities (u8) of every computed class.
    if opts.keep_logits {
        opts.limits
            .check_grid("the kept logits", [k * dims[0], dims[1], dims[2]], 4)?;
    }
    if opts.keep_probabilities {
        opts.limits
            .check_grid("the kept probabilities", [k * dims[0], dims[1], dims[2]], 1)?;
    }
    let window = SlidingWindowOptions {
        limits: opts.limits,
        ..opts.window
    };
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
    let lesion: Vec<bool> = infos.iter().map(ClassInfo::is_lesion).collect();
    let sparse_ok = u32::try_from(n).is_ok();
    // One bit per voxel and class while the windows run (32 classes of a 10-million-voxel
    // grid: 42 MB instead of 335 MB of booleans); unpacked for the post-processing, when the
    // network's memory is free again.
    let mut acc = Absorbed {
        dims,
        masks: vec![vec![0u64; n.div_ceil(64)]; k],
        probs: keep_prob
            .iter()
            .zip(&lesion)
            .map(|(keep, les)| {
                if *keep || (*les && !sparse_ok) {
                    vec![0u8; n]
                } else {
                    Vec::new()
                }
            })
            .collect(),
        sparse: (0..k).map(|_| SparseProbs::new(n)).collect(),
        lesion: lesion.clone(),
        logits: opts.keep_logits.then(|| vec![0f32; k * n]),
    };
    let input = volume_to_network_layout(&pre_image);
    let mut windows = 0;
    let (nx, ny, nz) = (dims[0], dims[1], dims[2]);
    let predictor = |x: &Tensor| {
        if opts.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
            return Err(Error::Cancelled);
        }
        model.forward(x)
    };
    let on_device = window.blend_on_device.unwrap_or(!opts.device.is_cpu());
    crate::runtime::reset_gpu_peak(&opts.device);
    if on_device {
        // Only the masks (one byte a voxel), the probabilities that are kept and the logits
        // when asked for come back from the device.
        let dev = &opts.device;
        let cuts = Tensor::from_slice(&cut, (k, 1, 1, 1), dev)?;
        let any_prob = acc.probs.iter().any(|p| !p.is_empty()) || lesion.iter().any(|l| *l);
        let keep_logits = opts.keep_logits;
        let vol = Tensor::from_vec(input, (nx, ny, nz), dev)?;
        sliding_window_inference_on_device(
            &vol,
            &window,
            predictor,
            |x0, planes| {
                let m = planes.dim(1)?;
                let over = planes.broadcast_gt(&cuts)?.flatten_all()?.to_vec1::<u8>()?;
                let probs = if any_prob {
                    (planes.neg()?.exp()? + 1.0)?
                        .recip()?
                        .affine(255.0, 0.0)?
                        .round()?
                        .to_dtype(DType::U8)?
                        .flatten_all()?
                        .to_vec1::<u8>()?
                } else {
                    Vec::new()
                };
                let host = if keep_logits {
                    Some(crate::ops::to_f32_vec(planes)?)
                } else {
                    None
                };
                acc.planes(x0, m, |_, i| over[i] != 0, |_, i| probs[i], host.as_deref());
                Ok(())
            },
            |d, total| {
                windows = d;
                progress(d, total)
            },
        )?;
    } else {
        sliding_window_inference(
            &input,
            dims,
            &window,
            &opts.device,
            predictor,
            |x0, planes| {
                acc.planes(
                    x0,
                    planes.len() / (k * ny * nz),
                    |c, i| planes[i] > cut[c],
                    |_, i| sigmoid_u8(planes[i]),
                    Some(planes),
                );
                Ok(())
            },
            |d, total| {
                windows = d;
                progress(d, total)
            },
        )?;
    }
    let gpu_memory = crate::runtime::gpu_memory(&opts.device);
    timings.push(("sliding window".to_string(), t.elapsed().as_secs_f64()));
    peak_memory.push((
        "sliding window".into(),
        crate::runtime::peak_resident_bytes(),
    ));

    // Post-processing by class id.
    let t = Instant::now();
    let max_id = classes
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(UNIVERSAL_COUNT);
    let mut by_id: Vec<ClassMask> = vec![ClassMask::empty(dims); max_id];
    let Absorbed {
        masks: masks_pre,
        probs: mut probs_pre,
        sparse: mut sparse_probs,
        logits,
        ..
    } = acc;
    for (c, m) in classes.iter().zip(masks_pre) {
        by_id[c - 1] = ClassMask::from_fn(dims, |v| m[v / 64] >> (v % 64) & 1 == 1);
    }
    let mut order = classes.clone();
    order.sort_unstable();
    for rule in &opts.postprocess.tumour_in_organ {
        if classes.contains(&rule.tumour) && !rule.organs.iter().all(|o| classes.contains(o)) {
            notes.push(format!(
                "class {} is kept only inside its organ (classes {:?}), which was not \
                 computed: it will be empty",
                rule.tumour, rule.organs
            ));
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
        let v = pre_image.with_data(data)?;
        Ok(match &record {
            Some(r) => r.invert(&v, Interpolation::Nearest)?,
            None => v,
        })
    };
    let mut results: Vec<ClassResult> = Vec::with_capacity(k);
    // Painted in increasing class order; the first class's volume gives the input grid.
    let mut paint: Vec<usize> = (0..k).collect();
    paint.sort_by_key(|i| classes[*i]);
    let mut label_map: Option<Volume<u8>> = None;
    for (i, c) in classes.iter().enumerate() {
        let m = to_input(processed[c - 1].to_u8())?;
        let mask = ClassMask::from_u8(m.data(), m.shape());
        if label_map.is_none() {
            label_map = Some(m.with_data(vec![0u8; m.len()])?);
        }
        let full = std::mem::take(&mut probs_pre[i]);
        let full = if full.is_empty() {
            None
        } else {
            Some(to_input(full)?)
        };
        let lesion_probabilities = if !lesion[i] {
            None
        } else if let Some(p) = &full {
            Some(mask.voxels().map(|v| p.data()[v]).collect())
        } else {
            // The pairs put back on a transient map, taken to the input grid, read at the mask.
            let dense = std::mem::replace(&mut sparse_probs[i], SparseProbs::new(0)).into_dense();
            let p = to_input(dense)?;
            Some(mask.voxels().map(|v| p.data()[v]).collect())
        };
        results.push(ClassResult {
            info: infos[i].clone(),
            mask,
            probabilities: if keep_prob[i] { full } else { None },
            lesion_probabilities,
        });
    }
    let mut label_map = match label_map {
        Some(l) => l,
        None => to_input(vec![0u8; n])?,
    };
    {
        let lab = label_map.data_mut();
        for i in paint {
            let id = classes[i].min(255) as u8;
            for v in results[i].mask.voxels() {
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
        classes: results,
        label_map,
        logits: logits.map(|data| NetworkLogits {
            data,
            shape: [k, nx, ny, nz],
        }),
        record,
        windows,
        timings,
        peak_memory,
        gpu_memory,
        notes,
    })
}
