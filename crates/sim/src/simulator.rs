//! The simulation loop: one thread, a virtual clock, an event queue, the
//! real engine and the real journal/leg/recovery code on a simulated disk.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stretch_core::{
    Action, BlockImage, BlockKey, DeltaRecord, Engine, EngineConfig, GroupId, IoId,
    JournalPosition, PlantedBug, RecoveredState, Request, RequestId, Response, Timestamp, VolumeId,
    VolumeSpec,
};
use stretch_storage::{Journal, Leg, SimFileSystem, apply_to_legs, recover};

use crate::checker::{Checker, SECTOR_BYTES, Tracked, Violation, WriteKind, payload};
use crate::rng::SimRng;
use crate::scenario::Scenario;
use crate::trace::Trace;

/// A defect planted on purpose, to prove the checker catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimBug {
    /// A defect inside the protocol core.
    Core(PlantedBug),
    /// The disk driver reports journal syncs it never did.
    SkipJournalFsync,
}

impl SimBug {
    pub const ALL: [SimBug; 4] = [
        SimBug::SkipJournalFsync,
        SimBug::Core(PlantedBug::AckFlushEarly),
        SimBug::Core(PlantedBug::ApplyBeforeJournalSync),
        SimBug::Core(PlantedBug::ApplyNewestFirst),
    ];

    pub fn name(self) -> &'static str {
        match self {
            SimBug::SkipJournalFsync => "skip-journal-fsync",
            SimBug::Core(PlantedBug::AckFlushEarly) => "ack-flush-early",
            SimBug::Core(PlantedBug::ApplyBeforeJournalSync) => "apply-before-journal-sync",
            SimBug::Core(PlantedBug::ApplyNewestFirst) => "apply-newest-first",
            SimBug::Core(PlantedBug::AcceptDeltaGap) => "accept-delta-gap",
            SimBug::Core(PlantedBug::FlushSyncLocalOnly) => "flush-sync-local-only",
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
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub scenario: String,
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
    Outcome {
        seed: options.seed,
        scenario: scenario.name.clone(),
        trace_hash: sim.trace.hash(),
        simulated_ns: sim.now,
        stats: sim.stats.clone(),
        violation: sim.violation.clone(),
        trace: sim.trace.take_lines(),
    }
}

const MS: u64 = 1_000_000;
/// Longest the liveness phase may take to drain everything to the legs.
const DRAIN_LIMIT_NS: u64 = 120_000 * MS;

#[derive(Debug, Clone)]
enum Event {
    ClientTurn(usize),
    JournalOpDone(u64),
    LegOpDone(u64),
    LegReadDone {
        generation: u64,
        io: IoId,
        volume: VolumeId,
        offset: u64,
        length: u64,
    },
    Timer(u64),
    Crash,
    Restart,
    SyncFailureStart,
    SyncFailureEnd,
    EndOfWorkload,
}

#[derive(Debug)]
enum JournalOp {
    Append(DeltaRecord),
    Sync(IoId),
    Release(JournalPosition),
}

#[derive(Debug)]
enum LegOp {
    Write(IoId, Vec<(BlockKey, BlockImage)>),
    Sync(IoId, Vec<VolumeId>),
}

struct NodeState {
    engine: Engine,
    journal: Journal<SimFileSystem>,
    legs: BTreeMap<VolumeId, Leg<SimFileSystem>>,
    journal_device: Device<JournalOp>,
    leg_device: Device<LegOp>,
    timer_at: Option<u64>,
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
}

struct Simulation<'a> {
    scenario: &'a Scenario,
    options: &'a SimOptions,
    rng: SimRng,
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    next_event: u64,
    fs: SimFileSystem,
    node: Option<NodeState>,
    generation: u64,
    restart_pending: bool,
    clients_busy: Vec<bool>,
    requests: BTreeMap<u64, ClientRequest>,
    next_request: u64,
    checker: Checker,
    trace: Trace,
    stats: Stats,
    workload_over: bool,
    draining_since: Option<u64>,
    violation: Option<(Violation, u64, u64)>,
}

