//! Small file helpers: atomic writes and safetensors with metadata.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary file in the same folder, synced and renamed,
/// so a crash never leaves half a file.
///
/// # Errors
/// [`Error::File`] naming the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    univ_io::atomic::write_atomic_with(
        path,
        |tmp| std::fs::write(tmp, bytes).map_err(|e| Error::file(path, e)),
        |e| Error::file(path, e),
    )
}

/// Saves f32 tensors (converted) with string metadata, atomically.
///
/// # Errors
/// [`Error::Model`] naming the file.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    Ok(univ_model::checkpoint::save_safetensors(
        path, tensors, metadata,
    )?)
}

/// Loads every tensor of a safetensors file onto `device`, with its metadata.
///
/// # Errors
/// [`Error::Checkpoint`] naming the file.
pub fn load_safetensors(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bad = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| bad(format!("cannot read tensors: {e}")))?;
    Ok((tensors, meta))
}
