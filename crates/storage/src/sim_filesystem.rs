//! An in-memory disk for the simulator and crash tests: writes stay pending
//! until `sync_data`, and a crash keeps an arbitrary prefix of the pending
//! writes of each file, tearing the last one kept at a sector boundary.
//!
//! Namespace operations (create, remove, rename) are durable at once: the
//! storage code syncs the directory after each of them anyway, and modelling
//! lost renames would test the host file system rather than stretch.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
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

/// The unit in which a file records where it changed (a whole number of
/// sectors): an observer re-reads at least this much around each change.
pub const CHANGE_CHUNK_BYTES: usize = 4096;

/// Where an observer last read a file's content: which file (a path
/// removed and created again is another file) and its revision then.
/// Passed back to [`SimFileSystem::with_content_changes`], it yields the
/// bytes that changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentMark {
    identity: u64,
    revision: u64,
    length: usize,
}

#[derive(Debug, Clone, Default)]
pub struct SimFileSystem {
    state: Arc<Mutex<SimState>>,
}

#[derive(Debug, Default)]
struct SimState {
    files: Files,
    dirs: std::collections::BTreeSet<PathBuf>,
    fail_syncs: bool,
    /// Bumped on every crash so handles opened before it stop working.
    generation: u64,
    /// The identity the next created file gets.
    next_identity: u64,
    /// Content buffers of removed files, at most `SPARE_BUFFERS_MAX`, for
    /// files created next: a journal removes a segment and creates the
    /// next one all run long, and growing each from nothing cost a fresh
    /// page fault per 4 KiB and a copy per doubling.
    spare_buffers: Vec<Vec<u8>>,
}

/// How many removed files' buffers are kept for reuse.
const SPARE_BUFFERS_MAX: usize = 4;

/// A file's content as reads see it, plus an undo log of the writes since
/// its last sync: a crash undoes a suffix of them. Keeping undo records
/// instead of a second copy makes a sync free, whatever the file's size.
#[derive(Debug, Default, Clone)]
struct SimFileState {
    current: Vec<u8>,
    pending: Vec<PendingOp>,
    /// Unique per created file; kept across renames (same content).
    identity: u64,
    /// Bumped by every change of `current`, undone writes included.
    revision: u64,
    /// The revision that last changed each `CHANGE_CHUNK_BYTES` of
    /// `current` (may run past its end after a shrink).
    chunk_revisions: Vec<u64>,
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
        self.mark_changed(offset.min(old_len)..end);
    }

    /// Records that the bytes in `range` (and any past the old end) may
    /// differ from what an observer last read.
    fn mark_changed(&mut self, range: Range<usize>) {
        self.revision += 1;
        if range.is_empty() {
            return;
        }
        let chunks = range.start / CHANGE_CHUNK_BYTES..range.end.div_ceil(CHANGE_CHUNK_BYTES);
        if self.chunk_revisions.len() < chunks.end {
            self.chunk_revisions.resize(chunks.end, 0);
        }
        self.chunk_revisions[chunks].fill(self.revision);
    }

    /// The byte ranges (whole chunks, clipped to the content) changed after
    /// `since`; all of the content when `since` is another file or length.
    fn changes_since(&self, since: Option<ContentMark>) -> Vec<Range<usize>> {
        let length = self.current.len();
        let Some(seen) = since
            .filter(|mark| mark.identity == self.identity && mark.length == length)
            .map(|mark| mark.revision)
        else {
            return std::iter::once(0..length)
                .filter(|range| !range.is_empty())
                .collect();
        };
        let mut ranges: Vec<Range<usize>> = Vec::new();
        for (chunk, revision) in self.chunk_revisions.iter().enumerate() {
            let start = chunk * CHANGE_CHUNK_BYTES;
            if start >= length {
                break;
            }
            if *revision <= seen {
                continue;
            }
            let end = (start + CHANGE_CHUNK_BYTES).min(length);
            match ranges.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => ranges.push(start..end),
            }
        }
        ranges
    }

    fn mark(&self) -> ContentMark {
        ContentMark {
            identity: self.identity,
            revision: self.revision,
            length: self.current.len(),
        }
    }

    fn set_len(&mut self, len: usize) {
        let old_len = self.current.len();
        let truncated = if len < old_len {
            self.current[len..].to_vec()
        } else {
            Vec::new()
        };
        if old_len == 0 && len > 0 {
            // A new leg: zeroed memory from the allocator, whose pages the
            // kernel maps only when first touched (a resize would write
            // every byte of every leg at every node start, and of a reused
            // buffer too).
            self.current = vec![0; len];
        } else {
            self.current.resize(len, 0);
        }
        self.pending.push(PendingOp::SetLen { old_len, truncated });
        self.mark_changed(old_len.min(len)..old_len.max(len));
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
                self.mark_changed((offset + kept).min(*old_len)..offset + length);
            }
            PendingOp::SetLen { old_len, truncated } => {
                let length = self.current.len();
                if truncated.is_empty() {
                    self.current.truncate(*old_len);
                } else {
                    self.current.extend_from_slice(truncated);
                }
                self.mark_changed(length.min(*old_len)..length.max(*old_len));
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

    /// Runs `read` over a file's content and the byte ranges that changed
    /// since an earlier call returned `since` (all of it for `None`, or
    /// when the file was replaced or resized since); returns its result
    /// and the mark for the next call. The checker re-decodes only those
    /// bytes of a leg at each restart.
    pub fn with_content_changes<T>(
        &self,
        path: &Path,
        since: Option<ContentMark>,
        read: impl FnOnce(&[u8], &[Range<usize>]) -> T,
    ) -> Option<(T, ContentMark)> {
        let state = self.state.lock();
        let file = state.files.get(path)?;
        let changes = file.changes_since(since);
        Some((read(&file.current, &changes), file.mark()))
    }
}

