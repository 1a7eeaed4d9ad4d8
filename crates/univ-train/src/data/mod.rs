//! Dataset assembly: the manifest, the official label conventions, case preparation with a
//! disk cache, patch sampling and augmentation, and a loader that prepares batches on worker
//! threads.

pub mod augment;
pub mod case;
pub mod loader;
pub mod manifest;
pub mod presets;

pub use case::{CaseCache, LabelRules, PreparedCase, prepare_case};
pub use manifest::{CaseFiles, Dataset, Manifest, Role};
