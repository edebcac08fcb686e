//! The simulation loop: one thread, a virtual clock, an event queue, and per
//! site the real engine and the real journal/leg/recovery code on a
//! simulated disk; between sites, the network of [`crate::network`].
//!
//! A scenario with one site runs exactly as the single-node simulator
//! always did (same draws, same trace): every multi-site step is taken only
//! when there is more than one site.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stretch_core::{
    Action, BLOCK_SIZE, BlockImage, BlockKey, DeltaRecord, Engine, EngineConfig, Epoch, GroupId,
    IoId, JournalPosition, PlantedBug, RecoveredState, Request, RequestError, RequestId, Response,
    SiteId, SiteMessage, Timestamp, VolumeId, VolumeSpec,
};
use stretch_storage::{
    ContentMark, DrainLog, Journal, Leg, Regions as DirtyRegions, SimFileSystem, StartError,
    StartPaths, append_fast_drain_log, apply_to_legs, save_dirty_map, save_resync_marks,
    start as start_from_disk,
};

use crate::checker::{
    Checker, SECTOR_BYTES, Tracked, View, Violation, VolumeSetup, WriteKind, decode_sectors,
    payload,
};
use crate::network::{Network, Packet, Queued, describe_message, direction, message_code};
use crate::rng::SimRng;
use crate::scenario::Scenario;
use crate::trace::Trace;

mod actions;
mod clients;
mod links;
mod migration;
mod ownership;
mod restarts;
mod site_loss;

/// A defect planted on purpose, to prove the checker catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimBug {
    /// A defect inside the protocol core.
    Core(PlantedBug),
    /// The disk driver reports journal syncs it never did.
    SkipJournalFsync,
    /// A survivor takes a cut-off owner's groups over without waiting for
    /// its lease to run out.
    EarlyTakeover,
    /// The first survivor able to take a group over does, whatever the
    /// images the others hold (no offers).
    TakeoverIgnoresImages,
    /// A migration switches over as soon as it holds the writes, before
    /// the target applied every delta.
    MigrationSwitchesEarly,
}

impl SimBug {
    pub const ALL: [SimBug; 20] = [
        SimBug::SkipJournalFsync,
        SimBug::EarlyTakeover,
        SimBug::TakeoverIgnoresImages,
        SimBug::MigrationSwitchesEarly,
        SimBug::Core(PlantedBug::AckFlushEarly),
        SimBug::Core(PlantedBug::ApplyBeforeJournalSync),
        SimBug::Core(PlantedBug::ApplyNewestFirst),
        SimBug::Core(PlantedBug::AcceptDeltaGap),
        SimBug::Core(PlantedBug::FlushSyncLocalOnly),
        SimBug::Core(PlantedBug::StallOnFullBacklog),
        SimBug::Core(PlantedBug::MapForgetsDirty),
        SimBug::Core(PlantedBug::AbandonForgetsUnacked),
        SimBug::Core(PlantedBug::DiffSkipsFirstMissing),
        SimBug::Core(PlantedBug::CacheIgnoresBound),
        SimBug::Core(PlantedBug::ForwardTimeoutSucceeds),
        SimBug::Core(PlantedBug::HealForgetsLostRegions),
        SimBug::Core(PlantedBug::ReadLeaseNeverExpires),
        SimBug::Core(PlantedBug::ReadLeaseWriteBeforeRevoked),
        SimBug::Core(PlantedBug::ReadLeaseForgottenOnRestart),
        SimBug::Core(PlantedBug::FastDrainWritesUncopied),
    ];

    pub fn name(self) -> &'static str {
        match self {
            SimBug::SkipJournalFsync => "skip-journal-fsync",
            SimBug::EarlyTakeover => "early-takeover",
            SimBug::TakeoverIgnoresImages => "takeover-ignores-images",
            SimBug::MigrationSwitchesEarly => "migration-switches-early",
            SimBug::Core(PlantedBug::AckFlushEarly) => "ack-flush-early",
            SimBug::Core(PlantedBug::ApplyBeforeJournalSync) => "apply-before-journal-sync",
            SimBug::Core(PlantedBug::ApplyNewestFirst) => "apply-newest-first",
            SimBug::Core(PlantedBug::AcceptDeltaGap) => "accept-delta-gap",
            SimBug::Core(PlantedBug::FlushSyncLocalOnly) => "flush-sync-local-only",
            SimBug::Core(PlantedBug::StallOnFullBacklog) => "stall-on-full-backlog",
            SimBug::Core(PlantedBug::MapForgetsDirty) => "map-forgets-dirty",
            SimBug::Core(PlantedBug::AbandonForgetsUnacked) => "abandon-forgets-unacked",
            SimBug::Core(PlantedBug::DiffSkipsFirstMissing) => "diff-skips-first-missing",
            SimBug::Core(PlantedBug::CacheIgnoresBound) => "cache-ignores-bound",
            SimBug::Core(PlantedBug::ForwardTimeoutSucceeds) => "forward-timeout-succeeds",
            SimBug::Core(PlantedBug::HealForgetsLostRegions) => "heal-forgets-lost-regions",
            SimBug::Core(PlantedBug::ReadLeaseNeverExpires) => "read-lease-never-expires",
            SimBug::Core(PlantedBug::ReadLeaseWriteBeforeRevoked) => {
                "read-lease-write-before-revoked"
            }
            SimBug::Core(PlantedBug::ReadLeaseForgottenOnRestart) => {
                "read-lease-forgotten-on-restart"
            }
            SimBug::Core(PlantedBug::FastDrainWritesUncopied) => "fast-drain-writes-uncopied",
        }
    }

    pub fn parse(name: &str) -> Option<SimBug> {
        SimBug::ALL.into_iter().find(|bug| bug.name() == name)
    }
}

