//! Engine tests: feed events, assert the exact actions that come out.

use bytes::Bytes;

use super::*;

const VOLUME: VolumeId = VolumeId(1);
const GROUP: GroupId = GroupId(7);

fn engine() -> Engine {
    engine_with_cache(1 << 20, 64 << 10)
}

fn engine_with(config: EngineConfig) -> Engine {
    let mut engine = Engine::new(config, RecoveredState::default());
    engine.add_volume(
        VOLUME,
        VolumeSpec {
            size: 1 << 20,
            group: GROUP,
            mode: Mode::Async,
        },
    );
    engine
}

/// An engine whose cache holds `cache_bytes_max` and whose deltas close
/// at `delta_max_bytes`.
fn engine_with_cache(cache_bytes_max: u64, delta_max_bytes: u64) -> Engine {
    engine_with(EngineConfig {
        delta_interval_ms: 100,
        delta_max_bytes,
        cache_bytes_max,
        journal_checkpoint_bytes: 1 << 20,
        ..EngineConfig::default()
    })
}

fn drain(engine: &mut Engine) -> Vec<Action> {
    std::iter::from_fn(|| engine.poll_action()).collect()
}

fn block(byte: u8) -> Bytes {
    Bytes::from(vec![byte; BLOCK_SIZE])
}

fn key(block: u64) -> BlockKey {
    BlockKey {
        volume: VOLUME,
        block,
    }
}

fn write(engine: &mut Engine, now_ms: u64, request: u64, offset: u64, data: Bytes, fua: bool) {
    engine.submit(
        Timestamp::from_millis(now_ms),
        RequestId(request),
        Request::Write {
            volume: VOLUME,
            offset,
            data,
            fua,
        },
    );
}

fn done(request: u64) -> Action {
    Action::Reply {
        request: RequestId(request),
        result: Ok(Response::Done),
    }
}

#[test]
fn write_is_acknowledged_at_once_and_held_in_the_open_delta() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 0, block(0xaa), false);
    assert_eq!(drain(&mut engine), vec![done(1)]);
    assert_eq!(engine.poll_timeout(), Some(Timestamp::from_millis(100)));
    assert_eq!(engine.stats().open_deltas, 1);
}

#[test]
fn delta_closes_on_interval_then_journal_sync_then_leg_apply_then_release() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 0, block(1), false);
    write(&mut engine, 10, 2, 4096, block(2), false);
    drain(&mut engine);
    engine.handle_timeout(Timestamp::from_millis(99));
    assert_eq!(drain(&mut engine), vec![]);
    engine.handle_timeout(Timestamp::from_millis(100));
    let record = DeltaRecord {
        position: JournalPosition(1),
        group: GROUP,
        epoch: Epoch(1),
        seq: DeltaSeq(1),
        blocks: vec![
            (key(0), BlockImage::Data(block(1))),
            (key(1), BlockImage::Data(block(2))),
        ],
    };
    assert_eq!(
        drain(&mut engine),
        vec![
            Action::AppendJournal {
                record: record.clone()
            },
            Action::SyncJournal {
                io: IoId(1),
                upto: JournalPosition(1)
            },
        ]
    );
    assert_eq!(engine.stats().journal_bytes, journal_record_bytes(&record));
    // A 48-byte header, and per block 13 bytes of key and its 4 KiB.
    assert_eq!(journal_record_bytes(&record), 48 + 2 * (13 + 4096));
    engine.journal_synced(IoId(1), Ok(()));
    assert_eq!(
        drain(&mut engine),
        vec![Action::WriteLeg {
            io: IoId(2),
            group: GROUP,
            seq: DeltaSeq(1),
            blocks: record.blocks.clone(),
        }]
    );
    assert_eq!(engine.stats().applied_deltas_total, 0);
    engine.leg_written(IoId(2), Ok(()));
    assert_eq!(drain(&mut engine), vec![]);
    assert_eq!(engine.stats().dirty_bytes, 0);
    assert_eq!(engine.stats().applied_deltas_total, 1);
    // Nothing in flight, but the record is not released: a node stopping
    // now would replay it at its next start.
    assert!(!engine.is_drained());
    engine.start_drain();
    assert_eq!(
        drain(&mut engine),
        vec![Action::SyncLegs {
            io: IoId(3),
            volumes: vec![VOLUME]
        }]
    );
    engine.legs_synced(IoId(3), Ok(()));
    assert_eq!(
        drain(&mut engine),
        vec![Action::ReleaseJournal {
            upto: JournalPosition(1)
        }]
    );
    assert_eq!(engine.stats().journal_bytes, 0);
    assert!(engine.is_drained());
}

#[test]
fn later_writes_fold_into_the_same_delta() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 0, block(1), false);
    write(&mut engine, 1, 2, 0, block(2), false);
    engine.submit(
        Timestamp::from_millis(2),
        RequestId(3),
        Request::Flush { volume: VOLUME },
    );
    let actions = drain(&mut engine);
    let Action::AppendJournal { record } = &actions[2] else {
        panic!("expected an append, got {actions:?}");
    };
    assert_eq!(record.blocks, vec![(key(0), BlockImage::Data(block(2)))]);
}

