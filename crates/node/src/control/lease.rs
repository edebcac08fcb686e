//! Ownership leases on a node: the runtime side of `stretch_control`'s
//! [`Holder`], [`Grantor`] and [`Takeover`] (the rules are there; this file
//! only carries their messages and feeds them time).
//!
//! Every node of a multi-site cluster is a voter and so a grantor; each
//! data node is also a holder: it renews its lease with every voter
//! directly every `renew_ms`, and tells its engine until when the lease
//! runs. The engine holds the writes and strict reads of the groups this
//! site owns while it does not, and never acknowledges one after it ran
//! out.
//!
//! One clock per node: [`Instant`] since the node's driver started (the
//! engine's clock), so a lease computed here means the same instant to the
//! engine.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stretch_control::{
    Grant, GrantRefused, Grantor, Holder, LeaseConfig, LeaseRequest, LeaseState, Takeover,
    TakeoverState, holds_no_lease, takeover_heard_enough,
};
use stretch_core::{SiteId, Timestamp};
use stretch_metadata::ClusterMetadata;
use tokio::sync::watch;

use super::network;
use super::rpc::{Rpc, RpcReply};
use crate::node::Node;

/// How long a lease-state question to another voter may take before it
/// counts as unanswered.
const STATE_TIMEOUT: Duration = Duration::from_millis(stretch_control::LEASE_STATE_TIMEOUT_MS);

/// The lease side of one node.
#[derive(Debug)]
pub(crate) struct Leases {
    config: LeaseConfig,
    origin: Instant,
    grantor: Mutex<Grantor>,
    /// Who owned each group after the last applied batch: an owner change
    /// fences the old owner at this voter.
    owners: Mutex<BTreeMap<u32, String>>,
    /// This node's lease, at a data node of a multi-site cluster.
    holder: Option<Mutex<Holder>>,
    /// The voters, by node name, with their site numbers.
    voters: Vec<(String, SiteId)>,
    site_ids: BTreeMap<String, SiteId>,
    local_node: String,
    /// Before this instant the lease counts as not held: set at start when
    /// this site took a group over and may have stopped before the old
    /// owner's lease ran out (the takeover wait is not remembered).
    serve_from: Timestamp,
}

