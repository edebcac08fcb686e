//! Links to the other sites: one QUIC connection per peer node (mutual
//! TLS with the cluster CA), carrying the engine's messages and the
//! metadata's Raft RPCs. Data nodes connect to each other and to the
//! witness; the witness carries only Raft RPCs (it holds no data, and a
//! data message from it is refused).
//!
//! Streams: each consistency group's deltas and acks travel on one ordered
//! unidirectional stream per connection; every request-lane message (strict
//! reads, forwarded writes and their answers) and every control message
//! gets a stream of its own, so a large delta never holds up a small read.
//! Each Raft RPC and its reply take a stream of their own too.
//!
//! Connections: the node with the smaller name dials, with backoff; the
//! other accepts. When a connection ends the engine hears `peer_down`, and
//! `peer_up` when the next one is established: the engine resumes from
//! there (retained deltas or a resync), so nothing depends on messages of a
//! dead connection arriving.
//!
//! Identity: a peer is the node its certificate names. The accepting side
//! reads that name from the client certificate before anything else and
//! refuses a hello claiming another node; the dialling side gets a server
//! certificate naming the node it dialled (TLS and the endpoint check it)
//! and refuses a hello from any other. The hello's node must be a node of
//! the config at the site the config gives it, so a witness's certificate
//! (naming the witness) never passes as a data node. A refused
//! connection is logged and counted and changes nothing.
//!
//! Bytes from a peer are untrusted: a frame that fails validation ends that
//! stream only, is logged and counted. The hello is read within a budget of
//! one small frame; after it, the frames a connection is receiving share
//! one [`FrameBudget`], so headers cannot make a node reserve more than
//! that per peer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use stretch_core::{GroupId, Lane, SiteId, SiteMessage};
use stretch_transport::{
    FrameBudget, FrameError, IdentityError, NodeIdentity, PeerEndpoint, peer_certificate,
    read_message_within, write_frame, write_message,
};
use stretch_wire::{FrameParts, PROTOCOL_VERSION, PeerMessage};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::ClusterConfig;
use crate::driver::Outbox;
use crate::links::LinkControl;
use crate::node::Node;

/// Redial backoff after a failed or lost connection, doubling up to the max.
const REDIAL_DELAY_MIN: Duration = Duration::from_millis(100);
const REDIAL_DELAY_MAX: Duration = Duration::from_secs(2);
/// Longest the handshake (hello both ways) may take on a fresh connection.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A node's certificate this close to its end is worth a warning at start.
const CERTIFICATE_WARNING: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    #[error("node {0:?} has no peer_listen address; nodes of a multi-site cluster need one")]
    NoPeerAddress(String),
    #[error("site {0:?} has more than one node; one node per site is supported")]
    SharedSite(String),
    #[error("node certificates in {dir}: {source} (run `stretch init` first)")]
    Identity {
        dir: String,
        #[source]
        source: stretch_transport::PkiError,
    },
    #[error(transparent)]
    Endpoint(#[from] stretch_transport::EndpointError),
}

/// Another node: a data node this node exchanges deltas with, or a
/// witness (Raft RPCs only).
#[derive(Debug, Clone)]
struct Remote {
    node: String,
    site: String,
    site_id: SiteId,
    address: SocketAddr,
    /// At a data site: its engine talks to this node's engine.
    data: bool,
    /// How block payloads travel to it.
    compression: stretch_wire::Compression,
}

/// The live connection to one peer and its group streams.
#[derive(Debug)]
struct Session {
    connection: quinn::Connection,
    groups: BTreeMap<GroupId, mpsc::UnboundedSender<FrameParts>>,
}

#[derive(Debug)]
pub(crate) struct Peers {
    node: Weak<Node>,
    endpoint: PeerEndpoint,
    cluster: String,
    local_node: String,
    local_site: String,
    remotes: Vec<Remote>,
    sessions: Mutex<BTreeMap<SiteId, Session>>,
    /// When each peer last answered a request of this node.
    heard: Mutex<BTreeMap<SiteId, std::time::Instant>>,
    /// Raft requests sent and not answered yet, by request number.
    waiters: Mutex<BTreeMap<u64, oneshot::Sender<Vec<u8>>>>,
    next_request: AtomicU64,
    runtime: tokio::runtime::Handle,
}

