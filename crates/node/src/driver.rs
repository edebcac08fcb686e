//! The runtime driver: executes the engine's actions with real files and
//! feeds the results back.
//!
//! Threads and ordering:
//! - journal actions (append, sync, release) go, in emission order, to one
//!   journal thread; its fdatasync is the group commit;
//! - leg actions (apply a delta, sync legs) go, in emission order, to one
//!   leg thread;
//! - leg reads run on the task that needs them (positional reads of legs
//!   that are almost always in the page cache);
//! - the engine lock is never held across I/O.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use stretch_core::{
    Action, DeltaRecord, Engine, JournalPosition, Request, RequestError, RequestId, Response,
    SiteId, SiteMessage, Timestamp, VolumeId,
};
use stretch_storage::{Journal, Leg, OsFileSystem};
use tokio::sync::{Notify, oneshot};

use crate::metrics::Metrics;

pub(crate) type OsLeg = Leg<OsFileSystem>;
type Reply = Result<Response, RequestError>;

/// State shared by the NBD tasks, the admin API, the timer and the I/O
/// threads of one node.
#[derive(Debug)]
pub(crate) struct Driver {
    pub engine: Mutex<Engine>,
    pub legs: RwLock<BTreeMap<VolumeId, Arc<OsLeg>>>,
    pub metrics: Metrics,
    replies: Mutex<HashMap<RequestId, oneshot::Sender<Reply>>>,
    next_request: AtomicU64,
    /// Nanoseconds since start of the earliest deadline the timer task is
    /// sleeping towards; u64::MAX when idle.
    timer_deadline: AtomicU64,
    timer: Notify,
    start: Instant,
    journal_queue: mpsc::Sender<JournalCommand>,
    leg_queue: mpsc::Sender<LegCommand>,
    /// Messages for other sites, in the order the engine emitted them. Its
    /// size is bounded by the engine: deltas by `backlog_bytes_max`, the
    /// rest by the requests clients may have in flight.
    outbox: tokio::sync::mpsc::UnboundedSender<(SiteId, SiteMessage)>,
    /// Where the maps of regions each other site may lack, the groups
    /// mid-resync here and the fast drain log are saved.
    paths: stretch_storage::StartPaths,
}

/// Where a driver's messages for other sites come out.
pub(crate) type Outbox = tokio::sync::mpsc::UnboundedReceiver<(SiteId, SiteMessage)>;

#[derive(Debug)]
enum JournalCommand {
    Append(DeltaRecord),
    Sync(stretch_core::IoId),
    Release(JournalPosition),
    SaveResyncMarks {
        io: stretch_core::IoId,
        path: PathBuf,
        groups: Vec<stretch_core::GroupId>,
    },
    SaveFastDrain {
        io: stretch_core::IoId,
        path: PathBuf,
        group: stretch_core::GroupId,
        epoch: stretch_core::Epoch,
        regions: Vec<(VolumeId, u64)>,
    },
}

#[derive(Debug)]
enum LegCommand {
    Write {
        io: stretch_core::IoId,
        blocks: Vec<(stretch_core::BlockKey, stretch_core::BlockImage)>,
    },
    Sync {
        io: stretch_core::IoId,
        volumes: Vec<VolumeId>,
    },
    SaveMap {
        io: stretch_core::IoId,
        path: PathBuf,
        regions: stretch_storage::Regions,
    },
}

/// The I/O threads of a driver; joined on shutdown.
#[derive(Debug)]
pub(crate) struct IoThreads {
    journal: JoinHandle<()>,
    legs: JoinHandle<()>,
}

impl IoThreads {
    pub fn join(self) {
        for (name, handle) in [("journal", self.journal), ("leg", self.legs)] {
            if handle.join().is_err() {
                tracing::error!("{name} thread panicked");
            }
        }
    }
}

