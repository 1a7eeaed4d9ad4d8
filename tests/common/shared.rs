//! Locating `../shared` (real CT data and golden fixtures) from a test.
//!
//! Tests that need it are marked `#[ignore = "needs ../shared ..."]`: a plain `cargo test`
//! lists them as ignored (they did not run), and `cargo test -- --include-ignored` (what
//! `.ci/run` and the README's test command do) runs them. The folder is `$UNIV_SHARED_DIR`
//! when set, else `shared/` beside the repository; a test that runs without it fails, naming
//! where it looked.

use std::path::PathBuf;

/// The shared folder.
///
/// # Panics
/// When the folder is absent: the test was asked to run but cannot.
#[allow(dead_code)]
pub fn shared_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("UNIV_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    assert!(
        dir.join("data").is_dir() && dir.join("fixtures").is_dir(),
        "the shared data folder {} is missing: tests that need real CT data and golden \
         fixtures cannot run (set UNIV_SHARED_DIR, or run without --include-ignored)",
        dir.display()
    );
    Some(dir)
}

/// A file under the shared folder.
///
/// # Panics
/// When the folder or the file is missing.
#[allow(dead_code)]
pub fn shared_file(rel: &str) -> Option<PathBuf> {
    let p = shared_dir()?.join(rel);
    assert!(p.exists(), "missing shared file {}", p.display());
    Some(p)
}
