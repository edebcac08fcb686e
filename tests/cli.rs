//! The `stretch` command line against a running node: volume management,
//! error messages, and the metrics endpoint.

mod common;

use std::process::Command;

use common::*;

/// clap follows a usage error with this hint; it is not part of the error.
const CLAP_HINT: &str = "For more information, try '--help'.";

/// Asserts a failed command: non-zero exit, nothing on stdout, and exactly
/// one non-empty line on stderr that contains every one of `mentions`.
fn assert_one_line_error(result: &Run, mentions: &[&str]) {
    assert!(!result.success(), "expected a failure: {result}");
    assert!(
        result.stdout.trim().is_empty(),
        "a failure printed on stdout: {result}"
    );
    let lines: Vec<&str> = result
        .stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && *line != CLAP_HINT)
        .collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr: {result}");
    for mention in mentions {
        assert!(
            lines[0].contains(mention),
            "the error line does not mention {mention:?}: {result}"
        );
    }
    assert!(!lines[0].contains("panicked"), "{result}");
}

/// Bad sizes, duplicate and invalid names, and missing volumes are refused
/// with one clear line each and change nothing.
#[test]
fn bad_volume_requests_fail_with_one_clear_line() {
    let node = TestNode::start();
    node.create_volume("vol", "64M");

    let cases: &[(&[&str], &[&str])] = &[
        (
            &["volume", "create", "x", "--size", "1000"],
            &["1000", "4096"],
        ),
        (&["volume", "create", "x", "--size", "12X"], &["12X"]),
        (&["volume", "create", "x", "--size", "0"], &["0"]),
        (
            &["volume", "create", "vol", "--size", "64M"],
            &["vol", "exists"],
        ),
        (&["volume", "create", "a/b", "--size", "1M"], &["a/b"]),
        (&["volume", "create", "..", "--size", "1M"], &[".."]),
        (
            &["volume", "create", "has space", "--size", "1M"],
            &["has space"],
        ),
        (&["volume", "show", "missing"], &["missing"]),
        (&["volume", "delete", "missing"], &["missing"]),
        // Above the 64 TiB bound.
        (
            &["volume", "create", "x", "--size", "65T"],
            &["at most", "64 TiB"],
        ),
        (
            &["volume", "create", "x", "--size", "1000000T"],
            &["at most", "64 TiB"],
        ),
    ];
    for (args, mentions) in cases {
        let result = node.cli(args);
        assert_one_line_error(&result, mentions);
    }

    // Within the bound but beyond what some file systems hold in one file
    // (ext4: 16 TiB): either the volume is made, or the refusal leaves no
    // leg file behind.
    let huge = node.cli(&["volume", "create", "huge", "--size", "20T"]);
    if huge.success() {
        node.cli(&["volume", "delete", "huge"]).assert_ok();
    } else {
        assert_one_line_error(&huge, &["huge"]);
    }
    let mut legs: Vec<String> = std::fs::read_dir(node.node_dir().join("legs"))
        .expect("listing the legs")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    legs.sort();
    assert!(
        legs.len() == 1 && legs[0].ends_with("-vol.raw"),
        "a refused volume left a leg file: {legs:?}"
    );

    let list = node.cli(&["volume", "list"]);
    list.assert_ok();
    let names: Vec<&str> = list
        .stdout
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(
        names,
        ["vol"],
        "the failed commands created nothing: {list}"
    );
    let show = node.cli(&["volume", "show", "vol"]);
    show.assert_ok();
    assert!(show.stdout.contains("67108864 bytes"), "{show}");
}

/// Every admin command fails cleanly, naming the admin URL, when the
/// node is down.
#[test]
fn commands_fail_cleanly_when_the_node_is_down() {
    let mut node = TestNode::start();
    node.create_volume("vol", "4M");
    node.kill9();
    let url = node.admin_url();
    let commands: &[&[&str]] = &[
        &["status"],
        &["volume", "list"],
        &["volume", "show", "vol"],
        &["volume", "create", "new", "--size", "1M"],
        &["volume", "delete", "vol"],
    ];
    for args in commands {
        let result = stretch_cli(&url, args);
        assert_one_line_error(&result, &[&format!("127.0.0.1:{}", node.admin_port)]);
    }
    // The environment variable is honoured the same way.
    let mut command = Command::new(STRETCH);
    command.args(["volume", "list"]).env("STRETCH_ADMIN", &url);
    let result = run(&mut command, None, COMMAND_TIMEOUT);
    assert_one_line_error(&result, &[&format!("127.0.0.1:{}", node.admin_port)]);
}

