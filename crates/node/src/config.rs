//! The cluster configuration file (TOML): sites, nodes, links, tuning.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stretch_core::{BLOCK_SIZE, DELTA_RECORD_BYTES_MAX, EngineConfig, LinkProfile};

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
    /// Shaped links between sites; a pair of sites without one is unshaped.
    #[serde(rename = "link", default)]
    pub links: Vec<LinkConfig>,
    #[serde(default)]
    pub tuning: Tuning,
    /// Who may use the admin API (see the admin module).
    #[serde(default)]
    pub admin: crate::admin::AdminConfig,
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
    #[serde(default)]
    pub role: SiteRole,
}

/// What a site is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteRole {
    /// Holds volume legs and serves them over NBD.
    #[default]
    Data,
    /// A metadata-only voter at a third failure domain: holds no volumes.
    Witness,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub site: String,
    /// NBD listener; every node of a data site has one, a witness none.
    #[serde(default)]
    pub nbd_listen: Option<SocketAddr>,
    pub admin_listen: SocketAddr,
    /// UDP address for QUIC between nodes; needed once more than one site
    /// holds data.
    #[serde(default)]
    pub peer_listen: Option<SocketAddr>,
    /// This node's NBD TLS policy; `tuning.nbd_tls` when absent.
    #[serde(default)]
    pub nbd_tls: Option<NbdTls>,
    /// PEM certificate chain (leaf first) the NBD server presents; the
    /// node's cluster certificate (`PKI_DIR/NAME.pem`) when absent. Clients
    /// check that it names the host or address they connect to.
    #[serde(default)]
    pub nbd_tls_cert: Option<PathBuf>,
    /// PEM private key for `nbd_tls_cert` (`PKI_DIR/NAME.key` when absent).
    #[serde(default)]
    pub nbd_tls_key: Option<PathBuf>,
}

/// Whether a node's NBD server speaks TLS (NBD_OPT_STARTTLS, x509).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NbdTls {
    /// Plain only: STARTTLS is refused as unsupported.
    #[default]
    Off,
    /// Plain and TLS clients are both served.
    On,
    /// Only TLS clients are served: before STARTTLS every option, the
    /// export list included, is refused with NBD_REP_ERR_TLS_REQD.
    Require,
}

impl NodeConfig {
    /// The NBD TLS policy in force for this node.
    pub fn nbd_tls(&self, tuning: &Tuning) -> NbdTls {
        self.nbd_tls.unwrap_or(tuning.nbd_tls)
    }
}

/// Longest cluster, site or node name accepted, in bytes.
pub const CONFIG_NAME_BYTES_MAX: usize = 64;

/// Checks a cluster, site or node name (`kind` names which in the error).
///
/// Node names become directories (`<data-dir>/<node>`) and certificate file
/// names, and every name travels in certificates, metrics labels and peer
/// messages, so only a plain file-name-safe word is accepted: letters,
/// digits, '.', '_' and '-', not starting with '.' (which also rules out
/// `.` and `..`), at most [`CONFIG_NAME_BYTES_MAX`] bytes. A name such as
/// `../x` would otherwise put a node's data outside the data directory.
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    let invalid = |reason: &str| Err(format!("{kind} name {name:?} is invalid: {reason}"));
    if name.is_empty() || name.len() > CONFIG_NAME_BYTES_MAX {
        return invalid(&format!("must be 1 to {CONFIG_NAME_BYTES_MAX} bytes long"));
    }
    if name.starts_with('.') {
        return invalid("must not start with '.'");
    }
    if !name
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
    {
        return invalid("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Longest one-way delay or jitter a link accepts, in milliseconds.
pub const LINK_DELAY_MS_MAX: u64 = 60_000;
/// Highest bandwidth limit a link accepts, in Mbit/s.
pub const LINK_BANDWIDTH_MBIT_MAX: f64 = 1_000_000.0;

/// One `[[link]]`: how datagrams between two sites travel, the same in both
/// directions.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// The two sites the link joins.
    pub sites: Vec<String>,
    /// One-way delay in milliseconds.
    pub delay_ms: u64,
    /// Extra one-way delay, uniform in `0..=jitter_ms`, per datagram.
    #[serde(default)]
    pub jitter_ms: u64,
    /// Bandwidth limit in Mbit/s; absent or 0 for unlimited.
    #[serde(default)]
    pub bandwidth_mbit: Option<f64>,
    /// Datagrams lost at random, in percent (0 to 100).
    #[serde(default)]
    pub loss_pct: f64,
    /// How block payloads travel on this link; absent: as
    /// `tuning.link_compression` says.
    #[serde(default)]
    pub compression: Option<LinkCompression>,
}

/// How block payloads (deltas, resync chunks, strict-read answers) travel
/// between two sites: each 4 KiB block LZ4-compressed where that saves at
/// least an eighth of it (`lz4`), or always raw (`off`, for links fast
/// enough that the CPU costs more than the bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkCompression {
    Off,
    #[default]
    Lz4,
}

/// How the QUIC connections between sites pace what they send (see
/// [`stretch_transport::CongestionControl`]): `bbr` (the default) follows
/// the measured bottleneck rate and shrugs off a lost packet; `cubic` is
/// loss-based, like most TCP stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkCongestionControl {
    #[default]
    Bbr,
    Cubic,
}

impl From<LinkCongestionControl> for stretch_transport::CongestionControl {
    fn from(congestion: LinkCongestionControl) -> Self {
        match congestion {
            LinkCongestionControl::Bbr => stretch_transport::CongestionControl::Bbr,
            LinkCongestionControl::Cubic => stretch_transport::CongestionControl::Cubic,
        }
    }
}

impl From<LinkCompression> for stretch_wire::Compression {
    fn from(compression: LinkCompression) -> Self {
        match compression {
            LinkCompression::Off => stretch_wire::Compression::Off,
            LinkCompression::Lz4 => stretch_wire::Compression::Lz4,
        }
    }
}

impl LinkConfig {
    /// The link as the shaper sees it, or what is out of range.
    pub fn profile(&self) -> Result<LinkProfile, String> {
        Ok(LinkProfile {
            delay_ms: link_delay_ms("delay_ms", self.delay_ms)?,
            jitter_ms: link_delay_ms("jitter_ms", self.jitter_ms)?,
            bandwidth_kbit: link_bandwidth_kbit(self.bandwidth_mbit.unwrap_or(0.0))?,
            loss_ppm: link_loss_ppm(self.loss_pct)?,
            cut: false,
        })
    }
}

/// Checks a delay or jitter (`key` names it in the error).
pub(crate) fn link_delay_ms(key: &str, ms: u64) -> Result<u64, String> {
    if ms > LINK_DELAY_MS_MAX {
        return Err(format!(
            "{key} must be at most {LINK_DELAY_MS_MAX} (got {ms})"
        ));
    }
    Ok(ms)
}

