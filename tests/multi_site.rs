//! Two sites 25 ms apart (the shipped `local.toml`), driven by real NBD
//! clients: what is written at the owner site reads back at the other site
//! at once, the legs converge, flush-sync data survives the owner's loss,
//! a cut link heals into equal legs, a node with a foreign certificate
//! is refused, a genuine certificate claiming another node is refused, a
//! peer's frame headers reserve no more than its connection's budget, a
//! renewed certificate is accepted, compressible blocks cross the link
//! compressed while random ones cross raw, strict reads at b are served
//! there under read leases yet see every write a acknowledged, and a 32 MiB
//! write in flight with others reaches b (it starts a delta of its own).

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
    let metrics = sites.metrics(A);
    let shipped =
        metric_value(&metrics, "stretch_shipped_bytes_total", &[]).expect("shipped bytes metric");
    assert!(
        shipped >= size as f64 && shipped <= size as f64 * 1.05,
        "shipped {shipped} bytes for {size} bytes written"
    );
    // Random data does not compress: the written blocks cross raw, at
    // least their size, and nothing crosses larger than it is. (The
    // strict reads' answers also carry never-written blocks, read as
    // zeros, which do shrink: how many depends on timing.)
    let (blocks, sent) = link_bytes_to_b(&metrics);
    assert!(blocks >= size as f64, "{blocks} block bytes sent to b");
    assert!(
        sent <= blocks && sent >= size as f64,
        "{size} random bytes written; the {blocks} block bytes sent to b took {sent} on the link"
    );
}

/// The bytes of the blocks a sent to b, and what they took on the link.
fn link_bytes_to_b(metrics: &str) -> (f64, f64) {
    let of = |name| metric_value(metrics, name, &["peer=\"b\""]).expect(name);
    (
        of("stretch_link_block_bytes_total"),
        of("stretch_link_sent_block_bytes_total"),
    )
}

/// Text-like data: blocks of numbered lines, as a guest's logs or
/// source files look, each block different.
fn text_file(dir: &std::path::Path, name: &str, bytes: u64) -> std::path::PathBuf {
    let mut data = Vec::with_capacity(bytes as usize);
    let mut line = 0u64;
    while (data.len() as u64) < bytes {
        data.extend_from_slice(
            format!("{line:>10} stretch wrote this line of a compressible log\n").as_bytes(),
        );
        line += 1;
    }
    data.truncate(bytes as usize);
    let path = dir.join(name);
    std::fs::write(&path, &data).expect("writing test data");
    path
}

