//! Live migration end to end under `stretch up` (sites a and b 25 ms
//! apart), driven by real clients: fio with verification writes a volume
//! while its group migrates from a to b and back, and sees no error; what
//! it wrote verifies at either site afterwards and the legs are equal. A
//! migration whose backlog cannot converge over a slow link gives up with
//! the reason and leaves the group at the source; one in flight is listed
//! and cancelled; bad requests are refused with one line. Fast mode moves
//! ownership first: fio runs on across it both ways; a source killed
//! while the target copies what it lacks leaves the copy waiting until it
//! returns, with nothing lost, or is given up for (accept-loss); a target
//! killed mid-copy fails the group back to the source.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::sites::{A, B, Layout, TwoSites};
use common::*;

const MIB: u64 = 1 << 20;

/// One fio job on a slice of a volume: 4 KiB random writes, each block
/// once, with a checksum header that a later `--verify_only` run checks.
struct FioJob {
    name: &'static str,
    offset_mib: u64,
    size_mib: u64,
    rate_iops: u64,
}

impl FioJob {
    fn args(&self, uri: &str, report: &Path) -> Vec<String> {
        vec![
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            format!("--name={}", self.name),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            format!("--offset={}m", self.offset_mib),
            format!("--size={}m", self.size_mib),
            "--iodepth=8".into(),
            format!("--rate_iops={}", self.rate_iops),
            "--randseed=7".into(),
            "--verify=crc32c".into(),
            "--do_verify=1".into(),
            "--output-format=json".into(),
            format!("--output={}", report.display()),
        ]
    }

    /// Starts the writes (then the verification) in the background.
    fn spawn(&self, dir: &Path, uri: &str) -> (Child, PathBuf) {
        let report = dir.join(format!("fio-{}-{}.json", self.name, std::process::id()));
        let child = Command::new("fio")
            .current_dir(dir)
            .args(self.args(uri, &report))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting fio");
        (child, report)
    }

    /// Reads back what the job wrote and checks every block's header.
    fn verify_only(&self, dir: &Path, uri: &str) {
        let report = dir.join(format!("fio-{}-verify.json", self.name));
        let mut args = self.args(uri, &report);
        args.push("--verify_only".into());
        let result = run(
            Command::new("fio").current_dir(dir).args(&args),
            None,
            COMMAND_TIMEOUT,
        );
        let text = std::fs::read_to_string(&report).unwrap_or_default();
        assert!(
            result.success(),
            "fio --verify_only {}: {result}\n{text}",
            self.name
        );
        let job = job_report(&text);
        assert_eq!(job["error"].as_u64(), Some(0), "{job}");
        assert_eq!(
            job["read"]["io_bytes"].as_u64(),
            Some(self.size_mib * MIB),
            "every block read back: {job}"
        );
    }

    /// Waits for the job; asserts it wrote and verified everything
    /// without an error. Returns its longest write latency, in ms.
    fn finish(&self, child: Child, report: &Path) -> f64 {
        let output = child.wait_with_output().expect("waiting for fio");
        let text = std::fs::read_to_string(report).unwrap_or_default();
        assert!(
            output.status.success(),
            "fio {} failed across the migration: {}\n{text}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        let job = job_report(&text);
        assert_eq!(job["error"].as_u64(), Some(0), "{job}");
        assert_eq!(
            job["write"]["io_bytes"].as_u64(),
            Some(self.size_mib * MIB),
            "{job}"
        );
        assert_eq!(
            job["read"]["io_bytes"].as_u64(),
            Some(self.size_mib * MIB),
            "verified: {job}"
        );
        job["write"]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6
    }
}

fn job_report(text: &str) -> serde_json::Value {
    let report: serde_json::Value = serde_json::from_str(text)
        .unwrap_or_else(|error| panic!("fio's report is not JSON ({error}):\n{text}"));
    report["jobs"][0].clone()
}

fn owner(sites: &TwoSites, node: usize, volume: &str) -> (String, u64) {
    let text = http_get(&sites.url(node), &format!("/v1/volumes/{volume}")).unwrap_or_default();
    let info: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    (
        info["owner"].as_str().unwrap_or_default().to_string(),
        info["epoch"].as_u64().unwrap_or(0),
    )
}

/// The pause the CLI reports (`writes paused N ms`).
fn pause_ms(output: &str) -> u64 {
    output
        .split("writes paused ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no pause in {output:?}"))
}