/// Mbit/s to the shaper's kbit/s; 0 is unlimited.
pub(crate) fn link_bandwidth_kbit(mbit: f64) -> Result<Option<u64>, String> {
    if !(0.0..=LINK_BANDWIDTH_MBIT_MAX).contains(&mbit) {
        return Err(format!(
            "bandwidth_mbit must be between 0 (unlimited) and {LINK_BANDWIDTH_MBIT_MAX} (got {mbit})"
        ));
    }
    if mbit == 0.0 {
        return Ok(None);
    }
    let kbit = (mbit * 1000.0).round() as u64;
    if kbit == 0 {
        return Err(format!(
            "bandwidth_mbit must be at least 0.001 unless 0 (unlimited) (got {mbit})"
        ));
    }
    Ok(Some(kbit))
}

/// Percent to the shaper's parts per million.
pub(crate) fn link_loss_ppm(pct: f64) -> Result<u32, String> {
    if !(0.0..=100.0).contains(&pct) {
        return Err(format!("loss_pct must be between 0 and 100 (got {pct})"));
    }
    Ok((pct * 10_000.0).round() as u32)
}

/// Highest `tuning.nbd_connections_max` accepted: far above what one
/// node's file descriptors allow by default, a guard against typos.
pub const NBD_CONNECTIONS_MAX: usize = 1 << 20;
/// Highest `tuning.nbd_in_flight_bytes_max` accepted, in bytes (1 TiB).
pub const NBD_IN_FLIGHT_BYTES_MAX: u64 = 1 << 40;

/// Bounds of `tuning.image_offer_wait_ms`: at least a few round trips of
/// a slow link and a Raft commit, at most what a failover may be held.
const IMAGE_OFFER_WAIT_MS_MIN: u64 = 200;
const IMAGE_OFFER_WAIT_MS_MAX: u64 = 30_000;

/// Most regions a resync may keep in flight to one site (64 MiB: the
/// connection's flow-control window).
const RESYNC_CHUNKS_IN_FLIGHT_MAX: usize = 64;

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
    /// NBD connections one node serves at once; further clients wait to be
    /// accepted (back-pressure, not refusal).
    pub nbd_connections_max: usize,
    /// READ and WRITE payload bytes one node's NBD connections hold in
    /// memory together; past it connections stop reading until replies go
    /// out. Bounds what hostile or stuck clients can make a node buffer.
    pub nbd_in_flight_bytes_max: ByteSize,
    /// Bound on delta bytes shipped but not yet applied at every site;
    /// writes are throttled past it.
    pub backlog_bytes_max: ByteSize,
    /// Longest a write waits on a full backlog before the sites holding it
    /// back are resynced by region instead (see the engine config).
    pub backlog_wait_ms_max: u64,
    /// Bound on delta bytes shipped to one site for one group and not yet
    /// in its journal; past it deltas wait in the backlog and leave merged
    /// (see the engine config). Must exceed the link's bandwidth-delay
    /// product, or it caps replication at this many bytes per round trip.
    /// Within it the window follows the link: twice what the site
    /// acknowledged per round trip lately.
    pub ship_window_bytes_max: ByteSize,
    /// The window before the link's rate is measured (and its least size):
    /// what a link cut before anything was measured takes in before the
    /// cut is noticed. At most `ship_window_bytes_max`; unset, 1M or the
    /// maximum if that is smaller.
    pub ship_window_bytes_min: Option<ByteSize>,
    /// Regions (1 MiB each) a resync keeps being read and sent to one site
    /// and not yet on its legs: its rate is at most this many MiB per round
    /// trip, and its memory this many MiB. 1 to 64.
    pub resync_chunks_in_flight_max: usize,
    /// A strict read or forwarded write at a non-owner site fails with EIO
    /// after this long without an answer from the owner.
    pub remote_timeout_ms: u64,
    /// NBD TLS policy of every node that does not set its own `nbd_tls`.
    pub nbd_tls: NbdTls,
    /// How long one ownership-lease grant lets a data site serve its
    /// volumes, counted on its clock from when it asked.
    pub lease_ms: u64,
    /// How often a data site asks every voter to renew its lease.
    pub lease_renew_ms: u64,
    /// Worst clock-rate difference between any two nodes, in parts per
    /// million; leases and takeovers are stretched by it.
    pub clock_drift_ppm: u64,
    /// Added to every lease promise and takeover wait (a process paused
    /// between reading its clock and acting).
    pub lease_margin_ms: u64,
    /// How long requests to a volume this site owns wait for a lease when
    /// it holds none, before failing with EIO.
    pub suspend_hold_ms: u64,
    /// With three or more data sites: how long a survivor about to take a
    /// lost owner's group waits for the other survivors that hold a lease
    /// to offer their images (the newest takes it). Past it, survivors that
    /// did not offer are passed over.
    pub image_offer_wait_ms: u64,
    /// Ownership that follows the workload (groups set to `follow auto`):
    /// a group moves to a site that brings at least this share of its
    /// requests, in percent (51 to 100) ...
    pub follow_share_percent_min: u32,
    /// ... over this long, in milliseconds (at least 1000) ...
    pub follow_window_ms: u64,
    /// ... at this many requests per second or more (all sites) ...
    pub follow_requests_per_second_min: u64,
    /// ... and at most once in this long, in milliseconds (at least
    /// `follow_window_ms`), counted from any change of owner.
    pub follow_interval_between_moves_ms: u64,
    /// How block payloads travel between sites, unless a `[[link]]` says
    /// otherwise.
    pub link_compression: LinkCompression,
    /// How connections between sites pace what they send: `bbr` or
    /// `cubic`.
    pub link_congestion_control: LinkCongestionControl,
    /// Read leases: how long the owner of a volume lets another site serve
    /// strict reads of a 1 MiB region it is not writing from that site's
    /// own copy, counted from when that site asked (0: off; every strict
    /// read at a site that does not own the volume asks the owner). An
    /// owner's first write to a leased region waits for the lease to be
    /// revoked: one round trip, or this long if the holder is cut off (a
    /// write forwarded from another site waits at most half of
    /// `remote_timeout_ms`, then fails with EIO).
    pub read_lease_ms: u64,
    /// A region whose lease a write revoked is not leased again for this
    /// long: the owner is writing it.
    pub read_lease_cooldown_ms: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        let engine = EngineConfig::default();
        let lease = stretch_control::LeaseConfig::default();
        let follow = stretch_control::FollowSettings::DEFAULT;
        Tuning {
            delta_interval_ms: engine.delta_interval_ms,
            delta_max_bytes: ByteSize(engine.delta_max_bytes),
            cache_bytes_max: ByteSize(engine.cache_bytes_max),
            journal_checkpoint_bytes: ByteSize(engine.journal_checkpoint_bytes),
            journal_segment_bytes: ByteSize(64 << 20),
            nbd_request_bytes_max: ByteSize(32 << 20),
            nbd_in_flight_per_connection: 128,
            nbd_connections_max: stretch_nbd::DEFAULT_MAX_CONNECTIONS,
            nbd_in_flight_bytes_max: ByteSize(stretch_nbd::DEFAULT_MAX_IN_FLIGHT_BYTES),
            backlog_bytes_max: ByteSize(256 << 20),
            backlog_wait_ms_max: engine.backlog_wait_ms_max,
            ship_window_bytes_max: ByteSize(engine.ship_window_bytes_max),
            ship_window_bytes_min: None,
            resync_chunks_in_flight_max: engine.resync_chunks_in_flight_max,
            remote_timeout_ms: 5000,
            nbd_tls: NbdTls::Off,
            lease_ms: lease.lease_ms,
            lease_renew_ms: lease.renew_ms,
            clock_drift_ppm: lease.drift_ppm,
            lease_margin_ms: lease.margin_ms,
            suspend_hold_ms: engine.suspend_hold_ms,
            image_offer_wait_ms: stretch_control::IMAGE_OFFER_WAIT_MS,
            follow_share_percent_min: follow.share_percent_min,
            follow_window_ms: follow.window_ms,
            follow_requests_per_second_min: follow.requests_per_second_min,
            follow_interval_between_moves_ms: follow.interval_between_moves_ms,
            link_compression: LinkCompression::default(),
            link_congestion_control: LinkCongestionControl::default(),
            read_lease_ms: 2000,
            read_lease_cooldown_ms: 10_000,
        }
    }
}

