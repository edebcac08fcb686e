//! Messages on a QUIC stream: one frame after another (see stretch-wire).
//! A frame that is oversized, cut short or malformed ends the stream with
//! an error; the caller logs it, counts it and closes that stream only.
//!
//! A frame's 4-byte header announces up to [`FRAME_BYTES_MAX`] bytes, and
//! a peer may open many streams at once, so a header alone must not make a
//! node allocate what it announces. Two rules bound what a connection
//! costs:
//! - a frame's buffer grows as its bytes arrive, never ahead of them;
//! - every frame being received first reserves its announced length from
//!   its connection's [`FrameBudget`]; a frame that does not fit waits,
//!   leaving its bytes in QUIC's flow-control window (bounded by the
//!   transport config), so the peer is slowed down, not served.
//!
//! A frame that waits while nothing on its connection makes progress for
//! [`FRAME_STALL_TIMEOUT`] ends with [`FrameError::Stalled`]: either the
//! peer announced frames it does not send, or the frames holding the budget
//! wait for bytes stuck behind the waiting ones. The caller then closes the
//! connection; both sides reconnect and resume from what the engine kept,
//! as after any lost connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stretch_wire::{
    ArchiveBuffer, FRAME_BYTES_MAX, FrameParts, PeerMessage, WireError, decode_archive,
    encode_frame_parts, frame_length,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Bytes of frames one connection may have partly received at once: three
/// frames of the largest size, so a few large deltas and read replies
/// arrive side by side.
pub const CONNECTION_FRAME_BUDGET_BYTES: usize = 3 * FRAME_BYTES_MAX as usize;
/// Largest hello: names of at most a few hundred bytes. Anything before the
/// hello is checked is held to this, not to a frame of the largest size.
pub const HELLO_BYTES_MAX: usize = 4096;
/// How long a frame may wait for budget while no frame of its connection
/// receives a byte. Longer than a peer is allowed to stay silent (its
/// connection times out first when the link is down).
pub const FRAME_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// First allocation for a frame's bytes; it then doubles as they arrive.
const FIRST_CHUNK_BYTES: usize = 64 << 10;
/// Bytes of the length prefix.
const HEADER_BYTES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("frame of {length} bytes is over this connection's budget of {budget} bytes")]
    OverBudget { length: usize, budget: usize },
    #[error(
        "a frame of {length} bytes waited {waited:?} for buffer room while no frame on its connection made progress"
    )]
    Stalled { length: usize, waited: Duration },
}

/// The bytes one connection may hold for frames being received; clones
/// share the budget.
#[derive(Debug, Clone)]
pub struct FrameBudget {
    inner: Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    bytes: usize,
    semaphore: Semaphore,
    stall: Duration,
    created: Instant,
    /// When a frame of this budget last received bytes (ms after `created`).
    progress_ms: AtomicU64,
}

impl FrameBudget {
    /// A budget of `bytes`, with the default [`FRAME_STALL_TIMEOUT`].
    pub fn new(bytes: usize) -> Self {
        Self::with_stall_timeout(bytes, FRAME_STALL_TIMEOUT)
    }

    pub fn with_stall_timeout(bytes: usize, stall: Duration) -> Self {
        let bytes = bytes.min(Semaphore::MAX_PERMITS);
        FrameBudget {
            inner: Arc::new(BudgetInner {
                bytes,
                semaphore: Semaphore::new(bytes),
                stall,
                created: Instant::now(),
                progress_ms: AtomicU64::new(0),
            }),
        }
    }

    /// The budget of one peer connection after its hello.
    pub fn per_connection() -> Self {
        Self::new(CONNECTION_FRAME_BUDGET_BYTES)
    }

    /// The budget for reading a hello: one small frame.
    pub fn hello() -> Self {
        Self::new(HELLO_BYTES_MAX)
    }

    /// Bytes not reserved by a frame being received now.
    pub fn available(&self) -> usize {
        self.inner.semaphore.available_permits()
    }

