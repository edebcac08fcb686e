//! The link shaper: what a long-distance link does to each datagram that
//! crosses it (one-way delay, jitter, a bandwidth limit with a bounded
//! queue, random loss, a cut). It decides; it does not deliver. The runtime
//! holds each datagram until its delivery time; the simulator schedules it.
//! Randomness comes in through `draw`, so the simulator's seed drives it.

use crate::types::Timestamp;

/// How one direction of a link between two sites behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkProfile {
    /// One-way propagation delay.
    pub delay_ms: u64,
    /// Extra delay, uniform in `0..=jitter_ms`, drawn per datagram.
    pub jitter_ms: u64,
    /// Serialisation rate; `None` for unlimited.
    pub bandwidth_kbit: Option<u64>,
    /// Datagrams lost at random, in parts per million.
    pub loss_ppm: u32,
    /// Cut: nothing gets through.
    pub cut: bool,
}

impl LinkProfile {
    /// A perfect link: no delay, no limit, no loss.
    pub const IDEAL: LinkProfile = LinkProfile {
        delay_ms: 0,
        jitter_ms: 0,
        bandwidth_kbit: None,
        loss_ppm: 0,
        cut: false,
    };
}

/// What happens to one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Deliver { at: Timestamp },
    Drop(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Cut,
    Loss,
    /// The link's queue already holds `queue_bytes_max` bytes waiting for
    /// bandwidth (a router's tail drop).
    QueueFull,
}

/// One direction of one link.
#[derive(Debug, Clone)]
pub struct LinkShaper {
    profile: LinkProfile,
    queue_bytes_max: u64,
    /// When the link finishes serialising what it has accepted.
    busy_until: Timestamp,
}

impl LinkShaper {
    pub fn new(profile: LinkProfile, queue_bytes_max: u64) -> Self {
        LinkShaper {
            profile,
            queue_bytes_max,
            busy_until: Timestamp(0),
        }
    }

    pub fn profile(&self) -> LinkProfile {
        self.profile
    }

    /// Changes the link live; datagrams already accepted keep their fate.
    pub fn set_profile(&mut self, profile: LinkProfile) {
        self.profile = profile;
    }

    /// Decides the fate of a datagram of `bytes` sent at `now`. `draw`
    /// returns uniform random u64s.
    pub fn send(&mut self, now: Timestamp, bytes: u64, draw: &mut impl FnMut() -> u64) -> Fate {
        let profile = self.profile;
        if profile.cut {
            return Fate::Drop(DropReason::Cut);
        }
        if profile.loss_ppm > 0 && draw() % 1_000_000 < profile.loss_ppm as u64 {
            return Fate::Drop(DropReason::Loss);
        }
        let start = self.busy_until.max(now);
        let sent = match profile.bandwidth_kbit {
            Some(kbit) if kbit > 0 => {
                let queued_nanos = start.as_nanos() - now.as_nanos();
                let queued_bytes = (queued_nanos as u128 * kbit as u128 / 8_000_000) as u64;
                if queued_bytes + bytes > self.queue_bytes_max {
                    return Fate::Drop(DropReason::QueueFull);
                }
                // bytes * 8 bits / (kbit * 1000 bits/s), in nanoseconds.
                let nanos = (bytes as u128 * 8_000_000 / kbit as u128) as u64;
                Timestamp(start.as_nanos() + nanos)
            }
            _ => start,
        };
        self.busy_until = sent;
        let jitter = if profile.jitter_ms > 0 {
            draw() % (profile.jitter_ms * 1_000_000 + 1)
        } else {
            0
        };
        Fate::Deliver {
            at: Timestamp(
                sent.as_nanos()
                    .saturating_add(profile.delay_ms.saturating_mul(1_000_000))
                    .saturating_add(jitter),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> impl FnMut() -> u64 {
        || panic!("no randomness expected")
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn delay_only_shifts_delivery() {
        let mut link = LinkShaper::new(
            LinkProfile {
                delay_ms: 25,
                ..LinkProfile::IDEAL
            },
            1 << 20,
        );
        let fate = link.send(Timestamp(3 * MS), 1200, &mut never());
        assert_eq!(
            fate,
            Fate::Deliver {
                at: Timestamp(28 * MS)
            }
        );
    }

    #[test]
    fn bandwidth_serialises_back_to_back_datagrams() {
        // 1000 kbit/s: 1250 bytes take 10 ms on the wire.
        let mut link = LinkShaper::new(
            LinkProfile {
                delay_ms: 5,
                bandwidth_kbit: Some(1000),
                ..LinkProfile::IDEAL
            },
            1 << 20,
        );
        let first = link.send(Timestamp(0), 1250, &mut never());
        let second = link.send(Timestamp(0), 1250, &mut never());
        assert_eq!(
            first,
            Fate::Deliver {
                at: Timestamp(15 * MS)
            }
        );
        assert_eq!(
            second,
            Fate::Deliver {
                at: Timestamp(25 * MS)
            }
        );
        // After the queue drained, a datagram starts at once again.
        let later = link.send(Timestamp(100 * MS), 1250, &mut never());
        assert_eq!(
            later,
            Fate::Deliver {
                at: Timestamp(115 * MS)
            }
        );
    }

    #[test]
    fn a_full_queue_drops_the_tail() {
        let mut link = LinkShaper::new(
            LinkProfile {
                bandwidth_kbit: Some(8),
                ..LinkProfile::IDEAL
            },
            2000,
        );
        // 8 kbit/s is 1000 bytes/s: the first datagram fills a second.
        assert!(matches!(
            link.send(Timestamp(0), 1000, &mut never()),
            Fate::Deliver { .. }
        ));
        assert!(matches!(
            link.send(Timestamp(0), 900, &mut never()),
            Fate::Deliver { .. }
        ));
        assert_eq!(
            link.send(Timestamp(0), 200, &mut never()),
            Fate::Drop(DropReason::QueueFull)
        );
    }

    #[test]
    fn cut_drops_everything_and_heal_restores() {
        let mut link = LinkShaper::new(LinkProfile::IDEAL, 1 << 20);
        link.set_profile(LinkProfile {
            cut: true,
            ..LinkProfile::IDEAL
        });
        assert_eq!(
            link.send(Timestamp(0), 10, &mut never()),
            Fate::Drop(DropReason::Cut)
        );
        link.set_profile(LinkProfile::IDEAL);
        assert_eq!(
            link.send(Timestamp(7), 10, &mut never()),
            Fate::Deliver { at: Timestamp(7) }
        );
    }

    #[test]
    fn loss_and_jitter_follow_the_draws() {
        let mut link = LinkShaper::new(
            LinkProfile {
                delay_ms: 10,
                jitter_ms: 4,
                loss_ppm: 10_000,
                ..LinkProfile::IDEAL
            },
            1 << 20,
        );
        // A draw below 1 % of a million loses the datagram.
        let mut lossy = || 9_999u64;
        assert_eq!(
            link.send(Timestamp(0), 10, &mut lossy),
            Fate::Drop(DropReason::Loss)
        );
        // Otherwise the second draw is the jitter, at most jitter_ms.
        let mut draws = [10_000u64, u64::MAX].into_iter();
        let mut next = || draws.next().expect("two draws");
        let Fate::Deliver { at } = link.send(Timestamp(0), 10, &mut next) else {
            panic!("delivered");
        };
        assert!(
            at >= Timestamp(10 * MS) && at <= Timestamp(14 * MS),
            "{at:?}"
        );
    }
}