/// Volumes are listed, shown, exported and deleted; a deleted volume's
/// export disappears; the node reports status and metrics after I/O.
#[test]
fn volume_lifecycle_status_and_metrics() {
    require_tool("nbdinfo");
    require_tool("qemu-io");
    let node = TestNode::start();
    let created = node.cli(&["volume", "create", "keep", "--size", "8M", "--group", "g"]);
    created.assert_ok();
    assert!(created.stdout.contains(&node.uri("keep")), "{created}");
    node.create_volume("gone", "4M");

    let list = node.cli(&["volume", "list"]);
    list.assert_ok();
    assert!(list.stdout.starts_with("NAME"), "{list}");
    for needle in [
        "keep",
        "8M",
        "gone",
        "4M",
        &node.uri("keep"),
        &node.uri("gone"),
    ] {
        assert!(
            list.stdout.contains(needle),
            "volume list lacks {needle}: {list}"
        );
    }
    let show = node.cli(&["volume", "show", "keep"]);
    show.assert_ok();
    for needle in [
        "name:   keep",
        "8M (8388608 bytes)",
        "group:  g",
        "-keep.raw",
        &node.uri("keep"),
    ] {
        assert!(
            show.stdout.contains(needle),
            "volume show lacks {needle}: {show}"
        );
    }

    let exports = || {
        let mut command = Command::new("nbdinfo");
        command
            .arg("--list")
            .arg(format!("nbd://127.0.0.1:{}", node.nbd_port));
        let result = run(&mut command, None, COMMAND_TIMEOUT);
        result.assert_ok();
        result.stdout
    };
    let before = exports();
    assert!(
        before.contains("export=\"keep\"") && before.contains("export=\"gone\""),
        "{before}"
    );

    // I/O on both volumes, so they have metric series.
    qemu_io_ok(
        &node.uri("keep"),
        &["write -P 1 0 1M", "read -P 1 0 1M", "flush"],
    );
    qemu_io_ok(&node.uri("gone"), &["write -P 2 0 64k", "flush"]);
    let leg = leg_file(&node.node_dir(), "gone");
    assert!(leg.exists(), "leg of a created volume");

    let deleted = node.cli(&["volume", "delete", "gone"]);
    deleted.assert_ok();
    assert!(deleted.stdout.contains("gone"), "{deleted}");
    let after = exports();
    assert!(
        !after.contains("export=\"gone\""),
        "deleted export still listed: {after}"
    );
    assert!(after.contains("export=\"keep\""), "{after}");
    assert_one_line_error(&node.cli(&["volume", "show", "gone"]), &["gone"]);
    assert!(!leg.exists(), "leg file of a deleted volume is still there");
    let open = qemu_io(&node.uri("gone"), &["read 0 4096"]);
    assert!(!open.success(), "qemu-io opened a deleted export: {open}");
    // Its name can be used again, and the new volume starts as zeros.
    node.create_volume("gone", "4M");
    qemu_io_ok(&node.uri("gone"), &["read -P 0 0 4M"]);

    let status = node.cli(&["status"]);
    status.assert_ok();
    for needle in [
        "cluster:          e2e",
        "node:             a1 (site a)",
        "volumes:          2",
        "state:            ok",
    ] {
        assert!(
            status.stdout.contains(needle),
            "status lacks {needle:?}: {status}"
        );
    }

    let metrics = node.metrics();
    for name in [
        "stretch_volume_requests_total",
        "stretch_journal_fsync_seconds",
        "stretch_dirty_bytes",
    ] {
        assert!(
            metrics.lines().any(|line| line.starts_with(name)),
            "/metrics lacks {name}:\n{metrics}"
        );
    }
    let writes = metric_value(
        &metrics,
        "stretch_volume_requests_total",
        &["volume=\"keep\"", "op=\"write\""],
    );
    assert!(
        writes.is_some_and(|n| n >= 1.0),
        "write count of keep: {writes:?}\n{metrics}"
    );
    let written = metric_value(
        &metrics,
        "stretch_volume_bytes_total",
        &["volume=\"keep\"", "direction=\"write\""],
    );
    assert_eq!(
        written,
        Some(MIB as f64),
        "bytes written to keep\n{metrics}"
    );
    let fsyncs = metric_value(&metrics, "stretch_journal_fsync_seconds_count", &[]);
    assert!(
        fsyncs.is_some_and(|n| n >= 1.0),
        "journal fsyncs after flushes: {fsyncs:?}"
    );
    assert!(
        metrics.contains("node=\"a1\"") && metrics.contains("site=\"a\""),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "stretch_volumes", &[]),
        Some(2.0),
        "{metrics}"
    );
    // The deleted volume's old series are gone (the new one has none yet
    // beyond what its read created).
    let stale = metric_value(
        &metrics,
        "stretch_volume_requests_total",
        &["volume=\"gone\"", "op=\"write\""],
    );
    assert_eq!(
        stale.unwrap_or(0.0),
        0.0,
        "write count of the deleted volume survived:\n{metrics}"
    );
}

