//! Prometheus metrics of one node. Every series carries `node` and `site`
//! labels, so several nodes in one process (`stretch up`) stay apart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use prometheus::{Gauge, GaugeVec, IntGaugeVec};
use stretch_core::{EngineStats, ReadLeaseCounters};

/// Latency buckets in seconds: 20 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1.0, 2.0, 5.0, 10.0,
];

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_errors: IntCounterVec,
    bytes: IntCounterVec,
    latency: HistogramVec,
    pub journal_fsync_seconds: Histogram,
    pub leg_sync_seconds: Histogram,
    pub leg_apply_seconds: Histogram,
    pub journal_disk_bytes: IntGauge,
    pub volumes: IntGauge,
    engine: EngineGauges,
    replication: ReplicationGauges,
    /// The node certificate's end, once the node loaded it, and the gauge
    /// counting down to it (registered then: a node without a certificate
    /// exports no expiry rather than a false one).
    certificate: Arc<Mutex<Option<(Gauge, SystemTime)>>>,
    metadata: MetadataGauges,
}

/// The metadata cluster (Raft) as this node sees it.
#[derive(Debug, Clone)]
struct MetadataGauges {
    leader: IntGauge,
    quorum: IntGauge,
    term: IntGauge,
    commit_index: IntGauge,
    applied_index: IntGauge,
    voters: IntGauge,
    voters_reachable: IntGauge,
    lease_valid: IntGauge,
    lease_expires_seconds: Gauge,
    sites_without_lease: IntGauge,
    suspended_volumes: IntGauge,
    suspended_requests: IntGauge,
    suspended_failed: IntGauge,
    failover_lost_deltas: IntGauge,
    failover_lost_bytes: IntGauge,
}

/// Ownership leases and failover as one node sees them, for the gauges.
#[derive(Debug, Clone, Default)]
pub(crate) struct LeaseFigures {
    pub valid: bool,
    pub expires_seconds: f64,
    pub sites_without_lease: usize,
    pub suspended_volumes: usize,
    pub suspended_requests: u64,
    pub suspended_failed_total: u64,
    pub failover_lost_deltas_total: u64,
    pub failover_lost_bytes_total: u64,
}

/// Multi-site figures: the engine's totals, and per peer and per volume.
#[derive(Debug, Clone)]
struct ReplicationGauges {
    /// Read leases, per volume: strict reads by where they were served
    /// (`local` under a lease, `owner` asked), and at the owner the
    /// revocations, the writes that waited for them and how long.
    strict_reads: IntCounterVec,
    lease_revocations: IntCounterVec,
    lease_writes_waited: IntCounterVec,
    lease_write_wait_ms: IntCounterVec,
    shipped_deltas: IntCounter,
    shipped_bytes: IntCounter,
    merged_deltas: IntCounter,
    received_deltas: IntCounter,
    received_bytes: IntCounter,
    backlog_bytes: IntGauge,
    backlog_deltas: IntGauge,
    backlog_throttled: IntCounter,
    backlog_folds: IntCounter,
    remote_reads: IntCounter,
    forwarded: IntCounter,
    remote_timeouts: IntCounter,
    remote_reads_served_here: IntCounter,
    resync_regions_left: IntGauge,
    resync_regions_done: IntCounter,
    refused_messages: IntCounter,
    peer_connected: IntGaugeVec,
    peer_rtt_seconds: GaugeVec,
    peer_malformed: IntCounterVec,
    peer_refused: IntCounter,
    /// Block bytes sent to each site, as the engine holds them and as
    /// they travelled (compressed where that paid).
    link_block_bytes: IntCounterVec,
    link_sent_block_bytes: IntCounterVec,
    /// Live migrations this node drove, by how they ended; how long each
    /// switchover held the writes; switchovers called off.
    migrations: IntCounterVec,
    migration_pause_seconds: Histogram,
    follow_decisions: IntCounterVec,
    switchovers_called_off: IntCounter,
    unapplied_deltas: IntGaugeVec,
    unapplied_bytes: IntGaugeVec,
    lag_seconds: GaugeVec,
    peer_resync_regions: IntGaugeVec,
}

