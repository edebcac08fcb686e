//! Volume lifecycle on a node: create, delete and move are committed to
//! the cluster metadata (Raft) first; every node then makes its own state
//! follow what it applied ([`Node::reconcile`]): legs created or removed,
//! the engine told who owns each group at which epoch.
//!
//! Legs are named by volume id and name (`legs/7-vm1.raw`): ids are never
//! reused, so a leg left by a deleted volume can never be taken for a new
//! volume of the same name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stretch_core::{Epoch, Mode, VolumeSpec};
use stretch_metadata::{ClusterMetadata, Command, CommandError, Failover};
use stretch_storage::{
    CatalogError, Leg, VolumeRecord, validate_volume_name, validate_volume_size,
};

use crate::control::{Control, ControlError};
use crate::node::{Node, NodeError};

/// Longest a volume move waits for the new owner to hold every delta.
const MOVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a change waits for the metadata to know the owner site (the
/// leader records the config's sites just after the cluster forms, so
/// only a change asked while the cluster forms waits).
const SITE_WAIT: Duration = Duration::from_secs(5);

/// The leg file of a volume in `legs`.
pub(crate) fn leg_path(legs: &Path, id: u32, name: &str) -> PathBuf {
    legs.join(format!("{id}-{name}.raw"))
}

/// The volume id a leg file name starts with.
pub(crate) fn leg_id(file_name: &str) -> Option<u32> {
    let stem = file_name.strip_suffix(".raw")?;
    let (id, _) = stem.split_once('-')?;
    id.parse().ok()
}

/// Every volume of the metadata as this node keeps it, by id.
pub(crate) fn records_of(metadata: &ClusterMetadata, legs: &Path) -> BTreeMap<u32, VolumeRecord> {
    metadata
        .volumes
        .values()
        .filter_map(|volume| {
            let group = metadata.groups.get(&volume.group)?;
            Some((
                volume.id,
                VolumeRecord {
                    id: volume.id,
                    name: volume.name.clone(),
                    size: volume.size,
                    group: group.name.clone(),
                    group_id: group.id,
                    leg: leg_path(legs, volume.id, &volume.name),
                    owner: group.owner.clone(),
                    mode: core_mode(volume.mode).name().to_string(),
                    epoch: group.epoch,
                },
            ))
        })
        .collect()
}

pub(crate) fn core_mode(mode: stretch_metadata::Mode) -> Mode {
    match mode {
        stretch_metadata::Mode::Async => Mode::Async,
        stretch_metadata::Mode::FlushSync => Mode::FlushSync,
        stretch_metadata::Mode::Sync => Mode::Sync,
    }
}

fn metadata_mode(mode: Mode) -> stretch_metadata::Mode {
    match mode {
        Mode::Async => stretch_metadata::Mode::Async,
        Mode::FlushSync => stretch_metadata::Mode::FlushSync,
        Mode::Sync => stretch_metadata::Mode::Sync,
    }
}

impl Node {
    pub(crate) fn control(&self) -> Result<&Arc<Control>, NodeError> {
        self.control
            .get()
            .ok_or(NodeError::Control(ControlError::Stopping))
    }

    /// Runs `future` to its end from a blocking thread (the admin API's).
    pub(crate) fn wait<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }

    /// Creates a volume owned by `owner` (this site by default): committed
    /// to the metadata with a Raft-allocated id, then created here; the
    /// other sites create their legs as they apply it. Returns the record
    /// and the sites that did not confirm in time (they create the leg
    /// when they apply the change, whenever that is).
    pub(crate) fn create_volume(
        &self,
        name: &str,
        size: u64,
        group: Option<&str>,
        owner: Option<&str>,
        mode: Mode,
        failover: Failover,
    ) -> Result<(VolumeRecord, Vec<String>), NodeError> {
        if self.is_witness() {
            return Err(NodeError::Witness);
        }
        let group = group.unwrap_or(name);
        validate_volume_name(name)?;
        validate_volume_name(group)?;
        validate_volume_size(size)?;
        let owner = owner.unwrap_or(&self.site).to_string();
        if !self.sites.is_data_site(&owner) {
            return Err(NodeError::UnknownSite(owner));
        }
        let control = self.control()?.clone();
        let command = Command::CreateVolume {
            name: name.to_string(),
            size,
            group: group.to_string(),
            mode: metadata_mode(mode),
            failover,
            owner_site: owner.clone(),
        };
        let existed = control.applied().0.volume_by_name(name).is_some();
        let result = self.wait(async {
            wait_for_site(&control, &owner).await;
            control.execute(command).await
        });
        let index = match result {
            Ok((_, index)) => index,
            // An attempt whose answer was lost committed it, and the retry
            // was refused: done, if the volume is the one asked for.
            Err(ControlError::Refused(CommandError::VolumeExists { .. }))
                if !existed && self.created_as_asked(&control, name, size, group, &owner) =>
            {
                control.applied().1
            }
            Err(error) => return Err(error.into()),
        };
        self.reconcile_now();
        let record = self.volume(name).ok_or_else(|| NodeError::NotAppliedHere {
            volume: name.to_string(),
        })?;
        Ok((record, self.confirm_elsewhere(&control, index)))
    }

    /// Whether the applied metadata has volume `name` as a create asked it.
    fn created_as_asked(
        &self,
        control: &Control,
        name: &str,
        size: u64,
        group: &str,
        owner: &str,
    ) -> bool {
        let (metadata, _) = control.applied();
        let Some(volume) = metadata.volume_by_name(name) else {
            return false;
        };
        metadata
            .groups
            .get(&volume.group)
            .is_some_and(|found| volume.size == size && found.name == group && found.owner == owner)
    }

    /// Deletes a volume everywhere: committed to the metadata, then removed
    /// here; the other sites remove their legs as they apply it.
    pub(crate) fn delete_volume(&self, name: &str) -> Result<VolumeRecord, NodeError> {
        let control = self.control()?.clone();
        let record = self.volume(name);
        let existed = control.applied().0.volume_by_name(name).is_some();
        let result = self.wait(control.execute(Command::DeleteVolume {
            name: name.to_string(),
        }));
        let index = match result {
            Ok((_, index)) => index,
            // A lost answer: the retry found it gone.
            Err(ControlError::Refused(CommandError::UnknownVolume { .. })) if existed => {
                control.applied().1
            }
            Err(error) => return Err(error.into()),
        };
        self.reconcile_now();
        self.confirm_elsewhere(&control, index);
        record.ok_or_else(|| CatalogError::NoSuchVolume(name.to_string()).into())
    }

    /// Moves the ownership of a volume's group from this site to `to`:
    /// writes are held here, the open delta closes, and once `to` applied
    /// every delta, the metadata raises the epoch and names `to` owner.
    /// The held writes go to `to` once it confirmed it applied that
    /// change. A refused or timed-out hand-over is called off (writes
    /// served here again).
    pub(crate) fn move_volume(&self, name: &str, to: &str) -> Result<VolumeRecord, NodeError> {
        let record = self
            .volume(name)
            .ok_or_else(|| CatalogError::NoSuchVolume(name.to_string()))?;
        if record.owner != self.site {
            return Err(NodeError::NotOwner {
                volume: name.to_string(),
                owner: record.owner.clone(),
            });
        }
        let target = self.migration_target(&record, to)?;
        let control = self.control()?.clone();
        let group = record.group_id();
        self.moving.lock().insert(group.0);
        let result = self.switch_over(
            &control,
            &record,
            &target,
            MOVE_TIMEOUT,
            crate::migration::Switch::Move,
            None,
        );
        self.moving.lock().remove(&group.0);
        // Whatever happened, this node now follows the metadata.
        self.reconcile_now();
        result.map_err(|error| error.into_node_error(name, to))?;
        Ok(self.volume(name).unwrap_or(record))
    }

    /// Asks the other data nodes to confirm they applied `index`; returns
    /// the sites that did not in time.
    fn confirm_elsewhere(&self, control: &Control, index: u64) -> Vec<String> {
        let Some(peers) = self.peers.get() else {
            return Vec::new();
        };
        let nodes = peers.data_nodes();
        let unconfirmed = self.wait(control.confirm_applied(&nodes, index));
        unconfirmed
            .iter()
            .filter_map(|node| peers.site_of(node))
            .collect()
    }

    /// Makes this node follow the metadata it applied. The metadata is
    /// read under the reconcile turn: two passes never act on two
    /// snapshots out of order (an older one would remove a volume a newer
    /// one just created).
    pub(crate) fn reconcile_now(&self) {
        let Some(control) = self.control.get() else {
            return;
        };
        let _turn = self.reconcile_turn.lock();
        let (metadata, index) = control.applied();
        self.reconcile(&metadata);
        // Every ownership change up to `index` is in the engine now (but
        // for groups taken over or handed over, which do their own).
        self.reconciled_index
            .store(index, std::sync::atomic::Ordering::Release);
    }

    /// Creates the legs of volumes the metadata has and this node lacks,
    /// removes those it no longer has, and tells the engine of every new
    /// owner and epoch. Idempotent; a volume busy with requests is removed
    /// on a later pass. Callers hold the reconcile turn.
    fn reconcile(&self, metadata: &ClusterMetadata) {
        if self.is_witness() {
            return;
        }
        let wanted = records_of(metadata, &self.layout.legs());
        let local: Vec<VolumeRecord> = self.volumes();
        for record in &local {
            if !wanted.contains_key(&record.id) {
                self.remove_local_volume(record);
            }
        }
        self.cancel_stale_migrations(metadata);
        let moving = self.moving.lock().clone();
        let taking_over = self.taking_over.lock().clone();
        self.driver.with_engine(|engine| {
            crate::failover::tell_epoch_histories(engine, metadata);
            crate::fast_drain::tell_fast_drains(engine, metadata, &self.sites);
        });
        for record in wanted.values() {
            let existing = self.volumes.lock().get(&record.name).cloned();
            match existing {
                Some(existing) if existing.id == record.id => {
                    let changed = existing.owner != record.owner || existing.epoch != record.epoch;
                    if !changed
                        || moving.contains(&record.group_id)
                        || taking_over.contains(&record.group_id)
                    {
                        continue;
                    }
                    let Some(owner) = self.sites.id(&record.owner) else {
                        tracing::error!(volume = %record.name, owner = %record.owner,
                            "the metadata names an owner site this config lacks");
                        continue;
                    };
                    self.driver.with_engine(|engine| {
                        engine.set_owner(record.group_id(), owner, Epoch(record.epoch));
                    });
                    tracing::info!(volume = %record.name, owner = %record.owner,
                        epoch = record.epoch, "volume ownership moved");
                    self.volumes
                        .lock()
                        .insert(record.name.clone(), record.clone());
                }
                // A volume of that name with another id is being removed
                // (busy); the new one comes once it is gone.
                Some(_) => {}
                None => {
                    if let Err(error) = self.add_local_volume(record.clone()) {
                        tracing::error!(volume = %record.name, %error,
                            "cannot create the volume's leg here");
                    }
                }
            }
        }
    }

    /// Opens or creates the leg of a volume and starts serving it.
    fn add_local_volume(&self, record: VolumeRecord) -> Result<(), NodeError> {
        let owner = self
            .sites
            .id(&record.owner)
            .filter(|_| self.sites.is_data_site(&record.owner))
            .ok_or_else(|| NodeError::UnknownSite(record.owner.clone()))?;
        let spec = volume_spec(&record)?;
        let leg = open_or_create_leg(self.fs.as_ref(), &record)?;
        self.driver
            .legs
            .write()
            .insert(record.volume_id(), Arc::new(leg));
        self.driver
            .with_engine(|engine| serve_in_engine(engine, &record, spec, owner));
        self.driver.metrics.volumes.inc();
        tracing::info!(
            volume = %record.name,
            id = record.id,
            size = record.size,
            group = %record.group,
            owner = %record.owner,
            mode = %record.mode,
            "volume created"
        );
        self.volumes.lock().insert(record.name.clone(), record);
        Ok(())
    }

    /// Stops serving a deleted volume and removes its leg; false (try
    /// again later) while requests are in flight.
    fn remove_local_volume(&self, record: &VolumeRecord) -> bool {
        let removed = self
            .driver
            .with_engine(|engine| engine.remove_volume(record.volume_id()));
        if removed.is_err() {
            tracing::debug!(volume = %record.name, "deleted volume still busy; removed later");
            return false;
        }
        self.driver.legs.write().remove(&record.volume_id());
        if let Err(error) = std::fs::remove_file(&record.leg) {
            tracing::warn!(%error, leg = %record.leg.display(), "could not delete the leg file");
        }
        self.volumes.lock().remove(&record.name);
        self.driver.metrics.volumes.dec();
        self.driver.metrics.remove_volume(&record.name);
        tracing::info!(volume = %record.name, "volume deleted");
        true
    }
}

