//! The metadata control plane end to end, with separate `stretch node`
//! processes a1, b1 and the witness w1 (Raft voters all three): volume
//! changes commit through a majority, a site away learns them when it
//! returns, a site cut from both others cannot change anything, and the
//! two sides of a cut that both reach the witness get distinct ids.

mod common;

use std::time::Duration;

use common::sites::{A, B, Layout, TwoSites};
use common::*;

const W: usize = 2;

fn volume_id(sites: &TwoSites, node: usize, name: &str) -> u64 {
    let text = http_get(&sites.url(node), &format!("/v1/volumes/{name}")).unwrap_or_default();
    let info: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    info["id"].as_u64().unwrap_or(0)
}

fn has_volume(sites: &TwoSites, node: usize, name: &str) -> bool {
    sites.cli(node, &["volume", "show", name]).success()
}

/// Starts b1 again in the foreground, expecting it to refuse to start;
/// returns the run and its last line on stderr.
fn start_b1_refused(sites: &TwoSites) -> (Run, String) {
    let run = run(
        std::process::Command::new(env!("CARGO_BIN_EXE_stretch"))
            .args(["node", "--node", "b1", "--config"])
            .arg(&sites.config)
            .arg("--data-dir")
            .arg(sites.data_dir())
            .arg("--pki-dir")
            .arg(sites.pki_dir())
            .env("NO_COLOR", "1"),
        None,
        Duration::from_secs(30),
    );
    assert!(!run.success(), "{run}");
    let last = run.stderr.lines().last().unwrap_or_default().to_string();
    (run, last)
}

/// Waits until every node knows the same leader and applied the entries
/// that record the config's sites and nodes (five: three nodes, and the
/// sites a, b, w, after the membership).
fn wait_formed(sites: &TwoSites) {
    sites.wait_until(
        "the metadata cluster formed",
        Duration::from_secs(20),
        || {
            let statuses: Vec<serde_json::Value> =
                [A, B, W].iter().map(|node| sites.status(*node)).collect();
            let leader = &statuses[0]["metadata"]["leader"];
            leader.is_string()
                && statuses.iter().all(|status| {
                    status["metadata"]["leader"] == *leader
                        && status["metadata"]["applied_index"].as_u64().unwrap_or(0) >= 7
                })
        },
    );
}

#[test]
fn every_node_is_a_voter_and_agrees_on_the_leader() {
    let sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    sites.wait_until("a leader known everywhere", Duration::from_secs(20), || {
        let leaders: Vec<serde_json::Value> = [A, B, W]
            .iter()
            .map(|node| sites.status(*node)["metadata"]["leader"].clone())
            .collect();
        leaders[0].is_string() && leaders.iter().all(|leader| *leader == leaders[0])
    });
    for node in [A, B, W] {
        let status = sites.status(node);
        let voters: Vec<&str> = status["metadata"]["voters"]
            .as_array()
            .expect("voters")
            .iter()
            .filter_map(|voter| voter["name"].as_str())
            .collect();
        let mut sorted = voters.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, ["a1", "b1", "w1"], "{status}");
    }
    let witness = sites.ok(W, &["status"]);
    assert!(witness.contains("witness at w"), "{witness}");
    // The witness holds no volumes.
    let refused = sites.cli(W, &["volume", "create", "x", "--size", "1M"]);
    assert!(!refused.success(), "{refused}");
}

#[test]
fn a_site_that_was_away_learns_every_change_when_it_returns() {
    let mut sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    sites.ok(A, &["volume", "create", "old", "--size", "8M"]);
    sites.wait_until("b has the volume", Duration::from_secs(10), || {
        has_volume(&sites, B, "old")
    });
    sites.kill9(B);
    // a and the witness are a majority: changes commit without b.
    let created = sites.ok(A, &["volume", "create", "new", "--size", "8M"]);
    assert!(
        created.contains("not reached yet") && created.contains('b'),
        "{created}"
    );
    sites.ok(A, &["volume", "delete", "old"]);
    qemu_io_ok(&sites.nbd_uri(A, "new"), &["write -P 5 0 1M", "flush"]);
    sites.start_node(B);
    sites.wait_until("b applied both changes", Duration::from_secs(20), || {
        has_volume(&sites, B, "new") && !has_volume(&sites, B, "old")
    });
    assert!(
        !sites.leg(B, "old").exists(),
        "the deleted volume's leg stayed"
    );
    assert_eq!(volume_id(&sites, A, "new"), volume_id(&sites, B, "new"));
    sites.wait_replicated(Duration::from_secs(30));
    let read = qemu_io(&sites.nbd_uri(B, "new"), &["read -P 5 0 1M"]);
    assert_qemu_io_clean(&read);
}

