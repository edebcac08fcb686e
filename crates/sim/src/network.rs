//! The network between sites, as the engines see it through the node's
//! transport (QUIC): one connection per pair of sites, reliable and ordered
//! per lane while it lasts, and faults that end it.
//!
//! - Every message first waits in its sender's queue (the node's outbox),
//!   then goes on the connection current at that moment, if any. A message
//!   queued before a connection dropped may therefore travel on the next
//!   one, as in the node.
//! - Messages of one group lane on one connection arrive in order (one
//!   ordered stream per group); request-lane messages each take a stream of
//!   their own, so they may overtake each other, and any two lanes may
//!   interleave. Each message draws a one-way delay from its direction's
//!   range.
//! - A cut direction stalls: what is on the wire and what is sent meanwhile
//!   waits, and arrives in order when the cut heals. A cut that lasts past
//!   the moment an end notices the silence (a drawn delay) kills the
//!   connection: everything still on it is lost, both ends hear "down", and
//!   a new connection is dialled once the cut heals. So a lost message
//!   always means a lost connection.
//! - Faults: cuts (both ways or one way) for a drawn time; resets (the
//!   connection drops, both ends hear "down", a new one comes up at once);
//!   blips (a new connection replaces the old one before either end noticed
//!   the old one dying: both ends hear "up" again with no "down"); a crashed
//!   site (its peers hear "down" once they notice, "up" when it is back).

use std::collections::{BTreeMap, VecDeque};

use stretch_core::{GroupId, Lane, SiteMessage};

/// One message on the wire.
#[derive(Debug, Clone)]
pub struct Packet {
    pub from: usize,
    pub to: usize,
    pub conn: u64,
    pub message: SiteMessage,
    /// The checker's id of the write a `Forward` carries.
    pub write: Option<u32>,
    /// When it arrives (0 while held by a stalled direction).
    pub at: u64,
}

/// A message waiting in its sender's queue.
#[derive(Debug, Clone)]
pub struct Queued {
    pub message: SiteMessage,
    pub write: Option<u32>,
}

/// The link between two sites `lo < hi`; index 0 of the pairs below is the
/// direction (or end) `lo`, index 1 is `hi`.
#[derive(Debug, Clone)]
pub struct Link {
    pub lo: usize,
    pub hi: usize,
    /// The connection both ends use now, if any.
    pub conn: Option<u64>,
    /// Per direction (0: lo to hi): the current connection lost it; every
    /// message sent that way is lost until a new connection.
    pub broken: [bool; 2],
    /// Per direction: the network between the sites passes nothing; the
    /// current connection stalls that way.
    pub cut: [bool; 2],
    /// Per direction: messages of the current connection stalled by a cut,
    /// in the order they were sent.
    pub held: [Vec<u64>; 2],
    /// Per end: the engine there was told the peer is up.
    pub up: [bool; 2],
    pub dial_pending: bool,
    /// Per direction: one-way delay range, nanoseconds.
    pub delay_ns: [(u64, u64); 2],
}

impl Link {
    pub fn end_of(&self, site: usize) -> usize {
        if site == self.lo { 0 } else { 1 }
    }

    pub fn other(&self, site: usize) -> usize {
        if site == self.lo { self.hi } else { self.lo }
    }

    pub fn is_cut(&self) -> bool {
        self.cut[0] || self.cut[1]
    }

    /// Connected, and both engines know it.
    pub fn healthy(&self) -> bool {
        self.conn.is_some() && !self.broken[0] && !self.broken[1] && self.up[0] && self.up[1]
    }
}

/// The direction index of a message from `from` to `to`.
pub fn direction(from: usize, to: usize) -> usize {
    if from < to { 0 } else { 1 }
}

