//! What the voters' answers about a site's leases decide: whether the site
//! holds no lease any more (a failover may start), and whether a takeover
//! heard from enough voters to know how long to wait. The node and the
//! simulator gather the answers their own way and decide with these.

use serde::{Deserialize, Serialize};
use stretch_core::{SiteId, Timestamp};

use crate::lease::{Grantor, majority};

/// What one voter says about a site's leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseState {
    /// How long any promise this voter made to the site may still run, in
    /// nanoseconds of its clock (0: none runs).
    pub promised_remaining_ns: u64,
    /// For a takeover fenced at the asked index: how long grants made to
    /// the site without knowing that entry may still run; `None` until the
    /// voter applied it.
    pub outstanding_ns: Option<u64>,
}

impl Grantor {
    /// This voter's answer at `now` about `site`'s leases, for a takeover
    /// fenced at `index` (0 when none is asked about).
    pub fn lease_state(&self, now: Timestamp, site: SiteId, index: u64) -> LeaseState {
        LeaseState {
            promised_remaining_ns: self.promised_remaining_ns(now, site),
            outstanding_ns: self.outstanding_ns(now, site, index),
        }
    }
}

/// Whether the answers of some of `voters` voters decide that the site
/// asked about holds no lease: `Some(true)` when a majority say no promise
/// to it runs, `Some(false)` when a majority say one does, `None` while
/// undecided.
pub fn holds_no_lease(voters: usize, answers: &[(SiteId, LeaseState)]) -> Option<bool> {
    let free = answers
        .iter()
        .filter(|(_, state)| state.promised_remaining_ns == 0)
        .count();
    if free >= majority(voters) {
        return Some(true);
    }
    (answers.len() - free >= majority(voters)).then_some(false)
}

/// Whether a majority of `voters` voters applied the fencing entry and said
/// how long their older grants may run: enough for a takeover's wait.
pub fn takeover_heard_enough(voters: usize, answers: &[(SiteId, LeaseState)]) -> bool {
    answers
        .iter()
        .filter(|(_, state)| state.outstanding_ns.is_some())
        .count()
        >= majority(voters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{A, B, W};

    fn state(promised_remaining_ns: u64, outstanding_ns: Option<u64>) -> LeaseState {
        LeaseState {
            promised_remaining_ns,
            outstanding_ns,
        }
    }

    #[test]
    fn a_majority_decides_either_way_and_a_split_waits() {
        assert_eq!(holds_no_lease(3, &[(A, state(0, None))]), None);
        assert_eq!(
            holds_no_lease(3, &[(A, state(0, None)), (W, state(0, None))]),
            Some(true)
        );
        assert_eq!(
            holds_no_lease(3, &[(A, state(5, None)), (W, state(7, None))]),
            Some(false)
        );
        assert_eq!(
            holds_no_lease(3, &[(A, state(0, None)), (W, state(7, None))]),
            None
        );
    }

    #[test]
    fn a_takeover_needs_a_majority_that_applied_the_entry() {
        let one = [(A, state(0, Some(3))), (W, state(0, None))];
        assert!(!takeover_heard_enough(3, &one));
        let two = [(A, state(0, Some(3))), (B, state(9, Some(0)))];
        assert!(takeover_heard_enough(3, &two));
    }
}
