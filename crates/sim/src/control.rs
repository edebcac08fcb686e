//! The control-plane simulation: the metadata's openraft members, the
//! ownership leases and the failover of `stretch_control` and
//! `stretch_metadata`, run as the node runs them, on sites whose clocks
//! drift within the configured bound, over links that are cut, flap and
//! heal, with nodes that lose power during elections and takeovers.
//!
//! openraft runs as real async tasks on a single-threaded tokio runtime
//! with a paused clock, every random draw of openraft seeded
//! (`DeterministicRng`), every delay and fault drawn from one seeded PRNG:
//! same seed, same run, same trace hash.
//!
//! A run is a healthy start, then phases, each one fault held long enough
//! for a failover to finish (a cut of one link, an isolated site, the loss
//! of a site or of the witness, a flapping link, the leader losing power
//! during an election), then a healthy phase. The checks (see
//! [`checks`]):
//! - **G1**, every 10 ms of simulated time: no two sites would acknowledge
//!   a write to one group at that instant (each judged on its own clock:
//!   its engine owns the group and its lease is valid); epochs only rise;
//! - **G5**, during each phase: a group whose owner kept a majority of the
//!   voters never stops accepting writes; at each phase's end, the groups
//!   that accept writes are exactly those predicted (owner on a majority
//!   side; else `auto`, or `manual` promoted by an operator, with a data
//!   site on a majority side);
//! - **G6**, after the last heal: every group accepted at exactly its
//!   owner, every node applied the same metadata, no takeover left.
//!
//! What this does not cover yet: the data plane under ownership changes
//! (the writes lost at a failover are checked end to end in
//! `tests/failover.rs`, not here), one-way cuts, and relaying metadata
//! writes through a third voter (a node here writes to the leader it knows
//! directly).

#[cfg(not(tokio_unstable))]
compile_error!(
    "the control-plane simulator needs `--cfg tokio_unstable` (set in .cargo/config.toml; a RUSTFLAGS variable replaces it: add the flag to it)"
);

mod checks;
mod member;
mod raft_network;
mod scenario;
mod world;

use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft_rt::deterministic_rng::DeterministicRng;
use openraft_rt_tokio::TokioRuntime;
use stretch_control::{ControlBug, LeaseConfig};
use stretch_metadata::{Command, Failover, Mode, Role};

pub use crate::checker::Violation;
use crate::rng::SimRng;
pub use scenario::{ControlScenario, LeaseTiming};
use world::World;

/// Options of one control-plane run.
#[derive(Debug, Clone, Default)]
pub struct ControlOptions {
    pub seed: u64,
    pub bug: Option<ControlBug>,
    /// Keep a readable line per event (for `--replay`).
    pub record_trace: bool,
}

/// The planted control bugs, by the name `--bug` takes.
pub const CONTROL_BUGS: [(&str, ControlBug); 3] = [
    ("renew-with-minority", ControlBug::RenewWithMinority),
    ("no-drift-margin", ControlBug::NoDriftMargin),
    ("grant-stale-holder", ControlBug::GrantStaleHolder),
];

#[derive(Debug, Clone, Default)]
pub struct ControlStats {
    pub phases: u64,
    pub faults: BTreeSet<&'static str>,
    /// Groups taken over by their `auto` policy, and by an operator.
    pub failovers: u64,
    pub promotions: u64,
    /// Promotions the metadata refused (another site promoted the group
    /// first, at the same epoch: the race three data sites run).
    pub promotions_refused: u64,
    /// Takeovers a survivor called off because another offered a newer
    /// image (three or more data sites).
    pub takeovers_left: u64,
    pub restarts: u64,
    pub g1_probes: u64,
    pub g5_checks: u64,
    /// Phase ends at which some group was (rightly) suspended.
    pub suspensions_seen: u64,
}

#[derive(Debug, Clone)]
pub struct ControlOutcome {
    pub seed: u64,
    pub scenario: String,
    pub trace_hash: u64,
    pub simulated_ns: u64,
    pub stats: ControlStats,
    pub violation: Option<(Violation, u64)>,
    pub trace: Vec<String>,
}

