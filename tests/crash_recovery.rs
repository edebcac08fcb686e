//! Crashes (SIGKILL) and clean shutdowns (SIGTERM) of a node process, and
//! what a restarted node on the same data directory then serves.

mod common;

use std::time::Duration;

use common::*;

/// Every write acknowledged by a FLUSH, or written with FUA, survives
/// kill -9; the journal is replayed onto the legs at restart.
#[test]
fn kill9_keeps_flushed_and_fua_writes() {
    require_tool("qemu-io");
    let mut node = TestNode::start();
    node.create_volume("vol", "64M");
    let uri = node.uri("vol");

    // A first generation of data, flushed, then partly overwritten and
    // flushed again: the newest flushed data must win after replay.
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x01 0 1M",
            "write -P 0x02 5000 3000",
            "flush",
            "write -P 0x03 0 4096",
            "write -P 0x04 123456 100000",
            "write -P 0x05 32M 10M",
            "write -P 0x06 67100000 8864",
            "flush",
        ],
    );
    // FUA writes from a client that then neither flushes nor disconnects.
    let mut raw = RawNbd::connect(node.nbd_port, "vol");
    raw.write(63 * MIB, &[0x07; 8192], true);
    raw.write(63 * MIB + 100_000, &[0x08; 777], true);
    node.kill9();
    drop(raw);

    node.restart();
    qemu_io_ok(
        &uri,
        &[
            "read -P 0x03 0 4096",
            "read -P 0x01 4096 904",
            "read -P 0x02 5000 3000",
            "read -P 0x01 8000 115456",
            "read -P 0x04 123456 100000",
            "read -P 0x01 223456 825120",
            "read -P 0 1M 31M",
            "read -P 0x05 32M 10M",
            "read -P 0 42M 20M",
            "read -P 0x06 67100000 8864",
        ],
    );
    let mut raw = RawNbd::connect(node.nbd_port, "vol");
    assert!(
        raw.read(63 * MIB, 8192).iter().all(|&b| b == 0x07),
        "a FUA write was lost by kill -9"
    );
    assert!(
        raw.read(63 * MIB + 100_000, 777).iter().all(|&b| b == 0x08),
        "a FUA write was lost by kill -9"
    );
    raw.disconnect();

    // A second crash right after recovery loses nothing either.
    node.kill9();
    node.restart();
    qemu_io_ok(&uri, &["read -P 0x05 32M 10M", "read -P 0x03 0 4096"]);
}

/// Reads `length` bytes at `offset` and checks they are all `a` or all
/// `b`; returns which.
fn all_one_of(raw: &mut RawNbd, offset: u64, length: u32, a: u8, b: u8) -> u8 {
    let data = raw.read(offset, length);
    let first = data[0];
    assert!(
        first == a || first == b,
        "byte {offset} is {first:#04x}, neither {a:#04x} nor {b:#04x}"
    );
    if let Some(at) = data.iter().position(|&byte| byte != first) {
        panic!(
            "torn write after kill -9: {offset}+{length} starts as {first:#04x} but byte {} is {:#04x}",
            offset + at as u64,
            data[at]
        );
    }
    first
}

/// After kill -9 a leg holds whole deltas: a write that was acknowledged
/// but not flushed is either entirely there or entirely absent.
#[test]
fn kill9_never_tears_a_write() {
    require_tool("qemu-io");
    let mut node = TestNode::start();
    node.create_volume("vol", "64M");
    let uri = node.uri("vol");

    // With qemu-io: A flushed, then B in one write command and no flush
    // command (qemu still flushes when it closes the image, so B is
    // normally durable here; the raw rounds below cover the unflushed case).
    qemu_io_ok(&uri, &["write -P 0xAA 0 64k", "flush"]);
    qemu_io_ok(&uri, &["write -P 0xBB 0 64k"]);
    node.kill9();
    node.restart();
    let mut raw = RawNbd::connect(node.nbd_port, "vol");
    all_one_of(&mut raw, 0, 64 * 1024, 0xAA, 0xBB);
    drop(raw);

    // With a client that certainly sends no flush: B is acknowledged from
    // memory and the node is killed at varying points of the delta's
    // life (open, closing, journaled, applied).
    let mut seen = Vec::new();
    for round in 0..6u8 {
        let offset = (2 + u64::from(round)) * 4 * MIB;
        let (a, b) = (0x10 + round, 0x80 + round);
        let length = MIB as usize;
        let mut raw = RawNbd::connect(node.nbd_port, "vol");
        raw.write(offset, &vec![a; length], false);
        raw.flush();
        raw.write(offset, &vec![b; length], false);
        std::thread::sleep(Duration::from_millis(u64::from(round) * 40));
        node.kill9();
        drop(raw);
        node.restart();
        let mut raw = RawNbd::connect(node.nbd_port, "vol");
        let found = all_one_of(&mut raw, offset, length as u32, a, b);
        seen.push((round, found == b));
        raw.disconnect();
    }
    eprintln!("(round, unflushed write survived): {seen:?}");
}