fn volume_path(index: usize) -> PathBuf {
    PathBuf::from(format!("/node/legs/volume-{index}.raw"))
}

fn journal_dir() -> &'static Path {
    Path::new("/node/journal")
}

impl<'a> Simulation<'a> {
    fn new(scenario: &'a Scenario, options: &'a SimOptions) -> Self {
        let groups: Vec<u32> = (0..scenario.topology.volumes)
            .map(|index| index % scenario.topology.groups + 1)
            .collect();
        Simulation {
            scenario,
            options,
            rng: SimRng::new(options.seed),
            now: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            fs: SimFileSystem::new(),
            node: None,
            generation: 0,
            restart_pending: false,
            clients_busy: vec![false; scenario.workload.clients as usize],
            requests: BTreeMap::new(),
            next_request: 1,
            checker: Checker::new(&groups, scenario.topology.volume_bytes),
            trace: Trace::new(options.record_trace),
            stats: Stats::default(),
            workload_over: false,
            draining_since: None,
            violation: None,
        }
    }

    fn engine_config(&self) -> EngineConfig {
        let tuning = &self.scenario.engine;
        EngineConfig {
            delta_interval_ms: tuning.delta_interval_ms,
            delta_max_bytes: tuning.delta_max_bytes,
            cache_bytes_max: tuning.cache_bytes_max,
            journal_checkpoint_bytes: tuning.journal_checkpoint_bytes,
            planted_bug: match self.options.bug {
                Some(SimBug::Core(bug)) => Some(bug),
                _ => None,
            },
            ..EngineConfig::default()
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
            self.trace.record(self.now, &[u64::MAX], || {
                format!("VIOLATION {}: {detail}", violation.guarantee)
            });
            self.violation = Some((violation, self.stats.events, self.now));
        }
    }

    fn run(&mut self) {
        let volumes = self.scenario.topology.volumes as usize;
        let size = self.scenario.topology.volume_bytes;
        for index in 0..volumes {
            if let Err(error) = Leg::create(&self.fs, &volume_path(index), size) {
                panic!(
                    "simulator invariant: creating a leg on a fresh simulated disk works: {error}"
                );
            }
        }
        self.start_node(true);
        for client in 0..self.clients_busy.len() {
            let at = self.rng.below(MS);
            self.schedule(at, Event::ClientTurn(client));
        }
        let end = (self.scenario.duration_seconds * 1e9) as u64;
        self.schedule(end, Event::EndOfWorkload);
        self.schedule_next_crash();
        self.schedule_next_sync_failure();
        while let Some(Reverse((at, id))) = self.queue.pop() {
            let event = self
                .events
                .remove(&id)
                .expect("simulator invariant: every queued event is stored");
            self.now = at;
            self.stats.events += 1;
            self.handle(event);
            if self.violation.is_some() {
                return;
            }
            self.check_invariants();
            if self.violation.is_some() || self.finished() {
                break;
            }
            if let Some(since) = self.draining_since
                && self.now - since > DRAIN_LIMIT_NS
            {
                self.fail(Violation {
                    guarantee: "G6",
                    detail: "the node did not drain to its legs within 120 simulated seconds"
                        .into(),
                });
                return;
            }
        }
        if self.violation.is_none() {
            self.final_check();
        }
    }

    fn finished(&self) -> bool {
        let Some(node) = &self.node else {
            return false;
        };
        self.workload_over && self.requests.is_empty() && node.engine.is_drained()
    }

