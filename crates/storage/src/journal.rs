//! The journal: a redo log of closed deltas, in segment files.
//!
//! Layout of a segment `journal-<first position, 20 digits>.log`:
//!
//! ```text
//! header:  "STRJSEG1" | first_position u64 | group_count u32
//!          | (group u32, next_seq u64) * group_count | crc32c u32
//! record:  "STJR" u32 | body_len u32 | crc32c(body) u32 | body
//! body:    position u64 | group u32 | epoch u64 | seq u64 | block_count u32
//!          | (volume u32 | block u64 | kind u8 | 4096 bytes if kind = 0) * block_count
//! ```
//!
//! All integers little-endian. Every record is checksummed, so a torn or
//! lost tail is recognised and dropped rather than replayed. The header
//! carries each group's next sequence number, so numbering survives the
//! release of the segments that held the earlier deltas.
//!
//! Durability order: records are appended with plain writes; `sync` calls
//! fdatasync on every segment written since the last sync, oldest first,
//! before returning. A record is acknowledged durable only after that.
//! Segments are created with a synced header and a synced directory before
//! any record goes in, so recovery always finds the newest segment.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use stretch_core::{
    BLOCK_SIZE, BlockImage, BlockKey, DeltaRecord, DeltaSeq, Epoch, GroupId, JournalPosition,
    VolumeId,
};

use crate::filesystem::{FileSystem, StorageFile};

/// Largest record body accepted when reading: bounds what a corrupt length
/// field can make recovery allocate.
pub const MAX_RECORD_BYTES: u32 = 512 << 20;

const SEGMENT_MAGIC: &[u8; 8] = b"STRJSEG1";
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"STJR");
const RECORD_HEADER_BYTES: usize = 12;
const BODY_FIXED_BYTES: usize = 8 + 4 + 8 + 8 + 4;
const BLOCK_HEADER_BYTES: usize = 4 + 8 + 1;
const KIND_DATA: u8 = 0;
const KIND_ZERO: u8 = 1;
/// Bound on groups listed in a segment header.
const MAX_HEADER_GROUPS: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal segment {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("record at position {got} appended where {expected} was due")]
    OutOfOrder { expected: u64, got: u64 },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The node's journal, open for appending.
#[derive(Debug)]
pub struct Journal<F: FileSystem> {
    fs: Arc<F>,
    dir: PathBuf,
    segment_bytes_max: u64,
    segments: VecDeque<Segment<F::File>>,
    next_position: u64,
    next_seq: BTreeMap<GroupId, DeltaSeq>,
    /// A roll failed after it may have created the next segment's file: no
    /// record may go into the active segment past that file's first
    /// position (recovery would read the file, empty, as a gap and drop
    /// every record after it), so the next append rolls first. The retry
    /// rolls at the same position, overwriting the file.
    roll_pending: bool,
}

#[derive(Debug)]
struct Segment<File> {
    /// Position of the last record in it; `first_position - 1` when empty.
    last_position: u64,
    path: PathBuf,
    file: File,
    len: u64,
    unsynced: bool,
    holds_records: bool,
}

/// A segment as found on disk by recovery.
#[derive(Debug)]
pub(crate) struct FoundSegment {
    pub path: PathBuf,
    pub first_position: u64,
    pub next_seq: BTreeMap<GroupId, DeltaSeq>,
    /// Byte offset of the first record.
    pub records_offset: u64,
}

impl<F: FileSystem> Journal<F> {
    /// Starts a fresh segment at `next_position`. Older segments must have
    /// been replayed (see [`crate::recover`]) and are left for the caller to
    /// delete.
    pub fn create(
        fs: Arc<F>,
        dir: &Path,
        segment_bytes_max: u64,
        next_position: JournalPosition,
        next_seq: BTreeMap<GroupId, DeltaSeq>,
    ) -> Result<Self, JournalError> {
        fs.create_dir_all(dir).map_err(io_error(dir))?;
        let mut journal = Journal {
            fs,
            dir: dir.to_path_buf(),
            segment_bytes_max,
            segments: VecDeque::new(),
            next_position: next_position.0.max(1),
            next_seq,
            roll_pending: false,
        };
        journal.roll()?;
        Ok(journal)
    }

