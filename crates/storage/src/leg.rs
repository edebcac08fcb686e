//! A volume's leg: its back-end copy, a file (sparse where never written).

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use stretch_core::{BLOCK_SIZE, BlockImage, BlockKey, VolumeId};

/// What a zeroed block writes.
static ZERO_BLOCK: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

use crate::filesystem::{FileSystem, StorageFile};

#[derive(Debug, thiserror::Error)]
pub enum LegError {
    #[error("leg {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("leg {path} is {found} bytes, the volume is {expected}")]
    WrongSize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
}

/// One volume's leg, open for positional reads and writes.
#[derive(Debug)]
pub struct Leg<F: FileSystem> {
    path: PathBuf,
    file: F::File,
    size: u64,
}

impl<F: FileSystem> Leg<F> {
    /// Creates (or resets) the leg at `path` as `size` bytes of zeros; the
    /// file is sparse, so creation costs no data writes. Durable on return.
    ///
    /// On failure (a size the file system cannot hold, no space, an I/O
    /// error) no file is left at `path`: an empty or short leg left behind
    /// would be taken for a volume's leg by whoever looks at the directory,
    /// and would make the next attempt under the same name "reset" a file
    /// nobody owns.
    pub fn create(fs: &F, path: &Path, size: u64) -> Result<Self, LegError> {
        let error = |source| LegError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent() {
            fs.create_dir_all(parent).map_err(error)?;
        }
        let file = fs.open(path, true).map_err(error)?;
        let sized = (|| -> io::Result<()> {
            // Truncating first zeroes whatever an earlier, deleted volume left.
            file.set_len(0)?;
            file.set_len(size)?;
            file.sync_data()?;
            if let Some(parent) = path.parent() {
                fs.sync_dir(parent)?;
            }
            Ok(())
        })();
        if let Err(source) = sized {
            drop(file);
            remove_leg_file(fs, path);
            return Err(error(source));
        }
        Ok(Leg {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    /// Removes the leg file at `path` after a failed creation, best effort:
    /// the creation's own error is what the caller reports, so a failure
    /// here is only logged.
    pub fn discard(fs: &F, leg: Self) {
        let path = leg.path.clone();
        drop(leg);
        remove_leg_file(fs, &path);
    }

    /// Opens an existing leg, checking it has the volume's size.
    pub fn open(fs: &F, path: &Path, size: u64) -> Result<Self, LegError> {
        let error = |source| LegError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = fs.open(path, false).map_err(error)?;
        let found = file.len().map_err(error)?;
        if found != size {
            return Err(LegError::WrongSize {
                path: path.to_path_buf(),
                found,
                expected: size,
            });
        }
        Ok(Leg {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read(&self, offset: u64, length: u64) -> Result<Bytes, LegError> {
        self.file
            .read_bytes_at(offset, length as usize)
            .map_err(|source| self.error(source))
    }

    /// Writes blocks (sorted by block number); runs of adjacent blocks go
    /// down as one gathered write, without copying the blocks.
    pub fn apply<'a>(
        &self,
        blocks: impl IntoIterator<Item = (u64, &'a BlockImage)>,
    ) -> Result<(), LegError> {
        let mut run: Vec<&[u8]> = Vec::new();
        let mut run_start = 0u64;
        let mut run_next = 0u64;
        for (block, image) in blocks {
            if !run.is_empty() && block != run_next {
                self.write_run(run_start, &run)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = block;
            }
            run.push(match image {
                BlockImage::Data(data) => data,
                BlockImage::Zero => &ZERO_BLOCK,
            });
            run_next = block + 1;
        }
        if !run.is_empty() {
            self.write_run(run_start, &run)?;
        }
        Ok(())
    }

    /// Makes every write so far durable.
    pub fn sync(&self) -> Result<(), LegError> {
        self.file.sync_data().map_err(|source| self.error(source))
    }

    fn write_run(&self, first_block: u64, blocks: &[&[u8]]) -> Result<(), LegError> {
        let offset = first_block * BLOCK_SIZE as u64;
        let length = blocks.len() as u64 * BLOCK_SIZE as u64;
        if offset + length > self.size {
            return Err(self.error(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("write at {offset}+{length} past the end"),
            )));
        }
        self.file
            .write_all_vectored_at(blocks, offset)
            .map_err(|source| self.error(source))
    }

    fn error(&self, source: io::Error) -> LegError {
        LegError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

/// Removes a leg file that must not outlive a failed creation, and makes
/// the removal durable; best effort (see [`Leg::create`]).
fn remove_leg_file<F: FileSystem>(fs: &F, path: &Path) {
    if let Err(error) = fs.remove(path) {
        if error.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), %error, "cannot remove a leg whose creation failed");
        }
        return;
    }
    if let Some(parent) = path.parent()
        && let Err(error) = fs.sync_dir(parent)
    {
        tracing::warn!(dir = %parent.display(), %error, "cannot sync the directory of a removed leg");
    }
}

/// Writes a delta's blocks (sorted by key, as deltas hold them) to the legs
/// of their volumes, one gathered run at a time. `leg_of` finds a volume's
/// leg; a volume without one (deleted after the delta closed) is skipped.
pub fn apply_to_legs<F, L>(
    blocks: &[(BlockKey, BlockImage)],
    mut leg_of: impl FnMut(VolumeId) -> Option<L>,
) -> Result<(), LegError>
where
    F: FileSystem,
    L: std::ops::Deref<Target = Leg<F>>,
{
    for run in blocks.chunk_by(|(a, _), (b, _)| a.volume == b.volume) {
        if let Some(leg) = leg_of(run[0].0.volume) {
            leg.apply(run.iter().map(|(key, image)| (key.block, image)))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{OsFileSystem, SimFileSystem};

    #[test]
    fn a_leg_that_cannot_be_made_durable_leaves_no_file() {
        let fs = SimFileSystem::new();
        let path = Path::new("/data/legs/vol.raw");
        fs.set_sync_failure(true);
        let error = Leg::create(&fs, path, 1 << 20).expect_err("fsync fails");
        assert!(error.to_string().contains("vol.raw"), "{error}");
        assert!(
            !fs.exists(path),
            "a failed creation left {}",
            path.display()
        );
        // The name is free for the next attempt, which succeeds.
        fs.set_sync_failure(false);
        let leg = Leg::create(&fs, path, 1 << 20).expect("creating the leg");
        assert_eq!(leg.size(), 1 << 20);
        assert!(fs.exists(path));
    }

    #[test]
    fn a_size_the_file_system_refuses_leaves_no_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("legs").join("huge.raw");
        // Beyond what any file (an i64 offset) can hold.
        let error = Leg::create(&OsFileSystem, &path, 1 << 63).expect_err("too large");
        assert!(error.to_string().contains("huge.raw"), "{error}");
        assert!(!path.exists(), "a failed creation left {}", path.display());
    }

    #[test]
    fn discarding_a_leg_removes_its_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("vol.raw");
        let leg = Leg::create(&OsFileSystem, &path, 1 << 20).expect("creating the leg");
        assert!(path.exists());
        Leg::discard(&OsFileSystem, leg);
        assert!(!path.exists());
    }
}
