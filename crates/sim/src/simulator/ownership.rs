//! Who owns each consistency group, and ownership moving under faults.
//!
//! The ownership authority is the real metadata state machine
//! ([`ClusterMetadata`], the one Raft replicates in the node), applied here
//! directly: the control-plane simulator (`stretch sim --control`) runs it
//! under openraft with drifting clocks and proves the lease and takeover
//! rules; this one proves what they promise the data path. Each site's node
//! knows the metadata it applied, which is the authority's except at a site
//! that was cut off when it changed.
//!
//! A failover, as the node does it (`crates/node/src/failover.rs`):
//! 1. a site that owns groups is cut off from every other site and from
//!    the authority: its lease is not renewed and runs out on its own
//!    (the engine then holds, and after a bound fails, its lease-bound
//!    requests, and never acknowledges one after the lease ended);
//! 2. once the lease it last got cannot cover it any more, a survivor
//!    begins the takeover of each of its groups (the engine stops taking
//!    the old owner's deltas and names the last whole one it holds), the
//!    authority records the promotion from that delta at a raised epoch,
//!    and every site that reaches it applies it;
//! 3. the cut-off site returns after a while and learns the new owners
//!    (before that, no lease is granted to it: the voters fence it); its
//!    engine counts the deltas it acknowledged past the new epoch's start
//!    as lost, and the new owner resyncs its legs.
//!
//! The checker judges each takeover: the new owner's image must be a
//! whole-delta prefix of what the old owner acknowledged (and hold what
//! was promised to survive its site's loss, when it is the only other
//! site); what it lacks is lost, and the old owner must report a loss when
//! it learns. No site may acknowledge a write of a group it does not own
//! by the authority at that instant (G1).

use stretch_core::{BLOCK_SIZE, EpochStart};
use stretch_metadata::{ClusterMetadata, Command, Failover, Mode as MetadataMode, Role};

use super::*;

/// The authority's metadata and what each site applied of it.
pub(super) struct Control {
    authority: ClusterMetadata,
    /// Bumped by every change of the authority's metadata.
    version: u64,
    /// Per site: the metadata its node applied, and its version.
    applied: Vec<(ClusterMetadata, u64)>,
    /// Leases are granted and enforced (failovers are drawn).
    leases: bool,
    /// Per site: when it last got a lease renewal.
    last_grant: Vec<u64>,
    isolation: Option<Isolation>,
    /// (site, group) pairs that owned a group at some point, for the memory
    /// a site may have to take from them.
    ever_owned: BTreeSet<(usize, u32)>,
    /// (site, group) pairs whose legs hold deltas the cluster lost in a
    /// failover, until the new owner's resync replaces them: exempt from
    /// the prefix check after a crash (the run's final check still holds
    /// them to the model).
    pub(super) diverged: BTreeSet<(usize, u32)>,
    /// Losses the cut-off site must report when it learns the new owners.
    reports: Vec<LossReport>,
}

/// The site cut off for a failover.
struct Isolation {
    site: usize,
    /// Its node's generation when it was cut off: a restart since then
    /// loses what its engine knew about owning the groups.
    generation: u64,
    /// The cut has ended (the site still has to learn the new owners).
    healed: bool,
}

struct LossReport {
    site: usize,
    group: u32,
    lost_writes: u64,
}

pub(super) fn site_name(site: usize) -> String {
    format!("s{}", site + 1)
}

pub(super) fn group_name(group: u32) -> String {
    format!("g{group}")
}

pub(super) fn site_index(name: &str) -> usize {
    name.strip_prefix('s')
        .and_then(|number| number.parse::<usize>().ok())
        .and_then(|number| number.checked_sub(1))
        .unwrap_or_else(|| panic!("simulator invariant: site names are s1, s2, ...: {name}"))
}

/// A group's epoch history as the engine takes it.
fn epoch_history(group: &stretch_metadata::Group) -> Vec<EpochStart> {
    group
        .history
        .iter()
        .map(|start| EpochStart {
            epoch: Epoch(start.epoch),
            after_seq: stretch_core::DeltaSeq(start.after_seq),
            handed_over: start.handed_over,
        })
        .collect()
}

