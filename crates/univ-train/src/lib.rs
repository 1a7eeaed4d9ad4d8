#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![allow(clippy::needless_range_loop)]

pub mod data;
pub mod error;
pub mod io;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod rng;
pub mod schedule;

pub use error::{Error, Result};
pub use loss::{DiceMode, LossParts, partial_label_loss};
pub use optim::{AdamW, AdamWConfig};
pub use rng::Rng;
pub use schedule::WarmupCosine;
