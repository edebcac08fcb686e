//! The in-memory backend, for the deterministic simulator: no file, no
//! thread, no clock. Clones share the records, so a simulated node that
//! "restarts" by building new stores from the same handle finds its vote,
//! log and state as it left them, exactly like the redb backend after a
//! reopen. (A simulated disk that loses unflushed writes would sit here.)

use std::collections::BTreeMap;
use std::ops::RangeBounds;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backend::{AppliedState, Backend, StoredSnapshot};
use crate::error::StoreError;
use crate::{Entry, LogId, Vote};

#[derive(Debug, Default)]
struct Records {
    log: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    applied: Option<AppliedState>,
    snapshot: Option<StoredSnapshot>,
}

/// Records of one node kept in memory.
#[derive(Debug, Clone, Default)]
pub struct MemBackend {
    records: Arc<Mutex<Records>>,
}

impl MemBackend {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Backend for MemBackend {
    fn entries<R: RangeBounds<u64>>(&self, range: R) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .records
            .lock()
            .log
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StoreError> {
        Ok(self
            .records
            .lock()
            .log
            .values()
            .next_back()
            .map(|e| e.log_id))
    }

    fn vote(&self) -> Result<Option<Vote>, StoreError> {
        Ok(self.records.lock().vote)
    }

    fn save_vote(&self, vote: &Vote) -> Result<(), StoreError> {
        self.records.lock().vote = Some(*vote);
        Ok(())
    }

    fn committed(&self) -> Result<Option<LogId>, StoreError> {
        Ok(self.records.lock().committed)
    }

    fn save_committed(&self, committed: Option<&LogId>) -> Result<(), StoreError> {
        self.records.lock().committed = committed.copied();
        Ok(())
    }

    fn last_purged(&self) -> Result<Option<LogId>, StoreError> {
        Ok(self.records.lock().last_purged)
    }

    fn append(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let mut r = self.records.lock();
        for e in entries {
            r.log.insert(e.log_id.index, e.clone());
        }
        Ok(())
    }

    fn truncate_after(&self, index: Option<u64>) -> Result<(), StoreError> {
        let mut r = self.records.lock();
        let from = index.map_or(0, |i| i.saturating_add(1));
        let _ = r.log.split_off(&from);
        Ok(())
    }

    fn purge(&self, upto: &LogId) -> Result<(), StoreError> {
        let mut r = self.records.lock();
        r.last_purged = Some(*upto);
        let keep = r.log.split_off(&upto.index.saturating_add(1));
        r.log = keep;
        Ok(())
    }

    fn applied(&self) -> Result<Option<AppliedState>, StoreError> {
        Ok(self.records.lock().applied.clone())
    }

    fn save_applied(&self, state: &AppliedState) -> Result<(), StoreError> {
        self.records.lock().applied = Some(state.clone());
        Ok(())
    }

    fn snapshot(&self) -> Result<Option<StoredSnapshot>, StoreError> {
        Ok(self.records.lock().snapshot.clone())
    }

    fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), StoreError> {
        self.records.lock().snapshot = Some(snapshot.clone());
        Ok(())
    }

    fn install(&self, state: &AppliedState, snapshot: &StoredSnapshot) -> Result<(), StoreError> {
        let mut r = self.records.lock();
        r.applied = Some(state.clone());
        r.snapshot = Some(snapshot.clone());
        Ok(())
    }
}
