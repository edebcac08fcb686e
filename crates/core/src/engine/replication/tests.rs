//! Replication tests: exact messages for the basic steps, and two engines
//! wired through an in-memory network and disk for the end-to-end rules.

use bytes::Bytes;

use super::*;
use crate::site_message::Lane;

const A: SiteId = SiteId(1);
const B: SiteId = SiteId(2);
const VOLUME: VolumeId = VolumeId(1);
const GROUP: GroupId = GroupId(1);
const VOLUME_BYTES: u64 = 4 << 20;

fn config(site: SiteId, peer: SiteId) -> EngineConfig {
    EngineConfig {
        delta_interval_ms: 100,
        delta_max_bytes: 64 << 10,
        cache_bytes_max: 4 << 20,
        journal_checkpoint_bytes: 1 << 20,
        site,
        peers: vec![peer],
        backlog_bytes_max: 256 << 10,
        backlog_wait_ms_max: 2_000,
        ship_window_bytes_max: 32 << 20,
        // A fixed window unless a test says otherwise.
        ship_window_bytes_min: 32 << 20,
        remote_timeout_ms: 1_000,
        leases_enforced: false,
        suspend_hold_ms: 5_000,
        suspended_requests_max: 1024,
        region_blocks: REGION_BLOCKS,
        resync_chunks_in_flight_max: 4,
        read_lease_ms: 0,
        clock_drift_ppm: 1_000,
        read_lease_cooldown_ms: 10_000,
        read_leases_max: 1 << 20,
        planted_bug: None,
    }
}

fn block(byte: u8) -> Bytes {
    Bytes::from(vec![byte; BLOCK_SIZE])
}

/// One site: an engine whose disk completes every operation at once.
struct Site {
    engine: Engine,
    leg: BTreeMap<u64, Bytes>,
    replies: BTreeMap<RequestId, Result<Response, RequestError>>,
    next_request: u64,
    /// Journal records appended and not yet released.
    journal: Vec<DeltaRecord>,
    next_seq: DeltaSeq,
    /// The last dirty-region map saved for each other site.
    saved_maps: BTreeMap<SiteId, BTreeSet<(VolumeId, u64)>>,
    /// The groups last saved as mid-resync here.
    saved_marks: BTreeSet<GroupId>,
    /// How many times they were saved.
    marks_saves: u64,
    /// The regions each fast drain logged as copied.
    drain_log: BTreeMap<(GroupId, Epoch), BTreeSet<(VolumeId, u64)>>,
    /// The group's epoch history, told to the engine again at a restart
    /// (empty: none, the epoch rules are off).
    history: Vec<EpochStart>,
    /// Leg reads are held here, not completed (a slow disk).
    hold_leg_reads: bool,
    held_leg_reads: Vec<(IoId, u64, u64)>,
    /// Leg writes are held here, not completed (a slow disk).
    hold_leg_writes: bool,
    held_leg_writes: VecDeque<(IoId, Vec<(BlockKey, BlockImage)>)>,
}

impl Site {
    fn new(config: EngineConfig, mode: Mode, owner: SiteId) -> Self {
        Site::recovered(config, mode, owner, RecoveredState::default())
    }

    /// A site whose engine starts from `recovered` (a restart).
    fn recovered(
        config: EngineConfig,
        mode: Mode,
        owner: SiteId,
        recovered: RecoveredState,
    ) -> Self {
        let mut engine = Engine::new(config, recovered);
        engine.add_volume(
            VOLUME,
            VolumeSpec {
                size: VOLUME_BYTES,
                group: GROUP,
                mode,
            },
        );
        engine.set_owner(GROUP, owner, Epoch(1));
        Site {
            engine,
            leg: BTreeMap::new(),
            replies: BTreeMap::new(),
            next_request: 1,
            journal: Vec::new(),
            next_seq: DeltaSeq(1),
            saved_maps: BTreeMap::new(),
            saved_marks: BTreeSet::new(),
            marks_saves: 0,
            drain_log: BTreeMap::new(),
            history: Vec::new(),
            hold_leg_reads: false,
            held_leg_reads: Vec::new(),
            hold_leg_writes: false,
            held_leg_writes: VecDeque::new(),
        }
    }

    fn submit(&mut self, now: Timestamp, request: Request) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        self.engine.submit(now, id, request);
        id
    }

    fn leg_bytes(&self, offset: u64, length: u64) -> Bytes {
        let mut out = vec![0u8; length as usize];
        for (index, chunk) in out.chunks_mut(BLOCK_SIZE).enumerate() {
            let block = offset / BLOCK_SIZE as u64 + index as u64;
            if let Some(data) = self.leg.get(&block) {
                chunk.copy_from_slice(&data[..chunk.len()]);
            }
        }
        Bytes::from(out)
    }

    /// Runs disk actions to completion; returns the messages sent.
    fn run(&mut self) -> Vec<(SiteId, SiteMessage)> {
        let mut sent = Vec::new();
        while let Some(action) = self.engine.poll_action() {
            match action {
                Action::Send { peer, message } => sent.push((peer, message)),
                Action::Reply { request, result } => {
                    assert!(
                        self.replies.insert(request, result).is_none(),
                        "request {request} answered twice"
                    );
                }
                Action::ReadLeg {
                    io, offset, length, ..
                } if self.hold_leg_reads => self.held_leg_reads.push((io, offset, length)),
                Action::ReadLeg {
                    io, offset, length, ..
                } => {
                    let data = self.leg_bytes(offset, length);
                    self.engine.leg_read_done(io, Ok(data));
                }
                Action::AppendJournal { record } => {
                    // As recovery numbers a group: after its newest record.
                    self.next_seq = DeltaSeq(record.seq.0 + 1);
                    self.journal.push(record);
                }
                Action::ReleaseJournal { upto } => {
                    self.journal.retain(|record| record.position > upto);
                }
                Action::SaveDirtyMap { io, peer, regions } => {
                    self.saved_maps.insert(peer, regions.into_iter().collect());
                    self.engine.dirty_map_saved(io, Ok(()));
                }
                Action::SaveResyncMarks { io, groups } => {
                    self.marks_saves += 1;
                    self.saved_marks = groups.into_iter().collect();
                    self.engine.resync_marks_saved(io, Ok(()));
                }
                Action::SaveFastDrain {
                    io,
                    group,
                    epoch,
                    regions,
                } => {
                    self.drain_log
                        .entry((group, epoch))
                        .or_default()
                        .extend(regions);
                    self.engine.fast_drain_saved(io, Ok(()));
                }
                Action::SyncJournal { io, .. } => self.engine.journal_synced(io, Ok(())),
                Action::WriteLeg { io, blocks, .. } if self.hold_leg_writes => {
                    self.held_leg_writes.push_back((io, blocks));
                }
                Action::WriteLeg { io, blocks, .. } => {
                    for (key, image) in blocks {
                        self.leg.insert(key.block, image.to_bytes());
                    }
                    self.engine.leg_written(io, Ok(()));
                }
                Action::SyncLegs { io, .. } => self.engine.legs_synced(io, Ok(())),
            }
        }
        sent
    }

    /// Completes the oldest leg write held; returns the messages sent.
    fn finish_held_leg_write(&mut self) -> Vec<(SiteId, SiteMessage)> {
        let (io, blocks) = self
            .held_leg_writes
            .pop_front()
            .expect("a leg write is held");
        for (key, image) in blocks {
            self.leg.insert(key.block, image.to_bytes());
        }
        self.engine.leg_written(io, Ok(()));
        self.run()
    }

    fn reply(&self, request: RequestId) -> Option<&Result<Response, RequestError>> {
        self.replies.get(&request)
    }

    fn read_reply(&self, request: RequestId) -> Bytes {
        match self.reply(request) {
            Some(Ok(Response::Data(data))) => data.clone(),
            other => panic!("read {request} answered {other:?}"),
        }
    }
}

/// Both legs hold the same bytes (an absent block reads as zeros); names
/// the blocks that differ rather than printing megabytes.
fn assert_legs_equal(pair: &Pair) {
    let zero = Bytes::from(vec![0u8; BLOCK_SIZE]);
    let blocks: BTreeSet<u64> = pair
        .a
        .leg
        .keys()
        .chain(pair.b.leg.keys())
        .copied()
        .collect();
    let differing: Vec<u64> = blocks
        .into_iter()
        .filter(|block| {
            pair.a.leg.get(block).unwrap_or(&zero) != pair.b.leg.get(block).unwrap_or(&zero)
        })
        .collect();
    assert!(differing.is_empty(), "legs differ at blocks {differing:?}");
}

/// Two sites and the messages in flight between them, per direction.
struct Pair {
    a: Site,
    b: Site,
    to_a: VecDeque<SiteMessage>,
    to_b: VecDeque<SiteMessage>,
    /// Messages of this lane towards b are held back (a slow stream).
    hold_group_lane_to_b: bool,
    connected: bool,
    now: Timestamp,
}

impl Pair {
    fn new(mode: Mode) -> Self {
        Pair::with_configs(mode, config(A, B), config(B, A))
    }

    fn with_configs(mode: Mode, config_a: EngineConfig, config_b: EngineConfig) -> Self {
        let mut pair = Pair {
            a: Site::new(config_a, mode, A),
            b: Site::new(config_b, mode, A),
            to_a: VecDeque::new(),
            to_b: VecDeque::new(),
            hold_group_lane_to_b: false,
            connected: false,
            now: Timestamp(0),
        };
        pair.connect();
        pair
    }

    fn connect(&mut self) {
        self.connected = true;
        self.a.engine.peer_up(self.now, B);
        self.b.engine.peer_up(self.now, A);
        self.settle();
    }

    /// Site a restarts from what it made durable: its leg, its journal
    /// (replayed), its saved maps. (The in-memory disk makes everything
    /// durable at once, so nothing is lost.)
    fn restart_a(&mut self) {
        self.restart_a_alone();
        self.connect();
    }

    /// Site a restarts as in [`Pair::restart_a`]; b stays away.
    fn restart_a_alone(&mut self) {
        self.disconnect();
        let replayed: BTreeSet<(VolumeId, u64)> = self
            .a
            .journal
            .iter()
            .flat_map(|record| {
                record
                    .blocks
                    .iter()
                    .map(|(key, _)| region_of(key, REGION_BLOCKS))
            })
            .collect();
        for record in std::mem::take(&mut self.a.journal) {
            for (key, image) in record.blocks {
                self.a.leg.insert(key.block, image.to_bytes());
            }
        }
        let recovered = RecoveredState {
            next_position: JournalPosition(1_000),
            next_seq: [(GROUP, self.a.next_seq)].into(),
            ..RecoveredState::default()
        };
        let mode = self
            .a
            .engine
            .volume(VOLUME)
            .map_or(Mode::Async, |spec| spec.mode);
        let mut engine = Engine::new(self.a.engine.config().clone(), recovered);
        engine.add_volume(
            VOLUME,
            VolumeSpec {
                size: VOLUME_BYTES,
                group: GROUP,
                mode,
            },
        );
        if !self.a.history.is_empty() {
            engine.set_epoch_history(GROUP, self.a.history.clone());
        }
        let epoch = self.a.history.last().map_or(Epoch(1), |start| start.epoch);
        engine.set_owner(GROUP, A, epoch);
        engine.restore_dirty_map(B, self.a.saved_maps.get(&B).cloned(), &replayed);
        self.a.engine = engine;
    }

    fn disconnect(&mut self) {
        self.connected = false;
        self.to_a.clear();
        self.to_b.clear();
        self.a.engine.peer_down(self.now, B);
        self.b.engine.peer_down(self.now, A);
        self.settle();
    }

    fn tick(&mut self, millis: u64) {
        self.now = self.now.saturating_add_millis(millis);
        self.a.engine.handle_timeout(self.now);
        self.b.engine.handle_timeout(self.now);
        self.settle();
    }

    /// Delivers messages until nothing moves.
    fn settle(&mut self) {
        loop {
            for (peer, message) in self.a.run() {
                assert_eq!(peer, B);
                if self.connected {
                    self.to_b.push_back(message);
                }
            }
            for (peer, message) in self.b.run() {
                assert_eq!(peer, A);
                if self.connected {
                    self.to_a.push_back(message);
                }
            }
            let mut moved = false;
            if let Some(message) = self.to_a.pop_front() {
                self.a.engine.receive(self.now, B, message);
                moved = true;
            }
            let deliverable = self.to_b.iter().position(|message| {
                !(self.hold_group_lane_to_b && message.lane() != Lane::Request)
            });
            if let Some(index) = deliverable {
                let message = self.to_b.remove(index).expect("index is in range");
                self.b.engine.receive(self.now, A, message);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    /// Adds an async `volume` of `size` bytes in `group` at both sites;
    /// with `owner`, both take that site for the group's owner at epoch 1.
    fn add_volume_at_both(
        &mut self,
        volume: VolumeId,
        size: u64,
        group: GroupId,
        owner: Option<SiteId>,
    ) {
        for site in [&mut self.a, &mut self.b] {
            site.engine.add_volume(
                volume,
                VolumeSpec {
                    size,
                    group,
                    mode: Mode::Async,
                },
            );
            if let Some(owner) = owner {
                site.engine.set_owner(group, owner, Epoch(1));
            }
        }
    }

    fn write(&mut self, at_b: bool, offset: u64, data: Bytes) -> RequestId {
        let now = self.now;
        let site = if at_b { &mut self.b } else { &mut self.a };
        let request = site.submit(
            now,
            Request::Write {
                volume: VOLUME,
                offset,
                data,
                fua: false,
            },
        );
        self.settle();
        request
    }

    fn read(&mut self, at_b: bool, snapshot: bool, offset: u64, length: u64) -> RequestId {
        let now = self.now;
        let site = if at_b { &mut self.b } else { &mut self.a };
        let request = if snapshot {
            Request::ReadSnapshot {
                volume: VOLUME,
                offset,
                length,
            }
        } else {
            Request::Read {
                volume: VOLUME,
                offset,
                length,
            }
        };
        let id = site.submit(now, request);
        self.settle();
        id
    }
}

/// The regions `engine` asks its leg to read (a resync's), in order of
/// region number.
fn regions_read_by(engine: &mut Engine) -> BTreeSet<u64> {
    std::iter::from_fn(|| engine.poll_action())
        .filter_map(|action| match action {
            Action::ReadLeg { offset, .. } => Some(offset / (REGION_BLOCKS * BLOCK_SIZE as u64)),
            _ => None,
        })
        .collect()
}

impl Pair {
    /// a writes 512 KiB of 6s over region 0, a delta each 100 ms: with b
    /// away, that passes the backlog bound and b is marked for region 0.
    fn fill_region_zero_at_a(&mut self) {
        let big = Bytes::from(vec![6u8; 64 << 10]);
        for index in 0..8u64 {
            self.write(false, index * (64 << 10), big.clone());
            self.tick(100);
        }
    }

    /// As [`Pair::fill_region_zero_at_a`], then block 768 (region 3) as
    /// 8s: b, away, is marked for regions 0 and 3.
    fn fill_regions_zero_and_three_at_a(&mut self) {
        self.fill_region_zero_at_a();
        self.write(false, 3 << 20, block(8));
        self.tick(100);
    }
}

/// An engine at a owning the group of one async volume (b not connected).
fn owner_engine() -> Engine {
    let mut engine = Engine::new(config(A, B), RecoveredState::default());
    engine.add_volume(
        VOLUME,
        VolumeSpec {
            size: VOLUME_BYTES,
            group: GROUP,
            mode: Mode::Async,
        },
    );
    engine.set_owner(GROUP, A, Epoch(1));
    engine
}

#[test]
fn an_owner_ships_a_delta_only_after_its_journal_holds_it() {
    let mut engine = owner_engine();
    engine.peer_up(Timestamp(0), B);
    engine.receive(
        Timestamp(0),
        B,
        SiteMessage::Resume {
            group: GROUP,
            have: Some(DeltaSeq(0)),
            have_epoch: None,
            lost_regions: None,
            resume: 1,
        },
    );
    assert_eq!(engine.poll_action(), None);
    engine.submit(
        Timestamp(0),
        RequestId(1),
        Request::Write {
            volume: VOLUME,
            offset: 0,
            data: block(7),
            fua: true,
        },
    );
    let record = DeltaRecord {
        position: JournalPosition(1),
        group: GROUP,
        epoch: Epoch(1),
        seq: DeltaSeq(1),
        blocks: vec![(
            BlockKey {
                volume: VOLUME,
                block: 0,
            },
            BlockImage::Data(block(7)),
        )],
    };
    let actions: Vec<Action> = std::iter::from_fn(|| engine.poll_action()).collect();
    assert_eq!(
        actions,
        vec![
            Action::AppendJournal {
                record: record.clone()
            },
            Action::SyncJournal {
                io: IoId(1),
                upto: JournalPosition(1)
            },
        ]
    );
    engine.journal_synced(IoId(1), Ok(()));
    let actions: Vec<Action> = std::iter::from_fn(|| engine.poll_action()).collect();
    assert_eq!(
        actions,
        vec![
            Action::Reply {
                request: RequestId(1),
                result: Ok(Response::Done)
            },
            Action::WriteLeg {
                io: IoId(2),
                group: GROUP,
                seq: DeltaSeq(1),
                blocks: record.blocks.clone(),
            },
            Action::Send {
                peer: B,
                message: SiteMessage::Delta(record),
            },
        ]
    );
}

#[test]
fn a_replica_journals_acknowledges_and_applies_a_delta_in_order() {
    let mut engine = Engine::new(config(B, A), RecoveredState::default());
    engine.add_volume(
        VOLUME,
        VolumeSpec {
            size: VOLUME_BYTES,
            group: GROUP,
            mode: Mode::Async,
        },
    );
    engine.set_owner(GROUP, A, Epoch(1));
    engine.peer_up(Timestamp(0), A);
    assert_eq!(
        engine.poll_action(),
        Some(Action::Send {
            peer: A,
            message: SiteMessage::Resume {
                group: GROUP,
                have: Some(DeltaSeq(0)),
                have_epoch: None,
                lost_regions: None,
                resume: 0,
            }
        })
    );
    let blocks = vec![(
        BlockKey {
            volume: VOLUME,
            block: 3,
        },
        BlockImage::Data(block(9)),
    )];
    let delta = |seq: u64| DeltaRecord {
        position: JournalPosition(0),
        group: GROUP,
        epoch: Epoch(1),
        seq: DeltaSeq(seq),
        blocks: blocks.clone(),
    };
    // A delta whose predecessor is missing is refused and the replica asks
    // again from what it holds.
    engine.receive(Timestamp(0), A, SiteMessage::Delta(delta(2)));
    assert_eq!(
        engine.poll_action(),
        Some(Action::Send {
            peer: A,
            message: SiteMessage::Resume {
                group: GROUP,
                have: Some(DeltaSeq(0)),
                have_epoch: None,
                lost_regions: None,
                resume: 1,
            }
        })
    );
    assert_eq!(engine.poll_action(), None);
    assert_eq!(engine.stats().refused_messages_total, 1);
    assert_eq!(engine.marks().count(Mark::DeltaGapRefused), 1);
    assert_eq!(engine.stats().received_deltas_total, 0);
    engine.receive(Timestamp(0), A, SiteMessage::Delta(delta(1)));
    assert_eq!(engine.stats().received_deltas_total, 1);
    assert_eq!(engine.stats().received_bytes_total, 4096);
    let journaled = DeltaRecord {
        position: JournalPosition(1),
        ..delta(1)
    };
    let actions: Vec<Action> = std::iter::from_fn(|| engine.poll_action()).collect();
    assert_eq!(
        actions,
        vec![
            Action::AppendJournal { record: journaled },
            Action::SyncJournal {
                io: IoId(1),
                upto: JournalPosition(1)
            },
        ]
    );
    engine.journal_synced(IoId(1), Ok(()));
    let actions: Vec<Action> = std::iter::from_fn(|| engine.poll_action()).collect();
    assert_eq!(
        actions,
        vec![
            Action::WriteLeg {
                io: IoId(2),
                group: GROUP,
                seq: DeltaSeq(1),
                blocks: blocks.clone(),
            },
            Action::Send {
                peer: A,
                message: SiteMessage::Journaled {
                    group: GROUP,
                    seq: DeltaSeq(1)
                }
            },
        ]
    );
    engine.leg_written(IoId(2), Ok(()));
    assert_eq!(
        engine.poll_action(),
        Some(Action::Send {
            peer: A,
            message: SiteMessage::Applied {
                group: GROUP,
                seq: DeltaSeq(1)
            }
        })
    );
}

/// Progress and resumes from a site that is not a peer of the group are
/// refused and counted, and change nothing.
#[test]
fn replication_messages_from_a_site_that_is_no_peer_are_refused() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    let stranger = SiteId(9);
    let before = pair.a.engine.replication_status();
    for message in [
        SiteMessage::Journaled {
            group: GROUP,
            seq: DeltaSeq(1),
        },
        SiteMessage::Applied {
            group: GROUP,
            seq: DeltaSeq(1),
        },
        SiteMessage::Resume {
            group: GROUP,
            have: Some(DeltaSeq(1)),
            have_epoch: None,
            lost_regions: None,
            resume: 1,
        },
    ] {
        pair.a.engine.receive(pair.now, stranger, message);
    }
    assert!(pair.a.run().is_empty(), "nothing sent to a stranger");
    assert_eq!(pair.a.engine.stats().refused_messages_total, 3);
    assert_eq!(pair.a.engine.replication_status(), before);
}

#[test]
fn deltas_reach_the_other_leg_and_retire_there() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.write(false, 8192, block(2));
    pair.tick(100);
    assert_eq!(pair.b.leg.get(&0), Some(&block(1)));
    assert_eq!(pair.b.leg.get(&2), Some(&block(2)));
    assert_legs_equal(&pair);
    let stats = pair.a.engine.stats();
    assert_eq!(
        stats.backlog_bytes, 0,
        "every site applied: nothing retained"
    );
    assert_eq!(stats.shipped_deltas_total, 1);
    // The delta's two data blocks.
    assert_eq!(stats.shipped_bytes_total, 2 * 4096);
    // b's acknowledgements (journaled, applied) name the delta shipped:
    // none is refused.
    assert_eq!(stats.refused_messages_total, 0);
    let status = pair.a.engine.replication_status();
    assert_eq!(status[0].peers[0].applied, DeltaSeq(1));
    assert_eq!(status[0].peers[0].state, PeerState::Streaming);
}

#[test]
fn a_strict_read_at_the_replica_sees_writes_its_leg_does_not_hold_yet() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.hold_group_lane_to_b = true;
    pair.write(false, 0, block(2));
    pair.write(false, 4096, block(3));
    // Still in the owner's open delta: nothing shipped.
    let strict = pair.read(true, false, 0, 3 * 4096);
    let data = pair.b.read_reply(strict);
    assert_eq!(&data[..4096], &block(2)[..]);
    assert_eq!(&data[4096..8192], &block(3)[..]);
    assert_eq!(&data[8192..], &[0u8; 4096][..]);
    // The snapshot read serves the last whole delta held locally.
    let snapshot = pair.read(true, true, 0, 2 * 4096);
    let data = pair.b.read_reply(snapshot);
    assert_eq!(&data[..4096], &block(1)[..]);
    assert_eq!(&data[4096..], &[0u8; 4096][..]);
    assert_eq!(pair.b.leg.get(&0), Some(&block(1)));
    pair.hold_group_lane_to_b = false;
    pair.tick(100);
    assert_legs_equal(&pair);
}

#[test]
fn a_strict_read_ships_only_blocks_newer_than_the_replica_holds() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.write(false, 4096, block(1));
    pair.tick(100);
    pair.hold_group_lane_to_b = true;
    pair.write(false, 4096, block(5));
    let strict = pair.b.submit(
        pair.now,
        Request::Read {
            volume: VOLUME,
            offset: 0,
            length: 8192,
        },
    );
    let sent = pair.b.run();
    let [(peer, SiteMessage::ReadRequest { id, have, .. })] = sent.as_slice() else {
        panic!("expected one read request, got {sent:?}");
    };
    assert_eq!((*peer, *have), (A, Some(DeltaSeq(1))));
    pair.a.engine.receive(pair.now, B, sent[0].1.clone());
    let answer = pair.a.run();
    assert_eq!(
        answer,
        vec![(
            B,
            SiteMessage::ReadReply {
                id: *id,
                result: Ok(vec![(
                    BlockKey {
                        volume: VOLUME,
                        block: 1
                    },
                    BlockImage::Data(block(5))
                )])
            }
        )]
    );
    pair.b.engine.receive(pair.now, A, answer[0].1.clone());
    pair.b.run();
    let data = pair.b.read_reply(strict);
    assert_eq!(&data[..4096], &block(1)[..]);
    assert_eq!(&data[4096..], &block(5)[..]);
}

#[test]
fn a_write_at_the_replica_is_forwarded_to_the_owner() {
    let mut pair = Pair::new(Mode::Async);
    let write = pair.write(true, 4096, block(4));
    assert_eq!(pair.b.reply(write), Some(&Ok(Response::Done)));
    let read = pair.read(false, false, 4096, 4096);
    assert_eq!(pair.a.read_reply(read), block(4));
    pair.tick(100);
    assert_eq!(pair.b.leg.get(&1), Some(&block(4)));
    assert_eq!(pair.b.engine.stats().forwarded_total, 1);
}

/// A strict read from a site that names no delta it holds (mid-resync, or
/// holding deltas a failover discarded) gets the whole range, read from
/// the owner's leg where its cache does not hold the blocks.
#[test]
fn a_strict_read_naming_no_delta_gets_the_whole_range_from_the_owners_leg() {
    let mut pair = Pair::new(Mode::Async);
    pair.a.leg.insert(2, block(5));
    pair.a.leg.insert(3, block(6));
    pair.a.engine.receive(
        pair.now,
        B,
        SiteMessage::ReadRequest {
            id: 41,
            request: Request::Read {
                volume: VOLUME,
                offset: 3 * 4096,
                length: 4096,
            },
            have: None,
        },
    );
    let sent = pair.a.run();
    assert_eq!(
        sent,
        vec![(
            B,
            SiteMessage::ReadReply {
                id: 41,
                result: Ok(vec![(
                    BlockKey {
                        volume: VOLUME,
                        block: 3
                    },
                    BlockImage::Data(block(6))
                )]),
            }
        )]
    );
    assert_eq!(pair.a.engine.marks().count(Mark::StrictReadWholeRange), 1);
}

/// How many read replies `sent` holds.
fn read_replies(sent: Vec<(SiteId, SiteMessage)>) -> usize {
    sent.into_iter()
        .filter(|(_, message)| matches!(message, SiteMessage::ReadReply { .. }))
        .count()
}

impl Pair {
    /// b receives `count` strict reads of block 0 from a, numbered from
    /// `first_id` (not run: the caller looks at what b sends).
    fn read_requests_from_a_at_b(&mut self, first_id: u64, count: u64) {
        for id in first_id..first_id + count {
            self.b.engine.receive(
                self.now,
                A,
                SiteMessage::ReadRequest {
                    id,
                    request: Request::Read {
                        volume: VOLUME,
                        offset: 0,
                        length: 4096,
                    },
                    have: None,
                },
            );
        }
    }
}

/// Requests held until this site learns it owns the group leave the
/// bound's count when they are served: after thousands were held and
/// served, as many more are held again rather than refused.
#[test]
fn requests_served_after_awaiting_ownership_leave_room_for_as_many_more() {
    let mut pair = Pair::new(Mode::Async);
    let held_round = |pair: &mut Pair, first_id: u64, count: u64| {
        pair.read_requests_from_a_at_b(first_id, count);
        read_replies(pair.b.run())
    };
    // b still takes a for the owner: a sends these only because it handed
    // the group to b, so b holds them.
    assert_eq!(held_round(&mut pair, 1, 3_000), 0, "held, not refused");
    pair.b.engine.set_owner(GROUP, B, Epoch(2));
    assert_eq!(
        read_replies(pair.b.run()),
        3_000,
        "served once b owns the group"
    );
    pair.b.engine.set_owner(GROUP, A, Epoch(3));
    pair.b.run();
    // Up to the bound (4,096), none of the first round counted still.
    assert_eq!(
        held_round(&mut pair, 10_000, 4_096),
        0,
        "held again, not refused"
    );
    assert_eq!(pair.b.engine.marks().count(Mark::AwaitedOwnership), 7_096);
}

