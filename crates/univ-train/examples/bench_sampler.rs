//! Time of preparing one training batch (patch sampling, augmentation, targets) from the cases
//! of a training configuration: the loader threads must stay ahead of the training step.
//!
//! ```text
//! cargo run --release -p univ-train --example bench_sampler -- models/demo/train.toml
//! ```

use std::sync::Arc;
use std::time::Instant;

use univ_train::TrainConfig;
use univ_train::data::augment::PatchOptions;
use univ_train::data::loader::Sampler;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/demo/train.toml".into());
    let cfg = TrainConfig::load(&path)?;
    let (cases, rules) =
        univ_train::trainer::prepare_training_cases(&cfg, &mut |m| eprintln!("{m}"))?;
    let sampler = Sampler {
        cases: Arc::new(cases),
        dataset_rules: rules,
        patch: PatchOptions {
            roi: cfg.data.roi,
            num_samples: cfg.data.num_samples,
            ..PatchOptions::default()
        },
        cases_per_step: cfg.data.cases_per_step,
        num_classes: cfg.model.classes,
        seed: cfg.train.seed,
        sampling: cfg.data.sampling,
    };
    let t0 = Instant::now();
    let n = 10;
    for s in 0..n {
        let b = sampler.batch(s);
        assert_eq!(b.batch, cfg.data.num_samples * cfg.data.cases_per_step);
    }
    println!(
        "one batch of {} patches {:?}: {:.3} s",
        cfg.data.num_samples * cfg.data.cases_per_step,
        cfg.data.roi,
        t0.elapsed().as_secs_f64() / n as f64
    );
    Ok(())
}