/// What the engine needs to know of a volume.
pub(crate) fn volume_spec(record: &VolumeRecord) -> Result<VolumeSpec, NodeError> {
    let mode = Mode::parse(&record.mode).ok_or_else(|| CatalogError::Conflict {
        name: record.name.clone(),
        reason: format!("unknown mode {:?}", record.mode),
    })?;
    Ok(VolumeSpec {
        size: record.size,
        group: record.group_id(),
        mode,
    })
}

/// Has the engine serve a volume, owned by site `owner` at the record's
/// epoch.
pub(crate) fn serve_in_engine(
    engine: &mut stretch_core::Engine,
    record: &VolumeRecord,
    spec: VolumeSpec,
    owner: stretch_core::SiteId,
) {
    engine.add_volume(record.volume_id(), spec);
    engine.set_owner(record.group_id(), owner, Epoch(record.epoch));
}

/// The leg of `record`: the existing file, or a new one when this node has
/// none yet (the volume was created while it was away, or it stopped
/// between applying the creation and making the leg).
pub(crate) fn open_or_create_leg(
    fs: &stretch_storage::OsFileSystem,
    record: &VolumeRecord,
) -> Result<Leg<stretch_storage::OsFileSystem>, NodeError> {
    if record.leg.exists() {
        return Ok(Leg::open(fs, &record.leg, record.size)?);
    }
    Ok(Leg::create(fs, &record.leg, record.size)?)
}

/// Waits (bounded) until the metadata records `site`: the leader records
/// the config's sites just after the cluster forms.
async fn wait_for_site(control: &Control, site: &str) {
    let deadline = Instant::now() + SITE_WAIT;
    while Instant::now() < deadline {
        if control.applied().0.sites.contains_key(site) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The HTTP status of a refused metadata command.
pub(crate) fn command_status(error: &CommandError) -> u16 {
    match error {
        CommandError::UnknownVolume { .. } | CommandError::UnknownGroup { .. } => 404,
        CommandError::VolumeExists { .. }
        | CommandError::NotOwner { .. }
        | CommandError::MoveInFlight { .. }
        | CommandError::NoMoveInFlight { .. }
        | CommandError::StaleEpoch { .. }
        | CommandError::SameSite { .. } => 409,
        _ => 400,
    }
}