/// Tells an engine who owns `group` and from which epoch, history first
/// (a site that lost the group counts its loss at once), as the node does
/// whether or not leases are on: a restarted owner trusts a saved map of
/// what another site lacks only for a group it owned from its first delta,
/// and a group that moved (a failover, a migration) needs the history to
/// say it did not.
fn tell_group(engine: &mut Engine, group: &stretch_metadata::Group) {
    engine.set_epoch_history(GroupId(group.id), epoch_history(group));
    let owner = SiteId(site_index(&group.owner) as u32 + 1);
    let site_id = |name: &str| SiteId(site_index(name) as u32 + 1);
    let drain = group
        .fast_drain
        .as_ref()
        .map(|drain| stretch_core::FastDrain {
            source: site_id(&drain.from),
            target: site_id(&drain.to),
            epoch: Epoch(drain.epoch),
            regions: drain.regions.as_ref().map(|regions| {
                regions
                    .iter()
                    .map(|(volume, region)| (VolumeId(*volume), *region))
                    .collect()
            }),
        });
    engine.set_fast_drain(GroupId(group.id), owner, drain);
    engine.set_owner(GroupId(group.id), owner, Epoch(group.epoch));
}

impl Control {
    /// The metadata of the scenario: its sites, and its volumes with their
    /// groups (ids 1.. in order, as the engine and the checker number them)
    /// and owners.
    pub(super) fn new(scenario: &Scenario) -> Self {
        let mut authority = ClusterMetadata::default();
        let mut commands = Vec::new();
        for site in 0..scenario.sites() {
            commands.push(Command::AddSite {
                name: site_name(site),
                role: Role::Data,
            });
        }
        for index in 0..scenario.topology.volumes as usize {
            let group = index as u32 % scenario.topology.groups + 1;
            commands.push(Command::CreateVolume {
                name: format!("v{}", index + 1),
                size: scenario.topology.volume_bytes,
                group: group_name(group),
                mode: match scenario.mode_of(index) {
                    stretch_core::Mode::Async => MetadataMode::Async,
                    stretch_core::Mode::FlushSync => MetadataMode::FlushSync,
                    stretch_core::Mode::Sync => MetadataMode::Sync,
                },
                failover: Failover::Auto,
                owner_site: site_name(scenario.owner_of_group(group)),
            });
        }
        for command in &commands {
            if let Err(error) = authority.apply(command) {
                panic!("simulator invariant: the scenario's metadata applies ({command}): {error}");
            }
        }
        for index in 0..scenario.topology.volumes {
            let id = index + 1;
            let group = index % scenario.topology.groups + 1;
            assert!(
                authority
                    .volumes
                    .get(&id)
                    .is_some_and(|volume| volume.group == group),
                "simulator invariant: volume {id} is in group {group} in the metadata"
            );
        }
        let sites = scenario.sites();
        let ever_owned = (1..=scenario.topology.groups)
            .map(|group| (scenario.owner_of_group(group), group))
            .collect();
        Control {
            applied: vec![(authority.clone(), 0); sites],
            authority,
            version: 0,
            leases: sites > 1 && scenario.faults.failover_per_second > 0.0,
            last_grant: vec![0; sites],
            isolation: None,
            ever_owned,
            diverged: BTreeSet::new(),
            reports: Vec::new(),
        }
    }

    /// The authority's metadata.
    pub(super) fn authority(&self) -> &ClusterMetadata {
        &self.authority
    }

    /// Applies a change that moves no ownership (sites need not learn it).
    pub(super) fn apply_unversioned(
        &mut self,
        command: &Command,
    ) -> Result<(), stretch_metadata::CommandError> {
        self.authority.apply(command).map(|_| ())
    }

    /// Applies a change that names `new` owner of `group`: every site has
    /// to learn it (a voter fences a site until it did).
    pub(super) fn apply_ownership_change(
        &mut self,
        command: &Command,
        new: usize,
        group: u32,
    ) -> Result<(), stretch_metadata::CommandError> {
        self.authority.apply(command)?;
        self.version += 1;
        self.ever_owned.insert((new, group));
        Ok(())
    }

    /// The site owning `group` by the authority now.
    pub(super) fn owner(&self, group: u32) -> usize {
        owner_in(&self.authority, group)
    }

    /// The site owning `group` by what `site` applied.
    pub(super) fn owner_known_at(&self, site: usize, group: u32) -> usize {
        owner_in(&self.applied[site].0, group)
    }

    pub(super) fn leases(&self) -> bool {
        self.leases
    }

