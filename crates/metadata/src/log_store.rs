//! openraft's log storage over a [`Backend`].

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use crate::backend::Backend;
use std::marker::PhantomData;

use crate::{Entry, LogId, MetadataConfig, TypeConfig, Vote};

/// The Raft log, vote and commit mark of one node. Also its own log reader:
/// clones share the backend.
#[derive(Debug)]
pub struct LogStore<B, C: MetadataConfig = TypeConfig> {
    backend: B,
    _config: PhantomData<C>,
}

impl<B: Clone, C: MetadataConfig> Clone for LogStore<B, C> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            _config: PhantomData,
        }
    }
}

impl<B: Backend<C>, C: MetadataConfig> LogStore<B, C> {
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            _config: PhantomData,
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }
}

impl<B: Backend<C> + Debug, C: MetadataConfig> RaftLogReader<C> for LogStore<B, C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<C>>, io::Error> {
        Ok(self.backend.entries(range)?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C>>, io::Error> {
        Ok(self.backend.vote()?)
    }
}

impl<B: Backend<C> + Debug, C: MetadataConfig> RaftLogStorage<C> for LogStore<B, C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let last_purged_log_id = self.backend.last_purged()?;
        // With every entry purged, the log ends where the purge did.
        let last_log_id = self
            .backend
            .last_entry_id()?
            .or_else(|| last_purged_log_id.clone());
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Durable on return: a vote must never be forgotten after it was given.
    async fn save_vote(&mut self, vote: &Vote<C>) -> Result<(), io::Error> {
        Ok(self.backend.save_vote(vote)?)
    }

    /// Kept so that a restarted node re-applies committed entries at once
    /// instead of waiting for a leader to tell it the commit index.
    async fn save_committed(&mut self, committed: Option<LogId<C>>) -> Result<(), io::Error> {
        Ok(self.backend.save_committed(committed.as_ref())?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<C>>, io::Error> {
        Ok(self.backend.committed()?)
    }

    /// The backend's append returns once the entries are durable (redb:
    /// committed, fsynced); only then is openraft told, through `callback`,
    /// that they are flushed. A failed write is reported both ways.
    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<C>> = entries.into_iter().collect();
        match self.backend.append(&entries) {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                callback.io_completed(Err(io::Error::other(msg)));
                Err(e.into())
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId<C>>) -> Result<(), io::Error> {
        Ok(self
            .backend
            .truncate_after(last_log_id.map(|id| id.index))?)
    }

    async fn purge(&mut self, log_id: LogId<C>) -> Result<(), io::Error> {
        Ok(self.backend.purge(&log_id)?)
    }
}
