//! How many delta bytes an owner keeps in flight to one site for one group:
//! twice what the site acknowledged per round trip lately, between
//! `ship_window_bytes_min` and `ship_window_bytes_max`.
//!
//! A fixed window as large as a fast link needs pours a slow or stalled
//! link's backlog into the link's send buffers one delta at a time, where
//! nothing merges: a block rewritten in every delta crosses the link once
//! per delta. Sized from the delivery rate (bytes acknowledged over the
//! time they took, the highest sample of the last `FILTER_NS`) times the
//! shortest round trip seen, the window keeps only what the link carries
//! in a round trip in flight, and the rest waits in the backlog, where
//! consecutive deltas leave merged. Twice that lets the window double each
//! round trip while the link has room, so a burst after an idle spell
//! reaches a fast link's rate in a few round trips. A stalled link (cut,
//! not yet noticed) acknowledges nothing, so the window stops growing at
//! what was in flight.
//!
//! Pure bookkeeping: time comes in as `now`, like everything in the core.

use std::collections::VecDeque;

use crate::types::{DeltaSeq, Timestamp};

/// Samples older than this no longer count (nanoseconds): after an idle
/// spell, or when the link got slower, the window follows within 10 s.
const FILTER_NS: u64 = 10_000_000_000;
/// Shipments remembered while unacknowledged; past it the oldest is
/// dropped (its acknowledgement then gives no sample). The window bounds
/// what is in flight anyway; this bounds the list when deltas are tiny.
const SHIPMENTS_MAX: usize = 4096;
/// The window is this many times the bytes acknowledged per round trip.
const GAIN: u64 = 2;

/// One site's window for one group's deltas.
#[derive(Debug, Default)]
pub(super) struct ShipWindow {
    /// Shipments not yet acknowledged, oldest first.
    in_flight: VecDeque<Shipment>,
    /// Delta bytes the site acknowledged since this window began.
    delivered: u64,
    /// Highest delivery rate of the recent samples, bytes per second.
    rate: Windowed,
    /// Shortest round trip of the recent samples, nanoseconds.
    round_trip: Windowed,
}

#[derive(Debug)]
struct Shipment {
    /// The last delta it carried.
    seq: DeltaSeq,
    /// The deltas' own bytes (what the window counts).
    bytes: u64,
    sent_at: Timestamp,
    /// `delivered` when it was sent.
    delivered_before: u64,
}

impl ShipWindow {
    /// The bytes the owner may keep in flight: `min` until a round trip was
    /// measured, then twice the delivery rate times the round trip, within
    /// `min..=max`.
    pub(super) fn bytes(&self, now: Timestamp, min: u64, max: u64) -> u64 {
        let (Some(rate), Some(round_trip)) = (self.rate.max(now), self.round_trip.min(now)) else {
            return min.min(max);
        };
        let per_round_trip = u128::from(rate) * u128::from(round_trip) / 1_000_000_000;
        let window =
            u64::try_from(per_round_trip.saturating_mul(u128::from(GAIN))).unwrap_or(u64::MAX);
        window.clamp(min.min(max), max)
    }

    /// Deltas up to `seq` (`bytes` of them) left for the site now.
    pub(super) fn shipped(&mut self, seq: DeltaSeq, bytes: u64, now: Timestamp) {
        if self.in_flight.len() == SHIPMENTS_MAX {
            self.in_flight.pop_front();
        }
        self.in_flight.push_back(Shipment {
            seq,
            bytes,
            sent_at: now,
            delivered_before: self.delivered,
        });
    }

    /// The site holds every delta up to `seq` in its journal: the
    /// shipments that carried them give a sample (the newest of them).
    pub(super) fn acknowledged(&mut self, seq: DeltaSeq, now: Timestamp) {
        let mut newest = None;
        while self
            .in_flight
            .front()
            .is_some_and(|shipment| shipment.seq <= seq)
        {
            let shipment = self.in_flight.pop_front().expect("front checked above");
            self.delivered += shipment.bytes;
            newest = Some(shipment);
        }
        let Some(shipment) = newest else {
            return;
        };
        // A clock never runs backwards here, but a sample of zero time says
        // nothing of the rate: count it as taking a nanosecond.
        let took = now.0.saturating_sub(shipment.sent_at.0).max(1);
        let bytes = self.delivered - shipment.delivered_before;
        let rate = u128::from(bytes) * 1_000_000_000 / u128::from(took);
        self.rate
            .add(u64::try_from(rate).unwrap_or(u64::MAX), now, Keep::Highest);
        self.round_trip.add(took, now, Keep::Lowest);
    }

    /// What was in flight will not be acknowledged (the site resumed from
    /// what it holds, or resyncs): its shipments give no samples. The
    /// measured rate and round trip stay: the link is the same.
    pub(super) fn forget_in_flight(&mut self) {
        self.in_flight.clear();
    }
}

