//! One incarnation of a node in a control-plane run: the metadata's Raft
//! member on the site's durable records, the lease grantor every voter
//! runs, and at a data site the lease holder, the engine's view of what it
//! owns, the watch on other owners' leases and the takeover. The rules are
//! those the node runs: `stretch_control`'s `Holder`, `Grantor` and
//! `Takeover`, `stretch_metadata`'s commands and Raft timing; this file
//! carries their messages over the simulated links, as
//! `stretch-node`'s `control::lease` and `failover` do over QUIC.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openraft::Raft;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use parking_lot::Mutex;
use stretch_control::{
    Grant, GrantRefused, Grantor, Holder, IMAGE_OFFER_WAIT_MS, ImageChoice, LEASE_STATE_TIMEOUT_MS,
    LeaseRequest, LeaseState, OWNER_CHECK_INTERVAL_MS, Takeover, TakeoverState, TakeoverTrigger,
};
use stretch_core::{SiteId, Timestamp};
use stretch_metadata::{
    ClusterMetadata, Command, CommandError, CommandResult, Failover, LogStore, StateMachine,
};

use super::raft_network::{SimConfig, SimNetwork, SimRaft};
use super::world::World;

/// Longest a metadata change waits to be committed (the node's
/// `WRITE_TIMEOUT`).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the leader checks that it is where leadership belongs.
const PLACEMENT_INTERVAL: Duration = Duration::from_secs(1);

