//! The replicated state machine: the cluster metadata and the rules that
//! apply a [`Command`] to it.
//!
//! Apply is pure and deterministic: ordered maps only (no hash iteration), no
//! clock, no I/O, no randomness. A refused command leaves the state exactly
//! as it was, so replicas agree on refusals too.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandError, CommandResult, Outcome};
use crate::types::{
    EPOCH_HISTORY_MAX, EpochStart, FailoverRecord, FastDrain, FastSeal, Follow, Group, GroupId,
    GroupState, Move, NodeId, NodeInfo, Role, Site, Volume, VolumeId,
};

/// Volumes are made of 4 KiB blocks (DESIGN §1).
pub const BLOCK_SIZE: u64 = 4096;

/// Everything the cluster agrees on through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMetadata {
    pub sites: BTreeMap<String, Site>,
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    pub volumes: BTreeMap<VolumeId, Volume>,
    pub groups: BTreeMap<GroupId, Group>,
    /// Live migrations in flight, one per group at most.
    pub moves: BTreeMap<GroupId, Move>,
    /// Ids of deleted volumes: a node that was away learns that its leg is
    /// to be dropped, and the id is never handed out again.
    pub deleted_volumes: BTreeSet<VolumeId>,
    /// Ids of deleted groups, for the same reasons.
    pub deleted_groups: BTreeSet<GroupId>,
    /// The next volume id to give; only ever grows.
    pub next_volume_id: VolumeId,
    /// The next group id to give; only ever grows.
    pub next_group_id: GroupId,
}

impl Default for ClusterMetadata {
    fn default() -> Self {
        Self {
            sites: BTreeMap::new(),
            nodes: BTreeMap::new(),
            volumes: BTreeMap::new(),
            groups: BTreeMap::new(),
            moves: BTreeMap::new(),
            deleted_volumes: BTreeSet::new(),
            deleted_groups: BTreeSet::new(),
            // 0 is kept free so that it can mean "no volume" on the wire.
            next_volume_id: 1,
            next_group_id: 1,
        }
    }
}

impl ClusterMetadata {
    /// The volume named `name`.
    pub fn volume_by_name(&self, name: &str) -> Option<&Volume> {
        self.volumes.values().find(|v| v.name == name)
    }

    /// The names of the sites that may own groups.
    pub fn data_sites(&self) -> Vec<String> {
        self.sites
            .values()
            .filter(|site| site.role == Role::Data)
            .map(|site| site.name.clone())
            .collect()
    }

    /// The group named `name`.
    pub fn group_by_name(&self, name: &str) -> Option<&Group> {
        self.groups.values().find(|g| g.name == name)
    }

    /// Apply one command. On error nothing was changed.
    pub fn apply(&mut self, command: &Command) -> CommandResult {
        match command {
            Command::AddSite { name, role } => self.add_site(name, *role),
            Command::AddNode { id, info } => self.add_node(*id, info),
            Command::RemoveNode { id } => match self.nodes.remove(id) {
                Some(_) => Ok(Outcome::Done),
                None => Err(CommandError::UnknownNode { id: *id }),
            },
            Command::CreateVolume {
                name,
                size,
                group,
                mode,
                failover,
                owner_site,
            } => self.create_volume(name, *size, group, *mode, *failover, owner_site),
            Command::DeleteVolume { name } => self.delete_volume(name),
            Command::TransferGroup {
                group,
                from,
                to,
                expected_epoch,
                after_seq,
                migration,
                fast,
            } => self.transfer_group(
                group,
                from,
                to,
                *expected_epoch,
                *after_seq,
                *migration,
                fast.as_ref(),
            ),
            Command::EndFastDrain {
                group,
                expected_epoch,
                accept_loss: _,
            } => self.end_fast_drain(group, *expected_epoch),
            Command::PromoteGroup {
                group,
                to,
                expected_epoch,
                after_seq,
                automatic,
                passed_over,
            } => self.promote_group(
                group,
                to,
                *expected_epoch,
                *after_seq,
                *automatic,
                passed_over,
            ),
            Command::OfferImage {
                group,
                site,
                expected_epoch,
                after_seq,
            } => self.offer_image(group, site, *expected_epoch, *after_seq),
            Command::BeginMove {
                group,
                to,
                expected_epoch,
            } => self.begin_move(group, to, *expected_epoch),
            Command::AbortMove {
                group,
                expected_epoch,
            } => self.abort_move(group, *expected_epoch),
            Command::SetGroupState {
                group,
                expected_epoch,
                state,
            } => self.set_group_state(group, *expected_epoch, *state),
            Command::SetFollow { group, follow } => self.set_follow(group, *follow),
        }
    }

