//! Ownership leases: the holder's side ([`Holder`]) and each voter's
//! ([`Grantor`]).

use std::collections::BTreeMap;

use stretch_core::{SiteId, Timestamp};

/// Lease timing, shared by every site of a cluster. Every duration names
/// its unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long one grant lets the holder serve, on the holder's clock,
    /// counted from when it sent the request.
    pub lease_ms: u64,
    /// How often the holder asks every voter again.
    pub renew_ms: u64,
    /// Worst difference between any site's clock rate and real time, in
    /// parts per million (a quartz oscillator is within 100).
    pub drift_ppm: u64,
    /// Added to every promise and every wait: what rate drift does not
    /// cover (a process paused between reading its clock and acting).
    pub margin_ms: u64,
    /// A deliberate defect, for the simulator's proof that its checker
    /// catches it. No configuration file can set it.
    pub planted_bug: Option<ControlBug>,
}

/// Defects the simulator plants in the control logic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlBug {
    /// A holder counts its lease valid with grants from a minority of the
    /// voters (breaks G1 when a cut leaves it in the minority).
    RenewWithMinority,
    /// Voters promise exactly the lease, and a takeover waits for their
    /// remaining promise as measured on their clocks: no stretch for drift,
    /// no margin (breaks G1 when clocks drift apart).
    NoDriftMargin,
    /// Voters grant a site a lease whatever Raft index it applied: a site
    /// that still believes, from stale metadata (an old epoch), that it
    /// owns a group it lost is let write it (breaks G1 when an old owner
    /// returns or restarts after a failover).
    GrantStaleHolder,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            lease_ms: 1_500,
            renew_ms: 300,
            drift_ppm: 1_000,
            margin_ms: 100,
            planted_bug: None,
        }
    }
}

impl LeaseConfig {
    /// `duration_ns` measured on one site's clock, stretched so that it
    /// covers at least as much real time as `duration_ns` on any other
    /// site's clock: × (1 + ρ) / (1 − ρ), rounded up.
    pub fn stretch_ns(&self, duration_ns: u64) -> u64 {
        let ppm = u128::from(self.drift_ppm.min(MAX_DRIFT_PPM));
        let scaled = u128::from(duration_ns) * (1_000_000 + ppm);
        let divisor = 1_000_000 - ppm;
        let stretched = scaled.div_ceil(divisor);
        u64::try_from(stretched).unwrap_or(u64::MAX)
    }

    /// How long a voter promises, on its own clock, not to help take
    /// anything from a site it just granted a lease: the lease stretched for
    /// drift, plus the margin. The holder's lease (counted on its clock
    /// from an earlier instant, its request's sending) always ends first.
    pub fn promise_ns(&self) -> u64 {
        if self.planted_bug == Some(ControlBug::NoDriftMargin) {
            return ms(self.lease_ms);
        }
        self.stretch_ns(ms(self.lease_ms))
            .saturating_add(ms(self.margin_ms))
    }

    /// What the constants say about failover: a site cut from every voter
    /// loses its lease at most `lease_ms` after its last renewal; a
    /// takeover then waits at most this long after the last grant before
    /// the new owner may write (the voters' promise, stretched once more
    /// for the new owner's clock, plus the margin), plus one Raft commit
    /// and the time to notice.
    pub fn takeover_wait_max_ns(&self) -> u64 {
        self.stretch_ns(self.promise_ns())
            .saturating_add(ms(self.margin_ms))
    }
}

/// Drift beyond this (50 %) would make a lease meaningless; it is clamped.
const MAX_DRIFT_PPM: u64 = 500_000;

fn ms(value: u64) -> u64 {
    value.saturating_mul(1_000_000)
}

pub(crate) fn majority(voters: usize) -> usize {
    voters / 2 + 1
}

/// Holder to voter: renew my lease. `applied_index` is the newest Raft
/// log index the holder applied: a voter that fenced it at a later index
/// refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRequest {
    /// Echoed by the answer; unique per holder run.
    pub id: u64,
    pub applied_index: u64,
}

/// Voter to holder: the lease asked for by request `id` is granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub id: u64,
}

/// Voter to holder: no grant until the holder applied `need_index` (an
/// entry there took ownership away from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantRefused {
    pub id: u64,
    pub need_index: u64,
}

