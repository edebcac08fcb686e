//! Two nodes of one cluster talk; a node with a certificate from another
//! CA is refused whether it dials or is dialled.

use std::net::SocketAddr;
use std::time::Duration;

use stretch_transport::{CongestionControl, NodeIdentity, PeerEndpoint, init};

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

/// The endpoint of cluster member `node`, on a free loopback port.
fn member(pki: &std::path::Path, node: &str) -> PeerEndpoint {
    let identity = NodeIdentity::load(pki, node).expect("identity");
    PeerEndpoint::bind(&identity, loopback()).expect("bind")
}

/// Like [`member`], with every datagram it sends shaped by `links`.
fn shaped_member(
    pki: &std::path::Path,
    node: &str,
    links: stretch_transport::LinkTable,
) -> PeerEndpoint {
    let identity = NodeIdentity::load(pki, node).expect("identity");
    PeerEndpoint::bind_shaped(&identity, loopback(), links, Default::default()).expect("bind")
}

/// Runs `future` on a fresh runtime with a time limit.
fn run<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(20), future)
                .await
                .expect("test timed out")
        })
}

#[test]
fn init_creates_then_keeps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = init(dir.path(), "test", &["a1", "b1"]).expect("init");
    assert!(first.ca_created);
    assert_eq!(first.nodes_created, vec!["a1", "b1"]);
    let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca");
    let again = init(dir.path(), "test", &["a1", "b1", "w1"]).expect("init again");
    assert!(!again.ca_created);
    assert_eq!(again.nodes_created, vec!["w1"]);
    assert_eq!(again.nodes_kept, vec!["a1", "b1"]);
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).expect("ca"), ca);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("a1.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "private keys are private");
    assert!(init(dir.path(), "test", &["bad name"]).is_err());
    // Loading from a place without a CA, or a node without a certificate,
    // is an error that names the problem.
    let empty = tempfile::tempdir().expect("tempdir");
    let error = NodeIdentity::load(empty.path(), "a1").expect_err("no CA");
    assert!(error.to_string().contains("stretch init"), "{error}");
    let error = NodeIdentity::load(dir.path(), "zz").expect_err("no certificate");
    assert!(error.to_string().contains("zz.pem"), "{error}");
}

#[test]
fn members_exchange_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    init(dir.path(), "test", &["a1", "b1"]).expect("init");
    run(async {
        let a = member(dir.path(), "a1");
        let b = member(dir.path(), "b1");
        let b_address = b.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let connection = b.accept().await.expect("a1 connects");
            let (mut send, mut receive) = connection.accept_bi().await.expect("stream");
            let message = receive.read_to_end(1024).await.expect("read");
            send.write_all(&message).await.expect("echo");
            send.finish().expect("finish");
            connection.closed().await;
        });
        let connection = a.connect("b1", b_address).await.expect("a1 reaches b1");
        let (mut send, mut receive) = connection.open_bi().await.expect("stream");
        send.write_all(b"delta 1").await.expect("write");
        send.finish().expect("finish");
        let echo = receive.read_to_end(1024).await.expect("echo");
        assert_eq!(echo, b"delta 1");
        connection.close(0u32.into(), b"done");
        server.await.expect("server task");
    });
}

/// Accepts connections on `endpoint` forever, counting the ones that
/// completed the handshake.
fn count_accepted(
    endpoint: std::sync::Arc<PeerEndpoint>,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Some(connection) = endpoint.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(connection);
        }
    });
    accepted
}

#[test]
fn a_stranger_is_refused_both_ways() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    let cluster = tempfile::tempdir().expect("tempdir");
    let other = tempfile::tempdir().expect("tempdir");
    init(cluster.path(), "test", &["a1", "b1"]).expect("init");
    // Same node name, same cluster name, different CA.
    init(other.path(), "test", &["b1"]).expect("init other");
    run(async {
        let insider = Arc::new(member(cluster.path(), "a1"));
        let stranger = Arc::new(member(other.path(), "b1"));
        let member_address = insider.local_addr().expect("address");
        let stranger_address = stranger.local_addr().expect("address");
        let member_accepted = count_accepted(insider.clone());
        let stranger_accepted = count_accepted(stranger.clone());

        // The member dials the stranger: the stranger's server certificate
        // does not chain to the cluster CA.
        let dialled = insider.connect("b1", stranger_address).await;
        assert!(dialled.is_err(), "connected to a stranger");

        // The stranger dials the member: its client certificate is refused.
        // TLS 1.3 can complete on the client before the server has checked
        // the client certificate, so the connection may open and then die.
        if let Ok(connection) = stranger.connect("a1", member_address).await {
            let error = connection.closed().await;
            assert!(
                !matches!(error, quinn::ConnectionError::LocallyClosed),
                "the member closed nothing; the connection died of {error}"
            );
        }
        assert_eq!(
            member_accepted.load(Ordering::SeqCst),
            0,
            "the member let a stranger in"
        );
        assert_eq!(stranger_accepted.load(Ordering::SeqCst), 0);
    });
}