/// The scenario a control swarm seed draws.
pub fn control_swarm_scenario(seed: u64) -> ControlScenario {
    let mut rng = SimRng::new(seed ^ 0x4354_524c_0000_0000);
    ControlScenario::random(&mut rng)
}

thread_local! {
    /// Seeds of the tasks this run spawns (one run per thread at a time).
    static NEXT_TASK_SEED: Cell<u64> = const { Cell::new(0) };
}

/// `task` with its own deterministic openraft RNG scope: anything it
/// spawns through openraft draws from the run's seed.
pub(crate) fn seeded<F: std::future::Future>(
    task: F,
) -> impl std::future::Future<Output = F::Output> {
    let seed = NEXT_TASK_SEED.with(|next| {
        let seed = next.get();
        next.set(
            seed.wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407),
        );
        seed
    });
    DeterministicRng::<TokioRuntime>::scope(seed, task)
}

/// Runs one control-plane scenario with one seed.
pub fn run_control(scenario: &ControlScenario, options: &ControlOptions) -> ControlOutcome {
    NEXT_TASK_SEED.with(|next| next.set(options.seed ^ 0x9e37_79b9_7f4a_7c15));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        // tokio's own draws (which waiter of a watch channel wakes first)
        // from the seed too.
        .rng_seed(tokio::runtime::RngSeed::from_bytes(
            &options.seed.to_le_bytes(),
        ))
        .build()
        .expect("simulator invariant: a current-thread runtime builds");
    let lease = LeaseConfig {
        lease_ms: scenario.lease.lease_ms,
        renew_ms: scenario.lease.renew_ms,
        drift_ppm: scenario.lease.drift_ppm,
        margin_ms: scenario.lease.margin_ms,
        planted_bug: options.bug,
    };
    let mut rng = SimRng::new(options.seed);
    let world = runtime.block_on(async {
        let world = Arc::new(World::new(
            scenario.clone(),
            lease,
            &mut rng,
            options.record_trace,
        ));
        seeded(drive(world.clone(), rng)).await;
        let simulated_ns = world.now_ns();
        for site in 0..world.sites.len() {
            member::stop(&world, site).await;
        }
        (world, simulated_ns)
    });
    let (world, simulated_ns) = world;
    drop(runtime);
    let mut state = world.state.lock();
    ControlOutcome {
        seed: options.seed,
        scenario: scenario.name.clone(),
        trace_hash: state.trace.hash(),
        simulated_ns,
        stats: state.stats.clone(),
        violation: state.violation.clone(),
        trace: state.trace.take_lines(),
    }
}

/// One fault held for a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Healthy,
    /// Both directions of the link between two sites.
    Cut(usize, usize),
    /// One direction only: messages from the first site to the second are
    /// lost, those the other way arrive (a half-broken route). Raft and
    /// lease requests need answers, so neither site reaches the other, but
    /// one still hears the other's elections and renewals.
    OneWay(usize, usize),
    /// Every link of a site.
    Isolate(usize),
    /// The site loses power for the phase.
    Down(usize),
    /// A link goes down and up every 100–800 ms for the first half of the
    /// phase.
    Flap(usize, usize),
    /// The leader loses power early in the phase and comes back during
    /// the election that follows.
    RestartLeader,
}

