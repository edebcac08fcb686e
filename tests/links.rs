//! `stretch link ...` against `stretch up cluster-configs/local.toml` (two
//! data sites and a witness in one process), moved to free ports: links are
//! listed, set, cut and healed through any node, and bad requests fail with
//! one clear line.

mod common;

use common::sites::{Layout, TwoSites};
use common::*;

/// A failed command: non-zero exit, nothing on stdout, one line on stderr
/// mentioning each of `mentions`.
fn assert_one_line_error(result: &Run, mentions: &[&str]) {
    assert!(!result.success(), "expected a failure: {result}");
    assert!(result.stdout.trim().is_empty(), "{result}");
    let lines: Vec<&str> = result
        .stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr: {result}");
    for mention in mentions {
        assert!(lines[0].contains(mention), "no {mention:?} in: {result}");
    }
}

/// One row of `stretch link list` for the pair `a <-> b`.
fn row<'a>(list: &'a str, pair: &str) -> &'a str {
    list.lines()
        .find(|line| line.starts_with(pair))
        .unwrap_or_else(|| panic!("no {pair} in:\n{list}"))
}

#[test]
fn links_are_listed_changed_cut_and_healed_through_any_node() {
    let mut cluster = TwoSites::start(Layout::OneProcess, &[]);
    let list = cluster.ok(0, &["link", "list"]);
    let ab = row(&list, "a <-> b");
    assert!(ab.contains("25 ms") && ab.ends_with("up"), "{list}");
    assert!(row(&list, "a <-> w").contains("unlimited"), "{list}");
    assert!(row(&list, "b <-> w").contains("0 ms"), "{list}");

    // Through b1; every node of the process sees it, both directions.
    let set = cluster.ok(
        1,
        &[
            "link",
            "set",
            "b",
            "a",
            "--delay-ms",
            "5",
            "--loss-pct",
            "1.5",
        ],
    );
    assert!(
        set.contains("a <-> b: delay 5 ms") && set.contains("loss 1.5 %"),
        "{set}"
    );
    let list = cluster.ok(2, &["link", "list"]);
    assert!(row(&list, "a <-> b").contains("5 ms"), "{list}");

    // --config tells every node of the config, one line each.
    let config = cluster.config.to_str().expect("utf-8 path").to_string();
    let cut = cluster.ok(0, &["link", "cut", "a", "b", "--config", &config]);
    for node in ["a1: a <-> b", "b1: a <-> b", "w1: a <-> b"] {
        let line = row(&cut, node);
        assert!(line.ends_with("CUT"), "{cut}");
    }
    let list = cluster.ok(0, &["link", "list"]);
    assert!(row(&list, "a <-> b").ends_with("CUT"), "{list}");
    let healed = cluster.ok(2, &["link", "heal", "a", "b"]);
    assert!(
        healed.trim_end().ends_with("up") && healed.contains("delay 5 ms"),
        "{healed}"
    );

    // Bandwidth in Mbit/s; 0 removes the limit again.
    let set = cluster.ok(0, &["link", "set", "a", "w", "--bandwidth-mbit", "2.5"]);
    assert!(set.contains("bandwidth 2.5 Mbit/s"), "{set}");
    let set = cluster.ok(0, &["link", "set", "a", "w", "--bandwidth-mbit", "0"]);
    assert!(set.contains("bandwidth unlimited"), "{set}");

    // Bad requests: one line, nothing changed.
    assert_one_line_error(
        &cluster.cli(0, &["link", "set", "a", "zz", "--delay-ms", "1"]),
        &["no site named \"zz\"", "a, b, w"],
    );
    assert_one_line_error(
        &cluster.cli(0, &["link", "cut", "b", "b"]),
        &["two different sites"],
    );
    assert_one_line_error(
        &cluster.cli(0, &["link", "set", "a", "b", "--loss-pct", "101"]),
        &["loss_pct must be between 0 and 100"],
    );
    assert_one_line_error(
        &cluster.cli(0, &["link", "set", "a", "b", "--loss-pct", "-1"]),
        &["loss_pct"],
    );
    let nothing = cluster.cli(0, &["link", "set", "a", "b"]);
    assert!(
        !nothing.success() && nothing.stderr.contains("--delay-ms"),
        "{nothing}"
    );
    let list = cluster.ok(1, &["link", "list"]);
    assert!(row(&list, "a <-> b").contains("5 ms"), "{list}");
    assert!(row(&list, "a <-> b").ends_with("up"), "{list}");

    // The witness holds no volumes.
    let status = cluster.ok(2, &["status"]);
    assert!(
        status.contains("w1 (site w)") && status.contains("witness"),
        "{status}"
    );
    assert_one_line_error(
        &cluster.cli(2, &["volume", "create", "v", "--size", "1M"]),
        &["witness"],
    );
    cluster.ok(1, &["volume", "create", "v", "--size", "1M"]);

    let status = cluster.terminate();
    assert_eq!(status.code(), Some(0), "{}", cluster.logs());
}

/// A node that cannot be reached makes `--config` fail after telling the
/// others, and says which node and how many were reached.
#[test]
fn link_changes_report_unreachable_nodes() {
    let cluster = TwoSites::start(Layout::OneProcess, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(&cluster.config).expect("config");
    // Port 1 (tcpmux): nothing listens there. A port found free now could
    // be taken by a cluster another test starts meanwhile, and the CLI
    // would then reach that cluster's node instead of failing to connect.
    let gone = 1;
    let text = text.replace(
        &format!("127.0.0.1:{}\"", cluster.admin_port(2)),
        &format!("127.0.0.1:{gone}\""),
    );
    let config = dir.path().join("partly-down.toml");
    std::fs::write(&config, text).expect("writing the config");
    let result = cluster.cli(
        0,
        &[
            "link",
            "cut",
            "a",
            "b",
            "--config",
            config.to_str().expect("utf-8"),
        ],
    );
    assert!(!result.success(), "{result}");
    assert!(!result.stdout.is_empty(), "{result}");
    assert!(row(&result.stdout, "a1:").ends_with("CUT"), "{result}");
    assert!(row(&result.stdout, "b1:").ends_with("CUT"), "{result}");
    assert!(
        result.stderr.contains("node w1") && result.stderr.contains("reached 2 of 3 nodes"),
        "{result}"
    );
}