/// A hello and a delta cross an authenticated link as validated messages; a
/// malformed frame on another stream ends only that stream with an error,
/// and the connection keeps carrying messages.
#[test]
fn messages_cross_the_link_and_malformed_frames_end_only_their_stream() {
    use stretch_transport::{FrameError, read_message, write_message};
    use stretch_wire::PeerMessage;

    let dir = tempfile::tempdir().expect("tempdir");
    init(dir.path(), "test", &["a1", "b1"]).expect("init");
    run(async {
        let a = member(dir.path(), "a1");
        let b = member(dir.path(), "b1");
        let b_address = b.local_addr().expect("address");
        let receiver = tokio::spawn(async move {
            let connection = b.accept().await.expect("a1 connects");
            let mut outcomes = Vec::new();
            for _ in 0..3 {
                let mut stream = connection.accept_uni().await.expect("stream");
                let mut messages = Vec::new();
                let ended = loop {
                    match read_message(&mut stream).await {
                        Ok(Some(message)) => messages.push(message),
                        Ok(None) => break None,
                        Err(error) => break Some(error),
                    }
                };
                outcomes.push((messages, ended));
            }
            outcomes
        });
        let connection = a.connect("b1", b_address).await.expect("a1 reaches b1");
        let delta = PeerMessage::Delta {
            group: 1,
            epoch: 1,
            first: 7,
            seq: 7,
            blocks: vec![stretch_wire::WireBlock {
                volume: 1,
                block: 3,
                payload: stretch_wire::WirePayload::Raw(vec![0x5a; stretch_core::BLOCK_SIZE]),
            }],
        };
        let hello = PeerMessage::Hello {
            protocol: stretch_wire::PROTOCOL_VERSION,
            cluster: "test".into(),
            node: "a1".into(),
            site: "a".into(),
        };
        // Stream 1: three good messages.
        let mut good = connection.open_uni().await.expect("stream");
        write_message(&mut good, &hello).await.expect("write");
        write_message(&mut good, &delta).await.expect("write");
        let ack = PeerMessage::Journaled { group: 1, seq: 7 };
        write_message(&mut good, &ack).await.expect("write");
        good.finish().expect("finish");
        // Stream 2: a frame announcing 64 bytes of garbage.
        let mut bad = connection.open_uni().await.expect("stream");
        let mut garbage = 64u32.to_le_bytes().to_vec();
        garbage.extend([0xff; 64]);
        bad.write_all(&garbage).await.expect("write");
        bad.finish().expect("finish");
        // Stream 3: good again, on the same connection.
        let mut after = connection.open_uni().await.expect("stream");
        write_message(&mut after, &ack).await.expect("write");
        after.finish().expect("finish");

        let outcomes = receiver.await.expect("receiver");
        assert_eq!(outcomes[0].0, vec![hello, delta, ack.clone()]);
        assert!(outcomes[0].1.is_none());
        assert!(outcomes[1].0.is_empty());
        assert!(
            matches!(outcomes[1].1, Some(FrameError::Wire(_))),
            "garbage must end its stream with a wire error: {:?}",
            outcomes[1].1
        );
        assert_eq!(outcomes[2].0, vec![ack]);
        assert!(outcomes[2].1.is_none());
    });
}

/// Sends `payload` on a new bidirectional stream and waits for the echo.
async fn echo(connection: &quinn::Connection, payload: &[u8]) -> Vec<u8> {
    let (mut send, mut receive) = connection.open_bi().await.expect("stream");
    send.write_all(payload).await.expect("write");
    send.finish().expect("finish");
    receive.read_to_end(1 << 20).await.expect("echo")
}

