//! A shipped cluster config on free ports (by default
//! `cluster-configs/local.toml`: sites a and b 25 ms apart one way, plus a
//! witness; or `three-site.toml`), run either as one `stretch up` process
//! or as one `stretch node` process per node, so a test can kill one
//! site's node on its own.

use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::*;

/// The shipped config, with its loopback ports.
pub const LOCAL: &str = include_str!("../../cluster-configs/local.toml");
/// The nodes of local.toml, by index: a1, b1, w1.
pub const NODES: [&str; 3] = ["a1", "b1", "w1"];
pub const A: usize = 0;
pub const B: usize = 1;

/// A shipped config a test can run: its text, its nodes (data nodes first,
/// each with an NBD port) and every loopback port it uses: NBD per data
/// node, then admin per node, then peer per node.
pub struct Shipped {
    pub text: &'static str,
    pub nodes: &'static [&'static str],
    pub data_nodes: usize,
    pub ports: &'static [u16],
}

/// `local.toml`: a1, b1 and the witness w1.
pub const LOCAL_CLUSTER: Shipped = Shipped {
    text: LOCAL,
    nodes: &NODES,
    data_nodes: 2,
    ports: &[10809, 10810, 9180, 9181, 9182, 7400, 7401, 7402],
};

/// `three-site.toml`: a1, b1 (10 ms apart), c1 (40 ms from both) and the
/// witness w1.
pub const THREE_SITE: Shipped = Shipped {
    text: include_str!("../../cluster-configs/three-site.toml"),
    nodes: &["a1", "b1", "c1", "w1"],
    data_nodes: 3,
    ports: &[
        10839, 10840, 10841, 9210, 9211, 9212, 9213, 7430, 7431, 7432, 7433,
    ],
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `stretch up`: every node in one process.
    OneProcess,
    /// `stretch node` per node, sharing the certificates of `stretch init`.
    ProcessPerNode,
}

/// A running cluster (two data sites and a witness unless started from
/// another [`Shipped`] config), killed when dropped.
pub struct TwoSites {
    pub dir: TempDir,
    pub config: PathBuf,
    layout: Layout,
    shipped: &'static Shipped,
    /// The free ports standing in for [`Shipped::ports`], in its order.
    ports: Vec<u16>,
    /// One child for `OneProcess`, one per node otherwise (None once killed).
    children: Vec<Option<Child>>,
    /// A node's own PKI directory, in place of the shared one.
    node_pki: Vec<Option<PathBuf>>,
}

impl TwoSites {
    /// Starts the shipped config with each `(from, to)` replacement applied
    /// to its text (to change tuning keys), and waits for every admin API
    /// and for sites a and b to be connected.
    pub fn start(layout: Layout, edits: &[(&str, &str)]) -> TwoSites {
        TwoSites::start_shipped(&LOCAL_CLUSTER, layout, edits)
    }

    /// [`TwoSites::start`] with another shipped config; every data site's
    /// nodes are waited for to connect to each other.
    pub fn start_shipped(
        shipped: &'static Shipped,
        layout: Layout,
        edits: &[(&str, &str)],
    ) -> TwoSites {
        let dir = tempfile::Builder::new()
            .prefix("stretch-sites-")
            .tempdir()
            .expect("creating a temporary directory");
        let mut sites = TwoSites {
            config: dir.path().join("local.toml"),
            dir,
            layout,
            shipped,
            ports: Vec::new(),
            children: Vec::new(),
            node_pki: vec![None; shipped.nodes.len()],
        };
        for _attempt in 0..5 {
            let ports = free_ports(shipped.ports.len());
            let mut text = shipped.text.to_string();
            for (from, to) in edits {
                assert!(text.contains(from), "the config has no {from:?}");
                text = text.replace(from, to);
            }
            for (shipped, free) in shipped.ports.iter().zip(&ports) {
                text = text.replace(
                    &format!("127.0.0.1:{shipped}\""),
                    &format!("127.0.0.1:{free}\""),
                );
            }
            std::fs::write(&sites.config, text).expect("writing the config");
            sites.ports = ports;
            if sites.spawn_all() {
                sites.keep_token();
                sites.wait_connected();
                return sites;
            }
            sites.kill_all();
        }
        panic!(
            "could not find free ports for the cluster:\n{}",
            sites.logs()
        );
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// The admin token the nodes started with. A copy, so that a test may
    /// replace the PKI directory (and its token) under running nodes, which
    /// keep the token they read at start.
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("admin.token")
    }

