//! Identifiers and small value types shared by the core and its drivers.

use bytes::Bytes;

/// Volumes are addressed in blocks of this many bytes; volume sizes are a
/// multiple of it. Writes that do not cover whole blocks are merged into the
/// block's current image (read-modify-write).
pub const BLOCK_SIZE: usize = 4096;

/// Nanoseconds since the driver started. The core never reads a clock:
/// every event carries `now`, so a simulator can run on virtual time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn from_millis(ms: u64) -> Self {
        Timestamp(ms.saturating_mul(1_000_000))
    }

    pub fn saturating_add_millis(self, ms: u64) -> Self {
        Timestamp(self.0.saturating_add(ms.saturating_mul(1_000_000)))
    }

    pub fn as_nanos(self) -> u64 {
        self.0
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $inner:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_type!(
    /// A volume's permanent number; never reused after deletion, so journal
    /// records of a deleted volume can never land on a new one.
    VolumeId,
    u32
);
id_type!(
    /// A consistency group: volumes whose writes are ordered together.
    GroupId,
    u32
);
id_type!(
    /// Sequence number of a delta within its group, starting at 1.
    DeltaSeq,
    u64
);
id_type!(
    /// Ownership epoch of a group; constant on a single site.
    Epoch,
    u64
);
id_type!(
    /// Index of a record in the node's journal, in append order; contiguous.
    JournalPosition,
    u64
);
id_type!(
    /// A client request, numbered by the driver.
    RequestId,
    u64
);
id_type!(
    /// A disk operation the engine asked for, numbered by the engine.
    IoId,
    u64
);

/// One block of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockKey {
    pub volume: VolumeId,
    pub block: u64,
}

/// The content of one block. Zeroed blocks carry no buffer, so zeroing a
/// large range costs bookkeeping only, in memory and in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockImage {
    Data(Bytes),
    Zero,
}

impl BlockImage {
    /// Bytes of memory this image holds (not counting bookkeeping).
    pub fn memory_bytes(&self) -> u64 {
        match self {
            BlockImage::Data(data) => data.len() as u64,
            BlockImage::Zero => 0,
        }
    }

    /// Copies `self[from..from + out.len()]` into `out`.
    pub fn copy_range(&self, from: usize, out: &mut [u8]) {
        match self {
            BlockImage::Data(data) => out.copy_from_slice(&data[from..from + out.len()]),
            BlockImage::Zero => out.fill(0),
        }
    }

    /// The full block as bytes (allocates for a zero block).
    pub fn to_bytes(&self) -> Bytes {
        match self {
            BlockImage::Data(data) => data.clone(),
            BlockImage::Zero => Bytes::from_static(&ZERO_BLOCK),
        }
    }
}

pub(crate) static ZERO_BLOCK: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

id_type!(
    /// A site (datacenter) of the cluster, numbered by the driver.
    SiteId,
    u32
);

/// How far a volume's writes must travel before FLUSH (or a write) returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Mode {
    /// FLUSH is durable in the owner's journal; other sites follow.
    #[default]
    Async,
    /// FLUSH also waits until at least one other site's journal holds the
    /// flushed writes, so committed data survives the loss of a site.
    FlushSync,
    /// Every write waits for the local and one other site's journal.
    Sync,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Async => "async",
            Mode::FlushSync => "flush-sync",
            Mode::Sync => "sync",
        }
    }

    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "async" => Some(Mode::Async),
            "flush-sync" => Some(Mode::FlushSync),
            "sync" => Some(Mode::Sync),
            _ => None,
        }
    }
}
