//! Ownership leases and failover end to end, with separate `stretch node`
//! processes a1, b1 and the witness w1 (and c1 for three data sites) and
//! real NBD clients (qemu-io, fio with verification): exactly the volumes
//! of a site that lost its lease suspend; `auto` volumes move to a
//! surviving site (the one holding the newest image), `manual` ones wait
//! for `stretch volume promote`; the survivor's own volumes keep serving
//! throughout; after heal the old owner follows the new epoch and its legs
//! converge with the winner's.

mod common;

use std::time::{Duration, Instant};

use common::sites::{A, B, Layout, THREE_SITE, TwoSites};
use common::*;

const W: usize = 2;

/// Each link of site a, as `(node that shapes it, from, to)`: a node
/// process shapes only what it sends, so each end cuts its own direction.
const A_LINKS: [(usize, &str, &str); 4] =
    [(A, "a", "b"), (A, "a", "w"), (B, "a", "b"), (W, "a", "w")];

/// Nodes c1 and w1 of `three-site.toml`.
const C_OF_THREE: usize = 2;
const W_OF_THREE: usize = 3;

/// Each link of site a with three data sites.
const A_LINKS_OF_THREE: [(usize, &str, &str); 6] = [
    (A, "a", "b"),
    (A, "a", "c"),
    (A, "a", "w"),
    (B, "a", "b"),
    (C_OF_THREE, "a", "c"),
    (W_OF_THREE, "a", "w"),
];

/// `stretch link cut` or `heal` of every link in `links`, both ways.
fn set_links(sites: &TwoSites, verb: &str, links: &[(usize, &str, &str)]) {
    for (node, from, to) in links {
        sites.ok(*node, &["link", verb, from, to]);
    }
}

/// Cuts site a off from both others, in both directions.
fn isolate_a(sites: &TwoSites) {
    set_links(sites, "cut", &A_LINKS);
}

fn heal_a(sites: &TwoSites) {
    set_links(sites, "heal", &A_LINKS);
}

fn owner_at(sites: &TwoSites, node: usize, volume: &str) -> (String, u64) {
    let text = http_get(&sites.url(node), &format!("/v1/volumes/{volume}")).unwrap_or_default();
    let info: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (
        info["owner"].as_str().unwrap_or_default().to_string(),
        info["epoch"].as_u64().unwrap_or(0),
    )
}

/// Node `replica`'s own image of `volume` (a snapshot read is served from
/// its leg and cache) equals node `owner`'s, byte for byte (`qemu-img
/// compare`).
fn assert_image_equals(sites: &TwoSites, volume: &str, replica: usize, owner: usize) {
    let compare = run(
        std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(sites.nbd_uri(replica, &format!("{volume}@snapshot")))
            .arg(sites.nbd_uri(owner, volume)),
        None,
        Duration::from_secs(60),
    );
    assert!(
        compare.success(),
        "node {replica}'s image of {volume} differs from node {owner}'s: {compare}"
    );
}

/// a's own image of `volume` equals the owner b's.
fn assert_a_image_equals_b(sites: &TwoSites, volume: &str) {
    assert_image_equals(sites, volume, A, B);
}

/// An 8 MiB volume `name` created at `node`'s site with failover `auto`.
fn create_auto(sites: &TwoSites, node: usize, name: &str) {
    sites.ok(
        node,
        &[
            "volume",
            "create",
            name,
            "--size",
            "8M",
            "--failover",
            "auto",
        ],
    );
}

fn wait_formed(sites: &TwoSites) {
    sites.wait_until(
        "the metadata cluster formed and a and b hold leases",
        Duration::from_secs(30),
        || {
            [A, B].iter().all(|node| {
                let status = sites.status(*node);
                status["metadata"]["leader"].is_string()
                    && status["metadata"]["applied_index"].as_u64().unwrap_or(0) >= 7
                    && status["lease"]["valid"] == true
            })
        },
    );
}