/// A running node.
pub(crate) struct Member {
    pub site: usize,
    raft: OnceLock<SimRaft>,
    grantor: Mutex<Grantor>,
    holder: Option<Mutex<Holder>>,
    /// Who owned each group after the last applied batch: an owner change
    /// fences the old owner at this voter.
    owners_seen: Mutex<BTreeMap<u32, String>>,
    /// Each group's epoch as last applied here: it must only rise.
    epochs_seen: Mutex<BTreeMap<u32, u64>>,
    pub applied: Mutex<(ClusterMetadata, u64)>,
    /// The engine's view: the groups it serves as owner, with their epoch,
    /// and the metadata index reconciled into it.
    pub engine: Mutex<EngineView>,
    pub taking_over: Mutex<BTreeSet<u32>>,
    /// Before this instant (this clock) the lease counts as not held: this
    /// site took a group over and restarted, and the takeover's wait is not
    /// remembered.
    serve_from: Timestamp,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

#[derive(Debug, Default)]
pub(crate) struct EngineView {
    pub owned: BTreeMap<u32, u64>,
    pub reconciled_index: u64,
}

fn owners_of(metadata: &ClusterMetadata) -> BTreeMap<u32, String> {
    metadata
        .groups
        .values()
        .map(|group| (group.id, group.owner.clone()))
        .collect()
}

/// Starts site `site`'s node on its durable records. `initialize`: the
/// first start of the cluster (every voter proposes the same membership).
pub(crate) async fn start(world: &Arc<World>, site: usize, initialize: bool) -> Arc<Member> {
    let slot = &world.sites[site];
    let generation = {
        let mut generation = slot.generation.lock();
        *generation += 1;
        *generation
    };
    let state_machine = StateMachine::open(slot.backend.clone())
        .expect("simulator invariant: the in-memory metadata store opens");
    let metadata = state_machine.metadata().clone();
    let index = state_machine.last_applied().map_or(0, |log| log.index);
    let now = world.local_now(site);
    let took_over = metadata.groups.values().any(|group| {
        group.owner == slot.name
            && group
                .last_failover
                .as_ref()
                .is_some_and(|failover| failover.epoch == group.epoch)
    });
    let serve_from = if took_over {
        Timestamp(now.0.saturating_add(world.lease.takeover_wait_max_ns()))
    } else {
        Timestamp(0)
    };
    let holder = slot.data.then(|| {
        let mut next = slot.next_lease_id.lock();
        let first = *next;
        // Ids above any this incarnation can use up.
        *next += 1 << 32;
        Mutex::new(Holder::new(world.lease, world.voters(), first))
    });
    let member = Arc::new(Member {
        site,
        raft: OnceLock::new(),
        grantor: Mutex::new(Grantor::new(world.lease, now, index)),
        holder,
        owners_seen: Mutex::new(owners_of(&metadata)),
        epochs_seen: Mutex::new(
            metadata
                .groups
                .values()
                .map(|group| (group.id, group.epoch))
                .collect(),
        ),
        applied: Mutex::new((metadata, index)),
        engine: Mutex::new(EngineView::default()),
        taking_over: Mutex::new(BTreeSet::new()),
        serve_from,
        tasks: Mutex::new(Vec::new()),
    });
    member.reconcile(world);
    let observer = {
        let member = Arc::downgrade(&member);
        let world = Arc::downgrade(world);
        Arc::new(move |metadata: &ClusterMetadata, index: u64| {
            if let (Some(member), Some(world)) = (member.upgrade(), world.upgrade()) {
                member.observe(&world, metadata, index);
            }
        })
    };
    let config = stretch_metadata::raft_config(&world.scenario.name)
        .expect("simulator invariant: the shared Raft timing is valid");
    let raft = Raft::new(
        site as u64 + 1,
        Arc::new(config),
        SimNetwork {
            world: Arc::downgrade(world),
            from: site,
        },
        LogStore::<_, SimConfig>::new(slot.backend.clone()),
        state_machine.with_observer(observer),
    )
    .await
    .expect("simulator invariant: a Raft member starts on its store");
    if initialize {
        let voters: BTreeMap<u64, stretch_metadata::NodeInfo> = world
            .sites
            .iter()
            .map(|slot| (slot.index as u64 + 1, node_info(slot)))
            .collect();
        // Every voter proposes the same membership; the others are told
        // it is already initialized, which is fine.
        let _ = raft.initialize(voters).await;
    }
    if member.raft.set(raft).is_err() {
        unreachable!("simulator invariant: a member's Raft is set once");
    }
    *slot.running.lock() = Some(member.clone());
    member.spawn(place_leadership(world.clone(), member.clone()));
    if slot.data {
        member.spawn(renew(world.clone(), member.clone()));
        member.spawn(watch_owners(world.clone(), member.clone()));
    }
    world.record(&[1, site as u64, generation], || {
        format!(
            "site {} starts (incarnation {generation}, clock {:+} ppm)",
            slot.name, slot.drift_ppm
        )
    });
    member
}

pub(crate) fn node_info(slot: &super::world::Slot) -> stretch_metadata::NodeInfo {
    stretch_metadata::NodeInfo {
        name: format!("{}1", slot.name),
        site: slot.name.clone(),
        role: if slot.data {
            stretch_metadata::Role::Data
        } else {
            stretch_metadata::Role::Witness
        },
        addr: format!("{}1:7000", slot.name),
    }
}

/// Power loss at the site: every task of the node stops at once; its Raft
/// records stay.
pub(crate) async fn stop(world: &World, site: usize) {
    let Some(member) = world.sites[site].running.lock().take() else {
        return;
    };
    for task in member.tasks.lock().drain(..) {
        task.abort();
    }
    if let Some(raft) = member.raft.get() {
        let _ = raft.shutdown().await;
    }
    world.record(&[2, site as u64], || {
        format!("site {} loses power", world.sites[site].name)
    });
}

impl Member {
    pub fn raft(&self) -> Option<SimRaft> {
        self.raft.get().cloned()
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(super::seeded(task));
        self.tasks.lock().push(handle);
    }

    /// Whether this node would acknowledge a write to `group` now: its
    /// engine owns the group, and its lease is valid on its clock.
    pub fn may_acknowledge(&self, world: &World, group: u32) -> Option<u64> {
        let epoch = *self.engine.lock().owned.get(&group)?;
        let now = world.local_now(self.site);
        if now < self.serve_from {
            return None;
        }
        self.holder.as_ref()?.lock().is_valid(now).then_some(epoch)
    }

    /// After every applied batch, before anyone learns it applied: fence
    /// the sites that lost a group, then reconcile the engine.
    fn observe(&self, world: &World, metadata: &ClusterMetadata, index: u64) {
        let now_owners = owners_of(metadata);
        {
            let mut owners = self.owners_seen.lock();
            let mut grantor = self.grantor.lock();
            for (group, owner) in owners.iter() {
                if now_owners.get(group) == Some(owner) {
                    continue;
                }
                if let Some(site) = world.site_by_name(owner) {
                    grantor.fence(world.sites[site].id, index);
                }
            }
            grantor.applied(index);
            *owners = now_owners;
        }
        {
            let mut epochs = self.epochs_seen.lock();
            for group in metadata.groups.values() {
                let seen = epochs.entry(group.id).or_insert(group.epoch);
                if group.epoch < *seen {
                    world.fail(
                        "G1",
                        format!(
                            "site {} applied epoch {} of group {} after epoch {}: epochs went back",
                            world.sites[self.site].name, group.epoch, group.name, seen
                        ),
                    );
                }
                *seen = group.epoch;
            }
        }
        *self.applied.lock() = (metadata.clone(), index);
        self.reconcile(world);
    }

