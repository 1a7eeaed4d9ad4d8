//! One training case made ready: read, labels mapped to universal classes, paired organs split
//! into right and left, reoriented, resampled and cropped as the official pipeline does
//! (the official label conventions of `data::presets` and the first, deterministic transforms
//! of the official training pipeline: orientation, spacing, intensity window, crop), and cached on disk.

use std::path::{Path, PathBuf};

use sha2::Digest;
use univ_io::{OrientTransform, PreprocessOptions, SpatialPad, Volume};

use crate::data::presets::{CropRule, TumourRule};
use crate::error::{Error, Result};

/// The label rules of one dataset (from a preset, possibly overridden by the manifest).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LabelRules {
    /// `label_map[r - 1]` = universal class of raw id `r` (0 drops it).
    pub label_map: Vec<usize>,
    /// Supervised classes.
    pub supervised: Vec<usize>,
    /// Organs split into right (class) and left (class + 1).
    pub rl_split: Vec<usize>,
    /// Tumour labels.
    pub tumours: Vec<TumourRule>,
    /// Crop rule.
    pub crop: CropRule,
    /// Random zoom applies.
    pub zoom: bool,
}

/// A case ready for patch sampling: arrays in C order (first axis slowest), on the RAS 1.5 mm
/// grid, cropped to the foreground and padded to at least the patch size.
#[derive(Debug, Clone)]
pub struct PreparedCase {
    /// `dataset/file name` of the image.
    pub id: String,
    /// Index of the dataset in the manifest.
    pub dataset: usize,
    /// `[X, Y, Z]`.
    pub shape: [usize; 3],
    /// Intensities in [0, 1].
    pub image: Vec<f32>,
    /// Universal organ class per voxel (tumours merged into their organ where the rules say).
    pub organ: Vec<u8>,
    /// Tumour class per voxel (0 = none).
    pub lesion: Vec<u8>,
    /// Supervised classes.
    pub supervised: Vec<usize>,
}

impl PreparedCase {
    /// Whether voxel `i` belongs to class `c` (organ channels include merged tumours).
    #[inline]
    pub fn is_class(&self, i: usize, c: usize) -> bool {
        self.organ[i] as usize == c || self.lesion[i] as usize == c
    }
}

/// Maps raw ids to (organ, lesion) maps following the rules.
fn map_labels(raw: &Volume<u8>, rules: &LabelRules, case: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut table = [(0u8, 0u8); 256];
    let mut known = [false; 256];
    known[0] = true;
    for (i, c) in rules.label_map.iter().enumerate() {
        let r = i + 1;
        if r > 255 || *c > 255 {
            return Err(Error::case(
                case,
                format!("label map entry {r} → {c} out of range"),
            ));
        }
        table[r] = (*c as u8, 0);
        known[r] = true;
    }
    for t in &rules.tumours {
        table[t.raw as usize] = (t.merge_into.unwrap_or(0) as u8, t.class as u8);
        known[t.raw as usize] = true;
    }
    let mut seen = [false; 256];
    for v in raw.data() {
        seen[*v as usize] = true;
    }
    if let Some(r) = (0..256).find(|r| seen[*r] && !known[*r]) {
        return Err(Error::case(
            case,
            format!(
                "label id {r} is not in the dataset's label map (ids 1..={} are mapped)",
                rules.label_map.len()
            ),
        ));
    }
    let organ = raw.data().iter().map(|v| table[*v as usize].0).collect();
    let lesion = raw.data().iter().map(|v| table[*v as usize].1).collect();
    Ok((organ, lesion))
}

