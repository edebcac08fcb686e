//! Coverage marks: named protocol decisions, counted per engine. The
//! simulator adds them up per run and its swarm reports how many seeds
//! reach each, so a rule the faults seldom exercise shows up as a number,
//! not as a bug that landed unseen.

/// A protocol decision worth reaching often in simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mark {
    /// A site away past the backlog bound became regions to resync.
    FoldAbsent,
    /// A site declared gone with the backlog full was folded at once.
    FoldGone,
    /// A connected site holding writes back past `backlog_wait_ms_max` was
    /// folded and told to rejoin.
    FoldLagging,
    /// A replica was told to rejoin and resumed.
    Rejoined,
    /// A resuming site caught up from retained deltas.
    CatchUpFromRetained,
    /// A region resync started.
    ResyncStarted,
    /// A resync read was torn by a leg write and read again.
    ResyncReadStale,
    /// A chunk waited for the owner's journal before it left.
    ResyncChunkHeld,
    /// A resync stopped before its end (cut, or a new resume).
    ResyncAbandoned,
    /// A resync finished: the site streams deltas again.
    ResyncFinished,
    /// A replica resumed with its image at no delta boundary (mid-resync,
    /// perhaps after a restart).
    ResumedMidResync,
    /// A site whose image holds deltas a failover discarded resumed: no
    /// progress acks from its own line, a whole resync.
    DivergedResume,
    /// A site resumed mid-resync at an owner that restarted since: every
    /// region is copied again (the saved map may predate the resync).
    RestoredMidResync,
    /// A chunk answering an earlier resume was refused.
    StaleChunkRefused,
    /// The maps of what other sites lack were saved before a release.
    DirtyMapSaved,
    /// A restarted owner restored a saved map.
    DirtyMapRestored,
    /// A strict read was answered with a diff from retained history.
    StrictReadFromHistory,
    /// A strict read was answered with a diff including open or unapplied
    /// cache blocks.
    StrictReadFromCache,
    /// A site too far behind for a diff got the whole range.
    StrictReadWholeRange,
    /// A strict read or forwarded request timed out.
    RemoteTimedOut,
    /// A strict read waiting for an owner this site then took the group
    /// over from was served here.
    RemoteReadServedAfterTakeover,
    /// A write waited for cache room.
    CacheThrottled,
    /// A write waited on a full backlog.
    BacklogThrottled,
    /// A FLUSH, FUA or sync-mode write waited for another site's journal.
    WaitedForPeer,
    /// A replica refused a delta after a gap and asked to resume.
    DeltaGapRefused,
    /// A replica got a delta it already had (sent again after a reconnect).
    DuplicateDelta,
    /// A replica took several deltas merged into one record (it was behind,
    /// so its owner merged what waited for it).
    MergedDeltasReceived,
    /// An owner held deltas back for a site because the window measured
    /// from the link (below `ship_window_bytes_max`) was full.
    MeasuredWindowHeldDeltas,
    /// A resuming site's newest delta was written under another epoch than
    /// the owner's history says: its image diverged, and which regions
    /// differ is not known on one side or the other: every region is copied.
    DivergedReplicaResync,
    /// An owner resynced a site whose deltas diverged by region: the
    /// regions the site's lost deltas wrote and the ones this line wrote
    /// since the lines split.
    DivergedRegionResync,
    /// A strict read at a site holding deltas a failover discarded asked
    /// the owner for the whole range: its seqs name another line's deltas.
    DivergedWholeRead,
    /// A site got a read lease on regions it reads.
    ReadLeaseGranted,
    /// A strict read at a site that does not own the volume was served
    /// from its own image under a read lease.
    ReadLeaseServedLocally,
    /// A holder asked again for leases past half their period on regions
    /// it read lately.
    ReadLeaseRenewed,
    /// A holder confirmed a revocation an owner's write waited for.
    ReadLeaseRevoked,
    /// An owner's write went ahead once the leases in its way ran out,
    /// their revocation unconfirmed (the holder cut off, or gone).
    ReadLeaseRanOut,
    /// A holder dropped a lease still running when an owner that did not
    /// know what had been granted (it restarted, or took the group over)
    /// revoked every lease on the group: the revocation a write waits for
    /// after such a start.
    ReadLeaseUnknownRevoked,
    /// A lease was not asked for (holder) or not granted (owner) because
    /// `read_leases_max` was reached, renewals aside.
    ReadLeaseBoundReached,
    /// A site held a forwarded request or strict read from the site it
    /// took for the owner, which had handed the group to it, until it
    /// learned that it owns the group (or refused it past its bound).
    AwaitedOwnership,
    /// A fast migration's target began copying what it lacks.
    FastDrainStarted,
    /// A restarted target took up a drain from its log.
    FastDrainResumedFromLog,
    /// A request waited at a target for a region to be copied.
    FastDrainRequestWaited,
    /// A target copied a region from its source.
    FastDrainRegionCopied,
    /// A source answered a copy.
    FastDrainServed,
    /// A request waiting for a copy failed: the source did not answer.
    FastDrainRequestTimedOut,
    /// Ownership left a target before its drain ended: resynced whole.
    FastDrainAbandoned,
}

