//! Operations with the real tools: a real Prometheus (the Debian package)
//! scrapes a two-site `stretch up` cluster, and every query of every panel
//! of every dashboard in `dashboards/` returns data through Prometheus'
//! HTTP API, as Grafana would ask it. The alert rules in
//! `dashboards/alerts.yml` pass `promtool check rules` and the cases of
//! `dashboards/alerts.test.yml`, and load cleanly into the live Prometheus.
//!
//! Without Prometheus installed the tests print why and skip, except in CI
//! (`CI=true`), where they fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::prometheus::{Prometheus, sample_value};
use common::sites::{A, B, Layout, NODES, TwoSites};
use common::*;
use serde_json::Value;

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dashboards")
}

/// Every panel query (`targets[].expr`) of every dashboard, with where it
/// is: `file: panel title [n]`.
fn panel_queries() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir())
        .expect("reading dashboards/")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards");
    for path in files {
        let text = std::fs::read_to_string(&path).expect("reading a dashboard");
        let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
        let file = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let file = file.unwrap_or_default();
        let mut panels: Vec<&Value> = Vec::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            panels.push(panel);
            if let Some(nested) = panel["panels"].as_array() {
                panels.extend(nested);
            }
        }
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?");
            let targets = panel["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            for (index, target) in targets.iter().enumerate() {
                if let Some(expr) = target["expr"].as_str() {
                    found.push((format!("{file}: {title} [{index}]"), expr.to_string()));
                }
            }
        }
    }
    found
}

/// A dashboard query as Grafana sends it with every variable on "All":
/// `$node` and `$volume` match anything, `$__rate_interval` is one minute
/// (Grafana's rule, four scrape intervals at least, is well below it for a
/// 1 s scrape; a minute covers the whole workload).
fn as_grafana_sends_it(expr: &str) -> String {
    let query = expr
        .replace("$__rate_interval", "1m")
        .replace("$node", ".*")
        .replace("$volume", ".*");
    assert!(
        !query.contains('$'),
        "a dashboard query uses a variable this test does not know: {expr}"
    );
    query
}

