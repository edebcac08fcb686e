//! The persisted map of regions another site may lack: what an owner must
//! copy to that site when the deltas it missed are no longer in the
//! journal. One file per other site.
//!
//! Format: magic `STRDMAP1` | count u64 | (volume u32, region u64) × count
//! | crc32c u32 of everything before it, little endian. Saved by write to a
//! temporary file, fdatasync, rename, directory sync: after a crash the map
//! is the old one or the new one, never a torn one. The journal records it
//! covers are released only after the save completed.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use stretch_core::VolumeId;

use crate::filesystem::{FileSystem, StorageFile, replace_file};

const MAGIC: &[u8; 8] = b"STRDMAP1";
const ENTRY_BYTES: u64 = 12;
/// Bound on a map read at start: 64 Mi regions of 1 MiB (64 PiB of data).
const ENTRIES_MAX: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DirtyMapError {
    #[error("dirty-region map {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("dirty-region map {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Regions as `(volume, region index)`.
pub type Regions = BTreeSet<(VolumeId, u64)>;

/// Reads the map at `path`; `Ok(None)` if there is none (a site never
/// tracked: everything must be assumed missing).
pub fn load_dirty_map<F: FileSystem>(
    fs: &F,
    path: &Path,
) -> Result<Option<Regions>, DirtyMapError> {
    let io_error = |source| DirtyMapError::Io {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |reason: String| DirtyMapError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if !fs.exists(path) {
        return Ok(None);
    }
    let file = fs.open(path, false).map_err(io_error)?;
    let length = file.len().map_err(io_error)?;
    if length < 20 {
        return Err(corrupt(format!("{length} bytes")));
    }
    let mut header = [0u8; 16];
    file.read_exact_at(&mut header, 0).map_err(io_error)?;
    if &header[..8] != MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let count = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
    if count > ENTRIES_MAX || length != 16 + count * ENTRY_BYTES + 4 {
        return Err(corrupt(format!("{count} entries in {length} bytes")));
    }
    let mut bytes = vec![0u8; length as usize];
    file.read_exact_at(&mut bytes, 0).map_err(io_error)?;
    let (body, checksum) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(checksum.try_into().expect("4 bytes"));
    if crc32c::crc32c(body) != stored {
        return Err(corrupt("checksum mismatch".into()));
    }
    let mut regions = Regions::new();
    for entry in body[16..].chunks_exact(ENTRY_BYTES as usize) {
        let volume = u32::from_le_bytes(entry[..4].try_into().expect("4 bytes"));
        let region = u64::from_le_bytes(entry[4..].try_into().expect("8 bytes"));
        regions.insert((VolumeId(volume), region));
    }
    Ok(Some(regions))
}

/// Replaces the map at `path` durably.
pub fn save_dirty_map<F: FileSystem>(
    fs: &F,
    path: &Path,
    regions: &Regions,
) -> Result<(), DirtyMapError> {
    let io_error = |source| DirtyMapError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::with_capacity(20 + regions.len() * ENTRY_BYTES as usize);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(regions.len() as u64).to_le_bytes());
    for (volume, region) in regions {
        bytes.extend_from_slice(&volume.0.to_le_bytes());
        bytes.extend_from_slice(&region.to_le_bytes());
    }
    let checksum = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    replace_file(fs, path, &path.with_extension("map.tmp"), &bytes).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OsFileSystem;

    #[test]
    fn a_saved_map_loads_back_and_damage_is_an_error() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("dirty-b.map");
        let fs = OsFileSystem;
        assert!(load_dirty_map(&fs, &path).expect("no map").is_none());
        let regions: Regions = [(VolumeId(1), 0), (VolumeId(1), 7), (VolumeId(3), 2)].into();
        save_dirty_map(&fs, &path, &regions).expect("saving");
        assert_eq!(load_dirty_map(&fs, &path).expect("loading"), Some(regions));
        save_dirty_map(&fs, &path, &Regions::new()).expect("saving empty");
        assert_eq!(
            load_dirty_map(&fs, &path).expect("loading"),
            Some(Regions::new())
        );
        let mut bytes = std::fs::read(&path).expect("reading");
        bytes[9] ^= 1;
        std::fs::write(&path, &bytes).expect("writing");
        assert!(load_dirty_map(&fs, &path).is_err());
        std::fs::write(&path, b"short").expect("writing");
        assert!(load_dirty_map(&fs, &path).is_err());
    }
}
