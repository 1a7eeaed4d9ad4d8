#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![allow(clippy::needless_range_loop)]

pub mod metrics;