    fn final_check(&mut self) {
        if self.checker.unanswered() > 0 {
            let count = self.checker.unanswered();
            self.fail(Violation {
                guarantee: "acks",
                detail: format!("{count} requests were never answered"),
            });
            return;
        }
        let Some(node) = &self.node else {
            self.fail(Violation {
                guarantee: "G6",
                detail: "the run ended with the node down".into(),
            });
            return;
        };
        debug_assert!(
            node.engine.failure().is_none(),
            "a drained node has not failed"
        );
        for volume in 0..self.scenario.topology.volumes as usize {
            let checked = self.fs.with_content(&volume_path(volume), |image| {
                self.checker.check_final(volume, image)
            });
            let result = checked.unwrap_or_else(|| {
                Err(Violation {
                    guarantee: "G6",
                    detail: format!("the leg of volume {volume} is gone at the end"),
                })
            });
            if let Err(violation) = result {
                self.fail(violation);
                return;
            }
        }
    }

    /// Cheap invariants after every step.
    fn check_invariants(&mut self) {
        let Some(node) = &self.node else {
            return;
        };
        let stats = node.engine.stats();
        let used = stats.dirty_bytes + stats.clean_bytes;
        if used > self.scenario.engine.cache_bytes_max {
            self.fail(Violation {
                guarantee: "bounds",
                detail: format!(
                    "cache holds {used} bytes, over cache_bytes_max {}",
                    self.scenario.engine.cache_bytes_max
                ),
            });
        }
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

    fn disk_latency(&mut self) -> u64 {
        let faults = &self.scenario.faults;
        let mut latency = self
            .rng
            .between(faults.disk_latency_us_min, faults.disk_latency_us_max)
            * 1000;
        if self.rng.chance(faults.slow_disk_probability) {
            latency *= 100;
        }
        latency
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::ClientTurn(client) => self.client_turn(client),
            Event::JournalOpDone(generation) => {
                if generation == self.generation {
                    self.finish_journal_op();
                }
            }
            Event::LegOpDone(generation) => {
                if generation == self.generation {
                    self.finish_leg_op();
                }
            }
            Event::LegReadDone {
                generation,
                io,
                volume,
                offset,
                length,
            } => {
                if generation != self.generation {
                    return;
                }
                let Some(node) = &mut self.node else {
                    return;
                };
                let result = match node.legs.get(&volume) {
                    Some(leg) => leg.read(offset, length).map_err(|error| error.to_string()),
                    None => Err(format!("no leg for volume {volume}")),
                };
                self.trace
                    .record(self.now, &[3, io.0, result.is_ok() as u64], || {
                        format!("leg read io {io} volume {volume} {offset}+{length} done")
                    });
                node.engine.leg_read_done(io, result);
                self.dispatch();
            }
            Event::Timer(generation) => {
                if generation != self.generation {
                    return;
                }
                let now = Timestamp(self.now);
                if let Some(node) = &mut self.node {
                    node.timer_at = None;
                    node.engine.handle_timeout(now);
                }
                self.trace.record(self.now, &[4], || "timer".into());
                self.dispatch();
            }
            Event::Crash => {
                if !self.workload_over {
                    self.crash("power loss");
                    self.schedule_next_crash();
                }
            }
            Event::Restart => self.restart(),
            Event::SyncFailureStart => {
                if self.workload_over {
                    return;
                }
                self.stats.fsync_failure_windows += 1;
                self.fs.set_sync_failure(true);
                let length = self.rng.between(1, 50) * MS;
                self.trace.record(self.now, &[5, length], || {
                    format!("fsync fails for {} ms", length / MS)
                });
                self.schedule(self.now + length, Event::SyncFailureEnd);
                self.schedule_next_sync_failure();
            }
            Event::SyncFailureEnd => {
                self.fs.set_sync_failure(false);
                self.trace
                    .record(self.now, &[6], || "fsync works again".into());
            }
            Event::EndOfWorkload => {
                self.workload_over = true;
                self.fs.set_sync_failure(false);
                self.trace
                    .record(self.now, &[7], || "workload over; draining".into());
                self.draining_since = Some(self.now);
                self.maybe_start_drain();
            }
        }
    }

    fn maybe_start_drain(&mut self) {
        if !self.workload_over || !self.requests.is_empty() {
            return;
        }
        if let Some(node) = &mut self.node {
            node.engine.start_drain();
            self.dispatch();
        }
    }

