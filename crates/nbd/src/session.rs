//! The transmission phase of one connection.
//!
//! Three kinds of actor share the connection:
//! - the *reader* (this task) parses one request at a time, checks it
//!   against the export and the limits, and either answers it at once or
//!   spawns a task for it;
//! - one *request task* per accepted request calls the export and queues
//!   its reply, so slow requests never hold up fast ones and replies leave
//!   in completion order, not request order (the protocol matches them by
//!   handle);
//! - one *writer* task owns the write half and is the only thing that
//!   writes, so replies never interleave on the wire.
//!
//! A semaphore of `max_in_flight_per_connection` permits bounds the work a
//! client can pile up. The reader takes a permit *before* reading a request
//! and the permit travels with the request and its reply until the reply is
//! written. When all permits are out, the reader stops reading, TCP flow
//! control pushes back on the client, and memory stays bounded at about
//! `max_in_flight × max_request_bytes`.
//!
//! Across connections, payload memory is bounded by a byte budget shared by
//! the whole server: a WRITE takes its length from it before its payload is
//! read, a READ before its data is fetched, and both return it once the
//! reply is written. While the budget is spent the reader waits, exactly as
//! when its permits are out. So that clients who took the budget (and may
//! hold it for as long as they like by sending slowly or not reading
//! replies) cannot starve everyone else, each connection also owns a small
//! reserve ([`CONNECTION_RESERVE_BYTES`]) that small requests draw on when
//! the shared budget is empty.

use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{Instrument, debug, debug_span, error, warn};

use crate::backend::{Export, ExportError};
use crate::protocol::*;
use crate::server::{CONNECTION_RESERVE_BYTES, ServerConfig, ShutdownSignal};
use crate::transmission::{
    BadRequestMagic, Command, RequestHeader, error_code, simple_reply_header,
};

/// Read-side buffer: big enough to parse a burst of pipelined headers with
/// one syscall; large WRITE payloads bypass it.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Write-side buffer, for the same reason in the other direction.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// Most replies the writer coalesces before it flushes, so a steady stream
/// of completions cannot postpone a flush indefinitely.
const MAX_REPLIES_PER_FLUSH: usize = 64;

/// Transmission-phase state for one connection to one export.
pub(crate) struct Session<E> {
    export: Arc<E>,
    /// Snapshotted at the start: the spec fixes the size for the life of
    /// the connection, and the bounds checks must agree with what the
    /// client was told.
    size: u64,
    read_only: bool,
    max_request_bytes: u32,
    /// Total permits of `in_flight`, kept to wait for all of them at the end.
    max_in_flight: u32,
    in_flight: Arc<Semaphore>,
    /// Payload bytes shared by every connection of the server.
    budget: Arc<Semaphore>,
    /// This connection's own payload bytes, used when `budget` is spent.
    reserve: Arc<Semaphore>,
}

/// Why the reader stopped reading requests.
#[derive(Debug)]
enum Stop {
    /// NBD_CMD_DISC: the polite way to end a session.
    Disconnect,
    /// EOF on a request boundary: impolite but unambiguous.
    ClientClosed,
    /// EOF inside a header or payload.
    Truncated,
    Shutdown,
    /// The writer failed, so no reply can be delivered any more.
    WriterGone,
    BadMagic(BadRequestMagic),
    Io(io::Error),
}

impl From<io::Error> for Stop {
    fn from(error: io::Error) -> Self {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            Self::Truncated
        } else {
            Self::Io(error)
        }
    }
}

/// One reply on its way to the writer.
struct Reply {
    handle: u64,
    error: u32,
    /// READ data; only ever present on success.
    data: Option<Bytes>,
    /// Released once the reply has been handed to the socket.
    _permits: Held,
}

/// What a request holds from its header until its reply is on the socket.
struct Held {
    /// One of the connection's `max_in_flight` request permits.
    _request: OwnedSemaphorePermit,
    /// The payload bytes it took (WRITE and READ only).
    _bytes: Option<OwnedSemaphorePermit>,
}

