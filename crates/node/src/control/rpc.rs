//! What nodes ask each other about the metadata, and how it is encoded:
//! openraft's RPCs, writes forwarded to the leader, and "tell me when you
//! applied this". The bodies travel in `PeerMessage::RaftRequest` and
//! `RaftReply` as JSON (openraft's messages are serde types); a body that
//! does not decode is refused like any malformed frame.

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use stretch_metadata::{Command, CommandResult, SnapshotData, SnapshotMeta, TypeConfig, Vote};

/// A request from one node's metadata module to another's.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Rpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    Snapshot {
        vote: Vote,
        meta: SnapshotMeta,
        data: SnapshotData,
    },
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// A command for the leader to commit, from a node that is not leader.
    /// A node that is not leader either passes it on to the leader it
    /// knows while `hops` is above 0: a site cut from the leader reaches
    /// it through another voter (the witness, typically).
    Write {
        command: Command,
        hops: u8,
    },
    /// Answer once the state machine here applied `index`, or after
    /// `timeout_ms` (answering `false`).
    Applied {
        index: u64,
        timeout_ms: u64,
    },
    /// Renew the asking node's ownership lease (request `id`; the asker
    /// applied the metadata up to `applied_index`). The asker's site is
    /// the one its link authenticated, never a field of the request.
    Lease {
        id: u64,
        applied_index: u64,
    },
    /// How long this voter's promises to `site` may still run, and those
    /// made without knowing the entry at `index` (a takeover's question).
    LeaseState {
        site: u32,
        index: u64,
    },
    /// Which voters this node is connected to (the leader asks, to place
    /// leadership where every voter is reached).
    Reaches,
}

/// The answer to an [`Rpc`]; errors of the serving node travel as text.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RpcReply {
    AppendEntries(Result<AppendEntriesResponse<TypeConfig>, String>),
    Vote(Result<VoteResponse<TypeConfig>, String>),
    Snapshot(Result<SnapshotResponse<TypeConfig>, String>),
    TransferLeader(Result<TransferLeaderResponse<TypeConfig>, String>),
    Write(Result<Committed, WriteRefusal>),
    Applied(bool),
    /// The lease asked for by request `id` is granted, or refused until
    /// the asker applied `need_index`: `Err((id, need_index))`.
    Lease(Result<u64, (u64, u64)>),
    LeaseState(stretch_control::LeaseState),
    /// The names of the voters the answering node is connected to.
    Reaches(Vec<String>),
    /// The request could not be served at all (the node is starting or
    /// stopping, or the body did not decode).
    Refused(String),
}

/// A command committed and applied at the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Committed {
    pub result: CommandResult,
    /// The log index of the entry: a node that applied it knows the outcome.
    pub index: u64,
}

/// Why a forwarded write was not committed by the node it reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum WriteRefusal {
    /// That node is not the leader (any more); try the one it names.
    NotLeader { leader: Option<u64> },
    /// That node is the leader but could not commit in time: it may lack a
    /// majority. The outcome is unknown.
    Unknown(String),
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(value).map_err(|error| format!("cannot encode a metadata message: {error}"))
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|error| format!("malformed metadata message: {error}"))
}