#[test]
fn flush_waits_for_the_journal_sync_that_covers_it() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 0, block(1), false);
    engine.submit(
        Timestamp::from_millis(1),
        RequestId(2),
        Request::Flush { volume: VOLUME },
    );
    let actions = drain(&mut engine);
    assert_eq!(actions.len(), 3, "{actions:?}");
    assert_eq!(actions[0], done(1));
    assert!(matches!(actions[1], Action::AppendJournal { .. }));
    assert_eq!(
        actions[2],
        Action::SyncJournal {
            io: IoId(1),
            upto: JournalPosition(1)
        }
    );
    engine.journal_synced(IoId(1), Ok(()));
    let actions = drain(&mut engine);
    assert_eq!(actions[0], done(2));
    assert!(matches!(actions[1], Action::WriteLeg { .. }));
}

#[test]
fn flush_with_nothing_dirty_answers_at_once() {
    let mut engine = engine();
    engine.submit(
        Timestamp(0),
        RequestId(1),
        Request::Flush { volume: VOLUME },
    );
    assert_eq!(drain(&mut engine), vec![done(1)]);
}

#[test]
fn fua_write_closes_the_delta_and_waits_for_the_journal() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 0, block(1), true);
    let actions = drain(&mut engine);
    assert!(matches!(actions[0], Action::AppendJournal { .. }));
    assert!(matches!(actions[1], Action::SyncJournal { .. }));
    assert_eq!(actions.len(), 2);
    engine.journal_synced(IoId(1), Ok(()));
    assert_eq!(drain(&mut engine)[0], done(1));
}

#[test]
fn group_commit_keeps_one_sync_in_flight() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 0, block(1), true);
    write(&mut engine, 0, 2, 4096, block(2), true);
    let actions = drain(&mut engine);
    let syncs = actions
        .iter()
        .filter(|action| matches!(action, Action::SyncJournal { .. }))
        .count();
    assert_eq!(syncs, 1, "{actions:?}");
    engine.journal_synced(IoId(1), Ok(()));
    let actions = drain(&mut engine);
    assert_eq!(actions[0], done(1));
    assert!(actions.contains(&Action::SyncJournal {
        io: IoId(3),
        upto: JournalPosition(2)
    }));
}

#[test]
fn deltas_of_a_group_reach_the_leg_one_at_a_time_in_order() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 0, block(1), true);
    drain(&mut engine);
    write(&mut engine, 0, 2, 0, block(2), true);
    drain(&mut engine);
    engine.journal_synced(IoId(1), Ok(()));
    let actions = drain(&mut engine);
    let legs: Vec<&Action> = actions
        .iter()
        .filter(|action| matches!(action, Action::WriteLeg { .. }))
        .collect();
    assert_eq!(legs.len(), 1);
    assert!(matches!(
        legs[0],
        Action::WriteLeg {
            seq: DeltaSeq(1),
            ..
        }
    ));
    // Delta 2 is journaled but waits for delta 1 to reach the leg.
    engine.journal_synced(IoId(3), Ok(()));
    let actions = drain(&mut engine);
    assert!(!actions.iter().any(|a| matches!(a, Action::WriteLeg { .. })));
    engine.leg_written(IoId(2), Ok(()));
    let actions = drain(&mut engine);
    assert!(matches!(
        actions[0],
        Action::WriteLeg {
            seq: DeltaSeq(2),
            ..
        }
    ));
}

#[test]
fn read_combines_cache_and_leg() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 4096, block(9), false);
    drain(&mut engine);
    engine.submit(
        Timestamp(0),
        RequestId(2),
        Request::Read {
            volume: VOLUME,
            offset: 2048,
            length: 4096 + 2048 + 4096,
        },
    );
    assert_eq!(
        drain(&mut engine),
        vec![
            Action::ReadLeg {
                io: IoId(1),
                volume: VOLUME,
                offset: 2048,
                length: 2048
            },
            Action::ReadLeg {
                io: IoId(2),
                volume: VOLUME,
                offset: 8192,
                length: 4096
            },
        ]
    );
    engine.leg_read_done(IoId(2), Ok(block(3)));
    assert_eq!(drain(&mut engine), vec![]);
    engine.leg_read_done(IoId(1), Ok(Bytes::from(vec![5u8; 2048])));
    let mut expected = vec![5u8; 2048];
    expected.extend(vec![9u8; 4096]);
    expected.extend(vec![3u8; 4096]);
    assert_eq!(
        drain(&mut engine),
        vec![Action::Reply {
            request: RequestId(2),
            result: Ok(Response::Data(Bytes::from(expected)))
        }]
    );
    let stats = engine.stats();
    assert_eq!((stats.cache_hit_blocks, stats.cache_miss_blocks), (1, 2));
}

#[test]
fn unaligned_write_merges_into_the_block_read_from_the_leg() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 100, Bytes::from(vec![7u8; 10]), false);
    assert_eq!(
        drain(&mut engine),
        vec![Action::ReadLeg {
            io: IoId(1),
            volume: VOLUME,
            offset: 0,
            length: 4096
        }]
    );
    engine.leg_read_done(IoId(1), Ok(block(1)));
    assert_eq!(drain(&mut engine), vec![done(1)]);
    let mut expected = vec![1u8; BLOCK_SIZE];
    expected[100..110].fill(7);
    assert_eq!(
        engine.cached_block(&key(0)),
        Some(&BlockImage::Data(Bytes::from(expected)))
    );
}

#[test]
fn concurrent_partial_writes_to_one_block_both_land() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 0, Bytes::from(vec![1u8; 10]), false);
    write(&mut engine, 0, 2, 10, Bytes::from(vec![2u8; 10]), false);
    let actions = drain(&mut engine);
    assert_eq!(actions.len(), 2, "each waits for its own fill: {actions:?}");
    engine.leg_read_done(IoId(1), Ok(block(0)));
    engine.leg_read_done(IoId(2), Ok(block(0)));
    assert_eq!(drain(&mut engine), vec![done(1), done(2)]);
    let mut expected = vec![0u8; BLOCK_SIZE];
    expected[..10].fill(1);
    expected[10..20].fill(2);
    assert_eq!(
        engine.cached_block(&key(0)),
        Some(&BlockImage::Data(Bytes::from(expected)))
    );
}