#[derive(Debug, Clone, Default)]
pub struct SimOptions {
    pub seed: u64,
    pub bug: Option<SimBug>,
    /// Keep a readable line per event (for `--replay`).
    pub record_trace: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub crashes: u64,
    pub fsync_failure_windows: u64,
    pub node_failures: u64,
    pub events: u64,
    /// Of those, the ones handled after the workload ended, while the
    /// sites drained and converged.
    pub drain_events: u64,
    /// Multi-site: snapshot reads issued, and refused by a site mid-resync.
    pub snapshot_reads: u64,
    pub snapshot_refusals: u64,
    /// Requests at a site that does not own the volume, sent to the owner.
    pub remote_requests: u64,
    /// Of those, the ones that failed (the owner did not answer in time).
    pub remote_failures: u64,
    pub messages_sent: u64,
    pub messages_lost: u64,
    pub link_faults: u64,
    pub site_loss_checks: u64,
    /// Writes an owner accepted for a client at another site, then lost in
    /// a crash before any flush covered them: allowed (like any unflushed
    /// write), but that client's own site did not crash.
    pub remote_writes_lost: u64,
    /// Longest wait of a write at its owner that needs no other site.
    pub owner_write_wait_max_ns: u64,
    /// Writes that waited on a full backlog, and sites folded into regions
    /// (by the nodes' last incarnations).
    pub backlog_throttled_writes: u64,
    pub backlog_folds: u64,
    /// Failovers: owners cut off, groups taken over, the acknowledged
    /// writes those takeovers lost (each reported by its old owner), and
    /// loss reports not checked (the old owner restarted meanwhile).
    pub failovers_started: u64,
    pub failovers: u64,
    pub failover_lost_writes: u64,
    pub loss_reports_unchecked: u64,
    /// Live migrations: begun, switched over, given up, switchovers called
    /// off (the target did not apply every delta within the hold bound),
    /// and the longest time writes were held at a switchover.
    pub migrations_started: u64,
    pub migrations: u64,
    pub migrations_gave_up: u64,
    /// Fast migrations switched over, and those whose drain then ended
    /// with every region copied.
    pub fast_migrations: u64,
    pub fast_drains_done: u64,
    pub switchovers_called_off: u64,
    pub migration_pause_max_ns: u64,
    /// How often each protocol decision was taken, over every site and
    /// every incarnation of its node.
    pub marks: stretch_core::Marks,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub scenario: String,
    pub sites: usize,
    pub trace_hash: u64,
    pub simulated_ns: u64,
    pub stats: Stats,
    /// The first violation, with the step and time it was found at.
    pub violation: Option<(Violation, u64, u64)>,
    pub trace: Vec<String>,
}

/// Runs one scenario with one seed.
pub fn run(scenario: &Scenario, options: &SimOptions) -> Outcome {
    let mut sim = Simulation::new(scenario, options);
    sim.run();
    sim.stats.remote_writes_lost = sim.checker.remote_writes_lost();
    for node in sim.sites.iter().filter_map(|site| site.node.as_ref()) {
        sim.stats.marks.add(node.engine.marks());
        let stats = node.engine.stats();
        sim.stats.backlog_throttled_writes += stats.backlog_throttled_total;
        sim.stats.backlog_folds += stats.backlog_folds_total;
    }
    Outcome {
        seed: options.seed,
        scenario: scenario.name.clone(),
        sites: scenario.sites(),
        trace_hash: sim.trace.trace.hash(),
        simulated_ns: sim.now,
        stats: sim.stats.clone(),
        violation: sim.violation.clone(),
        trace: sim.trace.trace.take_lines(),
    }
}

const MS: u64 = 1_000_000;
/// Longest the liveness phase may take to drain everything to the legs.
const DRAIN_LIMIT_NS: u64 = 120_000 * MS;
/// Most events the liveness phase may handle. A drain that spins (timers
/// and messages that move nothing) can take minutes of wall time to reach
/// the simulated limit; this bound reports it in seconds. The longest
/// drain of 1,500 swarm seeds took about 320,000 events.
const DRAIN_EVENTS_MAX: u64 = 50_000_000;

#[derive(Debug, Clone)]
enum Event {
    ClientTurn(usize),
    JournalOpDone {
        site: usize,
        generation: u64,
    },
    LegOpDone {
        site: usize,
        generation: u64,
    },
    LegReadDone {
        site: usize,
        generation: u64,
        io: IoId,
        volume: VolumeId,
        offset: u64,
        length: u64,
    },
    Timer {
        site: usize,
        generation: u64,
    },
    Crash,
    Restart(usize),
    SyncFailureStart,
    SyncFailureEnd(usize),
    EndOfWorkload,
    /// A sender's queue hands its messages to the current connection.
    Pump {
        from: usize,
        to: usize,
        generation: u64,
    },
    /// A message arrives (if it is still due at this time).
    Deliver {
        packet: u64,
        at: u64,
    },
    Cut,
    CutEnd {
        link: usize,
        directions: [bool; 2],
    },
    Reset,
    Blip,
    /// An end of a connection notices it is dead.
    Detect {
        link: usize,
        conn: u64,
    },
    Dial(usize),
    SiteLoss,
    /// Ownership (see `ownership`): a site's lease renewal, a failover
    /// starting, the takeover, the cut-off site returning and learning.
    LeaseRenew(usize),
    Failover,
    Takeover,
    IsolationEnd,
    Learn(usize),
    /// Live migrations (see `migration`): one starting, a driver's look.
    MigrationStart,
    MigrationStep(u32),
    /// A fast migration's drain: its target's driver looks at the copy.
    FastDrainStep(u32),
    /// A migration's target applies the switchover (after its source).
    MigrationTargetLearns(usize),
}

