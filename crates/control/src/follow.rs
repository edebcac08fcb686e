//! Ownership that follows the workload (`follow = auto` on a group): when
//! most of a group's requests come from another site for a sustained
//! period, its owner migrates it there. The owner's node feeds the engine's
//! per-site request counts in; nothing here reads a clock.
//!
//! Against ping-pong: a site must bring at least `share_percent_min` of the
//! requests over a whole `window_ms` (a workload split between the sites
//! never moves it), an idle group decides nothing, and a group that changed
//! owner (this way or any other) stays put for `interval_between_moves_ms`.

use std::collections::{BTreeMap, VecDeque};

use stretch_core::SiteId;

/// When a group follows its workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowSettings {
    /// The share of the group's requests, in percent, that one other site
    /// must bring over the whole window.
    pub share_percent_min: u32,
    /// How long that must last, in milliseconds.
    pub window_ms: u64,
    /// Fewer requests per second than this over the window decide nothing.
    pub requests_per_second_min: u64,
    /// After a change of owner, no move for this long, in milliseconds.
    pub interval_between_moves_ms: u64,
}

impl FollowSettings {
    /// 80 % of at least 10 requests a second for a minute; at most one move
    /// in ten minutes.
    pub const DEFAULT: FollowSettings = FollowSettings {
        share_percent_min: 80,
        window_ms: 60_000,
        requests_per_second_min: 10,
        interval_between_moves_ms: 600_000,
    };

    /// Why these settings cannot work, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if !(51..=100).contains(&self.share_percent_min) {
            return Err(format!(
                "share_percent_min must be 51 to 100 (a majority of the requests), not {}",
                self.share_percent_min
            ));
        }
        if self.window_ms < 1000 {
            return Err(format!(
                "window_ms must be at least 1000, not {}",
                self.window_ms
            ));
        }
        if self.interval_between_moves_ms < self.window_ms {
            return Err(format!(
                "interval_between_moves_ms ({}) must be at least window_ms ({})",
                self.interval_between_moves_ms, self.window_ms
            ));
        }
        Ok(())
    }
}

/// A move the workload asks for, with what decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowMove {
    pub to: SiteId,
    /// The share of the requests `to` brought over the window, in percent.
    pub share_percent: u32,
    /// Requests per second (all sites) over the window.
    pub requests_per_second: u64,
    pub window_ms: u64,
}

/// Samples kept at most: enough for a window sampled every 100 ms.
const SAMPLES_MAX: usize = 4096;

/// One group's request counts over time at its owner.
#[derive(Debug)]
pub struct FollowTracker {
    settings: FollowSettings,
    /// When this site began owning the group (or the tracker started).
    owned_since_ms: u64,
    /// (time, cumulative requests per site), oldest first.
    samples: VecDeque<(u64, BTreeMap<SiteId, u64>)>,
}

impl FollowTracker {
    /// Tracks a group this site owns from `now_ms` on: no move before
    /// `interval_between_moves_ms` from now.
    pub fn new(settings: FollowSettings, now_ms: u64) -> Self {
        FollowTracker {
            settings,
            owned_since_ms: now_ms,
            samples: VecDeque::new(),
        }
    }