#[test]
fn out_of_range_requests_are_refused() {
    let mut engine = engine();
    engine.submit(
        Timestamp(0),
        RequestId(1),
        Request::Read {
            volume: VOLUME,
            offset: (1 << 20) - 1,
            length: 2,
        },
    );
    engine.submit(
        Timestamp(0),
        RequestId(2),
        Request::Write {
            volume: VOLUME,
            offset: u64::MAX,
            data: block(1),
            fua: false,
        },
    );
    let actions = drain(&mut engine);
    assert!(matches!(
        &actions[0],
        Action::Reply {
            result: Err(RequestError::OutOfRange { .. }),
            ..
        }
    ));
    assert!(matches!(
        &actions[1],
        Action::Reply {
            result: Err(RequestError::OutOfRange { .. }),
            ..
        }
    ));
}

#[test]
fn writes_are_throttled_past_the_cache_bound_and_resume_after_apply() {
    let mut engine = engine_with_cache(128 << 10, 64 << 10);
    let big = Bytes::from(vec![1u8; 60 << 10]);
    write(&mut engine, 0, 1, 0, big.clone(), false);
    write(&mut engine, 0, 2, 64 << 10, big.clone(), false);
    write(&mut engine, 0, 3, 128 << 10, big, false);
    let actions = drain(&mut engine);
    assert_eq!(
        actions
            .iter()
            .filter(|a| matches!(a, Action::Reply { .. }))
            .count(),
        2
    );
    assert_eq!(engine.stats().throttled_writes_now, 1);
    assert_eq!(engine.stats().throttled_writes_total, 1);
    // Pressure closed the open delta so it can drain: one delta closed.
    assert_eq!(engine.stats().closed_deltas_total, 1);
    let sync = actions
        .iter()
        .find_map(|a| match a {
            Action::SyncJournal { io, .. } => Some(*io),
            _ => None,
        })
        .expect("a sync under pressure");
    engine.journal_synced(sync, Ok(()));
    let actions = drain(&mut engine);
    let Some(Action::WriteLeg { io, .. }) = actions
        .iter()
        .find(|a| matches!(a, Action::WriteLeg { .. }))
    else {
        panic!("expected a leg write: {actions:?}");
    };
    engine.leg_written(*io, Ok(()));
    let actions = drain(&mut engine);
    assert!(actions.contains(&done(3)), "{actions:?}");
}

#[test]
fn a_failed_journal_sync_fails_flushes_and_later_writes() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 0, block(1), true);
    drain(&mut engine);
    engine.journal_synced(IoId(1), Err("EIO".into()));
    let actions = drain(&mut engine);
    assert!(matches!(
        &actions[0],
        Action::Reply {
            request: RequestId(1),
            result: Err(RequestError::Failed(_))
        }
    ));
    write(&mut engine, 1, 2, 0, block(2), false);
    assert!(matches!(
        &drain(&mut engine)[0],
        Action::Reply {
            request: RequestId(2),
            result: Err(RequestError::Failed(_))
        }
    ));
}

#[test]
fn write_zeroes_holds_no_buffer() {
    let mut engine = engine();
    engine.submit(
        Timestamp(0),
        RequestId(1),
        Request::WriteZeroes {
            volume: VOLUME,
            offset: 0,
            length: 32 << 10,
            fua: false,
        },
    );
    assert_eq!(drain(&mut engine)[0], done(1));
    assert_eq!(engine.cached_block(&key(3)), Some(&BlockImage::Zero));
    assert!(engine.stats().dirty_bytes < 4096);
}

#[test]
fn a_backlog_of_unapplied_deltas_does_not_force_leg_syncs() {
    // Three one-block records hold about 12.5 KB of journal; only the
    // applied one (about 4.2 KB) could be released, which is below the
    // checkpoint size, so no leg sync may be issued yet.
    let mut engine = engine_with(EngineConfig {
        delta_interval_ms: 100,
        delta_max_bytes: 64 << 10,
        cache_bytes_max: 1 << 20,
        journal_checkpoint_bytes: 12_000,
        ..EngineConfig::default()
    });
    for request in 1..=3 {
        write(&mut engine, 0, request, 0, block(request as u8), true);
    }
    drain(&mut engine);
    engine.journal_synced(IoId(1), Ok(()));
    let actions = drain(&mut engine);
    let sync = actions
        .iter()
        .find_map(|action| match action {
            Action::SyncJournal { io, .. } => Some(*io),
            _ => None,
        })
        .expect("the second sync covers deltas 2 and 3");
    engine.journal_synced(sync, Ok(()));
    drain(&mut engine);
    engine.leg_written(IoId(2), Ok(()));
    let actions = drain(&mut engine);
    assert!(
        !actions
            .iter()
            .any(|action| matches!(action, Action::SyncLegs { .. })),
        "{actions:?}"
    );
}

// ---------------------------------------------------------------------------
// Ownership leases

fn leased_engine(suspended_requests_max: usize) -> Engine {
    engine_with(EngineConfig {
        delta_interval_ms: 100,
        delta_max_bytes: 64 << 10,
        cache_bytes_max: 1 << 20,
        journal_checkpoint_bytes: 1 << 20,
        leases_enforced: true,
        suspend_hold_ms: 5_000,
        suspended_requests_max,
        ..EngineConfig::default()
    })
}

