//! Live migration of a consistency group to another site, in drain or
//! fast mode.
//!
//! The source (the owner's node) drives it; the metadata holds the record
//! ([`Command::BeginMove`]) so that every node sees it and a cancel
//! committed anywhere wins over the switchover:
//!
//! 1. **catching up**: writes go on at the source; the target applies the
//!    backlog in the background. The driver samples what the target still
//!    lacks ten times a second (bytes left, the rate the target applies,
//!    the rate the source writes) for the progress shown.
//! 2. **switching over**, once what is left would drain within 100 ms at
//!    the measured rate ([`SwitchPoint::NODE`]): writes are held, the open
//!    delta closes, and once the target applied every delta the metadata
//!    raises the epoch and names it owner ([`Command::TransferGroup`] with
//!    `migration`, refused if the move was cancelled meanwhile). The held
//!    writes go to the target. If the target does not hold every delta
//!    within [`SWITCHOVER_HOLD_MS_MAX`], the switchover is called off (the
//!    held writes are served here) and catching up goes on.
//! 3. **giving up**: a backlog that does not shrink to the switch point
//!    within the migration's timeout (the source writes faster than the
//!    link drains) ends the migration; the group stays at the source, and
//!    the outcome says why in one line.
//!
//! **Fast mode** switches over as soon as the target streams deltas (or is
//! being resynced, when it fell too far behind): the
//! writes are held only while the open delta closes and reaches the
//! source's journal, then the metadata names the target owner with the
//! regions it lacks (`TransferGroup` with `fast`), whatever the backlog.
//! The target serves at once and copies those regions from the source
//! (see `fast_drain`); the migration shows the copy as its `copying`
//! phase and is done when the target recorded its end. Two data sites
//! only (the metadata refuses it otherwise).
//!
//! A migration recorded for this site that no driver here runs (the node
//! restarted mid-migration) is cancelled when the node reconciles.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stretch_control::SwitchPoint;
use stretch_core::{BLOCK_SIZE, Epoch, GroupId, PeerState, SiteId};
use stretch_metadata::{ClusterMetadata, Command, CommandError, FastSeal};
use stretch_storage::{CatalogError, VolumeRecord};

use crate::control::{Control, ControlError};
use crate::node::{Node, NodeError};

/// Longest the writes are held at a switchover for the target to apply
/// every delta; past it the switchover is called off and retried.
pub const SWITCHOVER_HOLD_MS_MAX: u64 = 2000;
/// Default and largest migration timeout, in seconds.
pub const MIGRATION_TIMEOUT_S_DEFAULT: u64 = 300;
pub const MIGRATION_TIMEOUT_S_MAX: u64 = 86_400;
/// How often the driver samples the target's progress.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// The rates are measured over this window.
const RATE_WINDOW: Duration = Duration::from_secs(2);
/// Finished migrations a node remembers for `migration list`.
const FINISHED_MAX: usize = 32;

/// `POST /v1/migrations`: start migrating a volume's group (or a group
/// named) to another site.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartMigration {
    /// A volume of the group to move (exactly one of `volume`, `group`).
    #[serde(default)]
    pub volume: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    pub to: String,
    /// Give up (the group stays at the source) if the switchover has not
    /// happened by then; default [`MIGRATION_TIMEOUT_S_DEFAULT`].
    #[serde(default)]
    pub timeout_s: Option<u64>,
    #[serde(default)]
    pub mode: MigrationMode,
}

/// How a migration moves ownership.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMode {
    /// The target catches up first; ownership moves once it holds every
    /// delta.
    #[default]
    Drain,
    /// Ownership moves first; the target copies what it lacks after.
    Fast,
}

impl MigrationMode {
    pub fn name(self) -> &'static str {
        match self {
            MigrationMode::Drain => "drain",
            MigrationMode::Fast => "fast",
        }
    }
}

/// What a switchover is part of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Switch {
    /// `volume move`: a hand-over, no migration record.
    Move,
    /// A live migration's switchover.
    Migration(MigrationMode),
}

