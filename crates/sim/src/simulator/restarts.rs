//! Sites crashing (their disks losing what was not synced) and
//! restarting through the node's start-up sequence, with the recovered
//! images checked.

use super::*;

impl Simulation<'_> {
    pub(super) fn crash(&mut self, site: usize, why: &str) {
        let Some(node) = &self.sites[site].node else {
            return;
        };
        if self.multi() {
            // Groups whose legs here were mid-resync: exempt from the
            // prefix check after recovery, until consistent again. (A
            // replica that reads as diverged only by an epoch history it
            // had not caught up with is not: told the newer history at its
            // start, it rightly reads as whole, and its image is checked.)
            for status in node.engine.replication_status() {
                let owner = self.control.owner_known_at(site, status.group.0);
                if owner != site && status.mid_resync {
                    self.resyncing.insert((site, status.group.0));
                }
            }
        }
        self.stats.crashes += 1;
        self.stats.marks.add(node.engine.marks());
        self.sites[site].node = None;
        self.sites[site].generation += 1;
        self.sites[site].fs.crash(&mut self.rng);
        self.checker.on_site_crash(site);
        let lost: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, request)| request.site == site)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            if let Some(request) = self.requests.remove(&id) {
                self.clients_busy[request.client] = false;
            }
        }
        let generation = self.sites[site].generation;
        self.trace
            .record(self.now, Some(site), &[20, generation], || {
                format!("CRASH ({why})")
            });
        if self.multi() {
            self.disconnect_crashed(site);
        }
        self.sites[site].restart_pending = true;
        let delay = self.scenario.faults.restart_ms.max(1) * MS;
        self.schedule(self.now + delay, Event::Restart(site));
    }

    pub(super) fn restart(&mut self, site: usize) {
        self.sites[site].restart_pending = false;
        if !self.start_node(site, false) {
            // The disk still fails (an fsync failure window): try again.
            self.sites[site].restart_pending = true;
            let delay = self.scenario.faults.restart_ms.max(1) * MS;
            self.schedule(self.now + delay, Event::Restart(site));
            return;
        }
        if self.violation.is_some() {
            return;
        }
        if self.multi() {
            for link in self.net.links_of(site) {
                self.schedule_dial(link);
            }
        }
        if self.workload_over {
            self.maybe_start_drain();
            return;
        }
        for client in 0..self.clients_busy.len() {
            if client % self.sites.len() == site {
                self.next_turn(client);
            }
        }
    }

    /// Opens legs, replays the journal (the same recovery code the runtime
    /// uses), checks the recovered images, and starts a fresh engine.
    pub(super) fn start_node(&mut self, site: usize, fresh: bool) -> bool {
        let fs = Arc::new(self.sites[site].fs.clone());
        let volumes = self.scenario.topology.volumes as usize;
        let size = self.scenario.topology.volume_bytes;
        let mut legs = BTreeMap::new();
        for index in 0..volumes {
            match Leg::open(fs.as_ref(), &volume_path(index), size) {
                Ok(leg) => {
                    legs.insert(VolumeId(index as u32 + 1), leg);
                }
                Err(error) => {
                    self.fail(Violation {
                        guarantee: "G3",
                        detail: format!("leg of volume {index} unusable after crash: {error}"),
                    });
                    return true;
                }
            }
        }
        let peers = if self.multi() {
            self.engine_config(site).peers
        } else {
            Vec::new()
        };
        let paths = StartPaths {
            journal_dir: journal_dir().to_path_buf(),
            resync_marks: resync_marks_path().to_path_buf(),
            dirty_maps: peers
                .into_iter()
                .map(|peer| (peer, dirty_map_path(peer)))
                .collect(),
        };
        let mut started = match start_from_disk(
            &fs,
            &paths,
            &legs,
            self.scenario.engine.region_blocks,
            self.scenario.engine.journal_segment_bytes,
            fresh,
        ) {
            Ok(started) => started,
            // A map or the marks unreadable after a crash: their saves are
            // meant to be atomic.
            Err(error @ (StartError::LoadMap(_) | StartError::ResyncMarks(_))) => {
                self.fail(Violation {
                    guarantee: "G3",
                    detail: format!("site {}: {error}", site + 1),
                });
                return true;
            }
            // The disk refused a read, a write or a sync: the start is
            // tried again.
            Err(error) => {
                self.trace.record(self.now, Some(site), &[21], || {
                    format!("start failed: {error}")
                });
                return false;
            }
        };
        if !fresh && let Err(violation) = self.check_recovered(site) {
            self.fail(violation);
            return true;
        }
        let replayed = started.recovery.replayed_deltas;
        self.trace
            .record(self.now, Some(site), &[23, replayed], || {
                format!("node started; recovery replayed {replayed} deltas")
            });
        let mut engine = Engine::new(
            self.engine_config(site),
            RecoveredState {
                // Each run of a site numbers its requests to other sites
                // above every earlier run's.
                next_remote_id: self.sites[site].generation << 32,
                ..std::mem::take(&mut started.state)
            },
        );
        for index in 0..volumes {
            engine.add_volume(
                VolumeId(index as u32 + 1),
                VolumeSpec {
                    size,
                    group: GroupId(self.group_of(index)),
                    mode: self.scenario.mode_of(index),
                },
            );
        }
        if self.multi() {
            self.tell_ownership(site, &mut engine);
            // What each other site may lack: its saved map, with what the
            // journal replayed.
            started.restore_maps(&mut engine);
        }
        let journal = started.journal;
        self.sites[site].node = Some(NodeState {
            engine,
            journal,
            legs,
            journal_device: Device::new(),
            leg_device: Device::new(),
            timer_at: None,
        });
        self.renew_lease(site);
        if !fresh && self.multi() {
            // A site whose legs were mid-resync must say so after its
            // restart (its snapshot reads are refused until it is whole).
            let exempt: Vec<u32> = self
                .resyncing
                .iter()
                .filter(|(at, _)| *at == site)
                .map(|(_, group)| *group)
                .collect();
            for group in exempt {
                if self.group_consistent(site, group) == Some(true) {
                    self.fail(Violation {
                        guarantee: "G3",
                        detail: format!(
                            "site {} crashed while its legs of group {group} were mid-resync, but after recovery its engine reports them consistent (snapshot reads would serve a partial resync)",
                            site + 1
                        ),
                    });
                    return true;
                }
            }
        }
        true
    }

    /// After a recovery: the owner's legs against what it acknowledged, the
    /// other groups' legs as whole-delta prefixes, and the site-loss check
    /// this site may be part of.
    pub(super) fn check_recovered(&mut self, site: usize) -> Result<(), Violation> {
        let volumes = self.scenario.topology.volumes as usize;
        let mut owned = Vec::new();
        let mut replicated = Vec::new();
        let mut all = Vec::new();
        for volume in 0..volumes {
            let at_owner = self.owner_of_volume(volume) == site;
            // Holds deltas a failover lost until the new owner's resync
            // replaces them: not a prefix of the group's line, but still
            // where a site-loss check may find what was promised.
            let diverged = !at_owner
                && self
                    .control
                    .diverged
                    .contains(&(site, self.group_of(volume)));
            let decoded = self.sites[site]
                .decoded_leg(volume)
                .map(|sectors| self.checker.check_decoded(volume, sectors, at_owner))
                .unwrap_or_else(|| {
                    Err(Violation {
                        guarantee: "G3",
                        detail: format!("the leg of volume {volume} is gone after recovery"),
                    })
                });
            let versions = match decoded {
                Ok(versions) => versions,
                Err(violation) if !at_owner => {
                    let group = self.group_of(volume);
                    if diverged || self.resyncing.contains(&(site, group)) {
                        // Mid-resync legs may hold anything the owner sent.
                        continue;
                    }
                    return Err(Violation {
                        guarantee: violation.guarantee,
                        detail: format!("site {}: {}", site + 1, violation.detail),
                    });
                }
                Err(violation) => return Err(violation),
            };
            let view = View {
                volume,
                first: 0,
                versions,
            };
            if self.site_loss.is_some() {
                all.push(view.clone());
            }
            if diverged {
                continue;
            }
            if at_owner {
                owned.push(view);
            } else if !self.resyncing.contains(&(site, self.group_of(volume))) {
                replicated.push(view);
            }
        }
        if !owned.is_empty() {
            self.checker.after_owner_recovery(site, owned)?;
        }
        if !replicated.is_empty() {
            self.checker.after_replica_recovery(site, replicated)?;
        }
        self.site_loss_recovered(site, &all)
    }
}