impl Driver {
    /// Starts the I/O threads. They run until the driver is dropped (its
    /// queues close).
    pub fn start(
        engine: Engine,
        legs: BTreeMap<VolumeId, Arc<OsLeg>>,
        journal: Journal<OsFileSystem>,
        metrics: Metrics,
        name: &str,
        paths: stretch_storage::StartPaths,
    ) -> std::io::Result<(Arc<Driver>, IoThreads, Outbox)> {
        let (journal_queue, journal_commands) = mpsc::channel();
        let (leg_queue, leg_commands) = mpsc::channel();
        let (outbox, outbox_receiver) = tokio::sync::mpsc::unbounded_channel();
        let driver = Arc::new(Driver {
            engine: Mutex::new(engine),
            legs: RwLock::new(legs),
            metrics,
            replies: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            timer_deadline: AtomicU64::new(u64::MAX),
            timer: Notify::new(),
            start: Instant::now(),
            journal_queue,
            leg_queue,
            outbox,
            paths,
        });
        // The threads hold weak references: the queues close when the last
        // strong reference goes, which ends them.
        let weak = Arc::downgrade(&driver);
        let journal_thread = std::thread::Builder::new()
            .name(format!("{name}-journal"))
            .spawn(move || journal_loop(weak, journal, journal_commands))?;
        let weak = Arc::downgrade(&driver);
        let leg_thread = std::thread::Builder::new()
            .name(format!("{name}-legs"))
            .spawn(move || leg_loop(weak, leg_commands))?;
        Ok((
            driver,
            IoThreads {
                journal: journal_thread,
                legs: leg_thread,
            },
            outbox_receiver,
        ))
    }

    /// The instant the engine's clock counts from.
    pub fn origin(&self) -> Instant {
        self.start
    }

    pub fn now(&self) -> Timestamp {
        Timestamp(self.start.elapsed().as_nanos() as u64)
    }

    /// Runs one request through the engine and waits for its answer.
    pub async fn submit(&self, request: Request) -> Reply {
        let id = RequestId(self.next_request.fetch_add(1, Ordering::Relaxed));
        let (sender, receiver) = oneshot::channel();
        self.replies.lock().insert(id, sender);
        let now = self.now();
        self.with_engine(|engine| engine.submit(now, id, request));
        match receiver.await {
            Ok(reply) => reply,
            Err(_) => Err(RequestError::Io("node stopped before answering".into())),
        }
    }

    /// Calls into the engine, then executes whatever it asked for.
    pub fn with_engine<T>(&self, call: impl FnOnce(&mut Engine) -> T) -> T {
        let (result, actions) = {
            let mut engine = self.engine.lock();
            // The engine decides on its notion of now (an owner whose lease
            // ran out acknowledges nothing): keep it current before every
            // call, including those that carry no time (I/O completions).
            engine.advance_clock(self.now());
            let result = call(&mut engine);
            (result, self.drain(&mut engine))
        };
        self.execute(actions);
        result
    }

    /// Takes the engine's actions. Journal and leg actions are queued here,
    /// under the engine lock: the engine emits them in the order the disk
    /// must see them, and two threads each draining and then queueing
    /// outside the lock could swap them. Replies and leg reads are returned
    /// to run outside the lock.
    fn drain(&self, engine: &mut Engine) -> Vec<Action> {
        let mut rest = Vec::new();
        while let Some(action) = engine.poll_action() {
            match action {
                Action::AppendJournal { record } => {
                    self.queue_journal(JournalCommand::Append(record));
                }
                Action::SyncJournal { io, .. } => self.queue_journal(JournalCommand::Sync(io)),
                Action::ReleaseJournal { upto } => {
                    self.queue_journal(JournalCommand::Release(upto));
                }
                Action::SaveResyncMarks { io, groups } => {
                    let path = self.paths.resync_marks.clone();
                    self.queue_journal(JournalCommand::SaveResyncMarks { io, path, groups });
                }
                Action::SaveFastDrain {
                    io,
                    group,
                    epoch,
                    regions,
                } => {
                    let path = self.paths.fast_drain_log.clone();
                    self.queue_journal(JournalCommand::SaveFastDrain {
                        io,
                        path,
                        group,
                        epoch,
                        regions,
                    });
                }
                Action::WriteLeg { io, blocks, .. } => {
                    self.queue_leg(LegCommand::Write { io, blocks });
                }
                Action::SyncLegs { io, volumes } => {
                    self.queue_leg(LegCommand::Sync { io, volumes });
                }
                Action::SaveDirtyMap { io, peer, regions } => {
                    let Some(path) = self.paths.dirty_maps.get(&peer).cloned() else {
                        panic!("driver invariant: site {peer} has a dirty-map path");
                    };
                    let regions = regions.into_iter().collect();
                    self.queue_leg(LegCommand::SaveMap { io, path, regions });
                }
                Action::Send { peer, message } => {
                    // Queued under the lock too: a group's deltas must leave
                    // in the order they were emitted.
                    if self.outbox.send((peer, message)).is_err() {
                        tracing::debug!(%peer, "links to other sites are stopped; message dropped");
                    }
                }
                Action::Reply { .. } | Action::ReadLeg { .. } => rest.push(action),
            }
        }
        rest
    }