    /// Whether `owner` owned `group` at some point of the run.
    pub(super) fn ever_owned(&self, owner: usize, group: u32) -> bool {
        self.ever_owned.contains(&(owner, group))
    }

    /// The site cut off for a failover, until it learned the new owners.
    pub(super) fn isolated(&self) -> Option<usize> {
        self.isolation.as_ref().map(|isolation| isolation.site)
    }

    /// True while `link`'s ends must stay cut for a failover.
    pub(super) fn holds_cut(&self, lo: usize, hi: usize) -> bool {
        self.isolation.as_ref().is_some_and(|isolation| {
            !isolation.healed && (isolation.site == lo || isolation.site == hi)
        })
    }

    /// The voters grant `site` a lease: it reaches them, and it applied
    /// every ownership change (a voter fences a site until then).
    fn grants(&self, site: usize) -> bool {
        self.isolated() != Some(site) && self.applied[site].1 == self.version
    }
}

fn owner_in(metadata: &ClusterMetadata, group: u32) -> usize {
    let group = metadata
        .groups
        .get(&group)
        .unwrap_or_else(|| panic!("simulator invariant: group {group} is in the metadata"));
    site_index(&group.owner)
}

impl Simulation<'_> {
    /// Tells an engine that is starting at `site` who owns what, as the
    /// site's node applied it.
    pub(super) fn tell_ownership(&self, site: usize, engine: &mut Engine) {
        for group in self.control.applied[site].0.groups.values() {
            tell_group(engine, group);
        }
    }

    /// Starts every site's renewals.
    pub(super) fn start_leases(&mut self) {
        if !self.control.leases {
            return;
        }
        for site in 0..self.sites.len() {
            let at = self.now + self.rng.below(self.scenario.engine.lease_renew_ms * MS);
            self.schedule(at, Event::LeaseRenew(site));
        }
    }

    /// A site's periodic renewal.
    pub(super) fn lease_tick(&mut self, site: usize) {
        self.renew_lease(site);
        let at = self.now + self.scenario.engine.lease_renew_ms * MS;
        self.schedule(at, Event::LeaseRenew(site));
    }

    /// Gives `site` a lease now if the voters would (leases on).
    pub(super) fn renew_lease(&mut self, site: usize) {
        if !self.control.leases || !self.control.grants(site) {
            return;
        }
        let drift_ppm = self.sites[site].drift_ppm;
        let now = self.site_now(site);
        let Some(node) = self.sites[site].node.as_mut() else {
            return;
        };
        // The authority's lease, in real time, as the site's clock reads
        // it: the control plane's own simulation proves its drift margin.
        let until = site_time(self.now + self.scenario.engine.lease_ms * MS, drift_ppm);
        node.engine.set_lease_until(now, Some(until));
        self.control.last_grant[site] = self.now;
        self.dispatch(site);
    }

    /// A failover begins: a site that owns groups is cut off.
    pub(super) fn failover(&mut self) {
        if self.workload_over {
            return;
        }
        self.schedule_poisson(self.scenario.faults.failover_per_second, Event::Failover);
        if self.control.isolation.is_some() || self.site_loss.is_some() {
            return;
        }
        let owners: BTreeSet<usize> = (1..=self.scenario.topology.groups)
            .map(|group| self.control.owner(group))
            .collect();
        let owners: Vec<usize> = owners.into_iter().collect();
        let site = owners[self.rng.below(owners.len() as u64) as usize];
        self.control.isolation = Some(Isolation {
            site,
            generation: self.sites[site].generation,
            healed: false,
        });
        self.stats.failovers_started += 1;
        for request in self.requests.values_mut() {
            if request.site == site {
                // They wait for a lease that will not come: the owner-stall
                // bound is not theirs, and they may fail.
                request.owner_local_write = false;
                request.may_fail = true;
            }
        }
        let detect_ms_max = self.scenario.network.detect_ms_max;
        for link in self.net.links_of(site) {
            for direction in 0..2 {
                if !self.net.links[link].cut[direction] {
                    self.net.links[link].cut[direction] = true;
                    self.stall(link, direction);
                }
            }
            if let Some(conn) = self.net.links[link].conn {
                let detect = self.rng.below(detect_ms_max * MS + 1);
                self.schedule(self.now + detect, Event::Detect { link, conn });
            }
        }
        let expires = self.control.last_grant[site] + self.scenario.engine.lease_ms * MS;
        let wait = if self.options.bug == Some(SimBug::EarlyTakeover) {
            // The planted defect: the takeover trusts the cut, not the
            // lease, and waits only one owner check.
            self.now
        } else {
            expires.max(self.now)
        };
        let at = wait
            + self
                .rng
                .between(1, stretch_control::OWNER_CHECK_INTERVAL_MS)
                * MS;
        self.trace.record(self.now, Some(site), &[50, at], || {
            format!(
                "FAILOVER: cut off from every site and the voters; its lease ends in {} ms, takeover at +{} ms",
                expires.saturating_sub(self.now) / MS,
                (at - self.now) / MS
            )
        });
        self.schedule(at, Event::Takeover);
    }

    /// Survivors take the cut-off site's groups over (each from the last
    /// whole delta it holds); retried while none can (mid-resync, down).
    pub(super) fn takeover(&mut self) {
        let Some(isolation) = &self.control.isolation else {
            return;
        };
        if isolation.healed {
            return;
        }
        let old = isolation.site;
        let groups: Vec<u32> = (1..=self.scenario.topology.groups)
            .filter(|group| self.control.owner(*group) == old)
            .collect();
        let mut left = false;
        for group in groups {
            if !self.take_group(old, group) {
                left = true;
            }
            if self.violation.is_some() {
                return;
            }
        }
        if left {
            self.schedule(self.now + 100 * MS, Event::Takeover);
            return;
        }
        let length = self
            .rng
            .below(self.scenario.faults.isolation_ms_max * MS + 1);
        self.schedule(self.now + length, Event::IsolationEnd);
    }

    /// One group taken over from `old` by the survivor holding the newest
    /// image; false if no survivor could.
    ///
    /// As the node does it: each survivor begins the takeover (freezing its
    /// image) and offers its image in a Raft entry, then decides with
    /// [`stretch_control::choose_image`]; the one it names promotes itself,
    /// the others call their takeover off. A survivor that is down holds no
    /// lease by the time its owner check would run (it is passed over).
    fn take_group(&mut self, old: usize, group: u32) -> bool {
        let mut survivors: Vec<usize> = (0..self.sites.len())
            .filter(|site| *site != old && self.sites[*site].node.is_some())
            .collect();
        // Who offers first, and who wins a tie, is drawn.
        for index in (1..survivors.len()).rev() {
            let other = self.rng.below(index as u64 + 1) as usize;
            survivors.swap(index, other);
        }
        // A survivor whose journal has not synced the deltas it holds has
        // not offered yet: every survivor decides once it has (as the node
        // does, the others wait for its offer).
        if survivors.iter().any(|site| {
            self.sites[*site]
                .node
                .as_ref()
                .is_some_and(|node| node.engine.takeover_awaits_journal(GroupId(group)))
        }) {
            return false;
        }
        let epoch = self.control.authority.groups[&group].epoch;
        let ignore_images = self.options.bug == Some(SimBug::TakeoverIgnoresImages);
        let mut images: Vec<(usize, Option<stretch_core::DeltaSeq>)> = Vec::new();
        for site in survivors {
            let now = self.site_now(site);
            let Some(node) = self.sites[site].node.as_mut() else {
                continue;
            };
            let image = node.engine.begin_takeover(now, GroupId(group));
            images.push((site, image));
            if ignore_images {
                continue;
            }
            let offer = Command::OfferImage {
                group: group_name(group),
                site: site_name(site),
                expected_epoch: epoch,
                after_seq: image.map(|image| image.0),
            };
            if let Err(error) = self.control.authority.apply(&offer) {
                panic!("simulator invariant: the offer applies ({offer}): {error}");
            }
        }
        // Every other site is up and offered a whole image: what a flush-sync
        // or sync write was promised to survive is at one of them.
        let every_survivor_offered =
            images.len() + 1 == self.sites.len() && images.iter().all(|(_, image)| image.is_some());
        let offers = self.control.authority.groups[&group].offers.clone();
        let sites: Vec<String> = (0..self.sites.len()).map(site_name).collect();
        let mut taken = None;
        for (site, image) in &images {
            let Some(image) = image else {
                continue;
            };
            if ignore_images {
                // The planted defect: the first survivor able wins.
                taken = Some((*site, *image, Vec::new()));
                break;
            }
            let others = stretch_control::survivors(
                sites.clone(),
                &site_name(*site),
                &site_name(old),
                &offers,
                |name| self.sites[site_index(name)].node.is_some(),
            );
            // Every survivor that is up offered: there is nothing to wait for.
            match stretch_control::choose_image(image.0, &others, true) {
                stretch_control::ImageChoice::Promote { passed_over } => {
                    taken = Some((*site, *image, passed_over));
                    break;
                }
                stretch_control::ImageChoice::LeaveTo { .. } => {}
                stretch_control::ImageChoice::Wait { for_sites } => {
                    panic!(
                        "simulator invariant: no survivor is waited for past the deadline: {for_sites:?}"
                    )
                }
            }
        }
        for (site, image) in &images {
            let winner = taken.as_ref().is_some_and(|(new, _, _)| new == site);
            if image.is_some()
                && !winner
                && let Some(node) = self.sites[*site].node.as_mut()
            {
                node.engine.cancel_takeover(GroupId(group));
            }
        }
        let Some((new, image, passed_over)) = taken else {
            return false;
        };
        let views = match self.image_of(new, group) {
            Ok(views) => views,
            Err(violation) => {
                self.fail(violation);
                return true;
            }
        };
        let command = Command::PromoteGroup {
            group: group_name(group),
            to: site_name(new),
            expected_epoch: epoch,
            after_seq: image.0,
            automatic: true,
            passed_over,
        };
        if let Err(error) = self.control.authority.apply(&command) {
            panic!("simulator invariant: the promotion applies ({command}): {error}");
        }
        self.control.version += 1;
        self.control.ever_owned.insert((new, group));
        let lost = match self
            .checker
            .after_failover(group, new, views, every_survivor_offered)
        {
            Ok(lost) => lost,
            Err(violation) => {
                self.fail(violation);
                return true;
            }
        };
        self.stats.failovers += 1;
        self.stats.failover_lost_writes += lost;
        self.control.reports.push(LossReport {
            site: old,
            group,
            lost_writes: lost,
        });
        for site in 0..self.sites.len() {
            if site != new {
                // Its legs may hold deltas past the new epoch's start.
                self.control.diverged.insert((site, group));
            }
        }
        self.trace
            .record(self.now, Some(new), &[51, group as u64, image.0, lost], || {
                format!(
                    "TAKEOVER of group {group} from site {} at epoch {} after delta {}: {lost} acknowledged writes lost",
                    old + 1,
                    epoch + 1,
                    image.0
                )
            });
        for site in (0..self.sites.len()).filter(|site| *site != old) {
            self.learn(site);
        }
        true
    }

    /// `site` applies the authority's metadata now (see `learn`).
    pub(super) fn learn_now(&mut self, site: usize) {
        self.learn(site);
    }

    /// `site` applies the authority's metadata: ownership changes reach its
    /// engine, history first (so a lost ownership is counted at once).
    fn learn(&mut self, site: usize) {
        let authority = self.control.authority.clone();
        let version = self.control.version;
        let before = std::mem::replace(&mut self.control.applied[site], (authority, version));
        let changed: Vec<stretch_metadata::Group> = self.control.applied[site]
            .0
            .groups
            .values()
            .filter(|group| {
                before.0.groups.get(&group.id).is_none_or(|known| {
                    known.epoch != group.epoch || known.fast_drain != group.fast_drain
                })
            })
            .cloned()
            .collect();
        // Requests it holds for groups it no longer owns are answered by
        // their new owner from now on (forwarded), or fail.
        let moved: BTreeSet<u32> = changed
            .iter()
            .filter(|group| site_index(&group.owner) != site)
            .map(|group| group.id)
            .collect();
        let groups = self.scenario.topology.groups;
        for held in self.requests.values_mut() {
            let group = held.volume as u32 % groups + 1;
            if held.site == site && !held.snapshot && moved.contains(&group) {
                held.remote = true;
                held.owner_local_write = false;
            }
        }
        let Some(node) = self.sites[site].node.as_mut() else {
            return;
        };
        for group in &changed {
            tell_group(&mut node.engine, group);
        }
        self.renew_lease(site);
        self.dispatch(site);
    }

    /// The cut-off site's links come back; it learns the new owners a
    /// little later (its metadata catches up over Raft).
    pub(super) fn isolation_end(&mut self) {
        let Some(isolation) = self.control.isolation.as_mut() else {
            return;
        };
        if isolation.healed {
            return;
        }
        isolation.healed = true;
        let site = isolation.site;
        self.trace
            .record(self.now, Some(site), &[52], || "cut-off ends".into());
        for link in self.net.links_of(site) {
            self.cut_end(link, [true, true]);
        }
        let delay = self.rng.below(500 * MS + 1);
        self.schedule(self.now + delay, Event::Learn(site));
    }

    /// The cut-off site applied the new owners: it reports what it lost,
    /// and the voters grant it leases again.
    pub(super) fn learn_after_isolation(&mut self, site: usize) {
        let Some(isolation) = self.control.isolation.take() else {
            return;
        };
        let reports: Vec<LossReport> = std::mem::take(&mut self.control.reports);
        let lost_writes: u64 = reports
            .iter()
            .filter(|report| report.site == site)
            .map(|report| report.lost_writes)
            .sum();
        let reported_before = self.sites[site]
            .node
            .as_ref()
            .map(|node| node.engine.stats().failover_lost_deltas_total);
        self.learn(site);
        let reported_after = self.sites[site]
            .node
            .as_ref()
            .map(|node| node.engine.stats().failover_lost_deltas_total);
        self.trace
            .record(self.now, Some(site), &[53, lost_writes], || {
                format!(
                    "learns the new owners ({lost_writes} of its acknowledged writes were lost)"
                )
            });
        let (Some(before), Some(after)) = (reported_before, reported_after) else {
            self.stats.loss_reports_unchecked += 1;
            return;
        };
        if self.sites[site].generation != isolation.generation {
            // Restarted meanwhile: the ownership it lost was never in this
            // engine's memory, so it cannot count the loss.
            self.stats.loss_reports_unchecked += 1;
            return;
        }
        if lost_writes > 0 && after == before {
            let groups: Vec<String> = reports
                .iter()
                .filter(|report| report.lost_writes > 0)
                .map(|report| format!("group {}: {}", report.group, report.lost_writes))
                .collect();
            self.fail(Violation {
                guarantee: "G1",
                detail: format!(
                    "site {} acknowledged writes its groups' new owners never had ({}), but reported no lost delta when it learned of the failover",
                    site + 1,
                    groups.join(", ")
                ),
            });
        }
    }

    /// G1 at an acknowledgement: `site` acknowledged a write (or a flush)
    /// of `volume`'s group; it must own the group by the authority now.
    pub(super) fn check_acknowledger(&mut self, site: usize, volume: usize) {
        let group = self.group_of(volume);
        let owner = self.control.owner(group);
        if owner == site {
            return;
        }
        self.fail(Violation {
            guarantee: "G1",
            detail: format!(
                "site {} acknowledged a write to volume {volume} of group {group}, which site {} owns (two sites accepted writes for one group)",
                site + 1,
                owner + 1
            ),
        });
    }

    /// `site`'s image of every volume of `group`, decoded: its legs with
    /// the blocks its engine holds in memory laid over them (what it would
    /// serve).
    pub(super) fn image_of(&self, site: usize, group: u32) -> Result<Vec<View>, Violation> {
        let node = self.sites[site]
            .node
            .as_ref()
            .expect("simulator invariant: the site taking over is up");
        let mut views = Vec::new();
        for volume in (0..self.scenario.topology.volumes as usize)
            .filter(|volume| self.group_of(*volume) == group)
        {
            let mut image = self.sites[site]
                .fs
                .with_content(&volume_path(volume), <[u8]>::to_vec)
                .unwrap_or_default();
            let blocks = image.len() / BLOCK_SIZE;
            for block in 0..blocks {
                let key = BlockKey {
                    volume: VolumeId(volume as u32 + 1),
                    block: block as u64,
                };
                let at = block * BLOCK_SIZE;
                match node.engine.cached_block(&key) {
                    Some(BlockImage::Data(data)) if data.len() == BLOCK_SIZE => {
                        image[at..at + BLOCK_SIZE].copy_from_slice(data);
                    }
                    Some(BlockImage::Zero) => image[at..at + BLOCK_SIZE].fill(0),
                    Some(BlockImage::Data(_)) | None => {}
                }
            }
            let versions =
                self.checker
                    .decode_image(volume, &image, false)
                    .map_err(|violation| Violation {
                        guarantee: violation.guarantee,
                        detail: format!(
                            "site {} taking group {group} over: {}",
                            site + 1,
                            violation.detail
                        ),
                    })?;
            views.push(View {
                volume,
                first: 0,
                versions,
            });
        }
        Ok(views)
    }
}
