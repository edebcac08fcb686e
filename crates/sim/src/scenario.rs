//! A scenario: topology, workload mix and fault rates. Read from a TOML file
//! under `simulation/`, or drawn from a seed in swarm mode.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::rng::SimRng;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    pub name: String,
    /// Simulated seconds of workload (followed by a quiet drain).
    pub duration_seconds: f64,
    pub topology: Topology,
    pub workload: Workload,
    pub faults: Faults,
    pub engine: EngineTuning,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    pub volumes: u32,
    /// Volumes are dealt round-robin into this many consistency groups.
    pub groups: u32,
    pub volume_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Concurrent clients; each has one request in flight at a time.
    pub clients: u32,
    /// Pause between a reply and the client's next request.
    pub think_ms_max: u64,
    /// Relative weights of the request kinds.
    pub read: u32,
    pub write: u32,
    pub fua_write: u32,
    pub flush: u32,
    pub trim: u32,
    pub write_zeroes: u32,
    /// Longest request, in 512-byte sectors.
    pub sectors_max: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Node crashes (power loss) per simulated second.
    pub crash_per_second: f64,
    /// Time the node stays down after a crash.
    pub restart_ms: u64,
    /// Disk operation latency range, microseconds.
    pub disk_latency_us_min: u64,
    pub disk_latency_us_max: u64,
    /// Share of disk operations that are slow (100× the latency).
    pub slow_disk_probability: f64,
    /// Windows of failing fsync per simulated second.
    pub fsync_failure_per_second: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineTuning {
    pub delta_interval_ms: u64,
    pub delta_max_bytes: u64,
    pub cache_bytes_max: u64,
    pub journal_checkpoint_bytes: u64,
    pub journal_segment_bytes: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "default".into(),
            duration_seconds: 10.0,
            topology: Topology::default(),
            workload: Workload::default(),
            faults: Faults::default(),
            engine: EngineTuning::default(),
        }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            volumes: 4,
            groups: 2,
            volume_bytes: 1 << 20,
        }
    }
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            clients: 8,
            think_ms_max: 5,
            read: 40,
            write: 40,
            fua_write: 5,
            flush: 8,
            trim: 2,
            write_zeroes: 5,
            sectors_max: 64,
        }
    }
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            crash_per_second: 0.2,
            restart_ms: 50,
            disk_latency_us_min: 20,
            disk_latency_us_max: 500,
            slow_disk_probability: 0.01,
            fsync_failure_per_second: 0.05,
        }
    }
}

impl Default for EngineTuning {
    fn default() -> Self {
        EngineTuning {
            delta_interval_ms: 20,
            delta_max_bytes: 64 << 10,
            cache_bytes_max: 512 << 10,
            journal_checkpoint_bytes: 256 << 10,
            journal_segment_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("scenario {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let invalid = |message: String| ScenarioError::Invalid {
            path: path.display().to_string(),
            message,
        };
        let scenario: Scenario =
            toml::from_str(&text).map_err(|error| invalid(error.to_string()))?;
        scenario.validate().map_err(invalid)?;
        Ok(scenario)
    }

    /// A random scenario for swarm testing: every knob drawn from the seed,
    /// so each seed explores a different corner.
    pub fn random(rng: &mut SimRng) -> Self {
        let volumes = rng.between(1, 12) as u32;
        let delta_max_bytes = 4096 * rng.between(4, 64);
        let scenario = Scenario {
            name: "swarm".into(),
            duration_seconds: 3.0,
            topology: Topology {
                volumes,
                groups: rng.between(1, volumes as u64) as u32,
                volume_bytes: 4096 * rng.between(16, 256),
            },
            workload: Workload {
                clients: rng.between(1, 16) as u32,
                think_ms_max: rng.between(0, 20),
                read: rng.between(0, 60) as u32,
                write: rng.between(1, 60) as u32,
                fua_write: rng.between(0, 15) as u32,
                flush: rng.between(0, 20) as u32,
                trim: rng.between(0, 5) as u32,
                write_zeroes: rng.between(0, 10) as u32,
                sectors_max: rng.between(1, 80),
            },
            faults: Faults {
                crash_per_second: [0.0, 0.3, 1.0, 3.0][rng.below(4) as usize],
                restart_ms: rng.between(1, 200),
                disk_latency_us_min: rng.between(1, 100),
                disk_latency_us_max: rng.between(100, 5000),
                slow_disk_probability: [0.0, 0.01, 0.1][rng.below(3) as usize],
                fsync_failure_per_second: [0.0, 0.0, 0.2, 1.0][rng.below(4) as usize],
            },
            engine: EngineTuning {
                delta_interval_ms: rng.between(1, 200),
                delta_max_bytes,
                // From tight (constant eviction and throttling) to roomy.
                cache_bytes_max: delta_max_bytes * rng.between(2, 64) + (4096 * 80 * 4),
                journal_checkpoint_bytes: 4096 * rng.between(1, 512),
                journal_segment_bytes: 4096 * rng.between(16, 1024),
            },
        };
        debug_assert_eq!(scenario.validate(), Ok(()));
        scenario
    }

    pub fn validate(&self) -> Result<(), String> {
        let t = &self.topology;
        if t.volumes == 0 || t.groups == 0 || t.groups > t.volumes {
            return Err("topology needs volumes >= groups >= 1".into());
        }
        if t.volume_bytes == 0 || !t.volume_bytes.is_multiple_of(4096) || t.volume_bytes > 1 << 30 {
            return Err(
                "topology.volume_bytes must be a positive multiple of 4096 up to 1G".into(),
            );
        }
        let w = &self.workload;
        if w.clients == 0 || w.sectors_max == 0 {
            return Err("workload needs clients >= 1 and sectors_max >= 1".into());
        }
        if w.read + w.write + w.fua_write + w.flush + w.trim + w.write_zeroes == 0 {
            return Err("workload weights are all zero".into());
        }
        if w.sectors_max * 512 > t.volume_bytes {
            return Err("workload.sectors_max exceeds the volume".into());
        }
        let f = &self.faults;
        if f.disk_latency_us_min > f.disk_latency_us_max {
            return Err("faults.disk_latency_us_min > disk_latency_us_max".into());
        }
        let e = &self.engine;
        let largest_write = w.sectors_max * 512 + 8192;
        if e.delta_interval_ms == 0 || e.delta_max_bytes < 4096 {
            return Err("engine.delta_interval_ms >= 1 and delta_max_bytes >= 4096 needed".into());
        }
        if e.cache_bytes_max < 2 * e.delta_max_bytes + 4 * largest_write {
            return Err("engine.cache_bytes_max must hold two deltas and four requests".into());
        }
        if e.journal_segment_bytes < 4096 {
            return Err("engine.journal_segment_bytes must be at least 4096".into());
        }
        if !(self.duration_seconds > 0.0 && self.duration_seconds <= 86_400.0) {
            return Err("duration_seconds must be in (0, 86400]".into());
        }
        Ok(())
    }
}
