//! Malformed and out-of-range NBD traffic sent byte by byte over TCP to a
//! running node: each bad client gets an error or is disconnected, and
//! other clients (a real qemu-io among them) keep working.

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::*;

/// Sends bytes, ignoring a failure (the server may already have closed).
fn send(stream: &mut TcpStream, bytes: &[u8]) {
    let _ = stream.write_all(bytes);
}

fn option_header(option: u32, length: u32) -> Vec<u8> {
    let mut bytes = NBD_OPTS_MAGIC.to_be_bytes().to_vec();
    bytes.extend_from_slice(&option.to_be_bytes());
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes
}

const CLIENT_FLAGS: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

/// Something a bad client sends after the greeting.
type BadClient<'a> = Box<dyn Fn(&mut TcpStream) + 'a>;

/// Garbage at every stage of the handshake (and instead of a request)
/// closes that connection only.
#[test]
fn garbage_instead_of_a_handshake_closes_only_that_connection() {
    require_tool("qemu-io");
    let mut node = TestNode::start();
    node.create_volume("vol", "16M");
    let mut good = RawNbd::connect(node.nbd_port, "vol");
    good.write(0, b"still here", false);

    let mut garbage = vec![0u8; 4096];
    Rng::new(7).fill(&mut garbage);

    let cases: Vec<(&str, BadClient)> = vec![
        (
            "an HTTP request instead of client flags",
            Box::new(|s| send(s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")),
        ),
        ("4 KiB of random bytes", Box::new(|s| send(s, &garbage))),
        (
            "client flags with unknown bits",
            Box::new(|s| send(s, &0xffff_ffffu32.to_be_bytes())),
        ),
        (
            "plain (not fixed) newstyle client flags",
            Box::new(|s| send(s, &0u32.to_be_bytes())),
        ),
        (
            "an option with a bad magic",
            Box::new(|s| {
                send(s, &CLIENT_FLAGS.to_be_bytes());
                send(s, &garbage[..64]);
            }),
        ),
        (
            "an option claiming a 4 GiB payload",
            Box::new(|s| {
                send(s, &CLIENT_FLAGS.to_be_bytes());
                send(s, &option_header(NBD_OPT_GO, u32::MAX));
                send(s, &garbage[..100]);
            }),
        ),
        (
            "NBD_OPT_EXPORT_NAME of a missing export",
            Box::new(|s| {
                send(s, &CLIENT_FLAGS.to_be_bytes());
                send(s, &option_header(1, 7));
                send(s, b"missing");
            }),
        ),
    ];
    for (what, bad) in &cases {
        let mut stream = raw_greeting(node.nbd_port);
        bad(&mut stream);
        assert!(
            closed_by_server(&mut stream),
            "server kept the connection after {what}"
        );
        node.assert_running();
        assert_qemu_io_still_works(&node, "vol", 0x3b);
    }

    // Garbage before even reading the greeting.
    let mut stream = TcpStream::connect(("127.0.0.1", node.nbd_port)).expect("connecting");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    send(&mut stream, &garbage);
    assert!(
        closed_by_server(&mut stream),
        "server kept a connection sending garbage first"
    );
    // Connections that go away at once or mid-handshake.
    drop(TcpStream::connect(("127.0.0.1", node.nbd_port)).expect("connecting"));
    let mut stream = raw_greeting(node.nbd_port);
    send(&mut stream, &CLIENT_FLAGS.to_be_bytes()[..2]);
    drop(stream);

    // Garbage instead of a request, after a successful NBD_OPT_GO.
    let mut raw = RawNbd::connect(node.nbd_port, "vol");
    send(&mut raw.stream, &garbage[..28]);
    assert!(
        closed_by_server(&mut raw.stream),
        "server kept a connection with a bad request magic"
    );
    // Half a request header, then hang up.
    let mut raw = RawNbd::connect(node.nbd_port, "vol");
    send(&mut raw.stream, &NBD_REQUEST_MAGIC.to_be_bytes());
    drop(raw);

    // An idle client that never finishes its handshake blocks nobody.
    let _idle = raw_greeting(node.nbd_port);

    node.assert_running();
    assert_eq!(
        good.read(0, 10),
        b"still here",
        "the good connection's data"
    );
    good.disconnect();
    assert_qemu_io_still_works(&node, "vol", 0x3c);
    assert!(node.status()["failure"].is_null());
}

/// READ or WRITE longer than the advertised maximum block size (32 MiB)
/// gets EINVAL, and the connection stays in step (a refused write's
/// payload is skipped).
#[test]
fn oversized_requests_get_einval() {
    require_tool("qemu-io");
    let mut node = TestNode::start();
    node.create_volume("vol", "64M");
    let mut raw = RawNbd::connect(node.nbd_port, "vol");
    assert_eq!(
        raw.max_block,
        32 * MIB as u32,
        "advertised maximum block size"
    );
    assert_eq!(raw.size, 64 * MIB, "advertised export size");
    raw.write(4096, &[0x42; 4096], false);

    let reply = raw.call(0, NBD_CMD_READ, 0, raw.max_block + 1, &[]);
    assert_eq!(reply.error, NBD_EINVAL, "read of max + 1 bytes");
    assert_eq!(
        raw.read(4096, 4096),
        vec![0x42; 4096],
        "read after the refused one"
    );
    assert_qemu_io_still_works(&node, "vol", 0x4c);

    let reply = raw.call(0, NBD_CMD_READ, 0, u32::MAX, &[]);
    assert_eq!(reply.error, NBD_EINVAL, "read of 4 GiB - 1");
    assert_eq!(raw.read(4096, 4096), vec![0x42; 4096]);
    assert_qemu_io_still_works(&node, "vol", 0x4c);

    let payload = vec![0x99u8; raw.max_block as usize + 1];
    let reply = raw.call(0, NBD_CMD_WRITE, 0, raw.max_block + 1, &payload);
    assert_eq!(reply.error, NBD_EINVAL, "write of max + 1 bytes");
    assert_eq!(
        raw.read(4096, 4096),
        vec![0x42; 4096],
        "the refused write changed nothing"
    );
    assert_qemu_io_still_works(&node, "vol", 0x4c);

    // Exactly the maximum is fine.
    let full = raw.read(0, raw.max_block);
    assert_eq!(full.len(), 32 * MIB as usize);
    raw.disconnect();

    node.assert_running();
    assert_qemu_io_still_works(&node, "vol", 0x4d);
}

/// Requests beyond the end of the export: reads get EINVAL, writes ENOSPC
/// (as the NBD spec asks), offsets that overflow are refused too.
#[test]
fn requests_past_the_end_are_refused() {
    require_tool("qemu-io");
    let mut node = TestNode::start();
    node.create_volume("vol", "16M");
    let mut raw = RawNbd::connect(node.nbd_port, "vol");
    let size = raw.size;
    assert_eq!(size, 16 * MIB);

    for (offset, length) in [
        (size - 4096, 8192),
        (size, 1),
        (size - 1, 2),
        (size + 4096, 4096),
        (u64::MAX - 100, 4096),
    ] {
        let reply = raw.call(0, NBD_CMD_READ, offset, length, &[]);
        assert_eq!(
            reply.error, NBD_EINVAL,
            "read {offset}+{length} past the end of {size}"
        );
        assert_qemu_io_still_works(&node, "vol", 0x5d);
    }
    let reply = raw.call(0, NBD_CMD_WRITE, size - 10, 20, &[0x77; 20]);
    assert_eq!(reply.error, NBD_ENOSPC, "write across the end");
    let reply = raw.call(0, NBD_CMD_WRITE, u64::MAX - 10, 20, &[0x77; 20]);
    assert_eq!(reply.error, NBD_ENOSPC, "write at an overflowing offset");
    // The last bytes themselves are fine, and untouched by the refusals.
    assert_eq!(raw.read(size - 10, 10), vec![0; 10]);
    raw.write(size - 10, &[0x55; 10], false);
    assert_eq!(raw.read(size - 4096, 4096)[4086..], [0x55; 10]);
    raw.disconnect();

    node.assert_running();
    assert_qemu_io_still_works(&node, "vol", 0x5e);
}

/// Unknown command types, and commands or flags that were never
/// negotiated, get EINVAL; the connection goes on.
#[test]
fn unknown_commands_get_einval() {
    require_tool("qemu-io");
    let mut node = TestNode::start();
    node.create_volume("vol", "16M");
    let mut raw = RawNbd::connect(node.nbd_port, "vol");
    raw.write(0, &[0x31; 4096], false);

    for (flags, kind, length, what) in [
        (0, 99, 0, "type 99"),
        (0, 0xffff, 0, "type 0xffff"),
        (0, 99, 4096, "type 99 with a length"),
        (0, NBD_CMD_CACHE, 4096, "NBD_CMD_CACHE (not advertised)"),
        (
            0,
            NBD_CMD_BLOCK_STATUS,
            4096,
            "NBD_CMD_BLOCK_STATUS (not negotiated)",
        ),
        (
            NBD_CMD_FLAG_DF,
            NBD_CMD_READ,
            4096,
            "READ with NBD_CMD_FLAG_DF (not negotiated)",
        ),
        (0x8000, NBD_CMD_FLUSH, 0, "FLUSH with an unknown flag"),
    ] {
        let handle = raw.send(flags, kind, 0, length, &[]);
        let reply = raw.reply(handle, 0);
        assert_eq!(reply.error, NBD_EINVAL, "{what}");
        assert_eq!(raw.read(0, 4096), vec![0x31; 4096], "read after {what}");
        assert_qemu_io_still_works(&node, "vol", 0x6e);
    }
    raw.disconnect();

    node.assert_running();
    assert_qemu_io_still_works(&node, "vol", 0x6f);
}

/// Resident and peak resident memory of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * KIB)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A hostile NBD client on its own thread: it announces a maximum-size
/// WRITE and trickles `send` bytes of its payload (never all of it), or
/// sends `reads` maximum-size READs and never reads a reply. It keeps the
/// connection open until `stop`.
fn hostile(
    port: u16,
    index: u64,
    send: usize,
    reads: u32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (TcpStream, std::thread::JoinHandle<()>) {
    use std::sync::atomic::Ordering;
    let mut nbd = RawNbd::connect(port, "vol");
    let max = nbd.max_block;
    let handle = nbd.stream.try_clone().expect("cloning the socket");
    let thread = std::thread::spawn(move || {
        // Writes may block for good once the server stops reading: wake up
        // now and then to notice `stop`.
        let _ = nbd
            .stream
            .set_write_timeout(Some(std::time::Duration::from_millis(200)));
        let offset = (index % 2) * u64::from(max);
        if reads > 0 {
            for _ in 0..reads {
                nbd.send(0, NBD_CMD_READ, offset, max, &[]);
            }
        } else {
            nbd.send(0, NBD_CMD_WRITE, offset, max, &[]);
            let chunk = vec![0xa5u8; 256 * KIB as usize];
            let mut sent = 0;
            while sent < send && !stop.load(Ordering::Relaxed) {
                let piece = &chunk[..chunk.len().min(send - sent)];
                match nbd.stream.write(piece) {
                    Ok(0) => return,
                    Ok(n) => sent += n,
                    Err(error)
                        if matches!(
                            error.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    // The server closed the connection, or the test did.
                    Err(_) => return,
                }
                // Slowly: about 64 MiB/s per client at most.
                std::thread::sleep(std::time::Duration::from_millis(4));
            }
        }
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
    (handle, thread)
}

/// Hundreds of clients that announce maximum-size writes and send their
/// payloads slowly (and some that ask for maximum-size reads and never
/// read the replies) cannot make a node buffer more than its configured
/// in-flight byte budget; meanwhile a real qemu-io client is served.
#[test]
fn hostile_clients_cannot_exhaust_memory_and_others_keep_being_served() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    require_tool("qemu-io");
    /// The budget under test; the shipped default is 1G.
    const BUDGET: u64 = 64 * MIB;
    const WRITERS: u64 = 200;
    const READERS: u64 = 40;
    const READS_EACH: u32 = 4;
    /// Payload each writer sends of its 32 MiB write: half, so a node
    /// without the budget would hold 200 × 16 MiB = 3.2 GiB.
    const SENT: usize = 16 << 20;
    let tuning = format!("{SHIPPED_TUNING}nbd_in_flight_bytes_max = \"64M\"\n");
    let node = TestNode::start_with_tuning(&tuning);
    node.create_volume("vol", "64M");
    let uri = node.uri("vol");
    qemu_io_ok(&uri, &["write -P 7 0 1M", "read -P 7 0 1M"]);
    let (baseline, _) = memory(node.pid());

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for index in 0..WRITERS {
        clients.push(hostile(node.nbd_port, index, SENT, 0, stop.clone()));
    }
    for index in 0..READERS {
        clients.push(hostile(node.nbd_port, index, 0, READS_EACH, stop.clone()));
    }
    // Let the trickles run: at 64 MiB/s each, a writer the server read
    // from would be done with its 16 MiB in well under a second.
    std::thread::sleep(std::time::Duration::from_secs(3));

    // A real client is served meanwhile, small requests and large.
    let served = std::time::Instant::now();
    qemu_io_ok(
        &uri,
        &[
            "read -P 7 0 64k",
            "write -P 9 40M 64k",
            "flush",
            "read -P 9 40M 64k",
        ],
    );
    let served = served.elapsed();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (during, peak) = memory(node.pid());

    stop.store(true, Ordering::Relaxed);
    for (stream, _) in &clients {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    for (_, thread) in clients {
        thread.join().expect("a hostile client panicked");
    }
    // Payload memory is at most the budget plus each connection's 256 KiB
    // reserve; allow as much again per connection for socket buffers,
    // tasks and allocator slack.
    let connections = WRITERS + READERS + 1;
    let bound = baseline + BUDGET + connections * 512 * KIB;
    eprintln!(
        "{connections} connections: RSS {} MiB before, {} MiB during, peak {} MiB; \
         bound {} MiB; qemu-io served in {served:?}",
        baseline / MIB,
        during / MIB,
        peak / MIB,
        bound / MIB
    );
    assert!(
        peak < bound,
        "peak RSS {} MiB is above the bound {} MiB (RSS before: {} MiB)",
        peak / MIB,
        bound / MIB,
        baseline / MIB
    );
    // And the node is still healthy for a new client.
    assert_qemu_io_still_works(&node, "vol", 0x3c);
}

/// Past `nbd_connections_max` a client waits to be accepted rather than
/// being refused, and is served as soon as a connection ends.
#[test]
fn clients_past_the_connection_limit_wait_and_are_then_served() {
    require_tool("qemu-io");
    let tuning = format!("{SHIPPED_TUNING}nbd_connections_max = 3\n");
    let node = TestNode::start_with_tuning(&tuning);
    node.create_volume("vol", "16M");
    let mut held: Vec<RawNbd> = (0..3)
        .map(|_| RawNbd::connect(node.nbd_port, "vol"))
        .collect();
    let uri = node.uri("vol");
    let waiting =
        std::thread::spawn(move || qemu_io(&uri, &["write -P 5 0 64k", "read -P 5 0 64k"]));
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        !waiting.is_finished(),
        "a fourth client was served (or refused) past nbd_connections_max = 3"
    );
    // The held connections still work.
    held[0].write(1 << 20, b"held", false);
    // One ends: the waiting client is accepted and served.
    held.pop().expect("a connection").disconnect();
    let result = waiting.join().expect("qemu-io thread");
    assert_qemu_io_clean(&result);
    assert!(
        node.log().contains("connection limit reached"),
        "{}",
        node.log()
    );
}
