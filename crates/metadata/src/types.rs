//! The vocabulary of the cluster metadata: ids, roles, modes and the records
//! kept per site, node, volume, group and move.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A Raft node id. Never reused for a node that starts from an empty log:
/// openraft relies on that to avoid a split brain.
pub type NodeId = u64;

/// A volume id, allocated by the state machine from a counter that only
/// grows, so an id is never given to two volumes, even after a delete.
pub type VolumeId = u32;

/// A consistency-group id, allocated like [`VolumeId`].
pub type GroupId = u32;

/// What a site or node is for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Holds volume legs and serves I/O.
    #[default]
    Data,
    /// A metadata-only voter at a third failure domain: never owns a volume.
    Witness,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Data => "data",
            Role::Witness => "witness",
        })
    }
}

/// When a write is acknowledged (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Async,
    FlushSync,
    Sync,
}

/// What happens to a volume when its owner site is lost (DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failover {
    Auto,
    Manual,
}

/// Whether a group's ownership follows its workload: with `auto`, its
/// owner migrates it to the site most of its requests come from, once that
/// lasts (see `stretch_control::FollowSettings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Follow {
    #[default]
    Off,
    Auto,
}

impl fmt::Display for Follow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Follow::Off => "off",
            Follow::Auto => "auto",
        })
    }
}

/// The serving state of a consistency group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupState {
    /// The owner accepts writes.
    Active,
    /// No site accepts writes (owner lost with `manual` failover, or an
    /// operator stopped it).
    Suspended,
    /// A live migration is in flight; the source still owns the group.
    Moving,
}

/// What openraft stores per node in its membership, and what peers need to
/// reach it.
///
/// `Default` exists only because openraft's storage test suite builds
/// memberships with default nodes; a real node always has every field set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeInfo {
    /// The node's name, unique in the cluster.
    pub name: String,
    /// The site (failure domain) the node runs at.
    pub site: String,
    pub role: Role,
    /// Where peers reach the node, `host:port`; kept as text so a name that
    /// resolves later is allowed.
    pub addr: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{} ({}, {})",
            self.name, self.site, self.role, self.addr
        )
    }
}

/// A site (datacenter, failure domain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    pub name: String,
    pub role: Role,
}

/// A volume: one virtual block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    /// Size in bytes, a whole number of 4 KiB blocks.
    pub size: u64,
    pub group: GroupId,
    pub mode: Mode,
    pub failover: Failover,
}

/// A consistency group: volumes whose writes are ordered together and that
/// change owner together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub id: GroupId,
    pub name: String,
    /// The one site allowed to accept writes.
    pub owner: String,
    /// Raised by every change of owner; a request carrying an older epoch is
    /// refused (fencing, G1).
    pub epoch: u64,
    pub state: GroupState,
    /// Which deltas each recent epoch wrote, oldest first: epoch `e`'s
    /// deltas are the sequence numbers after its `after_seq`, up to the
    /// next entry's. A site whose newest delta was written under another
    /// epoch than the one this history names for its number diverged (it
    /// owned the group and kept writing after a failover) and is resynced.
    /// At most [`EPOCH_HISTORY_MAX`] entries.
    #[serde(default)]
    pub history: Vec<EpochStart>,
    /// The newest forced change of owner (a failover), if any.
    #[serde(default)]
    pub last_failover: Option<FailoverRecord>,
    /// Images survivors offered at this epoch for a failover
    /// ([`crate::Command::OfferImage`]), per site: the last whole delta it
    /// holds, or `None` if it holds none it could serve. Emptied by every
    /// change of owner.
    #[serde(default)]
    pub offers: BTreeMap<String, Option<u64>>,
    /// Whether ownership follows the workload.
    #[serde(default)]
    pub follow: Follow,
    /// A fast migration's drain still running: the owner copies what it
    /// lacks from the old owner. Ended by [`crate::Command::EndFastDrain`]
    /// or by any change of owner.
    #[serde(default)]
    pub fast_drain: Option<FastDrain>,
}

/// What a fast switchover records: the regions the new owner may lack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FastSeal {
    /// `(volume, region)` pairs; `None`: every region of the group.
    pub regions: Option<Vec<(VolumeId, u64)>>,
}

/// A fast migration's drain: `to` owns the group from `epoch` on and
/// copies `regions` from `from`, whose image of them is the newest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FastDrain {
    pub from: String,
    pub to: String,
    pub epoch: u64,
    /// `None`: every region of the group.
    pub regions: Option<Vec<(VolumeId, u64)>>,
}

/// Entries kept in [`Group::history`]; a site further behind than the
/// oldest is resynced whole, which it would be anyway.
pub const EPOCH_HISTORY_MAX: usize = 64;

/// Where an epoch's deltas start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStart {
    pub epoch: u64,
    /// The last delta of the previous epoch this epoch's owner held whole.
    pub after_seq: u64,
    /// The old owner handed the group over (`volume move`): it wrote
    /// nothing past `after_seq`. False for a failover.
    #[serde(default)]
    pub handed_over: bool,
}

/// A change of owner decided without the old owner (it was lost or cut
/// off): writes it acknowledged after `after_seq` are lost to the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub from: String,
    pub to: String,
    /// The epoch the failover raised the group to.
    pub epoch: u64,
    /// The new owner's image: the last whole delta it held.
    pub after_seq: u64,
    /// Failover policy `auto` decided it, or an operator accepted the loss.
    pub automatic: bool,
}

/// A live migration in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub group: GroupId,
    pub from: String,
    pub to: String,
    /// The epoch of the source's ownership the move started under; the
    /// switchover raises it.
    pub epoch: u64,
}