#[derive(Debug)]
enum JournalOp {
    Append(DeltaRecord),
    Sync(IoId),
    Release(JournalPosition),
    SaveResyncMarks(IoId, Vec<GroupId>),
    SaveFastDrain(IoId, GroupId, Epoch, Vec<(VolumeId, u64)>),
}

#[derive(Debug)]
enum LegOp {
    Write(IoId, Vec<(BlockKey, BlockImage)>),
    Sync(IoId, Vec<VolumeId>),
    /// Save the map of regions another site may lack (the node does it on
    /// its leg thread too).
    SaveMap(IoId, SiteId, Vec<(VolumeId, u64)>),
}

struct NodeState {
    engine: Engine,
    journal: Journal<SimFileSystem>,
    legs: BTreeMap<VolumeId, Leg<SimFileSystem>>,
    journal_device: Device<JournalOp>,
    leg_device: Device<LegOp>,
    timer_at: Option<u64>,
}

/// One site: a node with its own disk.
struct Site {
    fs: SimFileSystem,
    node: Option<NodeState>,
    generation: u64,
    restart_pending: bool,
    /// How much longer than `disk_latency_us_max` the site's slow disk
    /// operations took so far, summed (a drawn slowness, not the
    /// network's): a write at the owner may wait behind them.
    slow_disk_ns: u64,
    /// How fast the site's monotonic clock runs against real (simulated)
    /// time, in millionths (within the scenario's `clock_drift_ppm`).
    drift_ppm: i64,
    /// Each leg's sectors as last decoded, by volume: a restart re-decodes
    /// only what changed since (decoding every leg in full at every
    /// restart was 15 % of a 100 s two-site run, more in longer ones).
    leg_decodes: BTreeMap<usize, LegDecode>,
}

/// A leg's decoded sectors and where in the leg's history they were read.
struct LegDecode {
    mark: ContentMark,
    sectors: Vec<Option<u32>>,
}

impl Site {
    /// The sectors of `volume`'s leg, decoded (see
    /// [`crate::checker::decode_sectors`]); `None` if the leg is gone.
    fn decoded_leg(&mut self, volume: usize) -> Option<&[Option<u32>]> {
        let previous = self.leg_decodes.remove(&volume);
        let since = previous.as_ref().map(|decode| decode.mark);
        let mut sectors = previous.map(|decode| decode.sectors).unwrap_or_default();
        let ((), mark) =
            self.fs
                .with_content_changes(&volume_path(volume), since, |image, changed| {
                    let count = image.len() / SECTOR_BYTES as usize;
                    sectors.resize(count, None);
                    for range in changed {
                        let first = range.start / SECTOR_BYTES as usize;
                        let last = range.end.div_ceil(SECTOR_BYTES as usize).min(count);
                        decode_sectors(
                            &image[first * SECTOR_BYTES as usize..],
                            first as u64,
                            &mut sectors[first..last],
                        );
                    }
                })?;
        let decode = self
            .leg_decodes
            .entry(volume)
            .insert_entry(LegDecode { mark, sectors })
            .into_mut();
        Some(&decode.sectors)
    }
}

/// A disk queue that performs one operation at a time, in order (the
/// runtime's journal and leg threads behave the same way).
struct Device<Op> {
    queue: VecDeque<Op>,
    busy: bool,
}

impl<Op> Device<Op> {
    fn new() -> Self {
        Device {
            queue: VecDeque::new(),
            busy: false,
        }
    }

    /// Queues an operation; true if the device was idle and must start.
    fn push(&mut self, op: Op) -> bool {
        self.queue.push_back(op);
        !std::mem::replace(&mut self.busy, true)
    }

    /// Takes the operation that just finished; true if more are waiting
    /// (the device stays busy with the next one).
    fn finish(&mut self) -> (Op, bool) {
        let op = self
            .queue
            .pop_front()
            .expect("simulator invariant: a device completion has an operation");
        self.busy = !self.queue.is_empty();
        (op, self.busy)
    }
}

#[derive(Debug, Clone)]
struct ClientRequest {
    client: usize,
    fua: bool,
    site: usize,
    volume: usize,
    /// The site does not own the volume: the engine asks the owner.
    remote: bool,
    /// Issued at, or in flight at, a site cut off for a failover: it may
    /// fail (its lease runs out) even where the site owns the volume.
    may_fail: bool,
    snapshot: bool,
    write: bool,
    /// When it was issued.
    issued_at: u64,
    /// Its site's `slow_disk_ns` when it was issued.
    slow_disk_ns_at_issue: u64,
    /// Writes of its volume its site had held for read-lease revocations
    /// when it was issued.
    lease_waits_at_issue: u64,
    /// Requests at the site that had waited for a fast migration's copy
    /// when this one was issued.
    copy_waits_at_issue: u64,
    /// A write at the owner that needs no other site (async, or a plain
    /// write in flush-sync mode): answered within the write-stall bound
    /// whatever the network does.
    owner_local_write: bool,
}

/// The trace, and whether events name their site (multi-site runs only, so
/// a single-site run hashes exactly as it always did).
struct Recorder {
    trace: Trace,
    multi: bool,
}

impl Recorder {
    fn record(
        &mut self,
        now: u64,
        site: Option<usize>,
        fields: &[u64],
        describe: impl FnOnce() -> String,
    ) {
        match site {
            Some(site) if self.multi => {
                let mut all = Vec::with_capacity(fields.len() + 1);
                all.push(0x5173_0000 + site as u64);
                all.extend_from_slice(fields);
                self.trace
                    .record(now, &all, || format!("site {}: {}", site + 1, describe()));
            }
            _ => self.trace.record(now, fields, describe),
        }
    }
}