    /// Takes the group's cumulative request counts by site at `now_ms`
    /// (they only grow while this site owns the group) and says whether it
    /// should move, and where. `own` is this site.
    pub fn observe(
        &mut self,
        now_ms: u64,
        own: SiteId,
        counts: &BTreeMap<SiteId, u64>,
    ) -> Option<FollowMove> {
        if self.samples.back().is_some_and(|(at, _)| *at > now_ms) {
            // Time never goes back; a sample out of order is ignored.
            return None;
        }
        self.samples.push_back((now_ms, counts.clone()));
        // Keep the newest sample at least a window old (the base) and
        // every later one.
        let window_start = now_ms.saturating_sub(self.settings.window_ms);
        while self.samples.len() > SAMPLES_MAX
            || self
                .samples
                .get(1)
                .is_some_and(|(at, _)| *at <= window_start)
        {
            self.samples.pop_front();
        }
        if now_ms.saturating_sub(self.owned_since_ms) < self.settings.interval_between_moves_ms {
            return None;
        }
        let (base_at, base) = self.samples.front()?;
        let span_ms = now_ms - base_at;
        if span_ms < self.settings.window_ms {
            return None;
        }
        let recent: BTreeMap<SiteId, u64> = counts
            .iter()
            .map(|(site, count)| {
                let before = base.get(site).copied().unwrap_or(0);
                (*site, count.saturating_sub(before))
            })
            .collect();
        let total: u64 = recent.values().sum();
        let requests_per_second = total.saturating_mul(1000) / span_ms;
        if total == 0 || requests_per_second < self.settings.requests_per_second_min {
            return None;
        }
        let (to, count) = recent
            .iter()
            .filter(|(site, _)| **site != own)
            .max_by_key(|(site, count)| (**count, std::cmp::Reverse(**site)))?;
        let share_percent = (count.saturating_mul(100) / total) as u32;
        if share_percent < self.settings.share_percent_min {
            return None;
        }
        Some(FollowMove {
            to: *to,
            share_percent,
            requests_per_second,
            window_ms: span_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SiteId = SiteId(1);
    const B: SiteId = SiteId(2);
    const C: SiteId = SiteId(3);

    fn settings() -> FollowSettings {
        FollowSettings {
            share_percent_min: 80,
            window_ms: 10_000,
            requests_per_second_min: 10,
            interval_between_moves_ms: 20_000,
        }
    }

    /// Feeds one sample a second from `from_s` to `to_s` (inclusive), with
    /// `per_second` requests a second from each site, and returns the
    /// first decision to move.
    fn run(
        tracker: &mut FollowTracker,
        counts: &mut BTreeMap<SiteId, u64>,
        per_second: &[(SiteId, u64)],
        from_s: u64,
        to_s: u64,
    ) -> Option<(u64, FollowMove)> {
        for second in from_s..=to_s {
            for (site, rate) in per_second {
                *counts.entry(*site).or_default() += rate;
            }
            if let Some(decision) = tracker.observe(second * 1000, A, counts) {
                return Some((second, decision));
            }
        }
        None
    }

    #[test]
    fn a_workload_that_moved_to_another_site_moves_the_group_after_the_interval() {
        let mut tracker = FollowTracker::new(settings(), 0);
        let mut counts = BTreeMap::new();
        let (second, decision) =
            run(&mut tracker, &mut counts, &[(A, 1), (B, 99)], 1, 60).expect("a move");
        // Not before the interval since it began owning the group.
        assert_eq!(second, 20);
        assert_eq!(decision.to, B);
        assert_eq!(decision.share_percent, 99);
        assert_eq!(decision.requests_per_second, 100);
        assert_eq!(decision.window_ms, 10_000);
    }

    #[test]
    fn the_share_must_hold_for_a_whole_window() {
        let mut tracker = FollowTracker::new(settings(), 0);
        let mut counts = BTreeMap::new();
        // Local work until 30 s, then the workload moves to b: the window
        // must fill with b's requests before the group follows.
        assert_eq!(run(&mut tracker, &mut counts, &[(A, 100)], 1, 30), None);
        let (second, decision) =
            run(&mut tracker, &mut counts, &[(B, 100)], 31, 60).expect("a move");
        assert_eq!(decision.to, B);
        // At 38 s b brought 80 of the last 10 s' requests.
        assert_eq!(second, 38);
        assert_eq!(decision.share_percent, 80);
    }

    #[test]
    fn a_split_workload_stays_where_it_is() {
        let mut tracker = FollowTracker::new(settings(), 0);
        let mut counts = BTreeMap::new();
        assert_eq!(
            run(&mut tracker, &mut counts, &[(A, 30), (B, 70)], 1, 120),
            None
        );
        // Nor does one spread over two other sites.
        assert_eq!(
            run(&mut tracker, &mut counts, &[(B, 50), (C, 50)], 121, 240),
            None
        );
    }

    #[test]
    fn an_idle_group_decides_nothing() {
        let mut tracker = FollowTracker::new(settings(), 0);
        let mut counts = BTreeMap::new();
        // 9 requests a second, all from b: below the floor.
        assert_eq!(run(&mut tracker, &mut counts, &[(B, 9)], 1, 120), None);
    }

    #[test]
    fn samples_are_bounded() {
        let mut tracker = FollowTracker::new(settings(), 0);
        let counts = BTreeMap::from([(A, 1)]);
        for millis in 0..20_000 {
            tracker.observe(millis, A, &counts);
        }
        assert!(tracker.samples.len() <= SAMPLES_MAX);
        // Time going back is ignored, not trusted.
        assert_eq!(tracker.observe(5, A, &BTreeMap::from([(B, 1 << 40)])), None);
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        assert!(FollowSettings::DEFAULT.check().is_ok());
        let share = FollowSettings {
            share_percent_min: 50,
            ..settings()
        };
        assert!(
            share
                .check()
                .expect_err("refused")
                .contains("share_percent_min")
        );
        let interval = FollowSettings {
            interval_between_moves_ms: 5000,
            ..settings()
        };
        assert!(
            interval
                .check()
                .expect_err("refused")
                .contains("interval_between_moves_ms")
        );
        let window = FollowSettings {
            window_ms: 10,
            ..settings()
        };
        assert!(window.check().expect_err("refused").contains("window_ms"));
    }
}