#[test]
fn compressible_blocks_cross_the_link_compressed_and_arrive_whole() {
    require_tool("nbdcopy");
    let sites = TwoSites::start(Layout::OneProcess, &[]);
    sites.ok(A, &["volume", "create", "vm", "--size", "64M"]);
    let size = 32 * MIB;
    let data = text_file(sites.dir.path(), "text.bin", size);
    run(
        Command::new("nbdcopy")
            .arg(&data)
            .arg(sites.nbd_uri(A, "vm")),
        None,
        COMMAND_TIMEOUT,
    )
    .assert_ok();
    sites.wait_replicated(Duration::from_secs(120));
    // Site b's leg holds exactly what a's does, expanded block by block.
    qemu_img_compare(&sites.leg(A, "vm"), &sites.leg(B, "vm")).assert_ok();
    let expected = std::fs::read(&data).expect("reading test data");
    assert!(
        head(&sites.leg(B, "vm"), size) == expected,
        "b's leg differs from what was written"
    );
    let metrics = sites.metrics(A);
    let (blocks, sent) = link_bytes_to_b(&metrics);
    assert!(blocks >= size as f64, "{blocks} block bytes sent to b");
    assert!(
        sent <= blocks * 0.5,
        "compressible blocks took {sent} bytes on the link for {blocks}"
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
    // The impostor dials the witness at once; a notices b1 is gone after
    // its idle timeout and then fails to reach the impostor too.
    sites.wait_until("the impostor is refused", Duration::from_secs(30), || {
        sites.logs().contains("failed the cluster handshake")
            && sites.status(A)["peers"][0]["connected"] == false
    });
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
    let (
        sites,
        Impostor {
            a_peer,
            b_peer,
            identity,
        },
    ) = pose_as_b1();
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

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn hello_as(node: &str, site: &str) -> stretch_wire::PeerMessage {
    stretch_wire::PeerMessage::Hello {
        protocol: stretch_wire::PROTOCOL_VERSION,
        cluster: "local".into(),
        node: node.into(),
        site: site.into(),
    }
}

/// The resident memory of process `pid`, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

#[test]
fn a_genuine_certificate_claiming_another_node_is_refused_and_changes_nothing() {
    let sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    sites.ok(A, &["volume", "create", "vm", "--size", "16M"]);
    sites.wait_until("b has the volume", Duration::from_secs(10), || {
        sites.cli(B, &["volume", "show", "vm"]).success()
    });
    let config = std::fs::read_to_string(&sites.config).expect("reading the config");
    let a_peer = peer_address(&config, "a1");
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
    let runtime = tokio_runtime();
    // The witness's certificate, and a1's own, each claiming to be b1 (the
    // data node at site b, connected to a1 all along).
    for holder in ["w1", "a1"] {
        let identity = stretch_transport::NodeIdentity::load(&sites.pki_dir(), holder)
            .expect("a genuine certificate");
        runtime.block_on(async {
            let endpoint =
                stretch_transport::PeerEndpoint::bind(&identity, loopback).expect("binding");
            let connection = endpoint
                .connect("a1", a_peer)
                .await
                .expect("the certificate chains to the cluster CA");
            let (mut send, mut receive) = connection.open_bi().await.expect("a hello stream");
            stretch_transport::write_message(&mut send, &hello_as("b1", "b"))
                .await
                .expect("sending the hello");
            // What a peer taken for b1 could do: ask for the volume's
            // deletion through the metadata (a write forwarded to a leader).
            for request in 1..8 {
                let Ok(mut stream) = connection.open_uni().await else {
                    break;
                };
                let delete = stretch_wire::PeerMessage::RaftRequest {
                    request,
                    body: br#"{"Write":{"command":{"op":"delete-volume","name":"vm"},"hops":1}}"#
                        .to_vec(),
                };
                let _ = stretch_transport::write_message(&mut stream, &delete).await;
                let _ = stream.finish();
            }
            let answer = stretch_transport::read_message(&mut receive).await;
            assert!(
                !matches!(answer, Ok(Some(stretch_wire::PeerMessage::Hello { .. }))),
                "a1 answered the hello of {holder} posing as b1"
            );
            let closed = tokio::time::timeout(Duration::from_secs(10), connection.closed()).await;
            assert!(closed.is_ok(), "a1 kept the connection of {holder} open");
        });
    }
    // A hello announcing a frame of the largest size is refused at once,
    // not waited for.
    let identity =
        stretch_transport::NodeIdentity::load(&sites.pki_dir(), "w1").expect("w1's certificate");
    runtime.block_on(async {
        let endpoint = stretch_transport::PeerEndpoint::bind(&identity, loopback).expect("binding");
        let connection = endpoint.connect("a1", a_peer).await.expect("connecting");
        let (mut send, _receive) = connection.open_bi().await.expect("a hello stream");
        send.write_all(&stretch_wire::FRAME_BYTES_MAX.to_le_bytes())
            .await
            .expect("sending a header");
        let closed = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
        assert!(closed.is_ok(), "a1 waited for a 40 MiB hello");
    });
    let logs = sites.logs();
    for holder in ["w1", "a1"] {
        let refusal = format!("the certificate names node \"{holder}\", the hello claims \"b1\"");
        assert!(
            logs.contains(&refusal),
            "no refusal of {holder} logged:\n{logs}"
        );
    }
    let metrics = sites.metrics(A);
    assert_eq!(
        metric_value(&metrics, "stretch_peer_connections_refused_total", &[]),
        Some(3.0),
        "{metrics}"
    );
    // Nothing changed: b1's connection was never replaced, and the volume
    // is still at both sites.
    assert!(!logs.contains("replaced"), "{logs}");
    assert_eq!(sites.status(A)["peers"][0]["connected"], true);
    assert_eq!(sites.status(B)["peers"][0]["connected"], true);
    for site in [A, B] {
        assert!(sites.cli(site, &["volume", "show", "vm"]).success());
    }
    qemu_io_ok(
        &sites.nbd_uri(A, "vm"),
        &["write -P 9 0 64k", "read -P 9 0 64k"],
    );
}

#[test]
fn a_frame_header_is_honoured_only_within_the_connection_budget() {
    let (
        mut sites,
        Impostor {
            a_peer,
            b_peer,
            identity,
        },
    ) = pose_as_b1();
    let a_pid = sites.pid(A);
    let before = resident_bytes(a_pid);
    const STREAMS: usize = 40;
    const SENT_PER_STREAM: usize = 12 << 20;
    let runtime = tokio_runtime();
    runtime.block_on(async {
        let endpoint = stretch_transport::PeerEndpoint::bind(&identity, b_peer).expect("binding");
        let connection = endpoint.connect("a1", a_peer).await.expect("a1 accepts b1");
        let (mut send, mut receive) = connection.open_bi().await.expect("a hello stream");
        stretch_transport::write_message(&mut send, &hello_as("b1", "b"))
            .await
            .expect("sending the hello");
        let answer = stretch_transport::read_message(&mut receive)
            .await
            .expect("a1 answers the hello");
        assert!(matches!(
            answer,
            Some(stretch_wire::PeerMessage::Hello { .. })
        ));
        // Each stream announces the largest frame and sends 12 MiB of it,
        // never the rest (the streams stay open): 480 MiB that a node
        // honouring every header would hold.
        let mut senders = Vec::new();
        for _ in 0..STREAMS {
            let connection = connection.clone();
            senders.push(tokio::spawn(async move {
                let mut stream = connection.open_uni().await.ok()?;
                let header = stretch_wire::FRAME_BYTES_MAX.to_le_bytes();
                stream.write_all(&header).await.ok()?;
                let chunk = vec![0x5a; 1 << 20];
                for _ in 0..SENT_PER_STREAM / chunk.len() {
                    stream.write_all(&chunk).await.ok()?;
                }
                // Held open: the frame is neither finished nor cut short.
                connection.closed().await;
                Some(stream)
            }));
        }
        let mut peak = 0;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            peak = peak.max(resident_bytes(a_pid));
        }
        let grown = peak.saturating_sub(before);
        eprintln!("a1 grew by {} MiB under the announced frames", grown >> 20);
        assert!(
            grown < 256 << 20,
            "a1 grew by {} MiB for frames announced but not sent",
            grown >> 20
        );
        // Nothing on the connection progresses: a1 closes it.
        let closed = tokio::time::timeout(Duration::from_secs(30), connection.closed()).await;
        assert!(closed.is_ok(), "a1 kept a stalled connection open");
        for sender in senders {
            let _ = sender.await;
        }
        endpoint.close();
    });
    drop(runtime);
    assert!(sites.logs().contains("frames from the peer stalled"));
    // a1 kept serving, and the real b1 comes back.
    qemu_io_ok(
        &sites.nbd_uri(A, "vm"),
        &["write -P 7 0 64k", "read -P 7 0 64k"],
    );
    sites.start_node(B);
    sites.wait_connected();
}

#[test]
fn a_renewed_certificate_is_accepted_from_a_node_directory_without_the_ca_key() {
    let mut sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    // `stretch init`'s default: one year.
    assert_eq!(certificate_days(&sites, A), Some(364.0));
    assert_eq!(certificate_days(&sites, B), Some(364.0));
    let pki = sites.pki_dir();
    let pki = pki.to_str().expect("a UTF-8 path");
    let renewed = run(
        Command::new(STRETCH).args([
            "cert",
            "renew",
            "--node",
            "b1",
            "--cert-days",
            "30",
            "--dir",
            pki,
        ]),
        None,
        COMMAND_TIMEOUT,
    );
    renewed.assert_ok();
    assert!(
        renewed.stdout.contains("certificate renewed for node b1"),
        "{renewed}"
    );
    let b_pki = sites.dir.path().join("b1-pki");
    run(
        Command::new(STRETCH)
            .args(["cert", "export", "--node", "b1", "--dir", pki, "--out"])
            .arg(&b_pki),
        None,
        COMMAND_TIMEOUT,
    )
    .assert_ok();
    assert!(!b_pki.join("ca.key").exists());
    sites.kill9(B);
    sites.start_node_with_pki(B, b_pki);
    sites.wait_connected();
    assert_eq!(certificate_days(&sites, B), Some(29.0));
    assert_eq!(certificate_days(&sites, A), Some(364.0));
    sites.ok(A, &["volume", "create", "vm", "--size", "16M"]);
    sites.wait_until("b has the volume", Duration::from_secs(10), || {
        sites.cli(B, &["volume", "show", "vm"]).success()
    });
}

/// Whole days left on node `node`'s certificate, from its metrics.
fn certificate_days(sites: &TwoSites, node: usize) -> Option<f64> {
    metric_value(
        &sites.metrics(node),
        "stretch_certificate_expiry_seconds",
        &[],
    )
    .map(|seconds| (seconds / 86_400.0).floor())
}

/// What a test needs to pose as b1 to a1 with b1's genuine certificate.
struct Impostor {
    a_peer: std::net::SocketAddr,
    b_peer: std::net::SocketAddr,
    identity: stretch_transport::NodeIdentity,
}

/// A two-site cluster with a volume `vm` at a, b1 killed and a seeing it
/// gone, so a test can pose as b1.
fn pose_as_b1() -> (TwoSites, Impostor) {
    let mut sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    sites.ok(A, &["volume", "create", "vm", "--size", "16M"]);
    sites.kill9(B);
    sites.wait_until("a sees b gone", Duration::from_secs(30), || {
        sites.status(A)["peers"][0]["connected"] == false
    });
    let config = std::fs::read_to_string(&sites.config).expect("reading the config");
    let impostor = Impostor {
        a_peer: peer_address(&config, "a1"),
        b_peer: peer_address(&config, "b1"),
        identity: stretch_transport::NodeIdentity::load(&sites.pki_dir(), "b1")
            .expect("b1's certificate"),
    };
    (sites, impostor)
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

/// The owner rewrites a random tenth of the regions between passes in
/// which site b reads the whole volume: every read sees what a
/// acknowledged before it began (qemu-io verifies each pattern), the
/// regions a left alone are read at b under read leases, and a's writes to
/// leased regions revoke them first.
#[test]
fn strict_reads_at_the_other_site_see_every_owner_write_while_leases_serve_the_rest_locally() {
    require_tool("qemu-io");
    let sites = TwoSites::start(Layout::OneProcess, &[]);
    sites.ok(A, &["volume", "create", "vm", "--size", "32M"]);
    sites.wait_until("b has the volume", Duration::from_secs(10), || {
        sites.cli(B, &["volume", "show", "vm"]).success()
    });
    let (uri_a, uri_b) = (sites.nbd_uri(A, "vm"), sites.nbd_uri(B, "vm"));
    let regions = 32_u64;
    let mut pattern: Vec<u8> = (1..=regions as u8).collect();
    let writes = |which: &[u64], pattern: &[u8]| -> String {
        which
            .iter()
            .map(|region| format!("write -P {} {region}M 1M\n", pattern[*region as usize]))
            .collect()
    };
    let all: Vec<u64> = (0..regions).collect();
    assert_qemu_io_clean(&qemu_io_script(&uri_a, &writes(&all, &pattern)));
    sites.wait_replicated(Duration::from_secs(60));
    let mut rng = Rng::new(0x1ea5e);
    for pass in 0..6 {
        // Each region twice: the first read of a region may ask the owner
        // (and get a lease), the second is served at b if it did.
        let reads: String = (0..regions)
            .map(|region| {
                let byte = pattern[region as usize];
                format!(
                    "read -P {byte} {}k 64k\nread -P {byte} {}k 960k\n",
                    region * 1024,
                    region * 1024 + 64
                )
            })
            .collect();
        let result = qemu_io_script(&uri_b, &reads);
        assert!(
            !result.output().contains("Pattern verification failed"),
            "pass {pass}: a strict read at b missed a write a acknowledged: {result}"
        );
        assert_qemu_io_clean(&result);
        let rewritten: Vec<u64> = (0..regions / 10)
            .map(|_| rng.range(0, regions - 1))
            .collect();
        for region in &rewritten {
            pattern[*region as usize] = pattern[*region as usize].wrapping_add(37).max(1);
        }
        assert_qemu_io_clean(&qemu_io_script(&uri_a, &writes(&rewritten, &pattern)));
    }
    let at_b = sites.metrics(B);
    let local = metric_value(
        &at_b,
        "stretch_volume_strict_reads_total",
        &["volume=\"vm\"", "served=\"local\""],
    )
    .unwrap_or(0.0);
    let asked = metric_value(
        &at_b,
        "stretch_volume_strict_reads_total",
        &["volume=\"vm\"", "served=\"owner\""],
    )
    .unwrap_or(0.0);
    assert!(
        local >= asked,
        "b served {local} strict reads under leases and asked the owner {asked} times"
    );
    let at_a = sites.metrics(A);
    let revoked = metric_value(
        &at_a,
        "stretch_volume_read_lease_revocations_total",
        &["volume=\"vm\""],
    )
    .unwrap_or(0.0);
    assert!(revoked >= 1.0, "no write of a revoked a lease ({revoked})");
    let shown = sites.ok(B, &["volume", "show", "vm"]);
    assert!(
        shown.contains("served locally under read leases"),
        "{shown}"
    );
}

/// An export mounted as a file with nbdfuse (read-only), unmounted and
/// stopped when dropped.
struct FuseFile {
    mountpoint: std::path::PathBuf,
    child: std::process::Child,
}

impl FuseFile {
    fn mount(uri: &str, mountpoint: &std::path::Path) -> FuseFile {
        std::fs::create_dir_all(mountpoint).expect("creating the mount point");
        let child = Command::new("nbdfuse")
            .arg("-r")
            .arg(mountpoint)
            .arg(uri)
            .spawn()
            .expect("starting nbdfuse");
        let file = mountpoint.join("nbd");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !file.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "nbdfuse did not mount {uri}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        FuseFile {
            mountpoint: mountpoint.to_path_buf(),
            child,
        }
    }

    fn file(&self) -> std::path::PathBuf {
        self.mountpoint.join("nbd")
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mountpoint).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The strict reads b served under leases, and those it asked a for.
fn strict_reads_at_b(sites: &TwoSites, volume: &str) -> (f64, f64) {
    let metrics = sites.metrics(B);
    let count = |served: &str| {
        metric_value(
            &metrics,
            "stretch_volume_strict_reads_total",
            &[
                &format!("volume=\"{volume}\""),
                &format!("served=\"{served}\""),
            ],
        )
        .unwrap_or(0.0)
    };
    (count("local"), count("owner"))
}

/// A file system written at a and checked at b (`e2fsck -fn` through
/// nbdfuse on b's strict export), twice: both checks find it clean, and
/// the second reads what the first already leased from b's own copy,
/// asking a for almost nothing.
#[test]
fn a_file_system_checked_twice_at_the_other_site_is_read_there_the_second_time() {
    require_tool("nbdcopy");
    require_tool("nbdfuse");
    require_tool("mkfs.ext4");
    require_tool("e2fsck");
    let sites = TwoSites::start(Layout::OneProcess, &[]);
    sites.ok(A, &["volume", "create", "fs", "--size", "256M"]);
    let tree = sites.dir.path().join("tree");
    std::fs::create_dir_all(&tree).expect("creating the file tree");
    let mut rng = Rng::new(0xe2f5);
    for index in 0..200 {
        let mut data = vec![0u8; rng.range(1, 64 * 1024) as usize];
        rng.fill(&mut data);
        std::fs::write(tree.join(format!("file-{index}")), data).expect("writing a file");
    }
    let image = sites.dir.path().join("fs.img");
    std::fs::File::create(&image)
        .and_then(|file| file.set_len(256 * MIB))
        .expect("creating the image");
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&image),
        None,
        COMMAND_TIMEOUT,
    )
    .assert_ok();
    run(
        Command::new("nbdcopy")
            .arg(&image)
            .arg(sites.nbd_uri(A, "fs")),
        None,
        COMMAND_TIMEOUT,
    )
    .assert_ok();
    sites.wait_replicated(Duration::from_secs(120));
    let mounted = FuseFile::mount(&sites.nbd_uri(B, "fs"), &sites.dir.path().join("mnt"));
    let check = || {
        run(
            Command::new("e2fsck").arg("-fn").arg(mounted.file()),
            None,
            COMMAND_TIMEOUT,
        )
    };
    check().assert_ok();
    let (local_first, asked_first) = strict_reads_at_b(&sites, "fs");
    check().assert_ok();
    let (local, asked) = strict_reads_at_b(&sites, "fs");
    let (local_second, asked_second) = (local - local_first, asked - asked_first);
    assert!(asked_first > 0.0, "the first check asked a for nothing");
    assert!(
        asked_second * 10.0 <= local_second,
        "the second check asked a {asked_second} times and read {local_second} times at b"
    );
}