/// A site-loss check in progress: every site but `owner` lost power; what
/// `owner` promised would survive its site's loss must be found in at least
/// one of them once they recovered.
struct SiteLossCheck {
    owner: usize,
    writes: Vec<u32>,
    found: BTreeSet<u32>,
    pending: BTreeSet<usize>,
}

struct Simulation<'a> {
    scenario: &'a Scenario,
    options: &'a SimOptions,
    rng: SimRng,
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    next_event: u64,
    sites: Vec<Site>,
    clients_busy: Vec<bool>,
    requests: BTreeMap<u64, ClientRequest>,
    next_request: u64,
    checker: Checker,
    trace: Recorder,
    stats: Stats,
    workload_over: bool,
    draining_since: Option<u64>,
    violation: Option<(Violation, u64, u64)>,
    // -- multi-site ----------------------------------------------------------
    net: Network,
    /// The checker's id of the write being submitted (its forward, if the
    /// engine sends one, carries it).
    submitting: Option<u32>,
    /// Forwards an owner received and has not answered yet, by (owner,
    /// from, forward id): the write each carries (None for a flush or trim).
    owner_pending: BTreeMap<(usize, usize, u64), VecDeque<Option<u32>>>,
    /// (site, group) pairs whose legs were mid-resync when the site
    /// crashed: exempt from the prefix check until consistent again.
    resyncing: BTreeSet<(usize, u32)>,
    site_loss: Option<SiteLossCheck>,
    control: ownership::Control,
    /// Live migrations in flight, by group.
    migrations: BTreeMap<u32, migration::Migration>,
    /// The migrations' own draws (when, which group, where to), from the
    /// seed: a scenario without migrations runs exactly as before they
    /// existed, and one with them keeps every other fault's schedule.
    migration_rng: SimRng,
}

/// Site time at real (simulated) time `real_ns`, on a clock running
/// `drift_ppm` millionths fast (slow if negative).
fn site_time(real_ns: u64, drift_ppm: i64) -> Timestamp {
    let real = i128::from(real_ns);
    Timestamp((real + real * i128::from(drift_ppm) / 1_000_000) as u64)
}

/// The first real time at which a clock running `drift_ppm` fast reads at
/// least `local`.
fn real_time(local: Timestamp, drift_ppm: i64) -> u64 {
    let local_ns = i128::from(local.as_nanos());
    let mut real = (local_ns * 1_000_000 / (1_000_000 + i128::from(drift_ppm))).max(0) as u64;
    while site_time(real, drift_ppm) < local {
        real += 1;
    }
    real
}

fn volume_path(index: usize) -> PathBuf {
    PathBuf::from(format!("/node/legs/volume-{index}.raw"))
}

fn journal_dir() -> &'static Path {
    Path::new("/node/journal")
}

fn resync_marks_path() -> &'static Path {
    Path::new("/node/resync-marks")
}

fn fast_drain_log_path() -> &'static Path {
    Path::new("/node/fast-drain-log")
}

/// Where a site keeps the map of regions site `peer` may lack.
fn dirty_map_path(peer: SiteId) -> PathBuf {
    PathBuf::from(format!("/node/dirty-site-{peer}.map"))
}

impl<'a> Simulation<'a> {
    fn new(scenario: &'a Scenario, options: &'a SimOptions) -> Self {
        let sites = scenario.sites();
        let multi = sites > 1;
        let setups: Vec<VolumeSetup> = (0..scenario.topology.volumes as usize)
            .map(|index| {
                let group = index as u32 % scenario.topology.groups + 1;
                let mode = scenario.mode_of(index);
                VolumeSetup {
                    group,
                    owner: scenario.owner_of_group(group),
                    durable_writes: mode == stretch_core::Mode::Sync,
                    site_durable_flush: multi && mode != stretch_core::Mode::Async,
                    site_durable_writes: multi && mode == stretch_core::Mode::Sync,
                }
            })
            .collect();
        // Each site's clock rate, from its own stream of the seed (so
        // that every other draw of a seed stays what it was).
        let mut clock_rng = SimRng::new(options.seed ^ 0x636c_6f63_6b73_2121);
        let drift_bound = scenario.engine.clock_drift_ppm;
        let drifts: Vec<i64> = (0..sites)
            .map(|_| clock_rng.between(0, 2 * drift_bound) as i64 - drift_bound as i64)
            .collect();
        Simulation {
            scenario,
            options,
            rng: SimRng::new(options.seed),
            now: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            sites: drifts
                .into_iter()
                .map(|drift_ppm| Site {
                    fs: SimFileSystem::new(),
                    node: None,
                    generation: 0,
                    restart_pending: false,
                    slow_disk_ns: 0,
                    drift_ppm,
                    leg_decodes: BTreeMap::new(),
                })
                .collect(),
            clients_busy: vec![false; scenario.workload.clients as usize],
            requests: BTreeMap::new(),
            next_request: 1,
            checker: Checker::new(&setups, scenario.topology.volume_bytes),
            trace: Recorder {
                trace: Trace::new(options.record_trace),
                multi,
            },
            stats: Stats::default(),
            workload_over: false,
            draining_since: None,
            violation: None,
            net: Network::new(sites),
            submitting: None,
            owner_pending: BTreeMap::new(),
            resyncing: BTreeSet::new(),
            site_loss: None,
            control: ownership::Control::new(scenario),
            migrations: BTreeMap::new(),
            migration_rng: SimRng::new(options.seed ^ 0x6d69_6772_6174_6521),
        }
    }

