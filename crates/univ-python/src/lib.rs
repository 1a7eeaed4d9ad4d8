//! `univ._univ`: the Rust side of the `univ` Python package (see `python/univ/__init__.py` for
//! the API people use, and docs/python.md).
//!
//! Everything long (loading a model, segmenting, embedding prompts) runs on a worker thread
//! without the GIL while the calling thread waits for it, calls the progress callback and
//! checks for signals: Ctrl-C cancels the work at its next window and raises
//! `KeyboardInterrupt`. Arrays cross the boundary with at most one copy each way: an input
//! array of any memory order and of the usual dtypes is read straight into the volume; label
//! maps and masks are handed to numpy without a copy.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::Duration;

use numpy::{PyArray1, PyArray2, PyReadonlyArray3};
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use univ::io::Volume;
use univ::model::Cancel;
use univ::model::postprocess::PostprocessOptions;
use univ::{CaseInput, CaseOptions, CaseResult, Event, LoadedModel, OutputOptions};

#[global_allocator]
static GLOBAL: univ_model::runtime::MiMalloc = univ_model::runtime::MiMalloc;

pyo3::create_exception!(
    _univ,
    Error,
    pyo3::exceptions::PyException,
    "An error of univ (a model that cannot be built, a volume that cannot be read, ...): its \
     message is the Rust error with its causes."
);

/// A univ error as a Python exception: `FileNotFoundError` for a file that does not exist,
/// `univ.Error` for the rest, with the whole message (causes included).
fn py_err(e: univ::Error) -> PyErr {
    let text = e.full_message();
    if let univ::Error::Model(m) = &e
        && matches!(**m, univ::model::Error::Cancelled)
    {
        return pyo3::exceptions::PyKeyboardInterrupt::new_err("cancelled");
    }
    Error::new_err(text)
}

fn must_exist(path: &Path, what: &str) -> PyResult<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(PyFileNotFoundError::new_err((
            2,
            format!("{what} {} does not exist", path.display()),
            path.display().to_string(),
        )))
    }
}

/// Runs `work` on a worker thread without the GIL; meanwhile this thread hands the progress
/// `(done, total)` it reports to `progress` and checks for signals. A signal (Ctrl-C) or an
/// exception from `progress` cancels `cancel` and is raised once the work has stopped.
fn run_detached<T: Send>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyAny>>,
    cancel: &Cancel,
    work: impl FnOnce(&(dyn Fn(usize, usize) + Sync)) -> T + Send,
) -> PyResult<T> {
    let (tx, rx) = channel::<(usize, usize)>();
    // Waited on without the GIL, so shared with that closure: behind a lock.
    let rx = std::sync::Mutex::new(rx);
    std::thread::scope(|s| {
        let handle = s.spawn(move || {
            let tx = std::sync::Mutex::new(tx);
            let report = move |d: usize, t: usize| {
                if let Ok(tx) = tx.lock() {
                    let _ = tx.send((d, t));
                }
            };
            work(&report)
        });
        let mut raised: Option<PyErr> = None;
        loop {
            let msg = py.detach(|| match rx.lock() {
                Ok(rx) => rx.recv_timeout(Duration::from_millis(50)),
                Err(_) => Err(RecvTimeoutError::Disconnected),
            });
            match msg {
                Ok((done, total)) => {
                    if raised.is_none()
                        && let Some(cb) = progress
                        && let Err(e) = cb.call1((done, total))
                    {
                        raised = Some(e);
                        cancel.cancel();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if raised.is_none()
                && let Err(e) = py.check_signals()
            {
                raised = Some(e);
                cancel.cancel();
            }
        }
        let out = py.detach(|| handle.join());
        match (raised, out) {
            (Some(e), _) => Err(e),
            (None, Ok(v)) => Ok(v),
            (None, Err(p)) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                Err(PyRuntimeError::new_err(format!(
                    "internal error in univ: {msg}"
                )))
            }
        }
    })
}

/// What to segment: a file or folder not read yet, or an array already made a volume.
enum Source {
    Path(PathBuf),
    Array(Box<CaseInput>),
}

/// A model with the threads it runs on.
#[pyclass(module = "univ._univ", frozen)]
struct Model {
    inner: LoadedModel,
    pool: Option<rayon::ThreadPool>,
    device: candle_core::Device,
}

fn device_of(name: &str) -> PyResult<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => candle_core::Device::new_cuda(0).map_err(|e| {
            Error::new_err(format!(
                "device \"cuda\": {e} (the package must be built with the cuda feature, on a \
                 machine with a GPU)"
            ))
        }),
        other => Err(PyValueError::new_err(format!(
            "device {other:?}: expected \"cpu\" or \"cuda\""
        ))),
    }
}

