//! The node's control plane: the cluster metadata (volumes, groups with
//! owner and epoch, sites, nodes) replicated with openraft
//! (`stretch-metadata`), its log and state machine in one redb file per
//! node, its RPCs over the QUIC links.
//!
//! Voters: in a cluster of several data sites, every node (one data node per
//! data site, plus the witness). A cluster of one data site has no links:
//! each node there is a one-voter cluster of its own.
//!
//! Every voter that starts from an empty store proposes the same initial
//! membership (openraft allows that: only one leader is elected). The
//! leader then records the sites and nodes of the config. Changes (create,
//! delete, move) are committed through the leader: a node that is not
//! leader forwards them. Every node applies the committed log to itself
//! (legs, engine ownership) through the state machine's observer.

pub(crate) mod lease;
mod network;
pub(crate) mod rpc;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use openraft::Raft;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use stretch_metadata::{
    ClusterMetadata, Command, CommandError, LogStore, NodeId, NodeInfo, RedbBackend, Role,
    StateMachine, TypeConfig,
};
use tokio::sync::watch;

use crate::config::{ClusterConfig, NodeConfig, SiteRole};
use crate::node::Node;
pub(crate) use rpc::Committed;
use rpc::{Rpc, RpcReply, WriteRefusal};

/// The file of a node's Raft log, vote, state machine and snapshot.
pub(crate) const METADATA_FILE: &str = "metadata.redb";

/// Longest a metadata change waits to be committed before the caller is
/// told that no majority answered.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a change waits for other nodes to apply it (legs created,
/// ownership taken) before the caller is told which did not.
pub(crate) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest one attempt to reach the leader waits: a leader that died or
/// was cut off is only noticed after the link's idle timeout (3 s), so a
/// change tries again soon, by another route (through another voter) every
/// other attempt. A commit takes a round trip or two.
const DIRECT_ATTEMPT: Duration = Duration::from_secs(1);
const RELAYED_ATTEMPT: Duration = Duration::from_millis(2500);

/// A voter counts as reachable when heard from within this window; every
/// node probes every voter each `PROBE_INTERVAL`.
const LIVE_WINDOW: Duration = Duration::from_millis(2500);
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("metadata store {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: stretch_metadata::StoreError,
    },
    #[error("cannot start Raft: {0}")]
    Start(String),
    #[error(
        "no majority of the metadata voters committed the change within {seconds} s: this node reaches {reached} ({reachable}); a majority of {voters} is needed"
    )]
    NoQuorum {
        seconds: u64,
        reached: String,
        reachable: usize,
        voters: usize,
    },
    #[error("{0}")]
    Refused(#[from] CommandError),
    #[error("the metadata service is stopping")]
    Stopping,
}

/// The metadata as this node applied it, and the index of the last entry.
pub(crate) type Applied = (Arc<ClusterMetadata>, u64);

/// One node's Raft member.
pub(crate) struct Control {
    raft: Raft<TypeConfig, StateMachine<RedbBackend>>,
    id: NodeId,
    voters: BTreeMap<NodeId, NodeInfo>,
    applied: watch::Receiver<Applied>,
    node: Weak<Node>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("id", &self.id)
            .field("voters", &self.voters)
            .finish()
    }
}

/// The store of a node, opened before anything else so the node starts
/// from the metadata it last applied.
#[derive(Debug)]
pub(crate) struct OpenedStore {
    backend: RedbBackend,
    state_machine: StateMachine<RedbBackend>,
    pub applied: watch::Receiver<Applied>,
}

/// Where a node's lease service is, once it exists: the store's observer
/// tells it of every applied batch (it fences sites that lost a group).
pub(crate) type LeaseCell = Arc<std::sync::OnceLock<Arc<lease::Leases>>>;