impl Tuning {
    /// When a group set to `follow auto` moves after its workload.
    pub fn follow(&self) -> stretch_control::FollowSettings {
        stretch_control::FollowSettings {
            share_percent_min: self.follow_share_percent_min,
            window_ms: self.follow_window_ms,
            requests_per_second_min: self.follow_requests_per_second_min,
            interval_between_moves_ms: self.follow_interval_between_moves_ms,
        }
    }

    /// The ownership-lease timing of every node.
    pub fn lease(&self) -> stretch_control::LeaseConfig {
        stretch_control::LeaseConfig {
            lease_ms: self.lease_ms,
            renew_ms: self.lease_renew_ms,
            drift_ppm: self.clock_drift_ppm,
            margin_ms: self.lease_margin_ms,
            planted_bug: None,
        }
    }

    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            delta_interval_ms: self.delta_interval_ms,
            delta_max_bytes: self.delta_max_bytes.0,
            cache_bytes_max: self.cache_bytes_max.0,
            journal_checkpoint_bytes: self.journal_checkpoint_bytes.0,
            backlog_bytes_max: self.backlog_bytes_max.0,
            backlog_wait_ms_max: self.backlog_wait_ms_max,
            ship_window_bytes_max: self.ship_window_bytes_max.0,
            ship_window_bytes_min: self.ship_window_bytes_min.map_or_else(
                || {
                    EngineConfig::default()
                        .ship_window_bytes_min
                        .min(self.ship_window_bytes_max.0)
                },
                |bytes| bytes.0,
            ),
            remote_timeout_ms: self.remote_timeout_ms,
            resync_chunks_in_flight_max: self.resync_chunks_in_flight_max,
            suspend_hold_ms: self.suspend_hold_ms,
            read_lease_ms: self.read_lease_ms,
            read_lease_cooldown_ms: self.read_lease_cooldown_ms,
            clock_drift_ppm: self.clock_drift_ppm,
            // The site and its peers come from the node's place in the
            // cluster, not from tuning.
            ..EngineConfig::default()
        }
    }
}

/// The configuration `stretch up` uses when given none.
/// Two data sites 25 ms apart (one way) and a witness, on loopback.
pub const DEFAULT_CONFIG: &str = LOCAL_CONFIG;

/// One site, one node, on loopback.
#[cfg(test)]
pub const SINGLE_SITE_CONFIG: &str = include_str!("../../../cluster-configs/single-site.toml");

/// Two data sites 25 ms apart (one way) and a witness, on loopback.
pub const LOCAL_CONFIG: &str = include_str!("../../../cluster-configs/local.toml");

impl ClusterConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn embedded_default() -> Self {
        Self::parse(DEFAULT_CONFIG, "embedded local.toml")
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

    pub fn site(&self, name: &str) -> Option<&SiteConfig> {
        self.sites.iter().find(|site| site.name == name)
    }

    /// The sites that hold volumes (every site but the witness), in
    /// config order.
    pub fn data_sites(&self) -> Vec<&SiteConfig> {
        self.sites
            .iter()
            .filter(|site| site.role == SiteRole::Data)
            .collect()
    }

    /// Whether `node` belongs to a data site.
    pub fn is_data_node(&self, node: &NodeConfig) -> bool {
        self.site(&node.site)
            .is_some_and(|site| site.role == SiteRole::Data)
    }

    /// The data nodes other than `node_name` (at its own site and others),
    /// in config order: whom a node ships deltas to and reads from.
    pub fn peers(&self, node_name: &str) -> Vec<&NodeConfig> {
        self.nodes
            .iter()
            .filter(|node| node.name != node_name && self.is_data_node(node))
            .collect()
    }

    /// How datagrams between sites `a` and `b` travel (either direction):
    /// the `[[link]]` joining them, or an unshaped link if none does.
    pub fn link_profile(&self, a: &str, b: &str) -> LinkProfile {
        self.links
            .iter()
            .find(|link| link_joins(link, a, b))
            .and_then(|link| link.profile().ok())
            .unwrap_or(LinkProfile::IDEAL)
    }

    /// How block payloads travel between sites `a` and `b`: as the
    /// `[[link]]` joining them says, or as `tuning.link_compression` does.
    pub fn link_compression(&self, a: &str, b: &str) -> stretch_wire::Compression {
        self.links
            .iter()
            .find(|link| link_joins(link, a, b))
            .and_then(|link| link.compression)
            .unwrap_or(self.tuning.link_compression)
            .into()
    }