/// Splits organ `c` into right (`c`) and left (`c + 1`): the two largest 26-connected
/// components are kept (smaller ones are erased), and the one lying more towards patient left
/// (smaller mean index along the RAS first axis) becomes `c + 1`. A single component stays `c`.
/// `organ` is in Fortran order on a RAS grid of `shape`.
pub fn rl_split(organ: &mut [u8], shape: [usize; 3], c: u8) {
    let mask: Vec<bool> = organ.iter().map(|v| *v == c).collect();
    let (labels, sizes) = univ_model::postprocess::label_components(&mask, shape);
    let n = sizes.len() - 1;
    if n == 0 {
        return;
    }
    let mut order: Vec<usize> = (1..=n).collect();
    order.sort_by(|a, b| sizes[*b].cmp(&sizes[*a]).then(a.cmp(b)));
    let keep: Vec<u32> = order.iter().take(2).map(|l| *l as u32).collect();
    let mut sum = [0f64; 2];
    let mut cnt = [0f64; 2];
    for (i, l) in labels.iter().enumerate() {
        if *l == 0 {
            continue;
        }
        match keep.iter().position(|k| k == l) {
            Some(j) => {
                sum[j] += (i % shape[0]) as f64;
                cnt[j] += 1.0;
            }
            None => organ[i] = 0,
        }
    }
    if keep.len() < 2 {
        return;
    }
    let mean = [sum[0] / cnt[0], sum[1] / cnt[1]];
    let left = if mean[0] < mean[1] { keep[0] } else { keep[1] };
    for (i, l) in labels.iter().enumerate() {
        if *l == left {
            organ[i] = c + 1;
        }
    }
}

fn fortran_to_c<T: Copy>(data: &[T], shape: [usize; 3]) -> Vec<T> {
    let [nx, ny, nz] = shape;
    let mut out = Vec::with_capacity(data.len());
    for x in 0..nx {
        for y in 0..ny {
            for z in 0..nz {
                out.push(data[x + nx * (y + ny * z)]);
            }
        }
    }
    out
}

/// Prepares one case: read → map labels → RAS → right/left split → 1.5 mm → intensity window
/// → crop to the foreground → pad to `min_size`.
///
/// # Errors
/// Unreadable files, a label grid that differs from the image's, a label id the rules do not
/// map: each names the case.
pub fn prepare_case(
    id: &str,
    dataset: usize,
    image: &Path,
    label: &Path,
    rules: &LabelRules,
    opts: &PreprocessOptions,
    min_size: [usize; 3],
) -> Result<PreparedCase> {
    let wrap = |e: univ_io::Error| Error::case(id, e.to_string());
    let (img, raw) = univ_io::read_image_and_label_any(image, label).map_err(wrap)?;
    let (organ, lesion) = map_labels(&raw, rules, id)?;
    let orient =
        OrientTransform::to_axcodes(img.affine(), img.shape(), &opts.axcodes).map_err(wrap)?;
    let img = orient.apply(img).map_err(wrap)?;
    let organ = orient
        .apply(raw.with_data(organ).map_err(wrap)?)
        .map_err(wrap)?;
    let lesion = orient
        .apply(raw.with_data(lesion).map_err(wrap)?)
        .map_err(wrap)?;
    let shape = organ.shape();
    let mut organ_data = organ.into_data();
    for c in &rules.rl_split {
        rl_split(&mut organ_data, shape, *c as u8);
    }
    // Resample both maps in one nearest-neighbour pass through a code per (organ, lesion) pair.
    let mut pairs: Vec<(u8, u8)> = vec![(0, 0)];
    let mut codes = Vec::with_capacity(organ_data.len());
    for (o, l) in organ_data.iter().zip(lesion.data()) {
        let p = (*o, *l);
        let code = match pairs.iter().position(|q| *q == p) {
            Some(k) => k,
            None => {
                if pairs.len() == 256 {
                    return Err(Error::case(id, "more than 256 organ/tumour combinations"));
                }
                pairs.push(p);
                pairs.len() - 1
            }
        };
        codes.push(code as u8);
    }
    let codes = img.with_data(codes).map_err(wrap)?;
    let pre = univ_io::preprocess(img, Some(codes), opts).map_err(wrap)?;
    let pad = SpatialPad {
        spatial_size: min_size,
    };
    let (image, _) = pad.apply(&pre.image).map_err(wrap)?;
    let (codes, _) = pad
        .apply(pre.label.as_ref().expect("a label was given"))
        .map_err(wrap)?;
    let shape = image.shape();
    let codes = fortran_to_c(codes.data(), shape);
    Ok(PreparedCase {
        id: id.to_string(),
        dataset,
        shape,
        image: fortran_to_c(image.data(), shape),
        organ: codes.iter().map(|c| pairs[*c as usize].0).collect(),
        lesion: codes.iter().map(|c| pairs[*c as usize].1).collect(),
        supervised: rules.supervised.clone(),
    })
}

