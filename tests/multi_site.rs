//! Two sites 25 ms apart (the shipped `local.toml`), driven by real NBD
//! clients: what is written at the owner site reads back at the other site
//! at once, the legs converge, flush-sync data survives the owner's loss,
//! a cut link heals into equal legs, and a node with a foreign certificate
//! is refused.

mod common;

use std::process::Command;
use std::time::Duration;

use common::sites::{A, B, Layout, TwoSites};
use common::*;

const SIZE_MIB: u64 = 256;

fn random_file(dir: &std::path::Path, name: &str, seed: u64, bytes: u64) -> std::path::PathBuf {
    let mut data = vec![0u8; bytes as usize];
    Rng::new(seed).fill(&mut data);
    let path = dir.join(name);
    std::fs::write(&path, &data).expect("writing test data");
    path
}

fn head(path: &std::path::Path, bytes: u64) -> Vec<u8> {
    let mut data = std::fs::read(path).expect("reading a leg");
    data.truncate(bytes as usize);
    data
}

fn qemu_img_compare(left: &std::path::Path, right: &std::path::Path) -> Run {
    require_tool("qemu-img");
    run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(left)
            .arg(right),
        None,
        COMMAND_TIMEOUT,
    )
}

#[test]
fn a_write_at_site_a_reads_back_at_site_b_at_once_and_the_legs_converge() {
    require_tool("nbdcopy");
    // 100 Mbit/s: 64 MiB take seconds to ship, so b's leg is still behind
    // when the read at b starts.
    let sites = TwoSites::start(
        Layout::OneProcess,
        &[("delay_ms = 25", "delay_ms = 25\nbandwidth_mbit = 100")],
    );
    sites.ok(A, &["volume", "create", "vm", "--size", "256M"]);
    let size = 64 * MIB;
    let data = random_file(sites.dir.path(), "data.bin", 7, size);
    let uri_a = sites.nbd_uri(A, "vm");
    run(
        Command::new("nbdcopy").arg(&data).arg(&uri_a),
        None,
        COMMAND_TIMEOUT,
    )
    .assert_ok();
    let expected = std::fs::read(&data).expect("reading test data");
    assert_ne!(
        head(&sites.leg(B, "vm"), size),
        expected,
        "site b's leg already holds the data: the link was not slow enough to tell"
    );
    // A strict read at b asks a for what b lacks.
    let read_at_b = nbd_read_all(&sites.nbd_uri(B, "vm"), sites.dir.path(), "at-b.bin");
    assert!(
        read_at_b[..size as usize] == expected[..],
        "strict read at b differs"
    );
    assert!(read_at_b[size as usize..].iter().all(|byte| *byte == 0));
    let metrics = sites.metrics(B);
    assert!(metric_value(&metrics, "stretch_remote_reads_total", &[]).unwrap_or(0.0) > 0.0);
    sites.wait_replicated(Duration::from_secs(120));
    qemu_img_compare(&sites.leg(A, "vm"), &sites.leg(B, "vm")).assert_ok();
    // The snapshot export at b now serves the same image, locally.
    let snapshot = nbd_read_all(
        &sites.nbd_uri(B, "vm@snapshot"),
        sites.dir.path(),
        "snap.bin",
    );
    assert!(snapshot[..size as usize] == expected[..]);
    let shipped = metric_value(&sites.metrics(A), "stretch_shipped_bytes_total", &[])
        .expect("shipped bytes metric");
    assert!(
        shipped >= size as f64 && shipped <= size as f64 * 1.05,
        "shipped {shipped} bytes for {size} bytes written"
    );
}

