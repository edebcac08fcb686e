//! Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) against a
//! stretch node started as a child process.

mod common;

use std::fmt::Write as _;
use std::process::Command;

use common::*;

/// Aligned and unaligned pattern writes read back exactly, without
/// touching their neighbours; FUA writes, flush, and write-zeroes.
#[test]
fn qemu_io_patterns_aligned_unaligned_fua_zeroes() {
    require_tool("qemu-io");
    let node = TestNode::start();
    node.create_volume("vol", "64M");
    let uri = node.uri("vol");

    // Unaligned write inside one block, then its neighbours are still zero.
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x5a 1000 3000",
            "read -P 0x5a 1000 3000",
            "read -P 0 0 1000",
            "read -P 0 4000 96",
            "read -P 0 4096 4096",
        ],
    );
    // Unaligned write spanning several blocks, in a new session (so the
    // data comes back from the node, not from anything cached by qemu).
    qemu_io_ok(&uri, &["write -P 0x33 10000 20000"]);
    qemu_io_ok(
        &uri,
        &[
            "read -P 0x5a 1000 3000",
            "read -P 0 4000 6000",
            "read -P 0x33 10000 20000",
            "read -P 0 30000 2768",
        ],
    );
    // Aligned writes, one of them large.
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x11 1M 4k",
            "write -P 0x22 2M 1M",
            "read -P 0x11 1M 4k",
            "read -P 0x22 2M 1M",
            "read -P 0 1044480 4096",
            "read -P 0 3M 4k",
        ],
    );
    // Overwrite part of an earlier write, unaligned on both ends.
    qemu_io_ok(&uri, &["write -P 0x44 2097000 5000"]);
    qemu_io_ok(
        &uri,
        &[
            "read -P 0 2093056 3944",
            "read -P 0x44 2097000 5000",
            "read -P 0x22 2102000 1043728",
        ],
    );
    // FUA writes and explicit flushes.
    qemu_io_ok(
        &uri,
        &[
            "write -f -P 0x66 8M 64k",
            "write -f -P 0x67 9437185 777",
            "flush",
            "read -P 0x66 8M 64k",
            "read -P 0x67 9437185 777",
        ],
    );
    // Write-zeroes over written data, aligned and not.
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x77 16M 64k",
            "write -z 16M 16k",
            "write -z 16801792 1000",
            "flush",
        ],
    );
    qemu_io_ok(
        &uri,
        &[
            "read -P 0 16M 16k",
            "read -P 0x77 16793600 8192",
            "read -P 0 16801792 1000",
            "read -P 0x77 16802792 39960",
        ],
    );
    // The last byte of the volume is addressable.
    qemu_io_ok(
        &uri,
        &["write -P 0x99 67108863 1", "read -P 0x99 67108863 1"],
    );
    // The export has exactly the volume's size: one byte past is refused.
    let past = qemu_io(&uri, &["read 67108863 2"]);
    assert!(
        !past.success() || past.output().contains("error") || past.output().contains("failed"),
        "a read past the end succeeded: {past}"
    );
}

/// Applies ~300 seeded random writes of random sizes and offsets (aligned
/// and unaligned; data, zeroes, FUA; some flushes) both to a reference
/// file and, through one qemu-io script, to a volume of `size` bytes; the
/// export must then equal the reference, also after kill -9 and restart.
fn random_workload(mut node: TestNode, size: u64, seed: u64) -> TestNode {
    require_tool("qemu-io");
    require_tool("qemu-img");
    node.create_volume("rand", &size.to_string());
    let uri = node.uri("rand");
    let scratch = node.scratch();
    let reference = scratch.join("ref.raw");

    let mut image = vec![0u8; size as usize];
    let mut rng = Rng::new(seed);
    let mut script = String::new();
    for _ in 0..300 {
        let aligned = rng.chance(30);
        let length = match rng.range(0, 9) {
            0..=5 => rng.range(1, 16 * KIB),
            6..=8 => rng.range(1, 256 * KIB),
            _ => rng.range(1, 2 * MIB),
        };
        let (offset, length) = if aligned {
            let length = length.div_ceil(4096) * 4096;
            (rng.range(0, (size - length) / 4096) * 4096, length)
        } else {
            (rng.range(0, size - length), length)
        };
        let range = offset as usize..(offset + length) as usize;
        match rng.range(0, 19) {
            0..=1 => {
                image[range].fill(0);
                writeln!(script, "write -z {offset} {length}").expect("string write");
            }
            2 => {
                let pattern = rng.range(0, 255) as u8;
                image[range].fill(pattern);
                writeln!(script, "write -f -P {pattern} {offset} {length}").expect("string write");
            }
            3 => script.push_str("flush\n"),
            _ => {
                let pattern = rng.range(0, 255) as u8;
                image[range].fill(pattern);
                writeln!(script, "write -P {pattern} {offset} {length}").expect("string write");
            }
        }
    }
    script.push_str("flush\n");
    std::fs::write(&reference, &image).expect("writing the reference image");

    let result = qemu_io_script(&uri, &script);
    assert_qemu_io_clean(&result);

    let compare = || {
        let mut command = Command::new("qemu-img");
        command
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&reference)
            .arg(&uri);
        run(&mut command, None, COMMAND_TIMEOUT)
    };
    let first = compare();
    assert_eq!(
        first.status.code(),
        Some(0),
        "export differs from the reference: {first}"
    );

    // Everything was flushed, so a crash loses nothing of it.
    node.kill9();
    node.restart();
    let second = compare();
    assert_eq!(
        second.status.code(),
        Some(0),
        "export differs from the reference after kill -9 and restart: {second}"
    );
    node
}