#[derive(Debug, Clone, Copy)]
enum Keep {
    Highest,
    Lowest,
}

/// The highest (or lowest) sample of the last `FILTER_NS`, give or take:
/// samples go into the current period's slot, and the previous period's
/// slot still counts, so a sample counts for one to two periods of
/// `FILTER_NS / 2`.
#[derive(Debug, Default)]
struct Windowed {
    current: Option<u64>,
    previous: Option<u64>,
    /// When the current period began.
    started: Timestamp,
}

impl Windowed {
    const PERIOD_NS: u64 = FILTER_NS / 2;

    fn add(&mut self, sample: u64, now: Timestamp, keep: Keep) {
        self.age(now);
        self.current = Some(match (self.current, keep) {
            (None, _) => sample,
            (Some(held), Keep::Highest) => held.max(sample),
            (Some(held), Keep::Lowest) => held.min(sample),
        });
    }

    fn max(&self, now: Timestamp) -> Option<u64> {
        let (current, previous) = self.live(now);
        current.max(previous)
    }

    fn min(&self, now: Timestamp) -> Option<u64> {
        match self.live(now) {
            (Some(current), Some(previous)) => Some(current.min(previous)),
            (current, previous) => current.or(previous),
        }
    }

    /// The slots that still count at `now`, without moving them.
    fn live(&self, now: Timestamp) -> (Option<u64>, Option<u64>) {
        let elapsed = now.0.saturating_sub(self.started.0);
        if elapsed < Self::PERIOD_NS {
            (self.current, self.previous)
        } else if elapsed < 2 * Self::PERIOD_NS {
            (None, self.current)
        } else {
            (None, None)
        }
    }

