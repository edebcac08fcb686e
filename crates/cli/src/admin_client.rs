//! A small client for a node's admin API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::de::DeserializeOwned;
use stretch_node::{
    AdminToken, CreateVolume, LinkInfo, LinkPair, LossAccepted, MigrationInfo, SetLink,
    StartMigration, StatusInfo, VolumeInfo,
};

/// Longest wait for the node to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for one answer. It must outlast the node's longest
/// operation, or the CLI reports a failure for a change that then
/// completes: a volume move waits up to 30 s for the new owner to catch up
/// and then up to 5 s per other site to confirm; a create or delete waits
/// up to 5 s per other site. The node runs one volume change at a time, so
/// a change may also wait for the one before it. Five minutes covers two
/// moves back to back in a cluster of 20 sites.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// Bytes of a volume name sent as they are in a URL path; every other byte
/// is percent-encoded, so that `?`, `#`, `/`, `%` and dot segments stay
/// part of the name instead of changing the request.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'~');

fn segment(name: &str) -> String {
    utf8_percent_encode(name, PATH_SEGMENT).to_string()
}

/// The admin token the CLI sends, and where it came from (for messages).
#[derive(Debug, Clone)]
pub struct Credentials {
    token: Option<AdminToken>,
    path: PathBuf,
}

impl Credentials {
    /// Reads the token of `given` (`--token-file` or `STRETCH_TOKEN_FILE`),
    /// which must exist, or else of `default`, which may not: reads need
    /// no token, and a change without one gets a message saying where to
    /// find it.
    pub fn load(given: Option<&Path>, default: &Path) -> anyhow::Result<Credentials> {
        match given {
            Some(path) => {
                let token = AdminToken::read(path)?.with_context(|| {
                    format!("the admin token file {} does not exist", path.display())
                })?;
                Ok(Credentials {
                    token: Some(token),
                    path: path.to_path_buf(),
                })
            }
            None => Ok(Credentials {
                token: AdminToken::read(default)?,
                path: default.to_path_buf(),
            }),
        }
    }

    /// A refusal for missing or wrong credentials, saying what was sent
    /// and where the token comes from.
    fn refusal(&self, message: &str) -> String {
        match &self.token {
            None => format!(
                "the node needs the admin token and none was sent: {} does not exist; \
                 give --token-file FILE or set STRETCH_TOKEN_FILE (admin.token in the PKI \
                 directory of `stretch init` or `stretch up`)",
                self.path.display()
            ),
            Some(_) => format!("{message} (sent the token of {})", self.path.display()),
        }
    }
}

#[derive(Debug)]
pub struct AdminClient {
    base: String,
    agent: ureq::Agent,
    credentials: Credentials,
}