#[test]
fn flush_sync_data_survives_the_loss_of_the_owner_site() {
    require_tool("qemu-io");
    let mut sites = TwoSites::start(
        Layout::ProcessPerNode,
        &[("remote_timeout_ms = 5000", "remote_timeout_ms = 1000")],
    );
    sites.ok(
        A,
        &[
            "volume",
            "create",
            "db",
            "--size",
            "64M",
            "--mode",
            "flush-sync",
        ],
    );
    sites.wait_until("b has the volume", Duration::from_secs(10), || {
        sites.cli(B, &["volume", "show", "db"]).success()
    });
    let uri_a = sites.nbd_uri(A, "db");
    qemu_io_ok(
        &uri_a,
        &["write -P 0x5a 0 4M", "write -P 0x6b 8M 1M", "flush"],
    );
    // FLUSH returned: b's journal holds the writes. Lose site a at once.
    sites.kill9(A);
    let snapshot_b = sites.nbd_uri(B, "db@snapshot");
    let result = qemu_io_read_only(&snapshot_b, &["read -P 0x5a 0 4M", "read -P 0x6b 8M 1M"]);
    assert_qemu_io_clean(&result);
    // Strict reads and writes need the owner: they fail (EIO) after the
    // timeout, while snapshot reads go on.
    let strict = qemu_io(&sites.nbd_uri(B, "db"), &["read 0 4k"]);
    assert!(
        strict.output().contains("Input/output error"),
        "a strict read without the owner must fail: {strict}"
    );
    let write = qemu_io(&sites.nbd_uri(B, "db"), &["write -P 1 0 4k"]);
    assert!(
        write.output().contains("Input/output error"),
        "a write without the owner must fail: {write}"
    );
    assert_qemu_io_clean(&qemu_io_read_only(&snapshot_b, &["read -P 0x5a 0 4M"]));
}

#[test]
fn a_cut_link_heals_and_the_legs_converge_with_every_flushed_write() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    // A small backlog bound: the writes made during the cut overflow it,
    // so the return goes through a region resync, not only retained deltas.
    let sites = TwoSites::start(
        Layout::OneProcess,
        &[
            ("backlog_bytes_max = \"256M\"", "backlog_bytes_max = \"8M\""),
            ("remote_timeout_ms = 5000", "remote_timeout_ms = 1000"),
        ],
    );
    sites.ok(
        A,
        &["volume", "create", "vm", "--size", &format!("{SIZE_MIB}M")],
    );
    let uri_a = sites.nbd_uri(A, "vm");
    qemu_io_ok(&uri_a, &["write -P 0x11 0 8M", "flush"]);
    sites.wait_replicated(Duration::from_secs(60));
    sites.ok(A, &["link", "cut", "a", "b"]);
    sites.wait_until("a sees b gone", Duration::from_secs(30), || {
        sites.status(A)["peers"][0]["connected"] == false
    });
    // A seeded workload at a while b is away: 2 MiB writes at scattered
    // offsets, each batch flushed.
    let mut rng = Rng::new(42);
    let mut commands = Vec::new();
    for index in 0..24u64 {
        let offset = rng.range(0, SIZE_MIB / 2) * 2 * MIB;
        commands.push(format!("write -P {} {offset} 2M", 0x20 + index));
        if index % 6 == 5 {
            commands.push("flush".to_string());
        }
    }
    let script: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io_ok(&uri_a, &script);
    // b cannot reach the owner: strict reads fail, snapshot reads serve the
    // image b holds.
    let strict = qemu_io(&sites.nbd_uri(B, "vm"), &["read 0 4k"]);
    assert!(strict.output().contains("Input/output error"), "{strict}");
    assert_qemu_io_clean(&qemu_io_read_only(
        &sites.nbd_uri(B, "vm@snapshot"),
        &["read -P 0x11 0 4k"],
    ));
    sites.ok(A, &["link", "heal", "a", "b"]);
    sites.wait_connected();
    sites.wait_replicated(Duration::from_secs(120));
    qemu_img_compare(&sites.leg(A, "vm"), &sites.leg(B, "vm")).assert_ok();
    let metrics = sites.metrics(A);
    let regions = metric_value(&metrics, "stretch_resync_regions_done_total", &[]).unwrap_or(0.0);
    assert!(
        regions > 0.0,
        "the return was expected to go through a resync"
    );
    // Regions never written were not copied: at most the 2 MiB writes'
    // regions and the first 8 MiB.
    assert!(regions <= 8.0 + 24.0 * 2.0, "{regions} regions copied");
    let at_a = nbd_read_all(&uri_a, sites.dir.path(), "a.bin");
    let at_b = nbd_read_all(&sites.nbd_uri(B, "vm@snapshot"), sites.dir.path(), "b.bin");
    assert!(
        at_a == at_b,
        "snapshot at b differs from a after the resync"
    );
}