fn io_error(actions: &[Action], request: u64) -> String {
    let found = actions.iter().find_map(|action| match action {
        Action::Reply {
            request: answered,
            result,
        } if *answered == RequestId(request) => Some(result.clone()),
        _ => None,
    });
    match found {
        Some(Err(RequestError::Io(message))) => message,
        other => panic!("request {request} answered {other:?}, not an I/O error"),
    }
}

#[test]
fn without_a_lease_writes_wait_in_order_and_start_on_renewal() {
    let mut engine = leased_engine(1024);
    write(&mut engine, 0, 1, 0, block(1), false);
    write(&mut engine, 1, 2, 0, block(2), false);
    assert_eq!(drain(&mut engine), vec![]);
    assert_eq!(engine.stats().suspended_requests_now, 2);
    assert!(!engine.is_drained(), "two writes wait for the lease");
    assert_eq!(engine.poll_timeout(), Some(Timestamp::from_millis(5_000)));
    engine.set_lease_until(
        Timestamp::from_millis(10),
        Some(Timestamp::from_millis(10_000)),
    );
    assert_eq!(drain(&mut engine), vec![done(1), done(2)]);
    assert_eq!(engine.stats().suspended_requests_now, 0);
    // Submission order held: the later write is the block's image.
    assert_eq!(
        engine.cached_block(&key(0)),
        Some(&BlockImage::Data(block(2)))
    );
    // Snapshot reads never wait for a lease.
    engine.set_lease_until(Timestamp::from_millis(20), None);
    engine.submit(
        Timestamp::from_millis(20),
        RequestId(3),
        Request::ReadSnapshot {
            volume: VOLUME,
            offset: 0,
            length: 4096,
        },
    );
    assert_eq!(
        drain(&mut engine),
        vec![Action::Reply {
            request: RequestId(3),
            result: Ok(Response::Data(block(2)))
        }]
    );
}

#[test]
fn a_request_waiting_for_a_lease_fails_after_the_hold_time() {
    let mut engine = leased_engine(1024);
    engine.submit(
        Timestamp::from_millis(0),
        RequestId(1),
        Request::Read {
            volume: VOLUME,
            offset: 0,
            length: 4096,
        },
    );
    engine.submit(
        Timestamp::from_millis(0),
        RequestId(2),
        Request::Flush { volume: VOLUME },
    );
    engine.handle_timeout(Timestamp::from_millis(4_999));
    assert_eq!(drain(&mut engine), vec![]);
    engine.handle_timeout(Timestamp::from_millis(5_000));
    let actions = drain(&mut engine);
    assert_eq!(actions.len(), 2);
    let message = io_error(&actions, 1);
    assert!(message.contains("no ownership lease"), "{message}");
    assert!(message.contains("held 5000 ms"), "{message}");
    io_error(&actions, 2);
    assert_eq!(engine.stats().suspended_failed_total, 2);
    assert_eq!(engine.stats().suspended_requests_now, 0);
    assert_eq!(engine.poll_timeout(), None);
}

#[test]
fn past_the_bound_a_request_without_a_lease_fails_at_once() {
    let mut engine = leased_engine(2);
    write(&mut engine, 0, 1, 0, block(1), false);
    write(&mut engine, 0, 2, 4096, block(2), false);
    assert_eq!(drain(&mut engine), vec![]);
    write(&mut engine, 0, 3, 8192, block(3), false);
    let actions = drain(&mut engine);
    let message = io_error(&actions, 3);
    assert!(message.contains("no ownership lease"), "{message}");
    assert_eq!(engine.stats().suspended_failed_total, 1);
    assert_eq!(engine.stats().suspended_requests_now, 2);
    engine.set_lease_until(
        Timestamp::from_millis(1),
        Some(Timestamp::from_millis(1_000)),
    );
    assert_eq!(drain(&mut engine), vec![done(1), done(2)]);
}

#[test]
fn an_answer_ready_after_the_lease_ran_out_is_an_io_error() {
    let mut engine = leased_engine(1024);
    engine.set_lease_until(
        Timestamp::from_millis(0),
        Some(Timestamp::from_millis(1_000)),
    );
    // A FUA write waits for the journal sync; the lease runs out meanwhile.
    write(&mut engine, 0, 1, 0, block(1), true);
    let actions = drain(&mut engine);
    assert!(matches!(
        actions.last(),
        Some(Action::SyncJournal { io: IoId(1), .. })
    ));
    engine.advance_clock(Timestamp::from_millis(1_000));
    engine.journal_synced(IoId(1), Ok(()));
    let actions = drain(&mut engine);
    let message = io_error(&actions, 1);
    assert!(message.contains("lease expired"), "{message}");
    assert_eq!(engine.stats().lease_expired_replies_total, 1);
    // Errors pass unchanged, and are not counted.
    engine.set_lease_until(
        Timestamp::from_millis(1_000),
        Some(Timestamp::from_millis(2_000)),
    );
    write(&mut engine, 1_000, 2, 1 << 30, block(2), false);
    engine.advance_clock(Timestamp::from_millis(3_000));
    assert!(matches!(
        drain(&mut engine).as_slice(),
        [Action::Reply {
            result: Err(RequestError::OutOfRange { .. }),
            ..
        }]
    ));
    assert_eq!(engine.stats().lease_expired_replies_total, 1);
}

