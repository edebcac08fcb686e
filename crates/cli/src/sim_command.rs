//! `stretch sim`: run, swarm and replay simulations.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use stretch_sim::{Outcome, Scenario, SimBug, SimOptions};

/// The scenario `stretch sim` runs when given none.
const DEFAULT_SCENARIO: &str = include_str!("../../../simulation/single-site.toml");

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Seed of the run (every random choice derives from it).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Scenario file (see simulation/, e.g. two-sites.toml); the built-in
    /// single-site one if absent.
    #[arg(long, conflicts_with = "swarm")]
    scenario: Option<PathBuf>,
    /// Draw a random scenario from each seed instead of using a file.
    #[arg(long)]
    swarm: bool,
    /// With --swarm: how many seeds to run.
    #[arg(long, default_value_t = 1, requires = "swarm")]
    seeds: u64,
    /// With --swarm: the first seed (then from+1, ...).
    #[arg(long, requires = "swarm")]
    from: Option<u64>,
    /// Override the scenario's duration, in simulated seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Print the scenario and every event of the run (use on a failing seed).
    #[arg(long)]
    replay: bool,
    /// Plant a known defect to see the checker catch it (each is caught
    /// within the first 1,500 seeds of --swarm): skip-journal-fsync,
    /// ack-flush-early, apply-before-journal-sync, apply-newest-first,
    /// accept-delta-gap, flush-sync-local-only, stall-on-full-backlog,
    /// cache-ignores-bound, forward-timeout-succeeds, map-forgets-dirty,
    /// abandon-forgets-unacked, diff-skips-first-missing,
    /// early-takeover, takeover-ignores-images, heal-forgets-lost-regions,
    /// migration-switches-early, read-lease-never-expires,
    /// read-lease-write-before-revoked, read-lease-forgotten-on-restart,
    /// fast-drain-writes-uncopied (all but the first five need sites; the
    /// read-lease ones show most in simulation/read-leases.toml, the last
    /// in simulation/migration/fast-two-sites.toml); with --control:
    /// renew-with-minority, no-drift-margin, grant-stale-holder.
    #[arg(long)]
    pub(crate) bug: Option<String>,
    /// With --swarm: print, per coverage mark (a protocol decision), how
    /// many seeds reached it.
    #[arg(long, requires = "swarm", conflicts_with = "control")]
    marks: bool,
    /// Simulate the control plane (the metadata's openraft members, the
    /// ownership leases on drifting clocks, failover) under cut, flapping
    /// and healed links and lost sites, checking G1, G5 and G6; --scenario
    /// then names a control scenario (simulation/control/control-plane.toml is the
    /// built-in one).
    #[arg(long, conflicts_with = "duration")]
    pub(crate) control: bool,
}

impl SimArgs {
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }
    pub(crate) fn scenario(&self) -> Option<&PathBuf> {
        self.scenario.as_ref()
    }
    pub(crate) fn swarm(&self) -> bool {
        self.swarm
    }
    pub(crate) fn seeds(&self) -> u64 {
        self.seeds
    }
    pub(crate) fn from(&self) -> Option<u64> {
        self.from
    }
    pub(crate) fn replay(&self) -> bool {
        self.replay
    }
}

fn parse_bug(name: &str) -> Result<SimBug, String> {
    SimBug::parse(name).ok_or_else(|| {
        let names: Vec<&str> = SimBug::ALL.iter().map(|bug| bug.name()).collect();
        format!("unknown bug {name:?}; one of: {}", names.join(", "))
    })
}

pub fn run(args: SimArgs) -> anyhow::Result<()> {
    if args.control {
        return crate::sim_control_command::run(&args);
    }
    let bug = args
        .bug
        .as_deref()
        .map(parse_bug)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if args.swarm {
        return swarm(&args, bug);
    }
    let (mut scenario, source) = match &args.scenario {
        Some(path) => (
            Scenario::load(path)?,
            format!(" --scenario {}", path.display()),
        ),
        None => {
            let scenario: Scenario = toml::from_str(DEFAULT_SCENARIO)
                .context("built-in scenario invariant: it parses")?;
            (scenario, String::new())
        }
    };
    if let Some(duration) = args.duration {
        scenario.duration_seconds = duration;
        scenario.validate().map_err(anyhow::Error::msg)?;
    }
    let options = SimOptions {
        seed: args.seed,
        bug,
        record_trace: args.replay,
    };
    if args.replay {
        print_scenario(&scenario);
    }
    let started = Instant::now();
    let outcome = stretch_sim::run(&scenario, &options);
    let replay = format!(
        "stretch sim --seed {}{source}{} --replay",
        args.seed,
        replay_options(&args)
    );
    report(&outcome, started, &replay, args.replay);
    if outcome.violation.is_some() {
        bail!("guarantee violated (seed {})", args.seed);
    }
    Ok(())
}