    fn mark_progress(&self) {
        let elapsed = self.inner.created.elapsed().as_millis();
        self.inner.progress_ms.store(
            u64::try_from(elapsed).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn last_progress(&self) -> Instant {
        let elapsed = Duration::from_millis(self.inner.progress_ms.load(Ordering::Relaxed));
        self.inner.created + elapsed
    }

    /// Reserves `length` bytes for one frame, waiting while other frames
    /// of the connection hold the budget and make progress.
    async fn reserve(&self, length: usize) -> Result<SemaphorePermit<'_>, FrameError> {
        let over = || FrameError::OverBudget {
            length,
            budget: self.inner.bytes,
        };
        if length > self.inner.bytes {
            return Err(over());
        }
        let permits = u32::try_from(length).map_err(|_| over())?;
        if let Ok(permit) = self.inner.semaphore.try_acquire_many(permits) {
            return Ok(permit);
        }
        let started = Instant::now();
        let acquire = self.inner.semaphore.acquire_many(permits);
        tokio::pin!(acquire);
        let tick = (self.inner.stall / 4).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                permit = &mut acquire => {
                    // The semaphore is never closed; were it, no frame of
                    // this connection could be read any more.
                    return permit.map_err(|_| FrameError::Stalled {
                        length,
                        waited: started.elapsed(),
                    });
                }
                () = tokio::time::sleep(tick) => {
                    let quiet_since = self.last_progress().max(started);
                    if quiet_since.elapsed() >= self.inner.stall {
                        return Err(FrameError::Stalled {
                            length,
                            waited: started.elapsed(),
                        });
                    }
                }
            }
        }
    }
}

/// Writes one message as a frame. A message the peer would refuse (see
/// [`stretch_wire::encode_frame`]) is not sent: the error leaves the stream
/// as it was.
pub async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &PeerMessage,
) -> Result<(), FrameError> {
    let frame = encode_frame_parts(message)?;
    write_frame(writer, &frame).await
}

/// Writes an encoded frame: its prefix, then its archive (not copied
/// behind the prefix first).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &FrameParts,
) -> Result<(), FrameError> {
    writer.write_all(&frame.header).await?;
    writer.write_all(&frame.archive).await?;
    Ok(())
}

/// Reads the next message on a stream of its own (one frame of at most
/// [`FRAME_BYTES_MAX`] at a time); `Ok(None)` at a clean end of stream.
/// Streams of a peer connection use [`read_message_within`] with the
/// connection's budget.
pub async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<PeerMessage>, FrameError> {
    read_message_within(reader, &FrameBudget::new(FRAME_BYTES_MAX as usize)).await
}