#[test]
fn an_isolated_owner_loses_exactly_its_volumes_and_auto_ones_move_to_the_survivor() {
    require_tool("qemu-io");
    let sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    wait_formed(&sites);
    create_auto(&sites, A, "va");
    sites.ok(A, &["volume", "create", "vm", "--size", "8M"]);
    create_auto(&sites, B, "vb");
    qemu_io_ok(&sites.nbd_uri(A, "va"), &["write -P 1 0 1M", "flush"]);
    sites.wait_replicated(Duration::from_secs(30));

    isolate_a(&sites);
    let cut = Instant::now();
    // While its lease lasts a still acknowledges writes to va (async): b
    // never gets them, they are lost with the failover, and at heal a's
    // image of va has diverged from b's in region 4.
    let lost = qemu_io(&sites.nbd_uri(A, "va"), &["write -P 7 4M 64k"]);
    let a_wrote = lost.success() && !lost.stdout.contains("error");
    // b's own volume never suspends.
    qemu_io_ok(&sites.nbd_uri(B, "vb"), &["write -P 2 0 64k", "flush"]);
    sites.wait_until("b took va over", Duration::from_secs(20), || {
        owner_at(&sites, B, "va") == ("b".to_string(), 2)
    });
    let took = cut.elapsed();
    // Served at b with what a acknowledged before the cut, and writable.
    qemu_io_ok(
        &sites.nbd_uri(B, "va"),
        &[
            "read -P 1 0 1M",
            "write -P 3 1M 1M",
            "flush",
            "read -P 3 1M 1M",
        ],
    );
    let show = sites.ok(B, &["volume", "show", "va"]);
    assert!(
        show.contains("last failover: a -> b at epoch 2 (auto)"),
        "{show}"
    );
    // The manual volume waits for an operator, and says so.
    sites.wait_until("b reports vm suspended", Duration::from_secs(10), || {
        sites
            .ok(B, &["status"])
            .contains("vm: owner site a holds no lease; failover policy manual")
    });
    assert_eq!(owner_at(&sites, B, "vm"), ("a".to_string(), 1));
    let metrics = sites.metrics(B);
    assert_eq!(
        metric_value(&metrics, "stretch_suspended_volumes", &[]),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "stretch_sites_without_lease", &[]),
        Some(1.0),
        "{metrics}"
    );
    // At a, its lease ran out: a write to the volume it lost fails
    // instead of being acknowledged (it is held, then EIO).
    let refused = qemu_io(&sites.nbd_uri(A, "va"), &["write -P 9 0 4k", "flush"]);
    assert!(
        !refused.success() || refused.stdout.contains("error") || refused.stderr.contains("error"),
        "a acknowledged a write without a lease: {refused}"
    );
    let a_status = sites.ok(A, &["status"]);
    assert!(
        a_status.contains("lease:            NOT HELD"),
        "{a_status}"
    );

    // The operator accepts the loss of vm's unreplicated writes.
    let refused = sites.cli(B, &["volume", "promote", "vm", "--site", "b"]);
    assert!(
        !refused.success() && refused.stderr.contains("--accept-data-loss"),
        "{refused}"
    );
    let promoted = sites.ok(
        B,
        &[
            "volume",
            "promote",
            "vm",
            "--site",
            "b",
            "--accept-data-loss",
        ],
    );
    assert!(promoted.contains("now owned by site b"), "{promoted}");
    qemu_io_ok(&sites.nbd_uri(B, "vm"), &["write -P 4 0 64k", "flush"]);
    let regions_copied = |sites: &TwoSites| {
        metric_value(&sites.metrics(B), "stretch_resync_regions_done_total", &[]).unwrap_or(0.0)
    };
    let copied_before = regions_copied(&sites);

    heal_a(&sites);
    sites.wait_until("a follows the new epochs", Duration::from_secs(30), || {
        owner_at(&sites, A, "va") == ("b".to_string(), 2)
            && owner_at(&sites, A, "vm") == ("b".to_string(), 2)
    });
    sites.wait_replicated_from(B, A, Duration::from_secs(60));
    // a reads b's data through its own leg (a snapshot read is served
    // from the local leg), without the write it alone acknowledged.
    let read = qemu_io_read_only(
        &sites.nbd_uri(A, "va@snapshot"),
        &["read -P 1 0 1M", "read -P 3 1M 1M", "read -P 0 4M 64k"],
    );
    assert_qemu_io_clean(&read);
    // Only the regions that may differ were copied to a: the one its lost
    // write touched (4) and the one b wrote since (1), not all 8 of va.
    let copied = regions_copied(&sites) - copied_before;
    assert!(
        copied <= 2.0,
        "b copied {copied} regions to a (a's lost write acknowledged: {a_wrote})"
    );
    eprintln!("heal copied {copied} regions to a (a's lost write acknowledged: {a_wrote})");
    assert_a_image_equals_b(&sites, "va");
    eprintln!("failover of va took {took:?} after the cut");
}