impl Leases {
    /// `origin` is the engine's clock; `voters` names each voter node and
    /// its site; `holds` is true at a data node of a multi-site cluster.
    fn new(setup: Setup, metadata: &ClusterMetadata, applied_index: u64) -> Leases {
        let Setup {
            config,
            origin,
            local_node,
            local_site,
            voters,
            site_ids,
            holds,
        } = setup;
        let now = Timestamp(origin.elapsed().as_nanos() as u64);
        let voter_sites: Vec<SiteId> = voters.iter().map(|(_, site)| *site).collect();
        let took_over = metadata.groups.values().any(|group| {
            group.owner == local_site
                && group
                    .last_failover
                    .as_ref()
                    .is_some_and(|failover| failover.epoch == group.epoch)
        });
        let serve_from = if took_over {
            Timestamp(now.0.saturating_add(config.takeover_wait_max_ns()))
        } else {
            Timestamp(0)
        };
        // Above every id an earlier run used: the wall clock in
        // microseconds at start (a run renews far less than once per
        // microsecond).
        let first_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |since| since.as_micros() as u64);
        Leases {
            config,
            origin,
            grantor: Mutex::new(Grantor::new(config, now, applied_index)),
            owners: Mutex::new(owners_of(metadata)),
            holder: holds.then(|| Mutex::new(Holder::new(config, voter_sites, first_id))),
            voters,
            site_ids,
            local_node,
            serve_from,
        }
    }

    pub(crate) fn config(&self) -> LeaseConfig {
        self.config
    }

    pub(crate) fn now(&self) -> Timestamp {
        Timestamp(self.origin.elapsed().as_nanos() as u64)
    }

    /// Called after every batch of entries this node applied (before
    /// anyone learns it applied them): fences the sites that lost a group.
    pub(crate) fn observe(&self, metadata: &ClusterMetadata, index: u64) {
        let now_owners = owners_of(metadata);
        let mut owners = self.owners.lock();
        let mut grantor = self.grantor.lock();
        for (group, owner) in owners.iter() {
            if now_owners.get(group) == Some(owner) {
                continue;
            }
            if let Some(site) = self.site_ids.get(owner) {
                grantor.fence(*site, index);
            }
        }
        grantor.applied(index);
        *owners = now_owners;
    }

    /// Answers a lease request from the node at `from`.
    pub(crate) fn grant(&self, from: SiteId, request: LeaseRequest) -> Result<Grant, GrantRefused> {
        self.grantor.lock().request(self.now(), from, request)
    }

    /// Answers a question about `site`'s leases (see [`LeaseState`]).
    pub(crate) fn state_of(&self, site: SiteId, index: u64) -> LeaseState {
        self.grantor.lock().lease_state(self.now(), site, index)
    }

    /// Until when (this node's clock) its lease runs; `None` if it holds
    /// none (or is not a holder).
    pub(crate) fn valid_until(&self) -> Option<Timestamp> {
        if self.now() < self.serve_from {
            return None;
        }
        self.holder.as_ref()?.lock().valid_until()
    }

    /// Whether this node holds leases at all.
    pub(crate) fn is_holder(&self) -> bool {
        self.holder.is_some()
    }

    /// The number of a site, by name.
    pub(crate) fn site_id(&self, site: &str) -> Option<SiteId> {
        self.site_ids.get(site).copied()
    }

    /// The voters' site numbers.
    pub(crate) fn voter_sites(&self) -> Vec<SiteId> {
        self.voters.iter().map(|(_, site)| *site).collect()
    }

    /// Renews this node's lease every `renew_ms` with every voter, and
    /// keeps the engine told of it. Ends when `stop` turns true.
    pub(crate) async fn renew(self: Arc<Self>, node: Weak<Node>, mut stop: watch::Receiver<bool>) {
        let Some(holder) = &self.holder else {
            return;
        };
        let period = Duration::from_millis(self.config.renew_ms);
        loop {
            let Some(live) = node.upgrade() else {
                return;
            };
            let request = holder.lock().renew(self.now(), live.reconciled_index());
            drop(live);
            for (voter, site) in &self.voters {
                if *voter == self.local_node {
                    self.answer(*site, Ok(self.grant(*site, request)));
                    continue;
                }
                let leases = self.clone();
                let node = node.clone();
                let (voter, site) = (voter.clone(), *site);
                tokio::spawn(async move {
                    let rpc = Rpc::Lease {
                        id: request.id,
                        applied_index: request.applied_index,
                    };
                    let timeout = Duration::from_millis(leases.config.lease_ms);
                    match network::call(&node, &voter, &rpc, timeout).await {
                        Ok(RpcReply::Lease(Ok(id))) => leases.answer(site, Ok(Ok(Grant { id }))),
                        Ok(RpcReply::Lease(Err((id, need_index)))) => {
                            leases.answer(site, Ok(Err(GrantRefused { id, need_index })));
                        }
                        Ok(other) => leases.answer(site, Err(format!("{other:?}"))),
                        Err(reason) => leases.answer(site, Err(reason)),
                    }
                    if let Some(node) = node.upgrade() {
                        leases.tell_engine(&node);
                    }
                });
            }
            if let Some(node) = node.upgrade() {
                self.tell_engine(&node);
            }
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    fn answer(&self, from: SiteId, answer: Result<Result<Grant, GrantRefused>, String>) {
        let Some(holder) = &self.holder else {
            return;
        };
        match answer {
            Ok(Ok(grant)) => holder.lock().granted(from, grant),
            Ok(Err(refusal)) => {
                tracing::debug!(voter = %from, need_index = refusal.need_index,
                    "lease refused until this node applies a newer ownership change");
                holder.lock().refused(from, refusal);
            }
            Err(reason) => tracing::trace!(voter = %from, %reason, "no lease answer"),
        }
    }

    fn tell_engine(&self, node: &Node) {
        let until = self.valid_until();
        node.driver.with_engine(|engine| {
            let now = node.driver.now();
            engine.set_lease_until(now, until);
        });
    }

    /// Whether `site` holds no lease: a majority of the voters (this node
    /// included) answered that no promise they made to it still runs.
    /// Returns as soon as the answers decide it.
    pub(crate) async fn holds_no_lease(&self, node: &Weak<Node>, site: SiteId) -> bool {
        let voters = self.voters.len();
        let answers = self
            .ask_state(node, site, 0, |answers| {
                holds_no_lease(voters, answers).is_some()
            })
            .await;
        holds_no_lease(voters, &answers) == Some(true)
    }

    /// Asks every voter about `site`'s leases at `index`; the answers that
    /// came, by voter site, once `enough` says they decide the question
    /// or every voter answered or [`STATE_TIMEOUT`] passed. An unreachable
    /// voter does not hold up a majority that answered.
    pub(crate) async fn ask_state(
        &self,
        node: &Weak<Node>,
        site: SiteId,
        index: u64,
        enough: impl Fn(&[(SiteId, LeaseState)]) -> bool,
    ) -> Vec<(SiteId, LeaseState)> {
        use futures_util::StreamExt;
        let mut asks: futures_util::stream::FuturesUnordered<_> = self
            .voters
            .iter()
            .map(|(voter, voter_site)| async move {
                if *voter == self.local_node {
                    return Some((*voter_site, self.state_of(site, index)));
                }
                let rpc = Rpc::LeaseState {
                    site: site.0,
                    index,
                };
                match network::call(node, voter, &rpc, STATE_TIMEOUT).await {
                    Ok(RpcReply::LeaseState(state)) => Some((*voter_site, state)),
                    _ => None,
                }
            })
            .collect();
        let mut answers = Vec::new();
        while let Some(answer) = asks.next().await {
            answers.extend(answer);
            if enough(&answers) {
                break;
            }
        }
        answers
    }

    /// Waits until the old owner `from` of a group this node took by the
    /// entry at `index` can no longer write it (see [`Takeover`]). Polls
    /// the voters that have not answered every 50 ms.
    pub(crate) async fn wait_takeover(&self, node: &Weak<Node>, from: SiteId, index: u64) {
        let mut takeover = Takeover::new(self.config, self.voter_sites(), from, index);
        loop {
            let now = self.now();
            if takeover.state(now) == TakeoverState::Ready {
                return;
            }
            if takeover.ready_at().is_none() {
                // Each answer counts from when it arrives (later is safe):
                // stop asking once a majority of voters applied the entry.
                let voters = self.voters.len();
                let answers = self
                    .ask_state(node, from, index, |answers| {
                        takeover_heard_enough(voters, answers)
                    })
                    .await;
                let now = self.now();
                for (voter, state) in answers {
                    if let Some(remaining) = state.outstanding_ns {
                        takeover.answered(now, voter, remaining);
                    }
                }
            }
            let wait = match takeover.ready_at() {
                Some(at) if at > now => Duration::from_nanos(at.0 - now.0),
                _ => Duration::from_millis(50),
            };
            tokio::time::sleep(wait.min(Duration::from_millis(50))).await;
        }
    }
}

fn owners_of(metadata: &ClusterMetadata) -> BTreeMap<u32, String> {
    metadata
        .groups
        .values()
        .map(|group| (group.id, group.owner.clone()))
        .collect()
}

/// The lease service of a node of a multi-site cluster, on the engine's
/// clock, knowing the metadata as last applied (`metadata`, `index`).
pub(crate) fn start_leases(
    node: &Node,
    config: &crate::config::ClusterConfig,
    local: &crate::config::NodeConfig,
    metadata: &ClusterMetadata,
    index: u64,
) -> Arc<Leases> {
    let site_ids: BTreeMap<String, SiteId> = config
        .sites
        .iter()
        .filter_map(|site| Some((site.name.clone(), node.sites.id(&site.name)?)))
        .collect();
    let voters: Vec<(String, SiteId)> = super::voters(config, local)
        .into_values()
        .filter_map(|info| Some((info.name, *site_ids.get(&info.site)?)))
        .collect();
    let setup = Setup {
        config: config.tuning.lease(),
        origin: node.driver.origin(),
        local_node: local.name.clone(),
        local_site: local.site.clone(),
        voters,
        site_ids,
        holds: !node.is_witness(),
    };
    Arc::new(Leases::new(setup, metadata, index))
}

/// What a node's lease service is made of.
struct Setup {
    config: LeaseConfig,
    origin: Instant,
    local_node: String,
    local_site: String,
    voters: Vec<(String, SiteId)>,
    site_ids: BTreeMap<String, SiteId>,
    holds: bool,
}