/// One volume's replication figures towards one peer site, for rendering.
#[derive(Debug, Clone)]
pub struct VolumeLag {
    pub volume: String,
    pub peer: String,
    pub unapplied_deltas: u64,
    pub unapplied_bytes: u64,
    pub lag_seconds: f64,
    pub resync_regions_left: u64,
}

#[derive(Debug, Clone)]
struct EngineGauges {
    cache_hit_blocks: IntCounter,
    cache_miss_blocks: IntCounter,
    dirty_bytes: IntGauge,
    clean_bytes: IntGauge,
    cached_blocks: IntGauge,
    open_deltas: IntGauge,
    closed_deltas: IntCounter,
    applied_deltas: IntCounter,
    unapplied_deltas: IntGauge,
    journal_bytes: IntGauge,
    journal_syncs: IntCounter,
    throttled_writes: IntCounter,
    throttled_now: IntGauge,
    failed: IntGauge,
}

/// Per-volume handles, resolved once per connection rather than per request.
#[derive(Debug, Clone)]
pub struct VolumeMetrics {
    pub read: OperationMetrics,
    pub write: OperationMetrics,
    pub flush: OperationMetrics,
    pub trim: OperationMetrics,
    pub write_zeroes: OperationMetrics,
    pub read_bytes: IntCounter,
    pub write_bytes: IntCounter,
}

#[derive(Debug, Clone)]
pub struct OperationMetrics {
    pub requests: IntCounter,
    pub errors: IntCounter,
    pub latency: Histogram,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("metric definition invariant: valid name");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registration invariant: unique name");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("metric definition invariant: valid name");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registration invariant: unique name");
    metric
}

fn float_gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    let metric = Gauge::new(name, help).expect("metric definition invariant: valid name");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registration invariant: unique name");
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    let metric = Histogram::with_opts(opts).expect("metric definition invariant: valid name");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registration invariant: unique name");
    metric
}

