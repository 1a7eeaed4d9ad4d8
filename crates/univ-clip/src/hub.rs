//! CLIP files from the hf-hub cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).

use std::path::PathBuf;

use crate::error::{Error, Result};

/// The Hugging Face repository of OpenAI's ViT-B/32 CLIP.
pub const VIT_B_32_REPO: &str = "openai/clip-vit-base-patch32";

/// The files a CLIP text encoder folder needs.
const FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "vocab.json",
    "merges.txt",
];

/// Finds (or, with the `download` feature and without `HF_HUB_OFFLINE`, downloads) the CLIP
/// files of a Hugging Face repository and returns the snapshot folder holding them.
///
/// # Errors
/// [`Error::File`] naming the first file that is neither cached nor downloadable.
pub fn resolve_repo(repo: &str) -> Result<PathBuf> {
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    resolve_repo_in(repo, &hf_hub::Cache::from_env(), !offline)
}

/// [`resolve_repo`] with an explicit cache and download permission.
///
/// # Errors
/// As [`resolve_repo`].
pub fn resolve_repo_in(repo: &str, cache: &hf_hub::Cache, allow_download: bool) -> Result<PathBuf> {
    let mut dir = None;
    for f in FILES {
        let path = match cache.model(repo.to_string()).get(f) {
            Some(p) => p,
            None => fetch(cache, repo, f, !allow_download)?,
        };
        dir = path.parent().map(PathBuf::from);
    }
    dir.ok_or_else(|| Error::file(repo, "empty file list"))
}

#[cfg(feature = "download")]
fn fetch(cache: &hf_hub::Cache, repo: &str, file: &str, offline: bool) -> Result<PathBuf> {
    if offline {
        return Err(Error::file(
            format!("{repo}/{file}"),
            "not in the hf-hub cache and HF_HUB_OFFLINE is set",
        ));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .build()
        .map_err(|e| Error::file(format!("{repo}/{file}"), e))?;
    api.model(repo.to_string())
        .get(file)
        .map_err(|e| Error::file(format!("{repo}/{file}"), e))
}

#[cfg(not(feature = "download"))]
fn fetch(cache: &hf_hub::Cache, repo: &str, file: &str, _offline: bool) -> Result<PathBuf> {
    Err(Error::file(
        format!("{repo}/{file}"),
        format!(
            "not in the hf-hub cache at {} (this build cannot download; enable the `download` feature)",
            cache.path().display()
        ),
    ))
}
