//! The network between sites: links with per-direction delays, cuts
//! (both ways or one), resets, blips, connections dialled and detected
//! dead, and messages delivered in order per lane.

use super::*;

impl Simulation<'_> {
    pub(super) fn start_network(&mut self) {
        let network = self.scenario.network.clone();
        for link in 0..self.net.links.len() {
            for direction in 0..2 {
                let low = self.rng.between(network.delay_ms_min, network.delay_ms_max);
                let high = self.rng.between(low, network.delay_ms_max);
                let far = self.net.links[link].hi == self.sites.len() - 1;
                let extra = if far { network.far_site_delay_ms } else { 0 };
                self.net.links[link].delay_ns[direction] =
                    ((low + extra) * MS, (high + extra) * MS);
            }
            let at = self.rng.below(MS);
            self.net.links[link].dial_pending = true;
            self.schedule(at, Event::Dial(link));
        }
        self.schedule_poisson(network.cut_per_second, Event::Cut);
        self.schedule_poisson(network.reset_per_second, Event::Reset);
        self.schedule_poisson(network.blip_per_second, Event::Blip);
        self.schedule_poisson(self.scenario.faults.site_loss_per_second, Event::SiteLoss);
        self.schedule_poisson(self.scenario.faults.failover_per_second, Event::Failover);
        self.schedule_migration_start();
        self.start_leases();
    }

    pub(super) fn send(&mut self, from: usize, peer: SiteId, message: SiteMessage) {
        let to = peer.0 as usize - 1;
        assert!(
            to < self.sites.len() && to != from,
            "simulator invariant: site {} sent to unknown peer {peer}",
            from + 1
        );
        let mut write = None;
        if let SiteMessage::Forward { request, .. } = &message
            && matches!(request, Request::Write { .. } | Request::WriteZeroes { .. })
        {
            // During its submission, or later: held for a lease, then sent
            // to the site that took the group over. Writes in flight never
            // overlap, so the range names the write.
            write = self.submitting.take().or_else(|| {
                let (volume, offset, length) = match request {
                    Request::Write {
                        volume,
                        offset,
                        data,
                        ..
                    } => (*volume, *offset, data.len() as u64),
                    Request::WriteZeroes {
                        volume,
                        offset,
                        length,
                        ..
                    } => (*volume, *offset, *length),
                    _ => unreachable!("matched above"),
                };
                let range = (
                    volume.0 as usize - 1,
                    offset / SECTOR_BYTES,
                    length / SECTOR_BYTES,
                );
                let from_client = self
                    .checker
                    .in_flight_write(from, range.0, range.1, range.2);
                if let Some(id) = from_client {
                    self.checker.forwarded_from_now(id);
                    return Some(id);
                }
                // A write another site forwarded here, held by a hand-over
                // and sent on to the group's new owner.
                self.owner_pending
                    .iter()
                    .filter(|((owner, _, _), _)| *owner == from)
                    .flat_map(|(_, writes)| writes.iter().flatten())
                    .copied()
                    .find(|id| self.checker.write_range(*id) == range)
            });
            assert!(
                write.is_some(),
                "simulator invariant: a forwarded write is one a client of the site has in flight (site {}, {message:?})",
                from + 1
            );
        }
        if let SiteMessage::ForwardReply { id, result } = &message {
            let answered = self
                .owner_pending
                .get_mut(&(from, to, *id))
                .and_then(VecDeque::pop_front);
            if let Some(Some(write)) = answered {
                // A relay of the new owner's answer (the write was held by
                // a hand-over and sent on) acknowledges nothing itself.
                if result.is_ok() && !self.checker.acknowledged(write) {
                    let (volume, _, _) = self.checker.write_range(write);
                    self.check_acknowledger(from, volume);
                }
                // A relay that stopped waiting for the new owner's answer
                // fails the write, but the new owner may still apply it:
                // the write runs until that owner answers it (or can no
                // longer apply it).
                let still_running = result.is_err() && self.relayed_by(from, write);
                if !still_running {
                    self.checker.forward_answered(write, result.is_ok());
                }
            }
        }
        let outbox = self.net.outboxes.entry((from, to)).or_default();
        let idle = outbox.is_empty();
        outbox.push_back(Queued { message, write });
        if idle {
            let latency = self.rng.below(self.scenario.network.outbox_ms_max * MS + 1);
            let generation = self.sites[from].generation;
            self.schedule(
                self.now + latency,
                Event::Pump {
                    from,
                    to,
                    generation,
                },
            );
        }
    }

    /// The sender's queue empties onto the connection current now.
    pub(super) fn pump(&mut self, from: usize, to: usize) {
        let queued = std::mem::take(self.net.outboxes.entry((from, to)).or_default());
        let link = self.net.link_index(from, to);
        let direction = direction(from, to);
        for Queued { message, write } in queued {
            self.stats.messages_sent += 1;
            let code = message_code(&message);
            let state = &self.net.links[link];
            let conn = state.conn.filter(|_| !state.broken[direction]);
            let Some(conn) = conn else {
                self.trace.record(
                    self.now,
                    Some(from),
                    &[30, to as u64, code[0], code[1], code[2]],
                    || {
                        format!(
                            "to site {}: LOST (no connection) {}",
                            to + 1,
                            describe_message(&message)
                        )
                    },
                );
                self.lose(write);
                continue;
            };
            let id = self.net.next_packet;
            self.net.next_packet += 1;
            let stalled = state.cut[direction];
            let at = if stalled {
                0
            } else {
                let (low, high) = state.delay_ns[direction];
                let at = self.now + self.rng.between(low, high);
                self.net
                    .ordered_arrival(conn, direction, message.lane(), at)
            };
            let delay = at.saturating_sub(self.now);
            self.trace.record(
                self.now,
                Some(from),
                &[31, to as u64, conn, id, at, code[0], code[1], code[2]],
                || {
                    let when = if stalled {
                        "stalled by a cut".to_string()
                    } else {
                        format!("arrives in {:.3} ms", delay as f64 / 1e6)
                    };
                    format!(
                        "to site {} on connection {conn}: {} ({when})",
                        to + 1,
                        describe_message(&message)
                    )
                },
            );
            self.net.packets.insert(
                id,
                Packet {
                    from,
                    to,
                    conn,
                    message,
                    write,
                    at,
                },
            );
            if stalled {
                self.net.links[link].held[direction].push(id);
            } else {
                self.schedule(at, Event::Deliver { packet: id, at });
            }
        }
    }

    pub(super) fn lose(&mut self, write: Option<u32>) {
        self.stats.messages_lost += 1;
        if let Some(write) = write {
            self.checker.forward_settled(write);
        }
    }

    pub(super) fn deliver(&mut self, id: u64, at: u64) {
        if self
            .net
            .packets
            .get(&id)
            .is_none_or(|packet| packet.at != at)
        {
            // Held by a cut meanwhile, or lost with its connection.
            return;
        }
        let Some(packet) = self.net.packets.remove(&id) else {
            return;
        };
        let Packet {
            from,
            to,
            conn,
            message,
            write,
            ..
        } = packet;
        let link = &self.net.links[self.net.link_index(from, to)];
        let alive = link.conn == Some(conn)
            && !link.broken[direction(from, to)]
            && self.sites[to].node.is_some();
        if !alive {
            self.trace.record(self.now, Some(to), &[32, id], || {
                format!(
                    "from site {}: LOST on dead connection {conn}: {}",
                    from + 1,
                    describe_message(&message)
                )
            });
            self.lose(write);
            return;
        }
        self.trace.record(self.now, Some(to), &[33, id], || {
            format!("from site {}: {}", from + 1, describe_message(&message))
        });
        if let SiteMessage::Forward { id, .. } = &message {
            self.owner_pending
                .entry((to, from, *id))
                .or_default()
                .push_back(write);
        }
        let now = self.site_now(to);
        let node = self.sites[to]
            .node
            .as_mut()
            .expect("checked above: the receiver is up");
        node.engine.receive(now, SiteId(from as u32 + 1), message);
        self.dispatch(to);
    }

    /// A direction of the current connection stalls: what is on the wire
    /// waits, in the order it was sent.
    pub(super) fn stall(&mut self, link: usize, direction: usize) {
        let Some(conn) = self.net.links[link].conn else {
            return;
        };
        let (lo, hi) = (self.net.links[link].lo, self.net.links[link].hi);
        let from = if direction == 0 { lo } else { hi };
        let mut stuck: Vec<(u64, u64)> = self
            .net
            .packets
            .iter()
            .filter(|(_, packet)| packet.conn == conn && packet.from == from && packet.at != 0)
            .map(|(id, packet)| (packet.at, *id))
            .collect();
        stuck.sort_unstable();
        for (_, id) in &stuck {
            if let Some(packet) = self.net.packets.get_mut(id) {
                packet.at = 0;
            }
        }
        let held = &mut self.net.links[link].held[direction];
        let mut all: Vec<u64> = stuck.into_iter().map(|(_, id)| id).collect();
        all.append(held);
        *held = all;
        self.net.forget_lanes(conn, Some(direction));
    }

    /// A stalled direction flows again: the held messages arrive in order.
    pub(super) fn release(&mut self, link: usize, direction: usize) {
        let held = std::mem::take(&mut self.net.links[link].held[direction]);
        let Some(conn) = self.net.links[link].conn else {
            for id in held {
                if let Some(packet) = self.net.packets.remove(&id) {
                    self.lose(packet.write);
                }
            }
            return;
        };
        let (low, high) = self.net.links[link].delay_ns[direction];
        for id in held {
            let Some(lane) = self
                .net
                .packets
                .get(&id)
                .map(|packet| packet.message.lane())
            else {
                continue;
            };
            let at = self.now + self.rng.between(low, high);
            let at = self.net.ordered_arrival(conn, direction, lane, at);
            if let Some(packet) = self.net.packets.get_mut(&id) {
                packet.at = at;
            }
            self.schedule(at, Event::Deliver { packet: id, at });
        }
    }

    /// Every message still on connection `conn` (held or in flight) is lost.
    pub(super) fn lose_connection_traffic(&mut self, link: usize, conn: u64) {
        for direction in 0..2 {
            let held = std::mem::take(&mut self.net.links[link].held[direction]);
            for id in held {
                if let Some(packet) = self.net.packets.remove(&id) {
                    self.lose(packet.write);
                }
            }
        }
        self.net.forget_lanes(conn, None);
        // Messages in flight are dropped when they arrive on a dead
        // connection (see `deliver`).
    }

    /// The connection of `link` is gone: every message on it is lost, and
    /// each end that knew it was up hears "down".
    pub(super) fn drop_connection(&mut self, link: usize, why: &str) {
        let Some(conn) = self.net.links[link].conn.take() else {
            return;
        };
        self.lose_connection_traffic(link, conn);
        self.net.links[link].broken = [false; 2];
        let (lo, hi) = (self.net.links[link].lo, self.net.links[link].hi);
        self.trace
            .record(self.now, None, &[34, lo as u64, hi as u64, conn], || {
                format!(
                    "connection {conn} between sites {} and {} drops ({why})",
                    lo + 1,
                    hi + 1
                )
            });
        for (end, site, peer) in [(0, lo, hi), (1, hi, lo)] {
            if !std::mem::replace(&mut self.net.links[link].up[end], false) {
                continue;
            }
            let now = self.site_now(site);
            if let Some(node) = &mut self.sites[site].node {
                node.engine.peer_down(now, SiteId(peer as u32 + 1));
                self.dispatch(site);
            }
        }
    }

    /// Makes a new connection (replacing the current one, if any) and tells
    /// both ends it is up.
    pub(super) fn connect(&mut self, link: usize) {
        let conn = self.net.next_conn;
        self.net.next_conn += 1;
        if let Some(old) = self.net.links[link].conn.replace(conn) {
            self.lose_connection_traffic(link, old);
        }
        self.net.links[link].broken = [false; 2];
        let (lo, hi) = (self.net.links[link].lo, self.net.links[link].hi);
        self.trace
            .record(self.now, None, &[35, lo as u64, hi as u64, conn], || {
                format!(
                    "connection {conn} between sites {} and {} is up",
                    lo + 1,
                    hi + 1
                )
            });
        for (end, site, peer) in [(0, lo, hi), (1, hi, lo)] {
            self.net.links[link].up[end] = true;
            let now = self.site_now(site);
            if let Some(node) = &mut self.sites[site].node {
                node.engine.peer_up(now, SiteId(peer as u32 + 1));
                self.dispatch(site);
            }
        }
    }

    pub(super) fn schedule_dial(&mut self, link: usize) {
        if self.net.links[link].dial_pending {
            return;
        }
        self.net.links[link].dial_pending = true;
        let delay = self
            .rng
            .between(MS / 10, self.scenario.network.redial_ms_max.max(1) * MS);
        self.schedule(self.now + delay, Event::Dial(link));
    }

    pub(super) fn dial(&mut self, link: usize) {
        self.net.links[link].dial_pending = false;
        let state = &self.net.links[link];
        let both_up = self.sites[state.lo].node.is_some() && self.sites[state.hi].node.is_some();
        // A site that is down dials again when it restarts; a cut link when
        // the cut ends.
        if !both_up || state.is_cut() || state.healthy() {
            return;
        }
        self.connect(link);
    }

    pub(super) fn pick_link(&mut self) -> usize {
        self.rng.below(self.net.links.len() as u64) as usize
    }

    pub(super) fn cut(&mut self) {
        if self.workload_over {
            return;
        }
        let network = self.scenario.network.clone();
        self.schedule_poisson(network.cut_per_second, Event::Cut);
        let link = self.pick_link();
        if self.net.links[link].is_cut() {
            return;
        }
        self.stats.link_faults += 1;
        let directions = if self.rng.chance(network.one_way_share) {
            let one = self.rng.below(2) as usize;
            [one == 0, one == 1]
        } else {
            [true, true]
        };
        let length = self.rng.between(network.cut_ms_min, network.cut_ms_max) * MS;
        for (direction, cut) in directions.into_iter().enumerate() {
            if cut {
                self.net.links[link].cut[direction] = true;
                self.stall(link, direction);
            }
        }
        let state = &self.net.links[link];
        let (lo, hi, conn) = (state.lo, state.hi, state.conn);
        self.trace.record(
            self.now,
            None,
            &[
                36,
                lo as u64,
                hi as u64,
                directions[0] as u64,
                directions[1] as u64,
                length,
            ],
            || {
                let way = match directions {
                    [true, true] => "both ways".to_string(),
                    [true, false] => format!("{} to {} only", lo + 1, hi + 1),
                    _ => format!("{} to {} only", hi + 1, lo + 1),
                };
                format!(
                    "CUT between sites {} and {} ({way}) for {} ms",
                    lo + 1,
                    hi + 1,
                    length / MS
                )
            },
        );
        if let Some(conn) = conn {
            let detect = self.rng.below(network.detect_ms_max * MS + 1);
            self.schedule(self.now + detect, Event::Detect { link, conn });
        }
        self.schedule(self.now + length, Event::CutEnd { link, directions });
    }

    pub(super) fn cut_end(&mut self, link: usize, directions: [bool; 2]) {
        let (lo, hi) = (self.net.links[link].lo, self.net.links[link].hi);
        if self.control.holds_cut(lo, hi) {
            // A failover's cut-off outlasts the link's own cut.
            return;
        }
        for (direction, healed) in directions.into_iter().enumerate() {
            if healed && self.net.links[link].cut[direction] {
                self.net.links[link].cut[direction] = false;
                self.release(link, direction);
            }
        }
        self.trace
            .record(self.now, None, &[37, lo as u64, hi as u64], || {
                format!("cut between sites {} and {} heals", lo + 1, hi + 1)
            });
        self.schedule_dial(link);
    }

    pub(super) fn reset(&mut self) {
        if self.workload_over {
            return;
        }
        self.schedule_poisson(self.scenario.network.reset_per_second, Event::Reset);
        let link = self.pick_link();
        if self.net.links[link].conn.is_none() {
            return;
        }
        self.stats.link_faults += 1;
        self.drop_connection(link, "reset");
        self.dial(link);
    }

    pub(super) fn blip(&mut self) {
        if self.workload_over {
            return;
        }
        self.schedule_poisson(self.scenario.network.blip_per_second, Event::Blip);
        let link = self.pick_link();
        let state = &self.net.links[link];
        let both_up = self.sites[state.lo].node.is_some() && self.sites[state.hi].node.is_some();
        if state.conn.is_none() || state.is_cut() || !both_up {
            return;
        }
        self.stats.link_faults += 1;
        // A new connection replaces the old before either end noticed the
        // old one dying: messages on the old one are lost, and both ends
        // hear "up" with no "down" before it.
        self.connect(link);
    }

    /// A site crashed: its queues are gone, messages to it are lost, and
    /// its peers notice after a while.
    pub(super) fn disconnect_crashed(&mut self, site: usize) {
        let queues: Vec<(usize, usize)> = self
            .net
            .outboxes
            .keys()
            .filter(|(from, _)| *from == site)
            .copied()
            .collect();
        for key in queues {
            let queued = std::mem::take(self.net.outboxes.entry(key).or_default());
            for Queued { write, .. } in queued {
                self.lose(write);
            }
        }
        // Forwards it held as an owner will never be answered now; its
        // recovery shows whether they were applied. A write it held for a
        // hand-over and already sent on to the group's new owner is still
        // live: what it sent before dying may arrive, and that owner may
        // apply it and answers for it (or its loss settles it).
        let held: Vec<(usize, usize, u64)> = self
            .owner_pending
            .keys()
            .filter(|(owner, _, _)| *owner == site)
            .copied()
            .collect();
        for key in held {
            for write in self
                .owner_pending
                .remove(&key)
                .unwrap_or_default()
                .into_iter()
                .flatten()
            {
                if !self.relayed_by(site, write) {
                    self.checker.forward_settled(write);
                }
            }
        }
        for link in self.net.links_of(site) {
            let end = self.net.links[link].end_of(site);
            self.net.links[link].up[end] = false;
            let Some(conn) = self.net.links[link].conn else {
                continue;
            };
            // Messages to the dead node are lost; those it sent before
            // dying may still arrive.
            let towards = direction(self.net.links[link].other(site), site);
            self.net.links[link].broken[towards] = true;
            let detect = self.rng.below(self.scenario.network.detect_ms_max * MS + 1);
            self.schedule(self.now + detect, Event::Detect { link, conn });
        }
    }

    /// Whether `site` sent write `write` on to another site that may still
    /// apply it: the forward is on the wire (in flight or held by a cut),
    /// or that site received it and has not answered it yet.
    fn relayed_by(&self, site: usize, write: u32) -> bool {
        let on_the_wire = self
            .net
            .packets
            .values()
            .any(|packet| packet.from == site && packet.write == Some(write));
        let pending_elsewhere = self.owner_pending.iter().any(|((owner, from, _), writes)| {
            *owner != site && *from == site && writes.contains(&Some(write))
        });
        on_the_wire || pending_elsewhere
    }

    /// The faults stop: every cut heals and every link is dialled again.
    pub(super) fn heal_everything(&mut self) {
        for link in 0..self.net.links.len() {
            self.cut_end(link, [true, true]);
        }
    }
}
