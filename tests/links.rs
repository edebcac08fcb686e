//! `stretch link ...` against `stretch up cluster-configs/local.toml` (two
//! data sites and a witness in one process), moved to free ports: links are
//! listed, set, cut and healed through any node, and bad requests fail with
//! one clear line.

mod common;

use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

/// The shipped config, with its loopback ports.
const LOCAL: &str = include_str!("../cluster-configs/local.toml");
/// Every port `local.toml` uses: nbd a1, b1; admin a1, b1, w1; peer a1, b1, w1.
const LOCAL_PORTS: [u16; 8] = [10809, 10810, 9180, 9181, 9182, 7400, 7401, 7402];

/// `stretch up` of local.toml on free ports, killed when dropped.
struct LocalCluster {
    dir: TempDir,
    config: PathBuf,
    /// Admin ports of a1, b1, w1.
    admin: [u16; 3],
    child: Option<Child>,
}

impl LocalCluster {
    fn start() -> LocalCluster {
        let dir = tempfile::Builder::new()
            .prefix("stretch-links-")
            .tempdir()
            .expect("creating a temporary directory");
        let mut cluster = LocalCluster {
            config: dir.path().join("local.toml"),
            dir,
            admin: [0; 3],
            child: None,
        };
        for _attempt in 0..5 {
            let ports = free_port_set();
            let mut text = LOCAL.to_string();
            for (shipped, free) in LOCAL_PORTS.iter().zip(ports) {
                text = text.replace(
                    &format!("127.0.0.1:{shipped}\""),
                    &format!("127.0.0.1:{free}\""),
                );
            }
            std::fs::write(&cluster.config, text).expect("writing the config");
            cluster.admin = [ports[2], ports[3], ports[4]];
            if cluster.spawn_and_wait() {
                return cluster;
            }
        }
        panic!(
            "could not find free ports for the cluster:\n{}",
            cluster.log()
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("up.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts `stretch up`; false if it exited because a port was taken.
    fn spawn_and_wait(&mut self) -> bool {
        let log = File::create(self.log_path()).expect("creating the log");
        let child = Command::new(STRETCH)
            .arg("up")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
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
            if let Some(status) = child.try_wait().expect("polling stretch up") {
                self.child = None;
                let log = self.log();
                assert!(
                    log.contains("cannot listen"),
                    "stretch up exited at start ({status}):\n{log}"
                );
                return false;
            }
            if (0..3).all(|node| http_get(&self.url(node), "/v1/status").is_ok()) {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "the nodes did not answer within {READY_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Admin API of node 0 (a1), 1 (b1) or 2 (w1).
    fn url(&self, node: usize) -> String {
        format!("http://127.0.0.1:{}", self.admin[node])
    }

    fn cli(&self, node: usize, args: &[&str]) -> Run {
        stretch_cli(&self.url(node), args)
    }

    fn ok(&self, node: usize, args: &[&str]) -> String {
        let result = self.cli(node, args);
        assert!(result.success(), "{result}\nlog:\n{}", self.log());
        result.stdout
    }

    /// SIGTERM; the exit status after the drain.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        run(
            Command::new("kill").args(["-TERM", &pid]),
            None,
            Duration::from_secs(10),
        )
        .assert_ok();
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("polling stretch up") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("stretch up did not stop after SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("stretch up log:\n{}", self.log());
        }
    }
}

/// Eight distinct free loopback ports (free when asked; another process
/// may take one before the cluster binds it, so the start retries).
fn free_port_set() -> [u16; 8] {
    let listeners: Vec<TcpListener> = (0..8)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a free port"))
        .collect();
    let mut ports = [0; 8];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr().expect("local address").port();
    }
    ports
}

/// A failed command: non-zero exit, nothing on stdout, one line on stderr
/// mentioning each of `mentions`.
fn assert_one_line_error(result: &Run, mentions: &[&str]) {
    assert!(!result.success(), "expected a failure: {result}");
    assert!(result.stdout.trim().is_empty(), "{result}");
    let lines: Vec<&str> = result
        .stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr: {result}");
    for mention in mentions {
        assert!(lines[0].contains(mention), "no {mention:?} in: {result}");
    }
}

/// One row of `stretch link list` for the pair `a <-> b`.
fn row<'a>(list: &'a str, pair: &str) -> &'a str {
    list.lines()
        .find(|line| line.starts_with(pair))
        .unwrap_or_else(|| panic!("no {pair} in:\n{list}"))
}