impl Peers {
    /// Binds the node's QUIC endpoint (through the link shaper) and starts
    /// dialing, accepting and sending. Tasks end when `stop` turns true.
    pub fn start(
        node: &Arc<Node>,
        config: &ClusterConfig,
        pki_dir: &Path,
        links: &LinkControl,
        outbox: Outbox,
        stop: watch::Receiver<bool>,
    ) -> Result<(Arc<Peers>, tokio::task::JoinSet<()>), PeersError> {
        let local = config
            .node(&node.name)
            .expect("peers invariant: the node comes from this config");
        let address = local
            .peer_listen
            .ok_or_else(|| PeersError::NoPeerAddress(local.name.clone()))?;
        let mut remotes = Vec::new();
        let others = config.nodes.iter().filter(|peer| peer.name != node.name);
        for peer in others {
            if peer.site == node.site {
                return Err(PeersError::SharedSite(peer.site.clone()));
            }
            let address = peer
                .peer_listen
                .ok_or_else(|| PeersError::NoPeerAddress(peer.name.clone()))?;
            let site_id = node
                .sites
                .id(&peer.site)
                .expect("peers invariant: a peer's site is in the config");
            remotes.push(Remote {
                node: peer.name.clone(),
                site: peer.site.clone(),
                site_id,
                address,
                data: config.is_data_node(peer),
                compression: config.link_compression(&node.site, &peer.site),
            });
        }
        let identity =
            NodeIdentity::load(pki_dir, &node.name).map_err(|source| PeersError::Identity {
                dir: pki_dir.display().to_string(),
                source,
            })?;
        node.driver
            .metrics
            .set_certificate_expiry(identity.not_after);
        warn_if_expiring(&node.name, identity.not_after);
        let table = stretch_transport::LinkTable::new(seed_of(&node.name));
        links.register(&node.site, table.clone());
        let endpoint = PeerEndpoint::bind_shaped(
            &identity,
            address,
            table,
            config.tuning.link_congestion_control.into(),
        )?;
        let peers = Arc::new(Peers {
            node: Arc::downgrade(node),
            endpoint,
            cluster: config.cluster.name.clone(),
            local_node: node.name.clone(),
            local_site: node.site.clone(),
            remotes,
            sessions: Mutex::new(BTreeMap::new()),
            waiters: Mutex::new(BTreeMap::new()),
            heard: Mutex::new(BTreeMap::new()),
            next_request: AtomicU64::new(1),
            runtime: tokio::runtime::Handle::current(),
        });
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(peers.clone().send_loop(outbox, stop.clone()));
        tasks.spawn(peers.clone().accept_loop(stop.clone()));
        for remote in peers.remotes.clone() {
            if peers.local_node < remote.node {
                tasks.spawn(peers.clone().dial_loop(remote, stop.clone()));
            }
        }
        tracing::info!(
            node = %peers.local_node,
            %address,
            peers = peers.remotes.len(),
            "links to other sites started"
        );
        Ok((peers, tasks))
    }

    /// Closes every connection; the tasks end.
    pub fn close(&self) {
        self.endpoint.close();
    }

    /// Every other data site.
    pub fn sites(&self) -> Vec<String> {
        self.remotes
            .iter()
            .filter(|remote| remote.data)
            .map(|remote| remote.site.clone())
            .collect()
    }

    /// The data sites connected now.
    pub fn connected_sites(&self) -> Vec<String> {
        let sessions = self.sessions.lock();
        self.remotes
            .iter()
            .filter(|remote| remote.data && sessions.contains_key(&remote.site_id))
            .map(|remote| remote.site.clone())
            .collect()
    }

    /// The nodes (data or witness) connected now.
    pub fn connected_nodes(&self) -> Vec<String> {
        let sessions = self.sessions.lock();
        self.remotes
            .iter()
            .filter(|remote| sessions.contains_key(&remote.site_id))
            .map(|remote| remote.node.clone())
            .collect()
    }

    /// The nodes connected now that answered within `window`: a cut link
    /// keeps its connection until the idle timeout, but goes silent.
    pub fn live_nodes(&self, window: Duration) -> Vec<String> {
        let heard = self.heard.lock();
        let connected = self.connected_nodes();
        self.remotes
            .iter()
            .filter(|remote| connected.contains(&remote.node))
            .filter(|remote| {
                heard
                    .get(&remote.site_id)
                    .is_some_and(|at| at.elapsed() <= window)
            })
            .map(|remote| remote.node.clone())
            .collect()
    }

    /// The data node of site `site`.
    pub fn data_node_of(&self, site: &str) -> Option<String> {
        self.remotes
            .iter()
            .find(|remote| remote.data && remote.site == site)
            .map(|remote| remote.node.clone())
    }

