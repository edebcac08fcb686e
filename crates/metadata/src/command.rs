//! Commands: the application data of Raft log entries, and what applying
//! one returns.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::types::{
    Failover, FastSeal, Follow, GroupId, GroupState, Mode, NodeId, NodeInfo, Role, VolumeId,
};

/// One change to the cluster metadata. Everything a command needs is in it:
/// applying it reads no clock and does no I/O, so every replica reaches the
/// same state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "op")]
pub enum Command {
    /// Register a site (failure domain).
    AddSite { name: String, role: Role },
    /// Register a node at an existing site, with the site's role.
    AddNode { id: NodeId, info: NodeInfo },
    /// Forget a node. Its id is not reused (openraft forbids it).
    RemoveNode { id: NodeId },
    /// Create a volume in `group`; the group is created, owned by
    /// `owner_site`, when it does not exist yet.
    CreateVolume {
        name: String,
        size: u64,
        group: String,
        mode: Mode,
        failover: Failover,
        owner_site: String,
    },
    /// Delete a volume; its id is tombstoned, never reused. A group left
    /// empty is deleted with it.
    DeleteVolume { name: String },
    /// Give `group` to `to`, raising its epoch, only if `from` owns it at
    /// `expected_epoch` now: a request decided on stale state is refused.
    /// Ends any move in flight for the group.
    TransferGroup {
        group: String,
        from: String,
        to: String,
        expected_epoch: u64,
        /// The last delta the old owner wrote: the new epoch starts after
        /// it.
        #[serde(default)]
        after_seq: u64,
        /// The switchover of a live migration: refused unless the group's
        /// move to `to` is still in flight, so that a cancel committed
        /// first wins.
        #[serde(default)]
        migration: bool,
        /// A fast migration's switchover: `to` owns the group at once and
        /// copies what it lacks from `from` ([`crate::FastDrain`]).
        /// Refused unless the cluster has exactly two data sites.
        #[serde(default)]
        fast: Option<FastSeal>,
    },
    /// A fast migration's drain of `group` at `expected_epoch` ended: the
    /// target copied every region (`accept_loss` false, committed by its
    /// node), or an operator accepted the loss of what it did not copy
    /// because the source is lost (`accept_loss` true).
    EndFastDrain {
        group: String,
        expected_epoch: u64,
        accept_loss: bool,
    },
    /// Fail `group` over to `to` without its owner (lost or cut off),
    /// raising its epoch, only at `expected_epoch`. `after_seq` is the last
    /// whole delta `to` holds: its image from then on. Writes the old
    /// owner acknowledged after it are lost. `automatic` records whether
    /// the volume's `auto` policy decided it or an operator did.
    ///
    /// An `automatic` promotion is refused while another site offered a
    /// newer image at this epoch ([`Command::OfferImage`]), unless it is
    /// named in `passed_over`: sites the promoter found holding no lease
    /// (they cannot serve the group, so waiting for them would suspend it
    /// for as long as they are away).
    PromoteGroup {
        group: String,
        to: String,
        expected_epoch: u64,
        after_seq: u64,
        automatic: bool,
        #[serde(default)]
        passed_over: Vec<String>,
    },
    /// `site` offers its image of `group`, whose owner holds no lease: the
    /// last whole delta it holds, or `None` if it holds none it could serve
    /// (mid-resync, or on a line a failover left). Survivors offer before
    /// an automatic failover so that the one holding the most takes the
    /// group: with three or more data sites, a write a `flush-sync` or
    /// `sync` volume acknowledged may be at only one of them (G4).
    OfferImage {
        group: String,
        site: String,
        expected_epoch: u64,
        after_seq: Option<u64>,
    },
    /// Record the start of a live migration; the owner keeps the group.
    BeginMove {
        group: String,
        to: String,
        expected_epoch: u64,
    },
    /// Drop a move in flight without changing the owner.
    AbortMove { group: String, expected_epoch: u64 },
    /// Suspend or resume a group at `expected_epoch`. `Moving` is only
    /// entered through [`Command::BeginMove`].
    SetGroupState {
        group: String,
        expected_epoch: u64,
        state: GroupState,
    },
    /// Set whether `group`'s ownership follows its workload.
    SetFollow { group: String, follow: Follow },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::AddSite { name, role } => write!(f, "add-site {name} ({role})"),
            Command::AddNode { id, info } => write!(f, "add-node {id} {info}"),
            Command::RemoveNode { id } => write!(f, "remove-node {id}"),
            Command::CreateVolume {
                name,
                group,
                owner_site,
                ..
            } => {
                write!(f, "create-volume {name} in {group} at {owner_site}")
            }
            Command::DeleteVolume { name } => write!(f, "delete-volume {name}"),
            Command::TransferGroup {
                group,
                from,
                to,
                expected_epoch,
                ..
            } => {
                write!(
                    f,
                    "transfer-group {group} {from}->{to} at epoch {expected_epoch}"
                )
            }
            Command::PromoteGroup {
                group,
                to,
                expected_epoch,
                after_seq,
                automatic,
                passed_over,
            } => {
                let how = if *automatic { "auto" } else { "manual" };
                write!(
                    f,
                    "promote-group {group} to {to} at epoch {expected_epoch} after delta {after_seq} ({how})"
                )?;
                if !passed_over.is_empty() {
                    write!(f, " passing over {}", passed_over.join(", "))?;
                }
                Ok(())
            }
            Command::OfferImage {
                group,
                site,
                expected_epoch,
                after_seq,
            } => match after_seq {
                Some(seq) => write!(
                    f,
                    "offer-image {group} at {site} at epoch {expected_epoch}: after delta {seq}"
                ),
                None => write!(
                    f,
                    "offer-image {group} at {site} at epoch {expected_epoch}: none it could serve"
                ),
            },
            Command::BeginMove {
                group,
                to,
                expected_epoch,
            } => {
                write!(f, "begin-move {group} to {to} at epoch {expected_epoch}")
            }
            Command::AbortMove {
                group,
                expected_epoch,
            } => {
                write!(f, "abort-move {group} at epoch {expected_epoch}")
            }
            Command::SetGroupState {
                group,
                expected_epoch,
                state,
            } => {
                write!(
                    f,
                    "set-group-state {group} {state:?} at epoch {expected_epoch}"
                )
            }
            Command::SetFollow { group, follow } => write!(f, "set-follow {group} {follow}"),
            Command::EndFastDrain {
                group,
                expected_epoch,
                accept_loss,
            } => {
                let how = if *accept_loss {
                    "loss accepted"
                } else {
                    "copied"
                };
                write!(
                    f,
                    "end-fast-drain {group} at epoch {expected_epoch} ({how})"
                )
            }
        }
    }
}

