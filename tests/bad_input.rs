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
