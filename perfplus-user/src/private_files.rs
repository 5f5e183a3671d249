//! Files only this host's agent may read: its state directory (0700), the page store in it (a 0700
//! directory of 0600 files: they hold guest memory), and the private keys `perfplus ca init` and
//! `perfplus cert issue` write (0600). Nothing here is encrypted: the modes keep other users out; root and whoever
//! holds the disk can read it all.
use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

/// Mode of the directories perfplus creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files perfplus creates.
pub const FILE_MODE: u32 = 0o600;

/// The agent's state directory: created 0700 (with its missing parents). One that exists with access
/// for group or others is left as it is (it may be shared, e.g. `/tmp`), with a warning: what perfplus
/// keeps in it is private by its own modes.
pub fn state_dir(path: &Path) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .with_context(|| format!("creating the state directory {}", path.display()))?;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading the state directory {}", path.display()))?
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %path.display(),
            mode = format!("{:o}", mode & 0o7777),
            "the state directory is open to other users; the files perfplus keeps in it are private \
             (0700 directories, 0600 files), but consider `chmod 700` on it"
        );
    }
    Ok(())
}

/// A directory of perfplus's own (e.g. the page store's): created 0700, and tightened to 0700 if it
/// exists with more.
pub fn own_dir(path: &Path) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .with_context(|| format!("creating directory {}", path.display()))?;
    let metadata = std::fs::metadata(path).with_context(|| format!("reading directory {}", path.display()))?;
    if metadata.mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE))
            .with_context(|| format!("making directory {} private (mode 700)", path.display()))?;
    }
    Ok(())
}

/// Opens (creating if needed) a file of perfplus's own for reading and writing, mode 0600; a file
/// that exists with more is tightened to 0600.
pub fn open_own_file(path: &Path) -> anyhow::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mode = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .mode();
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
            .with_context(|| format!("making {} private (mode 600)", path.display()))?;
    }
    Ok(file)
}

/// Warns when a secret file (the cluster key) can be read by group or others.
pub fn warn_if_readable_by_others(path: &Path, what: &str) {
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{what} {} is readable by other users (mode {:o}); `chmod 600` it",
                path.display(),
                mode & 0o7777
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn created_private_and_tightened_when_ours() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state/nested");
        state_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        // A shared state directory is left as it is.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        state_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o755);

        let own = state.join("page-store");
        own_dir(&own).unwrap();
        assert_eq!(mode(&own), 0o700);
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o755)).unwrap();
        own_dir(&own).unwrap();
        assert_eq!(mode(&own), 0o700);

        let file = own.join("data");
        open_own_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        open_own_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
    }
}
