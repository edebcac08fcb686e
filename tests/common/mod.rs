//! Shared helpers of the end-to-end tests: a stretch node run as a child
//! process on free ports in a temporary directory, real NBD clients run with
//! time limits, a hand-rolled NBD client for byte-level tests, and a seeded
//! random generator.
//!
//! Every test file includes this module, and none uses all of it.
#![allow(dead_code)]

pub mod prometheus;
pub mod sites;

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The stretch binary under test.
pub const STRETCH: &str = env!("CARGO_BIN_EXE_stretch");

/// How long a node may take to answer on its admin port after starting.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM (drain included).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bound on any client command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// Running commands with a time limit
// ---------------------------------------------------------------------------

/// The Debian package that ships a client tool, for "not installed" errors.
fn debian_package(tool: &str) -> &'static str {
    match tool {
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" | "nbdsh" => "libnbd-bin",
        "nbdkit" => "nbdkit",
        "fio" => "fio",
        "prometheus" | "promtool" => "prometheus",
        "nbdfuse" => "nbdfuse",
        "mkfs.ext4" | "e2fsck" => "e2fsprogs",
        _ => "(unknown package)",
    }
}

/// Output of a finished command, with both streams as text.
#[derive(Debug)]
pub struct Run {
    pub description: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics, showing everything, unless the command exited 0.
    pub fn assert_ok(&self) -> &Self {
        assert!(self.success(), "command failed: {self}");
        self
    }

    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n  exit: {}\n  stdout:\n{}\n  stderr:\n{}",
            self.description,
            self.status,
            indent(&self.stdout),
            indent(&self.stderr)
        )
    }
}

fn indent(text: &str) -> String {
    const LIMIT: usize = 8000;
    let text = if text.len() > LIMIT {
        let mut cut = text.len() - LIMIT;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        format!("[... {cut} bytes cut ...]\n{}", &text[cut..])
    } else {
        text.to_string()
    };
    text.lines().map(|line| format!("    {line}\n")).collect()
}

