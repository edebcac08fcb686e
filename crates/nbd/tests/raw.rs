//! Byte-level tests with a hand-rolled client: malformed handshakes, every
//! error path of the transmission phase, pipelining, ordering, disconnects
//! and shutdown.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use stretch_nbd::protocol::*;
use stretch_nbd::{ExportError, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DISK: usize = MIB;

fn disk_server() -> (TestServer, Arc<MemExport>) {
    let export = MemExport::new(DISK);
    let server = TestServer::start(MemBackend::new().with("disk", "scratch disk", export.clone()));
    (server, export)
}

fn small_limits_server(
    max_request_bytes: u32,
    max_in_flight: usize,
) -> (TestServer, Arc<MemExport>) {
    let export = MemExport::with_max_call(DISK, max_request_bytes);
    let server = TestServer::with_config(
        MemBackend::new().with("disk", "", export.clone()),
        ServerConfig {
            max_request_bytes,
            max_in_flight_per_connection: max_in_flight,
            ..ServerConfig::default()
        },
    );
    (server, export)
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// Each case writes something bad after the greeting; the server must drop
/// that connection and only that one.
#[tokio::test]
async fn garbage_handshakes_close_only_their_own_connection() {
    let (server, export) = disk_server();
    let (mut good, _) = connect(server.addr, "disk").await;
    write_and_verify(&mut good, 0, b"before").await;

    let option_header = |option: u32, length: u32| {
        let mut b = NBD_OPTS_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b
    };
    let fixed = (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes();
    let long_name = vec![b'x'; MAX_STRING_BYTES + 1];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "http request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("no fixed newstyle flag", 0u32.to_be_bytes().to_vec()),
        ("unknown client flag", 0x8000_0001u32.to_be_bytes().to_vec()),
        ("bad option magic", [&fixed[..], &[0x55; 16]].concat()),
        (
            "option longer than max_option_bytes",
            [&fixed[..], &option_header(NBD_OPT_GO, u32::MAX)].concat(),
        ),
        (
            "GO with a 4097-byte name",
            [
                &fixed[..],
                &option_header(NBD_OPT_GO, 4 + long_name.len() as u32 + 2),
                &info_payload(std::str::from_utf8(&long_name).expect("ascii"), &[]),
            ]
            .concat(),
        ),
        (
            "EXPORT_NAME with a 4097-byte name",
            [
                &fixed[..],
                &option_header(NBD_OPT_EXPORT_NAME, long_name.len() as u32),
                &long_name,
            ]
            .concat(),
        ),
        (
            "EXPORT_NAME for an unknown export",
            [&fixed[..], &option_header(NBD_OPT_EXPORT_NAME, 4), b"nope"].concat(),
        ),
        (
            "truncated option header",
            [&fixed[..], &option_header(NBD_OPT_LIST, 0)[..10]].concat(),
        ),
        (
            "option payload shorter than its length",
            [&fixed[..], &option_header(NBD_OPT_GO, 100), &[0u8; 10]].concat(),
        ),
    ];
    for (case, bytes) in cases {
        let mut bad = greet(server.addr).await;
        within(bad.write_all(&bytes)).await.expect(case);
        // Half-close so that "truncated" cases see EOF instead of waiting.
        let _ = bad.shutdown().await;
        expect_closed(&mut bad).await;
        write_and_verify(&mut good, 4096, case.as_bytes()).await;
    }
    // Still accepting new clients.
    let (mut late, _) = connect(server.addr, "disk").await;
    write_and_verify(&mut late, 8192, b"after").await;
    export.assert_no_violations();
    server.stop();
}

#[tokio::test]
async fn options_are_answered_and_negotiation_continues() {
    let (server, _export) = disk_server();
    let mut s = negotiate_start(server.addr).await;

    // Unsupported options: ERR_UNSUP, keep going.
    for option in [
        NBD_OPT_STRUCTURED_REPLY,
        NBD_OPT_STARTTLS,
        NBD_OPT_SET_META_CONTEXT,
        NBD_OPT_EXTENDED_HEADERS,
        999,
    ] {
        send_option(&mut s, option, &[]).await;
        let reply = read_option_reply(&mut s).await;
        assert_eq!(reply.option, option);
        assert_eq!(reply.reply_type, NBD_REP_ERR_UNSUP, "option {option}");
    }

    // LIST with a payload is invalid; without, it lists then ACKs.
    send_option(&mut s, NBD_OPT_LIST, b"junk").await;
    assert_eq!(
        read_option_reply(&mut s).await.reply_type,
        NBD_REP_ERR_INVALID
    );
    send_option(&mut s, NBD_OPT_LIST, &[]).await;
    let entry = read_option_reply(&mut s).await;
    assert_eq!(entry.reply_type, NBD_REP_SERVER);
    assert_eq!(&entry.data[..4], &4u32.to_be_bytes());
    assert_eq!(&entry.data[4..8], b"disk");
    assert_eq!(&entry.data[8..], b"scratch disk");
    assert_eq!(read_option_reply(&mut s).await.reply_type, NBD_REP_ACK);

    // INFO answers what we support, ignores the rest, stays in haggling.
    send_option(
        &mut s,
        NBD_OPT_INFO,
        &info_payload("disk", &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION, 77]),
    )
    .await;
    let infos = read_infos(&mut s, NBD_OPT_INFO).await;
    let info = export_info(&infos);
    assert_eq!(info.size, DISK as u64);
    assert_eq!(
        info.flags,
        NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_CAN_MULTI_CONN
    );
    let block = &infos[&NBD_INFO_BLOCK_SIZE];
    assert_eq!(block[0..4], 1u32.to_be_bytes());
    assert_eq!(block[4..8], 4096u32.to_be_bytes());
    assert_eq!(
        block[8..12],
        stretch_nbd::DEFAULT_MAX_REQUEST_BYTES.to_be_bytes()
    );
    assert_eq!(infos[&NBD_INFO_NAME], b"disk");
    assert_eq!(infos[&NBD_INFO_DESCRIPTION], b"scratch disk");
    assert!(!infos.contains_key(&77));

    // Unknown and unavailable exports: ERR_UNKNOWN with a message.
    for name in ["nope", "unavailable"] {
        send_option(&mut s, NBD_OPT_GO, &info_payload(name, &[])).await;
        let reply = read_option_reply(&mut s).await;
        assert_eq!(reply.reply_type, NBD_REP_ERR_UNKNOWN, "{name}");
        assert!(!reply.data.is_empty(), "error replies carry a message");
    }

    // A framed but malformed GO: ERR_INVALID, not a disconnect.
    let mut malformed = info_payload("disk", &[1]);
    malformed.push(0);
    send_option(&mut s, NBD_OPT_GO, &malformed).await;
    assert_eq!(
        read_option_reply(&mut s).await.reply_type,
        NBD_REP_ERR_INVALID
    );

    // Finally a good GO works on the same connection.
    send_option(&mut s, NBD_OPT_GO, &info_payload("disk", &[])).await;
    let infos = read_infos(&mut s, NBD_OPT_GO).await;
    assert_eq!(export_info(&infos).size, DISK as u64);
    write_and_verify(&mut s, 0, b"negotiated").await;
    server.stop();
}

#[tokio::test]
async fn export_name_honours_no_zeroes() {
    let (server, _export) = disk_server();
    for no_zeroes in [false, true] {
        let mut s = greet(server.addr).await;
        let flags = NBD_FLAG_C_FIXED_NEWSTYLE | if no_zeroes { NBD_FLAG_C_NO_ZEROES } else { 0 };
        s.write_all(&flags.to_be_bytes()).await.expect("flags");
        send_option(&mut s, NBD_OPT_EXPORT_NAME, b"disk").await;
        let reply = read_exact_vec(&mut s, 10).await;
        assert_eq!(reply[0..8], (DISK as u64).to_be_bytes());
        assert_ne!(
            u16::from_be_bytes([reply[8], reply[9]]) & NBD_FLAG_HAS_FLAGS,
            0
        );
        if !no_zeroes {
            assert_eq!(read_exact_vec(&mut s, 124).await, vec![0u8; 124]);
        }
        // Any miscount of the padding would now break the framing.
        write_and_verify(&mut s, 100, b"export name").await;
    }
    server.stop();
}

#[tokio::test]
async fn abort_is_acknowledged_then_closed() {
    let (server, _export) = disk_server();
    let mut s = negotiate_start(server.addr).await;
    send_option(&mut s, NBD_OPT_ABORT, &[]).await;
    let reply = read_option_reply(&mut s).await;
    assert_eq!(
        (reply.option, reply.reply_type),
        (NBD_OPT_ABORT, NBD_REP_ACK)
    );
    expect_closed(&mut s).await;
    server.stop();
}

// ---------------------------------------------------------------------------
// Transmission errors
// ---------------------------------------------------------------------------

#[tokio::test]
async fn oversized_requests_are_einval_and_the_stream_stays_in_sync() {
    let max = 64 * KIB as u32;
    let (server, export) = small_limits_server(max, 16);
    let (mut s, _) = connect(server.addr, "disk").await;

    assert_eq!(
        roundtrip(&mut s, NBD_CMD_READ, 0, 0, max + 1).await,
        NBD_EINVAL
    );
    // No data follows an error reply: the next reply must parse.
    write_and_verify(&mut s, 0, &[1; 4096]).await;

    // An oversized WRITE's payload is skipped, not parsed as headers.
    let payload = vec![0x77; max as usize + 1];
    send_request(&mut s, NBD_CMD_WRITE, 0, 9, 0, max + 1, &payload).await;
    assert_eq!(read_reply(&mut s).await, (NBD_EINVAL, 9));
    write_and_verify(&mut s, 0, &[2; 4096]).await;

    // Exactly the maximum is fine.
    let data = pseudo_random(max as usize, 3);
    write_and_verify(&mut s, 4096, &data).await;
    export.assert_no_violations();
    server.stop();
}

#[tokio::test]
async fn out_of_range_requests_are_einval() {
    let (server, export) = disk_server();
    let (mut s, _) = connect(server.addr, "disk").await;
    let size = DISK as u64;
    for (command, offset, length) in [
        (NBD_CMD_READ, size - 10, 100),
        (NBD_CMD_READ, size + 1, 0),
        (NBD_CMD_READ, u64::MAX - 10, 100),
        (NBD_CMD_TRIM, size - 10, 100),
        (NBD_CMD_WRITE_ZEROES, size, 1),
        (NBD_CMD_WRITE_ZEROES, u64::MAX, u32::MAX),
    ] {
        assert_eq!(
            roundtrip(&mut s, command, 0, offset, length).await,
            NBD_EINVAL,
            "command {command} at {offset}+{length}"
        );
    }
    // The last byte is in range.
    write_and_verify(&mut s, size - 1, &[0xee]).await;
    assert_eq!(
        export.stats.calls(),
        2,
        "refused requests reached the export"
    );
    export.assert_no_violations();
    server.stop();
}

#[tokio::test]
async fn write_past_the_end_is_enospc_and_the_stream_stays_in_sync() {
    let (server, export) = disk_server();
    let (mut s, _) = connect(server.addr, "disk").await;
    // The payload is crafted to look like requests: if the server parsed it
    // as headers instead of skipping it, the next reply would be wrong.
    let mut payload = Vec::new();
    while payload.len() < 4096 {
        payload.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        payload.extend_from_slice(&[0; 24]);
    }
    payload.truncate(4096);
    send_request(
        &mut s,
        NBD_CMD_WRITE,
        0,
        41,
        DISK as u64 - 10,
        4096,
        &payload,
    )
    .await;
    assert_eq!(read_reply(&mut s).await, (NBD_ENOSPC, 41));
    write_and_verify(&mut s, 0, b"still in sync").await;
    assert_eq!(export.contents()[DISK - 10..], [0; 10]);
    export.assert_no_violations();
    server.stop();
}

#[tokio::test]
async fn unknown_commands_and_flags_are_einval() {
    let (server, export) = disk_server();
    let (mut s, _) = connect(server.addr, "disk").await;
    for command in [
        NBD_CMD_CACHE,
        NBD_CMD_BLOCK_STATUS,
        NBD_CMD_RESIZE,
        99,
        u16::MAX,
    ] {
        assert_eq!(
            roundtrip(&mut s, command, 0, 0, 512).await,
            NBD_EINVAL,
            "command {command}"
        );
    }
    // Flags for features that were never negotiated.
    assert_eq!(
        roundtrip(&mut s, NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512).await,
        NBD_EINVAL
    );
    assert_eq!(
        roundtrip(&mut s, NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 512).await,
        NBD_EINVAL
    );
    // A bad flag on a WRITE still consumes its payload.
    send_request(
        &mut s,
        NBD_CMD_WRITE,
        NBD_CMD_FLAG_NO_HOLE,
        5,
        0,
        512,
        &[0x11; 512],
    )
    .await;
    assert_eq!(read_reply(&mut s).await, (NBD_EINVAL, 5));
    write_and_verify(&mut s, 0, b"ok").await;
    // Valid flags reach the export.
    assert_eq!(
        roundtrip(
            &mut s,
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA,
            0,
            512
        )
        .await,
        NBD_SUCCESS
    );
    assert_eq!(export.stats.fua_other.load(Ordering::SeqCst), 1);
    export.assert_no_violations();
    server.stop();
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    let export = MemExport::read_only(DISK, 0x42);
    let server = TestServer::start(MemBackend::new().with("ro", "", export.clone()));
    let (mut s, info) = connect(server.addr, "ro").await;
    assert_ne!(info.flags & NBD_FLAG_READ_ONLY, 0);

    send_request(&mut s, NBD_CMD_WRITE, 0, 3, 0, 1024, &[0; 1024]).await;
    assert_eq!(read_reply(&mut s).await, (NBD_EPERM, 3));
    assert_eq!(roundtrip(&mut s, NBD_CMD_TRIM, 0, 0, 1024).await, NBD_EPERM);
    assert_eq!(
        roundtrip(&mut s, NBD_CMD_WRITE_ZEROES, 0, 0, 1024).await,
        NBD_EPERM
    );
    // EPERM takes precedence over the range check for a read-only export.
    send_request(&mut s, NBD_CMD_WRITE, 0, 4, DISK as u64, 16, &[0; 16]).await;
    assert_eq!(read_reply(&mut s).await, (NBD_EPERM, 4));
    assert_eq!(roundtrip(&mut s, NBD_CMD_FLUSH, 0, 0, 0).await, NBD_SUCCESS);

    send_request(&mut s, NBD_CMD_READ, 0, 6, 0, 1024, &[]).await;
    assert_eq!(read_reply(&mut s).await, (NBD_SUCCESS, 6));
    assert_eq!(read_exact_vec(&mut s, 1024).await, vec![0x42; 1024]);
    assert!(export.contents().iter().all(|&b| b == 0x42));
    export.assert_no_violations();
    server.stop();
}

#[tokio::test]
async fn zero_length_requests_succeed_without_calling_the_export() {
    let (server, export) = disk_server();
    let (mut s, _) = connect(server.addr, "disk").await;
    for command in [
        NBD_CMD_READ,
        NBD_CMD_WRITE,
        NBD_CMD_TRIM,
        NBD_CMD_WRITE_ZEROES,
    ] {
        // Offset == size is in range for an empty request.
        assert_eq!(
            roundtrip(&mut s, command, 0, DISK as u64, 0).await,
            NBD_SUCCESS,
            "command {command}"
        );
    }
    assert_eq!(export.stats.calls(), 0);
    // FLUSH has no range; it always reaches the export.
    assert_eq!(roundtrip(&mut s, NBD_CMD_FLUSH, 0, 0, 0).await, NBD_SUCCESS);
    assert_eq!(export.stats.flushes.load(Ordering::SeqCst), 1);
    write_and_verify(&mut s, 0, b"framing intact").await;
    server.stop();
}

#[tokio::test]
async fn large_trim_and_write_zeroes_are_split_for_the_export() {
    let max = 64 * KIB as u32;
    let (server, export) = small_limits_server(max, 16);
    let (mut s, _) = connect(server.addr, "disk").await;
    export.set_contents(0, &vec![0xff; DISK]);

    // 1 MiB + 100 bytes from an unaligned offset: 17 pieces.
    let length = MIB as u32 - 200;
    assert_eq!(
        roundtrip(&mut s, NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FUA, 100, length).await,
        NBD_SUCCESS
    );
    let data = export.contents();
    assert_eq!(data[..100], [0xff; 100]);
    assert!(data[100..DISK - 100].iter().all(|&b| b == 0));
    assert_eq!(data[DISK - 100..], [0xff; 100]);
    assert_eq!(export.stats.zeroes.load(Ordering::SeqCst), 16);
    assert_eq!(export.stats.fua_other.load(Ordering::SeqCst), 16);

    assert_eq!(
        roundtrip(&mut s, NBD_CMD_TRIM, 0, 0, DISK as u32).await,
        NBD_SUCCESS
    );
    assert_eq!(export.stats.trims.load(Ordering::SeqCst), 16);
    assert!(export.stats.largest_call.load(Ordering::SeqCst) <= max);
    export.assert_no_violations();
    server.stop();
}

#[tokio::test]
async fn export_errors_map_to_nbd_errors() {
    let (server, export) = disk_server();
    let faults = [
        (4096, ExportError::Io("disk on fire".into()), NBD_EIO),
        (8192, ExportError::NoSpace("full".into()), NBD_ENOSPC),
        (12288, ExportError::Invalid("nope".into()), NBD_EINVAL),
        (16384, ExportError::ReadOnly, NBD_EPERM),
        (20480, ExportError::ShuttingDown, NBD_ESHUTDOWN),
    ];
    for (offset, error, _) in &faults {
        export.fault_at(*offset, Fault::Fail(error.clone()));
    }
    let (mut s, _) = connect(server.addr, "disk").await;
    for (offset, error, code) in &faults {
        // A failed READ has no payload, so the next reply must parse.
        assert_eq!(
            roundtrip(&mut s, NBD_CMD_READ, 0, *offset, 512).await,
            *code,
            "{error}"
        );
        send_request(&mut s, NBD_CMD_WRITE, 0, 8, *offset, 512, &[1; 512]).await;
        assert_eq!(read_reply(&mut s).await, (*code, 8), "{error}");
        assert_eq!(
            roundtrip(&mut s, NBD_CMD_TRIM, 0, *offset, 512).await,
            *code,
            "{error}"
        );
    }
    write_and_verify(&mut s, 0, b"fine").await;
    server.stop();
}

#[tokio::test]
async fn a_panicking_export_call_is_answered_with_eio() {
    let (server, export) = disk_server();
    export.fault_at(4096, Fault::Panic);
    let (mut s, _) = connect(server.addr, "disk").await;
    assert_eq!(roundtrip(&mut s, NBD_CMD_READ, 0, 4096, 512).await, NBD_EIO);
    write_and_verify(&mut s, 0, b"survived").await;
    server.stop();
}

#[tokio::test]
async fn bad_request_magic_closes_only_that_connection() {
    let (server, _export) = disk_server();
    let (mut good, _) = connect(server.addr, "disk").await;
    let (mut bad, _) = connect(server.addr, "disk").await;
    within(bad.write_all(&[0xde; 28]))
        .await
        .expect("send garbage");
    expect_closed(&mut bad).await;
    write_and_verify(&mut good, 0, b"unaffected").await;
    server.stop();
}

// ---------------------------------------------------------------------------
// Concurrency, ordering, disconnect, shutdown
// ---------------------------------------------------------------------------

/// Sends `count` writes then `count` reads, each batch fully pipelined from a
/// separate task while this one collects replies, and checks every handle
/// is answered exactly once with the right data.
async fn pipeline(stream: TcpStream, count: u64) {
    const LEN: usize = 1000; // unaligned on purpose
    let (mut rx, mut tx) = stream.into_split();
    let block = |i: u64| pseudo_random(LEN, i + 1);
    let offset = |i: u64| i * LEN as u64;

    let sender = tokio::spawn(async move {
        for i in 0..count {
            send_request(
                &mut tx,
                NBD_CMD_WRITE,
                0,
                1_000_000 + i,
                offset(i),
                LEN as u32,
                &block(i),
            )
            .await;
        }
        tx
    });
    let mut pending: HashMap<u64, ()> = (0..count).map(|i| (1_000_000 + i, ())).collect();
    while !pending.is_empty() {
        let (error, handle) = read_reply(&mut rx).await;
        assert_eq!(error, NBD_SUCCESS);
        assert!(
            pending.remove(&handle).is_some(),
            "unexpected or repeated handle {handle}"
        );
    }
    let mut tx = within(sender).await.expect("sender task");

    let sender = tokio::spawn(async move {
        for i in 0..count {
            send_request(
                &mut tx,
                NBD_CMD_READ,
                0,
                2_000_000 + i,
                offset(i),
                LEN as u32,
                &[],
            )
            .await;
        }
        send_request(&mut tx, NBD_CMD_FLUSH, 0, 3_000_000, 0, 0, &[]).await;
        tx
    });
    let mut pending: HashMap<u64, u64> = (0..count).map(|i| (2_000_000 + i, i)).collect();
    pending.insert(3_000_000, u64::MAX);
    while !pending.is_empty() {
        let (error, handle) = read_reply(&mut rx).await;
        assert_eq!(error, NBD_SUCCESS);
        let i = pending
            .remove(&handle)
            .unwrap_or_else(|| panic!("unexpected or repeated handle {handle}"));
        if i != u64::MAX {
            assert_eq!(
                read_exact_vec(&mut rx, LEN).await,
                block(i),
                "data of read {i}"
            );
        }
    }
    within(sender).await.expect("sender task");
}

#[tokio::test]
async fn many_pipelined_requests_all_get_their_replies() {
    let (server, export) = disk_server();
    let (s, _) = connect(server.addr, "disk").await;
    pipeline(s, 1000).await;
    export.assert_no_violations();
    server.stop();
}

#[tokio::test]
async fn pipelining_past_the_in_flight_limit_applies_backpressure() {
    let (server, export) = small_limits_server(64 * KIB as u32, 2);
    let (s, _) = connect(server.addr, "disk").await;
    pipeline(s, 500).await;
    export.assert_no_violations();
    server.stop();
}

#[tokio::test]
async fn replies_are_sent_as_requests_complete() {
    let (server, export) = disk_server();
    export.delay_reads_at(0, Duration::from_millis(500));
    let (mut s, _) = connect(server.addr, "disk").await;
    send_request(&mut s, NBD_CMD_READ, 0, 1, 0, 16, &[]).await;
    send_request(&mut s, NBD_CMD_READ, 0, 2, 4096, 16, &[]).await;
    // A server answering in request order would send handle 1 first.
    assert_eq!(
        read_reply(&mut s).await,
        (NBD_SUCCESS, 2),
        "fast read first"
    );
    read_exact_vec(&mut s, 16).await;
    assert_eq!(read_reply(&mut s).await, (NBD_SUCCESS, 1));
    read_exact_vec(&mut s, 16).await;
    server.stop();
}

#[tokio::test]
async fn disc_waits_for_in_flight_replies_then_closes() {
    let (server, export) = disk_server();
    export.set_contents(0, b"slow data");
    export.delay_reads_at(0, Duration::from_millis(300));
    let (mut s, _) = connect(server.addr, "disk").await;
    send_request(&mut s, NBD_CMD_READ, 0, 1, 0, 9, &[]).await;
    send_request(&mut s, NBD_CMD_DISC, 0, 2, 0, 0, &[]).await;
    assert_eq!(read_reply(&mut s).await, (NBD_SUCCESS, 1));
    assert_eq!(read_exact_vec(&mut s, 9).await, b"slow data");
    expect_closed(&mut s).await;
    server.stop();
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_returns() {
    let (mut server, export) = disk_server();
    export.set_contents(0, b"in flight");
    export.delay_reads_at(0, Duration::from_millis(500));
    let (mut busy, _) = connect(server.addr, "disk").await;
    let (mut idle, _) = connect(server.addr, "disk").await;
    let mut negotiating = negotiate_start(server.addr).await;

    send_request(&mut busy, NBD_CMD_READ, 0, 1, 0, 9, &[]).await;
    // Shutdown must start while the read is inside the export.
    let deadline = Instant::now() + IO_TIMEOUT;
    while export.stats.reads.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "read never reached the export");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.begin_stop();

    assert_eq!(read_reply(&mut busy).await, (NBD_SUCCESS, 1));
    assert_eq!(read_exact_vec(&mut busy, 9).await, b"in flight");
    expect_closed(&mut busy).await;
    expect_closed(&mut idle).await;
    expect_closed(&mut negotiating).await;
    server
        .wait_stopped(Duration::from_secs(10))
        .expect("serve returns Ok");
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "listener still accepting after shutdown"
    );
}

