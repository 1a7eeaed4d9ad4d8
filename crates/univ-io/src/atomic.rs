//! Writing files so that a crash never leaves half of one: the content goes to a temporary
//! sibling (same folder, so the rename is atomic on one file system), is synced to disk, and
//! is renamed over the destination. A failure removes the temporary file.
//!
//! Temporary names are `.NAME-univ-tmp-PID-N-HOST.EXT`: hidden, recognisable as univ's, unique
//! per process and call, tagged with the machine (`HOST`, 8 hex digits of a hash of its host
//! name, so that on a file system shared by a cluster only the machine that made a temporary
//! ever judges whether its process still runs), and ending in the destination's extension
//! (writers that choose the format from it, such as gzip for `.nii.gz`, see the same one). No
//! dot comes before the extension, so writers that swap extensions (the nifti crate does) keep
//! the whole name.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The marker in the name of every temporary file and folder univ writes.
pub const TEMP_MARKER: &str = "-univ-tmp-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The prefix of the temporary siblings of `path` (`.NAME-univ-tmp-`).
fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = match name.split_once('.') {
        Some((s, _)) if !s.is_empty() => s.to_string(),
        _ => name,
    };
    format!(".{stem}{TEMP_MARKER}")
}

/// This machine's tag in temporary names: FNV-1a (32 bits) of the host name, in hex.
fn host_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .or_else(|| std::env::var("COMPUTERNAME").ok())
            .unwrap_or_default();
        let mut h: u32 = 0x811c_9dc5;
        for b in name.trim().bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        format!("{h:08x}")
    })
}

/// `true` while a process with this id runs (Linux: `/proc/PID`); `true` where that cannot
/// be known, so that nothing of a live process is ever removed.
fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    proc.join(pid.to_string()).exists()
}

/// Removes the temporary siblings of `path` that an earlier univ process left when it was
/// killed (a crash, `kill -9`, a power cut): entries named `.NAME-univ-tmp-PID-N-HOST...` made
/// on this machine whose process no longer runs (names without the machine tag, from older
/// versions, count as this machine's). Temporaries of other machines are left alone: whether
/// their process runs cannot be known here. Nothing else is touched; returns what was removed.
pub fn remove_stale_temps(path: &Path) -> Vec<PathBuf> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = temp_prefix(path);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let mut fields = rest.split('-');
        let pid: Option<u32> = fields.next().and_then(|p| p.parse().ok());
        let Some(pid) = pid else { continue };
        let _call = fields.next();
        if let Some(host) = fields.next() {
            let host = host.split('.').next().unwrap_or(host);
            if host != host_tag() {
                continue;
            }
        }
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let p = e.path();
        // Not following links: a link is removed as the link.
        let gone = match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p).is_ok(),
            Ok(_) => std::fs::remove_file(&p).is_ok(),
            Err(_) => false,
        };
        if gone {
            removed.push(p);
        }
    }
    removed
}

/// `true` when `a` and `b` name the same file (also through links, `..` or relative paths):
/// the same device and inode when both exist, else the same canonical folder and file name.
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
    }
    let canon = |p: &Path| -> Option<PathBuf> {
        if let Ok(c) = p.canonicalize() {
            return Some(c);
        }
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Some(dir.canonicalize().ok()?.join(p.file_name()?))
    };
    match (canon(a), canon(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// A fresh temporary sibling of `path`: `.NAME-univ-tmp-PID-N-HOST.EXT` in the same folder, where
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
        ".{stem}{TEMP_MARKER}{}-{n}-{}{ext}",
        std::process::id(),
        host_tag()
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
    remove_stale_temps(path);
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
        assert!(name.contains(&format!("-{}.nii.gz", host_tag())), "{name}");
        assert!(name.ends_with(".nii.gz"), "{name}");
        let u = temp_sibling(Path::new("report"));
        assert_eq!(u.parent(), Some(Path::new(".")));
        assert_ne!(t, temp_sibling(Path::new("/a/b/seg.nii.gz")));
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("case");
        // A process id that cannot run (above Linux's pid_max of 2^22).
        let dead = dir.path().join(".case-univ-tmp-999999999-0");
        std::fs::create_dir_all(dead.join("masks")).unwrap();
        let dead_file = dir.path().join(".case-univ-tmp-999999999-3.nii.gz");
        std::fs::write(&dead_file, b"x").unwrap();
        let dead_here = dir
            .path()
            .join(format!(".case-univ-tmp-999999999-4-{}.nii.gz", host_tag()));
        std::fs::write(&dead_here, b"x").unwrap();
        // Another machine's (on a shared file system): its process may well run there.
        let elsewhere = dir.path().join(".case-univ-tmp-999999999-5-0badf00d");
        std::fs::create_dir_all(&elsewhere).unwrap();
        let live = dir
            .path()
            .join(format!(".case-univ-tmp-{}-1", std::process::id()));
        std::fs::create_dir_all(&live).unwrap();
        let other = [
            dir.path().join(".other-univ-tmp-999999999-0"),
            dir.path().join(".case-partial"),
            elsewhere,
            dir.path().join("case"),
        ];
        for o in &other {
            std::fs::create_dir_all(o).unwrap();
        }
        let mut removed = remove_stale_temps(&out);
        removed.sort();
        let mut expected = vec![dead.clone(), dead_file.clone(), dead_here.clone()];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(!dead.exists() && !dead_file.exists() && !dead_here.exists());
        assert!(live.exists());
        assert!(other.iter().all(|o| o.exists()));
    }

    #[test]
    fn same_file_sees_through_links_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.nii");
        std::fs::write(&a, b"x").unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        assert!(same_file(&a, &sub.join("../a.nii")));
        #[cfg(unix)]
        {
            let link = dir.path().join("link.nii");
            std::os::unix::fs::symlink(&a, &link).unwrap();
            assert!(same_file(&a, &link));
        }
        assert!(!same_file(&a, &dir.path().join("b.nii")));
        assert!(same_file(&dir.path().join("b.nii"), &sub.join("../b.nii")));
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