/// Runs `command` to completion, feeding it `stdin`, killing it and
/// panicking if it takes longer than `timeout`. A missing program is
/// reported with the Debian package that provides it.
pub fn run(command: &mut Command, stdin: Option<Vec<u8>>, timeout: Duration) -> Run {
    let description = format!("{command:?}");
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) if error.kind() == io::ErrorKind::NotFound => panic!(
            "{program} is not installed: install the Debian package {} (apt-get install {})",
            debian_package(&program),
            debian_package(&program)
        ),
        Err(error) => panic!("cannot run {description}: {error}"),
    };
    let writer = stdin.map(|input| {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        std::thread::spawn(move || {
            // The program may exit without reading everything; that shows
            // up in its exit status, not here.
            let _ = pipe.write_all(&input);
        })
    });
    let reader = |stream: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut stream) = stream {
                let _ = stream.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("waiting for a child process") {
            Some(status) => break status,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = stdout.join().unwrap_or_default();
                let stderr = stderr.join().unwrap_or_default();
                panic!(
                    "{description} did not finish within {timeout:?}\n  stdout:\n{}\n  stderr:\n{}",
                    indent(&stdout),
                    indent(&stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    Run {
        description,
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Whether `tool` is on the PATH.
pub fn tool_installed(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

/// Whether CI runs the tests (`CI=true`): there, no test may skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// For tools a developer machine may lack (Prometheus): true if `tool` is
/// installed; false, after printing why the test skips, if it is not and
/// this is not CI. In CI a missing tool fails the test like
/// [`require_tool`].
pub fn tool_or_skip(tool: &str) -> bool {
    if tool_installed(tool) {
        return true;
    }
    if !in_ci() {
        eprintln!(
            "SKIPPED: {tool} is not installed (Debian package {}); CI=true makes this a failure",
            debian_package(tool)
        );
        return false;
    }
    require_tool(tool);
    true
}

/// Fails the test with the package name if a client tool is missing.
pub fn require_tool(tool: &str) {
    let found = tool_installed(tool);
    assert!(
        found,
        "{tool} is not installed: install the Debian package {} (apt-get install {})",
        debian_package(tool),
        debian_package(tool)
    );
}

// ---------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------

/// Runs qemu-io on a raw NBD export with one `-c` per command.
pub fn qemu_io(uri: &str, commands: &[&str]) -> Run {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    command.arg(uri);
    run(&mut command, None, COMMAND_TIMEOUT)
}

/// Runs qemu-io read-only (as a read-only export requires).
pub fn qemu_io_read_only(uri: &str, commands: &[&str]) -> Run {
    let mut command = Command::new("qemu-io");
    command.args(["-r", "-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    command.arg(uri);
    run(&mut command, None, COMMAND_TIMEOUT)
}

/// Runs qemu-io and panics unless every command succeeded (exit 0 and no
/// "Pattern verification failed" or "... failed: ..." line).
pub fn qemu_io_ok(uri: &str, commands: &[&str]) -> Run {
    let result = qemu_io(uri, commands);
    assert_qemu_io_clean(&result);
    result
}

/// Runs qemu-io with a command script on stdin.
pub fn qemu_io_script(uri: &str, script: &str) -> Run {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw", uri]);
    run(
        &mut command,
        Some(script.as_bytes().to_vec()),
        COMMAND_TIMEOUT,
    )
}

pub fn assert_qemu_io_clean(result: &Run) {
    let output = result.output();
    assert!(
        result.success() && !output.contains("failed") && !output.contains("error"),
        "qemu-io reported a failure: {result}"
    );
}

/// Every byte of an export, copied with nbdcopy into `dir/name`.
pub fn nbd_read_all(uri: &str, dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    let _ = std::fs::remove_file(&out);
    let mut command = Command::new("nbdcopy");
    command.arg(uri).arg(&out);
    run(&mut command, None, COMMAND_TIMEOUT).assert_ok();
    std::fs::read(&out).expect("reading nbdcopy's output")
}

// ---------------------------------------------------------------------------
// A node under test
// ---------------------------------------------------------------------------

/// Two ports the OS says are free right now. Another process could take
/// them before the node binds; [`TestNode::start`] retries if so.
/// The leg file of volume `volume` in a node's data directory: legs are
/// named `ID-NAME.raw`, ids given by the cluster metadata. The path a leg
/// would have when none exists (yet).
pub fn leg_file(node_dir: &Path, volume: &str) -> std::path::PathBuf {
    let legs = node_dir.join("legs");
    let suffix = format!("-{volume}.raw");
    std::fs::read_dir(&legs)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(&suffix))
                .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        })
        .unwrap_or_else(|| legs.join(format!("missing{suffix}")))
}

pub fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    let b = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    let ports = (
        a.local_addr().expect("local address").port(),
        b.local_addr().expect("local address").port(),
    );
    drop((a, b));
    ports
}

/// The `[tuning]` of `cluster-configs/single-site.toml`.
pub const SHIPPED_TUNING: &str = r#"delta_interval_ms = 100
delta_max_bytes = "8M"
cache_bytes_max = "256M"
journal_checkpoint_bytes = "64M"
journal_segment_bytes = "64M"
nbd_request_bytes_max = "32M"
nbd_in_flight_per_connection = 128
"#;

/// Tiny limits, so that a few tens of MiB of writes go through throttling,
/// cache eviction, leg reads, many checkpoints and journal segment
/// rotation and release.
pub const SMALL_TUNING: &str = r#"delta_interval_ms = 100
delta_max_bytes = "1M"
cache_bytes_max = "24M"
journal_checkpoint_bytes = "4M"
journal_segment_bytes = "1M"
nbd_request_bytes_max = "4M"
nbd_in_flight_per_connection = 128
"#;

/// A cluster config with the structure of
/// `cluster-configs/single-site.toml`, on the given loopback ports.
pub fn cluster_config(nbd_port: u16, admin_port: u16, tuning: &str) -> String {
    cluster_config_with_node_keys(nbd_port, admin_port, "", tuning)
}

/// [`cluster_config`] with extra `key = value` lines in node a1's table.
pub fn cluster_config_with_node_keys(
    nbd_port: u16,
    admin_port: u16,
    node_keys: &str,
    tuning: &str,
) -> String {
    format!(
        r#"# Written by the stretch end-to-end tests.
[cluster]
name = "e2e"

[[site]]
name = "a"

[[node]]
name = "a1"
site = "a"
nbd_listen = "127.0.0.1:{nbd_port}"
admin_listen = "127.0.0.1:{admin_port}"
{node_keys}
[tuning]
{tuning}"#
    )
}

/// Why a node did not come up.
#[derive(Debug)]
enum StartError {
    /// The process exited; `busy_port` if because a port was taken.
    Exited { status: ExitStatus, busy_port: bool },
}

/// `stretch node` running as a child process, killed when dropped.
#[derive(Debug)]
pub struct TestNode {
    dir: TempDir,
    config: PathBuf,
    pub nbd_port: u16,
    pub admin_port: u16,
    child: Option<Child>,
    starts: u32,
    /// Run with `stretch up` instead of `stretch node`.
    up: bool,
    /// Extra lines for node a1's table in the config.
    node_keys: String,
}

impl TestNode {
    /// Starts node `a1` with an empty data directory on free ports and the
    /// shipped tuning, and waits until its admin API answers.
    pub fn start() -> TestNode {
        TestNode::start_with_tuning(SHIPPED_TUNING)
    }

    /// Like [`TestNode::start`] with the given `[tuning]` body.
    pub fn start_with_tuning(tuning: &str) -> TestNode {
        TestNode::launch(tuning, false)
    }

    /// Runs the config with `stretch up CONFIG --data-dir DIR` rather than
    /// `stretch node`.
    pub fn start_up(tuning: &str) -> TestNode {
        TestNode::launch(tuning, true)
    }

    /// Like [`TestNode::start_with_tuning`], with extra `key = value`
    /// lines in the node's own table.
    pub fn start_with_node_keys(node_keys: &str, tuning: &str) -> TestNode {
        TestNode::launch_with(node_keys, tuning, false)
    }

    fn launch(tuning: &str, up: bool) -> TestNode {
        TestNode::launch_with("", tuning, up)
    }

    fn launch_with(node_keys: &str, tuning: &str, up: bool) -> TestNode {
        let dir = tempfile::Builder::new()
            .prefix("stretch-e2e-")
            .tempdir()
            .expect("creating a temporary directory");
        let config = dir.path().join("cluster.toml");
        let mut node = TestNode {
            dir,
            config,
            nbd_port: 0,
            admin_port: 0,
            child: None,
            starts: 0,
            up,
            node_keys: node_keys.to_string(),
        };
        for _attempt in 0..5 {
            let (nbd, admin) = free_ports();
            node.nbd_port = nbd;
            node.admin_port = admin;
            let text = cluster_config_with_node_keys(nbd, admin, &node.node_keys, tuning);
            std::fs::write(&node.config, text).expect("writing the config");
            // `stretch up` makes the admin token itself; `stretch node`
            // needs `stretch init` first, as in production.
            if !node.up && !node.token_file().exists() {
                let mut init = Command::new(STRETCH);
                init.arg("init")
                    .arg(&node.config)
                    .arg("--dir")
                    .arg(node.data_dir().join("pki"));
                run(&mut init, None, COMMAND_TIMEOUT).assert_ok();
            }
            match node.spawn_and_wait() {
                Ok(()) => return node,
                Err(StartError::Exited {
                    busy_port: true, ..
                }) => continue,
                Err(StartError::Exited { status, .. }) => {
                    panic!("node exited at start ({status}):\n{}", node.log())
                }
            }
        }
        panic!("could not find free ports for the node:\n{}", node.log());
    }

    /// Starts the node again on the same data directory and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a node that is running");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                // The old process's sockets may linger for a moment.
                Err(StartError::Exited {
                    busy_port: true, ..
                }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(StartError::Exited { status, .. }) => {
                    panic!("node exited at restart ({status}):\n{}", self.log())
                }
            }
        }
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("node-{start}.log"))
    }

    /// Everything every run of the node printed.
    pub fn log(&self) -> String {
        let mut text = String::new();
        for start in 1..=self.starts {
            let log = std::fs::read_to_string(self.log_path(start)).unwrap_or_default();
            let _ = write!(text, "--- run {start} ---\n{log}");
        }
        text
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        self.starts += 1;
        let log = File::create(self.log_path(self.starts)).expect("creating the node log");
        let mut command = Command::new(STRETCH);
        if self.up {
            command.arg("up").arg(&self.config).arg("--data-dir");
        } else {
            command.arg("node").arg("--config").arg(&self.config).args([
                "--node",
                "a1",
                "--data-dir",
            ]);
        }
        let child = command
            .arg(self.data_dir())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .env_remove("STRETCH_ADMIN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log file"))
            .stderr(log)
            .spawn()
            .expect("starting the stretch binary");
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("child just spawned");
            if let Some(status) = child.try_wait().expect("polling the node") {
                self.child = None;
                let log = std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default();
                let busy_port = log.contains("cannot listen");
                return Err(StartError::Exited { status, busy_port });
            }
            if http_get(&self.admin_url(), "/v1/status").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                panic!(
                    "node did not answer on its admin port within {READY_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Where `--data-dir` points; the node keeps its files in `a1/` below.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The node's own folder: journal/, legs/, catalog.json.
    pub fn node_dir(&self) -> PathBuf {
        self.data_dir().join("a1")
    }

    /// A scratch folder for test files (reference images, fio output).
    pub fn scratch(&self) -> PathBuf {
        let dir = self.dir.path().join("scratch");
        std::fs::create_dir_all(&dir).expect("creating the scratch folder");
        dir
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is running").id()
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://127.0.0.1:{}/{volume}", self.nbd_port)
    }

    /// The admin token: in the PKI directory under the data directory,
    /// where both `stretch up` and `stretch node` look by default.
    pub fn token_file(&self) -> PathBuf {
        self.data_dir().join("pki").join("admin.token")
    }

    /// Runs the stretch CLI against this node's admin API, with its token.
    pub fn cli(&self, args: &[&str]) -> Run {
        stretch_cli_with_token(&self.admin_url(), &self.token_file(), args)
    }

    pub fn create_volume(&self, name: &str, size: &str) {
        let result = self.cli(&["volume", "create", name, "--size", size]);
        assert!(result.success(), "{result}\nnode log:\n{}", self.log());
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        http_get(&self.admin_url(), "/metrics")
            .unwrap_or_else(|error| panic!("GET /metrics: {error}\n{}", self.log()))
    }

    /// The `/v1/status` JSON.
    pub fn status(&self) -> serde_json::Value {
        let text = http_get(&self.admin_url(), "/v1/status")
            .unwrap_or_else(|error| panic!("GET /v1/status: {error}\n{}", self.log()));
        serde_json::from_str(&text).expect("status is JSON")
    }

    /// Panics (with the log) if the node process has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("node was started");
        if let Some(status) = child.try_wait().expect("polling the node") {
            panic!("node exited unexpectedly ({status}):\n{}", self.log());
        }
    }

    /// SIGKILL: no drain, no chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("node is running");
        child.kill().expect("sending SIGKILL");
        child.wait().expect("reaping the node");
    }

    /// SIGTERM, then waits for the node to drain and exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("node is running");
        terminate_child(&mut child, || self.log())
    }
}