#[test]
fn a_node_with_a_certificate_from_another_ca_is_refused() {
    let mut sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    // Replace b1 by an impostor: same name, certificate from another CA.
    sites.kill9(B);
    let foreign = sites.dir.path().join("foreign-pki");
    run(
        Command::new(STRETCH)
            .arg("init")
            .arg(&sites.config)
            .arg("--dir")
            .arg(&foreign),
        None,
        COMMAND_TIMEOUT,
    )
    .assert_ok();
    std::fs::remove_dir_all(sites.pki_dir()).expect("removing b's certificates");
    std::fs::rename(&foreign, sites.pki_dir()).expect("installing the foreign CA");
    sites.start_node(B);
    sites.wait_until("the impostor is refused", Duration::from_secs(30), || {
        sites.logs().contains("failed the cluster handshake")
    });
    assert_eq!(sites.status(A)["peers"][0]["connected"], false);
    assert_eq!(sites.status(B)["peers"][0]["connected"], false);
    // Nothing reaches the impostor: a volume created at a stays at a.
    let created = sites.ok(A, &["volume", "create", "private", "--size", "16M"]);
    assert!(created.contains("not reached yet"), "{created}");
    assert!(!sites.cli(B, &["volume", "show", "private"]).success());
}

#[test]
fn ownership_moves_to_the_other_site_without_losing_a_write() {
    require_tool("qemu-io");
    let sites = TwoSites::start(Layout::OneProcess, &[]);
    sites.ok(A, &["volume", "create", "vm", "--size", "64M"]);
    let uri_a = sites.nbd_uri(A, "vm");
    let uri_b = sites.nbd_uri(B, "vm");
    qemu_io_ok(&uri_a, &["write -P 0x31 0 1M"]);
    // Only the owner's node moves a volume.
    let refused = sites.cli(B, &["volume", "move", "vm", "--to", "b"]);
    assert!(
        !refused.success() && refused.stderr.contains("owns volume"),
        "{refused}"
    );
    // Bad sites and modes are refused with one clear line, changing nothing.
    let unknown = sites.cli(A, &["volume", "move", "vm", "--to", "zz"]);
    assert!(
        !unknown.success() && unknown.stderr.contains("\"zz\""),
        "{unknown}"
    );
    let itself = sites.cli(A, &["volume", "move", "vm", "--to", "a"]);
    assert!(
        !itself.success() && itself.stderr.contains("already owns"),
        "{itself}"
    );
    let owner = sites.cli(
        A,
        &["volume", "create", "v2", "--size", "1M", "--owner", "w"],
    );
    assert!(
        !owner.success() && owner.stderr.contains("not a data site"),
        "{owner}"
    );
    let mode = sites.cli(
        A,
        &["volume", "create", "v2", "--size", "1M", "--mode", "fast"],
    );
    assert!(!mode.success() && mode.stderr.contains("fast"), "{mode}");
    assert!(!sites.cli(A, &["volume", "show", "v2"]).success());
    assert!(
        sites
            .ok(A, &["volume", "show", "vm"])
            .contains("owner:  site a")
    );
    let moved = sites.ok(A, &["volume", "move", "vm", "--to", "b"]);
    assert!(moved.contains("owned by site b"), "{moved}");
    let show = sites.ok(B, &["volume", "show", "vm"]);
    assert!(show.contains("owner:  site b"), "{show}");
    // Writes at b are now local, at a forwarded; both read everything.
    qemu_io_ok(&uri_b, &["write -P 0x32 1M 1M", "flush"]);
    qemu_io_ok(&uri_a, &["write -P 0x33 2M 1M", "flush"]);
    for uri in [&uri_a, &uri_b] {
        qemu_io_ok(
            uri,
            &[
                "read -P 0x31 0 1M",
                "read -P 0x32 1M 1M",
                "read -P 0x33 2M 1M",
            ],
        );
    }
    sites.wait_until("a applied b's deltas", Duration::from_secs(60), || {
        sites.status(B)["backlog_bytes"] == 0 && sites.status(A)["unapplied_deltas"] == 0
    });
    qemu_img_compare(&sites.leg(A, "vm"), &sites.leg(B, "vm")).assert_ok();
}

