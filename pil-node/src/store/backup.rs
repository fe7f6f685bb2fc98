//! Backups of a node's store and their restore.
//!
//! A backup is a consistent snapshot of the store (a RocksDB checkpoint: hard links
//! to its immutable files, taken while the node serves) copied into a directory of
//! its own with a manifest that names every file and its SHA-256, the newest head the
//! node had signed when the snapshot was taken, and the region. A restore checks all
//! of that before it puts the copy in a stopped node's data directory, and leaves a
//! note the node reads at its next start: the records written after the backup are
//! gone, and the node says so (in its log and its audit log) because its peers and
//! auditors may hold newer heads. Keys are not in a backup: see docs/operator-guide.md.

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// The manifest's name in a backup directory.
pub const MANIFEST: &str = "manifest.json";
/// The snapshot's directory in a backup.
const SNAPSHOT: &str = "store";
/// The note a restore leaves in the data directory for the next start.
const RESTORED_NOTE: &str = "RESTORED.json";
/// Where a snapshot is made before it is copied: inside the data directory, so the
/// checkpoint's hard links stay on one file system.
const CHECKPOINT_PREFIX: &str = "backup-checkpoint-";
/// The manifest format this node writes and reads.
const FORMAT: u32 = 1;

/// Why a backup or restore could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Target(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the backup in {dir} cannot be used: {reason}")]
    Unusable { dir: String, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What a backup holds, written beside it as `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: u32,
    pub region: String,
    pub engine: String,
    pub node_version: String,
    /// When the snapshot was taken, RFC 3339.
    pub taken_at: String,
    /// The newest head signed before the snapshot: the backup holds at least the
    /// records it covers.
    pub signed_size: u64,
    pub signed_head: String,
    pub files: Vec<FileEntry>,
}

/// One file of the snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// What the next start of a restored node is told.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestoredNote {
    pub backup: String,
    pub taken_at: String,
    pub restored_at: String,
    /// Records in the restored log.
    pub records: u64,
    pub signed_size: u64,
}

impl RestoredNote {
    /// What the node logs and records at start.
    pub fn describe(&self) -> String {
        format!(
            "the store was restored at {} from the backup {} taken at {}; the audit log ends \
             at record {} and every record written after the backup is lost: peers and \
             auditors that hold heads of more than {} records will find this log diverging \
             from them",
            self.restored_at, self.backup, self.taken_at, self.records, self.records
        )
    }
}

/// Refuses a backup directory that exists and is not empty, or is not absolute.
pub fn check_target(dir: &Path) -> Result<(), BackupError> {
    if !dir.is_absolute() {
        return Err(BackupError::Target(format!(
            "the backup directory {} must be an absolute path (the node resolves it, not \
             your shell)",
            dir.display()
        )));
    }
    match std::fs::read_dir(dir).map(|mut entries| entries.next().is_some()) {
        Ok(true) => Err(BackupError::Target(format!(
            "{} exists and is not empty; give a new directory for each backup",
            dir.display()
        ))),
        Ok(false) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match dir.parent() {
            Some(parent) if parent.is_dir() => Ok(()),
            _ => Err(BackupError::Target(format!(
                "the parent of {} does not exist",
                dir.display()
            ))),
        },
        Err(e) => Err(io(dir)(e)),
    }
}

/// A fresh place in the data directory for a snapshot.
pub fn checkpoint_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(format!("{CHECKPOINT_PREFIX}{}", crate::store::now_nanos()))
}

/// Removes snapshots a backup left behind when it was interrupted.
pub fn remove_stale_checkpoints(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(CHECKPOINT_PREFIX)
            && let Err(e) = std::fs::remove_dir_all(entry.path())
        {
            tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove an interrupted backup's snapshot");
        }
    }
}

/// The files of a snapshot directory and their total size.
fn files_of(dir: &Path) -> Result<(Vec<(String, u64)>, u64), BackupError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let meta = entry.metadata().map_err(io(&entry.path()))?;
        if meta.is_file() {
            files.push((entry.file_name().to_string_lossy().into_owned(), meta.len()));
        }
    }
    files.sort();
    let total = files.iter().map(|(_, n)| n).sum();
    Ok((files, total))
}

/// Copies every file of `from` into the new directory `to`, each made durable, with
/// `progress(copied, total)` along the way; returns what was copied.
fn copy_files(
    from: &Path,
    to: &Path,
    progress: &mut dyn FnMut(u64, u64),
    expected: Option<&[FileEntry]>,
) -> Result<Vec<FileEntry>, BackupError> {
    let (files, total) = files_of(from)?;
    std::fs::create_dir_all(to).map_err(io(to))?;
    let mut copied = 0u64;
    let mut entries = Vec::with_capacity(files.len());
    let mut buf = vec![0u8; 1 << 20];
    for (name, _) in files {
        let (src, dst) = (from.join(&name), to.join(&name));
        let mut input = std::fs::File::open(&src).map_err(io(&src))?;
        let mut output = std::fs::File::create(&dst).map_err(io(&dst))?;
        let mut hash = sha2::Sha256::new();
        let mut bytes = 0u64;
        loop {
            let n = input.read(&mut buf).map_err(io(&src))?;
            if n == 0 {
                break;
            }
            output.write_all(&buf[..n]).map_err(io(&dst))?;
            hash.update(&buf[..n]);
            bytes += n as u64;
            copied += n as u64;
            progress(copied, total);
        }
        output.sync_all().map_err(io(&dst))?;
        entries.push(FileEntry {
            name,
            bytes,
            sha256: hex::encode(hash.finalize()),
        });
    }
    sync_dir(to)?;
    if let Some(expected) = expected {
        let mut want = expected.to_vec();
        want.sort_by(|a, b| a.name.cmp(&b.name));
        if want != entries {
            let differs = want
                .iter()
                .find(|w| !entries.contains(w))
                .map(|w| w.name.clone())
                .or_else(|| {
                    entries
                        .iter()
                        .find(|e| !want.contains(e))
                        .map(|e| e.name.clone())
                })
                .unwrap_or_default();
            return Err(BackupError::Unusable {
                dir: from.display().to_string(),
                reason: format!(
                    "{differs} is missing, extra or not what the manifest says (size or \
                     SHA-256)"
                ),
            });
        }
    }
    Ok(entries)
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn copy_backup(
    checkpoint: &Path,
    to: &Path,
    mut manifest: Manifest,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Manifest, BackupError> {
    let copied = copy_files(checkpoint, &to.join(SNAPSHOT), progress, None);
    if let Err(e) = std::fs::remove_dir_all(checkpoint) {
        tracing::warn!(path = %checkpoint.display(), error = %e, "cannot remove the backup's snapshot");
    }
    manifest.format = FORMAT;
    manifest.files = copied?;
    let path = to.join(MANIFEST);
    let text = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    let mut file = std::fs::File::create(&path).map_err(io(&path))?;
    file.write_all(text.as_bytes()).map_err(io(&path))?;
    file.sync_all().map_err(io(&path))?;
    sync_dir(to)?;
    Ok(manifest)
}

/// Reads and checks a backup's manifest against the node it is restored to.
pub fn read_manifest(backup: &Path, region: &str) -> Result<Manifest, BackupError> {
    let unusable = |reason: String| BackupError::Unusable {
        dir: backup.display().to_string(),
        reason,
    };
    let path = backup.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        unusable(format!(
            "no readable {MANIFEST} ({e}); a backup without one was interrupted"
        ))
    })?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| unusable(format!("{MANIFEST}: {e}")))?;
    if manifest.format != FORMAT {
        return Err(unusable(format!(
            "its manifest has format {}; this node reads format {FORMAT}",
            manifest.format
        )));
    }
    if manifest.region != region {
        return Err(unusable(format!(
            "it is a backup of region {}, and this node serves {region}",
            manifest.region
        )));
    }
    if manifest.engine != "rocksdb" {
        return Err(unusable(format!(
            "it is a backup of the {} engine; restore those with the database's own tools",
            manifest.engine
        )));
    }
    Ok(manifest)
}

fn copy_restore(
    backup: &Path,
    manifest: &Manifest,
    data_dir: &Path,
    replace: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Option<PathBuf>, BackupError> {
    let holds_data = std::fs::read_dir(data_dir)
        .map(|mut e| e.next().is_some())
        .unwrap_or(false);
    if holds_data && !replace {
        return Err(BackupError::Target(format!(
            "{} holds data; stop the node and pass --replace to move it aside (it is kept, \
             renamed) and restore in its place",
            data_dir.display()
        )));
    }
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let staging = data_dir.with_file_name(format!(".{name}.restoring"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    if let Err(e) = copy_files(
        &backup.join(SNAPSHOT),
        &staging,
        progress,
        Some(&manifest.files),
    ) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let moved = if holds_data {
        let aside = data_dir.with_file_name(format!(
            "{name}.before-restore-{}",
            crate::store::now_nanos()
        ));
        std::fs::rename(data_dir, &aside).map_err(io(data_dir))?;
        Some(aside)
    } else {
        if data_dir.exists() {
            std::fs::remove_dir(data_dir).map_err(io(data_dir))?;
        }
        None
    };
    std::fs::rename(&staging, data_dir).map_err(io(data_dir))?;
    if let Some(parent) = data_dir.parent() {
        sync_dir(parent)?;
    }
    Ok(moved)
}

/// Leaves `note` for the node's next start.
pub fn leave_note(data_dir: &Path, note: &RestoredNote) -> Result<(), BackupError> {
    let path = data_dir.join(RESTORED_NOTE);
    let mut file = std::fs::File::create(&path).map_err(io(&path))?;
    file.write_all(
        serde_json::to_string_pretty(note)
            .unwrap_or_default()
            .as_bytes(),
    )
    .map_err(io(&path))?;
    file.sync_all().map_err(io(&path))
}

/// The note a restore left, if any. [`forget_note`] once it is recorded.
pub fn restored_note(data_dir: &Path) -> Option<RestoredNote> {
    let text = std::fs::read_to_string(data_dir.join(RESTORED_NOTE)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn forget_note(data_dir: &Path) {
    let path = data_dir.join(RESTORED_NOTE);
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove the restore's note");
    }
}

fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Now as RFC 3339.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Copies the snapshot in `checkpoint` into the new backup directory `to` with its
/// manifest (written last, so a backup with a manifest is complete), then removes the
/// snapshot; `progress(copied, total)` is told along the way.
pub async fn write_backup(
    checkpoint: PathBuf,
    to: PathBuf,
    manifest: Manifest,
    mut progress: impl FnMut(u64, u64) + Send + 'static,
) -> Result<Manifest, BackupError> {
    blocking(move || copy_backup(&checkpoint, &to, manifest, &mut progress)).await
}

/// Puts the backup's snapshot in place as `data_dir`, checking every file against
/// the manifest. `data_dir` must not hold data, unless `replace`, when it is moved
/// aside (never deleted: it may be evidence) and its new name returned.
pub async fn restore_files(
    backup: PathBuf,
    manifest: Manifest,
    data_dir: PathBuf,
    replace: bool,
    mut progress: impl FnMut(u64, u64) + Send + 'static,
) -> Result<Option<PathBuf>, BackupError> {
    blocking(move || copy_restore(&backup, &manifest, &data_dir, replace, &mut progress)).await
}

/// Bytes of every file under `dir`.
pub async fn dir_bytes(dir: PathBuf) -> u64 {
    blocking(move || Ok(bytes_under(&dir))).await.unwrap_or(0)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, BackupError> + Send + 'static,
) -> Result<T, BackupError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| BackupError::Target(format!("the copy stopped: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_directory_must_be_new_or_empty_and_absolute() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_target(&dir.path().join("new")).is_ok());
        assert!(check_target(dir.path()).is_ok());
        std::fs::write(dir.path().join("x"), "x").unwrap();
        assert!(check_target(dir.path()).is_err());
        assert!(check_target(Path::new("relative")).is_err());
        assert!(check_target(&dir.path().join("no").join("parent")).is_err());
    }

    #[test]
    fn a_changed_file_in_a_backup_is_refused_at_restore() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("snap");
        std::fs::create_dir(&snapshot).unwrap();
        std::fs::write(snapshot.join("000001.sst"), vec![7u8; 3000]).unwrap();
        std::fs::write(snapshot.join("CURRENT"), "MANIFEST-000002\n").unwrap();
        let manifest = Manifest {
            format: FORMAT,
            region: "vest".into(),
            engine: "rocksdb".into(),
            node_version: "test".into(),
            taken_at: now_rfc3339(),
            signed_size: 0,
            signed_head: String::new(),
            files: Vec::new(),
        };
        let backup = dir.path().join("backup");
        let mut seen = Vec::new();
        let written =
            copy_backup(&snapshot, &backup, manifest, &mut |c, t| seen.push((c, t))).unwrap();
        assert!(!snapshot.exists(), "the snapshot is removed once copied");
        assert_eq!(written.files.len(), 2);
        assert_eq!(seen.last(), Some(&(3016, 3016)));
        let read = read_manifest(&backup, "vest").unwrap();
        assert_eq!(read, written);
        assert!(read_manifest(&backup, "nord").is_err());

        let data = dir.path().join("data");
        copy_restore(&backup, &read, &data, false, &mut |_, _| {}).unwrap();
        assert_eq!(
            std::fs::read(data.join("000001.sst")).unwrap(),
            vec![7u8; 3000]
        );
        // A data directory that holds data is kept unless told, and then moved aside.
        assert!(copy_restore(&backup, &read, &data, false, &mut |_, _| {}).is_err());
        let aside = copy_restore(&backup, &read, &data, true, &mut |_, _| {})
            .unwrap()
            .expect("moved aside");
        assert!(aside.join("CURRENT").exists());

        std::fs::write(backup.join(SNAPSHOT).join("000001.sst"), vec![8u8; 3000]).unwrap();
        let err = copy_restore(
            &backup,
            &read,
            &dir.path().join("other"),
            false,
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("000001.sst"), "{err}");
        assert!(!dir.path().join("other").exists());
    }
}
