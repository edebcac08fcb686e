//! What the unit tests of this crate share: three sites and a lease
//! configuration with round numbers.

use stretch_core::{SiteId, Timestamp};

use crate::lease::LeaseConfig;

pub const A: SiteId = SiteId(1);
pub const B: SiteId = SiteId(2);
pub const W: SiteId = SiteId(3);

pub fn config() -> LeaseConfig {
    LeaseConfig {
        lease_ms: 1_000,
        renew_ms: 200,
        drift_ppm: 1_000,
        margin_ms: 50,
        planted_bug: None,
    }
}

pub fn at_ms(value: u64) -> Timestamp {
    Timestamp::from_millis(value)
}
