//! The simulator's own suite: determinism, the swarm (one to three sites),
//! the planted bugs, the multi-site scenarios and the regression seeds. Run
//! in release (`cargo test --release`): debug builds run fewer swarm seeds.

use std::path::{Path, PathBuf};

use stretch_core::PlantedBug;
use stretch_sim::{Mark, Outcome, Scenario, SimBug, SimOptions, run, swarm_scenario};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scenario(name: &str) -> Scenario {
    Scenario::load(&repo().join("simulation").join(name)).expect("scenario loads")
}

fn options(seed: u64, bug: Option<SimBug>) -> SimOptions {
    SimOptions {
        seed,
        bug,
        record_trace: false,
    }
}

/// Swarm seeds the suite runs: 1,500 in release, as CI does (about 40 s
/// of one core). About two thirds of them draw two or three sites.
fn swarm_seeds() -> u64 {
    if cfg!(debug_assertions) { 20 } else { 1_500 }
}

/// Runs `each` on every item on all cores, each core taking a run of
/// consecutive items; returns the results in the items' order.
fn on_all_cores<I: Sync, T: Send>(items: &[I], each: impl Fn(&I) -> T + Sync) -> Vec<T> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = items.len().div_ceil(cores).max(1);
    let each = &each;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|share| scope.spawn(move || share.iter().map(each).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().expect("a swarm thread panicked"))
            .collect()
    })
}

#[test]
fn same_seed_same_trace() {
    let mut short = scenario("single-site.toml");
    short.duration_seconds = 2.0;
    for seed in [1, 2, 3] {
        let first = run(&short, &options(seed, None));
        let second = run(&short, &options(seed, None));
        assert_eq!(first.trace_hash, second.trace_hash, "seed {seed} diverged");
        assert_eq!(first.stats.events, second.stats.events);
        assert!(
            first.violation.is_none(),
            "seed {seed}: {:?}",
            first.violation
        );
    }
    let swarm = swarm_scenario(7);
    assert_eq!(
        run(&swarm, &options(7, None)).trace_hash,
        run(&swarm, &options(7, None)).trace_hash
    );
}

#[test]
fn different_seeds_differ() {
    let mut short = scenario("single-site.toml");
    short.duration_seconds = 1.0;
    let a = run(&short, &options(1, None)).trace_hash;
    let b = run(&short, &options(2, None)).trace_hash;
    assert_ne!(a, b, "the seed must drive the run");
}

/// `stretch sim --seed 42` prints this hash on every machine. It changes
/// only when the simulated behaviour changes on purpose: then update it,
/// and say why in the commit.
#[test]
fn seed_42_trace_hash_is_pinned() {
    let outcome = run(&scenario("single-site.toml"), &options(42, None));
    assert!(outcome.violation.is_none(), "{:?}", outcome.violation);
    assert_eq!(format!("{:016x}", outcome.trace_hash), "c690c4d09b757e5b");
}

/// Runs `scenario` (the file `simulation/FILE`) at `seed`; panics on a
/// violation with the command that replays it.
fn run_clean(scenario: &Scenario, file: &str, seed: u64) -> Outcome {
    let outcome = run(scenario, &options(seed, None));
    if let Some((violation, step, _)) = &outcome.violation {
        panic!(
            "seed {seed} step {step}: {} {} (replay: stretch sim --scenario simulation/{file} --seed {seed} --replay)",
            violation.guarantee, violation.detail
        );
    }
    outcome
}

