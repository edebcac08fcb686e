//! The accept loop, graceful shutdown, and the per-connection driver that
//! runs the handshake and then the transmission session.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, Span, debug, error, field, info, warn, warn_span};

use crate::backend::{Backend, Export};
use crate::handshake::{Handshake, Negotiated, PREFERRED_BLOCK_SIZE};
use crate::session::Session;
use crate::tls::{Conn, TlsSettings};

/// Default largest READ or WRITE payload: 32 MiB, the same limit qemu's
/// client uses, so qemu never has to split differently because of us.
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 32 * 1024 * 1024;
/// Default number of requests one connection may have outstanding.
pub const DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION: usize = 128;
/// Default bound on one handshake option's payload. The largest legitimate
/// option is NBD_OPT_GO with a 4 KiB name and a few info requests.
pub const DEFAULT_MAX_OPTION_BYTES: u32 = 64 * 1024;

/// Default bound on connections served at once (handshake or transmission).
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default bound, in bytes, on READ and WRITE payloads held in memory by
/// all connections together (see [`ServerConfig::max_in_flight_bytes`]).
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: u64 = 1 << 30;
/// Payload bytes every connection may hold beyond the shared budget, so a
/// few clients that took the whole budget (slow writers, readers that stop
/// reading replies) cannot stop the others: each connection can always
/// make progress with requests up to this size. 256 KiB: a QD64 burst of
/// 4 KiB requests, or one request of the sizes hypervisors use for
/// ordinary guest I/O.
pub const CONNECTION_RESERVE_BYTES: u32 = 256 * 1024;

/// Default time connections get to finish once shutdown begins.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// After a failed `accept` (typically EMFILE), wait this long before trying
/// again rather than spinning while file descriptors are exhausted.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Limits applied to every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest READ or WRITE payload; advertised as the maximum block size
    /// and also the largest single call an export receives. Must be at
    /// least 4096 (the advertised preferred block size).
    pub max_request_bytes: u32,
    /// Requests one connection may have outstanding before the server stops
    /// reading from it. Together with `max_request_bytes` this bounds a
    /// connection's buffer memory. Must be at least 1.
    pub max_in_flight_per_connection: usize,
    /// Largest handshake option payload accepted; a client sending more is
    /// disconnected before anything is allocated for it.
    pub max_option_bytes: u32,
    /// Connections served at once. Once reached the server stops
    /// accepting: further clients wait in the listen backlog (their
    /// connect succeeds, the greeting comes when a slot frees up) instead
    /// of being refused. Must be at least 1.
    pub max_connections: usize,
    /// READ and WRITE payload bytes held in memory by all connections
    /// together. A WRITE takes its length from this budget before its
    /// payload is read and a READ before its data is fetched; both give it
    /// back once the reply is on the socket. While the budget is spent,
    /// connections stop reading (TCP pushes back on the clients), and
    /// nothing fails. Each connection also has [`CONNECTION_RESERVE_BYTES`]
    /// of its own, so the payload memory of the server is at most
    /// `max_in_flight_bytes + max_connections × CONNECTION_RESERVE_BYTES`.
    /// Must be at least `max_request_bytes`.
    pub max_in_flight_bytes: u64,
    /// Once shutdown begins, how long connections get to finish their
    /// requests and deliver the replies; then they are closed, so a client
    /// that stopped reading cannot hold the server open. Requests cut off
    /// this way were never acknowledged.
    pub shutdown_grace: Duration,
    /// NBD_OPT_STARTTLS: `None` refuses it (plain only); otherwise the
    /// certificate to present and whether plain clients are refused.
    pub tls: Option<TlsSettings>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_in_flight_per_connection: DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION,
            max_option_bytes: DEFAULT_MAX_OPTION_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Rejects limits the protocol or the server cannot honour.
    pub fn validate(&self) -> io::Result<()> {
        let invalid = |why: String| Err(io::Error::new(io::ErrorKind::InvalidInput, why));
        if self.max_request_bytes < PREFERRED_BLOCK_SIZE {
            // The spec wants the maximum block size to be at least the
            // preferred one.
            return invalid(format!(
                "max_request_bytes {} is below the {PREFERRED_BLOCK_SIZE}-byte preferred block size",
                self.max_request_bytes
            ));
        }
        // The bound comes from `Semaphore::acquire_many`, which takes a u32.
        let max_in_flight = u32::MAX as usize;
        if self.max_in_flight_per_connection == 0
            || self.max_in_flight_per_connection > max_in_flight.min(Semaphore::MAX_PERMITS)
        {
            return invalid(format!(
                "max_in_flight_per_connection {} is out of range",
                self.max_in_flight_per_connection
            ));
        }
        if self.max_connections == 0 || self.max_connections > Semaphore::MAX_PERMITS {
            return invalid(format!(
                "max_connections {} is out of range",
                self.max_connections
            ));
        }
        // A request larger than the whole budget could never be admitted.
        if self.max_in_flight_bytes < u64::from(self.max_request_bytes)
            || self.max_in_flight_bytes > Semaphore::MAX_PERMITS as u64
        {
            return invalid(format!(
                "max_in_flight_bytes {} must be between max_request_bytes ({}) and {}",
                self.max_in_flight_bytes,
                self.max_request_bytes,
                Semaphore::MAX_PERMITS
            ));
        }
        Ok(())
    }
}

