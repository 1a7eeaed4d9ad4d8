//! Finding the small demo model (`models/demo` in the source tree) at run time, so that an
//! installed `univ` works after the source tree is gone.
//!
//! Places looked in, in order:
//! 1. the file named by `UNIV_DEMO_MODEL`;
//! 2. beside the running binary (`univ_demo_unet.safetensors` in its folder);
//! 3. `models/demo/` in a folder above the binary (a build inside a source checkout, such as
//!    `target/release/univ`);
//! 4. `univ/` in the hf-hub cache, where the official weights go (`$HF_HOME/hub`, default
//!    `~/.cache/huggingface/hub`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The demo model's file name.
pub const DEMO_FILE: &str = "univ_demo_unet.safetensors";

/// The environment variable naming the demo model's file.
pub const DEMO_ENV: &str = "UNIV_DEMO_MODEL";

/// How many folders above the binary are searched for `models/demo/`.
const ANCESTORS: usize = 5;

/// Every place the demo model is looked for, in order (see the module docs).
pub fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(DEMO_ENV).filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        out.push(dir.join(DEMO_FILE));
        for a in dir.ancestors().skip(1).take(ANCESTORS) {
            out.push(a.join("models/demo").join(DEMO_FILE));
        }
    }
    out.push(cache_path());
    out
}

/// Where the demo model goes in the hf-hub cache.
pub fn cache_path() -> PathBuf {
    hf_hub::Cache::from_env()
        .path()
        .join("univ")
        .join(DEMO_FILE)
}

/// The demo model's file: the first of [`candidates`] that exists.
///
/// # Errors
/// [`Error::DemoNotFound`] listing every place looked in.
pub fn find() -> Result<PathBuf> {
    let looked = candidates();
    match looked.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => Err(Error::DemoNotFound {
            file: DEMO_FILE,
            looked,
        }),
    }
}
