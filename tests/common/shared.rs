//! Locating `../shared` (real CT data and golden fixtures) from a test.
//!
//! The folder is `$UNIV_SHARED_DIR` when set, else `shared/` beside the repository. When it is
//! missing, a test skips with a printed reason, except under `CI=true`, where it fails loudly.

use std::path::PathBuf;

/// The shared folder, or `None` (after printing why) when it is absent outside CI.
///
/// # Panics
/// When the folder is absent and `CI=true`.
#[allow(dead_code)]
pub fn shared_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("UNIV_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    if dir.join("data").is_dir() && dir.join("fixtures").is_dir() {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!(
            "CI=true but the shared data folder {} is missing: tests that need real CT data \
             and golden fixtures cannot run",
            dir.display()
        );
    }
    eprintln!(
        "skipping: shared data folder {} not found (set UNIV_SHARED_DIR)",
        dir.display()
    );
    None
}

/// A file under the shared folder, or `None` when the folder is absent outside CI.
///
/// # Panics
/// When the folder exists but the file does not (a broken checkout), or as [`shared_dir`].
#[allow(dead_code)]
pub fn shared_file(rel: &str) -> Option<PathBuf> {
    let p = shared_dir()?.join(rel);
    assert!(p.exists(), "missing shared file {}", p.display());
    Some(p)
}