#[test]
fn a_cut_between_the_data_sites_that_both_reach_the_witness_suspends_nothing() {
    require_tool("qemu-io");
    let sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    wait_formed(&sites);
    create_auto(&sites, A, "va");
    create_auto(&sites, B, "vb");
    sites.ok(A, &["link", "cut", "a", "b"]);
    sites.ok(B, &["link", "cut", "a", "b"]);
    // Longer than a lease and a failover check: nothing may move.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        qemu_io_ok(&sites.nbd_uri(A, "va"), &["write -P 5 0 64k", "flush"]);
        qemu_io_ok(&sites.nbd_uri(B, "vb"), &["write -P 6 0 64k", "flush"]);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(owner_at(&sites, A, "va"), ("a".to_string(), 1));
    assert_eq!(owner_at(&sites, B, "va"), ("a".to_string(), 1));
    assert_eq!(owner_at(&sites, B, "vb"), ("b".to_string(), 1));
    for node in [A, B] {
        let status = sites.ok(node, &["status"]);
        assert!(!status.contains("suspended:"), "{status}");
        assert!(status.contains("lease:            held"), "{status}");
    }
}

#[test]
fn losing_the_witness_suspends_nothing() {
    require_tool("qemu-io");
    let mut sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    wait_formed(&sites);
    create_auto(&sites, A, "va");
    sites.kill9(W);
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        qemu_io_ok(&sites.nbd_uri(A, "va"), &["write -P 7 0 64k", "flush"]);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(owner_at(&sites, B, "va"), ("a".to_string(), 1));
    let status = sites.ok(A, &["status"]);
    assert!(status.contains("lease:            held"), "{status}");
}

