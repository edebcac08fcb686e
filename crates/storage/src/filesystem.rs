//! The few file operations storage needs, so a simulated disk can stand in.

use std::io;
use std::path::{Path, PathBuf};

/// A directory tree of files.
pub trait FileSystem: Send + Sync + 'static {
    type File: StorageFile;

    /// Opens a file for reading and writing, creating it if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Self::File>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Files directly in `dir`, sorted by name.
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Makes creations, removals and renames in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
}

/// Replaces the file at `path` with `bytes`, durably and atomically,
/// through `temporary`: the data durable in the temporary file, then the
/// rename, then the directory entry durable. A crash leaves the old file
/// or the new one.
pub(crate) fn replace_file<F: FileSystem>(
    fs: &F,
    path: &Path,
    temporary: &Path,
    bytes: &[u8],
) -> io::Result<()> {
    let file = fs.open(temporary, true)?;
    file.set_len(0)?;
    file.write_all_at(bytes, 0)?;
    file.sync_data()?;
    fs.rename(temporary, path)?;
    if let Some(dir) = path.parent() {
        fs.sync_dir(dir)?;
    }
    Ok(())
}

/// One open file. Positional I/O only, so it can be shared across threads.
// `len` is the file size, as on `std::fs::Metadata`; an `is_empty` would
// add nothing callers need.
#[allow(clippy::len_without_is_empty)]
pub trait StorageFile: Send + Sync + 'static {
    /// Reads exactly `buf.len()` bytes at `offset`; past the end is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Reads exactly `length` bytes at `offset` into a new buffer.
    fn read_bytes_at(&self, offset: u64, length: usize) -> io::Result<bytes::Bytes> {
        let mut buffer = bytes::BytesMut::zeroed(length);
        self.read_exact_at(&mut buffer, offset)?;
        Ok(buffer.freeze())
    }
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Writes the concatenation of `parts` at `offset`. Files that can
    /// gather (pwritev) avoid copying the parts into one buffer first.
    fn write_all_vectored_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        self.write_all_at(&parts.concat(), offset)
    }
    /// Makes every write so far durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// The host's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsFileSystem;

impl FileSystem for OsFileSystem {
    type File = std::fs::File;

    fn open(&self, path: &Path, create: bool) -> io::Result<Self::File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                paths.push(entry.path());
            }
        }
        paths.sort();
        Ok(paths)
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

impl StorageFile for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, data, offset)
    }

    fn write_all_vectored_at(&self, parts: &[&[u8]], mut offset: u64) -> io::Result<()> {
        // The kernel takes at most IOV_MAX (1024 on Linux) slices per call.
        const SLICES_PER_CALL: usize = 1024;
        let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
        let mut first = 0;
        while first < parts.len() {
            let last = (first + SLICES_PER_CALL).min(parts.len());
            let slices: Vec<io::IoSlice<'_>> = parts[first..last]
                .iter()
                .map(|part| io::IoSlice::new(part))
                .collect();
            let mut written =
                rustix::io::pwritev(self, &slices, offset).map_err(io::Error::from)?;
            if written == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev wrote nothing",
                ));
            }
            offset += written as u64;
            // Skip what went down, possibly ending inside a part.
            while written > 0 {
                let part = parts[first];
                if written >= part.len() {
                    written -= part.len();
                    first += 1;
                } else {
                    parts[first] = &part[written..];
                    written = 0;
                }
            }
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        std::fs::File::sync_data(self)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }
}
