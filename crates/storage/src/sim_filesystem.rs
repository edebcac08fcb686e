//! An in-memory disk for the simulator and crash tests: writes stay pending
//! until `sync_data`, and a crash keeps an arbitrary prefix of the pending
//! writes of each file, tearing the last one kept at a sector boundary.
//!
//! Namespace operations (create, remove, rename) are durable at once: the
//! storage code syncs the directory after each of them anyway, and modelling
//! lost renames would test the host file system rather than stretch.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::filesystem::{FileSystem, StorageFile};

/// Draws the crash outcome; the simulator backs it with its seeded PRNG.
pub trait CrashChooser {
    /// A number in `0..bound` (`bound` > 0).
    fn below(&mut self, bound: u64) -> u64;
}

impl<F: FnMut(u64) -> u64> CrashChooser for F {
    fn below(&mut self, bound: u64) -> u64 {
        self(bound)
    }
}

/// Torn writes keep whole sectors of this size.
const SECTOR_BYTES: usize = 512;

#[derive(Debug, Clone, Default)]
pub struct SimFileSystem {
    state: Arc<Mutex<SimState>>,
}

#[derive(Debug, Default)]
struct SimState {
    files: BTreeMap<PathBuf, SimFileState>,
    dirs: std::collections::BTreeSet<PathBuf>,
    fail_syncs: bool,
    /// Bumped on every crash so handles opened before it stop working.
    generation: u64,
}

/// A file's content as reads see it, plus an undo log of the writes since
/// its last sync: a crash undoes a suffix of them. Keeping undo records
/// instead of a second copy makes a sync free, whatever the file's size.
#[derive(Debug, Default, Clone)]
struct SimFileState {
    current: Vec<u8>,
    pending: Vec<PendingOp>,
}

#[derive(Debug, Clone)]
enum PendingOp {
    Write {
        offset: usize,
        length: usize,
        /// The bytes the write replaced, and the file length before it.
        old: Vec<u8>,
        old_len: usize,
    },
    SetLen {
        old_len: usize,
        /// The bytes a shrink cut off.
        truncated: Vec<u8>,
    },
}

impl SimFileState {
    /// Writes the concatenation of `parts` at `offset`, keeping the bytes
    /// it replaces for a crash to restore.
    fn write(&mut self, offset: usize, parts: &[&[u8]]) {
        let length: usize = parts.iter().map(|part| part.len()).sum();
        let old_len = self.current.len();
        let end = offset + length;
        let old = self.current[offset.min(old_len)..end.min(old_len)].to_vec();
        if offset > old_len {
            self.current.resize(offset, 0);
        }
        let mut at = offset;
        for part in parts {
            // Overwrite what exists, append the rest (no zero fill first).
            let overlap = part.len().min(self.current.len().saturating_sub(at));
            self.current[at..at + overlap].copy_from_slice(&part[..overlap]);
            self.current.extend_from_slice(&part[overlap..]);
            at += part.len();
        }
        self.pending.push(PendingOp::Write {
            offset,
            length,
            old,
            old_len,
        });
    }

    fn set_len(&mut self, len: usize) {
        let old_len = self.current.len();
        let truncated = if len < old_len {
            self.current[len..].to_vec()
        } else {
            Vec::new()
        };
        if old_len == 0 {
            // A new leg: zeroed memory from the allocator, whose pages the
            // kernel maps only when first touched (a resize would write
            // every byte of every leg at every node start).
            self.current = vec![0; len];
        } else {
            self.current.resize(len, 0);
        }
        self.pending.push(PendingOp::SetLen { old_len, truncated });
    }

    fn undo(&mut self, op: &PendingOp) {
        self.undo_from(op, 0);
    }

    /// Undoes a write from byte `kept` of it on: the first `kept` bytes
    /// stay written (a torn write), the rest is as before.
    fn undo_from(&mut self, op: &PendingOp, kept: usize) {
        match op {
            PendingOp::Write {
                offset,
                length,
                old,
                old_len,
            } => {
                if kept < old.len() {
                    self.current[offset + kept..offset + old.len()].copy_from_slice(&old[kept..]);
                }
                let landed = if kept == 0 {
                    0
                } else {
                    offset + kept.min(*length)
                };
                self.current.truncate((*old_len).max(landed));
            }
            PendingOp::SetLen { old_len, truncated } => {
                if truncated.is_empty() {
                    self.current.truncate(*old_len);
                } else {
                    self.current.extend_from_slice(truncated);
                }
            }
        }
    }
}

impl SimFileSystem {
    pub fn new() -> Self {
        Self::default()
    }

