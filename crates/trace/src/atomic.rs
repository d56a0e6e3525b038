//! Atomic file output: write to a temporary file in the destination directory, fsync it, then
//! rename it over the destination (so readers see either the old file or the complete new one,
//! never a half-written one). Uses the maintained `tempfile` crate for the uniquely named temp file.

use std::io::Write;
use std::path::Path;

use crate::{Result, TraceError};

/// Writes `bytes` to `path` atomically (temp file in the same directory + fsync + rename).
pub fn write_atomic(path: impl AsRef<Path>, bytes: impl AsRef<[u8]>) -> Result<()> {
    let bytes = bytes.as_ref();
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Like [`write_atomic`], but the content is produced by `fill`, which writes into a buffered
/// writer (for large outputs that should not be built in memory first).
pub fn write_atomic_with(
    path: impl AsRef<Path>,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let io = |e| TraceError::io(path, e);
    let tmp = tempfile::Builder::new()
        .prefix(".moe-xray-tmp-")
        .tempfile_in(&dir)
        .map_err(io)?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file());
        fill(&mut w).map_err(io)?;
        w.flush().map_err(io)?;
    }
    // tempfile creates 0600 files; outputs are ordinary files (0644 before the umask would apply),
    // readable by the other users of a shared server like any file the tool writes directly.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path)
        .map_err(|e| TraceError::io(path, e.error))?;
    sync_dir(&dir);
    Ok(())
}

/// Best-effort fsync of a directory so that a rename/creation in it is durable (no-op where
/// directories cannot be opened, e.g. on Windows).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_replaces_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let n = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(n, 1, "temp files left behind");
    }

    #[test]
    fn failing_fill_leaves_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        write_atomic(&p, b"old").unwrap();
        let r = write_atomic_with(&p, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("boom"))
        });
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("out.json") && msg.contains("boom"), "{msg}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope").join("x.json");
        let msg = write_atomic(&p, b"x").unwrap_err().to_string();
        assert!(msg.contains("x.json"), "{msg}");
    }
}

#[cfg(all(test, unix))]
mod permission_tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn outputs_are_ordinary_readable_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        super::write_atomic(&path, b"{}\n").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "mode {mode:o}");
        assert_eq!(std::fs::read(&path).unwrap(), b"{}\n");
    }
}
