//! The control-plane simulation: the shipped scenario and a swarm of drawn
//! ones pass, a run repeats bit for bit, and each planted control bug is
//! caught by the guarantee it breaks within 100 swarm seeds.

use std::path::Path;

use stretch_sim::control::{
    CONTROL_BUGS, ControlOptions, ControlOutcome, ControlScenario, control_swarm_scenario,
    run_control,
};

/// Seeds of the clean swarm run by `cargo test` (the CI swarm).
const SWARM_SEEDS: u64 = 60;

fn run(
    scenario: &ControlScenario,
    seed: u64,
    bug: Option<stretch_control::ControlBug>,
) -> ControlOutcome {
    run_control(
        scenario,
        &ControlOptions {
            seed,
            bug,
            record_trace: false,
        },
    )
}

fn replay_hint(outcome: &ControlOutcome) -> String {
    format!(
        "seed {} failed: {:?}\nreplay: stretch sim --control --swarm --from {} --seeds 1 --replay",
        outcome.seed, outcome.violation, outcome.seed
    )
}

#[test]
fn every_shipped_control_scenario_passes() {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../simulation/control");
    let mut scenarios = 0;
    for entry in std::fs::read_dir(&directory).expect("simulation/control/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|ext| ext != "toml") {
            continue;
        }
        let scenario = ControlScenario::load(&path).unwrap_or_else(|error| panic!("{error}"));
        scenarios += 1;
        for seed in 1..=3 {
            let outcome = run(&scenario, seed, None);
            assert!(
                outcome.violation.is_none(),
                "{}: {}",
                path.display(),
                replay_hint(&outcome)
            );
            assert!(
                outcome.stats.g5_checks >= u64::from(scenario.phases),
                "every phase was checked"
            );
        }
    }
    assert!(
        scenarios > 0,
        "simulation/control/ holds the shipped scenarios"
    );
}

#[test]
fn with_three_data_sites_the_survivors_race_to_promote_and_one_wins() {
    let scenario = ControlScenario::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../simulation/control/three-sites.toml"),
    )
    .expect("the three-site control scenario loads");
    let (mut refused, mut left) = (0, 0);
    for seed in 1..=6 {
        let outcome = run(&scenario, seed, None);
        assert!(outcome.violation.is_none(), "{}", replay_hint(&outcome));
        refused += outcome.stats.promotions_refused;
        left += outcome.stats.takeovers_left;
    }
    assert!(refused > 0, "no promotion lost a race in six seeds");
    // Survivors offer their images first: one holding an older image
    // leaves the group to the one holding the newest.
    assert!(left > 0, "no survivor left a takeover to a newer image");
}

#[test]
fn a_run_repeats_bit_for_bit() {
    let scenario = control_swarm_scenario(7);
    let first = run(&scenario, 7, None);
    let second = run(&scenario, 7, None);
    assert_eq!(first.trace_hash, second.trace_hash);
    assert_eq!(first.simulated_ns, second.simulated_ns);
    let other = run(&scenario, 8, None);
    assert_ne!(
        first.trace_hash, other.trace_hash,
        "another seed is another run"
    );
}

#[test]
fn the_swarm_passes_and_covers_every_fault() {
    let mut faults = std::collections::BTreeSet::new();
    let (mut failovers, mut promotions, mut suspensions) = (0, 0, 0);
    for seed in 1..=SWARM_SEEDS {
        let outcome = run(&control_swarm_scenario(seed), seed, None);
        assert!(outcome.violation.is_none(), "{}", replay_hint(&outcome));
        faults.extend(outcome.stats.faults.iter().copied());
        failovers += outcome.stats.failovers;
        promotions += outcome.stats.promotions;
        suspensions += outcome.stats.suspensions_seen;
    }
    for fault in [
        "cut",
        "one-way",
        "isolate",
        "site-down",
        "flap",
        "restart-leader",
    ] {
        assert!(faults.contains(fault), "no seed drew a {fault} phase");
    }
    assert!(failovers > 0, "no seed failed a group over by itself");
    assert!(promotions > 0, "no seed had an operator promote a group");
    assert!(
        suspensions > 0,
        "no seed ended a phase with a group rightly suspended"
    );
}

#[test]
fn every_planted_control_bug_is_caught_by_g1() {
    for (name, bug) in CONTROL_BUGS {
        let caught = (1..=100).find(|seed| {
            let outcome = run(&control_swarm_scenario(*seed), *seed, Some(bug));
            outcome
                .violation
                .is_some_and(|(violation, _)| violation.guarantee == "G1")
        });
        assert!(
            caught.is_some(),
            "planted bug {name} was not caught by G1 in 100 seeds"
        );
    }
}

#[test]
fn a_bad_control_scenario_is_refused_with_a_reason() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let cases = [
        ("data_sites = 5\n", "data_sites must be 2 or 3"),
        ("witness = false\n", "add a witness"),
        (
            "phase_seconds_min = 2.0\nphase_seconds_max = 3.0\n",
            "phase_seconds_min must be at least",
        ),
        ("bogus = 1\n", "unknown field"),
        (
            "[lease]\nlease_ms = 500\nrenew_ms = 300\n",
            "lease_ms must outlive two renewals",
        ),
    ];
    for (index, (text, reason)) in cases.into_iter().enumerate() {
        let path = directory.path().join(format!("bad-{index}.toml"));
        std::fs::write(&path, text).expect("write the scenario");
        let error = ControlScenario::load(&path).expect_err(text).to_string();
        assert!(error.contains(reason), "{text:?}: {error}");
        assert!(error.contains(&path.display().to_string()), "{error}");
    }
    let missing = directory.path().join("missing.toml");
    let error = ControlScenario::load(&missing)
        .expect_err("missing file")
        .to_string();
    assert!(error.contains("cannot read scenario"), "{error}");
}
