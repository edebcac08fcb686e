//! The admin HTTP API (JSON) and `/metrics`, on a thread of its own.
//!
//! | method | path                  | answer                              |
//! |--------|-----------------------|-------------------------------------|
//! | GET    | /v1/status            | [`StatusInfo`]                      |
//! | GET    | /v1/volumes           | list of [`VolumeInfo`]              |
//! | POST   | /v1/volumes           | [`CreateVolume`] in, [`VolumeInfo`] |
//! | GET    | /v1/volumes/NAME      | [`VolumeInfo`]                      |
//! | DELETE | /v1/volumes/NAME      | [`VolumeInfo`] of the deleted one   |
//! | POST   | /v1/volumes/NAME/move | [`MoveVolume`] in, [`VolumeInfo`]   |
//! | GET    | /v1/links             | list of [`LinkInfo`], every site pair |
//! | POST   | /v1/links/set         | [`SetLink`] in, [`LinkInfo`]        |
//! | POST   | /v1/links/cut         | [`LinkPair`] in, [`LinkInfo`]       |
//! | POST   | /v1/links/heal        | [`LinkPair`] in, [`LinkInfo`]       |
//! | GET    | /metrics              | Prometheus text format              |
//!
//! Errors come back as `{"error": "..."}` with a 4xx/5xx status.
//!
//! The link routes change the [`LinkControl`] of this process only: under
//! `stretch up` every node shares it, under `stretch node` each node
//! shapes only what it sends, and must be told on its own. Nothing is
//! forwarded to other nodes.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stretch_storage::{CatalogError, VolumeRecord};
use tiny_http::{Header, Method, Response, Server};
use tokio::sync::watch;

use crate::links::{LinkChange, LinkControl, LinkError, LinkInfo};
use crate::node::{Node, NodeError};

/// Largest request body accepted.
const BODY_BYTES_MAX: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size: u64,
    #[serde(default)]
    pub group: Option<String>,
    /// The site accepting its writes; the site of the node asked, if none.
    #[serde(default)]
    pub owner: Option<String>,
    /// `async` (default), `flush-sync` or `sync`.
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub id: u32,
    pub size: u64,
    pub group: String,
    pub leg: String,
    /// Where a client connects, e.g. `nbd://127.0.0.1:10809/NAME`.
    pub export: String,
    /// The site that accepts the volume's writes.
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub mode: String,
    /// Per other site: how far behind it is (filled at the owner).
    #[serde(default)]
    pub replicas: Vec<ReplicaInfo>,
    /// Sites that did not confirm a create yet (they get it on reconnect).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unconfirmed_sites: Vec<String>,
}

/// `POST /v1/volumes/NAME/move`: hand the volume's group to another site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveVolume {
    pub to: String,
}

/// How far one other site is behind on a volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub site: String,
    pub unapplied_deltas: u64,
    pub unapplied_bytes: u64,
    /// Age of the oldest delta the site has not journaled (the live RPO).
    pub lag_seconds: f64,
    /// 1 MiB regions still to copy to it (resync progress).
    pub resync_regions_left: u64,
}

/// One other site as this node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub site: String,
    pub connected: bool,
    pub rtt_ms: Option<f64>,
}

/// `POST /v1/links/set`: the settings given change, the others stay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetLink {
    pub a: String,
    pub b: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<u64>,
    /// 0 removes the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_pct: Option<f64>,
}

impl SetLink {
    fn change(&self) -> LinkChange {
        LinkChange {
            delay_ms: self.delay_ms,
            jitter_ms: self.jitter_ms,
            bandwidth_mbit: self.bandwidth_mbit,
            loss_pct: self.loss_pct,
        }
    }
}

/// `POST /v1/links/cut` and `/v1/links/heal`: the two sites of a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkPair {
    pub a: String,
    pub b: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub cluster: String,
    pub node: String,
    pub site: String,
    /// The NBD listener; `None` at a witness site.
    pub nbd: Option<String>,
    pub uptime_seconds: u64,
    pub volumes: u64,
    pub dirty_bytes: u64,
    pub cache_clean_bytes: u64,
    pub cache_bytes_max: u64,
    pub open_deltas: u64,
    pub unapplied_deltas: u64,
    pub journal_bytes: u64,
    pub throttled_writes: u64,
    /// Why the node stopped taking writes, if it did.
    pub failure: Option<String>,
    /// Delta bytes kept until every other site applied them.
    #[serde(default)]
    pub backlog_bytes: u64,
    /// 1 MiB regions still to copy to other sites (resync progress).
    #[serde(default)]
    pub resync_regions_left: u64,
    #[serde(default)]
    pub peers: Vec<PeerInfo>,
}

