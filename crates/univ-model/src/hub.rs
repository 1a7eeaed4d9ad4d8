//! Named official checkpoints, resolved through the hf-hub cache.
//!
//! `unet` and `swinunetr` name the released files of `ljwztc/CLIP-Driven-Universal-Model`
//! (`clip_driven_universal_unet.pth`, `clip_driven_universal_swin_unetr.pth`). They are looked
//! up in the local hf-hub cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`); when absent,
//! and when this crate is built with the `download` feature and `HF_HUB_OFFLINE` is not set,
//! they are downloaded into it. The weights are licensed CC BY-NC-ND 4.0 by their authors: the
//! notice is printed the first time a file is used.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::error::{Error, Result};

/// The Hugging Face repository of the official weights.
pub const OFFICIAL_REPO: &str = "ljwztc/CLIP-Driven-Universal-Model";

/// The licence notice of the official weights.
pub const OFFICIAL_LICENCE: &str = "The official CLIP-Driven Universal Model weights are \
licensed CC BY-NC-ND 4.0 by their authors (Johns Hopkins University): non-commercial use only, \
no derivatives. See https://creativecommons.org/licenses/by-nc-nd/4.0/";

/// A released checkpoint known by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedCheckpoint {
    /// `clip_driven_universal_unet.pth`.
    Unet,
    /// `clip_driven_universal_swin_unetr.pth`.
    SwinUnetr,
}

impl NamedCheckpoint {
    /// Parses `unet` or `swinunetr` (also `swin_unetr`, `swin`).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "unet" => Some(NamedCheckpoint::Unet),
            "swinunetr" | "swin_unetr" | "swin" => Some(NamedCheckpoint::SwinUnetr),
            _ => None,
        }
    }

    /// The file name in the repository.
    pub fn filename(self) -> &'static str {
        match self {
            NamedCheckpoint::Unet => "clip_driven_universal_unet.pth",
            NamedCheckpoint::SwinUnetr => "clip_driven_universal_swin_unetr.pth",
        }
    }
}

/// A checkpoint file found for a name or a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedCheckpoint {
    /// The file.
    pub path: PathBuf,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// The named checkpoint it stands for, if any.
    pub named: Option<NamedCheckpoint>,
    /// `true` when it was downloaded by this call.
    pub downloaded: bool,
}

/// SHA-256 of a file, hex.
///
/// # Errors
/// [`Error::Checkpoint`] when the file cannot be read.
pub fn sha256_file(path: &Path) -> Result<String> {
    let err = |e: std::io::Error| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Resolves `spec`: an existing file path, or a name (`unet`, `swinunetr`) looked up in the
/// default hf-hub cache (downloaded when allowed; see the module docs).
///
/// # Errors
/// [`Error::Checkpoint`] when the path does not exist, or the name is unknown, not cached and
/// cannot be downloaded (the message says what to do).
pub fn resolve_checkpoint(spec: &str) -> Result<ResolvedCheckpoint> {
    resolve_checkpoint_in(spec, &hf_hub::Cache::from_env(), !offline())
}

/// [`resolve_checkpoint`] with an explicit cache and download permission.
///
/// # Errors
/// As [`resolve_checkpoint`].
pub fn resolve_checkpoint_in(
    spec: &str,
    cache: &hf_hub::Cache,
    allow_download: bool,
) -> Result<ResolvedCheckpoint> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(ResolvedCheckpoint {
            path: p.to_path_buf(),
            sha256: sha256_file(p)?,
            named: None,
            downloaded: false,
        });
    }
    let Some(named) = NamedCheckpoint::parse(spec) else {
        return Err(Error::Checkpoint {
            path: p.to_path_buf(),
            reason: "no such file, and not a named checkpoint (unet, swinunetr)".into(),
        });
    };
    let file = named.filename();
    let (path, downloaded) = match cache.model(OFFICIAL_REPO.to_string()).get(file) {
        Some(path) => (path, false),
        None => (download(cache, file, allow_download)?, true),
    };
    let marker = cache.path().join(format!(".univ-licence-shown-{file}"));
    if !marker.exists() {
        eprintln!("note: {file}: {OFFICIAL_LICENCE}");
        let _ = std::fs::create_dir_all(cache.path());
        let _ = std::fs::write(&marker, b"shown\n");
    }
    Ok(ResolvedCheckpoint {
        sha256: sha256_file(&path)?,
        path,
        named: Some(named),
        downloaded,
    })
}

#[cfg(feature = "download")]
fn download(cache: &hf_hub::Cache, file: &str, allow: bool) -> Result<PathBuf> {
    let not_cached = |reason: String| Error::Checkpoint {
        path: PathBuf::from(file),
        reason,
    };
    if !allow {
        return Err(not_cached(format!(
            "not in the hf-hub cache at {} and HF_HUB_OFFLINE is set",
            cache.path().display()
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(true)
        .build()
        .map_err(|e| not_cached(format!("cannot start a download: {e}")))?;
    api.model(OFFICIAL_REPO.to_string())
        .get(file)
        .map_err(|e| not_cached(format!("download from {OFFICIAL_REPO} failed: {e}")))
}

#[cfg(not(feature = "download"))]
fn download(cache: &hf_hub::Cache, file: &str, _allow: bool) -> Result<PathBuf> {
    Err(Error::Checkpoint {
        path: PathBuf::from(file),
        reason: format!(
            "not in the hf-hub cache at {}; this build cannot download (enable the `download` \
             feature) — fetch {OFFICIAL_REPO}/{file} into the cache or pass its path",
            cache.path().display()
        ),
    })
}

/// SHA-256 (hex) of a tensor's values as little-endian f32, row-major.
///
/// # Errors
/// Tensor errors.
pub fn sha256_of_tensor(t: &candle_core::Tensor) -> Result<String> {
    let v = crate::ops::to_f32_vec(t)?;
    let mut h = sha2::Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