/// The Python that runs the libnbd scripts in `tests/scripts/`; fails the
/// test, saying which package is missing, without the bindings.
fn python_with_libnbd() -> &'static str {
    let python = "/usr/bin/python3";
    let bindings = Command::new(python).args(["-c", "import nbd"]).status();
    assert!(
        bindings.is_ok_and(|status| status.success()),
        "the libnbd python bindings are missing: install the Debian package python3-libnbd"
    );
    python
}

/// Owner writes and strict reads at the other site at the same time
/// (`tests/scripts/concurrent_strict_reads.py`, libnbd): a thread at a
/// rewrites a random tenth of the regions over and over while another at b
/// reads the whole volume in a loop; every block b reads is at least as new
/// as the newest write of it a acknowledged before the read began, while b
/// serves most of them under read leases.
#[test]
fn strict_reads_concurrent_with_owner_writes_never_miss_an_acknowledged_write() {
    let python = python_with_libnbd();
    // Regions are leased again as soon as b reads them after a write, so
    // b reads most of them locally, passes are fast, and a read of a
    // region follows a's write to it within the revocation's round trip.
    let sites = TwoSites::start(
        Layout::OneProcess,
        &[(
            "read_lease_cooldown_ms = 10000",
            "read_lease_cooldown_ms = 0",
        )],
    );
    sites.ok(A, &["volume", "create", "vm", "--size", "32M"]);
    sites.wait_until("b has the volume", Duration::from_secs(10), || {
        sites.cli(B, &["volume", "show", "vm"]).success()
    });
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/scripts/concurrent_strict_reads.py");
    let result = run(
        Command::new(python)
            .arg(script)
            .arg(sites.nbd_uri(A, "vm"))
            .arg(sites.nbd_uri(B, "vm"))
            .args(["32", "20", "7"]),
        None,
        COMMAND_TIMEOUT,
    );
    assert!(
        result.success() && result.stdout.contains(" 0 violations"),
        "{result}"
    );
    let (local, asked) = strict_reads_at_b(&sites, "vm");
    assert!(
        local > asked && asked > 0.0,
        "b served {local} strict reads under leases and asked a {asked} times"
    );
}