#[test]
fn an_unreachable_owner_fails_strict_reads_after_the_timeout_but_not_snapshots() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    let strict = pair.read(true, false, 0, 4096);
    let write = pair.write(true, 0, block(2));
    let snapshot = pair.read(true, true, 0, 4096);
    assert_eq!(pair.b.read_reply(snapshot), block(1));
    assert_eq!(pair.b.reply(strict), None);
    pair.tick(999);
    assert_eq!(pair.b.reply(strict), None);
    pair.tick(1);
    assert!(matches!(
        pair.b.reply(strict),
        Some(Err(RequestError::Io(_)))
    ));
    assert!(matches!(
        pair.b.reply(write),
        Some(Err(RequestError::Io(_)))
    ));
    let stats = pair.b.engine.stats();
    assert_eq!(
        (stats.remote_reads_total, stats.remote_timeouts_total),
        (1, 2)
    );
}

#[test]
fn flush_sync_waits_for_the_other_sites_journal() {
    let mut pair = Pair::new(Mode::FlushSync);
    pair.hold_group_lane_to_b = true;
    pair.write(false, 0, block(1));
    let flush = pair.a.submit(pair.now, Request::Flush { volume: VOLUME });
    pair.settle();
    assert_eq!(pair.a.reply(flush), None, "no other site holds it yet");
    pair.hold_group_lane_to_b = false;
    pair.settle();
    assert_eq!(pair.a.reply(flush), Some(&Ok(Response::Done)));
}

#[test]
fn async_flush_does_not_wait_for_the_other_site() {
    let mut pair = Pair::new(Mode::Async);
    pair.hold_group_lane_to_b = true;
    pair.write(false, 0, block(1));
    let flush = pair.a.submit(pair.now, Request::Flush { volume: VOLUME });
    pair.settle();
    assert_eq!(pair.a.reply(flush), Some(&Ok(Response::Done)));
}

#[test]
fn the_planted_flush_sync_bug_answers_before_the_other_site() {
    let mut config_a = config(A, B);
    config_a.planted_bug = Some(PlantedBug::FlushSyncLocalOnly);
    let mut pair = Pair::with_configs(Mode::FlushSync, config_a, config(B, A));
    pair.hold_group_lane_to_b = true;
    pair.write(false, 0, block(1));
    let flush = pair.a.submit(pair.now, Request::Flush { volume: VOLUME });
    pair.settle();
    assert_eq!(pair.a.reply(flush), Some(&Ok(Response::Done)));
}

#[test]
fn sync_mode_writes_wait_for_the_other_site() {
    let mut pair = Pair::new(Mode::Sync);
    pair.hold_group_lane_to_b = true;
    let write = pair.write(false, 0, block(1));
    assert_eq!(pair.a.reply(write), None);
    pair.hold_group_lane_to_b = false;
    pair.settle();
    assert_eq!(pair.a.reply(write), Some(&Ok(Response::Done)));
}

#[test]
fn a_slow_connected_site_throttles_writes_past_the_backlog_bound() {
    let mut pair = Pair::new(Mode::Async);
    pair.hold_group_lane_to_b = true;
    // 64 blocks per delta (256 KiB): the second full delta passes the bound.
    let big = Bytes::from(vec![3u8; 64 << 10]);
    let mut requests = Vec::new();
    for index in 0..8u64 {
        requests.push(pair.write(false, index * (64 << 10), big.clone()));
    }
    let answered = |pair: &Pair| {
        requests
            .iter()
            .filter(|request| pair.a.reply(**request).is_some())
            .count()
    };
    assert!(
        answered(&pair) < 8,
        "the backlog bound must hold writes back"
    );
    let stats = pair.a.engine.stats();
    assert!(stats.backlog_throttled_total > 0);
    assert_eq!(stats.throttled_writes_total, stats.backlog_throttled_total);
    pair.hold_group_lane_to_b = false;
    pair.tick(100);
    pair.tick(100);
    assert_eq!(answered(&pair), 8);
    assert_legs_equal(&pair);
}

#[test]
fn a_site_away_past_the_backlog_bound_is_resynced_by_region_on_return() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    // 1.5 MiB of writes in two separate 1 MiB regions while b is away.
    let big = Bytes::from(vec![6u8; 64 << 10]);
    for index in 0..16u64 {
        pair.write(false, index * (64 << 10), big.clone());
        pair.tick(100);
    }
    pair.write(false, 3 << 20, block(8));
    pair.tick(100);
    let status = pair.a.engine.replication_status();
    assert_eq!(status[0].peers[0].state, PeerState::NeedsResync);
    assert_eq!(pair.a.engine.stats().backlog_folds_total, 1);
    assert_eq!(pair.a.engine.marks().count(Mark::FoldAbsent), 1);
    assert_eq!(
        pair.a.engine.stats().backlog_bytes,
        0,
        "writes never waited on b"
    );
    assert_eq!(
        pair.a.engine.stats().resync_regions_left,
        2,
        "regions 0 and 3 are left to copy"
    );
    pair.connect();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    let status = pair.a.engine.replication_status();
    assert_eq!(status[0].peers[0].state, PeerState::Streaming);
    assert!(pair.b.engine.replication_status()[0].consistent);
    // Regions 0 and 3 were written; 1 and 2 never: 2 regions copied.
    assert_eq!(pair.a.engine.stats().resync_regions_done_total, 2);
    // Back to deltas.
    pair.write(false, 4096, block(9));
    pair.tick(100);
    assert_eq!(pair.b.leg.get(&1), Some(&block(9)));
}

#[test]
fn the_bytes_written_and_applied_are_counted_for_a_migrations_rates() {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.write(false, 4096, block(2));
    pair.write(false, 8192, block(3));
    pair.tick(100);
    let status = pair.a.engine.replication_status();
    assert_eq!(status[0].closed_bytes_total, 3 * 4096);
    assert_eq!(status[0].peers[0].applied_bytes_total, 0);
    assert_eq!(status[0].peers[0].unapplied_bytes, 3 * 4096);
    pair.connect();
    pair.tick(100);
    let status = pair.a.engine.replication_status();
    assert_eq!(status[0].peers[0].applied_bytes_total, 3 * 4096);
    assert_eq!(status[0].peers[0].unapplied_bytes, 0);
    // An acknowledgement repeated (or older) counts nothing again.
    pair.a.engine.receive(
        pair.now,
        B,
        SiteMessage::Applied {
            group: status[0].group,
            seq: status[0].peers[0].applied,
        },
    );
    let again = pair.a.engine.replication_status();
    assert_eq!(again[0].peers[0].applied_bytes_total, 3 * 4096);
    // A replica counts no write of its own.
    assert_eq!(pair.b.engine.replication_status()[0].closed_bytes_total, 0);
}

#[test]
fn the_owner_counts_requests_by_the_site_they_came_from() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.read(false, false, 0, 4096);
    // At the replica: a forwarded write and a strict read the owner
    // answers; a snapshot read there never reaches the owner.
    pair.write(true, 4096, block(2));
    pair.tick(100);
    pair.hold_group_lane_to_b = true;
    pair.write(false, 8192, block(3));
    pair.read(true, false, 0, 3 * 4096);
    pair.read(true, true, 0, 4096);
    pair.hold_group_lane_to_b = false;
    pair.tick(100);
    let status = pair.a.engine.replication_status();
    assert_eq!(status[0].requests_by_site, BTreeMap::from([(A, 3), (B, 2)]));
    assert!(
        pair.b.engine.replication_status()[0]
            .requests_by_site
            .is_empty()
    );
}

#[test]
fn a_site_away_briefly_catches_up_from_retained_deltas() {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.write(false, 0, block(2));
    pair.write(false, 4096, block(3));
    pair.tick(100);
    assert_eq!(pair.a.engine.stats().backlog_deltas, 2);
    pair.connect();
    pair.tick(100);
    assert_legs_equal(&pair);
    assert_eq!(pair.a.engine.stats().resync_regions_done_total, 0);
    assert_eq!(pair.a.engine.stats().backlog_deltas, 0);
}

#[test]
fn writes_during_a_resync_still_converge() {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    let big = Bytes::from(vec![6u8; 64 << 10]);
    for index in 0..6u64 {
        pair.write(false, index * (64 << 10), big.clone());
        pair.tick(100);
    }
    pair.connect();
    // New writes interleave with chunks before anything settles further.
    for index in 0..4u64 {
        pair.write(false, index * 4096, block(20 + index as u8));
        pair.tick(30);
    }
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    assert!(pair.b.engine.replication_status()[0].consistent);
}

#[test]
fn a_resync_chunk_after_deltas_of_its_resync_is_journaled_as_the_newest_delta() {
    // Recovery numbers a group after its newest journal record (a first
    // chunk may take the numbering down). Chunks of one resync all start
    // from its base, and deltas past the base follow the first chunk on
    // the stream: a later chunk's record must name the newest delta taken
    // since, or b, restarted after it, numbers the group back at the base
    // and takes those deltas again over the chunks that followed them.
    let config_a = EngineConfig {
        region_blocks: 16,
        ..config(A, B)
    };
    let config_b = EngineConfig {
        region_blocks: 16,
        ..config(B, A)
    };
    let mut pair = Pair::with_configs(Mode::Async, config_a, config_b);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    // Past the backlog bound while b is away: eight regions to copy.
    pair.fill_region_zero_at_a();
    pair.tick(100);
    assert_eq!(
        pair.a.engine.replication_status()[0].peers[0].state,
        PeerState::NeedsResync
    );
    // The first window of chunks, then a delta, wait on the stream.
    pair.hold_group_lane_to_b = true;
    pair.connect();
    pair.write(false, 1 << 20, block(2));
    pair.tick(100);
    pair.hold_group_lane_to_b = false;
    pair.settle();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    assert!(pair.b.engine.replication_status()[0].consistent);
    let seqs: Vec<u64> = pair.b.journal.iter().map(|record| record.seq.0).collect();
    assert!(
        seqs.windows(2).all(|pair| pair[0] <= pair[1]),
        "b's numbering went back: {seqs:?}"
    );
    assert_eq!(
        pair.b.next_seq, pair.b.engine.groups[&GROUP].next_seq,
        "{seqs:?}"
    );
}

#[test]
fn a_replica_refuses_deltas_from_a_site_that_does_not_own_the_group() {
    let mut pair = Pair::new(Mode::Async);
    let forged = DeltaRecord {
        position: JournalPosition(0),
        group: GROUP,
        epoch: Epoch(1),
        seq: DeltaSeq(1),
        blocks: vec![(
            BlockKey {
                volume: VOLUME,
                block: 0,
            },
            BlockImage::Data(block(66)),
        )],
    };
    pair.b
        .engine
        .receive(pair.now, SiteId(9), SiteMessage::Delta(forged));
    pair.settle();
    assert_eq!(pair.b.engine.stats().refused_messages_total, 1);
    assert!(pair.b.leg.is_empty());
}

#[test]
fn ownership_moves_after_the_new_owner_holds_every_delta() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.a
        .engine
        .hand_over(pair.now, GROUP)
        .expect("a owns the group");
    // Writes are held at a from now on; reads still answer.
    let held = pair.write(false, 4096, block(2));
    assert_eq!(pair.a.reply(held), None);
    let read = pair.read(false, false, 0, 4096);
    assert_eq!(pair.a.read_reply(read), block(1));
    pair.settle();
    assert!(pair.a.engine.hand_over_ready(GROUP, B));
    // The new owner first, then the old one: never two owners at once.
    pair.b.engine.set_owner(GROUP, B, Epoch(2));
    pair.settle();
    pair.a.engine.set_owner(GROUP, B, Epoch(2));
    pair.settle();
    assert_eq!(pair.a.reply(held), Some(&Ok(Response::Done)));
    let at_b = pair.write(true, 8192, block(3));
    assert_eq!(pair.b.reply(at_b), Some(&Ok(Response::Done)));
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    assert_eq!(pair.a.leg.get(&1), Some(&block(2)));
    assert_eq!(pair.a.leg.get(&2), Some(&block(3)));
    assert_eq!(pair.a.engine.stats().forwarded_total, 1);
}

#[test]
fn requests_the_old_owner_sends_before_the_new_owner_learns_of_the_change_wait_for_it() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.a
        .engine
        .hand_over(pair.now, GROUP)
        .expect("a owns the group");
    let held = pair.write(false, 4096, block(2));
    pair.settle();
    assert!(pair.a.engine.hand_over_ready(GROUP, B));
    // The old owner learns first this time: its held write and a strict
    // read go to b, which still takes a for the owner. They wait there,
    // unanswered and not served.
    pair.a.engine.set_owner(GROUP, B, Epoch(2));
    let read = pair.read(false, false, 0, 8192);
    pair.settle();
    assert_eq!(pair.a.reply(held), None);
    assert_eq!(pair.a.reply(read), None);
    assert_eq!(pair.b.leg.get(&1), None);
    // Once b learns it owns the group, both are served there.
    pair.b.engine.set_owner(GROUP, B, Epoch(2));
    pair.settle();
    assert_eq!(pair.a.reply(held), Some(&Ok(Response::Done)));
    let data = pair.a.read_reply(read);
    assert_eq!(&data[..4096], &block(1)[..]);
    assert_eq!(&data[4096..], &block(2)[..]);
    pair.tick(100);
    assert_legs_equal(&pair);
}

#[test]
fn a_request_awaiting_a_change_of_owner_that_never_comes_is_refused_in_time() {
    let mut pair = Pair::new(Mode::Async);
    pair.a
        .engine
        .hand_over(pair.now, GROUP)
        .expect("a owns the group");
    pair.settle();
    pair.a.engine.set_owner(GROUP, B, Epoch(2));
    let write = pair.write(false, 0, block(3));
    pair.settle();
    assert_eq!(pair.a.reply(write), None);
    // b refuses it well before a would time it out, and serves nothing.
    let timeout_ms = pair.b.engine.config().remote_timeout_ms;
    pair.tick(timeout_ms / 2 + 1);
    assert!(
        matches!(pair.a.reply(write), Some(Err(RequestError::Io(reason))) if reason.contains("does not own")),
        "{:?}",
        pair.a.reply(write)
    );
    assert_eq!(pair.b.leg.get(&0), None);
}

#[test]
fn a_called_off_hand_over_serves_the_held_writes_locally() {
    let mut pair = Pair::new(Mode::Async);
    pair.a
        .engine
        .hand_over(pair.now, GROUP)
        .expect("a owns the group");
    let held = pair.write(false, 0, block(4));
    assert_eq!(pair.a.reply(held), None);
    pair.a.engine.cancel_hand_over(pair.now, GROUP);
    pair.settle();
    assert_eq!(pair.a.reply(held), Some(&Ok(Response::Done)));
    assert!(pair.b.engine.hand_over(pair.now, GROUP).is_err());
}

#[test]
fn a_restarted_owner_resyncs_only_the_regions_its_maps_and_journal_name() {
    let mut config_a = config(A, B);
    config_a.journal_checkpoint_bytes = 64 << 10;
    let mut pair = Pair::with_configs(Mode::Async, config_a, config(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    // Region 0 and region 2 written while b is away, past the backlog
    // bound and past checkpoints: the saved map must name them.
    pair.fill_region_zero_at_a();
    pair.write(false, 2 << 20, block(8));
    pair.tick(100);
    let saved = pair.a.saved_maps.get(&B).cloned().unwrap_or_default();
    assert!(saved.contains(&(VOLUME, 0)), "saved map: {saved:?}");
    pair.restart_a();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    assert_eq!(pair.a.engine.stats().resync_regions_done_total, 2);
    // Caught up: later maps name at most the regions of the newest deltas
    // (released here, not yet journaled there), no longer region 2, and
    // the group they speak for.
    for index in 0..20u64 {
        pair.write(false, (index % 4) * 4096, block(9));
        pair.tick(100);
    }
    let later = pair.a.saved_maps.get(&B).cloned().unwrap_or_default();
    // Each release waited for its one map save, then went ahead: the
    // journal holds only the newest few records (4 here), not the twenty
    // written since the restart.
    assert!(
        pair.a.journal.len() <= 8,
        "journal not released after the map saves: {} records",
        pair.a.journal.len()
    );
    let named = (RESERVED_VOLUME, u64::from(GROUP.0));
    assert!(later.contains(&named), "{later:?}");
    assert!(
        later
            .iter()
            .all(|region| *region == (VOLUME, 0) || *region == named),
        "{later:?}"
    );
}

#[test]
fn a_restarted_owner_without_a_saved_map_copies_every_region_to_a_lagging_site() {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.a.saved_maps.clear();
    pair.restart_a();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    assert_eq!(
        pair.a.engine.stats().resync_regions_done_total,
        VOLUME_BYTES / (REGION_BLOCKS * BLOCK_SIZE as u64)
    );
}

/// Regions 0 and 3 written at a while b is away; a restarts with the
/// group's `history` and the map `saved` for b, b comes back: the regions
/// a copies to b (the legs end equal).
fn regions_resynced_after_a_restart(
    history: Vec<EpochStart>,
    saved: BTreeSet<(VolumeId, u64)>,
) -> u64 {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.write(false, 3 << 20, block(2));
    pair.tick(100);
    pair.a.history = history;
    pair.a.saved_maps.insert(B, saved);
    pair.restart_a();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    pair.a.engine.stats().resync_regions_done_total
}

#[test]
fn a_saved_map_that_does_not_name_the_group_is_not_trusted_for_it() {
    // a took the group over after delta 1 (its history says so), and its
    // map was saved before: it names a region, but not the group, so it
    // knows nothing of what b lacks of the deltas written before.
    let history = vec![
        EpochStart {
            epoch: Epoch(1),
            after_seq: DeltaSeq(0),
            handed_over: false,
        },
        EpochStart {
            epoch: Epoch(2),
            after_seq: DeltaSeq(1),
            handed_over: true,
        },
    ];
    assert_eq!(
        regions_resynced_after_a_restart(history.clone(), BTreeSet::from([(VOLUME, 0)])),
        VOLUME_BYTES / (REGION_BLOCKS * BLOCK_SIZE as u64)
    );
    // Only the reserved volume's entries name groups: a region whose
    // number happens to be the group's does not.
    assert_eq!(
        regions_resynced_after_a_restart(history, BTreeSet::from([(VOLUME, u64::from(GROUP.0))])),
        VOLUME_BYTES / (REGION_BLOCKS * BLOCK_SIZE as u64)
    );
}

#[test]
fn a_group_owned_since_its_first_delta_is_tracked_from_the_journal_without_a_map_naming_it() {
    // No map was saved since the group's first delta (as after a fresh
    // start): nothing of it was released, the journal names every region
    // b may lack.
    let history = vec![EpochStart {
        epoch: Epoch(1),
        after_seq: DeltaSeq(0),
        handed_over: false,
    }];
    assert_eq!(
        regions_resynced_after_a_restart(history, BTreeSet::new()),
        2
    );
}

#[test]
fn a_resync_chunk_is_journaled_under_the_epoch_of_the_delta_it_starts_from() {
    // a wrote deltas 1 to 3 under epoch 1 while b was away, then (as after
    // a takeover at 3) owns the group under epoch 2; it restarted without
    // a map, so b is resynced from delta 3. A chunk's record stands for
    // delta 3 at recovery: it must say epoch 1, or b recovers as if it
    // held an epoch-2 delta 3 and reads as diverged.
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    for index in 0..3u64 {
        pair.write(false, index * 4096, block(index as u8 + 1));
        pair.tick(100);
    }
    let history = vec![
        EpochStart {
            epoch: Epoch(1),
            after_seq: DeltaSeq(0),
            handed_over: false,
        },
        EpochStart {
            epoch: Epoch(2),
            after_seq: DeltaSeq(3),
            handed_over: true,
        },
    ];
    pair.a.history = history.clone();
    pair.a.saved_maps.clear();
    pair.b.engine.set_epoch_history(GROUP, history);
    pair.b.engine.set_owner(GROUP, A, Epoch(2));
    pair.b.journal.clear();
    pair.restart_a();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    assert!(pair.a.engine.stats().resync_regions_done_total > 0);
    let chunks: Vec<(DeltaSeq, Epoch)> = pair
        .b
        .journal
        .iter()
        .map(|record| (record.seq, record.epoch))
        .collect();
    assert!(!chunks.is_empty());
    assert!(
        chunks
            .iter()
            .all(|(seq, epoch)| *seq == DeltaSeq(3) && *epoch == Epoch(1)),
        "{chunks:?}"
    );
    assert!(pair.b.engine.replication_status()[0].consistent);
}

#[test]
fn a_resync_chunk_is_journaled_under_the_epoch_the_owner_names_when_the_history_here_lags() {
    // a wrote deltas 1 and 2 under epoch 1 while b was away; the group
    // then moved away from a after 2 (epoch 2) and back (epoch 3), and a
    // wrote delta 3 under epoch 3. b learned none of it: its history says
    // epoch 1 only, and a still owns the group as far as b knows. a
    // restarted without a map, so b is resynced, consistent at delta 3,
    // which a names as written under epoch 3. The chunk's record stands
    // for delta 3 at recovery: it must say epoch 3, as b's memory does
    // once the resync is whole, or b comes back from a restart on another
    // line than the one it left (diverged, once it learns the history).
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    for index in 0..2u64 {
        pair.write(false, index * 4096, block(index as u8 + 1));
        pair.tick(100);
    }
    let history = vec![
        EpochStart {
            epoch: Epoch(1),
            after_seq: DeltaSeq(0),
            handed_over: false,
        },
        EpochStart {
            epoch: Epoch(2),
            after_seq: DeltaSeq(2),
            handed_over: true,
        },
        EpochStart {
            epoch: Epoch(3),
            after_seq: DeltaSeq(2),
            handed_over: true,
        },
    ];
    pair.a.history = history.clone();
    pair.a.engine.set_epoch_history(GROUP, history.clone());
    pair.a.engine.set_owner(GROUP, A, Epoch(3));
    pair.write(false, 2 * 4096, block(3));
    pair.tick(100);
    assert_eq!(
        pair.a
            .journal
            .last()
            .map(|record| (record.seq, record.epoch)),
        Some((DeltaSeq(3), Epoch(3)))
    );
    pair.a.saved_maps.clear();
    pair.b.engine.set_epoch_history(
        GROUP,
        vec![EpochStart {
            epoch: Epoch(1),
            after_seq: DeltaSeq(0),
            handed_over: false,
        }],
    );
    pair.b.journal.clear();
    pair.restart_a();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    assert!(pair.a.engine.stats().resync_regions_done_total > 0);
    let chunks: Vec<(DeltaSeq, Epoch)> = pair
        .b
        .journal
        .iter()
        .map(|record| (record.seq, record.epoch))
        .collect();
    assert!(!chunks.is_empty());
    assert!(
        chunks
            .iter()
            .all(|(seq, epoch)| *seq == DeltaSeq(3) && *epoch == Epoch(3)),
        "{chunks:?}"
    );
    // b restarts from its journal and learns the history: it holds delta
    // 3 of the owner's line.
    let recovered = RecoveredState {
        next_position: JournalPosition(1_000),
        next_seq: [(GROUP, DeltaSeq(4))].into(),
        next_remote_id: 1 << 32,
        resyncing: BTreeSet::new(),
        last_epoch: pair
            .b
            .journal
            .last()
            .map(|record| (GROUP, record.epoch))
            .into_iter()
            .collect(),
    };
    let mut b = Site::recovered(config(B, A), Mode::Async, A, recovered);
    b.engine.set_epoch_history(GROUP, history);
    b.engine.set_owner(GROUP, A, Epoch(3));
    assert!(b.engine.replication_status()[0].consistent);
}

/// Hands every message to its site (sites a and b only).
fn deliver(to: &mut Site, from: SiteId, messages: Vec<(SiteId, SiteMessage)>) {
    for (_, message) in messages {
        to.engine.receive(Timestamp(0), from, message);
    }
}

#[test]
fn an_answer_meant_for_a_request_of_an_earlier_run_is_refused() {
    let mut owner = Site::new(config(A, B), Mode::Async, A);
    let mut earlier = Site::new(config(B, A), Mode::Async, A);
    owner.engine.peer_up(Timestamp(0), B);
    earlier.engine.peer_up(Timestamp(0), A);
    deliver(&mut owner, B, earlier.run());
    earlier.submit(
        Timestamp(0),
        Request::Write {
            volume: VOLUME,
            offset: 0,
            data: block(1),
            fua: false,
        },
    );
    let forwarded = earlier.run();
    // b restarts before the owner answers; its new run numbers its
    // requests above every id of the earlier one.
    let recovered = RecoveredState {
        next_remote_id: 1 << 32,
        ..RecoveredState::default()
    };
    let mut b = Site::recovered(config(B, A), Mode::Async, A, recovered);
    b.engine.peer_up(Timestamp(0), A);
    deliver(&mut owner, B, b.run());
    owner.run();
    let read = b.submit(
        Timestamp(0),
        Request::Read {
            volume: VOLUME,
            offset: 0,
            length: 4096,
        },
    );
    let read_request = b.run();
    // The answer to the earlier run's forward reaches the new run first.
    deliver(&mut owner, B, forwarded);
    let answer = owner.run();
    deliver(&mut b, A, answer);
    b.run();
    assert_eq!(
        b.reply(read),
        None,
        "a stale answer completed a new request"
    );
    assert_eq!(b.engine.stats().refused_messages_total, 1);
    deliver(&mut owner, B, read_request);
    let answer = owner.run();
    deliver(&mut b, A, answer);
    b.run();
    assert_eq!(b.read_reply(read), block(1));
}

#[test]
fn a_flush_waiting_for_acks_lost_with_the_connection_completes_after_it() {
    let mut pair = Pair::new(Mode::FlushSync);
    pair.write(false, 0, block(1));
    let flush = pair.a.submit(pair.now, Request::Flush { volume: VOLUME });
    let delta = pair.a.run();
    deliver(&mut pair.b, A, delta);
    let acks = pair.b.run();
    assert!(!acks.is_empty(), "b journaled the delta");
    // The acks are lost with the connection; b holds everything already,
    // so nothing new is shipped after the reconnect.
    pair.disconnect();
    pair.connect();
    assert_eq!(pair.a.reply(flush), Some(&Ok(Response::Done)));
}

#[test]
fn deltas_a_site_applied_are_retired_although_its_acks_were_lost() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    let flush = pair.a.submit(pair.now, Request::Flush { volume: VOLUME });
    let delta = pair.a.run();
    assert_eq!(pair.a.reply(flush), Some(&Ok(Response::Done)));
    deliver(&mut pair.b, A, delta);
    pair.b.run();
    assert_eq!(pair.a.engine.stats().backlog_deltas, 1);
    pair.disconnect();
    pair.connect();
    // Kept for b forever otherwise: past the backlog bound, writes would
    // wait for good.
    assert_eq!(pair.a.engine.stats().backlog_deltas, 0);
}

#[test]
fn a_resync_chunk_leaves_only_once_the_owners_journal_holds_what_it_shows() {
    let mut engine = owner_engine();
    engine.peer_up(Timestamp(0), B);
    // A write still in the open delta, then a site that needs every region.
    engine.submit(
        Timestamp(0),
        RequestId(1),
        Request::Write {
            volume: VOLUME,
            offset: 0,
            data: block(7),
            fua: false,
        },
    );
    engine.receive(
        Timestamp(0),
        B,
        SiteMessage::Resume {
            group: GROUP,
            have: Some(DeltaSeq(5)),
            have_epoch: None,
            lost_regions: None,
            resume: 1,
        },
    );
    // Region reads complete at once; journal syncs wait.
    let mut syncs = Vec::new();
    let mut chunks = Vec::new();
    loop {
        let Some(action) = engine.poll_action() else {
            break;
        };
        match action {
            Action::ReadLeg { io, length, .. } => {
                engine.leg_read_done(io, Ok(Bytes::from(vec![0u8; length as usize])));
            }
            Action::SyncJournal { io, .. } => syncs.push(io),
            Action::Send {
                message: SiteMessage::Resync { blocks, .. },
                ..
            } => chunks.push(blocks),
            _ => {}
        }
    }
    assert!(
        chunks
            .iter()
            .all(|blocks| blocks.iter().all(|(key, _)| key.block != 0)),
        "a chunk showing the unjournaled write left"
    );
    assert!(!syncs.is_empty());
    for io in syncs {
        engine.journal_synced(io, Ok(()));
    }
    let released: Vec<Action> = std::iter::from_fn(|| engine.poll_action()).collect();
    assert!(released.iter().any(|action| matches!(
        action,
        Action::Send {
            message: SiteMessage::Resync { blocks, .. },
            ..
        } if blocks.iter().any(|(key, image)| key.block == 0 && *image == BlockImage::Data(block(7)))
    )));
}

#[test]
fn deltas_closed_after_a_resync_began_wait_behind_its_held_first_chunk() {
    let mut engine = owner_engine();
    engine.peer_up(Timestamp(0), B);
    // b holds a delta this site never wrote: it needs every region, and
    // the resync's base is 0.
    engine.receive(
        Timestamp(0),
        B,
        SiteMessage::Resume {
            group: GROUP,
            have: Some(DeltaSeq(5)),
            have_epoch: None,
            lost_regions: None,
            resume: 1,
        },
    );
    let mut reads = Vec::new();
    let mut syncs = Vec::new();
    let mut sent = Vec::new();
    let sort = |action: Action,
                reads: &mut Vec<(IoId, u64)>,
                syncs: &mut Vec<IoId>,
                sent: &mut Vec<SiteMessage>| match action {
        Action::ReadLeg { io, length, .. } => reads.push((io, length)),
        Action::SyncJournal { io, .. } => syncs.push(io),
        Action::Send { peer, message } if peer == B => sent.push(message),
        _ => {}
    };
    while let Some(action) = engine.poll_action() {
        sort(action, &mut reads, &mut syncs, &mut sent);
    }
    // Delta 1 (a FUA write in region 1): its journal sync stays in flight.
    let region_bytes = REGION_BLOCKS * BLOCK_SIZE as u64;
    engine.submit(
        Timestamp(0),
        RequestId(1),
        Request::Write {
            volume: VOLUME,
            offset: region_bytes,
            data: block(1),
            fua: true,
        },
    );
    // A write in region 0 stays in the open delta, so the first chunk
    // (region 0) shows it: the chunk closes delta 2 and waits for the
    // journal to hold it.
    engine.submit(
        Timestamp(0),
        RequestId(2),
        Request::Write {
            volume: VOLUME,
            offset: 0,
            data: block(2),
            fua: false,
        },
    );
    while let Some(action) = engine.poll_action() {
        sort(action, &mut reads, &mut syncs, &mut sent);
    }
    let (first_read, length) = reads.remove(0);
    engine.leg_read_done(first_read, Ok(Bytes::from(vec![0u8; length as usize])));
    while let Some(action) = engine.poll_action() {
        sort(action, &mut reads, &mut syncs, &mut sent);
    }
    // Every journal sync completes, one after the other: delta 1 becomes
    // durable before the chunk's delta 2 does.
    while !syncs.is_empty() {
        let io = syncs.remove(0);
        engine.journal_synced(io, Ok(()));
        while let Some(action) = engine.poll_action() {
            sort(action, &mut reads, &mut syncs, &mut sent);
        }
    }
    let first_chunk = sent
        .iter()
        .position(|message| matches!(message, SiteMessage::Resync { .. }))
        .expect("the first chunk left once the journal held it");
    let first_delta = sent
        .iter()
        .position(|message| matches!(message, SiteMessage::Delta(_) | SiteMessage::Deltas { .. }))
        .expect("delta 1 left");
    assert!(
        first_chunk < first_delta,
        "a delta after the resync's base reached b before its first chunk: {sent:?}"
    );
}

#[test]
fn a_site_mid_resync_does_not_count_for_a_flush_sync_flush() {
    let mut pair = Pair::new(Mode::FlushSync);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    // Writes in regions 0 and 3 while b is away, past the backlog bound: b
    // will need a resync of both. The flush waits for b meanwhile.
    let big = Bytes::from(vec![6u8; 64 << 10]);
    for index in 0..8u64 {
        pair.write(false, index * (64 << 10), big.clone());
    }
    pair.write(false, 3 << 20, block(8));
    let flush = pair.a.submit(pair.now, Request::Flush { volume: VOLUME });
    pair.settle();
    assert_eq!(pair.a.reply(flush), None);
    // b returns; only the first chunk reaches it.
    pair.hold_group_lane_to_b = true;
    pair.connect();
    let first = pair
        .to_b
        .iter()
        .position(|message| matches!(message, SiteMessage::Resync { .. }))
        .expect("a resync starts");
    let chunk = pair.to_b.remove(first).expect("index is in range");
    pair.b.engine.receive(pair.now, A, chunk);
    pair.settle();
    assert_eq!(
        pair.a.reply(flush),
        None,
        "answered while b lacks a region the flush covers"
    );
    pair.hold_group_lane_to_b = false;
    pair.settle();
    assert_eq!(pair.a.reply(flush), Some(&Ok(Response::Done)));
    assert_legs_equal(&pair);
}

#[test]
fn regions_being_read_when_a_resync_is_abandoned_are_copied_by_the_next() {
    let mut engine = owner_engine();
    engine.peer_up(Timestamp(0), B);
    let resume = |have, resume| SiteMessage::Resume {
        group: GROUP,
        have,
        have_epoch: None,
        lost_regions: None,
        resume,
    };
    // b claims more than a has: every region must be copied.
    engine.receive(Timestamp(0), B, resume(Some(DeltaSeq(5)), 1));
    let reads: Vec<Action> = std::iter::from_fn(|| engine.poll_action()).collect();
    assert!(
        reads
            .iter()
            .any(|action| matches!(action, Action::ReadLeg { .. }))
    );
    // The connection was reset before those reads came back: b asks again.
    engine.receive(Timestamp(0), B, resume(None, 2));
    let again: Vec<Action> = std::iter::from_fn(|| engine.poll_action()).collect();
    assert!(
        again
            .iter()
            .any(|action| matches!(action, Action::ReadLeg { .. })),
        "the new resync must copy the regions the old one was reading: {again:?}"
    );
    assert!(!again.iter().any(|action| matches!(
        action,
        Action::Send {
            message: SiteMessage::Resync { last: true, .. },
            ..
        }
    )));
}

#[test]
fn deltas_shipped_during_an_abandoned_resync_are_copied_by_the_next() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    // Past the backlog bound while b is away: b needs a resync of region 0.
    pair.fill_region_zero_at_a();
    // b returns; its stream stalls, then a delta in region 2 is shipped
    // after the resync's base, and the connection drops with all of it.
    pair.hold_group_lane_to_b = true;
    pair.connect();
    pair.write(false, 2 << 20, block(9));
    pair.tick(100);
    pair.hold_group_lane_to_b = false;
    pair.disconnect();
    pair.connect();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
}

