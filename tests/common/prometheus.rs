//! A real Prometheus server (the Debian `prometheus` package) run as a
//! child process on a free loopback port, scraping given targets every
//! second, queried through its HTTP API like Grafana does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::*;

/// How often Prometheus scrapes and evaluates rules in the tests.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// A running Prometheus, killed when dropped.
pub struct Prometheus {
    dir: TempDir,
    child: Option<Child>,
    port: u16,
}

impl Prometheus {
    /// Starts Prometheus scraping `/metrics` of every `targets` address
    /// (`host:port`) as job `stretch`, with `rule_files` loaded, and waits
    /// until it is ready.
    pub fn start(targets: &[String], rule_files: &[PathBuf]) -> Prometheus {
        let quoted = |items: Vec<String>| {
            items
                .iter()
                .map(|item| format!("'{item}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rules = rule_files
            .iter()
            .map(|path| {
                path.canonicalize()
                    .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
                    .display()
                    .to_string()
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: {interval}s\n  evaluation_interval: {interval}s\n\
             rule_files: [{rules}]\n\
             scrape_configs:\n  - job_name: stretch\n    static_configs:\n      - targets: [{targets}]\n",
            interval = SCRAPE_INTERVAL.as_secs(),
            rules = quoted(rules),
            targets = quoted(targets.to_vec()),
        );
        for _attempt in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("stretch-prometheus-")
                .tempdir()
                .expect("creating a temporary directory");
            let config_path = dir.path().join("prometheus.yml");
            std::fs::write(&config_path, &config).expect("writing prometheus.yml");
            let mut prometheus = Prometheus {
                child: None,
                port: free_port(),
                dir,
            };
            prometheus.spawn(&config_path);
            if prometheus.wait_ready() {
                return prometheus;
            }
            // Most likely the port was taken meanwhile: try another.
            eprintln!("Prometheus exited at start:\n{}", prometheus.log());
        }
        panic!("Prometheus did not start on any of five ports");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("prometheus.log")
    }

    /// What Prometheus logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self, config: &Path) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening the Prometheus log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log file"))
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        self.child = Some(child);
    }

    /// False if Prometheus exited before answering `/-/ready`.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && child.try_wait().expect("polling prometheus").is_some()
            {
                self.child = None;
                return false;
            }
            if http_get(&self.url(), "/-/ready").is_ok() {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus was not ready within {READY_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Calls an API endpoint with query parameters; the `data` member of a
    /// successful answer, or what went wrong.
    pub fn api(&self, path: &str, parameters: &[(&str, &str)]) -> Result<Value, String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            // A bad query answers 400 with the reason in the body.
            .http_status_as_error(false)
            .build()
            .into();
        let mut request = agent.get(&format!("{}{path}", self.url()));
        for (key, value) in parameters {
            request = request.query(*key, *value);
        }
        let mut response = request.call().map_err(|error| error.to_string())?;
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|error| error.to_string())?;
        let answer: Value =
            serde_json::from_str(&body).map_err(|error| format!("{error}: {body}"))?;
        if answer["status"] != "success" {
            return Err(format!("{path}: {body}"));
        }
        Ok(answer["data"].clone())
    }

    /// An instant query (`/api/v1/query`): the result vector's samples.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("/api/v1/query", &[("query", expr)])?;
        match &data["result"] {
            Value::Array(samples) => Ok(samples.clone()),
            other => Err(format!("{expr}: result is not a vector: {other}")),
        }
    }

    /// Waits until every scrape target is up.
    pub fn wait_targets_up(&self, count: usize) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let up = self.query("up == 1").map(|samples| samples.len());
            if up == Ok(count) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{count} targets not up within {READY_TIMEOUT:?} ({up:?}); targets: {:?}\n{}",
                self.api("/api/v1/targets", &[]),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("prometheus log:\n{}", self.log());
        }
    }
}

/// One loopback port free right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("binding a free port")
}

/// The value of an instant-query sample, as a number (`NaN` included).
pub fn sample_value(sample: &Value) -> Option<f64> {
    sample["value"][1].as_str()?.parse().ok()
}
