//! Ownership that follows the workload (`stretch volume follow NAME auto`):
//! the owner's node samples, once a second, where each `auto` group's
//! requests come from (the engine counts them by the site that sent them)
//! and migrates the group to a site that brings most of them for long
//! enough ([`FollowTracker`], the rule and its hysteresis). A migration it
//! starts is an ordinary one (fast mode with two data sites, drain mode
//! with more): `stretch migration list` shows it, and `stretch migration
//! cancel` ends it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stretch_control::{FollowMove, FollowSettings, FollowTracker};
use stretch_core::{GroupId, SiteId};
use stretch_metadata::{Command, Follow, GroupState};
use stretch_storage::CatalogError;
use tokio::sync::watch;

use crate::migration::{MigrationMode, StartMigration};
use crate::node::{Node, NodeError};

/// How often the owner samples where its groups' requests come from.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Samples this node's `auto` groups and starts the migrations their
/// workloads ask for. Ends when `stop` turns true.
pub(crate) async fn follow_workloads(
    node: Arc<Node>,
    settings: FollowSettings,
    mut stop: watch::Receiver<bool>,
) {
    let mut trackers: BTreeMap<(u32, u64), FollowTracker> = BTreeMap::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(SAMPLE_INTERVAL) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let decisions = node.sample_workloads(settings, &mut trackers);
        for (group, decision) in decisions {
            let work = node.clone();
            let _ = tokio::task::spawn_blocking(move || work.follow(&group, decision)).await;
        }
    }
}

impl Node {
    /// Feeds every `auto` group this site owns to its tracker (one per
    /// group and epoch, so a change of owner starts the interval again) and
    /// returns the groups to move.
    fn sample_workloads(
        &self,
        settings: FollowSettings,
        trackers: &mut BTreeMap<(u32, u64), FollowTracker>,
    ) -> Vec<(String, FollowMove)> {
        let Some(control) = self.control.get() else {
            return Vec::new();
        };
        let (metadata, _) = control.applied();
        let Some(own) = self.sites.id(&self.site) else {
            return Vec::new();
        };
        let now_ms = self.started.elapsed().as_millis() as u64;
        let followed: Vec<(u32, u64, String)> = metadata
            .groups
            .values()
            .filter(|group| {
                group.follow == Follow::Auto
                    && group.owner == self.site
                    && group.state == GroupState::Active
            })
            .map(|group| (group.id, group.epoch, group.name.clone()))
            .collect();
        trackers.retain(|(id, epoch), _| {
            followed
                .iter()
                .any(|(group, at, _)| group == id && at == epoch)
        });
        if followed.is_empty() {
            return Vec::new();
        }
        let counts: BTreeMap<GroupId, BTreeMap<SiteId, u64>> = self
            .driver
            .engine
            .lock()
            .replication_status()
            .into_iter()
            .map(|status| (status.group, status.requests_by_site))
            .collect();
        let running: Vec<u32> = self.running_migrations();
        let mut decisions = Vec::new();
        for (id, epoch, name) in followed {
            let tracker = trackers
                .entry((id, epoch))
                .or_insert_with(|| FollowTracker::new(settings, now_ms));
            let Some(counts) = counts.get(&GroupId(id)) else {
                continue;
            };
            let Some(decision) = tracker.observe(now_ms, own, counts) else {
                continue;
            };
            // Whatever comes of it, the next decision waits a whole
            // interval again: a migration that gives up is not retried at
            // once.
            *tracker = FollowTracker::new(settings, now_ms);
            if running.contains(&id) {
                continue;
            }
            decisions.push((name, decision));
        }
        decisions
    }

    /// Starts the migration a workload asked for, and says so.
    fn follow(&self, group: &str, decision: FollowMove) {
        let Some(to) = self.sites.name(decision.to).map(str::to_string) else {
            return;
        };
        tracing::info!(
            group,
            from = %self.site,
            %to,
            share_percent = decision.share_percent,
            requests_per_second = decision.requests_per_second,
            window_s = decision.window_ms / 1000,
            "following the workload: {}% of the group's requests came from {to} over the last {} s; migrating it there",
            decision.share_percent,
            decision.window_ms / 1000,
        );
        // Fast where it can be (two data sites): the workload already runs
        // at the target, and waits for no catch-up there.
        let mode = if self.sites.data_site_count() == 2 {
            MigrationMode::Fast
        } else {
            MigrationMode::Drain
        };
        let request = StartMigration {
            volume: None,
            group: Some(group.to_string()),
            to: to.clone(),
            timeout_s: None,
            mode,
        };
        match self.start_migration(&request) {
            Ok(_) => self.driver.metrics.follow_decision("migrating"),
            Err(error) => {
                self.driver.metrics.follow_decision("refused");
                tracing::warn!(group, %to, %error, "the migration the workload asked for did not start");
            }
        }
    }

    /// `stretch volume follow NAME auto|off`: sets whether the ownership of
    /// the volume's group follows its workload.
    pub(crate) fn set_follow(
        &self,
        volume: &str,
        follow: Follow,
    ) -> Result<stretch_storage::VolumeRecord, NodeError> {
        let record = self
            .volume(volume)
            .ok_or_else(|| CatalogError::NoSuchVolume(volume.to_string()))?;
        let control = self.control()?.clone();
        self.wait(control.execute(Command::SetFollow {
            group: record.group.clone(),
            follow,
        }))?;
        tracing::info!(group = %record.group, %follow, "ownership follows the workload: {follow}");
        Ok(record)
    }

    /// The requests the volume's group served here since this site began
    /// owning it, by site name (empty at a replica).
    pub(crate) fn requests_by_site(
        &self,
        record: &stretch_storage::VolumeRecord,
    ) -> BTreeMap<String, u64> {
        let status = self.driver.engine.lock().replication_status();
        status
            .into_iter()
            .find(|status| status.group == record.group_id())
            .map(|status| {
                status
                    .requests_by_site
                    .into_iter()
                    .map(|(site, count)| {
                        let name = self.sites.name(site).unwrap_or("unknown");
                        (name.to_string(), count)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether the volume's group follows its workload.
    pub(crate) fn follow_policy(&self, record: &stretch_storage::VolumeRecord) -> Follow {
        self.control
            .get()
            .and_then(|control| {
                control
                    .applied()
                    .0
                    .groups
                    .get(&record.group_id)
                    .map(|group| group.follow)
            })
            .unwrap_or_default()
    }
}