/// For the tests that need a link slower than the writes: qemu-io writes
/// patterns, which LZ4 shrinks a thousandfold on a compressing link, so
/// their link carries blocks raw.
const RAW_LINK: (&str, &str) = ("link_compression = \"lz4\"", "link_compression = \"off\"");

#[test]
fn a_volume_written_by_fio_migrates_to_b_and_back_without_an_error() {
    require_tool("fio");
    require_tool("qemu-img");
    let sites = TwoSites::start(Layout::OneProcess, &[]);
    sites.ok(A, &["volume", "create", "vm", "--size", "64M"]);
    let dir = sites.dir.path().to_path_buf();

    // At a, the VM writes; the group moves to b under it. fio's client
    // stays connected at a: its writes are held at the switchover, then
    // forwarded to b, and its verification reads come from b.
    let first = FioJob {
        name: "first",
        offset_mib: 0,
        size_mib: 8,
        rate_iops: 500,
    };
    let (fio, report) = first.spawn(&dir, &sites.nbd_uri(A, "vm"));
    std::thread::sleep(Duration::from_millis(1500));
    let moved = sites.ok(A, &["volume", "migrate", "vm", "--to", "b"]);
    assert!(moved.contains("migrated volume vm from a to b"), "{moved}");
    assert_eq!(owner(&sites, B, "vm"), ("b".to_string(), 2));
    let longest_first = first.finish(fio, &report);
    let pause_to_b = pause_ms(&moved);

    // The VM now runs at b and writes there; the group moves back to a.
    let second = FioJob {
        name: "second",
        offset_mib: 32,
        size_mib: 8,
        rate_iops: 500,
    };
    let (fio, report) = second.spawn(&dir, &sites.nbd_uri(B, "vm"));
    std::thread::sleep(Duration::from_millis(1500));
    let back = sites.ok(B, &["volume", "migrate", "vm", "--to", "a"]);
    assert!(back.contains("migrated volume vm from b to a"), "{back}");
    assert_eq!(owner(&sites, A, "vm"), ("a".to_string(), 3));
    let longest_second = second.finish(fio, &report);
    let pause_to_a = pause_ms(&back);

    // Every block either job wrote verifies at both sites.
    for job in [&first, &second] {
        for node in [A, B] {
            job.verify_only(&dir, &sites.nbd_uri(node, "vm"));
        }
    }
    let listed = sites.ok(A, &["migration", "list"]);
    assert!(listed.contains("done"), "{listed}");
    // Each node counts the migrations it drove and the pauses.
    for node in [A, B] {
        let metrics = sites.metrics(node);
        assert_eq!(
            metric_value(&metrics, "stretch_migrations_total", &["outcome=\"done\""]),
            Some(1.0),
            "{metrics}"
        );
        assert_eq!(
            metric_value(&metrics, "stretch_migration_pause_seconds_count", &[]),
            Some(1.0)
        );
    }
    sites.wait_replicated_from(A, B, Duration::from_secs(60));
    assert_legs_equal(&sites, "vm");
    eprintln!(
        "a->b: writes paused {pause_to_b} ms, fio's longest write {longest_first:.1} ms; \
         b->a: paused {pause_to_a} ms, longest write {longest_second:.1} ms"
    );
}