#[test]
fn a_restarted_owner_copies_only_the_regions_written_while_the_other_site_was_away() {
    require_tool("nbdcopy");
    let mut sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    sites.ok(A, &["volume", "create", "vm", "--size", "256M"]);
    let config = sites.config.to_string_lossy().into_owned();
    sites.ok(A, &["link", "cut", "a", "b", "--config", &config]);
    sites.wait_until("a sees b gone", Duration::from_secs(30), || {
        sites.status(A)["peers"][0]["connected"] == false
    });
    let data = random_file(sites.dir.path(), "data.bin", 9, 24 * MIB);
    run(
        Command::new("nbdcopy")
            .arg("--flush")
            .arg(&data)
            .arg(sites.nbd_uri(A, "vm")),
        None,
        COMMAND_TIMEOUT,
    )
    .assert_ok();
    // The owner dies with the deltas b missed; it restarts knowing (from
    // its journal and its saved map) which 24 regions b lacks, not all 256.
    sites.kill9(A);
    sites.start_node(A);
    sites.ok(A, &["link", "heal", "a", "b", "--config", &config]);
    sites.wait_connected();
    sites.wait_replicated(Duration::from_secs(120));
    qemu_img_compare(&sites.leg(A, "vm"), &sites.leg(B, "vm")).assert_ok();
    let regions = metric_value(&sites.metrics(A), "stretch_resync_regions_done_total", &[])
        .expect("resync metric");
    assert_eq!(regions, 24.0, "copied {regions} regions for 24 MiB written");
}

