//! Prometheus metrics of one node. Every series carries `node` and `site`
//! labels, so several nodes in one process (`stretch up`) stay apart.

use std::collections::HashMap;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use stretch_core::EngineStats;

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
            registry,
            requests,
            request_errors,
            bytes,
            latency,
            engine,
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
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding invariant: writing to a Vec cannot fail");
        String::from_utf8(out).expect("text encoding invariant: output is UTF-8")
    }
}
