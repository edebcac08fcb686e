//! The on-disk backend: one redb file per node.
//!
//! Durability: every write below is one redb write transaction committed
//! with redb's default `Durability::Immediate`, which fsyncs before
//! `commit()` returns; a write is durable exactly when its method returns
//! `Ok`. redb's commits are atomic, so a crash leaves either the old or the
//! new records, never a mix (e.g. a purge never leaves the purge mark
//! without the entries removed, nor the reverse).
//!
//! The calls block on disk I/O inside openraft's async tasks. For cluster
//! metadata (a few small writes per second at most) that is acceptable;
//! moving commits to a dedicated thread is left until it shows up in a
//! profile.
//!
//! Records are JSON: small, readable with a redb dump when debugging, and
//! the same encoding the Raft messages use on the wire.

use std::ops::{Bound, RangeBounds};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::{AppliedState, Backend, StoredSnapshot};
use crate::error::StoreError;
use openraft::entry::RaftEntry;

use crate::{Entry, LogId, MetadataConfig, Vote};

/// What this build writes in the format record, and the only thing it
/// reads: a later format change bumps it and adds a migration.
pub const FORMAT: &str = "stretch-metadata/1";

/// Memory redb may keep as its page cache (read cache and write buffer
/// together). redb's default is 1 GiB, which a node would fill as the file
/// grows: the metadata (volumes, groups, the Raft log since the last
/// snapshot) stays far smaller, and the state machine keeps its own copy
/// in memory anyway, so a small bound costs no reads in practice and keeps
/// the witness (this file and little else) small.
pub const METADATA_CACHE_BYTES: usize = 8 << 20;

/// `format` → [`FORMAT`]: marks the file as ours.
const FORMAT_TABLE: TableDefinition<&str, &str> = TableDefinition::new("format");
/// Log entries by index.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// `vote`, `committed`, `last_purged`.
const RAFT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_state");
/// `applied` (state machine, last applied, membership) and `snapshot`.
const SM: TableDefinition<&str, &[u8]> = TableDefinition::new("state_machine");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
const APPLIED: &str = "applied";
const SNAPSHOT: &str = "snapshot";

/// Records of one node in one redb file.
#[derive(Clone)]
pub struct RedbBackend {
    inner: Arc<Db>,
    path: PathBuf,
}

/// The open database, closed with care.
struct Db {
    /// `None` only while being dropped.
    db: Option<Database>,
    /// Set once redb panicked on this file: its in-memory state may then be
    /// inconsistent, so nothing more is read or written through it.
    damaged: AtomicBool,
}

impl Drop for Db {
    /// redb writes its allocator state when a database is closed, and can
    /// panic doing so on a damaged file: contain it. After an earlier panic
    /// the database is not closed at all (its file handle is leaked until
    /// the process exits) so that redb writes nothing more into a file it
    /// misread.
    fn drop(&mut self) {
        if let Some(db) = self.db.take() {
            if self.damaged.load(Ordering::Acquire) {
                std::mem::forget(db);
            } else {
                let _ = catch_unwind(AssertUnwindSafe(move || drop(db)));
            }
        }
    }
}

impl std::fmt::Debug for RedbBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbBackend")
            .field("path", &self.path)
            .finish()
    }
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode { what, source })
}

fn decode<T: DeserializeOwned>(
    what: impl FnOnce() -> String,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        what: what(),
        source,
    })
}

