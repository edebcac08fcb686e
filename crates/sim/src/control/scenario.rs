//! A control-plane scenario: the sites, the groups and their failover
//! policies, lease timing and clock drift, the link delays, and how the
//! fault phases are drawn. Read from a TOML file under `simulation/`, or
//! drawn from a seed in swarm mode. Every field has a default.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::rng::SimRng;
use crate::scenario::ScenarioError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlScenario {
    pub name: String,
    /// Data sites (2 or 3), each one voter; a witness site is added as the
    /// last voter when `witness` is true.
    pub data_sites: u32,
    pub witness: bool,
    /// Consistency groups, owned round-robin by the data sites.
    pub groups: u32,
    /// Share of the groups whose failover policy is `auto` (the rest are
    /// `manual`), dealt by the seed.
    pub auto_share: f64,
    /// Fault phases after the healthy start; the run ends with a healthy
    /// phase in which everything must converge (G6).
    pub phases: u32,
    /// Length of each phase, in simulated seconds: long enough for a
    /// failover to complete, so that G5 can compare what suspended with
    /// what was predicted.
    pub phase_seconds_min: f64,
    pub phase_seconds_max: f64,
    /// Chance that an operator promotes a suspended `manual` group at a
    /// surviving site during a phase.
    pub promote_share: f64,
    pub lease: LeaseTiming,
    /// One-way delay of each link direction, drawn once per direction;
    /// every message adds up to 10 % jitter.
    pub delay_ms_min: u64,
    pub delay_ms_max: u64,
}

/// The cluster's `[tuning]` lease settings, and how far the simulated
/// clocks actually drift (at most the configured bound).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseTiming {
    pub lease_ms: u64,
    pub renew_ms: u64,
    /// The bound the lease logic assumes; each site's clock rate differs
    /// from real time by a value drawn within it.
    pub drift_ppm: u64,
    pub margin_ms: u64,
}

impl LeaseTiming {
    /// How long a phase must last for its end to show the failovers it
    /// causes: twice the voters' promise in real time (lease stretched for
    /// drift, plus margin, on a clock running slow by the whole bound),
    /// plus 4 s for an election and the commits.
    pub fn settle_seconds(&self) -> f64 {
        let ppm = self.drift_ppm.min(499_999) as f64 / 1e6;
        let promise =
            self.lease_ms as f64 / 1e3 * (1.0 + ppm) / (1.0 - ppm) + self.margin_ms as f64 / 1e3;
        2.0 * promise / (1.0 - ppm) + 4.0
    }
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            lease_ms: 1_500,
            renew_ms: 300,
            drift_ppm: 1_000,
            margin_ms: 100,
        }
    }
}

impl Default for ControlScenario {
    fn default() -> Self {
        ControlScenario {
            name: "control-plane".into(),
            data_sites: 2,
            witness: true,
            groups: 4,
            auto_share: 0.5,
            phases: 6,
            phase_seconds_min: 12.0,
            phase_seconds_max: 20.0,
            promote_share: 0.5,
            lease: LeaseTiming::default(),
            delay_ms_min: 5,
            delay_ms_max: 45,
        }
    }
}

impl ControlScenario {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let scenario: ControlScenario =
            toml::from_str(&text).map_err(|error| ScenarioError::Invalid {
                path: path.display().to_string(),
                message: error.to_string(),
            })?;
        scenario
            .validate()
            .map_err(|message| ScenarioError::Invalid {
                path: path.display().to_string(),
                message,
            })?;
        Ok(scenario)
    }

    /// Every knob drawn from `rng`: two or three data sites, with or
    /// without a witness, drift bounds from a quartz's to a badly broken
    /// clock's, short and long links.
    pub fn random(rng: &mut SimRng) -> Self {
        let data_sites = if rng.chance(0.7) { 2 } else { 3 };
        let witness = data_sites == 2 || rng.chance(0.5);
        // Up to a quarter: no clock drifts that far, but a bound that
        // wide makes every missing stretch of a lease show as an overlap.
        let drift_ppm = [100, 1_000, 20_000, 250_000, 250_000][rng.below(5) as usize];
        let delay_ms_max = [5, 25, 45, 80][rng.below(4) as usize];
        let lease = LeaseTiming {
            lease_ms: [1_000, 1_500, 3_000, 6_000][rng.below(4) as usize],
            renew_ms: 300,
            drift_ppm,
            margin_ms: [50, 100][rng.below(2) as usize],
        };
        let phase_seconds_min = lease.settle_seconds().max(12.0);
        ControlScenario {
            name: "control-swarm".into(),
            data_sites,
            witness,
            groups: rng.between(2, 6) as u32,
            auto_share: [0.0, 0.5, 1.0][rng.below(3) as usize],
            phases: rng.between(3, 7) as u32,
            phase_seconds_min,
            phase_seconds_max: phase_seconds_min + 6.0,
            promote_share: 0.5,
            lease,
            delay_ms_min: 1 + rng.below(delay_ms_max / 2 + 1),
            delay_ms_max,
        }
    }

    /// Voters: every data site and the witness.
    pub fn sites(&self) -> usize {
        self.data_sites as usize + usize::from(self.witness)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(2..=3).contains(&self.data_sites) {
            return Err("data_sites must be 2 or 3".into());
        }
        if self.sites() < 3 {
            return Err("a control plane needs three voters: add a witness".into());
        }
        if self.groups == 0 || self.groups > 64 {
            return Err("groups must be within 1..=64".into());
        }
        if !(0.0..=1.0).contains(&self.auto_share) || !(0.0..=1.0).contains(&self.promote_share) {
            return Err("auto_share and promote_share are shares within 0..=1".into());
        }
        if self.phase_seconds_max < self.phase_seconds_min {
            return Err("phase_seconds_min must be at most phase_seconds_max".into());
        }
        let settle = self.lease.settle_seconds();
        if self.phase_seconds_min < settle {
            return Err(format!(
                "phase_seconds_min must be at least {settle:.1}: a failover must be able to finish within a phase (twice the voters' promise, stretched for drift, plus 4 s for an election and commits)"
            ));
        }
        if self.delay_ms_max < self.delay_ms_min {
            return Err("delay_ms_max must be at least delay_ms_min".into());
        }
        let lease = &self.lease;
        if lease.renew_ms == 0 || lease.lease_ms <= 2 * lease.renew_ms {
            return Err("lease_ms must outlive two renewals (renew_ms > 0)".into());
        }
        if lease.drift_ppm >= 500_000 {
            return Err("drift_ppm must stay below 500000".into());
        }
        Ok(())
    }
}