/// Reads a 3-D numpy array of a usual dtype, any memory order, into voxels in the volume's
/// (Fortran) order: one copy.
fn array_voxels(a: &Bound<'_, PyAny>) -> PyResult<(Vec<f32>, [usize; 3])> {
    macro_rules! try_dtype {
        ($($t:ty),*) => {$(
            if let Ok(arr) = a.extract::<PyReadonlyArray3<'_, $t>>() {
                let view = arr.as_array();
                let shape = [view.shape()[0], view.shape()[1], view.shape()[2]];
                // Reversed axes iterate with the first axis fastest: Fortran order.
                let data: Vec<f32> = view.t().iter().map(|v| *v as f32).collect();
                return Ok((data, shape));
            }
        )*};
    }
    try_dtype!(f32, f64, i16, i32, u8, u16, i8, u32, i64);
    Err(PyValueError::new_err(
        "input: expected a path, or a 3-D numpy array of numbers (HU) with its affine",
    ))
}

fn affine_of(a: &Bound<'_, PyAny>) -> PyResult<univ::io::geometry::Affine> {
    let m: Vec<Vec<f64>> = a.extract().map_err(|_| {
        PyValueError::new_err("affine: expected a 4×4 matrix (voxel to RAS world, in mm)")
    })?;
    if m.len() != 4 || m.iter().any(|r| r.len() != 4) {
        return Err(PyValueError::new_err(
            "affine: expected a 4×4 matrix (voxel to RAS world, in mm)",
        ));
    }
    let mut out = [[0.0; 4]; 4];
    for (i, r) in m.iter().enumerate() {
        out[i].copy_from_slice(r);
    }
    Ok(out)
}

