//! Small filesystem helpers shared by every writer in the crate.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// The temporary sibling `write_atomic` writes first: `path` with `.tmp` appended
/// (`model.safetensors` -> `model.safetensors.tmp`).
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Write `bytes` to `path` so that a reader (or a restart after a crash) sees either the old
/// file or the complete new one, never a half-written file: the bytes go to `path.tmp`, are
/// flushed to disk, and the temporary file is renamed over `path`. The parent folder must
/// exist. On failure the temporary file is removed and the error names the file involved.
///
/// Writers to the same `path` must not run concurrently (they would share `path.tmp`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| DataError::io(&tmp, e))?;
        f.sync_all().map_err(|e| DataError::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable. Best effort: not every platform lets a folder be
    // opened and synced, and the data is already safely in place.
    #[cfg(unix)]
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let Ok(dir) = File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Read a whole file, naming it in the error.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}

/// Read a whole UTF-8 text file. Invalid UTF-8 is a parse error naming the line, and a leading
/// byte-order mark is dropped.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = read_bytes(path)?;
    match String::from_utf8(bytes) {
        Ok(mut s) => {
            if s.starts_with('\u{feff}') {
                s.drain(..'\u{feff}'.len_utf8());
            }
            Ok(s)
        }
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
            Err(DataError::parse(
                path,
                line,
                "not UTF-8 text (a binary file? embeddings in .npy or .safetensors need that extension)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_whole_file_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        assert_eq!(tmp_path(&p), dir.path().join("model.safetensors.tmp"));
        write_atomic(&p, b"first version, long").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert!(!tmp_path(&p).exists());
        // A stale temporary file from a crash is simply overwritten.
        std::fs::write(tmp_path(&p), b"torn").unwrap();
        write_atomic(&p, b"third").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"third");
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn write_atomic_failure_leaves_target_and_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty folder fails: the folder stays, no tmp remains.
        let target = dir.path().join("taken");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"x").unwrap();
        let err = write_atomic(&target, b"data").unwrap_err();
        assert!(err.to_string().contains("taken"), "{err}");
        assert!(target.join("keep").exists());
        assert!(!tmp_path(&target).exists());
        // Missing parent folder: an Io error naming the temporary path.
        let err = write_atomic(&dir.path().join("nope/x.bin"), b"data").unwrap_err();
        assert!(matches!(err, DataError::Io { .. }));
    }

    #[test]
    fn read_text_strips_bom_and_locates_bad_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.txt");
        std::fs::write(&p, "\u{feff}a\tb\n").unwrap();
        assert_eq!(read_text(&p).unwrap(), "a\tb\n");
        std::fs::write(&p, b"ok\nok\nbad \xc3\x28\n").unwrap();
        let err = read_text(&p).unwrap_err();
        assert!(matches!(err, DataError::Parse { line: 3, .. }), "{err:?}");
    }
}
