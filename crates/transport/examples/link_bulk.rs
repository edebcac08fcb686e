//! The physical limit of a link between two nodes: one QUIC stream carrying
//! bytes as fast as the endpoints can, with the nodes' TLS, transport and
//! socket settings ([`PeerEndpoint`]) and, with `--delay-ms` or
//! `--bandwidth-mbit`, the same link shaper the nodes use. Replication
//! (catch-up, resync) is measured against it by `bench/catch-up.py`.
//!
//! ```text
//! cargo run --release -p stretch-transport --example link_bulk -- --delay-ms 25 --mib 512
//! cargo run --release -p stretch-transport --example link_bulk -- --delay-ms 25 --congestion cubic
//! ```
//!
//! Prints one line: bytes, seconds from the first byte sent until the
//! receiver's count came back, MiB/s. Both endpoints run in this process
//! (a tokio runtime with two workers), like the nodes of `stretch up`.

use std::net::SocketAddr;
use std::time::Instant;

use stretch_core::LinkProfile;
use stretch_transport::{CongestionControl, LinkTable, NodeIdentity, PeerEndpoint};

const MIB: u64 = 1 << 20;
/// Bytes handed to the stream per write.
const WRITE_BYTES: usize = 1 << 20;

struct Options {
    mib: u64,
    delay_ms: u64,
    bandwidth_mbit: Option<u64>,
    loss_ppm: u32,
    congestion: CongestionControl,
}

fn usage() -> ! {
    eprintln!(
        "usage: link_bulk [--mib N (default 256)] [--delay-ms D (one way, default 0)] \
         [--bandwidth-mbit B (default unlimited)] [--loss-ppm P (datagrams lost \
         per million, default 0)] [--congestion bbr|cubic (default bbr, as the nodes)]"
    );
    std::process::exit(2)
}

fn parse_options() -> Options {
    let mut options = Options {
        mib: 256,
        delay_ms: 0,
        bandwidth_mbit: None,
        loss_ppm: 0,
        congestion: CongestionControl::default(),
    };
    let mut arguments = std::env::args().skip(1);
    while let Some(flag) = arguments.next() {
        if flag == "--help" || flag == "-h" {
            usage();
        }
        if flag == "--congestion" {
            options.congestion = match arguments.next().as_deref() {
                Some("bbr") => CongestionControl::Bbr,
                Some("cubic") => CongestionControl::Cubic,
                _ => {
                    eprintln!("link_bulk: --congestion takes bbr or cubic");
                    usage();
                }
            };
            continue;
        }
        let Some(value) = arguments.next().and_then(|value| value.parse::<u64>().ok()) else {
            eprintln!("link_bulk: {flag} needs a whole number");
            usage();
        };
        match flag.as_str() {
            "--mib" if value > 0 => options.mib = value,
            "--delay-ms" => options.delay_ms = value,
            "--bandwidth-mbit" if value > 0 => options.bandwidth_mbit = Some(value),
            "--loss-ppm" if value <= 1_000_000 => options.loss_ppm = value as u32,
            _ => {
                eprintln!("link_bulk: unknown option or bad value: {flag} {value}");
                usage();
            }
        }
    }
    options
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = parse_options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(options))
}

async fn run(options: Options) -> Result<(), Box<dyn std::error::Error>> {
    let pki = tempfile::tempdir()?;
    stretch_transport::init(pki.path(), "bulk", &["sender", "receiver"])?;
    let sender_identity = NodeIdentity::load(pki.path(), "sender")?;
    let receiver_identity = NodeIdentity::load(pki.path(), "receiver")?;
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let profile = LinkProfile {
        delay_ms: options.delay_ms,
        bandwidth_kbit: options.bandwidth_mbit.map(|mbit| mbit * 1000),
        loss_ppm: options.loss_ppm,
        ..LinkProfile::IDEAL
    };
    // Each side shapes what it sends, as each node does.
    let sender_links = LinkTable::new(1);
    let receiver_links = LinkTable::new(2);
    let sender = PeerEndpoint::bind_shaped(
        &sender_identity,
        loopback,
        sender_links.clone(),
        options.congestion,
    )?;
    let receiver = PeerEndpoint::bind_shaped(
        &receiver_identity,
        loopback,
        receiver_links.clone(),
        options.congestion,
    )?;
    let sender_address = sender.local_addr()?;
    let receiver_address = receiver.local_addr()?;
    sender_links.set(receiver_address, profile);
    receiver_links.set(sender_address, profile);

    let receiving = tokio::spawn(async move {
        let connection = receiver.accept().await.ok_or("the receiver closed")?;
        let (mut reply, mut incoming) = connection.accept_bi().await?;
        let mut received = 0u64;
        while let Some(chunk) = incoming.read_chunk(usize::MAX, true).await? {
            received += chunk.bytes.len() as u64;
        }
        reply.write_all(&received.to_be_bytes()).await?;
        reply.finish()?;
        // Keep the connection until the sender has read the count.
        connection.closed().await;
        Ok::<u64, Box<dyn std::error::Error + Send + Sync>>(received)
    });

    let connection = sender.connect("receiver", receiver_address).await?;
    let (mut outgoing, mut reply) = connection.open_bi().await?;
    let block = pseudo_random(WRITE_BYTES);
    let total = options.mib * MIB;
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        outgoing.write_chunk(block.clone()).await?;
        sent += WRITE_BYTES as u64;
    }
    outgoing.finish()?;
    let mut count = [0u8; 8];
    reply.read_exact(&mut count).await?;
    let seconds = started.elapsed().as_secs_f64();
    let stats = connection.stats();
    connection.close(0u32.into(), b"done");
    let received = receiving.await?.map_err(|error| error.to_string())?;
    if u64::from_be_bytes(count) != total || received != total {
        return Err(format!("sent {total} bytes, the receiver counted {received}").into());
    }
    println!(
        "link_bulk: {} MiB, delay {} ms one way, bandwidth {}, loss {} ppm, {:?}: {} packets lost, \
         {} congestion events, {seconds:.3} s, {:.1} MiB/s",
        options.mib,
        options.delay_ms,
        options
            .bandwidth_mbit
            .map_or("unlimited".to_string(), |mbit| format!("{mbit} Mbit/s")),
        options.loss_ppm,
        options.congestion,
        stats.path.lost_packets,
        stats.path.congestion_events,
        total as f64 / MIB as f64 / seconds
    );
    sender.close();
    Ok(())
}

/// Bytes that do not compress (the link does not compress, but a reader
/// should not wonder).
fn pseudo_random(length: usize) -> bytes::Bytes {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = Vec::with_capacity(length);
    while bytes.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(length);
    bytes::Bytes::from(bytes)
}