    fn multi(&self) -> bool {
        self.sites.len() > 1
    }

    fn group_of(&self, volume: usize) -> u32 {
        volume as u32 % self.scenario.topology.groups + 1
    }

    /// The owner of `volume`'s group by the ownership authority now.
    fn owner_of_volume(&self, volume: usize) -> usize {
        self.control.owner(self.group_of(volume))
    }

    fn engine_config(&self, site: usize) -> EngineConfig {
        let tuning = &self.scenario.engine;
        EngineConfig {
            delta_interval_ms: tuning.delta_interval_ms,
            delta_max_bytes: tuning.delta_max_bytes,
            cache_bytes_max: tuning.cache_bytes_max,
            journal_checkpoint_bytes: tuning.journal_checkpoint_bytes,
            site: SiteId(site as u32 + 1),
            peers: (0..self.sites.len())
                .filter(|other| *other != site)
                .map(|other| SiteId(other as u32 + 1))
                .collect(),
            backlog_bytes_max: tuning.backlog_bytes_max,
            backlog_wait_ms_max: tuning.backlog_wait_ms_max,
            ship_window_bytes_max: tuning.ship_window_bytes_max,
            ship_window_bytes_min: tuning.ship_window_bytes_min,
            resync_chunks_in_flight_max: tuning.resync_chunks_in_flight_max,
            remote_timeout_ms: tuning.remote_timeout_ms,
            // Granted by the simulator when ownership can move.
            leases_enforced: self.control.leases(),
            suspend_hold_ms: 5_000,
            suspended_requests_max: 1024,
            region_blocks: tuning.region_blocks,
            read_lease_ms: tuning.read_lease_ms,
            clock_drift_ppm: tuning.clock_drift_ppm,
            read_lease_cooldown_ms: tuning.read_lease_cooldown_ms,
            read_leases_max: tuning.read_leases_max,
            planted_bug: match self.options.bug {
                Some(SimBug::Core(bug)) => Some(bug),
                _ => None,
            },
        }
    }

    fn schedule(&mut self, at: u64, event: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.queue.push(Reverse((at, id)));
        self.events.insert(id, event);
    }

    fn fail(&mut self, violation: Violation) {
        if self.violation.is_none() {
            let detail = violation.detail.clone();
            self.trace.record(self.now, None, &[u64::MAX], || {
                format!("VIOLATION {}: {detail}", violation.guarantee)
            });
            self.violation = Some((violation, self.stats.events, self.now));
        }
    }

    fn run(&mut self) {
        let volumes = self.scenario.topology.volumes as usize;
        let size = self.scenario.topology.volume_bytes;
        for site in &self.sites {
            for index in 0..volumes {
                if let Err(error) = Leg::create(&site.fs, &volume_path(index), size) {
                    panic!(
                        "simulator invariant: creating a leg on a fresh simulated disk works: {error}"
                    );
                }
            }
        }
        for site in 0..self.sites.len() {
            self.start_node(site, true);
        }
        for client in 0..self.clients_busy.len() {
            let at = self.rng.below(MS);
            self.schedule(at, Event::ClientTurn(client));
        }
        let end = (self.scenario.duration_seconds * 1e9) as u64;
        self.schedule(end, Event::EndOfWorkload);
        self.schedule_next_crash();
        self.schedule_next_sync_failure();
        if self.multi() {
            self.start_network();
        }
        while let Some(Reverse((at, id))) = self.queue.pop() {
            let event = self
                .events
                .remove(&id)
                .expect("simulator invariant: every queued event is stored");
            self.now = at;
            self.stats.events += 1;
            if self.draining_since.is_some() {
                self.stats.drain_events += 1;
            }
            self.handle(event);
            if self.violation.is_some() {
                return;
            }
            self.check_invariants();
            if self.violation.is_some() || self.finished() {
                break;
            }
            if let Some(since) = self.draining_since
                && (self.now - since > DRAIN_LIMIT_NS || self.stats.drain_events > DRAIN_EVENTS_MAX)
            {
                let within = format!(
                    "within {} simulated seconds and {DRAIN_EVENTS_MAX} events (took {:.1} s, {} events)",
                    DRAIN_LIMIT_NS / 1_000 / MS,
                    (self.now - since) as f64 / 1e9,
                    self.stats.drain_events
                );
                let detail = if self.multi() {
                    format!(
                        "the sites did not drain and converge {within} after the faults stopped ({})",
                        self.unsettled_reason()
                    )
                } else {
                    format!("the node did not drain to its legs {within}")
                };
                self.fail(Violation {
                    guarantee: "G6",
                    detail,
                });
                return;
            }
        }
        if self.violation.is_none() {
            self.final_check();
        }
    }

    fn finished(&self) -> bool {
        if !self.workload_over || !self.requests.is_empty() {
            return false;
        }
        if !self.multi() {
            return self.sites[0]
                .node
                .as_ref()
                .is_some_and(|node| node.engine.is_drained());
        }
        if self.checker.unsettled().next().is_some() || !self.net.quiet() {
            return false;
        }
        if self.site_loss.is_some() {
            return false;
        }
        let up = self.sites.iter().all(|site| {
            site.node
                .as_ref()
                .is_some_and(|node| node.engine.is_drained())
        });
        if !up || !self.net.links.iter().all(|link| link.healthy()) {
            return false;
        }
        // A fast migration's target still copying what it lacks.
        if (1..=self.scenario.topology.groups).any(|group| self.control.fast_drain(group).is_some())
        {
            return false;
        }
        self.replication_settled()
    }

