//! Carrying out what an engine asks for: journal and leg I/O on the
//! simulated devices (with their latencies and faults), map and mark
//! saves, messages to other sites, replies to clients.

use super::*;

impl Simulation<'_> {
    pub(super) fn dispatch(&mut self, site: usize) {
        loop {
            let Some(node) = &mut self.sites[site].node else {
                return;
            };
            let Some(action) = node.engine.poll_action() else {
                break;
            };
            match action {
                Action::Reply { request, result } => self.on_reply(site, request, result),
                Action::Send { peer, message } => self.send(site, peer, message),
                Action::ReadLeg {
                    io,
                    volume,
                    offset,
                    length,
                } => {
                    let latency = self.disk_latency(site);
                    let generation = self.sites[site].generation;
                    self.schedule(
                        self.now + latency,
                        Event::LegReadDone {
                            site,
                            generation,
                            io,
                            volume,
                            offset,
                            length,
                        },
                    );
                }
                Action::AppendJournal { record } => {
                    self.queue_journal(site, JournalOp::Append(record));
                }
                Action::SyncJournal { io, .. } => self.queue_journal(site, JournalOp::Sync(io)),
                Action::ReleaseJournal { upto } => {
                    self.queue_journal(site, JournalOp::Release(upto));
                }
                Action::SaveResyncMarks { io, groups } => {
                    self.queue_journal(site, JournalOp::SaveResyncMarks(io, groups));
                }
                Action::SaveFastDrain {
                    io,
                    group,
                    epoch,
                    regions,
                } => {
                    self.queue_journal(site, JournalOp::SaveFastDrain(io, group, epoch, regions));
                }
                Action::WriteLeg { io, blocks, .. } => {
                    self.queue_leg(site, LegOp::Write(io, blocks))
                }
                Action::SyncLegs { io, volumes } => self.queue_leg(site, LegOp::Sync(io, volumes)),
                Action::SaveDirtyMap { io, peer, regions } => {
                    self.queue_leg(site, LegOp::SaveMap(io, peer, regions));
                }
            }
        }
        self.arm_timer(site);
        if let Some(node) = &self.sites[site].node
            && node.engine.failure().is_some()
            && !self.sites[site].restart_pending
        {
            // Fail-stop: a node that cannot make writes durable restarts
            // and recovers from what its disk really holds.
            self.stats.node_failures += 1;
            self.crash(site, "storage failure (fail-stop)");
        }
    }

    pub(super) fn arm_timer(&mut self, site: usize) {
        let generation = self.sites[site].generation;
        let drift_ppm = self.sites[site].drift_ppm;
        let Some(node) = &mut self.sites[site].node else {
            return;
        };
        let Some(deadline) = node.engine.poll_timeout() else {
            return;
        };
        // The engine's deadline is on the site's clock.
        let at = real_time(deadline, drift_ppm).max(self.now);
        if node.timer_at.is_some_and(|armed| armed <= at) {
            return;
        }
        node.timer_at = Some(at);
        self.schedule(at, Event::Timer { site, generation });
    }

    pub(super) fn on_reply(
        &mut self,
        site: usize,
        request: RequestId,
        result: Result<Response, RequestError>,
    ) {
        let Some(tracked) = self.requests.remove(&request.0) else {
            self.fail(Violation {
                guarantee: "acks",
                detail: format!("request {request} answered twice or never issued"),
            });
            return;
        };
        debug_assert_eq!(tracked.site, site);
        if tracked.owner_local_write {
            let waited = self.now - tracked.issued_at;
            self.stats.owner_write_wait_max_ns = self.stats.owner_write_wait_max_ns.max(waited);
        }
        let ok = result.is_ok();
        if ok && tracked.write && !tracked.remote && self.multi() {
            self.check_acknowledger(site, tracked.volume);
            if self.violation.is_some() {
                return;
            }
        }
        let data = match &result {
            Ok(Response::Data(data)) => Some(data.clone()),
            _ => None,
        };
        self.trace
            .record(self.now, Some(site), &[2, request.0, ok as u64], || {
                format!(
                    "reply to request {request}: {}",
                    match &result {
                        Ok(_) => "ok".to_string(),
                        Err(error) => format!("error: {error}"),
                    }
                )
            });
        let checked = if tracked.snapshot {
            let answer = match &result {
                Ok(_) => data.as_ref().ok_or_else(|| "no data".to_string()),
                Err(error) => {
                    self.stats.snapshot_refusals += 1;
                    Err(error.to_string())
                }
            };
            self.checker.on_snapshot_reply(request.0, answer)
        } else if (tracked.remote || tracked.may_fail || self.drains_to(site, tracked.volume))
            && !tracked.write
            && matches!(result, Err(RequestError::Io(_)))
        {
            // The owner did not answer in time (or could not be reached):
            // allowed at a site that does not own the volume, and counted;
            // or the site's lease ran out while it was cut off; or the
            // site is a fast migration's target and the source did not
            // answer for a region it has not copied yet.
            self.stats.remote_failures += 1;
            self.checker.on_allowed_failure(request.0);
            Ok(())
        } else {
            if tracked.remote && !ok {
                self.stats.remote_failures += 1;
            }
            self.checker
                .on_reply(request.0, ok, data.as_ref(), tracked.fua)
        };
        if let Err(violation) = checked {
            self.fail(violation);
            return;
        }
        self.clients_busy[tracked.client] = false;
        self.next_turn(tracked.client);
        self.maybe_start_drain();
    }

    pub(super) fn queue_journal(&mut self, site: usize, op: JournalOp) {
        let node = self.sites[site]
            .node
            .as_mut()
            .expect("simulator invariant: node up");
        if node.journal_device.push(op) {
            let generation = self.sites[site].generation;
            self.start_device(site, Event::JournalOpDone { site, generation });
        }
    }

    pub(super) fn queue_leg(&mut self, site: usize, op: LegOp) {
        let node = self.sites[site]
            .node
            .as_mut()
            .expect("simulator invariant: node up");
        if node.leg_device.push(op) {
            let generation = self.sites[site].generation;
            self.start_device(site, Event::LegOpDone { site, generation });
        }
    }

    /// The device's next operation completes after one disk latency.
    pub(super) fn start_device(&mut self, site: usize, done: Event) {
        let latency = self.disk_latency(site);
        self.schedule(self.now + latency, done);
    }

    /// The journal device finished its oldest queued operation: perform it
    /// now (so a crash before this point loses it) and report the result.
    pub(super) fn finish_journal_op(&mut self, site: usize) {
        let skip_fsync = self.options.bug == Some(SimBug::SkipJournalFsync);
        let fs = self.sites[site].fs.clone();
        let now = self.site_now(site);
        let node = self.sites[site]
            .node
            .as_mut()
            .expect("simulator invariant: node up");
        // As the node's driver does: a completion carries no time, and an
        // owner whose lease ran out since its last event must see that
        // before it acknowledges what the completion releases.
        node.engine.advance_clock(now);
        let (op, more) = node.journal_device.finish();
        match op {
            JournalOp::Append(record) => {
                let position = record.position.0;
                if let Err(error) = node.journal.append(&record) {
                    node.engine.journal_failed(error.to_string());
                }
                self.trace
                    .record(self.now, Some(site), &[10, position], || {
                        format!("journal append position {position}")
                    });
            }
            JournalOp::Sync(io) => {
                let result = if skip_fsync {
                    Ok(())
                } else {
                    node.journal.sync().map_err(|error| error.to_string())
                };
                let ok = result.is_ok();
                node.engine.journal_synced(io, result);
                self.trace
                    .record(self.now, Some(site), &[11, io.0, ok as u64], || {
                        format!("journal sync io {io}: {}", if ok { "ok" } else { "FAILED" })
                    });
            }
            JournalOp::SaveResyncMarks(io, groups) => {
                let result = save_resync_marks(&fs, resync_marks_path(), &groups)
                    .map_err(|error| error.to_string());
                let ok = result.is_ok();
                node.engine.resync_marks_saved(io, result);
                self.trace
                    .record(self.now, Some(site), &[15, io.0, ok as u64], || {
                        format!(
                            "resync marks saved ({groups:?}): {}",
                            if ok { "ok" } else { "FAILED" }
                        )
                    });
            }
            JournalOp::SaveFastDrain(io, group, epoch, regions) => {
                let result =
                    append_fast_drain_log(&fs, fast_drain_log_path(), group, epoch, &regions)
                        .map_err(|error| error.to_string());
                let ok = result.is_ok();
                node.engine.fast_drain_saved(io, result);
                self.trace.record(
                    self.now,
                    Some(site),
                    &[16, io.0, group.0 as u64, regions.len() as u64, ok as u64],
                    || {
                        format!(
                            "fast drain of group {group} logged {} regions: {}",
                            regions.len(),
                            if ok { "ok" } else { "FAILED" }
                        )
                    },
                );
            }
            JournalOp::Release(upto) => {
                let ok = node.journal.release(upto).is_ok();
                self.trace
                    .record(self.now, Some(site), &[12, upto.0, ok as u64], || {
                        format!("journal release up to {upto}")
                    });
            }
        }
        if more {
            let generation = self.sites[site].generation;
            self.start_device(site, Event::JournalOpDone { site, generation });
        }
        self.dispatch(site);
    }

    pub(super) fn finish_leg_op(&mut self, site: usize) {
        let fs = self.sites[site].fs.clone();
        let now = self.site_now(site);
        let node = self.sites[site]
            .node
            .as_mut()
            .expect("simulator invariant: node up");
        node.engine.advance_clock(now);
        let (op, more) = node.leg_device.finish();
        match op {
            LegOp::Write(io, blocks) => {
                let legs = &node.legs;
                let result = apply_to_legs(&blocks, |volume| legs.get(&volume))
                    .map_err(|error| error.to_string());
                let ok = result.is_ok();
                node.engine.leg_written(io, result);
                self.trace
                    .record(self.now, Some(site), &[13, io.0, ok as u64], || {
                        format!("leg write io {io} ({} blocks)", blocks.len())
                    });
            }
            LegOp::Sync(io, volumes) => {
                let result = volumes
                    .iter()
                    .filter_map(|volume| node.legs.get(volume))
                    .try_for_each(|leg| leg.sync())
                    .map_err(|error| error.to_string());
                let ok = result.is_ok();
                node.engine.legs_synced(io, result);
                self.trace
                    .record(self.now, Some(site), &[14, io.0, ok as u64], || {
                        format!("leg sync io {io}: {}", if ok { "ok" } else { "FAILED" })
                    });
            }
            LegOp::SaveMap(io, peer, regions) => {
                let count = regions.len();
                let regions: DirtyRegions = regions.into_iter().collect();
                let result = save_dirty_map(&fs, &dirty_map_path(peer), &regions)
                    .map_err(|error| error.to_string());
                let ok = result.is_ok();
                node.engine.dirty_map_saved(io, result);
                self.trace
                    .record(self.now, Some(site), &[16, io.0, ok as u64], || {
                        format!(
                            "map of {count} regions site {peer} may lack saved: {}",
                            if ok { "ok" } else { "FAILED" }
                        )
                    });
            }
        }
        if more {
            let generation = self.sites[site].generation;
            self.start_device(site, Event::LegOpDone { site, generation });
        }
        self.dispatch(site);
    }

    /// True if `site` is the target of a running fast migration of the
    /// group of `volume` (by the authority: the drain is running now).
    pub(super) fn drains_to(&self, site: usize, volume: usize) -> bool {
        self.control
            .fast_drain(self.group_of(volume))
            .is_some_and(|drain| super::ownership::site_index(&drain.to) == site)
    }
}