#[test]
fn a_migration_that_cannot_converge_gives_up_and_one_in_flight_is_cancelled() {
    require_tool("qemu-io");
    let sites = TwoSites::start(Layout::OneProcess, &[RAW_LINK]);
    sites.ok(A, &["volume", "create", "vm", "--size", "64M"]);
    sites.ok(A, &["volume", "create", "other", "--size", "8M"]);
    let uri = sites.nbd_uri(A, "vm");

    // Bad requests: one line each, nothing recorded.
    let elsewhere = sites.cli(B, &["volume", "migrate", "vm", "--to", "b"]);
    assert!(
        !elsewhere.success() && elsewhere.stderr.contains("owns volume"),
        "{elsewhere}"
    );
    let unknown = sites.cli(A, &["volume", "migrate", "vm", "--to", "zz"]);
    assert!(
        !unknown.success() && unknown.stderr.contains("\"zz\""),
        "{unknown}"
    );
    let zero = sites.cli(
        A,
        &["volume", "migrate", "vm", "--to", "b", "--timeout", "0"],
    );
    assert!(!zero.success() && zero.stderr.contains("timeout"), "{zero}");
    let sideways = sites.cli(
        A,
        &["volume", "migrate", "vm", "--to", "b", "--mode", "sideways"],
    );
    assert!(
        !sideways.success() && sideways.stderr.contains("sideways"),
        "{sideways}"
    );
    let not_draining = sites.cli(A, &["volume", "accept-loss", "vm", "--accept-data-loss"]);
    assert!(
        !not_draining.success() && not_draining.stderr.contains("no fast migration"),
        "{not_draining}"
    );
    let unconfirmed = sites.cli(A, &["volume", "accept-loss", "vm"]);
    assert!(
        !unconfirmed.success() && unconfirmed.stderr.contains("--accept-data-loss"),
        "{unconfirmed}"
    );
    let no_group = sites.cli(A, &["volume", "migrate", "--group", "nope", "--to", "b"]);
    assert!(!no_group.success(), "{no_group}");
    let none = sites.cli(A, &["migration", "cancel", "vm"]);
    assert!(
        !none.success() && none.stderr.contains("no migration"),
        "{none}"
    );

    // The link drains 2 Mbit/s (0.25 MiB/s); a writes 4 MiB that b lacks
    // and keeps writing: the backlog cannot reach the switch point in 3 s.
    sites.ok(A, &["link", "set", "a", "b", "--bandwidth-mbit", "2"]);
    qemu_io_ok(&uri, &["write -P 7 0 4M", "flush"]);
    let gave_up = sites.cli(
        A,
        &["volume", "migrate", "vm", "--to", "b", "--timeout", "3"],
    );
    assert!(!gave_up.success(), "{gave_up}");
    assert!(
        gave_up.stderr.contains("gave-up") && gave_up.stderr.contains("did not converge"),
        "{gave_up}"
    );
    assert!(gave_up.stderr.contains("stays at a"), "{gave_up}");
    assert_eq!(owner(&sites, A, "vm"), ("a".to_string(), 1));
    // The group was never held: the volume takes writes at a at once.
    qemu_io_ok(&uri, &["write -P 8 4M 64k", "flush"]);

    // One in flight is listed, then cancelled; the group stays at a.
    let started = sites.ok(
        A,
        &[
            "volume",
            "migrate",
            "vm",
            "--to",
            "b",
            "--no-wait",
            "--timeout",
            "600",
        ],
    );
    assert!(started.contains("migration list"), "{started}");
    let listed = sites.ok(A, &["migration", "list"]);
    assert!(
        listed.contains("vm") && listed.contains("catching-up"),
        "{listed}"
    );
    // A node that does not drive it shows it as recorded.
    sites.wait_until("b applied the record", Duration::from_secs(10), || {
        sites.ok(B, &["migration", "list"]).contains("recorded")
    });
    let cancelled = sites.ok(A, &["migration", "cancel", "vm"]);
    assert!(cancelled.contains("stay at a"), "{cancelled}");
    sites.wait_until("the driver saw the cancel", Duration::from_secs(10), || {
        sites.ok(A, &["migration", "list"]).contains("cancelled")
    });
    assert_eq!(owner(&sites, A, "vm"), ("a".to_string(), 1));
    qemu_io_ok(&uri, &["read -P 7 0 4M", "read -P 8 4M 64k"]);

    // A partition while catching up: the group stays at a (writes go on
    // there) until the link heals, then the migration completes.
    qemu_io_ok(&uri, &["write -P 9 8M 2M", "flush"]);
    sites.ok(
        A,
        &[
            "volume",
            "migrate",
            "vm",
            "--to",
            "b",
            "--no-wait",
            "--timeout",
            "600",
        ],
    );
    sites.ok(A, &["link", "cut", "a", "b"]);
    std::thread::sleep(Duration::from_secs(2));
    let listed = sites.ok(A, &["migration", "list"]);
    assert!(listed.contains("catching-up"), "{listed}");
    assert_eq!(owner(&sites, A, "vm"), ("a".to_string(), 1));
    qemu_io_ok(&uri, &["write -P 10 10M 64k", "flush"]);
    // An idle group whose target applied everything before the cut does
    // not switch over to a target it cannot reach: its switchovers are
    // called off until the link heals.
    sites.ok(
        A,
        &[
            "volume",
            "migrate",
            "other",
            "--to",
            "b",
            "--no-wait",
            "--timeout",
            "600",
        ],
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(owner(&sites, A, "other"), ("a".to_string(), 1));
    sites.ok(A, &["link", "heal", "a", "b"]);
    sites.ok(A, &["link", "set", "a", "b", "--bandwidth-mbit", "0"]);
    sites.wait_until(
        "the migrations completed after the heal",
        Duration::from_secs(60),
        || {
            owner(&sites, A, "vm") == ("b".to_string(), 2)
                && owner(&sites, A, "other") == ("b".to_string(), 2)
        },
    );
    qemu_io_ok(
        &sites.nbd_uri(B, "vm"),
        &[
            "read -P 7 0 4M",
            "read -P 8 4M 64k",
            "read -P 9 8M 2M",
            "read -P 10 10M 64k",
        ],
    );

    // --group moves every volume of a consistency group together.
    for disk in ["disk1", "disk2"] {
        sites.ok(
            A,
            &["volume", "create", disk, "--size", "8M", "--group", "vm2"],
        );
    }
    let moved = sites.ok(A, &["volume", "migrate", "--group", "vm2", "--to", "b"]);
    assert!(
        moved.contains("group vm2 (disk1, disk2)") && moved.contains("to b"),
        "{moved}"
    );
    for disk in ["disk1", "disk2"] {
        assert_eq!(owner(&sites, B, disk), ("b".to_string(), 2));
    }
}

/// a and b as separate `stretch node` processes, both holding leases, a
/// sending to b at 2 Mbit/s: `vm` (created with `create_options`) takes
/// 4 MiB of 5s at a, which b lacks for about 16 s, and a migration of it
/// to b starts here without waiting (`migrate_options`: a drain keeps
/// catching up that long; a fast one switches over at once and copies
/// that long). Returns the sites and vm's export at a.
fn separate_nodes_migrating_over_a_slow_link(
    create_options: &[&str],
    migrate_options: &[&str],
) -> (TwoSites, String) {
    require_tool("qemu-io");
    let sites = TwoSites::start(Layout::ProcessPerNode, &[RAW_LINK]);
    sites.wait_until("a and b hold leases", Duration::from_secs(30), || {
        [A, B]
            .iter()
            .all(|node| sites.status(*node)["lease"]["valid"] == true)
    });
    let mut create = vec!["volume", "create", "vm", "--size", "64M"];
    create.extend_from_slice(create_options);
    sites.ok(A, &create);
    let uri = sites.nbd_uri(A, "vm");
    sites.ok(A, &["link", "set", "a", "b", "--bandwidth-mbit", "2"]);
    qemu_io_ok(&uri, &["write -P 5 0 4M", "flush"]);
    let mut migrate = vec!["volume", "migrate", "vm", "--to", "b", "--no-wait"];
    migrate.extend_from_slice(migrate_options);
    let started = sites.ok(A, &migrate);
    assert!(started.contains("migration list"), "{started}");
    (sites, uri)
}

/// As [`separate_nodes_migrating_over_a_slow_link`], in fast mode, once b
/// owns the group.
fn separate_nodes_switched_over_fast(create_options: &[&str]) -> (TwoSites, String) {
    let (sites, uri) =
        separate_nodes_migrating_over_a_slow_link(create_options, &["--mode", "fast"]);
    sites.wait_until("b owns the group", Duration::from_secs(30), || {
        owner(&sites, B, "vm") == ("b".to_string(), 2)
    });
    (sites, uri)
}

/// The legs of `volume` at a and b hold the same bytes.
fn assert_legs_equal(sites: &TwoSites, volume: &str) {
    let compare = run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(sites.leg(A, volume))
            .arg(sites.leg(B, volume)),
        None,
        COMMAND_TIMEOUT,
    );
    compare.assert_ok();
}