/// What a request task asks of the export: the commands that reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl<E: Export> Session<E> {
    /// `config` must have passed [`ServerConfig::validate`].
    pub fn new(export: Arc<E>, config: &ServerConfig, budget: Arc<Semaphore>) -> Self {
        let max_in_flight = u32::try_from(config.max_in_flight_per_connection).unwrap_or(u32::MAX);
        Self {
            size: export.size(),
            read_only: export.read_only(),
            export,
            max_request_bytes: config.max_request_bytes,
            max_in_flight,
            in_flight: Arc::new(Semaphore::new(max_in_flight as usize)),
            budget,
            reserve: Arc::new(Semaphore::new(CONNECTION_RESERVE_BYTES as usize)),
        }
    }

    /// Takes `length` payload bytes: from the shared budget if it has
    /// room, else from whichever of the budget and (for a request that
    /// fits it) this connection's reserve frees up first. Waits, never
    /// fails: waiting here is the back-pressure.
    async fn take_bytes(&self, length: u32) -> Result<OwnedSemaphorePermit, Stop> {
        // Neither semaphore is ever closed, so acquiring fails only in
        // theory; treat it like shutdown.
        let closed = |_| Stop::Shutdown;
        if let Ok(bytes) = Arc::clone(&self.budget).try_acquire_many_owned(length) {
            return Ok(bytes);
        }
        if length > CONNECTION_RESERVE_BYTES {
            return Arc::clone(&self.budget)
                .acquire_many_owned(length)
                .await
                .map_err(closed);
        }
        tokio::select! {
            bytes = Arc::clone(&self.budget).acquire_many_owned(length) => bytes.map_err(closed),
            bytes = Arc::clone(&self.reserve).acquire_many_owned(length) => bytes.map_err(closed),
        }
    }

    /// Serves requests until the client disconnects, breaks the protocol, or
    /// the server shuts down; then lets every accepted request finish and
    /// its reply go out before returning.
    pub async fn run<R, W>(self, reader: R, writer: W, shutdown: &mut ShutdownSignal)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // Capacity equal to the permit count: every queued reply holds a
        // permit, so the queue can never be full when a reply is sent, and
        // `ReplySlot` can use the non-blocking `try_send`.
        let (replies, queue) = mpsc::channel(self.max_in_flight as usize);
        let writer = tokio::spawn(write_replies(queue, writer).in_current_span());

        let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
        let stop = self.read_requests(&mut reader, &replies, shutdown).await;
        match &stop {
            Stop::Disconnect => debug!("client sent NBD_CMD_DISC"),
            Stop::ClientClosed => debug!("client closed the connection"),
            Stop::Shutdown => debug!("server shutting down; finishing in-flight requests"),
            Stop::WriterGone => debug!("cannot send replies any more; closing"),
            Stop::Truncated => warn!("client closed the connection in the middle of a request"),
            Stop::BadMagic(bad) => warn!(%bad, "protocol violation; closing connection"),
            Stop::Io(error) => warn!(%error, "read error; closing connection"),
        }
        // The writer ends once the last sender is gone, i.e. once every
        // request task has queued its reply.
        drop(replies);
        if let Err(error) = writer.await {
            error!(%error, "reply writer task failed");
        }
        // If the writer ended early (client gone), request tasks may still be
        // running against the export. Holding every permit means they are
        // all done, so the server never returns with export calls pending.
        if let Err(error) = self.in_flight.acquire_many(self.max_in_flight).await {
            error!(%error, "in-flight semaphore closed unexpectedly");
        }
    }

    async fn read_requests<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
        replies: &mpsc::Sender<Reply>,
        shutdown: &mut ShutdownSignal,
    ) -> Stop {
        loop {
            let next = async {
                // Waiting for a permit *before* reading is the backpressure.
                let permit = self
                    .in_flight
                    .clone()
                    .acquire_owned()
                    .await
                    // Only a closed semaphore fails, and this one never is.
                    .map_err(|_| Stop::Shutdown)?;
                let Some(raw) = read_header(reader).await? else {
                    return Err(Stop::ClientClosed);
                };
                let header = RequestHeader::parse(&raw).map_err(Stop::BadMagic)?;
                self.dispatch(header, permit, reader, replies).await
            };
            // Shutdown or a dead writer may interrupt a request half read;
            // that is fine because we never read from this stream again.
            let step = tokio::select! {
                biased;
                () = shutdown.wait() => Err(Stop::Shutdown),
                () = replies.closed() => Err(Stop::WriterGone),
                step = next => step,
            };
            if let Err(stop) = step {
                return stop;
            }
        }
    }

    /// Handles one parsed request: answers it directly if it is invalid or
    /// trivial, otherwise reads its payload and spawns a task for it.
    /// `Err` means stop reading.
    async fn dispatch<R: AsyncRead + Unpin>(
        &self,
        header: RequestHeader,
        permit: OwnedSemaphorePermit,
        reader: &mut R,
        replies: &mpsc::Sender<Reply>,
    ) -> Result<(), Stop> {
        let span = debug_span!(
            "nbd_request",
            cmd = header.command.name(),
            offset = header.offset,
            length = header.length,
            handle = header.handle,
        );
        async {
            let operation = match header.command {
                Command::Disc => return Err(Stop::Disconnect),
                Command::Read => Operation::Read,
                Command::Write => Operation::Write,
                Command::Flush => Operation::Flush,
                Command::Trim => Operation::Trim,
                Command::WriteZeroes => Operation::WriteZeroes,
                Command::Unknown(kind) => {
                    // Without a known layout we cannot tell whether a
                    // payload follows; the spec only defines payloads for
                    // WRITE, so assume none and carry on.
                    debug!(kind, "unknown command");
                    ReplySlot::new(header.handle, replies, Held::request(permit))
                        .finish(NBD_EINVAL, None);
                    return Ok(());
                }
            };
            if let Some(code) = self.refusal(&header, operation) {
                debug!(error = code, flags = header.flags, "request refused");
                if operation == Operation::Write {
                    // The payload follows the header however bad the
                    // request is; skip it so the next header is read from
                    // the right place.
                    discard(reader, header.length).await?;
                }
                ReplySlot::new(header.handle, replies, Held::request(permit)).finish(code, None);
                return Ok(());
            }
            if header.length == 0 && operation != Operation::Flush {
                // Nothing to do, and exports are promised non-empty ranges.
                ReplySlot::new(header.handle, replies, Held::request(permit))
                    .finish(NBD_SUCCESS, None);
                return Ok(());
            }
            // Bytes come from the budget before the payload is read (WRITE)
            // or the data is fetched (READ); `refusal` capped the length.
            let bytes = match operation {
                Operation::Read | Operation::Write => Some(self.take_bytes(header.length).await?),
                Operation::Flush | Operation::Trim | Operation::WriteZeroes => None,
            };
            let payload = if operation == Operation::Write {
                read_payload(reader, header.length).await?
            } else {
                Bytes::new()
            };
            let held = Held {
                _request: permit,
                _bytes: bytes,
            };
            let slot = ReplySlot::new(header.handle, replies, held);
            let export = Arc::clone(&self.export);
            let max = self.max_request_bytes;
            tokio::spawn(
                async move {
                    match perform(&*export, &header, operation, payload, max).await {
                        Ok(data) => slot.finish(NBD_SUCCESS, data),
                        Err(error) => {
                            if matches!(error, ExportError::Io(_)) {
                                warn!(%error, "export failed the request");
                            } else {
                                debug!(%error, "export refused the request");
                            }
                            slot.finish(error_code(&error), None);
                        }
                    }
                }
                .in_current_span(),
            );
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// The NBD error for a request that must not reach the export, if any.
    /// The order follows the spec's preferences: malformed before
    /// forbidden before out of range.
    fn refusal(&self, h: &RequestHeader, operation: Operation) -> Option<u32> {
        use Operation::*;
        if !h.flags_valid() {
            return Some(NBD_EINVAL);
        }
        // Only commands that carry data are bound by the maximum block
        // size; TRIM and WRITE_ZEROES may legitimately be larger (qemu
        // sends discards up to 2 GiB) and are split into chunks instead.
        if matches!(operation, Read | Write) && h.length > self.max_request_bytes {
            return Some(NBD_EINVAL);
        }
        if matches!(operation, Write | Trim | WriteZeroes) && self.read_only {
            return Some(NBD_EPERM);
        }
        if operation != Flush && !h.in_bounds(self.size) {
            // A write past the end is "no space"; anything else is simply
            // an invalid range.
            return Some(if operation == Write {
                NBD_ENOSPC
            } else {
                NBD_EINVAL
            });
        }
        None
    }
}

/// Runs one validated request against the export. Returns READ data on
/// success.
async fn perform<E: Export>(
    export: &E,
    h: &RequestHeader,
    operation: Operation,
    payload: Bytes,
    max_request_bytes: u32,
) -> Result<Option<Bytes>, ExportError> {
    let (offset, length, fua) = (h.offset, h.length, h.fua());
    match operation {
        Operation::Read => {
            let data = export.read(offset, length).await?;
            // A short or long buffer would desynchronise the client, which
            // reads exactly `length` bytes after the reply header.
            if data.len() != length as usize {
                error!(
                    returned = data.len(),
                    "export returned a read of the wrong length"
                );
                return Err(ExportError::Io(
                    "export returned a read of the wrong length".into(),
                ));
            }
            Ok(Some(data))
        }
        Operation::Write => export.write(offset, payload, fua).await.map(|()| None),
        Operation::Flush => export.flush().await.map(|()| None),
        Operation::Trim => in_chunks(offset, length, max_request_bytes, |o, n| {
            export.trim(o, n, fua)
        })
        .await
        .map(|()| None),
        Operation::WriteZeroes => in_chunks(offset, length, max_request_bytes, |o, n| {
            export.write_zeroes(o, n, fua)
        })
        .await
        .map(|()| None),
    }
}

/// Calls `op` on consecutive pieces of at most `max` bytes covering
/// `offset..offset+length`, stopping at the first error. Keeps the export's
/// promise that no call exceeds the maximum request size.
async fn in_chunks<F, Fut>(offset: u64, length: u32, max: u32, mut op: F) -> Result<(), ExportError>
where
    F: FnMut(u64, u32) -> Fut,
    Fut: Future<Output = Result<(), ExportError>>,
{
    let mut done = 0u32;
    while done < length {
        let piece = (length - done).min(max);
        op(offset + u64::from(done), piece).await?;
        done += piece;
    }
    Ok(())
}

/// The duty to answer one request exactly once.
///
/// If it is dropped unanswered (in practice: the export's future panicked
/// and unwound the request task) it answers EIO, so a misbehaving export
/// cannot leave the client waiting forever on a handle.
struct ReplySlot {
    pending: Option<(u64, mpsc::Sender<Reply>, Held)>,
}

impl Held {
    /// A request without payload bytes.
    fn request(permit: OwnedSemaphorePermit) -> Self {
        Self {
            _request: permit,
            _bytes: None,
        }
    }
}

impl ReplySlot {
    fn new(handle: u64, replies: &mpsc::Sender<Reply>, held: Held) -> Self {
        Self {
            pending: Some((handle, replies.clone(), held)),
        }
    }

    fn finish(mut self, error: u32, data: Option<Bytes>) {
        self.send(error, data);
    }

    fn send(&mut self, error: u32, data: Option<Bytes>) {
        let Some((handle, replies, held)) = self.pending.take() else {
            return;
        };
        let reply = Reply {
            handle,
            error,
            data,
            _permits: held,
        };
        match replies.try_send(reply) {
            Ok(()) => {}
            // The writer is gone, so is the client: nobody to tell.
            Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => {
                error!(
                    handle,
                    "reply queue full, which the permit count rules out; reply lost"
                )
            }
        }
    }
}

impl Drop for ReplySlot {
    fn drop(&mut self) {
        if let Some((handle, ..)) = &self.pending {
            error!(
                handle,
                "request ended without a reply (export panicked?); answering EIO"
            );
            self.send(NBD_EIO, None);
        }
    }
}

/// Writes replies in the order they complete, coalescing whatever is queued
/// into one flush. Returns when every sender is gone or the socket fails.
async fn write_replies<W: AsyncWrite + Unpin>(mut queue: mpsc::Receiver<Reply>, writer: W) {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, writer);
    while let Some(first) = queue.recv().await {
        let mut next = Some(first);
        let mut written = 0;
        while let Some(reply) = next.take() {
            if let Err(error) = write_reply(&mut out, &reply).await {
                debug!(%error, "writing reply failed");
                return;
            }
            written += 1;
            if written < MAX_REPLIES_PER_FLUSH {
                next = queue.try_recv().ok();
            }
        }
        if let Err(error) = out.flush().await {
            debug!(%error, "flushing replies failed");
            return;
        }
    }
    // Every request has been answered; a clean FIN tells the client so.
    if let Err(error) = out.shutdown().await {
        debug!(%error, "shutting down the socket failed");
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(out: &mut W, reply: &Reply) -> io::Result<()> {
    out.write_all(&simple_reply_header(reply.handle, reply.error))
        .await?;
    if let Some(data) = &reply.data {
        out.write_all(data).await?;
    }
    Ok(())
}

/// Reads the next request header; `None` on a clean EOF before its first
/// byte, an `UnexpectedEof` error on EOF inside it.
async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> io::Result<Option<[u8; REQUEST_HEADER_LEN]>> {
    let mut buf = [0u8; REQUEST_HEADER_LEN];
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        filled += n;
    }
    Ok(Some(buf))
}

/// Reads a WRITE payload whose length has already been checked against
/// `max_request_bytes`.
async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, length: u32) -> io::Result<Bytes> {
    // Filled straight from the socket: zeroing it first would touch every
    // byte of a large write twice.
    let length = length as usize;
    let mut buf = BytesMut::with_capacity(length);
    while buf.len() < length {
        let mut limited = (&mut *reader).take((length - buf.len()) as u64);
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

/// Skips `length` bytes of a refused WRITE's payload through a small fixed
/// buffer, so even a 4 GiB bogus length costs no memory.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, length: u32) -> io::Result<()> {
    let wanted = u64::from(length);
    let skipped = tokio::io::copy(&mut (&mut *reader).take(wanted), &mut tokio::io::sink()).await?;
    if skipped < wanted {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
