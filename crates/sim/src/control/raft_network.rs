//! openraft's network in the simulator: each RPC is a request served at
//! the target node's `Raft` after the link's delay, and its answer back,
//! both subject to the simulated links; a lost message is a timeout, as
//! on the node's QUIC links.

use std::future::Future;
use std::sync::{Arc, Weak};

use openraft::errors::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{RaftNetworkFactory, RaftNetworkV2};
use openraft_rt::deterministic_rng::DeterministicRng;
use openraft_rt_tokio::TokioRuntime;
use stretch_metadata::{NodeId, NodeInfo, Snapshot, SnapshotData, Vote};

use super::world::World;

stretch_metadata::declare_metadata_config!(
    /// The metadata's Raft in the simulator: tokio's paused clock, and
    /// every random draw of openraft (election timeouts) from the seed.
    pub SimConfig,
    DeterministicRng<TokioRuntime>
);

/// A metadata Raft member in the simulator.
pub(crate) type SimRaft = openraft::Raft<
    SimConfig,
    stretch_metadata::StateMachine<stretch_metadata::MemBackend<SimConfig>, SimConfig>,
>;

/// Makes a client per peer for the node at `from`.
pub(crate) struct SimNetwork {
    pub world: Weak<World>,
    pub from: usize,
}

impl RaftNetworkFactory<SimConfig> for SimNetwork {
    type Network = SimClient;

    async fn new_client(&mut self, target: NodeId, _info: &NodeInfo) -> SimClient {
        SimClient {
            world: self.world.clone(),
            from: self.from,
            target,
        }
    }
}

pub(crate) struct SimClient {
    world: Weak<World>,
    from: usize,
    target: NodeId,
}

fn unreachable<E: From<Unreachable<SimConfig>>>(reason: &str) -> E {
    Unreachable::from_string(reason).into()
}

impl SimClient {
    /// Runs `serve` on the target's `Raft`; `Err` when the trip failed.
    async fn call<R, E, F, Fut>(&self, option: &RPCOption, serve: F) -> Result<R, String>
    where
        F: FnOnce(SimRaft) -> Fut,
        Fut: Future<Output = Result<R, E>>,
        E: std::fmt::Display,
    {
        let world: Arc<World> = self.world.upgrade().ok_or("the run ended")?;
        let to = world
            .site_of_node(self.target)
            .ok_or("no such node in this run")?;
        let timeout = stretch_metadata::rpc_timeout(option.hard_ttl());
        let answer = world
            .call(self.from, to, timeout, |member| async move {
                match member.raft() {
                    Some(raft) => serve(raft).await.map_err(|error| error.to_string()),
                    None => Err("the node is starting".to_string()),
                }
            })
            .await;
        answer.ok_or_else(|| "no answer in time".to_string())?
    }
}

impl RaftNetworkV2<SimConfig> for SimClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<SimConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<SimConfig>, RPCError<SimConfig>> {
        self.call(
            &option,
            |raft| async move { raft.append_entries(rpc).await },
        )
        .await
        .map_err(|reason| unreachable(&reason))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<SimConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<SimConfig>, RPCError<SimConfig>> {
        self.call(&option, |raft| async move { raft.vote(rpc).await })
            .await
            .map_err(|reason| unreachable(&reason))
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<SimConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<SimConfig>, RPCError<SimConfig>> {
        self.call(&option, |raft| async move { raft.pre_vote(rpc).await })
            .await
            .map_err(|reason| unreachable(&reason))
    }

    async fn transfer_leader(
        &mut self,
        request: TransferLeaderRequest<SimConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<SimConfig>, RPCError<SimConfig>> {
        self.call(&option, |raft| async move {
            raft.handle_transfer_leader(request).await
        })
        .await
        .map_err(|reason| unreachable(&reason))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<SimConfig>,
        snapshot: Snapshot<SimConfig>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<SimConfig>, StreamingError<SimConfig>> {
        // The call is bounded by its timeout; a cancelled replication
        // simply drops this future.
        self.call(&option, |raft| async move {
            raft.install_full_snapshot(vote, snapshot).await
        })
        .await
        .map_err(|reason| unreachable(&reason))
    }
}
