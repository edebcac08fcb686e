//! Test support shared by the integration tests: an in-memory backend that
//! checks the server keeps its promises to exports, a server running on its
//! own thread, a child-process runner for real NBD clients, and a minimal
//! hand-rolled NBD client for byte-level tests.

// Each test binary compiles this module separately and uses only part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use stretch_nbd::protocol::*;
use stretch_nbd::{
    Backend, DEFAULT_MAX_REQUEST_BYTES, Export, ExportError, ExportListing, OpenError,
    ServerConfig, serve,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * 1024;

/// Logs go to the test's captured output; `RUST_LOG=stretch_nbd=debug`
/// shows the protocol traffic.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------------------
// In-memory backend
// ---------------------------------------------------------------------------

/// Something a test wants the export to do instead of succeeding.
#[derive(Debug, Clone)]
pub enum Fault {
    Fail(ExportError),
    Panic,
}

/// Counts of calls that reached the export, for checking what the server
/// passed through (FUA, flushes, splitting) and what it did not.
#[derive(Debug, Default)]
pub struct Stats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub fua_writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub fua_other: AtomicU64,
    pub largest_call: AtomicU32,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }

    pub fn calls(&self) -> u64 {
        [
            &self.reads,
            &self.writes,
            &self.flushes,
            &self.trims,
            &self.zeroes,
        ]
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .sum()
    }
}

/// A `Vec<u8>` disk. Every call checks the server's promises (in range,
/// non-empty, no larger than the configured maximum) and records any
/// violation, which `assert_no_violations` turns into a test failure.
#[derive(Debug)]
pub struct MemExport {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    max_call: u32,
    pub stats: Stats,
    read_delays: Mutex<HashMap<u64, Duration>>,
    faults: Mutex<HashMap<u64, Fault>>,
    violations: Mutex<Vec<String>>,
    /// (operation, offset, length) of every call, in arrival order.
    calls: Mutex<Vec<(&'static str, u64, u32)>>,
}

impl MemExport {
    pub fn new(size: usize) -> Arc<Self> {
        Self::build(vec![0; size], false, DEFAULT_MAX_REQUEST_BYTES)
    }

    pub fn read_only(size: usize, fill: u8) -> Arc<Self> {
        Self::build(vec![fill; size], true, DEFAULT_MAX_REQUEST_BYTES)
    }

    /// For servers configured with a smaller `max_request_bytes`.
    pub fn with_max_call(size: usize, max_call: u32) -> Arc<Self> {
        Self::build(vec![0; size], false, max_call)
    }

