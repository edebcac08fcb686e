//! What a control-plane run checks: G1 at every probe, G5 during and at
//! the end of every phase, G6 after the last heal (see the module docs of
//! [`super`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use stretch_metadata::{ClusterMetadata, Failover};

use super::Fault;
use super::world::World;

/// What a phase predicts and what it saw.
pub(crate) struct Phase {
    pub fault: Fault,
    /// The same once the phase's own changes settled (a flapping link
    /// stays up for the second half; a restarted leader is back).
    majority_side_end: BTreeSet<usize>,
    groups: BTreeMap<u32, GroupFacts>,
    /// Groups that must keep accepting writes at this site throughout: its
    /// owner kept a majority of the voters since the previous phase ended,
    /// when it accepted them.
    stable: BTreeMap<u32, usize>,
    promoted: BTreeSet<u32>,
    restarted: BTreeSet<usize>,
    /// Where each group accepted writes when the phase ended.
    available_at_end: BTreeMap<u32, Option<usize>>,
}

struct GroupFacts {
    name: String,
    owner: usize,
    automatic: bool,
}

/// The most advanced metadata any running node applied.
fn newest_metadata(world: &World) -> Option<(ClusterMetadata, u64)> {
    (0..world.sites.len())
        .filter_map(|site| world.member(site))
        .map(|member| member.applied.lock().clone())
        .max_by_key(|(_, index)| *index)
}

/// The sites that own some group, by the newest metadata.
pub(crate) fn owner_sites(world: &World) -> Vec<usize> {
    let Some((metadata, _)) = newest_metadata(world) else {
        return Vec::new();
    };
    let owners: BTreeSet<usize> = metadata
        .groups
        .values()
        .filter_map(|group| world.site_by_name(&group.owner))
        .collect();
    owners.into_iter().collect()
}

/// The site whose node every running node that knows a leader names.
pub(crate) fn leader(world: &World) -> Option<usize> {
    (0..world.sites.len())
        .filter_map(|site| world.member(site))
        .filter_map(|member| member.raft())
        .filter_map(|raft| raft.metrics().borrow_watched().current_leader)
        .filter_map(|node| world.site_of_node(node))
        .find(|site| world.member(*site).is_some())
}

/// The sites that would acknowledge a write to `group` now.
fn acknowledging(world: &World, group: u32) -> Vec<(usize, u64)> {
    (0..world.sites.len())
        .filter_map(|site| {
            let member = world.member(site)?;
            member
                .may_acknowledge(world, group)
                .map(|epoch| (site, epoch))
        })
        .collect()
}

/// Sites that are running and reach a majority of the voters both ways,
/// counting themselves; `down_links` count as cut.
fn majority_side(world: &World, down_links: &[(usize, usize)]) -> BTreeSet<usize> {
    let sites = world.sites.len();
    let majority = sites / 2 + 1;
    let up = |site: usize| world.member(site).is_some();
    let linked = |one: usize, other: usize| {
        world.connected(one, other)
            && !down_links.contains(&(one, other))
            && !down_links.contains(&(other, one))
    };
    (0..sites)
        .filter(|site| up(*site))
        .filter(|site| {
            (0..sites)
                .filter(|other| *other == *site || (up(*other) && linked(*site, *other)))
                .count()
                >= majority
        })
        .collect()
}