/// SIGTERM makes the node finish, drain every acknowledged write to the
/// legs and exit 0; the data and the catalog are there after restart.
#[test]
fn sigterm_drains_to_the_legs_and_exits_zero() {
    require_tool("qemu-io");
    let mut node = TestNode::start();
    node.create_volume("vol", "16M");
    node.create_volume("other", "8M");
    let uri = node.uri("vol");
    qemu_io_ok(&uri, &["write -P 0x21 0 100000", "write -P 0x22 5M 3M"]);
    // Acknowledged from memory only: no flush, and the connection stays
    // open (idle) while the node is asked to stop.
    let mut raw = RawNbd::connect(node.nbd_port, "vol");
    raw.write(12 * MIB + 10, &[0x23; 50_000], false);
    let idle = RawNbd::connect(node.nbd_port, "other");

    let status = node.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM:\n{}",
        node.log()
    );
    drop((raw, idle));

    // The legs hold everything: no journal replay is needed to see it.
    let leg = std::fs::read(leg_file(&node.node_dir(), "vol")).expect("reading the leg");
    assert_eq!(leg.len() as u64, 16 * MIB, "leg size");
    let expect = |from: u64, to: u64, value: u8| {
        if let Some(at) = leg[from as usize..to as usize]
            .iter()
            .position(|&b| b != value)
        {
            panic!(
                "leg byte {} is {:#04x}, expected {value:#04x}: not drained at shutdown",
                from + at as u64,
                leg[from as usize + at]
            );
        }
    };
    expect(0, 100_000, 0x21);
    expect(100_000, 5 * MIB, 0);
    expect(5 * MIB, 8 * MIB, 0x22);
    expect(12 * MIB + 10, 12 * MIB + 50_010, 0x23);

    node.restart();
    qemu_io_ok(
        &uri,
        &[
            "read -P 0x21 0 100000",
            "read -P 0x22 5M 3M",
            "read -P 0x23 12582922 50000",
            "read -P 0 8M 4M",
        ],
    );
    let list = node.cli(&["volume", "list"]);
    list.assert_ok();
    assert!(
        list.stdout.contains("vol") && list.stdout.contains("other"),
        "{list}"
    );
    let status = node.status();
    assert_eq!(status["volumes"].as_u64(), Some(2), "{status}");
    assert!(status["failure"].is_null(), "{status}");
    // A second clean stop right away also works.
    let status = node.terminate();
    assert_eq!(status.code(), Some(0), "second SIGTERM:\n{}", node.log());
}

/// Writes acknowledged one at a time to two volumes of one consistency
/// group, then kill -9: after restart the volumes hold exactly a prefix of
/// the acknowledged writes (in acknowledgement order, across both
/// volumes), that prefix includes everything before a FLUSH, and no write
/// is torn. The node runs with tiny limits so the writes go through
/// throttling, many deltas, checkpoints and journal segment release.
#[test]
fn kill9_leaves_a_prefix_of_acknowledged_writes_across_a_group() {
    const VOLUME: u64 = 32 * MIB;
    const CHUNK: u64 = 128 * KIB;
    let mut node = TestNode::start_with_tuning(SMALL_TUNING);
    for name in ["left", "right"] {
        let result = node.cli(&["volume", "create", name, "--size", "32M", "--group", "g"]);
        assert!(result.success(), "{result}");
    }
    let mut connections = [
        RawNbd::connect(node.nbd_port, "left"),
        RawNbd::connect(node.nbd_port, "right"),
    ];
    // Every chunk of both volumes once, in a seeded random order; write i
    // fills its chunk with the 8-byte value i + 1, so it is recognisable.
    let chunks = VOLUME / CHUNK;
    let mut order: Vec<(usize, u64)> = (0..2)
        .flat_map(|volume| (0..chunks).map(move |chunk| (volume, chunk)))
        .collect();
    let mut rng = Rng::new(0x00de_17a5);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.range(0, i as u64) as usize);
    }
    let content = |index: usize| -> Vec<u8> {
        (index as u64 + 1)
            .to_le_bytes()
            .repeat((CHUNK / 8) as usize)
    };
    let flush_after = order.len() / 3;
    for (index, &(volume, chunk)) in order.iter().enumerate() {
        connections[volume].write(chunk * CHUNK, &content(index), false);
        if index == flush_after {
            connections[volume].flush();
        }
    }
    let throttled = metric_value(&node.metrics(), "stretch_writes_throttled_total", &[]);
    node.kill9();
    drop(connections);
    node.restart();

    let mut images = Vec::new();
    for name in ["left", "right"] {
        let mut raw = RawNbd::connect(node.nbd_port, name);
        let mut image = Vec::with_capacity(VOLUME as usize);
        let piece = raw.max_block.min(4 * MIB as u32);
        for offset in (0..VOLUME).step_by(piece as usize) {
            image.extend(raw.read(offset, piece));
        }
        raw.disconnect();
        images.push(image);
    }
    let mut present = Vec::with_capacity(order.len());
    for (index, &(volume, chunk)) in order.iter().enumerate() {
        let at = (chunk * CHUNK) as usize;
        let found = &images[volume][at..at + CHUNK as usize];
        if found == content(index).as_slice() {
            present.push(true);
        } else if found.iter().all(|&b| b == 0) {
            present.push(false);
        } else {
            panic!("write {index} (volume {volume}, chunk {chunk}) is torn after kill -9");
        }
    }
    let kept = present.iter().take_while(|&&p| p).count();
    if let Some(later) = present[kept..].iter().position(|&p| p) {
        panic!(
            "not a prefix: write {kept} was lost but write {} survived ({} of {} kept)",
            kept + later,
            present.iter().filter(|&&p| p).count(),
            order.len()
        );
    }
    assert!(
        kept > flush_after,
        "only {kept} writes survived, but the first {} were flushed",
        flush_after + 1
    );
    eprintln!(
        "{kept} of {} acknowledged writes survived kill -9; throttled writes: {throttled:?}",
        order.len()
    );
}