#[test]
fn a_replica_that_crashed_mid_resync_knows_it_after_its_restart() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    pair.fill_regions_zero_and_three_at_a();
    // b returns; its first chunk arrives, then b loses power.
    pair.hold_group_lane_to_b = true;
    pair.connect();
    let first = pair
        .to_b
        .iter()
        .position(|message| matches!(message, SiteMessage::Resync { .. }))
        .expect("a resync starts");
    let chunk = pair.to_b.remove(first).expect("index is in range");
    pair.b.engine.receive(pair.now, A, chunk);
    pair.b.run();
    assert_eq!(
        pair.b.saved_marks,
        BTreeSet::from([GROUP]),
        "marked before the chunk reached the journal"
    );
    pair.hold_group_lane_to_b = false;
    pair.disconnect();
    // b restarts: its journal (the chunk) replays onto its leg.
    let mut leg = std::mem::take(&mut pair.b.leg);
    for record in std::mem::take(&mut pair.b.journal) {
        for (key, image) in record.blocks {
            leg.insert(key.block, image.to_bytes());
        }
    }
    let recovered = RecoveredState {
        next_position: JournalPosition(1_000),
        next_seq: [(GROUP, pair.b.next_seq)].into(),
        next_remote_id: 1 << 32,
        resyncing: pair.b.saved_marks.clone(),
        last_epoch: BTreeMap::new(),
    };
    let saved_marks = pair.b.saved_marks.clone();
    pair.b = Site::recovered(config(B, A), Mode::Async, A, recovered);
    pair.b.leg = leg;
    pair.b.saved_marks = saved_marks;
    assert!(!pair.b.engine.replication_status()[0].consistent);
    let snapshot = pair.b.submit(
        pair.now,
        Request::ReadSnapshot {
            volume: VOLUME,
            offset: 0,
            length: 4096,
        },
    );
    pair.b.run();
    assert!(matches!(
        pair.b.reply(snapshot),
        Some(Err(RequestError::Io(_)))
    ));
    pair.connect();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    assert!(pair.b.engine.replication_status()[0].consistent);
    assert!(pair.b.saved_marks.is_empty());
    assert_eq!(
        pair.b.marks_saves, 1,
        "the recovered marks already named the group: its resumed resync needs no save before its first chunk, only the one that clears it"
    );
}

#[test]
fn a_site_resuming_mid_way_through_this_sites_resync_gets_only_what_it_still_lacks() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    // Past the backlog bound while b is away: b is marked for a resync of
    // regions 0 and 3, the two written.
    pair.fill_regions_zero_and_three_at_a();
    assert_eq!(
        pair.a.engine.replication_status()[0].peers[0].state,
        PeerState::NeedsResync
    );
    // b returns; one chunk reaches it, then the link drops.
    pair.hold_group_lane_to_b = true;
    pair.connect();
    let first = pair
        .to_b
        .iter()
        .position(|message| matches!(message, SiteMessage::Resync { .. }))
        .expect("a resync starts");
    let chunk = pair.to_b.remove(first).expect("index is in range");
    pair.b.engine.receive(pair.now, A, chunk);
    pair.b.run();
    pair.hold_group_lane_to_b = false;
    pair.disconnect();
    let done = pair.a.engine.stats().resync_regions_done_total;
    // b resumes mid-way through a's own resync: a's map names what is
    // left, not every region of the volume.
    pair.connect();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    assert!(pair.b.engine.replication_status()[0].consistent);
    let copied = pair.a.engine.stats().resync_regions_done_total - done;
    let regions = VOLUME_BYTES / (REGION_BLOCKS * BLOCK_SIZE as u64);
    assert!(
        (1..=2).contains(&copied) && copied < regions,
        "{copied} regions copied again, of {regions}"
    );
}

#[test]
fn a_restarted_owner_copies_every_region_to_a_site_resuming_mid_resync() {
    let mut engine = owner_engine();
    engine.peer_up(Timestamp(0), B);
    engine.receive(
        Timestamp(0),
        B,
        SiteMessage::Resume {
            group: GROUP,
            have: None,
            have_epoch: None,
            lost_regions: None,
            resume: 1,
        },
    );
    let reads = std::iter::from_fn(|| engine.poll_action())
        .filter(|action| matches!(action, Action::ReadLeg { .. }))
        .count();
    assert!(reads > 0, "nothing here says what b lacks: copy everything");
}

#[test]
fn chunks_and_acks_of_a_resync_an_earlier_resume_started_are_ignored() {
    // The replica: a chunk answering its earlier resume arrives after it
    // resumed again (the owner sent it before hearing the new resume).
    let mut b = Site::new(config(B, A), Mode::Async, A);
    b.engine.peer_up(Timestamp(0), A);
    let resume = |messages: Vec<(SiteId, SiteMessage)>| {
        messages
            .into_iter()
            .find_map(|(_, message)| match message {
                SiteMessage::Resume { resume, .. } => Some(resume),
                _ => None,
            })
            .expect("a resume was sent")
    };
    let earlier = resume(b.run());
    b.engine.peer_down(Timestamp(0), A);
    b.engine.peer_up(Timestamp(0), A);
    let latest = resume(b.run());
    assert_ne!(earlier, latest);
    let chunk = |resume| SiteMessage::Resync {
        group: GROUP,
        blocks: vec![(
            BlockKey {
                volume: VOLUME,
                block: 0,
            },
            BlockImage::Data(block(3)),
        )],
        last: true,
        base: DeltaSeq(0),
        consistent_at: DeltaSeq(0),
        consistent_epoch: None,
        resume,
    };
    b.engine.receive(Timestamp(0), A, chunk(earlier));
    b.run();
    assert!(b.leg.is_empty(), "a stale chunk was applied");
    assert_eq!(b.engine.stats().refused_messages_total, 1);
    b.engine.receive(Timestamp(0), A, chunk(latest));
    b.run();
    assert_eq!(b.leg.get(&0), Some(&block(3)));

    // The owner: an ack of a chunk of the abandoned resync does not count
    // for the new one.
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    pair.write(false, 0, block(1));
    pair.write(false, 3 << 20, block(2));
    pair.tick(100);
    let resume_message = |have, resume| SiteMessage::Resume {
        group: GROUP,
        have,
        have_epoch: None,
        lost_regions: None,
        resume,
    };
    pair.a.engine.peer_up(pair.now, B);
    pair.a
        .engine
        .receive(pair.now, B, resume_message(Some(DeltaSeq(9)), 100));
    pair.a.run();
    pair.a
        .engine
        .receive(pair.now, B, resume_message(Some(DeltaSeq(9)), 101));
    pair.a.run();
    let refused = pair.a.engine.stats().refused_messages_total;
    pair.a.engine.receive(
        pair.now,
        B,
        SiteMessage::ResyncAck {
            group: GROUP,
            resume: 100,
        },
    );
    pair.a.run();
    assert_eq!(pair.a.engine.stats().refused_messages_total, refused + 1);
    assert_eq!(pair.a.engine.stats().resync_regions_done_total, 0);
}

#[test]
fn a_snapshot_read_is_not_torn_by_a_delta_landing_during_its_leg_read() {
    let mut b = Site::new(config(B, A), Mode::Async, A);
    b.engine.peer_up(Timestamp(0), A);
    b.run();
    let delta = |seq: u64, byte: u8, blocks: &[u64]| {
        SiteMessage::Delta(DeltaRecord {
            position: JournalPosition(0),
            group: GROUP,
            epoch: Epoch(1),
            seq: DeltaSeq(seq),
            blocks: blocks
                .iter()
                .map(|block| {
                    let key = BlockKey {
                        volume: VOLUME,
                        block: *block,
                    };
                    (key, BlockImage::Data(self::block(byte)))
                })
                .collect(),
        })
    };
    b.engine.receive(Timestamp(0), A, delta(1, 1, &[0]));
    b.run();
    // Block 0 is cached, block 1 must be read from the leg.
    b.engine.submit(
        Timestamp(0),
        RequestId(9),
        Request::ReadSnapshot {
            volume: VOLUME,
            offset: 0,
            length: 2 * 4096,
        },
    );
    let Some(Action::ReadLeg { io: read_io, .. }) = b.engine.poll_action() else {
        panic!("the snapshot reads block 1 from the leg");
    };
    // Delta 2 (blocks 0 and 1) arrives and is journaled meanwhile.
    b.engine.receive(Timestamp(0), A, delta(2, 2, &[0, 1]));
    let mut writes = 0;
    while let Some(action) = b.engine.poll_action() {
        match action {
            Action::SyncJournal { io, .. } => b.engine.journal_synced(io, Ok(())),
            Action::WriteLeg { .. } => writes += 1,
            _ => {}
        }
    }
    assert_eq!(writes, 0, "delta 2 started onto the leg under the read");
    b.engine
        .leg_read_done(read_io, Ok(Bytes::from(vec![0u8; 4096])));
    let actions: Vec<Action> = std::iter::from_fn(|| b.engine.poll_action()).collect();
    let image = actions
        .iter()
        .find_map(|action| match action {
            Action::Reply {
                request: RequestId(9),
                result: Ok(Response::Data(data)),
            } => Some(data.clone()),
            _ => None,
        })
        .expect("the snapshot read is answered");
    assert_eq!(&image[..4096], &block(1)[..]);
    assert_eq!(&image[4096..], &[0u8; 4096][..]);
    assert!(actions.iter().any(|action| matches!(
        action,
        Action::WriteLeg {
            seq: DeltaSeq(2),
            ..
        }
    )));
}

#[test]
fn a_resync_keeps_one_window_of_chunks_per_site_until_they_are_on_its_legs() {
    // The owner: two groups resyncing to b share one window of reads.
    let mut engine = Engine::new(config(A, B), RecoveredState::default());
    for (volume, group) in [(VolumeId(1), GroupId(1)), (VolumeId(2), GroupId(2))] {
        engine.add_volume(
            volume,
            VolumeSpec {
                size: VOLUME_BYTES,
                group,
                mode: Mode::Async,
            },
        );
        engine.set_owner(group, A, Epoch(1));
    }
    engine.peer_up(Timestamp(0), B);
    for (group, resume) in [(GroupId(1), 1), (GroupId(2), 2)] {
        let have = Some(DeltaSeq(9));
        let message = SiteMessage::Resume {
            group,
            have,
            have_epoch: None,
            lost_regions: None,
            resume,
        };
        engine.receive(Timestamp(0), B, message);
    }
    let reads = std::iter::from_fn(|| engine.poll_action())
        .filter(|action| matches!(action, Action::ReadLeg { .. }))
        .count();
    assert_eq!(reads, config(A, B).resync_chunks_in_flight_max);

    // The replica: a chunk is acknowledged once on its legs, not before.
    let mut b = Site::new(config(B, A), Mode::Async, A);
    b.engine.peer_up(Timestamp(0), A);
    let resume = b
        .run()
        .into_iter()
        .find_map(|(_, message)| match message {
            SiteMessage::Resume { resume, .. } => Some(resume),
            _ => None,
        })
        .expect("b resumes");
    let chunk = SiteMessage::Resync {
        group: GROUP,
        blocks: vec![(
            BlockKey {
                volume: VOLUME,
                block: 0,
            },
            BlockImage::Data(block(4)),
        )],
        last: true,
        base: DeltaSeq(0),
        consistent_at: DeltaSeq(0),
        consistent_epoch: None,
        resume,
    };
    b.engine.receive(Timestamp(0), A, chunk);
    let mut sent = Vec::new();
    let mut write = None;
    while let Some(action) = b.engine.poll_action() {
        match action {
            Action::SaveResyncMarks { io, .. } => b.engine.resync_marks_saved(io, Ok(())),
            Action::SyncJournal { io, .. } => b.engine.journal_synced(io, Ok(())),
            Action::WriteLeg { io, .. } => write = Some(io),
            Action::Send { message, .. } => sent.push(message),
            _ => {}
        }
    }
    assert!(
        !sent
            .iter()
            .any(|message| matches!(message, SiteMessage::ResyncAck { .. })),
        "acknowledged before it reached the legs"
    );
    b.engine
        .leg_written(write.expect("the chunk goes to the leg"), Ok(()));
    let acked = std::iter::from_fn(|| b.engine.poll_action()).any(|action| {
        matches!(
            action,
            Action::Send {
                message: SiteMessage::ResyncAck { .. },
                ..
            }
        )
    });
    assert!(acked);
}

#[test]
fn after_a_resync_the_owner_knows_the_site_holds_every_delta_up_to_its_base() {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    pair.fill_region_zero_at_a();
    pair.connect();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    let status = &pair.a.engine.replication_status()[0];
    assert_eq!(status.peers[0].state, PeerState::Streaming);
    assert_eq!(status.peers[0].applied, status.last_seq);
    assert_eq!(status.peers[0].journaled, status.last_seq);
}

#[test]
fn a_site_folded_after_an_owner_restart_without_a_map_gets_every_region() {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    // Region 3 written before a restarts (no map saved), while b is away.
    pair.write(false, 3 << 20, block(5));
    pair.tick(100);
    pair.a.saved_maps.clear();
    pair.restart_a_alone();
    // b is still away when the backlog passes its bound: b is marked for
    // a resync of what it missed since, but the deltas before the restart
    // are not known here.
    pair.fill_region_zero_at_a();
    pair.connect();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
}

#[test]
fn a_flush_waiting_for_a_site_marked_for_resync_completes_once_it_streams() {
    let mut pair = Pair::new(Mode::FlushSync);
    // A map saved empty by the group's owner: the restarted owner marks b
    // for a resync of nothing until b resumes.
    pair.a
        .saved_maps
        .insert(B, BTreeSet::from([(RESERVED_VOLUME, u64::from(GROUP.0))]));
    pair.restart_a_alone();
    let flush = pair.a.submit(pair.now, Request::Flush { volume: VOLUME });
    pair.settle();
    assert_eq!(pair.a.reply(flush), None, "b is away");
    pair.connect();
    assert_eq!(pair.a.reply(flush), Some(&Ok(Response::Done)));
}

/// Fills the backlog while b's group stream is stalled (connected, but
/// nothing gets through): returns the writes, some of them throttled.
fn fill_backlog_while_stalled(pair: &mut Pair) -> Vec<RequestId> {
    pair.hold_group_lane_to_b = true;
    let big = Bytes::from(vec![5u8; 64 << 10]);
    let requests: Vec<RequestId> = (0..8u64)
        .map(|index| pair.write(false, index * (64 << 10), big.clone()))
        .collect();
    // The open delta closes: nothing new will close while writes wait.
    pair.tick(100);
    assert!(
        requests
            .iter()
            .any(|request| pair.a.reply(*request).is_none()),
        "the backlog bound holds writes back"
    );
    requests
}

fn unanswered(pair: &Pair, requests: &[RequestId]) -> usize {
    requests
        .iter()
        .filter(|request| pair.a.reply(**request).is_none())
        .count()
}

#[test]
fn writes_held_by_a_full_backlog_go_on_once_the_lagging_site_is_declared_gone() {
    let mut pair = Pair::new(Mode::Async);
    let requests = fill_backlog_while_stalled(&mut pair);
    pair.disconnect();
    assert_eq!(
        unanswered(&pair, &requests),
        0,
        "a site declared gone must not hold the owner's writes"
    );
    let status = pair.a.engine.replication_status();
    assert_eq!(status[0].peers[0].state, PeerState::NeedsResync);
    assert_eq!(pair.a.engine.stats().backlog_bytes, 0);
    assert!(pair.a.engine.stats().backlog_folds_total > 0);
    pair.hold_group_lane_to_b = false;
    pair.connect();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    assert!(pair.b.engine.replication_status()[0].consistent);
}

#[test]
fn a_write_still_waiting_after_others_were_admitted_keeps_its_backlog_wait() {
    let mut pair = Pair::new(Mode::Async);
    let requests = fill_backlog_while_stalled(&mut pair);
    let waiting = unanswered(&pair, &requests);
    assert!(waiting >= 2, "{waiting} writes wait");
    // 1 s later b gets one delta and acknowledges it: room for one write,
    // whose delta fills the backlog again behind it.
    pair.tick(1_000);
    let first = pair
        .to_b
        .iter()
        .position(|message| matches!(message, SiteMessage::Delta(_)))
        .expect("deltas wait for b");
    let delta = pair.to_b.remove(first).expect("index is in range");
    pair.b.engine.receive(pair.now, A, delta);
    pair.settle();
    let still = unanswered(&pair, &requests);
    assert!(
        (1..waiting).contains(&still),
        "{still} of {waiting} still wait"
    );
    // The others waited since the fill: past backlog_wait_ms_max (2 s)
    // from then, b is dropped to a resync and they go on, acknowledgement
    // or not.
    pair.tick(1_100);
    assert_eq!(
        unanswered(&pair, &requests),
        0,
        "a write waited past the backlog bound"
    );
    assert_eq!(pair.a.engine.stats().backlog_folds_total, 1);
}

#[test]
fn the_planted_stall_keeps_writes_waiting_for_a_site_declared_gone() {
    let mut buggy = config(A, B);
    buggy.planted_bug = Some(PlantedBug::StallOnFullBacklog);
    let mut pair = Pair::with_configs(Mode::Async, buggy, config(B, A));
    let requests = fill_backlog_while_stalled(&mut pair);
    pair.disconnect();
    pair.tick(5_000);
    assert!(unanswered(&pair, &requests) > 0);
}

#[test]
fn a_connected_site_slower_than_the_writes_is_resynced_after_the_wait_bound() {
    let mut pair = Pair::new(Mode::Async);
    let requests = fill_backlog_while_stalled(&mut pair);
    // backlog_wait_ms_max is 2 s: not yet.
    pair.tick(1_500);
    assert!(unanswered(&pair, &requests) > 0);
    pair.tick(600);
    assert_eq!(
        unanswered(&pair, &requests),
        0,
        "no write waits past the bound"
    );
    let status = pair.a.engine.replication_status();
    assert_eq!(status[0].peers[0].state, PeerState::NeedsResync);
    assert_eq!(pair.a.engine.stats().backlog_folds_total, 1);
    let rejoin = SiteMessage::Rejoin { group: GROUP };
    assert!(
        pair.to_b.contains(&rejoin),
        "b is told to resume: {:?}",
        pair.to_b
    );
    // The stream flows again: b resumes and is resynced by region, without
    // any reconnect.
    pair.hold_group_lane_to_b = false;
    pair.settle();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    let status = pair.a.engine.replication_status();
    assert_eq!(status[0].peers[0].state, PeerState::Streaming);
    assert!(pair.b.engine.replication_status()[0].consistent);
    assert!(pair.a.engine.stats().resync_regions_done_total > 0);
}

#[test]
fn a_rejoin_from_a_site_that_does_not_own_the_group_is_refused() {
    let mut pair = Pair::new(Mode::Async);
    let refused = pair.a.engine.stats().refused_messages_total;
    pair.a
        .engine
        .receive(pair.now, B, SiteMessage::Rejoin { group: GROUP });
    assert!(pair.a.run().is_empty(), "the owner resumes nothing");
    assert_eq!(pair.a.engine.stats().refused_messages_total, refused + 1);
}

#[test]
fn a_replica_that_learns_of_a_group_before_its_owner_still_gets_its_deltas() {
    // Each site applies ownership from the metadata in its own time: here b
    // knows the group (owned by a) before a does.
    let mut pair = Pair::new(Mode::Async);
    pair.a.engine = Engine::new(config(A, B), RecoveredState::default());
    pair.disconnect();
    let refused_before = pair.a.engine.stats().refused_messages_total;
    // b asks a to resume a group a has not heard of: refused, not a panic.
    pair.connect();
    assert!(pair.a.engine.stats().refused_messages_total > refused_before);
    pair.a.engine.add_volume(
        VOLUME,
        VolumeSpec {
            size: VOLUME_BYTES,
            group: GROUP,
            mode: Mode::Async,
        },
    );
    pair.a.engine.set_owner(GROUP, A, Epoch(1));
    pair.settle();
    let write = pair.write(false, 0, block(9));
    assert_eq!(pair.a.reply(write), Some(&Ok(Response::Done)));
    pair.tick(100);
    pair.tick(100);
    assert_eq!(pair.b.leg.get(&0), Some(&block(9)), "b got a's delta");
    assert_legs_equal(&pair);
}

#[test]
fn a_delta_from_an_ended_epoch_is_refused() {
    let mut pair = Pair::new(Mode::Async);
    // a owns the group at epoch 3 now (it moved away and back); b knows.
    pair.a.engine.set_owner(GROUP, A, Epoch(3));
    pair.b.engine.set_owner(GROUP, A, Epoch(3));
    pair.settle();
    let refused_before = pair.b.engine.stats().refused_messages_total;
    let received_before = pair.b.engine.stats().received_deltas_total;
    // A delta a wrote under epoch 2, arriving late.
    let stale = DeltaRecord {
        position: JournalPosition(0),
        group: GROUP,
        epoch: Epoch(2),
        seq: DeltaSeq(1),
        blocks: vec![(
            BlockKey {
                volume: VOLUME,
                block: 5,
            },
            BlockImage::Data(block(7)),
        )],
    };
    pair.b
        .engine
        .receive(pair.now, A, SiteMessage::Delta(stale.clone()));
    pair.settle();
    assert_eq!(
        pair.b.engine.stats().refused_messages_total,
        refused_before + 1
    );
    assert_eq!(pair.b.engine.stats().received_deltas_total, received_before);
    // The same delta under the current epoch is taken.
    pair.b.engine.receive(
        pair.now,
        A,
        SiteMessage::Delta(DeltaRecord {
            epoch: Epoch(3),
            ..stale
        }),
    );
    pair.settle();
    assert_eq!(
        pair.b.engine.stats().received_deltas_total,
        received_before + 1
    );
}

#[test]
fn requests_for_a_group_owned_elsewhere_do_not_wait_for_this_sites_lease() {
    let leased = EngineConfig {
        leases_enforced: true,
        ..config(B, A)
    };
    let mut pair = Pair::with_configs(Mode::Async, config(A, B), leased);
    // b holds no lease: its own groups would wait, a's are forwarded.
    let write = pair.write(true, 0, block(3));
    assert_eq!(pair.b.reply(write), Some(&Ok(Response::Done)));
    let read = pair.read(true, false, 0, 4096);
    assert_eq!(pair.b.read_reply(read), block(3));
    assert_eq!(pair.b.engine.stats().suspended_requests_now, 0);
}