#[derive(Debug)]
pub(crate) struct AdminServer {
    thread: JoinHandle<()>,
}

impl AdminServer {
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("admin thread panicked");
        }
    }
}

pub(crate) fn start(
    node: Arc<Node>,
    links: Arc<LinkControl>,
    address: SocketAddr,
    stopped: watch::Receiver<bool>,
) -> std::io::Result<AdminServer> {
    let server = Server::http(address).map_err(std::io::Error::other)?;
    let thread = std::thread::Builder::new()
        .name(format!("{}-admin", node.name))
        .spawn(move || {
            while !*stopped.borrow() {
                match server.recv_timeout(Duration::from_millis(100)) {
                    Ok(Some(request)) => handle(&node, &links, request),
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(%error, "admin API accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(AdminServer { thread })
}

struct Reply {
    status: u16,
    body: String,
    content_type: &'static str,
}

impl Reply {
    fn json<T: Serialize>(status: u16, value: &T) -> Reply {
        Reply {
            status,
            body: serde_json::to_string_pretty(value)
                .expect("admin serialisation invariant: plain data serialises"),
            content_type: "application/json",
        }
    }

    fn error(status: u16, message: impl std::fmt::Display) -> Reply {
        Reply::json(status, &serde_json::json!({ "error": message.to_string() }))
    }
}

fn handle(node: &Arc<Node>, links: &LinkControl, mut request: tiny_http::Request) {
    let method = request.method().clone();
    let url = request.url().to_string();
    let path = url.split('?').next().unwrap_or_default().to_string();
    let mut body = Vec::new();
    let read = request
        .as_reader()
        .take(BODY_BYTES_MAX + 1)
        .read_to_end(&mut body);
    let reply = if read.is_err() {
        Reply::error(400, "could not read the request body")
    } else if body.len() as u64 > BODY_BYTES_MAX {
        Reply::error(413, format!("request body over {BODY_BYTES_MAX} bytes"))
    } else if let Some(reply) = link_route(links, &method, &path, &body) {
        reply
    } else {
        route(node, &method, &path, &body)
    };
    tracing::debug!(%method, path, status = reply.status, "admin request");
    let header = Header::from_bytes("Content-Type", reply.content_type)
        .expect("admin header invariant: static header is valid");
    let response = Response::from_string(reply.body)
        .with_status_code(reply.status)
        .with_header(header);
    if let Err(error) = request.respond(response) {
        tracing::debug!(%error, "admin client went away");
    }
}

fn route(node: &Arc<Node>, method: &Method, path: &str, body: &[u8]) -> Reply {
    let volume_name = path.strip_prefix("/v1/volumes/");
    match (method, path, volume_name) {
        (Method::Get, "/metrics", _) => {
            let stats = node.driver.engine.lock().stats();
            Reply {
                status: 200,
                body: {
                    node.refresh_replication_metrics();
                    node.driver.metrics.render(&stats)
                },
                content_type: "text/plain; version=0.0.4",
            }
        }
        (Method::Get, "/v1/status", _) => Reply::json(200, &status(node)),
        (Method::Get, "/v1/volumes", _) => {
            let volumes: Vec<VolumeInfo> = node
                .volumes()
                .iter()
                .map(|record| volume_info(node, record))
                .collect();
            Reply::json(200, &volumes)
        }
        (Method::Post, "/v1/volumes", _) if node.nbd_address.is_none() => Reply::error(
            409,
            format!(
                "node {:?} is at witness site {:?}, which holds no volumes",
                node.name, node.site
            ),
        ),
        (Method::Post, "/v1/volumes", _) => {
            let create: CreateVolume = match serde_json::from_slice(body) {
                Ok(create) => create,
                Err(error) => return Reply::error(400, format!("bad volume request: {error}")),
            };
            let mode = match create.mode.as_deref() {
                None => stretch_core::Mode::Async,
                Some(text) => match stretch_core::Mode::parse(text) {
                    Some(mode) => mode,
                    None => {
                        return Reply::error(
                            400,
                            format!("unknown mode {text:?}: use async, flush-sync or sync"),
                        );
                    }
                },
            };
            let created = node.create_volume(
                &create.name,
                create.size,
                create.group.as_deref(),
                create.owner.as_deref(),
                mode,
            );
            match created {
                Ok((record, unconfirmed)) => {
                    let mut info = volume_info(node, &record);
                    info.unconfirmed_sites = unconfirmed;
                    Reply::json(201, &info)
                }
                Err(error) => node_error(error),
            }
        }
        (Method::Post, _, Some(rest)) if rest.ends_with("/move") => {
            let name = rest.trim_end_matches("/move");
            let request: MoveVolume = match serde_json::from_slice(body) {
                Ok(request) => request,
                Err(error) => return Reply::error(400, format!("bad move request: {error}")),
            };
            match node.move_volume(name, &request.to) {
                Ok(record) => Reply::json(200, &volume_info(node, &record)),
                Err(error) => node_error(error),
            }
        }
        (Method::Get, _, Some(name)) => match node.volume(name) {
            Some(record) => Reply::json(200, &volume_info(node, &record)),
            None => Reply::error(404, format!("no volume named {name:?}")),
        },
        (Method::Delete, _, Some(name)) => match node.delete_volume(name) {
            Ok(record) => Reply::json(200, &volume_info(node, &record)),
            Err(error) => node_error(error),
        },
        _ => Reply::error(404, format!("no route for {method} {path}")),
    }
}

/// The `/v1/links` routes, or `None` for any other request.
fn link_route(links: &LinkControl, method: &Method, path: &str, body: &[u8]) -> Option<Reply> {
    let result = match (method, path) {
        (Method::Get, "/v1/links") => return Some(Reply::json(200, &links.list())),
        (Method::Post, "/v1/links/set") => match serde_json::from_slice::<SetLink>(body) {
            Ok(set) if set.change() == LinkChange::default() => {
                return Some(Reply::error(
                    400,
                    "nothing to change: give delay_ms, jitter_ms, bandwidth_mbit or loss_pct",
                ));
            }
            Ok(set) => links.set(&set.a, &set.b, &set.change()),
            Err(error) => return Some(Reply::error(400, format!("bad link request: {error}"))),
        },
        (Method::Post, "/v1/links/cut" | "/v1/links/heal") => {
            match serde_json::from_slice::<LinkPair>(body) {
                Ok(pair) if path.ends_with("/cut") => links.cut(&pair.a, &pair.b),
                Ok(pair) => links.heal(&pair.a, &pair.b),
                Err(error) => {
                    return Some(Reply::error(400, format!("bad link request: {error}")));
                }
            }
        }
        _ => return None,
    };
    Some(link_reply(result))
}

fn link_reply(result: Result<LinkInfo, LinkError>) -> Reply {
    match result {
        Ok(info) => Reply::json(200, &info),
        Err(error @ LinkError::UnknownSite { .. }) => Reply::error(404, error),
        Err(error) => Reply::error(400, error),
    }
}

fn node_error(error: NodeError) -> Reply {
    let status = match &error {
        NodeError::Catalog(CatalogError::Exists(_)) | NodeError::Busy(_) => 409,
        NodeError::Catalog(CatalogError::NoSuchVolume(_)) => 404,
        NodeError::Catalog(CatalogError::InvalidName { .. } | CatalogError::InvalidSize { .. })
        | NodeError::UnknownSite(_) => 400,
        NodeError::NotOwner { .. } | NodeError::Move { .. } => 409,
        NodeError::Catalog(CatalogError::Conflict { .. }) | NodeError::Witness => 409,
        _ => 500,
    };
    Reply::error(status, error)
}

fn volume_info(node: &Node, record: &VolumeRecord) -> VolumeInfo {
    VolumeInfo {
        name: record.name.clone(),
        id: record.id,
        size: record.size,
        group: record.group.clone(),
        leg: record.leg.display().to_string(),
        export: node
            .nbd_address
            .map(|address| format!("nbd://{address}/{}", record.name))
            .unwrap_or_default(),
        owner: node.owner_name(record),
        mode: record.mode.clone(),
        replicas: node
            .volume_lags()
            .into_iter()
            .filter(|lag| lag.volume == record.name)
            .map(|lag| ReplicaInfo {
                site: lag.peer,
                unapplied_deltas: lag.unapplied_deltas,
                unapplied_bytes: lag.unapplied_bytes,
                lag_seconds: lag.lag_seconds,
                resync_regions_left: lag.resync_regions_left,
            })
            .collect(),
        unconfirmed_sites: Vec::new(),
    }
}

fn status(node: &Node) -> StatusInfo {
    let (stats, failure, cache_bytes_max) = {
        let engine = node.driver.engine.lock();
        (
            engine.stats(),
            engine.failure().map(str::to_string),
            engine.config().cache_bytes_max,
        )
    };
    StatusInfo {
        cluster: node.cluster.clone(),
        node: node.name.clone(),
        site: node.site.clone(),
        nbd: node.nbd_address.map(|address| address.to_string()),
        uptime_seconds: node.started.elapsed().as_secs(),
        volumes: node.volumes().len() as u64,
        dirty_bytes: stats.dirty_bytes,
        cache_clean_bytes: stats.clean_bytes,
        cache_bytes_max,
        open_deltas: stats.open_deltas,
        unapplied_deltas: stats.unapplied_deltas,
        journal_bytes: stats.journal_bytes,
        throttled_writes: stats.throttled_writes_now,
        failure,
        backlog_bytes: stats.backlog_bytes,
        resync_regions_left: stats.resync_regions_left,
        peers: peer_infos(node),
    }
}

fn peer_infos(node: &Node) -> Vec<PeerInfo> {
    let Some(peers) = node.peers.get() else {
        return Vec::new();
    };
    let connected = peers.connected_sites();
    let rtts = peers.round_trips();
    peers
        .sites()
        .into_iter()
        .map(|site| PeerInfo {
            connected: connected.contains(&site),
            rtt_ms: rtts
                .iter()
                .find(|(name, _)| *name == site)
                .map(|(_, rtt)| rtt.as_secs_f64() * 1e3),
            site,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClusterConfig, LOCAL_CONFIG};

    fn control() -> LinkControl {
        let config = ClusterConfig::parse(LOCAL_CONFIG, "local.toml").expect("valid");
        LinkControl::from_config(&config)
    }

    fn call(links: &LinkControl, method: Method, path: &str, body: &str) -> Reply {
        link_route(links, &method, path, body.as_bytes()).expect("a link route")
    }

    fn error_of(reply: &Reply) -> String {
        let value: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
        value["error"]
            .as_str()
            .expect("an error message")
            .to_string()
    }

    #[test]
    fn link_routes_list_set_cut_and_heal() {
        let links = control();
        let reply = call(&links, Method::Get, "/v1/links", "");
        assert_eq!(reply.status, 200);
        let list: Vec<LinkInfo> = serde_json::from_str(&reply.body).expect("a list");
        assert_eq!(list.len(), 3);
        assert_eq!((list[0].a.as_str(), list[0].b.as_str()), ("a", "b"));
        assert_eq!(list[0].delay_ms, 25);

        let reply = call(
            &links,
            Method::Post,
            "/v1/links/set",
            r#"{"a": "b", "b": "a", "delay_ms": 5, "bandwidth_mbit": 10, "loss_pct": 0.5}"#,
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let info: LinkInfo = serde_json::from_str(&reply.body).expect("a link");
        assert_eq!(info.delay_ms, 5);
        assert_eq!(info.bandwidth_mbit, Some(10.0));
        assert_eq!(info.loss_pct, 0.5);

        let reply = call(
            &links,
            Method::Post,
            "/v1/links/cut",
            r#"{"a": "a", "b": "b"}"#,
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(
            serde_json::from_str::<LinkInfo>(&reply.body)
                .expect("a link")
                .cut
        );
        let reply = call(
            &links,
            Method::Post,
            "/v1/links/heal",
            r#"{"a": "b", "b": "a"}"#,
        );
        let info: LinkInfo = serde_json::from_str(&reply.body).expect("a link");
        assert!(!info.cut);
        assert_eq!(info.delay_ms, 5);
        assert!(link_route(&links, &Method::Get, "/v1/status", b"").is_none());
    }

    #[test]
    fn bad_link_requests_say_why() {
        let links = control();
        let cases = [
            (
                "/v1/links/cut",
                r#"{"a": "a", "b": "zz"}"#,
                404,
                "no site named \"zz\"",
            ),
            (
                "/v1/links/set",
                r#"{"a": "q", "b": "a", "delay_ms": 1}"#,
                404,
                "\"q\"",
            ),
            (
                "/v1/links/heal",
                r#"{"a": "a", "b": "a"}"#,
                400,
                "two different sites",
            ),
            (
                "/v1/links/set",
                r#"{"a": "a", "b": "b", "loss_pct": 150}"#,
                400,
                "loss_pct must be between 0 and 100",
            ),
            (
                "/v1/links/set",
                r#"{"a": "a", "b": "b", "delay_ms": -1}"#,
                400,
                "expected u64",
            ),
            (
                "/v1/links/set",
                r#"{"a": "a", "b": "b"}"#,
                400,
                "nothing to change",
            ),
            (
                "/v1/links/set",
                r#"{"a": "a", "b": "b", "delay": 3}"#,
                400,
                "delay",
            ),
            ("/v1/links/cut", "not json", 400, "bad link request"),
        ];
        for (path, body, status, message) in cases {
            let reply = call(&links, Method::Post, path, body);
            assert_eq!(reply.status, status, "{path} {body}: {}", reply.body);
            let error = error_of(&reply);
            assert!(error.contains(message), "{path} {body}: {error}");
        }
        // Nothing changed.
        assert_eq!(control().list(), links.list());
    }
}