/// The random workload with the shipped tuning (everything fits in the
/// cache).
#[test]
fn random_workload_matches_reference_image() {
    random_workload(TestNode::start(), 16 * MIB, 0x5712_e7c4);
}

/// The random workload on a node with tiny limits: writes are throttled,
/// clean blocks evicted and read back from the leg, the journal
/// checkpointed and its segments rotated and released many times.
#[test]
fn random_workload_matches_reference_image_under_cache_pressure() {
    let node = random_workload(
        TestNode::start_with_tuning(SMALL_TUNING),
        64 * MIB,
        0x0bad_cafe,
    );
    let metrics = node.metrics();
    // Since the restart: the comparison read 64 MiB through a 24 MiB cache.
    let misses = metric_value(&metrics, "stretch_cache_miss_blocks_total", &[]).unwrap_or(0.0);
    assert!(misses > 0.0, "no block was read from a leg:\n{metrics}");
}

/// nbdinfo lists every volume as an export, and reports an export's size.
#[test]
fn nbdinfo_lists_exports_and_sizes() {
    require_tool("nbdinfo");
    let node = TestNode::start();
    let volumes = [
        ("alpha", "64M", 64 * MIB),
        ("beta", "4K", 4 * KIB),
        ("gamma.v-2_x", "1G", 1024 * MIB),
    ];
    for (name, size, _) in volumes {
        node.create_volume(name, size);
    }
    let mut command = Command::new("nbdinfo");
    command
        .arg("--list")
        .arg(format!("nbd://127.0.0.1:{}", node.nbd_port));
    let list = run(&mut command, None, COMMAND_TIMEOUT);
    list.assert_ok();
    for (name, _, bytes) in volumes {
        assert!(
            list.stdout.contains(&format!("export=\"{name}\":")),
            "nbdinfo --list lacks {name}: {list}"
        );
        assert!(
            list.stdout.contains(&format!("export-size: {bytes} ")),
            "nbdinfo --list lacks the size of {name}: {list}"
        );
    }
    for (name, _, bytes) in volumes {
        let mut command = Command::new("nbdinfo");
        command.arg(node.uri(name));
        let info = run(&mut command, None, COMMAND_TIMEOUT);
        info.assert_ok();
        assert!(
            info.stdout.contains(&format!("export-size: {bytes} ")),
            "nbdinfo {name} does not show size {bytes}: {info}"
        );
        assert!(info.stdout.contains("is_read_only: false"), "{info}");
        assert!(info.stdout.contains("can_flush: true"), "{info}");
        assert!(info.stdout.contains("can_fua: true"), "{info}");
        assert!(
            info.stdout.contains("block_size_maximum: 33554432"),
            "{info}"
        );
        let mut command = Command::new("nbdinfo");
        command.arg("--size").arg(node.uri(name));
        let size = run(&mut command, None, COMMAND_TIMEOUT);
        size.assert_ok();
        assert_eq!(size.stdout.trim(), bytes.to_string(), "{size}");
    }
    // An export that does not exist is an error, not an empty disk.
    let mut command = Command::new("nbdinfo");
    command.arg(node.uri("missing"));
    let missing = run(&mut command, None, COMMAND_TIMEOUT);
    assert!(
        !missing.success(),
        "nbdinfo of a missing export succeeded: {missing}"
    );
}

