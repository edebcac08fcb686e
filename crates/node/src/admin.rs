//! The admin HTTP API (JSON) and `/metrics`, served over HTTP/1.1 (hyper)
//! on the node's tokio runtime.
//!
//! | method | path                  | answer                              |
//! |--------|-----------------------|-------------------------------------|
//! | GET    | /v1/status            | [`StatusInfo`]                      |
//! | GET    | /v1/volumes           | list of [`VolumeInfo`]              |
//! | POST   | /v1/volumes           | [`CreateVolume`] in, [`VolumeInfo`] |
//! | GET    | /v1/volumes/NAME      | [`VolumeInfo`]                      |
//! | DELETE | /v1/volumes/NAME      | [`VolumeInfo`] of the deleted one   |
//! | POST   | /v1/volumes/NAME/move | [`MoveVolume`] in, [`VolumeInfo`]   |
//! | POST   | /v1/volumes/NAME/follow | [`SetFollow`] in, [`VolumeInfo`]  |
//! | POST   | /v1/volumes/NAME/accept-loss | [`AcceptLoss`] in, [`LossAccepted`] |
//! | GET    | /v1/migrations        | list of `MigrationInfo`             |
//! | POST   | /v1/migrations        | [`StartMigration`] in, `MigrationInfo` |
//! | POST   | /v1/migrations/NAME/cancel | `MigrationInfo` (NAME: group or volume) |
//! | GET    | /v1/links             | list of [`LinkInfo`], every site pair |
//! | POST   | /v1/links/set         | [`SetLink`] in, [`LinkInfo`]        |
//! | POST   | /v1/links/cut         | [`LinkPair`] in, [`LinkInfo`]       |
//! | POST   | /v1/links/heal        | [`LinkPair`] in, [`LinkInfo`]       |
//! | GET    | /metrics              | Prometheus text format              |
//!
//! `NAME` is percent-encoded in the path (`vol%3Fx` is the volume `vol?x`).
//! Errors come back as `{"error": "..."}` with a 4xx/5xx status.
//!
//! Who may do what, checked in this order before a route runs:
//!
//! 1. **Host.** The `Host` header must be an IP literal, `localhost` or a
//!    name of `[admin] host_names` (else 421): a web page that rebinds its
//!    own DNS name to this address still sends its own name, so it can
//!    neither read nor change anything.
//! 2. **Credentials.** Every request but a `GET` (all of which only read)
//!    needs `Authorization: Bearer TOKEN`, the token of `admin.token` in the
//!    PKI directory (401 without or with a wrong one; 403 if the node has no
//!    token, which it then refuses every change). `GET`s are open unless
//!    `[admin] reads_need_token` is set: Prometheus and dashboards read
//!    without a secret, and a reader learns names and sizes, never data.
//! 3. **Content type.** A request with a body, and every `POST`, must say
//!    `Content-Type: application/json` (else 415). A browser sends a
//!    cross-origin request without asking first only with a form or text
//!    content type, so no web page can make one that gets this far.
//! 4. **Limits.** Request headers must arrive within 10 s and hold at most
//!    16 KiB, a body within 10 s and at most 64 KiB, and a client must read
//!    its answer (no write may stall 10 s); at most 64 connections are
//!    served at once. A slow or hostile client costs a task and a socket
//!    for a bounded time, never the API.
//!
//! Requests run concurrently; node work runs on the blocking pool, so a
//! create waiting for an unreachable site does not hold up a status or a
//! link change. Volume changes (create, delete, move) run one at a time, as
//! the catalog and the ownership hand-over expect.
//!
//! The link routes change the [`LinkControl`] of this process only: under
//! `stretch up` every node shares it, under `stretch node` each node
//! shapes only what it sends, and must be told on its own. Nothing is
//! forwarded to other nodes.

mod token;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use stretch_storage::{CatalogError, VolumeRecord};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub use self::token::{ADMIN_TOKEN_FILE, AdminToken, TokenError, ensure_admin_token};
use crate::links::{LinkChange, LinkControl, LinkError, LinkInfo};
use crate::migration::StartMigration;
use crate::node::{Node, NodeError};

/// Largest request body accepted: the biggest request is a few hundred
/// bytes of JSON.
const BODY_BYTES_MAX: usize = 64 << 10;
/// Largest request head (request line and headers).
const HEADER_BYTES_MAX: usize = 16 << 10;
/// Longest a client may take to send a request head, and longest an idle
/// kept-alive connection stays open.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an answer may wait for the client to read it.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen backlog. Bounds the
/// sockets and memory the API can take from the node (which shares its
/// file descriptors with NBD clients and legs).
const CONNECTIONS_MAX: usize = 64;
/// At shutdown, how long requests in flight may take to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// At shutdown, how often a connection is checked for a request in flight
/// (and how long an answer already handled has to be written).
const SHUTDOWN_POLL: Duration = Duration::from_millis(200);

/// The `[admin]` table of the cluster config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Names the `Host` header may carry besides IP literals and
    /// `localhost` (without a port), e.g. the DNS name Prometheus scrapes.
    pub host_names: Vec<String>,
    /// Whether reads (`GET`: `/metrics`, status, volumes, links) need the
    /// admin token too.
    pub reads_need_token: bool,
}

impl AdminConfig {
    /// What is wrong with the table, for the config's error message.
    pub(crate) fn validate(&self) -> Result<(), String> {
        for name in &self.host_names {
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.'));
            if !valid {
                return Err(format!(
                    "[admin] host_names: {name:?} is not a host name (letters, digits, '-' and '.', no port)"
                ));
            }
        }
        Ok(())
    }
}

/// Why a node's admin API cannot start as configured.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "admin_listen {address} is not a loopback address and there is no admin token {file}: \
         create one with `stretch init --dir {dir}` (or `stretch up`), or listen on 127.0.0.1",
        file = .path.display(),
        dir = .path.parent().unwrap_or(Path::new(".")).display()
    )]
    NoTokenOffLoopback { address: SocketAddr, path: PathBuf },
    #[error(
        "[admin] reads_need_token is set and there is no admin token {file}: \
         create one with `stretch init --dir {dir}`",
        file = .path.display(),
        dir = .path.parent().unwrap_or(Path::new(".")).display()
    )]
    NoTokenForReads { path: PathBuf },
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// The token a node checks requests against, read once at start from
/// `pki_dir`. Without one, the node refuses every change; it may then
/// listen on loopback only, so nothing beyond this machine can even read.
pub(crate) fn load_token(
    pki_dir: &Path,
    address: SocketAddr,
    config: &AdminConfig,
) -> Result<Option<AdminToken>, AdminError> {
    let path = pki_dir.join(ADMIN_TOKEN_FILE);
    let token = AdminToken::load_for_node(&path)?;
    if token.is_none() {
        if !address.ip().is_loopback() {
            return Err(AdminError::NoTokenOffLoopback { address, path });
        }
        if config.reads_need_token {
            return Err(AdminError::NoTokenForReads { path });
        }
        tracing::warn!(
            path = %path.display(),
            "no admin token: the admin API refuses every change until `stretch init` creates one and the node restarts"
        );
    }
    Ok(token)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size: u64,
    #[serde(default)]
    pub group: Option<String>,
    /// The site accepting its writes; the site of the node asked, if none.
    #[serde(default)]
    pub owner: Option<String>,
    /// `async` (default), `flush-sync` or `sync`.
    #[serde(default)]
    pub mode: Option<String>,
    /// `manual` (default) or `auto`: whether another site takes the volume
    /// over by itself when its owner site is lost.
    #[serde(default)]
    pub failover: Option<String>,
}