/// Writes (sequential with nbdcopy, random and FUA with qemu-io), reads
/// that hit and miss the cache, flushes, zeroes and trims at the owner,
/// and a forwarded write and strict read at the other site: every counter
/// and histogram the dashboards chart moves.
fn workload(cluster: &TwoSites, image: &Path, round: u64) {
    let a = cluster.nbd_uri(A, "vol");
    let b = cluster.nbd_uri(B, "vol");
    let mut copy = Command::new("nbdcopy");
    copy.arg(image).arg(&a);
    run(&mut copy, None, COMMAND_TIMEOUT).assert_ok();
    let pattern = round % 200 + 1;
    qemu_io_ok(
        &a,
        &[
            &format!("write -P {pattern} 16M 1M"),
            &format!("write -f -P {pattern} 17M 64k"),
            "flush",
            &format!("read -P {pattern} 16M 1M"),
            "read 40M 1M",
            "write -z 18M 64k",
            "discard 19M 64k",
        ],
    );
    qemu_io_ok(
        &b,
        &[
            &format!("write -P {pattern} 20M 64k"),
            "flush",
            &format!("read -P {pattern} 20M 64k"),
        ],
    );
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    if !tool_or_skip("prometheus") {
        return;
    }
    for tool in ["qemu-io", "nbdcopy"] {
        require_tool(tool);
    }
    // Small journal checkpoints, so legs are synced (and the leg sync
    // histogram observed) within a short workload.
    let cluster = TwoSites::start(
        Layout::OneProcess,
        &[(
            "journal_checkpoint_bytes = \"64M\"",
            "journal_checkpoint_bytes = \"4M\"",
        )],
    );
    let targets: Vec<String> = (0..NODES.len())
        .map(|node| format!("127.0.0.1:{}", cluster.admin_port(node)))
        .collect();
    let prometheus = Prometheus::start(&targets, &[dashboards_dir().join("alerts.yml")]);
    prometheus.wait_targets_up(NODES.len());

    cluster.ok(A, &["volume", "create", "vol", "--size", "64M"]);
    let image = cluster.dir.path().join("image.raw");
    let mut bytes = vec![0u8; 16 << 20];
    Rng::new(11).fill(&mut bytes);
    std::fs::write(&image, &bytes).expect("writing the image");
    // Several rounds over more than a few scrapes, so every rate() has
    // two samples that differ.
    let started = Instant::now();
    let mut round = 0;
    while round < 3 || started.elapsed() < Duration::from_secs(8) {
        workload(&cluster, &image, round);
        round += 1;
    }
    cluster.wait_replicated(Duration::from_secs(60));
    // Two more scrapes after the last I/O.
    std::thread::sleep(3 * common::prometheus::SCRAPE_INTERVAL);

    let queries = panel_queries();
    assert!(queries.len() > 20, "few dashboard queries: {queries:?}");
    // A query that has no finite value yet may just be waiting for the
    // next scrape; retry each for a while before calling it empty.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut empty = Vec::new();
    for (at, expr) in &queries {
        let query = as_grafana_sends_it(expr);
        loop {
            let result = prometheus.query(&query);
            let finite = result.as_ref().map_or(0, |samples| {
                samples
                    .iter()
                    .filter_map(sample_value)
                    .filter(|value| value.is_finite())
                    .count()
            });
            if finite > 0 {
                break;
            }
            if Instant::now() > deadline {
                empty.push(format!("{at}\n      {query}\n      -> {result:?}"));
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    assert!(
        empty.is_empty(),
        "{} of {} dashboard queries returned no data through Prometheus:\n  {}",
        empty.len(),
        queries.len(),
        empty.join("\n  ")
    );
    eprintln!(
        "{} dashboard queries returned data after {round} workload rounds",
        queries.len()
    );

    // The alert rules loaded into the live Prometheus, evaluate without
    // error against the real series, and a healthy cluster fires none.
    let rules = prometheus.api("/api/v1/rules", &[]).expect("rules");
    let mut loaded = 0;
    for group in rules["groups"].as_array().expect("rule groups") {
        for rule in group["rules"].as_array().expect("rules") {
            assert_eq!(rule["health"], "ok", "rule {rule}");
            loaded += 1;
        }
    }
    assert_eq!(loaded, alert_names().len(), "{rules}");
    let alerts = prometheus.api("/api/v1/alerts", &[]).expect("alerts");
    let firing: Vec<&Value> = alerts["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .filter(|alert| alert["state"] == "firing")
        .collect();
    assert!(firing.is_empty(), "a healthy cluster fires {firing:?}");
    // Every series the rules watch exists, so no alert is silently blind.
    for name in alert_metric_names() {
        let samples = prometheus.query(&name).expect("query");
        assert!(
            !samples.is_empty(),
            "alerts.yml watches {name}, which no node exports"
        );
    }
}

/// The `alert:` names of alerts.yml.
fn alert_names() -> Vec<String> {
    let text = std::fs::read_to_string(dashboards_dir().join("alerts.yml")).expect("alerts.yml");
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .map(|name| name.trim().to_string())
        .collect()
}

/// The metric names the `expr:` lines of alerts.yml use.
fn alert_metric_names() -> Vec<String> {
    let text = std::fs::read_to_string(dashboards_dir().join("alerts.yml")).expect("alerts.yml");
    let mut names = Vec::new();
    for expr in text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("expr: "))
    {
        let name: String = expr
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            !name.is_empty(),
            "alerts.yml: an expr that starts with no metric: {expr}"
        );
        names.push(name);
    }
    names
}

#[test]
fn alert_rules_pass_promtool() {
    if !tool_or_skip("promtool") {
        return;
    }
    let dir = dashboards_dir();
    let check = run(
        Command::new("promtool")
            .args(["check", "rules", "alerts.yml"])
            .current_dir(&dir),
        None,
        COMMAND_TIMEOUT,
    );
    check.assert_ok();
    let rules = alert_names().len();
    assert!(
        check
            .output()
            .contains(&format!("SUCCESS: {rules} rules found")),
        "{check}"
    );
    for needed in [
        "StretchReplicationLagHigh",
        "StretchPeerDown",
        "StretchWritesThrottled",
        "StretchNodeFailed",
    ] {
        assert!(
            alert_names().iter().any(|name| name == needed),
            "no {needed}"
        );
    }
    let test = run(
        Command::new("promtool")
            .args(["test", "rules", "alerts.test.yml"])
            .current_dir(&dir),
        None,
        COMMAND_TIMEOUT,
    );
    test.assert_ok();
    assert!(test.output().contains("SUCCESS"), "{test}");
    // Every alert has at least one case in the test file.
    let cases = std::fs::read_to_string(dir.join("alerts.test.yml")).expect("alerts.test.yml");
    for name in alert_names() {
        assert!(
            cases.contains(&format!("alertname: {name}")),
            "alerts.test.yml has no case for {name}"
        );
    }
}
