//! The admin API's credentials and defences, against the real binary:
//! changes need the token, bodies must be JSON, the Host must be known,
//! slow clients and slow creates hold up no one, names travel
//! percent-encoded, and a node refuses to serve beyond loopback without a
//! token.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::sites::{A, Layout, TwoSites};
use common::*;

/// One HTTP/1.1 exchange on a fresh connection: `head` is the request
/// line and headers (without the blank line); returns the status and the
/// body.
fn exchange(port: u16, head: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the admin port");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let request = format!(
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .expect("sending the request");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// One exchange carrying the admin token; a body is sent as JSON.
fn with_token(node: &TestNode, method: &str, path: &str, body: &str) -> (u16, String) {
    let bearer = format!("Authorization: Bearer {}", token(&node.token_file()));
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{bearer}");
    if !body.is_empty() {
        head.push_str("\r\nContent-Type: application/json");
    }
    exchange(node.admin_port, &head, body)
}

fn token(path: &Path) -> String {
    std::fs::read_to_string(path)
        .expect("reading the admin token")
        .trim()
        .to_string()
}

/// The names `volume list` prints.
fn volume_names(node: &TestNode) -> Vec<String> {
    let list = node.cli(&["volume", "list"]);
    list.assert_ok();
    list.stdout
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn assert_refused(result: &Run, mentions: &[&str]) {
    assert!(!result.success(), "expected a refusal: {result}");
    let stderr = result.stderr.trim();
    assert_eq!(stderr.lines().count(), 1, "one line: {result}");
    for mention in mentions {
        assert!(stderr.contains(mention), "{mention:?} missing: {result}");
    }
}

/// Without the token (or with a wrong one) every change is refused with
/// 401 and changes nothing; reads need none; the CLI finds the token by
/// flag or environment.
#[test]
fn changes_need_the_token_and_change_nothing_without_it() {
    let node = TestNode::start();
    node.create_volume("vol", "4M");
    let port = node.admin_port;
    let host = format!("Host: 127.0.0.1:{port}");
    let json = "Content-Type: application/json";
    let wrong = format!("Authorization: Bearer {}", "f".repeat(64));
    let create = r#"{"name": "intruder", "size": 4096}"#;
    for authorization in ["", wrong.as_str()] {
        let headers = |line: &str| {
            [line, host.as_str(), json, authorization]
                .iter()
                .filter(|part| !part.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("\r\n")
        };
        let cases = [
            ("POST /v1/volumes HTTP/1.1", create),
            ("DELETE /v1/volumes/vol HTTP/1.1", ""),
            ("POST /v1/volumes/vol/move HTTP/1.1", r#"{"to": "a"}"#),
            ("POST /v1/links/cut HTTP/1.1", r#"{"a": "a", "b": "a"}"#),
        ];
        for (line, body) in cases {
            let (status, answer) = exchange(port, &headers(line), body);
            assert_eq!(status, 401, "{line} with {authorization:?}: {answer}");
        }
    }
    assert_eq!(
        volume_names(&node),
        ["vol"],
        "a refused request changed something"
    );

    // Reads need no token.
    let (status, answer) = exchange(port, &format!("GET /v1/status HTTP/1.1\r\n{host}"), "");
    assert_eq!(status, 200, "{answer}");
    let (status, _) = exchange(port, &format!("GET /metrics HTTP/1.1\r\n{host}"), "");
    assert_eq!(status, 200);
    stretch_cli(&node.admin_url(), &["status"]).assert_ok();
    stretch_cli(&node.admin_url(), &["volume", "show", "vol"]).assert_ok();

    // The CLI without a token says where the token comes from.
    let refused = stretch_cli(&node.admin_url(), &["volume", "delete", "vol"]);
    assert_refused(
        &refused,
        &["admin token", "--token-file", "STRETCH_TOKEN_FILE"],
    );
    let elsewhere = node.scratch().join("other.token");
    std::fs::write(&elsewhere, format!("{}\n", "0".repeat(64))).expect("writing a token");
    let refused =
        stretch_cli_with_token(&node.admin_url(), &elsewhere, &["volume", "delete", "vol"]);
    assert_refused(&refused, &["does not match", "other.token"]);
    let missing = node.scratch().join("missing.token");
    let refused = stretch_cli_with_token(&node.admin_url(), &missing, &["status"]);
    assert_refused(&refused, &["missing.token", "does not exist"]);
    assert_eq!(volume_names(&node), ["vol"]);

    // With the token, by flag and by environment, changes go through.
    let (status, answer) = exchange(
        port,
        &format!(
            "POST /v1/volumes HTTP/1.1\r\n{host}\r\n{json}\r\nAuthorization: Bearer {}",
            token(&node.token_file())
        ),
        r#"{"name": "raw", "size": 4096}"#,
    );
    assert_eq!(status, 201, "{answer}");
    node.cli(&["volume", "create", "flag", "--size", "1M"])
        .assert_ok();
    let mut command = Command::new(STRETCH);
    command
        .args(["--admin", &node.admin_url(), "volume", "delete", "flag"])
        .env("STRETCH_TOKEN_FILE", node.token_file())
        .env_remove("STRETCH_ADMIN");
    run(&mut command, None, COMMAND_TIMEOUT).assert_ok();
    assert_eq!(volume_names(&node), ["raw", "vol"]);
}

/// A body that is not declared JSON gets 415, a Host that is not an
/// address, localhost or a configured name gets 421, a body over the
/// limit gets 413; none of them changes anything.
#[test]
fn bodies_must_be_json_and_the_host_known() {
    let node = TestNode::start();
    let port = node.admin_port;
    let bearer = format!("Authorization: Bearer {}", token(&node.token_file()));
    let create = r#"{"name": "sneaky", "size": 4096}"#;
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let head = format!(
            "POST /v1/volumes HTTP/1.1\r\nHost: 127.0.0.1\r\n{bearer}\r\nContent-Type: {content_type}"
        );
        let (status, answer) = exchange(port, &head, create);
        assert_eq!(status, 415, "{content_type}: {answer}");
        assert!(answer.contains("application/json"), "{answer}");
    }
    for host in [
        "evil.example",
        "127.0.0.1.nip.io:9180",
        "localhost.evil.example",
    ] {
        let (status, answer) = exchange(
            port,
            &format!("GET /v1/status HTTP/1.1\r\nHost: {host}"),
            "",
        );
        assert_eq!(status, 421, "{host}: {answer}");
        let head = format!(
            "POST /v1/volumes HTTP/1.1\r\nHost: {host}\r\n{bearer}\r\nContent-Type: application/json"
        );
        let (status, answer) = exchange(port, &head, create);
        assert_eq!(status, 421, "{host}: {answer}");
    }
    for host in ["localhost", "localhost:1", "[::1]:9180", "127.0.0.1"] {
        let (status, answer) = exchange(
            port,
            &format!("GET /v1/status HTTP/1.1\r\nHost: {host}"),
            "",
        );
        assert_eq!(status, 200, "{host}: {answer}");
    }
    // A body declared over the limit is refused before a byte of it is
    // read (none is sent: the answer must not depend on a race with the
    // server closing a socket that still has unread bytes).
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let head = format!(
        "POST /v1/volumes HTTP/1.1\r\nHost: 127.0.0.1\r\n{bearer}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).expect("sending the head");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        volume_names(&node).is_empty(),
        "a refused request created a volume"
    );
}

/// `volume delete 'vol?x'` names the volume `vol?x`, not `vol`.
#[test]
fn volume_names_are_percent_encoded() {
    let node = TestNode::start();
    node.create_volume("vol", "4M");
    for args in [
        ["volume", "delete", "vol?x"],
        ["volume", "delete", "vol#x"],
        ["volume", "delete", "vol/../vol"],
        ["volume", "show", "vol?x"],
    ] {
        assert_refused(&node.cli(&args), &[args[2]]);
    }
    let moved = node.cli(&["volume", "move", "vol?x", "--to", "a"]);
    assert_refused(&moved, &["vol?x"]);
    assert_eq!(volume_names(&node), ["vol"]);
    node.cli(&["volume", "delete", "vol"]).assert_ok();
    assert!(volume_names(&node).is_empty());
}

/// Clients that send half a request head, half a body or nothing at all
/// hold up no other request nor the node's exit, and are cut off after the
/// read timeouts.
#[test]
fn slow_clients_do_not_block_the_api() {
    let mut node = TestNode::start();
    let port = node.admin_port;
    let connect = || {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the admin port");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        stream
    };
    let mut half_head = connect();
    half_head
        .write_all(b"POST /v1/volumes HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .expect("sending half a head");
    let mut half_body = connect();
    let head = format!(
        "POST /v1/volumes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\":",
        token(&node.token_file())
    );
    half_body
        .write_all(head.as_bytes())
        .expect("sending half a body");
    let mut silent = connect();
    let started = Instant::now();
    node.cli(&["status"]).assert_ok();
    node.create_volume("meanwhile", "1M");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "other requests waited for the slow clients: {:?}",
        started.elapsed()
    );
    // Each slow client is cut off: 10 s for a head, 10 s for a body.
    for (what, stream) in [
        ("half a head", &mut half_head),
        ("half a body", &mut half_body),
        ("nothing", &mut silent),
    ] {
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer);
        if let Err(error) = &read {
            assert!(
                !matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{what}: the server did not close the connection: {error}"
            );
        }
        let text = String::from_utf8_lossy(&answer);
        if what == "half a body" {
            assert!(text.starts_with("HTTP/1.1 408"), "{what}: {text}");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "slow clients were held {:?}",
        started.elapsed()
    );
    assert_eq!(volume_names(&node), ["meanwhile"]);

    // Nor do they hold up the node's exit: a connection with no request
    // being handled is closed at once.
    let mut lingering = connect();
    lingering
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .expect("sending half a head");
    let stopping = Instant::now();
    assert!(node.terminate().success(), "{}", node.log());
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "a half-sent request held the node's exit for {:?}",
        stopping.elapsed()
    );
}

/// A node without a token refuses to listen beyond loopback (one line),
/// and on loopback serves reads but refuses every change.
#[test]
fn a_node_without_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (nbd, admin) = free_ports();
    let config = dir.path().join("cluster.toml");
    let text = cluster_config(nbd, admin, SHIPPED_TUNING);
    std::fs::write(
        &config,
        text.replace("admin_listen = \"127.0.0.1:", "admin_listen = \"0.0.0.0:"),
    )
    .expect("writing the config");
    let data = dir.path().join("data");
    let mut start = Command::new(STRETCH);
    start
        .arg("node")
        .arg("--config")
        .arg(&config)
        .args(["--node", "a1", "--data-dir"])
        .arg(&data)
        .env("NO_COLOR", "1");
    let refused = run(&mut start, None, Duration::from_secs(20));
    assert_refused(
        &refused,
        &[&format!("0.0.0.0:{admin}"), "admin.token", "stretch init"],
    );
    assert!(
        !data.join("a1").exists(),
        "the refused node touched its data directory"
    );

    // On loopback it starts, reads work, changes get 403.
    std::fs::write(&config, &text).expect("writing the config");
    let log = std::fs::File::create(dir.path().join("node.log")).expect("log");
    let mut child = Command::new(STRETCH)
        .arg("node")
        .arg("--config")
        .arg(&config)
        .args(["--node", "a1", "--data-dir"])
        .arg(&data)
        .env("NO_COLOR", "1")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("starting stretch node");
    let url = format!("http://127.0.0.1:{admin}");
    let deadline = Instant::now() + READY_TIMEOUT;
    while http_get(&url, "/v1/status").is_err() {
        assert!(Instant::now() < deadline, "the node did not answer");
        std::thread::sleep(Duration::from_millis(50));
    }
    let some_token = dir.path().join("some.token");
    std::fs::write(&some_token, "0".repeat(64)).expect("writing a token");
    let create = stretch_cli_with_token(
        &url,
        &some_token,
        &["volume", "create", "v", "--size", "1M"],
    );
    assert_refused(&create, &["no admin token", "stretch init"]);
    stretch_cli(&url, &["volume", "list"]).assert_ok();
    let log = || std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default();
    assert!(log().contains("refuses every change"), "{}", log());
    let status = terminate_child(&mut child, log);
    assert!(status.success(), "{}", log());
}

/// `stretch init` creates the admin token once, readable by its owner
/// only, and keeps it on later runs.
#[test]
fn init_creates_a_private_admin_token_once() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let init = || {
        let mut command = Command::new(STRETCH);
        command.arg("init").arg("--dir").arg(&pki);
        run(&mut command, None, COMMAND_TIMEOUT)
    };
    let first = init();
    first.assert_ok();
    assert!(first.stdout.contains("admin token created"), "{first}");
    let path = pki.join("admin.token");
    let created = token(&path);
    assert_eq!(created.len(), 64, "{created}");
    assert!(created.bytes().all(|byte| byte.is_ascii_hexdigit()));
    let mode = std::fs::metadata(&path)
        .expect("token")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let second = init();
    second.assert_ok();
    assert!(second.stdout.contains("admin token kept"), "{second}");
    assert_eq!(token(&path), created);
}

/// A create that waits for a metadata majority it cannot reach (5 s)
/// holds up neither reads nor link changes at that node, then fails with
/// one clear line; link changes without the token are refused and change
/// nothing.
#[test]
fn a_slow_create_does_not_block_the_api() {
    let sites = TwoSites::start(Layout::ProcessPerNode, &[]);
    let refused = stretch_cli(&sites.url(A), &["link", "cut", "a", "b"]);
    assert_refused(&refused, &["admin token"]);
    let list = sites.ok(A, &["link", "list"]);
    assert!(!list.contains("CUT"), "{list}");

    // Site a alone: neither b nor the witness is reachable from it.
    sites.ok(A, &["link", "cut", "a", "b"]);
    sites.ok(A, &["link", "cut", "a", "w"]);
    let url = sites.url(A);
    let token_file = sites.token_file();
    let create = std::thread::spawn(move || {
        let started = Instant::now();
        let result = stretch_cli_with_token(
            &url,
            &token_file,
            &["volume", "create", "slow", "--size", "1M"],
        );
        (result, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let started = Instant::now();
        http_get(&sites.url(A), "/v1/status").expect("status during the create");
        http_get(&sites.url(A), "/v1/volumes").expect("volumes during the create");
        slowest = slowest.max(started.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    let started = Instant::now();
    sites.ok(A, &["link", "set", "a", "b", "--delay-ms", "1"]);
    slowest = slowest.max(started.elapsed());
    let (result, took) = create.join().expect("the create thread");
    assert!(!result.success(), "{result}\n{}", sites.logs());
    let lines: Vec<&str> = result
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        lines.len() == 1 && lines[0].contains("no majority of the metadata voters"),
        "expected one line saying no majority answered: {result}"
    );
    assert!(
        took >= Duration::from_secs(3),
        "the create did not wait for a majority ({took:?}), so this test proves nothing"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "reads and a link change waited {slowest:?} for the create"
    );
}

#[test]
fn a_bad_failover_policy_or_an_unaccepted_promotion_is_refused_and_changes_nothing() {
    let node = TestNode::start();
    let post = |path: &str, body: &str| with_token(&node, "POST", path, body);
    let (status, answer) = post(
        "/v1/volumes",
        r#"{"name": "v", "size": 4096, "failover": "sometimes"}"#,
    );
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("unknown failover policy"), "{answer}");
    assert!(volume_names(&node).is_empty());
    let (status, answer) = post("/v1/volumes", r#"{"name": "v", "size": 4096}"#);
    assert_eq!(status, 201, "{answer}");
    let (status, answer) = post(
        "/v1/volumes/v/promote",
        r#"{"site": "local", "accept_data_loss": false}"#,
    );
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("accept_data_loss"), "{answer}");
    let (status, answer) = post(
        "/v1/volumes/v/promote",
        r#"{"site": "local", "accept_data_loss": true, "extra": 1}"#,
    );
    assert_eq!(status, 400, "{answer}");
    // Accepted, but this site already owns it: refused, nothing moves.
    let site = node.status()["site"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (status, answer) = post(
        "/v1/volumes/v/promote",
        &format!(r#"{{"site": "{site}", "accept_data_loss": true}}"#),
    );
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains("already owns it"), "{answer}");
    assert_eq!(volume_names(&node), ["v"]);
}

#[test]
fn a_bad_follow_setting_is_refused_and_changes_nothing() {
    let node = TestNode::start();
    let post = |path: &str, body: &str| with_token(&node, "POST", path, body);
    let (status, answer) = post("/v1/volumes", r#"{"name": "v", "size": 4096}"#);
    assert_eq!(status, 201, "{answer}");
    let follow_of = || {
        let (status, answer) = with_token(&node, "GET", "/v1/volumes/v", "");
        assert_eq!(status, 200, "{answer}");
        let info: serde_json::Value = serde_json::from_str(&answer).expect("volume info is JSON");
        info["follow"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(follow_of(), "off");
    for (body, mentions) in [
        ("follow auto", "bad follow request"),
        (r#"{"follow": "sometimes"}"#, "follow must be auto or off"),
        (r#"{"follow": "AUTO"}"#, "follow must be auto or off"),
        (r#"{"follow": "auto", "extra": 1}"#, "bad follow request"),
        (r#"{"follow": 1}"#, "bad follow request"),
        ("{}", "bad follow request"),
    ] {
        let (status, answer) = post("/v1/volumes/v/follow", body);
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.contains(mentions), "{body}: {answer}");
        assert_eq!(follow_of(), "off", "{body} changed the setting");
    }
    let (status, answer) = post("/v1/volumes/nope/follow", r#"{"follow": "auto"}"#);
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = post("/v1/volumes/v/follow", r#"{"follow": "auto"}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(follow_of(), "auto");
}
