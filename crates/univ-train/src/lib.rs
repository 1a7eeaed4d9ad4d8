#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![allow(clippy::needless_range_loop)]

pub mod config;
pub mod data;
pub mod distributed;
pub mod error;
pub mod io;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod schedule;
pub mod trainer;
pub mod vars;

pub use config::TrainConfig;
pub use distributed::{ProcessGroup, WorldEnv};
pub use error::{Error, Result};
pub use loss::{DiceMode, LossParts, partial_label_loss};
pub use optim::{AdamW, AdamWConfig};
pub use rng::Rng;
pub use schedule::WarmupCosine;
pub use trainer::{StepLog, Trainer, ValidationLog};