#[test]
fn a_migration_left_by_a_restarted_source_is_cancelled_and_the_group_stays() {
    let (mut sites, uri) = separate_nodes_migrating_over_a_slow_link(&[], &["--timeout", "600"]);
    sites.wait_until("b applied the record", Duration::from_secs(10), || {
        sites.ok(B, &["migration", "list"]).contains("recorded")
    });
    // The source's node dies mid-migration; the record stays in the
    // metadata until the restarted node cancels it.
    sites.kill9(A);
    sites.start_node(A);
    sites.wait_until(
        "the restarted source cancelled the migration it no longer drives",
        Duration::from_secs(60),
        || !sites.ok(B, &["migration", "list"]).contains("recorded"),
    );
    assert_eq!(owner(&sites, A, "vm"), ("a".to_string(), 1));
    sites.wait_until(
        "the restarted node says why it cancelled",
        Duration::from_secs(10),
        || sites.logs().contains("the node restarted during it"),
    );
    sites.wait_until("a holds its lease again", Duration::from_secs(30), || {
        sites.status(A)["lease"]["valid"] == true
    });
    qemu_io_ok(&uri, &["read -P 5 0 4M", "write -P 6 4M 64k", "flush"]);
    // A new migration of the group goes through.
    let moved = sites.ok(A, &["volume", "migrate", "vm", "--to", "b"]);
    assert!(moved.contains("to b"), "{moved}");
    qemu_io_ok(
        &sites.nbd_uri(B, "vm"),
        &["read -P 5 0 4M", "read -P 6 4M 64k"],
    );
}

