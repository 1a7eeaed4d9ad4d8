//! `univ train`: partial-label training from a configuration file, resumable, with optional
//! extension of a trained model by new classes.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use univ::ClassTable;
use univ::train::{TrainConfig, Trainer, ValidationLog};

use crate::args::RuntimeArgs;

/// Arguments of `univ train`.
#[derive(clap::Args)]
pub struct Args {
    /// The training configuration (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Continue from the newest checkpoint in the output folder.
    #[arg(long)]
    resume: bool,
    /// Start from this trained checkpoint and add classes (model.classes larger than its
    /// class count); reports validation Dice before and after in extend_report.json.
    #[arg(long)]
    extend: Option<PathBuf>,
    /// Train only the head and class encodings.
    #[arg(long)]
    freeze_backbone: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

fn dice_table(v: &ValidationLog, classes: &ClassTable) -> String {
    v.per_class
        .iter()
        .map(|(c, d)| format!("{} {:.3}", classes.name(*c), d))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run(a: Args) -> Result<()> {
    // A rank of a distributed run (torchrun or Slurm variables), checked before any work.
    let world = univ::train::WorldEnv::from_env()?;
    let mut cfg = TrainConfig::load(&a.config)?;
    let old_classes = match &a.extend {
        Some(ck) => {
            let c = univ::model::Checkpoint::load(ck)?;
            let k = c.detect_config()?.num_classes;
            if k > cfg.model.classes {
                bail!(
                    "--extend: {} has {k} classes but the configuration only {}: classes can be \
                     added (model.classes), not removed",
                    ck.display(),
                    cfg.model.classes
                );
            }
            cfg.model.init = Some(ck.clone());
            Some(k)
        }
        None => None,
    };
    if a.freeze_backbone {
        cfg.train.freeze_backbone = true;
    }
    let out = cfg.train.output.clone();
    let has_run = out.join("checkpoints/latest.json").exists();
    if has_run && !a.resume {
        bail!(
            "{}: holds a training run; pass --resume to continue it or choose another \
             train.output",
            out.display()
        );
    }
    let mut runtime = a.runtime.clone();
    if runtime.device.is_none()
        && let Some(d) = &cfg.train.device
    {
        runtime.device = Some(
            d.parse()
                .map_err(|e| anyhow::anyhow!("{}: train.device {e}", cfg.path.display()))?,
        );
        // The precision applies to the device the configuration chose.
        runtime.apply_precision(crate::args::PrecisionArg::F32)?;
    }
    // Each rank of a distributed run drives the GPU of its local rank; only rank 0 reports.
    if let (Some(w), Some(crate::args::DeviceArg::Cuda(n))) = (&world, runtime.device) {
        if n != 0 && n != w.local_rank {
            bail!(
                "--device cuda:{n} in a distributed run: each rank uses the GPU of its \
                 LOCAL_RANK ({}); pass --device cuda",
                w.local_rank
            );
        }
        runtime.device = Some(crate::args::DeviceArg::Cuda(w.local_rank));
    }
    let device = runtime.device()?;
    let main_rank = world.as_ref().is_none_or(|w| w.rank == 0);
    let quiet = a.quiet || !main_rank;
    let mut trainer = Trainer::new(cfg, device.clone(), |m| {
        if !quiet {
            eprintln!("{m}");
        }
    })?;
    let classes = trainer.class_table();
    let r = trainer.init_report();
    if main_rank && !r.mismatched.is_empty() {
        eprintln!(
            "warning: initial weights with other shapes (drawn at random instead): {:?}",
            r.mismatched
        );
    }
    if main_rank && !r.fresh.is_empty() {
        eprintln!(
            "note: {} variables not in the initial weights were drawn at random",
            r.fresh.len()
        );
    }
    let resumed = if a.resume {
        Some(trainer.resume()?)
    } else {
        None
    };
    if let Some(w) = world {
        let (rank, size) = (w.rank, w.world_size);
        let group = univ::train::ProcessGroup::init(
            w,
            &device,
            univ::train::distributed::timeout_from_env()?,
        )
        .with_context(|| format!("joining the distributed run as rank {rank} of {size}"))?;
        if !quiet {
            eprintln!("distributed run: {size} processes over {}", group.backend());
        }
        trainer.set_process_group(group)?;
    }
    // (After joining: the step count depends on the world's size.)
    match resumed {
        _ if !main_rank => {}
        Some(Some(s)) => eprintln!("resuming after step {s} of {}", trainer.total_steps()),
        Some(None) => eprintln!(
            "note: no checkpoint in {}: starting from step 0",
            out.display()
        ),
        None => {}
    }
    // Rank 0 alone measures the extension (the others wait for it at the first step).
    let before = match old_classes {
        Some(_) if main_rank => {
            let v = trainer.validate().context("validation before extending")?;
            if !quiet {
                eprintln!("validation Dice before: {}", dice_table(&v, &classes));
            }
            Some(v)
        }
        _ => None,
    };
    let tty = std::io::stderr().is_terminal() && !quiet;
    let started = std::time::Instant::now();
    let first = trainer.step();
    trainer.run(
        None,
        |s| {
            if quiet {
                return;
            }
            let done = s.step - first;
            let per = started.elapsed().as_secs_f64() / done.max(1) as f64;
            let eta = per * (s.total_steps - s.step) as f64;
            let line = format!(
                "step {}/{} epoch {} lr {:.2e} loss {:.4} (bce {:.4} dice {:.4}) {:.1} s/step (data wait {:.2} s), {:.0} min left",
                s.step,
                s.total_steps,
                s.epoch,
                s.lr,
                s.loss,
                s.bce,
                s.dice,
                per,
                s.data_wait,
                eta / 60.0
            );
            if tty {
                eprint!("\r{line}   ");
                if s.step == s.total_steps {
                    eprintln!();
                }
            } else if s.step.is_multiple_of(10) || s.step == s.total_steps {
                eprintln!("{line}");
            }
        },
        |v| {
            if !quiet {
                if tty {
                    eprintln!();
                }
                eprintln!(
                    "validation after step {} (epoch {}): mean Dice {:.3}: {}",
                    v.step,
                    v.epoch,
                    v.mean,
                    dice_table(v, &classes)
                );
            }
        },
    )?;
    if let (Some(k_old), Some(before)) = (old_classes, before) {
        let after = trainer.validate().context("validation after extending")?;
        let taught = trainer.taught_classes();
        let mut rows = Vec::new();
        let mut worst: Option<f64> = None;
        for (c, b) in &before.per_class {
            let a = after.per_class.iter().find(|(x, _)| x == c).map(|x| x.1);
            let change = a.map(|a| 100.0 * (a - b));
            let old = !taught.contains(c);
            if old && let Some(ch) = change {
                worst = Some(worst.map_or(ch, |w: f64| w.min(ch)));
            }
            rows.push(serde_json::json!({
                "class": c, "name": classes.name(*c),
                "taught_in_this_run": !old,
                "dice_before": b, "dice_after": a, "change_points": change,
            }));
        }
        let report = serde_json::json!({
            "extended_from": a.extend, "classes_before": k_old,
            "classes": trainer.model_config().num_classes,
            "taught_in_this_run": taught,
            "largest_old_class_drop_points": worst.map(|w| -w.min(0.0)),
            "per_class": rows,
        });
        let path = out.join("extend_report.json");
        univ::train::io::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        if !quiet {
            eprintln!("validation Dice after: {}", dice_table(&after, &classes));
            eprintln!("wrote {}", path.display());
        }
    }
    if main_rank && !a.quiet {
        println!(
            "trained {} steps in {:.1} min; weights in {}",
            trainer.step() - first,
            started.elapsed().as_secs_f64() / 60.0,
            out.join("model.safetensors").display()
        );
    }
    Ok(())
}