/// Serves NBD on `listener` until `shutdown` completes.
///
/// Each accepted connection gets its own task. On shutdown the listener is
/// closed at once, every connection stops reading new requests (and any
/// connection still negotiating is dropped), requests already accepted run
/// to completion and their replies are sent, and only then does this
/// function return.
///
/// At most `config.max_connections` connections are served at once; the
/// next client is accepted when one ends. All connections share one budget
/// of `config.max_in_flight_bytes` payload bytes.
///
/// Errors only if `config` is invalid; failures of individual connections,
/// and of `accept`, are logged and do not stop the server.
pub async fn serve<B: Backend>(
    listener: TcpListener,
    backend: Arc<B>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    config.validate()?;
    // `validate` checked both fit a semaphore.
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let budget = Arc::new(Semaphore::new(config.max_in_flight_bytes as usize));
    let config = Arc::new(config);
    let (stop, stopped) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    let mut connections = JoinSet::new();
    info!(
        local = ?listener.local_addr().ok(),
        max_connections = config.max_connections,
        max_in_flight_bytes = config.max_in_flight_bytes,
        "NBD server listening"
    );
    let mut at_limit_logged = false;

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = accept_with_slot(&listener, &slots, &mut at_limit_logged) => match accepted {
                Ok(((stream, peer), slot)) => {
                    let limits = ConnectionLimits {
                        budget: Arc::clone(&budget),
                        _slot: slot,
                    };
                    connections.spawn(handle_connection(
                        stream,
                        peer,
                        Arc::clone(&backend),
                        Arc::clone(&config),
                        limits,
                        ShutdownSignal(stopped.clone()),
                    ));
                }
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reap finished connections so the set does not grow forever.
            Some(finished) = connections.join_next(), if !connections.is_empty() => {
                log_connection_end(finished);
            }
        }
    }

    drop(listener);
    info!(
        connections = connections.len(),
        "NBD server shutting down; draining connections"
    );
    // Sending fails only if no receiver exists, i.e. no connection to tell.
    let _ = stop.send(true);
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while let Some(finished) = connections.join_next().await {
            log_connection_end(finished);
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = connections.len(),
            grace = ?config.shutdown_grace,
            "connections still busy after the shutdown grace; closing them"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    info!("NBD server stopped");
    Ok(())
}

/// Serves one already-connected client over any byte stream (a Unix
/// socket, an in-memory pipe): the handshake, then transmission until the
/// client disconnects, breaks the protocol, or closes the stream. The same
/// parsing and validation as [`serve`], without its connection limits and
/// shutdown: the call returns when the connection ends.
///
/// Errors only if `config` is invalid; a misbehaving client is logged and
/// ends the connection, as in [`serve`].
pub async fn serve_stream<S, B>(stream: S, backend: Arc<B>, config: ServerConfig) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    config.validate()?;
    let mut conn = Conn::Plain(stream);
    let negotiated = Handshake::new(&mut conn, &*backend, &config).run().await;
    let export = match negotiated {
        Ok(Negotiated::Export { export, .. }) => export,
        Ok(Negotiated::Aborted) => return Ok(()),
        Err(error) => {
            warn!(%error, "handshake failed; closing connection");
            return Ok(());
        }
    };
    let budget = Arc::new(Semaphore::new(config.max_in_flight_bytes as usize));
    // Never signalled: this connection ends only when its client does. The
    // sender must outlive the session, which reads a dropped one as a stop.
    let (_never_stop, stopped) = watch::channel(false);
    let session = Session::new(export, &config, budget);
    let mut shutdown = ShutdownSignal(stopped);
    match conn {
        Conn::Plain(stream) => {
            let (reader, writer) = tokio::io::split(stream);
            session.run(reader, writer, &mut shutdown).await;
        }
        Conn::Tls(stream) => {
            let (reader, writer) = tokio::io::split(*stream);
            session.run(reader, writer, &mut shutdown).await;
        }
        // A negotiation that lost its stream cannot have succeeded.
        Conn::Lost => {}
    }
    Ok(())
}