/// Ownership follows the workload: a group set to `follow auto` whose
/// requests come from b (fio at b's export; its writes are forwarded to
/// the owner a) migrates to b by itself, once, under the writes, and stays
/// there; a group left `off` under the same workload stays at a.
#[test]
fn a_group_set_to_follow_its_workload_moves_to_where_the_workload_runs() {
    require_tool("fio");
    let sites = TwoSites::start(
        Layout::OneProcess,
        &[
            ("follow_window_ms = 60000", "follow_window_ms = 2000"),
            (
                "follow_interval_between_moves_ms = 600000",
                "follow_interval_between_moves_ms = 3000",
            ),
            (
                "follow_requests_per_second_min = 10",
                "follow_requests_per_second_min = 20",
            ),
        ],
    );
    sites.ok(A, &["volume", "create", "vm", "--size", "64M"]);
    sites.ok(A, &["volume", "create", "still", "--size", "64M"]);
    let set = sites.ok(A, &["volume", "follow", "vm", "auto"]);
    assert!(
        set.contains("group vm (volume vm) follows its workload"),
        "{set}"
    );
    sites.wait_until("b sees the setting", Duration::from_secs(10), || {
        sites
            .ok(B, &["volume", "show", "vm"])
            .contains("follow: auto")
    });
    assert!(
        sites
            .ok(A, &["volume", "show", "still"])
            .contains("follow: off")
    );
    // Bad input is refused with the reason.
    let bad = sites.cli(A, &["volume", "follow", "vm", "sometimes"]);
    assert!(!bad.success(), "{bad}");
    assert!(bad.stderr.contains("possible values"), "{bad}");
    let unknown = sites.cli(A, &["volume", "follow", "nope", "auto"]);
    assert!(!unknown.success(), "{unknown}");
    assert!(unknown.stderr.contains("nope"), "{unknown}");

    let dir = sites.dir.path().to_path_buf();
    let jobs = [
        (
            "vm",
            FioJob {
                name: "followed",
                offset_mib: 0,
                size_mib: 8,
                rate_iops: 300,
            },
        ),
        (
            "still",
            FioJob {
                name: "unfollowed",
                offset_mib: 0,
                size_mib: 8,
                rate_iops: 300,
            },
        ),
    ];
    let running: Vec<_> = jobs
        .iter()
        .map(|(volume, job)| job.spawn(&dir, &sites.nbd_uri(B, volume)))
        .collect();
    sites.wait_until(
        "vm follows its workload to b",
        Duration::from_secs(30),
        || owner(&sites, B, "vm").0 == "b",
    );
    for ((_, job), (child, report)) in jobs.iter().zip(running) {
        job.finish(child, &report);
    }
    for (volume, job) in &jobs {
        job.verify_only(&dir, &sites.nbd_uri(B, volume));
    }
    assert_eq!(owner(&sites, A, "still"), ("a".to_string(), 1));
    assert_eq!(owner(&sites, B, "vm"), ("b".to_string(), 2));
    // The owner shows where the workload runs.
    let shown = sites.ok(A, &["volume", "show", "still"]);
    assert!(
        shown.contains("since this owner took the group (b 100%)"),
        "{shown}"
    );
    let metrics = sites.metrics(A);
    assert_eq!(
        metric_value(
            &metrics,
            "stretch_follow_decisions_total",
            &["outcome=\"migrating\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "stretch_migrations_total", &["outcome=\"done\""]),
        Some(1.0),
        "{metrics}"
    );
    let logs = sites.logs();
    assert!(
        logs.contains("following the workload") && logs.contains("came from b"),
        "the decision is logged with its reason:\n{logs}"
    );
    // At b the workload is local: past another interval, nothing moves.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(owner(&sites, B, "vm"), ("b".to_string(), 2));
    assert_eq!(
        metric_value(
            &sites.metrics(B),
            "stretch_follow_decisions_total",
            &["outcome=\"migrating\""]
        ),
        None
    );
}