/// One migration, as `migration list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// Unique at the node that drives it (0 for a migration recorded in
    /// the metadata that no node here drives).
    pub id: u64,
    pub group: String,
    pub volumes: Vec<String>,
    pub from: String,
    pub to: String,
    /// `drain` or `fast`.
    #[serde(default)]
    pub mode: String,
    /// `catching-up`, `switching-over`, `copying` (fast mode, after the
    /// switchover: the target copies what it lacks), `done`, `gave-up`,
    /// `cancelled` or `failed`; `recorded` for one driven elsewhere.
    pub phase: String,
    /// What the target still lacks (known at the source's node only).
    pub bytes_left: Option<u64>,
    /// What `bytes_left` was at its largest: the progress bar's whole.
    pub bytes_left_max: u64,
    /// Bytes the target applied per second, and the source wrote, over the
    /// last two seconds.
    pub drain_bytes_per_second: u64,
    pub write_bytes_per_second: u64,
    pub elapsed_ms: u64,
    pub timeout_s: u64,
    /// Switchovers called off because the target did not catch up in time.
    pub switchovers_called_off: u32,
    /// How long writes were held at the switchover that succeeded.
    pub pause_ms: Option<u64>,
    /// When ownership moved, counted from the start (the end, in drain
    /// mode; in fast mode the copy follows).
    #[serde(default)]
    pub switched_after_ms: Option<u64>,
    /// The epoch the group has at the target (done).
    pub epoch: Option<u64>,
    /// Why it ended, for every end but `done`.
    pub reason: Option<String>,
}

impl MigrationInfo {
    /// A migration of `group` in `phase`, with nothing measured yet.
    fn new(group: String, volumes: Vec<String>, from: String, to: String, phase: &str) -> Self {
        MigrationInfo {
            id: 0,
            group,
            volumes,
            from,
            to,
            mode: MigrationMode::Drain.name().into(),
            phase: phase.into(),
            bytes_left: None,
            bytes_left_max: 0,
            drain_bytes_per_second: 0,
            write_bytes_per_second: 0,
            elapsed_ms: 0,
            timeout_s: 0,
            switchovers_called_off: 0,
            pause_ms: None,
            switched_after_ms: None,
            epoch: None,
            reason: None,
        }
    }

    pub fn finished(&self) -> bool {
        matches!(
            self.phase.as_str(),
            "done" | "gave-up" | "cancelled" | "failed"
        )
    }
}

/// The migrations this node drives, and the last ones that ended.
#[derive(Debug, Default)]
pub(crate) struct Migrations {
    running: BTreeMap<u32, Running>,
    finished: VecDeque<MigrationInfo>,
    next_id: u64,
    /// Groups whose stale record is being cancelled.
    cancelling_stale: BTreeSet<u32>,
}

#[derive(Debug)]
struct Running {
    info: MigrationInfo,
    cancel: Arc<AtomicBool>,
}

/// The site a group moves to.
pub(crate) struct Target {
    pub site: String,
    pub id: SiteId,
    pub node: String,
}

/// Why a switchover did not happen.
pub(crate) enum SwitchError {
    /// The target did not hold every delta within the hold limit; the
    /// writes are served here again.
    NotReady,
    /// Cancelled while the writes were held; served here again.
    Cancelled,
    /// Refused (by the engine or the metadata); the group stays here.
    Refused(String),
    /// The metadata did not answer: whether the switchover committed is
    /// unknown, so the writes stay held until this node applies the
    /// outcome.
    Unknown(NodeError),
}

impl SwitchError {
    pub(crate) fn into_node_error(self, volume: &str, site: &str) -> NodeError {
        let reason = match self {
            SwitchError::NotReady => {
                "the new owner did not catch up (or answer) in time".to_string()
            }
            SwitchError::Cancelled => "cancelled".to_string(),
            SwitchError::Refused(reason) => reason,
            SwitchError::Unknown(error) => return error,
        };
        NodeError::Move {
            volume: volume.to_string(),
            site: site.to_string(),
            reason,
        }
    }
}

