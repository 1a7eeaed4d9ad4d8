//! Loading checkpoints: the official `.pth` files (torch zip pickles with the state dict under
//! `net` or `state_dict`, keys prefixed `module.`; the released Swin file's flat keys) and
//! safetensors; canonical key names; detection of the configuration from tensor shapes; a
//! report of missing and unexpected keys.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::classes::ClassTable;
use crate::error::{Error, Result};
use crate::nets::{
    BackboneConfig, Encoding, SwinUnetrConfig, UnetConfig, UniversalConfig, UniversalModel,
};

/// A checkpoint's tensors under canonical names (no `module.`, backbone keys under
/// `backbone.`), as the current official code names them.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Where it was read from.
    pub path: PathBuf,
    /// Canonical name → tensor.
    pub tensors: HashMap<String, Tensor>,
    /// The file's metadata (safetensors `__metadata__`; empty for `.pth` files).
    pub metadata: HashMap<String, String>,
}

/// The metadata key under which a checkpoint names its classes: a JSON list of names, one
/// per class row (written by `univ train`).
pub const CLASS_NAMES_KEY: &str = "univ.classes";

/// The metadata key under which a checkpoint lists the ids of the classes it was trained on
/// (a JSON list; absent: all of them).
pub const TRAINED_CLASSES_KEY: &str = "univ.trained_classes";

/// The metadata key that marks a demonstration model (`"true"`): its results are shown as such.
pub const DEMO_KEY: &str = "univ.demo";

/// Maps an official key to its canonical name: a leading `module.` is dropped, and the flat
/// keys of the released Swin UNETR file (`swinViT.*`, `encoder*`, `decoder*`) go under
/// `backbone.`.
pub fn canonical_key(key: &str) -> String {
    let k = key.strip_prefix("module.").unwrap_or(key);
    if k.starts_with("swinViT.") || k.starts_with("encoder") || k.starts_with("decoder") {
        format!("backbone.{k}")
    } else {
        k.to_string()
    }
}