/// The target dies while it catches up (kill -9 of b's node, separate
/// processes): ownership never moves to a site the source cannot reach;
/// the group keeps taking writes at a meanwhile; once b is back it
/// catches up (what it missed while down included) and the same
/// migration completes.
#[test]
fn a_migration_whose_target_dies_while_catching_up_completes_once_it_returns() {
    let (mut sites, uri) = separate_nodes_migrating_over_a_slow_link(&[], &["--timeout", "300"]);
    std::thread::sleep(Duration::from_secs(2));
    sites.kill9(B);
    // The source goes on taking writes while b is away.
    qemu_io_ok(&uri, &["write -P 6 4M 64k", "flush"]);
    std::thread::sleep(Duration::from_secs(4));
    let listed = sites.ok(A, &["migration", "list"]);
    assert!(listed.contains("catching-up"), "{listed}");
    assert_eq!(owner(&sites, A, "vm"), ("a".to_string(), 1));
    qemu_io_ok(&uri, &["write -P 7 8M 64k", "flush"]);
    sites.ok(A, &["link", "set", "a", "b", "--bandwidth-mbit", "0"]);
    sites.start_node(B);
    sites.wait_until(
        "the migration completes once b is back",
        Duration::from_secs(120),
        || owner(&sites, A, "vm") == ("b".to_string(), 2),
    );
    let listed = sites.ok(A, &["migration", "list"]);
    assert!(listed.contains("done"), "{listed}");
    qemu_io_ok(
        &sites.nbd_uri(B, "vm"),
        &["read -P 5 0 4M", "read -P 6 4M 64k", "read -P 7 8M 64k"],
    );
    // The writes at a still work, forwarded to the new owner.
    qemu_io_ok(&uri, &["write -P 8 12M 64k", "read -P 8 12M 64k"]);
}