/// With a 25 ms one-way link each way, no round trip can take less than
/// 50 ms; with the link cut nothing arrives, and after healing it does.
#[test]
fn shaped_links_delay_and_cut() {
    use stretch_core::LinkProfile;
    use stretch_transport::LinkTable;

    let dir = tempfile::tempdir().expect("tempdir");
    init(dir.path(), "test", &["a1", "b1"]).expect("init");
    run(async {
        let links_a = LinkTable::new(1);
        let links_b = LinkTable::new(2);
        let a = shaped_member(dir.path(), "a1", links_a.clone());
        let b = shaped_member(dir.path(), "b1", links_b.clone());
        let a_address = a.local_addr().expect("address");
        let b_address = b.local_addr().expect("address");
        let wan = LinkProfile {
            delay_ms: 25,
            ..LinkProfile::IDEAL
        };
        links_a.set(b_address, wan);
        links_b.set(a_address, wan);
        tokio::spawn(async move {
            while let Some(connection) = b.accept().await {
                tokio::spawn(async move {
                    while let Ok((mut send, mut receive)) = connection.accept_bi().await {
                        // The stream given up while the link was cut may
                        // fail here; later streams must still work.
                        let Ok(message) = receive.read_to_end(1 << 20).await else {
                            continue;
                        };
                        if send.write_all(&message).await.is_ok() {
                            let _ = send.finish();
                        }
                    }
                });
            }
        });
        let connection = a.connect("b1", b_address).await.expect("a1 reaches b1");
        for _ in 0..3 {
            let started = std::time::Instant::now();
            assert_eq!(echo(&connection, b"ping").await, b"ping");
            let round_trip = started.elapsed();
            // Each direction may leave up to the timer slack early.
            assert!(
                round_trip >= Duration::from_millis(50) - 2 * stretch_transport::TIMER_SLACK,
                "a round trip over two 25 ms links took {round_trip:?}"
            );
        }
        links_a.set(b_address, LinkProfile { cut: true, ..wan });
        let while_cut = tokio::time::timeout(Duration::from_millis(400), echo(&connection, b"cut"));
        assert!(while_cut.await.is_err(), "a message crossed a cut link");
        links_a.set(b_address, wan);
        assert_eq!(echo(&connection, b"healed").await, b"healed");
    });
}

/// Days from now to `at`, rounded down.
fn days_until(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::SystemTime::now())
        .expect("in the future")
        .as_secs()
        / 86_400
}

#[test]
fn certificates_have_a_finite_lifetime_and_renew_with_the_same_ca() {
    use stretch_transport::{CertificateInfo, Lifetimes, init_with, renew};

    let dir = tempfile::tempdir().expect("tempdir");
    let lifetimes = Lifetimes {
        ca_days: 100,
        node_days: 30,
    };
    init_with(dir.path(), "test", &["a1", "b1"], lifetimes).expect("init");
    let a1 = NodeIdentity::load(dir.path(), "a1").expect("identity");
    assert_eq!(days_until(a1.not_after), 29);
    let info = CertificateInfo::parse(&a1.certificate).expect("parse");
    assert_eq!(info.node, "a1");
    let ca = CertificateInfo::parse(&a1.ca);
    assert!(ca.is_err(), "the CA names no node: {ca:?}");

    let key_before = std::fs::read(dir.path().join("b1.key")).expect("key");
    let ca_before = std::fs::read(dir.path().join("ca.pem")).expect("ca");
    let renewed = renew(dir.path(), &["b1"], 60).expect("renew");
    assert_eq!(renewed.len(), 1);
    assert_eq!(renewed[0].node, "b1");
    assert_eq!(days_until(renewed[0].not_after), 59);
    assert_eq!(
        std::fs::read(dir.path().join("b1.key")).expect("key"),
        key_before
    );
    assert_eq!(
        std::fs::read(dir.path().join("ca.pem")).expect("ca"),
        ca_before
    );
    // Never past the CA's own end.
    let capped = renew(dir.path(), &["a1"], 1000).expect("renew");
    assert_eq!(days_until(capped[0].not_after), 99);
    // Every node when none is named.
    let all = renew(dir.path(), &[], 10).expect("renew all");
    let names: Vec<&str> = all.iter().map(|renewed| renewed.node.as_str()).collect();
    assert_eq!(names, vec!["a1", "b1"]);
    assert!(renew(dir.path(), &["zz"], 10).is_err());
    assert!(renew(dir.path(), &[], 0).is_err());

    // The renewed certificates still make a cluster.
    run(async {
        let a = member(dir.path(), "a1");
        let b = member(dir.path(), "b1");
        let b_address = b.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let connection = b.accept().await.expect("a1 connects");
            let peer = stretch_transport::peer_certificate(&connection).expect("a1's certificate");
            assert_eq!(peer.node, "a1");
            assert_eq!(days_until(peer.not_after), 9);
            connection.closed().await;
        });
        let connection = a.connect("b1", b_address).await.expect("a1 reaches b1");
        connection.close(0u32.into(), b"done");
        server.await.expect("server task");
    });
}