impl AdminClient {
    pub fn new(base: &str, credentials: &Credentials) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(ANSWER_TIMEOUT))
            .build()
            .into();
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            agent,
            credentials: credentials.clone(),
        }
    }

    pub fn status(&self) -> anyhow::Result<StatusInfo> {
        self.call("GET", "/v1/status", None)
    }

    pub fn volumes(&self) -> anyhow::Result<Vec<VolumeInfo>> {
        self.call("GET", "/v1/volumes", None)
    }

    pub fn volume(&self, name: &str) -> anyhow::Result<VolumeInfo> {
        self.call("GET", &format!("/v1/volumes/{}", segment(name)), None)
    }

    pub fn create_volume(&self, request: &CreateVolume) -> anyhow::Result<VolumeInfo> {
        let body = serde_json::to_value(request).context("encoding the request")?;
        self.call("POST", "/v1/volumes", Some(body))
    }

    pub fn delete_volume(&self, name: &str) -> anyhow::Result<VolumeInfo> {
        self.call("DELETE", &format!("/v1/volumes/{}", segment(name)), None)
    }

    pub fn move_volume(&self, name: &str, to: &str) -> anyhow::Result<VolumeInfo> {
        let body = serde_json::json!({ "to": to });
        let path = format!("/v1/volumes/{}/move", segment(name));
        self.call("POST", &path, Some(body))
    }

    pub fn follow_volume(&self, name: &str, follow: &str) -> anyhow::Result<VolumeInfo> {
        let body = serde_json::json!({ "follow": follow });
        let path = format!("/v1/volumes/{}/follow", segment(name));
        self.call("POST", &path, Some(body))
    }

    pub fn promote_volume(&self, name: &str, site: &str) -> anyhow::Result<VolumeInfo> {
        let body = serde_json::json!({ "site": site, "accept_data_loss": true });
        let path = format!("/v1/volumes/{}/promote", segment(name));
        self.call("POST", &path, Some(body))
    }

    pub fn accept_loss(&self, name: &str) -> anyhow::Result<LossAccepted> {
        let body = serde_json::json!({ "accept_data_loss": true });
        let path = format!("/v1/volumes/{}/accept-loss", segment(name));
        self.call("POST", &path, Some(body))
    }

    pub fn start_migration(&self, request: &StartMigration) -> anyhow::Result<MigrationInfo> {
        let body = serde_json::to_value(request).context("encoding the request")?;
        self.call("POST", "/v1/migrations", Some(body))
    }

    pub fn migrations(&self) -> anyhow::Result<Vec<MigrationInfo>> {
        self.call("GET", "/v1/migrations", None)
    }

    pub fn cancel_migration(&self, name: &str) -> anyhow::Result<MigrationInfo> {
        let path = format!("/v1/migrations/{}/cancel", segment(name));
        self.call("POST", &path, None)
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
        let authorization = self
            .credentials
            .token
            .as_ref()
            .map(|token| format!("Bearer {}", token.secret()));
        let result = match (method, body) {
            ("GET", _) => with_token(self.agent.get(&url), authorization.as_deref()).call(),
            ("DELETE", _) => with_token(self.agent.delete(&url), authorization.as_deref()).call(),
            // send_json declares `Content-Type: application/json`, which the
            // node requires of every body.
            (_, Some(body)) => {
                with_token(self.agent.post(&url), authorization.as_deref()).send_json(&body)
            }
            (_, None) => with_token(self.agent.post(&url), authorization.as_deref())
                .content_type("application/json")
                .send_empty(),
        };
        let mut response = match result {
            Ok(response) => response,
            Err(ureq::Error::Timeout(_)) => bail!(
                "the node's admin API at {} did not answer {method} {path} within {} s; \
                 a change may still complete there: check with `stretch volume list`",
                self.base,
                ANSWER_TIMEOUT.as_secs()
            ),
            Err(error) => {
                return Err(error).with_context(|| {
                    format!(
                        "cannot reach the node's admin API at {} (is `stretch up` running? set --admin or STRETCH_ADMIN)",
                        self.base
                    )
                });
            }
        };
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
            if status == 401 {
                bail!("{}", self.credentials.refusal(&message));
            }
            bail!("{message}");
        }
        serde_json::from_str(&text).with_context(|| format!("unexpected answer from {url}"))
    }
}

/// Adds `Authorization` when there is a token to send.
fn with_token<B>(
    request: ureq::RequestBuilder<B>,
    authorization: Option<&str>,
) -> ureq::RequestBuilder<B> {
    match authorization {
        Some(value) => request.header("Authorization", value),
        None => request,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_path_segment() {
        assert_eq!(segment("vm1"), "vm1");
        assert_eq!(segment("vol?x"), "vol%3Fx");
        assert_eq!(segment("a/b"), "a%2Fb");
        assert_eq!(segment(".."), "%2E%2E");
        assert_eq!(segment("x y#z%"), "x%20y%23z%25");
        assert_eq!(segment("db-1_a~"), "db-1_a~");
        assert_eq!(segment("é"), "%C3%A9");
    }
}