/// Opens (or creates) the metadata store in `root`.
pub(crate) fn open_store(root: &Path, leases: LeaseCell) -> Result<OpenedStore, ControlError> {
    let path = root.join(METADATA_FILE);
    let store_error = |source| ControlError::Store {
        path: path.display().to_string(),
        source,
    };
    let backend = RedbBackend::open(&path).map_err(store_error)?;
    let state_machine =
        StateMachine::<_, TypeConfig>::open(backend.clone()).map_err(store_error)?;
    let index = state_machine.last_applied().map_or(0, |id| id.index);
    let (sender, applied) = watch::channel((Arc::new(state_machine.metadata().clone()), index));
    let state_machine = state_machine.with_observer(Arc::new(move |metadata, index| {
        // Fences first: nobody may learn this node applied the batch
        // (through the watch, or Raft's answers) before its grants follow.
        if let Some(leases) = leases.get() {
            leases.observe(metadata, index);
        }
        sender.send_replace((Arc::new(metadata.clone()), index));
    }));
    Ok(OpenedStore {
        backend,
        state_machine,
        applied,
    })
}

/// The Raft id of a node: a hash of its name, so every node of the
/// config computes the same ids without coordination.
pub(crate) fn node_id(name: &str) -> NodeId {
    format!("stretch-node:{name}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

fn node_info(config: &ClusterConfig, node: &NodeConfig) -> NodeInfo {
    let role = match config.site(&node.site).map(|site| site.role) {
        Some(SiteRole::Witness) => Role::Witness,
        _ => Role::Data,
    };
    NodeInfo {
        name: node.name.clone(),
        site: node.site.clone(),
        role,
        addr: node
            .peer_listen
            .map(|address| address.to_string())
            .unwrap_or_default(),
    }
}

/// The voters of the metadata cluster as `local` sees them.
pub(crate) fn voters(config: &ClusterConfig, local: &NodeConfig) -> BTreeMap<NodeId, NodeInfo> {
    if config.data_sites().len() < 2 {
        return BTreeMap::from([(node_id(&local.name), node_info(config, local))]);
    }
    config
        .nodes
        .iter()
        .map(|node| (node_id(&node.name), node_info(config, node)))
        .collect()
}

impl Control {
    /// Starts this node's Raft member on its opened store. Peers must be
    /// running (they carry the RPCs); the node learns of every applied
    /// change through `store.applied`.
    pub(crate) async fn start(
        node: &Arc<Node>,
        config: &ClusterConfig,
        local: &NodeConfig,
        store: OpenedStore,
    ) -> Result<Arc<Control>, ControlError> {
        let voters = voters(config, local);
        // Leases and failover count sites: each voter stands for its site.
        let mut sites = std::collections::BTreeSet::new();
        for info in voters.values() {
            if !sites.insert(info.site.as_str()) {
                return Err(ControlError::Start(format!(
                    "site {:?} has more than one [[node]]: a cluster with several data sites runs one node per site",
                    info.site
                )));
            }
        }
        let ids: std::collections::BTreeSet<NodeId> = voters.keys().copied().collect();
        if ids.len() != voters.len() {
            return Err(ControlError::Start(
                "two node names hash to one Raft id; rename one of them".into(),
            ));
        }
        let raft_config =
            stretch_metadata::raft_config(&config.cluster.name).map_err(ControlError::Start)?;
        let id = node_id(&local.name);
        let raft = Raft::new(
            id,
            Arc::new(raft_config),
            network::Network {
                node: Arc::downgrade(node),
            },
            LogStore::<_, TypeConfig>::new(store.backend),
            store.state_machine,
        )
        .await
        .map_err(|error| ControlError::Start(error.to_string()))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|error| ControlError::Start(error.to_string()))?;
        if !initialized {
            // Every voter proposes the same membership; openraft elects one
            // leader among them. An already formed cluster answers
            // NotAllowed, which is fine.
            if let Err(error) = raft.initialize(voters.clone()).await {
                tracing::debug!(%error, "metadata cluster already initialized");
            }
        }
        let control = Arc::new(Control {
            raft,
            id,
            voters,
            applied: store.applied,
            node: Arc::downgrade(node),
        });
        tracing::info!(
            node = %local.name,
            raft_id = id,
            voters = control.voters.len(),
            "metadata member started"
        );
        Ok(control)
    }

    pub(crate) async fn shutdown(&self) {
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "metadata member did not stop cleanly");
        }
    }

    /// The metadata as applied here.
    pub(crate) fn applied(&self) -> Applied {
        self.applied.borrow().clone()
    }

    /// Watches what this node applies.
    pub(crate) fn watch_applied(&self) -> watch::Receiver<Applied> {
        self.applied.clone()
    }

    /// Waits until this node applied `index`; false after `timeout`.
    pub(crate) async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut applied = self.applied.clone();
        tokio::time::timeout(timeout, applied.wait_for(|(_, at)| *at >= index))
            .await
            .is_ok_and(|result| result.is_ok())
    }

    fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    /// Commits `command` through the leader (this node or another) and
    /// waits until this node applied it too. Fails with `NoQuorum` when no
    /// majority commits it within [`WRITE_TIMEOUT`]. An attempt whose
    /// answer is lost is tried again, so a command may be committed twice:
    /// every command is checked on apply (names, ids, epochs), so the
    /// second is refused and changes nothing, and callers read a refusal
    /// that says "already done" as success (see `volumes`).
    pub(crate) async fn write(&self, command: Command) -> Result<Committed, ControlError> {
        let started = Instant::now();
        let deadline = started + WRITE_TIMEOUT;
        let mut attempt_number = 0u32;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.no_quorum());
            }
            attempt_number += 1;
            let known = self.leader();
            let attempt = async {
                match known {
                    Some(leader) if leader == self.id => {
                        self.write_here(command.clone(), left).await
                    }
                    Some(leader) => {
                        let relay = attempt_number.is_multiple_of(2);
                        self.forward(leader, command.clone(), relay, left).await
                    }
                    None => Err(WriteRefusal::NotLeader { leader: None }),
                }
            };
            // A new leader ends the attempt at once: waiting out an attempt
            // sent to a leader that died would only delay the change (a
            // failover, typically). A retry of a change that was committed
            // after all is refused as done (see above).
            let mut metrics = self.raft.metrics();
            let leader_changed = async move {
                while metrics.borrow_watched().current_leader == known {
                    if metrics.changed().await.is_err() {
                        // Raft stopped: let the attempt end by itself.
                        std::future::pending::<()>().await;
                    }
                }
            };
            let attempt = tokio::select! {
                attempt = attempt => attempt,
                () = leader_changed => Err(WriteRefusal::NotLeader { leader: None }),
            };
            match attempt {
                Ok(committed) => {
                    // The caller acts on the node's applied state next.
                    let left = deadline.saturating_duration_since(Instant::now());
                    self.wait_applied(committed.index, left.max(CONFIRM_TIMEOUT))
                        .await;
                    return Ok(committed);
                }
                Err(WriteRefusal::NotLeader { .. }) | Err(WriteRefusal::Unknown(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The outcome of a command; a refused command is an error.
    pub(crate) async fn execute(
        &self,
        command: Command,
    ) -> Result<(stretch_metadata::Outcome, u64), ControlError> {
        let committed = self.write(command).await?;
        let outcome = committed.result?;
        Ok((outcome, committed.index))
    }

    async fn write_here(
        &self,
        command: Command,
        timeout: Duration,
    ) -> Result<Committed, WriteRefusal> {
        match tokio::time::timeout(timeout, self.raft.client_write(command)).await {
            Ok(Ok(response)) => Ok(Committed {
                result: response.data,
                index: response.log_id.index,
            }),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                Err(WriteRefusal::NotLeader {
                    leader: forward.leader_id,
                })
            }
            Ok(Err(error)) => Err(WriteRefusal::Unknown(error.to_string())),
            Err(_) => Err(WriteRefusal::Unknown("not committed in time".into())),
        }
    }

    /// Sends `command` to the leader: directly when connected to it, else
    /// through a connected voter that passes it on (Raft needs no direct
    /// link from every voter to the leader, and a cut between two data
    /// sites leaves both reaching the witness).
    ///
    /// A link to a leader that just died still looks connected until its
    /// idle timeout, so with `relay` the change goes through another voter
    /// even then.
    async fn forward(
        &self,
        leader: NodeId,
        command: Command,
        relay: bool,
        left: Duration,
    ) -> Result<Committed, WriteRefusal> {
        let Some(info) = self.voters.get(&leader) else {
            return Err(WriteRefusal::NotLeader { leader: None });
        };
        let connected = self.connected_voters();
        let relays: Vec<&String> = connected
            .iter()
            .filter(|name| **name != info.name)
            .collect();
        let direct = connected.contains(&info.name) && (!relay || relays.is_empty());
        let (target, hops, attempt) = if direct {
            (info.name.clone(), 0, DIRECT_ATTEMPT)
        } else {
            match relays.first() {
                Some(relay) => ((*relay).clone(), 1, RELAYED_ATTEMPT),
                None => return Err(WriteRefusal::Unknown("no voter reachable".into())),
            }
        };
        self.send_write(&target, command, hops, attempt.min(left))
            .await
    }

    async fn send_write(
        &self,
        target: &str,
        command: Command,
        hops: u8,
        timeout: Duration,
    ) -> Result<Committed, WriteRefusal> {
        let rpc = Rpc::Write { command, hops };
        match network::call(&self.node, target, &rpc, timeout).await {
            Ok(RpcReply::Write(result)) => result,
            Ok(other) => Err(WriteRefusal::Unknown(format!("{other:?}"))),
            Err(reason) => Err(WriteRefusal::Unknown(reason)),
        }
    }

    /// The other voters connected to this node now, by name.
    fn connected_voters(&self) -> Vec<String> {
        let connected = self
            .node
            .upgrade()
            .and_then(|node| node.peers.get().map(|peers| peers.connected_nodes()))
            .unwrap_or_default();
        self.voters
            .iter()
            .filter(|(id, info)| **id != self.id && connected.contains(&info.name))
            .map(|(_, info)| info.name.clone())
            .collect()
    }

    fn no_quorum(&self) -> ControlError {
        let reached = self.reachable_voters();
        ControlError::NoQuorum {
            seconds: WRITE_TIMEOUT.as_secs(),
            reachable: reached.len(),
            reached: reached.join(", "),
            voters: self.voters.len(),
        }
    }

    /// This node and the voters it heard from lately, by name (each node
    /// probes every voter once a second, see [`Control::probe`]).
    fn reachable_voters(&self) -> Vec<String> {
        let connected = self
            .node
            .upgrade()
            .and_then(|node| node.peers.get().map(|peers| peers.live_nodes(LIVE_WINDOW)))
            .unwrap_or_default();
        self.voters
            .iter()
            .filter(|(id, info)| **id == self.id || connected.contains(&info.name))
            .map(|(_, info)| info.name.clone())
            .collect()
    }

    /// Asks each of `nodes` to apply `index` and returns those that did
    /// not confirm within [`CONFIRM_TIMEOUT`].
    pub(crate) async fn confirm_applied(&self, nodes: &[String], index: u64) -> Vec<String> {
        let rpc = Rpc::Applied {
            index,
            timeout_ms: CONFIRM_TIMEOUT.as_millis() as u64,
        };
        let asks = nodes.iter().map(|name| {
            let rpc = &rpc;
            async move {
                let answer = network::call(
                    &self.node,
                    name,
                    rpc,
                    CONFIRM_TIMEOUT + Duration::from_secs(1),
                )
                .await;
                (name.clone(), matches!(answer, Ok(RpcReply::Applied(true))))
            }
        });
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .filter(|(_, confirmed)| !confirmed)
            .map(|(name, _)| name)
            .collect()
    }

    /// Serves a request from another node, at site `from` (as its link
    /// authenticated it).
    pub(crate) async fn serve(&self, rpc: Rpc, from: stretch_core::SiteId) -> RpcReply {
        match rpc {
            Rpc::AppendEntries(request) => RpcReply::AppendEntries(
                self.raft
                    .append_entries(request)
                    .await
                    .map_err(|error| error.to_string()),
            ),
            Rpc::Vote(request) => RpcReply::Vote(
                self.raft
                    .vote(request)
                    .await
                    .map_err(|error| error.to_string()),
            ),
            Rpc::PreVote(request) => RpcReply::Vote(
                self.raft
                    .pre_vote(request)
                    .await
                    .map_err(|error| error.to_string()),
            ),
            Rpc::TransferLeader(request) => RpcReply::TransferLeader(
                self.raft
                    .handle_transfer_leader(request)
                    .await
                    .map_err(|error| error.to_string()),
            ),
            Rpc::Snapshot { vote, meta, data } => {
                let snapshot = stretch_metadata::Snapshot::<TypeConfig> {
                    meta,
                    snapshot: data,
                };
                RpcReply::Snapshot(
                    self.raft
                        .install_full_snapshot(vote, snapshot)
                        .await
                        .map_err(|error| error.to_string()),
                )
            }
            Rpc::Write { command, hops } => {
                let result = match self.leader() {
                    Some(leader) if leader == self.id => {
                        self.write_here(command, WRITE_TIMEOUT).await
                    }
                    Some(leader) if hops > 0 => match self.voters.get(&leader) {
                        Some(info) => {
                            let name = info.name.clone();
                            self.send_write(&name, command, hops - 1, DIRECT_ATTEMPT)
                                .await
                        }
                        None => Err(WriteRefusal::NotLeader { leader: None }),
                    },
                    leader => Err(WriteRefusal::NotLeader { leader }),
                };
                RpcReply::Write(result)
            }
            Rpc::Reaches => RpcReply::Reaches(self.connected_voters()),
            Rpc::Applied { index, timeout_ms } => {
                let timeout =
                    Duration::from_millis(timeout_ms.min(CONFIRM_TIMEOUT.as_millis() as u64));
                RpcReply::Applied(self.wait_applied(index, timeout).await)
            }
            Rpc::Lease { id, applied_index } => match self.leases() {
                Some(leases) => {
                    let request = stretch_control::LeaseRequest { id, applied_index };
                    RpcReply::Lease(
                        leases
                            .grant(from, request)
                            .map(|grant| grant.id)
                            .map_err(|refused| (refused.id, refused.need_index)),
                    )
                }
                None => RpcReply::Refused("this node grants no leases yet".into()),
            },
            Rpc::LeaseState { site, index } => match self.leases() {
                Some(leases) => {
                    RpcReply::LeaseState(leases.state_of(stretch_core::SiteId(site), index))
                }
                None => RpcReply::Refused("this node grants no leases yet".into()),
            },
        }
    }

    fn leases(&self) -> Option<Arc<lease::Leases>> {
        self.node.upgrade()?.leases.get().cloned()
    }

    /// Records the config's sites and nodes in the metadata, from whichever
    /// node is leader; ends once they are all there.
    pub(crate) async fn seed(
        self: Arc<Self>,
        config: ClusterConfig,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let (metadata, _) = self.applied();
            let mut missing: Vec<Command> = config
                .sites
                .iter()
                .filter(|site| !metadata.sites.contains_key(&site.name))
                .map(|site| Command::AddSite {
                    name: site.name.clone(),
                    role: match site.role {
                        SiteRole::Data => Role::Data,
                        SiteRole::Witness => Role::Witness,
                    },
                })
                .collect();
            missing.extend(
                self.voters
                    .iter()
                    .filter(|(id, _)| !metadata.nodes.contains_key(id))
                    .map(|(id, info)| Command::AddNode {
                        id: *id,
                        info: info.clone(),
                    }),
            );
            if missing.is_empty() {
                return;
            }
            if self.leader() == Some(self.id) {
                for command in missing {
                    match self.write_here(command, WRITE_TIMEOUT).await {
                        Ok(Committed {
                            result: Err(error), ..
                        }) => {
                            tracing::warn!(%error, "cannot record the cluster config in the metadata");
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Keeps leadership at a voter that reaches every other one, the
    /// witness whenever it does (`stretch_control::hand_leadership_to`):
    /// Raft replicates only from the leader, so with the witness leading a
    /// cut between two data sites that both reach it leaves both applying
    /// every change, and a leader cut from a voter would leave that voter
    /// behind on the metadata (and, fenced, without a lease) while it
    /// still reaches a majority. Every second the leader asks the voters
    /// it is connected to whom they reach. Ends when `stop` turns true.
    pub(crate) async fn place_leadership(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let witness = self
            .voters
            .iter()
            .find(|(id, info)| info.role == Role::Witness && **id != self.id)
            .map(|(id, _)| *id);
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            if self.leader() != Some(self.id) {
                continue;
            }
            let connected = self.connected_voters();
            let node = &self.node;
            let asks = connected.iter().map(|name| async move {
                let answer = network::call(node, name, &Rpc::Reaches, Duration::from_secs(1)).await;
                (name.clone(), answer)
            });
            let mut reached = Vec::new();
            for (name, answer) in futures_util::future::join_all(asks).await {
                let (Some((id, _)), Ok(RpcReply::Reaches(theirs))) = (
                    self.voters.iter().find(|(_, info)| info.name == name),
                    answer,
                ) else {
                    continue;
                };
                let reaches_all = self
                    .voters
                    .iter()
                    .all(|(_, info)| info.name == name || theirs.contains(&info.name));
                reached.push(stretch_control::Reach {
                    voter: *id,
                    reaches_all,
                });
            }
            let reaches_all = connected.len() + 1 == self.voters.len();
            let Some(to) = stretch_control::hand_leadership_to(reaches_all, witness, &reached)
            else {
                continue;
            };
            let name = self.voters.get(&to).map_or("?", |info| info.name.as_str());
            tracing::info!(to = %name, "handing metadata leadership to a voter that reaches every other");
            if let Err(error) = self.raft.trigger().transfer_leader(to).await {
                tracing::warn!(%error, "cannot hand metadata leadership over");
            }
        }
    }

    /// Asks every connected voter a trivial question once a second, so
    /// that "reachable" in `status` and in errors means "answered lately",
    /// not merely "connection not yet timed out". Ends when `stop` turns
    /// true.
    pub(crate) async fn probe(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let ask = Rpc::Applied {
            index: 0,
            timeout_ms: 0,
        };
        loop {
            tokio::select! {
                () = tokio::time::sleep(PROBE_INTERVAL) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            let node = &self.node;
            let asks = self.connected_voters().into_iter().map(|name| {
                let ask = &ask;
                async move { network::call(node, &name, ask, PROBE_INTERVAL).await }
            });
            futures_util::future::join_all(asks).await;
        }
    }

    /// Logs each change of leader as this node sees it, and when it has
    /// none (no majority reachable). Ends when `stop` turns true.
    pub(crate) async fn log_leader_changes(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut metrics = self.raft.metrics();
        let mut last: Option<Option<NodeId>> = None;
        loop {
            let (leader, term) = {
                let now = metrics.borrow_watched();
                (now.current_leader, now.current_term)
            };
            if last != Some(leader) {
                match leader.and_then(|id| self.voters.get(&id)) {
                    Some(info) => tracing::info!(leader = %info.name, term, "metadata leader"),
                    None => tracing::warn!(term, "no metadata leader known: volume changes wait"),
                }
                last = Some(leader);
            }
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Raft's view, for `stretch status` and the metrics.
    pub(crate) fn status(&self) -> MetadataStatus {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let name = |id: NodeId| self.voters.get(&id).map(|info| info.name.clone());
        let reachable = self.reachable_voters();
        MetadataStatus {
            state: format!("{:?}", metrics.state).to_lowercase(),
            leader: metrics.current_leader.and_then(name),
            term: metrics.current_term,
            commit_index: metrics.cluster_committed.map_or(0, |id| id.index),
            applied_index: metrics.last_applied.map_or(0, |id| id.index),
            voters: self
                .voters
                .values()
                .map(|info| VoterInfo {
                    name: info.name.clone(),
                    site: info.site.clone(),
                    role: info.role.to_string(),
                    reachable: reachable.contains(&info.name),
                })
                .collect(),
            quorum: metrics.current_leader.is_some() && reachable.len() * 2 > self.voters.len(),
        }
    }
}

/// The metadata cluster as one node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataStatus {
    /// `leader`, `follower`, `candidate`, `learner`.
    pub state: String,
    pub leader: Option<String>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub voters: Vec<VoterInfo>,
    /// Whether this node can get metadata changes committed now (it knows
    /// a leader and reaches a majority, or leads).
    pub quorum: bool,
}

/// One voter of the metadata cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoterInfo {
    pub name: String,
    pub site: String,
    pub role: String,
    /// This node itself, or connected to it now.
    pub reachable: bool,
}
