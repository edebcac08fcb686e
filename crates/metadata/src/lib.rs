//! Cluster metadata of stretch, replicated with openraft (DESIGN §4).
//!
//! What is here:
//! - [`ClusterMetadata`], the replicated state machine (sites, nodes,
//!   volumes with Raft-allocated ids, consistency groups with owner and
//!   epoch, moves in flight, tombstones) and the pure, deterministic rules
//!   that apply a [`Command`] to it;
//! - openraft's log and state-machine storage for it, written once over a
//!   small [`Backend`] trait and provided twice: [`RedbBackend`], one redb
//!   file on disk, and [`MemBackend`], in memory for the deterministic
//!   simulator (it survives a simulated restart when the handle is kept).
//!   Both pass openraft's storage test suite.
//! - [`MetadataConfig`]: the stores work for any openraft type
//!   configuration whose log carries [`Command`]s, so the node ([`TypeConfig`],
//!   tokio) and the simulator (its own config from
//!   [`declare_metadata_config!`], with a deterministic runtime) share them.
//!
//! The node runs a `Raft` on [`RedbBackend`] with its RPCs over the QUIC
//! links between sites (`stretch-node`'s `control` module); an
//! [`Observer`] on the state machine tells it what changed.

use openraft::{EntryPayload, RaftTypeConfig};

mod backend;
mod command;
mod error;
mod log_store;
mod mem;
mod metadata;
mod redb_store;
mod state_machine;
mod types;

pub use backend::{AppliedState, Backend, StoredSnapshot};
pub use command::{Command, CommandError, CommandResult, Outcome};
pub use error::StoreError;
pub use log_store::LogStore;
pub use mem::MemBackend;
pub use metadata::{BLOCK_SIZE, ClusterMetadata};
pub use redb_store::RedbBackend;
pub use state_machine::{Observer, SnapshotBuilder, StateMachine};
pub use types::{
    EPOCH_HISTORY_MAX, EpochStart, Failover, FailoverRecord, FastDrain, FastSeal, Follow, Group,
    GroupId, GroupState, Mode, Move, NodeId, NodeInfo, Role, Site, Volume, VolumeId,
};

/// Raft timing, the same on every node and in the simulator. Heartbeats
/// every 250 ms: openraft gives each heartbeat exactly that long to be
/// answered, and a leader whose heartbeats a majority has not answered
/// within its lease (`election_timeout_max`) refuses new writes while
/// still keeping the followers from electing another (CheckQuorum). With
/// 100 ms, a leader whose only peers were 50 ms away or more (a round trip
/// over 100 ms) froze the metadata, as the simulator showed; 250 ms leaves
/// room for round trips up to a quarter second. An election after 1–2 s
/// without a heartbeat: four times and more the interval, so a slow link
/// never causes an election. Pre-vote keeps a node that was cut off from
/// deposing a healthy leader when it returns.
pub const HEARTBEAT_MS: u64 = 250;
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 1000;
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 2000;

/// Shortest time a Raft RPC is given to travel and be answered. openraft
/// proposes its heartbeat interval (100 ms) as the deadline of every
/// append-entries call; a link whose round trip is longer would then never
/// replicate an entry, so calls wait at least this long (a WAN round trip
/// is far below it; a dead peer is still given up on in time for the next
/// heartbeat's retry).
pub const RPC_TIMEOUT_MIN_MS: u64 = 1_000;

/// The deadline of a Raft RPC openraft gives `hard_ttl` for.
pub fn rpc_timeout(hard_ttl: std::time::Duration) -> std::time::Duration {
    hard_ttl.max(std::time::Duration::from_millis(RPC_TIMEOUT_MIN_MS))
}

/// The openraft configuration of the metadata cluster named `cluster_name`.
pub fn raft_config(cluster_name: &str) -> Result<openraft::Config, String> {
    openraft::Config {
        cluster_name: cluster_name.to_string(),
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
        election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
        enable_pre_vote: Some(true),
        // A leader that restarted comes back as a follower and the voters
        // elect again. Restored as leader at once (openraft's default), it
        // was seen in the simulator to send heartbeats, which keep the
        // others from electing, while refusing every write with "forward
        // to leader: none": the metadata stayed frozen until another
        // fault.
        enable_leader_restore: Some(false),
        ..Default::default()
    }
    .validate()
    .map_err(|error| error.to_string())
}

/// An openraft type configuration whose log carries [`Command`]s: what the
/// stores and the state machine are written against. The node runs
/// [`TypeConfig`] (tokio); the simulator declares its own with
/// [`declare_metadata_config!`] and a deterministic runtime, and uses the
/// same stores.
pub trait MetadataConfig:
    RaftTypeConfig<D = Command, R = CommandResult, NodeId = NodeId, Node = NodeInfo, Entry: Clone>
{
    /// The payload of an entry. openraft's generic entry type has no
    /// accessor for it; the macro implements this for its `Entry`.
    fn payload(entry: &Self::Entry) -> &EntryPayload<Command, NodeId, NodeInfo>;
}

/// Declare a [`MetadataConfig`] named `$name` running on `$runtime`.
#[macro_export]
macro_rules! declare_metadata_config {
    ($(#[$meta:meta])* $vis:vis $name:ident, $runtime:ty) => {
        ::openraft::declare_raft_types!(
            $(#[$meta])*
            $vis $name:
                D = $crate::Command,
                R = $crate::CommandResult,
                NodeId = $crate::NodeId,
                Node = $crate::NodeInfo,
                AsyncRuntime = $runtime,
        );

        impl $crate::MetadataConfig for $name {
            fn payload(
                entry: &<Self as ::openraft::RaftTypeConfig>::Entry,
            ) -> &::openraft::EntryPayload<$crate::Command, $crate::NodeId, $crate::NodeInfo> {
                &entry.payload
            }
        }
    };
}

declare_metadata_config!(
    /// The openraft type configuration of the metadata cluster on a node.
    pub TypeConfig,
    openraft_rt_tokio::TokioRuntime
);

/// A Raft log position.
pub type LogId<C = TypeConfig> = openraft::alias::LogIdOf<C>;
/// A Raft log entry carrying a [`Command`].
pub type Entry<C = TypeConfig> = openraft::alias::EntryOf<C>;
/// A Raft vote.
pub type Vote<C = TypeConfig> = openraft::alias::VoteOf<C>;
/// A membership with the log id that set it.
pub type StoredMembership<C = TypeConfig> = openraft::alias::StoredMembershipOf<C>;
/// What describes a snapshot.
pub type SnapshotMeta<C = TypeConfig> = openraft::alias::SnapshotMetaOf<C>;
/// The bytes of a snapshot: the JSON of a [`ClusterMetadata`].
pub type SnapshotData = Vec<u8>;
/// A snapshot as openraft passes it around.
pub type Snapshot<C = TypeConfig> = openraft::alias::SnapshotOf<C, SnapshotData>;
