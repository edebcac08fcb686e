//! NBD_OPT_STARTTLS: the option state machine under each TLS policy, driven
//! byte by byte by a hand-rolled client that upgrades its socket with
//! rustls exactly as qemu and libnbd do.

mod common;

use std::sync::Arc;

use common::*;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use stretch_nbd::protocol::*;
use stretch_nbd::{ServerConfig, TlsSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A self-signed certificate for `localhost`, the server settings that
/// present it and a client that trusts only it.
fn tls_pair(required: bool) -> (TlsSettings, TlsConnector) {
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let der: CertificateDer<'static> = certificate.der().clone();
    let settings = TlsSettings::from_der(
        vec![der.clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        required,
    )
    .expect("server TLS settings");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    (settings, TlsConnector::from(Arc::new(client)))
}

fn server(tls: Option<TlsSettings>) -> (TestServer, Arc<MemExport>) {
    let export = MemExport::new(MIB);
    let server = TestServer::with_config(
        MemBackend::new().with("disk", "scratch disk", export.clone()),
        ServerConfig {
            tls,
            ..ServerConfig::default()
        },
    );
    (server, export)
}

/// Sends STARTTLS, expects the ACK, and runs the TLS handshake.
async fn start_tls(mut stream: TcpStream, connector: &TlsConnector) -> TlsStream<TcpStream> {
    send_option(&mut stream, NBD_OPT_STARTTLS, &[]).await;
    let reply = read_option_reply(&mut stream).await;
    assert_eq!(
        (reply.option, reply.reply_type),
        (NBD_OPT_STARTTLS, NBD_REP_ACK)
    );
    let name = ServerName::try_from("localhost").expect("name");
    within(connector.connect(name, stream))
        .await
        .expect("TLS handshake")
}

async fn expect_error<S>(stream: &mut S, option: u32, data: &[u8], reply_type: u32)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    send_option(stream, option, data).await;
    let reply = read_option_reply(stream).await;
    assert_eq!(
        (reply.option, reply.reply_type),
        (option, reply_type),
        "reply to option {option}: {:?}",
        String::from_utf8_lossy(&reply.data)
    );
}

/// Lists exports; returns their names.
async fn list<S>(stream: &mut S) -> Vec<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    send_option(stream, NBD_OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let reply = read_option_reply(stream).await;
        match reply.reply_type {
            NBD_REP_ACK => return names,
            NBD_REP_SERVER => {
                let length = u32::from_be_bytes(reply.data[..4].try_into().expect("4")) as usize;
                names.push(String::from_utf8(reply.data[4..4 + length].to_vec()).expect("utf8"));
            }
            other => panic!("unexpected reply {other:#x}"),
        }
    }
}