fn ckpt_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Checkpoint {
    /// Reads a `.pth` (torch zip) or `.safetensors` file onto the CPU, within the default
    /// memory limit ([`univ_io::Limits`]'s `max_alloc`, 8 GiB).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when the file cannot be read or holds no tensors.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_within(path, univ_io::Limits::default().max_alloc)
    }

    /// [`load`](Self::load) with at most `max_bytes` of tensor data: a file, zip archive or
    /// tensor that declares more is refused before it is read.
    ///
    /// # Errors
    /// As [`load`](Self::load), and [`Error::Checkpoint`] naming the limit.
    pub fn load_within(path: impl AsRef<Path>, max_bytes: u64) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(ckpt_err(path, "no such file"));
        }
        let is_st = path.extension().is_some_and(|e| e == "safetensors");
        let mut metadata = HashMap::new();
        let raw: Vec<(String, Tensor)> = if is_st {
            let len = std::fs::metadata(path)
                .map_err(|e| ckpt_err(path, e.to_string()))?
                .len();
            if len > max_bytes {
                return Err(ckpt_err(
                    path,
                    format!("{len} bytes, more than the memory limit of {max_bytes}"),
                ));
            }
            let bytes = std::fs::read(path).map_err(|e| ckpt_err(path, e.to_string()))?;
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
                .map_err(|e| ckpt_err(path, format!("cannot read safetensors: {e}")))?;
            if let Some(m) = meta.metadata() {
                metadata = m.clone().into_iter().collect();
            }
            candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
                .map_err(|e| ckpt_err(path, format!("cannot read safetensors: {e}")))?
                .into_iter()
                .collect()
        } else {
            crate::pth::read_state_dict(path, &[Some("net"), Some("state_dict"), None], max_bytes)?
        };
        if raw.is_empty() {
            return Err(ckpt_err(path, "holds no tensors"));
        }
        let mut tensors = HashMap::with_capacity(raw.len());
        for (k, t) in raw {
            let ck = canonical_key(&k);
            if t.dtype().is_float() && t.elem_count() > 0 {
                let bad = t
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .filter(|v| !v.is_finite())
                    .count();
                if bad > 0 {
                    return Err(ckpt_err(
                        path,
                        format!(
                            "tensor {k} holds {bad} NaN or infinite value(s) of {}: the weights \
                             are damaged",
                            t.elem_count()
                        ),
                    ));
                }
            }
            if tensors.insert(ck.clone(), t).is_some() {
                return Err(ckpt_err(path, format!("two keys map to {ck}")));
            }
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            tensors,
            metadata,
        })
    }

    /// The ids of the classes the checkpoint was trained on ([`TRAINED_CLASSES_KEY`]); `None`
    /// when it does not say.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when the entry is not a JSON list of ids.
    pub fn trained_classes(&self) -> Result<Option<Vec<usize>>> {
        match self.metadata.get(TRAINED_CLASSES_KEY) {
            None => Ok(None),
            Some(v) => serde_json::from_str(v).map(Some).map_err(|e| {
                ckpt_err(
                    &self.path,
                    format!("metadata {TRAINED_CLASSES_KEY} is not a list of class ids: {e}"),
                )
            }),
        }
    }

    /// `true` for a demonstration model ([`DEMO_KEY`]).
    pub fn is_demo(&self) -> bool {
        self.metadata.get(DEMO_KEY).is_some_and(|v| v == "true")
    }

    /// The class names the checkpoint records ([`CLASS_NAMES_KEY`]), one per class row.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when the entry is not a JSON list of strings.
    pub fn class_names(&self) -> Result<Option<Vec<String>>> {
        match self.metadata.get(CLASS_NAMES_KEY) {
            None => Ok(None),
            Some(v) => serde_json::from_str(v).map(Some).map_err(|e| {
                ckpt_err(
                    &self.path,
                    format!("metadata {CLASS_NAMES_KEY} is not a list of names: {e}"),
                )
            }),
        }
    }

    fn shape_of(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|t| t.dims().to_vec())
    }

    /// Detects the configuration from the tensor shapes: backbone and width, class encoding,
    /// number of classes.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when the keys fit no known model.
    pub fn detect_config(&self) -> Result<UniversalConfig> {
        let backbone = if let Some(s) = self.shape_of("backbone.down_tr64.ops.0.conv1.weight") {
            BackboneConfig::Unet(UnetConfig { base: s[0] })
        } else if let Some(s) = self.shape_of("backbone.swinViT.patch_embed.proj.weight") {
            let mut cfg = SwinUnetrConfig::with_feature_size(s[0]);
            for (i, h) in cfg.num_heads.iter_mut().enumerate() {
                let key = format!(
                    "backbone.swinViT.layers{}.0.blocks.0.attn.relative_position_bias_table",
                    i + 1
                );
                if let Some(t) = self.shape_of(&key) {
                    *h = t[1];
                }
            }
            for (i, d) in cfg.depths.iter_mut().enumerate() {
                let prefix = format!("backbone.swinViT.layers{}.0.blocks.", i + 1);
                let blocks: BTreeSet<&str> = self
                    .tensors
                    .keys()
                    .filter_map(|k| k.strip_prefix(&prefix))
                    .filter_map(|r| r.split('.').next())
                    .collect();
                *d = blocks.len();
            }
            BackboneConfig::SwinUnetr(cfg)
        } else {
            return Err(ckpt_err(
                &self.path,
                "no known backbone (expected backbone.down_tr64.* or backbone.swinViT.* keys)",
            ));
        };
        let (encoding, num_classes) = if let Some(s) = self.shape_of("organ_embedding.weight") {
            (Encoding::RandEmbedding, s[0])
        } else if let Some(s) = self.shape_of("organ_embedding") {
            (Encoding::WordEmbedding, s[0])
        } else {
            return Err(ckpt_err(
                &self.path,
                "no organ_embedding (class embeddings)",
            ));
        };
        Ok(UniversalConfig {
            backbone,
            encoding,
            num_classes,
        })
    }

    /// Builds the model this checkpoint describes on `device`, with a report of the keys.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming every missing or mis-shaped key.
    pub fn build(&self, device: &Device) -> Result<(UniversalModel, LoadReport)> {
        let cfg = self.detect_config()?;
        self.build_with(cfg, device)
    }

    /// Builds a model of configuration `cfg` from this checkpoint.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming every missing or mis-shaped key.
    pub fn build_with(
        &self,
        cfg: UniversalConfig,
        device: &Device,
    ) -> Result<(UniversalModel, LoadReport)> {
        let backend = TrackedTensors {
            tensors: self.tensors.clone(),
            state: Mutex::new(TrackState::default()),
        };
        let state = std::sync::Arc::new(backend);
        let vb = VarBuilder::from_backend(
            Box::new(ArcBackend(state.clone())),
            DType::F32,
            device.clone(),
        );
        let model = UniversalModel::new(vb, cfg)?;
        let names = self.class_names()?;
        if let Some(n) = &names
            && n.len() != cfg.num_classes
        {
            return Err(ckpt_err(
                &self.path,
                format!(
                    "metadata {CLASS_NAMES_KEY} names {} classes, the model has {}",
                    n.len(),
                    cfg.num_classes
                ),
            ));
        }
        let mut table = ClassTable::for_model(cfg.num_classes, names.as_deref());
        if let Some(trained) = self.trained_classes()? {
            table = table.with_trained(&trained);
        }
        let model = model.with_class_table(table)?;
        let st = state.state.lock().expect("not poisoned");
        let mut unexpected: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !st.used.contains(*k) && !st.missing.contains_key(*k))
            .cloned()
            .collect();
        unexpected.sort();
        let (ignored, unexpected): (Vec<String>, Vec<String>) =
            unexpected.into_iter().partition(|k| is_ignorable(k));
        let report = LoadReport {
            used: st.used.len(),
            missing: st.missing.keys().cloned().collect(),
            mismatched: st.mismatched.clone(),
            unexpected,
            ignored,
        };
        if !report.missing.is_empty() || !report.mismatched.is_empty() {
            return Err(ckpt_err(&self.path, report.to_string()));
        }
        Ok((model, report))
    }
}

