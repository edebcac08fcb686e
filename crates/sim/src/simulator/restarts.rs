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
            fast_drain_log: fast_drain_log_path().to_path_buf(),
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
            Err(
                error @ (StartError::LoadMap(_)
                | StartError::ResyncMarks(_)
                | StartError::FastDrainLog(_)),
            ) => {
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
        if !fresh && let Err(violation) = self.check_recovered(site, &started.fast_drain_log) {
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
            started.restore_fast_drain_log(&mut engine);
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
            // (Not one it owns now: a fast migration made it the owner
            // while it was mid-resync, and its drain holds back every read
            // of what it lacks.)
            let exempt: Vec<u32> = self
                .resyncing
                .iter()
                .filter(|(at, group)| {
                    *at == site && self.control.owner_known_at(site, *group) != site
                })
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
    pub(super) fn check_recovered(
        &mut self,
        site: usize,
        drain_log: &DrainLog,
    ) -> Result<(), Violation> {
        let volumes = self.scenario.topology.volumes as usize;
        let mut owned = Vec::new();
        let mut replicated = Vec::new();
        let mut all = Vec::new();
        let draining = self.draining_images(site, drain_log)?;
        let mut unknown: BTreeMap<usize, Vec<std::ops::Range<u64>>> = BTreeMap::new();
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
            let drain = draining.get(&self.group_of(volume)).filter(|_| at_owner);
            let decoded = match drain {
                None => self.sites[site]
                    .decoded_leg(volume)
                    .map(|sectors| self.checker.check_decoded(volume, sectors, at_owner)),
                Some(drain) => self.sites[site].decoded_leg(volume).map(|sectors| {
                    let mut sectors = sectors.to_vec();
                    let sectors_per_region =
                        self.scenario.engine.region_blocks * (BLOCK_SIZE as u64 / SECTOR_BYTES);
                    // A fast migration's target: the regions it has not
                    // copied yet are judged as the source holds them (what
                    // the copy brings); with the source down, not judged
                    // now (the drain's end judges them), and taken as the
                    // last judged image meanwhile.
                    for region in drain.regions.iter().filter(|(v, _)| *v == volume) {
                        let first = region.1 * sectors_per_region;
                        let end = (first + sectors_per_region).min(sectors.len() as u64);
                        if first >= end {
                            continue;
                        }
                        let range = first as usize..end as usize;
                        match drain.source_views.get(&volume) {
                            Some(source) => {
                                for sector in range {
                                    sectors[sector] = Some(source.versions[sector]);
                                }
                            }
                            None => {
                                for sector in range {
                                    sectors[sector] =
                                        Some(self.checker.baseline(volume, sector as u64));
                                }
                                unknown.entry(volume).or_default().push(first..end);
                            }
                        }
                    }
                    self.checker.check_decoded(volume, &sectors, at_owner)
                }),
            };
            let decoded = decoded.unwrap_or_else(|| {
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
            self.checker.after_owner_recovery(site, owned, &unknown)?;
        }
        if !replicated.is_empty() {
            self.checker.after_replica_recovery(site, replicated)?;
        }
        self.site_loss_recovered(site, &all)
    }

    /// The groups `site` (just restarted) drains as a fast migration's
    /// target, by the authority (the site may not have applied the
    /// switchover yet; the checker takes it for the owner from the
    /// commit): the regions it still lacks (the drain's less those its log
    /// names) and, if the source is up, the source's image of the group's
    /// volumes.
    fn draining_images(
        &self,
        site: usize,
        drain_log: &DrainLog,
    ) -> Result<BTreeMap<u32, DrainImage>, Violation> {
        let mut draining = BTreeMap::new();
        let region_blocks = self.scenario.engine.region_blocks;
        let regions_per_volume = self
            .scenario
            .topology
            .volume_bytes
            .div_ceil(region_blocks * BLOCK_SIZE as u64);
        for group in 1..=self.scenario.topology.groups {
            let Some(drain) = self.control.fast_drain(group) else {
                continue;
            };
            if super::ownership::site_index(&drain.to) != site {
                continue;
            }
            let logged = drain_log
                .get(&(GroupId(group), Epoch(drain.epoch)))
                .cloned()
                .unwrap_or_default();
            let named: Vec<(u32, u64)> = match &drain.regions {
                Some(regions) => regions.clone(),
                None => (0..self.scenario.topology.volumes as usize)
                    .filter(|volume| self.group_of(*volume) == group)
                    .flat_map(|volume| {
                        (0..regions_per_volume).map(move |region| (volume as u32 + 1, region))
                    })
                    .collect(),
            };
            let regions: Vec<(usize, u64)> = named
                .into_iter()
                .filter(|(volume, region)| !logged.contains(&(VolumeId(*volume), *region)))
                .map(|(volume, region)| (volume as usize - 1, region))
                .collect();
            if regions.is_empty() {
                continue;
            }
            let source = super::ownership::site_index(&drain.from);
            let source_views = if self.sites[source].node.is_some() {
                self.image_of(source, group)?
                    .into_iter()
                    .map(|view| (view.volume, view))
                    .collect()
            } else {
                BTreeMap::new()
            };
            draining.insert(
                group,
                DrainImage {
                    regions,
                    source_views,
                },
            );
        }
        Ok(draining)
    }
}

/// A restarted target's drain: the regions it lacks (by volume index) and
/// the source's image of its group's volumes (empty if the source is down).
struct DrainImage {
    regions: Vec<(usize, u64)>,
    source_views: BTreeMap<usize, View>,
}
