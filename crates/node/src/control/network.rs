//! openraft's network over the QUIC links between nodes: each RPC is one
//! `RaftRequest` on a stream of its own (mutual TLS, the peer is the node
//! its certificate names), answered by one `RaftReply`. A peer that is not
//! connected or does not answer within openraft's deadline is unreachable:
//! openraft backs off and retries, and elections go on among the others.

use std::future::Future;
use std::sync::Weak;
use std::time::Duration;

use openraft::errors::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{RaftNetworkFactory, RaftNetworkV2};
use stretch_metadata::{NodeId, NodeInfo, Snapshot, SnapshotData, TypeConfig, Vote};

use super::rpc::{Rpc, RpcReply, decode, encode};
use crate::node::Node;

/// Makes a client per peer node.
#[derive(Debug, Clone)]
pub(crate) struct Network {
    pub node: Weak<Node>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Client;

    async fn new_client(&mut self, _target: NodeId, info: &NodeInfo) -> Client {
        Client {
            node: self.node.clone(),
            target: info.name.clone(),
        }
    }
}

/// RPCs to one peer node.
#[derive(Debug)]
pub(crate) struct Client {
    node: Weak<Node>,
    target: String,
}

/// Sends `rpc` to node `target` and waits (at most `timeout`) for its reply.
pub(crate) async fn call(
    node: &Weak<Node>,
    target: &str,
    rpc: &Rpc,
    timeout: Duration,
) -> Result<RpcReply, String> {
    let peers = node
        .upgrade()
        .and_then(|node| node.peers.get().cloned())
        .ok_or_else(|| "this node has no links".to_string())?;
    let body = encode(rpc)?;
    let reply = peers.call(target, body, timeout).await?;
    decode(&reply)
}

impl Client {
    async fn call(&self, rpc: Rpc, option: &RPCOption) -> Result<RpcReply, String> {
        let timeout = stretch_metadata::rpc_timeout(option.hard_ttl());
        call(&self.node, &self.target, &rpc, timeout).await
    }
}

fn unreachable<E>(reason: String) -> E
where
    E: From<Unreachable<TypeConfig>>,
{
    Unreachable::from_string(reason).into()
}

fn unexpected(reply: &RpcReply) -> String {
    match reply {
        RpcReply::Refused(reason) => format!("refused: {reason}"),
        other => format!("an unexpected reply: {other:?}"),
    }
}

impl RaftNetworkV2<TypeConfig> for Client {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(Rpc::AppendEntries(rpc), &option).await {
            Ok(RpcReply::AppendEntries(result)) => result.map_err(unreachable),
            Ok(other) => Err(unreachable(unexpected(&other))),
            Err(reason) => Err(unreachable(reason)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(Rpc::Vote(rpc), &option).await {
            Ok(RpcReply::Vote(result)) => result.map_err(unreachable),
            Ok(other) => Err(unreachable(unexpected(&other))),
            Err(reason) => Err(unreachable(reason)),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(Rpc::PreVote(rpc), &option).await {
            Ok(RpcReply::Vote(result)) => result.map_err(unreachable),
            Ok(other) => Err(unreachable(unexpected(&other))),
            Err(reason) => Err(unreachable(reason)),
        }
    }

    async fn transfer_leader(
        &mut self,
        request: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(Rpc::TransferLeader(request), &option).await {
            Ok(RpcReply::TransferLeader(result)) => result.map_err(unreachable),
            Ok(other) => Err(unreachable(unexpected(&other))),
            Err(reason) => Err(unreachable(reason)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let rpc = Rpc::Snapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        let answer = tokio::select! {
            answer = self.call(rpc, &option) => answer,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        match answer {
            Ok(RpcReply::Snapshot(result)) => result.map_err(unreachable),
            Ok(other) => Err(unreachable(unexpected(&other))),
            Err(reason) => Err(unreachable(reason)),
        }
    }
}
