//! The cluster configuration file (TOML): sites, nodes, tuning.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use stretch_core::{BLOCK_SIZE, EngineConfig};

use crate::byte_size::ByteSize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub cluster: ClusterSection,
    #[serde(rename = "site")]
    pub sites: Vec<SiteConfig>,
    #[serde(rename = "node")]
    pub nodes: Vec<NodeConfig>,
    #[serde(default)]
    pub tuning: Tuning,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub site: String,
    pub nbd_listen: SocketAddr,
    pub admin_listen: SocketAddr,
}

/// Engine and storage limits, shared by every node of the cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tuning {
    pub delta_interval_ms: u64,
    pub delta_max_bytes: ByteSize,
    pub cache_bytes_max: ByteSize,
    pub journal_checkpoint_bytes: ByteSize,
    pub journal_segment_bytes: ByteSize,
    pub nbd_request_bytes_max: ByteSize,
    pub nbd_in_flight_per_connection: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        let engine = EngineConfig::default();
        Tuning {
            delta_interval_ms: engine.delta_interval_ms,
            delta_max_bytes: ByteSize(engine.delta_max_bytes),
            cache_bytes_max: ByteSize(engine.cache_bytes_max),
            journal_checkpoint_bytes: ByteSize(engine.journal_checkpoint_bytes),
            journal_segment_bytes: ByteSize(64 << 20),
            nbd_request_bytes_max: ByteSize(32 << 20),
            nbd_in_flight_per_connection: 128,
        }
    }
}

impl Tuning {
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            delta_interval_ms: self.delta_interval_ms,
            delta_max_bytes: self.delta_max_bytes.0,
            cache_bytes_max: self.cache_bytes_max.0,
            journal_checkpoint_bytes: self.journal_checkpoint_bytes.0,
            planted_bug: None,
        }
    }
}

/// The configuration `stretch up` uses when given none.
pub const DEFAULT_CONFIG: &str = include_str!("../../../cluster-configs/single-site.toml");

impl ClusterConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn embedded_default() -> Self {
        Self::parse(DEFAULT_CONFIG, "embedded single-site.toml")
            .expect("embedded default config invariant: it parses and validates")
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: ClusterConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            origin: origin.to_string(),
            message: error.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        })?;
        Ok(config)
    }

    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|node| node.name == name)
    }

    fn validate(&self) -> Result<(), String> {
        if self.sites.is_empty() || self.nodes.is_empty() {
            return Err("at least one [[site]] and one [[node]] are needed".into());
        }
        let mut sites = BTreeSet::new();
        for site in &self.sites {
            if !sites.insert(site.name.as_str()) {
                return Err(format!("site {:?} is listed twice", site.name));
            }
        }
        let mut names = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        for node in &self.nodes {
            if !names.insert(node.name.as_str()) {
                return Err(format!("node {:?} is listed twice", node.name));
            }
            if !sites.contains(node.site.as_str()) {
                return Err(format!(
                    "node {:?} names site {:?}, which is not a [[site]]",
                    node.name, node.site
                ));
            }
            for address in [node.nbd_listen, node.admin_listen] {
                if !addresses.insert(address) {
                    return Err(format!("address {address} is used twice"));
                }
            }
        }
        let tuning = &self.tuning;
        if tuning.delta_interval_ms == 0 {
            return Err("tuning.delta_interval_ms must be at least 1".into());
        }
        if tuning.delta_max_bytes.0 < BLOCK_SIZE as u64 {
            return Err(format!(
                "tuning.delta_max_bytes must be at least {BLOCK_SIZE}"
            ));
        }
        // Room for two full deltas and two largest requests, so a write can
        // always be admitted once the deltas ahead of it drain.
        let needed = 2 * tuning.delta_max_bytes.0 + 4 * tuning.nbd_request_bytes_max.0;
        if tuning.cache_bytes_max.0 < needed {
            return Err(format!(
                "tuning.cache_bytes_max must be at least 2 × delta_max_bytes + 4 × nbd_request_bytes_max ({})",
                ByteSize(needed)
            ));
        }
        if tuning.nbd_request_bytes_max.0 < BLOCK_SIZE as u64
            || tuning.nbd_request_bytes_max.0 > u32::MAX as u64
        {
            return Err("tuning.nbd_request_bytes_max must be between 4K and 4G-1".into());
        }
        if tuning.journal_segment_bytes.0 < 1 << 20 {
            return Err("tuning.journal_segment_bytes must be at least 1M".into());
        }
        if tuning.nbd_in_flight_per_connection == 0 {
            return Err("tuning.nbd_in_flight_per_connection must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let config = ClusterConfig::embedded_default();
        assert_eq!(config.nodes.len(), 1);
        assert_eq!(config.nodes[0].nbd_listen.port(), 10809);
    }

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster-configs");
        for entry in std::fs::read_dir(dir).expect("cluster-configs exists") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                ClusterConfig::load(&path).unwrap_or_else(|error| panic!("{error}"));
            }
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let bad = DEFAULT_CONFIG.replace("site = \"a\"", "site = \"zz\"");
        let error = ClusterConfig::parse(&bad, "test").expect_err("unknown site");
        assert!(error.to_string().contains("\"zz\""), "{error}");
        let typo = DEFAULT_CONFIG.replace("delta_interval_ms", "delta_intervall_ms");
        let error = ClusterConfig::parse(&typo, "test").expect_err("unknown key");
        assert!(error.to_string().contains("delta_intervall_ms"), "{error}");
    }
}