impl Node {
    /// Starts migrating a group this site owns to `request.to`; returns at
    /// once with the migration as recorded. The driver runs on its own
    /// thread until the migration ends.
    pub(crate) fn start_migration(
        &self,
        request: &StartMigration,
    ) -> Result<MigrationInfo, NodeError> {
        let timeout_s = request.timeout_s.unwrap_or(MIGRATION_TIMEOUT_S_DEFAULT);
        let (record, volumes) = self.group_to_migrate(request)?;
        let to = request.to.as_str();
        let fail = |reason: &str| NodeError::Move {
            volume: record.group.clone(),
            site: to.to_string(),
            reason: reason.to_string(),
        };
        if !(1..=MIGRATION_TIMEOUT_S_MAX).contains(&timeout_s) {
            return Err(fail(&format!(
                "the timeout must be 1 to {MIGRATION_TIMEOUT_S_MAX} seconds, not {timeout_s}"
            )));
        }
        if request.mode == MigrationMode::Fast {
            let data_sites = self.sites.data_site_count();
            if data_sites != 2 {
                return Err(fail(&format!(
                    "fast mode needs exactly two data sites (this cluster has {data_sites}); use --mode drain"
                )));
            }
        }
        let target = self.migration_target(&record, to)?;
        let control = self.control()?.clone();
        let group = record.group_id;
        let cancel = Arc::new(AtomicBool::new(false));
        let info = {
            let mut migrations = self.migrations.lock();
            if migrations.running.contains_key(&group) {
                return Err(fail("a migration of the group is running"));
            }
            migrations.next_id += 1;
            let info = MigrationInfo {
                id: migrations.next_id,
                timeout_s,
                mode: request.mode.name().into(),
                ..MigrationInfo::new(
                    record.group.clone(),
                    volumes,
                    self.site.clone(),
                    to.to_string(),
                    "catching-up",
                )
            };
            // Registered before the record commits, so that a reconcile
            // in between does not take the record for a stale one.
            migrations.running.insert(
                group,
                Running {
                    info: info.clone(),
                    cancel: cancel.clone(),
                },
            );
            info
        };
        let begun = self.wait(control.execute(Command::BeginMove {
            group: record.group.clone(),
            to: to.to_string(),
            expected_epoch: record.epoch,
        }));
        // A lost answer: the retry was refused because the first attempt
        // recorded the move already. It is this request's (the slot above
        // keeps any other start here out, and only the owner's node starts
        // one), so it goes on.
        let begun = match begun {
            Err(ControlError::Refused(CommandError::MoveInFlight { .. }))
                if control
                    .applied()
                    .0
                    .moves
                    .get(&group)
                    .is_some_and(|recorded| {
                        recorded.to == to
                            && recorded.from == self.site
                            && recorded.epoch == record.epoch
                    }) =>
            {
                Ok(())
            }
            other => other.map(|_| ()),
        };
        if let Err(error) = begun {
            self.migrations.lock().running.remove(&group);
            return Err(match error {
                ControlError::Refused(CommandError::MoveInFlight { .. }) => fail(
                    "a migration of the group is already recorded (see `stretch migration list`; \
                     `stretch migration cancel` ends it)",
                ),
                error => error.into(),
            });
        }
        let mode = request.mode;
        tracing::info!(group = %record.group, from = %self.site, to, timeout_s,
            mode = mode.name(), "migration started");
        let weak = self.weak();
        let spawned = std::thread::Builder::new()
            .name(format!("migrate-{group}"))
            .spawn(move || {
                if let Some(node) = weak.upgrade() {
                    node.drive_migration(&control, &record, &target, mode, timeout_s, &cancel);
                }
            });
        if let Err(error) = spawned {
            // The record stays: the next reconcile cancels it.
            self.migrations.lock().running.remove(&group);
            return Err(NodeError::Threads(error));
        }
        Ok(info)
    }

    /// The groups this node is migrating now.
    pub(crate) fn running_migrations(&self) -> Vec<u32> {
        self.migrations.lock().running.keys().copied().collect()
    }

    /// This node's migrations (running and recently ended) and the ones
    /// the metadata records that another node drives.
    pub(crate) fn migrations(&self) -> Vec<MigrationInfo> {
        let migrations = self.migrations.lock();
        let mut list: Vec<MigrationInfo> = migrations
            .running
            .values()
            .map(|running| running.info.clone())
            .collect();
        if let Ok(control) = self.control() {
            let (metadata, _) = control.applied();
            for (group, record) in &metadata.moves {
                if migrations.running.contains_key(group) {
                    continue;
                }
                let Some(name) = metadata.groups.get(group).map(|g| g.name.clone()) else {
                    continue;
                };
                list.push(MigrationInfo {
                    reason: Some(format!("driven by the node of site {}", record.from)),
                    ..MigrationInfo::new(
                        name,
                        volumes_of(&metadata, *group),
                        record.from.clone(),
                        record.to.clone(),
                        "recorded",
                    )
                });
            }
        }
        list.extend(migrations.finished.iter().cloned());
        list
    }