    fn add_site(&mut self, name: &str, role: Role) -> CommandResult {
        if name.is_empty() {
            return Err(CommandError::EmptyName);
        }
        if self.sites.contains_key(name) {
            return Err(CommandError::SiteExists {
                site: name.to_owned(),
            });
        }
        self.sites.insert(
            name.to_owned(),
            Site {
                name: name.to_owned(),
                role,
            },
        );
        Ok(Outcome::Done)
    }

    fn add_node(&mut self, id: NodeId, info: &NodeInfo) -> CommandResult {
        if info.name.is_empty() {
            return Err(CommandError::EmptyName);
        }
        let site = self.site(&info.site)?;
        if site.role != info.role {
            return Err(CommandError::RoleMismatch {
                node: info.role,
                site: site.role,
            });
        }
        if self.nodes.contains_key(&id) {
            return Err(CommandError::NodeExists { id });
        }
        if self.nodes.values().any(|n| n.name == info.name) {
            return Err(CommandError::NodeNameExists {
                name: info.name.clone(),
            });
        }
        self.nodes.insert(id, info.clone());
        Ok(Outcome::Done)
    }

    fn site(&self, name: &str) -> Result<&Site, CommandError> {
        self.sites
            .get(name)
            .ok_or_else(|| CommandError::UnknownSite {
                site: name.to_owned(),
            })
    }

    /// A site that may own volumes.
    fn data_site(&self, name: &str) -> Result<(), CommandError> {
        match self.site(name)?.role {
            Role::Data => Ok(()),
            Role::Witness => Err(CommandError::WitnessSite {
                site: name.to_owned(),
            }),
        }
    }

    fn create_volume(
        &mut self,
        name: &str,
        size: u64,
        group_name: &str,
        mode: crate::types::Mode,
        failover: crate::types::Failover,
        owner_site: &str,
    ) -> CommandResult {
        if name.is_empty() || group_name.is_empty() {
            return Err(CommandError::EmptyName);
        }
        if self.volume_by_name(name).is_some() {
            return Err(CommandError::VolumeExists {
                name: name.to_owned(),
            });
        }
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
            return Err(CommandError::BadSize { size });
        }
        self.data_site(owner_site)?;

        // Every check is done before the first change, so a refusal leaves
        // the counters untouched.
        let volume_id = self.next_volume_id;
        let next_volume_id = volume_id
            .checked_add(1)
            .ok_or_else(|| CommandError::Exhausted {
                what: "volume id".to_owned(),
            })?;
        let (group_id, epoch, new_group) = match self.group_by_name(group_name) {
            Some(g) => {
                if g.owner != owner_site {
                    return Err(CommandError::NotOwner {
                        group: group_name.to_owned(),
                        owner: g.owner.clone(),
                        claimed: owner_site.to_owned(),
                    });
                }
                // A volume joining mid-move would miss the move's catch-up.
                if self.moves.contains_key(&g.id) {
                    return Err(CommandError::MoveInFlight {
                        group: group_name.to_owned(),
                    });
                }
                (g.id, g.epoch, None)
            }
            None => {
                let id = self.next_group_id;
                let next = id.checked_add(1).ok_or_else(|| CommandError::Exhausted {
                    what: "group id".to_owned(),
                })?;
                let group = Group {
                    id,
                    name: group_name.to_owned(),
                    owner: owner_site.to_owned(),
                    epoch: 1,
                    state: GroupState::Active,
                    history: vec![EpochStart {
                        epoch: 1,
                        after_seq: 0,
                        handed_over: false,
                    }],
                    last_failover: None,
                    offers: BTreeMap::new(),
                    follow: Follow::Off,
                    fast_drain: None,
                };
                (id, 1, Some((group, next)))
            }
        };

