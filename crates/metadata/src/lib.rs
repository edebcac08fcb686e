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
    EPOCH_HISTORY_MAX, EpochStart, Failover, FailoverRecord, Group, GroupId, GroupState, Mode,
    Move, NodeId, NodeInfo, Role, Site, Volume, VolumeId,
};

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
