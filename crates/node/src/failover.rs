//! Failover: a data node takes over the groups of an owner site that holds
//! no lease any more — by itself for volumes whose policy is `auto`, when
//! an operator accepts the loss for `manual` ones (`stretch volume
//! promote`).
//!
//! The order, each step for a reason:
//! 1. the owner holds no lease: a majority of the voters say no promise
//!    they made to it still runs (a site cut from its peer but still
//!    reaching the witness keeps its lease, and its volumes);
//! 2. the engine stops taking the old owner's deltas for the group and
//!    names the last one it holds whole: the new image;
//! 3. (`auto` only) a Raft entry offers that image; once every other
//!    survivor holding a lease offered its own (or a deadline passed), the
//!    one holding the newest goes on and the others call their takeover
//!    off (`stretch_control::choose_image`): with three data sites, a write
//!    promised to survive the owner's loss may be at only one survivor;
//! 4. one Raft entry names this site owner at a raised epoch, recording
//!    that image (the writes the old owner acknowledged after it are lost,
//!    and counted when it returns); it is refused if a survivor offered a
//!    newer image meanwhile;
//! 5. the voters that applied it say how long grants they made before it
//!    may still cover the old owner; once that passed here (stretched for
//!    drift), the engine is told it owns the group and writes flow.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stretch_control::{ImageChoice, TakeoverTrigger};
use stretch_core::{DeltaSeq, Epoch, EpochStart, GroupId};
use stretch_metadata::{ClusterMetadata, Command, CommandError, Failover};
use tokio::sync::watch;

use crate::control::ControlError;
use crate::node::{Node, NodeError};

/// How often each data node checks whether the owners of other groups
/// still hold their leases.
const CHECK_INTERVAL: Duration = Duration::from_millis(stretch_control::OWNER_CHECK_INTERVAL_MS);
/// How often the offers are looked at again meanwhile.
const IMAGE_OFFER_POLL: Duration = Duration::from_millis(100);

/// The groups of `site` (name → id, epoch) and whether each fails over by
/// itself: `auto` only if every volume of the group is `auto` (a group
/// moves as one).
fn groups_of(metadata: &ClusterMetadata, site: &str) -> BTreeMap<String, (u32, u64, bool)> {
    let mut groups = BTreeMap::new();
    for group in metadata.groups.values().filter(|group| group.owner == site) {
        let automatic = metadata
            .volumes
            .values()
            .filter(|volume| volume.group == group.id)
            .all(|volume| volume.failover == Failover::Auto);
        groups.insert(group.name.clone(), (group.id, group.epoch, automatic));
    }
    groups
}

/// Watches the owners of the groups this node does not own; takes over the
/// `auto` ones of an owner that holds no lease. Ends when `stop` turns
/// true.
pub(crate) async fn watch_owners(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let (Some(control), Some(leases)) = (node.control.get(), node.leases.get()) else {
            continue;
        };
        let (metadata, _) = control.applied();
        let owners: std::collections::BTreeSet<String> = metadata
            .groups
            .values()
            .map(|group| group.owner.clone())
            .filter(|owner| *owner != node.site)
            .collect();
        let mut lost = std::collections::BTreeSet::new();
        for owner in owners {
            let Some(site) = leases.site_id(&owner) else {
                continue;
            };
            if !leases.holds_no_lease(&Arc::downgrade(&node), site).await {
                continue;
            }
            lost.insert(owner.clone());
            for (group, (id, epoch, automatic)) in groups_of(&metadata, &owner) {
                if !automatic || node.taking_over.lock().contains(&id) {
                    continue;
                }
                tracing::warn!(%group, from = %owner,
                    "owner site holds no lease: failing the group over here (policy auto)");
                let work = node.clone();
                tokio::spawn(async move {
                    let trigger = TakeoverTrigger::OwnerLost { epoch };
                    if let Err(error) = work.fail_over(&group, trigger).await {
                        tracing::warn!(%group, %error, "failover did not happen");
                    }
                });
            }
        }
        *node.lost_sites.lock() = lost;
    }
}