    // -- clients ----------------------------------------------------------

    fn client_turn(&mut self, client: usize) {
        if self.workload_over || self.node.is_none() || self.clients_busy[client] {
            return;
        }
        let workload = &self.scenario.workload;
        let weights = [
            workload.read,
            workload.write,
            workload.fua_write,
            workload.flush,
            workload.trim,
            workload.write_zeroes,
        ];
        let total: u64 = weights.iter().map(|w| *w as u64).sum();
        let mut pick = self.rng.below(total);
        let mut kind = 0;
        for (index, weight) in weights.iter().enumerate() {
            if pick < *weight as u64 {
                kind = index;
                break;
            }
            pick -= *weight as u64;
        }
        let volumes = self.scenario.topology.volumes as u64;
        let volume = self.rng.below(volumes) as usize;
        let sectors = self.scenario.topology.volume_bytes / SECTOR_BYTES;
        let mut range = None;
        if kind != 3 {
            for _ in 0..4 {
                let count = self.rng.between(1, workload.sectors_max.min(sectors));
                let first = self.rng.below(sectors - count + 1);
                if !self.conflicts(volume, first, count, kind != 0) {
                    range = Some((first, count));
                    break;
                }
            }
            if range.is_none() {
                self.next_turn(client);
                return;
            }
        }
        let request = self.next_request;
        self.next_request += 1;
        let volume_id = VolumeId(volume as u32 + 1);
        let (first, count) = range.unwrap_or((0, 0));
        let offset = first * SECTOR_BYTES;
        let length = count * SECTOR_BYTES;
        let mut write_id = 0;
        let (engine_request, fua) = match kind {
            0 => {
                self.stats.reads += 1;
                self.checker.issue(
                    request,
                    Tracked::Read {
                        volume,
                        first,
                        count,
                    },
                );
                let request = Request::Read {
                    volume: volume_id,
                    offset,
                    length,
                };
                (request, false)
            }
            1 | 2 => {
                self.stats.writes += 1;
                let id = self
                    .checker
                    .issue_write(request, volume, first, count, WriteKind::Data);
                write_id = id;
                let fua = kind == 2;
                let data = payload(id, first, count);
                let request = Request::Write {
                    volume: volume_id,
                    offset,
                    data,
                    fua,
                };
                (request, fua)
            }
            3 => {
                self.stats.flushes += 1;
                let issued = self.checker.tick();
                self.checker
                    .issue(request, Tracked::Flush { volume, issued });
                (Request::Flush { volume: volume_id }, false)
            }
            4 => {
                self.checker.issue(request, Tracked::Trim);
                let request = Request::Trim {
                    volume: volume_id,
                    offset,
                    length,
                };
                (request, false)
            }
            _ => {
                self.stats.writes += 1;
                write_id = self
                    .checker
                    .issue_write(request, volume, first, count, WriteKind::Zero);
                let fua = self.rng.chance(0.2);
                let request = Request::WriteZeroes {
                    volume: volume_id,
                    offset,
                    length,
                    fua,
                };
                (request, fua)
            }
        };
        self.stats.requests += 1;
        self.clients_busy[client] = true;
        self.requests.insert(request, ClientRequest { client, fua });
        self.trace
            .record(self.now, &[1, request, kind as u64, volume as u64, first, count], || {
                let names = ["read", "write", "fua-write", "flush", "trim", "write-zeroes"];
                format!(
                    "client {client} request {request}: {} volume {volume} sectors {first}+{count} (write id {write_id})",
                    names[kind]
                )
            });
        let node = self.node.as_mut().expect("checked above: the node is up");
        node.engine
            .submit(Timestamp(self.now), RequestId(request), engine_request);
        self.dispatch();
    }