    /// Cancels the migration of a group (named, or the group of a volume
    /// named): the driver here stops it, or, if none runs here, its
    /// record is dropped from the metadata (its driver then stops).
    pub(crate) fn cancel_migration(&self, name: &str) -> Result<MigrationInfo, NodeError> {
        let control = self.control()?.clone();
        let (metadata, _) = control.applied();
        let group = metadata
            .group_by_name(name)
            .or_else(|| {
                let volume = metadata.volumes.values().find(|v| v.name == name)?;
                metadata.groups.get(&volume.group)
            })
            .ok_or_else(|| CatalogError::NoSuchVolume(name.to_string()))?;
        let (id, group_name, epoch) = (group.id, group.name.clone(), group.epoch);
        if let Some(running) = self.migrations.lock().running.get(&id) {
            running.cancel.store(true, Ordering::Release);
        }
        if !metadata.moves.contains_key(&id) {
            return Err(NodeError::Move {
                volume: group_name,
                site: String::new(),
                reason: "no migration of the group is in flight".into(),
            });
        }
        self.wait(control.execute(Command::AbortMove {
            group: group_name.clone(),
            expected_epoch: epoch,
        }))?;
        tracing::info!(group = %group_name, "migration cancelled by an operator");
        let found = self
            .migrations()
            .into_iter()
            .find(|info| info.group == group_name);
        Ok(found.unwrap_or_else(|| MigrationInfo {
            reason: Some("cancelled by an operator".into()),
            ..MigrationInfo::new(
                group_name,
                volumes_of(&metadata, id),
                String::new(),
                String::new(),
                "cancelled",
            )
        }))
    }

    /// Cancels migrations the metadata records from this site that no
    /// driver here runs (this node restarted mid-migration): the group
    /// stays here. Called from reconcile; the commit runs on its own
    /// thread.
    pub(crate) fn cancel_stale_migrations(&self, metadata: &ClusterMetadata) {
        let stale: Vec<(u32, String, u64)> = {
            let mut migrations = self.migrations.lock();
            let mut stale = Vec::new();
            for (group, record) in &metadata.moves {
                if record.from != self.site
                    || migrations.running.contains_key(group)
                    || !migrations.cancelling_stale.insert(*group)
                {
                    continue;
                }
                if let Some(g) = metadata.groups.get(group) {
                    stale.push((*group, g.name.clone(), g.epoch));
                }
            }
            stale
        };
        for (group, name, epoch) in stale {
            let weak = self.weak();
            let spawned = std::thread::Builder::new()
                .name(format!("migrate-stale-{group}"))
                .spawn(move || {
                    let Some(node) = weak.upgrade() else { return };
                    let Ok(control) = node.control().cloned() else {
                        return;
                    };
                    let result = node.wait(control.execute(Command::AbortMove {
                        group: name.clone(),
                        expected_epoch: epoch,
                    }));
                    match result {
                        Ok(_) => tracing::warn!(group = %name,
                            "cancelled a migration from this site that no driver runs (the node restarted during it); the group stays here"),
                        Err(error) => tracing::warn!(group = %name, %error,
                            "could not cancel a migration left by a restart; retried at the next reconcile"),
                    }
                    node.migrations.lock().cancelling_stale.remove(&group);
                });
            if spawned.is_err() {
                self.migrations.lock().cancelling_stale.remove(&group);
            }
        }
    }

    /// The group a start request names, with its volumes' names.
    fn group_to_migrate(
        &self,
        request: &StartMigration,
    ) -> Result<(VolumeRecord, Vec<String>), NodeError> {
        let all = self.volumes();
        let (record, asked) = match (&request.volume, &request.group) {
            (Some(volume), None) => (
                all.iter()
                    .find(|record| &record.name == volume)
                    .cloned()
                    .ok_or_else(|| CatalogError::NoSuchVolume(volume.clone()))?,
                volume.clone(),
            ),
            (None, Some(group)) => (
                all.iter()
                    .find(|record| &record.group == group)
                    .cloned()
                    .ok_or_else(|| NodeError::Move {
                        volume: group.clone(),
                        site: request.to.clone(),
                        reason: "no group of that name has a volume here".into(),
                    })?,
                group.clone(),
            ),
            _ => {
                return Err(NodeError::Move {
                    volume: String::new(),
                    site: request.to.clone(),
                    reason: "name exactly one of a volume and a group".into(),
                });
            }
        };
        if record.owner != self.site {
            return Err(NodeError::NotOwner {
                volume: asked,
                owner: record.owner,
            });
        }
        let volumes = all
            .iter()
            .filter(|other| other.group_id == record.group_id)
            .map(|other| other.name.clone())
            .collect();
        Ok((record, volumes))
    }

