//! The reference model and the guarantee checks.
//!
//! Every 512-byte sector a data write touches is filled with a pattern that
//! names the write and the sector (8-byte words `write_id << 32 | sector`),
//! so any image (a read reply, a leg after recovery) decodes into a version
//! per sector. The model keeps the version each sector must have; the
//! workload never runs two overlapping requests at once when one of them
//! writes, so the model is exact.
//!
//! Checks:
//! - G2: a read returns exactly the model's versions.
//! - G4: after a crash, every write covered by a completed FLUSH, or written
//!   with FUA, is present (its version, or a later write's, in each sector).
//! - G3: after a crash, no write is partly present, and none is present
//!   while a write of its group acknowledged before it was issued is not
//!   (write order); every sector decodes to a write that covered it.
//! - Acks: no request is answered twice or never; at the end, after the
//!   drain, every leg equals the model.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

pub const SECTOR_BYTES: u64 = 512;

/// Which guarantee a violation breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub guarantee: &'static str,
    pub detail: String,
}

fn violation(guarantee: &'static str, detail: String) -> Violation {
    Violation { guarantee, detail }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    Data,
    Zero,
}

#[derive(Debug, Clone)]
struct WriteRecord {
    volume: usize,
    first: u64,
    count: u64,
    kind: WriteKind,
    /// Logical instants (see [`Checker::tick`]).
    issued: u64,
    /// When it was answered (ok or error); None while unanswered.
    answered: Option<u64>,
    ok: bool,
    durable: bool,
}

impl WriteRecord {
    /// Position in the order of overlapping writes (which never run
    /// concurrently): unanswered writes come after every answered one.
    fn order(&self) -> u64 {
        self.answered.unwrap_or(u64::MAX)
    }

    fn covers(&self, sector: u64) -> bool {
        sector >= self.first && sector < self.first + self.count
    }
}

#[derive(Debug, Clone)]
struct VolumeModel {
    group: u32,
    /// Version per sector: 0 = zeros, otherwise a write id.
    sectors: Vec<u32>,
    /// The versions recovered at the last restart (zeros at first): what a
    /// sector may fall back to when every later write to it was lost.
    baseline: Vec<u32>,
    /// Acknowledged writes no flush has covered yet, in answer order.
    undurable: std::collections::VecDeque<u32>,
}

/// A request as the checker tracks it.
#[derive(Debug, Clone, Copy)]
pub enum Tracked {
    Read {
        volume: usize,
        first: u64,
        count: u64,
    },
    Write {
        id: u32,
    },
    /// `issued`: the logical instant from [`Checker::tick`].
    Flush {
        volume: usize,
        issued: u64,
    },
    Trim,
}

#[derive(Debug)]
pub struct Checker {
    volumes: Vec<VolumeModel>,
    /// Writes since the last recovery, by id.
    writes: BTreeMap<u32, WriteRecord>,
    next_write: u32,
    in_flight: BTreeMap<u64, Tracked>,
    /// Failed writes whose data the node may still show until it restarts.
    maybe: BTreeMap<(usize, u64), u32>,
    /// Logical clock: every issue and every answer gets the next tick, so
    /// events at the same simulated instant still have an order.
    clock: u64,
}

impl Checker {
    pub fn new(volume_groups: &[u32], volume_bytes: u64) -> Self {
        let sectors = (volume_bytes / SECTOR_BYTES) as usize;
        Checker {
            volumes: volume_groups
                .iter()
                .map(|group| VolumeModel {
                    group: *group,
                    sectors: vec![0; sectors],
                    baseline: vec![0; sectors],
                    undurable: std::collections::VecDeque::new(),
                })
                .collect(),
            writes: BTreeMap::new(),
            next_write: 1,
            in_flight: BTreeMap::new(),
            maybe: BTreeMap::new(),
            clock: 0,
        }
    }

    /// Registers a data or zero write; returns its id (the pattern to send).
    pub fn issue_write(
        &mut self,
        request: u64,
        volume: usize,
        first: u64,
        count: u64,
        kind: WriteKind,
    ) -> u32 {
        let now = self.tick();
        let id = self.next_write;
        self.next_write += 1;
        self.writes.insert(
            id,
            WriteRecord {
                volume,
                first,
                count,
                kind,
                issued: now,
                answered: None,
                ok: false,
                durable: false,
            },
        );
        self.in_flight.insert(request, Tracked::Write { id });
        id
    }

    pub fn issue(&mut self, request: u64, tracked: Tracked) {
        self.tick();
        self.in_flight.insert(request, tracked);
    }

    /// The next logical instant (for ordering issues and answers).
    pub fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    pub fn in_flight(&self) -> impl Iterator<Item = &Tracked> {
        self.in_flight.values()
    }

    pub fn write_range(&self, id: u32) -> (usize, u64, u64) {
        let write = &self.writes[&id];
        (write.volume, write.first, write.count)
    }

