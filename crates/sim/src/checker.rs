//! The reference model and the guarantee checks.
//!
//! Every 512-byte sector a data write touches is filled with a pattern that
//! names the write and the sector (8-byte words `write_id << 32 | sector`),
//! so any image (a read reply, a leg after recovery) decodes into a version
//! per sector. The workload never runs two overlapping requests at once when
//! one of them writes (a write forwarded to another site counts as running
//! until that site can no longer apply it), so the writes to any sector form
//! one sequence, in issue order: a higher write id is a newer version. The
//! model keeps, per volume, the version each sector has at the owner.
//!
//! A write is *acknowledged* when its owner site accepts it (the reply at
//! the owner; for a write forwarded from another site, the owner's answer
//! to the forward, which the simulator sees even if the network then loses
//! it). The model changes at that moment.
//!
//! Checks:
//! - G2: a strict read, at any site, returns exactly the model's versions
//!   (no overlapping write runs meanwhile, so "at least as new as every
//!   acknowledged write, nothing from a write not yet issued" is exact).
//!   A read in flight while its owner crashed and recovered may also show
//!   what was acknowledged before the crash (the owner answered first).
//!   At a site that does not own the volume a strict read may fail with an
//!   I/O error (the owner unreachable): allowed, and counted.
//! - G2/G3: a snapshot read at a site that does not own the volume shows a
//!   whole-delta image: no write in part, and every write acknowledged
//!   before the newest write it shows was issued is there too (nothing
//!   skipped), and no write its owner lost in a crash. If the site said it
//!   was mid-resync when the read was issued, the read must be refused.
//! - G4: after an owner's crash, every write covered by a completed FLUSH,
//!   or written with FUA (or in sync mode), is present.
//! - G3: after any site's crash, every leg is a whole-delta prefix: no write
//!   partly present, none present while a write of its group acknowledged
//!   before it was issued is not (write order), every sector decodes to a
//!   write that covered it. A site that crashed mid-resync is exempt for
//!   that group until it is whole again, and must say it is not (the
//!   simulator checks its engine reports the group inconsistent).
//! - G4 (site loss): writes a flush-sync FLUSH, a flush-sync FUA write or a
//!   sync-mode write acknowledged are found at one or more of the other
//!   sites after they all lose power at once.
//! - Acks and convergence: no request is answered twice or never; at the
//!   end, after the drain, every leg at every site equals the model.
//!
//! One assumption: an owner's crash is a crash for every client of the
//! volumes it owns, as it is for the clients at its own site. What it
//! acknowledged and lost unflushed is gone from the model, also for a
//! client at another site whose own site did not crash (that client saw
//! no error). The simulator counts such writes
//! ([`crate::Stats::remote_writes_lost`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

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

/// How a volume is set up, for the model.
#[derive(Debug, Clone, Copy)]
pub struct VolumeSetup {
    pub group: u32,
    /// The site (0-based) owning the volume's group.
    pub owner: usize,
    /// Every acknowledged write is durable at once (sync mode).
    pub durable_writes: bool,
    /// FLUSH and FUA promise survival of a site loss (flush-sync and sync
    /// modes, with more than one site).
    pub site_durable_flush: bool,
    /// Every acknowledged write survives a site loss (sync mode, with more
    /// than one site).
    pub site_durable_writes: bool,
}

#[derive(Debug, Clone)]
struct WriteRecord {
    volume: usize,
    first: u64,
    count: u64,
    kind: WriteKind,
    fua: bool,
    /// Sent to the owner at another site.
    forwarded: bool,
    /// Logical instant of issue (see [`Checker::tick`]).
    issued: u64,
    /// When the client heard back, and whether it was a success.
    answered: Option<u64>,
    client_ok: bool,
    /// The client no longer waits for it (answered, or its site crashed).
    client_done: bool,
    /// When the owner accepted it; from then on the model shows it.
    acked: Option<u64>,
    /// The owner can no longer apply it later (it answered, crashed, or
    /// the forward was lost).
    settled: bool,
    /// Survives a crash of the owner.
    durable: bool,
    /// Survives the loss of the owner's whole site.
    site_durable: bool,
    /// Judged absent after its owner's recovery: gone for good.
    lost: bool,
    /// When a failover judged it lost (a logical instant): a snapshot read
    /// issued before that may still show it, as the image it read was on
    /// the cluster's line then.
    lost_to_failover_at: Option<u64>,
    /// Judged at an owner recovery; the owner's baseline covers it since.
    finalized: bool,
}

impl WriteRecord {
    fn covers(&self, sector: u64) -> bool {
        sector >= self.first && sector < self.first + self.count
    }

    fn sectors(&self) -> std::ops::Range<u64> {
        self.first..self.first + self.count
    }
}

#[derive(Debug, Clone)]
struct VolumeModel {
    setup: VolumeSetup,
    /// Version per sector at the owner: 0 = zeros, otherwise a write id.
    sectors: Vec<u32>,
    /// The versions the owner recovered at its last restart (zeros at
    /// first): what a sector may fall back to when every later write to it
    /// was lost.
    baseline: Vec<u32>,
    /// The newest zeroing write that covered each sector (0 if none).
    last_zero: Vec<u32>,
    /// Acknowledged writes no flush has covered yet, in answer order.
    undurable: VecDeque<u32>,
    /// Every write to the volume, oldest first.
    writes: Vec<u32>,
}