/// The tests' default tuning is the shipped single-site config's.
#[test]
fn tests_use_the_shipped_tuning() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../cluster-configs/single-site.toml");
    let shipped = std::fs::read_to_string(&path).expect("reading single-site.toml");
    let settings: Vec<&str> = shipped
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    for line in SHIPPED_TUNING.lines() {
        assert!(
            settings.contains(&line),
            "tests/common SHIPPED_TUNING has {line:?}, which {} lacks",
            path.display()
        );
    }
}

/// Deleting a volume while a client is connected to it: that client's
/// requests fail with an error (the node stays up), and a new volume of
/// the same name starts as zeros, untouched by the old connection.
#[test]
fn deleting_a_volume_under_a_connected_client() {
    let mut node = TestNode::start();
    node.create_volume("vol", "16M");
    let mut old = RawNbd::connect(node.nbd_port, "vol");
    old.write(0, &[0x11; 4096], false);
    node.cli(&["volume", "delete", "vol"]).assert_ok();
    node.create_volume("vol", "16M");

    let reply = old.call(0, NBD_CMD_WRITE, 0, 4096, &[0x22; 4096]);
    assert_ne!(reply.error, 0, "a write to a deleted volume succeeded");
    let reply = old.call(0, NBD_CMD_READ, 0, 4096, &[]);
    assert_ne!(reply.error, 0, "a read of a deleted volume succeeded");
    let reply = old.call(0, NBD_CMD_FLUSH, 0, 0, &[]);
    assert_ne!(reply.error, 0, "a flush of a deleted volume succeeded");
    old.disconnect();

    let mut new = RawNbd::connect(node.nbd_port, "vol");
    assert_eq!(
        new.read(0, 8192),
        vec![0; 8192],
        "the re-created volume is not zeros"
    );
    new.disconnect();
    node.assert_running();
    assert!(node.status()["failure"].is_null());
}

/// `stretch node` refuses a missing config, an unknown node, a config with
/// an unknown key and a data directory already in use, with a clear error
/// and a non-zero exit.
#[test]
fn node_startup_errors_are_one_clear_line() {
    let node = TestNode::start();
    let scratch = node.scratch();
    let start = |config: &std::path::Path, name: &str| {
        let mut command = Command::new(STRETCH);
        command
            .arg("node")
            .arg("--config")
            .arg(config)
            .args(["--node", name, "--data-dir"])
            .arg(node.data_dir())
            .env("NO_COLOR", "1");
        run(&mut command, None, std::time::Duration::from_secs(20))
    };

    let missing = scratch.join("missing.toml");
    assert_one_line_error(&start(&missing, "a1"), &["missing.toml"]);

    let (nbd, admin) = free_ports();
    let other = scratch.join("other-ports.toml");
    std::fs::write(&other, cluster_config(nbd, admin, SHIPPED_TUNING)).expect("writing a config");
    assert_one_line_error(&start(&other, "zz"), &["zz"]);

    let typo = scratch.join("typo.toml");
    let text = cluster_config(nbd, admin, SHIPPED_TUNING)
        .replace("delta_interval_ms", "delta_intervall_ms");
    std::fs::write(&typo, text).expect("writing a config");
    // TOML errors quote the offending line, so they take several lines.
    let result = start(&typo, "a1");
    assert!(!result.success(), "{result}");
    assert!(
        result.stderr.starts_with("stretch: ") && result.stderr.contains("typo.toml"),
        "{result}"
    );
    assert!(
        result.stderr.contains("unknown field `delta_intervall_ms`"),
        "{result}"
    );

    // The running node holds the data directory.
    let second = start(&other, "a1");
    assert!(
        !second.success(),
        "a second node started on a data directory in use: {second}"
    );
    assert!(second.stderr.contains("in use"), "{second}");
    // And the first node is unharmed.
    node.create_volume("after", "4M");
}