    pub fn unanswered(&self) -> usize {
        self.in_flight.len()
    }

    /// A reply arrived. `ok` and `data` describe it; `fua` for writes.
    pub fn on_reply(
        &mut self,
        request: u64,
        ok: bool,
        data: Option<&Bytes>,
        fua: bool,
    ) -> Result<(), Violation> {
        let now = self.tick();
        let Some(tracked) = self.in_flight.remove(&request) else {
            return Err(violation(
                "acks",
                format!("request {request} answered twice or never issued"),
            ));
        };
        match tracked {
            Tracked::Read {
                volume,
                first,
                count,
            } => {
                if !ok {
                    return Err(violation("G2", format!("read {request} failed")));
                }
                let data = data.ok_or_else(|| violation("G2", "read without data".into()))?;
                self.check_read(volume, first, count, data)
            }
            Tracked::Write { id } => {
                let write = self
                    .writes
                    .get_mut(&id)
                    .expect("checker invariant: a tracked write is recorded");
                write.answered = Some(now);
                write.ok = ok;
                if !ok {
                    for sector in write.first..write.first + write.count {
                        let version = if write.kind == WriteKind::Data { id } else { 0 };
                        self.maybe.insert((write.volume, sector), version);
                    }
                    return Ok(());
                }
                write.durable = fua;
                let version = if write.kind == WriteKind::Data { id } else { 0 };
                let model = &mut self.volumes[write.volume];
                if !fua {
                    model.undurable.push_back(id);
                }
                for sector in write.first..write.first + write.count {
                    model.sectors[sector as usize] = version;
                    self.maybe.remove(&(write.volume, sector));
                }
                Ok(())
            }
            Tracked::Flush { volume, issued } => {
                if ok {
                    // NBD: a flush covers every write completed before it
                    // was sent (the queue is in answer order).
                    let undurable = &mut self.volumes[volume].undurable;
                    while let Some(id) = undurable.front().copied() {
                        let write = self
                            .writes
                            .get_mut(&id)
                            .expect("checker invariant: queued writes are recorded");
                        if write.answered.is_none_or(|at| at > issued) {
                            break;
                        }
                        write.durable = true;
                        undurable.pop_front();
                    }
                }
                Ok(())
            }
            Tracked::Trim => Ok(()),
        }
    }

    /// The node crashed: its in-flight requests are lost with the
    /// connection (their writes may or may not have been taken).
    pub fn on_crash(&mut self) {
        self.in_flight.clear();
    }