#[test]
fn leases_not_enforced_change_nothing() {
    let mut engine = engine();
    assert!(!engine.config().leases_enforced);
    engine.set_lease_until(Timestamp::from_millis(0), None);
    write(&mut engine, 0, 1, 0, block(1), false);
    assert_eq!(drain(&mut engine), vec![done(1)]);
    engine.set_lease_until(Timestamp::from_millis(0), Some(Timestamp::from_millis(1)));
    write(&mut engine, 5, 2, 0, block(2), true);
    drain(&mut engine);
    engine.journal_synced(IoId(1), Ok(()));
    assert!(drain(&mut engine).contains(&done(2)));
    let stats = engine.stats();
    assert_eq!(stats.suspended_requests_now, 0);
    assert_eq!(stats.suspended_failed_total, 0);
    assert_eq!(stats.lease_expired_replies_total, 0);
}

#[test]
fn a_write_larger_than_half_the_cache_is_refused() {
    let mut engine = engine();
    assert_eq!(engine.config().cache_bytes_max, 1 << 20);
    // A quarter of the cache is admitted; past half (with its block
    // bookkeeping) a write could never fit next to a full delta draining.
    write(
        &mut engine,
        0,
        1,
        0,
        Bytes::from(vec![1u8; 256 << 10]),
        false,
    );
    let replies = |engine: &mut Engine| -> Vec<Action> {
        drain(engine)
            .into_iter()
            .filter(|action| matches!(action, Action::Reply { .. }))
            .collect()
    };
    assert_eq!(replies(&mut engine), vec![done(1)]);
    let length = (512 << 10) + BLOCK_SIZE as u64;
    write(
        &mut engine,
        0,
        2,
        0,
        Bytes::from(vec![2u8; length as usize]),
        false,
    );
    assert_eq!(
        replies(&mut engine),
        vec![Action::Reply {
            request: RequestId(2),
            result: Err(RequestError::TooLarge {
                length,
                cache_bytes_max: 1 << 20
            }),
        }]
    );
}

#[test]
fn a_partial_write_over_a_short_leg_read_fails_instead_of_caching_a_short_block() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 512, Bytes::from(vec![7u8; 512]), false);
    let actions = drain(&mut engine);
    let Some(Action::ReadLeg { io, length, .. }) = actions
        .iter()
        .find(|action| matches!(action, Action::ReadLeg { .. }))
    else {
        panic!("a partial write of an uncached block reads it first: {actions:?}");
    };
    assert_eq!(*length, BLOCK_SIZE as u64);
    engine.leg_read_done(*io, Ok(Bytes::from(vec![0u8; 100])));
    let replies: Vec<Action> = drain(&mut engine)
        .into_iter()
        .filter(|action| matches!(action, Action::Reply { .. }))
        .collect();
    assert!(
        matches!(
            replies.as_slice(),
            [Action::Reply {
                request: RequestId(1),
                result: Err(RequestError::Io(reason)),
            }] if reason.contains("short leg read")
        ),
        "{replies:?}"
    );
    assert_eq!(engine.stats().dirty_bytes, 0, "nothing of it was taken");
}

/// A partial write that failed gives back the cache room it reserved for
/// its block: a cache's worth of writes after it is admitted at once.
#[test]
fn a_failed_partial_write_gives_back_its_reserved_room() {
    // Room for exactly sixteen blocks, each charged with its index entry:
    // a single byte left reserved would keep the last one out.
    let cache_bytes_max = 16 * (BLOCK_SIZE as u64 + 64);
    let mut engine = engine_with_cache(cache_bytes_max, 32 << 10);
    write(&mut engine, 0, 1, 512, Bytes::from(vec![7u8; 512]), false);
    let Some(Action::ReadLeg { io, .. }) = drain(&mut engine)
        .into_iter()
        .find(|action| matches!(action, Action::ReadLeg { .. }))
    else {
        panic!("a partial write of an uncached block reads it first");
    };
    engine.leg_read_done(io, Err("EIO".into()));
    drain(&mut engine);
    let blocks = 16;
    for index in 0..blocks {
        write(&mut engine, 1, 10 + index, index * 4096, block(2), false);
    }
    let answered = drain(&mut engine)
        .into_iter()
        .filter(|action| matches!(action, Action::Reply { result: Ok(_), .. }))
        .count();
    assert_eq!(
        answered as u64, blocks,
        "writes filling the cache, admitted at once"
    );
}

#[test]
fn an_engine_with_a_read_in_flight_is_not_drained() {
    let mut engine = engine();
    assert!(engine.is_drained());
    engine.submit(
        Timestamp(0),
        RequestId(1),
        Request::Read {
            volume: VOLUME,
            offset: 0,
            length: 4096,
        },
    );
    drain(&mut engine);
    assert!(!engine.is_drained(), "a leg read is in flight");
    engine.leg_read_done(IoId(1), Ok(block(0)));
    drain(&mut engine);
    assert!(engine.is_drained());
}

/// An acknowledged write still in the open delta (nothing journaled, no
/// I/O in flight) keeps the engine undrained: a node stopping now would
/// lose it.
#[test]
fn an_engine_with_a_write_in_its_open_delta_is_not_drained() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 0, block(1), false);
    assert_eq!(drain(&mut engine), vec![done(1)]);
    assert!(!engine.is_drained(), "the open delta holds a write");
}

#[test]
fn journal_syncs_are_counted() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 0, block(1), true);
    drain(&mut engine);
    assert_eq!(engine.stats().journal_syncs_total, 0);
    engine.journal_synced(IoId(1), Ok(()));
    assert_eq!(engine.stats().journal_syncs_total, 1);
    write(&mut engine, 1, 2, 4096, block(2), true);
    drain(&mut engine);
    engine.journal_synced(IoId(3), Ok(()));
    assert_eq!(engine.stats().journal_syncs_total, 2);
}