fn swarm(args: &SimArgs, bug: Option<SimBug>) -> anyhow::Result<()> {
    let from = args.from.unwrap_or(args.seed);
    let started = Instant::now();
    let mut simulated_ns = 0u64;
    let mut failures = Vec::new();
    let mut reached = [0u64; stretch_sim::Mark::ALL.len()];
    // The longest drain (events after the workload), and its seed.
    let mut longest_drain = (0u64, from);
    for seed in from..from.saturating_add(args.seeds) {
        let mut scenario = stretch_sim::swarm_scenario(seed);
        if let Some(duration) = args.duration {
            scenario.duration_seconds = duration;
        }
        let options = SimOptions {
            seed,
            bug,
            record_trace: args.replay,
        };
        if args.replay {
            print_scenario(&scenario);
        }
        let run_started = Instant::now();
        let outcome = stretch_sim::run(&scenario, &options);
        simulated_ns += outcome.simulated_ns;
        longest_drain = longest_drain.max((outcome.stats.drain_events, seed));
        for (count, mark) in reached.iter_mut().zip(stretch_sim::Mark::ALL) {
            *count += u64::from(outcome.stats.marks.count(mark) > 0);
        }
        let replay = format!(
            "stretch sim --swarm --from {seed} --seeds 1{} --replay",
            replay_options(args)
        );
        if outcome.violation.is_some() || args.replay || args.seeds == 1 {
            report(&outcome, run_started, &replay, args.replay);
        }
        if outcome.violation.is_some() {
            failures.push(seed);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    println!(
        "swarm: {} seeds from {from}, {} failed, {:.1} simulated s in {:.2} wall s ({:.0}x)",
        args.seeds,
        failures.len(),
        simulated_ns as f64 / 1e9,
        wall,
        simulated_ns as f64 / 1e9 / wall.max(1e-9)
    );
    println!(
        "longest drain: {} events after the workload (seed {})",
        longest_drain.0, longest_drain.1
    );
    if args.marks {
        println!("coverage marks (seeds that reached each):");
        for (count, mark) in reached.iter().zip(stretch_sim::Mark::ALL) {
            println!(
                "  {:<33} {count:>6} of {} ({:.1} %)",
                mark.name(),
                args.seeds,
                *count as f64 * 100.0 / args.seeds.max(1) as f64
            );
        }
    }
    if !failures.is_empty() {
        bail!("failing seeds: {failures:?}");
    }
    Ok(())
}

/// The options a replay command must repeat to run the same simulation.
pub(crate) fn replay_options(args: &SimArgs) -> String {
    let mut options = String::new();
    if let Some(duration) = args.duration {
        options.push_str(&format!(" --duration {duration}"));
    }
    if let Some(bug) = &args.bug {
        options.push_str(&format!(" --bug {bug}"));
    }
    options
}

/// The scenario a run used, as a scenario file (a swarm seed's draw).
pub(crate) fn print_scenario(scenario: &impl serde::Serialize) {
    match toml::to_string(scenario) {
        Ok(text) => {
            for line in text.lines() {
                println!("# {line}");
            }
        }
        Err(error) => println!("# (scenario not printable: {error})"),
    }
}

/// Every event of a replayed run, one line each.
pub(crate) fn print_trace(lines: &[String]) {
    for line in lines {
        println!("{line}");
    }
}

fn report(outcome: &Outcome, started: Instant, replay_command: &str, print_trace: bool) {
    if print_trace {
        self::print_trace(&outcome.trace);
    }
    let wall = started.elapsed().as_secs_f64();
    let simulated = outcome.simulated_ns as f64 / 1e9;
    let stats = &outcome.stats;
    println!(
        "seed {} scenario {}: trace {:016x}; {:.2} simulated s in {:.3} wall s ({:.0}x); {} events, {} requests ({} reads, {} writes, {} flushes), {} crashes, {} fsync-failure windows",
        outcome.seed,
        outcome.scenario,
        outcome.trace_hash,
        simulated,
        wall,
        simulated / wall.max(1e-9),
        stats.events,
        stats.requests,
        stats.reads,
        stats.writes,
        stats.flushes,
        stats.crashes,
        stats.fsync_failure_windows,
    );
    if outcome.sites > 1 {
        println!(
            "  {} sites: {} requests sent to an owner ({} failed: owner unreachable), {} snapshot reads ({} refused mid-resync), {} messages ({} lost with their connection), {} link faults, {} site-loss checks, {} unflushed writes from other sites lost in an owner crash",
            outcome.sites,
            stats.remote_requests,
            stats.remote_failures,
            stats.snapshot_reads,
            stats.snapshot_refusals,
            stats.messages_sent,
            stats.messages_lost,
            stats.link_faults,
            stats.site_loss_checks,
            stats.remote_writes_lost,
        );
    }
    if stats.failovers_started > 0 {
        println!(
            "  failovers: {} owners cut off, {} groups taken over, {} acknowledged writes lost to them (each loss reported by its old owner; {} reports not checkable after a restart)",
            stats.failovers_started,
            stats.failovers,
            stats.failover_lost_writes,
            stats.loss_reports_unchecked,
        );
    }
    if stats.migrations_started > 0 {
        println!(
            "  migrations: {} begun, {} switched over (writes held at most {:.1} ms), {} gave up, {} switchovers called off",
            stats.migrations_started,
            stats.migrations,
            stats.migration_pause_max_ns as f64 / 1e6,
            stats.migrations_gave_up,
            stats.switchovers_called_off,
        );
        if stats.fast_migrations > 0 {
            println!(
                "  fast migrations: {} switched over, {} drains ended with every region copied",
                stats.fast_migrations, stats.fast_drains_done,
            );
        }
    }
    if let Some((violation, step, at)) = &outcome.violation {
        println!(
            "VIOLATION of {} at step {step} ({:.3} ms), seed {}: {}",
            violation.guarantee,
            *at as f64 / 1e6,
            outcome.seed,
            violation.detail
        );
        println!("replay: {replay_command}");
    }
}
