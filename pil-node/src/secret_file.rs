//! Secret key files must be private to the node's user, as OpenSSH demands of its
//! keys: a key other users can read is a key that may already have been copied.

use std::path::{Path, PathBuf};

/// A secret key file that cannot be used as it is.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error(
        "cannot read {what} {}: {source}; check its path in the configuration, or restore \
         the file from its backup",
        path.display()
    )]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{what} {} is readable by other users (mode {mode:04o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    TooOpen {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
}

/// Refuses `path` unless only its owner may read or write it.
pub fn check_private(what: &'static str, path: &Path) -> Result<(), SecretFileError> {
    let meta = std::fs::metadata(path).map_err(|source| SecretFileError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretFileError::TooOpen {
                what,
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_owner_only_files_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "x").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o644, false),
            (0o604, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = check_private("key", &path);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(
                    e.to_string()
                        .contains(&format!("chmod 600 {}", path.display())),
                    "{e}"
                );
            }
        }
        assert!(matches!(
            check_private("key", &dir.path().join("missing")),
            Err(SecretFileError::Read { .. })
        ));
    }
}
