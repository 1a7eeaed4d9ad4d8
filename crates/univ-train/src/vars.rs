//! Trainable variables for a model: built through candle's `VarBuilder`, drawn from a seeded
//! generator (candle's CPU generator cannot be seeded) or taken from initial weights, and kept
//! under the official key names.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::Init;

use crate::rng::Rng;

/// What building the model from initial weights did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitReport {
    /// Variables taken from the initial weights.
    pub loaded: usize,
    /// Variables drawn at random (absent from the initial weights).
    pub fresh: Vec<String>,
    /// Class-encoding variables whose first rows came from the initial weights and whose new
    /// rows were drawn: (name, rows kept, rows now).
    pub grown: Vec<(String, usize, usize)>,
    /// Variables whose shapes differ from the initial weights (drawn at random instead).
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

#[derive(Debug, Default)]
struct State {
    vars: BTreeMap<String, Var>,
    report: InitReport,
}

/// A variable store: name → [`Var`].
#[derive(Debug, Clone)]
pub struct VarStore {
    seed: u64,
    init: Arc<HashMap<String, Tensor>>,
    state: Arc<Mutex<State>>,
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn draw(shape: &Shape, init: Init, rng: &mut Rng) -> Vec<f32> {
    let n = shape.elem_count();
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| (mean + stdev * rng.normal()) as f32)
            .collect(),
        Init::Uniform { lo, up } => (0..n).map(|_| rng.range(lo, up) as f32).collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = fan.for_shape(shape).max(1) as f64;
            let std = non_linearity.gain() / fan.sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Normal => {
                    (0..n).map(|_| (std * rng.normal()) as f32).collect()
                }
                candle_nn::init::NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    (0..n).map(|_| rng.range(-b, b) as f32).collect()
                }
            }
        }
    }
}

impl VarStore {
    /// A store whose variables come from `init` where present (same shape), else from the
    /// hinted initialisation drawn with a generator seeded by `seed` and the variable's name.
    pub fn new(seed: u64, init: HashMap<String, Tensor>) -> Self {
        VarStore {
            seed,
            init: Arc::new(init),
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// A `VarBuilder` that creates (or returns) variables in this store.
    pub fn var_builder(&self, device: &Device) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// All variables, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let st = self.state.lock().expect("not poisoned");
        st.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The current values, sorted by name (detached copies of the variables' tensors).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect()
    }

    /// What initialisation did.
    pub fn report(&self) -> InitReport {
        self.state.lock().expect("not poisoned").report.clone()
    }

    /// Sets every variable from `tensors` (all must be present with the right shapes).
    ///
    /// # Errors
    /// The first missing or mis-shaped name.
    pub fn set_all(&self, tensors: &HashMap<String, Tensor>) -> Result<(), String> {
        let st = self.state.lock().expect("not poisoned");
        for (name, var) in &st.vars {
            let t = tensors
                .get(name)
                .ok_or_else(|| format!("{name} is missing"))?;
            if t.dims() != var.as_tensor().dims() {
                return Err(format!(
                    "{name} has shape {:?}, the model {:?}",
                    t.dims(),
                    var.as_tensor().dims()
                ));
            }
            var.set(&t.to_dtype(DType::F32).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn is_class_rows(name: &str) -> bool {
    name == "organ_embedding" || name == "organ_embedding.weight"
}

impl candle_nn::var_builder::SimpleBackend for VarStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut st = self.state.lock().expect("not poisoned");
        if let Some(v) = st.vars.get(name) {
            if v.as_tensor().shape() != &s {
                candle_core::bail!("{name} requested with two shapes");
            }
            return Ok(v.as_tensor().clone());
        }
        let mut rng = Rng::stream(self.seed, name_hash(name));
        let fresh = |rng: &mut Rng| Tensor::from_vec(draw(&s, h, rng), s.clone(), dev);
        let t = match self.init.get(name) {
            Some(t) if t.shape() == &s => {
                st.report.loaded += 1;
                t.to_dtype(DType::F32)?.to_device(dev)?
            }
            Some(t)
                if is_class_rows(name)
                    && t.rank() == 2
                    && s.rank() == 2
                    && t.dim(1)? == s.dims()[1]
                    && t.dim(0)? < s.dims()[0] =>
            {
                // New classes: keep the trained rows, draw the new ones.
                let kept = t.dim(0)?;
                let all = fresh(&mut rng)?;
                let new_rows = all.narrow(0, kept, s.dims()[0] - kept)?;
                st.report.grown.push((name.to_string(), kept, s.dims()[0]));
                Tensor::cat(&[&t.to_dtype(DType::F32)?.to_device(dev)?, &new_rows], 0)?
            }
            Some(t) => {
                st.report
                    .mismatched
                    .push((name.to_string(), s.dims().to_vec(), t.dims().to_vec()));
                fresh(&mut rng)?
            }
            None => {
                if !self.init.is_empty() {
                    st.report.fresh.push(name.to_string());
                }
                fresh(&mut rng)?
            }
        };
        let var = Var::from_tensor(&t.to_dtype(dtype)?)?;
        let out = var.as_tensor().clone();
        st.vars.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let st = self.state.lock().expect("not poisoned");
        match st.vars.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("variable {name} does not exist yet"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.state
            .lock()
            .expect("not poisoned")
            .vars
            .contains_key(name)
            || self.init.contains_key(name)
    }
}