    fn execute(&self, mut actions: Vec<Action>) {
        while !actions.is_empty() {
            let mut more = Vec::new();
            for action in actions {
                match action {
                    Action::Reply { request, result } => {
                        if let Some(sender) = self.replies.lock().remove(&request) {
                            let _ = sender.send(result);
                        }
                    }
                    Action::ReadLeg {
                        io,
                        volume,
                        offset,
                        length,
                    } => {
                        let result = self.read_leg(volume, offset, length);
                        let mut engine = self.engine.lock();
                        engine.leg_read_done(io, result);
                        more.extend(self.drain(&mut engine));
                    }
                    other => unreachable!("drain queues {other:?} itself"),
                }
            }
            actions = more;
        }
        self.rearm_timer();
    }

    fn read_leg(&self, volume: VolumeId, offset: u64, length: u64) -> Result<bytes::Bytes, String> {
        let leg = self.legs.read().get(&volume).cloned();
        let Some(leg) = leg else {
            return Err(format!("volume {volume} has no leg (deleted)"));
        };
        leg.read(offset, length).map_err(|error| error.to_string())
    }

    fn queue_journal(&self, command: JournalCommand) {
        if self.journal_queue.send(command).is_err() {
            tracing::error!("journal thread is gone; the node cannot make writes durable");
        }
    }

    fn queue_leg(&self, command: LegCommand) {
        if self.leg_queue.send(command).is_err() {
            tracing::error!("leg thread is gone; deltas cannot reach the legs");
        }
    }

    /// Wakes the timer task if the engine now needs it sooner.
    fn rearm_timer(&self) {
        let Some(deadline) = self.engine.lock().poll_timeout() else {
            return;
        };
        let previous = self
            .timer_deadline
            .fetch_min(deadline.as_nanos(), Ordering::AcqRel);
        if deadline.as_nanos() < previous {
            self.timer.notify_one();
        }
    }

