//! The groups whose legs at this node are mid-resync: a partial copy of the
//! owner's image, at no delta boundary (see the engine's
//! `Action::SaveResyncMarks`). One small text file, replaced atomically:
//! write a temporary file, fdatasync, rename, sync the directory. A crash
//! leaves the old set or the new one.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use stretch_core::GroupId;

use crate::filesystem::{FileSystem, StorageFile, replace_file};

const HEADER: &str = "stretch resync marks v1";
/// Far above any real set; a larger file is not ours.
const FILE_BYTES_MAX: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ResyncMarksError {
    #[error("resync marks {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("resync marks {path} are corrupt: {reason}")]
    Corrupt { path: String, reason: String },
}

/// Replaces the saved set with `groups`, durably.
pub fn save_resync_marks<F: FileSystem>(
    fs: &F,
    path: &Path,
    groups: &[GroupId],
) -> Result<(), ResyncMarksError> {
    let io_error = |source| ResyncMarksError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut text = String::from(HEADER);
    text.push('\n');
    for group in groups {
        text.push_str(&group.0.to_string());
        text.push('\n');
    }
    replace_file(fs, path, &path.with_extension("tmp"), text.as_bytes()).map_err(io_error)
}

/// The saved set (empty if none was ever saved).
pub fn load_resync_marks<F: FileSystem>(
    fs: &F,
    path: &Path,
) -> Result<BTreeSet<GroupId>, ResyncMarksError> {
    let io_error = |source| ResyncMarksError::Io {
        path: path.display().to_string(),
        source,
    };
    let corrupt = |reason: String| ResyncMarksError::Corrupt {
        path: path.display().to_string(),
        reason,
    };
    if !fs.exists(path) {
        return Ok(BTreeSet::new());
    }
    let file = fs.open(path, false).map_err(io_error)?;
    let len = file.len().map_err(io_error)?;
    if len > FILE_BYTES_MAX {
        return Err(corrupt(format!("{len} bytes")));
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0).map_err(io_error)?;
    let text = String::from_utf8(bytes).map_err(|_| corrupt("not UTF-8".into()))?;
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(corrupt("unknown header".into()));
    }
    lines
        .map(|line| {
            line.parse::<u32>()
                .map(GroupId)
                .map_err(|_| corrupt(format!("bad group id {line:?}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimFileSystem;

    #[test]
    fn a_saved_set_loads_back_and_a_missing_file_is_empty() {
        let fs = SimFileSystem::new();
        fs.create_dir_all(Path::new("/node")).expect("dir");
        let path = Path::new("/node/resync-marks");
        assert!(load_resync_marks(&fs, path).expect("load").is_empty());
        save_resync_marks(&fs, path, &[GroupId(3), GroupId(7)]).expect("save");
        let loaded = load_resync_marks(&fs, path).expect("load");
        assert_eq!(loaded, BTreeSet::from([GroupId(3), GroupId(7)]));
        save_resync_marks(&fs, path, &[]).expect("save");
        assert!(load_resync_marks(&fs, path).expect("load").is_empty());
    }

    #[test]
    fn a_saved_set_survives_a_crash() {
        let fs = SimFileSystem::new();
        fs.create_dir_all(Path::new("/node")).expect("dir");
        let path = Path::new("/node/resync-marks");
        save_resync_marks(&fs, path, &[GroupId(2)]).expect("save");
        fs.crash(&mut |bound: u64| bound.saturating_sub(1));
        let loaded = load_resync_marks(&fs, path).expect("load");
        assert_eq!(loaded, BTreeSet::from([GroupId(2)]));
    }
}
