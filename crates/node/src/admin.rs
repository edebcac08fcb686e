//! The admin HTTP API (JSON) and `/metrics`, on a thread of its own.
//!
//! | method | path                  | answer                              |
//! |--------|-----------------------|-------------------------------------|
//! | GET    | /v1/status            | [`StatusInfo`]                      |
//! | GET    | /v1/volumes           | list of [`VolumeInfo`]              |
//! | POST   | /v1/volumes           | [`CreateVolume`] in, [`VolumeInfo`] |
//! | GET    | /v1/volumes/NAME      | [`VolumeInfo`]                      |
//! | DELETE | /v1/volumes/NAME      | [`VolumeInfo`] of the deleted one   |
//! | GET    | /metrics              | Prometheus text format              |
//!
//! Errors come back as `{"error": "..."}` with a 4xx/5xx status.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stretch_storage::{CatalogError, VolumeRecord};
use tiny_http::{Header, Method, Response, Server};
use tokio::sync::watch;

use crate::node::{Node, NodeError};

/// Largest request body accepted.
const BODY_BYTES_MAX: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVolume {
    pub name: String,
    pub size: u64,
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub id: u32,
    pub size: u64,
    pub group: String,
    pub leg: String,
    /// Where a client connects, e.g. `nbd://127.0.0.1:10809/NAME`.
    pub export: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    address: SocketAddr,
    stopped: watch::Receiver<bool>,
) -> std::io::Result<AdminServer> {
    let server = Server::http(address).map_err(std::io::Error::other)?;
    let thread = std::thread::Builder::new()
        .name(format!("{}-admin", node.name))
        .spawn(move || {
            while !*stopped.borrow() {
                match server.recv_timeout(Duration::from_millis(100)) {
                    Ok(Some(request)) => handle(&node, request),
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

fn handle(node: &Arc<Node>, mut request: tiny_http::Request) {
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
                body: node.driver.metrics.render(&stats),
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
            match node.create_volume(&create.name, create.size, create.group.as_deref()) {
                Ok(record) => Reply::json(201, &volume_info(node, &record)),
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

fn node_error(error: NodeError) -> Reply {
    let status = match &error {
        NodeError::Catalog(CatalogError::Exists(_)) | NodeError::Busy(_) => 409,
        NodeError::Catalog(CatalogError::NoSuchVolume(_)) => 404,
        NodeError::Catalog(CatalogError::InvalidName { .. } | CatalogError::InvalidSize { .. }) => {
            400
        }
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
    }
}
