//! `stretch sim --control`: run, swarm and replay control-plane
//! simulations.

use std::time::Instant;

use anyhow::{Context, bail};
use stretch_sim::control::{
    CONTROL_BUGS, ControlOptions, ControlOutcome, ControlScenario, control_swarm_scenario,
    run_control,
};

use crate::sim_command::{SimArgs, print_scenario, replay_options};

/// The scenario `stretch sim --control` runs when given none.
const DEFAULT_SCENARIO: &str = include_str!("../../../simulation/control/control-plane.toml");

fn parse_bug(name: &str) -> anyhow::Result<stretch_control::ControlBug> {
    CONTROL_BUGS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, bug)| *bug)
        .with_context(|| {
            let names: Vec<&str> = CONTROL_BUGS.iter().map(|(known, _)| *known).collect();
            format!("unknown control bug {name:?}; one of: {}", names.join(", "))
        })
}

pub fn run(args: &SimArgs) -> anyhow::Result<()> {
    let bug = args.bug.as_deref().map(parse_bug).transpose()?;
    if args.swarm() {
        return swarm(args, bug);
    }
    let (scenario, source) = match args.scenario() {
        Some(path) => (
            ControlScenario::load(path)?,
            format!(" --scenario {}", path.display()),
        ),
        None => {
            let scenario: ControlScenario = toml::from_str(DEFAULT_SCENARIO)
                .context("built-in control scenario invariant: it parses")?;
            (scenario, String::new())
        }
    };
    if args.replay() {
        print_scenario(&scenario);
    }
    let started = Instant::now();
    let options = ControlOptions {
        seed: args.seed(),
        bug,
        record_trace: args.replay(),
    };
    let outcome = run_control(&scenario, &options);
    let replay = format!(
        "stretch sim --control --seed {}{source}{} --replay",
        args.seed(),
        replay_options(args)
    );
    report(&outcome, started, &replay, args.replay());
    if outcome.violation.is_some() {
        bail!("guarantee violated (seed {})", args.seed());
    }
    Ok(())
}

fn swarm(args: &SimArgs, bug: Option<stretch_control::ControlBug>) -> anyhow::Result<()> {
    let from = args.from().unwrap_or(args.seed());
    let started = Instant::now();
    let mut simulated_ns = 0u64;
    let mut failures = Vec::new();
    let (mut failovers, mut promotions, mut suspensions) = (0, 0, 0);
    for seed in from..from.saturating_add(args.seeds()) {
        let scenario = control_swarm_scenario(seed);
        if args.replay() {
            print_scenario(&scenario);
        }
        let run_started = Instant::now();
        let options = ControlOptions {
            seed,
            bug,
            record_trace: args.replay(),
        };
        let outcome = run_control(&scenario, &options);
        simulated_ns += outcome.simulated_ns;
        failovers += outcome.stats.failovers;
        promotions += outcome.stats.promotions;
        suspensions += outcome.stats.suspensions_seen;
        let replay = format!(
            "stretch sim --control --swarm --from {seed} --seeds 1{} --replay",
            replay_options(args)
        );
        if outcome.violation.is_some() || args.replay() || args.seeds() == 1 {
            report(&outcome, run_started, &replay, args.replay());
        }
        if outcome.violation.is_some() {
            failures.push(seed);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    println!(
        "control swarm: {} seeds from {from}, {} failed, {:.1} simulated s in {:.2} wall s ({:.0}x); {failovers} automatic failovers, {promotions} operator promotions, {suspensions} phase ends with a group rightly suspended",
        args.seeds(),
        failures.len(),
        simulated_ns as f64 / 1e9,
        wall,
        simulated_ns as f64 / 1e9 / wall.max(1e-9)
    );
    if !failures.is_empty() {
        bail!("failing seeds: {failures:?}");
    }
    Ok(())
}

fn report(outcome: &ControlOutcome, started: Instant, replay_command: &str, print_trace: bool) {
    if print_trace {
        crate::sim_command::print_trace(&outcome.trace);
    }
    let wall = started.elapsed().as_secs_f64();
    let simulated = outcome.simulated_ns as f64 / 1e9;
    let stats = &outcome.stats;
    let faults: Vec<&str> = stats.faults.iter().copied().collect();
    println!(
        "seed {} scenario {}: trace {:016x}; {:.2} simulated s in {:.3} wall s ({:.0}x); {} phases ({}), {} automatic failovers, {} operator promotions, {} promotions refused (another site's came first), {} takeovers left to a newer image, {} restarts, {} G1 probes, {} G5 checks",
        outcome.seed,
        outcome.scenario,
        outcome.trace_hash,
        simulated,
        wall,
        simulated / wall.max(1e-9),
        stats.phases,
        faults.join(", "),
        stats.failovers,
        stats.promotions,
        stats.promotions_refused,
        stats.takeovers_left,
        stats.restarts,
        stats.g1_probes,
        stats.g5_checks,
    );
    if let Some((violation, at)) = &outcome.violation {
        println!(
            "VIOLATION of {} at {:.3} ms, seed {}: {}",
            violation.guarantee,
            *at as f64 / 1e6,
            outcome.seed,
            violation.detail
        );
        println!("replay: {replay_command}");
    }
}