#[test]
fn an_owner_killed_mid_write_is_failed_over_and_converges_when_it_restarts() {
    require_tool("qemu-io");
    require_tool("fio");
    let mut sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    wait_formed(&sites);
    create_auto(&sites, A, "va");
    create_auto(&sites, B, "vb");
    qemu_io_ok(&sites.nbd_uri(A, "va"), &["write -P 1 0 2M", "flush"]);
    sites.wait_replicated(Duration::from_secs(30));
    // b's own volume is written (and verified) by fio throughout: a's
    // death must not stall or fail it.
    let fio_report = sites.dir.path().join("fio-vb.json");
    let fio = std::process::Command::new("fio")
        .current_dir(sites.dir.path())
        .args([
            "--ioengine=nbd",
            &format!("--uri={}", sites.nbd_uri(B, "vb")),
            "--name=vb",
            "--rw=randwrite",
            "--bs=4k",
            "--size=8m",
            "--iodepth=8",
            "--rate_iops=400",
            "--verify=crc32c",
            "--do_verify=1",
            "--output-format=json",
            &format!("--output={}", fio_report.display()),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting fio");
    // Written and acknowledged at a, perhaps not shipped yet, then a dies.
    qemu_io_ok(&sites.nbd_uri(A, "va"), &["write -P 2 2M 1M", "flush"]);
    sites.kill9(A);
    sites.wait_until("b took va over", Duration::from_secs(20), || {
        owner_at(&sites, B, "va") == ("b".to_string(), 2)
    });
    qemu_io_ok(
        &sites.nbd_uri(B, "va"),
        &["read -P 1 0 2M", "write -P 3 4M 1M", "flush"],
    );
    let fio = fio.wait_with_output().expect("waiting for fio");
    let text = std::fs::read_to_string(&fio_report).unwrap_or_default();
    assert!(
        fio.status.success(),
        "fio on b's own volume failed while a died: {}\n{text}",
        String::from_utf8_lossy(&fio.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("fio's report is not JSON ({error}):\n{text}"));
    let job = &report["jobs"][0];
    assert_eq!(job["error"].as_u64(), Some(0), "{job}");
    assert_eq!(job["write"]["io_bytes"].as_u64(), Some(8 * MIB), "{job}");
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(8 * MIB),
        "verified: {job}"
    );
    eprintln!(
        "fio on vb while a died: longest write {:.1} ms",
        job["write"]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6
    );
    sites.start_node(A);
    sites.wait_until("a follows the new epoch", Duration::from_secs(30), || {
        owner_at(&sites, A, "va") == ("b".to_string(), 2)
    });
    sites.wait_replicated_from(B, A, Duration::from_secs(60));
    assert_a_image_equals_b(&sites, "va");
}

/// Three data sites (`three-site.toml`: a and b 10 ms apart, c 40 ms from
/// both): when the owner a is cut off from everyone, the survivors b and c
/// offer their images and the one holding the newest takes a's `auto`
/// volume; the write a acknowledged with a FLUSH (flush-sync: in one
/// survivor's journal at least) is there, the other survivor follows the
/// new owner, and after heal every leg converges with the new owner's.
#[test]
fn with_three_data_sites_the_survivor_with_the_newest_image_takes_an_isolated_owners_volume() {
    require_tool("qemu-io");
    const C: usize = C_OF_THREE;
    let sites = TwoSites::start_shipped(&THREE_SITE, Layout::ProcessPerNode, &[]);
    sites.wait_until(
        "the metadata cluster formed and a, b and c hold leases",
        Duration::from_secs(30),
        || {
            [A, B, C].iter().all(|node| {
                let status = sites.status(*node);
                status["metadata"]["leader"].is_string() && status["lease"]["valid"] == true
            })
        },
    );
    sites.ok(
        A,
        &[
            "volume",
            "create",
            "va",
            "--size",
            "8M",
            "--mode",
            "flush-sync",
            "--failover",
            "auto",
        ],
    );
    qemu_io_ok(&sites.nbd_uri(A, "va"), &["write -P 1 0 1M", "flush"]);
    // Cut at once: what b and c hold differs by what was in flight.
    qemu_io_ok(&sites.nbd_uri(A, "va"), &["write -P 2 1M 1M", "flush"]);
    set_links(&sites, "cut", &A_LINKS_OF_THREE);
    let cut = Instant::now();
    sites.wait_until("a survivor took va over", Duration::from_secs(20), || {
        let (owner, epoch) = owner_at(&sites, B, "va");
        epoch == 2 && (owner == "b" || owner == "c")
    });
    let took = cut.elapsed();
    let (owner, _) = owner_at(&sites, B, "va");
    let (new, other) = if owner == "b" { (B, C) } else { (C, B) };
    // Every write a acknowledged with a FLUSH is at the new owner.
    qemu_io_ok(
        &sites.nbd_uri(new, "va"),
        &[
            "read -P 1 0 1M",
            "read -P 2 1M 1M",
            "write -P 3 2M 1M",
            "flush",
        ],
    );
    let show = sites.ok(new, &["volume", "show", "va"]);
    assert!(
        show.contains(&format!("last failover: a -> {owner} at epoch 2 (auto)")),
        "{show}"
    );
    sites.wait_until(
        "the other survivor follows the new owner",
        Duration::from_secs(20),
        || owner_at(&sites, other, "va") == (owner.clone(), 2),
    );

    set_links(&sites, "heal", &A_LINKS_OF_THREE);
    sites.wait_until("a follows the new epoch", Duration::from_secs(30), || {
        owner_at(&sites, A, "va") == (owner.clone(), 2)
    });
    sites.wait_replicated_from(new, other, Duration::from_secs(60));
    sites.wait_replicated_from(new, A, Duration::from_secs(60));
    for node in [A, other] {
        assert_image_equals(&sites, "va", node, new);
    }
    eprintln!("three-site failover of va to {owner} took {took:?} after the cut");
    // A survivor that saw a newer offer named the site holding it, which
    // must be the one that took the volume.
    for line in sites
        .logs()
        .lines()
        .filter(|line| line.contains("another survivor holds a newer image"))
    {
        assert!(
            line.contains(&format!("site={owner} ")),
            "a survivor left va to another site than its new owner {owner}: {line}"
        );
        eprintln!("{line}");
    }
}