    /// Appends a record (not durable until [`Journal::sync`]).
    pub fn append(&mut self, record: &DeltaRecord) -> Result<(), JournalError> {
        if record.position.0 != self.next_position {
            return Err(JournalError::OutOfOrder {
                expected: self.next_position,
                got: record.position.0,
            });
        }
        let needs_roll = self.roll_pending
            || self
                .segments
                .back()
                .is_some_and(|segment| segment.len >= self.segment_bytes_max);
        if needs_roll {
            self.roll()?;
        }
        let meta = record_meta(record);
        let parts = record_parts(record, &meta);
        let length: usize = parts.iter().map(|part| part.len()).sum();
        let segment = self
            .segments
            .back_mut()
            .expect("journal invariant: there is always an active segment");
        segment
            .file
            .write_all_vectored_at(&parts, segment.len)
            .map_err(io_error(&segment.path))?;
        segment.len += length as u64;
        segment.last_position = record.position.0;
        segment.unsynced = true;
        segment.holds_records = true;
        self.next_position += 1;
        // The newest record numbers the group, even below an older one: a
        // resync renumbers a replica to its owner's line (see `recover`).
        self.next_seq
            .insert(record.group, DeltaSeq(record.seq.0 + 1));
        Ok(())
    }

    /// Makes every appended record durable, oldest segment first.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        for segment in self.segments.iter_mut().filter(|s| s.unsynced) {
            segment.file.sync_data().map_err(io_error(&segment.path))?;
            segment.unsynced = false;
        }
        Ok(())
    }

    /// Deletes whole segments whose records are all at or before `upto`
    /// (the legs holding them were synced). The active segment stays.
    pub fn release(&mut self, upto: JournalPosition) -> Result<(), JournalError> {
        // A fully released active segment is replaced by an empty one, so a
        // clean shutdown leaves nothing for the next start to replay.
        let active_released = self.segments.back().is_some_and(|segment| {
            segment.holds_records && segment.last_position <= upto.0 && !segment.unsynced
        });
        if active_released {
            self.roll()?;
        }
        let mut removed = false;
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            if oldest.last_position > upto.0 || oldest.unsynced {
                break;
            }
            self.fs
                .remove(&oldest.path)
                .map_err(io_error(&oldest.path))?;
            self.segments.pop_front();
            removed = true;
        }
        if removed {
            self.fs.sync_dir(&self.dir).map_err(io_error(&self.dir))?;
        }
        Ok(())
    }

    /// Deletes segments that recovery replayed (their deltas are on synced
    /// legs), except any this journal now uses, then syncs the directory.
    pub fn discard_replayed(&mut self, stale: &[PathBuf]) -> Result<(), JournalError> {
        for path in stale {
            if self.segments.iter().any(|segment| &segment.path == path) {
                continue;
            }
            if self.fs.exists(path) {
                self.fs.remove(path).map_err(io_error(path))?;
            }
        }
        self.fs.sync_dir(&self.dir).map_err(io_error(&self.dir))
    }

    /// Bytes in the segments on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|segment| segment.len).sum()
    }

    /// Starts a new segment: its header is written and synced, and the
    /// directory synced, before any record is appended to it.
    fn roll(&mut self) -> Result<(), JournalError> {
        // Set until the new segment is in use: a failure at any step below
        // may leave its file on disk (see `roll_pending`).
        self.roll_pending = true;
        let path = segment_path(&self.dir, self.next_position);
        let file = self.fs.open(&path, true).map_err(io_error(&path))?;
        file.set_len(0).map_err(io_error(&path))?;
        let header = encode_segment_header(self.next_position, &self.next_seq);
        file.write_all_at(&header, 0).map_err(io_error(&path))?;
        file.sync_data().map_err(io_error(&path))?;
        self.fs.sync_dir(&self.dir).map_err(io_error(&self.dir))?;
        self.segments.push_back(Segment {
            last_position: self.next_position - 1,
            path,
            file,
            len: header.len() as u64,
            unsynced: false,
            holds_records: false,
        });
        self.roll_pending = false;
        Ok(())
    }
}

pub(crate) fn segment_path(dir: &Path, first_position: u64) -> PathBuf {
    dir.join(format!("journal-{first_position:020}.log"))
}

/// Segment files in `dir`, oldest first, with their headers read.
pub(crate) fn find_segments<F: FileSystem>(
    fs: &F,
    dir: &Path,
) -> Result<Vec<FoundSegment>, JournalError> {
    if !fs.exists(dir) {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for path in fs.list(dir).map_err(io_error(dir))? {
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        let Some(number) = name
            .strip_prefix("journal-")
            .and_then(|rest| rest.strip_suffix(".log"))
        else {
            continue;
        };
        let Ok(first_position) = number.parse::<u64>() else {
            continue;
        };
        let file = fs.open(&path, false).map_err(io_error(&path))?;
        match read_segment_header(&file) {
            Ok((header_position, next_seq, records_offset))
                if header_position == first_position =>
            {
                found.push(FoundSegment {
                    path,
                    first_position,
                    next_seq,
                    records_offset,
                });
            }
            Ok((header_position, ..)) => {
                return Err(JournalError::Corrupt {
                    path,
                    reason: format!(
                        "header says first position {header_position}, name says {first_position}"
                    ),
                });
            }
            // A segment whose header never became durable held no durable
            // record: roll() syncs the header before any record goes in.
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "ignoring journal segment without a valid header");
                found.push(FoundSegment {
                    path,
                    first_position,
                    next_seq: BTreeMap::new(),
                    records_offset: u64::MAX,
                });
            }
        }
    }
    found.sort_by_key(|segment| segment.first_position);
    Ok(found)
}