    /// Copies the token `stretch up` or `stretch init` made to
    /// [`TwoSites::token_file`].
    fn keep_token(&self) {
        let pki = match self.layout {
            // `stretch up` puts it in DATA_DIR/pki by default.
            Layout::OneProcess => self.data_dir().join("pki"),
            Layout::ProcessPerNode => self.pki_dir(),
        };
        std::fs::copy(pki.join("admin.token"), self.token_file()).expect("copying the admin token");
    }

    fn log_path(&self, index: usize) -> PathBuf {
        self.dir.path().join(format!("log-{index}.txt"))
    }

    /// Every process's log.
    pub fn logs(&self) -> String {
        (0..self.shipped.nodes.len())
            .filter_map(|index| std::fs::read_to_string(self.log_path(index)).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn spawn_all(&mut self) -> bool {
        match self.layout {
            Layout::OneProcess => {
                let child = self.spawn(0, &["up".as_ref(), self.config.as_os_str()]);
                self.children = vec![Some(child)];
            }
            Layout::ProcessPerNode => {
                let pki = self.pki_dir();
                run(
                    Command::new(STRETCH)
                        .arg("init")
                        .arg(&self.config)
                        .arg("--dir")
                        .arg(&pki),
                    None,
                    COMMAND_TIMEOUT,
                )
                .assert_ok();
                self.children = (0..self.shipped.nodes.len())
                    .map(|index| Some(self.spawn_node(index)))
                    .collect();
            }
        }
        self.wait_ready()
    }

    /// Starts node `index` again after [`TwoSites::kill9`].
    pub fn start_node(&mut self, index: usize) {
        assert!(self.children[index].is_none(), "node {index} is running");
        self.children[index] = Some(self.spawn_node(index));
        let url = self.url(index);
        self.wait_until("the restarted node answers", READY_TIMEOUT, || {
            http_get(&url, "/v1/status").is_ok()
        });
    }

    /// Starts node `index` again after [`TwoSites::kill9`], with its
    /// certificates from `pki` instead of the shared PKI directory.
    pub fn start_node_with_pki(&mut self, index: usize, pki: PathBuf) {
        self.node_pki[index] = Some(pki);
        self.start_node(index);
    }

    /// The process id of node `index` (ProcessPerNode only).
    pub fn pid(&self, index: usize) -> u32 {
        assert_eq!(self.layout, Layout::ProcessPerNode);
        self.children[index].as_ref().expect("running").id()
    }

    /// Starts node `index` (a `stretch node` process).
    fn spawn_node(&self, index: usize) -> Child {
        let pki = self.node_pki[index]
            .clone()
            .unwrap_or_else(|| self.pki_dir());
        self.spawn(
            index,
            &[
                "node".as_ref(),
                "--config".as_ref(),
                self.config.as_os_str(),
                "--node".as_ref(),
                self.shipped.nodes[index].as_ref(),
                "--pki-dir".as_ref(),
                pki.as_os_str(),
            ],
        )
    }

    fn spawn(&self, index: usize, args: &[&std::ffi::OsStr]) -> Child {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path(index))
            .expect("opening the log");
        Command::new(STRETCH)
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .env_remove("STRETCH_ADMIN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log file"))
            .stderr(log)
            .spawn()
            .expect("starting the stretch binary")
    }