/// SIGTERM to `child`, then its exit status once it drained and stopped;
/// kills it and panics with `log()` if it takes longer than EXIT_TIMEOUT.
pub fn terminate_child(child: &mut Child, log: impl Fn() -> String) -> ExitStatus {
    let pid = child.id().to_string();
    let mut kill = Command::new("kill");
    kill.args(["-TERM", &pid]);
    run(&mut kill, None, Duration::from_secs(10)).assert_ok();
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("polling a stretch process") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "stretch did not exit within {EXIT_TIMEOUT:?} of SIGTERM:\n{}",
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("node log:\n{}", self.log());
        }
    }
}

/// Runs the stretch CLI with `--admin URL` and no admin token.
pub fn stretch_cli(admin_url: &str, args: &[&str]) -> Run {
    let mut command = Command::new(STRETCH);
    command
        .args(["--admin", admin_url])
        .args(args)
        .env_remove("STRETCH_ADMIN")
        .env_remove("STRETCH_TOKEN_FILE")
        .env("NO_COLOR", "1");
    run(&mut command, None, Duration::from_secs(60))
}

/// Runs the stretch CLI with `--admin URL --token-file TOKEN_FILE`.
pub fn stretch_cli_with_token(admin_url: &str, token_file: &Path, args: &[&str]) -> Run {
    let mut command = Command::new(STRETCH);
    command
        .args(["--admin", admin_url])
        .arg("--token-file")
        .arg(token_file)
        .args(args)
        .env_remove("STRETCH_ADMIN")
        .env_remove("STRETCH_TOKEN_FILE")
        .env("NO_COLOR", "1");
    run(&mut command, None, Duration::from_secs(60))
}