/// What a successfully applied entry produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum Outcome {
    /// The entry changed what it said and has nothing to report (also the
    /// answer to blank and membership entries).
    Done,
    /// The ids the cluster gave a new volume and its group.
    VolumeCreated {
        volume: VolumeId,
        group: GroupId,
        epoch: u64,
    },
    /// The tombstoned id of a deleted volume.
    VolumeDeleted {
        volume: VolumeId,
        group_deleted: bool,
    },
    /// The group's epoch after the change.
    Epoch { group: GroupId, epoch: u64 },
}

/// Why a command was refused. The refusal is itself replicated and
/// deterministic: every replica refuses the same entry the same way and the
/// state is left untouched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "kebab-case", tag = "error")]
pub enum CommandError {
    #[error("a name must not be empty")]
    EmptyName,
    #[error("site {site} already exists")]
    SiteExists { site: String },
    #[error("unknown site {site}")]
    UnknownSite { site: String },
    #[error("site {site} is a witness: it holds no volume")]
    WitnessSite { site: String },
    #[error("node {id} already exists")]
    NodeExists { id: NodeId },
    #[error("a node named {name} already exists")]
    NodeNameExists { name: String },
    #[error("unknown node {id}")]
    UnknownNode { id: NodeId },
    #[error("node role {node} differs from its site's role {site}")]
    RoleMismatch { node: Role, site: Role },
    #[error("volume {name} already exists")]
    VolumeExists { name: String },
    #[error("unknown volume {name}")]
    UnknownVolume { name: String },
    #[error("volume size {size} is not a positive multiple of 4096 bytes")]
    BadSize { size: u64 },
    #[error("unknown group {group}")]
    UnknownGroup { group: String },
    #[error("group {group} is owned by {owner}, not {claimed}")]
    NotOwner {
        group: String,
        owner: String,
        claimed: String,
    },
    #[error("group {group} is at epoch {current}, the request expected {expected}")]
    StaleEpoch {
        group: String,
        expected: u64,
        current: u64,
    },
    #[error("group {group} already has a move in flight")]
    MoveInFlight { group: String },
    #[error("group {group} has no move in flight")]
    NoMoveInFlight { group: String },
    #[error("group {group} is already owned by {site}")]
    SameSite { group: String, site: String },
    #[error("group {group} cannot be set to {state:?} directly")]
    BadState { group: String, state: GroupState },
    #[error(
        "site {site} offered a newer image of group {group} (after delta {offered}, this one is after {image}): it takes the group"
    )]
    NewerImage {
        group: String,
        site: String,
        offered: u64,
        image: u64,
    },
    #[error("site {site} offers an image of group {group}, which it owns")]
    OwnerOffers { group: String, site: String },
    #[error("the {what} counter is exhausted")]
    Exhausted { what: String },
    #[error(
        "fast migration needs exactly two data sites (this cluster has {data_sites}); use drain mode"
    )]
    FastNeedsTwoSites { data_sites: usize },
    #[error("group {group} is still copying from site {from} after a fast migration")]
    FastDrainRunning { group: String, from: String },
    #[error("group {group} has no fast migration copying")]
    NoFastDrain { group: String },
}

/// The response of the state machine to one entry.
pub type CommandResult = Result<Outcome, CommandError>;