#[test]
fn a_site_cut_from_both_others_changes_nothing_and_the_majority_goes_on() {
    let sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    wait_formed(&sites);
    sites.ok(A, &["link", "cut", "a", "b"]);
    sites.ok(A, &["link", "cut", "a", "w"]);
    let refused = sites.cli(A, &["volume", "create", "lonely", "--size", "8M"]);
    assert!(!refused.success(), "{refused}");
    let lines: Vec<&str> = refused
        .stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert!(
        lines.len() == 1 && lines[0].contains("no majority of the metadata voters"),
        "{refused}"
    );
    assert!(!has_volume(&sites, A, "lonely"));
    // b and the witness still form a majority.
    sites.ok(B, &["volume", "create", "majority", "--size", "8M"]);
    sites.ok(A, &["link", "heal", "a", "b"]);
    sites.ok(A, &["link", "heal", "a", "w"]);
    sites.wait_until("a learned the change", Duration::from_secs(30), || {
        has_volume(&sites, A, "majority")
    });
    assert!(!has_volume(&sites, B, "lonely"));
}

#[test]
fn both_sides_of_a_cut_that_reach_the_witness_create_volumes_with_distinct_ids() {
    let sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    wait_formed(&sites);
    sites.ok(A, &["link", "cut", "a", "b"]);
    sites.ok(B, &["link", "cut", "a", "b"]);
    sites.ok(A, &["volume", "create", "at-a", "--size", "8M"]);
    sites.ok(B, &["volume", "create", "at-b", "--size", "8M"]);
    let (id_a, id_b) = (volume_id(&sites, A, "at-a"), volume_id(&sites, B, "at-b"));
    assert!(
        id_a > 0 && id_b > 0 && id_a != id_b,
        "ids {id_a} and {id_b}"
    );
    // Each owner serves its volume through the cut.
    qemu_io_ok(&sites.nbd_uri(A, "at-a"), &["write -P 1 0 1M", "flush"]);
    qemu_io_ok(&sites.nbd_uri(B, "at-b"), &["write -P 2 0 1M", "flush"]);
    sites.ok(A, &["link", "heal", "a", "b"]);
    sites.ok(B, &["link", "heal", "a", "b"]);
    sites.wait_connected();
    for node in [A, B] {
        sites.wait_until(
            "both volumes at both sites",
            Duration::from_secs(30),
            || has_volume(&sites, node, "at-a") && has_volume(&sites, node, "at-b"),
        );
    }
    // Each site reads the other's volume, strictly (from its owner).
    assert_qemu_io_clean(&qemu_io(&sites.nbd_uri(B, "at-a"), &["read -P 1 0 1M"]));
    assert_qemu_io_clean(&qemu_io(&sites.nbd_uri(A, "at-b"), &["read -P 2 0 1M"]));
}

#[test]
fn a_move_is_committed_once_and_both_sites_agree_on_the_epoch() {
    let sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    sites.ok(A, &["volume", "create", "vm", "--size", "8M"]);
    sites.wait_until("b has the volume", Duration::from_secs(10), || {
        has_volume(&sites, B, "vm")
    });
    qemu_io_ok(&sites.nbd_uri(A, "vm"), &["write -P 3 0 1M"]);
    sites.ok(A, &["volume", "move", "vm", "--to", "b"]);
    for node in [A, B] {
        let show = sites.ok(node, &["volume", "show", "vm"]);
        assert!(show.contains("owner:  site b (epoch 2)"), "{show}");
    }
    // Writes at a now go to b; a second move from a is refused (b owns it).
    qemu_io_ok(&sites.nbd_uri(A, "vm"), &["write -P 4 0 1M"]);
    assert_qemu_io_clean(&qemu_io(&sites.nbd_uri(B, "vm"), &["read -P 4 0 1M"]));
    let again = sites.cli(A, &["volume", "move", "vm", "--to", "a"]);
    assert!(!again.success() && again.stderr.contains("owns"), "{again}");
}

#[test]
fn a_data_directory_of_an_earlier_release_is_refused_with_one_line() {
    let mut sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    sites.kill9(B);
    let catalog = sites.data_dir().join("b1").join("catalog.json");
    std::fs::write(&catalog, b"{\"volumes\":[]}").expect("writing an old catalog");
    let (run, last) = start_b1_refused(&sites);
    assert!(
        last.contains("catalog.json") && last.contains("earlier stretch"),
        "{run}"
    );
}

#[test]
fn a_node_that_lost_its_metadata_store_but_holds_data_refuses_to_start() {
    let mut sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    sites.ok(A, &["volume", "create", "vm", "--size", "8M"]);
    sites.wait_until("b has the volume", Duration::from_secs(10), || {
        has_volume(&sites, B, "vm")
    });
    sites.kill9(B);
    let store = sites.data_dir().join("b1").join("metadata.redb");
    std::fs::remove_file(&store).expect("removing b1's metadata store");
    let (run, last) = start_b1_refused(&sites);
    assert!(
        last.contains("metadata.redb is missing") && last.contains("empty voter"),
        "{run}"
    );
    assert!(!store.exists(), "the refused start made a new store");
}