/// Takes a connection slot, then accepts. The slot comes *before* the
/// accept: at the limit the server simply stops accepting, and new clients
/// wait in the listen backlog rather than being refused. Cancel-safe (a
/// slot taken by a dropped call is released), so it can sit in a `select!`
/// that loops. `limit_logged` keeps the warning to once per episode.
async fn accept_with_slot(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    limit_logged: &mut bool,
) -> io::Result<((TcpStream, SocketAddr), OwnedSemaphorePermit)> {
    let slot = match Arc::clone(slots).try_acquire_owned() {
        Ok(slot) => {
            *limit_logged = false;
            slot
        }
        Err(_) => {
            if !*limit_logged {
                warn!("NBD connection limit reached; new clients wait until a connection ends");
                *limit_logged = true;
            }
            Arc::clone(slots)
                .acquire_owned()
                .await
                .map_err(|_| io::Error::other("connection slots closed"))?
        }
    };
    Ok((listener.accept().await?, slot))
}

fn log_connection_end(finished: Result<(), tokio::task::JoinError>) {
    if let Err(error) = finished {
        error!(%error, "connection task failed");
    }
}

/// What one connection holds of the server-wide limits.
pub(crate) struct ConnectionLimits {
    /// The shared payload byte budget.
    pub budget: Arc<Semaphore>,
    /// The connection's slot under `max_connections`, freed when the
    /// connection task ends.
    _slot: OwnedSemaphorePermit,
}

/// Tells connection tasks that the server is shutting down.
#[derive(Debug, Clone)]
pub(crate) struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    /// Completes once shutdown has begun. Cancel-safe, so it can sit in a
    /// `select!` that loops.
    pub async fn wait(&mut self) {
        // An error means the server future itself was dropped: also a stop.
        let _ = self.0.wait_for(|stopping| *stopping).await;
    }
}

/// Drives one connection: handshake, then transmission until either side
/// ends it. Everything is logged inside a span naming the peer and, once
/// known, the export.
async fn handle_connection<B: Backend>(
    stream: TcpStream,
    peer: SocketAddr,
    backend: Arc<B>,
    config: Arc<ServerConfig>,
    limits: ConnectionLimits,
    mut shutdown: ShutdownSignal,
) {
    // WARN level, not INFO: a span is only recorded when its level is
    // enabled, and the warnings below are exactly what an operator running
    // at `warn` needs the peer address and export name for.
    let span = warn_span!("nbd_conn", %peer, export = field::Empty);
    async move {
        debug!("connection accepted");
        // Replies are small and latency-bound; Nagle would hold them back
        // until the previous segment is acknowledged.
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%error, "cannot set TCP_NODELAY");
        }
        let mut conn = Conn::Plain(stream);
        let negotiated = tokio::select! {
            biased;
            () = shutdown.wait() => {
                debug!("server shutting down during handshake; closing");
                return;
            }
            result = Handshake::new(&mut conn, &*backend, &config).run() => result,
        };
        let (export, name) = match negotiated {
            Ok(Negotiated::Export { export, name }) => (export, name),
            Ok(Negotiated::Aborted) => {
                debug!("client ended negotiation with NBD_OPT_ABORT");
                return;
            }
            Err(error) => {
                warn!(%error, "handshake failed; closing connection");
                return;
            }
        };
        Span::current().record("export", name.as_str());
        info!(
            size = export.size(),
            read_only = export.read_only(),
            tls = conn.is_tls(),
            "client entered transmission"
        );
        let session = Session::new(export, &config, Arc::clone(&limits.budget));
        match conn {
            // A TCP stream splits without a lock between the halves.
            Conn::Plain(stream) => {
                let (reader, writer) = stream.into_split();
                session.run(reader, writer, &mut shutdown).await;
            }
            // One TLS state serves both directions, so the halves share it.
            Conn::Tls(stream) => {
                let (reader, writer) = tokio::io::split(*stream);
                session.run(reader, writer, &mut shutdown).await;
            }
            // A negotiation that lost its stream cannot have succeeded.
            Conn::Lost => {}
        }
        debug!("connection closed");
    }
    .instrument(span)
    .await
}
