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
    /// Datagrams waiting out their delay, in the order they were sent. One
    /// task delivers them in that order: a datagram per task, each racing
    /// for the socket, would reorder a burst, and QUIC takes reordering
    /// for loss and shrinks its window to a crawl.
    delayed: Arc<DelayLine>,
}

struct DelayLine {
    queue: std::sync::Mutex<VecDeque<Delayed>>,
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
                queue: std::sync::Mutex::new(VecDeque::new()),
                wake: Notify::new(),
                started: std::sync::Once::new(),
            }),
        }
    }

    /// The delivery task: sends each datagram once its time came, in
    /// queue order. It ends when the socket is dropped.
    fn start_delivery(&self) {
        let line = Arc::downgrade(&self.delayed);
        let inner = self.inner.clone();
        self.delayed.started.call_once(|| {
            tokio::spawn(async move {
                loop {
                    let Some(line) = line.upgrade() else {
                        return;
                    };
                    let head = lock(&line.queue).front().map(|datagram| datagram.at);
                    match head {
                        None => line.wake.notified().await,
                        // The timer wheel has 1 ms slots and wakes late,
                        // never early: aim that much ahead so the delay
                        // averages out to the one configured instead of
                        // adding a millisecond or more per direction.
                        Some(at) if at > Instant::now() + TIMER_SLACK => {
                            tokio::time::sleep_until((at - TIMER_SLACK).into()).await;
                        }
                        Some(_) => {
                            let Some(datagram) = lock(&line.queue).pop_front() else {
                                continue;
                            };
                            deliver(inner.as_ref(), &datagram).await;
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
        let queue_empty = lock(&self.delayed.queue).is_empty();
        if at <= Instant::now() && queue_empty {
            return self.inner.try_send(transmit);
        }
        self.start_delivery();
        lock(&self.delayed.queue).push_back(Delayed {
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