    /// What keeps a multi-site run from being finished, for the G6
    /// violation.
    fn unsettled_reason(&self) -> String {
        if !self.requests.is_empty() {
            return format!("{} requests unanswered", self.requests.len());
        }
        if self.checker.unsettled().next().is_some() {
            return "a forwarded write is not settled".into();
        }
        if !self.net.quiet() {
            return "messages still in flight".into();
        }
        if let Some(group) = (1..=self.scenario.topology.groups)
            .find(|group| self.control.fast_drain(*group).is_some())
        {
            return format!("group {group}'s fast migration is still copying");
        }
        for (site, state) in self.sites.iter().enumerate() {
            let Some(node) = &state.node else {
                return format!("site {} is down", site + 1);
            };
            if !node.engine.is_drained() {
                return format!("site {} has not drained", site + 1);
            }
            for group in node.engine.replication_status() {
                let owner = self.control.owner(group.group.0);
                if owner == site {
                    for peer in &group.peers {
                        let settled = peer.state == stretch_core::PeerState::Streaming
                            && peer.unapplied_deltas == 0
                            && peer.resync_regions_left == 0;
                        if !settled {
                            return format!(
                                "owner site {} of group {}: site {} is {:?} with {} deltas unapplied and {} regions to resync",
                                site + 1,
                                group.group,
                                peer.peer,
                                peer.state,
                                peer.unapplied_deltas,
                                peer.resync_regions_left
                            );
                        }
                    }
                } else if !group.consistent {
                    return format!("site {} is mid-resync of group {}", site + 1, group.group);
                } else if group.owner != SiteId(owner as u32 + 1) {
                    return format!(
                        "site {} follows site {} as owner of group {}, not site {}",
                        site + 1,
                        group.owner,
                        group.group,
                        owner + 1
                    );
                }
            }
        }
        if !self.net.links.iter().all(|link| link.healthy()) {
            return "a link is down".into();
        }
        "replicas differ from their owners' last delta".into()
    }

    /// Every site that does not own a group holds and applied every delta
    /// of it, and is not mid-resync.
    fn replication_settled(&self) -> bool {
        let statuses: Vec<Vec<stretch_core::GroupReplication>> = self
            .sites
            .iter()
            .map(|site| {
                site.node
                    .as_ref()
                    .map(|node| node.engine.replication_status())
                    .unwrap_or_default()
            })
            .collect();
        for (site, status) in statuses.iter().enumerate() {
            for group in status {
                let owner = self.control.owner(group.group.0);
                if owner == site {
                    let caught_up = group.peers.iter().all(|peer| {
                        peer.state == stretch_core::PeerState::Streaming
                            && peer.unapplied_deltas == 0
                            && peer.resync_regions_left == 0
                    });
                    if !caught_up {
                        return false;
                    }
                    continue;
                }
                let owner_last = statuses[owner]
                    .iter()
                    .find(|other| other.group == group.group)
                    .map(|other| other.last_seq);
                if !group.consistent || owner_last != Some(group.last_seq) {
                    return false;
                }
            }
        }
        true
    }

    fn final_check(&mut self) {
        if self.checker.unanswered() > 0 {
            let count = self.checker.unanswered();
            let named: Vec<String> = self
                .requests
                .iter()
                .take(5)
                .map(|(id, request)| format!("request {id} at site {}", request.site + 1))
                .collect();
            self.fail(Violation {
                guarantee: "acks",
                detail: format!(
                    "{count} requests were never answered ({})",
                    named.join(", ")
                ),
            });
            return;
        }
        for site in 0..self.sites.len() {
            let Some(node) = &self.sites[site].node else {
                let detail = if self.multi() {
                    format!("the run ended with site {} down", site + 1)
                } else {
                    "the run ended with the node down".into()
                };
                self.fail(Violation {
                    guarantee: "G6",
                    detail,
                });
                return;
            };
            debug_assert!(
                node.engine.failure().is_none(),
                "a drained node has not failed"
            );
            for volume in 0..self.scenario.topology.volumes as usize {
                let at_owner = self.owner_of_volume(volume) == site;
                let checked = self.sites[site]
                    .fs
                    .with_content(&volume_path(volume), |image| {
                        self.checker.check_final(volume, image)
                    });
                let result = checked.unwrap_or_else(|| {
                    Err(format!("the leg of volume {volume} is gone at the end"))
                });
                if let Err(detail) = result {
                    let (guarantee, detail) = if !self.multi() {
                        ("G3", detail)
                    } else if at_owner {
                        ("G3", format!("site {} (owner): {detail}", site + 1))
                    } else {
                        (
                            "G6",
                            format!(
                                "site {} did not converge on owner site {}: {detail}",
                                site + 1,
                                self.owner_of_volume(volume) + 1
                            ),
                        )
                    };
                    self.fail(Violation { guarantee, detail });
                    return;
                }
            }
        }
    }

    /// Longest a write at its owner may wait when it needs no other site
    /// (async, or a plain write in flush-sync mode), whatever the network
    /// does: the backlog bound's wait, plus room for the simulated disk
    /// (a write may wait on journal syncs and leg writes under cache
    /// pressure), plus the slowness of the site's disk operations drawn
    /// slow while it waited (a slow disk is not a stalled owner: the
    /// operations, up to 100 times the usual latency, queue one behind the
    /// other on each device).
    fn owner_write_stall_bound_ns(&self, request: &ClientRequest) -> u64 {
        let disk_ns = self.scenario.faults.disk_latency_us_max * 1000 * 300;
        let slow_ns = self.sites[request.site].slow_disk_ns - request.slow_disk_ns_at_issue;
        // A write to a region another site leases waits for its lease to
        // be revoked, one lease period at most (stretched by drift), if a
        // write of its volume waited for one meanwhile.
        let waited = self.lease_waits(request.site, request.volume) > request.lease_waits_at_issue;
        let read_lease_ns = if waited {
            2 * self.scenario.engine.read_lease_ms * MS
        } else {
            0
        };
        // At a fast migration's target a write to a region not copied yet
        // waits for the copy, or fails after the remote timeout; so may
        // any write queued behind one that does (if one waited meanwhile).
        let copy_ns = if self.copy_waits(request.site) > request.copy_waits_at_issue {
            self.scenario.engine.remote_timeout_ms * MS
        } else {
            0
        };
        self.scenario.engine.backlog_wait_ms_max * MS
            + 500 * MS
            + disk_ns
            + slow_ns
            + read_lease_ns
            + copy_ns
    }