impl Mark {
    pub const ALL: [Mark; 46] = [
        Mark::FoldAbsent,
        Mark::FoldGone,
        Mark::FoldLagging,
        Mark::Rejoined,
        Mark::CatchUpFromRetained,
        Mark::ResyncStarted,
        Mark::ResyncReadStale,
        Mark::ResyncChunkHeld,
        Mark::ResyncAbandoned,
        Mark::ResyncFinished,
        Mark::ResumedMidResync,
        Mark::DivergedResume,
        Mark::RestoredMidResync,
        Mark::StaleChunkRefused,
        Mark::DirtyMapSaved,
        Mark::DirtyMapRestored,
        Mark::StrictReadFromHistory,
        Mark::StrictReadFromCache,
        Mark::StrictReadWholeRange,
        Mark::RemoteTimedOut,
        Mark::RemoteReadServedAfterTakeover,
        Mark::CacheThrottled,
        Mark::BacklogThrottled,
        Mark::WaitedForPeer,
        Mark::DeltaGapRefused,
        Mark::DuplicateDelta,
        Mark::MergedDeltasReceived,
        Mark::MeasuredWindowHeldDeltas,
        Mark::DivergedReplicaResync,
        Mark::DivergedRegionResync,
        Mark::DivergedWholeRead,
        Mark::ReadLeaseGranted,
        Mark::ReadLeaseServedLocally,
        Mark::ReadLeaseRenewed,
        Mark::ReadLeaseRevoked,
        Mark::ReadLeaseRanOut,
        Mark::ReadLeaseUnknownRevoked,
        Mark::ReadLeaseBoundReached,
        Mark::AwaitedOwnership,
        Mark::FastDrainStarted,
        Mark::FastDrainResumedFromLog,
        Mark::FastDrainRequestWaited,
        Mark::FastDrainRegionCopied,
        Mark::FastDrainServed,
        Mark::FastDrainRequestTimedOut,
        Mark::FastDrainAbandoned,
    ];

    /// Faults that hit a fast migration mid-copy: the swarm holds too few
    /// fast migrations to reach them often, so the fast migration scenario
    /// (`simulation/migration/fast-two-sites.toml`) must, in 5 % of its
    /// seeds each, instead.
    pub const FAST_DRAIN_FAULTS: [Mark; 3] = [
        Mark::FastDrainResumedFromLog,
        Mark::FastDrainRequestTimedOut,
        Mark::FastDrainAbandoned,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mark::FoldAbsent => "fold-absent",
            Mark::FoldGone => "fold-gone",
            Mark::FoldLagging => "fold-lagging",
            Mark::Rejoined => "rejoined",
            Mark::CatchUpFromRetained => "catch-up-from-retained",
            Mark::ResyncStarted => "resync-started",
            Mark::ResyncReadStale => "resync-read-stale",
            Mark::ResyncChunkHeld => "resync-chunk-held",
            Mark::ResyncAbandoned => "resync-abandoned",
            Mark::ResyncFinished => "resync-finished",
            Mark::ResumedMidResync => "resumed-mid-resync",
            Mark::DivergedResume => "diverged-resume",
            Mark::RestoredMidResync => "restored-mid-resync",
            Mark::StaleChunkRefused => "stale-chunk-refused",
            Mark::DirtyMapSaved => "dirty-map-saved",
            Mark::DirtyMapRestored => "dirty-map-restored",
            Mark::StrictReadFromHistory => "strict-read-from-history",
            Mark::StrictReadFromCache => "strict-read-from-cache",
            Mark::StrictReadWholeRange => "strict-read-whole-range",
            Mark::RemoteTimedOut => "remote-timed-out",
            Mark::RemoteReadServedAfterTakeover => "remote-read-served-after-takeover",
            Mark::CacheThrottled => "cache-throttled",
            Mark::BacklogThrottled => "backlog-throttled",
            Mark::WaitedForPeer => "waited-for-peer",
            Mark::DeltaGapRefused => "delta-gap-refused",
            Mark::DuplicateDelta => "duplicate-delta",
            Mark::MergedDeltasReceived => "merged-deltas-received",
            Mark::MeasuredWindowHeldDeltas => "measured-window-held-deltas",
            Mark::DivergedReplicaResync => "diverged-replica-resync",
            Mark::DivergedRegionResync => "diverged-region-resync",
            Mark::DivergedWholeRead => "diverged-whole-read",
            Mark::ReadLeaseGranted => "read-lease-granted",
            Mark::ReadLeaseServedLocally => "read-lease-served-locally",
            Mark::ReadLeaseRenewed => "read-lease-renewed",
            Mark::ReadLeaseRevoked => "read-lease-revoked",
            Mark::ReadLeaseRanOut => "read-lease-ran-out",
            Mark::ReadLeaseUnknownRevoked => "read-lease-unknown-revoked",
            Mark::ReadLeaseBoundReached => "read-lease-bound-reached",
            Mark::AwaitedOwnership => "awaited-ownership",
            Mark::FastDrainStarted => "fast-drain-started",
            Mark::FastDrainResumedFromLog => "fast-drain-resumed-from-log",
            Mark::FastDrainRequestWaited => "fast-drain-request-waited",
            Mark::FastDrainRegionCopied => "fast-drain-region-copied",
            Mark::FastDrainServed => "fast-drain-served",
            Mark::FastDrainRequestTimedOut => "fast-drain-request-timed-out",
            Mark::FastDrainAbandoned => "fast-drain-abandoned",
        }
    }

    fn index(self) -> usize {
        Mark::ALL
            .iter()
            .position(|mark| *mark == self)
            .expect("marks invariant: ALL lists every mark")
    }
}

/// How often each mark was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marks([u64; Mark::ALL.len()]);

impl Default for Marks {
    fn default() -> Self {
        Marks([0; Mark::ALL.len()])
    }
}

impl Marks {
    pub fn hit(&mut self, mark: Mark) {
        self.0[mark.index()] += 1;
    }

    pub fn count(&self, mark: Mark) -> u64 {
        self.0[mark.index()]
    }

    /// Adds another engine's counts (a crashed incarnation's, say).
    pub fn add(&mut self, other: &Marks) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }
}
