//! A UDP socket that sends every datagram through the link shaper of its
//! destination, so QUIC between local nodes sees the delay, jitter,
//! bandwidth, loss and cuts of a long-distance link. Only the sending side
//! is shaped: each direction of a link is the sender's shaper.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use stretch_core::{Fate, LinkProfile, LinkShaper, Timestamp};
use tokio::sync::Notify;

/// Datagrams a link may hold waiting for bandwidth, in bytes.
pub const LINK_QUEUE_BYTES_MAX: u64 = 4 << 20;

/// Delayed datagrams leave up to this much before their time, to make up
/// for timers that fire late (on average the configured delay holds).
pub const TIMER_SLACK: Duration = Duration::from_millis(1);

/// How long a delayed datagram keeps retrying a socket that is not ready
/// before it counts as lost (UDP may lose it anyway).
const DELAYED_SEND_ATTEMPTS: u32 = 100;

/// Shared, live-changeable shaping of every destination.
#[derive(Clone)]
pub struct LinkTable {
    state: Arc<std::sync::Mutex<TableState>>,
}

struct TableState {
    links: BTreeMap<SocketAddr, LinkShaper>,
    start: Instant,
    /// splitmix64 state for jitter and loss draws.
    draws: u64,
}

impl fmt::Debug for LinkTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkTable").finish_non_exhaustive()
    }
}

impl LinkTable {
    /// An empty table: destinations without a profile are not shaped.
    /// `seed` drives jitter and loss.
    pub fn new(seed: u64) -> Self {
        LinkTable {
            state: Arc::new(std::sync::Mutex::new(TableState {
                links: BTreeMap::new(),
                start: Instant::now(),
                draws: seed,
            })),
        }
    }

    /// Sets (or changes, live) the profile of the link towards `peer`.
    pub fn set(&self, peer: SocketAddr, profile: LinkProfile) {
        let mut state = self.lock();
        match state.links.get_mut(&peer) {
            Some(link) => link.set_profile(profile),
            None => {
                state
                    .links
                    .insert(peer, LinkShaper::new(profile, LINK_QUEUE_BYTES_MAX));
            }
        }
    }

    pub fn profile(&self, peer: SocketAddr) -> Option<LinkProfile> {
        self.lock().links.get(&peer).map(LinkShaper::profile)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TableState> {
        // A panic while holding this lock cannot leave it inconsistent:
        // every update is a single assignment.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// When a datagram of `bytes` to `peer` sent now arrives, if it does.
    fn fate(&self, peer: SocketAddr, bytes: usize) -> Option<Instant> {
        let mut state = self.lock();
        let start = state.start;
        let now = Timestamp(start.elapsed().as_nanos() as u64);
        let TableState { links, draws, .. } = &mut *state;
        let Some(link) = links.get_mut(&peer) else {
            return Some(Instant::now());
        };
        let mut draw = || {
            *draws = draws.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = *draws;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        match link.send(now, bytes as u64, &mut draw) {
            Fate::Deliver { at } => Some(start + Duration::from_nanos(at.as_nanos())),
            Fate::Drop(reason) => {
                tracing::trace!(%peer, ?reason, "link dropped a datagram");
                None
            }
        }
    }
}

/// A socket whose sends pass the link table.
pub struct ShapedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    links: LinkTable,
    /// Datagrams waiting out their delay, per destination in the order
    /// they were sent. One task delivers each destination's in that order:
    /// a datagram per task, each racing for the socket, would reorder a
    /// burst, and QUIC takes reordering for loss and shrinks its window to
    /// a crawl. Destinations do not wait for each other: a datagram to a
    /// near site never queues behind a slow or saturated link's.
    delayed: Arc<DelayLine>,
}

struct DelayLine {
    queues: std::sync::Mutex<BTreeMap<SocketAddr, VecDeque<Delayed>>>,
    wake: Notify,
    started: std::sync::Once,
}

struct Delayed {
    at: Instant,
    destination: SocketAddr,
    ecn: Option<quinn::udp::EcnCodepoint>,
    src_ip: Option<std::net::IpAddr>,
    contents: Vec<u8>,
}

impl fmt::Debug for ShapedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShapedSocket").finish_non_exhaustive()
    }
}