impl Fault {
    fn kind(self) -> &'static str {
        match self {
            Fault::Healthy => "healthy",
            Fault::Cut(..) => "cut",
            Fault::OneWay(..) => "one-way",
            Fault::Isolate(_) => "isolate",
            Fault::Down(_) => "site-down",
            Fault::Flap(..) => "flap",
            Fault::RestartLeader => "restart-leader",
        }
    }

    fn describe(self, world: &World) -> String {
        let name = |site: usize| world.sites[site].name.clone();
        match self {
            Fault::Healthy => "no fault".into(),
            Fault::Cut(one, other) => format!("link {}–{} cut", name(one), name(other)),
            Fault::OneWay(from, to) => {
                format!("link {}→{} cut one way", name(from), name(to))
            }
            Fault::Isolate(site) => format!("site {} cut from every other", name(site)),
            Fault::Down(site) => format!("site {} down", name(site)),
            Fault::Flap(one, other) => format!("link {}–{} flapping", name(one), name(other)),
            Fault::RestartLeader => "the leader restarts during an election".into(),
        }
    }

    /// A fault drawn with `owners` (sites that own some group) hit most
    /// of the time: faults elsewhere change little once groups gathered at
    /// one site after failovers.
    fn draw(rng: &mut SimRng, sites: usize, owners: &[usize]) -> Fault {
        let one = if !owners.is_empty() && rng.chance(0.7) {
            owners[rng.below(owners.len() as u64) as usize]
        } else {
            rng.below(sites as u64) as usize
        };
        let other = (one + 1 + rng.below(sites as u64 - 1) as usize) % sites;
        match rng.below(7) {
            0 => Fault::Cut(one, other),
            1 => Fault::Isolate(one),
            2 => Fault::Down(one),
            3 => Fault::Flap(one, other),
            4 => Fault::RestartLeader,
            5 if rng.chance(0.5) => Fault::OneWay(one, other),
            5 => Fault::OneWay(other, one),
            _ => Fault::Isolate(one),
        }
    }
}

const PROBE: Duration = Duration::from_millis(10);

/// The run: start, seed the metadata, the phases, the final heal.
async fn drive(world: Arc<World>, mut rng: SimRng) {
    for site in 0..world.sites.len() {
        member::start(&world, site, true).await;
    }
    if !seed_metadata(&world, &mut rng).await {
        world.fail(
            "G6",
            "the cluster did not form and create its groups within 30 simulated seconds".into(),
        );
        return;
    }
    let mut phase = checks::Phase::start(&world, Fault::Healthy, None);
    if !run_phase(&world, &mut rng, &mut phase, Duration::from_secs(10)).await {
        return;
    }
    let mut previous = phase;
    for _ in 0..world.scenario.phases {
        let owners = checks::owner_sites(&world);
        let fault = Fault::draw(&mut rng, world.sites.len(), &owners);
        apply(&world, fault).await;
        let mut phase = checks::Phase::start(&world, fault, Some(&previous));
        let seconds = world.scenario.phase_seconds_min
            + (world.scenario.phase_seconds_max - world.scenario.phase_seconds_min)
                * (rng.below(1_000) as f64 / 1_000.0);
        if !run_phase(
            &world,
            &mut rng,
            &mut phase,
            Duration::from_secs_f64(seconds),
        )
        .await
        {
            return;
        }
        heal(&world, fault).await;
        previous = phase;
    }
    let mut last = checks::Phase::start(&world, Fault::Healthy, Some(&previous));
    if !run_phase(&world, &mut rng, &mut last, Duration::from_secs(20)).await {
        return;
    }
    checks::converged(&world);
}