#[test]
fn an_owner_without_a_lease_refuses_strict_reads_from_other_sites() {
    let leased = EngineConfig {
        leases_enforced: true,
        ..config(A, B)
    };
    let mut pair = Pair::with_configs(Mode::Async, leased, config(B, A));
    pair.a
        .engine
        .set_lease_until(pair.now, Some(Timestamp::from_millis(100)));
    pair.write(false, 0, block(4));
    pair.tick(100);
    // The lease ran out: b's strict read must not be served by a.
    let read = pair.read(true, false, 0, 4096);
    assert!(
        matches!(pair.b.reply(read), Some(Err(RequestError::Io(message))) if message.contains("lease")),
        "{:?}",
        pair.b.reply(read)
    );
    // Nor is b's write held at a (b times it out on its own clock and its
    // client may write the range again); a counts it as failed.
    let write = pair.write(true, 0, block(5));
    assert!(
        matches!(pair.b.reply(write), Some(Err(RequestError::Io(_)))),
        "{:?}",
        pair.b.reply(write)
    );
    assert_eq!(pair.a.engine.stats().suspended_failed_total, 1);
    assert_eq!(pair.a.engine.stats().suspended_requests_now, 0);
}

// ---------------------------------------------------------------------------
// Epochs in resumes, epoch history, takeover

/// The resume `site` sends when its link to the owner comes up.
fn resume_of(site: &mut Site, owner: SiteId, now: Timestamp) -> (Option<DeltaSeq>, Option<Epoch>) {
    site.engine.peer_up(now, owner);
    site.run()
        .into_iter()
        .find_map(|(_, message)| match message {
            SiteMessage::Resume {
                have, have_epoch, ..
            } => Some((have, have_epoch)),
            _ => None,
        })
        .expect("a replica resumes when its owner comes up")
}

#[test]
fn a_resume_names_the_epoch_of_the_newest_delta_held() {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    // Nothing held yet: no epoch either.
    assert_eq!(
        resume_of(&mut pair.b, A, pair.now),
        (Some(DeltaSeq(0)), None)
    );
    pair.b.engine.peer_down(pair.now, A);
    pair.connect();
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.a.engine.set_owner(GROUP, A, Epoch(3));
    pair.b.engine.set_owner(GROUP, A, Epoch(3));
    pair.settle();
    pair.write(false, 4096, block(2));
    pair.tick(100);
    pair.disconnect();
    assert_eq!(
        resume_of(&mut pair.b, A, pair.now),
        (Some(DeltaSeq(2)), Some(Epoch(3)))
    );
    // The owner knows its own newest delta's epoch the same way.
    assert_eq!(pair.a.engine.groups[&GROUP].last_epoch, Some(Epoch(3)));
}

#[test]
fn after_a_resync_a_resume_names_the_owners_epoch() {
    let mut pair = Pair::new(Mode::Async);
    pair.a.engine.set_owner(GROUP, A, Epoch(2));
    pair.b.engine.set_owner(GROUP, A, Epoch(2));
    pair.settle();
    pair.disconnect();
    let big = Bytes::from(vec![6u8; 64 << 10]);
    for index in 0..16u64 {
        pair.write(false, index * (64 << 10), big.clone());
        pair.tick(100);
    }
    assert_eq!(
        pair.a.engine.replication_status()[0].peers[0].state,
        PeerState::NeedsResync
    );
    pair.connect();
    pair.tick(100);
    pair.tick(100);
    assert!(pair.a.engine.stats().resync_regions_done_total > 0);
    assert!(pair.b.engine.replication_status()[0].consistent);
    assert_legs_equal(&pair);
    pair.disconnect();
    let last = pair.a.engine.replication_status()[0].last_seq;
    assert_eq!(
        resume_of(&mut pair.b, A, pair.now),
        (Some(last), Some(Epoch(2)))
    );
}

#[test]
fn a_recovered_replica_resumes_with_the_epoch_the_runtime_supplied() {
    let recovered = |last_epoch: BTreeMap<GroupId, Epoch>| RecoveredState {
        next_position: JournalPosition(10),
        next_seq: [(GROUP, DeltaSeq(5))].into(),
        last_epoch,
        ..RecoveredState::default()
    };
    let mut known = Site::recovered(
        config(B, A),
        Mode::Async,
        A,
        recovered([(GROUP, Epoch(2))].into()),
    );
    assert_eq!(
        resume_of(&mut known, A, Timestamp(0)),
        (Some(DeltaSeq(4)), Some(Epoch(2)))
    );
    let mut unknown = Site::recovered(config(B, A), Mode::Async, A, recovered(BTreeMap::new()));
    assert_eq!(
        resume_of(&mut unknown, A, Timestamp(0)),
        (Some(DeltaSeq(4)), None)
    );
}

/// a owns the group with deltas 1..=8 retained for b (away), and the
/// history says epoch 2 started after delta 5.
fn owner_with_epoch_history(handed_over: bool) -> Pair {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    for index in 0..8u64 {
        pair.write(false, index * 4096, block(index as u8 + 1));
        pair.tick(100);
    }
    assert_eq!(pair.a.engine.replication_status()[0].last_seq, DeltaSeq(8));
    pair.a.engine.set_epoch_history(
        GROUP,
        vec![
            EpochStart {
                epoch: Epoch(1),
                after_seq: DeltaSeq(0),
                handed_over: false,
            },
            EpochStart {
                epoch: Epoch(2),
                after_seq: DeltaSeq(5),
                handed_over,
            },
        ],
    );
    pair
}

/// b's state at a after a resume from b holding `have` under `epoch`
/// (unknown: `None`), epoch 2 having started by a hand-over or not.
fn answer_to_resume_after(have: u64, epoch: Option<u64>, handed_over: bool) -> (PeerState, u64) {
    let mut pair = owner_with_epoch_history(handed_over);
    pair.a.engine.receive(
        pair.now,
        B,
        SiteMessage::Resume {
            group: GROUP,
            have: Some(DeltaSeq(have)),
            have_epoch: epoch.map(Epoch),
            lost_regions: None,
            resume: 1,
        },
    );
    pair.a.run();
    let state = pair.a.engine.replication_status()[0].peers[0].state;
    let diverged = pair.a.engine.marks().count(Mark::DivergedReplicaResync);
    (state, diverged)
}

fn answer_to_resume(have: u64, epoch: u64) -> (PeerState, u64) {
    answer_to_resume_after(have, Some(epoch), false)
}

#[test]
fn a_site_that_lost_its_epoch_is_resynced_only_past_a_failover() {
    // Delta 7 is past the start of epoch 2: after a failover the site may
    // be the old owner that kept writing; after a hand-over it cannot be.
    assert_eq!(
        answer_to_resume_after(7, None, false),
        (PeerState::Resyncing, 1)
    );
    assert_eq!(
        answer_to_resume_after(7, None, true),
        (PeerState::Streaming, 0)
    );
    // Before the boundary nothing can differ.
    assert_eq!(
        answer_to_resume_after(4, None, false),
        (PeerState::Streaming, 0)
    );
}

#[test]
fn an_owner_resyncs_every_region_to_a_site_whose_deltas_diverged() {
    // Delta 7 was written under epoch 2 here: b's delta 7 of epoch 1 is
    // not this site's.
    assert_eq!(answer_to_resume(7, 1), (PeerState::Resyncing, 1));
    // On the owner's line: streamed from retained deltas.
    assert_eq!(answer_to_resume(7, 2), (PeerState::Streaming, 0));
    assert_eq!(answer_to_resume(4, 1), (PeerState::Streaming, 0));
}

#[test]
fn a_diverged_resync_copies_every_region() {
    let mut pair = owner_with_epoch_history(false);
    pair.a.engine.receive(
        pair.now,
        B,
        SiteMessage::Resume {
            group: GROUP,
            have: Some(DeltaSeq(7)),
            have_epoch: Some(Epoch(1)),
            lost_regions: None,
            resume: 1,
        },
    );
    let regions_read = regions_read_by(&mut pair.a.engine);
    // Every region of the volume, not only region 0 (the one delta 8
    // touched).
    let regions = VOLUME_BYTES / (REGION_BLOCKS * BLOCK_SIZE as u64);
    assert_eq!(regions_read, (0..regions).collect());
}

#[test]
fn a_site_holding_deltas_a_failover_discarded_takes_no_delta_before_its_resync() {
    // a wrote deltas 1..=8 under epoch 1; b took the group over after
    // delta 5, so a's 6..=8 are a line the cluster dropped.
    let mut pair = owner_with_epoch_history(false);
    pair.a.engine.set_owner(GROUP, B, Epoch(2));
    pair.a.run();
    let refused = pair.a.engine.stats().refused_messages_total;
    let delta = |seq: u64| DeltaRecord {
        position: JournalPosition(seq),
        group: GROUP,
        epoch: Epoch(2),
        seq: DeltaSeq(seq),
        blocks: vec![(
            BlockKey {
                volume: VOLUME,
                block: 40,
            },
            BlockImage::Data(block(9)),
        )],
    };
    // b's delta 7 is not a's 7 (it would be dropped as held already), and
    // b's delta 9 does not follow a's 8: both wait for the resync.
    for seq in [7, 9] {
        pair.a
            .engine
            .receive(pair.now, B, SiteMessage::Delta(delta(seq)));
        let actions: Vec<Action> = std::iter::from_fn(|| pair.a.engine.poll_action()).collect();
        assert!(
            !actions
                .iter()
                .any(|action| matches!(action, Action::AppendJournal { .. })),
            "delta {seq} of the new owner's line was journaled on the discarded one: {actions:?}"
        );
    }
    assert_eq!(pair.a.engine.stats().refused_messages_total, refused + 2);
    assert_eq!(pair.a.engine.replication_status()[0].last_seq, DeltaSeq(8));
}

#[test]
fn a_site_resuming_mid_way_through_another_owners_resync_gets_every_region() {
    // a owns the group; b, away, is marked for resync of the regions a
    // wrote (the backlog overflowed) before it ever resumed here.
    let mut engine = owner_engine();
    let big = Bytes::from(vec![6u8; 64 << 10]);
    for index in 0..6u64 {
        let id = RequestId(index + 1);
        let write = Request::Write {
            volume: VOLUME,
            offset: index * (64 << 10),
            data: big.clone(),
            fua: true,
        };
        engine.submit(Timestamp(0), id, write);
        while let Some(action) = engine.poll_action() {
            match action {
                Action::SyncJournal { io, .. } => engine.journal_synced(io, Ok(())),
                Action::WriteLeg { io, .. } => engine.leg_written(io, Ok(())),
                _ => {}
            }
        }
    }
    assert_eq!(
        engine.replication_status()[0].peers[0].state,
        PeerState::NeedsResync
    );
    // b comes back mid-resync: of another owner's line (a failover or a
    // move came in between), holding regions this site knows nothing of.
    engine.peer_up(Timestamp(0), B);
    engine.receive(
        Timestamp(0),
        B,
        SiteMessage::Resume {
            group: GROUP,
            have: None,
            have_epoch: None,
            lost_regions: None,
            resume: 1,
        },
    );
    // Chunks go out as regions are read; none is acknowledged, so every
    // region is either still to copy or sent and unacknowledged.
    while let Some(action) = engine.poll_action() {
        match action {
            Action::ReadLeg { io, length, .. } => {
                engine.leg_read_done(io, Ok(Bytes::from(vec![0u8; length as usize])));
            }
            Action::SyncJournal { io, .. } => engine.journal_synced(io, Ok(())),
            _ => {}
        }
    }
    let regions = VOLUME_BYTES / (REGION_BLOCKS * BLOCK_SIZE as u64);
    assert_eq!(
        engine.replication_status()[0].peers[0].resync_regions_left,
        regions,
        "b must get every region, not only those written here"
    );
}

#[test]
fn without_an_epoch_history_a_resume_is_judged_by_seq_alone() {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    for index in 0..3u64 {
        pair.write(false, index * 4096, block(1));
        pair.tick(100);
    }
    pair.a.engine.receive(
        pair.now,
        B,
        SiteMessage::Resume {
            group: GROUP,
            have: Some(DeltaSeq(2)),
            have_epoch: Some(Epoch(9)),
            lost_regions: None,
            resume: 1,
        },
    );
    pair.a.run();
    assert_eq!(
        pair.a.engine.replication_status()[0].peers[0].state,
        PeerState::Streaming
    );
}

#[test]
fn a_replica_taking_over_refuses_deltas_and_reports_the_seq_it_holds() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.tick(100);
    // Not at the owner, nor for an unknown group.
    assert_eq!(pair.a.engine.begin_takeover(pair.now, GROUP), None);
    assert_eq!(pair.b.engine.begin_takeover(pair.now, GroupId(99)), None);
    assert_eq!(
        pair.b.engine.begin_takeover(pair.now, GROUP),
        Some(DeltaSeq(1))
    );
    let refused = pair.b.engine.stats().refused_messages_total;
    pair.write(false, 4096, block(2));
    pair.tick(100);
    assert!(pair.b.engine.stats().refused_messages_total > refused);
    assert_eq!(pair.b.engine.replication_status()[0].last_seq, DeltaSeq(1));
    assert_eq!(pair.b.leg.get(&1), None);
    // Called off: b follows a again and gets what it refused.
    pair.b.engine.cancel_takeover(GROUP);
    pair.settle();
    pair.tick(100);
    assert_legs_equal(&pair);
    assert_eq!(pair.b.leg.get(&1), Some(&block(2)));
}

#[test]
fn a_replica_mid_resync_cannot_take_over() {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    let resume = pair.b_resumes();
    // The first chunk of a resync arrives; the rest never does.
    let chunk = SiteMessage::Resync {
        group: GROUP,
        blocks: vec![(
            BlockKey {
                volume: VOLUME,
                block: 0,
            },
            BlockImage::Data(block(3)),
        )],
        last: false,
        base: DeltaSeq(4),
        consistent_at: DeltaSeq(4),
        consistent_epoch: Some(Epoch(1)),
        resume,
    };
    pair.b.engine.receive(pair.now, A, chunk);
    pair.b.run();
    assert!(!pair.b.engine.replication_status()[0].consistent);
    assert_eq!(pair.b.engine.begin_takeover(pair.now, GROUP), None);
}

#[test]
fn a_replica_takes_over_only_once_its_journal_holds_the_deltas_it_offers() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.tick(100);
    // Delta 2 reaches b, whose journal has not synced it yet when a is
    // cut off: b holds it in memory only.
    let delta = SiteMessage::Delta(DeltaRecord {
        position: JournalPosition(99),
        group: GROUP,
        epoch: Epoch(1),
        seq: DeltaSeq(2),
        blocks: vec![(
            BlockKey {
                volume: VOLUME,
                block: 1,
            },
            BlockImage::Data(block(2)),
        )],
    });
    pair.b.engine.receive(pair.now, A, delta);
    let mut sync = None;
    while let Some(action) = pair.b.engine.poll_action() {
        if let Action::SyncJournal { io, .. } = action {
            sync = Some(io);
        }
    }
    let sync = sync.expect("b syncs its journal after the append");
    // A crash now would bring b back at delta 1: it must not own the group
    // from delta 2.
    assert_eq!(pair.b.engine.begin_takeover(pair.now, GROUP), None);
    pair.b.engine.journal_synced(sync, Ok(()));
    pair.b.run();
    assert_eq!(
        pair.b.engine.begin_takeover(pair.now, GROUP),
        Some(DeltaSeq(2))
    );
}

#[test]
fn a_completed_takeover_numbers_the_new_epochs_deltas_after_the_seq_reported() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.tick(100);
    pair.disconnect();
    let after = pair
        .b
        .engine
        .begin_takeover(pair.now, GROUP)
        .expect("b is a replica at a delta boundary");
    pair.b.engine.set_owner(GROUP, B, Epoch(2));
    let write = pair.b.submit(
        pair.now,
        Request::Write {
            volume: VOLUME,
            offset: 4096,
            data: block(2),
            fua: true,
        },
    );
    let appended: Vec<DeltaRecord> = std::iter::from_fn(|| pair.b.engine.poll_action())
        .filter_map(|action| match action {
            Action::AppendJournal { record } => Some(record),
            _ => None,
        })
        .collect();
    assert_eq!(appended.len(), 1);
    assert_eq!(appended[0].seq, DeltaSeq(after.0 + 1));
    assert_eq!(appended[0].epoch, Epoch(2));
    pair.b.run();
    let _ = write;
}

#[test]
fn an_owner_that_learns_of_several_owners_at_once_counts_its_deltas_after_the_first() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.tick(100);
    // Cut off, a writes deltas 2 and 3 that b never gets.
    pair.disconnect();
    pair.write(false, 4096, block(2));
    pair.tick(100);
    pair.write(false, 8192, block(3));
    pair.tick(100);
    // While a is away, b takes the group over after delta 1 (epoch 2),
    // and it moves on once more after delta 4 (epoch 3): a learns both
    // at once.
    let start = |epoch, after_seq| EpochStart {
        epoch: Epoch(epoch),
        after_seq: DeltaSeq(after_seq),
        handed_over: false,
    };
    pair.a
        .engine
        .set_epoch_history(GROUP, vec![start(1, 0), start(2, 1), start(3, 4)]);
    pair.a.engine.set_owner(GROUP, B, Epoch(3));
    pair.a.run();
    // Deltas 2 and 3 are off the line from epoch 2 on, though epoch 3
    // starts after them.
    let stats = pair.a.engine.stats();
    assert_eq!(stats.failover_lost_deltas_total, 2);
    assert_eq!(stats.failover_lost_bytes_total, 2 * BLOCK_SIZE as u64);
}

#[test]
fn an_owner_replaced_by_a_takeover_counts_its_lost_deltas_and_is_resynced() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.tick(100);
    // The link is cut; a goes on writing deltas 2 and 3 that b never gets
    // (regions 0 and 3).
    pair.disconnect();
    pair.write(false, 4096, block(2));
    pair.tick(100);
    pair.write(false, 768 * 4096, block(3));
    pair.tick(100);
    // A FUA write at a whose journal sync has not come back yet.
    let in_flight = pair.a.submit(
        pair.now,
        Request::Write {
            volume: VOLUME,
            offset: 12288,
            data: block(4),
            fua: true,
        },
    );
    // Its delta reaches the journal; the sync has not come back.
    let mut sync = None;
    while let Some(action) = pair.a.engine.poll_action() {
        match action {
            Action::AppendJournal { record } => pair.a.journal.push(record),
            Action::SyncJournal { io, .. } => sync = Some(io),
            other => panic!("unexpected action {other:?}"),
        }
    }
    let sync = sync.expect("a FUA write syncs the journal");
    // b takes over after delta 1, under epoch 2.
    let after = pair.b.engine.begin_takeover(pair.now, GROUP);
    assert_eq!(after, Some(DeltaSeq(1)));
    let history = vec![
        EpochStart {
            epoch: Epoch(1),
            after_seq: DeltaSeq(0),
            handed_over: false,
        },
        EpochStart {
            epoch: Epoch(2),
            after_seq: DeltaSeq(1),
            handed_over: false,
        },
    ];
    pair.b.engine.set_epoch_history(GROUP, history.clone());
    pair.b.engine.set_owner(GROUP, B, Epoch(2));
    // b writes deltas 2, 3 and 4 of epoch 2: the same seqs as a's lost
    // ones, other contents (regions 0 and 2).
    for block_number in [0u64, 5, 512] {
        pair.write(true, block_number * 4096, block(9));
        pair.tick(100);
    }
    // a learns it; its unacknowledged write fails.
    pair.a.engine.set_epoch_history(GROUP, history);
    pair.a.engine.set_owner(GROUP, B, Epoch(2));
    pair.a.engine.journal_synced(sync, Ok(()));
    pair.a.run();
    assert!(
        matches!(pair.a.reply(in_flight), Some(Err(RequestError::Io(message))) if message.contains("ownership")),
        "{:?}",
        pair.a.reply(in_flight)
    );
    // Deltas 2, 3 and the one holding the FUA write: lost to the cluster.
    let stats = pair.a.engine.stats();
    assert_eq!(stats.failover_lost_deltas_total, 3);
    assert_eq!(stats.failover_lost_bytes_total, 3 * BLOCK_SIZE as u64);
    // Until it is resynced, a's image is on the line the cluster left: it
    // says so, refuses snapshot reads, and cannot take the group back (it
    // would bring the lost deltas back to life under b's).
    assert!(!pair.a.engine.replication_status()[0].consistent);
    assert_eq!(pair.a.engine.begin_takeover(pair.now, GROUP), None);
    let snapshot = pair.a.submit(
        pair.now,
        Request::ReadSnapshot {
            volume: VOLUME,
            offset: 0,
            length: 4096,
        },
    );
    pair.a.run();
    assert!(
        matches!(pair.a.reply(snapshot), Some(Err(RequestError::Io(message))) if message.contains("failover")),
        "{:?}",
        pair.a.reply(snapshot)
    );
    // A strict read at a asks b for the whole range: a's seq 4 names a
    // delta of the line the cluster left, so a diff after it from b's
    // history (b's own seq 4) would leave a's lost blocks standing.
    pair.a.submit(
        pair.now,
        Request::Read {
            volume: VOLUME,
            offset: 0,
            length: 4 * 4096,
        },
    );
    let sent = pair.a.run();
    assert!(
        matches!(
            sent.as_slice(),
            [(B, SiteMessage::ReadRequest { have: None, .. })]
        ),
        "{sent:?}"
    );
    assert_eq!(pair.a.engine.marks().count(Mark::DivergedWholeRead), 1);
    // Back in touch: b sees a's line diverged and copies the regions that
    // may differ: the ones a's lost deltas wrote (0 and 3, named in its
    // resume) and the ones b wrote since delta 1 (0 and 2), not region 1.
    // a sends no acks of its own line's seqs (b's deltas 2 to 4 share
    // them).
    pair.connect();
    pair.tick(100);
    pair.tick(100);
    assert_eq!(pair.b.engine.marks().count(Mark::DivergedRegionResync), 1);
    assert_eq!(pair.b.engine.marks().count(Mark::DivergedReplicaResync), 0);
    assert_eq!(pair.b.engine.stats().resync_regions_done_total, 3);
    assert_eq!(pair.a.engine.marks().count(Mark::DivergedResume), 1);
    assert!(pair.a.engine.replication_status()[0].consistent);
    assert_legs_equal(&pair);
    assert_eq!(pair.a.leg.get(&0), Some(&block(9)));
    assert_eq!(pair.a.leg.get(&512), Some(&block(9)));
    // What a alone wrote is gone from its image too.
    let zero = Bytes::from(vec![0u8; BLOCK_SIZE]);
    for lost in [1u64, 3, 768] {
        assert_eq!(pair.a.leg.get(&lost), Some(&zero), "block {lost}");
    }
    // And streams b's deltas afterwards.
    pair.write(true, 4096, block(10));
    pair.tick(100);
    assert_eq!(pair.a.leg.get(&1), Some(&block(10)));
}

#[test]
fn a_strict_read_waiting_for_an_owner_replaced_by_a_takeover_is_served_here() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.tick(100);
    // b asks a for a strict read; the link is cut before a answers.
    let read = pair.b.submit(
        pair.now,
        Request::Read {
            volume: VOLUME,
            offset: 0,
            length: 4096,
        },
    );
    let sent = pair.b.run();
    assert!(
        matches!(sent.as_slice(), [(A, SiteMessage::ReadRequest { .. })]),
        "{sent:?}"
    );
    pair.disconnect();
    // b takes the group over: the read is answered from b's image, not
    // failed at its timeout for want of an answer from a.
    let after = pair.b.engine.begin_takeover(pair.now, GROUP);
    assert_eq!(after, Some(DeltaSeq(1)));
    pair.b.engine.set_epoch_history(
        GROUP,
        vec![
            EpochStart {
                epoch: Epoch(1),
                after_seq: DeltaSeq(0),
                handed_over: false,
            },
            EpochStart {
                epoch: Epoch(2),
                after_seq: DeltaSeq(1),
                handed_over: false,
            },
        ],
    );
    pair.b.engine.set_owner(GROUP, B, Epoch(2));
    pair.b.run();
    assert_eq!(pair.b.read_reply(read), block(1));
    assert_eq!(pair.b.engine.stats().remote_reads_served_here_total, 1);
    pair.tick(2_000);
    assert_eq!(pair.b.engine.stats().remote_timeouts_total, 0);
}

/// A takeover by a site that lagged starts its epoch at an older seq than
/// the epoch it ends: the line it starts replaces everything after that
/// seq, so a seq belongs to the newest epoch that starts before it.
#[test]
fn a_seq_belongs_to_the_newest_epoch_that_starts_before_it() {
    let mut pair = Pair::new(Mode::Async);
    let start = |epoch: u64, after: u64| EpochStart {
        epoch: Epoch(epoch),
        after_seq: DeltaSeq(after),
        handed_over: false,
    };
    // Given out of order: the engine orders it by epoch.
    pair.a
        .engine
        .set_epoch_history(GROUP, vec![start(3, 0), start(1, 0), start(2, 6)]);
    for seq in [1, 6, 7, 15] {
        assert_eq!(
            pair.a.engine.epoch_at(GROUP, DeltaSeq(seq)),
            Some(Epoch(3)),
            "seq {seq}"
        );
    }
    // A site that resynced from the epoch-3 owner up to seq 15 is on the
    // line; one whose seq 15 was written under epoch 2 is not.
    assert!(
        !pair
            .a
            .engine
            .replica_diverged(GROUP, DeltaSeq(15), Some(Epoch(3)))
    );
    assert!(
        pair.a
            .engine
            .replica_diverged(GROUP, DeltaSeq(15), Some(Epoch(2)))
    );
    pair.a
        .engine
        .set_epoch_history(GROUP, vec![start(1, 0), start(2, 10), start(3, 5)]);
    assert_eq!(pair.a.engine.epoch_at(GROUP, DeltaSeq(3)), Some(Epoch(1)));
    assert_eq!(pair.a.engine.epoch_at(GROUP, DeltaSeq(7)), Some(Epoch(3)));
    assert_eq!(pair.a.engine.epoch_at(GROUP, DeltaSeq(12)), Some(Epoch(3)));
}

