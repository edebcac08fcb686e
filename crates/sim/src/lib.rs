//! The stretch simulator: the real protocol core, the real journal, leg and
//! recovery code, on a simulated disk with a virtual clock, driven by one
//! seeded PRNG. Same seed, same run, bit for bit; the trace hash proves it.
//!
//! Faults: power loss (unsynced writes lost, the last one possibly torn),
//! disk latency and slow operations, fsync failure windows. A checker holds
//! a reference model of every volume and tests the guarantees on every
//! reply and after every recovery (see [`checker`]).

pub mod checker;
mod rng;
mod scenario;
mod simulator;
mod trace;

pub use checker::Violation;
pub use rng::SimRng;
pub use scenario::{EngineTuning, Faults, Scenario, ScenarioError, Topology, Workload};
pub use simulator::{Outcome, SimBug, SimOptions, Stats, run};

/// The scenario a swarm seed draws.
pub fn swarm_scenario(seed: u64) -> Scenario {
    let mut rng = SimRng::new(seed ^ 0x5357_4152_4d00_0000);
    Scenario::random(&mut rng)
}