#[derive(Debug, Default)]
pub struct Network {
    pub links: Vec<Link>,
    /// Sender queues, by (from, to).
    pub outboxes: BTreeMap<(usize, usize), VecDeque<Queued>>,
    /// Messages on the wire, by id.
    pub packets: BTreeMap<u64, Packet>,
    pub next_packet: u64,
    pub next_conn: u64,
    /// When the last message of each ordered lane arrives, per connection
    /// and direction.
    pub lane_tail: BTreeMap<(u64, usize, Lane), u64>,
}

impl Network {
    pub fn new(sites: usize) -> Self {
        let mut links = Vec::new();
        for lo in 0..sites {
            for hi in lo + 1..sites {
                links.push(Link {
                    lo,
                    hi,
                    conn: None,
                    broken: [false; 2],
                    cut: [false; 2],
                    held: [Vec::new(), Vec::new()],
                    up: [false; 2],
                    dial_pending: false,
                    delay_ns: [(0, 0); 2],
                });
            }
        }
        Network {
            links,
            next_conn: 1,
            ..Network::default()
        }
    }

    pub fn link_index(&self, a: usize, b: usize) -> usize {
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        self.links
            .iter()
            .position(|link| link.lo == lo && link.hi == hi)
            .expect("network invariant: every pair of sites has a link")
    }

    /// The links that end at `site`.
    pub fn links_of(&self, site: usize) -> Vec<usize> {
        (0..self.links.len())
            .filter(|index| self.links[*index].lo == site || self.links[*index].hi == site)
            .collect()
    }

    /// Forgets the lane ordering of a connection in one direction, or in
    /// both (`None`).
    pub fn forget_lanes(&mut self, conn: u64, direction: Option<usize>) {
        let stale: Vec<(u64, usize, Lane)> = self
            .lane_tail
            .range((conn, 0, Lane::Group(GroupId(0)))..)
            .take_while(|(key, _)| key.0 == conn)
            .filter(|(key, _)| direction.is_none_or(|d| key.1 == d))
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            self.lane_tail.remove(&key);
        }
    }

    /// The arrival time of a message on a lane sent to arrive at `at`:
    /// never before the previous one of its ordered lane.
    pub fn ordered_arrival(&mut self, conn: u64, direction: usize, lane: Lane, at: u64) -> u64 {
        if lane == Lane::Request {
            return at;
        }
        let tail = self.lane_tail.entry((conn, direction, lane)).or_insert(0);
        *tail = (*tail).max(at);
        *tail
    }

    /// Nothing queued and nothing on the wire.
    pub fn quiet(&self) -> bool {
        self.packets.is_empty() && self.outboxes.values().all(VecDeque::is_empty)
    }
}

/// A short stable code per message kind, for the trace hash.
pub fn message_code(message: &SiteMessage) -> [u64; 3] {
    match message {
        SiteMessage::Delta(record) => [1, record.group.0 as u64, record.seq.0],
        SiteMessage::Deltas { first, record } => {
            [16, record.group.0 as u64, record.seq.0 - first.0]
        }
        SiteMessage::Journaled { group, seq } => [2, group.0 as u64, seq.0],
        SiteMessage::Applied { group, seq } => [3, group.0 as u64, seq.0],
        SiteMessage::Resume { group, have, .. } => {
            [4, group.0 as u64, have.map_or(u64::MAX, |h| h.0)]
        }
        SiteMessage::Resync {
            group,
            blocks,
            last,
            ..
        } => [5, group.0 as u64, blocks.len() as u64 * 2 + *last as u64],
        SiteMessage::ResyncAck { group, resume } => [6, group.0 as u64, *resume],
        SiteMessage::Rejoin { group } => [11, group.0 as u64, 0],
        SiteMessage::ReadRequest { id, .. } => [7, *id, 0],
        SiteMessage::ReadReply { id, result } => [8, *id, result.is_ok() as u64],
        SiteMessage::Forward { id, .. } => [9, *id, 0],
        SiteMessage::ForwardReply { id, result } => [10, *id, result.is_ok() as u64],
        SiteMessage::LeaseRequest { id, regions, .. } => [12, *id, *regions],
        SiteMessage::LeaseReply { id, lease_ms } => [13, *id, *lease_ms],
        SiteMessage::LeaseRevoke {
            id, regions, all, ..
        } => [14, *id, regions.len() as u64 * 2 + *all as u64],
        SiteMessage::LeaseRevoked { id } => [15, *id, 0],
    }
}