#[tokio::test]
async fn require_refuses_everything_before_starttls_then_serves_over_tls() {
    let (settings, connector) = tls_pair(true);
    let (server, export) = server(Some(settings));
    let mut stream = negotiate_start(server.addr).await;

    // Nothing about the exports before TLS, the list included.
    expect_error(&mut stream, NBD_OPT_LIST, &[], NBD_REP_ERR_TLS_REQD).await;
    let go = info_payload("disk", &[]);
    expect_error(&mut stream, NBD_OPT_INFO, &go, NBD_REP_ERR_TLS_REQD).await;
    expect_error(&mut stream, NBD_OPT_GO, &go, NBD_REP_ERR_TLS_REQD).await;
    expect_error(
        &mut stream,
        NBD_OPT_STRUCTURED_REPLY,
        &[],
        NBD_REP_ERR_TLS_REQD,
    )
    .await;
    // A STARTTLS with a payload is malformed, and leaves the stream plain.
    expect_error(&mut stream, NBD_OPT_STARTTLS, b"x", NBD_REP_ERR_INVALID).await;

    let mut tls = start_tls(stream, &connector).await;
    // STARTTLS inside TLS is refused; haggling goes on.
    expect_error(&mut tls, NBD_OPT_STARTTLS, &[], NBD_REP_ERR_INVALID).await;
    assert_eq!(list(&mut tls).await, ["disk"]);
    send_option(&mut tls, NBD_OPT_GO, &go).await;
    let info = export_info(&read_infos(&mut tls, NBD_OPT_GO).await);
    assert_eq!(info.size, MIB as u64);

    // Transmission runs over TLS: a write reads back, and reached the export.
    let data = pseudo_random(64 * KIB, 7);
    send_request(
        &mut tls,
        NBD_CMD_WRITE,
        0,
        1,
        4096,
        data.len() as u32,
        &data,
    )
    .await;
    assert_eq!(read_reply(&mut tls).await, (NBD_SUCCESS, 1));
    send_request(&mut tls, NBD_CMD_READ, 0, 2, 4096, data.len() as u32, &[]).await;
    assert_eq!(read_reply(&mut tls).await, (NBD_SUCCESS, 2));
    assert_eq!(read_exact_vec(&mut tls, data.len()).await, data);
    assert_eq!(&export.contents()[4096..4096 + data.len()], &data[..]);
    send_request(&mut tls, NBD_CMD_DISC, 0, 3, 0, 0, &[]).await;
    // The server ends TLS cleanly and closes.
    let mut rest = Vec::new();
    within(tls.read_to_end(&mut rest))
        .await
        .expect("clean close");
    assert!(rest.is_empty());
    export.assert_no_violations();
}

#[tokio::test]
async fn require_hangs_up_on_export_name_before_tls() {
    let (settings, _) = tls_pair(true);
    let (server, _export) = server(Some(settings));
    let mut stream = negotiate_start(server.addr).await;
    // EXPORT_NAME has no error reply: the spec says to disconnect.
    send_option(&mut stream, NBD_OPT_EXPORT_NAME, b"disk").await;
    expect_closed(&mut stream).await;
}

#[tokio::test]
async fn abort_is_allowed_before_tls() {
    let (settings, _) = tls_pair(true);
    let (server, _export) = server(Some(settings));
    let mut stream = negotiate_start(server.addr).await;
    send_option(&mut stream, NBD_OPT_ABORT, &[]).await;
    let reply = read_option_reply(&mut stream).await;
    assert_eq!(reply.reply_type, NBD_REP_ACK);
}

#[tokio::test]
async fn on_serves_plain_and_tls_clients() {
    let (settings, connector) = tls_pair(false);
    let (server, _export) = server(Some(settings));
    let mut plain = negotiate_start(server.addr).await;
    assert_eq!(list(&mut plain).await, ["disk"]);

    let stream = negotiate_start(server.addr).await;
    let mut tls = start_tls(stream, &connector).await;
    assert_eq!(list(&mut tls).await, ["disk"]);
}

#[tokio::test]
async fn off_refuses_starttls_as_unsupported() {
    let (server, _export) = server(None);
    let mut stream = negotiate_start(server.addr).await;
    expect_error(&mut stream, NBD_OPT_STARTTLS, &[], NBD_REP_ERR_UNSUP).await;
    // Still in sync and plain.
    assert_eq!(list(&mut stream).await, ["disk"]);
}

#[tokio::test]
async fn failed_tls_handshake_closes_only_that_connection() {
    let (settings, connector) = tls_pair(true);
    let (server, _export) = server(Some(settings));
    let mut stream = negotiate_start(server.addr).await;
    send_option(&mut stream, NBD_OPT_STARTTLS, &[]).await;
    assert_eq!(read_option_reply(&mut stream).await.reply_type, NBD_REP_ACK);
    // Not a TLS ClientHello.
    within(stream.write_all(&[0x42; 64])).await.expect("send");
    expect_closed(&mut stream).await;

    let other = negotiate_start(server.addr).await;
    let mut tls = start_tls(other, &connector).await;
    assert_eq!(list(&mut tls).await, ["disk"]);
}
