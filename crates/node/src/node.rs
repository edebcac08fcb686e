//! One stretch node: recovery at start, volume management, NBD and admin
//! servers, clean shutdown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stretch_core::{Engine, RecoveredState, VolumeId, VolumeSpec};
use stretch_storage::{Catalog, CatalogError, Journal, Leg, OsFileSystem, VolumeRecord, recover};
use tokio::sync::watch;

use crate::config::{ClusterConfig, NodeConfig};
use crate::driver::{DataLayout, Driver, IoThreads};
use crate::links::LinkControl;
use crate::metrics::Metrics;

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
}

impl Node {
    pub(crate) fn volumes(&self) -> Vec<VolumeRecord> {
        self.catalog.lock().volumes().cloned().collect()
    }

    pub(crate) fn volume(&self, name: &str) -> Option<VolumeRecord> {
        self.catalog.lock().get(name).cloned()
    }

    /// Creates a volume: the leg first (durably), then the catalog entry, so
    /// a crash in between leaves at worst an unnamed leg file, never a
    /// volume without its leg.
    pub(crate) fn create_volume(
        &self,
        name: &str,
        size: u64,
        group: Option<&str>,
    ) -> Result<VolumeRecord, NodeError> {
        let mut catalog = self.catalog.lock();
        let group = group.unwrap_or(name);
        let leg_path = self.layout.legs().join(format!("{name}.raw"));
        let planned = catalog.plan_volume(name, size, group, leg_path.clone())?;
        let leg = Leg::create(self.fs.as_ref(), &leg_path, size)?;
        let record = catalog.add_volume(self.fs.as_ref(), name, size, group, leg_path)?;
        debug_assert_eq!(planned, record);
        self.driver
            .legs
            .write()
            .insert(record.volume_id(), Arc::new(leg));
        self.driver.with_engine(|engine| {
            engine.add_volume(
                record.volume_id(),
                VolumeSpec {
                    size,
                    group: record.group_id(),
                },
            );
        });
        self.driver.metrics.volumes.inc();
        tracing::info!(volume = name, size, group, "volume created");
        Ok(record)
    }

    /// Deletes a volume: the engine stops serving it, the catalog forgets
    /// it, then the leg file goes.
    pub(crate) fn delete_volume(&self, name: &str) -> Result<VolumeRecord, NodeError> {
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
) -> Result<(Arc<Node>, IoThreads, std::fs::File), NodeError> {
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
    journal.discard_replayed(&recovery.stale_segments)?;
    let mut engine = Engine::new(
        config.tuning.engine(),
        RecoveredState {
            next_position: recovery.next_position,
            next_seq: recovery.next_seq,
        },
    );
    let metrics = Metrics::new(&node.name, &node.site);
    for record in catalog.volumes() {
        engine.add_volume(
            record.volume_id(),
            VolumeSpec {
                size: record.size,
                group: record.group_id(),
            },
        );
        metrics.volumes.inc();
    }
    let legs: BTreeMap<VolumeId, Arc<Leg<OsFileSystem>>> = legs
        .into_iter()
        .map(|(id, leg)| (id, Arc::new(leg)))
        .collect();
    let (driver, threads) =
        Driver::start(engine, legs, journal, metrics, &node.name).map_err(NodeError::Threads)?;
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
    });
    Ok((node, threads, lock))
}

/// Longest a clean shutdown waits for dirty data to reach the legs.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one node until `shutdown` resolves, then drains: every acknowledged
/// write is journaled, applied to its leg and the legs synced before
/// returning (or, past the drain timeout, left in the journal for recovery).
pub async fn run_node(
    config: &ClusterConfig,
    node_name: &str,
    data_dir: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let links = Arc::new(LinkControl::from_config(config));
    run_node_with_links(config, node_name, data_dir, links, shutdown).await
}

/// [`run_node`] with the links between sites controlled by `links`, which
/// other nodes of this process may share.
pub async fn run_node_with_links(
    config: &ClusterConfig,
    node_name: &str,
    data_dir: &Path,
    links: Arc<LinkControl>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let node_config = config
        .node(node_name)
        .ok_or_else(|| NodeError::UnknownNode(node_name.to_string()))?;
    let (node, threads, lock) = open_node(config, node_config, data_dir)?;
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
        stopped.clone(),
    )
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
    let _ = stop.send(true);
    let _ = timer.await;
    admin.join();
    // The NBD and admin servers are gone, so this is the last handle:
    // dropping it closes the driver's queues and ends the I/O threads.
    drop(node);
    threads.join();
    drop(lock);
    tracing::info!(node = node_name, "node stopped");
    Ok(())
}

/// Runs every node of the config in this process until `shutdown`. A node
/// that fails stops the others, and its error is returned. The nodes share
/// one [`LinkControl`], so a link changed through any node's admin API
/// changes for all of them.
pub async fn run_cluster(
    config: &ClusterConfig,
    data_dir: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let (stop, stopped) = watch::channel(false);
    let (failure, mut failures) = tokio::sync::mpsc::channel::<()>(config.nodes.len());
    let links = Arc::new(LinkControl::from_config(config));
    let mut tasks = Vec::new();
    for node in &config.nodes {
        let links = links.clone();
        let config = config.clone();
        let name = node.name.clone();
        let data_dir = data_dir.to_path_buf();
        let mut stopped = stopped.clone();
        let failure = failure.clone();
        tasks.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            let result = run_node_with_links(&config, &name, &data_dir, links, shutdown).await;
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