#[pymethods]
impl Model {
    /// Loads a model: `None` is the demo model, `"unet"`/`"swinunetr"` the official files
    /// (hf-hub cache, downloaded on first use), else a `.pth`/`.safetensors` path.
    #[staticmethod]
    #[pyo3(signature = (checkpoint=None, device="cpu", threads=None))]
    fn load(
        py: Python<'_>,
        checkpoint: Option<PathBuf>,
        device: &str,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let spec = checkpoint.map(|p| p.display().to_string());
        if let Some(s) = &spec
            && !matches!(s.as_str(), "unet" | "swinunetr")
        {
            must_exist(Path::new(s), "the checkpoint")?;
        }
        let dev = device_of(device)?;
        let pool = match threads {
            None => None,
            Some(0) => return Err(PyValueError::new_err("threads: give at least 1")),
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .start_handler(|_| univ_model::runtime::flush_denormals())
                    .build()
                    .map_err(|e| Error::new_err(e.to_string()))?,
            ),
        };
        univ_model::runtime::keep_freed_memory();
        let cancel = Cancel::new();
        let d = dev.clone();
        let inner = run_detached(py, None, &cancel, move |_| {
            univ::load_model(spec.as_deref(), &d)
        })?
        .map_err(py_err)?;
        Ok(Model {
            inner,
            pool,
            device: dev,
        })
    }

    /// The class table as JSON: `[{"id", "name", "slug", "kind", "trained"}, ...]`.
    fn classes_json(&self) -> String {
        let v: Vec<serde_json::Value> = self
            .inner
            .model
            .classes()
            .iter()
            .map(|c| {
                serde_json::json!({
                    "id": c.id, "name": c.name, "slug": c.slug,
                    "kind": c.kind.as_str(), "trained": c.trained,
                })
            })
            .collect();
        serde_json::Value::Array(v).to_string()
    }

    /// The checkpoint file, its SHA-256, and whether it is a demo model.
    fn checkpoint(&self) -> (String, String, bool) {
        (
            self.inner.path.display().to_string(),
            self.inner.sha256.clone(),
            self.inner.demo,
        )
    }

    /// Segments `input` (a path, or an array with `affine`).
    #[pyo3(signature = (input, affine, classes, overlap, postprocess, probabilities, progress))]
    #[allow(clippy::too_many_arguments)]
    fn segment(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        affine: Option<&Bound<'_, PyAny>>,
        classes: Option<String>,
        overlap: f64,
        postprocess: bool,
        probabilities: bool,
        progress: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Segmentation> {
        if !(0.0..1.0).contains(&overlap) {
            return Err(PyValueError::new_err(format!(
                "overlap {overlap}: give a value from 0 up to (not including) 1"
            )));
        }
        let mut opts = CaseOptions::default();
        opts.segment.window.overlap = overlap;
        opts.segment.device = self.device.clone();
        opts.segment.keep_probabilities = probabilities;
        opts.output.probabilities = probabilities;
        if !postprocess {
            opts.segment.postprocess = PostprocessOptions::none();
        }
        if let Some(c) = classes {
            opts.segment.classes = self
                .inner
                .model
                .classes()
                .parse_list(&c)
                .map_err(|e| PyValueError::new_err(format!("classes: {e}")))?;
        }
        let case = if let Ok(path) = input.extract::<PathBuf>() {
            must_exist(&path, "the input")?;
            if affine.is_some() {
                return Err(PyValueError::new_err(
                    "affine: give it only with an array (a file has its own)",
                ));
            }
            Source::Path(path)
        } else {
            let Some(affine) = affine else {
                return Err(PyValueError::new_err(
                    "an array input needs its affine (4×4, voxel to RAS mm, as nibabel's \
                     img.affine)",
                ));
            };
            let (data, shape) = array_voxels(input)?;
            let image = Volume::from_vec(data, shape, affine_of(affine)?)
                .map_err(|e| PyValueError::new_err(format!("input: {e}")))?;
            Source::Array(Box::new(CaseInput {
                path: PathBuf::from("<array>"),
                image,
                series: None,
            }))
        };
        let cancel = Cancel::new();
        opts.segment.cancel = Some(cancel.clone());
        let model = &self.inner;
        let pool = self.pool.as_ref();
        let result = run_detached(py, progress, &cancel, move |report| {
            let job = || -> univ::Result<CaseResult> {
                let case = match case {
                    Source::Array(c) => *c,
                    Source::Path(path) => CaseInput::read(
                        &path,
                        &univ::io::dicom::DicomReadOptions {
                            limits: opts.segment.limits,
                            ..Default::default()
                        },
                    )?,
                };
                univ::segment_input(case, model, &opts, |e| {
                    if let Event::Windows { done, total } = e {
                        report(done, total);
                    }
                })
            };
            match pool {
                Some(p) => p.install(job),
                None => job(),
            }
        })?
        .map_err(py_err)?;
        Ok(Segmentation { inner: result })
    }
}

/// A segmentation with the CT it was made on.
#[pyclass(module = "univ._univ", frozen)]
struct Segmentation {
    inner: CaseResult,
}

impl Segmentation {
    fn class(&self, key: &Bound<'_, PyAny>) -> PyResult<&univ::ClassResult> {
        let seg = &self.inner.segmentation;
        let text = match key.extract::<usize>() {
            Ok(id) => id.to_string(),
            Err(_) => key.extract::<String>().map_err(|_| {
                PyValueError::new_err("a class is named by its id (int) or its name (str)")
            })?,
        };
        seg.class(&text).ok_or_else(|| {
            let have: Vec<String> = seg
                .classes
                .iter()
                .map(|c| format!("{} {}", c.id(), c.name()))
                .collect();
            PyValueError::new_err(format!(
                "class {text:?} was not computed; the classes are: {}",
                have.join(", ")
            ))
        })
    }
}

