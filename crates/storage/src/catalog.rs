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
        if record.size == 0 || !record.size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(CatalogError::InvalidSize {
                size: record.size,
                reason: format!("must be a positive multiple of {BLOCK_SIZE} bytes"),
            });
        }
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
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(CatalogError::InvalidSize {
                size,
                reason: format!("must be a positive multiple of {BLOCK_SIZE} bytes"),
            });
        }
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
            if record.size == 0 || record.size % BLOCK_SIZE as u64 != 0 {
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