impl RedbBackend {
    /// Open the store at `path`, creating it when the file is missing or
    /// empty. A file that is not a redb database, a redb database of another
    /// program, or a store of an unknown format is refused with a typed
    /// error and left untouched.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db = catch_unwind(AssertUnwindSafe(|| Self::open_db(&path))).map_err(|panic| {
            StoreError::Damaged {
                op: "open".to_owned(),
                detail: panic_text(&*panic),
            }
        })??;
        Ok(Self {
            inner: Arc::new(Db {
                db: Some(db),
                damaged: AtomicBool::new(false),
            }),
            path,
        })
    }

    fn open_db(path: &Path) -> Result<Database, StoreError> {
        let path = path.to_path_buf();
        let db = redb::Builder::new()
            .set_cache_size(METADATA_CACHE_BYTES)
            .create(&path)
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;

        let read = db.begin_read()?;
        let tables: Vec<String> = read.list_tables()?.map(|t| t.name().to_owned()).collect();
        if tables.is_empty() {
            drop(read);
            // A new store: create every table and the format mark in one
            // commit, so a crash here leaves an empty database, which the
            // next open initialises again.
            let txn = db.begin_write()?;
            txn.open_table(FORMAT_TABLE)?.insert("format", FORMAT)?;
            txn.open_table(LOG)?;
            txn.open_table(RAFT)?;
            txn.open_table(SM)?;
            txn.commit()?;
        } else {
            let found = if tables.iter().any(|t| t == FORMAT_TABLE.name()) {
                read.open_table(FORMAT_TABLE)?
                    .get("format")?
                    .map(|v| v.value().to_owned())
            } else {
                None
            };
            match found {
                None => {
                    return Err(StoreError::Foreign {
                        path,
                        tables: tables.join(", "),
                    });
                }
                Some(f) if f != FORMAT => {
                    return Err(StoreError::Format {
                        path,
                        found: f,
                        expected: FORMAT,
                    });
                }
                Some(_) => {}
            }
        }
        Ok(db)
    }

    /// Run one operation, turning a panic inside redb into
    /// [`StoreError::Damaged`]. redb checks its own structures with
    /// assertions (seen: a bitmap index out of range on a file with one
    /// flipped byte); a damaged file must stop the node with a clear error,
    /// not abort it with a backtrace.
    fn guarded<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Some(db) = self.inner.db.as_ref() else {
            return Err(StoreError::Damaged {
                op: op.to_owned(),
                detail: "closed".to_owned(),
            });
        };
        if self.inner.damaged.load(Ordering::Acquire) {
            return Err(StoreError::Damaged {
                op: op.to_owned(),
                detail: "an earlier operation failed".to_owned(),
            });
        }
        catch_unwind(AssertUnwindSafe(|| f(db))).unwrap_or_else(|panic| {
            self.inner.damaged.store(true, Ordering::Release);
            Err(StoreError::Damaged {
                op: op.to_owned(),
                detail: panic_text(&*panic),
            })
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn get<T: DeserializeOwned>(
        db: &Database,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let read = db.begin_read()?;
        let t = read.open_table(table)?;
        match t.get(key)? {
            Some(v) => Ok(Some(decode(|| key.to_owned(), v.value())?)),
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(
        db: &Database,
        table: TableDefinition<&str, &[u8]>,
        key: &'static str,
        value: Option<&T>,
    ) -> Result<(), StoreError> {
        let txn = db.begin_write()?;
        {
            let mut t = txn.open_table(table)?;
            match value {
                Some(v) => {
                    t.insert(key, encode(key, v)?.as_slice())?;
                }
                None => {
                    t.remove(key)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "redb panicked".to_owned()
    }
}

/// Decode a log entry and check it sits under its own index.
fn decode_entry<C: MetadataConfig>(index: u64, bytes: &[u8]) -> Result<Entry<C>, StoreError> {
    let entry: Entry<C> = decode(|| format!("log entry {index}"), bytes)?;
    if entry.index() != index {
        return Err(StoreError::Inconsistent(format!(
            "log entry {} stored under index {index}",
            entry.index()
        )));
    }
    Ok(entry)
}

impl<C: MetadataConfig> Backend<C> for RedbBackend {
    fn entries<R: RangeBounds<u64>>(&self, range: R) -> Result<Vec<Entry<C>>, StoreError> {
        self.guarded("entries", |db| {
            let bounds: (Bound<u64>, Bound<u64>) =
                (range.start_bound().cloned(), range.end_bound().cloned());
            let read = db.begin_read()?;
            let t = read.open_table(LOG)?;
            let mut out = Vec::new();
            for item in t.range(bounds)? {
                let (k, v) = item?;
                out.push(decode_entry::<C>(k.value(), v.value())?);
            }
            Ok(out)
        })
    }

    fn last_entry_id(&self) -> Result<Option<LogId<C>>, StoreError> {
        self.guarded("last_entry_id", |db| {
            let read = db.begin_read()?;
            let t = read.open_table(LOG)?;
            match t.last()? {
                Some((k, v)) => Ok(Some(decode_entry::<C>(k.value(), v.value())?.log_id())),
                None => Ok(None),
            }
        })
    }

    fn vote(&self) -> Result<Option<Vote<C>>, StoreError> {
        self.guarded("vote", |db| Self::get(db, RAFT, VOTE))
    }

    fn save_vote(&self, vote: &Vote<C>) -> Result<(), StoreError> {
        self.guarded("save_vote", |db| Self::put(db, RAFT, VOTE, Some(vote)))
    }

    fn committed(&self) -> Result<Option<LogId<C>>, StoreError> {
        self.guarded("committed", |db| Self::get(db, RAFT, COMMITTED))
    }

    fn save_committed(&self, committed: Option<&LogId<C>>) -> Result<(), StoreError> {
        self.guarded("save_committed", |db| {
            Self::put(db, RAFT, COMMITTED, committed)
        })
    }

    fn last_purged(&self) -> Result<Option<LogId<C>>, StoreError> {
        self.guarded("last_purged", |db| Self::get(db, RAFT, LAST_PURGED))
    }

    fn append(&self, entries: &[Entry<C>]) -> Result<(), StoreError> {
        self.guarded("append", |db| {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(LOG)?;
                for e in entries {
                    t.insert(e.index(), encode("log entry", e)?.as_slice())?;
                }
            }
            // fsync: only after this returns may openraft be told the entries
            // are flushed.
            txn.commit()?;
            Ok(())
        })
    }

    fn truncate_after(&self, index: Option<u64>) -> Result<(), StoreError> {
        self.guarded("truncate_after", |db| {
            let from = index.map_or(0, |i| i.saturating_add(1));
            let txn = db.begin_write()?;
            txn.open_table(LOG)?.retain_in(from.., |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
    }

    fn purge(&self, upto: &LogId<C>) -> Result<(), StoreError> {
        self.guarded("purge", |db| {
            let txn = db.begin_write()?;
            {
                txn.open_table(RAFT)?
                    .insert(LAST_PURGED, encode(LAST_PURGED, upto)?.as_slice())?;
                txn.open_table(LOG)?
                    .retain_in(..=upto.index, |_, _| false)?;
            }
            txn.commit()?;
            Ok(())
        })
    }

    fn applied(&self) -> Result<Option<AppliedState<C>>, StoreError> {
        self.guarded("applied", |db| Self::get(db, SM, APPLIED))
    }

    fn save_applied(&self, state: &AppliedState<C>) -> Result<(), StoreError> {
        self.guarded("save_applied", |db| Self::put(db, SM, APPLIED, Some(state)))
    }

    fn snapshot(&self) -> Result<Option<StoredSnapshot<C>>, StoreError> {
        self.guarded("snapshot", |db| Self::get(db, SM, SNAPSHOT))
    }

    fn save_snapshot(&self, snapshot: &StoredSnapshot<C>) -> Result<(), StoreError> {
        self.guarded("save_snapshot", |db| {
            Self::put(db, SM, SNAPSHOT, Some(snapshot))
        })
    }

    fn install(
        &self,
        state: &AppliedState<C>,
        snapshot: &StoredSnapshot<C>,
    ) -> Result<(), StoreError> {
        self.guarded("install", |db| {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(SM)?;
                t.insert(APPLIED, encode(APPLIED, state)?.as_slice())?;
                t.insert(SNAPSHOT, encode(SNAPSHOT, snapshot)?.as_slice())?;
            }
            txn.commit()?;
            Ok(())
        })
    }
}
