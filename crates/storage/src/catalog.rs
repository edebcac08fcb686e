//! The volume catalog: which volumes exist, their sizes, groups and legs.
//!
//! Saved as JSON by write-to-temporary, fdatasync, rename, directory sync:
//! after a crash the file is either the old catalog or the new one.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stretch_core::{BLOCK_SIZE, GroupId, VolumeId};

use crate::filesystem::{FileSystem, StorageFile};

/// Longest volume or group name accepted.
pub const NAME_BYTES_MAX: usize = 64;
/// Largest volume accepted: 64 TiB. Far above any VM disk, yet keeps block
/// numbers, region maps and offsets comfortably inside their integer types,
/// and turns a typo (a size in bytes where KiB was meant, or `u64::MAX`)
/// into a clear refusal instead of a leg the file system cannot hold.
/// (ext4 with 4 KiB blocks stops at 16 TiB per file: a larger volume there
/// is refused when its leg is created, and leaves no file behind.)
pub const VOLUME_BYTES_MAX: u64 = 64 << 40;
/// Bound on the catalog file read at start.
const CATALOG_BYTES_MAX: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("catalog {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("no volume named {0:?}")]
    NoSuchVolume(String),
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid size {size}: {reason}")]
    InvalidSize { size: u64, reason: String },
    #[error("volume {name:?} conflicts with this site's catalog: {reason}")]
    Conflict { name: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: u32,
    pub name: String,
    pub size: u64,
    pub group: String,
    pub group_id: u32,
    pub leg: PathBuf,
    /// The site that accepts the volume's writes (its group's owner); empty
    /// in catalogs written before volumes spanned sites: the local site.
    #[serde(default)]
    pub owner: String,
    /// `async`, `flush-sync` or `sync` (see `stretch_core::Mode`).
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Ownership epoch: raised each time the owner changes.
    #[serde(default = "first_epoch")]
    pub epoch: u64,
}

fn default_mode() -> String {
    "async".to_string()
}

fn first_epoch() -> u64 {
    1
}

impl VolumeRecord {
    pub fn volume_id(&self) -> VolumeId {
        VolumeId(self.id)
    }

    pub fn group_id(&self) -> GroupId {
        GroupId(self.group_id)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CatalogFile {
    version: u32,
    next_volume_id: u32,
    next_group_id: u32,
    groups: BTreeMap<String, u32>,
    volumes: BTreeMap<String, VolumeRecord>,
    /// Ids of deleted volumes: another site that missed the deletion must
    /// not bring the volume back.
    #[serde(default)]
    deleted: std::collections::BTreeSet<u32>,
}

/// The catalog as loaded; changes are saved before they return.
#[derive(Debug)]
pub struct Catalog {
    path: PathBuf,
    content: CatalogFile,
}

/// Volume and group names: 1–64 of `A-Z a-z 0-9 . _ -`, not starting with
/// a dot. `@` is reserved for export suffixes such as `NAME@snapshot`.
pub fn validate_volume_name(name: &str) -> Result<(), CatalogError> {
    let invalid = |reason: &str| CatalogError::InvalidName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(invalid("must be 1 to 64 characters"));
    }
    if name.starts_with('.') {
        return Err(invalid("must not start with a dot"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(invalid(
            "only letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    Ok(())
}

/// Refuses a volume size that is zero, not whole blocks, or above
/// [`VOLUME_BYTES_MAX`].
pub fn validate_volume_size(size: u64) -> Result<(), CatalogError> {
    let invalid = |reason: String| CatalogError::InvalidSize { size, reason };
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE as u64) {
        return Err(invalid(format!(
            "must be a positive multiple of {BLOCK_SIZE} bytes"
        )));
    }
    if size > VOLUME_BYTES_MAX {
        return Err(invalid(format!(
            "must be at most {VOLUME_BYTES_MAX} bytes (64 TiB)"
        )));
    }
    Ok(())
}

impl Catalog {
    /// Loads the catalog at `path`, or starts an empty one if there is none.
    pub fn load<F: FileSystem>(fs: &F, path: &Path) -> Result<Self, CatalogError> {
        let io_error = |source| CatalogError::Io {
            path: path.to_path_buf(),
            source,
        };
        if !fs.exists(path) {
            return Ok(Catalog {
                path: path.to_path_buf(),
                content: CatalogFile {
                    version: 1,
                    next_volume_id: 1,
                    next_group_id: 1,
                    ..CatalogFile::default()
                },
            });
        }
        let file = fs.open(path, false).map_err(io_error)?;
        let len = file.len().map_err(io_error)?;
        let corrupt = |reason: String| CatalogError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if len > CATALOG_BYTES_MAX {
            return Err(corrupt(format!("{len} bytes")));
        }
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, 0).map_err(io_error)?;
        let content: CatalogFile =
            serde_json::from_slice(&bytes).map_err(|error| corrupt(error.to_string()))?;
        let catalog = Catalog {
            path: path.to_path_buf(),
            content,
        };
        catalog.check().map_err(corrupt)?;
        Ok(catalog)
    }

    pub fn volumes(&self) -> impl Iterator<Item = &VolumeRecord> {
        self.content.volumes.values()
    }

    pub fn get(&self, name: &str) -> Option<&VolumeRecord> {
        self.content.volumes.get(name)
    }

    /// Records a new owner and epoch for every volume of `group` and saves
    /// the catalog; returns the updated records.
    pub fn set_owner<F: FileSystem>(
        &mut self,
        fs: &F,
        group: &str,
        owner: &str,
        epoch: u64,
    ) -> Result<Vec<VolumeRecord>, CatalogError> {
        let mut content = self.content.clone();
        let mut updated = Vec::new();
        for record in content.volumes.values_mut().filter(|r| r.group == group) {
            record.owner = owner.to_string();
            record.epoch = epoch;
            updated.push(record.clone());
        }
        self.save(fs, content)?;
        Ok(updated)
    }

    /// Whether the volume with this id was deleted here.
    pub fn was_deleted(&self, id: u32) -> bool {
        self.content.deleted.contains(&id)
    }

    /// Records a volume planned here ([`Catalog::plan_volume`]) or at
    /// another site (same ids everywhere) and saves the catalog. The leg
    /// must already exist (created durably), so a saved volume always has
    /// its leg.
    pub fn add_volume<F: FileSystem>(
        &mut self,
        fs: &F,
        record: VolumeRecord,
    ) -> Result<VolumeRecord, CatalogError> {
        self.check_new(&record)?;
        let mut content = self.content.clone();
        content.next_volume_id = content.next_volume_id.max(record.id + 1);
        content.next_group_id = content.next_group_id.max(record.group_id + 1);
        content.groups.insert(record.group.clone(), record.group_id);
        content.volumes.insert(record.name.clone(), record.clone());
        self.save(fs, content)?;
        Ok(record)
    }

    /// Refuses a record whose name, id or group clashes with this catalog.
    pub fn check_new(&self, record: &VolumeRecord) -> Result<(), CatalogError> {
        validate_volume_name(&record.name)?;
        validate_volume_name(&record.group)?;
        validate_volume_size(record.size)?;
        if self.content.volumes.contains_key(&record.name) {
            return Err(CatalogError::Exists(record.name.clone()));
        }
        let conflict = |reason: String| CatalogError::Conflict {
            name: record.name.clone(),
            reason,
        };
        if self.content.deleted.contains(&record.id) {
            return Err(conflict(format!(
                "volume id {} was deleted here",
                record.id
            )));
        }
        if let Some(other) = self.volumes().find(|other| other.id == record.id) {
            return Err(conflict(format!(
                "id {} is volume {:?}",
                record.id, other.name
            )));
        }
        match self.content.groups.get(&record.group) {
            Some(id) if *id != record.group_id => {
                return Err(conflict(format!("group {:?} has id {id}", record.group)));
            }
            None if self
                .content
                .groups
                .values()
                .any(|id| *id == record.group_id) =>
            {
                return Err(conflict(format!("group id {} is taken", record.group_id)));
            }
            _ => {}
        }
        if let Some(other) = self
            .volumes()
            .find(|other| other.group == record.group && other.owner != record.owner)
        {
            return Err(conflict(format!(
                "group {:?} is owned by site {:?} (volume {:?})",
                record.group, other.owner, other.name
            )));
        }
        Ok(())
    }

    /// What `add_volume` would record, after validating the request; lets
    /// the caller create the leg before the catalog names it.
    pub fn plan_volume(
        &self,
        name: &str,
        size: u64,
        group: &str,
        leg: PathBuf,
    ) -> Result<VolumeRecord, CatalogError> {
        validate_volume_name(name)?;
        validate_volume_name(group)?;
        validate_volume_size(size)?;
        if self.content.volumes.contains_key(name) {
            return Err(CatalogError::Exists(name.to_string()));
        }
        let group_id = self
            .content
            .groups
            .get(group)
            .copied()
            .unwrap_or(self.content.next_group_id);
        Ok(VolumeRecord {
            id: self.content.next_volume_id,
            name: name.to_string(),
            size,
            group: group.to_string(),
            group_id,
            leg,
            owner: String::new(),
            mode: default_mode(),
            epoch: first_epoch(),
        })
    }

    /// Forgets a volume and saves the catalog; returns its record so the
    /// caller can delete the leg afterwards.
    pub fn remove_volume<F: FileSystem>(
        &mut self,
        fs: &F,
        name: &str,
    ) -> Result<VolumeRecord, CatalogError> {
        let mut content = self.content.clone();
        let record = content
            .volumes
            .remove(name)
            .ok_or_else(|| CatalogError::NoSuchVolume(name.to_string()))?;
        content.deleted.insert(record.id);
        self.save(fs, content)?;
        Ok(record)
    }

    fn save<F: FileSystem>(&mut self, fs: &F, content: CatalogFile) -> Result<(), CatalogError> {
        let io_error = |source| CatalogError::Io {
            path: self.path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(&content).map_err(|error| CatalogError::Corrupt {
            path: self.path.clone(),
            reason: error.to_string(),
        })?;
        let temporary = self.path.with_extension("json.tmp");
        // Order: data durable in the temporary file, then the rename, then
        // the directory entry durable. A crash at any point leaves the old
        // or the new catalog, never a torn one.
        let file = fs.open(&temporary, true).map_err(io_error)?;
        file.set_len(0).map_err(io_error)?;
        file.write_all_at(&bytes, 0).map_err(io_error)?;
        file.sync_data().map_err(io_error)?;
        fs.rename(&temporary, &self.path).map_err(io_error)?;
        if let Some(dir) = self.path.parent() {
            fs.sync_dir(dir).map_err(io_error)?;
        }
        self.content = content;
        Ok(())
    }

    /// Checks a loaded catalog for consistency: the file came from disk.
    fn check(&self) -> Result<(), String> {
        let content = &self.content;
        let mut ids = std::collections::BTreeSet::new();
        for (name, record) in &content.volumes {
            if name != &record.name {
                return Err(format!("volume key {name:?} names {:?}", record.name));
            }
            validate_volume_name(name).map_err(|error| error.to_string())?;
            // Not the upper bound: a volume made before it existed (on a
            // file system that holds such files) must still load.
            if record.size == 0 || !record.size.is_multiple_of(BLOCK_SIZE as u64) {
                return Err(format!("volume {name:?} has size {}", record.size));
            }
            if record.id >= content.next_volume_id || !ids.insert(record.id) {
                return Err(format!("volume {name:?} has a duplicate or future id"));
            }
            if content.groups.get(&record.group) != Some(&record.group_id) {
                return Err(format!("volume {name:?} names an unknown group"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimFileSystem;

    fn empty() -> Catalog {
        Catalog::load(&SimFileSystem::new(), Path::new("/data/catalog.json")).expect("empty")
    }

    #[test]
    fn sizes_above_the_bound_are_refused_with_the_bound() {
        let catalog = empty();
        let leg = PathBuf::from("/data/legs/vol.raw");
        let planned = catalog
            .plan_volume("vol", VOLUME_BYTES_MAX, "vol", leg.clone())
            .expect("64 TiB is allowed");
        assert_eq!(planned.size, VOLUME_BYTES_MAX);
        for size in [VOLUME_BYTES_MAX + 4096, u64::MAX - 4095] {
            let error = catalog
                .plan_volume("vol", size, "vol", leg.clone())
                .expect_err("too large");
            assert!(error.to_string().contains("at most"), "{error}");
            assert!(error.to_string().contains("64 TiB"), "{error}");
        }
        // A record from another site is held to the same bound.
        let record = VolumeRecord {
            size: VOLUME_BYTES_MAX + 4096,
            ..planned
        };
        let error = catalog.check_new(&record).expect_err("too large");
        assert!(matches!(error, CatalogError::InvalidSize { .. }), "{error}");
    }

    #[test]
    fn a_catalog_with_a_volume_above_the_bound_still_loads() {
        let fs = SimFileSystem::new();
        let path = Path::new("/data/catalog.json");
        let mut catalog = Catalog::load(&fs, path).expect("empty");
        let planned = catalog
            .plan_volume("vol", 4096, "vol", PathBuf::from("/data/legs/vol.raw"))
            .expect("planned");
        catalog.add_volume(&fs, planned).expect("added");
        // As written by a release without the bound.
        let text = fs
            .with_content(path, |bytes| String::from_utf8_lossy(bytes).into_owned())
            .expect("catalog saved");
        let huge = (VOLUME_BYTES_MAX * 2).to_string();
        let text = text.replace("\"size\": 4096", &format!("\"size\": {huge}"));
        assert!(text.contains(&huge), "{text}");
        let file = fs.open(path, true).expect("open");
        file.set_len(0).expect("truncate");
        file.write_all_at(text.as_bytes(), 0).expect("write");
        let loaded = Catalog::load(&fs, path).expect("an existing large volume loads");
        assert_eq!(
            loaded.get("vol").map(|v| v.size),
            Some(VOLUME_BYTES_MAX * 2)
        );
    }

    #[test]
    fn sizes_must_be_whole_blocks() {
        let catalog = empty();
        for size in [0, 1, 4095, 4097] {
            let error = catalog
                .plan_volume("vol", size, "vol", PathBuf::from("/l"))
                .expect_err("not whole blocks");
            assert!(error.to_string().contains("multiple of 4096"), "{error}");
        }
    }
}