impl Node {
    /// `stretch volume promote`: fails `volume`'s group over to this site,
    /// accepting that the writes its owner acknowledged after this site's
    /// image are lost. Must run at the site that takes it.
    pub(crate) fn promote_volume(
        &self,
        volume: &str,
        site: &str,
    ) -> Result<stretch_storage::VolumeRecord, NodeError> {
        let record = self
            .volume(volume)
            .ok_or_else(|| stretch_storage::CatalogError::NoSuchVolume(volume.to_string()))?;
        let fail = |reason: String| NodeError::Promote {
            volume: volume.to_string(),
            site: site.to_string(),
            reason,
        };
        if site != self.site {
            return Err(fail(format!(
                "ask a node at site {site} (this node is at {})",
                self.site
            )));
        }
        if record.owner == self.site {
            // The metadata this node applied may be behind (it just
            // restarted, or cannot reach the leader): say so rather than
            // claim the site serves it.
            return Err(fail(match self.suspension(&record) {
                None => "it already owns it".into(),
                Some(reason) => format!(
                    "this site's metadata names it owner, but it serves no writes for it ({reason}); \
                     a failover this node has not learned of yet may have moved it: ask again once \
                     `stretch status` shows this node applying the leader's changes"
                ),
            }));
        }
        self.runtime
            .block_on(self.fail_over(&record.group, TakeoverTrigger::Operator))?;
        self.reconcile_now();
        Ok(self.volume(volume).unwrap_or(record))
    }

    /// Takes `group` over at this site (see the module docs for the steps).
    pub(crate) async fn fail_over(
        &self,
        group: &str,
        trigger: TakeoverTrigger,
    ) -> Result<(), NodeError> {
        let control = self
            .control
            .get()
            .ok_or(NodeError::Control(ControlError::Stopping))?
            .clone();
        let leases = self
            .leases
            .get()
            .ok_or_else(|| NodeError::Failover {
                group: group.to_string(),
                reason: "this cluster has one data site: there is nowhere to fail over".into(),
            })?
            .clone();
        let fail = |reason: String| NodeError::Failover {
            group: group.to_string(),
            reason,
        };
        let (metadata, _) = control.applied();
        let current = metadata
            .group_by_name(group)
            .ok_or_else(|| fail("no such group".into()))?
            .clone();
        if current.owner == self.site {
            return Ok(());
        }
        if !trigger.still_applies(current.epoch) {
            tracing::debug!(%group, ?trigger, epoch = current.epoch, owner = %current.owner,
                "the group changed owner since the owner check: no takeover");
            return Ok(());
        }
        let automatic = trigger.automatic();
        let from = leases
            .site_id(&current.owner)
            .ok_or_else(|| fail(format!("unknown owner site {}", current.owner)))?;
        if !self.taking_over.lock().insert(current.id) {
            return Err(fail("a takeover of it is already running here".into()));
        }
        let result = self
            .take_over(&control, &leases, &current, from, automatic)
            .await;
        self.taking_over.lock().remove(&current.id);
        let work = self.weak();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(node) = work.upgrade() {
                node.reconcile_now();
            }
        })
        .await;
        result
    }

    async fn take_over(
        &self,
        control: &crate::control::Control,
        leases: &crate::control::lease::Leases,
        current: &stretch_metadata::Group,
        from: stretch_core::SiteId,
        automatic: bool,
    ) -> Result<(), NodeError> {
        let fail = |reason: String| NodeError::Failover {
            group: current.name.clone(),
            reason,
        };
        let id = GroupId(current.id);
        let now = self.driver.now();
        // Deltas held here but not yet synced in the journal would not
        // survive a crash: no offer until they would (tried again later).
        if self
            .driver
            .with_engine(|engine| engine.takeover_awaits_journal(id))
        {
            return Err(fail(
                "this site's journal has not synced the deltas it holds yet".into(),
            ));
        }
        let Some(image) = self
            .driver
            .with_engine(|engine| engine.begin_takeover(now, id))
        else {
            return Err(fail(
                "this site's leg is mid-resync (at no delta boundary): it cannot take the group"
                    .into(),
            ));
        };
        let passed_over = if automatic {
            match self.offer_image(control, leases, current, image).await {
                Ok(Some(passed_over)) => passed_over,
                // Another site takes the group, or the offer failed.
                other => {
                    self.driver.with_engine(|engine| engine.cancel_takeover(id));
                    return other.map(|_| ());
                }
            }
        } else {
            // The operator named this site and accepted the loss.
            Vec::new()
        };
        let command = Command::PromoteGroup {
            group: current.name.clone(),
            to: self.site.clone(),
            expected_epoch: current.epoch,
            after_seq: image.0,
            automatic,
            passed_over,
        };
        let index = match control.execute(command).await {
            Ok((_, index)) => index,
            // Another survivor offered a newer image meanwhile, or took
            // the group first: it is theirs.
            Err(ControlError::Refused(
                error @ (CommandError::NewerImage { .. } | CommandError::StaleEpoch { .. }),
            )) if automatic && !self.promoted_here(control, current, image) => {
                tracing::info!(group = %current.name, %error, "leaving the takeover to another site");
                self.driver.with_engine(|engine| engine.cancel_takeover(id));
                return Ok(());
            }
            // A retry refused because the first attempt, whose answer was
            // lost, promoted this site: done. Calling the takeover off then
            // would let the engine own the group without the wait below.
            Err(ControlError::Refused(error)) if self.promoted_here(control, current, image) => {
                tracing::debug!(%error, group = %current.name, "the promotion was committed by an earlier attempt");
                control.applied().1
            }
            Err(error) => {
                self.driver.with_engine(|engine| engine.cancel_takeover(id));
                return Err(error.into());
            }
        };
        let (metadata, _) = control.applied();
        let Some(group) = metadata.groups.get(&current.id).cloned() else {
            return Err(fail("the group was deleted meanwhile".into()));
        };
        tracing::warn!(group = %current.name, from = %current.owner, to = %self.site,
            epoch = group.epoch, image = image.0,
            "group failed over: waiting until the old owner's lease cannot cover it");
        leases.wait_takeover(&self.weak(), from, index).await;
        self.driver.with_engine(|engine| {
            engine.set_epoch_history(id, epoch_history(&group));
            engine.set_owner(id, self.driver_site(), Epoch(group.epoch));
        });
        tracing::warn!(group = %current.name, epoch = group.epoch,
            lost_after_delta = image.0, "group taken over: writes are served here");
        Ok(())
    }
}

