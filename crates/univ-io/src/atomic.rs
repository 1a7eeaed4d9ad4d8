//! Writing files so that a crash never leaves half of one: the content goes to a temporary
//! sibling (same folder, so the rename is atomic on one file system), is synced to disk, and
//! is renamed over the destination. A failure removes the temporary file.
//!
//! Temporary names are `.NAME-univ-tmp-PID-N.EXT`: hidden, recognisable as univ's, unique per
//! process and call, and ending in the destination's extension (writers that choose the
//! format from it, such as gzip for `.nii.gz`, see the same one). No dot comes before the
//! extension, so writers that swap extensions (the nifti crate does) keep the whole name.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The marker in the name of every temporary file and folder univ writes.
pub const TEMP_MARKER: &str = "-univ-tmp-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary sibling of `path`: `.NAME-univ-tmp-PID-N.EXT` in the same folder, where
/// `NAME.EXT` is the file name (`EXT` the part after the first dot, `nii.gz` for example).
pub fn temp_sibling(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, ext) = match name.split_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (name.clone(), String::new()),
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(
        ".{stem}{TEMP_MARKER}{}-{n}{ext}",
        std::process::id()
    ))
}

/// Writes `path` atomically: `write(tmp)` creates the content at a temporary sibling, which is
/// then synced and renamed to `path`. I/O errors of the sync and rename go through `io_err`.
///
/// # Errors
/// What `write` returns, or `io_err` of a sync or rename failure; the temporary file is
/// removed either way.
pub fn write_atomic_with<E>(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
    io_err: impl FnOnce(std::io::Error) -> E,
) -> std::result::Result<(), E> {
    let tmp = temp_sibling(path);
    let result = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(io_err)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` atomically (see the module docs).
///
/// # Errors
/// [`Error::Io`] naming `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(
        path,
        |tmp| std::fs::write(tmp, bytes).map_err(|e| Error::io(path, e)),
        |e| Error::io(path, e),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_keep_the_extension_and_the_marker() {
        let t = temp_sibling(Path::new("/a/b/seg.nii.gz"));
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(t.parent(), Some(Path::new("/a/b")));
        assert!(name.starts_with(".seg-univ-tmp-"), "{name}");
        assert_eq!(name.matches('.').count(), 3, "{name}");
        assert!(name.ends_with(".nii.gz"), "{name}");
        let u = temp_sibling(Path::new("report"));
        assert_eq!(u.parent(), Some(Path::new(".")));
        assert_ne!(t, temp_sibling(Path::new("/a/b/seg.nii.gz")));
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"one").unwrap();
        let r: std::result::Result<(), String> = write_atomic_with(
            &p,
            |tmp| {
                std::fs::write(tmp, b"half").unwrap();
                Err("failed".into())
            },
            |e| e.to_string(),
        );
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