    /// The site of node `node`.
    pub fn site_of(&self, node: &str) -> Option<String> {
        self.remotes
            .iter()
            .find(|remote| remote.node == node)
            .map(|remote| remote.site.clone())
    }

    /// Every other data node.
    pub fn data_nodes(&self) -> Vec<String> {
        self.remotes
            .iter()
            .filter(|remote| remote.data)
            .map(|remote| remote.node.clone())
            .collect()
    }

    /// Round-trip time to each connected site.
    pub fn round_trips(&self) -> Vec<(String, Duration)> {
        let sessions = self.sessions.lock();
        self.remotes
            .iter()
            .filter_map(|remote| {
                let session = sessions.get(&remote.site_id)?;
                Some((remote.site.clone(), session.connection.rtt()))
            })
            .collect()
    }

    /// Sends a metadata request to node `node` and waits (at most
    /// `timeout`) for its reply. Fails at once when the node is not
    /// connected.
    pub async fn call(
        &self,
        node: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let site = self
            .remotes
            .iter()
            .find(|remote| remote.node == node)
            .map(|remote| remote.site_id)
            .ok_or_else(|| format!("node {node:?} is not a peer of this node"))?;
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.waiters.lock().insert(request, sender);
        let sent = self.send_control(site, PeerMessage::RaftRequest { request, body });
        let answer = match sent {
            Ok(()) => tokio::time::timeout(timeout, receiver).await,
            Err(reason) => {
                self.waiters.lock().remove(&request);
                return Err(reason);
            }
        };
        self.waiters.lock().remove(&request);
        match answer {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(format!("the connection to {node:?} ended")),
            Err(_) => Err(format!("no answer from {node:?} within {timeout:?}")),
        }
    }

    // -----------------------------------------------------------------------
    // Sending

    /// Routes the engine's messages to the live connection of their site.
    async fn send_loop(self: Arc<Self>, mut outbox: Outbox, mut stop: watch::Receiver<bool>) {
        loop {
            let next = tokio::select! {
                next = outbox.recv() => next,
                _ = stop.wait_for(|stop| *stop) => None,
            };
            let Some((site, message)) = next else {
                return;
            };
            self.send_site_message(site, &message);
        }
    }

    fn send_site_message(&self, site: SiteId, message: &SiteMessage) {
        let Some(remote) = self.remotes.iter().find(|remote| remote.site_id == site) else {
            return;
        };
        let encoded = PeerMessage::from_site(message, remote.compression).and_then(|message| {
            let frame = stretch_wire::encode_frame_parts(&message)?;
            Ok((message.payload_bytes(), frame))
        });
        let frame = match encoded {
            Ok((bytes, frame)) => {
                if let Some(node) = self.node.upgrade() {
                    node.driver.metrics.link_sent(&remote.site, bytes);
                }
                frame
            }
            Err(error) => {
                // The engine asked for something the wire cannot carry (a
                // forwarded write over the size limit, say): the request
                // fails by its timeout; say why here.
                tracing::error!(%error, "cannot send a message to a peer");
                return;
            }
        };
        let mut sessions = self.sessions.lock();
        let Some(session) = sessions.get_mut(&site) else {
            // Not connected: the engine resumes when the link returns.
            return;
        };
        match message.lane() {
            Lane::Group(group) => {
                let sender = session
                    .groups
                    .entry(group)
                    .or_insert_with(|| spawn_group_stream(session.connection.clone(), group));
                if sender.send(frame).is_err() {
                    session.groups.remove(&group);
                }
            }
            Lane::Request => {
                let connection = session.connection.clone();
                tokio::spawn(async move {
                    if let Err(error) = send_on_new_stream(&connection, &frame).await {
                        tracing::debug!(%error, "request stream to a peer failed");
                    }
                });
            }
        }
    }

    /// Sends a node-to-node message on a stream of its own.
    fn send_control(&self, site: SiteId, message: PeerMessage) -> Result<(), String> {
        let Some(connection) = self
            .sessions
            .lock()
            .get(&site)
            .map(|session| session.connection.clone())
        else {
            return Err("not connected".into());
        };
        let frame = stretch_wire::encode_frame_parts(&message)
            .map_err(|error| format!("cannot encode a message to a peer: {error}"))?;
        self.runtime.spawn(async move {
            if let Err(error) = send_on_new_stream(&connection, &frame).await {
                tracing::debug!(%error, "control stream to a peer failed");
            }
        });
        Ok(())
    }

