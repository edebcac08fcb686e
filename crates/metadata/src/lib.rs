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
//!
//! What is not wired yet: no node or simulator starts a `Raft` on this
//! store, there is no Raft network (RPCs over the QUIC links), no leases,
//! and the per-site catalogs in `stretch-node` are still authoritative.

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
pub use state_machine::{SnapshotBuilder, StateMachine};
pub use types::{
    Failover, Group, GroupId, GroupState, Mode, Move, NodeId, NodeInfo, Role, Site, Volume,
    VolumeId,
};

openraft::declare_raft_types!(
    /// The openraft type configuration of the metadata cluster.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = NodeInfo,
);

/// A Raft log position.
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// A Raft log entry carrying a [`Command`].
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// A Raft vote.
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// A membership with the log id that set it.
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// What describes a snapshot.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
/// The bytes of a snapshot: the JSON of a [`ClusterMetadata`].
pub type SnapshotData = Vec<u8>;
/// A snapshot as openraft passes it around.
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;