    /// The engine takes the owners the metadata names, except for groups
    /// a takeover here is still waiting on.
    fn reconcile(&self, world: &World) {
        let (metadata, index) = self.applied.lock().clone();
        let name = &world.sites[self.site].name;
        let taking_over = self.taking_over.lock().clone();
        let mut engine = self.engine.lock();
        engine.owned.retain(|group, _| {
            taking_over.contains(group)
                || metadata.groups.get(group).is_some_and(|g| g.owner == *name)
        });
        for group in metadata.groups.values() {
            if group.owner == *name && !taking_over.contains(&group.id) {
                engine.owned.insert(group.id, group.epoch);
            }
        }
        engine.reconciled_index = index;
    }

    fn grant(
        &self,
        world: &World,
        from: SiteId,
        request: LeaseRequest,
    ) -> Result<Grant, GrantRefused> {
        self.grantor
            .lock()
            .request(world.local_now(self.site), from, request)
    }

    fn state_of(&self, world: &World, site: SiteId, index: u64) -> LeaseState {
        self.grantor
            .lock()
            .lease_state(world.local_now(self.site), site, index)
    }

    fn answer(&self, from: SiteId, answer: Result<Grant, GrantRefused>) {
        let Some(holder) = &self.holder else {
            return;
        };
        match answer {
            Ok(grant) => holder.lock().granted(from, grant),
            Err(refusal) => holder.lock().refused(from, refusal),
        }
    }
}

/// Renews this data node's lease with every voter every `renew_ms`.
async fn renew(world: Arc<World>, member: Arc<Member>) {
    let Some(holder) = &member.holder else {
        return;
    };
    let site = member.site;
    let from = world.sites[site].id;
    loop {
        let applied = member.engine.lock().reconciled_index;
        let request = holder.lock().renew(world.local_now(site), applied);
        for voter in 0..world.sites.len() {
            if voter == site {
                member.answer(from, member.grant(&world, from, request));
                continue;
            }
            let (world, member) = (world.clone(), member.clone());
            let timeout = Duration::from_millis(world.lease.lease_ms);
            tokio::spawn(super::seeded(async move {
                let voter_id = world.sites[voter].id;
                let answer = world
                    .call(site, voter, timeout, |there| {
                        let answer = there.grant(&world, from, request);
                        async move { answer }
                    })
                    .await;
                if let Some(answer) = answer {
                    member.answer(voter_id, answer);
                }
            }));
        }
        world
            .sleep_local(site, Duration::from_millis(world.lease.renew_ms))
            .await;
    }
}

/// Asks every voter about `site`'s leases at `index`; returns the answers
/// once `enough` says they decide, every voter answered, or the timeout
/// passed (an unreachable voter does not hold up a majority that answered).
async fn ask_state(
    world: &Arc<World>,
    member: &Arc<Member>,
    site: SiteId,
    index: u64,
    enough: impl Fn(&[(SiteId, LeaseState)]) -> bool,
) -> Vec<(SiteId, LeaseState)> {
    let voters = world.sites.len();
    let (sender, mut receiver) = tokio::sync::mpsc::channel(voters);
    for voter in 0..voters {
        let (world, member, sender) = (world.clone(), member.clone(), sender.clone());
        tokio::spawn(super::seeded(async move {
            let voter_id = world.sites[voter].id;
            let state = if voter == member.site {
                Some(member.state_of(&world, site, index))
            } else {
                let timeout = Duration::from_millis(LEASE_STATE_TIMEOUT_MS);
                world
                    .call(member.site, voter, timeout, |there| {
                        let state = there.state_of(&world, site, index);
                        async move { state }
                    })
                    .await
            };
            let _ = sender.send(state.map(|state| (voter_id, state))).await;
        }));
    }
    drop(sender);
    let mut answers = Vec::new();
    while let Some(answer) = receiver.recv().await {
        answers.extend(answer);
        if enough(&answers) {
            break;
        }
    }
    answers
}

/// Whether `site` holds no lease: a majority of the voters said no promise
/// they made to it still runs.
async fn holds_no_lease(world: &Arc<World>, member: &Arc<Member>, site: SiteId) -> bool {
    let voters = world.sites.len();
    let answers = ask_state(world, member, site, 0, |answers| {
        stretch_control::holds_no_lease(voters, answers).is_some()
    })
    .await;
    stretch_control::holds_no_lease(voters, &answers) == Some(true)
}

/// Every 250 ms: takes over the `auto` groups of every owner that holds
/// no lease.
async fn watch_owners(world: Arc<World>, member: Arc<Member>) {
    let name = world.sites[member.site].name.clone();
    loop {
        world
            .sleep_local(member.site, Duration::from_millis(OWNER_CHECK_INTERVAL_MS))
            .await;
        let (metadata, _) = member.applied.lock().clone();
        let owners: BTreeSet<String> = metadata
            .groups
            .values()
            .map(|group| group.owner.clone())
            .filter(|owner| *owner != name)
            .collect();
        for owner in owners {
            let Some(owner_site) = world.site_by_name(&owner) else {
                continue;
            };
            if !holds_no_lease(&world, &member, world.sites[owner_site].id).await {
                continue;
            }
            world.record(&[17, member.site as u64, owner_site as u64], || {
                format!("site {name}: a majority of the voters say site {owner} holds no lease")
            });
            for group in metadata
                .groups
                .values()
                .filter(|group| group.owner == owner)
            {
                let automatic = metadata
                    .volumes
                    .values()
                    .filter(|volume| volume.group == group.id)
                    .all(|volume| volume.failover == Failover::Auto);
                if !automatic || member.taking_over.lock().contains(&group.id) {
                    continue;
                }
                let (world, work) = (world.clone(), member.clone());
                let trigger = TakeoverTrigger::OwnerLost { epoch: group.epoch };
                let group = group.name.clone();
                member.spawn(async move {
                    let _ = fail_over(&world, &work, &group, trigger).await;
                });
            }
        }
    }
}

/// Takes `group` over at this site: the node's `fail_over`.
pub(crate) async fn fail_over(
    world: &Arc<World>,
    member: &Arc<Member>,
    group: &str,
    trigger: TakeoverTrigger,
) -> Result<(), String> {
    let (metadata, _) = member.applied.lock().clone();
    let current = metadata
        .group_by_name(group)
        .ok_or("no such group")?
        .clone();
    let name = world.sites[member.site].name.clone();
    if current.owner == name {
        // Metadata this node applied may be behind (it just restarted):
        // "already here" is only an answer when writes are served here.
        if member.may_acknowledge(world, current.id).is_some() {
            return Ok(());
        }
        return Err("this site's metadata names it owner, but it serves no writes for the group yet (its metadata may be behind): try again".into());
    }
    if !trigger.still_applies(current.epoch) {
        // Another survivor took the group since the owner check.
        return Ok(());
    }
    let automatic = trigger.automatic();
    let from = world
        .site_by_name(&current.owner)
        .ok_or("unknown owner site")?;
    if !member.taking_over.lock().insert(current.id) {
        return Err("a takeover of it is already running here".into());
    }
    let result = take_over(world, member, &current, from, automatic).await;
    member.taking_over.lock().remove(&current.id);
    member.reconcile(world);
    result
}

async fn take_over(
    world: &Arc<World>,
    member: &Arc<Member>,
    current: &stretch_metadata::Group,
    from: usize,
    automatic: bool,
) -> Result<(), String> {
    let name = world.sites[member.site].name.clone();
    // No data path here: the image a survivor holds is drawn (a whole-delta
    // prefix of the old owner's line, so only its length matters).
    let image = world.state.lock().rng.below(4);
    let passed_over = if automatic {
        match offer_image(world, member, current, image).await? {
            Some(passed_over) => passed_over,
            None => {
                world.state.lock().stats.takeovers_left += 1;
                return Ok(());
            }
        }
    } else {
        Vec::new()
    };
    let command = Command::PromoteGroup {
        group: current.name.clone(),
        to: name.clone(),
        expected_epoch: current.epoch,
        after_seq: image,
        automatic,
        passed_over,
    };
    let index = match write(world, member, command).await {
        Ok((Ok(_), index)) => index,
        // The first attempt committed and its answer was lost.
        Ok((Err(error), _)) if promoted_here(member, current, &name) => {
            let _ = error;
            member.applied.lock().1
        }
        Ok((Err(error), _)) => {
            // Another site promoted it first (its epoch is gone), or the
            // group changed meanwhile.
            world.state.lock().stats.promotions_refused += 1;
            world.record(&[19, member.site as u64, u64::from(current.id)], || {
                format!(
                    "site {name}: promoting group {} refused: {error}",
                    current.name
                )
            });
            return Err(error.to_string());
        }
        Err(reason) => return Err(reason),
    };
    world.record(&[3, member.site as u64, u64::from(current.id), index], || {
        format!(
            "site {name} promoted group {} from {} at index {index} ({}): waiting out the old owner's lease",
            current.name,
            current.owner,
            if automatic { "auto" } else { "operator" }
        )
    });
    wait_takeover(world, member, world.sites[from].id, index).await;
    let epoch = member
        .applied
        .lock()
        .0
        .groups
        .get(&current.id)
        .map(|group| group.epoch)
        .ok_or("the group was deleted meanwhile")?;
    member.engine.lock().owned.insert(current.id, epoch);
    {
        let mut state = world.state.lock();
        if automatic {
            state.stats.failovers += 1;
        } else {
            state.stats.promotions += 1;
        }
    }
    world.record(
        &[4, member.site as u64, u64::from(current.id), epoch],
        || format!("site {name} serves group {} at epoch {epoch}", current.name),
    );
    Ok(())
}

/// The node's `offer_image`: offers `image` of `current` and waits for
/// the survivors holding a lease to offer theirs (at most
/// [`IMAGE_OFFER_WAIT_MS`] on this site's clock). `Some(passed_over)` if
/// this site promotes itself, `None` if another holds a newer image or took
/// the group.
async fn offer_image(
    world: &Arc<World>,
    member: &Arc<Member>,
    current: &stretch_metadata::Group,
    image: u64,
) -> Result<Option<Vec<String>>, String> {
    let name = world.sites[member.site].name.clone();
    let data_sites = member.applied.lock().0.data_sites();
    let others: Vec<&String> = data_sites
        .iter()
        .filter(|site| **site != name && **site != current.owner)
        .collect();
    if others.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let offer = Command::OfferImage {
        group: current.name.clone(),
        site: name.clone(),
        expected_epoch: current.epoch,
        after_seq: Some(image),
    };
    match write(world, member, offer).await? {
        (Ok(_), _) => {}
        (Err(CommandError::StaleEpoch { .. }), _) => return Ok(None),
        (Err(error), _) => return Err(error.to_string()),
    }
    world.record(
        &[20, member.site as u64, u64::from(current.id), image],
        || {
            format!(
                "site {name} offered its image of group {} (after delta {image})",
                current.name
            )
        },
    );
    let started = world.local_now(member.site);
    loop {
        let (metadata, _) = member.applied.lock().clone();
        let Some(group) = metadata.groups.get(&current.id) else {
            return Ok(None);
        };
        if group.epoch != current.epoch {
            return Ok(None);
        }
        let mut holding = BTreeMap::new();
        for site in &others {
            let holds = match world.site_by_name(site) {
                Some(index) => !holds_no_lease(world, member, world.sites[index].id).await,
                None => false,
            };
            holding.insert(site.as_str(), holds);
        }
        let survivors = stretch_control::survivors(
            data_sites.iter().cloned(),
            &name,
            &current.owner,
            &group.offers,
            |site| holding.get(site).copied().unwrap_or(false),
        );
        let waited_ns = world.local_now(member.site).0.saturating_sub(started.0);
        let deadline_passed = waited_ns >= IMAGE_OFFER_WAIT_MS * 1_000_000;
        match stretch_control::choose_image(image, &survivors, deadline_passed) {
            ImageChoice::Promote { passed_over } => return Ok(Some(passed_over)),
            ImageChoice::LeaveTo { site, after_seq } => {
                world.record(&[21, member.site as u64, u64::from(current.id), after_seq], || {
                    format!(
                        "site {name} leaves group {} to site {site}, whose image is newer (after delta {after_seq} > {image})",
                        current.name
                    )
                });
                return Ok(None);
            }
            ImageChoice::Wait { .. } => {}
        }
        world
            .sleep_local(member.site, Duration::from_millis(100))
            .await;
    }
}

fn promoted_here(member: &Member, current: &stretch_metadata::Group, name: &str) -> bool {
    member
        .applied
        .lock()
        .0
        .groups
        .get(&current.id)
        .is_some_and(|group| {
            group.owner == name
                && group.last_failover.as_ref().is_some_and(|failover| {
                    failover.epoch == current.epoch + 1 && failover.to == name
                })
        })
}

/// Waits until the old owner `from` can no longer write a group this node
/// took by the entry at `index`.
async fn wait_takeover(world: &Arc<World>, member: &Arc<Member>, from: SiteId, index: u64) {
    let mut takeover = Takeover::new(world.lease, world.voters(), from, index);
    let voters = world.sites.len();
    loop {
        let now = world.local_now(member.site);
        if takeover.state(now) == TakeoverState::Ready {
            return;
        }
        if takeover.ready_at().is_none() {
            let answers = ask_state(world, member, from, index, |answers| {
                stretch_control::takeover_heard_enough(voters, answers)
            })
            .await;
            let now = world.local_now(member.site);
            for (voter, state) in answers {
                if let Some(remaining) = state.outstanding_ns {
                    takeover.answered(now, voter, remaining);
                }
            }
        }
        world
            .sleep_local(member.site, Duration::from_millis(50))
            .await;
    }
}

/// Commits `command` through the leader this node knows, trying again
/// until [`WRITE_TIMEOUT`]: the result and the entry's index.
pub(crate) async fn write(
    world: &Arc<World>,
    member: &Arc<Member>,
    command: Command,
) -> Result<(CommandResult, u64), String> {
    let raft = member.raft().ok_or("the node is starting")?;
    let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        let leader = raft.metrics().borrow_watched().current_leader;
        let Some(leader) = leader.and_then(|leader| world.site_of_node(leader)) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let left = deadline - tokio::time::Instant::now();
        let command = command.clone();
        let answer = if leader == member.site {
            tokio::time::timeout(left, raft.client_write(command))
                .await
                .ok()
        } else {
            world
                .call(
                    member.site,
                    leader,
                    left.min(Duration::from_secs(1)),
                    |there| async move {
                        match there.raft() {
                            Some(raft) => raft.client_write(command).await,
                            None => Err(RaftError::Fatal(openraft::errors::Fatal::Stopped)),
                        }
                    },
                )
                .await
        };
        let outcome = match &answer {
            Some(Ok(_)) => "committed".to_string(),
            Some(Err(error)) => error.to_string(),
            None => "no answer".to_string(),
        };
        world.record(&[15, member.site as u64, leader as u64], || {
            format!(
                "site {}: metadata write through {}: {outcome}",
                world.sites[member.site].name, world.sites[leader].name
            )
        });
        match answer {
            Some(Ok(response)) => return Ok((response.data, response.log_id.index)),
            Some(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) | None => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(Err(error)) => return Err(error.to_string()),
        }
    }
    Err("no majority committed it in time".into())
}