    fn check_read(
        &self,
        volume: usize,
        first: u64,
        count: u64,
        data: &Bytes,
    ) -> Result<(), Violation> {
        if data.len() as u64 != count * SECTOR_BYTES {
            return Err(violation(
                "G2",
                format!("read returned {} bytes for {count} sectors", data.len()),
            ));
        }
        for index in 0..count {
            let sector = first + index;
            let at = (index * SECTOR_BYTES) as usize;
            let found = decode_sector(&data[at..at + SECTOR_BYTES as usize], sector);
            let expected = self.volumes[volume].sectors[sector as usize];
            let maybe = self.maybe.get(&(volume, sector)).copied();
            let allowed = found == Some(expected) || (maybe.is_some() && found == maybe);
            if !allowed {
                return Err(violation(
                    "G2",
                    format!(
                        "volume {volume} sector {sector}: read returned {} but the newest acknowledged write is {}",
                        describe(found),
                        describe(Some(expected))
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Decodes a leg image into a version per sector, refusing sectors no
    /// write could have produced there.
    pub fn decode_image(&self, volume: usize, image: &[u8]) -> Result<Vec<u32>, Violation> {
        let mut versions = Vec::with_capacity(image.len() / SECTOR_BYTES as usize);
        for (sector, bytes) in image.chunks(SECTOR_BYTES as usize).enumerate() {
            let Some(version) = decode_sector(bytes, sector as u64) else {
                return Err(violation(
                    "G3",
                    format!(
                        "volume {volume} sector {sector} holds bytes no write put there (torn or misplaced)"
                    ),
                ));
            };
            if version != 0 && !self.version_could_be_here(volume, sector as u64, version) {
                return Err(violation(
                    "G3",
                    format!(
                        "volume {volume} sector {sector} holds write {version}, which never covered it"
                    ),
                ));
            }
            versions.push(version);
        }
        Ok(versions)
    }

    /// After recovery: checks the decoded leg images (one per volume, from
    /// [`Checker::decode_image`]) against what was acknowledged, then makes
    /// them the new baseline.
    pub fn after_recovery(&mut self, visible: Vec<Vec<u32>>) -> Result<(), Violation> {
        // Each write is judged once; most sectors share their write.
        let mut judged: BTreeMap<u32, bool> = BTreeMap::new();
        let mut present = |id: u32| {
            *judged
                .entry(id)
                .or_insert_with(|| self.present(&visible, id))
        };
        // G4: durable writes survive.
        for (id, write) in &self.writes {
            if write.durable && !present(*id) {
                return Err(violation(
                    "G4",
                    format!(
                        "write {id} (volume {}, sectors {}+{}) was covered by a completed flush or FUA but is lost after the crash",
                        write.volume, write.first, write.count
                    ),
                ));
            }
        }
        // G3: whole writes only, in write order.
        let mut newest_issue: BTreeMap<u32, u64> = BTreeMap::new();
        for (volume, versions) in visible.iter().enumerate() {
            for version in versions {
                let Some(write) = self.writes.get(version) else {
                    continue;
                };
                if !present(*version) {
                    return Err(violation(
                        "G3",
                        format!("write {version} (volume {volume}) survived only in part"),
                    ));
                }
                let group = self.volumes[write.volume].group;
                let entry = newest_issue.entry(group).or_insert(0);
                *entry = (*entry).max(write.issued);
            }
        }
        for (id, write) in &self.writes {
            let group = self.volumes[write.volume].group;
            let Some(newest) = newest_issue.get(&group) else {
                continue;
            };
            let acked_before = write.ok && write.answered.is_some_and(|at| at < *newest);
            if acked_before && !present(*id) {
                return Err(violation(
                    "G3",
                    format!(
                        "write {id} of group {group} is lost while a write issued after it was acknowledged survived (reordered)"
                    ),
                ));
            }
        }
        for (volume, versions) in visible.into_iter().enumerate() {
            self.volumes[volume].baseline = versions.clone();
            self.volumes[volume].sectors = versions;
            self.volumes[volume].undurable.clear();
        }
        self.writes.clear();
        self.maybe.clear();
        Ok(())
    }

    /// At the end of a run, after the drain: the legs hold exactly the model.
    pub fn check_final(&self, volume: usize, image: &[u8]) -> Result<(), Violation> {
        for (sector, bytes) in image.chunks(SECTOR_BYTES as usize).enumerate() {
            let found = decode_sector(bytes, sector as u64);
            let expected = self.volumes[volume].sectors[sector];
            if found != Some(expected) {
                return Err(violation(
                    "G3",
                    format!(
                        "after the drain, volume {volume} sector {sector} on the leg is {} but should be {}",
                        describe(found),
                        describe(Some(expected))
                    ),
                ));
            }
        }
        Ok(())
    }

    fn version_could_be_here(&self, volume: usize, sector: u64, version: u32) -> bool {
        match self.writes.get(&version) {
            Some(write) => write.volume == volume && write.covers(sector),
            // A write from before the last recovery: the baseline had it.
            None => self.volumes[volume].baseline[sector as usize] == version,
        }
    }

    /// True if every sector of write `id` shows it or a later write.
    fn present(&self, visible: &[Vec<u32>], id: u32) -> bool {
        let write = &self.writes[&id];
        (write.first..write.first + write.count).all(|sector| {
            let shown = visible[write.volume][sector as usize];
            match write.kind {
                WriteKind::Data if shown == id => return true,
                WriteKind::Zero if shown == 0 => return true,
                _ => {}
            }
            if shown != 0 {
                return self
                    .writes
                    .get(&shown)
                    .is_some_and(|later| later.order() > write.order());
            }
            self.writes.values().any(|later| {
                later.kind == WriteKind::Zero
                    && later.volume == write.volume
                    && later.covers(sector)
                    && later.order() > write.order()
            })
        })
    }
}

/// The bytes a data write puts into one sector.
pub fn fill_sector(out: &mut [u8], write: u32, sector: u64) {
    let word = ((write as u64) << 32 | (sector & 0xffff_ffff)).to_le_bytes();
    for chunk in out.chunks_exact_mut(8) {
        chunk.copy_from_slice(&word);
    }
}

pub fn payload(write: u32, first: u64, count: u64) -> Bytes {
    let mut data = BytesMut::zeroed((count * SECTOR_BYTES) as usize);
    for (index, sector) in data.chunks_exact_mut(SECTOR_BYTES as usize).enumerate() {
        fill_sector(sector, write, first + index as u64);
    }
    data.freeze()
}

/// The version a sector holds: Some(0) for zeros, Some(id) for a write's
/// pattern at this sector, None for anything else.
fn decode_sector(bytes: &[u8], sector: u64) -> Option<u32> {
    let first = u64::from_le_bytes(bytes[..8].try_into().expect("sector has 8 bytes"));
    if bytes
        .chunks_exact(8)
        .any(|word| word != first.to_le_bytes())
    {
        return None;
    }
    if first == 0 {
        return Some(0);
    }
    let id = (first >> 32) as u32;
    (id != 0 && first & 0xffff_ffff == sector & 0xffff_ffff).then_some(id)
}

fn describe(version: Option<u32>) -> String {
    match version {
        None => "garbage".into(),
        Some(0) => "zeros".into(),
        Some(id) => format!("write {id}"),
    }
}