/// SIGTERM while a client streams pipelined writes: the node answers what
/// it took in, exits 0, and every write it acknowledged is on the leg.
#[test]
fn sigterm_under_load_keeps_every_acknowledged_write() {
    const CHUNK: u64 = 64 * KIB;
    const CHUNKS: u64 = 1024;
    let mut node = TestNode::start();
    node.create_volume("vol", "64M");
    let raw = RawNbd::connect(node.nbd_port, "vol");
    let mut replies = raw.stream.try_clone().expect("cloning the socket");
    let reader = std::thread::spawn(move || {
        let mut answers = Vec::new();
        let mut header = [0u8; 16];
        while std::io::Read::read_exact(&mut replies, &mut header).is_ok() {
            assert_eq!(
                header[0..4],
                NBD_SIMPLE_REPLY_MAGIC.to_be_bytes(),
                "reply magic"
            );
            let error = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
            let handle = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
            answers.push((handle, error));
        }
        answers
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut raw = raw;
        std::thread::spawn(move || {
            // Write number `seq` goes to chunk seq % CHUNKS and holds seq + 1.
            let mut sent = Vec::new();
            let mut seq = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let chunk = seq % CHUNKS;
                let data = (seq + 1).to_le_bytes().repeat((CHUNK / 8) as usize);
                let mut request = Vec::with_capacity(28 + data.len());
                let handle = 0x1000_0000 + seq;
                request.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
                request.extend_from_slice(&0u16.to_be_bytes());
                request.extend_from_slice(&NBD_CMD_WRITE.to_be_bytes());
                request.extend_from_slice(&handle.to_be_bytes());
                request.extend_from_slice(&(chunk * CHUNK).to_be_bytes());
                request.extend_from_slice(&(CHUNK as u32).to_be_bytes());
                request.extend_from_slice(&data);
                if std::io::Write::write_all(&mut raw.stream, &request).is_err() {
                    break;
                }
                sent.push(handle);
                seq += 1;
            }
            sent
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let status = node.terminate();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM under load:\n{}",
        node.log()
    );
    let sent = writer.join().expect("writer thread");
    let answers = reader.join().expect("reader thread");
    assert!(
        !answers.is_empty(),
        "no write was answered before the node stopped"
    );

    // The highest acknowledged write of each chunk.
    let mut acked = vec![0u64; CHUNKS as usize];
    for &(handle, error) in &answers {
        let seq = handle - 0x1000_0000;
        assert!(
            error == 0 || error == 108,
            "write {seq} got error {error} (only ESHUTDOWN is acceptable while stopping)"
        );
        if error == 0 {
            let chunk = (seq % CHUNKS) as usize;
            acked[chunk] = acked[chunk].max(seq + 1);
        }
    }
    let leg = std::fs::read(leg_file(&node.node_dir(), "vol")).expect("reading the leg");
    assert_eq!(leg.len() as u64, CHUNKS * CHUNK, "leg size");
    for (chunk, (expected, on_leg)) in acked.iter().zip(leg.chunks(CHUNK as usize)).enumerate() {
        let found = u64::from_le_bytes(on_leg[..8].try_into().expect("8 bytes"));
        let whole = on_leg.chunks(8).all(|word| word == found.to_le_bytes());
        assert!(whole, "chunk {chunk} on the leg is torn");
        assert!(
            found >= *expected && (found == 0 || (found - 1) % CHUNKS == chunk as u64),
            "chunk {chunk} holds write {found} but write {expected} was acknowledged"
        );
    }
    eprintln!(
        "{} writes sent, {} answered ({} ok) before the node stopped",
        sent.len(),
        answers.len(),
        answers.iter().filter(|(_, e)| *e == 0).count()
    );
}