        if let Some((group, next)) = new_group {
            self.groups.insert(group.id, group);
            self.next_group_id = next;
        }
        self.next_volume_id = next_volume_id;
        self.volumes.insert(
            volume_id,
            Volume {
                id: volume_id,
                name: name.to_owned(),
                size,
                group: group_id,
                mode,
                failover,
            },
        );
        Ok(Outcome::VolumeCreated {
            volume: volume_id,
            group: group_id,
            epoch,
        })
    }

    fn delete_volume(&mut self, name: &str) -> CommandResult {
        let Some(volume) = self.volume_by_name(name).cloned() else {
            return Err(CommandError::UnknownVolume {
                name: name.to_owned(),
            });
        };
        if self.moves.contains_key(&volume.group) {
            let group = self
                .groups
                .get(&volume.group)
                .map(|g| g.name.clone())
                .unwrap_or_default();
            return Err(CommandError::MoveInFlight { group });
        }
        self.volumes.remove(&volume.id);
        self.deleted_volumes.insert(volume.id);
        let group_deleted = !self.volumes.values().any(|v| v.group == volume.group);
        if group_deleted {
            self.groups.remove(&volume.group);
            self.deleted_groups.insert(volume.group);
        }
        Ok(Outcome::VolumeDeleted {
            volume: volume.id,
            group_deleted,
        })
    }

    /// The group named `name`, for a change.
    fn group_mut(&mut self, name: &str) -> Result<&mut Group, CommandError> {
        self.groups
            .values_mut()
            .find(|g| g.name == name)
            .ok_or_else(|| CommandError::UnknownGroup {
                group: name.to_owned(),
            })
    }

    /// The group named `name` at `expected_epoch`, for a change: the fencing
    /// check every ownership-related command goes through.
    fn fenced_group(
        &mut self,
        name: &str,
        expected_epoch: u64,
    ) -> Result<&mut Group, CommandError> {
        let group = self.group_mut(name)?;
        if group.epoch != expected_epoch {
            return Err(CommandError::StaleEpoch {
                group: name.to_owned(),
                expected: expected_epoch,
                current: group.epoch,
            });
        }
        Ok(group)
    }

    #[allow(clippy::too_many_arguments)]
    fn transfer_group(
        &mut self,
        name: &str,
        from: &str,
        to: &str,
        expected_epoch: u64,
        after_seq: u64,
        migration: bool,
        fast: Option<&FastSeal>,
    ) -> CommandResult {
        self.data_site(to)?;
        let data_sites = self.data_sites().len();
        if fast.is_some() && data_sites != 2 {
            return Err(CommandError::FastNeedsTwoSites { data_sites });
        }
        let id = self.fenced_group(name, expected_epoch)?.id;
        let migrating_to = self.moves.get(&id).map(|record| record.to.as_str());
        if migration && migrating_to != Some(to) {
            return Err(CommandError::NoMoveInFlight {
                group: name.to_owned(),
            });
        }
        let group = self.fenced_group(name, expected_epoch)?;
        if group.owner != from {
            return Err(CommandError::NotOwner {
                group: name.to_owned(),
                owner: group.owner.clone(),
                claimed: from.to_owned(),
            });
        }
        if from == to {
            return Err(CommandError::SameSite {
                group: name.to_owned(),
                site: to.to_owned(),
            });
        }
        let epoch = change_owner(group, to, after_seq, true)?;
        group.fast_drain = fast.map(|seal| FastDrain {
            from: from.to_owned(),
            to: to.to_owned(),
            epoch,
            regions: seal.regions.clone(),
        });
        let id = group.id;
        self.moves.remove(&id);
        Ok(Outcome::Epoch { group: id, epoch })
    }

    fn end_fast_drain(&mut self, name: &str, expected_epoch: u64) -> CommandResult {
        let group = self.fenced_group(name, expected_epoch)?;
        if group.fast_drain.take().is_none() {
            return Err(CommandError::NoFastDrain {
                group: name.to_owned(),
            });
        }
        Ok(Outcome::Epoch {
            group: group.id,
            epoch: group.epoch,
        })
    }

    fn promote_group(
        &mut self,
        name: &str,
        to: &str,
        expected_epoch: u64,
        after_seq: u64,
        automatic: bool,
        passed_over: &[String],
    ) -> CommandResult {
        self.data_site(to)?;
        let group = self.fenced_group(name, expected_epoch)?;
        if group.owner == to {
            return Err(CommandError::SameSite {
                group: name.to_owned(),
                site: to.to_owned(),
            });
        }
        if automatic {
            // An operator's promotion names its site and accepts the loss;
            // the policy's must not lose what another survivor holds.
            let newer = group
                .offers
                .iter()
                .filter(|(site, _)| *site != to && !passed_over.contains(site))
                .filter_map(|(site, offered)| offered.map(|offered| (site, offered)))
                .filter(|(_, offered)| *offered > after_seq)
                .max_by_key(|(_, offered)| *offered);
            if let Some((site, offered)) = newer {
                return Err(CommandError::NewerImage {
                    group: name.to_owned(),
                    site: site.clone(),
                    offered,
                    image: after_seq,
                });
            }
        }
        let from = group.owner.clone();
        let epoch = change_owner(group, to, after_seq, false)?;
        group.last_failover = Some(FailoverRecord {
            from,
            to: to.to_owned(),
            epoch,
            after_seq,
            automatic,
        });
        let id = group.id;
        // A move in flight is over: its source is the site that was lost.
        self.moves.remove(&id);
        Ok(Outcome::Epoch { group: id, epoch })
    }

    fn offer_image(
        &mut self,
        name: &str,
        site: &str,
        expected_epoch: u64,
        after_seq: Option<u64>,
    ) -> CommandResult {
        self.data_site(site)?;
        let group = self.fenced_group(name, expected_epoch)?;
        if group.owner == site {
            return Err(CommandError::OwnerOffers {
                group: name.to_owned(),
                site: site.to_owned(),
            });
        }
        group.offers.insert(site.to_owned(), after_seq);
        let (id, epoch) = (group.id, group.epoch);
        Ok(Outcome::Epoch { group: id, epoch })
    }

    fn begin_move(&mut self, name: &str, to: &str, expected_epoch: u64) -> CommandResult {
        self.data_site(to)?;
        let group = self.fenced_group(name, expected_epoch)?;
        if group.owner == to {
            return Err(CommandError::SameSite {
                group: name.to_owned(),
                site: to.to_owned(),
            });
        }
        if group.state != GroupState::Active {
            // Suspended: the owner is not serving, so there is nothing to
            // drain; Moving: one move at a time.
            return Err(CommandError::MoveInFlight {
                group: name.to_owned(),
            });
        }
        if let Some(drain) = &group.fast_drain {
            // The owner's image is not whole until its copy ends.
            return Err(CommandError::FastDrainRunning {
                group: name.to_owned(),
                from: drain.from.clone(),
            });
        }
        group.state = GroupState::Moving;
        let record = Move {
            group: group.id,
            from: group.owner.clone(),
            to: to.to_owned(),
            epoch: group.epoch,
        };
        let (id, epoch) = (group.id, group.epoch);
        self.moves.insert(id, record);
        Ok(Outcome::Epoch { group: id, epoch })
    }

    fn abort_move(&mut self, name: &str, expected_epoch: u64) -> CommandResult {
        let group = self.fenced_group(name, expected_epoch)?;
        if group.state != GroupState::Moving {
            return Err(CommandError::NoMoveInFlight {
                group: name.to_owned(),
            });
        }
        group.state = GroupState::Active;
        let (id, epoch) = (group.id, group.epoch);
        self.moves.remove(&id);
        Ok(Outcome::Epoch { group: id, epoch })
    }

    fn set_follow(&mut self, name: &str, follow: Follow) -> CommandResult {
        self.group_mut(name)?.follow = follow;
        Ok(Outcome::Done)
    }

    fn set_group_state(
        &mut self,
        name: &str,
        expected_epoch: u64,
        state: GroupState,
    ) -> CommandResult {
        let group = self.fenced_group(name, expected_epoch)?;
        match state {
            GroupState::Moving => {
                return Err(CommandError::BadState {
                    group: name.to_owned(),
                    state,
                });
            }
            GroupState::Active | GroupState::Suspended => {}
        }
        if group.state == GroupState::Moving {
            // The move record must go with the state: abort it first.
            return Err(CommandError::MoveInFlight {
                group: name.to_owned(),
            });
        }
        group.state = state;
        Ok(Outcome::Epoch {
            group: group.id,
            epoch: group.epoch,
        })
    }
}