/// [`engine`] with a second 1 MiB volume in the same group; returns it.
fn engine_with_a_second_volume() -> (Engine, VolumeId) {
    let mut engine = engine();
    let other = add_second_volume(&mut engine);
    (engine, other)
}

/// Adds volume 2 (1 MiB, async) to `engine`, in the same group as the
/// first.
fn add_second_volume(engine: &mut Engine) -> VolumeId {
    let other = VolumeId(2);
    engine.add_volume(
        other,
        VolumeSpec {
            size: 1 << 20,
            group: GROUP,
            mode: Mode::Async,
        },
    );
    other
}

#[test]
fn a_volume_is_removed_only_when_no_request_on_it_is_in_flight() {
    let (mut engine, other) = engine_with_a_second_volume();
    let read = |engine: &mut Engine, request: u64, volume: VolumeId| {
        engine.submit(
            Timestamp(0),
            RequestId(request),
            Request::Read {
                volume,
                offset: 0,
                length: 4096,
            },
        );
        drain(engine);
    };
    read(&mut engine, 1, VOLUME);
    assert!(matches!(
        engine.remove_volume(VOLUME),
        Err(RequestError::Io(_))
    ));
    // A read on another volume does not hold this one.
    read(&mut engine, 2, other);
    engine.leg_read_done(IoId(1), Ok(block(0)));
    drain(&mut engine);
    assert_eq!(engine.remove_volume(VOLUME), Ok(()));
    assert_eq!(
        engine.remove_volume(VOLUME),
        Err(RequestError::NoVolume(VOLUME))
    );
}

/// Removing a volume drops its cached blocks and no other volume's: a
/// block written to another volume and not yet on its leg is still read
/// from the cache.
#[test]
fn removing_a_volume_keeps_the_cached_blocks_of_the_others() {
    let (mut engine, other) = engine_with_a_second_volume();
    for (request, volume, byte) in [(1, VOLUME, 7), (2, other, 8)] {
        engine.submit(
            Timestamp(0),
            RequestId(request),
            Request::Write {
                volume,
                offset: 0,
                data: block(byte),
                fua: false,
            },
        );
    }
    assert_eq!(drain(&mut engine), vec![done(1), done(2)]);
    assert_eq!(engine.remove_volume(VOLUME), Ok(()));
    engine.submit(
        Timestamp(0),
        RequestId(3),
        Request::Read {
            volume: other,
            offset: 0,
            length: 4096,
        },
    );
    assert_eq!(
        drain(&mut engine),
        vec![Action::Reply {
            request: RequestId(3),
            result: Ok(Response::Data(block(8)))
        }]
    );
}

#[test]
fn a_write_ending_one_byte_short_of_a_block_fills_only_the_block_it_touches() {
    let mut engine = engine();
    // Bytes 4100..8191: inside block 1, touching neither end of it.
    write(&mut engine, 0, 1, 4100, Bytes::from(vec![7u8; 4091]), false);
    assert_eq!(
        drain(&mut engine),
        vec![Action::ReadLeg {
            io: IoId(1),
            volume: VOLUME,
            offset: 4096,
            length: 4096
        }]
    );
}

/// Completes every disk action at once until the engine is quiet.
fn complete_disk_actions(engine: &mut Engine) {
    loop {
        let actions = drain(engine);
        if actions.is_empty() {
            return;
        }
        for action in actions {
            match action {
                Action::SyncJournal { io, .. } => engine.journal_synced(io, Ok(())),
                Action::WriteLeg { io, .. } => engine.leg_written(io, Ok(())),
                Action::SyncLegs { io, .. } => engine.legs_synced(io, Ok(())),
                _ => {}
            }
        }
    }
}

#[test]
fn a_write_into_a_cache_full_of_clean_blocks_evicts_all_it_needs() {
    let cache_bytes_max = 64 << 10;
    let mut engine = engine_with_cache(cache_bytes_max, 16 << 10);
    // Fill three quarters of the cache with clean blocks: written,
    // journaled, on the leg.
    for index in 0..12u64 {
        write(&mut engine, 0, index + 1, index * 4096, block(1), false);
    }
    engine.handle_timeout(Timestamp::from_millis(100));
    complete_disk_actions(&mut engine);
    let stats = engine.stats();
    assert_eq!(stats.dirty_bytes, 0);
    assert!(stats.clean_bytes > cache_bytes_max / 2);
    // Six blocks more need three clean ones evicted, not one.
    write(
        &mut engine,
        200,
        100,
        64 << 10,
        Bytes::from(vec![2u8; 24 << 10]),
        false,
    );
    assert!(drain(&mut engine).contains(&done(100)), "admitted at once");
    let stats = engine.stats();
    assert!(
        stats.dirty_bytes + stats.clean_bytes <= cache_bytes_max,
        "{} dirty and {} clean bytes in a cache of {cache_bytes_max}",
        stats.dirty_bytes,
        stats.clean_bytes
    );
    // And no more than it needs: most clean blocks stay cached.
    assert!(
        stats.clean_bytes >= cache_bytes_max / 2,
        "{} clean bytes left",
        stats.clean_bytes
    );
}

