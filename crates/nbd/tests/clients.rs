//! End-to-end tests against real NBD clients (libnbd's nbdinfo/nbdcopy and
//! qemu's qemu-io/qemu-img), each talking to a server on 127.0.0.1.

mod common;

use std::fs;
use std::sync::atomic::Ordering;

use common::*;
use stretch_nbd::{DEFAULT_MAX_REQUEST_BYTES, ServerConfig};

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for command in commands {
        args.extend(["-c", command]);
    }
    let out = run_ok("qemu-io", &args);
    // qemu-io exits 0 even when a command fails, so look at what it said.
    for bad in ["Pattern verification failed", "failed", "error", "Error"] {
        assert!(
            !out.contains(bad),
            "qemu-io reported {bad:?}:\n{out}\ncommands: {commands:?}"
        );
    }
    out
}

#[test]
fn nbdinfo_lists_every_export() {
    let server = TestServer::start(
        MemBackend::new()
            .with("alpha", "the first disk", MemExport::new(MIB))
            .with("beta", "", MemExport::new(2 * MIB))
            .with("gamma-ro", "read only", MemExport::read_only(MIB, 0x42)),
    );
    let out = run_ok("nbdinfo", &["--list", &format!("nbd://{}", server.addr)]);
    for name in ["alpha", "beta", "gamma-ro"] {
        assert!(
            out.contains(&format!("export=\"{name}\"")),
            "{name} missing from:\n{out}"
        );
    }
    assert!(
        out.contains("the first disk"),
        "description missing:\n{out}"
    );
    server.stop();
}

#[test]
fn nbdinfo_shows_size_flags_and_block_sizes() {
    let server = TestServer::start(
        MemBackend::new()
            .with("beta", "", MemExport::new(2 * MIB))
            .with("gamma-ro", "", MemExport::read_only(MIB, 0x42)),
    );
    let out = run_ok("nbdinfo", &[&server.uri("beta")]);
    for expected in [
        "export-size: 2097152".to_string(),
        "block_size_minimum: 1".to_string(),
        "block_size_preferred: 4096".to_string(),
        format!("block_size_maximum: {DEFAULT_MAX_REQUEST_BYTES}"),
        "is_read_only: false".to_string(),
        "can_flush: true".to_string(),
        "can_fua: true".to_string(),
        "can_trim: true".to_string(),
        "can_zero: true".to_string(),
        "can_multi_conn: true".to_string(),
    ] {
        assert!(out.contains(&expected), "{expected:?} missing from:\n{out}");
    }
    let out = run_ok("nbdinfo", &[&server.uri("gamma-ro")]);
    assert!(out.contains("is_read_only: true"), "{out}");
    assert!(out.contains("export-size: 1048576"), "{out}");
    server.stop();
}

#[test]
fn nbdinfo_fails_cleanly_on_unknown_export() {
    let server = TestServer::start(MemBackend::new().with("alpha", "", MemExport::new(MIB)));
    let out = run_tool("nbdinfo", &[&server.uri("nope")]);
    assert!(!out.status.success());
    // The server must still be healthy afterwards.
    run_ok("nbdinfo", &[&server.uri("alpha")]);
    server.stop();
}

#[test]
fn qemu_io_patterns_fua_flush_zeroes_and_unaligned() {
    let export = MemExport::new(4 * MIB);
    let server = TestServer::start(MemBackend::new().with("disk", "", export.clone()));
    qemu_io(
        &server.uri("disk"),
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            // Unaligned in both offset and length: passed through as is.
            "write -P 0xcd 1000 3000",
            "read -P 0xcd 1000 3000",
            "read -P 0xab 0 1000",
            "read -P 0xab 4000 61536",
            // FUA write.
            "write -f -P 0xef 1M 8k",
            "read -P 0xef 1M 8k",
            "flush",
            // Zeroes over existing data.
            "write -P 0x11 128k 64k",
            "write -z 128k 64k",
            "read -P 0 128k 64k",
            // Discard (trim) reads back as zeros with this export.
            "write -P 0x22 256k 64k",
            "discard 256k 64k",
            "read -P 0 256k 64k",
            // Last bytes of the device.
            "write -P 0x33 4194000 304",
            "read -P 0x33 4194000 304",
        ],
    );
    let data = export.contents();
    assert!(data[..1000].iter().all(|&b| b == 0xab));
    assert!(data[1000..4000].iter().all(|&b| b == 0xcd));
    assert!(data[4000..64 * KIB].iter().all(|&b| b == 0xab));
    assert!(data[MIB..MIB + 8 * KIB].iter().all(|&b| b == 0xef));
    assert!(data[128 * KIB..192 * KIB].iter().all(|&b| b == 0));
    assert!(data[4_194_000..].iter().all(|&b| b == 0x33));
    let calls = export.calls();
    assert!(
        calls.contains(&("write", 1000, 3000)) && calls.contains(&("read", 1000, 3000)),
        "unaligned requests were not passed through as is: {calls:?}"
    );
    let stats = &export.stats;
    assert!(
        stats.fua_writes.load(Ordering::SeqCst) >= 1,
        "FUA not passed through"
    );
    assert!(
        stats.flushes.load(Ordering::SeqCst) >= 1,
        "flush not passed through"
    );
    assert!(
        stats.zeroes.load(Ordering::SeqCst) >= 1,
        "write -z did not use WRITE_ZEROES"
    );
    assert!(
        stats.trims.load(Ordering::SeqCst) >= 1,
        "discard did not use TRIM"
    );
    export.assert_no_violations();
    server.stop();
}