/// A request as the checker tracks it.
#[derive(Debug, Clone, Copy)]
pub enum Tracked {
    /// A strict read.
    Read {
        volume: usize,
        first: u64,
        count: u64,
    },
    /// A snapshot read at a site that does not own the volume; `consistent`
    /// is what that site reported when the read was issued, `issued` the
    /// logical instant from [`Checker::tick`].
    Snapshot {
        volume: usize,
        first: u64,
        count: u64,
        consistent: bool,
        issued: u64,
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

/// Every write of a run by id. Ids are handed out from 1 in issue order
/// and never reused, so the record of write `id` sits at `id - 1`: the
/// checker looks writes up for every sector it judges, and a map's search
/// was most of a long run's checking.
#[derive(Debug, Default)]
struct WriteLog(Vec<WriteRecord>);

impl WriteLog {
    /// Records a new write; returns its id.
    fn push(&mut self, write: WriteRecord) -> u32 {
        self.0.push(write);
        u32::try_from(self.0.len()).expect("checker invariant: fewer than 2^32 writes in a run")
    }

    fn get(&self, id: &u32) -> Option<&WriteRecord> {
        self.0.get((*id as usize).checked_sub(1)?)
    }

    fn get_mut(&mut self, id: &u32) -> Option<&mut WriteRecord> {
        self.0.get_mut((*id as usize).checked_sub(1)?)
    }

    /// Every write with its id, oldest first.
    fn iter(&self) -> impl Iterator<Item = (u32, &WriteRecord)> {
        (1..).zip(&self.0)
    }
}

impl std::ops::Index<&u32> for WriteLog {
    type Output = WriteRecord;

    fn index(&self, id: &u32) -> &WriteRecord {
        self.get(id)
            .unwrap_or_else(|| panic!("checker invariant: write {id} was issued"))
    }
}

/// Part of one volume's image: the versions of `versions.len()` sectors
/// from `first`.
#[derive(Debug, Clone)]
pub struct View {
    pub volume: usize,
    pub first: u64,
    pub versions: Vec<u32>,
}

impl View {
    /// The first sector of each run of sectors showing one write (zeros
    /// left out), with the write: a write shows in a run of sectors, so
    /// checks made once per write need look at each run once.
    fn runs(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let mut previous = 0;
        self.sectors()
            .zip(self.versions.iter().copied())
            .filter(move |&(_, version)| {
                let starts = version != 0 && version != previous;
                previous = version;
                starts
            })
    }

    fn shown(&self, sector: u64) -> Option<u32> {
        let index = sector.checked_sub(self.first)?;
        self.versions.get(index as usize).copied()
    }

    fn sectors(&self) -> std::ops::Range<u64> {
        self.first..self.first + self.versions.len() as u64
    }
}

#[derive(Debug)]
pub struct Checker {
    volumes: Vec<VolumeModel>,
    /// Every write of the run, by id (ids grow with issue order).
    writes: WriteLog,
    /// Writes not yet judged by a recovery of their owner.
    open: BTreeSet<u32>,
    /// Requests in flight: the site they were issued at, and what they are.
    in_flight: BTreeMap<u64, (usize, Tracked)>,
    /// Writes whose client is done but whose owner may still apply them
    /// (a forward the owner has not answered): they still block
    /// overlapping requests.
    unsettled: BTreeSet<u32>,
    /// Per sector, the failed writes since its last acknowledged one whose
    /// data the owner may still show until it restarts.
    maybe: BTreeMap<(usize, u64), BTreeSet<u32>>,
    /// Strict reads in flight while their volume's owner recovered: what
    /// each sector could show before the recovery (the owner may have
    /// answered before it crashed).
    straddling: BTreeMap<u64, Vec<BTreeSet<u32>>>,
    /// Writes an owner accepted for a client at another site and then lost
    /// in its crash (unflushed, so allowed; that client saw no crash).
    remote_writes_lost: u64,
    /// Logical clock: every issue and every answer gets the next tick, so
    /// events at the same simulated instant still have an order.
    clock: u64,
}

impl Checker {
    pub fn new(volumes: &[VolumeSetup], volume_bytes: u64) -> Self {
        let sectors = (volume_bytes / SECTOR_BYTES) as usize;
        Checker {
            volumes: volumes
                .iter()
                .map(|setup| VolumeModel {
                    setup: *setup,
                    sectors: vec![0; sectors],
                    baseline: vec![0; sectors],
                    last_zero: vec![0; sectors],
                    undurable: VecDeque::new(),
                    writes: Vec::new(),
                })
                .collect(),
            writes: WriteLog::default(),
            open: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            unsettled: BTreeSet::new(),
            maybe: BTreeMap::new(),
            straddling: BTreeMap::new(),
            remote_writes_lost: 0,
            clock: 0,
        }
    }

    /// Registers a data or zero write issued at `site`; returns its id (the
    /// pattern to send). `forwarded`: the site does not own the volume.
    #[allow(clippy::too_many_arguments)]
    pub fn issue_write(
        &mut self,
        request: u64,
        site: usize,
        volume: usize,
        first: u64,
        count: u64,
        kind: WriteKind,
        fua: bool,
        forwarded: bool,
    ) -> u32 {
        let now = self.tick();
        let id = self.writes.push(WriteRecord {
            volume,
            first,
            count,
            kind,
            fua,
            forwarded,
            issued: now,
            answered: None,
            client_ok: false,
            client_done: false,
            acked: None,
            settled: false,
            durable: false,
            site_durable: false,
            lost: false,
            lost_to_failover_at: None,
            finalized: false,
        });
        let model = &mut self.volumes[volume];
        model.writes.push(id);
        if kind == WriteKind::Zero {
            for sector in first..first + count {
                model.last_zero[sector as usize] = id;
            }
        }
        self.open.insert(id);
        self.in_flight
            .insert(request, (site, Tracked::Write { id }));
        id
    }

    pub fn issue(&mut self, request: u64, site: usize, tracked: Tracked) {
        self.tick();
        self.in_flight.insert(request, (site, tracked));
    }

    /// The next logical instant (for ordering issues and answers).
    pub fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    pub fn in_flight(&self) -> impl Iterator<Item = &Tracked> {
        self.in_flight.values().map(|(_, tracked)| tracked)
    }

    /// Writes whose client is done but which their owner may still apply.
    pub fn unsettled(&self) -> impl Iterator<Item = u32> + '_ {
        self.unsettled.iter().copied()
    }

    /// Write `id`, held at its site, was sent to another site's node (its
    /// site learned that the group moved meanwhile): that node answers it.
    pub fn forwarded_from_now(&mut self, id: u32) {
        if let Some(write) = self.writes.get_mut(&id) {
            write.forwarded = true;
        }
    }

    /// The write a client at `site` has in flight on exactly these sectors.
    pub fn in_flight_write(
        &self,
        site: usize,
        volume: usize,
        first: u64,
        count: u64,
    ) -> Option<u32> {
        self.in_flight
            .values()
            .find_map(|(at, tracked)| match tracked {
                Tracked::Write { id } if *at == site => {
                    let write = &self.writes[id];
                    (write.volume == volume && write.first == first && write.count == count)
                        .then_some(*id)
                }
                _ => None,
            })
    }

    /// Whether an owner accepted write `id` already.
    pub fn acknowledged(&self, id: u32) -> bool {
        self.writes
            .get(&id)
            .is_some_and(|write| write.acked.is_some())
    }

    pub fn write_range(&self, id: u32) -> (usize, u64, u64) {
        let write = &self.writes[&id];
        (write.volume, write.first, write.count)
    }

    pub fn unanswered(&self) -> usize {
        self.in_flight.len()
    }

    /// Writes an owner accepted for a client at another site, then lost in
    /// a crash before a flush covered them.
    pub fn remote_writes_lost(&self) -> u64 {
        self.remote_writes_lost
    }

    /// The owner accepted write `id`: the model shows it from now on.
    fn owner_ack(&mut self, id: u32) {
        let now = self.tick();
        let write = self
            .writes
            .get_mut(&id)
            .expect("checker invariant: an acknowledged write is recorded");
        let setup = self.volumes[write.volume].setup;
        write.acked = Some(now);
        write.durable = write.fua || setup.durable_writes;
        write.site_durable = (write.fua && setup.site_durable_flush) || setup.site_durable_writes;
        let version = if write.kind == WriteKind::Data { id } else { 0 };
        let model = &mut self.volumes[write.volume];
        for sector in write.first..write.first + write.count {
            model.sectors[sector as usize] = version;
            self.maybe.remove(&(write.volume, sector));
        }
    }

    /// True if `found` is the version of a write that failed since the
    /// sector's last acknowledged write (it may have landed all the same).
    /// Every such write counts, not only the last: a later one that failed
    /// may be the one that never landed.
    fn may_show(&self, volume: usize, sector: u64, found: Option<u32>) -> bool {
        found.is_some_and(|found| {
            self.maybe
                .get(&(volume, sector))
                .is_some_and(|versions| versions.contains(&found))
        })
    }

    fn add_maybe(&mut self, id: u32) {
        let write = &self.writes[&id];
        let version = if write.kind == WriteKind::Data { id } else { 0 };
        for sector in write.first..write.first + write.count {
            self.maybe
                .entry((write.volume, sector))
                .or_default()
                .insert(version);
        }
    }

    /// The owner answered a write forwarded to it (`ok`: it applied it).
    pub fn forward_answered(&mut self, id: u32, ok: bool) {
        let write = self
            .writes
            .get_mut(&id)
            .expect("checker invariant: a forwarded write is recorded");
        let acked_already = write.acked.is_some();
        write.settled = true;
        let client_failed = write.client_done && !write.client_ok;
        if ok && acked_already {
            // Forwarded twice (held by a hand-over, sent on to the new
            // owner): the new owner's answer counted; this one relays it.
        } else if ok {
            self.owner_ack(id);
        } else if client_failed {
            self.add_maybe(id);
        }
        self.unsettled.remove(&id);
    }

    /// A forwarded write can no longer be applied by its owner: the message
    /// was lost, or the owner crashed holding it (its recovery judges it).
    pub fn forward_settled(&mut self, id: u32) {
        if let Some(write) = self.writes.get_mut(&id) {
            write.settled = true;
        }
        self.unsettled.remove(&id);
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
        let Some((_, tracked)) = self.in_flight.remove(&request) else {
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
                let before = self.straddling.remove(&request);
                if !ok {
                    return Err(violation("G2", format!("read {request} failed")));
                }
                let data = data.ok_or_else(|| violation("G2", "read without data".into()))?;
                self.check_read(volume, first, count, data, before.as_deref())
            }
            Tracked::Snapshot { .. } => Err(violation(
                "acks",
                "checker invariant: snapshot replies go to on_snapshot_reply".into(),
            )),
            Tracked::Write { id } => {
                let write = self
                    .writes
                    .get_mut(&id)
                    .expect("checker invariant: a tracked write is recorded");
                debug_assert_eq!(write.fua, fua);
                write.answered = Some(now);
                write.client_ok = ok;
                write.client_done = true;
                if !write.forwarded {
                    // The owner itself answered: that settles it.
                    write.settled = true;
                    if !ok {
                        self.add_maybe(id);
                        return Ok(());
                    }
                    self.owner_ack(id);
                } else if !ok {
                    if !write.settled {
                        self.unsettled.insert(id);
                    } else if write.acked.is_none() {
                        self.add_maybe(id);
                    }
                    return Ok(());
                } else if write.acked.is_none() {
                    return Err(violation(
                        "acks",
                        format!(
                            "forwarded write {id} (request {request}) was acknowledged to the client but its owner never accepted it"
                        ),
                    ));
                }
                let write = &self.writes[&id];
                if !write.durable {
                    self.volumes[write.volume].undurable.push_back(id);
                }
                Ok(())
            }
            Tracked::Flush { volume, issued } => {
                if ok {
                    // NBD: a flush covers every write completed before it
                    // was sent (the queue is in answer order).
                    let site = self.volumes[volume].setup.site_durable_flush;
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
                        write.site_durable |= site;
                        undurable.pop_front();
                    }
                }
                Ok(())
            }
            Tracked::Trim => Ok(()),
        }
    }

    /// A request failed in a way its site is allowed to fail it (a request
    /// at a site that does not own the volume, whose owner did not answer).
    /// Writes go through [`Checker::on_reply`] instead.
    pub fn on_allowed_failure(&mut self, request: u64) {
        self.tick();
        self.in_flight.remove(&request);
        self.straddling.remove(&request);
    }

    /// A snapshot read answered: `Ok(data)` or an error. A site that said
    /// it was mid-resync must refuse; one that said it was consistent must
    /// answer with a whole-delta image.
    pub fn on_snapshot_reply(
        &mut self,
        request: u64,
        result: Result<&Bytes, String>,
    ) -> Result<(), Violation> {
        self.tick();
        let Some((
            site,
            Tracked::Snapshot {
                volume,
                first,
                count,
                consistent,
                issued,
            },
        )) = self.in_flight.remove(&request)
        else {
            return Err(violation(
                "acks",
                format!("snapshot read {request} answered twice or never issued"),
            ));
        };
        match (consistent, result) {
            (false, Err(_)) => Ok(()),
            (false, Ok(_)) => Err(violation(
                "G3",
                format!(
                    "site {} served a snapshot read of volume {volume} while it reported being mid-resync",
                    site + 1
                ),
            )),
            (true, Err(error)) => Err(violation(
                "G2",
                format!(
                    "snapshot read {request} of volume {volume} at site {} failed although the site is consistent: {error}",
                    site + 1
                ),
            )),
            (true, Ok(data)) => {
                if data.len() as u64 != count * SECTOR_BYTES {
                    return Err(violation(
                        "G2",
                        format!(
                            "snapshot read returned {} bytes for {count} sectors",
                            data.len()
                        ),
                    ));
                }
                let mut versions = Vec::with_capacity(count as usize);
                for index in 0..count {
                    let at = (index * SECTOR_BYTES) as usize;
                    let sector = first + index;
                    match decode_sector(&data[at..at + SECTOR_BYTES as usize], sector) {
                        Some(version) => versions.push(version),
                        None => {
                            return Err(violation(
                                "G3",
                                format!(
                                    "snapshot read at site {} of volume {volume} sector {sector} returned bytes no write put there",
                                    site + 1
                                ),
                            ));
                        }
                    }
                }
                let view = View {
                    volume,
                    first,
                    versions,
                };
                self.check_replica_views(&[view], self.volumes[volume].setup.group, Some(issued))
                    .map_err(|detail| {
                        violation(
                            "G3",
                            format!("snapshot read at site {}: {detail}", site + 1),
                        )
                    })
            }
        }
    }

    /// A site crashed: its in-flight requests are lost with the connection
    /// (their writes may or may not have been taken). Writes it forwarded
    /// to another site stay pending until that site's fate for them is
    /// known.
    pub fn on_site_crash(&mut self, site: usize) {
        let lost: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, (at, _))| *at == site)
            .map(|(request, _)| *request)
            .collect();
        for request in lost {
            self.straddling.remove(&request);
            let Some((_, Tracked::Write { id })) = self.in_flight.remove(&request) else {
                continue;
            };
            let write = self
                .writes
                .get_mut(&id)
                .expect("checker invariant: a tracked write is recorded");
            write.client_done = true;
            if !write.forwarded {
                write.settled = true;
            } else if !write.settled {
                self.unsettled.insert(id);
            }
        }
    }

    fn check_read(
        &self,
        volume: usize,
        first: u64,
        count: u64,
        data: &Bytes,
        before: Option<&[BTreeSet<u32>]>,
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
            let maybe = self.may_show(volume, sector, found);
            let earlier = before.is_some_and(|before| {
                found.is_some_and(|found| before[index as usize].contains(&found))
            });
            let allowed = found == Some(expected) || maybe || earlier;
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
    /// write could have produced there. `at_owner`: the image is the
    /// owner's, which holds its baseline or writes not judged since.
    pub fn decode_image(
        &self,
        volume: usize,
        image: &[u8],
        at_owner: bool,
    ) -> Result<Vec<u32>, Violation> {
        let mut decoded = vec![None; image.len() / SECTOR_BYTES as usize];
        decode_sectors(image, 0, &mut decoded);
        self.check_decoded(volume, &decoded, at_owner)
    }

    /// [`Checker::decode_image`]'s checks on sectors already decoded by
    /// [`decode_sectors`] (the simulator keeps each leg's decoding and
    /// redoes only the sectors that changed since).
    pub fn check_decoded(
        &self,
        volume: usize,
        decoded: &[Option<u32>],
        at_owner: bool,
    ) -> Result<Vec<u32>, Violation> {
        let mut versions = Vec::with_capacity(decoded.len());
        // A write covers a run of sectors: look it up once per run.
        let mut known: Option<(u32, Option<&WriteRecord>)> = None;
        for (sector, version) in decoded.iter().enumerate() {
            let Some(version) = *version else {
                return Err(violation(
                    "G3",
                    format!(
                        "volume {volume} sector {sector} holds bytes no write put there (torn or misplaced)"
                    ),
                ));
            };
            if version != 0 {
                let write = match known {
                    Some((id, write)) if id == version => write,
                    _ => {
                        let write = self.writes.get(&version);
                        known = Some((version, write));
                        write
                    }
                };
                if !self.version_could_be_here(write, volume, sector as u64, version, at_owner) {
                    return Err(violation(
                        "G3",
                        format!(
                            "volume {volume} sector {sector} holds write {version}, which never covered it"
                        ),
                    ));
                }
            }
            versions.push(version);
        }
        Ok(versions)
    }

    /// `write`: the record of write `version`, if there is one.
    /// The version `sector` of `volume` showed at its owner's last judged
    /// image (0: zeros, or never judged).
    pub fn baseline(&self, volume: usize, sector: u64) -> u32 {
        self.volumes[volume].baseline[sector as usize]
    }

    fn version_could_be_here(
        &self,
        write: Option<&WriteRecord>,
        volume: usize,
        sector: u64,
        version: u32,
        at_owner: bool,
    ) -> bool {
        let Some(write) = write else {
            return false;
        };
        if write.volume != volume || !write.covers(sector) {
            return false;
        }
        // A write judged at an earlier recovery of the owner can only be
        // there if that recovery found it there.
        !at_owner || !write.finalized || self.volumes[volume].baseline[sector as usize] == version
    }

    /// True if `shown` in `sector` is write `id` or a newer version of it.
    fn at_least(&self, volume: usize, sector: u64, shown: u32, id: u32) -> bool {
        let write = &self.writes[&id];
        match write.kind {
            WriteKind::Data if shown == id => return true,
            WriteKind::Zero if shown == 0 => return true,
            _ => {}
        }
        if shown != 0 {
            return shown > id;
        }
        self.volumes[volume].last_zero[sector as usize] > id
    }

    /// True if every sector of write `id` inside the views shows it or a
    /// newer version.
    fn present(&self, views: &BTreeMap<usize, View>, id: u32) -> bool {
        let write = &self.writes[&id];
        let Some(view) = views.get(&write.volume) else {
            return true;
        };
        write.sectors().all(|sector| {
            view.shown(sector)
                .is_none_or(|shown| self.at_least(write.volume, sector, shown, id))
        })
    }

    /// Causality on one volume: every write among `candidates` (writes of
    /// the view's volume, newest first) that was acknowledged before
    /// `newest` (an issue instant) and not lost must be present in the
    /// view. Writes to a sector form one sequence, so only the newest such
    /// write matters per sector.
    fn check_order(
        &self,
        view: &View,
        candidates: impl Iterator<Item = u32>,
        newest: u64,
    ) -> Result<(), u32> {
        let mut covered = vec![false; view.versions.len()];
        let mut left = covered.len();
        for id in candidates {
            if left == 0 {
                break;
            }
            let write = &self.writes[&id];
            if write.lost || write.acked.is_none_or(|at| at >= newest) {
                continue;
            }
            for sector in write.sectors() {
                let Some(shown) = view.shown(sector) else {
                    continue;
                };
                let index = (sector - view.first) as usize;
                if covered[index] {
                    continue;
                }
                if !self.at_least(write.volume, sector, shown, id) {
                    return Err(id);
                }
                covered[index] = true;
                left -= 1;
            }
        }
        Ok(())
    }

    /// A recovered owner: checks the decoded leg images of the volumes it
    /// owns (from [`Checker::decode_image`]) against what was acknowledged,
    /// then makes them the new baseline. `unknown`: per volume, sectors
    /// whose newest image is not at this site yet (a fast migration's
    /// target has not copied them): writes touching them are judged later
    /// (when the copy ends), and what the legs show there is not judged.
    pub fn after_owner_recovery(
        &mut self,
        site: usize,
        visible: Vec<View>,
        unknown: &BTreeMap<usize, Vec<std::ops::Range<u64>>>,
    ) -> Result<(), Violation> {
        let views: BTreeMap<usize, View> = visible
            .into_iter()
            .map(|view| (view.volume, view))
            .collect();
        let is_unknown = |volume: usize, sectors: std::ops::Range<u64>| {
            unknown.get(&volume).is_some_and(|ranges| {
                ranges
                    .iter()
                    .any(|range| range.start < sectors.end && sectors.start < range.end)
            })
        };
        let judged: Vec<u32> = self
            .open
            .iter()
            .copied()
            .filter(|id| {
                let write = &self.writes[id];
                self.volumes[write.volume].setup.owner == site
                    && views.contains_key(&write.volume)
                    && !is_unknown(write.volume, write.sectors())
            })
            .collect();
        // G4: durable writes survive.
        for id in &judged {
            let write = &self.writes[id];
            if write.durable && !self.present(&views, *id) {
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
        let mut seen = BTreeSet::new();
        for (volume, view) in &views {
            for (sector, version) in view.runs() {
                if is_unknown(*volume, sector..sector + 1) || !seen.insert(version) {
                    continue;
                }
                let write = &self.writes[&version];
                if write.finalized || is_unknown(write.volume, write.sectors()) {
                    continue;
                }
                if !self.present(&views, version) {
                    return Err(violation(
                        "G3",
                        format!("write {version} (volume {volume}) survived only in part"),
                    ));
                }
                let group = self.volumes[write.volume].setup.group;
                let entry = newest_issue.entry(group).or_insert(0);
                *entry = (*entry).max(write.issued);
            }
        }
        // Each volume's judged writes, in the order judged (oldest first):
        // filtering the whole list per volume cost a lookup per write and
        // volume, most of a recovery's check with a hundred volumes.
        let mut judged_by_volume: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for id in &judged {
            judged_by_volume
                .entry(self.writes[id].volume)
                .or_default()
                .push(*id);
        }
        for (volume, view) in &views {
            let group = self.volumes[*volume].setup.group;
            let Some(newest) = newest_issue.get(&group) else {
                continue;
            };
            let candidates = judged_by_volume
                .get(volume)
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .rev()
                .copied();
            if let Err(id) = self.check_order(view, candidates, *newest) {
                return Err(violation(
                    "G3",
                    format!(
                        "write {id} of group {group} is lost while a write issued after it was acknowledged survived (reordered)"
                    ),
                ));
            }
        }
        // The recovered image is the owner's truth from now on; what it
        // lacks is gone for good.
        self.adopt_image(judged, views, None, unknown);
        Ok(())
    }

    /// A recovered site that does not own these volumes' groups: its legs
    /// must each be a whole-delta prefix of the owner's history.
    pub fn after_replica_recovery(&self, site: usize, visible: Vec<View>) -> Result<(), Violation> {
        let mut by_group: BTreeMap<u32, Vec<View>> = BTreeMap::new();
        for view in visible {
            let group = self.volumes[view.volume].setup.group;
            by_group.entry(group).or_default().push(view);
        }
        for (group, views) in by_group {
            self.check_replica_views(&views, group, None)
                .map_err(|detail| {
                    violation("G3", format!("site {} after recovery: {detail}", site + 1))
                })?;
        }
        Ok(())
    }

    /// The prefix checks on part of a group's image at a site that does not
    /// own it; `read_issued`: the instant a snapshot read was issued, whose
    /// image may hold writes a failover judged lost after it.
    fn check_replica_views(
        &self,
        views: &[View],
        group: u32,
        read_issued: Option<u64>,
    ) -> Result<(), String> {
        let views: BTreeMap<usize, View> = views
            .iter()
            .map(|view| (view.volume, view.clone()))
            .collect();
        let mut newest = 0;
        let mut seen = BTreeSet::new();
        for (volume, view) in &views {
            for (sector, version) in view.runs() {
                if !seen.insert(version) {
                    continue;
                }
                let Some(write) = self.writes.get(&version) else {
                    return Err(format!(
                        "volume {volume} sector {sector} shows unknown write {version}"
                    ));
                };
                if write.volume != *volume || !write.covers(sector) {
                    return Err(format!(
                        "volume {volume} sector {sector} holds write {version}, which never covered it"
                    ));
                }
                let lost_after_read = read_issued.is_some_and(|issued| {
                    write
                        .lost_to_failover_at
                        .is_some_and(|lost_at| lost_at > issued)
                });
                if write.lost && !lost_after_read {
                    return Err(format!(
                        "volume {volume} sector {sector} shows write {version}, which its owner lost in a crash"
                    ));
                }
                if !self.present(&views, version) {
                    return Err(format!(
                        "write {version} (volume {volume}) is there only in part (a delta half-applied)"
                    ));
                }
                newest = newest.max(write.issued);
            }
        }
        for (volume, view) in &views {
            let candidates = self.volumes[*volume].writes.iter().rev().copied();
            if let Err(id) = self.check_order(view, candidates, newest) {
                let write = &self.writes[&id];
                return Err(format!(
                    "write {id} of group {group} (volume {}, sectors {}+{}) is missing while a write issued after it was acknowledged is there (a delta skipped or reordered)",
                    write.volume, write.first, write.count
                ));
            }
        }
        Ok(())
    }

    /// `group` failed over to site `to` without its owner (cut off): `views`
    /// are `to`'s images of every volume of the group, taken when it took
    /// over. They must be a whole-delta prefix of what the old owner
    /// acknowledged (G3), and hold every write promised to survive the
    /// loss of the owner's site when every other site offered its image
    /// (G4: such a write is in one other site's journal, and the newest
    /// image wins; a survivor that was down or mid-resync may hold it
    /// alone). They become the
    /// group's truth: the acknowledged writes they lack are lost to the
    /// failover, and their number is returned (the old owner must report a
    /// loss when it learns of the failover if it is not zero).
    pub fn after_failover(
        &mut self,
        group: u32,
        to: usize,
        views: Vec<View>,
        every_survivor_offered: bool,
    ) -> Result<u64, Violation> {
        self.check_replica_views(&views, group, None)
            .map_err(|detail| {
                violation(
                    "G3",
                    format!("site {} taking group {group} over: {detail}", to + 1),
                )
            })?;
        let views: BTreeMap<usize, View> =
            views.into_iter().map(|view| (view.volume, view)).collect();
        // Every write of the group not lost yet, also those an earlier
        // recovery of the old owner judged present: the new owner may
        // never have received them.
        let judged: Vec<u32> = views
            .keys()
            .flat_map(|volume| self.volumes[*volume].writes.iter().copied())
            .filter(|id| !self.writes[id].lost)
            .collect();
        if every_survivor_offered {
            for id in &judged {
                let write = &self.writes[id];
                if write.site_durable && !self.present(&views, *id) {
                    return Err(violation(
                        "G4",
                        format!(
                            "{} was acknowledged as surviving the loss of its owner's site, but site {} took group {group} over without it",
                            self.describe_write(*id),
                            to + 1
                        ),
                    ));
                }
            }
        }
        for volume in views.keys() {
            self.volumes[*volume].setup.owner = to;
        }
        let now = self.tick();
        Ok(self.adopt_image(judged, views, Some(now), &BTreeMap::new()))
    }

    /// A fast migration moved `group` to `to` before its image holds
    /// everything: judged once its copy ends ([`Checker::after_handover`]).
    pub fn owner_moved(&mut self, group: u32, to: usize) {
        let volumes: Vec<usize> = (0..self.volumes.len())
            .filter(|volume| self.volumes[*volume].setup.group == group)
            .collect();
        for volume in volumes {
            self.volumes[volume].setup.owner = to;
        }
    }

    /// A live migration switched `group` over to `to`, whose image (legs
    /// and cache) is `views`: a planned move loses nothing, so every write
    /// of the group the owner accepted and no failover lost must be in it
    /// (G4), and the image must be whole deltas (G3). `to` owns the group
    /// from now on.
    pub fn after_handover(
        &mut self,
        group: u32,
        to: usize,
        views: Vec<View>,
    ) -> Result<(), Violation> {
        self.check_replica_views(&views, group, None)
            .map_err(|detail| {
                violation(
                    "G3",
                    format!("site {} switching group {group} over: {detail}", to + 1),
                )
            })?;
        let views: BTreeMap<usize, View> =
            views.into_iter().map(|view| (view.volume, view)).collect();
        for volume in views.keys() {
            for id in &self.volumes[*volume].writes {
                let write = &self.writes[id];
                if write.lost || write.acked.is_none() || self.present(&views, *id) {
                    continue;
                }
                return Err(violation(
                    "G4",
                    format!(
                        "{} was accepted before group {group} switched over to site {} in a migration, which took it over without it",
                        self.describe_write(*id),
                        to + 1
                    ),
                ));
            }
        }
        for volume in views.keys() {
            self.volumes[*volume].setup.owner = to;
        }
        Ok(())
    }

    /// `views` become their volumes' truth (an owner's recovered image, or
    /// the image a failover starts from): each of the `judged` writes the
    /// owner can no longer apply later is settled as present or lost for
    /// good. Returns how many acknowledged writes are lost.
    /// `failover_at`: the instant of the failover whose image this is
    /// (`None` for an owner's recovery).
    fn adopt_image(
        &mut self,
        judged: Vec<u32>,
        views: BTreeMap<usize, View>,
        failover_at: Option<u64>,
        unknown: &BTreeMap<usize, Vec<std::ops::Range<u64>>>,
    ) -> u64 {
        let mut lost = 0;
        for id in judged {
            let present = self.present(&views, id);
            let write = self
                .writes
                .get_mut(&id)
                .expect("checker invariant: judged writes are recorded");
            if !write.settled {
                // Still on its way to the owner: it may land later (or, at
                // an owner whose lease ran out, fail).
                continue;
            }
            write.finalized = true;
            write.lost = !present;
            if write.lost && failover_at.is_some() {
                write.lost_to_failover_at = failover_at;
            }
            if write.lost && write.acked.is_some() {
                lost += 1;
                if write.forwarded {
                    self.remote_writes_lost += 1;
                }
            }
            self.open.remove(&id);
        }
        // Strict reads in flight may have been answered before.
        self.remember_straddling(&views);
        for (volume, view) in views {
            let model = &mut self.volumes[volume];
            let Some(ranges) = unknown.get(&volume) else {
                model.baseline.clone_from(&view.versions);
                model.sectors = view.versions;
                model.undurable.clear();
                self.maybe
                    .retain(|(maybe_volume, _), _| *maybe_volume != volume);
                continue;
            };
            // Sectors whose image is not here yet keep what the model
            // expects of them, and the writes that may still show there.
            let in_unknown = |sector: u64| ranges.iter().any(|range| range.contains(&sector));
            for (sector, version) in view.versions.iter().enumerate() {
                if !in_unknown(sector as u64) {
                    model.baseline[sector] = *version;
                    model.sectors[sector] = *version;
                }
            }
            model.undurable.clear();
            self.maybe
                .retain(|(maybe_volume, sector), _| *maybe_volume != volume || in_unknown(*sector));
        }
        lost
    }

    /// Strict reads in flight on volumes whose truth is about to change (an
    /// owner's recovery, a failover) may have been answered before: what
    /// each sector could show until now is kept for them.
    fn remember_straddling(&mut self, views: &BTreeMap<usize, View>) {
        for (request, (_, tracked)) in &self.in_flight {
            let Tracked::Read {
                volume,
                first,
                count,
            } = tracked
            else {
                continue;
            };
            if !views.contains_key(volume) {
                continue;
            }
            let before = self
                .straddling
                .entry(*request)
                .or_insert_with(|| vec![BTreeSet::new(); *count as usize]);
            for (index, sector) in (*first..first + count).enumerate() {
                before[index].insert(self.volumes[*volume].sectors[sector as usize]);
                if let Some(maybe) = self.maybe.get(&(*volume, sector)) {
                    before[index].extend(maybe);
                }
            }
        }
    }

    /// Writes of groups owned by `owner` that must survive the loss of its
    /// whole site.
    pub fn site_durable_writes(&self, owner: usize) -> Vec<u32> {
        self.writes
            .iter()
            .filter(|(_, write)| {
                write.site_durable && !write.lost && self.volumes[write.volume].setup.owner == owner
            })
            .map(|(id, _)| id)
            .collect()
    }

    /// Which of `writes` the decoded images of one site hold (each sector
    /// showing it or a newer version).
    pub fn present_at(&self, visible: &[View], writes: &[u32]) -> Vec<u32> {
        let views: BTreeMap<usize, View> = visible
            .iter()
            .map(|view| (view.volume, view.clone()))
            .collect();
        writes
            .iter()
            .copied()
            .filter(|id| views.contains_key(&self.writes[id].volume) && self.present(&views, *id))
            .collect()
    }

    /// Describes a write, for a violation.
    pub fn describe_write(&self, id: u32) -> String {
        let write = &self.writes[&id];
        format!(
            "write {id} (volume {}, sectors {}+{}{})",
            write.volume,
            write.first,
            write.count,
            if write.fua { ", FUA" } else { "" }
        )
    }

    /// At the end of a run, after the drain: the leg holds exactly the model.
    pub fn check_final(&self, volume: usize, image: &[u8]) -> Result<(), String> {
        for (sector, bytes) in image.chunks(SECTOR_BYTES as usize).enumerate() {
            let found = decode_sector(bytes, sector as u64);
            let expected = self.volumes[volume].sectors[sector];
            // A write that failed may have been applied all the same (its
            // owner's lease ran out before it could acknowledge it).
            if found != Some(expected) && !self.may_show(volume, sector as u64, found) {
                return Err(format!(
                    "after the drain, volume {volume} sector {sector} on the leg is {} but should be {}",
                    describe(found),
                    describe(Some(expected))
                ));
            }
        }
        Ok(())
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

/// Decodes whole sectors of `bytes`, the first of which is sector
/// `first_sector` of its volume, into `into` (one entry per sector): the
/// version each holds, `None` for bytes no write produces.
pub fn decode_sectors(bytes: &[u8], first_sector: u64, into: &mut [Option<u32>]) {
    for ((index, sector), decoded) in bytes
        .chunks(SECTOR_BYTES as usize)
        .enumerate()
        .zip(into.iter_mut())
    {
        *decoded = decode_sector(sector, first_sector + index as u64);
    }
}

/// The version a sector holds: Some(0) for zeros, Some(id) for a write's
/// pattern at this sector, None for anything else.
fn decode_sector(bytes: &[u8], sector: u64) -> Option<u32> {
    let first = u64::from_le_bytes(bytes[..8].try_into().expect("sector has 8 bytes"));
    // Every word equals the first exactly when the words equal themselves
    // shifted by one word: one memcmp instead of a loop over 64 words
    // (the checker decodes every leg at every restart and at the end).
    let words = &bytes[..bytes.len() / 8 * 8];
    if words[8..] != words[..words.len() - 8] {
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

#[cfg(test)]
mod tests;
