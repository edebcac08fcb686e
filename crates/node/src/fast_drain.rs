//! Fast migrations at a node, after the switchover (the engine's
//! `fast_drain` module has the rules): the engine learns from the metadata
//! which drains run, the target's node commits a drain's end once it copied
//! every region it lacked, and an operator may accept the loss of what a
//! lost source never sent (`stretch volume accept-loss`).

use std::sync::Arc;
use std::time::Duration;

use stretch_core::{Engine, Epoch, FastDrain, GroupId, VolumeId};
use stretch_metadata::{ClusterMetadata, Command};
use tokio::sync::watch;

use crate::node::{Node, NodeError};
use crate::sites::SiteTable;

/// How often a target's node looks whether its drains copied everything.
const CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Tells `engine` which fast drains run, as `metadata` recorded them (and
/// that the others do not). Before the owners: a target numbers its deltas
/// after the seal from the moment it owns the group.
pub(crate) fn tell_fast_drains(engine: &mut Engine, metadata: &ClusterMetadata, sites: &SiteTable) {
    for group in metadata.groups.values() {
        let Some(owner) = sites.id(&group.owner) else {
            continue;
        };
        let drain = group
            .fast_drain
            .as_ref()
            .and_then(|drain| engine_drain(drain, sites));
        engine.set_fast_drain(GroupId(group.id), owner, drain);
    }
}

/// A drain record as the engine takes it (`None` if it names a site this
/// node's configuration lacks).
pub(crate) fn engine_drain(
    drain: &stretch_metadata::FastDrain,
    sites: &SiteTable,
) -> Option<FastDrain> {
    Some(FastDrain {
        source: sites.id(&drain.from)?,
        target: sites.id(&drain.to)?,
        epoch: Epoch(drain.epoch),
        regions: drain.regions.as_ref().map(|regions| {
            regions
                .iter()
                .map(|(volume, region)| (VolumeId(*volume), *region))
                .collect()
        }),
    })
}

/// At a drain's target: commits the end of every drain whose regions are
/// all copied, ten times a second. Ends when `stop` turns true.
pub(crate) async fn finish_fast_drains(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let work = node.clone();
        let _ = tokio::task::spawn_blocking(move || work.finish_copied_drains()).await;
    }
}

impl Node {
    fn finish_copied_drains(&self) {
        let Ok(control) = self.control() else {
            return;
        };
        let (metadata, _) = control.applied();
        for group in metadata.groups.values() {
            let Some(drain) = &group.fast_drain else {
                continue;
            };
            if drain.to != self.site {
                continue;
            }
            let copied = self
                .driver
                .engine
                .lock()
                .fast_drain_progress(GroupId(group.id))
                .is_some_and(|progress| progress.regions_left == 0);
            if !copied {
                continue;
            }
            let command = Command::EndFastDrain {
                group: group.name.clone(),
                expected_epoch: group.epoch,
                accept_loss: false,
            };
            match self.wait(control.execute(command)) {
                Ok(_) => tracing::info!(group = %group.name, from = %drain.from,
                    "fast migration: every region the group lacked is copied"),
                Err(error) => tracing::warn!(group = %group.name, %error,
                    "could not record the end of a fast migration's copy; retrying"),
            }
        }
    }

    /// Ends the drain of `volume`'s group without the regions its source
    /// never sent (the source is lost): this site's older image of them
    /// stands, and is written again so the source converges on it when it
    /// returns. Returns how many regions were not copied.
    pub(crate) fn accept_drain_loss(&self, volume: &str) -> Result<u64, NodeError> {
        let control = self.control()?.clone();
        let (metadata, _) = control.applied();
        let fail = |reason: String| NodeError::Move {
            volume: volume.to_string(),
            site: self.site.clone(),
            reason,
        };
        let record = metadata
            .volumes
            .values()
            .find(|record| record.name == volume)
            .ok_or_else(|| fail("no such volume".into()))?;
        let group = metadata
            .groups
            .get(&record.group)
            .ok_or_else(|| fail("its group is gone".into()))?;
        let Some(drain) = &group.fast_drain else {
            return Err(fail(format!(
                "group {} has no fast migration copying",
                group.name
            )));
        };
        if drain.to != self.site {
            return Err(fail(format!(
                "the copy runs at site {}: ask a node there",
                drain.to
            )));
        }
        let left = self
            .driver
            .engine
            .lock()
            .fast_drain_progress(GroupId(group.id))
            .map_or(0, |progress| progress.regions_left);
        let command = Command::EndFastDrain {
            group: group.name.clone(),
            expected_epoch: group.epoch,
            accept_loss: true,
        };
        self.wait(control.execute(command))?;
        tracing::warn!(group = %group.name, from = %drain.from, regions = left,
            "fast migration's copy ended by an operator: the regions not copied keep this site's older image");
        self.reconcile_now();
        Ok(left)
    }
}