/// `POST /v1/volumes/NAME/promote`: fail the volume's group over to this
/// node's site, accepting the loss of what its owner acknowledged after
/// this site's image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteVolume {
    pub site: String,
    /// Must be true: the operator accepts that writes are lost.
    pub accept_data_loss: bool,
}

/// `POST /v1/volumes/NAME/accept-loss`: end the fast migration's copy of
/// the volume's group at this node (its target) without the regions its
/// lost source never sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptLoss {
    /// Must be true: the operator accepts that writes are lost.
    pub accept_data_loss: bool,
}

/// The answer to [`AcceptLoss`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossAccepted {
    pub volume: String,
    /// Regions (of `region_bytes` each) the target never copied: they keep
    /// its older image.
    pub regions_not_copied: u64,
    pub region_bytes: u64,
}

/// The newest failover of a volume's group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverInfo {
    pub from: String,
    pub to: String,
    pub epoch: u64,
    /// The last delta the new owner held: what the old owner acknowledged
    /// after it was lost (counted there when it returns).
    pub after_delta: u64,
    pub automatic: bool,
}

/// This node's ownership lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub valid: bool,
    /// Milliseconds until it runs out unless renewed (0 if not valid).
    pub expires_in_ms: u64,
    /// Lease timing, for the operator: `lease_ms`, `renew_ms`, `drift_ppm`,
    /// `margin_ms`.
    pub lease_ms: u64,
    pub renew_ms: u64,
    pub drift_ppm: u64,
    pub margin_ms: u64,
}

/// See [`VolumeInfo::read_leases`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadLeaseInfo {
    pub local_strict_reads: u64,
    pub owner_strict_reads: u64,
    pub revocations: u64,
    pub writes_waited: u64,
    pub write_wait_ms: u64,
}

/// A volume that accepts no writes now, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspendedVolume {
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub id: u32,
    pub size: u64,
    pub group: String,
    pub leg: String,
    /// Where a client connects, e.g. `nbd://127.0.0.1:10809/NAME`.
    pub export: String,
    /// The site that accepts the volume's writes.
    #[serde(default)]
    pub owner: String,
    /// Raised by every change of owner.
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub mode: String,
    /// `auto` or `manual` (see [`CreateVolume::failover`]).
    #[serde(default)]
    pub failover: String,
    /// `auto` if the group's ownership follows its workload, else `off`.
    #[serde(default)]
    pub follow: String,
    /// At the owner: the requests its group served since this site began
    /// owning it, by the site they came from (where the workload runs).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests_by_site: BTreeMap<String, u64>,
    /// Read leases at this site since it started: strict reads served here
    /// under a lease or asked of the owner (at a site that does not own the
    /// volume), and as owner the revocations and the writes that waited.
    #[serde(default)]
    pub read_leases: ReadLeaseInfo,
    /// Why the volume accepts no writes now, if it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<FailoverInfo>,
    /// Per other site: how far behind it is (filled at the owner).
    #[serde(default)]
    pub replicas: Vec<ReplicaInfo>,
    /// Sites that did not confirm a create or delete in time (they apply it
    /// from the metadata when they can).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unconfirmed_sites: Vec<String>,
}

/// `POST /v1/volumes/NAME/move`: hand the volume's group to another site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveVolume {
    pub to: String,
}

/// `POST /v1/volumes/NAME/follow`: whether the ownership of the volume's
/// group follows its workload (`auto` or `off`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetFollow {
    pub follow: String,
}

/// How far one other site is behind on a volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub site: String,
    pub unapplied_deltas: u64,
    pub unapplied_bytes: u64,
    /// Age of the oldest delta the site has not journaled (the live RPO).
    pub lag_seconds: f64,
    /// 1 MiB regions still to copy to it (resync progress).
    pub resync_regions_left: u64,
}

/// One other site as this node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub site: String,
    pub connected: bool,
    pub rtt_ms: Option<f64>,
}

/// `POST /v1/links/set`: the settings given change, the others stay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetLink {
    pub a: String,
    pub b: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<u64>,
    /// 0 removes the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_pct: Option<f64>,
}

impl SetLink {
    fn change(&self) -> LinkChange {
        LinkChange {
            delay_ms: self.delay_ms,
            jitter_ms: self.jitter_ms,
            bandwidth_mbit: self.bandwidth_mbit,
            loss_pct: self.loss_pct,
        }
    }
}

/// `POST /v1/links/cut` and `/v1/links/heal`: the two sites of a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkPair {
    pub a: String,
    pub b: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub cluster: String,
    pub node: String,
    pub site: String,
    /// The NBD listener; `None` at a witness site.
    pub nbd: Option<String>,
    pub uptime_seconds: u64,
    pub volumes: u64,
    pub dirty_bytes: u64,
    pub cache_clean_bytes: u64,
    pub cache_bytes_max: u64,
    pub open_deltas: u64,
    pub unapplied_deltas: u64,
    pub journal_bytes: u64,
    pub throttled_writes: u64,
    /// Why the node stopped taking writes, if it did.
    pub failure: Option<String>,
    /// Delta bytes kept until every other site applied them.
    #[serde(default)]
    pub backlog_bytes: u64,
    /// 1 MiB regions still to copy to other sites (resync progress).
    #[serde(default)]
    pub resync_regions_left: u64,
    #[serde(default)]
    pub peers: Vec<PeerInfo>,
    /// The metadata cluster (Raft) as this node sees it.
    #[serde(default)]
    pub metadata: Option<crate::control::MetadataStatus>,
    /// This node's ownership lease (data nodes of multi-site clusters).
    #[serde(default)]
    pub lease: Option<LeaseInfo>,
    /// Owner sites holding no lease at the last check.
    #[serde(default)]
    pub lost_sites: Vec<String>,
    #[serde(default)]
    pub suspended_volumes: Vec<SuspendedVolume>,
    /// Requests held now because this site holds no lease, and those that
    /// failed after waiting `suspend_hold_ms`.
    #[serde(default)]
    pub suspended_requests: u64,
    #[serde(default)]
    pub suspended_failed_total: u64,
    /// Deltas (and bytes) this site acknowledged as owner after the image
    /// another site took over from: lost to the cluster.
    #[serde(default)]
    pub failover_lost_deltas: u64,
    #[serde(default)]
    pub failover_lost_bytes: u64,
}

/// The running admin API: a task on the node's runtime.
#[derive(Debug)]
pub(crate) struct AdminServer {
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// Waits until the listener is closed and every connection ended (the
    /// stop signal given to [`start`] ends them), so that no request holds
    /// the node any longer.
    pub async fn join(self) {
        if let Err(error) = self.task.await {
            tracing::error!(%error, "admin API task failed");
        }
    }
}