/// Reads the next message; `Ok(None)` at a clean end of stream (between
/// frames). The length is checked, then reserved from `budget`, before the
/// body is read, and the body's buffer grows only as its bytes arrive
/// (doubling: at most twice what arrived). The body lands in the aligned
/// buffer the archive is validated and decoded from, not in another one
/// first.
pub async fn read_message_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    budget: &FrameBudget,
) -> Result<Option<PeerMessage>, FrameError> {
    let mut header = [0u8; HEADER_BYTES];
    let mut filled = 0;
    while filled < header.len() {
        let read = reader.read(&mut header[filled..]).await?;
        if read == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(WireError::Truncated {
                have: filled,
                need: header.len(),
            }
            .into());
        }
        filled += read;
    }
    let length = frame_length(header)?;
    let _reserved = budget.reserve(length).await?;
    let mut archive = ArchiveBuffer::new();
    let mut filled = 0;
    while filled < length {
        if filled == archive.len() {
            // Zeroed once as it grows (the reads then land in place).
            let grow = archive
                .len()
                .max(FIRST_CHUNK_BYTES)
                .min(length - archive.len());
            archive.reserve_exact(grow);
            archive.resize(archive.len() + grow, 0);
        }
        let read = reader.read(&mut archive.as_mut_slice()[filled..]).await?;
        if read == 0 {
            return Err(WireError::Truncated {
                have: filled,
                need: length,
            }
            .into());
        }
        filled += read;
        budget.mark_progress();
    }
    Ok(Some(decode_archive(&archive)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stretch_wire::encode_frame;

    fn run<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    #[test]
    fn a_message_the_peer_would_refuse_is_not_written() {
        run(async {
            let mut stream = Vec::new();
            let refused = PeerMessage::ReadRequest {
                id: 1,
                volume: 1,
                offset: 0,
                length: 0,
                have: None,
            };
            let error = write_message(&mut stream, &refused).await;
            assert!(
                matches!(error, Err(FrameError::Wire(WireError::Invalid(_)))),
                "{error:?}"
            );
            assert!(stream.is_empty());
            let journaled = PeerMessage::Journaled { group: 1, seq: 2 };
            write_message(&mut stream, &journaled).await.expect("write");
            write_message(&mut stream, &journaled).await.expect("write");
            let mut reader = stream.as_slice();
            for _ in 0..2 {
                let read = read_message(&mut reader).await.expect("read");
                assert_eq!(read, Some(journaled.clone()));
            }
            assert_eq!(read_message(&mut reader).await.expect("end"), None);
        });
    }

    /// A frame larger than the first chunk of its buffer, whose body
    /// arrives in pieces of a few hundred bytes: it lands whole as the
    /// buffer grows, and one cut short says how much arrived.
    #[test]
    fn a_large_frame_arriving_in_small_pieces_reads_back_whole() {
        let body: Vec<u8> = (0..FIRST_CHUNK_BYTES as u32 * 3 + 777)
            .map(|index| (index % 251) as u8)
            .collect();
        let message = PeerMessage::RaftRequest { request: 7, body };
        let frame = encode_frame(&message).expect("a valid request");
        assert!(frame.len() > 2 * FIRST_CHUNK_BYTES + HEADER_BYTES);
        run(async {
            let (mut peer, mut stream) = tokio::io::duplex(300);
            let sent = frame.clone();
            let writer = tokio::spawn(async move {
                peer.write_all(&sent).await.expect("write");
                peer
            });
            let read = read_message(&mut stream).await.expect("read");
            assert_eq!(read, Some(message.clone()));
            drop(writer.await.expect("writer"));

            let (mut peer, mut stream) = tokio::io::duplex(300);
            let cut = frame.len() - 1000;
            let sent = frame[..cut].to_vec();
            tokio::spawn(async move {
                peer.write_all(&sent).await.expect("write");
            });
            let error = read_message(&mut stream).await;
            assert!(
                matches!(&error, Err(FrameError::Wire(WireError::Truncated { have, need }))
                    if *have == cut - HEADER_BYTES && *need == frame.len() - HEADER_BYTES),
                "{error:?}"
            );
        });
    }

    #[test]
    fn the_largest_hello_fits_the_hello_budget() {
        let name = "n".repeat(stretch_wire::NAME_BYTES_MAX);
        let hello = PeerMessage::Hello {
            protocol: stretch_wire::PROTOCOL_VERSION,
            cluster: name.clone(),
            node: name.clone(),
            site: name,
        };
        let frame = encode_frame(&hello).expect("a valid hello");
        assert!(
            frame.len() - HEADER_BYTES <= HELLO_BYTES_MAX,
            "{}",
            frame.len()
        );
        run(async {
            let mut reader = frame.as_slice();
            let read = read_message_within(&mut reader, &FrameBudget::hello()).await;
            assert_eq!(read.expect("read"), Some(hello));
        });
    }

    #[test]
    fn a_frame_over_the_budget_is_refused_before_its_body_is_read() {
        run(async {
            // A header announcing the largest frame, and nothing behind it.
            let header = FRAME_BYTES_MAX.to_le_bytes();
            let mut reader = &header[..];
            let error = read_message_within(&mut reader, &FrameBudget::hello()).await;
            assert!(
                matches!(error, Err(FrameError::OverBudget { length, budget })
                    if length == FRAME_BYTES_MAX as usize && budget == HELLO_BYTES_MAX),
                "{error:?}"
            );
        });
    }

    #[test]
    fn frames_wait_for_budget_and_a_stalled_wait_ends() {
        run(async {
            let budget = FrameBudget::with_stall_timeout(1 << 20, Duration::from_millis(200));
            // A peer announces 1 MiB on one stream and sends 10 bytes of it.
            let (mut holder_peer, mut holder) = tokio::io::duplex(64);
            holder_peer
                .write_all(&(1u32 << 20).to_le_bytes())
                .await
                .expect("header");
            holder_peer.write_all(&[0; 10]).await.expect("body");
            let holding = budget.clone();
            let held = tokio::spawn(async move {
                let result = read_message_within(&mut holder, &holding).await;
                drop(holder_peer);
                result.map(|_| ())
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(
                budget.available(),
                0,
                "the announced frame holds the budget"
            );
            // A second frame waits, then gives up: nothing made progress.
            let journaled = PeerMessage::Journaled { group: 1, seq: 2 };
            let mut stream = Vec::new();
            write_message(&mut stream, &journaled).await.expect("write");
            let mut reader = stream.as_slice();
            let started = Instant::now();
            let error = read_message_within(&mut reader, &budget).await;
            assert!(
                matches!(error, Err(FrameError::Stalled { .. })),
                "{error:?}"
            );
            assert!(started.elapsed() >= Duration::from_millis(200));
            held.abort();
            let _ = held.await;
            // Once the holder is gone its bytes are free again.
            assert_eq!(budget.available(), 1 << 20);
            let mut reader = stream.as_slice();
            let read = read_message_within(&mut reader, &budget).await;
            assert_eq!(read.expect("read"), Some(journaled));
        });
    }
}
