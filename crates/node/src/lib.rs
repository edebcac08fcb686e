//! The stretch node runtime.
//!
//! [`Node`] drives the I/O-free [`stretch_core::Engine`] with real files and
//! real time: a journal thread (appends, group-commit fdatasync, release), a
//! leg thread (delta apply, leg sync), leg reads on the requesting task, and
//! a timer task for delta intervals. It serves volumes over NBD
//! ([`stretch_nbd`]) and exposes an admin HTTP API with Prometheus metrics.

mod admin;
mod byte_size;
mod config;
mod control;
mod driver;
mod export;
mod failover;
mod fast_drain;
mod follow;
mod links;
mod metrics;
mod migration;
mod node;
mod peers;
mod sites;
mod volumes;

pub use admin::{
    ADMIN_TOKEN_FILE, AcceptLoss, AdminConfig, AdminError, AdminToken, CreateVolume, FailoverInfo,
    LeaseInfo, LinkPair, LossAccepted, MoveVolume, PeerInfo, PromoteVolume, ReplicaInfo, SetLink,
    StatusInfo, SuspendedVolume, TokenError, VolumeInfo, ensure_admin_token,
};
pub use byte_size::ByteSize;
pub use config::{
    ClusterConfig, ConfigError, DEFAULT_CONFIG, LINK_BANDWIDTH_MBIT_MAX, LINK_DELAY_MS_MAX,
    LOCAL_CONFIG, LinkConfig, NbdTls, NodeConfig, SiteConfig, SiteRole, Tuning,
};
pub use control::{ControlError, MetadataStatus, VoterInfo};
pub use links::{LinkChange, LinkControl, LinkError, LinkInfo};
pub use migration::{
    MIGRATION_TIMEOUT_S_DEFAULT, MIGRATION_TIMEOUT_S_MAX, MigrationInfo, MigrationMode,
    SWITCHOVER_HOLD_MS_MAX, StartMigration,
};
pub use node::{Node, NodeError, NodeOptions, run_cluster, run_node};
pub use peers::PeersError;
