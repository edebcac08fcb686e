//! One stretch node: recovery at start, the metadata member, NBD and admin
//! servers, clean shutdown. Volume changes are in `volumes`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stretch_core::{Engine, RecoveredState, VolumeId};
use stretch_storage::{CatalogError, Leg, OsFileSystem, VolumeRecord};
use tokio::sync::watch;

use crate::config::{ClusterConfig, NodeConfig};
use crate::control::{Control, ControlError, OpenedStore};
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
    Start(#[from] stretch_storage::StartError),
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
    #[error("cannot promote volume {volume:?} at site {site:?}: {reason}")]
    Promote {
        volume: String,
        site: String,
        reason: String,
    },
    #[error("cannot fail group {group:?} over: {reason}")]
    Failover { group: String, reason: String },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(
        "{0} is missing but this node holds data (journal or legs): it would rejoin the metadata cluster as an empty voter, which can lose committed changes; restore the file, or move the whole data directory away to start this node anew"
    )]
    MetadataLost(PathBuf),
    #[error(
        "volume {volume:?} was created, but this node has not applied it yet (it cannot reach the metadata leader); it appears here once it does"
    )]
    NotAppliedHere { volume: String },
    #[error(
        "data directory {0} was written by an earlier stretch (it has a per-site catalog.json; volumes now live in the Raft metadata): move it away to start this node empty, its volumes resync from the other sites"
    )]
    OldDataDirectory(PathBuf),
}