/// Names `to` owner of `group` at the next epoch, which starts after
/// `after_seq`; the group is active again. Nothing changes on error.
fn change_owner(
    group: &mut Group,
    to: &str,
    after_seq: u64,
    handed_over: bool,
) -> Result<u64, CommandError> {
    let epoch = group
        .epoch
        .checked_add(1)
        .ok_or_else(|| CommandError::Exhausted {
            what: "epoch".to_owned(),
        })?;
    group.epoch = epoch;
    group.owner = to.to_owned();
    group.state = GroupState::Active;
    // A drain's target loses it (a failover): resynced whole instead.
    group.fast_drain = None;
    // Offers name images of the line this change ends.
    group.offers.clear();
    push_history(group, epoch, after_seq, handed_over);
    Ok(epoch)
}

/// Records that `epoch` starts after `after_seq`, dropping the oldest
/// entries past the bound.
fn push_history(group: &mut Group, epoch: u64, after_seq: u64, handed_over: bool) {
    group.history.push(EpochStart {
        epoch,
        after_seq,
        handed_over,
    });
    let excess = group.history.len().saturating_sub(EPOCH_HISTORY_MAX);
    group.history.drain(..excess);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Failover, Mode};

    fn cluster() -> ClusterMetadata {
        let mut m = ClusterMetadata::default();
        for (name, role) in [("a", Role::Data), ("b", Role::Data), ("w", Role::Witness)] {
            m.apply(&Command::AddSite {
                name: name.into(),
                role,
            })
            .expect("add site");
        }
        m
    }

    fn create(name: &str, group: &str, site: &str) -> Command {
        Command::CreateVolume {
            name: name.into(),
            size: 1 << 20,
            group: group.into(),
            mode: Mode::Async,
            failover: Failover::Auto,
            owner_site: site.into(),
        }
    }

    fn transfer(group: &str, from: &str, to: &str, epoch: u64) -> Command {
        Command::TransferGroup {
            group: group.into(),
            from: from.into(),
            to: to.into(),
            expected_epoch: epoch,
            after_seq: 0,
            migration: false,
            fast: None,
        }
    }

    #[test]
    fn create_allocates_ids_and_refuses_duplicate_names() {
        let mut m = cluster();
        assert_eq!(
            m.apply(&create("v1", "g1", "a")),
            Ok(Outcome::VolumeCreated {
                volume: 1,
                group: 1,
                epoch: 1
            })
        );
        assert_eq!(
            m.apply(&create("v2", "g1", "a")),
            Ok(Outcome::VolumeCreated {
                volume: 2,
                group: 1,
                epoch: 1
            })
        );
        let before = m.clone();
        assert_eq!(
            m.apply(&create("v1", "g2", "b")),
            Err(CommandError::VolumeExists { name: "v1".into() })
        );
        assert_eq!(m, before, "a refused command changes nothing");
    }

    #[test]
    fn create_refuses_bad_sites_sizes_and_foreign_groups() {
        let mut m = cluster();
        assert_eq!(
            m.apply(&create("v", "g", "x")),
            Err(CommandError::UnknownSite { site: "x".into() })
        );
        assert_eq!(
            m.apply(&create("v", "g", "w")),
            Err(CommandError::WitnessSite { site: "w".into() })
        );
        let mut bad = create("v", "g", "a");
        if let Command::CreateVolume { size, .. } = &mut bad {
            *size = 4097;
        }
        assert_eq!(m.apply(&bad), Err(CommandError::BadSize { size: 4097 }));
        m.apply(&create("v", "g", "a")).expect("create");
        assert!(matches!(
            m.apply(&create("v2", "g", "b")),
            Err(CommandError::NotOwner { .. })
        ));
        assert_eq!(m.next_volume_id, 2, "refusals allocate nothing");
    }

    #[test]
    fn ids_are_never_reused_after_delete() {
        let mut m = cluster();
        m.apply(&create("v1", "g1", "a")).expect("create");
        assert_eq!(
            m.apply(&Command::DeleteVolume { name: "v1".into() }),
            Ok(Outcome::VolumeDeleted {
                volume: 1,
                group_deleted: true
            })
        );
        assert!(m.deleted_volumes.contains(&1) && m.deleted_groups.contains(&1));
        assert_eq!(
            m.apply(&create("v1", "g1", "a")),
            Ok(Outcome::VolumeCreated {
                volume: 2,
                group: 2,
                epoch: 1
            })
        );
        assert_eq!(
            m.apply(&Command::DeleteVolume {
                name: "nope".into()
            }),
            Err(CommandError::UnknownVolume {
                name: "nope".into()
            })
        );
    }

    fn promote(group: &str, to: &str, epoch: u64, after_seq: u64) -> Command {
        Command::PromoteGroup {
            group: group.into(),
            to: to.into(),
            expected_epoch: epoch,
            after_seq,
            automatic: true,
            passed_over: Vec::new(),
        }
    }

    fn offer(group: &str, site: &str, epoch: u64, after_seq: Option<u64>) -> Command {
        Command::OfferImage {
            group: group.into(),
            site: site.into(),
            expected_epoch: epoch,
            after_seq,
        }
    }

    #[test]
    fn an_automatic_promotion_is_refused_while_a_newer_image_is_offered() {
        let mut m = ClusterMetadata::default();
        for name in ["a", "b", "c"] {
            m.apply(&Command::AddSite {
                name: name.into(),
                role: Role::Data,
            })
            .expect("add site");
        }
        m.apply(&create("v1", "g1", "a")).expect("create");
        assert_eq!(
            m.apply(&offer("g1", "a", 1, Some(9))),
            Err(CommandError::OwnerOffers {
                group: "g1".into(),
                site: "a".into()
            })
        );
        assert!(matches!(
            m.apply(&offer("g1", "b", 0, Some(9))),
            Err(CommandError::StaleEpoch { .. })
        ));
        m.apply(&offer("g1", "b", 1, Some(7))).expect("offer b");
        m.apply(&offer("g1", "c", 1, Some(9))).expect("offer c");
        let before = m.clone();
        assert_eq!(
            m.apply(&promote("g1", "b", 1, 7)),
            Err(CommandError::NewerImage {
                group: "g1".into(),
                site: "c".into(),
                offered: 9,
                image: 7
            })
        );
        assert_eq!(m, before, "a refused promotion changes nothing");

        // An operator's promotion accepts the loss at the site it names.
        let mut manual = m.clone();
        let mut command = promote("g1", "b", 1, 7);
        if let Command::PromoteGroup { automatic, .. } = &mut command {
            *automatic = false;
        }
        manual.apply(&command).expect("manual promotion");

        // A survivor found holding no lease is passed over.
        let mut passing = m.clone();
        let mut command = promote("g1", "b", 1, 7);
        if let Command::PromoteGroup { passed_over, .. } = &mut command {
            passed_over.push("c".into());
        }
        passing.apply(&command).expect("c passed over");

        // Equal images are as good; the newest wins, and the change of
        // owner forgets every offer.
        m.apply(&offer("g1", "b", 1, Some(9)))
            .expect("b offers again");
        assert_eq!(
            m.apply(&promote("g1", "b", 1, 9)),
            Ok(Outcome::Epoch { group: 1, epoch: 2 })
        );
        let group = m.group_by_name("g1").expect("group");
        assert!(group.offers.is_empty(), "{:?}", group.offers);
        // A survivor that holds nothing it could serve does not block.
        m.apply(&offer("g1", "a", 2, None)).expect("offer none");
        m.apply(&promote("g1", "c", 2, 9)).expect("promote c");
    }

    #[test]
    fn promote_raises_the_epoch_and_records_the_loss_point() {
        let mut m = cluster();
        m.apply(&create("v1", "g1", "a")).expect("create");
        assert_eq!(
            m.apply(&promote("g1", "b", 1, 41)),
            Ok(Outcome::Epoch { group: 1, epoch: 2 })
        );
        let group = m.group_by_name("g1").expect("group");
        assert_eq!(group.owner, "b");
        assert_eq!(
            group.history,
            vec![
                EpochStart {
                    epoch: 1,
                    after_seq: 0,
                    handed_over: false,
                },
                EpochStart {
                    epoch: 2,
                    after_seq: 41,
                    handed_over: false,
                }
            ]
        );
        assert_eq!(
            group.last_failover,
            Some(FailoverRecord {
                from: "a".into(),
                to: "b".into(),
                epoch: 2,
                after_seq: 41,
                automatic: true,
            })
        );
        // Decided on stale state (a second survivor racing): refused, and
        // nothing changes.
        let before = m.clone();
        assert!(matches!(
            m.apply(&promote("g1", "a", 1, 50)),
            Err(CommandError::StaleEpoch { current: 2, .. })
        ));
        assert!(matches!(
            m.apply(&promote("g1", "b", 2, 50)),
            Err(CommandError::SameSite { .. })
        ));
        assert!(matches!(
            m.apply(&promote("g1", "w", 2, 50)),
            Err(CommandError::WitnessSite { .. })
        ));
        assert_eq!(m, before);
    }

    #[test]
    fn epoch_history_is_bounded() {
        let mut m = cluster();
        m.apply(&create("v1", "g1", "a")).expect("create");
        let sites = ["b", "a"];
        for epoch in 1..=(EPOCH_HISTORY_MAX as u64 + 10) {
            let to = sites[((epoch + 1) % 2) as usize];
            m.apply(&promote("g1", to, epoch, epoch * 10))
                .expect("promote");
        }
        let group = m.group_by_name("g1").expect("group");
        assert_eq!(group.history.len(), EPOCH_HISTORY_MAX);
        let last = group.history.last().expect("entries");
        assert_eq!(last.epoch, group.epoch);
        assert!(group.history.windows(2).all(|w| w[0].epoch < w[1].epoch));
    }

    #[test]
    fn transfer_is_fenced_by_epoch_and_owner() {
        let mut m = cluster();
        m.apply(&create("v1", "g1", "a")).expect("create");
        assert_eq!(
            m.apply(&transfer("g1", "a", "b", 1)),
            Ok(Outcome::Epoch { group: 1, epoch: 2 })
        );
        // A hand-over: nothing past its boundary can have been written
        // under the old epoch.
        let last = m
            .group_by_name("g1")
            .and_then(|g| g.history.last().copied());
        assert_eq!(
            last.map(|start| (start.epoch, start.handed_over)),
            Some((2, true))
        );
        // The same request again is stale: it was decided at epoch 1.
        let before = m.clone();
        assert_eq!(
            m.apply(&transfer("g1", "a", "b", 1)),
            Err(CommandError::StaleEpoch {
                group: "g1".into(),
                expected: 1,
                current: 2
            })
        );
        assert!(matches!(
            m.apply(&transfer("g1", "a", "b", 2)),
            Err(CommandError::NotOwner { .. })
        ));
        assert!(matches!(
            m.apply(&transfer("g1", "b", "w", 2)),
            Err(CommandError::WitnessSite { .. })
        ));
        assert!(matches!(
            m.apply(&transfer("g1", "b", "b", 2)),
            Err(CommandError::SameSite { .. })
        ));
        assert_eq!(m, before);
        assert_eq!(
            m.apply(&transfer("g1", "b", "a", 2)),
            Ok(Outcome::Epoch { group: 1, epoch: 3 })
        );
    }

    #[test]
    fn epoch_strictly_increases_over_any_sequence() {
        let mut m = cluster();
        m.apply(&create("v1", "g1", "a")).expect("create");
        let mut last = 1;
        let sites = ["a", "b"];
        for i in 0..50u64 {
            let g = m.group_by_name("g1").expect("group").clone();
            let to = sites[(i as usize + 1) % 2];
            // A mix of stale and fresh requests and state changes.
            let cmds = [
                transfer("g1", &g.owner, to, g.epoch.saturating_sub(i % 2)),
                Command::SetGroupState {
                    group: "g1".into(),
                    expected_epoch: g.epoch,
                    state: GroupState::Suspended,
                },
                Command::BeginMove {
                    group: "g1".into(),
                    to: to.into(),
                    expected_epoch: g.epoch,
                },
            ];
            for c in &cmds {
                let _ = m.apply(c);
                let e = m.group_by_name("g1").expect("group").epoch;
                assert!(e >= last, "epoch never goes back");
                last = e;
            }
        }
        assert!(last > 1);
    }

    #[test]
    fn a_group_follows_its_workload_only_when_told() {
        let mut m = cluster();
        m.apply(&create("v1", "g1", "a")).expect("create");
        assert_eq!(m.group_by_name("g1").expect("group").follow, Follow::Off);
        let auto = Command::SetFollow {
            group: "g1".into(),
            follow: Follow::Auto,
        };
        m.apply(&auto).expect("set");
        assert_eq!(m.group_by_name("g1").expect("group").follow, Follow::Auto);
        // The setting stays with the group through a change of owner.
        m.apply(&transfer("g1", "a", "b", 1)).expect("transfer");
        assert_eq!(m.group_by_name("g1").expect("group").follow, Follow::Auto);
        assert!(matches!(
            m.apply(&Command::SetFollow {
                group: "nope".into(),
                follow: Follow::Auto
            }),
            Err(CommandError::UnknownGroup { .. })
        ));
        // A group recorded before the setting existed reads as off.
        let mut value = serde_json::to_value(m.group_by_name("g1").expect("group")).expect("json");
        value.as_object_mut().expect("object").remove("follow");
        let old: Group = serde_json::from_value(value).expect("old group");
        assert_eq!(old.follow, Follow::Off);
    }

    #[test]
    fn moves_are_recorded_and_closed_by_the_transfer() {
        let mut m = cluster();
        m.apply(&create("v1", "g1", "a")).expect("create");
        let begin = Command::BeginMove {
            group: "g1".into(),
            to: "b".into(),
            expected_epoch: 1,
        };
        m.apply(&begin).expect("begin");
        assert_eq!(
            m.moves.get(&1),
            Some(&Move {
                group: 1,
                from: "a".into(),
                to: "b".into(),
                epoch: 1
            })
        );
        assert!(matches!(
            m.apply(&begin),
            Err(CommandError::MoveInFlight { .. })
        ));
        assert!(matches!(
            m.apply(&create("v2", "g1", "a")),
            Err(CommandError::MoveInFlight { .. })
        ));
        assert!(matches!(
            m.apply(&Command::SetGroupState {
                group: "g1".into(),
                expected_epoch: 1,
                state: GroupState::Moving
            }),
            Err(CommandError::BadState { .. })
        ));
        m.apply(&transfer("g1", "a", "b", 1)).expect("switchover");
        assert!(m.moves.is_empty());
        let g = m.group_by_name("g1").expect("group");
        assert_eq!(
            (g.owner.as_str(), g.epoch, g.state),
            ("b", 2, GroupState::Active)
        );
        assert!(matches!(
            m.apply(&Command::AbortMove {
                group: "g1".into(),
                expected_epoch: 2
            }),
            Err(CommandError::NoMoveInFlight { .. })
        ));
    }

    #[test]
    fn a_migration_switchover_needs_its_move_in_flight() {
        let mut m = cluster();
        m.apply(&create("v1", "g1", "a")).expect("create");
        let switchover = |to: &str| Command::TransferGroup {
            group: "g1".into(),
            from: "a".into(),
            to: to.into(),
            expected_epoch: 1,
            after_seq: 0,
            migration: true,
            fast: None,
        };
        // No move begun: refused, the owner stays.
        assert!(matches!(
            m.apply(&switchover("b")),
            Err(CommandError::NoMoveInFlight { .. })
        ));
        m.apply(&Command::BeginMove {
            group: "g1".into(),
            to: "b".into(),
            expected_epoch: 1,
        })
        .expect("begin");
        // A cancel committed before the switchover wins over it.
        m.apply(&Command::AbortMove {
            group: "g1".into(),
            expected_epoch: 1,
        })
        .expect("abort");
        assert!(matches!(
            m.apply(&switchover("b")),
            Err(CommandError::NoMoveInFlight { .. })
        ));
        let g = m.group_by_name("g1").expect("group");
        assert_eq!((g.owner.as_str(), g.epoch), ("a", 1));
        m.apply(&Command::BeginMove {
            group: "g1".into(),
            to: "b".into(),
            expected_epoch: 1,
        })
        .expect("begin again");
        m.apply(&switchover("b")).expect("switchover");
        let g = m.group_by_name("g1").expect("group");
        assert_eq!((g.owner.as_str(), g.epoch), ("b", 2));
        assert!(m.moves.is_empty());
    }

    #[test]
    fn nodes_must_match_their_site() {
        let mut m = cluster();
        let info = |name: &str, site: &str, role| NodeInfo {
            name: name.into(),
            site: site.into(),
            role,
            addr: "x:1".into(),
        };
        m.apply(&Command::AddNode {
            id: 1,
            info: info("n1", "a", Role::Data),
        })
        .expect("add");
        assert_eq!(
            m.apply(&Command::AddNode {
                id: 2,
                info: info("n2", "w", Role::Data)
            }),
            Err(CommandError::RoleMismatch {
                node: Role::Data,
                site: Role::Witness
            })
        );
        assert!(matches!(
            m.apply(&Command::AddNode {
                id: 1,
                info: info("n3", "a", Role::Data)
            }),
            Err(CommandError::NodeExists { .. })
        ));
        assert!(matches!(
            m.apply(&Command::AddNode {
                id: 3,
                info: info("n1", "b", Role::Data)
            }),
            Err(CommandError::NodeNameExists { .. })
        ));
        m.apply(&Command::RemoveNode { id: 1 }).expect("remove");
        assert!(m.nodes.is_empty());
    }

    #[test]
    fn same_commands_same_state() {
        let cmds = [
            create("v1", "g1", "a"),
            create("v2", "g2", "b"),
            transfer("g1", "a", "b", 1),
        ];
        let run = || {
            let mut m = cluster();
            let results: Vec<_> = cmds.iter().map(|c| m.apply(c)).collect();
            (m, results)
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn a_fast_switchover_records_its_drain_until_it_ends_or_the_owner_changes() {
        let mut m = cluster();
        m.apply(&create("v1", "g1", "a")).expect("create");
        m.apply(&Command::BeginMove {
            group: "g1".into(),
            to: "b".into(),
            expected_epoch: 1,
        })
        .expect("begin");
        let fast = |regions| Command::TransferGroup {
            group: "g1".into(),
            from: "a".into(),
            to: "b".into(),
            expected_epoch: 1,
            after_seq: 7,
            migration: true,
            fast: Some(FastSeal { regions }),
        };
        m.apply(&fast(Some(vec![(1, 0), (1, 3)])))
            .expect("switchover");
        let g = m.group_by_name("g1").expect("group");
        assert_eq!((g.owner.as_str(), g.epoch), ("b", 2));
        assert_eq!(
            g.fast_drain,
            Some(FastDrain {
                from: "a".into(),
                to: "b".into(),
                epoch: 2,
                regions: Some(vec![(1, 0), (1, 3)]),
            })
        );
        assert_eq!(g.history.last().map(|start| start.after_seq), Some(7));
        // No new move while it copies.
        assert_eq!(
            m.apply(&Command::BeginMove {
                group: "g1".into(),
                to: "a".into(),
                expected_epoch: 2,
            }),
            Err(CommandError::FastDrainRunning {
                group: "g1".into(),
                from: "a".into()
            })
        );
        let end = |epoch| Command::EndFastDrain {
            group: "g1".into(),
            expected_epoch: epoch,
            accept_loss: false,
        };
        assert!(matches!(
            m.apply(&end(1)),
            Err(CommandError::StaleEpoch { .. })
        ));
        m.apply(&end(2)).expect("end");
        assert_eq!(m.group_by_name("g1").expect("group").fast_drain, None);
        assert_eq!(
            m.apply(&end(2)),
            Err(CommandError::NoFastDrain { group: "g1".into() })
        );
        // A failover ends a drain too.
        m.apply(&Command::BeginMove {
            group: "g1".into(),
            to: "a".into(),
            expected_epoch: 2,
        })
        .expect("begin");
        let mut back = fast(None);
        if let Command::TransferGroup {
            from,
            to,
            expected_epoch,
            ..
        } = &mut back
        {
            (*from, *to, *expected_epoch) = ("b".into(), "a".into(), 2);
        }
        m.apply(&back).expect("switchover back");
        assert!(m.group_by_name("g1").expect("group").fast_drain.is_some());
        m.apply(&Command::PromoteGroup {
            group: "g1".into(),
            to: "b".into(),
            expected_epoch: 3,
            after_seq: 7,
            automatic: false,
            passed_over: Vec::new(),
        })
        .expect("promote");
        assert_eq!(m.group_by_name("g1").expect("group").fast_drain, None);
    }

    #[test]
    fn a_fast_switchover_needs_exactly_two_data_sites() {
        let mut m = cluster();
        m.apply(&Command::AddSite {
            name: "c".into(),
            role: Role::Data,
        })
        .expect("add site");
        m.apply(&create("v1", "g1", "a")).expect("create");
        let command = Command::TransferGroup {
            group: "g1".into(),
            from: "a".into(),
            to: "b".into(),
            expected_epoch: 1,
            after_seq: 0,
            migration: false,
            fast: Some(FastSeal { regions: None }),
        };
        assert_eq!(
            m.apply(&command),
            Err(CommandError::FastNeedsTwoSites { data_sites: 3 })
        );
    }
}