    /// Cheap invariants after every step.
    fn check_invariants(&mut self) {
        if self.multi() {
            let stalled = self.requests.iter().find(|(_, request)| {
                request.owner_local_write
                    && self.now - request.issued_at > self.owner_write_stall_bound_ns(request)
            });
            if let Some((id, request)) = stalled {
                let detail = format!(
                    "a write at its owner site {} (request {id}) has waited {} ms, over the bound of {} ms: a slow or cut link stalled the owner",
                    request.site + 1,
                    (self.now - request.issued_at) / MS,
                    self.owner_write_stall_bound_ns(request) / MS
                );
                self.fail(Violation {
                    guarantee: "G5",
                    detail,
                });
                return;
            }
        }
        for site in 0..self.sites.len() {
            let Some(node) = &self.sites[site].node else {
                continue;
            };
            // Checked after every event: the cache's size alone (the full
            // stats cost a copy and a walk of every peer each time), and
            // the allowance only once the plain bound is passed.
            let used = node.engine.cache_bytes();
            if used <= self.scenario.engine.cache_bytes_max {
                continue;
            }
            let bound = self.scenario.engine.cache_bytes_max + self.received_allowance(site);
            if used > bound {
                let at = if self.multi() {
                    format!("site {}: ", site + 1)
                } else {
                    String::new()
                };
                self.fail(Violation {
                    guarantee: "bounds",
                    detail: format!(
                        "{at}cache holds {used} bytes, over cache_bytes_max {} (plus {} for what other sites may send)",
                        self.scenario.engine.cache_bytes_max,
                        bound - self.scenario.engine.cache_bytes_max,
                    ),
                });
                return;
            }
        }
        if self.resyncing.is_empty() {
            return;
        }
        // A site exempt after crashing mid-resync is checked again once
        // it reports its legs consistent.
        let exempt: Vec<(usize, u32)> = self.resyncing.iter().copied().collect();
        for (site, group) in exempt {
            if self.group_consistent(site, group) == Some(true) {
                self.resyncing.remove(&(site, group));
            }
        }
    }

    /// Memory a site cannot refuse (see the engine's `cache_bytes_max`):
    /// per other site owning groups, its backlog of deltas (the bound, plus
    /// a full delta per group it owns, closed past the bound) and its
    /// window of resync chunks; block bookkeeping on top.
    fn received_allowance(&self, site: usize) -> u64 {
        let engine = &self.scenario.engine;
        let resync_window_bytes =
            engine.resync_chunks_in_flight_max as u64 * engine.region_blocks * BLOCK_SIZE as u64;
        let allowance: u64 = (0..self.sites.len())
            .filter(|owner| *owner != site)
            .map(|owner| {
                let groups = (1..=self.scenario.topology.groups)
                    .filter(|group| self.control.ever_owned(owner, *group))
                    .count() as u64;
                if groups == 0 {
                    return 0;
                }
                engine.backlog_bytes_max + groups * engine.delta_max_bytes + resync_window_bytes
            })
            .sum();
        // 64 bytes of bookkeeping per 4 KiB block.
        allowance + allowance / 64
    }

    /// What the site's engine says about the group's legs being at a delta
    /// boundary (None while the site is down).
    fn group_consistent(&self, site: usize, group: u32) -> Option<bool> {
        let node = self.sites[site].node.as_ref()?;
        Some(
            node.engine
                .replication_status()
                .iter()
                .find(|status| status.group == GroupId(group))
                .is_none_or(|status| status.consistent),
        )
    }

    fn schedule_next_crash(&mut self) {
        self.schedule_poisson(self.scenario.faults.crash_per_second, Event::Crash);
    }

    fn schedule_next_sync_failure(&mut self) {
        let rate = self.scenario.faults.fsync_failure_per_second;
        self.schedule_poisson(rate, Event::SyncFailureStart);
    }

    /// Schedules the next event of a Poisson process (none at rate 0).
    fn schedule_poisson(&mut self, rate_per_second: f64, event: Event) {
        if rate_per_second <= 0.0 {
            return;
        }
        let at = self.now + exponential(&mut self.rng, rate_per_second);
        self.schedule(at, event);
    }

    /// The latency of one operation on `site`'s disk.
    fn disk_latency(&mut self, site: usize) -> u64 {
        let faults = &self.scenario.faults;
        let usual_max = faults.disk_latency_us_max * 1000;
        let mut latency = self
            .rng
            .between(faults.disk_latency_us_min, faults.disk_latency_us_max)
            * 1000;
        if self.rng.chance(faults.slow_disk_probability) {
            latency *= 100;
            self.sites[site].slow_disk_ns += latency.saturating_sub(usual_max);
        }
        latency
    }

    /// A site drawn uniformly (no draw with one site).
    /// Writes of `volume` that `site` held for read-lease revocations
    /// since it last started.
    /// Requests at `site` that waited for a fast migration's copy, this
    /// run of its node.
    fn copy_waits(&self, site: usize) -> u64 {
        self.sites[site].node.as_ref().map_or(0, |node| {
            node.engine
                .marks()
                .count(stretch_core::Mark::FastDrainRequestWaited)
        })
    }