impl ShapedSocket {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, links: LinkTable) -> Self {
        ShapedSocket {
            inner,
            links,
            delayed: Arc::new(DelayLine {
                queues: std::sync::Mutex::new(BTreeMap::new()),
                wake: Notify::new(),
                started: std::sync::Once::new(),
            }),
        }
    }

    /// The delivery task: sends each datagram once its time came, each
    /// destination's in queue order. It ends when the socket is dropped.
    fn start_delivery(&self) {
        let line = Arc::downgrade(&self.delayed);
        let inner = self.inner.clone();
        self.delayed.started.call_once(|| {
            tokio::spawn(async move {
                loop {
                    let Some(line) = line.upgrade() else {
                        return;
                    };
                    // The destination whose head is due first.
                    let head = lock(&line.queues)
                        .iter()
                        .filter_map(|(destination, queue)| {
                            queue.front().map(|datagram| (datagram.at, *destination))
                        })
                        .min();
                    match head {
                        None => line.wake.notified().await,
                        // The timer wheel has 1 ms slots and wakes late,
                        // never early: aim that much ahead so the delay
                        // averages out to the one configured instead of
                        // adding a millisecond or more per direction. A
                        // datagram queued meanwhile may be due sooner.
                        Some((at, _)) if at > Instant::now() + TIMER_SLACK => {
                            tokio::select! {
                                () = tokio::time::sleep_until((at - TIMER_SLACK).into()) => {}
                                () = line.wake.notified() => {}
                            }
                        }
                        Some((_, destination)) => {
                            let datagram = {
                                let mut queues = lock(&line.queues);
                                let datagram =
                                    queues.get_mut(&destination).and_then(VecDeque::pop_front);
                                if queues.get(&destination).is_some_and(VecDeque::is_empty) {
                                    queues.remove(&destination);
                                }
                                datagram
                            };
                            if let Some(datagram) = datagram {
                                deliver(inner.as_ref(), &datagram).await;
                            }
                        }
                    }
                }
            });
        });
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the queue half-changed
    // (push and pop are single calls), so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn deliver(inner: &dyn AsyncUdpSocket, datagram: &Delayed) {
    let transmit = Transmit {
        destination: datagram.destination,
        ecn: datagram.ecn,
        contents: &datagram.contents,
        segment_size: None,
        src_ip: datagram.src_ip,
    };
    for _ in 0..DELAYED_SEND_ATTEMPTS {
        match inner.try_send(&transmit) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            _ => return,
        }
    }
}

impl AsyncUdpSocket for ShapedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(at) = self
            .links
            .fate(transmit.destination, transmit.contents.len())
        else {
            // Lost on the link: to the sender, a successful send.
            return Ok(());
        };
        let queue_empty = !lock(&self.delayed.queues).contains_key(&transmit.destination);
        if at <= Instant::now() && queue_empty {
            return self.inner.try_send(transmit);
        }
        self.start_delivery();
        lock(&self.delayed.queues)
            .entry(transmit.destination)
            .or_default()
            .push_back(Delayed {
                at,
                destination: transmit.destination,
                ecn: transmit.ecn,
                src_ip: transmit.src_ip,
                contents: transmit.contents.to_vec(),
            });
        self.delayed.wake.notify_one();
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// One datagram per transmit, so each is shaped on its own.
    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::Runtime as _;

    fn receiver() -> (std::net::UdpSocket, SocketAddr) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("binding a receiver");
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("setting a timeout");
        let address = socket.local_addr().expect("the receiver's address");
        (socket, address)
    }

    fn send(socket: &ShapedSocket, destination: SocketAddr, byte: u8) {
        let contents = [byte; 100];
        let transmit = Transmit {
            destination,
            ecn: None,
            contents: &contents,
            segment_size: None,
            src_ip: None,
        };
        socket.try_send(&transmit).expect("sending");
    }

    #[tokio::test]
    async fn a_datagram_to_a_near_site_does_not_wait_behind_a_slow_links_queue() {
        let (far, far_address) = receiver();
        let (near, near_address) = receiver();
        let links = LinkTable::new(1);
        links.set(
            far_address,
            LinkProfile {
                delay_ms: 2000,
                ..LinkProfile::IDEAL
            },
        );
        links.set(
            near_address,
            LinkProfile {
                delay_ms: 1,
                ..LinkProfile::IDEAL
            },
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("binding the sender");
        let inner = quinn::TokioRuntime
            .wrap_udp_socket(udp)
            .expect("wrapping the sender");
        let socket = ShapedSocket::new(inner, links);
        for _ in 0..10 {
            send(&socket, far_address, 1);
        }
        send(&socket, near_address, 2);
        let received = tokio::task::spawn_blocking(move || {
            let mut buffer = [0u8; 200];
            let (bytes, _) = near.recv_from(&mut buffer).expect("the near datagram");
            far.set_nonblocking(true).expect("non-blocking");
            let far_arrived = far.recv_from(&mut [0u8; 200]).is_ok();
            (bytes, buffer[0], far_arrived)
        })
        .await
        .expect("the receiving thread");
        // The near datagram arrived while the far ones still wait out
        // their 2 s (one queue for both would hold it behind them).
        assert_eq!(received, (100, 2, false));
    }
}