    /// Checks `to` can take the group over now.
    pub(crate) fn migration_target(
        &self,
        record: &VolumeRecord,
        to: &str,
    ) -> Result<Target, NodeError> {
        let fail = |reason: &str| NodeError::Move {
            volume: record.name.clone(),
            site: to.to_string(),
            reason: reason.to_string(),
        };
        if to == self.site {
            return Err(fail("it already owns it"));
        }
        let id = self
            .sites
            .id(to)
            .filter(|_| self.sites.is_data_site(to))
            .ok_or_else(|| NodeError::UnknownSite(to.to_string()))?;
        let peers = self
            .peers
            .get()
            .ok_or_else(|| fail("this node has no links"))?;
        let node = peers
            .data_node_of(to)
            .ok_or_else(|| fail("it has no data node"))?;
        if !peers.connected_sites().iter().any(|site| site == to) {
            return Err(fail("it is not connected"));
        }
        Ok(Target {
            site: to.to_string(),
            id,
            node,
        })
    }

    /// Runs one migration to its end and records how it ended.
    fn drive_migration(
        &self,
        control: &Arc<Control>,
        record: &VolumeRecord,
        target: &Target,
        mode: MigrationMode,
        timeout_s: u64,
        cancel: &AtomicBool,
    ) {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(timeout_s);
        let group = record.group_id;
        let mut sampler = Sampler::default();
        let outcome = loop {
            if let Some(ended) = self.move_ended(control, record, target, cancel) {
                break ended;
            }
            let sample = self.sample(record.group_id(), target.id);
            sampler.push(Instant::now(), sample);
            self.update_running(group, |info| {
                info.bytes_left = Some(sample.bytes_left);
                info.bytes_left_max = info.bytes_left_max.max(sample.bytes_left);
                info.drain_bytes_per_second = sampler.drain_rate();
                info.write_bytes_per_second = sampler.write_rate();
                info.elapsed_ms = millis(started.elapsed());
            });
            if Instant::now() >= deadline {
                break self.give_up(control, record, target, timeout_s, &sampler, sample);
            }
            // Fast mode moves ownership as soon as the target streams or
            // is resynced (what it lacks is then known here), whatever the
            // backlog.
            let reached = match mode {
                MigrationMode::Fast => sample.streaming || sample.resyncing,
                MigrationMode::Drain => SwitchPoint::NODE.reached(
                    sample.streaming,
                    sample.bytes_left,
                    sampler.drain_rate(),
                ),
            };
            if reached {
                self.update_running(group, |info| info.phase = "switching-over".into());
                self.moving.lock().insert(group);
                let hold = Duration::from_millis(SWITCHOVER_HOLD_MS_MAX);
                let switch = Switch::Migration(mode);
                let result = self.switch_over(control, record, target, hold, switch, Some(cancel));
                self.moving.lock().remove(&group);
                self.reconcile_now();
                match result {
                    Ok((pause, epoch)) if mode == MigrationMode::Fast => {
                        break self.follow_copy(control, record, started, millis(pause), epoch);
                    }
                    Ok((pause, epoch)) => {
                        break Ended::Done {
                            pause_ms: millis(pause),
                            epoch,
                        };
                    }
                    Err(SwitchError::NotReady) => {
                        let what = match mode {
                            MigrationMode::Drain => "apply every delta",
                            MigrationMode::Fast => "answer",
                        };
                        tracing::info!(group = %record.group, to = %target.site,
                            "switchover called off: the target did not {what} within {SWITCHOVER_HOLD_MS_MAX} ms; catching up goes on");
                        self.driver.metrics.switchover_called_off();
                        self.update_running(group, |info| {
                            info.phase = "catching-up".into();
                            info.switchovers_called_off += 1;
                        });
                    }
                    // The loop's next check says how it ended.
                    Err(SwitchError::Cancelled) => {}
                    Err(SwitchError::Refused(reason)) => break Ended::Failed(reason),
                    Err(SwitchError::Unknown(error)) => {
                        break Ended::Failed(format!(
                            "the switchover's outcome is unknown ({error}); writes are held until this node learns it"
                        ));
                    }
                }
            }
            std::thread::sleep(SAMPLE_INTERVAL);
        };
        self.finish_migration(group, started, outcome);
    }

