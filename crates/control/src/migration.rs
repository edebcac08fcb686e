//! When a live migration switches over (drain mode): the node's driver and
//! the simulator's decide with the same rule.

/// What the target may still lack at the switchover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchPoint {
    /// Switch over once what the target lacks would drain within this
    /// long at the rate it applies: writes are then held for about one
    /// round trip (the last delta out, its acknowledgement back) plus one
    /// metadata commit, not for the backlog.
    pub drain_ms: u64,
    /// What the target may lack whatever the rate (a group written slowly
    /// drains its last delta at once, though no rate was measured).
    pub bytes_min: u64,
}

impl SwitchPoint {
    /// The node's: 100 ms of drain, at least 1 MiB.
    pub const NODE: SwitchPoint = SwitchPoint {
        drain_ms: 100,
        bytes_min: 1 << 20,
    };

    /// Whether to hold the writes and switch over now: the target streams
    /// deltas (it is not resyncing, whose end the owner cannot time) and
    /// lacks at most what drains within `drain_ms` at
    /// `drain_bytes_per_second`.
    pub fn reached(&self, streaming: bool, bytes_left: u64, drain_bytes_per_second: u64) -> bool {
        let drains = drain_bytes_per_second.saturating_mul(self.drain_ms) / 1000;
        streaming && bytes_left <= self.bytes_min.max(drains)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_switches_over_only_streaming_and_near_enough() {
        let point = SwitchPoint {
            drain_ms: 100,
            bytes_min: 1000,
        };
        // Resyncing: never, however little is left.
        assert!(!point.reached(false, 0, 1 << 30));
        // The floor holds without a measured rate.
        assert!(point.reached(true, 1000, 0));
        assert!(!point.reached(true, 1001, 0));
        // 10 MB/s drains 1 MB in 100 ms.
        assert!(point.reached(true, 1_000_000, 10_000_000));
        assert!(!point.reached(true, 1_000_001, 10_000_000));
        // No overflow at absurd rates.
        assert!(point.reached(true, u64::MAX / 1000, u64::MAX));
    }
}
