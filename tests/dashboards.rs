//! The Grafana dashboards in `dashboards/` are valid and only query
//! metrics a live node really exports.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dashboards")
}

/// Every dashboard file, parsed.
fn dashboards() -> Vec<(PathBuf, Value)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dashboards_dir()).expect("reading dashboards/") {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|ext| ext == "json") {
            let text = std::fs::read_to_string(&path).expect("reading a dashboard");
            let value: Value = serde_json::from_str(&text)
                .unwrap_or_else(|error| panic!("{} is not valid JSON: {error}", path.display()));
            found.push((path, value));
        }
    }
    assert!(
        !found.is_empty(),
        "no dashboards in {}",
        dashboards_dir().display()
    );
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// Every string under a key named `expr`, `query` or `definition`
/// (panel targets and template variable queries), with where it was.
fn queries(value: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let here = format!("{at}/{key}");
                match child {
                    Value::String(text)
                        if matches!(key.as_str(), "expr" | "query" | "definition") =>
                    {
                        out.push((here, text.clone()));
                    }
                    _ => queries(child, &here, out),
                }
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                queries(child, &format!("{at}[{index}]"), out);
            }
        }
        _ => {}
    }
}

/// The metric names in a PromQL expression: `stretch_[a-z_]+` not preceded
/// by an identifier character.
fn metric_names(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(found) = expr[from..].find("stretch_") {
        let start = from + found;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start + "stretch_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        if !preceded && end > start + "stretch_".len() {
            names.push(expr[start..end].to_string());
        }
        from = end;
    }
    names
}

/// Metric families in a Prometheus text exposition, from its TYPE lines.
fn exported(metrics: &str) -> BTreeMap<String, String> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

#[test]
fn metric_name_scanner() {
    assert_eq!(
        metric_names(
            r#"sum(rate(stretch_a_total{x="stretch_not"}[5m])) / my_stretch_b + stretch_c_bucket"#
        ),
        ["stretch_a_total", "stretch_not", "stretch_c_bucket"]
    );
    assert!(metric_names("up").is_empty());
}

/// Structure Grafana needs: schema version, the three template variables,
/// every panel on the `${datasource}` variable with unique ids and a grid
/// position, and every query panel with at least one expression.
#[test]
fn dashboards_are_well_formed() {
    for (path, dashboard) in dashboards() {
        let name = path.display();
        let schema = dashboard["schemaVersion"].as_u64().unwrap_or(0);
        assert!(
            (36..=41).contains(&schema),
            "{name}: schemaVersion {schema}"
        );
        assert!(
            dashboard["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{name}: title"
        );
        assert!(
            dashboard["uid"].as_str().is_some_and(|t| !t.is_empty()),
            "{name}: uid"
        );

        let variables = dashboard["templating"]["list"]
            .as_array()
            .expect("templating.list");
        let variable = |wanted: &str| {
            variables
                .iter()
                .find(|v| v["name"] == wanted)
                .unwrap_or_else(|| panic!("{name}: no ${wanted} variable"))
        };
        let datasource = variable("datasource");
        assert_eq!(datasource["type"], "datasource", "{name}");
        assert_eq!(datasource["query"], "prometheus", "{name}");
        for wanted in ["node", "volume"] {
            let v = variable(wanted);
            assert_eq!(v["type"], "query", "{name}: ${wanted}");
            assert_eq!(v["datasource"]["uid"], "${datasource}", "{name}: ${wanted}");
        }

        let panels = dashboard["panels"].as_array().expect("panels");
        let mut ids = BTreeSet::new();
        let mut all: Vec<&Value> = Vec::new();
        for panel in panels {
            all.push(panel);
            if let Some(nested) = panel["panels"].as_array() {
                all.extend(nested);
            }
        }
        for panel in all {
            let title = panel["title"].as_str().unwrap_or("?");
            let id = panel["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: panel {title} has no id"));
            assert!(ids.insert(id), "{name}: panel id {id} is used twice");
            for key in ["x", "y", "w", "h"] {
                assert!(
                    panel["gridPos"][key].is_u64(),
                    "{name}: panel {title} gridPos.{key}"
                );
            }
            if panel["type"] == "row" {
                continue;
            }
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{name}: panel {title}"
            );
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{name}: panel {title} has no query");
            for target in targets {
                assert!(
                    target["expr"]
                        .as_str()
                        .is_some_and(|e| e.contains("stretch_")),
                    "{name}: panel {title} has a target without a stretch expression"
                );
                assert_eq!(
                    target["datasource"]["uid"], "${datasource}",
                    "{name}: panel {title}"
                );
            }
        }
    }
}

/// Every metric a dashboard queries is in the `/metrics` output of a live
/// node after some I/O (histogram `_bucket`/`_sum`/`_count` series count
/// as their histogram).
#[test]
fn dashboards_only_use_exported_metrics() {
    require_tool("qemu-io");
    // Two sites, so the per-peer and per-volume replication series exist.
    let sites = common::sites::TwoSites::start(common::sites::Layout::OneProcess, &[]);
    sites.ok(
        common::sites::A,
        &["volume", "create", "vol", "--size", "16M"],
    );
    qemu_io_ok(
        &sites.nbd_uri(common::sites::A, "vol"),
        &[
            "write -P 1 0 1M",
            "write -f -P 2 1M 64k",
            "flush",
            "read -P 1 0 1M",
            "write -z 2M 64k",
            "discard 3M 64k",
            "read 8M 64k",
        ],
    );
    let families = exported(&sites.metrics(common::sites::A));
    assert!(families.len() > 10, "few metrics exported: {families:?}");

    let mut checked = BTreeSet::new();
    let mut missing = Vec::new();
    for (path, dashboard) in dashboards() {
        let mut found = Vec::new();
        queries(&dashboard, "", &mut found);
        assert!(!found.is_empty(), "{}: no queries", path.display());
        for (at, expr) in found {
            for name in metric_names(&expr) {
                let known = families.contains_key(&name)
                    || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                        name.strip_suffix(suffix).is_some_and(|base| {
                            families.get(base).is_some_and(|kind| kind == "histogram")
                        })
                    });
                if known {
                    checked.insert(name);
                } else {
                    missing.push(format!("{}{at}: {name}", path.display()));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "dashboards query metrics the node does not export:\n  {}\nexported: {:?}",
        missing.join("\n  "),
        families.keys().collect::<Vec<_>>()
    );
    // The dashboard covers what operators need most.
    for needed in [
        "stretch_volume_requests_total",
        "stretch_volume_bytes_total",
        "stretch_volume_request_seconds_bucket",
        "stretch_cache_hit_blocks_total",
        "stretch_cache_miss_blocks_total",
        "stretch_dirty_bytes",
        "stretch_deltas_open",
        "stretch_deltas_unapplied",
        "stretch_journal_bytes",
        "stretch_journal_fsync_seconds_bucket",
        "stretch_writes_throttled_total",
        "stretch_node_failed",
    ] {
        assert!(checked.contains(needed), "no dashboard queries {needed}");
    }
}