impl Phase {
    /// A phase starting now with `fault` applied.
    pub fn start(world: &World, fault: Fault, previous: Option<&Phase>) -> Phase {
        let (metadata, _) = newest_metadata(world).unwrap_or_default();
        let groups: BTreeMap<u32, GroupFacts> = metadata
            .groups
            .values()
            .filter_map(|group| {
                let owner = world.site_by_name(&group.owner)?;
                let automatic = metadata
                    .volumes
                    .values()
                    .filter(|volume| volume.group == group.id)
                    .all(|volume| volume.failover == Failover::Auto);
                Some((
                    group.id,
                    GroupFacts {
                        name: group.name.clone(),
                        owner,
                        automatic,
                    },
                ))
            })
            .collect();
        // Sites that reach a majority of the voters (themselves included)
        // while the fault holds (a flapping link counts as cut), and once
        // the phase's own changes settled.
        let (majority_side, majority_side_end) = match fault {
            Fault::Flap(one, other) => (
                majority_side(world, &[(one, other)]),
                majority_side(world, &[]),
            ),
            Fault::RestartLeader => (majority_side(world, &[]), majority_side(world, &[])),
            _ => {
                let side = majority_side(world, &[]);
                (side.clone(), side)
            }
        };
        let stable = previous
            .map(|previous| {
                previous
                    .available_at_end
                    .iter()
                    .filter_map(|(group, site)| Some((*group, (*site)?)))
                    .filter(|(group, site)| {
                        majority_side.contains(site)
                            && previous.majority_side_end.contains(site)
                            && groups.get(group).is_some_and(|facts| facts.owner == *site)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Phase {
            fault,
            majority_side_end,
            groups,
            stable,
            promoted: BTreeSet::new(),
            restarted: BTreeSet::new(),
            available_at_end: BTreeMap::new(),
        }
    }

    /// `site` lost power during the phase: its groups are not expected to
    /// keep accepting writes.
    pub fn restarted(&mut self, site: usize) {
        self.restarted.insert(site);
    }

    /// An operator runs `stretch volume promote --accept-data-loss` for
    /// every `manual` group whose owner is cut off, at the first data site
    /// on the majority side.
    pub fn operator_promotes(&mut self, world: &Arc<World>) {
        for (group, facts) in &self.groups {
            if facts.automatic || self.majority_side_end.contains(&facts.owner) {
                continue;
            }
            let Some(site) = self
                .majority_side_end
                .iter()
                .copied()
                .find(|site| world.sites[*site].data && *site != facts.owner)
            else {
                continue;
            };
            let Some(member) = world.member(site) else {
                continue;
            };
            self.promoted.insert(*group);
            let (world, name) = (world.clone(), facts.name.clone());
            world.record(&[12, site as u64, u64::from(*group)], || {
                format!(
                    "operator: stretch volume promote {name} --site {} --accept-data-loss",
                    world.sites[site].name
                )
            });
            // The operator reads the error and tries again, as long as the
            // node runs.
            tokio::spawn(super::seeded(async move {
                while let Err(error) = super::member::fail_over(
                    &world,
                    &member,
                    &name,
                    stretch_control::TakeoverTrigger::Operator,
                )
                .await
                {
                    world.record(&[13, site as u64], || {
                        format!("operator: the promotion failed: {error}")
                    });
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    if world
                        .member(site)
                        .is_none_or(|now| !Arc::ptr_eq(&now, &member))
                    {
                        return;
                    }
                }
            }));
        }
    }

    /// G1 and the continuous half of G5, at one instant.
    pub fn probe(&mut self, world: &World) {
        world.state.lock().stats.g1_probes += 1;
        trace_raft_views(world);
        for (group, facts) in &self.groups {
            let sites = acknowledging(world, *group);
            let at: Vec<usize> = sites.iter().map(|(site, _)| *site).collect();
            let changed = world
                .state
                .lock()
                .acknowledged_at
                .insert(*group, at.clone())
                != Some(at.clone());
            if changed {
                let names: Vec<&str> = at
                    .iter()
                    .map(|site| world.sites[*site].name.as_str())
                    .collect();
                world.record(
                    &[
                        16,
                        u64::from(*group),
                        at.iter().fold(0, |bits, site| bits | 1 << site),
                    ],
                    || {
                        format!(
                            "group {} accepts writes at [{}]",
                            facts.name,
                            names.join(", ")
                        )
                    },
                );
            }
            if sites.len() > 1 {
                let who: Vec<String> = sites
                    .iter()
                    .map(|(site, epoch)| {
                        format!(
                            "{} (epoch {epoch}, clock {:+} ppm)",
                            world.sites[*site].name, world.sites[*site].drift_ppm
                        )
                    })
                    .collect();
                world.fail(
                    "G1",
                    format!(
                        "group {} would be acknowledged by two sites at once: {} (fault: {})",
                        facts.name,
                        who.join(" and "),
                        self.fault.describe(world)
                    ),
                );
                return;
            }
            if let Some(site) = self.stable.get(group)
                && !self.restarted.contains(site)
                && sites.first().map(|(at, _)| at) != Some(site)
            {
                world.fail(
                    "G5",
                    format!(
                        "group {} stopped accepting writes at its owner {}, which kept a majority of the voters (fault: {})",
                        facts.name,
                        world.sites[*site].name,
                        self.fault.describe(world)
                    ),
                );
                return;
            }
        }
    }

    /// The end-of-phase half of G5: the groups that accept writes are
    /// exactly those predicted.
    pub fn finish(&mut self, world: &World) {
        let mut suspended = 0;
        for (group, facts) in &self.groups {
            let at = acknowledging(world, *group).first().map(|(site, _)| *site);
            self.available_at_end.insert(*group, at);
            let survivor = self
                .majority_side_end
                .iter()
                .any(|site| world.sites[*site].data && *site != facts.owner);
            let predicted = self.majority_side_end.contains(&facts.owner)
                || ((facts.automatic || self.promoted.contains(group)) && survivor);
            if !predicted {
                suspended += 1;
            }
            if predicted != at.is_some() {
                let policy = if facts.automatic { "auto" } else { "manual" };
                world.fail(
                    "G5",
                    format!(
                        "group {} (owner {}, failover {policy}{}) is {} at the end of the phase, predicted {} (fault: {}; sites on a majority side: {})",
                        facts.name,
                        world.sites[facts.owner].name,
                        if self.promoted.contains(group) { ", promoted by an operator" } else { "" },
                        if at.is_some() { "accepting writes" } else { "suspended" },
                        if predicted { "accepting writes" } else { "suspended" },
                        self.fault.describe(world),
                        names(world, &self.majority_side_end),
                    ),
                );
                return;
            }
        }
        let mut state = world.state.lock();
        state.stats.g5_checks += 1;
        if suspended > 0 {
            state.stats.suspensions_seen += 1;
        }
    }
}

/// Traces each node's leader, term and applied index when they change.
fn trace_raft_views(world: &World) {
    for site in 0..world.sites.len() {
        let view = world.member(site).and_then(|member| {
            let raft = member.raft()?;
            let metrics = raft.metrics().borrow_watched().clone();
            Some((
                metrics.current_leader,
                metrics.current_term,
                metrics.last_applied.map_or(0, |log| log.index),
            ))
        });
        let changed = {
            let mut state = world.state.lock();
            let changed = state.raft_views[site] != view;
            state.raft_views[site] = view;
            changed
        };
        if let (true, Some((leader, term, applied))) = (changed, view) {
            let leader_name = leader
                .and_then(|node| world.site_of_node(node))
                .map_or("none".to_string(), |site| world.sites[site].name.clone());
            world.record(
                &[14, site as u64, leader.unwrap_or(0), term, applied],
                || {
                    format!(
                        "site {}: Raft term {term}, leader {leader_name}, applied {applied}",
                        world.sites[site].name
                    )
                },
            );
        }
    }
}

fn names(world: &World, sites: &BTreeSet<usize>) -> String {
    let names: Vec<&str> = sites
        .iter()
        .map(|site| world.sites[*site].name.as_str())
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// G6, after the last heal: every node applied the same metadata, no
/// takeover is left, and every group accepts writes at exactly its owner.
pub(crate) fn converged(world: &World) {
    let Some((metadata, index)) = newest_metadata(world) else {
        world.fail("G6", "no node is running after the heal".into());
        return;
    };
    for site in 0..world.sites.len() {
        let Some(member) = world.member(site) else {
            world.fail(
                "G6",
                format!("site {} is down after the heal", world.sites[site].name),
            );
            return;
        };
        let applied = member.applied.lock().1;
        if applied != index {
            world.fail(
                "G6",
                format!(
                    "site {} applied the metadata up to {applied}, the others up to {index}, 20 s after the heal",
                    world.sites[site].name
                ),
            );
            return;
        }
        if !member.taking_over.lock().is_empty() {
            world.fail(
                "G6",
                format!(
                    "site {} is still taking a group over after the heal",
                    world.sites[site].name
                ),
            );
            return;
        }
    }
    for group in metadata.groups.values() {
        let sites = acknowledging(world, group.id);
        let owner = world.site_by_name(&group.owner);
        if sites.len() != 1 || Some(sites[0].0) != owner {
            let at: Vec<&str> = sites
                .iter()
                .map(|(site, _)| world.sites[*site].name.as_str())
                .collect();
            world.fail(
                "G6",
                format!(
                    "group {} (owner {}) accepts writes at [{}] 20 s after the heal",
                    group.name,
                    group.owner,
                    at.join(", ")
                ),
            );
            return;
        }
    }
}