// ---------------------------------------------------------------------------
// Holder

/// A data site's lease: valid while a majority of the voters' grants are.
#[derive(Debug)]
pub struct Holder {
    config: LeaseConfig,
    voters: Vec<SiteId>,
    next_id: u64,
    /// Requests sent and not answered yet, with when they left. Answers
    /// older than a lease are worthless, so entries that old are dropped.
    sent: BTreeMap<u64, Timestamp>,
    /// Per voter, until when (on this clock) its newest grant is valid.
    grants: BTreeMap<SiteId, Timestamp>,
    last_renewal: Option<Timestamp>,
    /// The newest index a voter asked this holder to apply first.
    needed_index: u64,
}

impl Holder {
    /// `first_id` must be above every id an earlier run of this site used
    /// (an answer to a request of that run must not count for this one).
    pub fn new(config: LeaseConfig, voters: Vec<SiteId>, first_id: u64) -> Self {
        assert!(!voters.is_empty(), "lease invariant: a lease needs voters");
        Holder {
            config,
            voters,
            next_id: first_id,
            sent: BTreeMap::new(),
            grants: BTreeMap::new(),
            last_renewal: None,
            needed_index: 0,
        }
    }

    /// Starts a renewal: send the request to every voter. Grants count
    /// from `now`, the moment it leaves.
    pub fn renew(&mut self, now: Timestamp, applied_index: u64) -> LeaseRequest {
        let id = self.next_id;
        self.next_id += 1;
        let horizon = Timestamp(now.0.saturating_sub(ms(self.config.lease_ms)));
        self.sent.retain(|_, sent| *sent >= horizon);
        self.sent.insert(id, now);
        self.last_renewal = Some(now);
        LeaseRequest { id, applied_index }
    }

    /// When the next renewal is due.
    pub fn next_renewal(&self) -> Timestamp {
        match self.last_renewal {
            None => Timestamp(0),
            Some(at) => at.saturating_add_millis(self.config.renew_ms),
        }
    }

    /// Voter `from` granted request `grant.id`. Grants for unknown or
    /// expired requests, or from sites that are not voters, are ignored.
    pub fn granted(&mut self, from: SiteId, grant: Grant) {
        if !self.voters.contains(&from) {
            return;
        }
        let Some(sent) = self.sent.get(&grant.id).copied() else {
            return;
        };
        let until = sent.saturating_add_millis(self.config.lease_ms);
        let entry = self.grants.entry(from).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Voter `from` refused: this site must apply the Raft log up to
    /// `need_index` before it can hold a lease again from that voter.
    pub fn refused(&mut self, from: SiteId, refusal: GrantRefused) {
        if !self.voters.contains(&from) || !self.sent.contains_key(&refusal.id) {
            return;
        }
        self.needed_index = self.needed_index.max(refusal.need_index);
    }

    /// The newest index some voter wants this site to apply before it
    /// grants again (0 if none).
    pub fn needed_index(&self) -> u64 {
        self.needed_index
    }

    /// Until when (on this clock) the lease is valid: the instant at which
    /// fewer than a majority of the voters' grants still run. `None` if a
    /// majority never granted.
    pub fn valid_until(&self) -> Option<Timestamp> {
        let mut until: Vec<Timestamp> = self.grants.values().copied().collect();
        until.sort_unstable_by(|a, b| b.cmp(a));
        let needed = match self.config.planted_bug {
            Some(ControlBug::RenewWithMinority) => (self.voters.len().saturating_sub(1) / 2).max(1),
            _ => majority(self.voters.len()),
        };
        until.get(needed - 1).copied()
    }

    /// True if this site may accept writes and serve strict reads for the
    /// groups it owns at `now`. Checked on every decision that relies on
    /// it, never cached between ticks.
    pub fn is_valid(&self, now: Timestamp) -> bool {
        self.valid_until().is_some_and(|until| now < until)
    }
}

// ---------------------------------------------------------------------------
// Grantor

/// A voter's side of the leases it grants.
#[derive(Debug)]
pub struct Grantor {
    config: LeaseConfig,
    /// Until then, this voter answers as if it had granted every site a
    /// lease just before it started: its grants of an earlier run are
    /// forgotten, not expired.
    quarantine_until: Timestamp,
    holders: BTreeMap<SiteId, Granted>,
    applied_index: u64,
    /// What this voter had applied when it started: it fences every site
    /// there. The fences an earlier run set when ownership moved are not
    /// remembered, and an old owner that restarted from stale metadata
    /// would otherwise get a grant here for a group it lost.
    start_fence: u64,
}

#[derive(Debug)]
struct Granted {
    /// Grants take ownership away from this site only once it applied
    /// this index.
    fence: u64,
    /// Per applied index the holder reported, the newest promise made to
    /// a request carrying it: a takeover fenced at index `i` waits for the
    /// promises made to requests below `i`. Expired entries are dropped.
    promised: BTreeMap<u64, Timestamp>,
}

impl Grantor {
    /// A voter starting at `now` (its clock), having applied the Raft log
    /// up to `applied_index`.
    pub fn new(config: LeaseConfig, now: Timestamp, applied_index: u64) -> Self {
        Grantor {
            config,
            quarantine_until: Timestamp(now.0.saturating_add(config.promise_ns())),
            holders: BTreeMap::new(),
            applied_index,
            start_fence: applied_index,
        }
    }

