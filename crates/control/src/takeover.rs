//! The new owner's side of an ownership change: when it may start writing.

use std::collections::BTreeMap;

use stretch_core::{SiteId, Timestamp};

use crate::lease::{ControlBug, LeaseConfig, majority};

/// Where a takeover stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeoverState {
    /// Waiting for a majority of voters to answer, or for the time they
    /// named to pass.
    Waiting,
    /// No lease the old owner holds can cover the group any more: the new
    /// owner may accept writes.
    Ready,
}

/// A group moving to this site by the Raft entry at `index`, away from
/// `from`. Each voter that applied the entry says how long grants it made
/// to `from` before that may still run (see
/// [`crate::Grantor::outstanding_ns`]); once a majority said so and the
/// longest of their times passed (stretched for drift, plus the margin),
/// the old owner holds no lease that lets it write the group: every
/// majority it could hold a lease from includes one of those voters, whose
/// later grants need the entry applied.
///
/// A hand-over the old owner agreed to ends sooner: once the old owner
/// itself confirms it applied the entry ([`Takeover::released`]), it will
/// not write the group again, whatever its lease.
#[derive(Debug)]
pub struct Takeover {
    config: LeaseConfig,
    voters: Vec<SiteId>,
    from: SiteId,
    index: u64,
    /// Per voter that answered: from when on (this clock) its grants no
    /// longer cover the old owner.
    safe_at: BTreeMap<SiteId, Timestamp>,
    released: bool,
}

impl Takeover {
    pub fn new(config: LeaseConfig, voters: Vec<SiteId>, from: SiteId, index: u64) -> Self {
        assert!(
            !voters.is_empty(),
            "takeover invariant: a cluster has voters"
        );
        Takeover {
            config,
            voters,
            from,
            index,
            safe_at: BTreeMap::new(),
            released: false,
        }
    }

    /// The site ownership is taken from.
    pub fn from(&self) -> SiteId {
        self.from
    }

    /// The Raft index of the entry that moved ownership.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Voter `voter` answered at `now` (this clock): its grants to the old
    /// owner may run for `remaining_ns` more on its clock.
    pub fn answered(&mut self, now: Timestamp, voter: SiteId, remaining_ns: u64) {
        if !self.voters.contains(&voter) {
            return;
        }
        let wait = match self.config.planted_bug {
            Some(ControlBug::NoDriftMargin) => remaining_ns,
            _ => self
                .config
                .stretch_ns(remaining_ns)
                .saturating_add(self.config.margin_ms.saturating_mul(1_000_000)),
        };
        let at = Timestamp(now.0.saturating_add(wait));
        let entry = self.safe_at.entry(voter).or_insert(at);
        *entry = (*entry).min(at);
    }

    /// The old owner confirmed it applied the entry: it stopped writing.
    pub fn released(&mut self) {
        self.released = true;
    }

    /// The voters still to ask (those that have not answered).
    pub fn unanswered(&self) -> Vec<SiteId> {
        self.voters
            .iter()
            .copied()
            .filter(|voter| !self.safe_at.contains_key(voter))
            .collect()
    }

    /// When (this clock) the new owner may write: the soonest time at
    /// which some majority of the voters answered and all of them are
    /// past their time; `None` until a majority answered.
    pub fn ready_at(&self) -> Option<Timestamp> {
        if self.released {
            return Some(Timestamp(0));
        }
        let mut times: Vec<Timestamp> = self.safe_at.values().copied().collect();
        times.sort_unstable();
        times.get(majority(self.voters.len()) - 1).copied()
    }

    pub fn state(&self, now: Timestamp) -> TakeoverState {
        match self.ready_at() {
            Some(at) if now >= at => TakeoverState::Ready,
            _ => TakeoverState::Waiting,
        }
    }
}

#[cfg(test)]
mod tests;