/// The CI swarm passes, and every coverage mark is reached by at least
/// 5 % of its seeds (`stretch sim --swarm --seeds 1000 --from 1 --marks`
/// prints the shares).
#[test]
fn swarm_passes() {
    let mut failures = Vec::new();
    let mut reached = vec![0u64; Mark::ALL.len()];
    let seeds: Vec<u64> = (1..=swarm_seeds()).collect();
    let outcomes = on_all_cores(&seeds, |&seed| {
        run(&swarm_scenario(seed), &options(seed, None))
    });
    for (seed, outcome) in seeds.into_iter().zip(outcomes) {
        for (count, mark) in reached.iter_mut().zip(Mark::ALL) {
            *count += u64::from(outcome.stats.marks.count(mark) > 0);
        }
        if let Some((violation, step, _)) = outcome.violation {
            failures.push(format!(
                "seed {seed} step {step}: {} {} (replay: stretch sim --swarm --from {seed} --seeds 1 --replay)",
                violation.guarantee, violation.detail
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if cfg!(debug_assertions) {
        // Too few seeds in a debug build for shares to mean anything.
        return;
    }
    let rare: Vec<String> = Mark::ALL
        .iter()
        .zip(&reached)
        .filter(|(mark, _)| !Mark::FAST_DRAIN_FAULTS.contains(mark))
        .filter(|(_, count)| **count * 20 < swarm_seeds())
        .map(|(mark, count)| format!("{} ({count} of {})", mark.name(), swarm_seeds()))
        .collect();
    assert!(
        rare.is_empty(),
        "coverage marks reached by fewer than 5 % of the swarm's seeds: {}",
        rare.join(", ")
    );
}

/// Each planted defect is caught by the CI swarm (within its seeds), and by
/// the guarantee it breaks; the clean build passes the same seeds
/// (`swarm_passes`). The bugs are searched on all cores, each from seed 1.
/// Release only: the rarest needs a few hundred seeds.
#[test]
#[cfg_attr(debug_assertions, ignore = "needs the release build's swarm")]
fn every_planted_bug_is_caught() {
    let caught_by = |bug: SimBug| {
        (1..=swarm_seeds()).find_map(|seed| {
            run(&swarm_scenario(seed), &options(seed, Some(bug)))
                .violation
                .map(|(violation, ..)| (seed, violation))
        })
    };
    let caught = on_all_cores(&SimBug::ALL, |&bug| caught_by(bug));
    for (bug, caught) in SimBug::ALL.into_iter().zip(caught) {
        let Some((seed, violation)) = caught else {
            panic!(
                "planted bug {} went unnoticed for {} swarm seeds",
                bug.name(),
                swarm_seeds()
            );
        };
        let expected: &[&str] = match bug {
            SimBug::SkipJournalFsync => &["G4", "G3"],
            SimBug::Core(PlantedBug::AckFlushEarly) => &["G4"],
            SimBug::Core(PlantedBug::ApplyBeforeJournalSync) => &["G3", "G4"],
            // At another site the reordered apply shows as a leg that never
            // converges.
            SimBug::Core(PlantedBug::ApplyNewestFirst) => &["G2", "G3", "G6"],
            // The replica's legs skip a delta: a snapshot read or a
            // recovery there sees it (G3), a strict read there may miss the
            // delta's blocks (G2), or the leg never converges (G6).
            SimBug::Core(PlantedBug::AcceptDeltaGap) => &["G3", "G2", "G6"],
            // Found by the site-loss check.
            SimBug::Core(PlantedBug::FlushSyncLocalOnly) => &["G4"],
            // An owner write waits past its bound behind a stalled link.
            SimBug::Core(PlantedBug::StallOnFullBacklog) => &["G5"],
            SimBug::EarlyTakeover => &["G1"],
            // A survivor lacking a promised write takes the group over
            // though another holds it.
            SimBug::TakeoverIgnoresImages => &["G4"],
            // The owner's cache outgrows its bound.
            SimBug::Core(PlantedBug::CacheIgnoresBound) => &["bounds"],
            // A write the owner never accepted is reported done.
            SimBug::Core(PlantedBug::ForwardTimeoutSucceeds) => &["acks", "G2", "G4"],
            // A region the site lacks is never copied to it.
            // (or a migration's target lacks it when it takes the group
            // over: G4).
            SimBug::Core(PlantedBug::MapForgetsDirty) => &["G6", "G2", "G3", "G4"],
            SimBug::Core(PlantedBug::AbandonForgetsUnacked) => &["G6", "G2", "G3"],
            // The strict read misses the first delta the site lacks.
            SimBug::Core(PlantedBug::DiffSkipsFirstMissing) => &["G2"],
            // The old owner's leg keeps blocks the cluster dropped.
            SimBug::Core(PlantedBug::HealForgetsLostRegions) => &["G6", "G2", "G3"],
            // The target's image at the switchover lacks deltas.
            SimBug::MigrationSwitchesEarly => &["G4", "G3", "G6"],
            // A strict read served under a lease misses a write the owner
            // acknowledged before it began.
            SimBug::Core(
                PlantedBug::ReadLeaseNeverExpires
                | PlantedBug::ReadLeaseWriteBeforeRevoked
                | PlantedBug::ReadLeaseForgottenOnRestart,
            ) => &["G2"],
            // The copy lands over a write: a read misses it (G2), the
            // drain's end lacks it (G4), or the source's leg converges on
            // the target's image without it (G6).
            SimBug::Core(PlantedBug::FastDrainWritesUncopied) => &["G2", "G4", "G3", "G6"],
        };
        assert!(
            expected.contains(&violation.guarantee),
            "{} caught at seed {seed} as {}: {}",
            bug.name(),
            violation.guarantee,
            violation.detail
        );
    }
}

/// Live migrations (`simulation/migration/`): groups switch over under
/// load and every fault (with failovers at three sites), switchovers are
/// called off when the target does not catch up in time, a migration
/// gives up, and every guarantee holds (the checker judges each
/// switchover's image: G3, G4).
#[test]
fn migrations_switch_over_under_faults() {
    let seeds = if cfg!(debug_assertions) { 3 } else { 40 };
    let (mut begun, mut done, mut called_off, mut gave_up) = (0, 0, 0, 0);
    let (mut fast, mut drained) = (0, 0);
    for file in [
        "migration/two-sites.toml",
        "migration/three-sites-failover.toml",
        "migration/fast-two-sites.toml",
    ] {
        let migration = scenario(file);
        for seed in 1..=seeds {
            let outcome = run_clean(&migration, file, seed);
            begun += outcome.stats.migrations_started;
            done += outcome.stats.migrations;
            called_off += outcome.stats.switchovers_called_off;
            gave_up += outcome.stats.migrations_gave_up;
            fast += outcome.stats.fast_migrations;
            drained += outcome.stats.fast_drains_done;
        }
    }
    eprintln!(
        "{seeds} seeds of each: {begun} migrations begun, {done} switched over ({fast} fast, {drained} of their drains ended), {called_off} switchovers called off, {gave_up} gave up"
    );
    assert!(
        done > 0 && called_off > 0,
        "{done} switched, {called_off} called off"
    );
    assert!(
        fast > 0 && drained > 0,
        "{fast} fast switchovers, {drained} drains ended"
    );
    if !cfg!(debug_assertions) {
        assert!(gave_up > 0, "no migration gave up in {seeds} seeds");
    }
}

/// The planted migration defect (switch over before the target holds
/// every delta) is caught within 100 seeds of the migration scenario.
#[test]
fn a_switchover_before_the_target_holds_every_delta_is_caught() {
    let migration = scenario("migration/two-sites.toml");
    let bug = SimBug::MigrationSwitchesEarly;
    let caught = (1..=100).find_map(|seed| {
        run(&migration, &options(seed, Some(bug)))
            .violation
            .map(|(violation, ..)| (seed, violation))
    });
    let Some((seed, violation)) = caught else {
        panic!("planted bug {} went unnoticed for 100 seeds", bug.name());
    };
    // Caught at the switchover's image (G4, G3), or after the drain: the
    // old owner's leg converges on the new owner's image, which lacks the
    // acknowledged write (G6).
    assert!(
        ["G4", "G3", "G6"].contains(&violation.guarantee),
        "caught at seed {seed} as {}: {}",
        violation.guarantee,
        violation.detail
    );
}

/// Fast migrations under every fault (`simulation/migration/fast-two-sites.toml`):
/// drains end with the target's image whole, and the faults that hit a
/// drain mid-copy (a target restarting from its log, a source that does
/// not answer in time, a failover away from the target) are each reached
/// in 5 % of the seeds (the swarm holds too few fast migrations for them).
#[test]
fn fast_migrations_drain_under_faults() {
    let seeds: u64 = if cfg!(debug_assertions) { 3 } else { 200 };
    let migration = scenario("migration/fast-two-sites.toml");
    let mut reached = [0u64; Mark::FAST_DRAIN_FAULTS.len()];
    let (mut fast, mut drained) = (0, 0);
    for seed in 1..=seeds {
        let outcome = run_clean(&migration, "migration/fast-two-sites.toml", seed);
        fast += outcome.stats.fast_migrations;
        drained += outcome.stats.fast_drains_done;
        for (count, mark) in reached.iter_mut().zip(Mark::FAST_DRAIN_FAULTS) {
            *count += u64::from(outcome.stats.marks.count(mark) > 0);
        }
    }
    let shares: Vec<String> = Mark::FAST_DRAIN_FAULTS
        .iter()
        .zip(&reached)
        .map(|(mark, count)| format!("{} {count} of {seeds}", mark.name()))
        .collect();
    eprintln!(
        "{seeds} seeds: {fast} fast switchovers, {drained} drains ended; {}",
        shares.join(", ")
    );
    assert!(fast > 0 && drained > 0, "{fast} fast, {drained} drained");
    if cfg!(debug_assertions) {
        return;
    }
    let rare: Vec<&String> = shares
        .iter()
        .zip(&reached)
        .filter(|(_, count)| **count * 20 < seeds)
        .map(|(share, _)| share)
        .collect();
    assert!(
        rare.is_empty(),
        "reached by fewer than 5 % of the seeds: {rare:?}"
    );
}

/// The planted fast-mode defect (the target writes a region it has not
/// copied yet, and the copy lands over the write) is caught within 100
/// seeds of the fast migration scenario.
#[test]
fn a_fast_target_writing_what_it_has_not_copied_is_caught() {
    let migration = scenario("migration/fast-two-sites.toml");
    let bug = SimBug::Core(PlantedBug::FastDrainWritesUncopied);
    let caught = (1..=100).find_map(|seed| {
        run(&migration, &options(seed, Some(bug)))
            .violation
            .map(|(violation, ..)| (seed, violation))
    });
    let Some((seed, violation)) = caught else {
        panic!("planted bug {} went unnoticed for 100 seeds", bug.name());
    };
    assert!(
        ["G2", "G4", "G3", "G6"].contains(&violation.guarantee),
        "caught at seed {seed} as {}: {}",
        violation.guarantee,
        violation.detail
    );
}

/// Failovers on the data path (`simulation/failover/two-sites.toml`):
/// groups move, acknowledged writes are lost and reported, and every
/// guarantee holds.
#[test]
fn failovers_run_clean() {
    let failover = scenario("failover/two-sites.toml");
    let seeds = if cfg!(debug_assertions) { 3 } else { 40 };
    let (mut failovers, mut lost) = (0, 0);
    for seed in 1..=seeds {
        let outcome = run_clean(&failover, "failover/two-sites.toml", seed);
        failovers += outcome.stats.failovers;
        lost += outcome.stats.failover_lost_writes;
    }
    assert!(
        failovers >= seeds,
        "{failovers} groups failed over in {seeds} runs"
    );
    assert!(
        lost > 0,
        "no failover lost an acknowledged write: the loss report is never checked"
    );
}

/// The planted takeover that does not wait for the old owner's lease is
/// caught by G1: the old owner acknowledges a write after the new one took
/// its group.
#[test]
fn early_takeover_is_caught_by_g1() {
    let failover = scenario("failover/two-sites.toml");
    let caught = (1..=20).find_map(|seed| {
        run(&failover, &options(seed, Some(SimBug::EarlyTakeover)))
            .violation
            .map(|(violation, ..)| (seed, violation))
    });
    let Some((seed, violation)) = caught else {
        panic!("early-takeover went unnoticed for 20 seeds");
    };
    assert_eq!(
        violation.guarantee, "G1",
        "caught at seed {seed} as {}: {}",
        violation.guarantee, violation.detail
    );
}

/// The multi-site scenarios: same seed, same run; clean for a few seeds.
#[test]
fn multi_site_scenarios_are_deterministic_and_clean() {
    for name in ["two-sites.toml", "three-sites.toml"] {
        let mut short = scenario(name);
        short.duration_seconds = 3.0;
        for seed in [1, 2, 3] {
            let first = run(&short, &options(seed, None));
            let second = run(&short, &options(seed, None));
            assert!(
                first.violation.is_none(),
                "{name} seed {seed}: {:?} (replay: stretch sim --scenario simulation/{name} --seed {seed} --duration 3 --replay)",
                first.violation
            );
            assert_eq!(
                first.trace_hash, second.trace_hash,
                "{name} seed {seed} diverged"
            );
            assert_eq!(first.stats.events, second.stats.events);
        }
    }
}

/// `stretch sim --scenario simulation/two-sites.toml --seed 42` prints this
/// hash. Like the single-site one, it changes only when the simulated
/// behaviour changes on purpose.
#[test]
fn two_sites_seed_42_trace_hash_is_pinned() {
    let outcome = run(&scenario("two-sites.toml"), &options(42, None));
    assert!(outcome.violation.is_none(), "{:?}", outcome.violation);
    assert_eq!(format!("{:016x}", outcome.trace_hash), "b825fdb167185a14");
}

/// The multi-site checks only prove something if their situations happen:
/// the network loses messages with their connections, requests at sites
/// that do not own the volume fail while the owner is unreachable,
/// snapshot reads run, sites are refused them mid-resync, and site-loss
/// checks run.
#[test]
fn multi_site_runs_exercise_the_network_faults_and_checks() {
    let mut totals = stretch_sim::Stats::default();
    for seed in 1..=12 {
        let outcome = run(&scenario("two-sites.toml"), &options(seed, None));
        assert!(
            outcome.violation.is_none(),
            "seed {seed}: {:?}",
            outcome.violation
        );
        let stats = outcome.stats;
        totals.remote_requests += stats.remote_requests;
        totals.remote_failures += stats.remote_failures;
        totals.snapshot_reads += stats.snapshot_reads;
        totals.snapshot_refusals += stats.snapshot_refusals;
        totals.messages_lost += stats.messages_lost;
        totals.link_faults += stats.link_faults;
        totals.site_loss_checks += stats.site_loss_checks;
        totals.crashes += stats.crashes;
    }
    assert!(totals.remote_requests > 1000, "{totals:?}");
    assert!(totals.remote_failures > 0, "{totals:?}");
    assert!(totals.snapshot_reads > 100, "{totals:?}");
    assert!(totals.snapshot_refusals > 0, "{totals:?}");
    assert!(totals.messages_lost > 0, "{totals:?}");
    assert!(totals.link_faults > 10, "{totals:?}");
    assert!(totals.site_loss_checks > 5, "{totals:?}");
    assert!(totals.crashes > 10, "{totals:?}");
}

#[test]
fn regression_seeds_pass() {
    #[derive(serde::Deserialize)]
    struct Entry {
        scenario: String,
        seed: u64,
    }
    #[derive(serde::Deserialize)]
    struct Regressions {
        seed: Vec<Entry>,
    }
    let path = repo().join("simulation/regressions/seeds.toml");
    let text = std::fs::read_to_string(&path).expect("regressions file");
    let list: Regressions = toml::from_str(&text).expect("regressions parse");
    assert!(!list.seed.is_empty());
    for entry in list.seed {
        let scenario = if entry.scenario == "swarm" {
            swarm_scenario(entry.seed)
        } else {
            scenario(&entry.scenario)
        };
        let outcome = run(&scenario, &options(entry.seed, None));
        assert!(
            outcome.violation.is_none(),
            "regression {} seed {}: {:?}",
            entry.scenario,
            entry.seed,
            outcome.violation
        );
    }
}

#[test]
fn every_scenario_file_runs_clean() {
    for entry in std::fs::read_dir(repo().join("simulation")).expect("simulation/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|ext| ext != "toml") {
            continue;
        }
        let mut scenario = Scenario::load(&path).unwrap_or_else(|error| panic!("{error}"));
        scenario.duration_seconds = scenario.duration_seconds.min(3.0);
        let outcome = run(&scenario, &options(3, None));
        assert!(
            outcome.violation.is_none(),
            "{}: {:?}",
            path.display(),
            outcome.violation
        );
        assert!(outcome.stats.requests > 0);
    }
}

#[test]
fn bad_scenario_files_are_refused_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("stretch-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[topology]\nvolumes = 0\n").expect("write");
    let error = Scenario::load(&path).expect_err("zero volumes");
    assert!(error.to_string().contains("volumes"), "{error}");
    std::fs::write(&path, "[workload]\nclientz = 3\n").expect("write");
    let error = Scenario::load(&path).expect_err("unknown key");
    assert!(error.to_string().contains("clientz"), "{error}");
    std::fs::write(&path, "[engine]\nregion_blocks = 0\n").expect("write");
    let error = Scenario::load(&path).expect_err("empty regions");
    assert!(error.to_string().contains("region_blocks"), "{error}");
    std::fs::write(&path, "[network]\nfar_site_delay_ms = 20000\n").expect("write");
    let error = Scenario::load(&path).expect_err("a far site beyond the bound");
    assert!(error.to_string().contains("far_site_delay_ms"), "{error}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A link silent for seconds before anyone notices, cut for longer: the
/// owner's writes go on within their bound (G5) on every seed, and the
/// planted stall (today's fix undone) is caught on every seed.
#[test]
fn a_partition_never_stalls_the_owners_writes() {
    let scenario = scenario("partition-stall.toml");
    for seed in 1..=4 {
        let clean = run(&scenario, &options(seed, None));
        assert!(
            clean.violation.is_none(),
            "seed {seed}: {:?}",
            clean.violation
        );
        assert!(
            clean.stats.backlog_folds > 0 || clean.stats.backlog_throttled_writes > 0,
            "seed {seed}: the backlog never filled; the scenario proves nothing"
        );
        let (violation, ..) = run(
            &scenario,
            &options(seed, Some(SimBug::Core(PlantedBug::StallOnFullBacklog))),
        )
        .violation
        .unwrap_or_else(|| panic!("seed {seed}: the planted stall went unnoticed"));
        assert_eq!(violation.guarantee, "G5", "{}", violation.detail);
    }
}
