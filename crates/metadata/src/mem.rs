//! The in-memory backend, for the deterministic simulator: no file, no
//! thread, no clock. Clones share the records, so a simulated node that
//! "restarts" by building new stores from the same handle finds its vote,
//! log and state as it left them, exactly like the redb backend after a
//! reopen. (A simulated disk that loses unflushed writes would sit here.)

use std::collections::BTreeMap;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::entry::RaftEntry;
use parking_lot::Mutex;

use crate::backend::{AppliedState, Backend, StoredSnapshot};
use crate::error::StoreError;
use crate::{Entry, LogId, MetadataConfig, TypeConfig, Vote};

#[derive(Debug)]
struct Records<C: MetadataConfig> {
    log: BTreeMap<u64, Entry<C>>,
    vote: Option<Vote<C>>,
    committed: Option<LogId<C>>,
    last_purged: Option<LogId<C>>,
    applied: Option<AppliedState<C>>,
    snapshot: Option<StoredSnapshot<C>>,
}

/// Records of one node kept in memory.
#[derive(Debug)]
pub struct MemBackend<C: MetadataConfig = TypeConfig> {
    records: Arc<Mutex<Records<C>>>,
}

impl<C: MetadataConfig> Clone for MemBackend<C> {
    fn clone(&self) -> Self {
        Self {
            records: Arc::clone(&self.records),
        }
    }
}

impl<C: MetadataConfig> Default for MemBackend<C> {
    fn default() -> Self {
        Self {
            records: Arc::new(Mutex::new(Records {
                log: BTreeMap::new(),
                vote: None,
                committed: None,
                last_purged: None,
                applied: None,
                snapshot: None,
            })),
        }
    }
}

impl<C: MetadataConfig> MemBackend<C> {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<C: MetadataConfig> Backend<C> for MemBackend<C> {
    fn entries<R: RangeBounds<u64>>(&self, range: R) -> Result<Vec<Entry<C>>, StoreError> {
        Ok(self
            .records
            .lock()
            .log
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }

    fn last_entry_id(&self) -> Result<Option<LogId<C>>, StoreError> {
        Ok(self
            .records
            .lock()
            .log
            .values()
            .next_back()
            .map(|e| e.log_id()))
    }

    fn vote(&self) -> Result<Option<Vote<C>>, StoreError> {
        Ok(self.records.lock().vote.clone())
    }

    fn save_vote(&self, vote: &Vote<C>) -> Result<(), StoreError> {
        self.records.lock().vote = Some(vote.clone());
        Ok(())
    }

    fn committed(&self) -> Result<Option<LogId<C>>, StoreError> {
        Ok(self.records.lock().committed.clone())
    }

    fn save_committed(&self, committed: Option<&LogId<C>>) -> Result<(), StoreError> {
        self.records.lock().committed = committed.cloned();
        Ok(())
    }

    fn last_purged(&self) -> Result<Option<LogId<C>>, StoreError> {
        Ok(self.records.lock().last_purged.clone())
    }

    fn append(&self, entries: &[Entry<C>]) -> Result<(), StoreError> {
        let mut r = self.records.lock();
        for e in entries {
            r.log.insert(e.index(), e.clone());
        }
        Ok(())
    }

    fn truncate_after(&self, index: Option<u64>) -> Result<(), StoreError> {
        let mut r = self.records.lock();
        let from = index.map_or(0, |i| i.saturating_add(1));
        let _ = r.log.split_off(&from);
        Ok(())
    }

    fn purge(&self, upto: &LogId<C>) -> Result<(), StoreError> {
        let mut r = self.records.lock();
        r.last_purged = Some(upto.clone());
        let keep = r.log.split_off(&upto.index.saturating_add(1));
        r.log = keep;
        Ok(())
    }

    fn applied(&self) -> Result<Option<AppliedState<C>>, StoreError> {
        Ok(self.records.lock().applied.clone())
    }

    fn save_applied(&self, state: &AppliedState<C>) -> Result<(), StoreError> {
        self.records.lock().applied = Some(state.clone());
        Ok(())
    }

    fn snapshot(&self) -> Result<Option<StoredSnapshot<C>>, StoreError> {
        Ok(self.records.lock().snapshot.clone())
    }

    fn save_snapshot(&self, snapshot: &StoredSnapshot<C>) -> Result<(), StoreError> {
        self.records.lock().snapshot = Some(snapshot.clone());
        Ok(())
    }

    fn install(
        &self,
        state: &AppliedState<C>,
        snapshot: &StoredSnapshot<C>,
    ) -> Result<(), StoreError> {
        let mut r = self.records.lock();
        r.applied = Some(state.clone());
        r.snapshot = Some(snapshot.clone());
        Ok(())
    }
}