/// A delta b applied stays retained for a third site that never
/// connected: b has nothing left to apply, c lacks it.
#[test]
fn unapplied_deltas_count_only_what_each_site_lacks() {
    const C: SiteId = SiteId(3);
    let mut config_a = config(A, B);
    config_a.peers.push(C);
    let mut pair = Pair::with_configs(Mode::Async, config_a, config(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    assert_eq!(pair.b.leg.get(&0), Some(&block(1)));
    let status = pair.a.engine.replication_status();
    let unapplied = |peer: SiteId| {
        status[0]
            .peers
            .iter()
            .find(|progress| progress.peer == peer)
            .map(|progress| progress.unapplied_deltas)
    };
    assert_eq!(unapplied(B), Some(0));
    assert_eq!(unapplied(C), Some(1));
}

/// A site acknowledging a delta this owner never shipped to it numbers
/// another line's deltas (it owned the group before a failover and applied
/// its own last deltas since): the acknowledgement is refused, or the
/// owner would retire deltas the site lacks and count journals that never
/// held them.
#[test]
fn acknowledgements_of_deltas_never_shipped_are_refused() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    assert_eq!(pair.b.leg.get(&0), Some(&block(1)));
    let refused = pair.a.engine.stats().refused_messages_total;
    let now = pair.now;
    for message in [
        SiteMessage::Applied {
            group: GROUP,
            seq: DeltaSeq(5),
        },
        SiteMessage::Journaled {
            group: GROUP,
            seq: DeltaSeq(5),
        },
    ] {
        pair.a.engine.receive(now, B, message);
    }
    assert_eq!(pair.a.engine.stats().refused_messages_total, refused + 2);
    assert_eq!(
        pair.a.engine.replication_status()[0].peers[0].applied,
        DeltaSeq(1)
    );
}

#[test]
fn a_hand_over_is_not_ready_while_the_new_owner_lacks_deltas() {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.a
        .engine
        .hand_over(pair.now, GROUP)
        .expect("a owns the group");
    assert!(
        !pair.a.engine.hand_over_ready(GROUP, B),
        "b lacks the delta a wrote while it was away"
    );
    pair.connect();
    pair.tick(100);
    pair.tick(100);
    assert!(pair.a.engine.hand_over_ready(GROUP, B));
}

// ---------------------------------------------------------------------------
// Read leases

impl Pair {
    /// b asks a (the owner) for a lease on `regions` regions from
    /// `first_region` of the volume, naming delta `have`: the lease a
    /// grants, in milliseconds (0: refused).
    fn ask_a_for_lease(&mut self, id: u64, first_region: u64, regions: u64, have: u64) -> u64 {
        self.a.engine.receive(
            self.now,
            B,
            SiteMessage::LeaseRequest {
                id,
                volume: VOLUME,
                first_region,
                regions,
                have: DeltaSeq(have),
            },
        );
        let sent = self.a.run();
        match sent.as_slice() {
            [
                (
                    B,
                    SiteMessage::LeaseReply {
                        id: replied,
                        lease_ms,
                    },
                ),
            ] if *replied == id => *lease_ms,
            _ => panic!("expected one lease reply to request {id}: {sent:?}"),
        }
    }

    /// b's engine sent the owner a strict read (it served none locally);
    /// the messages go on their way.
    fn expect_read_request_from_b(&mut self) {
        let sent = self.b.run();
        assert!(
            sent.iter()
                .any(|(_, message)| matches!(message, SiteMessage::ReadRequest { .. })),
            "no strict read went to the owner: {sent:?}"
        );
        if self.connected {
            self.to_a
                .extend(sent.into_iter().map(|(_, message)| message));
        }
        self.settle();
    }
}

/// `config` with read leases of 2 s (1000 ppm of drift).
fn leasing(site: SiteId, peer: SiteId) -> EngineConfig {
    EngineConfig {
        read_lease_ms: 2_000,
        ..config(site, peer)
    }
}

/// `leasing` without the cooldown after a write: a region written lately
/// may be leased at once.
fn leasing_without_cooldown(site: SiteId, peer: SiteId) -> EngineConfig {
    EngineConfig {
        read_lease_cooldown_ms: 0,
        ..leasing(site, peer)
    }
}

/// Two sites with read leases on; a wrote block 0 (region 0) and b holds
/// it; then b read it, once from the owner, which leased b region 0.
fn pair_with_a_lease_at_b() -> Pair {
    let mut pair = Pair::with_configs(Mode::Async, leasing(A, B), leasing(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    let first = pair.read(true, false, 0, 4096);
    assert_eq!(pair.b.read_reply(first), block(1));
    assert_eq!(
        pair.b
            .engine
            .read_lease_counters(VOLUME)
            .remote_strict_reads_total,
        1
    );
    assert_eq!(pair.b.engine.marks().count(Mark::ReadLeaseGranted), 1);
    pair
}

fn strict_read(offset: u64) -> Request {
    Request::Read {
        volume: VOLUME,
        offset,
        length: 4096,
    }
}

fn write_request(offset: u64, byte: u8) -> Request {
    Request::Write {
        volume: VOLUME,
        offset,
        data: block(byte),
        fua: false,
    }
}

#[test]
fn a_strict_read_under_a_read_lease_is_served_without_asking_the_owner() {
    let mut pair = pair_with_a_lease_at_b();
    let read = pair.b.submit(pair.now, strict_read(0));
    let sent = pair.b.run();
    assert!(sent.is_empty(), "a leased read asked the owner: {sent:?}");
    assert_eq!(pair.b.read_reply(read), block(1));
    // Another block of the same 1 MiB region is leased too.
    let other = pair.b.submit(pair.now, strict_read(8 * 4096));
    assert!(pair.b.run().is_empty());
    assert_eq!(pair.b.read_reply(other), Bytes::from(vec![0u8; BLOCK_SIZE]));
    let counters = pair.b.engine.read_lease_counters(VOLUME);
    assert_eq!(
        (
            counters.local_strict_reads_total,
            counters.remote_strict_reads_total
        ),
        (2, 1)
    );
    // A region never leased still asks the owner.
    let far = pair.b.submit(pair.now, strict_read(VOLUME_BYTES - 4096));
    pair.expect_read_request_from_b();
    assert_eq!(pair.b.read_reply(far), Bytes::from(vec![0u8; BLOCK_SIZE]));
}

#[test]
fn an_owner_write_to_a_leased_region_waits_until_the_holder_confirms_its_revocation() {
    let mut pair = pair_with_a_lease_at_b();
    let write = pair.a.submit(pair.now, write_request(4096, 2));
    let sent = pair.a.run();
    let [(B, revoke @ SiteMessage::LeaseRevoke { all: false, .. })] = sent.as_slice() else {
        panic!("expected one revocation, got {sent:?}");
    };
    assert_eq!(
        pair.a.reply(write),
        None,
        "acknowledged before the revocation"
    );
    pair.b.engine.receive(pair.now, A, revoke.clone());
    let confirmed = pair.b.run();
    assert!(matches!(
        confirmed.as_slice(),
        [(A, SiteMessage::LeaseRevoked { .. })]
    ));
    // The same confirmation from a site the revocation did not go to is
    // refused.
    let refused = pair.a.engine.stats().refused_messages_total;
    pair.a
        .engine
        .receive(pair.now, SiteId(9), confirmed[0].1.clone());
    pair.a.run();
    assert_eq!(pair.a.reply(write), None);
    assert_eq!(pair.a.engine.stats().refused_messages_total, refused + 1);
    // b's confirmation arrives 30 ms later.
    pair.now = Timestamp(pair.now.0 + 30_000_000);
    pair.a.engine.receive(pair.now, B, confirmed[0].1.clone());
    pair.a.run();
    assert!(matches!(pair.a.reply(write), Some(Ok(Response::Done))));
    let counters = pair.a.engine.read_lease_counters(VOLUME);
    assert_eq!(
        (counters.revocations_total, counters.writes_waited_total),
        (1, 1)
    );
    assert_eq!(counters.write_wait_nanos_total, 30_000_000);
    // b asks the owner again, and sees the write.
    let read = pair.b.submit(pair.now, strict_read(4096));
    pair.expect_read_request_from_b();
    assert_eq!(pair.b.read_reply(read), block(2));
    // The region is not leased again while the owner writes it.
    let again = pair.read(true, false, 4096, 4096);
    assert_eq!(pair.b.read_reply(again), block(2));
    assert_eq!(pair.b.engine.marks().count(Mark::ReadLeaseGranted), 1);
}

/// A group whose owner holds a write waiting for a revocation is not
/// ready to hand over: the write came before the hand-over, is accepted
/// once the revocation is confirmed, and the new owner must hold it.
#[test]
fn a_hand_over_waits_for_a_write_waiting_on_a_revocation() {
    let mut pair = pair_with_a_lease_at_b();
    let write = pair.a.submit(pair.now, write_request(4096, 2));
    let sent = pair.a.run();
    let [(B, revoke @ SiteMessage::LeaseRevoke { .. })] = sent.as_slice() else {
        panic!("expected one revocation, got {sent:?}");
    };
    pair.a
        .engine
        .hand_over(pair.now, GROUP)
        .expect("a owns the group");
    pair.a.run();
    assert!(
        !pair.a.engine.hand_over_ready(GROUP, B),
        "ready while a write waits for b's confirmation"
    );
    pair.b.engine.receive(pair.now, A, revoke.clone());
    let confirmed = pair.b.run();
    pair.a.engine.receive(pair.now, B, confirmed[0].1.clone());
    // Accepted once the revocation is confirmed (it came before the
    // hand-over), and the group is ready only once b holds it.
    let sent = pair.a.run();
    assert!(matches!(pair.a.reply(write), Some(Ok(Response::Done))));
    pair.to_b
        .extend(sent.into_iter().map(|(_, message)| message));
    pair.tick(100);
    assert!(pair.a.engine.hand_over_ready(GROUP, B));
    assert_eq!(pair.b.leg.get(&1), Some(&block(2)));
}

#[test]
fn writes_to_regions_no_other_site_leases_do_not_wait() {
    let mut pair = pair_with_a_lease_at_b();
    let write = pair
        .a
        .submit(pair.now, write_request(REGION_BLOCKS * 4096, 3));
    let sent = pair.a.run();
    assert!(
        !sent
            .iter()
            .any(|(_, message)| matches!(message, SiteMessage::LeaseRevoke { .. })),
        "{sent:?}"
    );
    assert!(matches!(pair.a.reply(write), Some(Ok(Response::Done))));
}

#[test]
fn a_write_waits_out_the_lease_of_a_holder_that_does_not_answer() {
    let mut pair = pair_with_a_lease_at_b();
    pair.disconnect();
    let write = pair.write(false, 0, block(4));
    pair.tick(1_900);
    assert_eq!(
        pair.a.reply(write),
        None,
        "acknowledged while b may hold the lease"
    );
    // The owner counts 2 s stretched by the drift bound (2002 ms) from its
    // grant at 100 ms; b's own count ended at 2098 ms.
    pair.tick(100);
    assert_eq!(
        pair.a.reply(write),
        None,
        "acknowledged before the stretched period"
    );
    pair.tick(50);
    assert!(matches!(pair.a.reply(write), Some(Ok(Response::Done))));
    assert_eq!(pair.a.engine.marks().count(Mark::ReadLeaseRanOut), 1);
}

#[test]
fn a_holder_stops_serving_locally_before_the_owner_stops_counting_its_lease() {
    let mut pair = pair_with_a_lease_at_b();
    pair.disconnect();
    // b asked at 100 ms and counts 2 s shortened by the drift bound
    // (1998 ms): its lease ended at 2098 ms, the owner's count ends at
    // 2102 ms.
    pair.tick(1_999);
    let read = pair.b.submit(pair.now, strict_read(0));
    pair.expect_read_request_from_b();
    assert_eq!(pair.b.reply(read), None, "served locally after its lease");
}

#[test]
fn a_grant_that_arrives_after_a_revocation_is_void() {
    let mut pair = Pair::with_configs(Mode::Async, leasing(A, B), leasing(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    let read = pair.b.submit(pair.now, strict_read(0));
    let asked = pair.b.run();
    for (_, message) in asked {
        pair.a.engine.receive(pair.now, B, message);
    }
    let answers = pair.a.run();
    assert!(answers.iter().any(|(_, message)| matches!(
        message,
        SiteMessage::LeaseReply {
            lease_ms: 2_000,
            ..
        }
    )));
    // The owner writes the region: the revocation overtakes the grant.
    let write = pair.a.submit(pair.now, write_request(0, 2));
    let revocation = pair.a.run();
    for (_, message) in revocation.into_iter().chain(answers) {
        pair.b.engine.receive(pair.now, A, message);
    }
    let confirmed = pair.b.run();
    assert_eq!(pair.b.read_reply(read), block(1));
    for (_, message) in confirmed {
        pair.a.engine.receive(pair.now, B, message);
    }
    pair.a.run();
    assert!(matches!(pair.a.reply(write), Some(Ok(Response::Done))));
    // The void grant serves nothing: b asks the owner.
    let again = pair.b.submit(pair.now, strict_read(0));
    pair.expect_read_request_from_b();
    assert_eq!(pair.b.read_reply(again), block(2));
}

#[test]
fn a_region_the_owner_wrote_after_what_the_site_holds_is_not_leased() {
    let mut pair = Pair::with_configs(Mode::Async, leasing(A, B), leasing(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.hold_group_lane_to_b = true;
    pair.write(false, 4096, block(2));
    let read = pair.read(true, false, 4096, 4096);
    assert_eq!(pair.b.read_reply(read), block(2));
    assert_eq!(pair.b.engine.marks().count(Mark::ReadLeaseGranted), 0);
}

/// The owner grants a lease only on regions of the volume: a request
/// naming no region, or regions past the volume's end, is refused and
/// counted; the same request for a region inside is granted, but not
/// once the owner hands the group over.
#[test]
fn lease_requests_outside_the_volume_or_during_a_hand_over_are_refused() {
    let mut pair = Pair::with_configs(Mode::Async, leasing(A, B), leasing(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    let regions = VOLUME_BYTES / (1 << 20);
    let ask = |pair: &mut Pair, first_region: u64, count: u64| {
        pair.ask_a_for_lease(77, first_region, count, 1)
    };
    assert_eq!(ask(&mut pair, regions, 1), 0, "past the end");
    assert_eq!(ask(&mut pair, regions - 1, 2), 0, "running past the end");
    assert_eq!(ask(&mut pair, 0, 0), 0, "no region");
    assert_eq!(pair.a.engine.stats().refused_messages_total, 3);
    assert_eq!(ask(&mut pair, regions - 1, 1), 2_000, "the last region");
    // Nor while it hands the group over.
    pair.a
        .engine
        .hand_over(pair.now, GROUP)
        .expect("a owns the group");
    assert_eq!(ask(&mut pair, 0, 1), 0, "handing over");
}

/// A site that does not own the group grants no lease on it, whatever it
/// holds.
#[test]
fn a_site_that_does_not_own_the_group_grants_no_lease() {
    let mut pair = Pair::with_configs(Mode::Async, leasing(A, B), leasing(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.b.engine.receive(
        pair.now,
        A,
        SiteMessage::LeaseRequest {
            id: 5,
            volume: VOLUME,
            first_region: 1,
            regions: 1,
            have: DeltaSeq(1),
        },
    );
    let sent = pair.b.run();
    assert!(
        matches!(
            sent.as_slice(),
            [(A, SiteMessage::LeaseReply { id: 5, lease_ms: 0 })]
        ),
        "{sent:?}"
    );
}

#[test]
fn a_restarted_owner_waits_for_every_lease_it_may_have_granted() {
    let mut pair = pair_with_a_lease_at_b();
    pair.restart_a_alone();
    let write = pair.write(false, 4096, block(5));
    pair.tick(1_900);
    assert_eq!(
        pair.a.reply(write),
        None,
        "the restarted owner forgot the lease b may hold"
    );
    pair.tick(150);
    assert!(matches!(pair.a.reply(write), Some(Ok(Response::Done))));
}

#[test]
fn a_restarted_owner_that_reaches_the_holders_waits_one_round_trip() {
    let mut pair = pair_with_a_lease_at_b();
    pair.restart_a();
    let write = pair.write(false, 4096, block(5));
    assert!(matches!(pair.a.reply(write), Some(Ok(Response::Done))));
    // b dropped its leases with the revocation: it asks the owner.
    let read = pair.read(true, false, 4096, 4096);
    pair.tick(100);
    assert_eq!(pair.b.read_reply(read), block(5));
}

#[test]
fn a_holder_renews_the_leases_it_reads_and_lets_idle_ones_run_out() {
    let mut pair = pair_with_a_lease_at_b();
    // Read now and then, the region stays leased: renewed in the
    // background past half of each period.
    for _ in 0..5 {
        pair.tick(900);
        let read = pair.b.submit(pair.now, strict_read(0));
        let sent = pair.b.run();
        assert!(
            sent.is_empty(),
            "a read under a renewed lease went out: {sent:?}"
        );
        assert_eq!(pair.b.read_reply(read), block(1));
    }
    let renewed = pair.b.engine.marks().count(Mark::ReadLeaseRenewed);
    assert!(
        renewed >= 2,
        "renewed {renewed} times in 4.5 s of 2 s leases"
    );
    // Unread for longer than READ_LEASE_IDLE_PERIODS_MAX periods, it is
    // no longer renewed and runs out.
    for _ in 0..(2 * READ_LEASE_IDLE_PERIODS_MAX + 2) {
        pair.tick(1_000);
    }
    let renewals = pair.b.engine.marks().count(Mark::ReadLeaseRenewed);
    pair.tick(10_000);
    assert_eq!(
        pair.b.engine.marks().count(Mark::ReadLeaseRenewed),
        renewals
    );
    let read = pair.b.submit(pair.now, strict_read(0));
    pair.expect_read_request_from_b();
    assert_eq!(pair.b.read_reply(read), block(1));
}

/// b reads regions 0 and 1 at once (both asks on their way together),
/// and both are leased.
fn pair_with_two_leased_regions(config_a: EngineConfig) -> Pair {
    let mut pair = Pair::with_configs(Mode::Async, config_a, leasing(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    let region_bytes = REGION_BLOCKS * 4096;
    let first = pair.b.submit(pair.now, strict_read(0));
    let second = pair.b.submit(pair.now, strict_read(region_bytes));
    pair.settle();
    assert_eq!(pair.b.read_reply(first), block(1));
    assert_eq!(
        pair.b.read_reply(second),
        Bytes::from(vec![0u8; BLOCK_SIZE])
    );
    pair
}

/// The lease requests (first region, regions) b's renewal round sends
/// once `millis` more have passed.
fn renewals_from_b_after(pair: &mut Pair, millis: u64) -> Vec<(u64, u64)> {
    pair.now = pair.now.saturating_add_millis(millis);
    pair.b.engine.handle_timeout(pair.now);
    pair.b
        .run()
        .iter()
        .filter_map(|(_, message)| match message {
            SiteMessage::LeaseRequest {
                first_region,
                regions,
                ..
            } => Some((*first_region, *regions)),
            _ => None,
        })
        .collect()
}

#[test]
fn leases_asked_together_are_all_granted_and_renewed_in_one_request() {
    let mut pair = pair_with_two_leased_regions(leasing(A, B));
    assert_eq!(pair.b.engine.marks().count(Mark::ReadLeaseGranted), 2);
    let region_bytes = REGION_BLOCKS * 4096;
    for offset in [0, region_bytes] {
        let read = pair.b.submit(pair.now, strict_read(offset));
        assert!(pair.b.run().is_empty(), "region at {offset} is not leased");
        assert!(pair.b.reply(read).is_some());
    }
    // Past half the period, one request renews both consecutive regions.
    assert_eq!(renewals_from_b_after(&mut pair, 1_100), vec![(0, 2)]);
}

#[test]
fn an_owner_revokes_each_leased_region_a_write_needs_while_other_revocations_are_on_their_way() {
    let mut pair = pair_with_two_leased_regions(leasing(A, B));
    let region_bytes = REGION_BLOCKS * 4096;
    let revocations = |sent: &[(SiteId, SiteMessage)]| -> Vec<Vec<(VolumeId, u64)>> {
        sent.iter()
            .filter_map(|(_, message)| match message {
                SiteMessage::LeaseRevoke { regions, .. } => Some(regions.clone()),
                _ => None,
            })
            .collect()
    };
    pair.a.submit(pair.now, write_request(0, 2));
    assert_eq!(revocations(&pair.a.run()), vec![vec![(VOLUME, 0)]]);
    // The first revocation is still on its way: the second region needs
    // its own.
    pair.a.submit(pair.now, write_request(region_bytes, 3));
    assert_eq!(revocations(&pair.a.run()), vec![vec![(VOLUME, 1)]]);
}

#[test]
fn an_owner_grants_no_more_leases_than_its_bound_until_some_run_out() {
    let owner = EngineConfig {
        read_leases_max: 2,
        ..leasing(A, B)
    };
    let mut pair = pair_with_two_leased_regions(owner);
    let region_bytes = REGION_BLOCKS * 4096;
    let third = pair.read(true, false, 2 * region_bytes, 4096);
    assert!(pair.b.reply(third).is_some());
    assert_eq!(
        pair.b.engine.marks().count(Mark::ReadLeaseGranted),
        2,
        "a third lease past the bound of 2"
    );
    // Unread, the two run out (renewals stop after the idle bound); then
    // the owner has room again.
    for _ in 0..(2 * READ_LEASE_IDLE_PERIODS_MAX + 4) {
        pair.tick(1_000);
    }
    let granted = pair.b.engine.marks().count(Mark::ReadLeaseGranted);
    let again = pair.read(true, false, 2 * region_bytes, 4096);
    assert!(pair.b.reply(again).is_some());
    assert_eq!(
        pair.b.engine.marks().count(Mark::ReadLeaseGranted),
        granted + 1
    );
}

#[test]
fn a_holder_takes_no_more_leases_than_its_bound() {
    let mut pair = Pair::with_configs(
        Mode::Async,
        leasing(A, B),
        EngineConfig {
            read_leases_max: 1,
            ..leasing(B, A)
        },
    );
    pair.tick(100);
    let region_bytes = REGION_BLOCKS * 4096;
    for region in 0..3 {
        let read = pair.read(true, false, region * region_bytes, 4096);
        assert!(pair.b.reply(read).is_some());
    }
    assert_eq!(pair.b.engine.marks().count(Mark::ReadLeaseGranted), 1);
}

#[test]
fn leases_on_regions_apart_are_renewed_in_a_request_each() {
    let mut pair = Pair::with_configs(Mode::Async, leasing(A, B), leasing(B, A));
    pair.tick(100);
    let region_bytes = REGION_BLOCKS * 4096;
    for region in [0, 2] {
        let read = pair.read(true, false, region * region_bytes, 4096);
        assert!(pair.b.reply(read).is_some());
    }
    assert_eq!(
        renewals_from_b_after(&mut pair, 1_100),
        vec![(0, 1), (2, 1)]
    );
}

#[test]
fn an_owner_zeroing_a_leased_region_waits_for_the_revocation_too() {
    let mut pair = pair_with_a_lease_at_b();
    let zeroing = pair.a.submit(
        pair.now,
        Request::WriteZeroes {
            volume: VOLUME,
            offset: 0,
            length: 4096,
            fua: false,
        },
    );
    let sent = pair.a.run();
    assert!(
        sent.iter()
            .any(|(_, message)| matches!(message, SiteMessage::LeaseRevoke { .. })),
        "{sent:?}"
    );
    assert_eq!(pair.a.reply(zeroing), None, "zeroed before the revocation");
}

#[test]
fn a_site_that_owned_the_group_meanwhile_holds_none_of_its_earlier_leases() {
    let mut pair = pair_with_a_lease_at_b();
    // The group moves to b and back to a within the lease: a, back, takes
    // b (its previous owner) for holding no lease, so b must have dropped
    // the one a granted before.
    pair.a.engine.set_owner(GROUP, B, Epoch(2));
    pair.b.engine.set_owner(GROUP, B, Epoch(2));
    pair.settle();
    pair.b.engine.set_owner(GROUP, A, Epoch(3));
    pair.a.engine.set_owner(GROUP, A, Epoch(3));
    pair.settle();
    let write = pair.write(false, 0, block(6));
    assert!(matches!(pair.a.reply(write), Some(Ok(Response::Done))));
    let read = pair.b.submit(pair.now, strict_read(0));
    pair.expect_read_request_from_b();
    assert_eq!(pair.b.read_reply(read), block(6));
}

#[test]
fn a_write_waiting_for_a_revocation_keeps_the_owner_undrained() {
    let mut pair = pair_with_a_lease_at_b();
    pair.disconnect();
    let write = pair.write(false, 0, block(7));
    pair.a.engine.start_drain();
    pair.a.run();
    assert_eq!(pair.a.reply(write), None);
    assert!(
        !pair.a.engine.is_drained(),
        "drained with a write still waiting for b's lease to end"
    );
}

#[test]
fn a_region_with_a_write_still_waiting_for_its_leg_read_is_not_leased() {
    let mut pair = Pair::with_configs(Mode::Async, leasing(A, B), leasing(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    // b asks for a lease on region 0 with its strict read of it ...
    let read = pair.b.submit(pair.now, strict_read(0));
    let asked = pair.b.run();
    // ... while a's write of part of a block it does not cache waits for
    // the leg read that fills the rest: past the gate, not in the cache.
    let write = pair.a.submit(
        pair.now,
        Request::Write {
            volume: VOLUME,
            offset: 3 * 4096 + 512,
            data: Bytes::from(vec![9u8; 512]),
            fua: false,
        },
    );
    for (_, message) in asked {
        pair.a.engine.receive(pair.now, B, message);
    }
    let answers = pair.a.run();
    assert!(
        answers
            .iter()
            .any(|(_, message)| matches!(message, SiteMessage::LeaseReply { lease_ms: 0, .. })),
        "a region being written was leased: {answers:?}"
    );
    assert!(matches!(pair.a.reply(write), Some(Ok(Response::Done))));
    pair.to_b
        .extend(answers.into_iter().map(|(_, message)| message));
    pair.settle();
    assert_eq!(pair.b.read_reply(read), block(1));
}

#[test]
fn a_site_that_returns_behind_gets_the_deltas_it_missed_merged_each_block_once() {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    // Three deltas while b is away: block 0 three times, block 1 once.
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.write(false, 0, block(2));
    pair.write(false, BLOCK_SIZE as u64, block(3));
    pair.tick(100);
    pair.write(false, 0, block(4));
    pair.tick(100);
    let shipped_before = pair.a.engine.stats().shipped_bytes_total;
    pair.connect();
    pair.tick(100);
    let a = pair.a.engine.stats();
    let b = pair.b.engine.stats();
    assert_eq!(a.merged_deltas_total, 3, "the three deltas left as one");
    assert_eq!(b.received_deltas_total, 1);
    assert_eq!(
        a.shipped_bytes_total - shipped_before,
        2 * BLOCK_SIZE as u64,
        "blocks 0 and 1, once each"
    );
    assert_eq!(pair.b.engine.marks().count(Mark::MergedDeltasReceived), 1);
    assert_eq!(pair.b.leg_bytes(0, BLOCK_SIZE as u64), block(4));
    assert_eq!(
        pair.b.leg_bytes(BLOCK_SIZE as u64, BLOCK_SIZE as u64),
        block(3)
    );
    let status = pair.b.engine.replication_status();
    assert_eq!(status[0].last_seq, DeltaSeq(3), "b holds every delta");
    assert_legs_equal(&pair);
}

#[test]
fn past_the_ship_window_deltas_wait_for_the_site_to_journal_and_then_leave_merged() {
    let config_a = EngineConfig {
        ship_window_bytes_max: 2 * BLOCK_SIZE as u64,
        ..config(A, B)
    };
    let mut pair = Pair::with_configs(Mode::Async, config_a, config(B, A));
    // b's group stream is slow: nothing reaches it, nothing is journaled.
    pair.hold_group_lane_to_b = true;
    for byte in 1..=4u8 {
        pair.write(false, 0, block(byte));
        pair.tick(100);
    }
    let a = pair.a.engine.stats();
    assert_eq!(a.closed_deltas_total, 4);
    assert_eq!(
        a.shipped_deltas_total, 2,
        "two blocks fill the window: deltas 3 and 4 wait at the owner"
    );
    assert_eq!(a.merged_deltas_total, 0);
    pair.hold_group_lane_to_b = false;
    pair.settle();
    pair.tick(100);
    let a = pair.a.engine.stats();
    assert_eq!(a.shipped_deltas_total, 4);
    assert_eq!(
        a.merged_deltas_total, 2,
        "deltas 3 and 4 left as one record"
    );
    assert_eq!(
        a.shipped_bytes_total,
        3 * BLOCK_SIZE as u64,
        "block 0 crossed three times for four writes"
    );
    assert_eq!(pair.b.engine.stats().received_deltas_total, 3);
    assert_eq!(pair.b.leg_bytes(0, BLOCK_SIZE as u64), block(4));
    assert_legs_equal(&pair);
}

#[test]
fn the_measured_window_starts_at_its_floor_and_grows_with_what_the_site_acknowledges() {
    let blocks = |count: u64| count * BLOCK_SIZE as u64;
    let config_a = EngineConfig {
        ship_window_bytes_min: blocks(2),
        ..config(A, B)
    };
    let mut pair = Pair::with_configs(Mode::Async, config_a, config(B, A));
    let shipped = |pair: &Pair| pair.a.engine.stats().shipped_deltas_total;
    let held = |pair: &Pair| pair.a.engine.marks().count(Mark::MeasuredWindowHeldDeltas);
    // Nothing measured yet: the floor, two blocks, while b answers nothing.
    pair.hold_group_lane_to_b = true;
    for byte in 1..=3u8 {
        pair.write(false, blocks(u64::from(byte)), block(byte));
        pair.tick(100);
    }
    assert_eq!(shipped(&pair), 2, "the floor lets two one-block deltas out");
    assert!(held(&pair) > 0);
    // b journals the two and acknowledges each: delta 3 leaves once the
    // first acknowledgement opens the window, and is acknowledged after
    // the second. Each of the last two shipments saw two blocks delivered
    // while it was in flight: a window of four.
    pair.hold_group_lane_to_b = false;
    pair.settle();
    pair.tick(100);
    assert_eq!(shipped(&pair), 3);
    // Now four one-block deltas leave before the window holds the rest.
    pair.hold_group_lane_to_b = true;
    for byte in 5..=10u8 {
        pair.write(false, blocks(u64::from(byte)), block(byte));
        pair.tick(100);
    }
    assert_eq!(
        shipped(&pair),
        3 + 4,
        "twice the two blocks acknowledged per round trip"
    );
    pair.hold_group_lane_to_b = false;
    pair.settle();
    pair.tick(100);
    assert_eq!(shipped(&pair), 9);
    assert_eq!(pair.a.engine.stats().merged_deltas_total, 2);
    assert_eq!(pair.b.leg_bytes(blocks(10), blocks(1)), block(10));
    assert_legs_equal(&pair);
}

#[test]
fn the_measured_window_stays_within_its_maximum() {
    let blocks = |count: u64| count * BLOCK_SIZE as u64;
    let config_a = EngineConfig {
        ship_window_bytes_min: blocks(2),
        ship_window_bytes_max: blocks(3),
        ..config(A, B)
    };
    let mut pair = Pair::with_configs(Mode::Async, config_a, config(B, A));
    // Four blocks acknowledged in one round trip would make a window of
    // eight; the maximum keeps it at three.
    pair.hold_group_lane_to_b = true;
    pair.write(false, 0, Bytes::from(vec![1; 4 * BLOCK_SIZE]));
    pair.tick(100);
    pair.hold_group_lane_to_b = false;
    pair.settle();
    pair.tick(100);
    assert_eq!(pair.a.engine.stats().shipped_deltas_total, 1);
    pair.hold_group_lane_to_b = true;
    for byte in 1..=5u8 {
        pair.write(false, blocks(u64::from(byte)), block(byte));
        pair.tick(100);
    }
    assert_eq!(pair.a.engine.stats().shipped_deltas_total, 1 + 3);
    // The maximum held them, not the measured window.
    assert_eq!(
        pair.a.engine.marks().count(Mark::MeasuredWindowHeldDeltas),
        0
    );
    pair.hold_group_lane_to_b = false;
    pair.settle();
    pair.tick(100);
    assert_legs_equal(&pair);
}

#[test]
fn merged_deltas_overlapping_what_a_replica_holds_are_taken_and_ones_past_a_gap_refused() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    let status = pair.b.engine.replication_status();
    assert_eq!(status[0].last_seq, DeltaSeq(1));
    let epoch = status[0].epoch;
    let record = |seq: u64, blocks: Vec<(BlockKey, BlockImage)>| DeltaRecord {
        position: JournalPosition(0),
        group: GROUP,
        epoch,
        seq: DeltaSeq(seq),
        blocks,
    };
    let key = |block: u64| BlockKey {
        volume: VOLUME,
        block,
    };
    let refused = |pair: &Pair| pair.b.engine.stats().refused_messages_total;
    // Deltas 1 to 3, sent again after a reconnect: b holds 1 already.
    pair.b.engine.receive(
        pair.now,
        A,
        SiteMessage::Deltas {
            first: DeltaSeq(1),
            record: record(
                3,
                vec![
                    (key(0), BlockImage::Data(block(5))),
                    (key(2), BlockImage::Data(block(6))),
                ],
            ),
        },
    );
    let before = refused(&pair);
    // Deltas 5 and 6: delta 4 is missing.
    pair.b.engine.receive(
        pair.now,
        A,
        SiteMessage::Deltas {
            first: DeltaSeq(5),
            record: record(6, vec![(key(0), BlockImage::Data(block(7)))]),
        },
    );
    assert_eq!(refused(&pair), before + 1, "a gap is refused");
    // A record whose first delta comes after its last: malformed.
    pair.b.engine.receive(
        pair.now,
        A,
        SiteMessage::Deltas {
            first: DeltaSeq(5),
            record: record(4, vec![(key(0), BlockImage::Data(block(8)))]),
        },
    );
    assert_eq!(refused(&pair), before + 2, "deltas 5 to 4 are refused");
    // b's disk does its work; what it would tell a (a resume after the
    // gap) is dropped: a never wrote these deltas.
    let _ = pair.b.run();
    let status = pair.b.engine.replication_status();
    assert_eq!(status[0].last_seq, DeltaSeq(3));
    assert_eq!(pair.b.leg_bytes(0, BLOCK_SIZE as u64), block(5));
    assert_eq!(
        pair.b.leg_bytes(2 * BLOCK_SIZE as u64, BLOCK_SIZE as u64),
        block(6)
    );
}

#[test]
fn a_replica_resuming_with_merged_deltas_not_yet_on_its_disk_acknowledges_none_of_them() {
    let mut pair = Pair::new(Mode::FlushSync);
    pair.write(false, 0, block(1));
    pair.tick(100);
    let status = pair.b.engine.replication_status();
    assert_eq!(status[0].last_seq, DeltaSeq(1));
    // Deltas 2 and 3 merged reach b; its journal has not synced them.
    pair.b.engine.receive(
        pair.now,
        A,
        SiteMessage::Deltas {
            first: DeltaSeq(2),
            record: DeltaRecord {
                position: JournalPosition(0),
                group: GROUP,
                epoch: status[0].epoch,
                seq: DeltaSeq(3),
                blocks: vec![(
                    BlockKey {
                        volume: VOLUME,
                        block: 0,
                    },
                    BlockImage::Data(block(2)),
                )],
            },
        },
    );
    // The connection drops and comes back: b resumes and says again what
    // its journal and legs hold.
    pair.b.engine.peer_down(pair.now, A);
    pair.b.engine.peer_up(pair.now, A);
    let mut acked = Vec::new();
    while let Some(action) = pair.b.engine.poll_action() {
        if let Action::Send {
            message: message @ (SiteMessage::Applied { .. } | SiteMessage::Journaled { .. }),
            ..
        } = action
        {
            acked.push(message);
        }
    }
    assert!(!acked.is_empty(), "b says what it holds");
    for message in acked {
        let (SiteMessage::Applied { seq, .. } | SiteMessage::Journaled { seq, .. }) = message
        else {
            unreachable!("only acks were kept");
        };
        assert_eq!(
            seq,
            DeltaSeq(1),
            "b acknowledged a delta of a record its disk does not hold yet"
        );
    }
}

/// The owner's answer to a strict read comes off the network: blocks of
/// another volume, outside the range asked, or of the wrong length fail
/// the read (each check alone), as do answers to no request or data
/// answering a forwarded write; each is counted as refused.
#[test]
fn a_read_reply_naming_blocks_the_read_did_not_ask_for_fails_it() {
    let mut pair = Pair::new(Mode::Async);
    let key = |volume: VolumeId, block: u64| BlockKey { volume, block };
    let good = BlockImage::Data(block(7));
    let cases = [
        (
            "another volume",
            vec![(key(VolumeId(VOLUME.0 + 1), 1), good.clone())],
        ),
        ("outside the range", vec![(key(VOLUME, 2), good.clone())]),
        (
            "a short block",
            vec![(
                key(VOLUME, 1),
                BlockImage::Data(Bytes::from_static(b"short")),
            )],
        ),
    ];
    for (count, (case, blocks)) in cases.into_iter().enumerate() {
        let strict = pair.b.submit(
            pair.now,
            Request::Read {
                volume: VOLUME,
                offset: 4096,
                length: 4096,
            },
        );
        let sent = pair.b.run();
        let [(_, SiteMessage::ReadRequest { id, .. })] = sent.as_slice() else {
            panic!("{case}: expected one read request, got {sent:?}");
        };
        pair.b.engine.receive(
            pair.now,
            A,
            SiteMessage::ReadReply {
                id: *id,
                result: Ok(blocks),
            },
        );
        pair.b.run();
        assert!(
            matches!(pair.b.reply(strict), Some(Err(RequestError::Io(_)))),
            "{case}: {:?}",
            pair.b.reply(strict)
        );
        assert_eq!(
            pair.b.engine.stats().refused_messages_total,
            count as u64 + 1,
            "{case}"
        );
    }
    // An answer to no request.
    pair.b.engine.receive(
        pair.now,
        A,
        SiteMessage::ReadReply {
            id: 999_999,
            result: Ok(Vec::new()),
        },
    );
    pair.b.run();
    assert_eq!(pair.b.engine.stats().refused_messages_total, 4);
    // Data answering a forwarded write.
    let write = pair.b.submit(
        pair.now,
        Request::Write {
            volume: VOLUME,
            offset: 0,
            data: block(3),
            fua: false,
        },
    );
    let sent = pair.b.run();
    let Some(id) = sent.iter().find_map(|(_, message)| match message {
        SiteMessage::Forward { id, .. } => Some(*id),
        _ => None,
    }) else {
        panic!("expected the write forwarded, got {sent:?}");
    };
    pair.b.engine.receive(
        pair.now,
        A,
        SiteMessage::ReadReply {
            id,
            result: Ok(Vec::new()),
        },
    );
    pair.b.run();
    assert!(matches!(
        pair.b.reply(write),
        Some(Err(RequestError::Io(_)))
    ));
    assert_eq!(pair.b.engine.stats().refused_messages_total, 5);
}

/// A region a retained delta wrote after the delta the asking site names
/// is not leased to it, even once the owner's own leg holds the write
/// (its cache then holds the block clean, no longer as newer): the site
/// may still lack it. A region nothing wrote since is leased.
#[test]
fn a_region_written_after_the_delta_a_site_names_is_not_leased_once_clean_here() {
    let mut pair = Pair::with_configs(
        Mode::Async,
        leasing_without_cooldown(A, B),
        leasing_without_cooldown(B, A),
    );
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.hold_group_lane_to_b = true;
    let region_one = REGION_BLOCKS * BLOCK_SIZE as u64;
    pair.write(false, region_one, block(2));
    pair.tick(100);
    // On a's leg: clean in its cache.
    assert!(pair.a.leg.get(&REGION_BLOCKS) == Some(&block(2)));
    let mut ask = |region: u64, have: u64| pair.ask_a_for_lease(9, region, 1, have);
    assert_eq!(ask(1, 1), 0, "region 1 was written in delta 2");
    assert_eq!(ask(0, 1), 2_000, "region 0 was not written since delta 1");
    assert_eq!(ask(1, 2), 2_000, "a site holding delta 2 holds the write");
}

/// A site the owner no longer counts as streaming the group's deltas (it
/// went away, or was folded into regions to resync) is leased nothing,
/// whatever delta it names: its image may lack deltas the owner will not
/// send it one by one.
#[test]
fn a_site_that_is_not_streaming_is_leased_nothing() {
    let mut pair = Pair::with_configs(Mode::Async, leasing(A, B), leasing(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    assert_eq!(
        pair.ask_a_for_lease(1, 1, 1, 1),
        2_000,
        "streaming and holding delta 1"
    );
    pair.disconnect();
    assert_eq!(pair.ask_a_for_lease(2, 1, 1, 1), 0, "away");
}

/// A hand-over waits for the group's writes that have not reached a delta
/// yet (a partial write waiting for its block from the leg), not for
/// reads; and a new owner that went away is not ready to take the group,
/// whatever it holds.
#[test]
fn a_hand_over_waits_for_the_groups_writes_not_for_reads_and_not_for_an_away_site() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 4096, block(1));
    pair.tick(100);
    pair.tick(100);
    pair.a.leg.insert(0, block(2));
    pair.a.leg.insert(2, block(3));
    // Not run: the write waits for block 0 from a's leg.
    let partial = pair.a.submit(
        pair.now,
        Request::Write {
            volume: VOLUME,
            offset: 0,
            data: Bytes::from(vec![9u8; 512]),
            fua: false,
        },
    );
    pair.a
        .engine
        .hand_over(pair.now, GROUP)
        .expect("a owns the group");
    assert!(
        !pair.a.engine.hand_over_ready(GROUP, B),
        "a partial write of the group is in flight"
    );
    pair.settle();
    assert_eq!(pair.a.reply(partial), Some(&Ok(Response::Done)));
    pair.tick(100);
    pair.tick(100);
    assert!(pair.a.engine.hand_over_ready(GROUP, B));
    // Not run: the read waits for block 2 from a's leg.
    let read = pair.a.submit(
        pair.now,
        Request::Read {
            volume: VOLUME,
            offset: 2 * 4096,
            length: 4096,
        },
    );
    assert!(
        pair.a.engine.hand_over_ready(GROUP, B),
        "a read in flight holds nothing back"
    );
    pair.settle();
    assert_eq!(pair.a.read_reply(read), block(3));
    pair.disconnect();
    assert!(
        !pair.a.engine.hand_over_ready(GROUP, B),
        "b is away: it cannot take the group over"
    );
}

/// An owner that gave a group away and gets it back does not know what
/// was leased meanwhile: it revokes every lease a site other than the one
/// it takes the group back from may hold, before it writes.
#[test]
fn an_owner_that_gets_a_group_back_revokes_the_leases_granted_meanwhile() {
    const C: SiteId = SiteId(3);
    let three_sites = EngineConfig {
        peers: vec![B, C],
        ..leasing(A, B)
    };
    let mut a = Site::new(three_sites, Mode::Async, A);
    let revoked_all = |sent: &[(SiteId, SiteMessage)], site: SiteId| {
        sent.iter().any(|(peer, message)| {
            *peer == site
                && matches!(message, SiteMessage::LeaseRevoke { group, all: true, .. } if *group == GROUP)
        })
    };
    a.engine.handle_timeout(Timestamp::from_millis(1));
    a.submit(
        Timestamp::from_millis(1),
        Request::Write {
            volume: VOLUME,
            offset: 0,
            data: block(1),
            fua: false,
        },
    );
    let sent = a.run();
    assert!(revoked_all(&sent, B) && revoked_all(&sent, C), "{sent:?}");
    // Each revocation has its own id: the write waits for each answer.
    let ids: BTreeSet<u64> = sent
        .iter()
        .filter_map(|(_, message)| match message {
            SiteMessage::LeaseRevoke { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 2, "{sent:?}");
    a.engine.set_owner(GROUP, B, Epoch(2));
    a.run();
    a.engine.set_owner(GROUP, A, Epoch(3));
    let sent = a.run();
    assert!(revoked_all(&sent, C), "c may hold b's leases: {sent:?}");
    assert!(!revoked_all(&sent, B), "b, the owner before, held none");
    // A new epoch that leaves the group here changes nothing it knows.
    a.engine.set_owner(GROUP, A, Epoch(4));
    let sent = a.run();
    assert!(!revoked_all(&sent, B) && !revoked_all(&sent, C), "{sent:?}");
}

/// A lease is the owner's word: once the group has another owner, a
/// holder serves no strict read under the old owner's leases and asks the
/// new one. An owner named again at a new epoch keeps them.
#[test]
fn a_holder_drops_its_leases_when_the_group_gets_another_owner() {
    const C: SiteId = SiteId(3);
    let mut pair = pair_with_a_lease_at_b();
    pair.b.engine.set_owner(GROUP, A, Epoch(2));
    pair.b.run();
    let read = pair.b.submit(pair.now, strict_read(0));
    assert!(pair.b.run().is_empty(), "the same owner: still leased");
    assert_eq!(pair.b.read_reply(read), block(1));
    pair.b.engine.set_owner(GROUP, C, Epoch(3));
    pair.b.run();
    pair.b.submit(pair.now, strict_read(0));
    let sent = pair.b.run();
    assert!(
        sent.iter()
            .any(|(peer, message)| *peer == C && matches!(message, SiteMessage::ReadRequest { .. })),
        "served under a's lease: {sent:?}"
    );
}

/// Once the owner's leg holds the blocks (clean in its cache), the
/// retained history names what a strict read must get: exactly the blocks
/// written after the delta the site names, at their newest image. A site
/// naming a
/// delta past the owner's newest (its line is not the owner's) gets the
/// whole range.
#[test]
fn a_strict_read_is_answered_from_history_once_the_owners_leg_holds_the_blocks() {
    let mut pair = Pair::new(Mode::Async);
    pair.hold_group_lane_to_b = true;
    pair.write(false, 4096, block(1));
    pair.tick(100);
    pair.write(false, 2 * 4096, block(2));
    pair.tick(100);
    assert!(pair.a.leg.get(&2) == Some(&block(2)), "on a's leg: clean");
    let ask = |pair: &mut Pair, id: u64, have: u64| {
        pair.a.engine.receive(
            pair.now,
            B,
            SiteMessage::ReadRequest {
                id,
                request: Request::Read {
                    volume: VOLUME,
                    offset: 4096,
                    length: 2 * 4096,
                },
                have: Some(DeltaSeq(have)),
            },
        );
        let sent = pair.a.run();
        let [
            (
                B,
                SiteMessage::ReadReply {
                    result: Ok(blocks), ..
                },
            ),
        ] = sent.as_slice()
        else {
            panic!("expected one read reply: {sent:?}");
        };
        blocks
            .iter()
            .map(|(key, image)| (key.block, image.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ask(&mut pair, 1, 1),
        vec![(2, BlockImage::Data(block(2)))],
        "only what delta 2 wrote"
    );
    assert_eq!(
        ask(&mut pair, 2, 3),
        vec![
            (1, BlockImage::Data(block(1))),
            (2, BlockImage::Data(block(2)))
        ],
        "delta 3 is not the owner's: the whole range"
    );
}

/// Messages that make no sense where they arrive are refused and counted:
/// a resume at a site that does not own the group, a read request that
/// carries a write.
#[test]
fn a_resume_at_a_site_that_does_not_own_the_group_and_a_read_request_carrying_a_write_are_refused()
{
    let mut pair = Pair::new(Mode::Async);
    pair.b.engine.receive(
        pair.now,
        A,
        SiteMessage::Resume {
            group: GROUP,
            have: Some(DeltaSeq(0)),
            have_epoch: None,
            lost_regions: None,
            resume: 1,
        },
    );
    assert!(pair.b.run().is_empty());
    assert_eq!(pair.b.engine.stats().refused_messages_total, 1);
    pair.a.engine.receive(
        pair.now,
        B,
        SiteMessage::ReadRequest {
            id: 3,
            request: Request::Write {
                volume: VOLUME,
                offset: 0,
                data: block(1),
                fua: false,
            },
            have: None,
        },
    );
    pair.a.run();
    assert_eq!(pair.a.engine.stats().refused_messages_total, 1);
    assert_eq!(pair.a.leg.get(&0), None, "nothing written");
}

/// Requests held until this site learns it owns the group, and refused
/// once they waited past half the remote timeout, leave the bound's count
/// too: as many as the bound allows are held again after them.
#[test]
fn requests_refused_after_awaiting_ownership_too_long_leave_room_for_as_many_more() {
    let mut pair = Pair::new(Mode::Async);
    let held_round = |pair: &mut Pair, first_id: u64, count: u64| {
        pair.read_requests_from_a_at_b(first_id, count);
        read_replies(pair.b.run())
    };
    assert_eq!(held_round(&mut pair, 1, 3_000), 0, "held, not refused");
    pair.now = pair.now.saturating_add_millis(500);
    pair.b.engine.handle_timeout(pair.now);
    let refused = pair
        .b
        .run()
        .into_iter()
        .filter(|(_, message)| matches!(message, SiteMessage::ReadReply { result: Err(_), .. }))
        .count();
    assert_eq!(refused, 3_000, "refused past half the remote timeout");
    assert_eq!(
        held_round(&mut pair, 10_000, 4_096),
        0,
        "held again up to the bound"
    );
}

/// A region with a block newer than the delta the asking site names in
/// the owner's cache (in the open delta, not shipped yet) is not leased.
#[test]
fn a_region_with_a_newer_block_in_the_owners_cache_is_not_leased() {
    let mut pair = Pair::with_configs(
        Mode::Async,
        leasing_without_cooldown(A, B),
        leasing_without_cooldown(B, A),
    );
    pair.write(false, 0, block(1));
    pair.tick(100);
    let region_one = REGION_BLOCKS * BLOCK_SIZE as u64;
    pair.write(false, region_one, block(2));
    let mut ask = |region: u64| pair.ask_a_for_lease(4, region, 1, 1);
    assert_eq!(ask(1), 0, "region 1's block waits in the open delta");
    assert_eq!(ask(0), 2_000);
}

/// Each lease request carries its own id: the owner's answer names the
/// regions it grants only through it. A renewal round asks for each run
/// of consecutive regions apart.
#[test]
fn lease_renewals_for_different_runs_of_regions_carry_different_ids() {
    let mut pair = Pair::with_configs(Mode::Async, leasing(A, B), leasing(B, A));
    let region = REGION_BLOCKS * BLOCK_SIZE as u64;
    for first in [0, 2 * region] {
        let read = pair.b.submit(pair.now, strict_read(first));
        pair.expect_read_request_from_b();
        assert_eq!(pair.b.read_reply(read), Bytes::from(vec![0u8; BLOCK_SIZE]));
    }
    assert_eq!(pair.b.engine.marks().count(Mark::ReadLeaseGranted), 2);
    // Past half the period, both read again (under their leases).
    pair.now = pair.now.saturating_add_millis(1_100);
    for first in [0, 2 * region] {
        pair.b.submit(pair.now, strict_read(first));
    }
    pair.b.run();
    pair.b.engine.handle_timeout(pair.now);
    let sent = pair.b.run();
    let asked: Vec<(u64, u64)> = sent
        .iter()
        .filter_map(|(_, message)| match message {
            SiteMessage::LeaseRequest {
                id, first_region, ..
            } => Some((*id, *first_region)),
            _ => None,
        })
        .collect();
    assert_eq!(asked.len(), 2, "{sent:?}");
    assert_ne!(asked[0].0, asked[1].0, "{asked:?}");
}

/// A group handed to another site takes its retained deltas out of this
/// site's backlog: what stays counted is the groups still owned here
/// (the backlog bound throttles their writes).
#[test]
fn a_group_given_away_leaves_the_backlog() {
    let mut pair = Pair::new(Mode::Async);
    pair.hold_group_lane_to_b = true;
    pair.write(false, 0, block(1));
    pair.tick(100);
    let stats = pair.a.engine.stats();
    assert_eq!(stats.backlog_deltas, 1);
    assert!(stats.backlog_bytes >= BLOCK_SIZE as u64);
    pair.a.engine.set_owner(GROUP, B, Epoch(2));
    pair.a.run();
    let stats = pair.a.engine.stats();
    assert_eq!((stats.backlog_deltas, stats.backlog_bytes), (0, 0));
}

/// An owner that gives one group away forgets the leases it granted on
/// that group only: a write to another group's leased region still waits
/// for the holder's confirmation.
#[test]
fn giving_a_group_away_keeps_the_leases_granted_on_the_others() {
    let mut pair = pair_with_a_lease_at_b();
    let other = (VolumeId(2), GroupId(2));
    pair.add_volume_at_both(other.0, VOLUME_BYTES, other.1, Some(A));
    pair.settle();
    pair.a.engine.set_owner(other.1, B, Epoch(2));
    pair.b.engine.set_owner(other.1, B, Epoch(2));
    pair.settle();
    let write = pair.a.submit(pair.now, write_request(4096, 2));
    let sent = pair.a.run();
    assert!(
        sent.iter().any(|(peer, message)| *peer == B
            && matches!(message, SiteMessage::LeaseRevoke { group, .. } if *group == GROUP)),
        "{sent:?}"
    );
    assert_eq!(pair.a.reply(write), None, "waits for b's confirmation");
}

impl Pair {
    /// b's link to a comes up: the id of the resume b sends (not
    /// delivered).
    fn b_resumes(&mut self) -> u64 {
        self.b.engine.peer_up(self.now, A);
        let sent = self.b.run();
        sent.iter()
            .find_map(|(_, message)| match message {
                SiteMessage::Resume { resume, .. } => Some(*resume),
                _ => None,
            })
            .unwrap_or_else(|| panic!("expected b to resume: {sent:?}"))
    }
}

/// A resync's only chunk answering `resume`: block 0 as bytes of 9, the
/// image consistent at delta 1.
fn last_chunk_of_block_zero(resume: u64) -> SiteMessage {
    SiteMessage::Resync {
        group: GROUP,
        blocks: vec![(
            BlockKey {
                volume: VOLUME,
                block: 0,
            },
            BlockImage::Data(block(9)),
        )],
        last: true,
        base: DeltaSeq(1),
        consistent_at: DeltaSeq(1),
        consistent_epoch: None,
        resume,
    }
}

/// A resync chunk is taken only from the group's owner: one from another
/// site is refused even when it names the replica's latest resume (a site
/// that owned the group when that resume went out).
#[test]
fn a_resync_chunk_from_a_site_that_is_not_the_owner_is_refused() {
    const C: SiteId = SiteId(3);
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    let resume = pair.b_resumes();
    let refused = pair.b.engine.stats().refused_messages_total;
    pair.b
        .engine
        .receive(pair.now, C, last_chunk_of_block_zero(resume));
    pair.b.run();
    assert_eq!(pair.b.engine.stats().refused_messages_total, refused + 1);
    assert_eq!(pair.b.leg.get(&0), Some(&block(1)));
}

/// A replica taking a group over refuses the owner's resync chunks as it
/// refuses its deltas: its image stays at the seq it reported.
#[test]
fn a_replica_taking_over_refuses_resync_chunks() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.tick(100);
    pair.disconnect();
    let resume = pair.b_resumes();
    assert_eq!(
        pair.b.engine.begin_takeover(pair.now, GROUP),
        Some(DeltaSeq(1))
    );
    let refused = pair.b.engine.stats().refused_messages_total;
    pair.b
        .engine
        .receive(pair.now, A, last_chunk_of_block_zero(resume));
    pair.b.run();
    assert_eq!(pair.b.engine.stats().refused_messages_total, refused + 1);
    assert_eq!(pair.b.leg.get(&0), Some(&block(1)));
}

/// A forwarded write waiting at the owner for a revocation is held for
/// half the remote timeout at most (its site gives up on it after the
/// whole): then refused, never applied after its site stopped waiting.
#[test]
fn a_forwarded_write_waiting_for_a_revocation_is_refused_after_half_the_remote_timeout() {
    let mut pair = pair_with_a_lease_at_b();
    let start = pair.now;
    pair.b.submit(start, write_request(4096, 2));
    let forward = pair
        .b
        .run()
        .into_iter()
        .find(|(_, message)| matches!(message, SiteMessage::Forward { .. }))
        .expect("b forwards its write to the owner");
    pair.a.engine.receive(start, B, forward.1);
    let sent = pair.a.run();
    assert!(
        sent.iter()
            .any(|(_, message)| matches!(message, SiteMessage::LeaseRevoke { .. })),
        "{sent:?}"
    );
    // The revocation is lost on its way: b never confirms.
    let replies = |sent: &[(SiteId, SiteMessage)]| {
        sent.iter()
            .filter(|(_, message)| matches!(message, SiteMessage::ForwardReply { .. }))
            .count()
    };
    let half = config(A, B).remote_timeout_ms / 2;
    pair.a
        .engine
        .handle_timeout(start.saturating_add_millis(half - 1));
    assert_eq!(replies(&pair.a.run()), 0, "still waiting");
    pair.a
        .engine
        .handle_timeout(start.saturating_add_millis(half));
    let sent = pair.a.run();
    assert!(
        matches!(
            sent.as_slice(),
            [(
                B,
                SiteMessage::ForwardReply {
                    result: Err(RequestError::Io(_)),
                    ..
                }
            )]
        ),
        "{sent:?}"
    );
    assert_eq!(pair.a.leg.get(&1), None, "never applied");
}

/// The backlog bound holds writes back once the backlog passes it, not
/// only when it lands on it exactly (deltas of 48 KiB never sum to the
/// 256 KiB bound).
#[test]
fn a_backlog_past_the_bound_holds_writes_back_whatever_the_delta_sizes() {
    let mut pair = Pair::new(Mode::Async);
    pair.hold_group_lane_to_b = true;
    let write = Bytes::from(vec![3u8; 48 << 10]);
    let mut requests = Vec::new();
    for index in 0..10u64 {
        requests.push(pair.write(false, index * (64 << 10), write.clone()));
        pair.tick(100);
    }
    let answered = requests
        .iter()
        .filter(|request| pair.a.reply(**request).is_some())
        .count();
    assert!(answered < 10, "{answered} of 10 answered past the bound");
    assert!(pair.a.engine.stats().backlog_throttled_total > 0);
    // Held back past backlog_wait_ms_max: b is folded into regions to
    // resync, once, and the writes go ahead.
    pair.tick(2_000);
    assert_eq!(pair.a.engine.stats().backlog_folds_total, 1);
    assert_eq!(pair.a.engine.marks().count(Mark::FoldLagging), 1);
    assert!(
        requests
            .iter()
            .all(|request| pair.a.reply(*request).is_some())
    );
}

/// When the journal lets go of deltas a site away has not journaled, the
/// map saved for it first names their regions (after a restart nothing
/// else would say the site lacks them).
#[test]
fn the_map_saved_before_a_release_names_the_regions_of_deltas_a_site_lacks() {
    let small_journal = |site, peer| EngineConfig {
        backlog_bytes_max: 16 << 20,
        journal_checkpoint_bytes: 256 << 10,
        ..config(site, peer)
    };
    let mut pair = Pair::with_configs(Mode::Async, small_journal(A, B), small_journal(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    let big = Bytes::from(vec![5u8; 64 << 10]);
    for index in 0..8u64 {
        pair.write(false, index * (64 << 10), big.clone());
        pair.tick(100);
    }
    let map = pair.a.saved_maps.get(&B).cloned().unwrap_or_default();
    assert!(map.contains(&(VOLUME, 0)), "{map:?}");
    assert!(
        !map.contains(&(VOLUME, 1)),
        "region 1 was not written: {map:?}"
    );
    // Writes to region 2 and further releases: the map saved again names
    // it too (a map that changed is saved again).
    for index in 0..8u64 {
        pair.write(false, (2 << 20) + index * (64 << 10), big.clone());
        pair.tick(100);
    }
    let map = pair.a.saved_maps.get(&B).cloned().unwrap_or_default();
    assert!(
        map.contains(&(VOLUME, 0)) && map.contains(&(VOLUME, 2)),
        "{map:?}"
    );
    // Once the maps are saved the journal lets go of what the legs hold.
    assert!(
        pair.a.journal.len() < 17,
        "{} records of 17 still in the journal",
        pair.a.journal.len()
    );
}

/// With two other sites away, each journal release waits for both maps to
/// be saved, and then lets go.
#[test]
fn a_journal_release_waits_for_the_map_of_every_other_site() {
    const C: SiteId = SiteId(3);
    let config = EngineConfig {
        peers: vec![B, C],
        backlog_bytes_max: 16 << 20,
        journal_checkpoint_bytes: 256 << 10,
        ..config(A, B)
    };
    let mut a = Site::new(config, Mode::Async, A);
    let big = Bytes::from(vec![5u8; 64 << 10]);
    let mut now = Timestamp::from_millis(1);
    for index in 0..16u64 {
        a.submit(
            now,
            Request::Write {
                volume: VOLUME,
                offset: index * (64 << 10),
                data: big.clone(),
                fua: false,
            },
        );
        a.run();
        now = now.saturating_add_millis(100);
        a.engine.handle_timeout(now);
        a.run();
    }
    assert_eq!(a.saved_maps.len(), 2, "a map for b and one for c");
    assert!(
        a.journal.len() < 16,
        "{} records of 16 still in the journal",
        a.journal.len()
    );
}

#[test]
fn an_owner_replaced_while_reading_a_region_for_a_resync_names_that_region_at_heal() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    // Past the backlog bound while b is away: regions 0 and 3 to resync.
    pair.fill_regions_zero_and_three_at_a();
    // b returns; a starts reading a region to copy. Before any chunk
    // leaves, the cluster moves the group to b (a lost its lease; the
    // link between them is up): b is not mid-resync by its own account.
    pair.a.hold_leg_reads = true;
    pair.connect();
    let held = std::mem::take(&mut pair.a.held_leg_reads);
    assert!(!held.is_empty(), "a resync read is in flight");
    // b takes over after delta 1, the newest it holds.
    assert_eq!(
        pair.b.engine.begin_takeover(pair.now, GROUP),
        Some(DeltaSeq(1))
    );
    let history = vec![
        EpochStart {
            epoch: Epoch(1),
            after_seq: DeltaSeq(0),
            handed_over: false,
        },
        EpochStart {
            epoch: Epoch(2),
            after_seq: DeltaSeq(1),
            handed_over: false,
        },
    ];
    pair.b.engine.set_epoch_history(GROUP, history.clone());
    pair.b.engine.set_owner(GROUP, B, Epoch(2));
    // b writes past a's newest seq, in region 1 alone.
    for index in 0..10u64 {
        pair.b.submit(
            pair.now,
            Request::Write {
                volume: VOLUME,
                offset: (256 + index) * 4096,
                data: block(9),
                fua: false,
            },
        );
        pair.b.run();
        pair.now = pair.now.saturating_add_millis(100);
        pair.b.engine.handle_timeout(pair.now);
        pair.b.run();
    }
    pair.a.engine.set_epoch_history(GROUP, history);
    pair.a.engine.set_owner(GROUP, B, Epoch(2));
    pair.a.hold_leg_reads = false;
    for (io, offset, length) in held {
        let data = pair.a.leg_bytes(offset, length);
        pair.a.engine.leg_read_done(io, Ok(data));
    }
    pair.a.run();
    // Back in touch: what a wrote after delta 1 is the line the cluster
    // left, in the region it was reading too, and b copies it back.
    pair.connect();
    pair.tick(100);
    pair.tick(100);
    assert!(pair.a.engine.replication_status()[0].consistent);
    assert_legs_equal(&pair);
    assert_eq!(pair.a.leg.get(&0), Some(&block(1)));
}

/// Block 3 as bytes of `byte`, delta `seq` of `epoch`, as the owner ships it.
fn delta_of_block_three(seq: u64, epoch: u64, byte: u8) -> SiteMessage {
    SiteMessage::Delta(DeltaRecord {
        position: JournalPosition(0),
        group: GROUP,
        epoch: Epoch(epoch),
        seq: DeltaSeq(seq),
        blocks: vec![(
            BlockKey {
                volume: VOLUME,
                block: 3,
            },
            BlockImage::Data(block(byte)),
        )],
    })
}

/// A resync chunk answering `resume` that copies `block` as bytes of 9,
/// based on delta 1; the image is consistent once delta `consistent_at`
/// (of `consistent_epoch`) is on the legs too.
fn chunk_based_on_one(
    resume: u64,
    block_number: u64,
    last: bool,
    consistent_at: u64,
    consistent_epoch: Option<u64>,
) -> SiteMessage {
    SiteMessage::Resync {
        group: GROUP,
        blocks: vec![(
            BlockKey {
                volume: VOLUME,
                block: block_number,
            },
            BlockImage::Data(block(9)),
        )],
        last,
        base: DeltaSeq(1),
        consistent_at: DeltaSeq(consistent_at),
        consistent_epoch: consistent_epoch.map(Epoch),
        resume,
    }
}

/// The resync's only chunk answering `resume`: block 0.
fn only_chunk(resume: u64, consistent_at: u64) -> SiteMessage {
    chunk_based_on_one(resume, 0, true, consistent_at, None)
}

#[test]
fn a_resyncing_site_waits_for_the_deltas_up_to_the_resyncs_point_but_not_past_it() {
    // The resync is consistent at delta 2, which follows the chunk.
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    let resume = pair.b_resumes();
    pair.b.hold_leg_writes = true;
    pair.b.engine.receive(pair.now, A, only_chunk(resume, 2));
    pair.b
        .engine
        .receive(pair.now, A, delta_of_block_three(2, 1, 7));
    pair.b.run();
    pair.b.finish_held_leg_write();
    assert_eq!(pair.b.held_leg_writes.len(), 1, "delta 2's");
    assert!(
        !pair.b.engine.replication_status()[0].consistent,
        "consistent while delta 2 is still on its way to the legs"
    );
    pair.b.finish_held_leg_write();
    assert!(pair.b.engine.replication_status()[0].consistent);

    // Consistent at delta 1: delta 2, past that point, is not waited for.
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    let resume = pair.b_resumes();
    pair.b.hold_leg_writes = true;
    pair.b.engine.receive(pair.now, A, only_chunk(resume, 1));
    pair.b
        .engine
        .receive(pair.now, A, delta_of_block_three(2, 1, 7));
    pair.b.run();
    assert_eq!(
        pair.b.held_leg_writes.len(),
        1,
        "the chunk's (delta 2, journaled, waits behind it)"
    );
    pair.b.finish_held_leg_write();
    assert!(
        pair.b.engine.replication_status()[0].consistent,
        "the chunk is on the legs: the image is the owner's at delta 1"
    );
    pair.b.finish_held_leg_write();
    assert!(pair.b.engine.replication_status()[0].consistent);
}

#[test]
fn each_resync_chunk_is_journaled_under_the_epoch_of_the_newest_delta_it_follows() {
    // The group was handed to a new epoch after delta 1, the resync's base;
    // the resync is consistent at delta 2, the new epoch's first.
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    let history = vec![
        EpochStart {
            epoch: Epoch(1),
            after_seq: DeltaSeq(0),
            handed_over: false,
        },
        EpochStart {
            epoch: Epoch(2),
            after_seq: DeltaSeq(1),
            handed_over: true,
        },
    ];
    pair.b.engine.set_epoch_history(GROUP, history);
    pair.b.engine.set_owner(GROUP, A, Epoch(2));
    let resume = pair.b_resumes();
    let journaled_epoch = |pair: &Pair, block_number: u64| {
        pair.b
            .journal
            .iter()
            .rev()
            .find(|record| {
                record
                    .blocks
                    .iter()
                    .any(|(key, _)| key.block == block_number)
            })
            .map(|record| (record.seq, record.epoch))
    };
    // The first chunk's record names the base, written under epoch 1.
    pair.b.engine.receive(
        pair.now,
        A,
        chunk_based_on_one(resume, 0, false, 2, Some(2)),
    );
    pair.b.run();
    assert_eq!(journaled_epoch(&pair, 0), Some((DeltaSeq(1), Epoch(1))));
    // After delta 2 a chunk's record names delta 2, of epoch 2.
    pair.b
        .engine
        .receive(pair.now, A, delta_of_block_three(2, 2, 7));
    pair.b
        .engine
        .receive(pair.now, A, chunk_based_on_one(resume, 1, true, 2, Some(2)));
    pair.b.run();
    assert_eq!(journaled_epoch(&pair, 1), Some((DeltaSeq(2), Epoch(2))));
    assert!(pair.b.engine.replication_status()[0].consistent);
}

#[test]
fn a_resync_read_torn_by_a_leg_write_is_read_again() {
    // A cache of 512 KiB at a, so blocks on its leg are evicted.
    let config_a = EngineConfig {
        cache_bytes_max: 512 << 10,
        ..config(A, B)
    };
    let mut pair = Pair::with_configs(Mode::Async, config_a, config(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    // Past the backlog bound while b is away: regions 0 and 3 to resync.
    pair.fill_regions_zero_and_three_at_a();
    // b returns; a reads both regions from its leg.
    pair.a.hold_leg_reads = true;
    pair.connect();
    let (region_three, region_zero): (Vec<_>, Vec<_>) = std::mem::take(&mut pair.a.held_leg_reads)
        .into_iter()
        .partition(|(_, offset, _)| *offset >= 3 << 20);
    assert!(!region_three.is_empty() && !region_zero.is_empty());
    pair.a.hold_leg_reads = false;
    // Region 3's read sees the leg before the write below lands.
    let torn: Vec<(IoId, Bytes)> = region_three
        .into_iter()
        .map(|(io, offset, length)| (io, pair.a.leg_bytes(offset, length)))
        .collect();
    // Region 0's chunk leaves; then blocks 800 to 1023, in region 3, are
    // written: their deltas follow that chunk to b and reach a's leg, and
    // the later ones push the earlier out of a's cache. (Only region 3 is
    // written: a write elsewhere must not count as tearing its read.)
    for (io, offset, length) in region_zero {
        let data = pair.a.leg_bytes(offset, length);
        pair.a.engine.leg_read_done(io, Ok(data));
    }
    pair.settle();
    let sevens = Bytes::from(vec![7u8; 64 << 10]);
    for index in 0..14u64 {
        pair.write(false, (800 + index * 16) * 4096, sevens.clone());
        pair.tick(100);
    }
    assert_eq!(pair.a.leg.get(&800), Some(&block(7)));
    // Region 3's read returns what it saw: it must be read again, or its
    // chunk, after the delta at b, takes block 800 back to zeros.
    for (io, data) in torn {
        pair.a.engine.leg_read_done(io, Ok(data));
    }
    pair.settle();
    pair.tick(100);
    pair.tick(100);
    assert!(pair.b.engine.replication_status()[0].consistent);
    assert_legs_equal(&pair);
    assert_eq!(pair.b.leg.get(&800), Some(&block(7)));
    assert!(pair.a.engine.marks().count(Mark::ResyncReadStale) > 0);
}

#[test]
fn a_map_saved_after_a_restart_without_one_names_every_region_a_site_away_may_lack() {
    let small_journal = |site, peer| EngineConfig {
        backlog_bytes_max: 16 << 20,
        journal_checkpoint_bytes: 64 << 10,
        ..config(site, peer)
    };
    let mut pair = Pair::with_configs(Mode::Async, small_journal(A, B), small_journal(B, A));
    pair.disconnect();
    // Region 3 written while b is away; a restarts without a saved map,
    // so what b lacks of the deltas before the restart is unknown there.
    pair.write(false, 3 << 20, block(5));
    pair.tick(100);
    pair.a.saved_maps.clear();
    pair.restart_a_alone();
    // Writes to region 0 alone, with journal releases (the backlog stays
    // under its bound, b is not folded): the maps saved for b must still
    // name every region, region 3 among them.
    let big = Bytes::from(vec![6u8; 64 << 10]);
    for index in 0..4u64 {
        pair.write(false, index * (64 << 10), big.clone());
        pair.tick(100);
    }
    assert!(pair.a.saved_maps.contains_key(&B), "no map saved for b");
    // a restarts again, trusting that map; then b returns.
    pair.restart_a();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
}

#[test]
fn a_map_saved_while_regions_are_read_for_a_resync_names_them() {
    let small_journal = |site, peer| EngineConfig {
        journal_checkpoint_bytes: 64 << 10,
        ..config(site, peer)
    };
    let mut pair = Pair::with_configs(Mode::Async, small_journal(A, B), small_journal(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    // Past the backlog bound while b is away: regions 0 and 3 to resync,
    // their deltas released from a's journal.
    pair.fill_regions_zero_and_three_at_a();
    // b returns; a reads both regions to copy them, and the reads are
    // slow: no chunk leaves, so b is not mid-resync by its own account.
    pair.a.hold_leg_reads = true;
    pair.connect();
    assert!(!pair.a.held_leg_reads.is_empty(), "a resync read is held");
    // Writes to region 1 meanwhile, with journal releases: the maps saved
    // for b are all a restart here has of regions 0 and 3, which are
    // neither to resync nor in a chunk just now.
    let big = Bytes::from(vec![6u8; 64 << 10]);
    for index in 0..3u64 {
        pair.write(false, (1 << 20) + index * (64 << 10), big.clone());
        pair.tick(100);
    }
    // a crashes before the reads complete, and restarts from its map.
    pair.a.hold_leg_reads = false;
    pair.a.held_leg_reads.clear();
    pair.restart_a();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
}

#[test]
fn retiring_a_delta_keeps_a_newer_retained_image_of_its_blocks_for_strict_reads() {
    let mut pair = Pair::new(Mode::Async);
    // Block 1 written in delta 1 and again in delta 2; b journals both
    // but its leg is slow.
    pair.b.hold_leg_writes = true;
    pair.write(false, 4096, block(1));
    pair.tick(100);
    pair.write(false, 4096, block(2));
    pair.tick(100);
    assert_eq!(pair.a.leg.get(&1), Some(&block(2)), "clean at a");
    // b's leg takes delta 1 alone: a retires it, delta 2 stays retained.
    let sent = pair.b.finish_held_leg_write();
    for (_, message) in sent {
        pair.to_a.push_back(message);
    }
    pair.settle();
    // A strict read from a site holding delta 1 alone must get delta 2's
    // image of block 1 (a's cache holds it clean, so only the retained
    // history can say it is newer).
    pair.a.engine.receive(
        pair.now,
        B,
        SiteMessage::ReadRequest {
            id: 7,
            request: Request::Read {
                volume: VOLUME,
                offset: 4096,
                length: 4096,
            },
            have: Some(DeltaSeq(1)),
        },
    );
    let sent = pair.a.run();
    let [
        (
            B,
            SiteMessage::ReadReply {
                result: Ok(blocks), ..
            },
        ),
    ] = sent.as_slice()
    else {
        panic!("expected one read reply: {sent:?}");
    };
    assert_eq!(
        blocks.as_slice(),
        &[(
            BlockKey {
                volume: VOLUME,
                block: 1
            },
            BlockImage::Data(block(2))
        )]
    );
}

#[test]
fn a_diverged_site_naming_regions_outside_the_group_gets_only_the_groups_regions_copied() {
    // a also holds a volume of a group b owns: a's image of it is not
    // this group's to copy.
    const OTHER_VOLUME: VolumeId = VolumeId(2);
    let mut pair = owner_with_epoch_history(false);
    pair.a.engine.add_volume(
        OTHER_VOLUME,
        VolumeSpec {
            size: VOLUME_BYTES,
            group: GroupId(2),
            mode: Mode::Async,
        },
    );
    pair.a.engine.set_owner(GroupId(2), B, Epoch(1));
    pair.a.run();
    // b's line left a's after delta 5; b names the regions its own line
    // wrote since: region 2, and (from another site, so not trusted) a
    // region of the other group's volume and one past the volume's end.
    pair.a.engine.receive(
        pair.now,
        B,
        SiteMessage::Resume {
            group: GROUP,
            have: Some(DeltaSeq(7)),
            have_epoch: Some(Epoch(1)),
            lost_regions: Some(vec![(VOLUME, 2), (OTHER_VOLUME, 1), (VOLUME, 100)]),
            resume: 1,
        },
    );
    assert_eq!(pair.a.engine.marks().count(Mark::DivergedRegionResync), 1);
    let read: BTreeSet<(VolumeId, u64)> = std::iter::from_fn(|| pair.a.engine.poll_action())
        .filter_map(|action| match action {
            Action::ReadLeg { volume, offset, .. } => {
                Some((volume, offset / (REGION_BLOCKS * BLOCK_SIZE as u64)))
            }
            _ => None,
        })
        .collect();
    // Region 0 (a's deltas 6 to 8) and region 2 (b's own).
    assert_eq!(read, BTreeSet::from([(VOLUME, 0), (VOLUME, 2)]));
}

#[test]
fn a_diverged_site_naming_the_owners_newest_seq_still_gets_the_regions_it_was_marked_for() {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    // Past the backlog bound while b is away: b is marked for regions 0
    // and 3, and the deltas that wrote them are retired.
    pair.fill_regions_zero_and_three_at_a();
    let last = pair.a.engine.replication_status()[0].last_seq;
    // a's line left epoch 1 after delta 2; b kept writing epoch 1's line
    // (in region 1) up to the same seq as a's newest.
    pair.a.engine.set_epoch_history(
        GROUP,
        vec![
            EpochStart {
                epoch: Epoch(1),
                after_seq: DeltaSeq(0),
                handed_over: false,
            },
            EpochStart {
                epoch: Epoch(2),
                after_seq: DeltaSeq(2),
                handed_over: false,
            },
        ],
    );
    pair.a.engine.receive(
        pair.now,
        B,
        SiteMessage::Resume {
            group: GROUP,
            have: Some(last),
            have_epoch: Some(Epoch(1)),
            lost_regions: Some(vec![(VOLUME, 1)]),
            resume: 1,
        },
    );
    assert_eq!(pair.a.engine.marks().count(Mark::DivergedRegionResync), 1);
    let read = regions_read_by(&mut pair.a.engine);
    // Its own line's region and a's since the split: the same seq is not
    // the same deltas.
    assert_eq!(read, BTreeSet::from([0, 1, 3]));
}

#[test]
fn a_diverged_site_whose_line_left_before_this_run_gets_every_region() {
    let mut pair = Pair::new(Mode::Async);
    pair.disconnect();
    // Regions 3 and 0 written while b is away; a restarts without a map:
    // which regions its deltas 1 and 2 wrote is not known after it.
    pair.write(false, 3 << 20, block(5));
    pair.tick(100);
    pair.write(false, 0, block(6));
    pair.tick(100);
    pair.a.saved_maps.clear();
    pair.restart_a_alone();
    // a's line left epoch 1 after delta 1, before this run began; b kept
    // writing epoch 1's line, in region 1.
    pair.a.engine.set_epoch_history(
        GROUP,
        vec![
            EpochStart {
                epoch: Epoch(1),
                after_seq: DeltaSeq(0),
                handed_over: false,
            },
            EpochStart {
                epoch: Epoch(2),
                after_seq: DeltaSeq(1),
                handed_over: false,
            },
        ],
    );
    pair.a.run();
    pair.a.engine.receive(
        pair.now,
        B,
        SiteMessage::Resume {
            group: GROUP,
            have: Some(DeltaSeq(2)),
            have_epoch: Some(Epoch(1)),
            lost_regions: Some(vec![(VOLUME, 1)]),
            resume: 1,
        },
    );
    let read = regions_read_by(&mut pair.a.engine);
    // a's delta 2 (region 0) is on the line b left, and nothing here
    // names its regions: every region, not only b's own.
    let regions = VOLUME_BYTES / (REGION_BLOCKS * BLOCK_SIZE as u64);
    assert_eq!(read, (0..regions).collect());
}

#[test]
fn an_abandoned_resync_takes_back_only_its_own_groups_regions_being_read() {
    // A second group, owned by a too, of a volume whose blocks lie apart
    // from the first's on the in-memory legs (they are keyed by block).
    const OTHER_VOLUME: VolumeId = VolumeId(2);
    const OTHER_GROUP: GroupId = GroupId(2);
    let mut pair = Pair::new(Mode::Async);
    pair.add_volume_at_both(OTHER_VOLUME, VOLUME_BYTES, OTHER_GROUP, Some(A));
    pair.settle();
    pair.disconnect();
    // While b is away: region 3 of the other volume, then the first
    // volume's region 0 past the backlog bound. Both groups mark b.
    pair.a.submit(
        pair.now,
        Request::Write {
            volume: OTHER_VOLUME,
            offset: 3 << 20,
            data: block(5),
            fua: false,
        },
    );
    pair.tick(100);
    pair.fill_region_zero_at_a();
    // b returns; both resyncs read a region, slowly.
    pair.a.hold_leg_reads = true;
    pair.connect();
    let held = std::mem::take(&mut pair.a.held_leg_reads);
    assert_eq!(held.len(), 2, "a region of each group is being read");
    // The other group moves to b meanwhile, and the link drops: a's
    // resync of the first group is abandoned.
    pair.a.engine.set_owner(OTHER_GROUP, B, Epoch(2));
    pair.b.engine.set_owner(OTHER_GROUP, B, Epoch(2));
    pair.disconnect();
    pair.a.hold_leg_reads = false;
    for (io, offset, length) in held {
        let data = pair.a.leg_bytes(offset, length);
        pair.a.engine.leg_read_done(io, Ok(data));
    }
    pair.a.run();
    // b, the other group's owner now, overwrites the block a wrote there.
    let write = pair.b.submit(
        pair.now,
        Request::Write {
            volume: OTHER_VOLUME,
            offset: 3 << 20,
            data: block(9),
            fua: false,
        },
    );
    pair.tick(100);
    assert!(matches!(pair.b.reply(write), Some(Ok(_))), "b's write");
    // Back in touch: the first group's resync must not carry a's old
    // image of the other group's region to b.
    pair.connect();
    pair.tick(100);
    pair.tick(100);
    let read = pair.b.submit(
        pair.now,
        Request::Read {
            volume: OTHER_VOLUME,
            offset: 3 << 20,
            length: 4096,
        },
    );
    pair.settle();
    assert_eq!(pair.b.read_reply(read), block(9));
}

#[test]
fn a_region_read_of_an_abandoned_resync_that_completes_late_is_ignored() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.tick(100);
    pair.disconnect();
    // Past the backlog bound while b is away: b needs a resync of region 0.
    pair.fill_region_zero_at_a();
    // b returns; the resync's read is slow, and the link drops before it
    // completes: that resync is abandoned, and the read comes back late.
    pair.a.hold_leg_reads = true;
    pair.connect();
    pair.disconnect();
    pair.a.hold_leg_reads = false;
    let held = std::mem::take(&mut pair.a.held_leg_reads);
    assert!(!held.is_empty(), "a resync read was held");
    for (io, offset, length) in held {
        let data = pair.a.leg_bytes(offset, length);
        pair.a.engine.leg_read_done(io, Ok(data));
    }
    pair.a.run();
    // The next resync copies the region itself and ends.
    pair.connect();
    pair.tick(100);
    pair.tick(100);
    assert_legs_equal(&pair);
    assert_eq!(
        pair.a.engine.replication_status()[0].peers[0].state,
        PeerState::Streaming
    );
}

#[test]
fn requests_from_the_owner_past_the_awaiting_bound_are_refused_at_once() {
    let mut pair = Pair::new(Mode::Async);
    // b still takes a for the owner: it holds a's requests up to the
    // bound (4,096), and refuses the next one rather than hold it too.
    pair.read_requests_from_a_at_b(1, 4_096);
    assert_eq!(read_replies(pair.b.run()), 0, "held up to the bound");
    pair.read_requests_from_a_at_b(10_000, 1);
    let sent = pair.b.run();
    assert!(
        matches!(
            sent.as_slice(),
            [(
                A,
                SiteMessage::ReadReply {
                    id: 10_000,
                    result: Err(_)
                }
            )]
        ),
        "{sent:?}"
    );
}

#[test]
fn a_request_awaiting_a_change_of_owner_is_served_if_it_comes_within_half_the_remote_timeout() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(4));
    pair.tick(100);
    pair.read_requests_from_a_at_b(1, 1);
    assert_eq!(read_replies(pair.b.run()), 0, "held");
    // 100 ms later, well within half the remote timeout (500 ms), b
    // learns it owns the group: the read is answered with the data.
    pair.now = pair.now.saturating_add_millis(100);
    pair.b.engine.handle_timeout(pair.now);
    assert_eq!(read_replies(pair.b.run()), 0, "still held");
    pair.b.engine.set_owner(GROUP, B, Epoch(2));
    let sent = pair.b.run();
    let replies: Vec<&SiteMessage> = sent
        .iter()
        .map(|(_, message)| message)
        .filter(|message| matches!(message, SiteMessage::ReadReply { .. }))
        .collect();
    let [
        SiteMessage::ReadReply {
            id: 1,
            result: Ok(blocks),
        },
    ] = replies.as_slice()
    else {
        panic!("expected the read served: {sent:?}");
    };
    assert_eq!(
        blocks.as_slice(),
        &[(
            BlockKey {
                volume: VOLUME,
                block: 0
            },
            BlockImage::Data(block(4))
        )]
    );
}

#[test]
fn merged_records_stay_within_their_bound_and_the_window_counts_each_one() {
    // 1 MiB deltas, a send window of 8 MiB, and room for 17 MiB of them
    // in the cache and the backlog while b is away.
    let roomy = |site, peer| EngineConfig {
        delta_max_bytes: 1 << 20,
        cache_bytes_max: 64 << 20,
        backlog_bytes_max: 64 << 20,
        ship_window_bytes_max: 8 << 20,
        ..config(site, peer)
    };
    let mut pair = Pair::with_configs(Mode::Async, roomy(A, B), roomy(B, A));
    // Only this volume is written: the sites' legs here are keyed by block.
    let volume = VolumeId(2);
    pair.add_volume_at_both(volume, 24 << 20, GROUP, None);
    pair.disconnect();
    let megabyte = Bytes::from(vec![4u8; 1 << 20]);
    for index in 0..17u64 {
        pair.a.submit(
            pair.now,
            Request::Write {
                volume,
                offset: index << 20,
                data: megabyte.clone(),
                fua: false,
            },
        );
        pair.tick(100);
    }
    // b returns 17 deltas behind: the first 16 leave as one record of
    // exactly MERGED_RECORD_BYTES_MAX; it fills the window, so the 17th
    // waits for b's acknowledgement.
    pair.hold_group_lane_to_b = true;
    pair.connect();
    let records: Vec<(u64, u64, usize)> = pair
        .to_b
        .iter()
        .filter_map(|message| match message {
            SiteMessage::Deltas { first, record } => {
                Some((first.0, record.seq.0, record.blocks.len()))
            }
            SiteMessage::Delta(record) => Some((record.seq.0, record.seq.0, record.blocks.len())),
            _ => None,
        })
        .collect();
    assert_eq!(
        MERGED_RECORD_BYTES_MAX,
        16 * (1 << 20),
        "the test's figures assume it"
    );
    assert_eq!(records, vec![(1, 16, 4096)]);
    pair.hold_group_lane_to_b = false;
    pair.settle();
    pair.tick(100);
    assert_eq!(
        pair.a.engine.replication_status()[0].peers[0].state,
        PeerState::Streaming
    );
    assert_eq!(pair.b.leg.len(), 17 * 256);
    assert_legs_equal(&pair);
}

// ---------------------------------------------------------------------------
// Read leases: bounds, cooldowns and what the owner's cache shows

impl Pair {
    /// b asks a for a lease on `regions` regions of `volume` from
    /// `first_region`, naming delta `have`: the lease a grants, in
    /// milliseconds (0: refused).
    fn ask_a_for_lease_on(
        &mut self,
        volume: VolumeId,
        first_region: u64,
        regions: u64,
        have: u64,
    ) -> u64 {
        self.a.engine.receive(
            self.now,
            B,
            SiteMessage::LeaseRequest {
                id: 90,
                volume,
                first_region,
                regions,
                have: DeltaSeq(have),
            },
        );
        match self.a.run().as_slice() {
            [(B, SiteMessage::LeaseReply { id: 90, lease_ms })] => *lease_ms,
            sent => panic!("expected one lease reply: {sent:?}"),
        }
    }
}

/// The volume of [`pair_with_one_block_regions`] that has one region more
/// than a lease request may name.
const WIDE_VOLUME: VolumeId = VolumeId(2);

/// Two leasing sites with regions of one block, and a second volume of
/// the group, [`WIDE_VOLUME`], of `LEASE_REGIONS_MAX + 1` regions.
fn pair_with_one_block_regions() -> Pair {
    let one_block = |site, peer| EngineConfig {
        region_blocks: 1,
        ..leasing(site, peer)
    };
    let mut pair = Pair::with_configs(Mode::Async, one_block(A, B), one_block(B, A));
    let wide_bytes = (crate::site_message::LEASE_REGIONS_MAX as u64 + 1) * BLOCK_SIZE as u64;
    pair.add_volume_at_both(WIDE_VOLUME, wide_bytes, GROUP, None);
    pair.tick(100);
    pair
}

/// The lease requests (first region, regions) among `sent`.
fn lease_requests(sent: &[(SiteId, SiteMessage)]) -> Vec<(u64, u64)> {
    sent.iter()
        .filter_map(|(_, message)| match message {
            SiteMessage::LeaseRequest {
                first_region,
                regions,
                ..
            } => Some((*first_region, *regions)),
            _ => None,
        })
        .collect()
}

/// A lease request names at most `LEASE_REGIONS_MAX` regions: the owner
/// grants one that names exactly that many, and refuses (and counts) one
/// naming more.
#[test]
fn an_owner_grants_a_lease_on_as_many_regions_as_a_request_may_name_and_no_more() {
    let mut pair = pair_with_one_block_regions();
    let max = crate::site_message::LEASE_REGIONS_MAX as u64;
    assert_eq!(pair.ask_a_for_lease_on(WIDE_VOLUME, 0, max, 0), 2_000);
    let refused = pair.a.engine.stats().refused_messages_total;
    assert_eq!(pair.ask_a_for_lease_on(WIDE_VOLUME, 0, max + 1, 0), 0);
    assert_eq!(pair.a.engine.stats().refused_messages_total, refused + 1);
}

/// A holder asks for a lease with a strict read of up to
/// `LEASE_REGIONS_MAX` regions; a read of more regions goes to the owner
/// without a lease request (the owner would refuse it as malformed).
#[test]
fn a_holder_asks_for_a_lease_only_on_as_many_regions_as_a_request_may_name() {
    let mut pair = pair_with_one_block_regions();
    let max = crate::site_message::LEASE_REGIONS_MAX as u64;
    let read = |length: u64| Request::Read {
        volume: WIDE_VOLUME,
        offset: 0,
        length,
    };
    pair.b.submit(pair.now, read((max + 1) * BLOCK_SIZE as u64));
    let sent = pair.b.run();
    assert!(
        sent.iter()
            .any(|(_, message)| matches!(message, SiteMessage::ReadRequest { .. })),
        "{sent:?}"
    );
    assert_eq!(lease_requests(&sent), vec![]);
    pair.b.submit(pair.now, read(max * BLOCK_SIZE as u64));
    assert_eq!(lease_requests(&pair.b.run()), vec![(0, max)]);
}

/// A renewal round asks for at most `LEASE_REGIONS_MAX` consecutive
/// regions in one request: a longer run is split, so that every lease of
/// it is renewed.
#[test]
fn a_run_of_leased_regions_longer_than_a_request_may_name_is_renewed_in_two() {
    let mut pair = pair_with_one_block_regions();
    let max = crate::site_message::LEASE_REGIONS_MAX as u64;
    for (offset, length) in [(0, max), (max, 1)] {
        let read = pair.b.submit(
            pair.now,
            Request::Read {
                volume: WIDE_VOLUME,
                offset: offset * BLOCK_SIZE as u64,
                length: length * BLOCK_SIZE as u64,
            },
        );
        pair.settle();
        assert!(matches!(pair.b.reply(read), Some(Ok(_))));
    }
    assert_eq!(pair.b.engine.marks().count(Mark::ReadLeaseGranted), 2);
    assert_eq!(
        renewals_from_b_after(&mut pair, 1_100),
        vec![(0, max), (max, 1)]
    );
}

/// A region a write revoked is not leased again during the cooldown, also
/// when the owner, at its bound, drops the leases that ran out first.
#[test]
fn a_region_cooling_down_after_a_revocation_is_not_leased_when_the_owner_prunes_its_leases() {
    let owner = EngineConfig {
        read_leases_max: 1,
        ..leasing(A, B)
    };
    let mut pair = Pair::with_configs(Mode::Async, owner, leasing(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    assert_eq!(pair.ask_a_for_lease(1, 0, 1, 1), 2_000);
    // a writes region 0: it revokes b's lease (b confirms), and region 0
    // cools down for 10 s.
    let write = pair.write(false, 0, block(2));
    assert!(matches!(pair.a.reply(write), Some(Ok(Response::Done))));
    pair.tick(100);
    // Region 1 is leased, up to the bound, and that lease runs out.
    assert_eq!(pair.ask_a_for_lease(2, 1, 1, 2), 2_000);
    pair.tick(2_100);
    assert_eq!(pair.ask_a_for_lease(3, 0, 1, 2), 0, "leased while cooling");
    assert_eq!(pair.ask_a_for_lease(4, 2, 1, 2), 2_000);
}

/// An owner at its bound of leases grants a new one as soon as one it
/// granted ran out.
#[test]
fn an_owner_at_its_bound_grants_a_lease_in_place_of_one_that_ran_out() {
    let owner = EngineConfig {
        read_leases_max: 1,
        ..leasing(A, B)
    };
    let mut pair = Pair::with_configs(Mode::Async, owner, leasing(B, A));
    pair.tick(100);
    assert_eq!(pair.ask_a_for_lease(1, 0, 1, 0), 2_000);
    assert_eq!(pair.ask_a_for_lease(2, 1, 1, 0), 0, "past the bound of 1");
    // The owner counts 2002 ms.
    pair.now = pair.now.saturating_add_millis(2_100);
    assert_eq!(pair.ask_a_for_lease(3, 1, 1, 0), 2_000);
}

/// A holder at its bound of leases takes a new one as soon as one it held
/// ran out, even before its renewal round (a late timer) dropped it.
#[test]
fn a_holder_at_its_bound_takes_a_lease_in_place_of_one_that_ran_out() {
    let mut pair = Pair::with_configs(
        Mode::Async,
        leasing(A, B),
        EngineConfig {
            read_leases_max: 1,
            ..leasing(B, A)
        },
    );
    pair.tick(100);
    let region_bytes = REGION_BLOCKS * 4096;
    let read = pair.read(true, false, 0, 4096);
    assert!(pair.b.reply(read).is_some());
    assert_eq!(pair.b.engine.marks().count(Mark::ReadLeaseGranted), 1);
    // No timer fires at b: its lease on region 0 ran out but is still
    // there.
    pair.now = pair.now.saturating_add_millis(2_100);
    let read = pair.read(true, false, region_bytes, 4096);
    assert!(pair.b.reply(read).is_some());
    assert_eq!(pair.b.engine.marks().count(Mark::ReadLeaseGranted), 2);
    let local = pair.b.submit(pair.now, strict_read(region_bytes));
    assert!(pair.b.run().is_empty(), "region 1 is not leased");
    assert!(pair.b.reply(local).is_some());
}

/// A dirty block in the owner's cache keeps its region from being leased
/// only when the delta that wrote it is newer than the one the site
/// names; it says nothing about the regions after it.
#[test]
fn only_blocks_newer_than_the_site_holds_in_the_same_region_keep_it_from_being_leased() {
    let mut pair = Pair::with_configs(
        Mode::Async,
        leasing_without_cooldown(A, B),
        leasing_without_cooldown(B, A),
    );
    // Delta 1 (block 0) reaches b, but a's leg write of it is slow: the
    // block stays dirty in a's cache, written by the delta b names.
    pair.a.hold_leg_writes = true;
    pair.write(false, 0, block(1));
    pair.tick(100);
    assert_eq!(pair.b.leg.get(&0), Some(&block(1)));
    assert_eq!(pair.ask_a_for_lease(1, 0, 1, 1), 2_000);
    // Once that lease ran out (the write needs no revocation), block 1 of
    // region 0 is written and waits in the open delta: region 0 is not
    // leased to a site naming delta 1, region 1 still is.
    pair.tick(2_100);
    pair.write(false, 4096, block(2));
    assert_eq!(pair.ask_a_for_lease(2, 0, 1, 1), 0);
    assert_eq!(pair.ask_a_for_lease(3, 1, 1, 1), 2_000);
}

/// An owner that gives one group away keeps the revocations on their way
/// for its other groups: the holder's confirmation still frees the write
/// that waits for it.
#[test]
fn a_revocation_on_its_way_is_confirmed_after_another_group_is_given_away() {
    let mut pair = pair_with_a_lease_at_b();
    let other = (VolumeId(2), GroupId(2));
    pair.add_volume_at_both(other.0, VOLUME_BYTES, other.1, Some(A));
    pair.settle();
    let write = pair.a.submit(pair.now, write_request(4096, 2));
    let revocation = pair.a.run();
    assert!(
        revocation
            .iter()
            .any(|(_, message)| matches!(message, SiteMessage::LeaseRevoke { .. })),
        "{revocation:?}"
    );
    pair.a.engine.set_owner(other.1, B, Epoch(2));
    pair.b.engine.set_owner(other.1, B, Epoch(2));
    pair.to_b
        .extend(revocation.into_iter().map(|(_, message)| message));
    pair.settle();
    assert!(
        matches!(pair.a.reply(write), Some(Ok(Response::Done))),
        "the write waits for a lease b no longer holds"
    );
}

/// A holder renews a lease only past half its period: a renewal round
/// before that asks for nothing.
#[test]
fn a_holder_renews_a_lease_only_past_half_its_period() {
    let mut pair = pair_with_two_leased_regions(leasing(A, B));
    assert_eq!(renewals_from_b_after(&mut pair, 900), vec![]);
    assert_eq!(renewals_from_b_after(&mut pair, 200), vec![(0, 2)]);
}

/// A renewal round that finds a lease request for the region on its way
/// looks again later: when that request is refused, the lease is still
/// renewed before it runs out.
#[test]
fn a_lease_whose_renewal_waited_for_a_refused_request_is_renewed_later() {
    let mut pair = pair_with_a_lease_at_b();
    // a writes region 1: its block waits in the open delta (newer than
    // what b holds), so no lease on region 1 is granted to b.
    let region_bytes = REGION_BLOCKS * 4096;
    pair.write(false, region_bytes, block(3));
    // Past half of b's lease (asked at 100 ms), b reads across regions 0
    // and 1: it asks the owner, and for a lease on both.
    pair.now = Timestamp(1_100_000_000);
    let read = pair.b.submit(
        pair.now,
        Request::Read {
            volume: VOLUME,
            offset: region_bytes - 4096,
            length: 8192,
        },
    );
    let asked = pair.b.run();
    assert_eq!(lease_requests(&asked), vec![(0, 2)]);
    // b's renewal round comes while that request is on its way: region 0
    // is being asked for already.
    pair.b.engine.handle_timeout(pair.now);
    assert_eq!(lease_requests(&pair.b.run()), vec![]);
    pair.to_a
        .extend(asked.into_iter().map(|(_, message)| message));
    pair.settle();
    assert!(pair.b.reply(read).is_some());
    assert_eq!(pair.b.engine.marks().count(Mark::ReadLeaseGranted), 1);
    // Half a second later, the round renews region 0 alone.
    pair.tick(500);
    assert_eq!(pair.b.engine.marks().count(Mark::ReadLeaseGranted), 2);
    // Past the end of the first lease (2098 ms), region 0 is still leased.
    pair.tick(600);
    let local = pair.b.submit(pair.now, strict_read(0));
    assert!(pair.b.run().is_empty(), "region 0 is no longer leased");
    assert_eq!(pair.b.read_reply(local), block(1));
}

/// A site mid-resync sends strict reads to the owner, even of a region it
/// holds a valid lease on: its image is at no delta boundary.
#[test]
fn a_site_mid_resync_asks_the_owner_even_under_a_lease() {
    let mut pair = pair_with_a_lease_at_b();
    pair.disconnect();
    // 512 KiB in region 1 and a block in region 3 while b is away, past
    // the backlog bound: b needs a resync of both (region 0, leased, is
    // not written).
    let region_bytes = REGION_BLOCKS * 4096;
    let big = Bytes::from(vec![6u8; 64 << 10]);
    for index in 0..8u64 {
        pair.write(false, region_bytes + index * (64 << 10), big.clone());
    }
    pair.write(false, 3 * region_bytes, block(8));
    pair.tick(100);
    // b returns; only the first chunk of its resync reaches it.
    pair.hold_group_lane_to_b = true;
    pair.connect();
    let first = pair
        .to_b
        .iter()
        .position(|message| matches!(message, SiteMessage::Resync { .. }))
        .expect("a resync starts");
    let chunk = pair.to_b.remove(first).expect("index is in range");
    pair.b.engine.receive(pair.now, A, chunk);
    pair.b.run();
    assert!(!pair.b.engine.replication_status()[0].consistent);
    let read = pair.b.submit(pair.now, strict_read(0));
    pair.expect_read_request_from_b();
    assert_eq!(pair.b.read_reply(read), block(1));
}

#[test]
fn a_lease_at_either_sites_bound_is_still_renewed() {
    // Each side takes or grants one lease at most: a renewal names a
    // region already held (and granted), so it adds nothing to either.
    let bound_of_one = |site, peer| EngineConfig {
        read_leases_max: 1,
        ..leasing(site, peer)
    };
    let mut pair = Pair::with_configs(Mode::Async, bound_of_one(A, B), bound_of_one(B, A));
    pair.write(false, 0, block(1));
    pair.tick(100);
    let first = pair.read(true, false, 0, 4096);
    assert_eq!(pair.b.read_reply(first), block(1));
    assert_eq!(pair.b.engine.marks().count(Mark::ReadLeaseGranted), 1);
    // Read now and then for three periods: served at b each time.
    for _ in 0..6 {
        pair.tick(900);
        let read = pair.b.submit(pair.now, strict_read(0));
        let sent = pair.b.run();
        assert!(
            sent.is_empty(),
            "a read under a renewed lease went out: {sent:?}"
        );
        assert_eq!(pair.b.read_reply(read), block(1));
    }
    assert!(pair.b.engine.marks().count(Mark::ReadLeaseRenewed) >= 2);
}

// ---------------------------------------------------------------------------
// Fast migration: ownership first, the data b lacks copied after

impl Pair {
    /// a writes 1s at block 0 (region 0) and 2s at block 512 (region 2),
    /// which never reach b, then seals the group for a fast switchover to
    /// b, which both sites apply: b owns the group at epoch 2, after the
    /// seal. Returns the regions b lacks, as the record names them.
    fn fast_switchover_with_backlog(&mut self) -> Vec<(VolumeId, u64)> {
        self.hold_group_lane_to_b = true;
        self.write(false, 0, block(1));
        self.write(false, 512 * BLOCK_SIZE as u64, block(2));
        self.tick(100);
        self.a
            .engine
            .hand_over(self.now, GROUP)
            .expect("a owns the group");
        self.settle();
        assert!(
            !self.a.engine.hand_over_ready(GROUP, B),
            "b lacks a's deltas"
        );
        assert!(self.a.engine.fast_hand_over_ready(GROUP, B));
        let sealed = self.a.engine.fast_seal(GROUP, B).expect("ready to seal");
        let last = sealed.last;
        let regions = sealed.regions.expect("a few regions, named");
        // The deltas b never got are lost on the way.
        self.to_b.retain(|message| message.lane() == Lane::Request);
        self.hold_group_lane_to_b = false;
        let history = vec![
            EpochStart {
                epoch: Epoch(1),
                after_seq: DeltaSeq(0),
                handed_over: false,
            },
            EpochStart {
                epoch: Epoch(2),
                after_seq: last,
                handed_over: true,
            },
        ];
        let drain = FastDrain {
            source: A,
            target: B,
            epoch: Epoch(2),
            regions: Some(regions.clone()),
        };
        for site in [&mut self.a, &mut self.b] {
            site.history = history.clone();
            site.engine.set_epoch_history(GROUP, history.clone());
            site.engine.set_fast_drain(GROUP, B, Some(drain.clone()));
            site.engine.set_owner(GROUP, B, Epoch(2));
        }
        regions
    }

    /// The regions b's drain still holds requests back for.
    fn regions_left_at_b(&self) -> Option<u64> {
        self.b
            .engine
            .fast_drain_progress(GROUP)
            .map(|progress| progress.regions_left)
    }

    /// Both sites learn the drain ended (b copied everything, or the loss
    /// of what it did not was accepted).
    fn end_fast_drain(&mut self) {
        for site in [&mut self.a, &mut self.b] {
            site.engine.set_fast_drain(GROUP, B, None);
        }
        self.settle();
    }
}

#[test]
fn a_fast_switchover_seals_the_regions_the_target_lacks() {
    let mut pair = Pair::new(Mode::Async);
    let regions = pair.fast_switchover_with_backlog();
    assert_eq!(regions, vec![(VOLUME, 0), (VOLUME, 2)]);
    // b numbers its deltas after the seal, under the new epoch.
    let status = pair.b.engine.replication_status();
    assert_eq!(status[0].owner, B);
    assert_eq!(status[0].last_seq, DeltaSeq(1));
}

#[test]
fn a_fast_switchover_is_refused_while_writes_are_open_or_the_target_is_away() {
    let mut pair = Pair::new(Mode::Async);
    pair.write(false, 0, block(1));
    pair.a
        .engine
        .hand_over(pair.now, GROUP)
        .expect("a owns the group");
    pair.settle();
    assert!(pair.a.engine.fast_hand_over_ready(GROUP, B));
    pair.disconnect();
    assert!(
        !pair.a.engine.fast_hand_over_ready(GROUP, B),
        "b does not stream: what it lacks is not known"
    );
    assert_eq!(pair.a.engine.fast_seal(GROUP, B), None);
    // Only to the other site of the pair, and only while handing over.
    assert!(!pair.a.engine.fast_hand_over_ready(GROUP, SiteId(3)));
    pair.connect();
    pair.a.engine.cancel_hand_over(pair.now, GROUP);
    assert!(!pair.a.engine.fast_hand_over_ready(GROUP, B));
}

#[test]
fn after_a_fast_switchover_the_target_writes_at_once_where_it_lacks_nothing() {
    let mut pair = Pair::new(Mode::Async);
    pair.fast_switchover_with_backlog();
    // Cut from the source before anything was copied: a write to region
    // 1, which b does not lack, is acknowledged; one to region 0 waits.
    pair.disconnect();
    let free = pair.write(true, 256 * BLOCK_SIZE as u64, block(5));
    assert_eq!(pair.b.reply(free), Some(&Ok(Response::Done)));
    let held = pair.write(true, BLOCK_SIZE as u64, block(6));
    assert_eq!(pair.b.reply(held), None, "region 0 is not copied yet");
    let read = pair.read(true, false, 0, BLOCK_SIZE as u64);
    assert_eq!(pair.b.reply(read), None);
    assert_eq!(pair.regions_left_at_b(), Some(2));
    // The source is back: region 0 comes first, then region 2.
    pair.connect();
    pair.tick(10);
    assert_eq!(pair.b.reply(held), Some(&Ok(Response::Done)));
    assert_eq!(pair.b.read_reply(read), block(1), "a's write, copied");
    let progress = pair.b.engine.fast_drain_progress(GROUP).expect("drains");
    assert_eq!((progress.regions_total, progress.regions_left), (2, 0));
    assert_eq!(
        pair.b.drain_log[&(GROUP, Epoch(2))],
        BTreeSet::from([(VOLUME, 0), (VOLUME, 2)])
    );
    assert!(pair.b.engine.marks().count(Mark::FastDrainRequestWaited) >= 2);
    assert!(pair.a.engine.marks().count(Mark::FastDrainServed) >= 2);
    pair.end_fast_drain();
    for _ in 0..5 {
        pair.tick(100);
    }
    assert_legs_equal(&pair);
    assert_eq!(
        pair.b.leg[&512],
        block(2),
        "region 2 copied in the background"
    );
    assert_eq!(pair.b.leg[&1], block(6));
    assert_eq!(pair.a.leg[&1], block(6), "b's writes reach a as deltas");
    assert!(
        pair.b.saved_marks.is_empty(),
        "whole again: {:?}",
        pair.b.saved_marks
    );
}

#[test]
fn a_fast_drains_target_is_marked_mid_resync_until_every_region_is_copied() {
    let mut pair = Pair::new(Mode::Async);
    pair.fast_switchover_with_backlog();
    pair.disconnect();
    assert!(pair.b.saved_marks.contains(&GROUP));
    // No read lease on a group whose image is incomplete.
    pair.b.engine.receive(
        pair.now,
        A,
        SiteMessage::LeaseRequest {
            id: 7,
            volume: VOLUME,
            first_region: 1,
            regions: 1,
            have: DeltaSeq(1),
        },
    );
    let sent = pair.b.run();
    assert!(
        sent.iter()
            .all(|(_, message)| !matches!(message, SiteMessage::LeaseReply { lease_ms, .. } if *lease_ms > 0)),
        "{sent:?}"
    );
    pair.connect();
    pair.tick(10);
    assert!(
        !pair.b.saved_marks.contains(&GROUP),
        "{:?}",
        pair.b.saved_marks
    );
}

#[test]
fn a_copy_that_is_not_the_regions_blocks_is_refused_and_asked_again() {
    let mut pair = Pair::new(Mode::Async);
    pair.fast_switchover_with_backlog();
    let sent = pair.b.run();
    let asks: Vec<u64> = sent
        .iter()
        .filter_map(|(_, message)| match message {
            SiteMessage::ReadRequest { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(asks.len(), 2, "{sent:?}");
    let refused = pair.b.engine.stats().refused_messages_total;
    // One block short, and one block of another volume.
    pair.b.engine.receive(
        pair.now,
        A,
        SiteMessage::ReadReply {
            id: asks[0],
            result: Ok(vec![(
                BlockKey {
                    volume: VOLUME,
                    block: 0,
                },
                BlockImage::Data(block(9)),
            )]),
        },
    );
    assert_eq!(pair.b.engine.stats().refused_messages_total, refused + 1);
    let short_block = Bytes::from(vec![9u8; 100]);
    let mut wrong: Vec<(BlockKey, BlockImage)> = (0..REGION_BLOCKS)
        .map(|block| {
            (
                BlockKey {
                    volume: VOLUME,
                    block: 512 + block,
                },
                BlockImage::Zero,
            )
        })
        .collect();
    wrong[3].1 = BlockImage::Data(short_block);
    pair.b.engine.receive(
        pair.now,
        A,
        SiteMessage::ReadReply {
            id: asks[1],
            result: Ok(wrong),
        },
    );
    assert_eq!(pair.b.engine.stats().refused_messages_total, refused + 2);
    assert_eq!(
        pair.regions_left_at_b(),
        Some(2),
        "nothing refused was taken"
    );
    // Asked again after a pause, and copied.
    pair.tick(100);
    pair.tick(100);
    assert_eq!(pair.regions_left_at_b(), Some(0));
    pair.end_fast_drain();
    pair.tick(100);
    assert_legs_equal(&pair);
}

#[test]
fn accepting_the_loss_of_a_fast_drain_writes_the_targets_image_over_the_sources() {
    let mut pair = Pair::new(Mode::Async);
    pair.fast_switchover_with_backlog();
    // a is lost before anything is copied; an operator accepts the loss.
    pair.disconnect();
    let held = pair.write(true, BLOCK_SIZE as u64, block(6));
    pair.end_fast_drain();
    assert_eq!(pair.b.reply(held), Some(&Ok(Response::Done)));
    assert_eq!(pair.b.engine.stats().fast_drain_regions_lost_total, 2);
    // a returns: b's image of regions 0 and 2 replaces a's newer one.
    pair.connect();
    for _ in 0..5 {
        pair.tick(100);
    }
    assert_legs_equal(&pair);
    assert_eq!(
        pair.a.leg.get(&512).cloned().unwrap_or_else(|| block(0)),
        block(0)
    );
}

#[test]
fn a_target_that_loses_the_group_mid_drain_is_resynced_whole() {
    let mut pair = Pair::new(Mode::Async);
    pair.fast_switchover_with_backlog();
    pair.disconnect();
    // A failover back to a: the drain's record is gone, a owns epoch 3.
    let history = {
        let mut history = pair.a.history.clone();
        history.push(EpochStart {
            epoch: Epoch(3),
            after_seq: DeltaSeq(1),
            handed_over: false,
        });
        history
    };
    for site in [&mut pair.a, &mut pair.b] {
        site.history = history.clone();
        site.engine.set_epoch_history(GROUP, history.clone());
        site.engine.set_fast_drain(GROUP, A, None);
        site.engine.set_owner(GROUP, A, Epoch(3));
    }
    pair.settle();
    assert_eq!(pair.b.engine.marks().count(Mark::FastDrainAbandoned), 1);
    assert!(pair.b.saved_marks.contains(&GROUP));
    pair.connect();
    for _ in 0..5 {
        pair.tick(100);
    }
    assert_legs_equal(&pair);
    assert_eq!(pair.b.leg[&512], block(2));
    assert!(!pair.b.saved_marks.contains(&GROUP));
}

#[test]
fn a_copy_answered_after_its_ask_timed_out_is_taken_once() {
    let mut pair = Pair::new(Mode::Async);
    pair.fast_switchover_with_backlog();
    let asks = |sent: Vec<(SiteId, SiteMessage)>| -> Vec<SiteMessage> {
        sent.into_iter()
            .map(|(_, message)| message)
            .filter(|message| matches!(message, SiteMessage::ReadRequest { .. }))
            .collect()
    };
    let first = asks(pair.b.run());
    assert_eq!(first.len(), 2);
    // The source answers slower than the remote timeout: b asks again.
    pair.now = pair.now.saturating_add_millis(1_100);
    pair.b.engine.handle_timeout(pair.now);
    let second = asks(pair.b.run());
    assert_eq!(second.len(), 2, "asked again");
    let answers = |pair: &mut Pair, requests: Vec<SiteMessage>| -> Vec<SiteMessage> {
        for request in requests {
            pair.a.engine.receive(pair.now, B, request);
        }
        pair.a
            .run()
            .into_iter()
            .map(|(_, message)| message)
            .filter(|message| matches!(message, SiteMessage::ReadReply { .. }))
            .collect()
    };
    let late = answers(&mut pair, first);
    let refused = pair.b.engine.stats().refused_messages_total;
    for answer in late {
        pair.b.engine.receive(pair.now, A, answer);
    }
    pair.b.run();
    // The answers to the second asks find the regions copied: dropped,
    // not taken again, not counted as refused.
    let again = answers(&mut pair, second);
    for answer in again {
        pair.b.engine.receive(pair.now, A, answer);
    }
    pair.settle();
    assert_eq!(pair.b.engine.stats().refused_messages_total, refused);
    assert_eq!(pair.b.engine.marks().count(Mark::FastDrainRegionCopied), 2);
    assert_eq!(pair.regions_left_at_b(), Some(0));
    pair.end_fast_drain();
    pair.tick(100);
    assert_legs_equal(&pair);
}