/// A plain HTTP GET with a short timeout; `Err` on any failure or non-2xx.
pub fn http_get(base: &str, path: &str) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut response = agent
        .get(&format!("{base}{path}"))
        .call()
        .map_err(|error| error.to_string())?;
    response
        .body_mut()
        .read_to_string()
        .map_err(|error| error.to_string())
}

/// The value of the series `name{labels}` (labels given as `k="v"` pairs
/// that must all be present), summed over matching lines.
pub fn metric_value(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut total = None;
    for line in metrics.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let series_name = series.split('{').next().unwrap_or_default();
        if series_name != name || !labels.iter().all(|label| series.contains(label)) {
            continue;
        }
        if let Ok(value) = value.parse::<f64>() {
            *total.get_or_insert(0.0) += value;
        }
    }
    total
}

// ---------------------------------------------------------------------------
// Seeded random numbers
// ---------------------------------------------------------------------------

/// SplitMix64: small, fast, and the same sequence everywhere for a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        assert!(low <= high);
        low + self.next_u64() % (high - low + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 99) < percent
    }

    pub fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

// ---------------------------------------------------------------------------
// A byte-level NBD client (fixed newstyle, NBD_OPT_GO, simple replies)
// ---------------------------------------------------------------------------

pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
pub const NBD_OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 2;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
pub const NBD_CMD_FLAG_FUA: u16 = 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;