impl Node {
    /// Offers this site's `image` of `current` and waits until the
    /// survivors that hold a lease offered theirs (at most
    /// `tuning.image_offer_wait_ms`: each notices the lost lease within
    /// an owner check and commits its offer in one Raft round, so the wait
    /// runs out only when one of them cannot reach the leader):
    /// `Some(passed_over)` if this site is to
    /// promote itself, naming the survivors whose offers do not count;
    /// `None` if another site holds a newer image or took the group.
    async fn offer_image(
        &self,
        control: &crate::control::Control,
        leases: &crate::control::lease::Leases,
        current: &stretch_metadata::Group,
        image: DeltaSeq,
    ) -> Result<Option<Vec<String>>, NodeError> {
        let data_sites = control.applied().0.data_sites();
        let others: Vec<&String> = data_sites
            .iter()
            .filter(|site| **site != self.site && **site != current.owner)
            .collect();
        if others.is_empty() {
            // The only survivor: nothing to compare, and no Raft round to
            // add to the takeover.
            return Ok(Some(Vec::new()));
        }
        let offer = Command::OfferImage {
            group: current.name.clone(),
            site: self.site.clone(),
            expected_epoch: current.epoch,
            after_seq: Some(image.0),
        };
        match control.execute(offer).await {
            Ok(_) => {}
            Err(ControlError::Refused(CommandError::StaleEpoch { .. })) => return Ok(None),
            Err(error) => return Err(error.into()),
        }
        let started = tokio::time::Instant::now();
        loop {
            let (metadata, _) = control.applied();
            let Some(group) = metadata.groups.get(&current.id) else {
                return Ok(None);
            };
            if group.epoch != current.epoch {
                return Ok(None);
            }
            let mut holding = BTreeMap::new();
            for site in &others {
                let holds = match leases.site_id(site) {
                    Some(id) => !leases.holds_no_lease(&self.weak(), id).await,
                    None => false,
                };
                holding.insert(site.as_str(), holds);
            }
            let survivors = stretch_control::survivors(
                data_sites.iter().cloned(),
                &self.site,
                &current.owner,
                &group.offers,
                |site| holding.get(site).copied().unwrap_or(false),
            );
            let deadline_passed = started.elapsed() >= self.image_offer_wait;
            match stretch_control::choose_image(image.0, &survivors, deadline_passed) {
                ImageChoice::Promote { passed_over } => {
                    if deadline_passed {
                        tracing::warn!(group = %current.name,
                            "survivors holding a lease did not offer their images in time: taking the group with this site's");
                    }
                    return Ok(Some(passed_over));
                }
                ImageChoice::LeaveTo { site, after_seq } => {
                    tracing::info!(group = %current.name, %site, after_delta = after_seq, image = image.0,
                        "another survivor holds a newer image: it takes the group");
                    return Ok(None);
                }
                ImageChoice::Wait { for_sites } => {
                    tracing::debug!(group = %current.name, ?for_sites, "waiting for the survivors' images");
                }
            }
            tokio::time::sleep(IMAGE_OFFER_POLL).await;
        }
    }

    /// Whether the applied metadata shows `group` promoted to this site
    /// from `current`'s epoch with `image` as its image.
    fn promoted_here(
        &self,
        control: &crate::control::Control,
        current: &stretch_metadata::Group,
        image: DeltaSeq,
    ) -> bool {
        let (metadata, _) = control.applied();
        metadata.groups.get(&current.id).is_some_and(|group| {
            group.owner == self.site
                && group.last_failover.as_ref().is_some_and(|failover| {
                    failover.epoch == current.epoch + 1
                        && failover.to == self.site
                        && failover.after_seq == image.0
                })
        })
    }
}