/// A 32 MiB write (the largest request) in flight together with one of
/// 8 MiB − 4 KiB, random bytes from libnbd
/// (`tests/scripts/two_writes_at_once.py`), deltas closing only at 8 MiB
/// or after 5 s: joined, they would make a 40 MiB delta no frame carries.
/// The second write starts a delta of its own, and b gets both.
#[test]
fn a_largest_write_after_others_reaches_the_other_site() {
    let python = python_with_libnbd();
    let sites = TwoSites::start(
        Layout::OneProcess,
        &[("delta_interval_ms = 100", "delta_interval_ms = 5000")],
    );
    sites.ok(A, &["volume", "create", "vm", "--size", "64M"]);
    sites.wait_until("b has the volume", Duration::from_secs(10), || {
        sites.cli(B, &["volume", "show", "vm"]).success()
    });
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/scripts/two_writes_at_once.py");
    let first = 8 * MIB - 4096;
    let second = 32 * MIB;
    let expected = sites.dir.path().join("expected.bin");
    let result = run(
        Command::new(python)
            .arg(script)
            .arg(sites.nbd_uri(A, "vm"))
            .arg(first.to_string())
            .arg(second.to_string())
            .arg("11")
            .arg(&expected),
        None,
        COMMAND_TIMEOUT,
    );
    assert!(result.success(), "{result}");
    sites.wait_replicated(Duration::from_secs(60));
    qemu_img_compare(&sites.leg(A, "vm"), &sites.leg(B, "vm")).assert_ok();
    let written = head(&sites.leg(B, "vm"), 8 * MIB + second);
    let expected = std::fs::read(&expected).expect("reading the written image");
    assert!(written == expected, "b's leg is not what was written");
}
