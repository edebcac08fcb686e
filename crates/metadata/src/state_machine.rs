//! openraft's state machine and snapshot builder over a [`Backend`].

use std::fmt::Debug;
use std::io;

use futures_util::StreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{OptionalSend, RaftSnapshotBuilder};

use crate::backend::{AppliedState, Backend, StoredSnapshot};
use crate::error::StoreError;
use crate::metadata::ClusterMetadata;
use crate::{
    LogId, MetadataConfig, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig,
};

/// Told of the metadata after every applied batch and installed snapshot,
/// once it is durable, with the index of the last entry applied: how a
/// node learns what changed (new volumes, owners, epochs) without polling.
pub type Observer = std::sync::Arc<dyn Fn(&ClusterMetadata, u64) + Send + Sync>;

/// The applied cluster metadata of one node. Reads are served from memory;
/// every applied batch is saved through the backend before any client is
/// answered.
pub struct StateMachine<B, C: MetadataConfig = TypeConfig> {
    backend: B,
    state: AppliedState<C>,
    observer: Option<Observer>,
}

impl<B: Debug, C: MetadataConfig> Debug for StateMachine<B, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("backend", &self.backend)
            .field("last_applied", &self.state.last_applied)
            .field("observed", &self.observer.is_some())
            .finish()
    }
}

impl<B: Backend<C>, C: MetadataConfig> StateMachine<B, C> {
    /// Load the state machine as last saved.
    pub fn open(backend: B) -> Result<Self, StoreError> {
        let mut state = backend.applied()?.unwrap_or_default();
        // A snapshot installed or built later than the last save (not
        // expected: both are saved in order, but a newer snapshot is always
        // the better base) wins.
        if let Some(snapshot) = backend.snapshot()?
            && snapshot.meta.last_log_id > state.last_applied
        {
            state = decode_snapshot(&snapshot)?;
        }
        Ok(Self {
            backend,
            state,
            observer: None,
        })
    }

    /// Calls `observer` after every applied batch and installed snapshot.
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    fn notify(&self) {
        if let Some(observer) = &self.observer {
            let index = self.state.last_applied.as_ref().map_or(0, |id| id.index);
            observer(&self.state.metadata, index);
        }
    }

    /// The cluster metadata as applied so far.
    pub fn metadata(&self) -> &ClusterMetadata {
        &self.state.metadata
    }

    pub fn last_applied(&self) -> Option<LogId<C>> {
        self.state.last_applied.clone()
    }
}

fn decode_snapshot<C: MetadataConfig>(
    snapshot: &StoredSnapshot<C>,
) -> Result<AppliedState<C>, StoreError> {
    let metadata: ClusterMetadata =
        serde_json::from_slice(&snapshot.data).map_err(|source| StoreError::Decode {
            what: "snapshot data".to_owned(),
            source,
        })?;
    Ok(AppliedState {
        last_applied: snapshot.meta.last_log_id.clone(),
        last_membership: snapshot.meta.last_membership.clone(),
        metadata,
    })
}

impl<B: Backend<C> + Debug, C: MetadataConfig> RaftStateMachine<C> for StateMachine<B, C> {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder<B, C>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<C>>, StoredMembership<C>), io::Error> {
        Ok((
            self.state.last_applied.clone(),
            self.state.last_membership.clone(),
        ))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures_util::Stream<Item = Result<EntryResponder<C>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        // Apply the whole batch in memory, save it once, then answer: a
        // client never sees a result the node could forget by crashing.
        let mut replies = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let result = self.state.apply_entry(&entry);
            if let Some(responder) = responder {
                replies.push((responder, result));
            }
        }
        self.backend.save_applied(&self.state)?;
        self.notify();
        for (responder, result) in replies {
            responder.send(result);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            backend: self.backend.clone(),
            state: self.state.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<C>,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot,
        };
        // Decode before touching anything: a bad snapshot leaves the node as
        // it was.
        let state = decode_snapshot(&stored)?;
        self.backend.install(&state, &stored)?;
        self.state = state;
        self.notify();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<C>>, io::Error> {
        Ok(self.backend.snapshot()?.map(|s| Snapshot::<C> {
            meta: s.meta,
            snapshot: s.data,
        }))
    }
}

/// Builds a snapshot of the state as it was when the builder was made.
#[derive(Debug)]
pub struct SnapshotBuilder<B, C: MetadataConfig = TypeConfig> {
    backend: B,
    state: AppliedState<C>,
}

impl<B: Backend<C> + Debug, C: MetadataConfig> RaftSnapshotBuilder<C> for SnapshotBuilder<B, C> {
    type SnapshotData = SnapshotData;

    /// The snapshot is durable before it is returned: openraft may purge
    /// the log it covers as soon as it has it.
    async fn build_snapshot(&mut self) -> Result<Snapshot<C>, io::Error> {
        let data =
            serde_json::to_vec(&self.state.metadata).map_err(|source| StoreError::Encode {
                what: "snapshot data",
                source,
            })?;
        let meta = SnapshotMeta::<C> {
            last_log_id: self.state.last_applied.clone(),
            last_membership: self.state.last_membership.clone(),
        };
        let stored = StoredSnapshot { meta, data };
        self.backend.save_snapshot(&stored)?;
        Ok(Snapshot::<C> {
            meta: stored.meta,
            snapshot: stored.data,
        })
    }
}