    /// Two requests conflict if they overlap and either writes.
    fn conflicts(&self, volume: usize, first: u64, count: u64, writes: bool) -> bool {
        self.checker.in_flight().any(|tracked| {
            let (other_volume, other_first, other_count, other_writes) = match tracked {
                Tracked::Read {
                    volume,
                    first,
                    count,
                } => (*volume, *first, *count, false),
                Tracked::Write { id } => {
                    let (volume, first, count) = self.checker.write_range(*id);
                    (volume, first, count, true)
                }
                Tracked::Flush { .. } | Tracked::Trim => return false,
            };
            other_volume == volume
                && (writes || other_writes)
                && first < other_first + other_count
                && other_first < first + count
        })
    }

    fn next_turn(&mut self, client: usize) {
        let think = self.rng.below(self.scenario.workload.think_ms_max * MS + 1);
        self.schedule(self.now + think, Event::ClientTurn(client));
    }

    // -- executing engine actions ------------------------------------------

    fn dispatch(&mut self) {
        loop {
            let Some(node) = &mut self.node else {
                return;
            };
            let Some(action) = node.engine.poll_action() else {
                break;
            };
            match action {
                Action::Reply { request, result } => self.on_reply(request, result),
                Action::Send { .. }
                | Action::SaveDirtyMap { .. }
                | Action::SaveResyncMarks { .. } => {
                    unreachable!("simulator invariant: a single-site engine has no peer")
                }
                Action::ReadLeg {
                    io,
                    volume,
                    offset,
                    length,
                } => {
                    let latency = self.disk_latency();
                    let generation = self.generation;
                    self.schedule(
                        self.now + latency,
                        Event::LegReadDone {
                            generation,
                            io,
                            volume,
                            offset,
                            length,
                        },
                    );
                }
                Action::AppendJournal { record } => {
                    self.queue_journal(JournalOp::Append(record));
                }
                Action::SyncJournal { io, .. } => self.queue_journal(JournalOp::Sync(io)),
                Action::ReleaseJournal { upto } => {
                    self.queue_journal(JournalOp::Release(upto));
                }
                Action::WriteLeg { io, blocks, .. } => self.queue_leg(LegOp::Write(io, blocks)),
                Action::SyncLegs { io, volumes } => self.queue_leg(LegOp::Sync(io, volumes)),
            }
        }
        self.arm_timer();
        if let Some(node) = &self.node
            && node.engine.failure().is_some()
            && !self.restart_pending
        {
            // Fail-stop: a node that cannot make writes durable restarts
            // and recovers from what its disk really holds.
            self.stats.node_failures += 1;
            self.crash("storage failure (fail-stop)");
        }
    }

    fn arm_timer(&mut self) {
        let generation = self.generation;
        let Some(node) = &mut self.node else {
            return;
        };
        let Some(deadline) = node.engine.poll_timeout() else {
            return;
        };
        let at = deadline.as_nanos().max(self.now);
        if node.timer_at.is_some_and(|armed| armed <= at) {
            return;
        }
        node.timer_at = Some(at);
        self.schedule(at, Event::Timer(generation));
    }

    fn on_reply(
        &mut self,
        request: RequestId,
        result: Result<Response, stretch_core::RequestError>,
    ) {
        let Some(tracked) = self.requests.remove(&request.0) else {
            self.fail(Violation {
                guarantee: "acks",
                detail: format!("request {request} answered twice or never issued"),
            });
            return;
        };
        let ok = result.is_ok();
        let data = match &result {
            Ok(Response::Data(data)) => Some(data.clone()),
            _ => None,
        };
        self.trace.record(self.now, &[2, request.0, ok as u64], || {
            format!(
                "reply to request {request}: {}",
                match &result {
                    Ok(_) => "ok".to_string(),
                    Err(error) => format!("error: {error}"),
                }
            )
        });
        if let Err(violation) = self
            .checker
            .on_reply(request.0, ok, data.as_ref(), tracked.fua)
        {
            self.fail(violation);
            return;
        }
        self.clients_busy[tracked.client] = false;
        self.next_turn(tracked.client);
        self.maybe_start_drain();
    }