/// Raises a counter to a total kept elsewhere (the engine counts itself).
fn advance(counter: &IntCounter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

impl Metrics {
    pub fn new(node: &str, site: &str) -> Self {
        let labels = HashMap::from([
            ("node".to_string(), node.to_string()),
            ("site".to_string(), site.to_string()),
        ]);
        let registry = Registry::new_custom(None, Some(labels))
            .expect("metric registry invariant: valid labels");
        let requests = IntCounterVec::new(
            Opts::new(
                "stretch_volume_requests_total",
                "Requests served, by volume and operation",
            ),
            &["volume", "op"],
        )
        .expect("metric definition invariant");
        let request_errors = IntCounterVec::new(
            Opts::new(
                "stretch_volume_request_errors_total",
                "Requests answered with an error",
            ),
            &["volume", "op"],
        )
        .expect("metric definition invariant");
        let bytes = IntCounterVec::new(
            Opts::new(
                "stretch_volume_bytes_total",
                "Bytes read or written by clients",
            ),
            &["volume", "direction"],
        )
        .expect("metric definition invariant");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "stretch_volume_request_seconds",
                "Request latency as the node sees it, by volume and operation",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["volume", "op"],
        )
        .expect("metric definition invariant");
        for metric in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_errors.clone()),
            Box::new(bytes.clone()),
            Box::new(latency.clone()),
        ] {
            registry
                .register(metric)
                .expect("metric registration invariant: unique name");
        }
        let vector = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels)
                .expect("metric definition invariant: valid name");
            registry
                .register(Box::new(metric.clone()))
                .expect("metric registration invariant: unique name");
            metric
        };
        let counter_vector = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("metric definition invariant: valid name");
            registry
                .register(Box::new(metric.clone()))
                .expect("metric registration invariant: unique name");
            metric
        };
        let float_vector = |name: &str, help: &str, labels: &[&str]| {
            let metric = GaugeVec::new(Opts::new(name, help), labels)
                .expect("metric definition invariant: valid name");
            registry
                .register(Box::new(metric.clone()))
                .expect("metric registration invariant: unique name");
            metric
        };
        let peer_malformed = counter_vector(
            "stretch_peer_malformed_messages_total",
            "Frames from a peer that failed validation (their stream was closed)",
            &["peer"],
        );
        let link_block_bytes = counter_vector(
            "stretch_link_block_bytes_total",
            "Bytes of the non-zero blocks sent to a peer site (deltas, resync chunks, strict-read answers), before compression",
            &["peer"],
        );
        let link_sent_block_bytes = counter_vector(
            "stretch_link_sent_block_bytes_total",
            "Bytes those blocks took on the link to the peer site (LZ4 where it saved at least an eighth of a block, raw otherwise)",
            &["peer"],
        );
        let migrations = counter_vector(
            "stretch_migrations_total",
            "Live migrations this node drove, by outcome (done, gave-up, cancelled, failed)",
            &["outcome"],
        );
        let follow_decisions = counter_vector(
            "stretch_follow_decisions_total",
            "Groups this node decided to migrate after their workload (follow auto), by outcome (migrating, refused)",
            &["outcome"],
        );
        let replication = ReplicationGauges {
            strict_reads: counter_vector(
                "stretch_volume_strict_reads_total",
                "Strict reads at this site of a volume another site owns, by where they were served: local (under a read lease) or owner (asked over the link)",
                &["volume", "served"],
            ),
            lease_revocations: counter_vector(
                "stretch_volume_read_lease_revocations_total",
                "Read leases on the volume's regions this site (as owner) revoked before a write",
                &["volume"],
            ),
            lease_writes_waited: counter_vector(
                "stretch_volume_read_lease_writes_waited_total",
                "Writes this site (as owner) held until a read lease on their region was revoked or ran out",
                &["volume"],
            ),
            lease_write_wait_ms: counter_vector(
                "stretch_volume_read_lease_write_wait_milliseconds_total",
                "Milliseconds those writes waited, summed",
                &["volume"],
            ),
            migrations,
            follow_decisions,
            migration_pause_seconds: histogram(
                &registry,
                "stretch_migration_pause_seconds",
                "How long a migration's switchover held the group's writes",
            ),
            switchovers_called_off: counter(
                &registry,
                "stretch_migration_switchovers_called_off_total",
                "Switchovers called off: the target did not apply every delta (or answer) within the hold bound",
            ),
            shipped_deltas: counter(
                &registry,
                "stretch_shipped_deltas_total",
                "Deltas sent to other sites",
            ),
            shipped_bytes: counter(
                &registry,
                "stretch_shipped_bytes_total",
                "Block bytes sent to other sites (deltas and resync)",
            ),
            merged_deltas: counter(
                &registry,
                "stretch_merged_deltas_total",
                "Deltas sent merged with others into one record, to a site that was behind",
            ),
            received_deltas: counter(
                &registry,
                "stretch_received_deltas_total",
                "Deltas received from owners at other sites",
            ),
            received_bytes: counter(
                &registry,
                "stretch_received_bytes_total",
                "Block bytes of deltas received",
            ),
            backlog_bytes: gauge(
                &registry,
                "stretch_backlog_bytes",
                "Delta bytes kept until every site applied them",
            ),
            backlog_deltas: gauge(
                &registry,
                "stretch_backlog_deltas",
                "Deltas kept until every site applied them",
            ),
            backlog_throttled: counter(
                &registry,
                "stretch_backlog_throttled_writes_total",
                "Writes that waited because the backlog bound was reached",
            ),
            backlog_folds: counter(
                &registry,
                "stretch_backlog_folds_total",
                "Times a site stopped being kept deltas (declared gone with the backlog full, or holding writes back past backlog_wait_ms_max) and was left to a resync by region",
            ),
            remote_reads: counter(
                &registry,
                "stretch_remote_reads_total",
                "Strict reads sent to the owner site",
            ),
            forwarded: counter(
                &registry,
                "stretch_forwarded_requests_total",
                "Writes, flushes and trims forwarded to the owner site",
            ),
            remote_timeouts: counter(
                &registry,
                "stretch_remote_timeouts_total",
                "Strict reads and forwarded requests failed: the owner did not answer in time",
            ),
            remote_reads_served_here: counter(
                &registry,
                "stretch_remote_reads_served_here_total",
                "Strict reads sent to an owner this site then took the group over from, served here instead",
            ),
            resync_regions_left: gauge(
                &registry,
                "stretch_resync_regions_left",
                "1 MiB regions still to copy to other sites",
            ),
            resync_regions_done: counter(
                &registry,
                "stretch_resync_regions_done_total",
                "1 MiB regions copied to other sites by resync",
            ),
            refused_messages: counter(
                &registry,
                "stretch_refused_peer_messages_total",
                "Peer messages refused by the engine (wrong owner, gap, unknown id)",
            ),
            peer_connected: vector(
                "stretch_peer_connected",
                "1 while the connection to the peer site is up",
                &["peer"],
            ),
            peer_rtt_seconds: float_vector(
                "stretch_peer_rtt_seconds",
                "Round-trip time to the peer site (QUIC estimate)",
                &["peer"],
            ),
            peer_malformed,
            link_block_bytes,
            link_sent_block_bytes,
            peer_refused: counter(
                &registry,
                "stretch_peer_connections_refused_total",
                "Peer connections refused: a certificate naming another node than the hello, \
                 a hello from no data node of the cluster, or no hello",
            ),
            unapplied_deltas: vector(
                "stretch_volume_unapplied_deltas",
                "Closed deltas of the volume's group the peer site has not applied",
                &["volume", "peer"],
            ),
            unapplied_bytes: vector(
                "stretch_volume_unapplied_bytes",
                "Bytes of those deltas",
                &["volume", "peer"],
            ),
            lag_seconds: float_vector(
                "stretch_volume_lag_seconds",
                "Age of the oldest delta the peer site has not journaled: the live RPO",
                &["volume", "peer"],
            ),
            peer_resync_regions: vector(
                "stretch_volume_resync_regions_left",
                "1 MiB regions of the volume's group still to copy to the peer site",
                &["volume", "peer"],
            ),
        };
        let engine = EngineGauges {
            cache_hit_blocks: counter(
                &registry,
                "stretch_cache_hit_blocks_total",
                "Blocks read from memory",
            ),
            cache_miss_blocks: counter(
                &registry,
                "stretch_cache_miss_blocks_total",
                "Blocks read from the leg",
            ),
            dirty_bytes: gauge(
                &registry,
                "stretch_dirty_bytes",
                "Memory held by deltas not yet on the leg",
            ),
            clean_bytes: gauge(
                &registry,
                "stretch_cache_clean_bytes",
                "Memory held by clean cached blocks",
            ),
            cached_blocks: gauge(
                &registry,
                "stretch_cache_blocks",
                "Blocks resident in memory",
            ),
            open_deltas: gauge(
                &registry,
                "stretch_deltas_open",
                "Consistency groups with an open delta",
            ),
            closed_deltas: counter(
                &registry,
                "stretch_deltas_closed_total",
                "Deltas closed and journaled",
            ),
            applied_deltas: counter(
                &registry,
                "stretch_deltas_applied_total",
                "Deltas applied to legs",
            ),
            unapplied_deltas: gauge(
                &registry,
                "stretch_deltas_unapplied",
                "Closed deltas not yet on their leg",
            ),
            journal_bytes: gauge(
                &registry,
                "stretch_journal_bytes",
                "Journal bytes not yet released",
            ),
            journal_syncs: counter(
                &registry,
                "stretch_journal_syncs_total",
                "Journal fdatasyncs (group commits)",
            ),
            throttled_writes: counter(
                &registry,
                "stretch_writes_throttled_total",
                "Writes that waited for cache room",
            ),
            throttled_now: gauge(
                &registry,
                "stretch_writes_throttled",
                "Writes waiting for cache room now",
            ),
            failed: gauge(
                &registry,
                "stretch_node_failed",
                "1 once a storage error stopped the node taking writes",
            ),
        };
        Metrics {
            journal_fsync_seconds: histogram(
                &registry,
                "stretch_journal_fsync_seconds",
                "Journal fdatasync latency",
            ),
            leg_sync_seconds: histogram(
                &registry,
                "stretch_leg_sync_seconds",
                "Leg fdatasync latency at checkpoints",
            ),
            leg_apply_seconds: histogram(
                &registry,
                "stretch_leg_apply_seconds",
                "Time to write one delta to the legs",
            ),
            journal_disk_bytes: gauge(
                &registry,
                "stretch_journal_disk_bytes",
                "Bytes in journal segment files",
            ),
            volumes: gauge(&registry, "stretch_volumes", "Volumes served by this node"),
            metadata: MetadataGauges {
                leader: gauge(
                    &registry,
                    "stretch_metadata_leader",
                    "1 if this node leads the metadata cluster (Raft)",
                ),
                quorum: gauge(
                    &registry,
                    "stretch_metadata_quorum",
                    "1 if this node can get metadata changes committed (it knows a leader and reaches a majority of the voters)",
                ),
                term: gauge(&registry, "stretch_metadata_term", "Raft term"),
                commit_index: gauge(
                    &registry,
                    "stretch_metadata_commit_index",
                    "Last metadata log index known committed",
                ),
                applied_index: gauge(
                    &registry,
                    "stretch_metadata_applied_index",
                    "Last metadata log index applied here",
                ),
                voters: gauge(
                    &registry,
                    "stretch_metadata_voters",
                    "Voters of the metadata cluster",
                ),
                voters_reachable: gauge(
                    &registry,
                    "stretch_metadata_voters_reachable",
                    "Voters this node reaches, itself included",
                ),
                lease_valid: gauge(
                    &registry,
                    "stretch_lease_valid",
                    "1 if this data node holds its ownership lease (its volumes accept writes)",
                ),
                lease_expires_seconds: float_gauge(
                    &registry,
                    "stretch_lease_expires_seconds",
                    "Seconds until this node's ownership lease runs out unless renewed (0 if not held)",
                ),
                sites_without_lease: gauge(
                    &registry,
                    "stretch_sites_without_lease",
                    "Owner sites that held no lease at this node's last check",
                ),
                suspended_volumes: gauge(
                    &registry,
                    "stretch_suspended_volumes",
                    "Volumes that accept no writes now, as this node sees them",
                ),
                suspended_requests: gauge(
                    &registry,
                    "stretch_suspended_requests",
                    "Requests held now because this site holds no ownership lease",
                ),
                suspended_failed: gauge(
                    &registry,
                    "stretch_suspended_failed_requests",
                    "Requests failed with EIO after waiting suspend_hold_ms for a lease",
                ),
                failover_lost_deltas: gauge(
                    &registry,
                    "stretch_failover_lost_deltas",
                    "Deltas this site acknowledged as owner after the image another site took over from",
                ),
                failover_lost_bytes: gauge(
                    &registry,
                    "stretch_failover_lost_bytes",
                    "Bytes of the deltas counted in stretch_failover_lost_deltas",
                ),
            },
            registry,
            requests,
            request_errors,
            bytes,
            latency,
            engine,
            replication,
            certificate: Arc::new(Mutex::new(None)),
        }
    }

    /// Updates the metadata gauges from a status taken now.
    pub fn set_metadata(&self, status: &crate::control::MetadataStatus) {
        let gauges = &self.metadata;
        gauges.leader.set(i64::from(status.state == "leader"));
        gauges.quorum.set(i64::from(status.quorum));
        gauges.term.set(status.term as i64);
        gauges.commit_index.set(status.commit_index as i64);
        gauges.applied_index.set(status.applied_index as i64);
        gauges.voters.set(status.voters.len() as i64);
        gauges
            .voters_reachable
            .set(status.voters.iter().filter(|voter| voter.reachable).count() as i64);
    }

    /// Updates the lease and failover gauges.
    pub(crate) fn set_leases(&self, figures: &LeaseFigures) {
        let gauges = &self.metadata;
        gauges.lease_valid.set(i64::from(figures.valid));
        gauges.lease_expires_seconds.set(figures.expires_seconds);
        gauges
            .sites_without_lease
            .set(figures.sites_without_lease as i64);
        gauges
            .suspended_volumes
            .set(figures.suspended_volumes as i64);
        gauges
            .suspended_requests
            .set(figures.suspended_requests as i64);
        gauges
            .suspended_failed
            .set(figures.suspended_failed_total as i64);
        gauges
            .failover_lost_deltas
            .set(figures.failover_lost_deltas_total as i64);
        gauges
            .failover_lost_bytes
            .set(figures.failover_lost_bytes_total as i64);
    }

    pub fn peer_refused(&self) {
        self.replication.peer_refused.inc();
    }

    /// Starts exporting `stretch_certificate_expiry_seconds`: the time left
    /// before this node's certificate ends, so an alert fires before peers
    /// start refusing it.
    pub fn set_certificate_expiry(&self, not_after: SystemTime) {
        let mut certificate = self.certificate.lock();
        if certificate.is_none() {
            let gauge = Gauge::new(
                "stretch_certificate_expiry_seconds",
                "Seconds until this node's certificate expires (negative once it has)",
            )
            .expect("metric definition invariant: valid name");
            self.registry
                .register(Box::new(gauge.clone()))
                .expect("metric registration invariant: unique name");
            *certificate = Some((gauge, not_after));
        } else if let Some((_, end)) = certificate.as_mut() {
            *end = not_after;
        }
    }

    pub fn peer_connected(&self, peer: &str, connected: bool) {
        self.replication
            .peer_connected
            .with_label_values(&[peer])
            .set(i64::from(connected));
    }

    /// Blocks went to site `peer`: `bytes.blocks` of them, `bytes.sent` on
    /// the link.
    pub fn link_sent(&self, peer: &str, bytes: stretch_wire::PayloadBytes) {
        if bytes.blocks == 0 {
            return;
        }
        let replication = &self.replication;
        replication
            .link_block_bytes
            .with_label_values(&[peer])
            .inc_by(bytes.blocks);
        replication
            .link_sent_block_bytes
            .with_label_values(&[peer])
            .inc_by(bytes.sent);
    }

    pub fn peer_malformed(&self, peer: &str) {
        self.replication
            .peer_malformed
            .with_label_values(&[peer])
            .inc();
    }

    /// A migration this node drove ended; `pause` for one that switched over.
    pub fn migration_ended(&self, outcome: &str, pause: Option<std::time::Duration>) {
        self.replication
            .migrations
            .with_label_values(&[outcome])
            .inc();
        if let Some(pause) = pause {
            self.replication
                .migration_pause_seconds
                .observe(pause.as_secs_f64());
        }
    }

    /// The owner decided to move a group after its workload (`migrating`,
    /// or `refused` when the migration could not start).
    pub fn follow_decision(&self, outcome: &str) {
        self.replication
            .follow_decisions
            .with_label_values(&[outcome])
            .inc();
    }

    pub fn switchover_called_off(&self) {
        self.replication.switchovers_called_off.inc();
    }

    pub fn peer_rtt(&self, peer: &str, seconds: f64) {
        self.replication
            .peer_rtt_seconds
            .with_label_values(&[peer])
            .set(seconds);
    }

    /// Brings the per-volume read-lease counters up to the engine's
    /// figures (which count since the node started, as these do).
    pub fn set_read_leases(&self, volumes: &[(String, ReadLeaseCounters)]) {
        let gauges = &self.replication;
        for (volume, counters) in volumes {
            let volume = volume.as_str();
            advance(
                &gauges.strict_reads.with_label_values(&[volume, "local"]),
                counters.local_strict_reads_total,
            );
            advance(
                &gauges.strict_reads.with_label_values(&[volume, "owner"]),
                counters.remote_strict_reads_total,
            );
            advance(
                &gauges.lease_revocations.with_label_values(&[volume]),
                counters.revocations_total,
            );
            advance(
                &gauges.lease_writes_waited.with_label_values(&[volume]),
                counters.writes_waited_total,
            );
            advance(
                &gauges.lease_write_wait_ms.with_label_values(&[volume]),
                counters.write_wait_nanos_total / 1_000_000,
            );
        }
    }

    /// Brings the per-volume replication gauges up to date.
    pub fn set_volume_lags(&self, lags: &[VolumeLag]) {
        let gauges = &self.replication;
        for lag in lags {
            let labels = [lag.volume.as_str(), lag.peer.as_str()];
            gauges
                .unapplied_deltas
                .with_label_values(&labels)
                .set(lag.unapplied_deltas as i64);
            gauges
                .unapplied_bytes
                .with_label_values(&labels)
                .set(lag.unapplied_bytes as i64);
            gauges
                .lag_seconds
                .with_label_values(&labels)
                .set(lag.lag_seconds);
            gauges
                .peer_resync_regions
                .with_label_values(&labels)
                .set(lag.resync_regions_left as i64);
        }
    }

    pub fn volume(&self, volume: &str) -> VolumeMetrics {
        let operation = |op: &str| OperationMetrics {
            requests: self.requests.with_label_values(&[volume, op]),
            errors: self.request_errors.with_label_values(&[volume, op]),
            latency: self.latency.with_label_values(&[volume, op]),
        };
        VolumeMetrics {
            read: operation("read"),
            write: operation("write"),
            flush: operation("flush"),
            trim: operation("trim"),
            write_zeroes: operation("write_zeroes"),
            read_bytes: self.bytes.with_label_values(&[volume, "read"]),
            write_bytes: self.bytes.with_label_values(&[volume, "write"]),
        }
    }

    /// Forgets a deleted volume's series.
    pub fn remove_volume(&self, volume: &str) {
        for op in ["read", "write", "flush", "trim", "write_zeroes"] {
            let _ = self.requests.remove_label_values(&[volume, op]);
            let _ = self.request_errors.remove_label_values(&[volume, op]);
            let _ = self.latency.remove_label_values(&[volume, op]);
        }
        for direction in ["read", "write"] {
            let _ = self.bytes.remove_label_values(&[volume, direction]);
        }
    }

    /// The text exposition, with engine figures brought up to date.
    pub fn render(&self, stats: &EngineStats) -> String {
        let engine = &self.engine;
        advance(&engine.cache_hit_blocks, stats.cache_hit_blocks);
        advance(&engine.cache_miss_blocks, stats.cache_miss_blocks);
        engine.dirty_bytes.set(stats.dirty_bytes as i64);
        engine.clean_bytes.set(stats.clean_bytes as i64);
        engine.cached_blocks.set(stats.cached_blocks as i64);
        engine.open_deltas.set(stats.open_deltas as i64);
        advance(&engine.closed_deltas, stats.closed_deltas_total);
        advance(&engine.applied_deltas, stats.applied_deltas_total);
        engine.unapplied_deltas.set(stats.unapplied_deltas as i64);
        engine.journal_bytes.set(stats.journal_bytes as i64);
        advance(&engine.journal_syncs, stats.journal_syncs_total);
        advance(&engine.throttled_writes, stats.throttled_writes_total);
        engine.throttled_now.set(stats.throttled_writes_now as i64);
        engine.failed.set(i64::from(stats.failed));
        let replication = &self.replication;
        advance(&replication.shipped_deltas, stats.shipped_deltas_total);
        advance(&replication.shipped_bytes, stats.shipped_bytes_total);
        advance(&replication.merged_deltas, stats.merged_deltas_total);
        advance(&replication.received_deltas, stats.received_deltas_total);
        advance(&replication.received_bytes, stats.received_bytes_total);
        replication.backlog_bytes.set(stats.backlog_bytes as i64);
        replication.backlog_deltas.set(stats.backlog_deltas as i64);
        advance(
            &replication.backlog_throttled,
            stats.backlog_throttled_total,
        );
        advance(&replication.backlog_folds, stats.backlog_folds_total);
        advance(&replication.remote_reads, stats.remote_reads_total);
        advance(&replication.forwarded, stats.forwarded_total);
        advance(&replication.remote_timeouts, stats.remote_timeouts_total);
        advance(
            &replication.remote_reads_served_here,
            stats.remote_reads_served_here_total,
        );
        replication
            .resync_regions_left
            .set(stats.resync_regions_left as i64);
        advance(
            &replication.resync_regions_done,
            stats.resync_regions_done_total,
        );
        advance(&replication.refused_messages, stats.refused_messages_total);
        if let Some((gauge, not_after)) = self.certificate.lock().as_ref() {
            let now = SystemTime::now();
            let left = match not_after.duration_since(now) {
                Ok(left) => left.as_secs_f64(),
                Err(past) => -past.duration().as_secs_f64(),
            };
            gauge.set(left.floor());
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding invariant: writing to a Vec cannot fail");
        String::from_utf8(out).expect("text encoding invariant: output is UTF-8")
    }
}