fn file_stamp(p: &Path) -> String {
    match std::fs::metadata(p) {
        Ok(m) => {
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{}:{}:{t}", p.display(), m.len())
        }
        Err(_) => format!("{}:missing", p.display()),
    }
}

/// A disk cache of prepared cases, keyed by the files (path, size, modification time), the
/// rules and the preprocessing settings.
#[derive(Debug, Clone)]
pub struct CaseCache {
    dir: PathBuf,
}

impl CaseCache {
    /// A cache in `dir` (created when needed).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CaseCache { dir: dir.into() }
    }

    fn path_for(
        &self,
        id: &str,
        image: &Path,
        label: &Path,
        rules: &LabelRules,
        opts: &PreprocessOptions,
        min_size: [usize; 3],
    ) -> PathBuf {
        let key = format!(
            "v1|{}|{}|{}|{:?}|{min_size:?}",
            file_stamp(image),
            file_stamp(label),
            serde_json::to_string(rules).unwrap_or_default(),
            opts
        );
        let hash = sha2::Sha256::digest(key.as_bytes());
        let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
        let stem: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{stem}-{hex}.safetensors"))
    }

    /// The prepared case, from the cache when present, else prepared and stored.
    ///
    /// # Errors
    /// As [`prepare_case`], and cache files that cannot be written.
    #[allow(clippy::too_many_arguments)]
    pub fn get(
        &self,
        id: &str,
        dataset: usize,
        image: &Path,
        label: &Path,
        rules: &LabelRules,
        opts: &PreprocessOptions,
        min_size: [usize; 3],
    ) -> Result<PreparedCase> {
        let path = self.path_for(id, image, label, rules, opts, min_size);
        if let Some(c) = read_cached(&path, id, dataset, rules) {
            return Ok(c);
        }
        let case = prepare_case(id, dataset, image, label, rules, opts, min_size)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::file(&self.dir, e))?;
        write_cached(&path, &case)?;
        Ok(case)
    }
}

fn read_cached(path: &Path, id: &str, dataset: usize, rules: &LabelRules) -> Option<PreparedCase> {
    let bytes = std::fs::read(path).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let img = st.tensor("image").ok()?;
    let shape: [usize; 3] = img.shape().try_into().ok()?;
    let image: Vec<f32> = img
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let organ = st.tensor("organ").ok()?.data().to_vec();
    let lesion = st.tensor("lesion").ok()?.data().to_vec();
    let n: usize = shape.iter().product();
    if image.len() != n || organ.len() != n || lesion.len() != n {
        return None;
    }
    Some(PreparedCase {
        id: id.to_string(),
        dataset,
        shape,
        image,
        organ,
        lesion,
        supervised: rules.supervised.clone(),
    })
}

fn write_cached(path: &Path, case: &PreparedCase) -> Result<()> {
    use safetensors::tensor::TensorView;
    let st_err = |e: safetensors::SafeTensorError| Error::file(path, std::io::Error::other(e));
    let img_bytes: Vec<u8> = case.image.iter().flat_map(|v| v.to_le_bytes()).collect();
    let shape = case.shape.to_vec();
    let views = [
        (
            "image",
            TensorView::new(safetensors::Dtype::F32, shape.clone(), &img_bytes).map_err(st_err)?,
        ),
        (
            "organ",
            TensorView::new(safetensors::Dtype::U8, shape.clone(), &case.organ).map_err(st_err)?,
        ),
        (
            "lesion",
            TensorView::new(safetensors::Dtype::U8, shape, &case.lesion).map_err(st_err)?,
        ),
    ];
    let bytes = safetensors::serialize(views, None).map_err(st_err)?;
    crate::io::write_atomic(path, &bytes)
}
