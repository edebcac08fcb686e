//! Ownership leases: the fencing half of G1 at the site that owns a group.
//!
//! The control plane grants this site a lease and renews it while the site
//! stays in touch with the ownership authority; another site may take a
//! group over only once the lease it saw could have run out. So, when
//! leases are enforced ([`EngineConfig::leases_enforced`]):
//! - a write, zeroing, trim, flush or strict read of a group this site
//!   owns starts only while the lease is valid; otherwise it waits, in
//!   submission order, for a renewal (then it starts) or for
//!   `suspend_hold_ms` (then it fails with an I/O error), bounded by
//!   `suspended_requests_max`;
//! - a successful answer to such a request is turned into an I/O error if
//!   the lease is no longer valid when it leaves: a site never acknowledges
//!   after its lease ran out, whatever it did before.
//!
//! Snapshot reads and requests for groups owned elsewhere are not bound:
//! the first promise nothing about other sites' writes, the second are
//! answered by their owner, under its lease.

use super::*;

/// Lease state of this site and the requests that wait for it.
#[derive(Debug, Default)]
pub(super) struct Lease {
    /// The lease is valid while the engine's now is before this.
    until: Option<Timestamp>,
    /// Requests waiting for a lease, oldest first.
    suspended: VecDeque<Suspended>,
    /// Requests started under the lease and not answered yet, with what
    /// they are (for the error message). Checked once, when answered.
    bound: BTreeMap<RequestId, &'static str>,
}

#[derive(Debug)]
struct Suspended {
    request: RequestId,
    body: Request,
    since: Timestamp,
    deadline: Timestamp,
}

impl Lease {
    pub(super) fn next_deadline(&self) -> Option<Timestamp> {
        // Held in arrival order with one hold time: the front ends first.
        self.suspended.front().map(|suspended| suspended.deadline)
    }

    pub(super) fn suspended_count(&self) -> usize {
        self.suspended.len()
    }

    pub(super) fn is_idle(&self) -> bool {
        self.suspended.is_empty()
    }

    pub(super) fn holds_volume(&self, volume: VolumeId) -> bool {
        self.suspended
            .iter()
            .any(|suspended| suspended.body.volume() == volume)
    }
}

/// What a lease-bound request is, for error messages; `None` for requests
/// the lease does not bind (snapshot reads).
fn bound_kind(request: &Request) -> Option<&'static str> {
    match request {
        Request::Write { .. } | Request::WriteZeroes { .. } => Some("write"),
        Request::Trim { .. } => Some("trim"),
        Request::Flush { .. } => Some("flush"),
        Request::Read { .. } => Some("read"),
        Request::ReadSnapshot { .. } => None,
    }
}

fn suspended_error(detail: String) -> RequestError {
    RequestError::Io(format!(
        "volume suspended: this site holds no ownership lease ({detail})"
    ))
}

impl Engine {
    /// The ownership lease of this site is valid until `until` (exclusive;
    /// `None`: no lease). A valid lease starts the requests that waited
    /// for it, in the order they arrived.
    pub fn set_lease_until(&mut self, now: Timestamp, until: Option<Timestamp>) {
        self.observe(now);
        self.lease.until = until;
        if self.lease_valid() {
            self.resume_suspended(|_| true);
        }
    }

    /// Moves the engine's notion of now forward without any other event:
    /// a runtime calls it before events that carry no time (completions),
    /// so that an answer they release is checked against the lease as of
    /// the real now, not the time of the last event.
    pub fn advance_clock(&mut self, now: Timestamp) {
        self.observe(now);
    }

    /// True if this site may serve and acknowledge lease-bound requests now.
    pub(super) fn lease_valid(&self) -> bool {
        !self.config.leases_enforced || self.lease.until.is_some_and(|until| self.now < until)
    }

    /// Called for a request on a group this site owns, before it starts:
    /// gives it back if it may start now (recording it as lease-bound),
    /// or keeps it (held, or failed past the bound).
    pub(super) fn gate_on_lease(
        &mut self,
        request_id: RequestId,
        request: Request,
    ) -> Option<Request> {
        if !self.config.leases_enforced {
            return Some(request);
        }
        let Some(kind) = bound_kind(&request) else {
            return Some(request);
        };
        if self.lease_valid() {
            self.lease.bound.insert(request_id, kind);
            return Some(request);
        }
        if self.is_forwarded(request_id) {
            // Another site's request is not held here: its site times it
            // out and its client may write the range again meanwhile, so a
            // write held here and applied (or sent on to a new owner) after
            // that would land over newer data.
            self.stats.suspended_failed_total += 1;
            let error = suspended_error("a forwarded request is not held".into());
            self.reply(request_id, Err(error));
            return None;
        }
        if self.lease.suspended.len() >= self.config.suspended_requests_max {
            self.stats.suspended_failed_total += 1;
            let error = suspended_error(format!(
                "{} requests already wait for one",
                self.lease.suspended.len()
            ));
            self.reply(request_id, Err(error));
            return None;
        }
        let deadline = self.now.saturating_add_millis(self.config.suspend_hold_ms);
        self.lease.suspended.push_back(Suspended {
            request: request_id,
            body: request,
            since: self.now,
            deadline,
        });
        None
    }

    /// Fails the requests that waited for a lease past `suspend_hold_ms`.
    pub(super) fn expire_suspended(&mut self, now: Timestamp) {
        while let Some(front) = self.lease.suspended.front() {
            if front.deadline > now {
                break;
            }
            let suspended = self
                .lease
                .suspended
                .pop_front()
                .expect("engine invariant: front exists");
            self.stats.suspended_failed_total += 1;
            let held_ms = now.0.saturating_sub(suspended.since.0) / 1_000_000;
            let error = suspended_error(format!("held {held_ms} ms"));
            self.reply(suspended.request, Err(error));
        }
    }

    /// Submits again, in their order, the waiting requests `which` selects
    /// (by volume). They go through the whole gate again: a request for a
    /// group now owned elsewhere is forwarded to its owner.
    pub(super) fn resume_suspended(&mut self, which: impl Fn(VolumeId) -> bool) {
        let (ready, waiting): (VecDeque<Suspended>, VecDeque<Suspended>) =
            std::mem::take(&mut self.lease.suspended)
                .into_iter()
                .partition(|suspended| which(suspended.body.volume()));
        self.lease.suspended = waiting;
        let now = self.now;
        for suspended in ready {
            self.submit(now, suspended.request, suspended.body);
        }
    }

    /// The fencing rule on the way out: a successful answer to a
    /// lease-bound request leaves only while the lease is still valid.
    pub(super) fn fence_reply(
        &mut self,
        request: RequestId,
        result: Result<Response, RequestError>,
    ) -> Result<Response, RequestError> {
        let Some(kind) = self.lease.bound.remove(&request) else {
            return result;
        };
        if result.is_err() || self.lease_valid() {
            return result;
        }
        self.stats.lease_expired_replies_total += 1;
        Err(RequestError::Io(format!(
            "this site's ownership lease expired before the {kind} was acknowledged"
        )))
    }
}