    fn age(&mut self, now: Timestamp) {
        let (current, previous) = self.live(now);
        if now.0.saturating_sub(self.started.0) >= Self::PERIOD_NS {
            self.started = now;
        }
        self.current = current;
        self.previous = previous;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ms(millis: u64) -> Timestamp {
        Timestamp::from_millis(millis)
    }

    #[test]
    fn the_window_is_the_floor_until_a_round_trip_was_measured() {
        let mut window = ShipWindow::default();
        assert_eq!(window.bytes(ms(0), MIB, 32 * MIB), MIB);
        window.shipped(DeltaSeq(1), 4 * MIB, ms(0));
        assert_eq!(window.bytes(ms(40), MIB, 32 * MIB), MIB);
        // An acknowledgement of nothing shipped gives no sample.
        window.acknowledged(DeltaSeq(0), ms(40));
        assert_eq!(window.bytes(ms(40), MIB, 32 * MIB), MIB);
        // A floor above the cap is the cap.
        assert_eq!(window.bytes(ms(40), 64 * MIB, 32 * MIB), 32 * MIB);
    }

    #[test]
    fn the_window_is_twice_what_the_site_acknowledged_per_round_trip() {
        let mut window = ShipWindow::default();
        // 4 MiB acknowledged 50 ms after it left: 80 MiB/s, 4 MiB per
        // round trip, a window of 8 MiB.
        window.shipped(DeltaSeq(3), 4 * MIB, ms(0));
        window.acknowledged(DeltaSeq(3), ms(50));
        assert_eq!(window.bytes(ms(50), MIB, 32 * MIB), 8 * MIB);
        // Within its bounds.
        assert_eq!(window.bytes(ms(50), MIB, 6 * MIB), 6 * MIB);
        assert_eq!(window.bytes(ms(50), 12 * MIB, 32 * MIB), 12 * MIB);
    }

    #[test]
    fn a_sample_counts_what_was_acknowledged_since_its_shipment_left() {
        let mut window = ShipWindow::default();
        window.shipped(DeltaSeq(1), MIB, ms(0));
        window.shipped(DeltaSeq(2), MIB, ms(10));
        window.shipped(DeltaSeq(3), 2 * MIB, ms(20));
        // Acknowledged together at 60 ms: the newest shipment's sample is
        // the 4 MiB delivered since before it left, over 40 ms (100 MiB/s),
        // and the round trip is its 40 ms: 4 MiB per round trip.
        window.acknowledged(DeltaSeq(3), ms(60));
        assert_eq!(window.bytes(ms(60), MIB, 64 * MIB), 8 * MIB);
        // The next one counts only what was delivered after it left.
        window.shipped(DeltaSeq(4), MIB, ms(60));
        window.acknowledged(DeltaSeq(4), ms(160));
        // 1 MiB in 100 ms: 10 MiB/s, lower; the highest rate and the
        // shortest round trip stay.
        assert_eq!(window.bytes(ms(160), MIB, 64 * MIB), 8 * MIB);
    }

    #[test]
    fn an_acknowledgement_in_part_pops_only_what_it_covers() {
        let mut window = ShipWindow::default();
        window.shipped(DeltaSeq(2), 2 * MIB, ms(0));
        window.shipped(DeltaSeq(5), 6 * MIB, ms(0));
        window.acknowledged(DeltaSeq(4), ms(100));
        // Only the first: 2 MiB over 100 ms, 100 ms round trip.
        assert_eq!(window.bytes(ms(100), MIB, 64 * MIB), 4 * MIB);
        window.acknowledged(DeltaSeq(5), ms(100));
        // Then the second: 8 MiB delivered since it left, over 100 ms.
        assert_eq!(window.bytes(ms(100), MIB, 64 * MIB), 16 * MIB);
    }

    #[test]
    fn samples_age_out_and_the_window_falls_back_to_the_floor() {
        let mut window = ShipWindow::default();
        window.shipped(DeltaSeq(1), 8 * MIB, ms(0));
        window.acknowledged(DeltaSeq(1), ms(50));
        assert_eq!(window.bytes(ms(50), MIB, 64 * MIB), 16 * MIB);
        // Still counted one period later, gone after two.
        assert_eq!(window.bytes(ms(5_049), MIB, 64 * MIB), 16 * MIB);
        assert_eq!(window.bytes(ms(9_999), MIB, 64 * MIB), 16 * MIB);
        assert_eq!(window.bytes(ms(10_000), MIB, 64 * MIB), MIB);
        assert_eq!(window.bytes(ms(10_001), MIB, 64 * MIB), MIB);
        // A newer, slower sample replaces it once the old one aged out:
        // 1 MiB over 100 ms, but the shortest round trip is still... gone
        // too, so the new 100 ms counts.
        window.shipped(DeltaSeq(2), MIB, ms(10_001));
        window.acknowledged(DeltaSeq(2), ms(10_101));
        assert_eq!(window.bytes(ms(10_101), 0, 64 * MIB), 2 * MIB);
    }

    #[test]
    fn a_period_after_a_newer_sample_only_it_counts() {
        let mut window = ShipWindow::default();
        // 8 MiB in 50 ms, then (in the next period) 1 MiB in 100 ms.
        window.shipped(DeltaSeq(1), 8 * MIB, ms(0));
        window.acknowledged(DeltaSeq(1), ms(50));
        window.shipped(DeltaSeq(2), MIB, ms(6_000));
        window.acknowledged(DeltaSeq(2), ms(6_100));
        // Both count until one period after the newer one began its slot.
        assert_eq!(window.bytes(ms(11_099), 0, 64 * MIB), 16 * MIB);
        assert_eq!(window.bytes(ms(11_100), 0, 64 * MIB), 2 * MIB);
    }

    #[test]
    fn shipments_forgotten_are_not_counted_when_their_deltas_come_again() {
        let mut window = ShipWindow::default();
        window.shipped(DeltaSeq(1), 4 * MIB, ms(0));
        // The site resumed from nothing: delta 1 leaves again.
        window.forget_in_flight();
        window.shipped(DeltaSeq(1), 4 * MIB, ms(1_000));
        window.acknowledged(DeltaSeq(1), ms(1_050));
        // 4 MiB per 50 ms round trip, not 8.
        assert_eq!(window.bytes(ms(1_050), MIB, 64 * MIB), 8 * MIB);
    }

    #[test]
    fn a_stalled_link_freezes_the_window_and_forgetting_drops_the_shipments() {
        let mut window = ShipWindow::default();
        window.shipped(DeltaSeq(1), 4 * MIB, ms(0));
        window.acknowledged(DeltaSeq(1), ms(50));
        window.shipped(DeltaSeq(2), 4 * MIB, ms(60));
        // Nothing comes back: the window stays what the last sample made it.
        assert_eq!(window.bytes(ms(2_000), MIB, 64 * MIB), 8 * MIB);
        // The site resumed from what it holds: the shipment is gone, and
        // its acknowledgement (if one came) gives no sample.
        window.forget_in_flight();
        window.acknowledged(DeltaSeq(2), ms(2_100));
        assert_eq!(window.bytes(ms(2_100), MIB, 64 * MIB), 8 * MIB);
    }

    #[test]
    fn the_shipment_list_is_bounded() {
        let mut window = ShipWindow::default();
        for seq in 1..=(SHIPMENTS_MAX as u64 + 10) {
            window.shipped(DeltaSeq(seq), 4096, ms(seq));
        }
        assert_eq!(window.in_flight.len(), SHIPMENTS_MAX);
        assert_eq!(window.in_flight[0].seq, DeltaSeq(11));
    }
}