/// One connection in the transmission phase.
#[derive(Debug)]
pub struct RawNbd {
    pub stream: TcpStream,
    /// Export size from NBD_INFO_EXPORT.
    pub size: u64,
    /// Maximum block size from NBD_INFO_BLOCK_SIZE.
    pub max_block: u32,
    next_handle: u64,
}

/// A simple reply: error code and, for a successful read, its data.
#[derive(Debug)]
pub struct RawReply {
    pub error: u32,
    pub data: Vec<u8>,
}

/// Connects and reads the server greeting; returns the socket before the
/// client has sent anything.
pub fn raw_greeting(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the NBD port");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("setting a read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("setting a write timeout");
    let mut greeting = [0u8; 18];
    stream
        .read_exact(&mut greeting)
        .expect("reading the greeting");
    assert_eq!(be_u64(&greeting[0..8]), NBD_MAGIC, "NBDMAGIC");
    assert_eq!(be_u64(&greeting[8..16]), NBD_OPTS_MAGIC, "IHAVEOPT");
    let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    assert_ne!(
        flags & NBD_FLAG_FIXED_NEWSTYLE,
        0,
        "server is fixed newstyle"
    );
    stream
}

/// Whether the server closed `stream` (EOF or reset) within 10 s, reading
/// and discarding anything it sends first.
pub fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buffer = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
    false
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().expect("8 bytes"))
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().expect("4 bytes"))
}

