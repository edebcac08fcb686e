//! The clients: each issues requests of the scenario's mix to a volume
//! at its site, waits for the answer, and hands what it saw to the
//! checker.

use super::*;

impl Simulation<'_> {
    pub(super) fn client_turn(&mut self, client: usize) {
        let site = client % self.sites.len();
        if self.workload_over || self.sites[site].node.is_none() || self.clients_busy[client] {
            return;
        }
        let workload = &self.scenario.workload;
        let weights = [
            workload.read,
            workload.write,
            workload.fua_write,
            workload.flush,
            workload.trim,
            workload.write_zeroes,
            workload.snapshot_read,
        ];
        let total: u64 = weights.iter().map(|w| *w as u64).sum();
        let mut pick = self.rng.below(total);
        let mut kind = 0;
        for (index, weight) in weights.iter().enumerate() {
            if pick < *weight as u64 {
                kind = index;
                break;
            }
            pick -= *weight as u64;
        }
        let volumes = self.scenario.topology.volumes as u64;
        let volume = self.rng.below(volumes) as usize;
        // The site's node forwards by the ownership it applied.
        let remote = self.control.owner_known_at(site, self.group_of(volume)) != site;
        if kind == 6 && !remote {
            // A snapshot read where the volume is owned is a plain read.
            kind = 0;
        }
        let sectors = self.scenario.topology.volume_bytes / SECTOR_BYTES;
        let mut range = None;
        if kind == 6 {
            // Snapshot reads run alongside anything: the image they show
            // is judged on its own (a whole-delta prefix).
            let count = self.rng.between(1, workload.sectors_max.min(sectors));
            range = Some((self.rng.below(sectors - count + 1), count));
        } else if kind != 3 {
            let (base, span) = match kind {
                0 => (0, sectors),
                _ => self.write_window(volume, sectors),
            };
            for _ in 0..4 {
                let count = self.rng.between(1, workload.sectors_max.min(span));
                let first = base + self.rng.below(span - count + 1);
                if !self.conflicts(volume, first, count, kind != 0) {
                    range = Some((first, count));
                    break;
                }
            }
            if range.is_none() {
                self.next_turn(client);
                return;
            }
        }
        let request = self.next_request;
        self.next_request += 1;
        let volume_id = VolumeId(volume as u32 + 1);
        let (first, count) = range.unwrap_or((0, 0));
        let offset = first * SECTOR_BYTES;
        let length = count * SECTOR_BYTES;
        let mut write_id = 0;
        let (engine_request, fua) = match kind {
            0 => {
                self.stats.reads += 1;
                self.checker.issue(
                    request,
                    site,
                    Tracked::Read {
                        volume,
                        first,
                        count,
                    },
                );
                let request = Request::Read {
                    volume: volume_id,
                    offset,
                    length,
                };
                (request, false)
            }
            1 | 2 => {
                self.stats.writes += 1;
                let fua = kind == 2;
                let id = self.checker.issue_write(
                    request,
                    site,
                    volume,
                    first,
                    count,
                    WriteKind::Data,
                    fua,
                    remote,
                );
                write_id = id;
                let data = payload(id, first, count);
                let request = Request::Write {
                    volume: volume_id,
                    offset,
                    data,
                    fua,
                };
                (request, fua)
            }
            3 => {
                self.stats.flushes += 1;
                let issued = self.checker.tick();
                self.checker
                    .issue(request, site, Tracked::Flush { volume, issued });
                (Request::Flush { volume: volume_id }, false)
            }
            4 => {
                self.checker.issue(request, site, Tracked::Trim);
                let request = Request::Trim {
                    volume: volume_id,
                    offset,
                    length,
                };
                (request, false)
            }
            5 => {
                self.stats.writes += 1;
                let fua = self.rng.chance(0.2);
                write_id = self.checker.issue_write(
                    request,
                    site,
                    volume,
                    first,
                    count,
                    WriteKind::Zero,
                    fua,
                    remote,
                );
                let request = Request::WriteZeroes {
                    volume: volume_id,
                    offset,
                    length,
                    fua,
                };
                (request, fua)
            }
            _ => {
                self.stats.snapshot_reads += 1;
                let group = self.group_of(volume);
                let consistent = self.group_consistent(site, group).unwrap_or(true);
                let issued = self.checker.tick();
                self.checker.issue(
                    request,
                    site,
                    Tracked::Snapshot {
                        volume,
                        first,
                        count,
                        consistent,
                        issued,
                    },
                );
                let request = Request::ReadSnapshot {
                    volume: volume_id,
                    offset,
                    length,
                };
                (request, false)
            }
        };
        let snapshot = kind == 6;
        if remote && !snapshot {
            self.stats.remote_requests += 1;
        }
        self.stats.requests += 1;
        self.clients_busy[client] = true;
        let write = matches!(kind, 1 | 2 | 5);
        let mode = self.scenario.mode_of(volume);
        let needs_peer = match mode {
            stretch_core::Mode::Async => false,
            stretch_core::Mode::FlushSync => fua,
            stretch_core::Mode::Sync => true,
        };
        self.requests.insert(
            request,
            ClientRequest {
                client,
                fua,
                site,
                volume,
                remote: remote && !snapshot,
                may_fail: self.control.isolated() == Some(site),
                snapshot,
                write,
                issued_at: self.now,
                slow_disk_ns_at_issue: self.sites[site].slow_disk_ns,
                lease_waits_at_issue: self.lease_waits(site, volume),
                copy_waits_at_issue: self.copy_waits(site),
                owner_local_write: write
                    && !remote
                    && !(self.multi() && needs_peer)
                    && self.control.isolated() != Some(site),
            },
        );
        self.trace.record(
            self.now,
            Some(site),
            &[1, request, kind as u64, volume as u64, first, count],
            || {
                let names = [
                    "read",
                    "write",
                    "fua-write",
                    "flush",
                    "trim",
                    "write-zeroes",
                    "snapshot-read",
                ];
                format!(
                    "client {client} request {request}: {} volume {volume} sectors {first}+{count} (write id {write_id})",
                    names[kind]
                )
            },
        );
        self.submitting = (write_id != 0).then_some(write_id);
        let now = self.site_now(site);
        let node = self.sites[site]
            .node
            .as_mut()
            .expect("checked above: the node is up");
        node.engine.submit(now, RequestId(request), engine_request);
        self.dispatch(site);
        self.submitting = None;
    }

    /// Two requests conflict if they overlap and either writes. A write
    /// whose owner may still apply it counts as running.
    /// Where writes to `volume` land now: `(first sector, sectors)`. The
    /// window's place derives from the seed, the volume and the period
    /// alone (not from the run's draws, which it leaves as they were).
    fn write_window(&self, volume: usize, sectors: u64) -> (u64, u64) {
        let workload = &self.scenario.workload;
        if workload.write_window_percent >= 100 {
            return (0, sectors);
        }
        let span = (sectors * workload.write_window_percent / 100)
            .max(workload.sectors_max)
            .min(sectors);
        let period = self.now / (workload.write_window_ms * MS);
        let mut rng = SimRng::new(self.options.seed ^ ((volume as u64) << 40) ^ period);
        (rng.below(sectors - span + 1), span)
    }

    pub(super) fn conflicts(&self, volume: usize, first: u64, count: u64, writes: bool) -> bool {
        let overlaps = |other_volume: usize, other_first: u64, other_count: u64| {
            other_volume == volume
                && first < other_first + other_count
                && other_first < first + count
        };
        let running = self.checker.in_flight().any(|tracked| {
            let (other_volume, other_first, other_count, other_writes) = match tracked {
                Tracked::Read {
                    volume,
                    first,
                    count,
                } => (*volume, *first, *count, false),
                Tracked::Write { id } => {
                    let (volume, first, count) = self.checker.write_range(*id);
                    (volume, first, count, true)
                }
                Tracked::Snapshot { .. } | Tracked::Flush { .. } | Tracked::Trim => return false,
            };
            (writes || other_writes) && overlaps(other_volume, other_first, other_count)
        });
        running
            || self.checker.unsettled().any(|id| {
                let (other_volume, other_first, other_count) = self.checker.write_range(id);
                overlaps(other_volume, other_first, other_count)
            })
    }

    pub(super) fn next_turn(&mut self, client: usize) {
        let think = self.rng.below(self.scenario.workload.think_ms_max * MS + 1);
        self.schedule(self.now + think, Event::ClientTurn(client));
    }
}
