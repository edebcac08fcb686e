//! Takeover timing: the rules, and a randomized check on drifting clocks
//! that the old owner's lease always ends before the new owner starts.

use super::*;
use crate::lease::{Grant, Grantor, Holder};
use crate::testing::{A, B, W, at_ms, config};

#[test]
fn a_takeover_waits_for_a_majority_and_the_soonest_majority_decides() {
    let config = config();
    let mut takeover = Takeover::new(config, vec![A, B, W], A, 12);
    takeover.answered(at_ms(100), B, 0);
    assert_eq!(takeover.ready_at(), None, "one voter of three");
    assert_eq!(takeover.unanswered(), vec![A, W]);
    takeover.answered(at_ms(120), W, 400_000_000);
    let w_safe = 120_000_000 + config.stretch_ns(400_000_000) + 50_000_000;
    assert_eq!(takeover.ready_at(), Some(Timestamp(w_safe)));
    assert_eq!(
        takeover.state(Timestamp(w_safe - 1)),
        TakeoverState::Waiting
    );
    assert_eq!(takeover.state(Timestamp(w_safe)), TakeoverState::Ready);
    // A (the old owner's own voter) answering later with a long time does
    // not hold back a majority already complete.
    takeover.answered(at_ms(130), A, 5_000_000_000);
    assert_eq!(takeover.ready_at(), Some(Timestamp(w_safe)));
}

#[test]
fn a_hand_over_the_old_owner_released_is_ready_at_once() {
    let mut takeover = Takeover::new(config(), vec![A, B, W], A, 3);
    assert_eq!(takeover.state(at_ms(1)), TakeoverState::Waiting);
    takeover.released();
    assert_eq!(takeover.state(at_ms(1)), TakeoverState::Ready);
}

#[test]
fn answers_from_non_voters_do_not_count() {
    let mut takeover = Takeover::new(config(), vec![A, B, W], A, 3);
    takeover.answered(at_ms(1), SiteId(7), 0);
    takeover.answered(at_ms(1), SiteId(8), 0);
    assert_eq!(takeover.ready_at(), None);
}

/// A deterministic PRNG for the randomized check (xorshift64*).
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// A site's clock: local = offset + real × (1 + drift).
#[derive(Clone, Copy)]
struct Clock {
    offset_ns: u64,
    drift_ppm: i64,
}

impl Clock {
    fn local(self, real_ns: u64) -> Timestamp {
        let skew = real_ns as i128 * self.drift_ppm as i128 / 1_000_000;
        Timestamp((self.offset_ns as i128 + real_ns as i128 + skew) as u64)
    }

    /// The first real instant at which this clock reads at least `local`.
    fn real(self, local: Timestamp) -> u64 {
        let since = local.0 as i128 - self.offset_ns as i128;
        let real = since * 1_000_000 / (1_000_000 + self.drift_ppm as i128);
        let mut real = real.max(0) as u64;
        while self.local(real) < local {
            real += 1;
        }
        real
    }
}

/// One run: a (holder, voter) at site A, b and w voters, A renewing every
/// `renew_ms` with random delays; at a random time A is cut from b and w,
/// and later an entry at index 10 takes a group from A (applied at b and
/// w only). b, the new owner, asks b and w how long their grants to A may
/// run and starts writing once its takeover is ready. Returns the real
/// times (A's lease end, b's start).
fn run(seed: u64, config: LeaseConfig) -> (u64, u64) {
    let mut draws = Draws(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let drift = config.drift_ppm as i64;
    let mut clock = || Clock {
        offset_ns: draws.between(0, 10_000) * 1_000_000,
        drift_ppm: draws.between(0, 2 * drift as u64) as i64 - drift,
    };
    let clocks = [clock(), clock(), clock()];
    let voters = vec![A, B, W];
    let mut holder = Holder::new(config, voters.clone(), 1);
    let mut grantors: Vec<Grantor> = clocks
        .iter()
        .map(|clock| Grantor::new(config, clock.local(0), 9))
        .collect();
    // Real times of the events, in ms from the start; grantors have run
    // long enough that their start-up quarantine is over.
    let start_ms = 10_000;
    let cut_ms = start_ms + draws.between(0, 3_000);
    let fence_ms = cut_ms + draws.between(0, 2_000);
    let ms_ns = 1_000_000u64;
    let mut renewal_ms = start_ms;
    let mut last_valid_local = None;
    while renewal_ms < fence_ms + 10_000 {
        let sent = renewal_ms * ms_ns;
        let request = holder.renew(clocks[0].local(sent), 9);
        for (index, voter) in voters.iter().enumerate() {
            let there = draws.between(1, 50) * ms_ns;
            let cut = index != 0 && sent + there >= cut_ms * ms_ns;
            if cut {
                continue;
            }
            let arrives = sent + there;
            if index != 0 && arrives >= fence_ms * ms_ns {
                grantors[index].fence(A, 10);
            }
            let answer = grantors[index].request(clocks[index].local(arrives), A, request);
            if let Ok(grant) = answer {
                holder.granted(*voter, Grant { id: grant.id });
            }
        }
        if let Some(until) = holder.valid_until() {
            last_valid_local =
                Some(last_valid_local.map_or(until, |old: Timestamp| old.max(until)));
        }
        renewal_ms += config.renew_ms;
    }
    for grantor in &mut grantors[1..] {
        grantor.fence(A, 10);
    }
    // b asks b and w right after the fence; each answers when asked.
    let mut takeover = Takeover::new(config, voters.clone(), A, 10);
    for index in [1usize, 2] {
        let asked = fence_ms * ms_ns + draws.between(0, 50) * ms_ns;
        let remaining = grantors[index]
            .outstanding_ns(clocks[index].local(asked), A, 10)
            .expect("the voter applied the fence");
        let heard = asked + draws.between(1, 50) * ms_ns;
        takeover.answered(clocks[1].local(heard), voters[index], remaining);
    }
    let ready = takeover.ready_at().expect("a majority answered");
    let lease_end = last_valid_local.map_or(0, |until| clocks[0].real(until));
    (lease_end, clocks[1].real(ready))
}

#[test]
fn the_old_owners_lease_always_ends_before_the_new_owner_starts() {
    for drift_ppm in [0, 1_000, 100_000, 300_000] {
        let config = LeaseConfig {
            drift_ppm,
            ..config()
        };
        for seed in 1..=300 {
            let (lease_end, start) = run(seed, config);
            assert!(
                lease_end <= start,
                "seed {seed} drift {drift_ppm} ppm: A's lease ends at {lease_end} ns real, b starts at {start} ns"
            );
        }
    }
}

#[test]
fn the_planted_bugs_let_two_owners_overlap() {
    let minority = LeaseConfig {
        planted_bug: Some(ControlBug::RenewWithMinority),
        ..config()
    };
    let overlaps = (1..=100)
        .filter(|seed| {
            let (lease_end, start) = run(*seed, minority);
            lease_end > start
        })
        .count();
    assert!(
        overlaps > 50,
        "renewing with a minority overlapped in {overlaps} of 100 runs"
    );
    let no_margin = LeaseConfig {
        drift_ppm: 300_000,
        margin_ms: 0,
        planted_bug: Some(ControlBug::NoDriftMargin),
        ..config()
    };
    let overlaps = (1..=300)
        .filter(|seed| {
            let (lease_end, start) = run(*seed, no_margin);
            lease_end > start
        })
        .count();
    assert!(
        overlaps > 0,
        "a takeover without the drift margin never overlapped"
    );
}
