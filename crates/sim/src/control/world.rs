//! The simulated world of a control-plane run: the sites, each with its
//! own drifting clock and its node's durable Raft records, and the links
//! between them. One seeded PRNG draws every delay; time is tokio's paused
//! clock, so a run is a pure function of its seed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use stretch_control::LeaseConfig;
use stretch_core::{SiteId, Timestamp};
use stretch_metadata::MemBackend;

use super::member::Member;
use super::raft_network::SimConfig;
use super::scenario::ControlScenario;
use super::{ControlStats, Violation};
use crate::rng::SimRng;
use crate::trace::Trace;

/// Everything a run shares; tasks hold it by `Arc`.
pub(crate) struct World {
    pub scenario: ControlScenario,
    pub lease: LeaseConfig,
    origin: tokio::time::Instant,
    pub sites: Vec<Slot>,
    pub state: Mutex<WorldState>,
}

/// What changes during a run, under one lock (the runtime is one thread;
/// the lock is never held across an await).
pub(crate) struct WorldState {
    pub rng: SimRng,
    /// `up[from][to]`: whether a message from `from` to `to` gets through.
    pub up: Vec<Vec<bool>>,
    /// One-way delay per direction, nanoseconds.
    pub delay_ns: Vec<Vec<u64>>,
    pub trace: Trace,
    pub stats: ControlStats,
    pub violation: Option<(Violation, u64)>,
    /// Each node's Raft view (leader, term, applied index) when last
    /// traced.
    pub raft_views: Vec<Option<(Option<u64>, u64, u64)>>,
    /// Where each group was acknowledged at the last probe.
    pub acknowledged_at: std::collections::BTreeMap<u32, Vec<usize>>,
}

/// One site: its node's durable records outlive the node's incarnations.
pub(crate) struct Slot {
    pub index: usize,
    pub name: String,
    pub id: SiteId,
    pub data: bool,
    /// How far this site's clock rate is from real time, in parts per
    /// million (within the configured bound).
    pub drift_ppm: i64,
    pub backend: MemBackend<SimConfig>,
    pub running: Mutex<Option<Arc<Member>>>,
    /// Incarnations started so far; and the lease request ids used, so a
    /// restarted holder never reuses one (the node uses the wall clock).
    pub generation: Mutex<u64>,
    pub next_lease_id: Mutex<u64>,
}

impl World {
    pub fn new(
        scenario: ControlScenario,
        lease: LeaseConfig,
        rng: &mut SimRng,
        keep_trace: bool,
    ) -> World {
        let sites = scenario.sites();
        let bound = scenario.lease.drift_ppm as i64;
        let slots = (0..sites)
            .map(|index| {
                let data = index < scenario.data_sites as usize;
                let drift_ppm = rng.between(0, 2 * bound as u64) as i64 - bound;
                Slot {
                    index,
                    name: if data {
                        ((b'a' + index as u8) as char).to_string()
                    } else {
                        "w".to_string()
                    },
                    id: SiteId(index as u32 + 1),
                    data,
                    drift_ppm,
                    backend: MemBackend::new(),
                    running: Mutex::new(None),
                    generation: Mutex::new(0),
                    next_lease_id: Mutex::new(1),
                }
            })
            .collect();
        let delay_ns = (0..sites)
            .map(|_| {
                (0..sites)
                    .map(|_| rng.between(scenario.delay_ms_min, scenario.delay_ms_max) * 1_000_000)
                    .collect()
            })
            .collect();
        World {
            lease,
            origin: tokio::time::Instant::now(),
            sites: slots,
            state: Mutex::new(WorldState {
                rng: rng.fork(),
                up: vec![vec![true; sites]; sites],
                delay_ns,
                trace: Trace::new(keep_trace),
                stats: ControlStats::default(),
                violation: None,
                raft_views: vec![None; sites],
                acknowledged_at: std::collections::BTreeMap::new(),
            }),
            scenario,
        }
    }

    /// Real (simulated) time since the run began.
    pub fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Site `site`'s own monotonic clock: real time scaled by its drift.
    pub fn local_now(&self, site: usize) -> Timestamp {
        let real = i128::from(self.now_ns());
        let drift = i128::from(self.sites[site].drift_ppm);
        Timestamp((real + real * drift / 1_000_000) as u64)
    }

    /// Sleeps for `duration` as measured on `site`'s clock.
    pub async fn sleep_local(&self, site: usize, duration: Duration) {
        let local = duration.as_nanos() as i128;
        let drift = i128::from(self.sites[site].drift_ppm);
        // Whole milliseconds (see `transit`).
        let real_ns = (local * 1_000_000 / (1_000_000 + drift)).max(1) as u64;
        let real_ms = real_ns.div_ceil(1_000_000);
        tokio::time::sleep(Duration::from_millis(real_ms)).await;
    }