impl From<stretch_metadata::CommandError> for NodeError {
    fn from(error: stretch_metadata::CommandError) -> Self {
        NodeError::Control(ControlError::Refused(error))
    }
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
    /// The volumes this node serves, by name, as it last applied the
    /// metadata.
    pub(crate) volumes: Mutex<BTreeMap<String, VolumeRecord>>,
    /// One reconcile at a time.
    pub(crate) reconcile_turn: Mutex<()>,
    /// Groups this node is handing over: their ownership changes are made
    /// by the move itself, in its order.
    pub(crate) moving: Mutex<BTreeSet<u32>>,
    /// Groups this node is taking over from a lost owner: the engine is
    /// told it owns them only once the old owner's lease cannot cover
    /// them any more.
    pub(crate) taking_over: Mutex<BTreeSet<u32>>,
    /// Live migrations this node drives, and the last ones that ended.
    pub(crate) migrations: Mutex<crate::migration::Migrations>,
    /// The metadata index the engine's ownership reflects: what this node
    /// reports when it renews its lease (a voter that fenced it at a later
    /// index refuses until it applied that).
    pub(crate) reconciled_index: std::sync::atomic::AtomicU64,
    /// The node's leases, once started (multi-site clusters only).
    pub(crate) leases: crate::control::LeaseCell,
    /// Owner sites that held no lease at the last check (their volumes
    /// are suspended unless failed over).
    pub(crate) lost_sites: Mutex<BTreeSet<String>>,
    /// How long a survivor waits for the others' image offers
    /// (`tuning.image_offer_wait_ms`).
    pub(crate) image_offer_wait: Duration,
    /// This node, for tasks it starts.
    this: std::sync::OnceLock<std::sync::Weak<Node>>,
    /// The node's metadata member, once started.
    pub(crate) control: std::sync::OnceLock<Arc<Control>>,
    /// The metadata store until the member starts on it.
    pub(crate) store: Mutex<Option<OpenedStore>>,
    pub(crate) runtime: tokio::runtime::Handle,
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
        self.volumes.lock().values().cloned().collect()
    }

    pub(crate) fn volume(&self, name: &str) -> Option<VolumeRecord> {
        self.volumes.lock().get(name).cloned()
    }

    /// The site name owning a volume.
    pub(crate) fn owner_name(&self, record: &VolumeRecord) -> String {
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

    /// Each volume's read-lease counters (see
    /// [`stretch_core::ReadLeaseCounters`]).
    pub(crate) fn read_lease_figures(&self) -> Vec<(String, stretch_core::ReadLeaseCounters)> {
        let volumes = self.volumes();
        let engine = self.driver.engine.lock();
        volumes
            .into_iter()
            .map(|record| {
                let counters = engine.read_lease_counters(VolumeId(record.id));
                (record.name, counters)
            })
            .collect()
    }

    /// Updates the gauges that are computed rather than counted.
    pub(crate) fn refresh_replication_metrics(&self) {
        let metrics = &self.driver.metrics;
        metrics.set_volume_lags(&self.volume_lags());
        metrics.set_read_leases(&self.read_lease_figures());
        if let Some(control) = self.control.get() {
            metrics.set_metadata(&control.status());
        }
        if self.leases.get().is_some() {
            metrics.set_leases(&self.lease_figures());
        }
        if let Some(peers) = self.peers.get() {
            for (site, rtt) in peers.round_trips() {
                metrics.peer_rtt(&site, rtt.as_secs_f64());
            }
        }
    }

    pub(crate) fn weak(&self) -> std::sync::Weak<Node> {
        self.this.get().cloned().unwrap_or_default()
    }

    /// This node's site as the engine numbers it.
    pub(crate) fn driver_site(&self) -> stretch_core::SiteId {
        self.sites
            .id(&self.site)
            .expect("node invariant: a node's site is in the site table")
    }

    pub(crate) fn reconciled_index(&self) -> u64 {
        self.reconciled_index
            .load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn is_witness(&self) -> bool {
        !self.sites.is_data_site(&self.site)
    }
}

/// Opens a node's data directory: opens the metadata store and the legs of
/// the volumes it names, replays the journal onto them, and starts a fresh
/// journal segment.
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
    if layout.catalog().exists() {
        return Err(NodeError::OldDataDirectory(layout.root.clone()));
    }
    let fs = Arc::new(OsFileSystem);
    // A data directory without metadata is new: no delta was ever
    // released, so every other site lacks nothing the journal does not name.
    let fresh = !layout.root.join(crate::control::METADATA_FILE).exists();
    // A node that ran before (it has a journal segment or a leg) but lost
    // its metadata store would rejoin Raft as an empty voter under its old
    // id: it could then vote for a leader lacking committed changes.
    if fresh && (has_files(&layout.journal()) || has_files(&layout.legs())) {
        return Err(NodeError::MetadataLost(
            layout.root.join(crate::control::METADATA_FILE),
        ));
    }
    let leases: crate::control::LeaseCell = Arc::default();
    let store = crate::control::open_store(&layout.root, leases.clone())?;
    let metadata = config
        .is_data_node(node)
        .then(|| store.applied.borrow().0.clone());
    let records = match &metadata {
        Some(metadata) => crate::volumes::records_of(metadata, &layout.legs()),
        None => BTreeMap::new(),
    };
    remove_orphan_legs(&layout.legs(), &records);
    let mut legs = BTreeMap::new();
    for record in records.values() {
        let leg = crate::volumes::open_or_create_leg(fs.as_ref(), record)?;
        legs.insert(record.volume_id(), leg);
    }
    let mut engine_config = config.tuning.engine();
    let sites = SiteTable::from_config(config);
    let paths = stretch_storage::StartPaths {
        journal_dir: layout.journal(),
        resync_marks: layout.resync_marks(),
        fast_drain_log: layout.fast_drain_log(),
        dirty_maps: sites
            .data_peers(&node.site)
            .into_iter()
            .map(|peer| {
                let name = sites.name(peer).unwrap_or("unknown");
                (peer, layout.root.join(format!("dirty-{name}.map")))
            })
            .collect(),
    };
    let mut started = stretch_storage::start(
        &fs,
        &paths,
        &legs,
        engine_config.region_blocks,
        config.tuning.journal_segment_bytes.0,
        fresh,
    )?;
    let recovery = &started.recovery;
    if recovery.replayed_deltas > 0 || recovery.dropped_tail.is_some() {
        tracing::info!(
            node = %node.name,
            deltas = recovery.replayed_deltas,
            blocks = recovery.replayed_blocks,
            dropped_tail = recovery.dropped_tail.as_deref().unwrap_or("none"),
            "recovered from the journal"
        );
    }
    let site_id = sites
        .id(&node.site)
        .ok_or_else(|| NodeError::UnknownSite(node.site.clone()))?;
    engine_config.site = site_id;
    engine_config.peers = sites.data_peers(&node.site);
    // With other data sites, an owner serves only under its lease (the
    // lease service starts with the links); alone, nothing can take its
    // volumes away.
    engine_config.leases_enforced = !engine_config.peers.is_empty();
    let mut engine = Engine::new(
        engine_config,
        RecoveredState {
            // Above every id an earlier run issued (see the field's docs).
            next_remote_id: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_micros() as u64),
            ..std::mem::take(&mut started.state)
        },
    );
    let metrics = Metrics::new(&node.name, &node.site);
    for record in records.values() {
        let spec = crate::volumes::volume_spec(record)?;
        let owner = sites
            .id(&record.owner)
            .ok_or_else(|| NodeError::UnknownSite(record.owner.clone()))?;
        crate::volumes::serve_in_engine(&mut engine, record, spec, owner);
        metrics.volumes.inc();
    }
    // The epoch histories first: restoring the maps looks at them. The
    // drains' logs before the drains.
    started.restore_fast_drain_log(&mut engine);
    if let Some(metadata) = &metadata {
        crate::failover::tell_epoch_histories(&mut engine, metadata);
        crate::fast_drain::tell_fast_drains(&mut engine, metadata, &sites);
    }
    started.restore_maps(&mut engine);
    let journal = started.journal;
    let legs: BTreeMap<VolumeId, Arc<Leg<OsFileSystem>>> = legs
        .into_iter()
        .map(|(id, leg)| (id, Arc::new(leg)))
        .collect();
    let (driver, threads, outbox) =
        Driver::start(engine, legs, journal, metrics, &node.name, paths)
            .map_err(NodeError::Threads)?;
    let node = Arc::new(Node {
        name: node.name.clone(),
        site: node.site.clone(),
        cluster: config.cluster.name.clone(),
        nbd_address: node.nbd_listen,
        driver,
        volumes: Mutex::new(
            records
                .into_values()
                .map(|record| (record.name.clone(), record))
                .collect(),
        ),
        reconcile_turn: Mutex::new(()),
        moving: Mutex::new(BTreeSet::new()),
        taking_over: Mutex::new(BTreeSet::new()),
        migrations: Mutex::new(crate::migration::Migrations::default()),
        reconciled_index: std::sync::atomic::AtomicU64::new(0),
        lost_sites: Mutex::new(BTreeSet::new()),
        image_offer_wait: Duration::from_millis(config.tuning.image_offer_wait_ms),
        this: std::sync::OnceLock::new(),
        leases,
        control: std::sync::OnceLock::new(),
        store: Mutex::new(Some(store)),
        runtime: tokio::runtime::Handle::current(),
        layout,
        fs,
        started: Instant::now(),
        sites,
        peers: std::sync::OnceLock::new(),
        links,
    });
    let _ = node.this.set(Arc::downgrade(&node));
    Ok((node, threads, lock, outbox))
}