/// A readable summary of a message, for replays.
pub fn describe_message(message: &SiteMessage) -> String {
    match message {
        SiteMessage::Delta(record) => format!(
            "delta group {} seq {} ({} blocks)",
            record.group,
            record.seq,
            record.blocks.len()
        ),
        SiteMessage::Deltas { first, record } => format!(
            "deltas group {} seq {first} to {} merged ({} blocks)",
            record.group,
            record.seq,
            record.blocks.len()
        ),
        SiteMessage::Journaled { group, seq } => format!("journaled group {group} up to {seq}"),
        SiteMessage::Applied { group, seq } => format!("applied group {group} up to {seq}"),
        SiteMessage::Resume {
            group,
            have,
            have_epoch,
            lost_regions,
            resume,
        } => match (have, have_epoch) {
            (Some(have), Some(epoch)) => match lost_regions {
                Some(regions) => format!(
                    "resume {resume} group {group} after {have} (epoch {epoch}, {} lost regions)",
                    regions.len()
                ),
                None => format!("resume {resume} group {group} after {have} (epoch {epoch})"),
            },
            (Some(have), None) => format!("resume {resume} group {group} after {have}"),
            (None, _) => format!("resume {resume} group {group} (mid-resync)"),
        },
        SiteMessage::Resync {
            group,
            blocks,
            last,
            base,
            consistent_at,
            resume,
            ..
        } => format!(
            "resync chunk group {group} ({} blocks){} base {base} consistent at {consistent_at} (resume {resume})",
            blocks.len(),
            if *last { " last" } else { "" }
        ),
        SiteMessage::ResyncAck { group, resume } => {
            format!("resync chunk ack group {group} (resume {resume})")
        }
        SiteMessage::Rejoin { group } => format!("rejoin group {group} by resync"),
        SiteMessage::LeaseRequest {
            id,
            volume,
            first_region,
            regions,
            have,
        } => format!(
            "lease request {id} volume {volume} regions {first_region}+{regions} have {have}"
        ),
        SiteMessage::LeaseReply { id, lease_ms } => match lease_ms {
            0 => format!("lease reply {id}: refused"),
            ms => format!("lease reply {id}: {ms} ms"),
        },
        SiteMessage::LeaseRevoke {
            id,
            group,
            regions,
            all,
        } => match all {
            true => format!("lease revoke {id} group {group}: every region"),
            false => format!("lease revoke {id} group {group}: regions {regions:?}"),
        },
        SiteMessage::LeaseRevoked { id } => format!("lease revoked {id}"),
        SiteMessage::ReadRequest { id, request, have } => {
            format!("read request {id} {request:?} have {have:?}")
        }
        SiteMessage::ReadReply { id, result } => match result {
            Ok(blocks) => format!("read reply {id} ({} blocks)", blocks.len()),
            Err(error) => format!("read reply {id}: {error}"),
        },
        SiteMessage::Forward { id, request } => format!(
            "forward {id} {}",
            match request {
                stretch_core::Request::Write {
                    volume,
                    offset,
                    data,
                    fua,
                } => format!(
                    "write volume {volume} {offset}+{}{}",
                    data.len(),
                    if *fua { " fua" } else { "" }
                ),
                other => format!("{other:?}"),
            }
        ),
        SiteMessage::ForwardReply { id, result } => match result {
            Ok(_) => format!("forward reply {id}: ok"),
            Err(error) => format!("forward reply {id}: {error}"),
        },
    }
}
