//! Batches for each optimiser step, drawn deterministically from `(seed, step)` and prepared
//! on worker threads ahead of the training loop: a batch does not depend on which thread made
//! it, so a resumed run sees exactly the batches the uninterrupted run would have seen.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use crate::data::augment::{PatchOptions, fill_target, sample_patches};
use crate::data::case::PreparedCase;
use crate::data::presets::CropRule;
use crate::rng::Rng;

/// How cases are chosen for a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// Every case once per epoch, in a shuffled order.
    #[default]
    Cases,
    /// The official `--uniform_sample`: datasets in turn, a random case of each.
    UniformDatasets,
}

/// One step's batch, ready to become tensors.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The 0-based step it belongs to.
    pub step: u64,
    /// `(B, 1, roi)` intensities.
    pub image: Vec<f32>,
    /// `(B, K, roi)` targets: 0/1 on supervised channels, 255 elsewhere.
    pub target: Vec<f32>,
    /// Supervised classes of each sample.
    pub classes: Vec<Vec<usize>>,
    /// Case of each sample.
    pub case_ids: Vec<String>,
    /// Patches in the batch.
    pub batch: usize,
}

/// Draws batches from prepared cases.
#[derive(Debug)]
pub struct Sampler {
    /// The training cases.
    pub cases: Arc<Vec<PreparedCase>>,
    /// Crop rule and zoom flag of each dataset index.
    pub dataset_rules: Vec<(CropRule, bool)>,
    /// Patch settings.
    pub patch: PatchOptions,
    /// Cases per step (each gives `patch.num_samples` patches).
    pub cases_per_step: usize,
    /// Model output channels.
    pub num_classes: usize,
    /// Seed of the run.
    pub seed: u64,
    /// Case choice.
    pub sampling: Sampling,
}

impl Sampler {
    /// Steps in one epoch (one pass over the training cases).
    pub fn steps_per_epoch(&self) -> u64 {
        self.cases.len().div_ceil(self.cases_per_step.max(1)) as u64
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.cases.len()).collect();
        let mut rng = Rng::stream(self.seed, (1 << 48) | epoch);
        for i in (1..order.len()).rev() {
            let j = rng.below(i + 1);
            order.swap(i, j);
        }
        order
    }

    fn cases_for(&self, step: u64) -> Vec<usize> {
        let n = self.cases.len();
        let bc = self.cases_per_step.max(1);
        match self.sampling {
            Sampling::Cases => {
                let spe = self.steps_per_epoch();
                let order = self.epoch_order(step / spe);
                let j = (step % spe) as usize;
                (0..bc).map(|i| order[(j * bc + i) % n]).collect()
            }
            Sampling::UniformDatasets => {
                let mut datasets: Vec<usize> = self.cases.iter().map(|c| c.dataset).collect();
                datasets.sort_unstable();
                datasets.dedup();
                let mut rng = Rng::stream(self.seed, (2 << 48) | step);
                (0..bc)
                    .map(|i| {
                        let d = datasets[(step as usize * bc + i) % datasets.len()];
                        let members: Vec<usize> =
                            (0..n).filter(|c| self.cases[*c].dataset == d).collect();
                        members[rng.below(members.len())]
                    })
                    .collect()
            }
        }
    }

    /// The batch of a 0-based step.
    pub fn batch(&self, step: u64) -> Batch {
        let picks = self.cases_for(step);
        let v: usize = self.patch.roi.iter().product();
        let b = picks.len() * self.patch.num_samples;
        let k = self.num_classes;
        let mut image = Vec::with_capacity(b * v);
        let mut target = vec![0f32; b * k * v];
        let mut classes = Vec::with_capacity(b);
        let mut case_ids = Vec::with_capacity(b);
        let mut slot = 0;
        for (i, ci) in picks.iter().enumerate() {
            let case = &self.cases[*ci];
            let (crop, zoom) = self.dataset_rules[case.dataset];
            let mut rng = Rng::stream(self.seed, step * 64 + i as u64);
            for p in sample_patches(case, crop, zoom, &self.patch, &mut rng) {
                image.extend_from_slice(&p.image);
                fill_target(
                    &p,
                    &case.supervised,
                    k,
                    &mut target[slot * k * v..(slot + 1) * k * v],
                );
                classes.push(case.supervised.clone());
                case_ids.push(case.id.clone());
                slot += 1;
            }
        }
        Batch {
            step,
            image,
            target,
            classes,
            case_ids,
            batch: b,
        }
    }
}

/// Prepares the batches of the micro-batch indices `indices` (in that order) on `workers`
/// threads, at most one batch ahead per worker (`workers = 0`: on the calling thread).
pub fn spawn_loader(
    sampler: Arc<Sampler>,
    indices: Vec<u64>,
    workers: usize,
) -> Box<dyn Iterator<Item = Batch>> {
    if workers == 0 {
        // On the calling thread, when asked.
        return Box::new(indices.into_iter().map(move |i| sampler.batch(i)));
    }
    let indices = Arc::new(indices);
    let n = indices.len();
    let mut rxs: Vec<Receiver<Batch>> = Vec::with_capacity(workers);
    for w in 0..workers {
        let (tx, rx) = sync_channel(1);
        let s = sampler.clone();
        let idx = indices.clone();
        std::thread::spawn(move || {
            for &i in idx.iter().skip(w).step_by(workers) {
                if tx.send(s.batch(i)).is_err() {
                    return;
                }
            }
        });
        rxs.push(rx);
    }
    Box::new((0..n).map_while(move |j| rxs[j % workers].recv().ok()))
}