    /// Answers a lease request from site `from`.
    pub fn request(
        &mut self,
        now: Timestamp,
        from: SiteId,
        request: LeaseRequest,
    ) -> Result<Grant, GrantRefused> {
        let promise = self.config.promise_ns();
        let start_fence = self.start_fence;
        let holder = self.holders.entry(from).or_insert_with(|| Granted {
            fence: start_fence,
            promised: BTreeMap::new(),
        });
        if request.applied_index < holder.fence
            && self.config.planted_bug != Some(ControlBug::GrantStaleHolder)
        {
            return Err(GrantRefused {
                id: request.id,
                need_index: holder.fence,
            });
        }
        holder.promised.retain(|_, until| *until > now);
        let until = Timestamp(now.0.saturating_add(promise));
        let entry = holder
            .promised
            .entry(request.applied_index)
            .or_insert(until);
        *entry = (*entry).max(until);
        Ok(Grant { id: request.id })
    }

    /// This voter applied the Raft log up to `index`.
    pub fn applied(&mut self, index: u64) {
        self.applied_index = self.applied_index.max(index);
    }

    /// The Raft entry at `index`, just applied here, takes ownership of
    /// something away from `site`: grants to it need `index` applied from
    /// now on.
    pub fn fence(&mut self, site: SiteId, index: u64) {
        self.applied(index);
        let start_fence = self.start_fence;
        let holder = self.holders.entry(site).or_insert_with(|| Granted {
            fence: start_fence,
            promised: BTreeMap::new(),
        });
        holder.fence = holder.fence.max(index);
    }

    /// How long, on this clock from `now`, any promise this voter made to
    /// `site` may still run (0: none runs). A site with no running promise
    /// at a majority of the voters holds no lease: its groups may be failed
    /// over. A voter in its start-up quarantine answers as if it had just
    /// granted.
    pub fn promised_remaining_ns(&self, now: Timestamp, site: SiteId) -> u64 {
        let promised = self
            .holders
            .get(&site)
            .and_then(|holder| holder.promised.values().copied().max())
            .unwrap_or(Timestamp(0));
        promised.max(self.quarantine_until).0.saturating_sub(now.0)
    }

    /// How long, on this clock from `now`, leases this voter granted to
    /// `site` without it knowing of the entry at `index` may still run;
    /// `None` until this voter applied `index` itself (until then it may
    /// still grant such leases).
    pub fn outstanding_ns(&self, now: Timestamp, site: SiteId, index: u64) -> Option<u64> {
        if self.applied_index < index {
            return None;
        }
        let promised = self
            .holders
            .get(&site)
            .and_then(|holder| {
                holder
                    .promised
                    .range(..index)
                    .map(|(_, until)| *until)
                    .max()
            })
            .unwrap_or(Timestamp(0));
        let until = promised.max(self.quarantine_until);
        Some(until.0.saturating_sub(now.0))
    }
}

#[cfg(test)]
mod tests;