/// A random 32 MiB file copied into an export and back is unchanged
/// (nbdcopy uses several connections and requests in parallel).
#[test]
fn nbdcopy_round_trip_32m() {
    require_tool("nbdcopy");
    let node = TestNode::start();
    node.create_volume("copy", "32M");
    let scratch = node.scratch();
    let source = scratch.join("source.raw");
    let mut data = vec![0u8; 32 * MIB as usize];
    Rng::new(0xc0b1).fill(&mut data);
    std::fs::write(&source, &data).expect("writing the source file");

    let mut upload = Command::new("nbdcopy");
    upload.arg(&source).arg(node.uri("copy"));
    run(&mut upload, None, COMMAND_TIMEOUT).assert_ok();

    let back = nbd_read_all(&node.uri("copy"), &scratch, "back.raw");
    assert_eq!(back.len(), data.len(), "copied-back size");
    if let Some(at) = back.iter().zip(&data).position(|(a, b)| a != b) {
        panic!("copied-back data differs first at byte {at}");
    }
}

/// Runs fio's nbd engine against `volume` with `options` and returns its
/// jobs, each already checked for errors. fio's nbd engine prints a
/// "connected" line on stdout, so the JSON report goes to a file.
fn fio_jobs(node: &TestNode, volume: &str, options: &[&str]) -> Vec<serde_json::Value> {
    require_tool("fio");
    let scratch = node.scratch();
    let output = scratch.join(format!("fio-{volume}.json"));
    let mut command = Command::new("fio");
    command
        .current_dir(&scratch)
        .args(["--ioengine=nbd", &format!("--uri={}", node.uri(volume))])
        .args(options)
        .arg("--output-format=json")
        .arg(format!("--output={}", output.display()));
    let result = run(&mut command, None, COMMAND_TIMEOUT);
    let text = std::fs::read_to_string(&output).unwrap_or_default();
    assert!(
        result.success(),
        "fio failed (its nbd engine needs fio built with libnbd): {result}\n{text}\n{}",
        node.log()
    );
    let report: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("fio's report is not JSON ({error}):\n{text}"));
    let jobs = report["jobs"]
        .as_array()
        .expect("fio report has jobs")
        .clone();
    assert!(!jobs.is_empty(), "fio ran no job: {text}");
    for job in &jobs {
        assert_eq!(job["error"].as_u64(), Some(0), "fio job error: {job}");
        if let Some(total) = job.get("total_err") {
            assert_eq!(total.as_u64(), Some(0), "fio job total_err: {job}");
        }
    }
    jobs
}

/// fio random 4k writes at queue depth 16 with crc32c verification.
#[test]
fn fio_randwrite_verify() {
    let node = TestNode::start();
    node.create_volume("fio", "32M");
    let options = [
        "--name=verify",
        "--rw=randwrite",
        "--bs=4k",
        "--size=32m",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
    ];
    for job in fio_jobs(&node, "fio", &options) {
        assert_eq!(
            job["write"]["io_bytes"].as_u64(),
            Some(32 * MIB),
            "fio wrote everything: {job}"
        );
        assert_eq!(
            job["read"]["io_bytes"].as_u64(),
            Some(32 * MIB),
            "fio read everything back to verify it: {job}"
        );
    }
}

/// One-block deltas and a 1 ms interval make every write close a delta, so
/// several threads (NBD tasks on both runtime workers, the timer, the I/O
/// threads) hand journal appends to the journal thread at once. They must
/// still reach it in position order: a swap once made the journal refuse
/// an append and the node stop taking writes under sequential load.
#[test]
fn concurrent_writers_closing_deltas_keep_the_journal_in_order() {
    let tuning = r#"delta_interval_ms = 1
delta_max_bytes = "4K"
cache_bytes_max = "24M"
journal_checkpoint_bytes = "1M"
journal_segment_bytes = "1M"
nbd_request_bytes_max = "4M"
nbd_in_flight_per_connection = 128
"#;
    let node = TestNode::start_with_tuning(tuning);
    node.create_volume("busy", "64M");
    let options = [
        "--name=busy",
        "--rw=randwrite",
        "--bs=4k",
        "--size=64m",
        "--iodepth=32",
        "--numjobs=4",
        "--time_based",
        "--runtime=4",
    ];
    for job in fio_jobs(&node, "busy", &options) {
        assert!(job["write"]["io_bytes"].as_u64().unwrap_or(0) > 0, "{job}");
    }
    let status = node.status();
    assert!(
        status["failure"].is_null(),
        "the node failed: {status}\n{}",
        node.log()
    );
}
