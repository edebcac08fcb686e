//! A small client for a node's admin API.

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;
use stretch_node::{CreateVolume, LinkInfo, LinkPair, SetLink, StatusInfo, VolumeInfo};

#[derive(Debug)]
pub struct AdminClient {
    base: String,
    agent: ureq::Agent,
}

impl AdminClient {
    pub fn new(base: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build()
            .into();
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            agent,
        }
    }

    pub fn status(&self) -> anyhow::Result<StatusInfo> {
        self.call("GET", "/v1/status", None)
    }

    pub fn volumes(&self) -> anyhow::Result<Vec<VolumeInfo>> {
        self.call("GET", "/v1/volumes", None)
    }

    pub fn volume(&self, name: &str) -> anyhow::Result<VolumeInfo> {
        self.call("GET", &format!("/v1/volumes/{name}"), None)
    }

    pub fn create_volume(&self, request: &CreateVolume) -> anyhow::Result<VolumeInfo> {
        let body = serde_json::to_value(request).context("encoding the request")?;
        self.call("POST", "/v1/volumes", Some(body))
    }

    pub fn delete_volume(&self, name: &str) -> anyhow::Result<VolumeInfo> {
        self.call("DELETE", &format!("/v1/volumes/{name}"), None)
    }

    pub fn move_volume(&self, name: &str, to: &str) -> anyhow::Result<VolumeInfo> {
        let body = serde_json::json!({ "to": to });
        self.call("POST", &format!("/v1/volumes/{name}/move"), Some(body))
    }

    pub fn links(&self) -> anyhow::Result<Vec<LinkInfo>> {
        self.call("GET", "/v1/links", None)
    }

    pub fn set_link(&self, request: &SetLink) -> anyhow::Result<LinkInfo> {
        let body = serde_json::to_value(request).context("encoding the request")?;
        self.call("POST", "/v1/links/set", Some(body))
    }

    pub fn cut_link(&self, pair: &LinkPair) -> anyhow::Result<LinkInfo> {
        let body = serde_json::to_value(pair).context("encoding the request")?;
        self.call("POST", "/v1/links/cut", Some(body))
    }

    pub fn heal_link(&self, pair: &LinkPair) -> anyhow::Result<LinkInfo> {
        let body = serde_json::to_value(pair).context("encoding the request")?;
        self.call("POST", "/v1/links/heal", Some(body))
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, Some(body)) => self.agent.post(&url).send_json(&body),
            (_, None) => self.agent.post(&url).send_empty(),
        };
        let mut response = result.with_context(|| {
            format!("cannot reach the node's admin API at {} (is `stretch up` running? set --admin or STRETCH_ADMIN)", self.base)
        })?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer of {method} {url}"))?;
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|value| {
                    value
                        .get("error")
                        .and_then(|e| e.as_str())
                        .map(str::to_string)
                })
                .unwrap_or(text);
            bail!("{message}");
        }
        serde_json::from_str(&text).with_context(|| format!("unexpected answer from {url}"))
    }
}