/// A client that sends large reads and never reads the replies fills the
/// socket and blocks the server's writer: shutdown still completes once the
/// grace period runs out.
#[tokio::test]
async fn a_client_that_stops_reading_cannot_hold_shutdown_open() {
    let export = MemExport::new(DISK);
    let mut server = TestServer::with_config(
        MemBackend::new().with("disk", "", export),
        ServerConfig {
            shutdown_grace: Duration::from_millis(300),
            ..ServerConfig::default()
        },
    );
    let (mut stuck, _) = connect(server.addr, "disk").await;
    let chunk = (DISK as u32).min(4 << 20);
    for handle in 0..64 {
        send_request(&mut stuck, NBD_CMD_READ, 0, handle, 0, chunk, &[]).await;
    }
    // Let the replies pile up in the socket until the writer blocks.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.begin_stop();
    // Without the grace period this never returns (the writer stays
    // blocked on the full socket).
    server
        .wait_stopped(Duration::from_secs(10))
        .expect("serve returns Ok");
    drop(stuck);
}

#[tokio::test]
async fn invalid_config_is_rejected() {
    for config in [
        ServerConfig {
            max_request_bytes: 512,
            ..ServerConfig::default()
        },
        ServerConfig {
            max_in_flight_per_connection: 0,
            ..ServerConfig::default()
        },
        ServerConfig {
            max_connections: 0,
            ..ServerConfig::default()
        },
        // A budget smaller than one largest request could never admit it.
        ServerConfig {
            max_in_flight_bytes: u64::from(stretch_nbd::DEFAULT_MAX_REQUEST_BYTES) - 1,
            ..ServerConfig::default()
        },
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let result = stretch_nbd::serve(
            listener,
            Arc::new(MemBackend::new()),
            config.clone(),
            std::future::pending(),
        )
        .await;
        let error = result.expect_err(&format!("{config:?} accepted"));
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    }
}