    fn queue_journal(&mut self, op: JournalOp) {
        let node = self.node.as_mut().expect("simulator invariant: node up");
        if node.journal_device.push(op) {
            self.start_device(Event::JournalOpDone(self.generation));
        }
    }

    fn queue_leg(&mut self, op: LegOp) {
        let node = self.node.as_mut().expect("simulator invariant: node up");
        if node.leg_device.push(op) {
            self.start_device(Event::LegOpDone(self.generation));
        }
    }

    /// The device's next operation completes after one disk latency.
    fn start_device(&mut self, done: Event) {
        let latency = self.disk_latency();
        self.schedule(self.now + latency, done);
    }

    /// The journal device finished its oldest queued operation: perform it
    /// now (so a crash before this point loses it) and report the result.
    fn finish_journal_op(&mut self) {
        let skip_fsync = self.options.bug == Some(SimBug::SkipJournalFsync);
        let node = self.node.as_mut().expect("simulator invariant: node up");
        let (op, more) = node.journal_device.finish();
        match op {
            JournalOp::Append(record) => {
                let position = record.position.0;
                if let Err(error) = node.journal.append(&record) {
                    node.engine.journal_failed(error.to_string());
                }
                self.trace.record(self.now, &[10, position], || {
                    format!("journal append position {position}")
                });
            }
            JournalOp::Sync(io) => {
                let result = if skip_fsync {
                    Ok(())
                } else {
                    node.journal.sync().map_err(|error| error.to_string())
                };
                let ok = result.is_ok();
                node.engine.journal_synced(io, result);
                self.trace.record(self.now, &[11, io.0, ok as u64], || {
                    format!("journal sync io {io}: {}", if ok { "ok" } else { "FAILED" })
                });
            }
            JournalOp::Release(upto) => {
                let ok = node.journal.release(upto).is_ok();
                self.trace.record(self.now, &[12, upto.0, ok as u64], || {
                    format!("journal release up to {upto}")
                });
            }
        }
        if more {
            self.start_device(Event::JournalOpDone(self.generation));
        }
        self.dispatch();
    }

    fn finish_leg_op(&mut self) {
        let node = self.node.as_mut().expect("simulator invariant: node up");
        let (op, more) = node.leg_device.finish();
        match op {
            LegOp::Write(io, blocks) => {
                let legs = &node.legs;
                let result = apply_to_legs(&blocks, |volume| legs.get(&volume))
                    .map_err(|error| error.to_string());
                let ok = result.is_ok();
                node.engine.leg_written(io, result);
                self.trace.record(self.now, &[13, io.0, ok as u64], || {
                    format!("leg write io {io} ({} blocks)", blocks.len())
                });
            }
            LegOp::Sync(io, volumes) => {
                let result = volumes
                    .iter()
                    .filter_map(|volume| node.legs.get(volume))
                    .try_for_each(|leg| leg.sync())
                    .map_err(|error| error.to_string());
                let ok = result.is_ok();
                node.engine.legs_synced(io, result);
                self.trace.record(self.now, &[14, io.0, ok as u64], || {
                    format!("leg sync io {io}: {}", if ok { "ok" } else { "FAILED" })
                });
            }
        }
        if more {
            self.start_device(Event::LegOpDone(self.generation));
        }
        self.dispatch();
    }

    // -- crash and restart --------------------------------------------------

    fn crash(&mut self, why: &str) {
        if self.node.is_none() {
            return;
        }
        self.stats.crashes += 1;
        self.node = None;
        self.generation += 1;
        self.fs.crash(&mut self.rng);
        self.checker.on_crash();
        for (_, request) in std::mem::take(&mut self.requests) {
            self.clients_busy[request.client] = false;
        }
        self.trace.record(self.now, &[20, self.generation], || {
            format!("CRASH ({why})")
        });
        self.restart_pending = true;
        let delay = self.scenario.faults.restart_ms.max(1) * MS;
        self.schedule(self.now + delay, Event::Restart);
    }