#[test]
fn qemu_io_discard_larger_than_max_request_is_split() {
    let max = 64 * KIB as u32;
    let export = MemExport::with_max_call(2 * MIB, max);
    let server = TestServer::with_config(
        MemBackend::new().with("disk", "", export.clone()),
        ServerConfig {
            max_request_bytes: max,
            ..ServerConfig::default()
        },
    );
    qemu_io(
        &server.uri("disk"),
        &[
            // qemu splits reads and writes at the advertised maximum...
            "write -P 0x5a 0 2M",
            "read -P 0x5a 0 2M",
            // ...but sends discards whole, far over the maximum.
            "discard 0 1M",
            "read -P 0 0 1M",
            "read -P 0x5a 1M 1M",
        ],
    );
    assert!(export.stats.largest_call.load(Ordering::SeqCst) <= max);
    assert!(export.stats.trims.load(Ordering::SeqCst) >= 16);
    export.assert_no_violations();
    server.stop();
}

#[test]
fn qemu_io_reads_read_only_export() {
    let export = MemExport::read_only(MIB, 0x42);
    let server = TestServer::start(MemBackend::new().with("ro", "", export.clone()));
    let out = run_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            &server.uri("ro"),
            "-c",
            "read -P 0x42 0 1M",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    server.stop();
}

#[test]
fn qemu_img_convert_then_compare() {
    let size = 4 * MIB;
    let export = MemExport::new(size);
    let server = TestServer::start(MemBackend::new().with("disk", "", export.clone()));
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    // Data, a zero hole that qemu-img may turn into WRITE_ZEROES, more data.
    let mut image = pseudo_random(size, 7);
    image[MIB..2 * MIB].fill(0);
    // Pre-dirty the export so the hole must actually be written.
    export.set_contents(0, &vec![0xee; size]);
    fs::write(&src, &image).expect("write source image");
    let src = src.to_str().expect("utf-8 path");
    let uri = server.uri("disk");

    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
    );
    let out = run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    );
    assert!(out.contains("Images are identical"), "{out}");
    assert!(
        export.contents() == image,
        "export differs from the source image"
    );

    // Make sure compare really reads through the server.
    export.set_contents(3 * MIB + 17, &[0x99]);
    let out = run_tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "compare should see the difference"
    );
    export.assert_no_violations();
    server.stop();
}

#[test]
fn nbdcopy_round_trip_8_mib() {
    let size = 8 * MIB;
    let export = MemExport::new(size);
    let server = TestServer::start(MemBackend::new().with("disk", "", export.clone()));
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("in.raw");
    let dst = dir.path().join("out.raw");
    let image = pseudo_random(size, 42);
    fs::write(&src, &image).expect("write source");
    let uri = server.uri("disk");

    run_ok("nbdcopy", &[src.to_str().expect("utf-8"), &uri]);
    assert!(
        export.contents() == image,
        "export differs after nbdcopy in"
    );
    run_ok("nbdcopy", &[&uri, dst.to_str().expect("utf-8")]);
    let copied = fs::read(&dst).expect("read copy");
    assert_eq!(copied.len(), size);
    assert!(copied == image, "nbdcopy out differs from what went in");
    export.assert_no_violations();
    server.stop();
}