    /// After a fast switchover: follows the target's copy (the regions the
    /// source has answered, for the progress) until its end is recorded.
    fn follow_copy(
        &self,
        control: &Control,
        record: &VolumeRecord,
        started: Instant,
        pause_ms: u64,
        epoch: u64,
    ) -> Ended {
        let group = record.group_id;
        let region_bytes = {
            let engine = self.driver.engine.lock();
            engine.config().region_blocks * BLOCK_SIZE as u64
        };
        let switched_after_ms = millis(started.elapsed());
        self.update_running(group, |info| {
            info.phase = "copying".into();
            info.switched_after_ms = Some(switched_after_ms);
        });
        loop {
            let (metadata, _) = control.applied();
            let Some(now) = metadata.groups.get(&group) else {
                return Ended::Failed("the group was deleted while its copy ran".into());
            };
            if now.epoch != epoch {
                return Ended::Failed(format!(
                    "ownership moved on (to {} at epoch {}) before the target copied everything: it is resynced from the new owner",
                    now.owner, now.epoch
                ));
            }
            if now.fast_drain.is_none() {
                return Ended::Done { pause_ms, epoch };
            }
            let progress = self
                .driver
                .engine
                .lock()
                .fast_drain_progress(record.group_id());
            self.update_running(group, |info| {
                if let Some(progress) = progress {
                    let left = progress.regions_left * region_bytes;
                    info.bytes_left = Some(left);
                    info.bytes_left_max = progress.regions_total * region_bytes;
                }
                info.pause_ms = Some(pause_ms);
                info.epoch = Some(epoch);
                info.elapsed_ms = millis(started.elapsed());
            });
            std::thread::sleep(SAMPLE_INTERVAL);
        }
    }

    /// How the migration ended, if it did: cancelled, or its record gone
    /// or changed by another change (a failover, a `volume move`).
    fn move_ended(
        &self,
        control: &Control,
        record: &VolumeRecord,
        target: &Target,
        cancel: &AtomicBool,
    ) -> Option<Ended> {
        let (metadata, _) = control.applied();
        let group = metadata.groups.get(&record.group_id)?;
        let still = metadata.moves.get(&record.group_id).is_some_and(|m| {
            m.to == target.site && m.epoch == record.epoch && group.owner == self.site
        });
        if still && !cancel.load(Ordering::Acquire) {
            return None;
        }
        if cancel.load(Ordering::Acquire) {
            if still {
                // Cancelled here before the record went: drop it.
                let _ = self.wait(control.execute(Command::AbortMove {
                    group: record.group.clone(),
                    expected_epoch: record.epoch,
                }));
            }
            return Some(Ended::Cancelled);
        }
        Some(Ended::Failed(format!(
            "the migration record is gone: the group is owned by {} at epoch {}",
            group.owner, group.epoch
        )))
    }

    /// Ends a migration whose backlog did not converge in time.
    fn give_up(
        &self,
        control: &Control,
        record: &VolumeRecord,
        target: &Target,
        timeout_s: u64,
        sampler: &Sampler,
        sample: Sample,
    ) -> Ended {
        let aborted = self.wait(control.execute(Command::AbortMove {
            group: record.group.clone(),
            expected_epoch: record.epoch,
        }));
        let reason = if !sample.streaming {
            format!(
                "{} was still resyncing after {timeout_s} s ({} left)",
                target.site,
                mib(sample.bytes_left)
            )
        } else {
            format!(
                "the backlog did not converge within {timeout_s} s: {} left, the source wrote {}/s and {} applied {}/s",
                mib(sample.bytes_left),
                mib(sampler.write_rate()),
                target.site,
                mib(sampler.drain_rate()),
            )
        };
        match aborted {
            Ok(_) => Ended::GaveUp(format!("{reason}; the group stays at {}", self.site)),
            Err(error) => Ended::GaveUp(format!(
                "{reason}; its record could not be dropped ({error}): `stretch migration cancel` does"
            )),
        }
    }

    /// What the target lacks of the group now.
    fn sample(&self, group: GroupId, to: SiteId) -> Sample {
        let engine = self.driver.engine.lock();
        let region_bytes = engine.config().region_blocks * BLOCK_SIZE as u64;
        let status = engine
            .replication_status()
            .into_iter()
            .find(|status| status.group == group);
        let Some(status) = status else {
            return Sample::default();
        };
        let Some(peer) = status.peers.iter().find(|peer| peer.peer == to) else {
            return Sample::default();
        };
        Sample {
            streaming: peer.state == PeerState::Streaming,
            resyncing: peer.state == PeerState::Resyncing,
            bytes_left: peer.unapplied_bytes + peer.resync_regions_left * region_bytes,
            written_bytes: status.closed_bytes_total,
        }
    }

    fn update_running(&self, group: u32, change: impl FnOnce(&mut MigrationInfo)) {
        if let Some(running) = self.migrations.lock().running.get_mut(&group) {
            change(&mut running.info);
        }
    }

