//! The stretch simulator: the real protocol core, the real journal, leg and
//! recovery code, on simulated disks with a virtual clock, driven by one
//! seeded PRNG. Same seed, same run, bit for bit; the trace hash proves it.
//!
//! A scenario runs one site or several. Each site is a node: its own
//! engine, disk, journal, legs, dirty-region maps and resync marks; every
//! volume has a leg at every site, and each consistency group has an owner
//! site (round-robin or all at site 1). Clients are dealt to the sites and
//! issue reads, writes, flushes, trims and zeroing anywhere (at a site that
//! does not own the volume the engine asks the owner: strict reads and
//! forwarded writes), and snapshot reads where the volume is not owned.
//!
//! Faults: power loss at any site (unsynced writes lost, the last one
//! possibly torn), disk latency and slow operations, fsync failure windows,
//! and between sites a simulated network (`network.rs`): one connection per
//! pair of sites, ordered and reliable per group lane while it lasts (the
//! request lane is unordered, one stream per message, as in the node),
//! messages that wait in their sender's queue and leave on whatever
//! connection is current, one-way delays drawn per direction, cuts (both
//! ways or one way: the connection stalls, and dies if the cut outlasts its
//! detection), resets (down, then up at once), blips (a new connection
//! replaces the old one with no "down" in between), and a crashed site's
//! peers hearing "down" only when they notice. Site-loss checks power off
//! every site but one at once.
//!
//! A checker holds a reference model of every volume and tests the
//! guarantees on every reply, after every recovery and at the end (see
//! [`checker`]): G2 for strict reads anywhere, whole-delta snapshots (or a
//! refusal when the site says it is mid-resync), G3 at every site after a
//! crash, G4 after an owner's crash and, for flush-sync and sync, after the
//! loss of the owner's site, a bound on each site's cache, and convergence:
//! once the faults stop and the links heal, every leg at every site equals
//! the model.

pub mod checker;
mod network;
mod rng;
mod scenario;
mod simulator;
mod trace;

pub use checker::Violation;
pub use rng::SimRng;
pub use scenario::{
    EngineTuning, Faults, Network, Owners, Scenario, ScenarioError, Topology, Workload,
};
pub use simulator::{Outcome, SimBug, SimOptions, Stats, run};
pub use stretch_core::{Mark, Marks};

/// The scenario a swarm seed draws: one to three sites, every knob and
/// fault rate from the seed.
pub fn swarm_scenario(seed: u64) -> Scenario {
    let mut rng = SimRng::new(seed ^ 0x5357_4152_4d00_0000);
    Scenario::random(&mut rng)
}

pub mod control;
