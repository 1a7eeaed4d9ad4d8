#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![allow(clippy::needless_range_loop)]

pub mod checkpoint;
pub mod classes;
pub(crate) mod cpu;
pub(crate) mod cuda;
pub mod error;
pub mod hub;
pub mod inferers;
pub mod layers;
pub mod lesions;
pub mod nets;
pub mod ops;
pub mod postprocess;
pub mod pth;
pub mod runtime;
pub mod segment;

pub use checkpoint::{Checkpoint, LoadReport};
pub use classes::{ClassInfo, ClassKind, ClassTable};
pub use error::{Error, Result};
pub use nets::{UniversalConfig, UniversalModel};
pub use segment::{Cancel, SegmentOptions, Segmentation, segment};
pub use univ_io::ClassMask;
