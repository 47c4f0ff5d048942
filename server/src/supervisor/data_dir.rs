//! The data directory of a local cluster: owned by one `confab up` at a
//! time (an advisory lock held while it runs), and private to its user
//! (0700; files written here are 0600), since it holds the admin token,
//! the secrets and every transcript.

use anyhow::Context;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Held while the cluster runs; the lock goes with the process.
pub struct DataDirLock {
    _file: File,
}

/// Create the directory (0700) and take its lock, or say who holds it.
pub fn lock(dir: &Path) -> anyhow::Result<(PathBuf, DataDirLock)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))?;
    let path = dir.join("up.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock(2) on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        anyhow::bail!(
            "the data directory {} is in use by another `confab up` (pid {}); stop it, or give this one another --data-dir",
            dir.display(),
            holder.trim()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok((dir, DataDirLock { _file: file }))
}

/// Write a file only its owner can read, replacing it atomically.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Create a private subdirectory.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let (canonical, held) = lock(dir.path()).unwrap();
        let mode = std::fs::metadata(&canonical).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let err = lock(dir.path()).err().unwrap().to_string();
        assert!(err.contains("in use by another `confab up`"), "{err}");
        assert!(err.contains(&std::process::id().to_string()), "{err}");
        drop(held);
        assert!(
            lock(dir.path()).is_ok(),
            "free again once the holder is gone"
        );
    }

    #[test]
    fn private_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_private(&path, "x").unwrap();
        write_private(&path, "y").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "y");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
