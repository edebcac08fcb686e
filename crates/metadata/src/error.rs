//! Errors of the metadata store. openraft's storage traits speak
//! `std::io::Error`; a [`StoreError`] travels inside one (`io::Error::other`)
//! and can be recovered with `get_ref().downcast_ref::<StoreError>()`.

use std::io;
use std::path::PathBuf;

/// Why the store could not read or write.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened as a redb database: not a redb file,
    /// damaged, or already open in this process.
    #[error("cannot open metadata store {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    /// The file is a redb database written by something else.
    #[error("{path} is not a stretch metadata store (no format record, tables: {tables})")]
    Foreign { path: PathBuf, tables: String },
    /// The file is a metadata store of a format this build does not read.
    #[error("{path} holds metadata format {found:?}, this build reads {expected:?}")]
    Format {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
    /// redb stopped on an internal consistency check while reading the
    /// file: it is damaged. The store refuses further use.
    #[error("metadata store is damaged ({op}): {detail}")]
    Damaged { op: String, detail: String },
    /// redb failed during a transaction.
    #[error("metadata store: {0}")]
    Redb(#[from] redb::Error),
    /// A record read back did not decode: the file is damaged or was
    /// written by an incompatible build.
    #[error("metadata store: cannot decode {what}: {source}")]
    Decode {
        what: String,
        source: serde_json::Error,
    },
    /// A record could not be encoded (never expected for these types).
    #[error("metadata store: cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    /// Records disagree with each other, e.g. a log entry stored under the
    /// wrong index.
    #[error("metadata store is inconsistent: {0}")]
    Inconsistent(String),
}

impl From<StoreError> for io::Error {
    fn from(e: StoreError) -> Self {
        io::Error::other(e)
    }
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
redb_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