    /// Fires the engine's delta-interval deadlines until `stop` resolves.
    pub async fn run_timer(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let deadline = self.engine.lock().poll_timeout();
            self.timer_deadline.store(
                deadline.map_or(u64::MAX, Timestamp::as_nanos),
                Ordering::Release,
            );
            let sleep = async {
                match deadline {
                    Some(deadline) => {
                        let at = self.start + std::time::Duration::from_nanos(deadline.as_nanos());
                        tokio::time::sleep_until(at.into()).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => {
                    let now = self.now();
                    self.with_engine(|engine| engine.handle_timeout(now));
                }
                _ = self.timer.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }
}

fn journal_loop(
    driver: std::sync::Weak<Driver>,
    mut journal: Journal<OsFileSystem>,
    commands: mpsc::Receiver<JournalCommand>,
) {
    while let Ok(command) = commands.recv() {
        let Some(driver) = driver.upgrade() else {
            return;
        };
        match command {
            JournalCommand::Append(record) => {
                if let Err(error) = journal.append(&record) {
                    tracing::error!(%error, "journal append failed; the node stops taking writes");
                    driver.with_engine(|engine| engine.journal_failed(error.to_string()));
                }
            }
            JournalCommand::Sync(io) => {
                let started = Instant::now();
                let result = journal.sync().map_err(|error| error.to_string());
                driver
                    .metrics
                    .journal_fsync_seconds
                    .observe(started.elapsed().as_secs_f64());
                if let Err(error) = &result {
                    tracing::error!(%error, "journal sync failed; the node stops taking writes");
                }
                driver.with_engine(|engine| engine.journal_synced(io, result));
            }
            JournalCommand::SaveResyncMarks { io, path, groups } => {
                let result = stretch_storage::save_resync_marks(&OsFileSystem, &path, &groups)
                    .map_err(|error| error.to_string());
                if let Err(error) = &result {
                    tracing::error!(%error, "saving the resync marks failed; the node stops taking writes");
                }
                driver.with_engine(|engine| engine.resync_marks_saved(io, result));
            }
            JournalCommand::SaveFastDrain {
                io,
                path,
                group,
                epoch,
                regions,
            } => {
                let result = stretch_storage::append_fast_drain_log(
                    &OsFileSystem,
                    &path,
                    group,
                    epoch,
                    &regions,
                )
                .map_err(|error| error.to_string());
                if let Err(error) = &result {
                    tracing::error!(%error, "appending to the fast drain log failed; the node stops taking writes");
                }
                driver.with_engine(|engine| engine.fast_drain_saved(io, result));
            }
            JournalCommand::Release(upto) => {
                if let Err(error) = journal.release(upto) {
                    // The records stay on disk; replaying them again is
                    // harmless, so this costs space, not data. A failed
                    // roll to a new segment is retried by the next append
                    // (the journal keeps no record past a file it may
                    // have left).
                    tracing::warn!(%error, "could not delete released journal segments");
                }
            }
        }
        driver
            .metrics
            .journal_disk_bytes
            .set(journal.bytes() as i64);
    }
}

fn leg_loop(driver: std::sync::Weak<Driver>, commands: mpsc::Receiver<LegCommand>) {
    while let Ok(command) = commands.recv() {
        let Some(driver) = driver.upgrade() else {
            return;
        };
        match command {
            LegCommand::Write { io, blocks } => {
                let started = Instant::now();
                let result = apply_blocks(&driver, &blocks);
                driver
                    .metrics
                    .leg_apply_seconds
                    .observe(started.elapsed().as_secs_f64());
                driver.with_engine(|engine| engine.leg_written(io, result));
            }
            LegCommand::Sync { io, volumes } => {
                let started = Instant::now();
                let legs: Vec<Arc<OsLeg>> = {
                    let map = driver.legs.read();
                    volumes.iter().filter_map(|v| map.get(v).cloned()).collect()
                };
                let result = legs
                    .iter()
                    .try_for_each(|leg| leg.sync())
                    .map_err(|error| error.to_string());
                driver
                    .metrics
                    .leg_sync_seconds
                    .observe(started.elapsed().as_secs_f64());
                driver.with_engine(|engine| engine.legs_synced(io, result));
            }
            LegCommand::SaveMap { io, path, regions } => {
                let result = stretch_storage::save_dirty_map(
                    &stretch_storage::OsFileSystem,
                    &path,
                    &regions,
                )
                .map_err(|error| error.to_string());
                driver.with_engine(|engine| engine.dirty_map_saved(io, result));
            }
        }
    }
}

fn apply_blocks(
    driver: &Driver,
    blocks: &[(stretch_core::BlockKey, stretch_core::BlockImage)],
) -> Result<(), String> {
    stretch_storage::apply_to_legs(blocks, |volume| driver.legs.read().get(&volume).cloned())
        .map_err(|error| error.to_string())
}

/// Where a node keeps its files.
#[derive(Debug, Clone)]
pub(crate) struct DataLayout {
    pub root: PathBuf,
}

impl DataLayout {
    pub fn journal(&self) -> PathBuf {
        self.root.join("journal")
    }

    pub fn legs(&self) -> PathBuf {
        self.root.join("legs")
    }

    pub fn catalog(&self) -> PathBuf {
        self.root.join("catalog.json")
    }

    /// The groups whose legs here are mid-resync.
    pub fn resync_marks(&self) -> PathBuf {
        self.root.join("resync-marks")
    }

    /// The regions fast migrations copied to this node.
    pub fn fast_drain_log(&self) -> PathBuf {
        self.root.join("fast-drain-log")
    }

    pub fn lock(&self) -> PathBuf {
        self.root.join("node.lock")
    }
}