#[test]
fn links_are_listed_changed_cut_and_healed_through_any_node() {
    let mut cluster = LocalCluster::start();
    let list = cluster.ok(0, &["link", "list"]);
    let ab = row(&list, "a <-> b");
    assert!(ab.contains("25 ms") && ab.ends_with("up"), "{list}");
    assert!(row(&list, "a <-> w").contains("unlimited"), "{list}");
    assert!(row(&list, "b <-> w").contains("0 ms"), "{list}");

    // Through b1; every node of the process sees it, both directions.
    let set = cluster.ok(
        1,
        &[
            "link",
            "set",
            "b",
            "a",
            "--delay-ms",
            "5",
            "--loss-pct",
            "1.5",
        ],
    );
    assert!(
        set.contains("a <-> b: delay 5 ms") && set.contains("loss 1.5 %"),
        "{set}"
    );
    let list = cluster.ok(2, &["link", "list"]);
    assert!(row(&list, "a <-> b").contains("5 ms"), "{list}");

    // --config tells every node of the config, one line each.
    let config = cluster.config.to_str().expect("utf-8 path").to_string();
    let cut = cluster.ok(0, &["link", "cut", "a", "b", "--config", &config]);
    for node in ["a1: a <-> b", "b1: a <-> b", "w1: a <-> b"] {
        let line = row(&cut, node);
        assert!(line.ends_with("CUT"), "{cut}");
    }
    let list = cluster.ok(0, &["link", "list"]);
    assert!(row(&list, "a <-> b").ends_with("CUT"), "{list}");
    let healed = cluster.ok(2, &["link", "heal", "a", "b"]);
    assert!(
        healed.trim_end().ends_with("up") && healed.contains("delay 5 ms"),
        "{healed}"
    );

    // Bandwidth in Mbit/s; 0 removes the limit again.
    let set = cluster.ok(0, &["link", "set", "a", "w", "--bandwidth-mbit", "2.5"]);
    assert!(set.contains("bandwidth 2.5 Mbit/s"), "{set}");
    let set = cluster.ok(0, &["link", "set", "a", "w", "--bandwidth-mbit", "0"]);
    assert!(set.contains("bandwidth unlimited"), "{set}");

    // Bad requests: one line, nothing changed.
    assert_one_line_error(
        &cluster.cli(0, &["link", "set", "a", "zz", "--delay-ms", "1"]),
        &["no site named \"zz\"", "a, b, w"],
    );
    assert_one_line_error(
        &cluster.cli(0, &["link", "cut", "b", "b"]),
        &["two different sites"],
    );
    assert_one_line_error(
        &cluster.cli(0, &["link", "set", "a", "b", "--loss-pct", "101"]),
        &["loss_pct must be between 0 and 100"],
    );
    assert_one_line_error(
        &cluster.cli(0, &["link", "set", "a", "b", "--loss-pct", "-1"]),
        &["loss_pct"],
    );
    let nothing = cluster.cli(0, &["link", "set", "a", "b"]);
    assert!(
        !nothing.success() && nothing.stderr.contains("--delay-ms"),
        "{nothing}"
    );
    let list = cluster.ok(1, &["link", "list"]);
    assert!(row(&list, "a <-> b").contains("5 ms"), "{list}");
    assert!(row(&list, "a <-> b").ends_with("up"), "{list}");

    // The witness holds no volumes.
    let status = cluster.ok(2, &["status"]);
    assert!(
        status.contains("w1 (site w)") && status.contains("witness"),
        "{status}"
    );
    assert_one_line_error(
        &cluster.cli(2, &["volume", "create", "v", "--size", "1M"]),
        &["witness"],
    );
    cluster.ok(1, &["volume", "create", "v", "--size", "1M"]);

    let status = cluster.terminate();
    assert_eq!(status.code(), Some(0), "{}", cluster.log());
}

/// A node that cannot be reached makes `--config` fail after telling the
/// others, and says which node and how many were reached.
#[test]
fn link_changes_report_unreachable_nodes() {
    let cluster = LocalCluster::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(&cluster.config).expect("config");
    let gone = free_port_set()[0];
    let text = text.replace(
        &format!("127.0.0.1:{}\"", cluster.admin[2]),
        &format!("127.0.0.1:{gone}\""),
    );
    let config = dir.path().join("partly-down.toml");
    std::fs::write(&config, text).expect("writing the config");
    let result = cluster.cli(
        0,
        &[
            "link",
            "cut",
            "a",
            "b",
            "--config",
            config.to_str().expect("utf-8"),
        ],
    );
    assert!(!result.success(), "{result}");
    assert!(row(&result.stdout, "a1:").ends_with("CUT"), "{result}");
    assert!(row(&result.stdout, "b1:").ends_with("CUT"), "{result}");
    assert!(
        result.stderr.contains("node w1") && result.stderr.contains("reached 2 of 3 nodes"),
        "{result}"
    );
}
