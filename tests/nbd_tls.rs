//! NBD over TLS (NBD_OPT_STARTTLS, x509) with real clients: qemu-io and
//! qemu-img (`tls-creds-x509`), nbdinfo and nbdcopy (`nbds://`), against a
//! `stretch node` child process with `nbd_tls = "require"`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn tls_tuning() -> String {
    format!("{SHIPPED_TUNING}nbd_tls = \"require\"\n")
}

/// A directory in the layout qemu's `tls-creds-x509` and libnbd's
/// `tls-certificates` read: the CA to trust as `ca-cert.pem`.
fn client_dir(parent: &Path, ca: &Path) -> PathBuf {
    let dir = parent.join("tls-client");
    std::fs::create_dir_all(&dir).expect("creating the client TLS dir");
    std::fs::copy(ca, dir.join("ca-cert.pem")).expect("copying the CA");
    dir
}

/// `--object` and `--image-opts` arguments for a qemu tool reaching
/// `volume` over TLS; `hostname` is what the certificate must name when it
/// is not the address connected to.
fn qemu_tls_args(dir: &Path, port: u16, volume: &str, hostname: Option<&str>) -> [String; 2] {
    let mut image = format!("driver=nbd,host=127.0.0.1,port={port},export={volume},tls-creds=tls0");
    if let Some(hostname) = hostname {
        image.push_str(&format!(",tls-hostname={hostname}"));
    }
    [
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        ),
        image,
    ]
}

fn qemu_io_tls(args: &[String; 2], commands: &[&str]) -> Run {
    let mut command = Command::new("qemu-io");
    command.args(["--object", &args[0], "--image-opts"]);
    for c in commands {
        command.args(["-c", c]);
    }
    command.arg(&args[1]);
    let result = run(&mut command, None, COMMAND_TIMEOUT);
    assert_qemu_io_clean(&result);
    result
}

/// With the node's own cluster certificate (the default): qemu clients
/// trust the cluster CA and are told the node's name, which is what the
/// certificate names.
#[test]
fn qemu_over_tls_with_the_cluster_certificate() {
    require_tool("qemu-io");
    require_tool("qemu-img");
    let node = TestNode::start_with_tuning(&tls_tuning());
    node.create_volume("vol", "16M");
    let scratch = node.scratch();
    let dir = client_dir(&scratch, &node.data_dir().join("pki").join("ca.pem"));
    let args = qemu_tls_args(&dir, node.nbd_port, "vol", Some("a1"));

    qemu_io_tls(&args, &["write -P 0x5a 4096 1M", "write -f -P 0x6b 2M 64k"]);
    // A new session, so the data comes back from the node.
    qemu_io_tls(
        &args,
        &[
            "read -P 0 0 4096",
            "read -P 0x5a 4096 1M",
            "read -P 0x6b 2M 64k",
        ],
    );

    // qemu-img writes a file into the volume and reads the volume back out.
    let source = scratch.join("source.raw");
    let data = pseudo_random(3 << 20, 11);
    std::fs::write(&source, &data).expect("writing the source");
    let mut write = Command::new("qemu-img");
    write
        .args(["convert", "-n", "--object", &args[0], "-f", "raw"])
        .arg(&source)
        .args(["--target-image-opts", &args[1]]);
    run(&mut write, None, COMMAND_TIMEOUT).assert_ok();
    let out = scratch.join("out.raw");
    let mut read = Command::new("qemu-img");
    read.args(["convert", "--object", &args[0], "--image-opts", &args[1]])
        .args(["-O", "raw"])
        .arg(&out);
    run(&mut read, None, COMMAND_TIMEOUT).assert_ok();
    let back = std::fs::read(&out).expect("reading the copy");
    assert_eq!(back.len(), 16 << 20);
    assert!(back[..data.len()] == data[..], "qemu-img read back differs");
    assert!(back[data.len()..].iter().all(|&b| b == 0));

    // Without the right name the certificate is refused by the client.
    let wrong = qemu_tls_args(&dir, node.nbd_port, "vol", Some("not-a1"));
    let mut command = Command::new("qemu-io");
    command
        .args(["--object", &wrong[0], "--image-opts"])
        .args(["-c", "read 0 4k", &wrong[1]]);
    assert!(!run(&mut command, None, COMMAND_TIMEOUT).success());
}

/// Makes a CA and a server certificate for 127.0.0.1 and localhost with
/// openssl, as an operator would for clients that connect by address.
fn openssl_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ssl = |args: &[&str]| {
        let mut command = Command::new("openssl");
        command.current_dir(dir).args(args);
        run(&mut command, None, COMMAND_TIMEOUT).assert_ok();
    };
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test NBD CA",
    ]);
    ssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("writing the extensions");
    ssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// With a certificate given by path that names 127.0.0.1: libnbd's
/// `nbds://` clients and qemu verify it by address; plain clients get
/// nothing, not even the export list.
#[test]
fn libnbd_over_tls_with_a_given_certificate_and_plain_clients_refused() {
    require_tool("nbdinfo");
    require_tool("nbdcopy");
    require_tool("openssl");
    require_tool("qemu-io");
    let certs = tempfile::Builder::new()
        .prefix("stretch-tls-")
        .tempdir()
        .expect("temporary directory");
    let (ca, cert, key) = openssl_certificates(certs.path());
    let node_keys = format!(
        "nbd_tls_cert = \"{}\"\nnbd_tls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let node = TestNode::start_with_node_keys(&node_keys, &tls_tuning());
    node.create_volume("vol", "8M");
    let scratch = node.scratch();
    let dir = client_dir(&scratch, &ca);
    let tls_uri = format!(
        "nbds://127.0.0.1:{}/vol?tls-certificates={}",
        node.nbd_port,
        dir.display()
    );

    // Plain clients are refused: no size, no export list.
    let plain = run(
        Command::new("nbdinfo").arg(node.uri("vol")),
        None,
        COMMAND_TIMEOUT,
    );
    assert!(!plain.success(), "plain nbdinfo succeeded: {plain}");
    let listed = run(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd://127.0.0.1:{}", node.nbd_port)),
        None,
        COMMAND_TIMEOUT,
    );
    assert!(
        !listed.output().contains("vol"),
        "export list shown without TLS: {listed}"
    );

    // nbdinfo over TLS sees the export.
    let info = run(Command::new("nbdinfo").arg(&tls_uri), None, COMMAND_TIMEOUT);
    info.assert_ok();
    assert!(info.output().contains("8388608"), "{info}");

    // nbdcopy writes a file in and reads it back out, both over TLS.
    let source = scratch.join("source.raw");
    let data = pseudo_random(8 << 20, 5);
    std::fs::write(&source, &data).expect("writing the source");
    let mut copy_in = Command::new("nbdcopy");
    copy_in.arg(&source).arg(&tls_uri);
    run(&mut copy_in, None, COMMAND_TIMEOUT).assert_ok();
    let out = scratch.join("out.raw");
    let mut copy_out = Command::new("nbdcopy");
    copy_out.arg(&tls_uri).arg(&out);
    run(&mut copy_out, None, COMMAND_TIMEOUT).assert_ok();
    assert!(
        std::fs::read(&out).expect("reading the copy") == data,
        "nbdcopy read back differs"
    );

    // qemu checks the address against the certificate too.
    let args = qemu_tls_args(&dir, node.nbd_port, "vol", None);
    let expected = format!("read -P {:#x} 0 1", data[0]);
    qemu_io_tls(&args, &[&expected]);
}

/// Deterministic bytes that no two offsets of a copy share by accident.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}