    /// False if a process exited because a port was taken.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            for child in self.children.iter_mut().flatten() {
                if let Some(status) = child.try_wait().expect("polling a node") {
                    let logs = self.logs();
                    assert!(
                        logs.contains("cannot listen") || logs.contains("cannot bind"),
                        "a node exited at start ({status}):\n{logs}"
                    );
                    return false;
                }
            }
            if (0..self.shipped.nodes.len())
                .all(|node| http_get(&self.url(node), "/v1/status").is_ok())
            {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "the nodes did not answer within {READY_TIMEOUT:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every data node reports its peers connected.
    pub fn wait_connected(&self) {
        self.wait_until("the data sites connected", Duration::from_secs(30), || {
            (0..self.shipped.data_nodes).all(|node| {
                self.status(node)["peers"]
                    .as_array()
                    .is_some_and(|peers| peers.iter().all(|p| p["connected"] == true))
            })
        });
    }

    /// Admin port of node `node` (by the order of [`Shipped::nodes`]).
    pub fn admin_port(&self, node: usize) -> u16 {
        self.ports[self.shipped.data_nodes + node]
    }

    /// SIGTERM to the `stretch up` process; its exit status after the drain.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        assert_eq!(self.layout, Layout::OneProcess);
        let mut child = self.children[0].take().expect("running");
        terminate_child(&mut child, || self.logs())
    }

    pub fn url(&self, node: usize) -> String {
        format!("http://127.0.0.1:{}", self.admin_port(node))
    }

    pub fn nbd_uri(&self, node: usize, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.ports[node])
    }

    /// Runs the stretch CLI against node `node`, with the admin token.
    pub fn cli(&self, node: usize, args: &[&str]) -> Run {
        stretch_cli_with_token(&self.url(node), &self.token_file(), args)
    }

    pub fn ok(&self, node: usize, args: &[&str]) -> String {
        let result = self.cli(node, args);
        assert!(result.success(), "{result}\nlogs:\n{}", self.logs());
        result.stdout
    }

    pub fn status(&self, node: usize) -> serde_json::Value {
        let text = http_get(&self.url(node), "/v1/status").unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    pub fn metrics(&self, node: usize) -> String {
        http_get(&self.url(node), "/metrics").unwrap_or_default()
    }

    /// The leg file of `volume` at node `node`.
    pub fn leg(&self, node: usize, volume: &str) -> PathBuf {
        super::leg_file(&self.data_dir().join(self.shipped.nodes[node]), volume)
    }

    /// Waits until a's backlog is empty and nothing is left to resync: b
    /// has applied every delta a closed.
    pub fn wait_replicated(&self, timeout: Duration) {
        self.wait_replicated_from(A, B, timeout);
    }

    /// Waits until node `replica` holds and applied everything node
    /// `owner` wrote (nothing kept, dirty or left to resync at the owner).
    pub fn wait_replicated_from(&self, owner: usize, replica: usize, timeout: Duration) {
        self.wait_until("the replica caught up with the owner", timeout, || {
            let status = self.status(owner);
            status["backlog_bytes"] == 0
                && status["resync_regions_left"] == 0
                && status["dirty_bytes"] == 0
                && self.status(replica)["unapplied_deltas"] == 0
        });
    }

    pub fn wait_until(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}\nlogs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// kill -9 of node `index` (ProcessPerNode only).
    pub fn kill9(&mut self, index: usize) {
        assert_eq!(self.layout, Layout::ProcessPerNode);
        if let Some(mut child) = self.children[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn kill_all(&mut self) {
        for child in self.children.iter_mut() {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            eprintln!("cluster logs:\n{}", self.logs());
        }
    }
}

/// `count` distinct loopback ports free for both TCP and UDP, below the
/// kernel's ephemeral range: a node restarted after `kill9` binds its
/// ports again, and a port in the ephemeral range can meanwhile become the
/// local end of another test's outgoing connection ("address already in
/// use"). Taken at random so that tests running side by side rarely pick
/// the same; the cluster's start still retries if one is taken.
pub fn free_ports(count: usize) -> Vec<u16> {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_first = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_first.max(10_001));
    let mut random = std::collections::hash_map::RandomState::new().build_hasher();
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _attempt in 0..10_000 {
        if ports.len() == count {
            break;
        }
        random.write_usize(ports.len());
        let port = low + (random.finish() % u64::from(high - low)) as u16;
        if ports.contains(&port) {
            continue;
        }
        let (Ok(tcp), Ok(udp)) = (
            TcpListener::bind(("127.0.0.1", port)),
            std::net::UdpSocket::bind(("127.0.0.1", port)),
        ) else {
            continue;
        };
        held.push((tcp, udp));
        ports.push(port);
    }
    assert_eq!(ports.len(), count, "no {count} free ports below {high}");
    ports
}