/// Fast mode, a to b and back under fio with verification: ownership moves
/// at once, the target copies the regions it lacked (a link cut while fio
/// wrote left it behind), and every block verifies at both sites.
#[test]
fn a_volume_written_by_fio_migrates_fast_to_b_and_back_without_an_error() {
    require_tool("fio");
    require_tool("qemu-img");
    let sites = TwoSites::start(Layout::OneProcess, &[]);
    sites.ok(A, &["volume", "create", "vm", "--size", "64M"]);
    let dir = sites.dir.path().to_path_buf();

    let first = FioJob {
        name: "fast-first",
        offset_mib: 0,
        size_mib: 8,
        rate_iops: 500,
    };
    let (fio, report) = first.spawn(&dir, &sites.nbd_uri(A, "vm"));
    // b falls behind while the link is cut, then catches up from the
    // deltas a kept: the switchover comes while it still lacks some.
    std::thread::sleep(Duration::from_millis(500));
    sites.ok(A, &["link", "cut", "a", "b"]);
    std::thread::sleep(Duration::from_millis(1500));
    sites.ok(A, &["link", "heal", "a", "b"]);
    let moved = sites.ok(
        A,
        &["volume", "migrate", "vm", "--to", "b", "--mode", "fast"],
    );
    assert!(
        moved.contains("migrated volume vm from a to b") && moved.contains("(fast)"),
        "{moved}"
    );
    assert_eq!(owner(&sites, B, "vm"), ("b".to_string(), 2));
    let longest_first = first.finish(fio, &report);
    let pause_to_b = pause_ms(&moved);

    let second = FioJob {
        name: "fast-second",
        offset_mib: 32,
        size_mib: 8,
        rate_iops: 500,
    };
    let (fio, report) = second.spawn(&dir, &sites.nbd_uri(B, "vm"));
    std::thread::sleep(Duration::from_millis(1500));
    let back = sites.ok(
        B,
        &["volume", "migrate", "vm", "--to", "a", "--mode", "fast"],
    );
    assert!(back.contains("migrated volume vm from b to a"), "{back}");
    assert_eq!(owner(&sites, A, "vm"), ("a".to_string(), 3));
    let longest_second = second.finish(fio, &report);
    let pause_to_a = pause_ms(&back);

    for job in [&first, &second] {
        for node in [A, B] {
            job.verify_only(&dir, &sites.nbd_uri(node, "vm"));
        }
    }
    let listed = sites.ok(A, &["migration", "list"]);
    assert!(listed.contains("done"), "{listed}");
    sites.wait_replicated_from(A, B, Duration::from_secs(60));
    assert_legs_equal(&sites, "vm");
    eprintln!(
        "fast a->b: {moved}; fio's longest write {longest_first:.1} ms (pause {pause_to_b} ms); \
         fast b->a: {back}; longest write {longest_second:.1} ms (pause {pause_to_a} ms)"
    );
}

/// Fast mode with separate `stretch node` processes over a 2 Mbit/s link:
/// b takes the group at once, lacking the 4 MiB a wrote; a is killed while
/// b copies them. b keeps serving what it holds, the copy waits for a, and
/// once a is back the copy ends: every write a acknowledged is at b, and a
/// second migration may start only then.
#[test]
fn a_fast_migrations_copy_waits_for_a_killed_source_and_loses_nothing() {
    let (mut sites, uri) = separate_nodes_switched_over_fast(&[]);
    // b serves at once: a write to a region it does not lack is
    // acknowledged while the copy runs.
    let at_b = sites.nbd_uri(B, "vm");
    qemu_io_ok(&at_b, &["write -P 6 32M 64k", "flush", "read -P 6 32M 64k"]);
    // The source's driver shows the copy once its switchover returned.
    sites.wait_until(
        "a lists the migration as copying",
        Duration::from_secs(10),
        || sites.ok(A, &["migration", "list"]).contains("copying"),
    );
    let again = sites.cli(B, &["volume", "migrate", "vm", "--to", "a"]);
    assert!(
        !again.success() && again.stderr.contains("still copying"),
        "{again}"
    );
    // The source dies mid-copy; b still serves what it holds.
    sites.kill9(A);
    qemu_io_ok(&at_b, &["write -P 7 40M 64k", "read -P 7 40M 64k"]);
    sites.ok(B, &["link", "set", "a", "b", "--bandwidth-mbit", "0"]);
    sites.start_node(A);
    sites.wait_until(
        "b copied everything and recorded the end",
        Duration::from_secs(120),
        || {
            let text = http_get(&sites.url(B), "/v1/volumes/vm").unwrap_or_default();
            !text.is_empty()
                && sites
                    .logs()
                    .contains("every region the group lacked is copied")
        },
    );
    qemu_io_ok(
        &at_b,
        &["read -P 5 0 4M", "read -P 6 32M 64k", "read -P 7 40M 64k"],
    );
    // The writes at a still work, forwarded to the new owner; and a new
    // migration may start now.
    qemu_io_ok(&uri, &["write -P 8 12M 64k", "read -P 8 12M 64k"]);
    let back = sites.ok(B, &["volume", "migrate", "vm", "--to", "a"]);
    assert!(back.contains("to a"), "{back}");
    qemu_io_ok(
        &uri,
        &[
            "read -P 5 0 4M",
            "read -P 6 32M 64k",
            "read -P 7 40M 64k",
            "read -P 8 12M 64k",
        ],
    );
}