/// `stretch up CONFIG --data-dir DIR` runs the config's node, serves it,
/// and exits 0 after SIGTERM.
#[test]
fn stretch_up_serves_and_stops_cleanly() {
    require_tool("qemu-io");
    let mut node = TestNode::start_up(SHIPPED_TUNING);
    node.create_volume("vol", "8M");
    qemu_io_ok(
        &node.uri("vol"),
        &["write -P 0x42 4095 2", "read -P 0x42 4095 2"],
    );
    let status = node.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "stretch up after SIGTERM:\n{}",
        node.log()
    );
    let leg = std::fs::read(leg_file(&node.node_dir(), "vol")).expect("reading the leg");
    assert_eq!(
        &leg[4094..4098],
        &[0, 0x42, 0x42, 0],
        "the leg after a clean stop"
    );
}

/// `stretch init` makes the cluster CA and node certificates once, keeps
/// them on a second run, and refuses a place it cannot write.
#[test]
fn init_creates_the_cluster_pki_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let pki_arg = pki.to_str().expect("utf-8 path");
    let first = run(
        Command::new(STRETCH).args(["init", "--dir", pki_arg]),
        None,
        COMMAND_TIMEOUT,
    );
    first.assert_ok();
    assert!(first.stdout.contains("cluster CA created"), "{first}");
    assert!(
        first.stdout.contains("certificate created for node a1"),
        "{first}"
    );
    let ca = std::fs::read(pki.join("ca.pem")).expect("ca.pem");
    let second = run(
        Command::new(STRETCH).args(["init", "--dir", pki_arg]),
        None,
        COMMAND_TIMEOUT,
    );
    second.assert_ok();
    assert!(second.stdout.contains("cluster CA kept"), "{second}");
    assert_eq!(std::fs::read(pki.join("ca.pem")).expect("ca.pem"), ca);
    let blocked = dir.path().join("a-file");
    std::fs::write(&blocked, b"not a directory").expect("write");
    let refused = run(
        Command::new(STRETCH).args(["init", "--dir", blocked.to_str().expect("utf-8")]),
        None,
        COMMAND_TIMEOUT,
    );
    assert_one_line_error(&refused, &["a-file"]);
}

/// A node's exported directory holds no CA key, so nothing can be renewed
/// or added there; a lifetime of 0 days is refused. Each with one line.
#[test]
fn cert_commands_refuse_what_they_cannot_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let node = dir.path().join("a1-pki");
    let pki_arg = pki.to_str().expect("utf-8 path");
    let node_arg = node.to_str().expect("utf-8 path");
    run(
        Command::new(STRETCH).args(["init", "--dir", pki_arg, "--cert-days", "10"]),
        None,
        COMMAND_TIMEOUT,
    )
    .assert_ok();
    let exported = run(
        Command::new(STRETCH).args([
            "cert", "export", "--node", "a1", "--dir", pki_arg, "--out", node_arg,
        ]),
        None,
        COMMAND_TIMEOUT,
    );
    exported.assert_ok();
    assert!(!node.join("ca.key").exists());
    let renew_there = run(
        Command::new(STRETCH).args(["cert", "renew", "--dir", node_arg]),
        None,
        COMMAND_TIMEOUT,
    );
    assert_one_line_error(&renew_there, &["no CA key"]);
    let zero = run(
        Command::new(STRETCH).args(["cert", "renew", "--dir", pki_arg, "--cert-days", "0"]),
        None,
        COMMAND_TIMEOUT,
    );
    assert_one_line_error(&zero, &["0 days"]);
    let unknown = run(
        Command::new(STRETCH).args([
            "cert", "export", "--node", "zz", "--dir", pki_arg, "--out", node_arg,
        ]),
        None,
        COMMAND_TIMEOUT,
    );
    assert_one_line_error(&unknown, &["zz"]);
    let renewed = run(
        Command::new(STRETCH).args(["cert", "renew", "--dir", pki_arg]),
        None,
        COMMAND_TIMEOUT,
    );
    renewed.assert_ok();
    for node in ["a1", "b1", "w1"] {
        assert!(
            renewed
                .stdout
                .contains(&format!("certificate renewed for node {node}, valid until")),
            "{renewed}"
        );
    }
}

/// `stretch sim --help` names every planted defect `--bug` accepts.
#[test]
fn sim_help_names_every_planted_bug() {
    let help = run(
        Command::new(STRETCH).args(["sim", "--help"]),
        None,
        COMMAND_TIMEOUT,
    );
    help.assert_ok();
    // clap wraps the text at word boundaries: compare words, not lines.
    let words: Vec<&str> = help
        .stdout
        .split(|c: char| c.is_whitespace() || c == ',' || c == ':' || c == '(' || c == ')')
        .collect();
    for bug in stretch_sim::SimBug::ALL {
        assert!(
            words.contains(&bug.name()),
            "--help lacks {}: {help}",
            bug.name()
        );
    }
}