#[pymethods]
impl Segmentation {
    /// The label map (uint8, flat in Fortran order) and its shape.
    fn label_map<'py>(&self, py: Python<'py>) -> (Bound<'py, PyArray1<u8>>, [usize; 3]) {
        let v = &self.inner.segmentation.label_map;
        (PyArray1::from_vec(py, v.data().to_vec()), v.shape())
    }

    /// The 4×4 voxel-to-RAS affine of the label map (the input's).
    fn affine<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f64>> {
        let a = self.inner.segmentation.label_map.affine();
        PyArray2::from_vec2(py, &a.iter().map(|r| r.to_vec()).collect::<Vec<_>>())
            .expect("4 rows of 4")
    }

    /// The computed classes as JSON: `[{"id", "name", "slug", "kind", "voxels", "volume_ml"}]`.
    fn classes_json(&self) -> String {
        let seg = &self.inner.segmentation;
        let vml = seg.voxel_volume_ml();
        let v: Vec<serde_json::Value> = seg
            .classes
            .iter()
            .map(|c| {
                serde_json::json!({
                    "id": c.id(), "name": c.name(), "slug": c.info.slug,
                    "kind": c.info.kind.as_str(), "voxels": c.voxels(),
                    "volume_ml": c.voxels() as f64 * vml,
                })
            })
            .collect();
        serde_json::Value::Array(v).to_string()
    }

    /// One class's mask (bool, flat in Fortran order).
    fn mask<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<bool>>> {
        Ok(PyArray1::from_vec(py, self.class(key)?.mask.to_bools()))
    }

    /// One class's probabilities in 0..1 (float32 in steps of 1/255, flat in Fortran order).
    fn probabilities<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let c = self.class(key)?;
        let p = c.probabilities.as_ref().ok_or_else(|| {
            PyValueError::new_err("probabilities were not kept: segment with probabilities=True")
        })?;
        Ok(PyArray1::from_vec(
            py,
            p.data().iter().map(|v| f32::from(*v) / 255.0).collect(),
        ))
    }

    /// The report (`report.json`) as JSON text.
    fn report_json(&self) -> String {
        self.inner.report().to_string()
    }

    /// Writes the outputs of `univ segment` into `folder`.
    #[pyo3(signature = (folder, per_class=false, dicom_seg=false, overwrite=false))]
    fn save(
        &self,
        py: Python<'_>,
        folder: PathBuf,
        per_class: bool,
        dicom_seg: bool,
        overwrite: bool,
    ) -> PyResult<()> {
        if dicom_seg && self.inner.input.series.is_none() {
            return Err(PyValueError::new_err(
                "dicom_seg: the input was not a DICOM series",
            ));
        }
        let opts = OutputOptions {
            per_class,
            probabilities: self
                .inner
                .segmentation
                .classes
                .iter()
                .any(|c| c.probabilities.is_some()),
            dicom_seg,
            overwrite,
            ..OutputOptions::default()
        };
        let r = &self.inner;
        py.detach(|| r.write(&folder, &opts)).map_err(py_err)?;
        Ok(())
    }
}

/// Reads a NIfTI file or DICOM series: (voxels in HU, flat in Fortran order; shape; affine).
#[allow(clippy::type_complexity)]
#[pyfunction]
fn read_volume<'py>(
    py: Python<'py>,
    path: PathBuf,
) -> PyResult<(
    Bound<'py, PyArray1<f32>>,
    [usize; 3],
    Bound<'py, PyArray2<f64>>,
)> {
    must_exist(&path, "the volume")?;
    let case = py
        .detach(|| CaseInput::read(&path, &Default::default()))
        .map_err(py_err)?;
    let v = case.image;
    let affine = PyArray2::from_vec2(
        py,
        &v.affine().iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
    )
    .expect("4 rows of 4");
    let shape = v.shape();
    Ok((PyArray1::from_vec(py, v.into_data()), shape, affine))
}