/// A budget of one largest request, so one connection can spend it all.
fn budget_server() -> (TestServer, Arc<MemExport>) {
    let max = 512 * KIB as u32;
    let export = MemExport::with_max_call(DISK, max);
    let server = TestServer::with_config(
        MemBackend::new().with("disk", "", export.clone()),
        ServerConfig {
            max_request_bytes: max,
            max_in_flight_bytes: u64::from(max),
            ..ServerConfig::default()
        },
    );
    (server, export)
}

/// A client that announced a write and sends its payload slowly holds
/// the shared byte budget: another connection's large write waits (no
/// error), while small requests still go through on that connection's own
/// reserve; once the slow payload is complete, everything is answered.
#[tokio::test]
async fn a_spent_byte_budget_holds_large_requests_and_small_ones_still_pass() {
    let (server, export) = budget_server();
    let max = 512 * KIB as u32;
    let (mut slow, _) = connect(server.addr, "disk").await;
    send_request(&mut slow, NBD_CMD_WRITE, 0, 1, 0, max, &[0x11; 100]).await;
    // Give the server time to take the budget for it.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (mut other, _) = connect(server.addr, "disk").await;
    send_request(
        &mut other,
        NBD_CMD_WRITE,
        0,
        2,
        0,
        max,
        &vec![0x22; max as usize],
    )
    .await;
    // Small requests on a third connection: served from its reserve.
    let (mut small, _) = connect(server.addr, "disk").await;
    send_request(
        &mut small,
        NBD_CMD_WRITE,
        0,
        3,
        600 * KIB as u64,
        4096,
        &[0x33; 4096],
    )
    .await;
    assert_eq!(read_reply(&mut small).await, (NBD_SUCCESS, 3));
    send_request(&mut small, NBD_CMD_READ, 0, 4, 600 * KIB as u64, 4096, &[]).await;
    assert_eq!(read_reply(&mut small).await, (NBD_SUCCESS, 4));
    assert_eq!(read_exact_vec(&mut small, 4096).await, vec![0x33; 4096]);
    // The large write waits for the budget, without an error.
    let waited = tokio::time::timeout(Duration::from_millis(300), read_reply(&mut other)).await;
    assert!(
        waited.is_err(),
        "a write past the byte budget was answered: {waited:?}"
    );

    // The slow client finishes: its write, then the waiting one, complete.
    within(slow.write_all(&vec![0x11; max as usize - 100]))
        .await
        .expect("send the rest");
    assert_eq!(read_reply(&mut slow).await, (NBD_SUCCESS, 1));
    assert_eq!(read_reply(&mut other).await, (NBD_SUCCESS, 2));
    assert_eq!(
        export.contents()[..max as usize],
        vec![0x22; max as usize][..]
    );
    export.assert_no_violations();
    server.stop();
}

/// Past `max_connections` a client is not refused: its connection waits
/// for the greeting until another connection ends.
#[tokio::test]
async fn clients_past_the_connection_limit_wait_for_a_slot() {
    let export = MemExport::new(DISK);
    let server = TestServer::with_config(
        MemBackend::new().with("disk", "", export.clone()),
        ServerConfig {
            max_connections: 2,
            ..ServerConfig::default()
        },
    );
    let (first, _) = connect(server.addr, "disk").await;
    let (_second, _) = connect(server.addr, "disk").await;
    // The third connects (the listen backlog takes it) but gets no
    // greeting while two connections are served.
    let mut third = within(TcpStream::connect(server.addr))
        .await
        .expect("connect");
    let mut greeting = [0u8; 18];
    let early =
        tokio::time::timeout(Duration::from_millis(300), third.read_exact(&mut greeting)).await;
    assert!(
        early.is_err(),
        "a third client was greeted past max_connections = 2"
    );
    drop(first);
    within(third.read_exact(&mut greeting))
        .await
        .expect("greeted once a slot is free");
    assert_eq!(&greeting[0..8], &NBD_MAGIC.to_be_bytes());
    server.stop();
}