fn encode_segment_header(first_position: u64, next_seq: &BTreeMap<GroupId, DeltaSeq>) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + next_seq.len() * 12);
    out.extend_from_slice(SEGMENT_MAGIC);
    out.extend_from_slice(&first_position.to_le_bytes());
    out.extend_from_slice(&(next_seq.len() as u32).to_le_bytes());
    for (group, seq) in next_seq {
        out.extend_from_slice(&group.0.to_le_bytes());
        out.extend_from_slice(&seq.0.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

type SegmentHeader = (u64, BTreeMap<GroupId, DeltaSeq>, u64);

fn read_segment_header(file: &impl StorageFile) -> Result<SegmentHeader, String> {
    let len = file.len().map_err(|error| error.to_string())?;
    let mut fixed = [0u8; 20];
    if len < fixed.len() as u64 + 4 {
        return Err(format!("{len} bytes is too short for a header"));
    }
    file.read_exact_at(&mut fixed, 0)
        .map_err(|error| error.to_string())?;
    if &fixed[..8] != SEGMENT_MAGIC {
        return Err("bad segment magic".into());
    }
    let first_position = u64::from_le_bytes(fixed[8..16].try_into().expect("8 bytes"));
    let groups = u32::from_le_bytes(fixed[16..20].try_into().expect("4 bytes"));
    if groups > MAX_HEADER_GROUPS {
        return Err(format!("{groups} groups in header"));
    }
    let header_len = 20 + groups as u64 * 12 + 4;
    if len < header_len {
        return Err("header cut short".into());
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 0)
        .map_err(|error| error.to_string())?;
    let (body, crc) = header.split_at(header.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("header checksum mismatch".into());
    }
    let mut next_seq = BTreeMap::new();
    for entry in body[20..].chunks_exact(12) {
        let group = u32::from_le_bytes(entry[..4].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(entry[4..].try_into().expect("8 bytes"));
        next_seq.insert(GroupId(group), DeltaSeq(seq));
    }
    Ok((first_position, next_seq, header_len))
}

/// Reads the records of one segment in order, stopping at the first one
/// that is torn, corrupt or cut short; returns why it stopped, if it did
/// before the end of the file.
pub(crate) fn read_records<F: FileSystem, E: From<JournalError>>(
    fs: &F,
    segment: &FoundSegment,
    mut each: impl FnMut(DeltaRecord) -> Result<(), E>,
) -> Result<Option<String>, E> {
    if segment.records_offset == u64::MAX {
        return Ok(Some("segment header invalid".into()));
    }
    let path = &segment.path;
    let file = fs.open(path, false).map_err(io_error(path))?;
    let len = file.len().map_err(io_error(path))?;
    let mut offset = segment.records_offset;
    let io_error = |source| E::from(io_error(path)(source));
    while offset < len {
        if len - offset < RECORD_HEADER_BYTES as u64 {
            return Ok(Some(format!("record header cut short at byte {offset}")));
        }
        let mut header = [0u8; RECORD_HEADER_BYTES];
        file.read_exact_at(&mut header, offset).map_err(io_error)?;
        let magic = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let body_len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if magic != RECORD_MAGIC {
            return Ok(Some(format!("bad record magic at byte {offset}")));
        }
        if body_len > MAX_RECORD_BYTES {
            return Ok(Some(format!("record length {body_len} at byte {offset}")));
        }
        let body_start = offset + RECORD_HEADER_BYTES as u64;
        if len - body_start < body_len as u64 {
            return Ok(Some(format!("record body cut short at byte {offset}")));
        }
        let mut body = vec![0u8; body_len as usize];
        file.read_exact_at(&mut body, body_start)
            .map_err(io_error)?;
        if crc32c::crc32c(&body) != crc {
            return Ok(Some(format!("record checksum mismatch at byte {offset}")));
        }
        let record = match decode_record(&body) {
            Ok(record) => record,
            Err(reason) => return Ok(Some(format!("record at byte {offset}: {reason}"))),
        };
        each(record)?;
        offset = body_start + body_len as u64;
    }
    Ok(None)
}

/// Encodes a record with its framing header and checksum.
pub fn encode_record(record: &DeltaRecord) -> Vec<u8> {
    let meta = record_meta(record);
    record_parts(record, &meta).concat()
}

/// The record's headers, checksum included: the framing and fixed body
/// fields, then each block's header. Block data stays where it is.
fn record_meta(record: &DeltaRecord) -> Vec<u8> {
    let data_blocks = record
        .blocks
        .iter()
        .filter(|(_, image)| matches!(image, BlockImage::Data(_)))
        .count();
    let body_len =
        BODY_FIXED_BYTES + record.blocks.len() * BLOCK_HEADER_BYTES + data_blocks * BLOCK_SIZE;
    let mut meta = Vec::with_capacity(
        RECORD_HEADER_BYTES + BODY_FIXED_BYTES + record.blocks.len() * BLOCK_HEADER_BYTES,
    );
    meta.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    meta.extend_from_slice(&(body_len as u32).to_le_bytes());
    meta.extend_from_slice(&[0; 4]);
    meta.extend_from_slice(&record.position.0.to_le_bytes());
    meta.extend_from_slice(&record.group.0.to_le_bytes());
    meta.extend_from_slice(&record.epoch.0.to_le_bytes());
    meta.extend_from_slice(&record.seq.0.to_le_bytes());
    meta.extend_from_slice(&(record.blocks.len() as u32).to_le_bytes());
    for (key, image) in &record.blocks {
        meta.extend_from_slice(&key.volume.0.to_le_bytes());
        meta.extend_from_slice(&key.block.to_le_bytes());
        meta.push(match image {
            BlockImage::Data(_) => KIND_DATA,
            BlockImage::Zero => KIND_ZERO,
        });
    }
    let crc = record_parts(record, &meta)
        .iter()
        .skip(1)
        .fold(0, |crc, part| crc32c::crc32c_append(crc, part));
    meta[8..12].copy_from_slice(&crc.to_le_bytes());
    meta
}

/// The record as the pieces laid end to end on disk: the first piece is the
/// 12-byte framing header, the rest is the checksummed body.
fn record_parts<'a>(record: &'a DeltaRecord, meta: &'a [u8]) -> Vec<&'a [u8]> {
    let fixed_end = RECORD_HEADER_BYTES + BODY_FIXED_BYTES;
    let mut parts = Vec::with_capacity(2 + record.blocks.len() * 2);
    parts.push(&meta[..RECORD_HEADER_BYTES]);
    parts.push(&meta[RECORD_HEADER_BYTES..fixed_end]);
    for (index, (_, image)) in record.blocks.iter().enumerate() {
        let at = fixed_end + index * BLOCK_HEADER_BYTES;
        parts.push(&meta[at..at + BLOCK_HEADER_BYTES]);
        if let BlockImage::Data(data) = image {
            parts.push(data);
        }
    }
    parts
}

/// Decodes a record body (after its checksum was verified). Every length is
/// checked against the body: a malformed body is an error, never a panic.
pub fn decode_record(body: &[u8]) -> Result<DeltaRecord, String> {
    let mut reader = Reader { body, at: 0 };
    let position = reader.u64()?;
    let group = reader.u32()?;
    let epoch = reader.u64()?;
    let seq = reader.u64()?;
    let count = reader.u32()?;
    if count as usize > body.len() / BLOCK_HEADER_BYTES {
        return Err(format!("{count} blocks cannot fit {} bytes", body.len()));
    }
    let mut blocks = Vec::with_capacity(count as usize);
    let mut previous: Option<BlockKey> = None;
    for _ in 0..count {
        let volume = reader.u32()?;
        let block = reader.u64()?;
        let key = BlockKey {
            volume: VolumeId(volume),
            block,
        };
        if previous.is_some_and(|previous| previous >= key) {
            return Err("blocks not in strictly increasing order".into());
        }
        previous = Some(key);
        let image = match reader.u8()? {
            KIND_DATA => BlockImage::Data(Bytes::copy_from_slice(reader.take(BLOCK_SIZE)?)),
            KIND_ZERO => BlockImage::Zero,
            other => return Err(format!("unknown block kind {other}")),
        };
        blocks.push((key, image));
    }
    if reader.at != body.len() {
        return Err(format!("{} trailing bytes", body.len() - reader.at));
    }
    Ok(DeltaRecord {
        position: JournalPosition(position),
        group: GroupId(group),
        epoch: Epoch(epoch),
        seq: DeltaSeq(seq),
        blocks,
    })
}

struct Reader<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(count)
            .filter(|end| *end <= self.body.len())
            .ok_or_else(|| format!("body cut short at byte {}", self.at))?;
        let slice = &self.body[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("took 4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("took 8 bytes"),
        ))
    }
}