fn label_volume(
    a: &Bound<'_, PyAny>,
    spacing: Option<[f64; 3]>,
    what: &str,
) -> PyResult<Volume<u8>> {
    if let Ok(path) = a.extract::<PathBuf>() {
        must_exist(&path, what)?;
        return univ::io::read_label(&path).map_err(|e| py_err(e.into()));
    }
    let (data, shape) = array_voxels(a)?;
    let mut bytes = Vec::with_capacity(data.len());
    for v in data {
        if !(0.0..=255.0).contains(&v) || v.fract() != 0.0 {
            return Err(PyValueError::new_err(format!(
                "{what}: {v} is not a label id (0 to 255)"
            )));
        }
        bytes.push(v as u8);
    }
    let s = spacing.unwrap_or([1.0; 3]);
    let affine = [
        [s[0], 0.0, 0.0, 0.0],
        [0.0, s[1], 0.0, 0.0],
        [0.0, 0.0, s[2], 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    Volume::from_vec(bytes, shape, affine)
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

/// The metrics of `univ evaluate` between two label maps (paths or arrays) as JSON text.
#[pyfunction]
#[pyo3(signature = (pred, gt, spacing=None))]
fn evaluate(
    py: Python<'_>,
    pred: &Bound<'_, PyAny>,
    gt: &Bound<'_, PyAny>,
    spacing: Option<[f64; 3]>,
) -> PyResult<String> {
    if spacing.is_some_and(|s| s.iter().any(|v| !(v.is_finite() && *v > 0.0))) {
        return Err(PyValueError::new_err("spacing: three positive sizes in mm"));
    }
    let p = label_volume(pred, spacing, "pred")?;
    let g = label_volume(gt, spacing, "gt")?;
    if p.shape() != g.shape() && p.check_same_grid(&g).is_err() {
        return Err(PyValueError::new_err(format!(
            "pred has the shape {:?} and gt {:?}",
            p.shape(),
            g.shape()
        )));
    }
    let out = py
        .detach(|| univ::evaluate::evaluate_pair(&p, &g, &Default::default()))
        .map_err(|e| py_err(e.into()))?;
    Ok(out.to_string())
}

/// The CLIP text encoder alone.
#[pyclass(module = "univ._univ", frozen)]
struct TextEncoder {
    inner: univ::clip::ClipTextEncoder,
}

#[pymethods]
impl TextEncoder {
    /// Loads a CLIP folder (`config.json`, safetensors weights, tokenizer files) or a Hugging
    /// Face repository id (from the hf-hub cache, downloaded on first use).
    #[staticmethod]
    fn load(py: Python<'_>, path_or_hf_id: String) -> PyResult<Self> {
        let cancel = Cancel::new();
        let inner = run_detached(py, None, &cancel, move |_| {
            let dir = if Path::new(&path_or_hf_id).is_dir() {
                PathBuf::from(&path_or_hf_id)
            } else {
                univ::clip::hub::resolve_repo(&path_or_hf_id)?
            };
            univ::clip::ClipTextEncoder::from_dir(&dir, &candle_core::Device::Cpu)
        })?
        .map_err(|e| py_err(e.into()))?;
        Ok(TextEncoder { inner })
    }

    /// Embeds prompts as given: `(N, projection_dim)` float32, not normalised.
    fn embed<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<String>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        if prompts.is_empty() {
            return Err(PyValueError::new_err("prompts: give at least one"));
        }
        let enc = &self.inner;
        let rows = py
            .detach(|| enc.embed(&prompts).and_then(|t| Ok(t.to_vec2::<f32>()?)))
            .map_err(|e| py_err(e.into()))?;
        PyArray2::from_vec2(py, &rows).map_err(|e| Error::new_err(e.to_string()))
    }
}

/// The module.
#[pymodule]
fn _univ(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("Error", m.py().get_type::<Error>())?;
    m.add_class::<Model>()?;
    m.add_class::<Segmentation>()?;
    m.add_class::<TextEncoder>()?;
    m.add_function(wrap_pyfunction!(read_volume, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    Ok(())
}
