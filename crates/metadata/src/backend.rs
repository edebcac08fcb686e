//! The storage primitives both stores are built on, and the state-machine
//! record they persist.
//!
//! openraft's storage traits are implemented once, in `log_store` and
//! `state_machine`, over this trait; a backend only keeps records. Every
//! method that writes returns only once the write is durable (for redb:
//! after a commit with `Durability::Immediate`, i.e. after fsync), because
//! openraft treats a completed write as persistent.

use std::ops::RangeBounds;

use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use serde::{Deserialize, Serialize};

use crate::command::{CommandResult, Outcome};
use crate::error::StoreError;
use crate::metadata::ClusterMetadata;
use crate::{Entry, LogId, MetadataConfig, SnapshotMeta, StoredMembership, Vote};

/// Durable records of one node's Raft log and state machine.
///
/// A backend is a cheap handle: clones share the same records, so openraft
/// can read the log from replication tasks while the core appends.
pub trait Backend<C: MetadataConfig>: Clone + Send + Sync + 'static {
    /// Entries whose index is in `range`, in order.
    fn entries<R: RangeBounds<u64>>(&self, range: R) -> Result<Vec<Entry<C>>, StoreError>;
    /// The last entry's log id, if the log holds any entry.
    fn last_entry_id(&self) -> Result<Option<LogId<C>>, StoreError>;
    fn vote(&self) -> Result<Option<Vote<C>>, StoreError>;
    fn save_vote(&self, vote: &Vote<C>) -> Result<(), StoreError>;
    fn committed(&self) -> Result<Option<LogId<C>>, StoreError>;
    fn save_committed(&self, committed: Option<&LogId<C>>) -> Result<(), StoreError>;
    fn last_purged(&self) -> Result<Option<LogId<C>>, StoreError>;
    /// Store entries (replacing any at the same index), durably, in one
    /// atomic step.
    fn append(&self, entries: &[Entry<C>]) -> Result<(), StoreError>;
    /// Remove every entry with an index greater than `index` (all of them
    /// for `None`).
    fn truncate_after(&self, index: Option<u64>) -> Result<(), StoreError>;
    /// Remember `upto` as purged and remove every entry up to its index, in
    /// one atomic step.
    fn purge(&self, upto: &LogId<C>) -> Result<(), StoreError>;
    /// The state machine as last saved.
    fn applied(&self) -> Result<Option<AppliedState<C>>, StoreError>;
    fn save_applied(&self, state: &AppliedState<C>) -> Result<(), StoreError>;
    fn snapshot(&self) -> Result<Option<StoredSnapshot<C>>, StoreError>;
    fn save_snapshot(&self, snapshot: &StoredSnapshot<C>) -> Result<(), StoreError>;
    /// Replace the state machine and the current snapshot in one atomic
    /// step (installing a snapshot from the leader).
    fn install(
        &self,
        state: &AppliedState<C>,
        snapshot: &StoredSnapshot<C>,
    ) -> Result<(), StoreError>;
}

/// The state machine with the Raft position it reflects. Saved whole after
/// every applied batch, so a restarted node does not re-apply what it had
/// applied (re-applying would be harmless, apply being deterministic, but
/// slower).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct AppliedState<C: MetadataConfig> {
    pub last_applied: Option<LogId<C>>,
    pub last_membership: StoredMembership<C>,
    pub metadata: ClusterMetadata,
}

impl<C: MetadataConfig> Default for AppliedState<C> {
    fn default() -> Self {
        Self {
            last_applied: None,
            last_membership: StoredMembership::<C>::default(),
            metadata: ClusterMetadata::default(),
        }
    }
}

impl<C: MetadataConfig> AppliedState<C> {
    /// Apply one entry; shared by every backend so that they cannot differ.
    pub fn apply_entry(&mut self, entry: &Entry<C>) -> CommandResult {
        let log_id = entry.log_id();
        self.last_applied = Some(log_id.clone());
        match C::payload(entry) {
            EntryPayload::Blank => Ok(Outcome::Done),
            EntryPayload::Normal(command) => self.metadata.apply(command),
            EntryPayload::Membership(membership) => {
                self.last_membership = StoredMembership::<C>::new(Some(log_id), membership.clone());
                Ok(Outcome::Done)
            }
        }
    }
}

/// A snapshot as kept by a backend: openraft's metadata and the JSON of the
/// [`ClusterMetadata`] at that point.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct StoredSnapshot<C: MetadataConfig> {
    pub meta: SnapshotMeta<C>,
    pub data: Vec<u8>,
}