    fn restart(&mut self) {
        self.restart_pending = false;
        if !self.start_node(false) {
            // The disk still fails (an fsync failure window): try again.
            self.restart_pending = true;
            let delay = self.scenario.faults.restart_ms.max(1) * MS;
            self.schedule(self.now + delay, Event::Restart);
            return;
        }
        if self.violation.is_some() {
            return;
        }
        if self.workload_over {
            self.maybe_start_drain();
            return;
        }
        for client in 0..self.clients_busy.len() {
            self.next_turn(client);
        }
    }

    /// Opens legs, replays the journal (the same recovery code the runtime
    /// uses), checks the recovered images, and starts a fresh engine.
    fn start_node(&mut self, fresh: bool) -> bool {
        let fs = Arc::new(self.fs.clone());
        let volumes = self.scenario.topology.volumes as usize;
        let size = self.scenario.topology.volume_bytes;
        let mut legs = BTreeMap::new();
        for index in 0..volumes {
            match Leg::open(fs.as_ref(), &volume_path(index), size) {
                Ok(leg) => {
                    legs.insert(VolumeId(index as u32 + 1), leg);
                }
                Err(error) => {
                    self.fail(Violation {
                        guarantee: "G3",
                        detail: format!("leg of volume {index} unusable after crash: {error}"),
                    });
                    return true;
                }
            }
        }
        let recovery = match recover(&fs, journal_dir(), &legs) {
            Ok(recovery) => recovery,
            Err(error) => {
                self.trace
                    .record(self.now, &[21], || format!("recovery failed: {error}"));
                return false;
            }
        };
        let journal = match Journal::create(
            fs.clone(),
            journal_dir(),
            self.scenario.engine.journal_segment_bytes,
            recovery.next_position,
            recovery.next_seq.clone(),
        ) {
            Ok(mut journal) => {
                if journal.discard_replayed(&recovery.stale_segments).is_err() {
                    return false;
                }
                journal
            }
            Err(error) => {
                self.trace
                    .record(self.now, &[22], || format!("journal start failed: {error}"));
                return false;
            }
        };
        if !fresh {
            let mut visible = Vec::with_capacity(volumes);
            for volume in 0..volumes {
                let decoded = self
                    .fs
                    .with_content(&volume_path(volume), |image| {
                        self.checker.decode_image(volume, image)
                    })
                    .unwrap_or_else(|| {
                        Err(Violation {
                            guarantee: "G3",
                            detail: format!("the leg of volume {volume} is gone after recovery"),
                        })
                    });
                match decoded {
                    Ok(versions) => visible.push(versions),
                    Err(violation) => {
                        self.fail(violation);
                        return true;
                    }
                }
            }
            if let Err(violation) = self.checker.after_recovery(visible) {
                self.fail(violation);
                return true;
            }
        }
        let replayed = recovery.replayed_deltas;
        self.trace.record(self.now, &[23, replayed], || {
            format!("node started; recovery replayed {replayed} deltas")
        });
        let mut engine = Engine::new(
            self.engine_config(),
            RecoveredState {
                next_position: recovery.next_position,
                next_seq: recovery.next_seq,
                next_remote_id: self.generation << 32,
                // One site: no legs are ever mid-resync.
                ..RecoveredState::default()
            },
        );
        for index in 0..volumes {
            engine.add_volume(
                VolumeId(index as u32 + 1),
                VolumeSpec {
                    size,
                    group: GroupId(index as u32 % self.scenario.topology.groups + 1),
                    mode: stretch_core::Mode::Async,
                },
            );
        }
        self.node = Some(NodeState {
            engine,
            journal,
            legs,
            journal_device: Device::new(),
            leg_device: Device::new(),
            timer_at: None,
        });
        true
    }
}

/// Time to the next event of a Poisson process with `rate` per second.
fn exponential(rng: &mut SimRng, rate: f64) -> u64 {
    let uniform = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let seconds = -(1.0 - uniform).ln() / rate;
    (seconds * 1e9).min(1e15) as u64
}