/// A write waiting for cache room, or for the ownership lease, is a
/// request in flight on its own volume alone: that volume cannot be
/// removed while it waits, another volume of the group can.
#[test]
fn a_write_waiting_for_cache_room_or_the_lease_holds_only_its_own_volume() {
    for waiting in ["cache room", "the lease"] {
        let mut engine = if waiting == "cache room" {
            engine_with_cache(128 << 10, 64 << 10)
        } else {
            leased_engine(1024)
        };
        let other = add_second_volume(&mut engine);
        if waiting == "cache room" {
            let big = Bytes::from(vec![1u8; 60 << 10]);
            for (request, offset) in [(1, 0), (2, 64 << 10), (3, 128 << 10)] {
                write(&mut engine, 0, request, offset, big.clone(), false);
            }
            drain(&mut engine);
            assert_eq!(engine.stats().throttled_writes_now, 1);
        } else {
            write(&mut engine, 0, 1, 0, block(1), false);
            assert_eq!(drain(&mut engine), vec![]);
            assert_eq!(engine.stats().suspended_requests_now, 1);
        }
        assert_eq!(engine.remove_volume(other), Ok(()), "{waiting}");
        assert!(
            matches!(engine.remove_volume(VOLUME), Err(RequestError::Io(_))),
            "{waiting}"
        );
    }
}

/// A failed journal append stops the engine: it says why, and refuses
/// writes after it (nothing could be made durable), naming the reason.
#[test]
fn a_failed_journal_append_stops_writes_and_says_why() {
    let mut engine = engine();
    assert_eq!(engine.failure(), None);
    engine.journal_failed("disk full".into());
    assert_eq!(engine.failure(), Some("journal append failed: disk full"));
    assert!(engine.stats().failed);
    write(&mut engine, 0, 1, 0, block(1), false);
    let actions = drain(&mut engine);
    assert!(
        matches!(
            actions.as_slice(),
            [Action::Reply { request: RequestId(1), result: Err(RequestError::Failed(reason)) }]
                if reason.contains("disk full")
        ),
        "{actions:?}"
    );
}

/// A leg read that comes back shorter (or longer) than asked fails the
/// read: bytes from a disk are not trusted to be what was asked for.
#[test]
fn a_leg_read_of_the_wrong_length_fails_the_read() {
    let mut engine = engine();
    engine.submit(
        Timestamp(0),
        RequestId(1),
        Request::Read {
            volume: VOLUME,
            offset: 0,
            length: 4096,
        },
    );
    let actions = drain(&mut engine);
    let Some(io) = actions.iter().find_map(|action| match action {
        Action::ReadLeg { io, .. } => Some(*io),
        _ => None,
    }) else {
        panic!("expected a leg read: {actions:?}");
    };
    engine.leg_read_done(io, Ok(Bytes::from(vec![0u8; 100])));
    let actions = drain(&mut engine);
    assert!(
        matches!(
            actions.as_slice(),
            [Action::Reply {
                request: RequestId(1),
                result: Err(RequestError::Io(_))
            }]
        ),
        "{actions:?}"
    );
}

/// A block written twice in one delta is held once: the dirty bytes count
/// its newest image only, and the journal record carries it once.
#[test]
fn a_block_rewritten_in_the_open_delta_is_counted_once() {
    let mut engine = engine();
    write(&mut engine, 0, 1, 0, block(1), false);
    drain(&mut engine);
    let once = engine.stats().dirty_bytes;
    assert!(once >= BLOCK_SIZE as u64);
    write(&mut engine, 0, 2, 0, block(2), false);
    drain(&mut engine);
    assert_eq!(engine.stats().dirty_bytes, once);
    engine.handle_timeout(Timestamp::from_millis(100));
    let actions = drain(&mut engine);
    let Some(record) = actions.iter().find_map(|action| match action {
        Action::AppendJournal { record } => Some(record),
        _ => None,
    }) else {
        panic!("expected the delta journaled: {actions:?}");
    };
    assert_eq!(record.blocks.len(), 1);
    assert_eq!(record.data_bytes(), BLOCK_SIZE as u64);
    // Journaled and on the leg: nothing is dirty any more.
    let mut pending = actions;
    while !pending.is_empty() {
        for action in pending {
            match action {
                Action::SyncJournal { io, .. } => engine.journal_synced(io, Ok(())),
                Action::WriteLeg { io, .. } => engine.leg_written(io, Ok(())),
                Action::SyncLegs { io, .. } => engine.legs_synced(io, Ok(())),
                _ => {}
            }
        }
        pending = drain(&mut engine);
    }
    assert_eq!(engine.stats().dirty_bytes, 0);
}

/// A partial write is charged its block's buffer twice (the block read
/// from the leg to merge into, and the merged image): one whose charge
/// is more than half the cache is refused as too large, however few bytes
/// it carries.
#[test]
fn a_partial_write_is_charged_the_block_it_merges_into() {
    let one_block = BLOCK_SIZE as u64 + crate::block_index::ENTRY_OVERHEAD_BYTES;
    // Half the cache holds one block and its overhead, not two buffers.
    let mut engine = engine_with_cache(2 * one_block + 2, BLOCK_SIZE as u64);
    engine.submit(
        Timestamp(0),
        RequestId(1),
        Request::Write {
            volume: VOLUME,
            offset: 512,
            data: Bytes::from(vec![1u8; 512]),
            fua: false,
        },
    );
    let actions = drain(&mut engine);
    assert!(
        matches!(
            actions.as_slice(),
            [Action::Reply {
                request: RequestId(1),
                result: Err(RequestError::TooLarge { .. })
            }]
        ),
        "{actions:?}"
    );
}