/// Keeps Raft leadership at a voter that reaches every other one (see
/// `stretch_control::hand_leadership_to`), as the node's
/// `place_leadership` does: every second the leader asks the voters it
/// reaches which voters they reach.
async fn place_leadership(world: Arc<World>, member: Arc<Member>) {
    let witness = world.sites.iter().position(|slot| !slot.data);
    let voters = world.sites.len();
    loop {
        tokio::time::sleep(PLACEMENT_INTERVAL).await;
        let Some(raft) = member.raft() else {
            continue;
        };
        if raft.metrics().borrow_watched().current_leader != Some(member.site as u64 + 1) {
            continue;
        }
        let reached_sites: Vec<usize> = (0..voters)
            .filter(|other| *other != member.site && world.connected(member.site, *other))
            .collect();
        let mut reached = Vec::new();
        for other in &reached_sites {
            let answer = world
                .call(member.site, *other, PLACEMENT_INTERVAL, |there| {
                    let reaches = (0..voters)
                        .filter(|voter| *voter == there.site || world.connected(there.site, *voter))
                        .count();
                    async move { reaches }
                })
                .await;
            if let Some(reaches) = answer {
                reached.push(stretch_control::Reach {
                    voter: *other as u64 + 1,
                    reaches_all: reaches == voters,
                });
            }
        }
        let witness = witness.filter(|witness| *witness != member.site);
        let to = stretch_control::hand_leadership_to(
            reached_sites.len() + 1 == voters,
            witness.map(|witness| witness as u64 + 1),
            &reached,
        );
        if let Some(to) = to {
            world.record(&[18, member.site as u64, to], || {
                format!(
                    "site {}: hands Raft leadership to node {to}",
                    world.sites[member.site].name
                )
            });
            let _ = raft.trigger().transfer_leader(to).await;
        }
    }
}