    // -----------------------------------------------------------------------
    // Connections

    async fn dial_loop(self: Arc<Self>, remote: Remote, mut stop: watch::Receiver<bool>) {
        let mut delay = REDIAL_DELAY_MIN;
        loop {
            if *stop.borrow() {
                return;
            }
            let attempt = async {
                let connection = self.endpoint.connect(&remote.node, remote.address).await?;
                let (mut send, mut receive) = connection.open_bi().await?;
                write_message(&mut send, &self.hello()).await?;
                let answer = tokio::time::timeout(
                    HELLO_TIMEOUT,
                    read_message_within(&mut receive, &FrameBudget::hello()),
                )
                .await
                .map_err(|_| anyhow_like("no hello within the timeout"))??;
                // The endpoint checked the certificate names remote.node.
                self.check_hello(answer, &remote.node, Some(&remote))?;
                let _ = send.finish();
                Ok::<_, SessionError>(connection)
            };
            let result = tokio::select! {
                result = attempt => result,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            match result {
                Ok(connection) => {
                    delay = REDIAL_DELAY_MIN;
                    self.clone()
                        .run_session(remote.clone(), connection, stop.clone())
                        .await;
                }
                Err(error) => {
                    if error.is_refusal() {
                        self.count_refusal();
                    }
                    // The first failure of a streak is worth an operator's
                    // eye (a wrong certificate looks like this); the
                    // retries are not.
                    if delay == REDIAL_DELAY_MIN {
                        tracing::warn!(peer = %remote.node, %error, "cannot reach peer; retrying");
                    } else {
                        tracing::debug!(peer = %remote.node, %error, "cannot reach peer; retrying");
                    }
                    delay = (delay * 2).min(REDIAL_DELAY_MAX);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    async fn accept_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let connection = tokio::select! {
                connection = self.endpoint.accept() => connection,
                _ = stop.wait_for(|stop| *stop) => None,
            };
            let Some(connection) = connection else {
                return;
            };
            let peers = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let handshake = async {
                    // Who the peer is comes from its certificate, read
                    // before any byte it sends.
                    let certified = peer_certificate(&connection)?;
                    let (mut send, mut receive) = connection.accept_bi().await?;
                    let hello = tokio::time::timeout(
                        HELLO_TIMEOUT,
                        read_message_within(&mut receive, &FrameBudget::hello()),
                    )
                    .await
                    .map_err(|_| anyhow_like("no hello within the timeout"))??;
                    let remote = peers.check_hello(hello, &certified.node, None)?;
                    write_message(&mut send, &peers.hello()).await?;
                    let _ = send.finish();
                    Ok::<_, SessionError>(remote)
                };
                match handshake.await {
                    Ok(remote) => peers.run_session(remote, connection, stop).await,
                    Err(error) => {
                        tracing::warn!(
                            remote = %connection.remote_address(),
                            %error,
                            "refused a peer connection"
                        );
                        if error.is_refusal() {
                            peers.count_refusal();
                        }
                        connection.close(1u32.into(), b"refused");
                    }
                }
            });
        }
    }

    fn hello(&self) -> PeerMessage {
        PeerMessage::Hello {
            protocol: PROTOCOL_VERSION,
            cluster: self.cluster.clone(),
            node: self.local_node.clone(),
            site: self.local_site.clone(),
        }
    }

    fn count_refusal(&self) {
        if let Some(node) = self.node.upgrade() {
            node.driver.metrics.peer_refused();
        }
    }

    /// Checks a peer's hello: the node its certificate names (`certified`),
    /// same protocol and cluster, a data node of the config at the site the
    /// config gives it (and the one dialled).
    fn check_hello(
        &self,
        message: Option<PeerMessage>,
        certified: &str,
        expected: Option<&Remote>,
    ) -> Result<Remote, SessionError> {
        let Some(PeerMessage::Hello {
            protocol,
            cluster,
            node,
            site,
        }) = message
        else {
            return Err(anyhow_like("the first message was not a hello"));
        };
        if node != certified {
            return Err(SessionError::Refused(format!(
                "the certificate names node {certified:?}, the hello claims {node:?}"
            )));
        }
        if protocol != PROTOCOL_VERSION {
            return Err(SessionError::Refused(format!(
                "protocol {protocol}, this node speaks {PROTOCOL_VERSION}"
            )));
        }
        if cluster != self.cluster {
            return Err(SessionError::Refused(format!(
                "cluster {cluster:?}, this node is in {:?}",
                self.cluster
            )));
        }
        let Some(remote) = self.remotes.iter().find(|remote| remote.node == node) else {
            return Err(SessionError::Refused(format!(
                "node {node:?} is not a node of this cluster"
            )));
        };
        if remote.site != site || expected.is_some_and(|expected| expected.node != node) {
            return Err(SessionError::Refused(format!(
                "node {node:?} claims site {site:?}"
            )));
        }
        Ok(remote.clone())
    }

    async fn run_session(
        self: Arc<Self>,
        remote: Remote,
        connection: quinn::Connection,
        mut stop: watch::Receiver<bool>,
    ) {
        let Some(node) = self.node.upgrade() else {
            return;
        };
        let id = connection.stable_id();
        let previous = self.sessions.lock().insert(
            remote.site_id,
            Session {
                connection: connection.clone(),
                groups: BTreeMap::new(),
            },
        );
        if let Some(previous) = previous {
            previous.connection.close(0u32.into(), b"replaced");
        }
        tracing::info!(peer = %remote.node, site = %remote.site, "connected to peer");
        let budget = FrameBudget::per_connection();
        node.driver.metrics.peer_connected(&remote.site, true);
        if remote.data {
            let now = node.driver.now();
            node.driver
                .with_engine(|engine| engine.peer_up(now, remote.site_id));
        }
        drop(node);
        loop {
            let stream = tokio::select! {
                stream = connection.accept_uni() => stream,
                _ = stop.wait_for(|stop| *stop) => {
                    connection.close(0u32.into(), b"node stopping");
                    break;
                }
            };
            match stream {
                Ok(stream) => {
                    let peers = self.clone();
                    let remote = remote.clone();
                    let budget = budget.clone();
                    let connection = connection.clone();
                    tokio::spawn(async move {
                        peers.read_stream(remote, connection, stream, budget).await
                    });
                }
                Err(error) => {
                    tracing::info!(peer = %remote.node, %error, "connection to peer ended");
                    break;
                }
            }
        }
        let mut sessions = self.sessions.lock();
        let current = sessions
            .get(&remote.site_id)
            .is_some_and(|session| session.connection.stable_id() == id);
        if current {
            sessions.remove(&remote.site_id);
        }
        drop(sessions);
        if current && let Some(node) = self.node.upgrade() {
            node.driver.metrics.peer_connected(&remote.site, false);
            if remote.data {
                let now = node.driver.now();
                node.driver
                    .with_engine(|engine| engine.peer_down(now, remote.site_id));
            }
        }
    }

    // -----------------------------------------------------------------------
    // Receiving

    async fn read_stream(
        self: Arc<Self>,
        remote: Remote,
        connection: quinn::Connection,
        mut stream: quinn::RecvStream,
        budget: FrameBudget,
    ) {
        loop {
            let message = match read_message_within(&mut stream, &budget).await {
                Ok(Some(message)) => message,
                Ok(None) => return,
                // The stream or connection ended (a peer stopping, a cut
                // link): nothing malformed, the session handles it.
                Err(FrameError::Io(error)) => {
                    tracing::debug!(peer = %remote.node, %error, "peer stream ended");
                    return;
                }
                // Frames announced but not sent hold the connection's
                // budget: a new connection starts clean, and the engine
                // resumes over it from what it kept.
                Err(error @ FrameError::Stalled { .. }) => {
                    tracing::warn!(peer = %remote.node, %error,
                        "frames from the peer stalled; connection closed");
                    connection.close(3u32.into(), b"frames stalled");
                    return;
                }
                Err(error) => {
                    self.refuse(&remote, &error.to_string());
                    let _ = stream.stop(2u32.into());
                    return;
                }
            };
            // Only answers count: a peer that talks to this node but never
            // hears it (a one-way cut) is not reachable.
            if matches!(message, PeerMessage::RaftReply { .. }) {
                self.heard
                    .lock()
                    .insert(remote.site_id, std::time::Instant::now());
            }
            if let Err(reason) = self.handle(&remote, message).await {
                self.refuse(&remote, &reason);
                let _ = stream.stop(2u32.into());
                return;
            }
        }
    }

    fn refuse(&self, remote: &Remote, reason: &str) {
        tracing::warn!(peer = %remote.node, reason, "malformed message from peer; stream closed");
        if let Some(node) = self.node.upgrade() {
            node.driver.metrics.peer_malformed(&remote.site);
        }
    }

    async fn handle(&self, remote: &Remote, message: PeerMessage) -> Result<(), String> {
        let Some(node) = self.node.upgrade() else {
            return Ok(());
        };
        match message {
            PeerMessage::Hello { .. } => Err("a second hello".into()),
            PeerMessage::RaftRequest { request, body } => {
                let site = remote.site_id;
                let peers = self
                    .node
                    .upgrade()
                    .and_then(|node| node.peers.get().cloned());
                tokio::spawn(async move {
                    let reply = match node.control.get() {
                        Some(control) => match crate::control::rpc::decode(&body) {
                            Ok(rpc) => control.serve(rpc, site).await,
                            Err(reason) => crate::control::rpc::RpcReply::Refused(reason),
                        },
                        None => crate::control::rpc::RpcReply::Refused(
                            "the metadata member is not started".into(),
                        ),
                    };
                    let body = match crate::control::rpc::encode(&reply) {
                        Ok(body) => body,
                        Err(reason) => {
                            tracing::error!(%reason, "cannot answer a metadata request");
                            return;
                        }
                    };
                    if let Some(peers) = peers {
                        let _ = peers.send_control(site, PeerMessage::RaftReply { request, body });
                    }
                });
                Ok(())
            }
            PeerMessage::RaftReply { request, body } => {
                if let Some(waiter) = self.waiters.lock().remove(&request) {
                    let _ = waiter.send(body);
                }
                Ok(())
            }
            _ if !remote.data => Err("a witness sends no data messages".into()),
            other => match other.into_site() {
                Ok(Some(site_message)) => {
                    let now = node.driver.now();
                    node.driver
                        .with_engine(|engine| engine.receive(now, remote.site_id, site_message));
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(error) => Err(error.to_string()),
            },
        }
    }
}

fn spawn_group_stream(
    connection: quinn::Connection,
    group: GroupId,
) -> mpsc::UnboundedSender<FrameParts> {
    let (sender, mut frames) = mpsc::unbounded_channel::<FrameParts>();
    tokio::spawn(async move {
        let mut stream = match connection.open_uni().await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%group, %error, "cannot open a group stream");
                return;
            }
        };
        while let Some(frame) = frames.recv().await {
            if let Err(error) = write_frame(&mut stream, &frame).await {
                tracing::debug!(%group, %error, "group stream to a peer failed");
                return;
            }
        }
        let _ = stream.finish();
    });
    sender
}