    fn build(data: Vec<u8>, read_only: bool, max_call: u32) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(data),
            read_only,
            max_call,
            stats: Stats::default(),
            read_delays: Mutex::new(HashMap::new()),
            faults: Mutex::new(HashMap::new()),
            violations: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
        })
    }

    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().clone()
    }

    pub fn set_contents(&self, offset: usize, bytes: &[u8]) {
        self.data.lock()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Reads at exactly `offset` sleep for `delay` first.
    pub fn delay_reads_at(&self, offset: u64, delay: Duration) {
        self.read_delays.lock().insert(offset, delay);
    }

    /// Any call starting at exactly `offset` misbehaves as told.
    pub fn fault_at(&self, offset: u64, fault: Fault) {
        self.faults.lock().insert(offset, fault);
    }

    pub fn calls(&self) -> Vec<(&'static str, u64, u32)> {
        self.calls.lock().clone()
    }

    pub fn assert_no_violations(&self) {
        let violations = self.violations.lock();
        assert!(
            violations.is_empty(),
            "server broke its promises to the export: {violations:?}"
        );
    }

    fn check(&self, what: &'static str, offset: u64, length: u32) -> Result<(), ExportError> {
        self.calls.lock().push((what, offset, length));
        let size = self.data.lock().len() as u64;
        self.stats.largest_call.fetch_max(length, Ordering::SeqCst);
        let problem = if length == 0 {
            Some("empty range")
        } else if offset
            .checked_add(u64::from(length))
            .is_none_or(|end| end > size)
        {
            Some("range past the end")
        } else if length > self.max_call {
            Some("larger than max_request_bytes")
        } else {
            None
        };
        if let Some(problem) = problem {
            let message = format!("{what}({offset}, {length}): {problem}");
            self.violations.lock().push(message.clone());
            return Err(ExportError::Invalid(message));
        }
        match self.faults.lock().get(&offset).cloned() {
            None => Ok(()),
            Some(Fault::Fail(error)) => Err(error),
            Some(Fault::Panic) => panic!("injected export panic at offset {offset}"),
        }
    }

    fn refuse_if_read_only(&self) -> Result<(), ExportError> {
        if self.read_only {
            self.violations
                .lock()
                .push("write-type call reached a read-only export".into());
            return Err(ExportError::ReadOnly);
        }
        Ok(())
    }

    fn fill(&self, offset: u64, length: u32, byte: u8) {
        let start = offset as usize;
        self.data.lock()[start..start + length as usize].fill(byte);
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.lock().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, ExportError> {
        self.stats.reads.fetch_add(1, Ordering::SeqCst);
        let delay = self.read_delays.lock().get(&offset).copied();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        self.check("read", offset, length)?;
        let start = offset as usize;
        Ok(Bytes::copy_from_slice(
            &self.data.lock()[start..start + length as usize],
        ))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        self.stats.writes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.stats.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.refuse_if_read_only()?;
        let length = u32::try_from(data.len()).map_err(|_| ExportError::Invalid("huge".into()))?;
        self.check("write", offset, length)?;
        let start = offset as usize;
        self.data.lock()[start..start + data.len()].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.stats.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), ExportError> {
        self.stats.trims.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.stats.fua_other.fetch_add(1, Ordering::SeqCst);
        }
        self.refuse_if_read_only()?;
        self.check("trim", offset, length)?;
        // Trimmed ranges read back as zeros, which the spec allows.
        self.fill(offset, length, 0);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, length: u32, fua: bool) -> Result<(), ExportError> {
        self.stats.zeroes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.stats.fua_other.fetch_add(1, Ordering::SeqCst);
        }
        self.refuse_if_read_only()?;
        self.check("write_zeroes", offset, length)?;
        self.fill(offset, length, 0);
        Ok(())
    }
}

/// Named [`MemExport`]s. The (unlisted) name "unavailable" refuses to open,
/// to exercise [`OpenError::Unavailable`].
#[derive(Debug, Default)]
pub struct MemBackend {
    exports: Vec<(ExportListing, Arc<MemExport>)>,
}

impl MemBackend {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, name: &str, description: &str, export: Arc<MemExport>) -> Self {
        self.exports.push((
            ExportListing {
                name: name.into(),
                description: description.into(),
            },
            export,
        ));
        self
    }
}

impl Backend for MemBackend {
    type Export = MemExport;

    fn list(&self) -> Vec<ExportListing> {
        self.exports.iter().map(|(l, _)| l.clone()).collect()
    }

    fn open(&self, name: &str) -> Result<Arc<MemExport>, OpenError> {
        if name == "unavailable" {
            return Err(OpenError::Unavailable(name.into(), "maintenance".into()));
        }
        self.exports
            .iter()
            .find(|(l, _)| l.name == name)
            .map(|(_, e)| Arc::clone(e))
            .ok_or_else(|| OpenError::Unknown(name.into()))
    }
}

// ---------------------------------------------------------------------------
// Server harness
// ---------------------------------------------------------------------------

/// A server on 127.0.0.1:0 running on its own runtime and thread, so tests
/// can block on child processes without starving it.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: std_mpsc::Receiver<io::Result<()>>,
}

impl TestServer {
    pub fn start(backend: MemBackend) -> Self {
        Self::with_config(backend, ServerConfig::default())
    }