/// A group's epoch history as the engine takes it.
/// Tells `engine` where each group's ownership epochs start, as
/// `metadata` recorded them.
pub(crate) fn tell_epoch_histories(
    engine: &mut stretch_core::Engine,
    metadata: &stretch_metadata::ClusterMetadata,
) {
    for group in metadata.groups.values() {
        engine.set_epoch_history(stretch_core::GroupId(group.id), epoch_history(group));
    }
}

pub(crate) fn epoch_history(group: &stretch_metadata::Group) -> Vec<EpochStart> {
    group
        .history
        .iter()
        .map(|start| EpochStart {
            epoch: Epoch(start.epoch),
            after_seq: DeltaSeq(start.after_seq),
            handed_over: start.handed_over,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// What the operator sees

impl Node {
    /// A volume's failover policy as the metadata records it.
    pub(crate) fn failover_policy(&self, record: &stretch_storage::VolumeRecord) -> &'static str {
        let automatic = self.control.get().is_some_and(|control| {
            control
                .applied()
                .0
                .volumes
                .get(&record.id)
                .is_some_and(|volume| volume.failover == Failover::Auto)
        });
        if automatic { "auto" } else { "manual" }
    }

    /// The newest failover of a volume's group.
    pub(crate) fn last_failover(
        &self,
        record: &stretch_storage::VolumeRecord,
    ) -> Option<crate::admin::FailoverInfo> {
        let (metadata, _) = self.control.get()?.applied();
        let failover = metadata
            .groups
            .get(&record.group_id)?
            .last_failover
            .clone()?;
        Some(crate::admin::FailoverInfo {
            from: failover.from,
            to: failover.to,
            epoch: failover.epoch,
            after_delta: failover.after_seq,
            automatic: failover.automatic,
        })
    }

    /// Why a volume accepts no writes now (`None` if it does, as far as
    /// this node knows).
    pub(crate) fn suspension(&self, record: &stretch_storage::VolumeRecord) -> Option<String> {
        if self.taking_over.lock().contains(&record.group_id) {
            return Some(format!(
                "taking over from {}: waiting until its lease cannot cover the volume",
                record.owner
            ));
        }
        if record.owner == self.site {
            let leases = self.leases.get()?;
            if !leases.is_holder() {
                return None;
            }
            let valid = leases
                .valid_until()
                .is_some_and(|until| until > leases.now());
            return (!valid).then(|| {
                "this site holds no ownership lease (it reaches no majority of the voters)".into()
            });
        }
        if !self.lost_sites.lock().contains(&record.owner) {
            return None;
        }
        Some(match self.failover_policy(record) {
            "auto" => format!("owner site {} holds no lease; failing over", record.owner),
            _ => format!(
                "owner site {} holds no lease; failover policy manual: \
                 `stretch volume promote {} --site {} --accept-data-loss` takes it here",
                record.owner, record.name, self.site
            ),
        })
    }

    /// This node's lease, for `status`.
    pub(crate) fn lease_info(&self) -> Option<crate::admin::LeaseInfo> {
        let leases = self.leases.get()?;
        if !leases.is_holder() {
            return None;
        }
        let now = leases.now();
        let until = leases.valid_until();
        let config = leases.config();
        Some(crate::admin::LeaseInfo {
            valid: until.is_some_and(|until| until > now),
            expires_in_ms: until.map_or(0, |until| until.0.saturating_sub(now.0) / 1_000_000),
            lease_ms: config.lease_ms,
            renew_ms: config.renew_ms,
            drift_ppm: config.drift_ppm,
            margin_ms: config.margin_ms,
        })
    }
}

impl Node {
    /// The lease and failover figures for the gauges.
    pub(crate) fn lease_figures(&self) -> crate::metrics::LeaseFigures {
        let stats = self.driver.engine.lock().stats();
        let lease = self.lease_info();
        // Apart from the literal: a guard taken inside it would live until
        // its end, and `suspension` locks the same set.
        let sites_without_lease = self.lost_sites.lock().len();
        crate::metrics::LeaseFigures {
            valid: lease.as_ref().is_some_and(|lease| lease.valid),
            expires_seconds: lease.map_or(0.0, |lease| lease.expires_in_ms as f64 / 1e3),
            sites_without_lease,
            suspended_volumes: self
                .volumes()
                .iter()
                .filter(|record| self.suspension(record).is_some())
                .count(),
            suspended_requests: stats.suspended_requests_now,
            suspended_failed_total: stats.suspended_failed_total,
            failover_lost_deltas_total: stats.failover_lost_deltas_total,
            failover_lost_bytes_total: stats.failover_lost_bytes_total,
        }
    }
}