/// Binds `address` and serves the admin API until `stopped` turns true.
pub(crate) async fn start(
    node: Arc<Node>,
    links: Arc<LinkControl>,
    address: SocketAddr,
    gate: Gate,
    stopped: watch::Receiver<bool>,
) -> std::io::Result<AdminServer> {
    let listener = TcpListener::bind(address).await?;
    let shared = Arc::new(Shared {
        node,
        links,
        gate,
        volume_changes: Arc::new(tokio::sync::Mutex::new(())),
    });
    let task = tokio::spawn(accept_loop(listener, shared, stopped));
    Ok(AdminServer { task })
}

/// What every request of one node's API shares.
#[derive(Debug)]
struct Shared {
    node: Arc<Node>,
    links: Arc<LinkControl>,
    gate: Gate,
    /// Held by the volume change (create, delete, move) running now.
    volume_changes: Arc<tokio::sync::Mutex<()>>,
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // A slot first, then the connection: past the bound, connections
        // wait in the kernel's backlog instead of costing a task each.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = stop_signal(&mut stopped) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, typically: wait rather than spin.
                    tracing::warn!(%error, "admin API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop_signal(&mut stopped) => break,
        };
        let shared = shared.clone();
        let stopped = stopped.clone();
        connections.spawn(async move {
            serve_connection(shared, stream, peer, stopped).await;
            drop(slot);
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Counts a request as handled until dropped, even if its client goes
/// away and hyper drops the request half-way.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::SeqCst);
        Busy(count)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Resolves once the node is told to stop (or the sender is gone).
async fn stop_signal(stopped: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here: holding it across an
    // await would make the task not `Send`.
    let _ = stopped.wait_for(|stop| *stop).await;
}

async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    mut stopped: watch::Receiver<bool>,
) {
    let io = TokioIo::new(StallLimited::new(stream, WRITE_STALL_TIMEOUT));
    // Requests of this connection being handled now: at shutdown, a
    // connection with none is closed at once rather than waited for (a
    // client idling or sending half a head would hold the node's exit).
    let busy = Arc::new(AtomicUsize::new(0));
    let in_service = busy.clone();
    let service = hyper::service::service_fn(move |request| {
        let shared = shared.clone();
        let busy = in_service.clone();
        async move {
            let _busy = Busy::new(busy);
            Ok::<_, Infallible>(shared.handle(request).await)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(HEADER_BYTES_MAX)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stop_signal(&mut stopped) => {
            // Finish the request in flight, if any, then close.
            connection.as_mut().graceful_shutdown();
            let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
            loop {
                match tokio::time::timeout(SHUTDOWN_POLL, connection.as_mut()).await {
                    Ok(result) => break result,
                    Err(_) if busy.load(Ordering::SeqCst) == 0 => return,
                    Err(_) if tokio::time::Instant::now() >= deadline => {
                        tracing::warn!(%peer, "an admin request did not finish at shutdown");
                        return;
                    }
                    Err(_) => {}
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "admin connection ended");
    }
}

impl Shared {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let reply = match self.gate.admit(&parts) {
            Err(reply) => reply,
            Ok(route) => match read_body(body, route.takes_body()).await {
                Err(reply) => reply,
                Ok(body) => self.run(route, body).await,
            },
        };
        tracing::debug!(
            method = %parts.method,
            path = parts.uri.path(),
            status = reply.status,
            "admin request"
        );
        reply.into_response()
    }

    async fn run(&self, route: Route, body: Bytes) -> Reply {
        match route {
            // In memory, under a short lock: no need for another thread.
            Route::ListLinks | Route::SetLink | Route::CutLink | Route::HealLink => {
                link_route(&self.links, &route, &body)
            }
            Route::CreateVolume
            | Route::DeleteVolume(_)
            | Route::MoveVolume(_)
            | Route::PromoteVolume(_)
            | Route::AcceptLoss(_)
            | Route::FollowVolume(_)
            | Route::StartMigration => {
                // Waiting here is cancelled if the client goes away; once
                // the change runs, the turn is held until it is done, even
                // if the client left meanwhile.
                let turn = self.volume_changes.clone().lock_owned().await;
                let node = self.node.clone();
                blocking(move || {
                    let _turn = turn;
                    node_route(&node, route, &body)
                })
                .await
            }
            // A cancel must not wait behind a change that holds the turn
            // (a move waits up to 30 s).
            Route::Metrics
            | Route::Status
            | Route::ListVolumes
            | Route::ShowVolume(_)
            | Route::ListMigrations
            | Route::CancelMigration(_) => {
                let node = self.node.clone();
                blocking(move || node_route(&node, route, &body)).await
            }
        }
    }
}

/// Runs node work on the blocking pool: it takes locks the I/O threads
/// hold, and a create or move waits on other sites for seconds, which
/// must not stall the runtime's workers (NBD and the links run there).
async fn blocking(work: impl FnOnce() -> Reply + Send + 'static) -> Reply {
    match tokio::task::spawn_blocking(work).await {
        Ok(reply) => reply,
        Err(error) => Reply::error(500, format!("the request failed: {error}")),
    }
}

/// The body, read with the time and size limits; empty for a route that
/// takes none (a body sent anyway is left unread, and hyper then closes
/// the connection after answering).
async fn read_body(body: Incoming, wanted: bool) -> Result<Bytes, Reply> {
    if !wanted {
        return Ok(Bytes::new());
    }
    let read = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        Limited::new(body, BODY_BYTES_MAX).collect(),
    );
    match read.await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => Err(Reply::error(
            413,
            format!("request body over {BODY_BYTES_MAX} bytes"),
        )),
        Ok(Err(error)) => Err(Reply::error(
            400,
            format!("could not read the request body: {error}"),
        )),
        Err(_) => Err(Reply::error(
            408,
            format!(
                "the request body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        )),
    }
}

// ---------------------------------------------------------------------------
// Admission: Host, credentials, route, content type

/// The checks every request passes before its route runs.
#[derive(Debug)]
pub(crate) struct Gate {
    token: Option<AdminToken>,
    host_names: Vec<String>,
    reads_need_token: bool,
}

impl Gate {
    pub(crate) fn new(token: Option<AdminToken>, config: &AdminConfig) -> Gate {
        Gate {
            token,
            host_names: config.host_names.clone(),
            reads_need_token: config.reads_need_token,
        }
    }

    /// The route to run, or the refusal to send.
    fn admit(&self, parts: &Parts) -> Result<Route, Reply> {
        check_host(&parts.headers, &self.host_names)?;
        self.check_credentials(&parts.method, &parts.headers)?;
        let route = parse_route(&parts.method, parts.uri.path())?;
        check_body_headers(&parts.headers, route.takes_body())?;
        Ok(route)
    }

    /// By method rather than by route, so that any route added later that
    /// changes something is covered without being listed here, and a
    /// client without the token learns nothing about which routes exist.
    fn check_credentials(&self, method: &Method, headers: &HeaderMap) -> Result<(), Reply> {
        if method == Method::GET && !self.reads_need_token {
            return Ok(());
        }
        let Some(token) = &self.token else {
            return Err(Reply::error(
                403,
                format!(
                    "this node has no admin token ({ADMIN_TOKEN_FILE} in its PKI directory), \
                     so it refuses every change: create one with `stretch init` and restart the node"
                ),
            ));
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .map(|value| value.as_bytes())
            .and_then(bearer_token);
        match presented {
            None => Err(Reply::error(
                401,
                "this request needs the admin token: send `Authorization: Bearer TOKEN` \
                 (the CLI reads --token-file, STRETCH_TOKEN_FILE or stretch-data/pki/admin.token)",
            )
            .with_challenge("Bearer realm=\"stretch\"")),
            Some(presented) if token.matches(presented) => Ok(()),
            Some(_) => Err(
                Reply::error(401, "the admin token does not match this node's")
                    .with_challenge("Bearer realm=\"stretch\", error=\"invalid_token\""),
            ),
        }
    }
}

/// The token of an `Authorization: Bearer TOKEN` value.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|byte| *byte == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Refuses a request whose `Host` is not an IP literal, `localhost` or a
/// configured name: what a DNS-rebinding page sends is its own name.
fn check_host(headers: &HeaderMap, names: &[String]) -> Result<(), Reply> {
    let Some(host) = headers.get(header::HOST) else {
        return Err(Reply::error(421, "the request has no Host header"));
    };
    let host = host.to_str().unwrap_or_default();
    if host_allowed(host, names) {
        return Ok(());
    }
    Err(Reply::error(
        421,
        format!(
            "Host {host:?} is not served here: use an IP address or localhost, \
             or add the name to [admin] host_names in the cluster config"
        ),
    ))
}

fn host_allowed(host: &str, names: &[String]) -> bool {
    let is_port = |port: &str| {
        !port.is_empty() && port.len() <= 5 && port.bytes().all(|byte| byte.is_ascii_digit())
    };
    if let Some(rest) = host.strip_prefix('[') {
        let Some((literal, after)) = rest.split_once(']') else {
            return false;
        };
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(is_port);
        return port_ok && literal.parse::<Ipv6Addr>().is_ok();
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if is_port(port) => name,
        Some(_) => return false,
        None => host,
    };
    if name.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    // A fully qualified name may end with a dot.
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && (name.eq_ignore_ascii_case("localhost")
            || names.iter().any(|allowed| {
                allowed
                    .strip_suffix('.')
                    .unwrap_or(allowed)
                    .eq_ignore_ascii_case(name)
            }))
}

/// Refuses a body that is not declared JSON (a browser sends text/plain
/// and form bodies cross-origin without asking), and one declared larger
/// than the limit before reading any of it.
fn check_body_headers(headers: &HeaderMap, route_takes_body: bool) -> Result<(), Reply> {
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse::<u64>().ok());
    let has_body =
        length.is_some_and(|length| length > 0) || headers.contains_key(header::TRANSFER_ENCODING);
    if route_takes_body || has_body {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        let media_type = content_type
            .as_deref()
            .and_then(|value| value.split(';').next())
            .map(str::trim);
        if !media_type.is_some_and(|media| media.eq_ignore_ascii_case("application/json")) {
            let got = match &content_type {
                Some(value) => format!("got {value:?}"),
                None => "got none".to_string(),
            };
            return Err(Reply::error(
                415,
                format!("send the body as JSON with `Content-Type: application/json` ({got})"),
            ));
        }
    }
    if length.is_some_and(|length| length > BODY_BYTES_MAX as u64) {
        return Err(Reply::error(
            413,
            format!("request body over {BODY_BYTES_MAX} bytes"),
        ));
    }
    Ok(())
}

/// What a request asks for, its volume name decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Metrics,
    Status,
    ListVolumes,
    CreateVolume,
    ShowVolume(String),
    DeleteVolume(String),
    MoveVolume(String),
    PromoteVolume(String),
    AcceptLoss(String),
    FollowVolume(String),
    ListMigrations,
    StartMigration,
    CancelMigration(String),
    ListLinks,
    SetLink,
    CutLink,
    HealLink,
}

impl Route {
    fn takes_body(&self) -> bool {
        matches!(
            self,
            Route::CreateVolume
                | Route::MoveVolume(_)
                | Route::PromoteVolume(_)
                | Route::AcceptLoss(_)
                | Route::FollowVolume(_)
                | Route::StartMigration
                | Route::SetLink
                | Route::CutLink
                | Route::HealLink
        )
    }
}

/// The route of `method path`, splitting the path before decoding it, so
/// that an encoded `/` or `?` stays part of the volume name.
fn parse_route(method: &Method, path: &str) -> Result<Route, Reply> {
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let name = |segment: &str| {
        percent_encoding::percent_decode_str(segment)
            .decode_utf8()
            .map(|name| name.into_owned())
            .map_err(|_| Reply::error(400, format!("{segment:?} is not a UTF-8 volume name")))
    };
    let route = match (method, segments.as_slice()) {
        (&Method::GET, ["metrics"]) => Route::Metrics,
        (&Method::GET, ["v1", "status"]) => Route::Status,
        (&Method::GET, ["v1", "volumes"]) => Route::ListVolumes,
        (&Method::POST, ["v1", "volumes"]) => Route::CreateVolume,
        (&Method::GET, ["v1", "volumes", volume]) => Route::ShowVolume(name(volume)?),
        (&Method::DELETE, ["v1", "volumes", volume]) => Route::DeleteVolume(name(volume)?),
        (&Method::POST, ["v1", "volumes", volume, "move"]) => Route::MoveVolume(name(volume)?),
        (&Method::POST, ["v1", "volumes", volume, "promote"]) => {
            Route::PromoteVolume(name(volume)?)
        }
        (&Method::POST, ["v1", "volumes", volume, "follow"]) => Route::FollowVolume(name(volume)?),
        (&Method::POST, ["v1", "volumes", volume, "accept-loss"]) => {
            Route::AcceptLoss(name(volume)?)
        }
        (&Method::GET, ["v1", "migrations"]) => Route::ListMigrations,
        (&Method::POST, ["v1", "migrations"]) => Route::StartMigration,
        (&Method::POST, ["v1", "migrations", group, "cancel"]) => {
            Route::CancelMigration(name(group)?)
        }
        (&Method::GET, ["v1", "links"]) => Route::ListLinks,
        (&Method::POST, ["v1", "links", "set"]) => Route::SetLink,
        (&Method::POST, ["v1", "links", "cut"]) => Route::CutLink,
        (&Method::POST, ["v1", "links", "heal"]) => Route::HealLink,
        _ => return Err(Reply::error(404, format!("no route for {method} {path}"))),
    };
    Ok(route)
}

// ---------------------------------------------------------------------------
// Answers

#[derive(Debug)]
struct Reply {
    status: u16,
    body: String,
    content_type: &'static str,
    /// `WWW-Authenticate` of a 401.
    challenge: Option<&'static str>,
}

impl Reply {
    fn json<T: Serialize>(status: u16, value: &T) -> Reply {
        Reply {
            status,
            body: serde_json::to_string_pretty(value)
                .expect("admin serialisation invariant: plain data serialises"),
            content_type: "application/json",
            challenge: None,
        }
    }

    fn error(status: u16, message: impl std::fmt::Display) -> Reply {
        Reply::json(status, &serde_json::json!({ "error": message.to_string() }))
    }

    fn with_challenge(mut self, challenge: &'static str) -> Reply {
        self.challenge = Some(challenge);
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        // Live state, never to be cached; and never to be sniffed into
        // something a browser would run.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        if let Some(challenge) = self.challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

/// A socket whose writes fail once they made no progress for `limit`: a
/// client that stops reading its answer cannot hold a connection slot for
/// ever. Reads are bounded by the header and body timeouts.
#[derive(Debug)]
struct StallLimited {
    stream: TcpStream,
    limit: Duration,
    /// Running while a write waits for the client.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl StallLimited {
    fn new(stream: TcpStream, limit: Duration) -> StallLimited {
        StallLimited {
            stream,
            limit,
            stall: None,
        }
    }

    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if result.is_ready() {
            self.stall = None;
            return result;
        }
        let limit = self.limit;
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if stall.as_mut().poll(cx).is_ready() {
            self.stall = None;
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading its answer",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for StallLimited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallLimited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.watch(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.stream).poll_flush(cx);
        self.watch(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.watch(cx, result)
    }
}

// ---------------------------------------------------------------------------
// Routes

fn node_route(node: &Arc<Node>, route: Route, body: &[u8]) -> Reply {
    match route {
        Route::Metrics => {
            node.refresh_replication_metrics();
            let stats = node.driver.engine.lock().stats();
            Reply {
                status: 200,
                body: node.driver.metrics.render(&stats),
                content_type: "text/plain; version=0.0.4",
                challenge: None,
            }
        }
        Route::Status => Reply::json(200, &status(node)),
        Route::ListVolumes => {
            let volumes: Vec<VolumeInfo> = node
                .volumes()
                .iter()
                .map(|record| volume_info(node, record))
                .collect();
            Reply::json(200, &volumes)
        }
        Route::CreateVolume if node.nbd_address.is_none() => Reply::error(
            409,
            format!(
                "node {:?} is at witness site {:?}, which holds no volumes",
                node.name, node.site
            ),
        ),
        Route::CreateVolume => create_volume(node, body),
        Route::MoveVolume(name) => {
            let request: MoveVolume = match serde_json::from_slice(body) {
                Ok(request) => request,
                Err(error) => return Reply::error(400, format!("bad move request: {error}")),
            };
            match node.move_volume(&name, &request.to) {
                Ok(record) => Reply::json(200, &volume_info(node, &record)),
                Err(error) => node_error(error),
            }
        }
        Route::PromoteVolume(name) => {
            let request: PromoteVolume = match serde_json::from_slice(body) {
                Ok(request) => request,
                Err(error) => return Reply::error(400, format!("bad promote request: {error}")),
            };
            if !request.accept_data_loss {
                return Reply::error(
                    400,
                    "a promotion loses the writes the owner acknowledged after this site's image: \
                     set accept_data_loss (stretch volume promote --accept-data-loss)",
                );
            }
            match node.promote_volume(&name, &request.site) {
                Ok(record) => Reply::json(200, &volume_info(node, &record)),
                Err(error) => node_error(error),
            }
        }
        Route::AcceptLoss(name) => {
            let request: AcceptLoss = match serde_json::from_slice(body) {
                Ok(request) => request,
                Err(error) => {
                    return Reply::error(400, format!("bad accept-loss request: {error}"));
                }
            };
            if !request.accept_data_loss {
                return Reply::error(
                    400,
                    "ending the copy loses the writes the source acknowledged in the regions not \
                     copied yet: set accept_data_loss (stretch volume accept-loss --accept-data-loss)",
                );
            }
            match node.accept_drain_loss(&name) {
                Ok(regions) => Reply::json(
                    200,
                    &LossAccepted {
                        volume: name,
                        regions_not_copied: regions,
                        region_bytes: stretch_core::REGION_BLOCKS * stretch_core::BLOCK_SIZE as u64,
                    },
                ),
                Err(error) => node_error(error),
            }
        }
        Route::FollowVolume(name) => {
            let request: SetFollow = match serde_json::from_slice(body) {
                Ok(request) => request,
                Err(error) => return Reply::error(400, format!("bad follow request: {error}")),
            };
            let follow = match request.follow.as_str() {
                "auto" => stretch_metadata::Follow::Auto,
                "off" => stretch_metadata::Follow::Off,
                other => {
                    return Reply::error(400, format!("follow must be auto or off, not {other:?}"));
                }
            };
            match node.set_follow(&name, follow) {
                Ok(record) => Reply::json(200, &volume_info(node, &record)),
                Err(error) => node_error(error),
            }
        }
        Route::ListMigrations => Reply::json(200, &node.migrations()),
        Route::StartMigration => {
            let request: StartMigration = match serde_json::from_slice(body) {
                Ok(request) => request,
                Err(error) => return Reply::error(400, format!("bad migration request: {error}")),
            };
            match node.start_migration(&request) {
                Ok(info) => Reply::json(200, &info),
                Err(error) => node_error(error),
            }
        }
        Route::CancelMigration(name) => match node.cancel_migration(&name) {
            Ok(info) => Reply::json(200, &info),
            Err(error) => node_error(error),
        },
        Route::ShowVolume(name) => match node.volume(&name) {
            Some(record) => Reply::json(200, &volume_info(node, &record)),
            None => Reply::error(404, format!("no volume named {name:?}")),
        },
        Route::DeleteVolume(name) => match node.delete_volume(&name) {
            Ok(record) => Reply::json(200, &volume_info(node, &record)),
            Err(error) => node_error(error),
        },
        Route::ListLinks | Route::SetLink | Route::CutLink | Route::HealLink => {
            link_route(&node.links, &route, body)
        }
    }
}

fn create_volume(node: &Arc<Node>, body: &[u8]) -> Reply {
    let create: CreateVolume = match serde_json::from_slice(body) {
        Ok(create) => create,
        Err(error) => return Reply::error(400, format!("bad volume request: {error}")),
    };
    let mode = match create.mode.as_deref() {
        None => stretch_core::Mode::Async,
        Some(text) => match stretch_core::Mode::parse(text) {
            Some(mode) => mode,
            None => {
                return Reply::error(
                    400,
                    format!("unknown mode {text:?}: use async, flush-sync or sync"),
                );
            }
        },
    };
    let failover = match create.failover.as_deref() {
        None | Some("manual") => stretch_metadata::Failover::Manual,
        Some("auto") => stretch_metadata::Failover::Auto,
        Some(text) => {
            return Reply::error(
                400,
                format!("unknown failover policy {text:?}: use auto or manual"),
            );
        }
    };
    let created = node.create_volume(
        &create.name,
        create.size,
        create.group.as_deref(),
        create.owner.as_deref(),
        mode,
        failover,
    );
    match created {
        Ok((record, unconfirmed)) => {
            let mut info = volume_info(node, &record);
            info.unconfirmed_sites = unconfirmed;
            Reply::json(201, &info)
        }
        Err(error) => node_error(error),
    }
}

/// The `/v1/links` routes: changes to this process's link shaper.
fn link_route(links: &LinkControl, route: &Route, body: &[u8]) -> Reply {
    let result = match route {
        Route::SetLink => match serde_json::from_slice::<SetLink>(body) {
            Ok(set) if set.change() == LinkChange::default() => {
                return Reply::error(
                    400,
                    "nothing to change: give delay_ms, jitter_ms, bandwidth_mbit or loss_pct",
                );
            }
            Ok(set) => links.set(&set.a, &set.b, &set.change()),
            Err(error) => return Reply::error(400, format!("bad link request: {error}")),
        },
        Route::CutLink | Route::HealLink => match serde_json::from_slice::<LinkPair>(body) {
            Ok(pair) if *route == Route::CutLink => links.cut(&pair.a, &pair.b),
            Ok(pair) => links.heal(&pair.a, &pair.b),
            Err(error) => return Reply::error(400, format!("bad link request: {error}")),
        },
        Route::ListLinks => return Reply::json(200, &links.list()),
        other => return Reply::error(404, format!("{other:?} is not a link route")),
    };
    link_reply(result)
}

fn link_reply(result: Result<LinkInfo, LinkError>) -> Reply {
    match result {
        Ok(info) => Reply::json(200, &info),
        Err(error @ LinkError::UnknownSite { .. }) => Reply::error(404, error),
        Err(error) => Reply::error(400, error),
    }
}

fn node_error(error: NodeError) -> Reply {
    let status = match &error {
        NodeError::Busy(_) => 409,
        NodeError::Catalog(CatalogError::NoSuchVolume(_)) => 404,
        NodeError::Catalog(CatalogError::InvalidName { .. } | CatalogError::InvalidSize { .. })
        | NodeError::UnknownSite(_) => 400,
        NodeError::NotOwner { .. }
        | NodeError::Move { .. }
        | NodeError::Promote { .. }
        | NodeError::Failover { .. } => 409,
        NodeError::Catalog(CatalogError::Conflict { .. }) | NodeError::Witness => 409,
        NodeError::Control(crate::control::ControlError::Refused(error)) => {
            crate::volumes::command_status(error)
        }
        NodeError::Control(
            crate::control::ControlError::NoQuorum { .. } | crate::control::ControlError::Stopping,
        ) => 503,
        _ => 500,
    };
    Reply::error(status, error)
}

fn volume_info(node: &Node, record: &VolumeRecord) -> VolumeInfo {
    VolumeInfo {
        name: record.name.clone(),
        id: record.id,
        size: record.size,
        group: record.group.clone(),
        leg: record.leg.display().to_string(),
        export: node
            .nbd_address
            .map(|address| format!("nbd://{address}/{}", record.name))
            .unwrap_or_default(),
        owner: node.owner_name(record),
        epoch: record.epoch,
        mode: record.mode.clone(),
        failover: node.failover_policy(record).to_string(),
        follow: node.follow_policy(record).to_string(),
        requests_by_site: node.requests_by_site(record),
        read_leases: {
            let counters = node
                .driver
                .engine
                .lock()
                .read_lease_counters(stretch_core::VolumeId(record.id));
            ReadLeaseInfo {
                local_strict_reads: counters.local_strict_reads_total,
                owner_strict_reads: counters.remote_strict_reads_total,
                revocations: counters.revocations_total,
                writes_waited: counters.writes_waited_total,
                write_wait_ms: counters.write_wait_nanos_total / 1_000_000,
            }
        },
        suspended: node.suspension(record),
        last_failover: node.last_failover(record),
        replicas: node
            .volume_lags()
            .into_iter()
            .filter(|lag| lag.volume == record.name)
            .map(|lag| ReplicaInfo {
                site: lag.peer,
                unapplied_deltas: lag.unapplied_deltas,
                unapplied_bytes: lag.unapplied_bytes,
                lag_seconds: lag.lag_seconds,
                resync_regions_left: lag.resync_regions_left,
            })
            .collect(),
        unconfirmed_sites: Vec::new(),
    }
}

fn status(node: &Node) -> StatusInfo {
    let (stats, failure, cache_bytes_max) = {
        let engine = node.driver.engine.lock();
        (
            engine.stats(),
            engine.failure().map(str::to_string),
            engine.config().cache_bytes_max,
        )
    };
    // Taken apart from the literal below: a guard taken inside it would
    // live until its end, while `suspension` locks the same set.
    let lost_sites: Vec<String> = node.lost_sites.lock().iter().cloned().collect();
    StatusInfo {
        cluster: node.cluster.clone(),
        node: node.name.clone(),
        site: node.site.clone(),
        nbd: node.nbd_address.map(|address| address.to_string()),
        uptime_seconds: node.started.elapsed().as_secs(),
        volumes: node.volumes().len() as u64,
        dirty_bytes: stats.dirty_bytes,
        cache_clean_bytes: stats.clean_bytes,
        cache_bytes_max,
        open_deltas: stats.open_deltas,
        unapplied_deltas: stats.unapplied_deltas,
        journal_bytes: stats.journal_bytes,
        throttled_writes: stats.throttled_writes_now,
        failure,
        backlog_bytes: stats.backlog_bytes,
        resync_regions_left: stats.resync_regions_left,
        peers: peer_infos(node),
        metadata: node.control.get().map(|control| control.status()),
        lease: node.lease_info(),
        lost_sites,
        suspended_volumes: node
            .volumes()
            .iter()
            .filter_map(|record| {
                Some(SuspendedVolume {
                    name: record.name.clone(),
                    reason: node.suspension(record)?,
                })
            })
            .collect(),
        suspended_requests: stats.suspended_requests_now,
        suspended_failed_total: stats.suspended_failed_total,
        failover_lost_deltas: stats.failover_lost_deltas_total,
        failover_lost_bytes: stats.failover_lost_bytes_total,
    }
}

fn peer_infos(node: &Node) -> Vec<PeerInfo> {
    let Some(peers) = node.peers.get() else {
        return Vec::new();
    };
    let connected = peers.connected_sites();
    let rtts = peers.round_trips();
    peers
        .sites()
        .into_iter()
        .map(|site| PeerInfo {
            connected: connected.contains(&site),
            rtt_ms: rtts
                .iter()
                .find(|(name, _)| *name == site)
                .map(|(_, rtt)| rtt.as_secs_f64() * 1e3),
            site,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClusterConfig, LOCAL_CONFIG};

    fn control() -> LinkControl {
        let config = ClusterConfig::parse(LOCAL_CONFIG, "local.toml").expect("valid");
        LinkControl::from_config(&config)
    }

    fn call(links: &LinkControl, method: Method, path: &str, body: &str) -> Reply {
        let route = parse_route(&method, path).expect("a route");
        link_route(links, &route, body.as_bytes())
    }

    fn error_of(reply: &Reply) -> String {
        let value: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
        value["error"]
            .as_str()
            .expect("an error message")
            .to_string()
    }

    #[test]
    fn link_routes_list_set_cut_and_heal() {
        let links = control();
        let reply = call(&links, Method::GET, "/v1/links", "");
        assert_eq!(reply.status, 200);
        let list: Vec<LinkInfo> = serde_json::from_str(&reply.body).expect("a list");
        assert_eq!(list.len(), 3);
        assert_eq!((list[0].a.as_str(), list[0].b.as_str()), ("a", "b"));
        assert_eq!(list[0].delay_ms, 25);

        let reply = call(
            &links,
            Method::POST,
            "/v1/links/set",
            r#"{"a": "b", "b": "a", "delay_ms": 5, "bandwidth_mbit": 10, "loss_pct": 0.5}"#,
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let info: LinkInfo = serde_json::from_str(&reply.body).expect("a link");
        assert_eq!(info.delay_ms, 5);
        assert_eq!(info.bandwidth_mbit, Some(10.0));
        assert_eq!(info.loss_pct, 0.5);

        let reply = call(
            &links,
            Method::POST,
            "/v1/links/cut",
            r#"{"a": "a", "b": "b"}"#,
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(
            serde_json::from_str::<LinkInfo>(&reply.body)
                .expect("a link")
                .cut
        );
        let reply = call(
            &links,
            Method::POST,
            "/v1/links/heal",
            r#"{"a": "b", "b": "a"}"#,
        );
        let info: LinkInfo = serde_json::from_str(&reply.body).expect("a link");
        assert!(!info.cut);
        assert_eq!(info.delay_ms, 5);
        assert_eq!(link_route(&links, &Route::Status, b"").status, 404);
    }

    #[test]
    fn bad_link_requests_say_why() {
        let links = control();
        let cases = [
            (
                "/v1/links/cut",
                r#"{"a": "a", "b": "zz"}"#,
                404,
                "no site named \"zz\"",
            ),
            (
                "/v1/links/set",
                r#"{"a": "q", "b": "a", "delay_ms": 1}"#,
                404,
                "\"q\"",
            ),
            (
                "/v1/links/heal",
                r#"{"a": "a", "b": "a"}"#,
                400,
                "two different sites",
            ),
            (
                "/v1/links/set",
                r#"{"a": "a", "b": "b", "loss_pct": 150}"#,
                400,
                "loss_pct must be between 0 and 100",
            ),
            (
                "/v1/links/set",
                r#"{"a": "a", "b": "b", "delay_ms": -1}"#,
                400,
                "expected u64",
            ),
            (
                "/v1/links/set",
                r#"{"a": "a", "b": "b"}"#,
                400,
                "nothing to change",
            ),
            (
                "/v1/links/set",
                r#"{"a": "a", "b": "b", "delay": 3}"#,
                400,
                "delay",
            ),
            ("/v1/links/cut", "not json", 400, "bad link request"),
        ];
        for (path, body, status, message) in cases {
            let reply = call(&links, Method::POST, path, body);
            assert_eq!(reply.status, status, "{path} {body}: {}", reply.body);
            let error = error_of(&reply);
            assert!(error.contains(message), "{path} {body}: {error}");
        }
        // Nothing changed.
        assert_eq!(control().list(), links.list());
    }

    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn token_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        std::fs::write(&path, format!("{TOKEN}\n")).expect("write");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        dir
    }

    fn gate(config: &AdminConfig) -> Gate {
        let dir = token_dir();
        let token = AdminToken::load_for_node(&dir.path().join(ADMIN_TOKEN_FILE))
            .expect("readable")
            .expect("present");
        Gate::new(Some(token), config)
    }

    /// A request head: `headers` as `(name, value)` pairs, Host included
    /// only if given.
    fn head(method: Method, path: &str, headers: &[(&str, &str)]) -> Parts {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).expect("a valid request").into_parts().0
    }

    const BEARER: (&str, &str) = (
        "authorization",
        concat!(
            "Bearer ",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        ),
    );
    const HOST: (&str, &str) = ("host", "127.0.0.1:9180");
    const JSON: (&str, &str) = ("content-type", "application/json");

    fn refusal(gate: &Gate, parts: &Parts) -> (u16, String) {
        let reply = gate.admit(parts).expect_err("refused");
        (reply.status, error_of(&reply))
    }

    #[test]
    fn routes_decode_volume_names_after_splitting_the_path() {
        let cases = [
            (Method::GET, "/metrics", Route::Metrics),
            (Method::GET, "/v1/status", Route::Status),
            (Method::GET, "/v1/volumes", Route::ListVolumes),
            (Method::POST, "/v1/volumes", Route::CreateVolume),
            (
                Method::GET,
                "/v1/volumes/vm1",
                Route::ShowVolume("vm1".into()),
            ),
            (
                Method::DELETE,
                "/v1/volumes/vol%3Fx",
                Route::DeleteVolume("vol?x".into()),
            ),
            (
                Method::DELETE,
                "/v1/volumes/a%2Fb",
                Route::DeleteVolume("a/b".into()),
            ),
            (
                Method::GET,
                "/v1/volumes/%2E%2E",
                Route::ShowVolume("..".into()),
            ),
            (
                Method::POST,
                "/v1/volumes/x%20y/move",
                Route::MoveVolume("x y".into()),
            ),
            (
                Method::POST,
                "/v1/volumes/move/move",
                Route::MoveVolume("move".into()),
            ),
            (Method::GET, "/v1/links", Route::ListLinks),
            (Method::POST, "/v1/links/set", Route::SetLink),
            (Method::POST, "/v1/links/cut", Route::CutLink),
            (Method::POST, "/v1/links/heal", Route::HealLink),
        ];
        for (method, path, route) in cases {
            assert_eq!(
                parse_route(&method, path).expect(path),
                route,
                "{method} {path}"
            );
        }
        for (method, path) in [
            (Method::GET, "/v1/volumes/a/b"),
            (Method::POST, "/v1/status"),
            (Method::PUT, "/v1/volumes"),
            (Method::DELETE, "/v1/volumes"),
            (Method::GET, "/v1/links/cut"),
            (Method::GET, "/"),
        ] {
            assert_eq!(
                parse_route(&method, path).expect_err(path).status,
                404,
                "{method} {path}"
            );
        }
        let reply = parse_route(&Method::GET, "/v1/volumes/%FF").expect_err("not UTF-8");
        assert_eq!(reply.status, 400);
        // Through hyper's URI parser, the query stays out of the path.
        let parts = head(Method::DELETE, "/v1/volumes/vol?x", &[HOST, BEARER]);
        assert_eq!(
            gate(&AdminConfig::default())
                .admit(&parts)
                .expect("admitted"),
            Route::DeleteVolume("vol".into())
        );
    }

    #[test]
    fn changes_need_the_token_and_reads_do_not() {
        let open_reads = gate(&AdminConfig::default());
        for (method, path) in [
            (Method::POST, "/v1/volumes"),
            (Method::DELETE, "/v1/volumes/vm1"),
            (Method::POST, "/v1/volumes/vm1/move"),
            (Method::POST, "/v1/links/cut"),
            (Method::POST, "/v1/links/set"),
            (Method::POST, "/v1/links/heal"),
            // Unknown routes too: the method decides, not the route.
            (Method::PUT, "/v1/anything"),
        ] {
            let (status, error) = refusal(&open_reads, &head(method.clone(), path, &[HOST, JSON]));
            assert_eq!(status, 401, "{method} {path}: {error}");
            assert!(error.contains("Authorization: Bearer"), "{error}");
            let wrong = (
                "authorization",
                "Bearer 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdee",
            );
            let (status, error) = refusal(
                &open_reads,
                &head(method.clone(), path, &[HOST, JSON, wrong]),
            );
            assert_eq!(status, 401, "{method} {path}: {error}");
            assert!(error.contains("does not match"), "{error}");
            for scheme in ["Basic", "Token"] {
                let value = format!("{scheme} {TOKEN}");
                let other = [HOST, JSON, ("authorization", value.as_str())];
                assert_eq!(
                    refusal(&open_reads, &head(method.clone(), path, &other)).0,
                    401
                );
            }
        }
        let reply = open_reads
            .admit(&head(Method::POST, "/v1/volumes", &[HOST, JSON]))
            .expect_err("no token");
        assert_eq!(
            reply.into_response().headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"stretch\""
        );
        let lower = (
            "authorization",
            concat!(
                "bearer  ",
                "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            ),
        );
        for parts in [
            head(Method::POST, "/v1/volumes", &[HOST, JSON, BEARER]),
            head(Method::POST, "/v1/volumes", &[HOST, JSON, lower]),
            head(Method::DELETE, "/v1/volumes/vm1", &[HOST, BEARER]),
            head(Method::GET, "/metrics", &[HOST]),
            head(Method::GET, "/v1/status", &[HOST]),
            head(Method::GET, "/v1/volumes", &[HOST]),
            head(Method::GET, "/v1/volumes/vm1", &[HOST]),
            head(Method::GET, "/v1/links", &[HOST]),
        ] {
            assert!(
                open_reads.admit(&parts).is_ok(),
                "{} {}",
                parts.method,
                parts.uri
            );
        }

        let closed_reads = gate(&AdminConfig {
            reads_need_token: true,
            ..AdminConfig::default()
        });
        for path in ["/metrics", "/v1/status", "/v1/volumes", "/v1/links"] {
            assert_eq!(
                refusal(&closed_reads, &head(Method::GET, path, &[HOST])).0,
                401
            );
            assert!(
                closed_reads
                    .admit(&head(Method::GET, path, &[HOST, BEARER]))
                    .is_ok()
            );
        }

        // A node without a token refuses every change, whatever is sent.
        let no_token = Gate::new(None, &AdminConfig::default());
        let (status, error) = refusal(
            &no_token,
            &head(Method::POST, "/v1/volumes", &[HOST, JSON, BEARER]),
        );
        assert_eq!(status, 403);
        assert!(error.contains("stretch init"), "{error}");
        assert!(
            no_token
                .admit(&head(Method::GET, "/v1/status", &[HOST]))
                .is_ok()
        );
    }

    #[test]
    fn bodies_must_be_declared_json() {
        let gate = gate(&AdminConfig::default());
        for content_type in [
            None,
            Some("text/plain"),
            Some("text/plain; charset=utf-8"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("application/jsonx"),
        ] {
            let mut headers = vec![HOST, BEARER, ("content-length", "20")];
            if let Some(value) = content_type {
                headers.push(("content-type", value));
            }
            let (status, error) = refusal(&gate, &head(Method::POST, "/v1/links/cut", &headers));
            assert_eq!(status, 415, "{content_type:?}: {error}");
            assert!(error.contains("application/json"), "{error}");
        }
        for value in ["application/json", "Application/JSON; charset=utf-8"] {
            let parts = head(
                Method::POST,
                "/v1/volumes",
                &[HOST, BEARER, ("content-type", value)],
            );
            assert!(gate.admit(&parts).is_ok(), "{value}");
        }
        // A body on a route that takes none must be JSON too.
        let parts = head(
            Method::DELETE,
            "/v1/volumes/vm1",
            &[
                HOST,
                BEARER,
                ("content-length", "4"),
                ("content-type", "text/plain"),
            ],
        );
        assert_eq!(refusal(&gate, &parts).0, 415);
        // Declared too large: refused before reading a byte.
        let parts = head(
            Method::POST,
            "/v1/volumes",
            &[HOST, BEARER, JSON, ("content-length", "1000000")],
        );
        assert_eq!(refusal(&gate, &parts).0, 413);
        // Credentials come first: without them, nothing about the body is said.
        let parts = head(
            Method::POST,
            "/v1/volumes",
            &[HOST, ("content-type", "text/plain")],
        );
        assert_eq!(refusal(&gate, &parts).0, 401);
    }

    #[test]
    fn host_must_be_an_address_localhost_or_a_configured_name() {
        let names = vec!["stretch-a1.example.net".to_string()];
        let allowed = [
            "127.0.0.1",
            "127.0.0.1:9180",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:9180",
            "[fe80::1]:1",
            "localhost",
            "LocalHost:9180",
            "localhost.:9180",
            "stretch-a1.example.net",
            "STRETCH-A1.example.net:9180",
        ];
        for host in allowed {
            assert!(host_allowed(host, &names), "{host}");
        }
        let refused = [
            "",
            "evil.example",
            "evil.example:9180",
            "127.0.0.1.nip.io",
            "localhost.evil.example",
            "stretch-a1.example.net.evil",
            "127.1",
            "127.0.0.1:",
            "127.0.0.1:x",
            "127.0.0.1:123456",
            "::1",
            "[::1",
            "[::1]x",
            "[nothost]:80",
            ":9180",
        ];
        for host in refused {
            assert!(!host_allowed(host, &names), "{host:?}");
        }
        let gate = gate(&AdminConfig {
            host_names: names,
            ..AdminConfig::default()
        });
        let (status, error) = refusal(
            &gate,
            &head(Method::GET, "/v1/status", &[("host", "evil.example")]),
        );
        assert_eq!(status, 421);
        assert!(error.contains("host_names"), "{error}");
        // Refused before the token is even looked at.
        let parts = head(
            Method::POST,
            "/v1/volumes",
            &[("host", "evil.example"), JSON, BEARER],
        );
        assert_eq!(refusal(&gate, &parts).0, 421);
        assert_eq!(refusal(&gate, &head(Method::GET, "/metrics", &[])).0, 421);
        let parts = head(
            Method::GET,
            "/metrics",
            &[("host", "stretch-a1.example.net:9180")],
        );
        assert!(gate.admit(&parts).is_ok());
    }

    #[test]
    fn host_names_must_be_plain_names() {
        for name in ["", "a b", "host:9180", "[::1]", "x/y"] {
            let config = AdminConfig {
                host_names: vec![name.to_string()],
                ..AdminConfig::default()
            };
            assert!(config.validate().is_err(), "{name:?}");
        }
        let config = AdminConfig {
            host_names: vec!["node-a1.dc1.example".into()],
            ..AdminConfig::default()
        };
        assert!(config.validate().is_ok());
    }

    #[test]
    fn a_node_off_loopback_needs_a_token() {
        let empty = tempfile::tempdir().expect("tempdir");
        let public: SocketAddr = "0.0.0.0:9180".parse().expect("address");
        let loopback: SocketAddr = "127.0.0.1:9180".parse().expect("address");
        let config = AdminConfig::default();
        let error = load_token(empty.path(), public, &config).expect_err("refused");
        let text = error.to_string();
        assert!(
            text.contains("0.0.0.0:9180") && text.contains("stretch init") && !text.contains('\n'),
            "{text}"
        );
        assert!(
            load_token(empty.path(), loopback, &config)
                .expect("allowed")
                .is_none()
        );
        let closed = AdminConfig {
            reads_need_token: true,
            ..AdminConfig::default()
        };
        assert!(load_token(empty.path(), loopback, &closed).is_err());
        let dir = token_dir();
        assert!(
            load_token(dir.path(), public, &closed)
                .expect("allowed")
                .is_some()
        );
    }

    /// A client that never reads its answer fails the write once it has
    /// made no progress for the limit, instead of holding the connection.
    #[tokio::test]
    async fn a_write_the_client_does_not_read_times_out() {
        use tokio::io::AsyncWriteExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let client = TcpStream::connect(address).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let mut server = StallLimited::new(server, Duration::from_millis(200));
        let chunk = vec![0u8; 1 << 20];
        let started = std::time::Instant::now();
        let error = loop {
            if let Err(error) = server.write_all(&chunk).await {
                break error;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the socket buffers took 20 s of writes"
            );
        };
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        drop(client);
    }
}