#[test]
fn an_exported_node_directory_has_no_ca_key_and_runs_the_node() {
    use stretch_transport::{PkiError, export};

    let dir = tempfile::tempdir().expect("tempdir");
    init(dir.path(), "test", &["a1", "b1"]).expect("init");
    let nodes = tempfile::tempdir().expect("tempdir");
    let out = nodes.path().join("b1");
    export(dir.path(), "b1", &out).expect("export");
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .expect("listing")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    assert_eq!(files, vec!["b1.key", "b1.pem", "ca.pem"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("b1.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Running init there again adds nothing and needs no CA key; adding a
    // node does.
    let kept = init(&out, "test", &["b1"]).expect("init in a node directory");
    assert!(!kept.ca_created && kept.nodes_created.is_empty());
    assert!(matches!(
        init(&out, "test", &["b1", "c1"]),
        Err(PkiError::NoCaKey(_))
    ));
    assert!(matches!(
        export(dir.path(), "a1", dir.path()),
        Err(PkiError::ExportIntoCa(_))
    ));
    // A renewal reaches the node by exporting again.
    stretch_transport::renew(dir.path(), &["b1"], 7).expect("renew");
    export(dir.path(), "b1", &out).expect("export again");
    let b1 = NodeIdentity::load(&out, "b1").expect("identity without the CA key");
    assert_eq!(days_until(b1.not_after), 6);
    // A certificate file of another node is refused at load.
    std::fs::copy(dir.path().join("a1.pem"), out.join("b1.pem")).expect("copy");
    assert!(matches!(
        NodeIdentity::load(&out, "b1"),
        Err(PkiError::WrongNode { .. })
    ));
    std::fs::copy(dir.path().join("b1.pem"), out.join("b1.pem")).expect("copy");
    run(async {
        let a = member(dir.path(), "a1");
        let b = member(&out, "b1");
        let b_address = b.local_addr().expect("address");
        tokio::spawn(async move {
            while let Some(connection) = b.accept().await {
                connection.closed().await;
            }
        });
        let connection = a.connect("b1", b_address).await.expect("a1 reaches b1");
        connection.close(0u32.into(), b"done");
    });
}

/// Dialling node X at an address where node Y answers fails, whatever the
/// certificate chain; a certificate naming two nodes is no node's.
#[test]
fn a_dialled_peer_must_be_the_node_dialled() {
    let dir = tempfile::tempdir().expect("tempdir");
    init(dir.path(), "test", &["a1", "b1", "w1"]).expect("init");
    run(async {
        let a = member(dir.path(), "a1");
        let w = std::sync::Arc::new(member(dir.path(), "w1"));
        let w_address = w.local_addr().expect("address");
        let accepted = count_accepted(w.clone());
        let error = a
            .connect("b1", w_address)
            .await
            .expect_err("w1 passed as b1");
        assert!(
            matches!(error, stretch_transport::EndpointError::Connection { .. }),
            "{error}"
        );
        let _ = accepted;
    });
    // Issued by the cluster CA, naming a1 and b1 at once.
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("ca.key")).expect("key"))
            .expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca"),
        ca_key,
    )
    .expect("issuer");
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(vec!["a1".to_string(), "b1".to_string()]).expect("params");
    let both = params.signed_by(&key, &issuer).expect("certificate");
    let parsed = stretch_transport::CertificateInfo::parse(both.der());
    assert!(
        matches!(
            parsed,
            Err(stretch_transport::IdentityError::SeveralNames(_))
        ),
        "{parsed:?}"
    );
}

#[test]
fn connections_pace_with_the_congestion_control_their_endpoint_was_bound_with() {
    let dir = tempfile::tempdir().expect("tempdir");
    init(dir.path(), "test", &["a1", "b1"]).expect("init");
    for congestion in [CongestionControl::Bbr, CongestionControl::Cubic] {
        let bind = |node: &str| {
            let identity = NodeIdentity::load(dir.path(), node).expect("identity");
            let links = stretch_transport::LinkTable::new(1);
            PeerEndpoint::bind_shaped(&identity, loopback(), links, congestion).expect("bind")
        };
        run(async {
            let (a, b) = (bind("a1"), bind("b1"));
            let b_address = b.local_addr().expect("address");
            let server = tokio::spawn(async move {
                let connection = b.accept().await.expect("a1 connects");
                connection.closed().await;
            });
            let connection = a.connect("b1", b_address).await.expect("a1 reaches b1");
            let controller = connection.congestion_state().into_any();
            let paced_as_bound = match congestion {
                CongestionControl::Bbr => controller.is::<quinn::congestion::Bbr>(),
                CongestionControl::Cubic => controller.is::<quinn::congestion::Cubic>(),
            };
            assert!(paced_as_bound, "{congestion:?} was asked for");
            connection.close(0u32.into(), b"done");
            server.await.expect("server task");
        });
    }
}