/// Registers the sites and nodes and creates one volume per group, owners
/// round-robin over the data sites, failover policies drawn.
async fn seed_metadata(world: &Arc<World>, rng: &mut SimRng) -> bool {
    let mut commands = Vec::new();
    for slot in &world.sites {
        commands.push(Command::AddSite {
            name: slot.name.clone(),
            role: if slot.data { Role::Data } else { Role::Witness },
        });
    }
    for slot in &world.sites {
        commands.push(Command::AddNode {
            id: slot.index as u64 + 1,
            info: member::node_info(slot),
        });
    }
    let data_sites = world.scenario.data_sites as usize;
    for group in 0..world.scenario.groups as usize {
        let failover = if rng.chance(world.scenario.auto_share) {
            Failover::Auto
        } else {
            Failover::Manual
        };
        commands.push(Command::CreateVolume {
            name: format!("vm{}", group + 1),
            size: 1 << 20,
            group: format!("g{}", group + 1),
            mode: Mode::Async,
            failover,
            owner_site: world.sites[group % data_sites].name.clone(),
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for command in commands {
        loop {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            let Some(member) = world.member(0) else {
                return false;
            };
            match member::write(world, &member, command.clone()).await {
                Ok((Ok(_), _)) => break,
                Ok((Err(error), _)) => {
                    panic!("simulator invariant: seeding the metadata works: {error}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    true
}

async fn apply(world: &Arc<World>, fault: Fault) {
    {
        let mut state = world.state.lock();
        state.stats.phases += 1;
        state.stats.faults.insert(fault.kind());
    }
    world.record(&[10, fault_code(fault)], || {
        format!("phase: {}", fault.describe(world))
    });
    match fault {
        Fault::Healthy | Fault::RestartLeader | Fault::Flap(..) => {}
        Fault::Cut(one, other) => world.set_link(one, other, false),
        Fault::OneWay(from, to) => world.set_direction(from, to, false),
        Fault::Isolate(site) => {
            for other in 0..world.sites.len() {
                if other != site {
                    world.set_link(site, other, false);
                }
            }
        }
        Fault::Down(site) => member::stop(world, site).await,
    }
}

fn fault_code(fault: Fault) -> u64 {
    match fault {
        Fault::Healthy => 0,
        Fault::Cut(one, other) => 0x100 | (one as u64) << 4 | other as u64,
        Fault::OneWay(from, to) => 0x600 | (from as u64) << 4 | to as u64,
        Fault::Isolate(site) => 0x200 | site as u64,
        Fault::Down(site) => 0x300 | site as u64,
        Fault::Flap(one, other) => 0x400 | (one as u64) << 4 | other as u64,
        Fault::RestartLeader => 0x500,
    }
}

/// Ends a fault: every link up, every site running.
async fn heal(world: &Arc<World>, fault: Fault) {
    let sites = world.sites.len();
    for one in 0..sites {
        for other in 0..sites {
            if one != other {
                world.set_link(one, other, true);
            }
        }
    }
    for site in 0..sites {
        if world.member(site).is_none() {
            restart(world, site).await;
        }
    }
    world.record(&[11, fault_code(fault)], || {
        "heal: every link up, every site running".into()
    });
}

async fn restart(world: &Arc<World>, site: usize) {
    member::start(world, site, false).await;
    world.state.lock().stats.restarts += 1;
}

/// Runs a phase for `length`, probing every [`PROBE`]; false once a
/// violation was found.
async fn run_phase(
    world: &Arc<World>,
    rng: &mut SimRng,
    phase: &mut checks::Phase,
    length: Duration,
) -> bool {
    let steps = (length.as_nanos() / PROBE.as_nanos()) as u64;
    // What happens at which step of the phase.
    let mut flap_at = 0;
    let restart_leader_at = rng.between(50, 300);
    let mut leader_down: Option<(usize, u64)> = None;
    let promote_at = rng.between(100, 400);
    let promote = rng.chance(world.scenario.promote_share);
    for step in 0..steps {
        tokio::time::sleep(PROBE).await;
        match phase.fault {
            Fault::Flap(one, other) if step < steps / 2 && step >= flap_at => {
                let up = !world.connected(one, other);
                world.set_link(one, other, up);
                flap_at = step + rng.between(10, 80);
            }
            Fault::Flap(one, other) if step == steps / 2 => world.set_link(one, other, true),
            Fault::RestartLeader if step == restart_leader_at => {
                if let Some(leader) = checks::leader(world) {
                    member::stop(world, leader).await;
                    leader_down = Some((leader, step + rng.between(30, 200)));
                    phase.restarted(leader);
                }
            }
            Fault::RestartLeader => {
                if let Some((leader, at)) = leader_down
                    && step == at
                {
                    restart(world, leader).await;
                    leader_down = None;
                }
            }
            _ => {}
        }
        if step == promote_at && promote {
            phase.operator_promotes(world);
        }
        phase.probe(world);
        if world.failed() {
            return false;
        }
    }
    if let Some((leader, _)) = leader_down {
        restart(world, leader).await;
        // Let the restarted node settle before the end-of-phase check.
        for _ in 0..300 {
            tokio::time::sleep(PROBE).await;
            phase.probe(world);
        }
    }
    phase.finish(world);
    !world.failed()
}