    pub fn member(&self, site: usize) -> Option<Arc<Member>> {
        self.sites[site].running.lock().clone()
    }

    pub fn generation(&self, site: usize) -> u64 {
        *self.sites[site].generation.lock()
    }

    /// Index of the site a Raft node id names.
    pub fn site_of_node(&self, node: u64) -> Option<usize> {
        let index = usize::try_from(node.checked_sub(1)?).ok()?;
        (index < self.sites.len()).then_some(index)
    }

    pub fn site_by_name(&self, name: &str) -> Option<usize> {
        self.sites.iter().position(|slot| slot.name == name)
    }

    pub fn voters(&self) -> Vec<SiteId> {
        self.sites.iter().map(|slot| slot.id).collect()
    }

    pub fn record(&self, fields: &[u64], describe: impl FnOnce() -> String) {
        let now = self.now_ns();
        self.state.lock().trace.record(now, fields, describe);
    }

    /// Records the first violation; the run stops at its next step.
    pub fn fail(&self, guarantee: &'static str, detail: String) {
        let now = self.now_ns();
        let mut state = self.state.lock();
        if state.violation.is_some() {
            return;
        }
        let line = format!("VIOLATION {guarantee}: {detail}");
        state.trace.record(now, &[u64::MAX], || line);
        state.violation = Some((Violation { guarantee, detail }, now));
        drop(state);
        // Each node's Raft state, for the replay.
        for site in 0..self.sites.len() {
            let Some(raft) = self.member(site).and_then(|member| member.raft()) else {
                continue;
            };
            let metrics =
                openraft::async_runtime::WatchReceiver::borrow_watched(&raft.metrics()).clone();
            let name = self.sites[site].name.clone();
            self.state.lock().trace.record(now, &[], || {
                format!(
                    "site {name}: {:?} term {} leader {:?} last log {:?} applied {:?} replication {:?}",
                    metrics.state,
                    metrics.current_term,
                    metrics.current_leader,
                    metrics.last_log_index,
                    metrics.last_applied,
                    metrics.replication
                )
            });
        }
    }

    pub fn failed(&self) -> bool {
        self.state.lock().violation.is_some()
    }

    /// Whether messages get through both ways between two sites.
    pub fn connected(&self, one: usize, other: usize) -> bool {
        let state = self.state.lock();
        state.up[one][other] && state.up[other][one]
    }

    /// Messages from `from` to `to` get through (`up`) or are lost; the
    /// other direction is left as it is.
    pub fn set_direction(&self, from: usize, to: usize, up: bool) {
        self.state.lock().up[from][to] = up;
    }

    pub fn set_link(&self, one: usize, other: usize, up: bool) {
        let mut state = self.state.lock();
        state.up[one][other] = up;
        state.up[other][one] = up;
    }

    /// One message's trip from `from` to `to`: its delay with jitter, and
    /// whether it arrives (the link is up when it leaves and when it
    /// lands, and a node is running there). `None`: lost.
    async fn transit(&self, from: usize, to: usize) -> Option<Arc<Member>> {
        let delay = {
            let mut state = self.state.lock();
            if !state.up[from][to] {
                return None;
            }
            // Whole milliseconds: tokio's timer rounds every deadline up to
            // its millisecond tick, counted from an instant a little apart
            // from the run's origin; deadlines off the grid would round
            // differently from run to run.
            let base = state.delay_ns[from][to] / 1_000_000;
            (base + state.rng.below(base / 10 + 1)) * 1_000_000
        };
        tokio::time::sleep(Duration::from_nanos(delay)).await;
        if !self.state.lock().up[from][to] {
            return None;
        }
        self.member(to)
    }

    /// A request from `from` served at `to` by `serve`, and its answer
    /// back; `None` if either message was lost or the answer came after
    /// `timeout` (a lost message costs the caller the whole timeout, as a
    /// silent network does). The answer is dropped if the caller's node
    /// restarted meanwhile.
    pub async fn call<R, F, Fut>(
        &self,
        from: usize,
        to: usize,
        timeout: Duration,
        serve: F,
    ) -> Option<R>
    where
        F: FnOnce(Arc<Member>) -> Fut,
        Fut: Future<Output = R>,
    {
        let caller = self.generation(from);
        let trip = async {
            let Some(there) = self.transit(from, to).await else {
                return std::future::pending().await;
            };
            let reply = serve(there).await;
            if self.transit(to, from).await.is_none() || self.generation(from) != caller {
                return std::future::pending().await;
            }
            Some(reply)
        };
        tokio::time::timeout(timeout, trip).await.ok().flatten()
    }
}
