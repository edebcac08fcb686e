//! Volumes as a node keeps them: one [`VolumeRecord`] per volume, made from
//! the cluster metadata (the node's `volumes` module), and the rules every
//! volume name and size must follow.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use stretch_core::{BLOCK_SIZE, GroupId, VolumeId};

/// Longest volume or group name accepted.
pub const NAME_BYTES_MAX: usize = 64;
/// Largest volume accepted: 64 TiB. Far above any VM disk, yet keeps block
/// numbers, region maps and offsets comfortably inside their integer types,
/// and turns a typo (a size in bytes where KiB was meant, or `u64::MAX`)
/// into a clear refusal instead of a leg the file system cannot hold.
/// (ext4 with 4 KiB blocks stops at 16 TiB per file: a larger volume there
/// is refused when its leg is created, and leaves no file behind.)
pub const VOLUME_BYTES_MAX: u64 = 64 << 40;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("no volume named {0:?}")]
    NoSuchVolume(String),
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid size {size}: {reason}")]
    InvalidSize { size: u64, reason: String },
    #[error("volume {name:?} cannot be served here: {reason}")]
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
    /// The site that accepts the volume's writes (its group's owner).
    pub owner: String,
    /// `async`, `flush-sync` or `sync` (see `stretch_core::Mode`).
    pub mode: String,
    /// Ownership epoch: raised each time the owner changes.
    pub epoch: u64,
}

impl VolumeRecord {
    pub fn volume_id(&self) -> VolumeId {
        VolumeId(self.id)
    }

    pub fn group_id(&self) -> GroupId {
        GroupId(self.group_id)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_above_the_bound_are_refused_with_the_bound() {
        validate_volume_size(VOLUME_BYTES_MAX).expect("64 TiB is allowed");
        for size in [VOLUME_BYTES_MAX + 4096, u64::MAX - 4095] {
            let error = validate_volume_size(size).expect_err("too large");
            assert!(error.to_string().contains("at most"), "{error}");
            assert!(error.to_string().contains("64 TiB"), "{error}");
        }
    }

    #[test]
    fn sizes_must_be_whole_blocks() {
        for size in [0, 1, 4095, 4097] {
            let error = validate_volume_size(size).expect_err("not whole blocks");
            assert!(error.to_string().contains("multiple of 4096"), "{error}");
        }
    }

    #[test]
    fn names_are_short_plain_and_not_hidden() {
        for good in ["vm1", "db_disk-2", "A.b"] {
            validate_volume_name(good).expect(good);
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "vm@snapshot",
            &"x".repeat(NAME_BYTES_MAX + 1),
        ] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?}");
        }
    }
}