    pub fn with_config(backend: MemBackend, config: ServerConfig) -> Self {
        init_tracing();
        let (addr_tx, addr_rx) = std_mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = std_mpsc::channel();
        thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("build server runtime");
            let result = runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                addr_tx
                    .send(listener.local_addr()?)
                    .expect("test is waiting for the address");
                let shutdown = async {
                    let _ = stop_rx.await;
                };
                serve(listener, Arc::new(backend), config, shutdown).await
            });
            let _ = done_tx.send(result);
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server did not start");
        Self {
            addr,
            stop: Some(stop_tx),
            done: done_rx,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// Triggers shutdown without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for `serve` to return after shutdown was triggered.
    pub fn wait_stopped(&self, within: Duration) -> io::Result<()> {
        self.done
            .recv_timeout(within)
            .expect("serve did not return after shutdown")
    }

    pub fn stop(mut self) {
        self.begin_stop();
        self.wait_stopped(Duration::from_secs(20))
            .expect("serve returned an error");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_stop();
    }
}

// ---------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs an NBD client binary with a timeout. A missing binary fails the
/// test loudly: CI installs them, so absence is a setup bug, not a skip.
pub fn run_tool(program: &str, args: &[&str]) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run `{program}` ({error}); these tests need real NBD clients: \
                 apt-get install qemu-utils libnbd-bin"
            )
        });
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        match child.try_wait().expect("wait for child") {
            Some(status) => break status,
            None if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{program} {}` timed out", args.join(" "));
            }
        }
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Runs a client that must succeed; returns its stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run_tool(program, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`{program} {}` failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        args.join(" "),
        out.status
    );
    stdout
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------
// Hand-rolled client for byte-level tests
// ---------------------------------------------------------------------------

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test instead of hanging if the server stalls.
pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(IO_TIMEOUT, f)
        .await
        .expect("timed out waiting for the server")
}

/// Connects and consumes the server greeting.
pub async fn greet(addr: SocketAddr) -> TcpStream {
    let mut stream = within(TcpStream::connect(addr)).await.expect("connect");
    let mut greeting = [0u8; 18];
    within(stream.read_exact(&mut greeting))
        .await
        .expect("read greeting");
    assert_eq!(&greeting[0..8], &NBD_MAGIC.to_be_bytes());
    assert_eq!(&greeting[8..16], &NBD_OPTS_MAGIC.to_be_bytes());
    let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    assert_eq!(flags, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    stream
}

/// Greets and sends fixed-newstyle + no-zeroes client flags.
pub async fn negotiate_start(addr: SocketAddr) -> TcpStream {
    let mut stream = greet(addr).await;
    stream
        .write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())
        .await
        .expect("send client flags");
    stream
}

pub async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, option: u32, data: &[u8]) {
    let mut buf = Vec::with_capacity(16 + data.len());
    buf.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    within(w.write_all(&buf)).await.expect("send option");
}

#[derive(Debug)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

pub async fn read_option_reply<R: AsyncRead + Unpin>(r: &mut R) -> OptionReply {
    let mut header = [0u8; 20];
    within(r.read_exact(&mut header))
        .await
        .expect("read option reply");
    assert_eq!(&header[0..8], &NBD_REP_MAGIC.to_be_bytes(), "reply magic");
    let option = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
    let reply_type = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
    let length = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
    let mut data = vec![0u8; length as usize];
    within(r.read_exact(&mut data))
        .await
        .expect("read option reply data");
    OptionReply {
        option,
        reply_type,
        data,
    }
}

/// NBD_OPT_GO / NBD_OPT_INFO payload.
pub fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        data.extend_from_slice(&info.to_be_bytes());
    }
    data
}

/// What NBD_INFO_EXPORT said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
}

/// Reads NBD_REP_INFO replies up to the ACK; returns them by info type.
pub async fn read_infos<R: AsyncRead + Unpin>(r: &mut R, option: u32) -> HashMap<u16, Vec<u8>> {
    let mut infos = HashMap::new();
    loop {
        let reply = read_option_reply(r).await;
        assert_eq!(reply.option, option);
        match reply.reply_type {
            NBD_REP_ACK => return infos,
            NBD_REP_INFO => {
                let kind = u16::from_be_bytes([reply.data[0], reply.data[1]]);
                infos.insert(kind, reply.data[2..].to_vec());
            }
            other => panic!("unexpected reply type {other:#x}: {reply:?}"),
        }
    }
}

pub fn export_info(infos: &HashMap<u16, Vec<u8>>) -> ExportInfo {
    let data = infos
        .get(&NBD_INFO_EXPORT)
        .expect("NBD_INFO_EXPORT present");
    assert_eq!(data.len(), 10);
    ExportInfo {
        size: u64::from_be_bytes(data[0..8].try_into().expect("8 bytes")),
        flags: u16::from_be_bytes(data[8..10].try_into().expect("2 bytes")),
    }
}

/// Full negotiation with NBD_OPT_GO; returns a stream in transmission.
pub async fn connect(addr: SocketAddr, export: &str) -> (TcpStream, ExportInfo) {
    let mut stream = negotiate_start(addr).await;
    send_option(
        &mut stream,
        NBD_OPT_GO,
        &info_payload(export, &[NBD_INFO_BLOCK_SIZE]),
    )
    .await;
    let infos = read_infos(&mut stream, NBD_OPT_GO).await;
    let info = export_info(&infos);
    (stream, info)
}

pub async fn send_request<W: AsyncWrite + Unpin>(
    w: &mut W,
    command: u16,
    flags: u16,
    handle: u64,
    offset: u64,
    length: u32,
    payload: &[u8],
) {
    let mut buf = Vec::with_capacity(28 + payload.len());
    buf.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    buf.extend_from_slice(&flags.to_be_bytes());
    buf.extend_from_slice(&command.to_be_bytes());
    buf.extend_from_slice(&handle.to_be_bytes());
    buf.extend_from_slice(&offset.to_be_bytes());
    buf.extend_from_slice(&length.to_be_bytes());
    buf.extend_from_slice(payload);
    within(w.write_all(&buf)).await.expect("send request");
}

/// Reads one simple reply header: (error, handle).
pub async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> (u32, u64) {
    let mut header = [0u8; 16];
    within(r.read_exact(&mut header)).await.expect("read reply");
    assert_eq!(
        &header[0..4],
        &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes(),
        "simple reply magic"
    );
    (
        u32::from_be_bytes(header[4..8].try_into().expect("4 bytes")),
        u64::from_be_bytes(header[8..16].try_into().expect("8 bytes")),
    )
}

pub async fn read_exact_vec<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    within(r.read_exact(&mut data)).await.expect("read data");
    data
}

/// A request/reply round trip without payloads either way.
pub async fn roundtrip(
    stream: &mut TcpStream,
    command: u16,
    flags: u16,
    offset: u64,
    length: u32,
) -> u32 {
    send_request(stream, command, flags, 0x5eed, offset, length, &[]).await;
    let (error, handle) = read_reply(stream).await;
    assert_eq!(handle, 0x5eed);
    error
}

/// Writes then reads back through the server, asserting both succeed.
pub async fn write_and_verify(stream: &mut TcpStream, offset: u64, data: &[u8]) {
    send_request(stream, NBD_CMD_WRITE, 0, 1, offset, data.len() as u32, data).await;
    assert_eq!(read_reply(stream).await, (NBD_SUCCESS, 1), "write reply");
    send_request(stream, NBD_CMD_READ, 0, 2, offset, data.len() as u32, &[]).await;
    assert_eq!(read_reply(stream).await, (NBD_SUCCESS, 2), "read reply");
    assert_eq!(read_exact_vec(stream, data.len()).await, data, "read back");
}

/// Asserts the server closes the connection (EOF or reset) soon.
pub async fn expect_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 256];
    loop {
        match within(stream.read(&mut buf)).await {
            Ok(0) | Err(_) => return,
            // Anything the server had already queued may still arrive.
            Ok(_) => continue,
        }
    }
}