fn has_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

/// Removes leg files of volumes the metadata no longer has (deleted while
/// this node was away); files not named like legs are left alone.
fn remove_orphan_legs(legs: &Path, records: &BTreeMap<u32, VolumeRecord>) {
    let Ok(entries) = std::fs::read_dir(legs) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = crate::volumes::leg_id(&name) else {
            continue;
        };
        let live = records
            .get(&id)
            .is_some_and(|record| record.leg == entry.path());
        if !live {
            tracing::info!(leg = %entry.path().display(), "removing the leg of a deleted volume");
            if let Err(error) = std::fs::remove_file(entry.path()) {
                tracing::warn!(%error, leg = %entry.path().display(), "could not remove the leg");
            }
        }
    }
}

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

/// Makes the node follow every change of the metadata it applies, and
/// retries what could not be done yet (a deleted volume still busy) every
/// few seconds. Ends when `stop` turns true.
async fn follow_metadata(
    node: Arc<Node>,
    mut applied: watch::Receiver<crate::control::Applied>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let work = node.clone();
        let _ = tokio::task::spawn_blocking(move || work.reconcile_now()).await;
        tokio::select! {
            changed = applied.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
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
    if multi_site {
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
    let store = node
        .store
        .lock()
        .take()
        .expect("node invariant: the metadata store is taken once, here");
    if multi_site {
        // Before Raft starts: no batch is applied before the leases see it.
        let (metadata, index) = store.applied.borrow().clone();
        let leases =
            crate::control::lease::start_leases(&node, config, node_config, &metadata, index);
        let _ = node.leases.set(leases);
    }
    let control = Control::start(&node, config, node_config, store).await?;
    let _ = node.control.set(control.clone());
    let mut control_tasks = tokio::task::JoinSet::new();
    control_tasks.spawn(control.clone().seed(config.clone(), stop_peers.subscribe()));
    control_tasks.spawn(control.clone().log_leader_changes(stop_peers.subscribe()));
    control_tasks.spawn(control.clone().place_leadership(stop_peers.subscribe()));
    control_tasks.spawn(control.clone().probe(stop_peers.subscribe()));
    if let Some(leases) = node.leases.get() {
        control_tasks.spawn(
            leases
                .clone()
                .renew(Arc::downgrade(&node), stop_peers.subscribe()),
        );
        if leases.is_holder() {
            control_tasks.spawn(crate::failover::watch_owners(
                node.clone(),
                stop_peers.subscribe(),
            ));
        }
    }
    if multi_site {
        control_tasks.spawn(crate::follow::follow_workloads(
            node.clone(),
            config.tuning.follow(),
            stop_peers.subscribe(),
        ));
    }
    control_tasks.spawn(follow_metadata(
        node.clone(),
        control.watch_applied(),
        stop_peers.subscribe(),
    ));
    if multi_site {
        control_tasks.spawn(crate::fast_drain::finish_fast_drains(
            node.clone(),
            stop_peers.subscribe(),
        ));
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
    while control_tasks.join_next().await.is_some() {}
    control.shutdown().await;
    drop(control);
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