/// Saves f32 tensors (converted from any dtype) with string metadata as safetensors,
/// atomically (see [`univ_io::atomic`]), readable by everyone like any other output.
///
/// # Errors
/// [`Error::Checkpoint`] naming the file.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bad = |reason: String| ckpt_err(path, reason);
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v = crate::ops::to_f32_vec(t)?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        buffers.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let mut views = Vec::with_capacity(buffers.len());
    for (name, shape, bytes) in &buffers {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map_err(|e| bad(e.to_string()))?;
        views.push((name.as_str(), view));
    }
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| bad(e.to_string()))?;
    univ_io::atomic::write_atomic_with(
        path,
        |tmp| std::fs::write(tmp, &bytes).map_err(|e| bad(format!("cannot write: {e}"))),
        |e| bad(format!("cannot write: {e}")),
    )
}

/// Keys the model does not read by design: BatchNorm running statistics (the official U-Net
/// always uses batch statistics) and Swin's `relative_position_index` buffers (recomputed).
fn is_ignorable(key: &str) -> bool {
    key.ends_with(".running_mean")
        || key.ends_with(".running_var")
        || key.ends_with(".num_batches_tracked")
        || key.ends_with(".relative_position_index")
}

/// What loading a checkpoint did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadReport {
    /// Tensors loaded.
    pub used: usize,
    /// Keys the model needs that the checkpoint lacks (with their expected shapes).
    pub missing: Vec<String>,
    /// Keys whose shapes differ: (key, expected, found).
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Keys the model does not know.
    pub unexpected: Vec<String>,
    /// Keys deliberately not read (BatchNorm running statistics, Swin index buffers).
    pub ignored: Vec<String>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loaded {} tensors; {} missing, {} with the wrong shape, {} unexpected, {} ignored",
            self.used,
            self.missing.len(),
            self.mismatched.len(),
            self.unexpected.len(),
            self.ignored.len()
        )?;
        for k in &self.missing {
            write!(f, "\n  missing: {k}")?;
        }
        for (k, want, got) in &self.mismatched {
            write!(
                f,
                "\n  wrong shape: {k}: model expects {want:?}, checkpoint has {got:?}"
            )?;
        }
        for k in &self.unexpected {
            write!(f, "\n  unexpected: {k}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct TrackState {
    used: BTreeSet<String>,
    missing: BTreeMap<String, Vec<usize>>,
    mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

/// A var-builder backend over a map of tensors that records what was read, and stands in
/// zeros for missing or mis-shaped tensors so that one pass names all of them.
struct TrackedTensors {
    tensors: HashMap<String, Tensor>,
    state: Mutex<TrackState>,
}

struct ArcBackend(std::sync::Arc<TrackedTensors>);

impl candle_nn::var_builder::SimpleBackend for ArcBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut st = self.0.state.lock().expect("not poisoned");
        match self.0.tensors.get(name) {
            None => {
                st.missing.insert(name.to_string(), s.dims().to_vec());
                Tensor::zeros(s, dtype, dev)
            }
            Some(t) if t.shape() != &s => {
                st.mismatched
                    .push((name.to_string(), s.dims().to_vec(), t.dims().to_vec()));
                Tensor::zeros(s, dtype, dev)
            }
            Some(t) => {
                st.used.insert(name.to_string());
                t.to_dtype(dtype)?.to_device(dev)
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut st = self.0.state.lock().expect("not poisoned");
        match self.0.tensors.get(name) {
            Some(t) => {
                st.used.insert(name.to_string());
                t.to_dtype(dtype)?.to_device(dev)
            }
            None => candle_core::bail!("missing tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name)
    }
}

/// One tensor of the official state dict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Canonical name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// `true` for a learned parameter, `false` for a buffer (`organ_embedding` in word mode,
    /// BatchNorm statistics, Swin index tables).
    pub parameter: bool,
}

/// Every tensor of the official state dict of a model with configuration `cfg`, sorted by name:
/// the parameters of a model built with random weights, plus the buffers the official code
/// registers (BatchNorm running statistics, Swin's `relative_position_index`, and
/// `organ_embedding` in word-embedding mode).
///
/// # Errors
/// An invalid configuration.
pub fn official_layout(cfg: &UniversalConfig) -> Result<Vec<TensorSpec>> {
    let varmap = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    UniversalModel::new(vb, *cfg)?;
    let mut out = Vec::new();
    let data = varmap.data().lock().expect("not poisoned");
    for (name, var) in data.iter() {
        let shape = var.dims().to_vec();
        let buffer = name == "organ_embedding";
        out.push(TensorSpec {
            name: name.clone(),
            shape: shape.clone(),
            parameter: !buffer,
        });
        if let Some(p) = name.strip_suffix("bn1.weight") {
            for (suffix, s) in [
                ("running_mean", shape.clone()),
                ("running_var", shape.clone()),
                ("num_batches_tracked", vec![]),
            ] {
                out.push(TensorSpec {
                    name: format!("{p}bn1.{suffix}"),
                    shape: s,
                    parameter: false,
                });
            }
        }
        if let Some(p) = name.strip_suffix("relative_position_bias_table") {
            let window = match cfg.backbone {
                BackboneConfig::SwinUnetr(c) => c.window,
                BackboneConfig::Unet(_) => 0,
            };
            let n = window * window * window;
            out.push(TensorSpec {
                name: format!("{p}relative_position_index"),
                shape: vec![n, n],
                parameter: false,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