    fn validate(&self) -> Result<(), String> {
        self.admin.validate()?;
        if self.sites.is_empty() || self.nodes.is_empty() {
            return Err("at least one [[site]] and one [[node]] are needed".into());
        }
        validate_name("cluster", &self.cluster.name)?;
        for site in &self.sites {
            validate_name("site", &site.name)?;
        }
        for node in &self.nodes {
            validate_name("node", &node.name)?;
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
            let Some(site) = self.site(&node.site) else {
                return Err(format!(
                    "node {:?} names site {:?}, which is not a [[site]]",
                    node.name, node.site
                ));
            };
            match (site.role, node.nbd_listen) {
                (SiteRole::Data, None) => {
                    return Err(format!(
                        "node {:?} needs nbd_listen: site {:?} holds volumes",
                        node.name, site.name
                    ));
                }
                (SiteRole::Witness, Some(_)) => {
                    return Err(format!(
                        "node {:?} has nbd_listen, but site {:?} is a witness and holds no volumes",
                        node.name, site.name
                    ));
                }
                _ => {}
            }
            if node.nbd_tls_cert.is_some() != node.nbd_tls_key.is_some() {
                return Err(format!(
                    "node {:?}: nbd_tls_cert and nbd_tls_key go together",
                    node.name
                ));
            }
            // A certificate with TLS off is almost surely a mistake that
            // would leave the operator believing traffic is encrypted.
            if node.nbd_tls_cert.is_some() && node.nbd_tls(&self.tuning) == NbdTls::Off {
                return Err(format!(
                    "node {:?} has nbd_tls_cert but nbd_tls is \"off\"",
                    node.name
                ));
            }
            let listeners = [Some(node.admin_listen), node.nbd_listen, node.peer_listen];
            for address in listeners.into_iter().flatten() {
                if !addresses.insert(address) {
                    return Err(format!("address {address} is used twice"));
                }
            }
        }
        let data_sites: BTreeSet<&str> = self
            .nodes
            .iter()
            .filter(|node| self.is_data_node(node))
            .map(|node| node.site.as_str())
            .collect();
        if data_sites.is_empty() {
            return Err("at least one [[node]] must be at a data site (role = \"data\")".into());
        }
        let without_peer = self.nodes.iter().find(|node| node.peer_listen.is_none());
        if let (true, Some(node)) = (data_sites.len() > 1, without_peer) {
            return Err(format!(
                "node {:?} needs peer_listen: more than one site holds data, so nodes talk to each other",
                node.name
            ));
        }
        self.validate_links(&sites)?;
        let tuning = &self.tuning;
        if tuning.delta_interval_ms == 0 {
            return Err("tuning.delta_interval_ms must be at least 1".into());
        }
        // A delta's record, and so a request's blocks, travel to other
        // sites in one frame.
        if tuning.delta_max_bytes.0 < BLOCK_SIZE as u64
            || tuning.delta_max_bytes.0 > DELTA_RECORD_BYTES_MAX
        {
            return Err(format!(
                "tuning.delta_max_bytes must be between {BLOCK_SIZE} and {} (a delta travels to other sites in one frame)",
                ByteSize(DELTA_RECORD_BYTES_MAX)
            ));
        }
        if tuning.nbd_request_bytes_max.0 < BLOCK_SIZE as u64
            || tuning.nbd_request_bytes_max.0 > DELTA_RECORD_BYTES_MAX
        {
            return Err(format!(
                "tuning.nbd_request_bytes_max must be between 4K and {} (a write's blocks travel to other sites in one frame)",
                ByteSize(DELTA_RECORD_BYTES_MAX)
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
        if tuning.journal_segment_bytes.0 < 1 << 20 {
            return Err("tuning.journal_segment_bytes must be at least 1M".into());
        }
        if tuning.nbd_in_flight_per_connection == 0 {
            return Err("tuning.nbd_in_flight_per_connection must be at least 1".into());
        }
        if tuning.nbd_connections_max == 0 || tuning.nbd_connections_max > NBD_CONNECTIONS_MAX {
            return Err(format!(
                "tuning.nbd_connections_max must be between 1 and {NBD_CONNECTIONS_MAX}"
            ));
        }
        if tuning.nbd_in_flight_bytes_max.0 < tuning.nbd_request_bytes_max.0
            || tuning.nbd_in_flight_bytes_max.0 > NBD_IN_FLIGHT_BYTES_MAX
        {
            return Err(format!(
                "tuning.nbd_in_flight_bytes_max must be between nbd_request_bytes_max ({}) and {}",
                tuning.nbd_request_bytes_max,
                ByteSize(NBD_IN_FLIGHT_BYTES_MAX)
            ));
        }
        if tuning.backlog_bytes_max.0 < tuning.delta_max_bytes.0 {
            return Err(format!(
                "tuning.backlog_bytes_max must be at least delta_max_bytes ({})",
                tuning.delta_max_bytes
            ));
        }
        if tuning.ship_window_bytes_max.0 < BLOCK_SIZE as u64 {
            return Err(format!(
                "tuning.ship_window_bytes_max must be at least {BLOCK_SIZE}"
            ));
        }
        if !(1..=RESYNC_CHUNKS_IN_FLIGHT_MAX).contains(&tuning.resync_chunks_in_flight_max) {
            return Err(format!(
                "tuning.resync_chunks_in_flight_max must be 1 to {RESYNC_CHUNKS_IN_FLIGHT_MAX} \
                 (regions of 1 MiB in flight to one site)"
            ));
        }
        if let Some(min) = tuning.ship_window_bytes_min {
            if min.0 < BLOCK_SIZE as u64 {
                return Err(format!(
                    "tuning.ship_window_bytes_min must be at least {BLOCK_SIZE}"
                ));
            }
            if min.0 > tuning.ship_window_bytes_max.0 {
                return Err(format!(
                    "tuning.ship_window_bytes_min ({min}) must be at most \
                     ship_window_bytes_max ({})",
                    tuning.ship_window_bytes_max
                ));
            }
        }
        if tuning.remote_timeout_ms == 0 {
            return Err("tuning.remote_timeout_ms must be at least 1".into());
        }
        if tuning.backlog_wait_ms_max == 0 {
            return Err("tuning.backlog_wait_ms_max must be at least 1".into());
        }
        if tuning.lease_renew_ms == 0 || tuning.lease_ms < 3 * tuning.lease_renew_ms {
            return Err(format!(
                "tuning.lease_ms ({}) must be at least three renewals (3 x lease_renew_ms = {}), and lease_renew_ms at least 1: a lease must survive a lost renewal",
                tuning.lease_ms,
                3 * tuning.lease_renew_ms
            ));
        }
        if tuning.clock_drift_ppm > 100_000 {
            return Err("tuning.clock_drift_ppm must be at most 100000 (10 %)".into());
        }
        if tuning.suspend_hold_ms == 0 {
            return Err("tuning.suspend_hold_ms must be at least 1".into());
        }
        if !(IMAGE_OFFER_WAIT_MS_MIN..=IMAGE_OFFER_WAIT_MS_MAX)
            .contains(&tuning.image_offer_wait_ms)
        {
            return Err(format!(
                "tuning.image_offer_wait_ms must be {IMAGE_OFFER_WAIT_MS_MIN} to {IMAGE_OFFER_WAIT_MS_MAX}: shorter, a survivor that is a round trip slower to offer its newer image is passed over; longer holds a failover back"
            ));
        }
        if let Err(reason) = tuning.follow().check() {
            return Err(format!("tuning.follow_{reason}"));
        }
        Ok(())
    }

    fn validate_links(&self, sites: &BTreeSet<&str>) -> Result<(), String> {
        let mut pairs = BTreeSet::new();
        for link in &self.links {
            let [a, b] = link.sites.as_slice() else {
                return Err(format!(
                    "[[link]] sites = {:?}: a link joins exactly two sites",
                    link.sites
                ));
            };
            for site in [a, b] {
                if !sites.contains(site.as_str()) {
                    return Err(format!(
                        "[[link]] sites = {:?}: site {site:?} is not a [[site]]",
                        link.sites
                    ));
                }
            }
            if a == b {
                return Err(format!(
                    "[[link]] sites = {:?}: a link joins two different sites",
                    link.sites
                ));
            }
            if !pairs.insert(site_pair(a, b)) {
                return Err(format!(
                    "[[link]] sites = {:?}: sites {a:?} and {b:?} already have a [[link]]",
                    link.sites
                ));
            }
            link.profile()
                .map_err(|message| format!("[[link]] {a} <-> {b}: {message}"))?;
        }
        Ok(())
    }
}

/// A pair of sites in a fixed order, so `(a, b)` and `(b, a)` are one link.
pub(crate) fn site_pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

fn link_joins(link: &LinkConfig, a: &str, b: &str) -> bool {
    match link.sites.as_slice() {
        [x, y] => (x == a && y == b) || (x == b && y == a),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of `cluster-configs/`, embedded so a broken one fails the
    /// build's tests wherever they run.
    const SHIPPED: [(&str, &str); 5] = [
        ("single-site.toml", SINGLE_SITE_CONFIG),
        ("local.toml", LOCAL_CONFIG),
        (
            "metro.toml",
            include_str!("../../../cluster-configs/metro.toml"),
        ),
        (
            "geo.toml",
            include_str!("../../../cluster-configs/geo.toml"),
        ),
        (
            "three-site.toml",
            include_str!("../../../cluster-configs/three-site.toml"),
        ),
    ];

    fn shipped(name: &str) -> ClusterConfig {
        let (_, text) = SHIPPED
            .iter()
            .find(|(file, _)| *file == name)
            .unwrap_or_else(|| panic!("{name} is not shipped"));
        ClusterConfig::parse(text, name).unwrap_or_else(|error| panic!("{error}"))
    }

    #[test]
    fn nbd_tls_defaults_off_and_nodes_override_tuning() {
        let config = ClusterConfig::parse(SINGLE_SITE_CONFIG, "test").expect("parses");
        assert_eq!(config.tuning.nbd_tls, NbdTls::Off);
        assert_eq!(config.nodes[0].nbd_tls(&config.tuning), NbdTls::Off);

        let text = SINGLE_SITE_CONFIG.replace("nbd_tls = \"off\"", "nbd_tls = \"require\"");
        let config = ClusterConfig::parse(&text, "test").expect("parses");
        assert_eq!(config.nodes[0].nbd_tls(&config.tuning), NbdTls::Require);

        let text = SINGLE_SITE_CONFIG.replace(
            "# nbd_tls = \"require\"",
            "nbd_tls = \"on\"\nnbd_tls_cert = \"/x.pem\"\nnbd_tls_key = \"/x.key\"",
        );
        let config = ClusterConfig::parse(&text, "test").expect("parses");
        assert_eq!(config.tuning.nbd_tls, NbdTls::Off);
        assert_eq!(config.nodes[0].nbd_tls(&config.tuning), NbdTls::On);
        assert_eq!(
            config.nodes[0].nbd_tls_cert.as_deref(),
            Some(Path::new("/x.pem"))
        );

        let typo = SINGLE_SITE_CONFIG.replace("nbd_tls = \"off\"", "nbd_tls = \"yes\"");
        assert!(parse_error(&typo).contains("nbd_tls"));
    }

    #[test]
    fn links_compress_by_default_and_a_link_may_say_otherwise() {
        use stretch_wire::Compression;
        let config = shipped("local.toml");
        assert_eq!(config.link_compression("a", "b"), Compression::Lz4);
        assert_eq!(config.link_compression("b", "a"), Compression::Lz4);

        let text = LOCAL_CONFIG.replace("# compression = \"lz4\"", "compression = \"off\"");
        let config = ClusterConfig::parse(&text, "test").expect("parses");
        assert_eq!(config.link_compression("b", "a"), Compression::Off);

        let text = LOCAL_CONFIG.replace("link_compression = \"lz4\"", "link_compression = \"off\"");
        let config = ClusterConfig::parse(&text, "test").expect("parses");
        assert_eq!(config.link_compression("a", "b"), Compression::Off);

        let typo =
            LOCAL_CONFIG.replace("link_compression = \"lz4\"", "link_compression = \"zstd\"");
        assert!(parse_error(&typo).contains("link_compression"));
    }

    #[test]
    fn nbd_tls_certificate_needs_its_key_and_tls_on() {
        let text = SINGLE_SITE_CONFIG.replace(
            "# nbd_tls = \"require\"",
            "nbd_tls = \"on\"\nnbd_tls_cert = \"/x.pem\"",
        );
        assert!(parse_error(&text).contains("go together"));
        let text = SINGLE_SITE_CONFIG.replace(
            "# nbd_tls_cert = \"/etc/stretch/nbd-a1.pem\"\n# nbd_tls_key",
            "nbd_tls_cert = \"/x.pem\"\nnbd_tls_key",
        );
        let error = parse_error(&text);
        assert!(error.contains("nbd_tls is \"off\""), "{error}");
    }

    fn parse_error(text: &str) -> String {
        ClusterConfig::parse(text, "test")
            .expect_err("config must be refused")
            .to_string()
    }

    #[test]
    fn embedded_default_is_two_sites_25_ms_apart_and_a_witness() {
        let config = ClusterConfig::embedded_default();
        let data: Vec<&str> = config
            .data_sites()
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(data, ["a", "b"]);
        assert_eq!(config.sites.len(), 3);
        assert_eq!(config.link_profile("a", "b").delay_ms, 25);
        assert_eq!(config.peers("a1").len(), 1);
    }

    #[test]
    fn single_site_config_is_valid() {
        let config = ClusterConfig::parse(SINGLE_SITE_CONFIG, "single-site.toml").expect("valid");
        assert_eq!(config.nodes.len(), 1);
        assert_eq!(
            config.nodes[0].nbd_listen.map(|address| address.port()),
            Some(10809)
        );
        assert!(config.links.is_empty());
        assert_eq!(config.tuning.backlog_bytes_max, ByteSize(256 << 20));
        assert_eq!(config.tuning.remote_timeout_ms, 5000);
    }

    #[test]
    fn every_shipped_config_parses() {
        for (name, text) in SHIPPED {
            ClusterConfig::parse(text, name).unwrap_or_else(|error| panic!("{error}"));
        }
        // And no file of the folder is left out of the list above.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster-configs");
        for entry in std::fs::read_dir(dir).expect("cluster-configs exists") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                let file = path.file_name().and_then(|name| name.to_str());
                assert!(
                    SHIPPED.iter().any(|(name, _)| Some(*name) == file),
                    "{} is not in the SHIPPED list of config.rs",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn local_config_is_two_sites_and_a_witness() {
        let config = shipped("local.toml");
        assert_eq!(config.cluster.name, "local");
        let data: Vec<&str> = config
            .data_sites()
            .iter()
            .map(|site| site.name.as_str())
            .collect();
        assert_eq!(data, ["a", "b"]);
        assert_eq!(
            config.site("w").map(|site| site.role),
            Some(SiteRole::Witness)
        );
        let w1 = config.node("w1").expect("w1");
        assert_eq!(w1.nbd_listen, None);
        assert_eq!(w1.peer_listen.map(|a| a.port()), Some(7402));
        let peers: Vec<&str> = config
            .peers("a1")
            .iter()
            .map(|node| node.name.as_str())
            .collect();
        assert_eq!(peers, ["b1"]);
        let peers: Vec<&str> = config
            .peers("w1")
            .iter()
            .map(|node| node.name.as_str())
            .collect();
        assert_eq!(peers, ["a1", "b1"]);
        let ab = LinkProfile {
            delay_ms: 25,
            ..LinkProfile::IDEAL
        };
        assert_eq!(config.link_profile("a", "b"), ab);
        assert_eq!(config.link_profile("b", "a"), ab);
        assert_eq!(config.link_profile("a", "w"), LinkProfile::IDEAL);
    }

    /// local.toml without its links and tuning, then `links`.
    fn local_with_links(links: &str) -> String {
        let (head, _) = LOCAL_CONFIG
            .split_once("# One [[link]]")
            .expect("local.toml has links");
        format!("{head}{links}")
    }

    #[test]
    fn link_units_convert_to_the_shaper() {
        let config = shipped("geo.toml");
        let profile = config.link_profile("b", "a");
        assert_eq!(profile.delay_ms, 50);
        assert_eq!(profile.bandwidth_kbit, Some(100_000));
        let three = shipped("three-site.toml");
        assert_eq!(three.link_profile("a", "b").delay_ms, 10);
        assert_eq!(three.link_profile("c", "a").delay_ms, 40);
        assert_eq!(three.link_profile("b", "c").delay_ms, 40);
        assert_eq!(three.data_sites().len(), 3);
        let text = local_with_links(
            "[[link]]\nsites = [\"a\", \"b\"]\ndelay_ms = 25\njitter_ms = 3\nbandwidth_mbit = 0.5\nloss_pct = 0.25\n",
        );
        let config = ClusterConfig::parse(&text, "test").expect("valid");
        assert_eq!(
            config.link_profile("a", "b"),
            LinkProfile {
                delay_ms: 25,
                jitter_ms: 3,
                bandwidth_kbit: Some(500),
                loss_ppm: 2500,
                cut: false,
            }
        );
        let text = local_with_links(
            "[[link]]\nsites = [\"b\", \"a\"]\ndelay_ms = 1\nbandwidth_mbit = 0\n",
        );
        let config = ClusterConfig::parse(&text, "test").expect("valid");
        assert_eq!(config.link_profile("a", "b").bandwidth_kbit, None);
        // A link may reach the witness too.
        let text = local_with_links("[[link]]\nsites = [\"w\", \"a\"]\ndelay_ms = 7\n");
        let config = ClusterConfig::parse(&text, "test").expect("valid");
        assert_eq!(config.link_profile("a", "w").delay_ms, 7);
        assert_eq!(config.link_profile("a", "b"), LinkProfile::IDEAL);
    }

    #[test]
    fn errors_name_the_problem() {
        let bad = SINGLE_SITE_CONFIG.replace("site = \"a\"", "site = \"zz\"");
        let error = ClusterConfig::parse(&bad, "test").expect_err("unknown site");
        assert!(error.to_string().contains("\"zz\""), "{error}");
        let typo = SINGLE_SITE_CONFIG.replace("delta_interval_ms", "delta_intervall_ms");
        let error = ClusterConfig::parse(&typo, "test").expect_err("unknown key");
        assert!(error.to_string().contains("delta_intervall_ms"), "{error}");
    }

    #[test]
    fn bad_links_are_refused_by_name() {
        let sites = [
            ("[\"a\", \"zz\"]", "site \"zz\" is not a [[site]]"),
            ("[\"a\", \"a\"]", "two different sites"),
            ("[\"a\"]", "exactly two sites"),
            ("[\"a\", \"b\", \"w\"]", "exactly two sites"),
        ];
        for (pair, expected) in sites {
            let error = parse_error(&local_with_links(&format!(
                "[[link]]\nsites = {pair}\ndelay_ms = 1\n"
            )));
            assert!(error.contains(expected), "{pair}: {error}");
        }
        let duplicate = "[[link]]\nsites = [\"a\", \"b\"]\ndelay_ms = 1\n\
                         [[link]]\nsites = [\"b\", \"a\"]\ndelay_ms = 2\n";
        let error = parse_error(&local_with_links(duplicate));
        assert!(error.contains("already have a [[link]]"), "{error}");
        let values = [
            (
                "delay_ms = 1\nloss_pct = -1",
                "loss_pct must be between 0 and 100",
            ),
            (
                "delay_ms = 1\nloss_pct = 100.5",
                "loss_pct must be between 0 and 100",
            ),
            (
                "delay_ms = 1\nloss_pct = nan",
                "loss_pct must be between 0 and 100",
            ),
            (
                "delay_ms = 1\nbandwidth_mbit = -3",
                "bandwidth_mbit must be between",
            ),
            (
                "delay_ms = 1\nbandwidth_mbit = 0.0001",
                "bandwidth_mbit must be at least",
            ),
            (
                "delay_ms = 1\njitter_ms = 600000",
                "jitter_ms must be at most",
            ),
            ("delay_ms = 60001", "delay_ms must be at most"),
        ];
        for (settings, expected) in values {
            let error = parse_error(&local_with_links(&format!(
                "[[link]]\nsites = [\"a\", \"b\"]\n{settings}\n"
            )));
            assert!(error.contains(expected), "{settings}: {error}");
            assert!(error.contains("[[link]] a <-> b"), "{settings}: {error}");
        }
        // Type errors and unknown keys come from the parser, naming the key.
        let parser = [
            ("delay_ms = -5", "delay_ms"),
            ("jitter_ms = 1", "delay_ms"),
            ("delay_ms = 1\ncolour = \"red\"", "colour"),
        ];
        for (settings, expected) in parser {
            let error = parse_error(&local_with_links(&format!(
                "[[link]]\nsites = [\"a\", \"b\"]\n{settings}\n"
            )));
            assert!(error.contains(expected), "{settings}: {error}");
        }
    }

    #[test]
    fn roles_decide_which_listeners_a_node_needs() {
        // A witness node must not serve NBD.
        let text = LOCAL_CONFIG.replace(
            "admin_listen = \"127.0.0.1:9182\"",
            "admin_listen = \"127.0.0.1:9182\"\nnbd_listen = \"127.0.0.1:10811\"",
        );
        let error = parse_error(&text);
        assert!(
            error.contains("\"w1\"") && error.contains("witness"),
            "{error}"
        );
        // A data node must.
        let text = LOCAL_CONFIG.replace("nbd_listen = \"127.0.0.1:10810\"", "");
        let error = parse_error(&text);
        assert!(error.contains("\"b1\" needs nbd_listen"), "{error}");
        // Two data sites: every node needs a peer address.
        let text = LOCAL_CONFIG.replace("peer_listen = \"127.0.0.1:7401\"", "");
        let error = parse_error(&text);
        assert!(error.contains("\"b1\" needs peer_listen"), "{error}");
        // A peer address is an address like the others.
        let text = LOCAL_CONFIG.replace("127.0.0.1:7401", "127.0.0.1:7400");
        let error = parse_error(&text);
        assert!(error.contains("127.0.0.1:7400 is used twice"), "{error}");
        // An unknown role is refused.
        let text = LOCAL_CONFIG.replace("role = \"witness\"", "role = \"arbiter\"");
        let error = parse_error(&text);
        assert!(error.contains("arbiter"), "{error}");
        // Only witness sites: nothing would hold data.
        let text = SINGLE_SITE_CONFIG
            .replace("role = \"data\"", "role = \"witness\"")
            .replace("nbd_listen = \"127.0.0.1:10809\"", "");
        let error = parse_error(&text);
        assert!(
            error.contains("at least one [[node]] must be at a data site"),
            "{error}"
        );
    }

    #[test]
    fn lease_timing_comes_from_tuning_and_bad_values_are_refused() {
        let config = ClusterConfig::parse(LOCAL_CONFIG, "local.toml").expect("valid");
        assert_eq!(
            config.tuning.lease(),
            stretch_control::LeaseConfig::default()
        );
        let text = LOCAL_CONFIG.replace("lease_ms = 1500", "lease_ms = 2400");
        let config = ClusterConfig::parse(&text, "edited").expect("valid");
        assert_eq!(config.tuning.lease().lease_ms, 2400);
        let text = LOCAL_CONFIG.replace("lease_ms = 1500", "lease_ms = 800");
        assert!(parse_error(&text).contains("must be at least three renewals"));
        let text = LOCAL_CONFIG.replace("clock_drift_ppm = 1000", "clock_drift_ppm = 200000");
        assert!(parse_error(&text).contains("tuning.clock_drift_ppm"));
        let text = LOCAL_CONFIG.replace("suspend_hold_ms = 5000", "suspend_hold_ms = 0");
        assert!(parse_error(&text).contains("tuning.suspend_hold_ms"));
        // Read leases reach the engine, with the drift bound.
        let config = ClusterConfig::parse(LOCAL_CONFIG, "shipped").expect("valid");
        let engine = config.tuning.engine();
        assert_eq!(
            (
                engine.read_lease_ms,
                engine.read_lease_cooldown_ms,
                engine.clock_drift_ppm
            ),
            (2000, 10_000, 1000)
        );
        let text = LOCAL_CONFIG.replace("read_lease_ms = 2000", "read_lease_ms = 0");
        assert_eq!(
            ClusterConfig::parse(&text, "edited")
                .expect("leases off is valid")
                .tuning
                .engine()
                .read_lease_ms,
            0
        );
    }

    #[test]
    fn the_ship_window_reaches_the_engine_and_a_window_under_a_block_is_refused() {
        let config = shipped("local.toml");
        assert_eq!(config.tuning.engine().ship_window_bytes_max, 32 << 20);
        let text = LOCAL_CONFIG.replace(
            "ship_window_bytes_max = \"32M\"",
            "ship_window_bytes_max = \"1M\"",
        );
        let config = ClusterConfig::parse(&text, "edited").expect("valid");
        assert_eq!(config.tuning.engine().ship_window_bytes_max, 1 << 20);
        let text = LOCAL_CONFIG.replace(
            "ship_window_bytes_max = \"32M\"",
            "ship_window_bytes_max = \"1K\"",
        );
        assert!(parse_error(&text).contains("tuning.ship_window_bytes_max must be at least 4096"));
    }

    #[test]
    fn resync_chunks_in_flight_reach_the_engine_within_their_bounds() {
        assert_eq!(
            shipped("local.toml")
                .tuning
                .engine()
                .resync_chunks_in_flight_max,
            16
        );
        let set = |value: usize| {
            LOCAL_CONFIG.replace(
                "ship_window_bytes_max = \"32M\"",
                &format!("ship_window_bytes_max = \"32M\"\nresync_chunks_in_flight_max = {value}"),
            )
        };
        let config = ClusterConfig::parse(&set(64), "edited").expect("valid");
        assert_eq!(config.tuning.engine().resync_chunks_in_flight_max, 64);
        for refused in [0, 65] {
            assert!(
                parse_error(&set(refused))
                    .contains("tuning.resync_chunks_in_flight_max must be 1 to 64")
            );
        }
    }

    #[test]
    fn links_pace_with_bbr_unless_told_cubic_and_nothing_else_is_taken() {
        assert_eq!(
            shipped("local.toml").tuning.link_congestion_control,
            LinkCongestionControl::Bbr
        );
        let set = |value: &str| {
            LOCAL_CONFIG.replace(
                "link_congestion_control = \"bbr\"",
                &format!("link_congestion_control = \"{value}\""),
            )
        };
        let config = ClusterConfig::parse(&set("cubic"), "edited").expect("valid");
        assert_eq!(
            config.tuning.link_congestion_control,
            LinkCongestionControl::Cubic
        );
        assert!(parse_error(&set("reno")).contains("link_congestion_control"));
    }

    #[test]
    fn the_least_ship_window_defaults_within_the_most_and_is_checked_against_it() {
        assert_eq!(
            shipped("local.toml").tuning.engine().ship_window_bytes_min,
            1 << 20
        );
        // A smaller maximum takes the default floor down with it.
        let small = LOCAL_CONFIG.replace(
            "ship_window_bytes_max = \"32M\"",
            "ship_window_bytes_max = \"256K\"",
        );
        let config = ClusterConfig::parse(&small, "edited").expect("valid");
        assert_eq!(config.tuning.engine().ship_window_bytes_min, 256 << 10);
        let set = |min: &str| {
            LOCAL_CONFIG.replace(
                "ship_window_bytes_max = \"32M\"",
                &format!("ship_window_bytes_max = \"32M\"\nship_window_bytes_min = \"{min}\""),
            )
        };
        let config = ClusterConfig::parse(&set("4M"), "edited").expect("valid");
        assert_eq!(config.tuning.engine().ship_window_bytes_min, 4 << 20);
        assert!(parse_error(&set("64M")).contains(
            "tuning.ship_window_bytes_min (64M) must be at most ship_window_bytes_max (32M)"
        ));
        assert!(
            parse_error(&set("1K")).contains("tuning.ship_window_bytes_min must be at least 4096")
        );
    }

    #[test]
    fn deltas_and_requests_larger_than_one_frame_carries_are_refused() {
        let text = LOCAL_CONFIG.replace("delta_max_bytes = \"8M\"", "delta_max_bytes = \"40M\"");
        assert!(
            parse_error(&text).contains("tuning.delta_max_bytes must be between 4096 and 32M"),
            "{}",
            parse_error(&text)
        );
        let text = LOCAL_CONFIG.replace(
            "nbd_request_bytes_max = \"32M\"",
            "nbd_request_bytes_max = \"64M\"",
        );
        assert!(
            parse_error(&text).contains("tuning.nbd_request_bytes_max must be between 4K and 32M"),
            "{}",
            parse_error(&text)
        );
    }

    #[test]
    fn the_image_offer_wait_comes_from_tuning_within_its_bounds() {
        let three = shipped("three-site.toml");
        assert_eq!(
            three.tuning.image_offer_wait_ms,
            stretch_control::IMAGE_OFFER_WAIT_MS
        );
        let text = include_str!("../../../cluster-configs/three-site.toml");
        let edited = text.replace("image_offer_wait_ms = 2000", "image_offer_wait_ms = 4000");
        let config = ClusterConfig::parse(&edited, "edited").expect("valid");
        assert_eq!(config.tuning.image_offer_wait_ms, 4000);
        for bad in ["image_offer_wait_ms = 10", "image_offer_wait_ms = 120000"] {
            let edited = text.replace("image_offer_wait_ms = 2000", bad);
            assert!(
                parse_error(&edited).contains("tuning.image_offer_wait_ms"),
                "{bad}"
            );
        }
    }

    #[test]
    fn following_the_workload_is_tuned_within_its_bounds() {
        let config = shipped("local.toml");
        assert_eq!(
            config.tuning.follow(),
            stretch_control::FollowSettings::DEFAULT
        );
        let text = LOCAL_CONFIG
            .replace("follow_window_ms = 60000", "follow_window_ms = 5000")
            .replace(
                "follow_interval_between_moves_ms = 600000",
                "follow_interval_between_moves_ms = 9000",
            );
        let config = ClusterConfig::parse(&text, "edited").expect("valid");
        assert_eq!(config.tuning.follow().window_ms, 5000);
        assert_eq!(config.tuning.follow().interval_between_moves_ms, 9000);
        for (shipped, bad, key) in [
            (
                "follow_share_percent_min = 80",
                "follow_share_percent_min = 40",
                "tuning.follow_share_percent_min",
            ),
            (
                "follow_window_ms = 60000",
                "follow_window_ms = 10",
                "tuning.follow_window_ms",
            ),
            (
                "follow_interval_between_moves_ms = 600000",
                "follow_interval_between_moves_ms = 1000",
                "tuning.follow_interval_between_moves_ms",
            ),
        ] {
            assert!(
                parse_error(&LOCAL_CONFIG.replace(shipped, bad)).contains(key),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_that_could_escape_the_data_directory_are_refused() {
        let bad = [
            "../x", "..", ".", ".hidden", "a/b", "/etc", "a\\b", "", "a b", "é",
        ];
        for name in bad {
            let text = LOCAL_CONFIG.replace("name = \"a1\"", &format!("name = {name:?}"));
            let error = parse_error(&text);
            assert!(error.contains("node name"), "{name:?}: {error}");
            assert!(error.contains("is invalid"), "{name:?}: {error}");
        }
        let long = "n".repeat(CONFIG_NAME_BYTES_MAX + 1);
        let text = LOCAL_CONFIG.replace("name = \"a1\"", &format!("name = {long:?}"));
        assert!(parse_error(&text).contains("1 to 64 bytes"));
        // Site and cluster names are held to the same rule.
        let text = LOCAL_CONFIG
            .replace("name = \"b\"", "name = \"../b\"")
            .replace("site = \"b\"", "site = \"../b\"");
        assert!(parse_error(&text).contains("site name \"../b\""));
        let text = LOCAL_CONFIG.replace("name = \"local\"", "name = \"x/../../y\"");
        assert!(parse_error(&text).contains("cluster name"));
        // What the shipped configs use, and the longest name, pass.
        let max = "n".repeat(CONFIG_NAME_BYTES_MAX);
        for name in ["a1", "site-a.node_2", "A9", max.as_str()] {
            validate_name("node", name).unwrap_or_else(|error| panic!("{error}"));
        }
    }

    #[test]
    fn new_tuning_keys_are_checked() {
        let text = SINGLE_SITE_CONFIG.replace("remote_timeout_ms = 5000", "remote_timeout_ms = 0");
        assert!(parse_error(&text).contains("tuning.remote_timeout_ms"));
        let text = SINGLE_SITE_CONFIG
            .replace("backlog_bytes_max = \"256M\"", "backlog_bytes_max = \"1M\"");
        assert!(parse_error(&text).contains("tuning.backlog_bytes_max"));
        let text =
            SINGLE_SITE_CONFIG.replace("nbd_connections_max = 512", "nbd_connections_max = 0");
        assert!(parse_error(&text).contains("tuning.nbd_connections_max"));
        // Less than one largest request could never admit that request.
        let text = SINGLE_SITE_CONFIG.replace(
            "nbd_in_flight_bytes_max = \"1G\"",
            "nbd_in_flight_bytes_max = \"16M\"",
        );
        let error = parse_error(&text);
        assert!(error.contains("tuning.nbd_in_flight_bytes_max"), "{error}");
        assert!(error.contains("32M"), "{error}");
    }

    #[test]
    fn nbd_limits_default_and_parse() {
        let config = shipped("local.toml");
        assert_eq!(config.tuning.nbd_connections_max, 512);
        assert_eq!(config.tuning.nbd_in_flight_bytes_max, ByteSize(1 << 30));
        // Absent keys take the same defaults.
        let text = SINGLE_SITE_CONFIG
            .replace("nbd_connections_max = 512", "")
            .replace("nbd_in_flight_bytes_max = \"1G\"", "");
        let config = ClusterConfig::parse(&text, "test").expect("valid");
        assert_eq!(config.tuning.nbd_connections_max, 512);
        assert_eq!(config.tuning.nbd_in_flight_bytes_max, ByteSize(1 << 30));
        let text = SINGLE_SITE_CONFIG
            .replace("nbd_connections_max = 512", "nbd_connections_max = 3")
            .replace(
                "nbd_in_flight_bytes_max = \"1G\"",
                "nbd_in_flight_bytes_max = \"64M\"",
            );
        let config = ClusterConfig::parse(&text, "test").expect("valid");
        assert_eq!(config.tuning.nbd_connections_max, 3);
        assert_eq!(config.tuning.nbd_in_flight_bytes_max, ByteSize(64 << 20));
    }
}