/// The files by path, keyed by the path's bytes: every operation looks its
/// file up, and comparing paths component by component was 7 % of a
/// hundred-volume simulation. The order differs from `Path`'s only where
/// a name is a prefix of another followed by a byte below `/`, which the
/// storage code's names never are; `list` sorts anyway. Unlike `Path`,
/// two spellings of one path (`a//b`, `a/./b`) name two files: the
/// storage code builds every path with `join`, one spelling each.
#[derive(Debug, Default)]
struct Files(BTreeMap<Vec<u8>, (PathBuf, SimFileState)>);

fn key(path: &Path) -> &[u8] {
    path.as_os_str().as_encoded_bytes()
}

impl Files {
    fn get(&self, path: &Path) -> Option<&SimFileState> {
        self.0.get(key(path)).map(|(_, file)| file)
    }

    fn get_mut(&mut self, path: &Path) -> Option<&mut SimFileState> {
        self.0.get_mut(key(path)).map(|(_, file)| file)
    }

    fn contains_key(&self, path: &Path) -> bool {
        self.0.contains_key(key(path))
    }

    fn insert(&mut self, path: &Path, file: SimFileState) {
        self.0
            .insert(key(path).to_vec(), (path.to_path_buf(), file));
    }

    fn remove(&mut self, path: &Path) -> Option<SimFileState> {
        self.0.remove(key(path)).map(|(_, file)| file)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut SimFileState> {
        self.0.values_mut().map(|(_, file)| file)
    }

    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.0.values().map(|(path, _)| path)
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
            let identity = state.next_identity;
            state.next_identity += 1;
            let current = state.spare_buffers.pop().unwrap_or_default();
            state.files.insert(
                path,
                SimFileState {
                    identity,
                    current,
                    ..SimFileState::default()
                },
            );
        }
        Ok(SimFile {
            state: self.state.clone(),
            path: path.to_path_buf(),
            generation: state.generation,
        })
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        let file = state.files.remove(path).ok_or_else(|| not_found(path))?;
        if state.spare_buffers.len() < SPARE_BUFFERS_MAX {
            let mut buffer = file.current;
            buffer.clear();
            state.spare_buffers.push(buffer);
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        let file = state.files.remove(from).ok_or_else(|| not_found(from))?;
        state.files.insert(to, file);
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let state = self.state.lock();
        let mut paths: Vec<PathBuf> = state
            .files
            .paths()
            .filter(|path| path.parent() == Some(dir))
            .cloned()
            .collect();
        paths.sort();
        Ok(paths)
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
