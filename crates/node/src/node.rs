//! One stretch node: recovery at start, volume management, NBD and admin
//! servers, clean shutdown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stretch_core::{Engine, Epoch, Mode, RecoveredState, VolumeId, VolumeSpec};
use stretch_storage::{Catalog, CatalogError, Journal, Leg, OsFileSystem, VolumeRecord, recover};
use tokio::sync::watch;

use crate::config::{ClusterConfig, NodeConfig};
use crate::driver::{DataLayout, Driver, IoThreads};
use crate::links::LinkControl;
use crate::metrics::{Metrics, VolumeLag};
use crate::peers::Peers;
use crate::sites::SiteTable;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {0:?} is not in the cluster config")]
    UnknownNode(String),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another stretch process")]
    Locked(PathBuf),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Leg(#[from] stretch_storage::LegError),
    #[error(transparent)]
    Recovery(#[from] stretch_storage::RecoveryError),
    #[error(transparent)]
    Journal(#[from] stretch_storage::JournalError),
    #[error(transparent)]
    ResyncMarks(#[from] stretch_storage::ResyncMarksError),
    #[error(transparent)]
    DirtyMap(#[from] stretch_storage::DirtyMapError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {0:?} has requests in flight; retry when it is idle")]
    Busy(String),
    #[error("cannot start node threads: {0}")]
    Threads(std::io::Error),
    #[error("{0:?} is not a data site of this cluster")]
    UnknownSite(String),
    #[error("a witness site holds no volumes")]
    Witness,
    #[error(transparent)]
    Peers(#[from] crate::peers::PeersError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error("NBD TLS for node {node:?}: {source}")]
    NbdTls {
        node: String,
        #[source]
        source: stretch_nbd::TlsConfigError,
    },
    #[error("site {owner:?} owns volume {volume:?}: ask its node to move it")]
    NotOwner { volume: String, owner: String },
    #[error("cannot move volume {volume:?} to site {site:?}: {reason}")]
    Move {
        volume: String,
        site: String,
        reason: String,
    },
}

/// A running node's handle for the admin API and the NBD backend.
#[derive(Debug)]
pub struct Node {
    pub(crate) name: String,
    pub(crate) site: String,
    pub(crate) cluster: String,
    /// `None` at a witness site, which serves no volumes.
    pub(crate) nbd_address: Option<std::net::SocketAddr>,
    pub(crate) driver: Arc<Driver>,
    pub(crate) catalog: Mutex<Catalog>,
    pub(crate) layout: DataLayout,
    pub(crate) fs: Arc<OsFileSystem>,
    pub(crate) started: Instant,
    pub(crate) sites: SiteTable,
    /// The links to the other sites, once they are started.
    pub(crate) peers: std::sync::OnceLock<Arc<Peers>>,
    /// How the links between sites are shaped (shared by every node of a
    /// `stretch up` process).
    pub(crate) links: Arc<LinkControl>,
}

impl Node {
    pub(crate) fn volumes(&self) -> Vec<VolumeRecord> {
        self.catalog.lock().volumes().cloned().collect()
    }

    pub(crate) fn volume(&self, name: &str) -> Option<VolumeRecord> {
        self.catalog.lock().get(name).cloned()
    }

    /// The site name owning a volume (the local site for volumes recorded
    /// before volumes spanned sites).
    pub(crate) fn owner_name(&self, record: &VolumeRecord) -> String {
        if record.owner.is_empty() {
            return self.site.clone();
        }
        record.owner.clone()
    }

    /// Per volume and peer site: what the peer has not applied yet.
    pub(crate) fn volume_lags(&self) -> Vec<VolumeLag> {
        let status = self.driver.engine.lock().replication_status();
        let volumes = self.volumes();
        let mut lags = Vec::new();
        for group in &status {
            for peer in &group.peers {
                let peer_name = self.sites.name(peer.peer).unwrap_or("unknown");
                for record in volumes.iter().filter(|r| r.group_id() == group.group) {
                    lags.push(VolumeLag {
                        volume: record.name.clone(),
                        peer: peer_name.to_string(),
                        unapplied_deltas: peer.unapplied_deltas,
                        unapplied_bytes: peer.unapplied_bytes,
                        lag_seconds: peer.lag_nanos as f64 / 1e9,
                        resync_regions_left: peer.resync_regions_left,
                    });
                }
            }
        }
        lags
    }

    /// Updates the gauges that are computed rather than counted.
    pub(crate) fn refresh_replication_metrics(&self) {
        let metrics = &self.driver.metrics;
        metrics.set_volume_lags(&self.volume_lags());
        if let Some(peers) = self.peers.get() {
            for (site, rtt) in peers.round_trips() {
                metrics.peer_rtt(&site, rtt.as_secs_f64());
            }
        }
    }

    fn is_witness(&self) -> bool {
        !self.sites.is_data_site(&self.site)
    }

    /// Creates a volume here, owned by `owner` (this site by default), and
    /// tells the other sites, which create their legs with the same ids.
    /// Returns the record and the sites that have not confirmed yet (they
    /// get the volume when they next connect).
    pub(crate) fn create_volume(
        &self,
        name: &str,
        size: u64,
        group: Option<&str>,
        owner: Option<&str>,
        mode: Mode,
    ) -> Result<(VolumeRecord, Vec<String>), NodeError> {
        if self.is_witness() {
            return Err(NodeError::Witness);
        }
        let owner = owner.unwrap_or(&self.site).to_string();
        if !self.sites.is_data_site(&owner) {
            return Err(NodeError::UnknownSite(owner));
        }
        let planned = {
            let catalog = self.catalog.lock();
            let group = group.unwrap_or(name);
            let leg_path = self.layout.legs().join(format!("{name}.raw"));
            let mut planned = catalog.plan_volume(name, size, group, leg_path)?;
            planned.owner = owner;
            planned.mode = mode.name().to_string();
            planned
        };
        let record = self.adopt_volume(planned)?;
        let unconfirmed = match self.peers.get() {
            Some(peers) => peers.announce_volume(&record),
            None => Vec::new(),
        };
        Ok((record, unconfirmed))
    }

    /// Creates the leg and catalog entry of a volume planned here or at
    /// another site (same ids), and starts serving it. The leg comes first
    /// (durably), then the catalog entry, so a crash in between leaves at
    /// worst an unnamed leg file, never a volume without its leg. Adopting
    /// a volume already here with the same id is a no-op.
    pub(crate) fn adopt_volume(&self, mut record: VolumeRecord) -> Result<VolumeRecord, NodeError> {
        if self.is_witness() {
            return Err(NodeError::Witness);
        }
        let owner_id = self
            .sites
            .id(&record.owner)
            .filter(|_| self.sites.is_data_site(&record.owner))
            .ok_or_else(|| NodeError::UnknownSite(record.owner.clone()))?;
        let mode = Mode::parse(&record.mode).ok_or_else(|| CatalogError::Conflict {
            name: record.name.clone(),
            reason: format!("unknown mode {:?}", record.mode),
        })?;
        let mut catalog = self.catalog.lock();
        if let Some(existing) = catalog.get(&record.name).cloned()
            && existing.id == record.id
        {
            if record.epoch > existing.epoch {
                // Ownership moved: a newer epoch names the new owner.
                catalog.set_owner(
                    self.fs.as_ref(),
                    &existing.group,
                    &record.owner,
                    record.epoch,
                )?;
                self.driver.with_engine(|engine| {
                    engine.set_owner(existing.group_id(), owner_id, Epoch(record.epoch));
                });
                tracing::info!(
                    volume = %existing.name,
                    owner = %record.owner,
                    epoch = record.epoch,
                    "volume ownership moved"
                );
                return Ok(catalog.get(&record.name).cloned().unwrap_or(existing));
            }
            return Ok(existing);
        }
        record.leg = self.layout.legs().join(format!("{}.raw", record.name));
        catalog.check_new(&record)?;
        // A failed creation removes its own file; a failed catalog save
        // removes the leg here, so a refused volume leaves nothing behind.
        let leg = Leg::create(self.fs.as_ref(), &record.leg, record.size)?;
        let record = match catalog.add_volume(self.fs.as_ref(), record) {
            Ok(record) => record,
            Err(error) => {
                Leg::discard(self.fs.as_ref(), leg);
                return Err(error.into());
            }
        };
        self.driver
            .legs
            .write()
            .insert(record.volume_id(), Arc::new(leg));
        self.driver.with_engine(|engine| {
            engine.add_volume(
                record.volume_id(),
                VolumeSpec {
                    size: record.size,
                    group: record.group_id(),
                    mode,
                },
            );
            engine.set_owner(record.group_id(), owner_id, Epoch(record.epoch));
        });
        self.driver.metrics.volumes.inc();
        tracing::info!(
            volume = %record.name,
            size = record.size,
            group = %record.group,
            owner = %record.owner,
            mode = %record.mode,
            "volume created"
        );
        Ok(record)
    }

    /// Moves the ownership of a volume's group from this site to `to`:
    /// writes are held here, the open delta closes, and once `to` applied
    /// every delta, `to` takes over with a higher epoch and the held writes
    /// are forwarded to it. Needs `to` connected; bounded in time, and
    /// called off (writes served here again) on any failure.
    pub(crate) fn move_volume(&self, name: &str, to: &str) -> Result<VolumeRecord, NodeError> {
        let record = self
            .volume(name)
            .ok_or_else(|| CatalogError::NoSuchVolume(name.to_string()))?;
        let owner = self.owner_name(&record);
        let fail = |reason: &str| NodeError::Move {
            volume: name.to_string(),
            site: to.to_string(),
            reason: reason.to_string(),
        };
        if owner != self.site {
            return Err(NodeError::NotOwner {
                volume: name.to_string(),
                owner,
            });
        }
        if to == self.site {
            return Err(fail("it already owns it"));
        }
        let to_id = self
            .sites
            .id(to)
            .filter(|_| self.sites.is_data_site(to))
            .ok_or_else(|| NodeError::UnknownSite(to.to_string()))?;
        let peers = self
            .peers
            .get()
            .ok_or_else(|| fail("this node has no links"))?;
        if !peers.connected_sites().iter().any(|site| site == to) {
            return Err(fail("it is not connected"));
        }
        let group = record.group_id();
        let now = self.driver.now();
        self.driver
            .with_engine(|engine| engine.hand_over(now, group))
            .map_err(|error| fail(&error.to_string()))?;
        let call_off = |reason: &str| {
            let now = self.driver.now();
            self.driver
                .with_engine(|engine| engine.cancel_hand_over(now, group));
            fail(reason)
        };
        let deadline = Instant::now() + MOVE_TIMEOUT;
        while !self.driver.engine.lock().hand_over_ready(group, to_id) {
            if Instant::now() > deadline {
                return Err(call_off("the new owner did not catch up in time"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let epoch = record.epoch + 1;
        let mut moved = record.clone();
        moved.owner = to.to_string();
        moved.epoch = epoch;
        // The new owner first: until it confirms, this site holds the
        // writes. Without a confirmation this site still gives ownership
        // up: calling the move off could leave two owners if the new one
        // did take over; the catalog exchange completes the move when the
        // sites next connect, and writes fail meanwhile rather than diverge.
        let unconfirmed = peers.announce_volume(&moved);
        if unconfirmed.iter().any(|site| site == to) {
            tracing::warn!(
                volume = name,
                to,
                "the new owner did not confirm the move; it takes over when it next connects"
            );
        }
        let updated = self
            .catalog
            .lock()
            .set_owner(self.fs.as_ref(), &record.group, to, epoch)?;
        self.driver
            .with_engine(|engine| engine.set_owner(group, to_id, Epoch(epoch)));
        tracing::info!(volume = name, from = %self.site, to, epoch, "volume ownership moved");
        Ok(updated
            .into_iter()
            .find(|updated| updated.name == name)
            .unwrap_or(moved))
    }

    /// Deletes a volume here and at the other sites it reaches.
    pub(crate) fn delete_volume(&self, name: &str) -> Result<VolumeRecord, NodeError> {
        let record = self.delete_local_volume(name)?;
        if let Some(peers) = self.peers.get() {
            peers.announce_deletion(&record);
        }
        Ok(record)
    }

    /// Deletes a volume at this site: the engine stops serving it, the
    /// catalog forgets it (and remembers its id as deleted), then the leg
    /// file goes.
    pub(crate) fn delete_local_volume(&self, name: &str) -> Result<VolumeRecord, NodeError> {
        let mut catalog = self.catalog.lock();
        let record = catalog
            .get(name)
            .cloned()
            .ok_or_else(|| CatalogError::NoSuchVolume(name.to_string()))?;
        self.driver
            .with_engine(|engine| engine.remove_volume(record.volume_id()))
            .map_err(|_| NodeError::Busy(name.to_string()))?;
        catalog.remove_volume(self.fs.as_ref(), name)?;
        self.driver.legs.write().remove(&record.volume_id());
        if let Err(error) = std::fs::remove_file(&record.leg) {
            tracing::warn!(%error, leg = %record.leg.display(), "could not delete the leg file");
        }
        self.driver.metrics.volumes.dec();
        self.driver.metrics.remove_volume(name);
        tracing::info!(volume = name, "volume deleted");
        Ok(record)
    }
}

/// Opens a node's data directory: loads the catalog, opens the legs,
/// replays the journal onto them, and starts a fresh journal segment.
fn open_node(
    config: &ClusterConfig,
    node: &NodeConfig,
    data_dir: &Path,
    links: Arc<LinkControl>,
) -> Result<(Arc<Node>, IoThreads, std::fs::File, crate::driver::Outbox), NodeError> {
    let layout = DataLayout {
        root: data_dir.join(&node.name),
    };
    for dir in [layout.root.clone(), layout.legs(), layout.journal()] {
        std::fs::create_dir_all(&dir).map_err(|source| NodeError::DataDir { path: dir, source })?;
    }
    let lock_path = layout.lock();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| NodeError::DataDir {
            path: lock_path.clone(),
            source,
        })?;
    if lock.try_lock().is_err() {
        return Err(NodeError::Locked(layout.root.clone()));
    }
    let fs = Arc::new(OsFileSystem);
    // A data directory without a catalog is new: no delta was ever
    // released, so every other site lacks nothing the journal does not name.
    let fresh = !layout.catalog().exists();
    let catalog = Catalog::load(fs.as_ref(), &layout.catalog())?;
    let mut legs = BTreeMap::new();
    for record in catalog.volumes() {
        let leg = Leg::open(fs.as_ref(), &record.leg, record.size)?;
        legs.insert(record.volume_id(), leg);
    }
    let recovery = recover(&fs, &layout.journal(), &legs)?;
    if recovery.replayed_deltas > 0 || recovery.dropped_tail.is_some() {
        tracing::info!(
            node = %node.name,
            deltas = recovery.replayed_deltas,
            blocks = recovery.replayed_blocks,
            dropped_tail = recovery.dropped_tail.as_deref().unwrap_or("none"),
            "recovered from the journal"
        );
    }
    let mut journal = Journal::create(
        fs.clone(),
        &layout.journal(),
        config.tuning.journal_segment_bytes.0,
        recovery.next_position,
        recovery.next_seq.clone(),
    )?;
    let sites = SiteTable::from_config(config);
    // What each other site may lack: its saved map plus what the journal
    // replayed (a restarted owner copies those regions to a lagging site).
    // The replayed regions go into the saved maps before the replayed
    // segments are deleted: after that, only the maps name them.
    let mut dirty_maps = BTreeMap::new();
    for peer in sites.data_peers(&node.site) {
        let name = sites.name(peer).unwrap_or("unknown");
        let path = layout.root.join(format!("dirty-{name}.map"));
        if fresh && !path.exists() {
            stretch_storage::save_dirty_map(fs.as_ref(), &path, &Default::default())?;
        }
        let mut saved = stretch_storage::load_dirty_map(fs.as_ref(), &path)?;
        if let Some(regions) = &mut saved
            && !recovery.replayed_regions.is_subset(regions)
        {
            regions.extend(recovery.replayed_regions.iter().copied());
            stretch_storage::save_dirty_map(fs.as_ref(), &path, regions)?;
        }
        dirty_maps.insert(peer, (path, saved));
    }
    journal.discard_replayed(&recovery.stale_segments)?;
    let resyncing = stretch_storage::load_resync_marks(fs.as_ref(), &layout.resync_marks())?;
    let site_id = sites
        .id(&node.site)
        .ok_or_else(|| NodeError::UnknownSite(node.site.clone()))?;
    let mut engine_config = config.tuning.engine();
    engine_config.site = site_id;
    engine_config.peers = sites.data_peers(&node.site);
    let mut engine = Engine::new(
        engine_config,
        RecoveredState {
            next_position: recovery.next_position,
            next_seq: recovery.next_seq,
            // Above every id an earlier run issued (see the field's docs).
            next_remote_id: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_micros() as u64),
            resyncing,
        },
    );
    let metrics = Metrics::new(&node.name, &node.site);
    for record in catalog.volumes() {
        let mode = Mode::parse(&record.mode).ok_or_else(|| CatalogError::Corrupt {
            path: layout.catalog(),
            reason: format!("volume {:?} has mode {:?}", record.name, record.mode),
        })?;
        let owner = if record.owner.is_empty() {
            Some(site_id)
        } else {
            sites.id(&record.owner)
        };
        let owner = owner.ok_or_else(|| NodeError::UnknownSite(record.owner.clone()))?;
        engine.add_volume(
            record.volume_id(),
            VolumeSpec {
                size: record.size,
                group: record.group_id(),
                mode,
            },
        );
        engine.set_owner(record.group_id(), owner, Epoch(record.epoch));
        metrics.volumes.inc();
    }
    let dirty_maps = dirty_maps
        .into_iter()
        .map(|(peer, (path, saved))| {
            engine.restore_dirty_map(peer, saved, &recovery.replayed_regions);
            (peer, path)
        })
        .collect();
    let legs: BTreeMap<VolumeId, Arc<Leg<OsFileSystem>>> = legs
        .into_iter()
        .map(|(id, leg)| (id, Arc::new(leg)))
        .collect();
    let (driver, threads, outbox) = Driver::start(
        engine,
        legs,
        journal,
        metrics,
        &node.name,
        dirty_maps,
        layout.resync_marks(),
    )
    .map_err(NodeError::Threads)?;
    let node = Arc::new(Node {
        name: node.name.clone(),
        site: node.site.clone(),
        cluster: config.cluster.name.clone(),
        nbd_address: node.nbd_listen,
        driver,
        catalog: Mutex::new(catalog),
        layout,
        fs,
        started: Instant::now(),
        sites,
        peers: std::sync::OnceLock::new(),
        links,
    });
    Ok((node, threads, lock, outbox))
}

/// Longest a volume move waits for the new owner to hold every delta.
const MOVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a clean shutdown waits for dirty data to reach the legs.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a clean shutdown waits for connected sites to apply what this
/// node owns (after that, they catch up when it returns).
const PEER_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Waits until every connected site applied every delta this node keeps for
/// it: a site that is up to date at shutdown needs no resync at restart.
async fn drain_to_peers(node: &Node, peers: &Peers) {
    let deadline = Instant::now() + PEER_DRAIN_TIMEOUT;
    loop {
        let backlog = node.driver.engine.lock().stats().backlog_bytes;
        if backlog == 0 || peers.connected_sites().is_empty() {
            return;
        }
        if Instant::now() > deadline {
            tracing::warn!(
                backlog,
                "other sites did not apply everything in time; they catch up at restart"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs one node until `shutdown` resolves, then drains: every acknowledged
/// write is journaled, applied to its leg and the legs synced before
/// returning (or, past the drain timeout, left in the journal for recovery).
pub async fn run_node(
    config: &ClusterConfig,
    node_name: &str,
    data_dir: &Path,
    options: NodeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let node_config = config
        .node(node_name)
        .ok_or_else(|| NodeError::UnknownNode(node_name.to_string()))?;
    // Before anything else: a node that would serve its admin API beyond
    // this machine without credentials must not start at all.
    let admin_token =
        crate::admin::load_token(&options.pki_dir, node_config.admin_listen, &config.admin)?;
    let links = options
        .links
        .unwrap_or_else(|| Arc::new(LinkControl::from_config(config)));
    // Certificates are loaded before anything is opened, so a node whose
    // TLS settings are wrong never starts serving plain NBD by mistake.
    let nbd_tls = nbd_tls_settings(config, node_config, &options.pki_dir)?;
    let (node, threads, lock, outbox) = open_node(config, node_config, data_dir, links.clone())?;
    let (stop_peers, peers_stopped) = watch::channel(false);
    let multi_site = config.data_sites().len() > 1;
    let mut peer_tasks = None;
    if multi_site && config.is_data_node(node_config) {
        let (peers, tasks) = Peers::start(
            &node,
            config,
            &options.pki_dir,
            &node.links,
            outbox,
            peers_stopped,
        )?;
        let _ = node.peers.set(peers);
        peer_tasks = Some(tasks);
    }
    let listener = match node_config.nbd_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| NodeError::Listen { address, source })?,
        ),
        None => None,
    };
    let (stop, stopped) = watch::channel(false);
    let admin = crate::admin::start(
        node.clone(),
        links.clone(),
        node_config.admin_listen,
        crate::admin::Gate::new(admin_token, &config.admin),
        stopped.clone(),
    )
    .await
    .map_err(|source| NodeError::Listen {
        address: node_config.admin_listen,
        source,
    })?;
    let timer = tokio::spawn(node.driver.clone().run_timer(stopped.clone()));
    tracing::info!(
        node = %node.name,
        site = %node.site,
        nbd = ?node_config.nbd_listen,
        admin = %node_config.admin_listen,
        volumes = node.volumes().len(),
        "node serving"
    );
    if let Some(listener) = listener {
        let backend = Arc::new(crate::export::VolumeBackend::new(node.clone()));
        let server_config = stretch_nbd::ServerConfig {
            max_request_bytes: config.tuning.nbd_request_bytes_max.0 as u32,
            max_in_flight_per_connection: config.tuning.nbd_in_flight_per_connection,
            max_connections: config.tuning.nbd_connections_max,
            max_in_flight_bytes: config.tuning.nbd_in_flight_bytes_max.0,
            tls: nbd_tls,
            ..stretch_nbd::ServerConfig::default()
        };
        if let Err(error) = stretch_nbd::serve(listener, backend, server_config, shutdown).await {
            tracing::error!(%error, "NBD server failed");
        }
    } else {
        // A witness node holds no volumes: it serves its admin API until told to stop.
        shutdown.await;
    }
    tracing::info!(node = %node.name, "draining dirty data to the legs");
    node.driver.with_engine(|engine| engine.start_drain());
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        if node.driver.engine.lock().is_drained() {
            break;
        }
        if let Some(reason) = node.driver.engine.lock().failure() {
            tracing::error!(reason, "node failed; the journal keeps what the legs lack");
            break;
        }
        if Instant::now() > deadline {
            tracing::warn!("drain timed out; recovery will replay the journal at next start");
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(peers) = node.peers.get() {
        drain_to_peers(&node, peers).await;
    }
    // Under `stretch up` every node waits here, so no node closes its links
    // while another still ships its last deltas over them.
    // Bounded: a node that failed at start never arrives.
    if let Some(barrier) = &options.shutdown_barrier {
        let _ = tokio::time::timeout(PEER_DRAIN_TIMEOUT, barrier.wait()).await;
    }
    let _ = stop_peers.send(true);
    if let Some(peers) = node.peers.get() {
        peers.close();
    }
    if let Some(mut tasks) = peer_tasks {
        while tasks.join_next().await.is_some() {}
    }
    let _ = stop.send(true);
    let _ = timer.await;
    admin.join().await;
    // The NBD and admin servers are gone, so this is the last handle:
    // dropping it closes the driver's queues and ends the I/O threads.
    drop(node);
    threads.join();
    drop(lock);
    tracing::info!(node = node_name, "node stopped");
    Ok(())
}

/// The NBD server's TLS settings for `node_config`: `None` with TLS off,
/// else the configured certificate, or the node's cluster certificate from
/// `pki_dir` (it names the node, so clients must connect by that name or
/// be told it, e.g. qemu's `tls-hostname`).
fn nbd_tls_settings(
    config: &ClusterConfig,
    node_config: &crate::config::NodeConfig,
    pki_dir: &Path,
) -> Result<Option<stretch_nbd::TlsSettings>, NodeError> {
    if node_config.nbd_listen.is_none() {
        return Ok(None); // a witness serves no NBD
    }
    let required = match node_config.nbd_tls(&config.tuning) {
        crate::config::NbdTls::Off => return Ok(None),
        crate::config::NbdTls::On => false,
        crate::config::NbdTls::Require => true,
    };
    let name = &node_config.name;
    let certificate = node_config
        .nbd_tls_cert
        .clone()
        .unwrap_or_else(|| pki_dir.join(format!("{name}.pem")));
    let key = node_config
        .nbd_tls_key
        .clone()
        .unwrap_or_else(|| pki_dir.join(format!("{name}.key")));
    let settings = stretch_nbd::TlsSettings::from_pem_files(&certificate, &key, required).map_err(
        |source| NodeError::NbdTls {
            node: name.clone(),
            source,
        },
    )?;
    tracing::info!(
        node = %name,
        certificate = %certificate.display(),
        required,
        "NBD TLS enabled"
    );
    Ok(Some(settings))
}

/// Where a node finds what it shares with the rest of the cluster.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The cluster CA and node certificates (`stretch init`).
    pub pki_dir: PathBuf,
    /// Link shaping shared by every node of this process; each node makes
    /// its own from the config when absent.
    pub links: Option<Arc<LinkControl>>,
    /// Nodes of one process meet here at shutdown before closing links.
    pub shutdown_barrier: Option<Arc<tokio::sync::Barrier>>,
}

/// Runs every node of the config in this process until `shutdown`. A node
/// that fails stops the others, and its error is returned. Creates the
/// cluster CA and node certificates (with two sites or more) and the admin
/// token in `pki_dir` on first start.
pub async fn run_cluster(
    config: &ClusterConfig,
    data_dir: &Path,
    pki_dir: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    // Node certificates serve the links between sites and, by default, NBD
    // over TLS.
    let nbd_tls_from_pki = config.nodes.iter().any(|node| {
        node.nbd_listen.is_some()
            && node.nbd_tls_cert.is_none()
            && node.nbd_tls(&config.tuning) != crate::config::NbdTls::Off
    });
    if config.data_sites().len() > 1 || nbd_tls_from_pki {
        let names: Vec<&str> = config.nodes.iter().map(|node| node.name.as_str()).collect();
        let report =
            stretch_transport::init(pki_dir, &config.cluster.name, &names).map_err(|source| {
                crate::peers::PeersError::Identity {
                    dir: pki_dir.display().to_string(),
                    source,
                }
            })?;
        if report.ca_created || !report.nodes_created.is_empty() {
            tracing::info!(
                dir = %pki_dir.display(),
                nodes = ?report.nodes_created,
                "created cluster certificates"
            );
        }
    }
    if crate::admin::ensure_admin_token(pki_dir).map_err(crate::admin::AdminError::from)? {
        tracing::info!(
            path = %pki_dir.join(crate::admin::ADMIN_TOKEN_FILE).display(),
            "created the admin token"
        );
    }
    let (stop, stopped) = watch::channel(false);
    let (failure, mut failures) = tokio::sync::mpsc::channel::<()>(config.nodes.len());
    let links = Arc::new(LinkControl::from_config(config));
    let barrier = Arc::new(tokio::sync::Barrier::new(config.nodes.len()));
    let mut tasks = Vec::new();
    for node in &config.nodes {
        let config = config.clone();
        let name = node.name.clone();
        let data_dir = data_dir.to_path_buf();
        let options = NodeOptions {
            pki_dir: pki_dir.to_path_buf(),
            links: Some(links.clone()),
            shutdown_barrier: Some(barrier.clone()),
        };
        let mut stopped = stopped.clone();
        let failure = failure.clone();
        tasks.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            let result = run_node(&config, &name, &data_dir, options, shutdown).await;
            if result.is_err() {
                let _ = failure.send(()).await;
            }
            result
        }));
    }
    tokio::select! {
        () = shutdown => {}
        _ = failures.recv() => {}
    }
    let _ = stop.send(true);
    let mut failed = None;
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => failed = failed.or(Some(error)),
            Err(error) => tracing::error!(%error, "node task panicked"),
        }
    }
    match failed {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