impl RawNbd {
    /// Full fixed-newstyle handshake ending with NBD_OPT_GO on `export`.
    pub fn connect(port: u16, export: &str) -> RawNbd {
        let mut stream = raw_greeting(port);
        let flags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
        stream
            .write_all(&flags.to_be_bytes())
            .expect("sending client flags");
        let mut payload = Vec::new();
        payload.extend_from_slice(&(export.len() as u32).to_be_bytes());
        payload.extend_from_slice(export.as_bytes());
        payload.extend_from_slice(&1u16.to_be_bytes());
        payload.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        let mut option = Vec::new();
        option.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
        option.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        option.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        option.extend_from_slice(&payload);
        stream.write_all(&option).expect("sending NBD_OPT_GO");
        let (mut size, mut max_block) = (None, None);
        loop {
            let mut header = [0u8; 20];
            stream
                .read_exact(&mut header)
                .expect("reading an option reply header");
            assert_eq!(be_u64(&header[0..8]), NBD_REP_MAGIC, "option reply magic");
            assert_eq!(be_u32(&header[8..12]), NBD_OPT_GO, "reply to NBD_OPT_GO");
            let kind = be_u32(&header[12..16]);
            let length = be_u32(&header[16..20]) as usize;
            let mut data = vec![0u8; length];
            stream
                .read_exact(&mut data)
                .expect("reading an option reply");
            assert_eq!(
                kind & (1 << 31),
                0,
                "NBD_OPT_GO {export:?} refused ({kind:#x}): {}",
                String::from_utf8_lossy(&data)
            );
            match kind {
                NBD_REP_ACK => break,
                NBD_REP_INFO if data.len() >= 2 => {
                    let info = u16::from_be_bytes([data[0], data[1]]);
                    if info == NBD_INFO_EXPORT && data.len() == 12 {
                        size = Some(be_u64(&data[2..10]));
                    } else if info == NBD_INFO_BLOCK_SIZE && data.len() == 14 {
                        max_block = Some(be_u32(&data[10..14]));
                    }
                }
                _ => {}
            }
        }
        RawNbd {
            stream,
            size: size.expect("server sent NBD_INFO_EXPORT"),
            max_block: max_block.expect("server sent NBD_INFO_BLOCK_SIZE"),
            next_handle: 0x5eed_0000_0000_0001,
        }
    }

    /// Sends one request header (and `payload`, if any); returns its handle.
    pub fn send(&mut self, flags: u16, kind: u16, offset: u64, length: u32, payload: &[u8]) -> u64 {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut header = Vec::with_capacity(28 + payload.len());
        header.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&kind.to_be_bytes());
        header.extend_from_slice(&handle.to_be_bytes());
        header.extend_from_slice(&offset.to_be_bytes());
        header.extend_from_slice(&length.to_be_bytes());
        header.extend_from_slice(payload);
        self.stream.write_all(&header).expect("sending a request");
        handle
    }

    /// Reads one simple reply, which must be for `handle`; a successful
    /// read carries `read_length` bytes of data.
    pub fn reply(&mut self, handle: u64, read_length: usize) -> RawReply {
        let mut header = [0u8; 16];
        self.stream
            .read_exact(&mut header)
            .expect("reading a reply header");
        assert_eq!(
            be_u32(&header[0..4]),
            NBD_SIMPLE_REPLY_MAGIC,
            "simple reply magic"
        );
        let error = be_u32(&header[4..8]);
        assert_eq!(be_u64(&header[8..16]), handle, "reply handle");
        let mut data = Vec::new();
        if error == 0 && read_length > 0 {
            data = vec![0u8; read_length];
            self.stream
                .read_exact(&mut data)
                .expect("reading read data");
        }
        RawReply { error, data }
    }

    /// One request and its reply.
    pub fn call(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> RawReply {
        let read_length = if kind == NBD_CMD_READ {
            length as usize
        } else {
            0
        };
        let handle = self.send(flags, kind, offset, length, payload);
        self.reply(handle, read_length)
    }

    pub fn read(&mut self, offset: u64, length: u32) -> Vec<u8> {
        let reply = self.call(0, NBD_CMD_READ, offset, length, &[]);
        assert_eq!(reply.error, 0, "read {offset}+{length} failed");
        reply.data
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) {
        let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
        let reply = self.call(flags, NBD_CMD_WRITE, offset, data.len() as u32, data);
        assert_eq!(reply.error, 0, "write {offset}+{} failed", data.len());
    }

    pub fn flush(&mut self) {
        let reply = self.call(0, NBD_CMD_FLUSH, 0, 0, &[]);
        assert_eq!(reply.error, 0, "flush failed");
    }

    /// NBD_CMD_DISC and close.
    pub fn disconnect(mut self) {
        self.send(0, NBD_CMD_DISC, 0, 0, &[]);
    }
}

/// Checks the node still serves a fresh real client: a new unaligned
/// pattern written, flushed and read back by qemu-io.
pub fn assert_qemu_io_still_works(node: &TestNode, volume: &str, pattern: u8) {
    let write = format!("write -P {pattern:#04x} 12345 6789");
    let read = format!("read -P {pattern:#04x} 12345 6789");
    qemu_io_ok(&node.uri(volume), &[&write, "flush", &read]);
}