#[test]
fn a_malformed_message_from_a_peer_closes_only_its_stream() {
    let mut sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    sites.ok(A, &["volume", "create", "vm", "--size", "16M"]);
    // Pose as b1 (its certificate is genuine) to a1, once b1 is gone.
    sites.kill9(B);
    sites.wait_until("a sees b gone", Duration::from_secs(30), || {
        sites.status(A)["peers"][0]["connected"] == false
    });
    let config = std::fs::read_to_string(&sites.config).expect("reading the config");
    let a_peer = peer_address(&config, "a1");
    let b_peer = peer_address(&config, "b1");
    let identity =
        stretch_transport::NodeIdentity::load(&sites.pki_dir(), "b1").expect("b1's certificate");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let endpoint = stretch_transport::PeerEndpoint::bind(&identity, b_peer).expect("binding");
        let connection = endpoint.connect("a1", a_peer).await.expect("a1 accepts b1");
        let (mut send, mut receive) = connection.open_bi().await.expect("a hello stream");
        let hello = stretch_wire::PeerMessage::Hello {
            protocol: stretch_wire::PROTOCOL_VERSION,
            cluster: "local".into(),
            node: "b1".into(),
            site: "b".into(),
        };
        stretch_transport::write_message(&mut send, &hello)
            .await
            .expect("sending the hello");
        let answer = stretch_transport::read_message(&mut receive)
            .await
            .expect("a1 answers the hello");
        assert!(matches!(
            answer,
            Some(stretch_wire::PeerMessage::Hello { .. })
        ));
        // Garbage on one stream: a length that fits, an archive that does not.
        let mut garbage = connection.open_uni().await.expect("a stream");
        let mut frame = 64u32.to_le_bytes().to_vec();
        frame.extend_from_slice(&[0xa5; 64]);
        garbage.write_all(&frame).await.expect("sending garbage");
        let _ = garbage.finish();
        // The connection stays up: a valid message on another stream is
        // still taken (an ack for nothing is refused by the engine, counted).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut valid = connection.open_uni().await.expect("another stream");
        let ack = stretch_wire::PeerMessage::Applied { group: 99, seq: 1 };
        stretch_transport::write_message(&mut valid, &ack)
            .await
            .expect("sending an ack");
        let _ = valid.finish();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            connection.close_reason().is_none(),
            "a1 closed the connection over one malformed stream"
        );
    });
    let metrics = sites.metrics(A);
    assert_eq!(
        metric_value(
            &metrics,
            "stretch_peer_malformed_messages_total",
            &["peer=\"b\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        metric_value(&metrics, "stretch_refused_peer_messages_total", &[]).unwrap_or(0.0) >= 1.0
    );
    assert!(sites.logs().contains("malformed message from peer"));
    // And the volume still works.
    qemu_io_ok(
        &sites.nbd_uri(A, "vm"),
        &["write -P 7 0 64k", "read -P 7 0 64k"],
    );
}

fn peer_address(config: &str, node: &str) -> std::net::SocketAddr {
    let section = config
        .split("[[node]]")
        .find(|section| section.contains(&format!("name = \"{node}\"")))
        .expect("the node's section");
    let line = section
        .lines()
        .find(|line| line.starts_with("peer_listen"))
        .expect("peer_listen");
    line.split('"')
        .nth(1)
        .expect("an address")
        .parse()
        .expect("a socket address")
}

/// A partition must never stop the owner. Separate `stretch node`
/// processes, a small backlog bound: cut a–b, and at once write about
/// 80 MB at scattered offsets at a. The backlog fills while b still counts
/// as connected (a cut is noticed after 3 s of silence); the writes go on
/// once b is declared gone, and all of them complete while the link is
/// still cut. After the heal, b catches up by region and the legs match.
#[test]
fn owner_writes_complete_during_a_partition_that_filled_the_backlog() {
    require_tool("qemu-io");
    let sites = TwoSites::start(
        Layout::ProcessPerNode,
        &[("backlog_bytes_max = \"256M\"", "backlog_bytes_max = \"8M\"")],
    );
    sites.ok(A, &["volume", "create", "vm", "--size", "64M"]);
    let uri_a = sites.nbd_uri(A, "vm");
    qemu_io_ok(&uri_a, &["write -P 0x11 0 4M", "flush"]);
    sites.wait_replicated(Duration::from_secs(60));
    let config = sites.config.to_str().expect("utf-8 path").to_string();
    sites.ok(A, &["link", "cut", "a", "b", "--config", &config]);
    // 320 writes of 256 KiB at seeded offsets: 80 MiB, ten times the bound.
    let mut rng = Rng::new(7);
    let commands: Vec<String> = (0..320u64)
        .map(|index| {
            let offset = rng.range(0, 64 * 4 - 1) * 256 * KIB;
            format!("write -P {} {offset} 256k", 0x20 + index % 200)
        })
        .collect();
    let script: Vec<&str> = commands.iter().map(String::as_str).collect();
    // Fails by qemu-io's timeout if the owner stalls until the heal.
    qemu_io_ok(&uri_a, &script);
    let list = sites.ok(A, &["link", "list"]);
    assert!(
        list.lines()
            .any(|line| line.starts_with("a <-> b") && line.ends_with("CUT")),
        "the writes must complete while the link is still cut:\n{list}"
    );
    let metrics = sites.metrics(A);
    let folds = metric_value(&metrics, "stretch_backlog_folds_total", &[]).unwrap_or(0.0);
    assert!(folds >= 1.0, "b was never left to a resync: {folds}");
    assert_eq!(
        metric_value(&metrics, "stretch_writes_throttled", &[]).unwrap_or(0.0),
        0.0,
        "no write still waits"
    );
    sites.ok(A, &["link", "heal", "a", "b", "--config", &config]);
    sites.wait_connected();
    sites.wait_replicated(Duration::from_secs(120));
    qemu_img_compare(&sites.leg(A, "vm"), &sites.leg(B, "vm")).assert_ok();
}