    fn finish_migration(&self, group: u32, started: Instant, outcome: Ended) {
        let mut migrations = self.migrations.lock();
        let Some(running) = migrations.running.remove(&group) else {
            return;
        };
        let mut info = running.info;
        info.elapsed_ms = millis(started.elapsed());
        match outcome {
            Ended::Done { pause_ms, epoch } => {
                info.phase = "done".into();
                info.pause_ms = Some(pause_ms);
                info.epoch = Some(epoch);
                info.bytes_left = Some(0);
                tracing::info!(group = %info.group, from = %info.from, to = %info.to, pause_ms,
                    elapsed_ms = info.elapsed_ms, "migration done");
            }
            Ended::GaveUp(reason) => {
                tracing::warn!(group = %info.group, to = %info.to, "migration gave up: {reason}");
                info.phase = "gave-up".into();
                info.reason = Some(reason);
            }
            Ended::Cancelled => {
                tracing::info!(group = %info.group, "migration cancelled");
                info.phase = "cancelled".into();
                info.reason = Some(format!(
                    "cancelled by an operator; the group stays at {}",
                    info.from
                ));
            }
            Ended::Failed(reason) => {
                tracing::warn!(group = %info.group, to = %info.to, "migration failed: {reason}");
                info.phase = "failed".into();
                info.reason = Some(reason);
            }
        }
        self.driver
            .metrics
            .migration_ended(&info.phase, info.pause_ms.map(Duration::from_millis));
        migrations.finished.push_front(info);
        migrations.finished.truncate(FINISHED_MAX);
    }

