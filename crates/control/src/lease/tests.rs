//! Lease rules, one at a time.

use super::*;
use crate::testing::{A, B, W, at_ms, config};

#[test]
fn a_lease_needs_a_majority_and_counts_from_the_request_leaving() {
    let mut holder = Holder::new(config(), vec![A, B, W], 1);
    let request = holder.renew(at_ms(100), 5);
    holder.granted(A, Grant { id: request.id });
    assert!(
        !holder.is_valid(at_ms(150)),
        "one grant of three is not a lease"
    );
    // W answers late; the lease still counts from 100 ms.
    holder.granted(W, Grant { id: request.id });
    assert_eq!(holder.valid_until(), Some(at_ms(1_100)));
    assert!(holder.is_valid(at_ms(1_099)));
    assert!(!holder.is_valid(at_ms(1_100)));
}

#[test]
fn grants_for_unknown_requests_or_from_non_voters_do_not_count() {
    let mut holder = Holder::new(config(), vec![A, B, W], 10);
    let request = holder.renew(at_ms(0), 0);
    holder.granted(SiteId(9), Grant { id: request.id });
    holder.granted(A, Grant { id: 3 });
    holder.granted(B, Grant { id: request.id });
    assert_eq!(holder.valid_until(), None);
}

#[test]
fn the_planted_minority_bug_counts_one_grant_as_a_lease() {
    let mut bad = config();
    bad.planted_bug = Some(ControlBug::RenewWithMinority);
    let mut holder = Holder::new(bad, vec![A, B, W], 1);
    let request = holder.renew(at_ms(0), 0);
    holder.granted(A, Grant { id: request.id });
    assert!(holder.is_valid(at_ms(10)));
}

#[test]
fn a_fenced_holder_is_refused_until_it_applied_the_fencing_entry() {
    let mut grantor = Grantor::new(config(), at_ms(0), 0);
    let grant = grantor.request(
        at_ms(5_000),
        A,
        LeaseRequest {
            id: 1,
            applied_index: 7,
        },
    );
    assert_eq!(grant, Ok(Grant { id: 1 }));
    grantor.fence(A, 9);
    let refused = grantor.request(
        at_ms(5_100),
        A,
        LeaseRequest {
            id: 2,
            applied_index: 8,
        },
    );
    assert_eq!(
        refused,
        Err(GrantRefused {
            id: 2,
            need_index: 9
        })
    );
    let grant = grantor.request(
        at_ms(5_200),
        A,
        LeaseRequest {
            id: 3,
            applied_index: 9,
        },
    );
    assert_eq!(grant, Ok(Grant { id: 3 }));
    let mut holder = Holder::new(config(), vec![A, B, W], 1);
    let request = holder.renew(at_ms(0), 8);
    holder.refused(
        W,
        GrantRefused {
            id: request.id,
            need_index: 9,
        },
    );
    assert_eq!(holder.needed_index(), 9);
}

#[test]
fn outstanding_time_counts_only_grants_made_before_the_fence() {
    let config = config();
    let mut grantor = Grantor::new(config, at_ms(0), 0);
    let promise = config.promise_ns();
    grantor
        .request(
            at_ms(10_000),
            A,
            LeaseRequest {
                id: 1,
                applied_index: 4,
            },
        )
        .expect("granted");
    assert_eq!(
        grantor.outstanding_ns(at_ms(10_100), A, 5),
        None,
        "not applied here yet: it may still grant without the fence"
    );
    grantor.fence(A, 5);
    // A keeps renewing once it knows of entry 5 (it still owns other
    // groups): those grants do not hold the takeover at 5 back.
    grantor
        .request(
            at_ms(10_500),
            A,
            LeaseRequest {
                id: 2,
                applied_index: 5,
            },
        )
        .expect("granted");
    let left = grantor
        .outstanding_ns(at_ms(10_100), A, 5)
        .expect("applied here");
    assert_eq!(left, promise - 100_000_000);
    assert_eq!(grantor.outstanding_ns(at_ms(20_000), A, 5), Some(0));
    // A site never granted anything owes nothing (past the quarantine).
    assert_eq!(grantor.outstanding_ns(at_ms(20_000), B, 5), Some(0));
}