/// Completes every journal sync, leg write and leg sync at once; returns
/// every action seen.
fn complete_disk(engine: &mut Engine) -> Vec<Action> {
    let mut seen = Vec::new();
    while let Some(action) = engine.poll_action() {
        match &action {
            Action::SyncJournal { io, .. } => engine.journal_synced(*io, Ok(())),
            Action::WriteLeg { io, .. } => engine.leg_written(*io, Ok(())),
            Action::SyncLegs { io, .. } => engine.legs_synced(*io, Ok(())),
            _ => {}
        }
        seen.push(action);
    }
    seen
}

fn leg_syncs(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|action| matches!(action, Action::SyncLegs { .. }))
        .count()
}

#[test]
fn records_a_checkpoint_released_no_longer_count_towards_the_next() {
    let mut engine = engine_with(EngineConfig {
        delta_interval_ms: 100,
        delta_max_bytes: 64 << 10,
        cache_bytes_max: 1 << 20,
        journal_checkpoint_bytes: 100 << 10,
        ..EngineConfig::default()
    });
    // Two deltas of 64 KiB: one checkpoint releases both records.
    let data = Bytes::from(vec![3u8; 64 << 10]);
    write(&mut engine, 0, 1, 0, data.clone(), false);
    write(&mut engine, 0, 2, 64 << 10, data, false);
    let actions = complete_disk(&mut engine);
    assert_eq!(leg_syncs(&actions), 1, "{actions:?}");
    assert!(
        actions
            .iter()
            .any(|action| matches!(action, Action::ReleaseJournal { .. }))
    );
    // One block more is far below the checkpoint size: no leg sync.
    write(&mut engine, 1, 3, 256 << 10, block(4), false);
    engine.handle_timeout(Timestamp::from_millis(200));
    let actions = complete_disk(&mut engine);
    assert!(
        actions
            .iter()
            .any(|action| matches!(action, Action::WriteLeg { .. }))
    );
    assert_eq!(leg_syncs(&actions), 0, "{actions:?}");
}

#[test]
fn a_write_of_exactly_half_the_cache_is_admitted() {
    // Eight blocks, with their index entries, are half the cache.
    let half = 8 * (BLOCK_SIZE as u64 + crate::block_index::ENTRY_OVERHEAD_BYTES);
    let mut engine = engine_with_cache(2 * half, half);
    write(
        &mut engine,
        0,
        1,
        0,
        Bytes::from(vec![1u8; 8 * BLOCK_SIZE]),
        false,
    );
    assert_eq!(drain(&mut engine), vec![done(1)]);
}

#[test]
fn writes_held_for_cache_room_close_the_open_delta_at_once() {
    // Deltas close at 32 KiB (eight blocks) or 100 ms; the cache holds 64
    // KiB, fifteen blocks with their index entries.
    let mut engine = engine_with_cache(64 << 10, 32 << 10);
    for request in 0..16u64 {
        write(&mut engine, 0, request + 1, request * 4096, block(5), false);
    }
    let actions = drain(&mut engine);
    assert!(
        !actions.contains(&done(16)),
        "the sixteenth block does not fit"
    );
    // The first eight blocks' delta closed at its size; the other seven's
    // is journaled at once, not at the interval, so that it can reach the
    // leg and leave the cache.
    let appended = actions
        .iter()
        .filter(|action| matches!(action, Action::AppendJournal { .. }))
        .count();
    assert_eq!(appended, 2, "{actions:?}");
}

/// The data bytes of each record `engine` appends to its journal.
fn journaled_record_bytes(engine: &mut Engine) -> Vec<u64> {
    drain(engine)
        .into_iter()
        .filter_map(|action| match action {
            Action::AppendJournal { record } => Some(record.data_bytes()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_large_write_after_others_starts_a_delta_that_one_frame_carries() {
    // 8 MiB deltas and room for 40 MiB of writes.
    let mut engine = engine_with(EngineConfig {
        delta_interval_ms: 100,
        delta_max_bytes: 8 << 20,
        cache_bytes_max: 128 << 20,
        journal_checkpoint_bytes: 1 << 30,
        ..EngineConfig::default()
    });
    engine.add_volume(
        VolumeId(2),
        VolumeSpec {
            size: 128 << 20,
            group: GROUP,
            mode: Mode::Async,
        },
    );
    let submit = |engine: &mut Engine, request: u64, offset: u64, length: usize| {
        engine.submit(
            Timestamp::from_millis(0),
            RequestId(request),
            Request::Write {
                volume: VolumeId(2),
                offset,
                data: Bytes::from(vec![request as u8; length]),
                fua: false,
            },
        );
    };
    // One block short of a full delta, then the largest request a node
    // takes: together they would be 40 MiB, past what one frame carries.
    submit(&mut engine, 1, 0, (8 << 20) - BLOCK_SIZE);
    submit(&mut engine, 2, 8 << 20, 32 << 20);
    let records = journaled_record_bytes(&mut engine);
    assert_eq!(records, vec![(8 << 20) - BLOCK_SIZE as u64, 32 << 20]);
    assert!(records.iter().all(|bytes| *bytes <= DELTA_RECORD_BYTES_MAX));
    // Together exactly DELTA_RECORD_BYTES_MAX: one record still.
    submit(&mut engine, 3, 40 << 20, (8 << 20) - BLOCK_SIZE);
    submit(&mut engine, 4, 48 << 20, (24 << 20) + BLOCK_SIZE);
    let records = journaled_record_bytes(&mut engine);
    assert_eq!(records, vec![DELTA_RECORD_BYTES_MAX]);
}