    /// Hands a group this site owns over to `target`: writes are held and
    /// the open delta closes; once the target applied every delta (within
    /// `hold_limit`), the metadata names it owner at the next epoch, the
    /// target confirms it applied that, and the held writes go to it.
    /// Returns how long the writes were held and the new epoch.
    pub(crate) fn switch_over(
        &self,
        control: &Arc<Control>,
        record: &VolumeRecord,
        target: &Target,
        hold_limit: Duration,
        switch: Switch,
        cancel: Option<&AtomicBool>,
    ) -> Result<(Duration, u64), SwitchError> {
        let fast = switch == Switch::Migration(MigrationMode::Fast);
        let group = record.group_id();
        let now = self.driver.now();
        self.driver
            .with_engine(|engine| engine.hand_over(now, group))
            .map_err(|error| SwitchError::Refused(error.to_string()))?;
        let held_at = Instant::now();
        // The target must answer now, not only have acknowledged every
        // delta some time ago: an idle group's target may have been cut
        // off since (a cut is noticed only after the idle timeout), and
        // ownership moved to a site the source cannot reach strands the
        // clients here. One round trip, run while the last delta's
        // acknowledgement comes back.
        let (_, index) = control.applied();
        let mut probe = {
            let control = control.clone();
            let node = target.node.clone();
            self.runtime
                .spawn(async move { control.confirm_applied(&[node], index).await.is_empty() })
        };
        let call_off = |error: SwitchError| {
            let now = self.driver.now();
            self.driver
                .with_engine(|engine| engine.cancel_hand_over(now, group));
            error
        };
        let mut answered = false;
        loop {
            if !answered && probe.is_finished() {
                answered = self.wait(&mut probe).unwrap_or(false);
                if !answered {
                    return Err(call_off(SwitchError::NotReady));
                }
            }
            let ready = {
                let engine = self.driver.engine.lock();
                if fast {
                    engine.fast_hand_over_ready(group, target.id)
                } else {
                    engine.hand_over_ready(group, target.id)
                }
            };
            if answered && ready {
                break;
            }
            if cancel.is_some_and(|cancel| cancel.load(Ordering::Acquire)) {
                probe.abort();
                return Err(call_off(SwitchError::Cancelled));
            }
            if held_at.elapsed() > hold_limit {
                probe.abort();
                return Err(call_off(SwitchError::NotReady));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Nothing is written while handing over: the last delta is the
        // one the new owner's epoch starts after; in fast mode, with the
        // regions the target lacks.
        let (last_seq, seal) = {
            let engine = self.driver.engine.lock();
            let last_seq = engine
                .replication_status()
                .iter()
                .find(|status| status.group == group)
                .map_or(0, |status| status.last_seq.0);
            let seal = fast
                .then(|| engine.fast_seal(group, target.id))
                .flatten()
                .map(|sealed| FastSeal {
                    regions: sealed.regions.map(|regions| {
                        regions
                            .into_iter()
                            .map(|(volume, region)| (volume.0, region))
                            .collect()
                    }),
                });
            (last_seq, seal)
        };
        if fast && seal.is_none() {
            return Err(call_off(SwitchError::NotReady));
        }
        let command = Command::TransferGroup {
            group: record.group.clone(),
            from: self.site.clone(),
            to: target.site.clone(),
            expected_epoch: record.epoch,
            after_seq: last_seq,
            migration: switch != Switch::Move,
            fast: seal,
        };
        let index = match self.wait(control.execute(command)) {
            Ok((_, index)) => index,
            Err(ControlError::Refused(error)) => {
                // A lost answer: the retry was refused because the first
                // attempt moved it already.
                let (metadata, index) = control.applied();
                let moved = metadata
                    .group_by_name(&record.group)
                    .is_some_and(|g| g.owner == target.site && g.epoch == record.epoch + 1);
                if !moved {
                    return Err(call_off(SwitchError::Refused(error.to_string())));
                }
                index
            }
            Err(error) => {
                // Not known to be committed or not: calling the hand-over
                // off could leave two owners if it was. Writes stay held
                // until this node applies the change (then they go to the
                // new owner) or an operator moves it back.
                tracing::error!(group = %record.group, to = %target.site, %error,
                    "the switchover's outcome is unknown; writes are held until the metadata answers");
                return Err(SwitchError::Unknown(error.into()));
            }
        };
        let (metadata, _) = control.applied();
        let epoch = metadata
            .group_by_name(&record.group)
            .map_or(record.epoch + 1, |g| g.epoch);
        // The held writes go to the new owner at once: one that reaches it
        // before it applied the change waits there for it (it comes from
        // the site it still takes for the owner), so the pause need not
        // include the new owner's confirmation.
        // A fast switchover's source answers the target's copies from now
        // on (told before the owner, as every node's reconcile does).
        let drain = metadata
            .group_by_name(&record.group)
            .and_then(|g| g.fast_drain.as_ref())
            .and_then(|drain| crate::fast_drain::engine_drain(drain, &self.sites));
        let owner = target.id;
        self.driver.with_engine(|engine| {
            engine.set_fast_drain(group, owner, drain);
            engine.set_owner(group, owner, Epoch(epoch));
        });
        let pause = held_at.elapsed();
        // The command still returns only once the new owner applied the
        // change, so that what is asked of it next (a write there, `volume
        // show`) finds it owning the group.
        let unconfirmed =
            self.wait(control.confirm_applied(std::slice::from_ref(&target.node), index));
        if !unconfirmed.is_empty() {
            tracing::warn!(group = %record.group, to = %target.site,
                "the new owner did not confirm the switchover in time; it applies it when it can");
        }
        tracing::info!(group = %record.group, from = %self.site, to = %target.site, epoch,
            pause_ms = millis(pause), "group ownership moved");
        Ok((pause, epoch))
    }
}

/// How a migration ended.
enum Ended {
    Done { pause_ms: u64, epoch: u64 },
    GaveUp(String),
    Cancelled,
    Failed(String),
}

/// What the target lacked at one instant.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    streaming: bool,
    /// Being resynced (connected, what it lacks known as regions).
    resyncing: bool,
    bytes_left: u64,
    written_bytes: u64,
}

/// Samples over the last [`RATE_WINDOW`], for the rates.
#[derive(Debug, Default)]
struct Sampler {
    samples: VecDeque<(Instant, Sample)>,
}

impl Sampler {
    fn push(&mut self, at: Instant, sample: Sample) {
        self.samples.push_back((at, sample));
        while self
            .samples
            .front()
            .is_some_and(|(first, _)| at.duration_since(*first) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    fn rate(&self, bytes: impl Fn(&Sample) -> i128) -> u64 {
        let (Some((first_at, first)), Some((last_at, last))) =
            (self.samples.front(), self.samples.back())
        else {
            return 0;
        };
        let seconds = last_at.duration_since(*first_at).as_secs_f64();
        if seconds <= 0.0 {
            return 0;
        }
        ((bytes(last) - bytes(first)).max(0) as f64 / seconds) as u64
    }

    /// How fast the target takes in what it lacks: the bytes written since
    /// minus the growth of what it lacks. Streaming, that is the rate it
    /// applies deltas; resyncing, the rate regions reach it (which the
    /// applied deltas alone would not show).
    fn drain_rate(&self) -> u64 {
        self.rate(|sample| i128::from(sample.written_bytes) - i128::from(sample.bytes_left))
    }

    fn write_rate(&self) -> u64 {
        self.rate(|sample| i128::from(sample.written_bytes))
    }
}

fn volumes_of(metadata: &ClusterMetadata, group: u32) -> Vec<String> {
    metadata
        .volumes
        .values()
        .filter(|volume| volume.group == group)
        .map(|volume| volume.name.clone())
        .collect()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}