#[test]
fn a_restarted_voter_answers_as_if_it_had_granted_everyone_just_before() {
    let config = config();
    let grantor = Grantor::new(config, at_ms(500), 3);
    let left = grantor.outstanding_ns(at_ms(600), A, 3).expect("applied");
    assert_eq!(left, config.promise_ns() - 100_000_000);
}

#[test]
fn the_promise_outlasts_the_lease_on_any_clocks_within_the_drift() {
    let config = LeaseConfig {
        drift_ppm: 200_000,
        ..config()
    };
    // The holder's 1 s on a clock 20 % slow lasts 1.25 s real; the
    // voter's promise on a clock 20 % fast must last at least that.
    let holder_real_ns = 1_000_000_000u128 * 1_000_000 / 800_000;
    let promise_real_ns = u128::from(config.promise_ns()) * 1_000_000 / 1_200_000;
    assert!(promise_real_ns >= holder_real_ns);
    assert_eq!(config.stretch_ns(0), 0);
    assert_eq!(
        LeaseConfig {
            drift_ppm: 0,
            ..config
        }
        .stretch_ns(7),
        7
    );
}

#[test]
fn old_requests_are_forgotten_so_their_answers_grant_nothing() {
    let mut holder = Holder::new(config(), vec![A, B, W], 1);
    let old = holder.renew(at_ms(0), 0);
    let _new = holder.renew(at_ms(5_000), 0);
    holder.granted(A, Grant { id: old.id });
    holder.granted(B, Grant { id: old.id });
    assert_eq!(holder.valid_until(), None);
    assert_eq!(holder.next_renewal(), at_ms(5_200));
}

#[test]
fn a_voter_tells_how_long_its_promises_to_a_site_still_run() {
    let config = config();
    let mut grantor = Grantor::new(config, at_ms(0), 0);
    // Quarantined after its start: it may have granted before.
    assert_eq!(
        grantor.promised_remaining_ns(at_ms(0), A),
        config.promise_ns()
    );
    let after_quarantine = Timestamp(config.promise_ns());
    assert_eq!(grantor.promised_remaining_ns(after_quarantine, A), 0);
    let asked = at_ms(5_000);
    let request = LeaseRequest {
        id: 1,
        applied_index: 0,
    };
    assert!(grantor.request(asked, A, request).is_ok());
    assert_eq!(
        grantor.promised_remaining_ns(at_ms(5_100), A),
        config.promise_ns() - 100_000_000
    );
    assert_eq!(grantor.promised_remaining_ns(at_ms(5_100), B), 0);
    let expired = Timestamp(asked.0 + config.promise_ns());
    assert_eq!(grantor.promised_remaining_ns(expired, A), 0);
}

#[test]
fn a_restarted_voter_fences_every_site_at_what_it_had_applied() {
    // The voter fenced A at 9 in an earlier run and forgot it; restarted
    // having applied 12, it refuses A until A applied 12 too.
    let mut grantor = Grantor::new(config(), at_ms(0), 12);
    let stale = LeaseRequest {
        id: 1,
        applied_index: 8,
    };
    assert_eq!(
        grantor.request(at_ms(10), A, stale),
        Err(GrantRefused {
            id: 1,
            need_index: 12
        })
    );
    let current = LeaseRequest {
        id: 2,
        applied_index: 12,
    };
    assert_eq!(grantor.request(at_ms(20), A, current), Ok(Grant { id: 2 }));
    // A later fence still raises it.
    grantor.fence(B, 15);
    let behind = LeaseRequest {
        id: 3,
        applied_index: 14,
    };
    assert!(grantor.request(at_ms(30), B, behind).is_err());
}