async fn send_on_new_stream(
    connection: &quinn::Connection,
    frame: &FrameParts,
) -> Result<(), String> {
    let mut stream = connection.open_uni().await.map_err(|e| e.to_string())?;
    write_frame(&mut stream, frame)
        .await
        .map_err(|e| e.to_string())?;
    stream.finish().map_err(|e| e.to_string())?;
    Ok(())
}

/// A fixed seed per node for its link shaper's draws (jitter, loss).
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Logs, once at start, a node certificate that has ended or soon will:
/// peers refuse an expired certificate, so the node would be cut off.
fn warn_if_expiring(node: &str, not_after: std::time::SystemTime) {
    match not_after.duration_since(std::time::SystemTime::now()) {
        Err(_) => tracing::error!(
            node,
            "this node's certificate has expired: peers refuse it; run `stretch cert renew`"
        ),
        Ok(left) if left < CERTIFICATE_WARNING => tracing::warn!(
            node,
            days_left = left.as_secs() / 86_400,
            "this node's certificate ends soon; run `stretch cert renew`"
        ),
        Ok(_) => {}
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("peer certificate: {0}")]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Endpoint(#[from] stretch_transport::EndpointError),
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Frame(#[from] stretch_transport::FrameError),
    #[error("{0}")]
    Refused(String),
}

impl SessionError {
    /// A peer that reached this node and was turned away for who it is or
    /// what it said, as opposed to one that could not be reached.
    fn is_refusal(&self) -> bool {
        use stretch_transport::EndpointError;
        match self {
            SessionError::Identity(_) | SessionError::Refused(_) => true,
            SessionError::Endpoint(error) => matches!(
                error,
                EndpointError::WrongPeer { .. } | EndpointError::OtherPeer { .. }
            ),
            SessionError::Frame(error) => !matches!(error, FrameError::Io(_)),
            SessionError::Connection(_) => false,
        }
    }
}

fn anyhow_like(reason: &str) -> SessionError {
    SessionError::Refused(reason.to_string())
}
