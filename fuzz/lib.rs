//! The fuzz targets' shared harness (see `harness.rs`).
#[path = "harness.rs"]
pub mod harness;