    /// While set, every `sync_data` fails with EIO (and makes nothing durable).
    pub fn set_sync_failure(&self, fail: bool) {
        self.state.lock().fail_syncs = fail;
    }

    /// Power loss: every file keeps its durable content plus a prefix of its
    /// pending writes chosen by `chooser`, the last kept write possibly torn.
    /// Handles opened before the crash fail from now on.
    pub fn crash(&self, chooser: &mut dyn CrashChooser) {
        let mut state = self.state.lock();
        state.generation += 1;
        for file in state.files.values_mut() {
            let pending = std::mem::take(&mut file.pending);
            let keep = chooser.below(pending.len() as u64 + 1) as usize;
            for op in pending[keep..].iter().rev() {
                file.undo(op);
            }
            if keep == 0 || chooser.below(4) != 0 {
                continue;
            }
            // Tear the last write kept: only its first sectors landed.
            if let PendingOp::Write { length, .. } = &pending[keep - 1]
                && *length > SECTOR_BYTES
            {
                let sectors = length.div_ceil(SECTOR_BYTES) as u64;
                let kept = chooser.below(sectors) as usize * SECTOR_BYTES;
                file.undo_from(&pending[keep - 1], kept);
            }
        }
    }

    /// Runs `read` over a file's current content without copying it (the
    /// simulator's checker decodes whole legs this way).
    pub fn with_content<T>(&self, path: &Path, read: impl FnOnce(&[u8]) -> T) -> Option<T> {
        let state = self.state.lock();
        state.files.get(path).map(|file| read(&file.current))
    }
}

/// A handle on one simulated file.
#[derive(Debug)]
pub struct SimFile {
    state: Arc<Mutex<SimState>>,
    path: PathBuf,
    generation: u64,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut SimState, &Path) -> io::Result<T>) -> io::Result<T> {
        let mut state = self.state.lock();
        if state.generation != self.generation {
            return Err(io::Error::other("handle opened before a crash"));
        }
        f(&mut state, &self.path)
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

impl StorageFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(|state, path| {
            let file = state.files.get(path).ok_or_else(|| not_found(path))?;
            let start = offset as usize;
            let end = start + buf.len();
            if end > file.current.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past end of file",
                ));
            }
            buf.copy_from_slice(&file.current[start..end]);
            Ok(())
        })
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.with(|state, path| {
            let file = state.files.get_mut(path).ok_or_else(|| not_found(path))?;
            file.write(offset as usize, &[data]);
            Ok(())
        })
    }

    fn write_all_vectored_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        self.with(|state, path| {
            let file = state.files.get_mut(path).ok_or_else(|| not_found(path))?;
            file.write(offset as usize, parts);
            Ok(())
        })
    }

    fn read_bytes_at(&self, offset: u64, length: usize) -> io::Result<bytes::Bytes> {
        self.with(|state, path| {
            let file = state.files.get(path).ok_or_else(|| not_found(path))?;
            let start = offset as usize;
            let end = start + length;
            if end > file.current.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past end of file",
                ));
            }
            Ok(bytes::Bytes::copy_from_slice(&file.current[start..end]))
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(|state, path| {
            if state.fail_syncs {
                return Err(io::Error::other("simulated fsync failure"));
            }
            let file = state.files.get_mut(path).ok_or_else(|| not_found(path))?;
            file.pending.clear();
            Ok(())
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.with(|state, path| {
            let file = state.files.get(path).ok_or_else(|| not_found(path))?;
            Ok(file.current.len() as u64)
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(|state, path| {
            let file = state.files.get_mut(path).ok_or_else(|| not_found(path))?;
            file.set_len(len as usize);
            Ok(())
        })
    }
}

impl FileSystem for SimFileSystem {
    type File = SimFile;

    fn open(&self, path: &Path, create: bool) -> io::Result<SimFile> {
        let mut state = self.state.lock();
        if !state.files.contains_key(path) {
            if !create {
                return Err(not_found(path));
            }
            state
                .files
                .insert(path.to_path_buf(), SimFileState::default());
        }
        Ok(SimFile {
            state: self.state.clone(),
            path: path.to_path_buf(),
            generation: state.generation,
        })
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state
            .files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        let file = state.files.remove(from).ok_or_else(|| not_found(from))?;
        state.files.insert(to.to_path_buf(), file);
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let state = self.state.lock();
        Ok(state
            .files
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .cloned()
            .collect())
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.state.lock().dirs.insert(dir.to_path_buf());
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        let state = self.state.lock();
        state.files.contains_key(path) || state.dirs.contains(path)
    }
}