/// A source lost for good mid-copy: the operator accepts the loss at the
/// target (`stretch volume accept-loss`), the target's older image of the
/// regions never copied stands and serves, and the old source, back after
/// all, converges on the target's image (the regions are written again).
#[test]
fn accepting_the_loss_of_a_lost_sources_copy_ends_it_and_the_source_converges() {
    require_tool("qemu-img");
    let (mut sites, _) = separate_nodes_switched_over_fast(&[]);
    sites.kill9(A);
    let unconfirmed = sites.cli(B, &["volume", "accept-loss", "vm"]);
    assert!(
        !unconfirmed.success() && unconfirmed.stderr.contains("--accept-data-loss"),
        "{unconfirmed}"
    );
    let accepted = sites.ok(B, &["volume", "accept-loss", "vm", "--accept-data-loss"]);
    let never_copied: u64 = accepted
        .split("ended: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no region count in {accepted:?}"));
    assert!(
        (1..=4).contains(&never_copied),
        "a died before b copied its regions: {accepted}"
    );
    let at_b = sites.nbd_uri(B, "vm");
    // Each 1 MiB region of the first 4 MiB shows a's writes (copied before
    // a died) or b's older image of it (zeros), whole: never a mix within
    // a region, never anything else.
    let shows = |pattern: u8, offset: u64| {
        let read = qemu_io(&at_b, &[&format!("read -P {pattern} {offset} 1M")]);
        read.success() && !read.output().contains("Pattern verification failed")
    };
    for region in 0..4u64 {
        let offset = region << 20;
        assert!(
            shows(5, offset) != shows(0, offset),
            "region {region} is neither a's new image nor b's older one, whole"
        );
    }
    qemu_io_ok(&at_b, &["write -P 6 1M 64k", "flush", "read -P 6 1M 64k"]);
    // a returns and converges on b's image.
    sites.ok(B, &["link", "set", "a", "b", "--bandwidth-mbit", "0"]);
    sites.start_node(A);
    sites.wait_replicated_from(B, A, Duration::from_secs(120));
    assert_legs_equal(&sites, "vm");
}

/// A fast migration's target killed mid-copy, the group set to fail over
/// by itself: the source (which holds every write up to the switchover
/// and the target's since, as a replica) takes the group back when the
/// target's lease runs out, loses no write it had, and the target, back,
/// is resynced whole (it was marked mid-copy) and converges on it.
#[test]
fn a_fast_migrations_target_killed_mid_copy_fails_back_to_the_source_and_loses_nothing() {
    require_tool("qemu-img");
    let (mut sites, uri) = separate_nodes_switched_over_fast(&["--failover", "auto"]);
    // b takes a write in a region it does not lack, flushed: a holds it
    // once b shipped it.
    qemu_io_ok(&sites.nbd_uri(B, "vm"), &["write -P 6 32M 64k", "flush"]);
    sites.kill9(B);
    sites.ok(A, &["link", "set", "a", "b", "--bandwidth-mbit", "0"]);
    sites.wait_until("a took the group back", Duration::from_secs(60), || {
        owner(&sites, A, "vm").0 == "a"
    });
    // Everything a wrote is there (it never lacked it).
    qemu_io_ok(&uri, &["read -P 5 0 4M", "write -P 7 8M 64k", "flush"]);
    sites.start_node(B);
    sites.wait_replicated_from(A, B, Duration::from_secs(120));
    assert_legs_equal(&sites, "vm");
}