    fn lease_waits(&self, site: usize, volume: usize) -> u64 {
        self.sites[site].node.as_ref().map_or(0, |node| {
            node.engine
                .read_lease_counters(VolumeId(volume as u32 + 1))
                .writes_waited_total
        })
    }

    /// Site `site`'s own monotonic clock now (see [`site_time`]).
    fn site_now(&self, site: usize) -> Timestamp {
        site_time(self.now, self.sites[site].drift_ppm)
    }

    fn pick_site(&mut self) -> usize {
        if self.multi() {
            self.rng.below(self.sites.len() as u64) as usize
        } else {
            0
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::ClientTurn(client) => self.client_turn(client),
            Event::JournalOpDone { site, generation } => {
                if generation == self.sites[site].generation {
                    self.finish_journal_op(site);
                }
            }
            Event::LegOpDone { site, generation } => {
                if generation == self.sites[site].generation {
                    self.finish_leg_op(site);
                }
            }
            Event::LegReadDone {
                site,
                generation,
                io,
                volume,
                offset,
                length,
            } => {
                if generation != self.sites[site].generation {
                    return;
                }
                let Some(node) = &mut self.sites[site].node else {
                    return;
                };
                let result = match node.legs.get(&volume) {
                    Some(leg) => leg.read(offset, length).map_err(|error| error.to_string()),
                    None => Err(format!("no leg for volume {volume}")),
                };
                self.trace.record(
                    self.now,
                    Some(site),
                    &[3, io.0, result.is_ok() as u64],
                    || format!("leg read io {io} volume {volume} {offset}+{length} done"),
                );
                let now = site_time(self.now, self.sites[site].drift_ppm);
                let Some(node) = &mut self.sites[site].node else {
                    return;
                };
                node.engine.advance_clock(now);
                node.engine.leg_read_done(io, result);
                self.dispatch(site);
            }
            Event::Timer { site, generation } => {
                if generation != self.sites[site].generation {
                    return;
                }
                let now = self.site_now(site);
                if let Some(node) = &mut self.sites[site].node {
                    node.timer_at = None;
                    node.engine.handle_timeout(now);
                }
                self.trace
                    .record(self.now, Some(site), &[4], || "timer".into());
                self.dispatch(site);
            }
            Event::Crash => {
                if !self.workload_over {
                    let site = self.pick_site();
                    self.crash(site, "power loss");
                    self.schedule_next_crash();
                }
            }
            Event::Restart(site) => self.restart(site),
            Event::SyncFailureStart => {
                if self.workload_over {
                    return;
                }
                let site = self.pick_site();
                self.stats.fsync_failure_windows += 1;
                self.sites[site].fs.set_sync_failure(true);
                let length = self.rng.between(1, 50) * MS;
                self.trace.record(self.now, Some(site), &[5, length], || {
                    format!("fsync fails for {} ms", length / MS)
                });
                self.schedule(self.now + length, Event::SyncFailureEnd(site));
                self.schedule_next_sync_failure();
            }
            Event::SyncFailureEnd(site) => {
                self.sites[site].fs.set_sync_failure(false);
                self.trace
                    .record(self.now, Some(site), &[6], || "fsync works again".into());
            }
            Event::EndOfWorkload => {
                self.workload_over = true;
                for site in &self.sites {
                    site.fs.set_sync_failure(false);
                }
                self.trace
                    .record(self.now, None, &[7], || "workload over; draining".into());
                self.draining_since = Some(self.now);
                if self.multi() {
                    self.isolation_end();
                    self.heal_everything();
                }
                self.maybe_start_drain();
            }
            Event::Pump {
                from,
                to,
                generation,
            } => {
                if generation == self.sites[from].generation {
                    self.pump(from, to);
                }
            }
            Event::Deliver { packet, at } => self.deliver(packet, at),
            Event::Cut => self.cut(),
            Event::CutEnd { link, directions } => self.cut_end(link, directions),
            Event::Reset => self.reset(),
            Event::Blip => self.blip(),
            Event::Detect { link, conn } => {
                let state = &self.net.links[link];
                let silent = state.broken.iter().chain(&state.cut).any(|b| *b);
                if state.conn == Some(conn) && silent {
                    self.drop_connection(link, "an end noticed it is dead");
                    self.schedule_dial(link);
                }
            }
            Event::Dial(link) => self.dial(link),
            Event::SiteLoss => self.site_loss(),
            Event::LeaseRenew(site) => self.lease_tick(site),
            Event::Failover => self.failover(),
            Event::Takeover => self.takeover(),
            Event::IsolationEnd => self.isolation_end(),
            Event::Learn(site) => self.learn_after_isolation(site),
            Event::MigrationStart => self.migration_start(),
            Event::MigrationStep(group) => self.migration_step(group),
            Event::FastDrainStep(group) => self.fast_drain_step(group),
            Event::MigrationTargetLearns(site) => self.learn_now(site),
        }
    }

    fn maybe_start_drain(&mut self) {
        if !self.workload_over || !self.requests.is_empty() {
            return;
        }
        for site in 0..self.sites.len() {
            if let Some(node) = &mut self.sites[site].node {
                node.engine.start_drain();
                self.dispatch(site);
            }
        }
    }
}

/// Time to the next event of a Poisson process with `rate` per second.
fn exponential(rng: &mut SimRng, rate: f64) -> u64 {
    let uniform = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let seconds = -(1.0 - uniform).ln() / rate;
    (seconds * 1e9).min(1e15) as u64
}
