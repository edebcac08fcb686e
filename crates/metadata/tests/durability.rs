//! What survives closing and reopening a store, and what a damaged or
//! foreign file gives: a typed error, never a panic.

use std::collections::BTreeSet;
use std::io;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::vote::RaftLeaderIdExt;
use openraft::{Membership, RaftLogReader, RaftSnapshotBuilder};
use stretch_metadata::{
    Backend, Command, Entry, Failover, LogId, LogStore, MemBackend, Mode, NodeInfo, Outcome,
    RedbBackend, Role, StateMachine, StoreError, TypeConfig, Vote,
};

type LeaderId = openraft::alias::LeaderIdOf<TypeConfig>;

fn log_id(term: u64, index: u64) -> LogId {
    LogId::<TypeConfig>::new(LeaderId::new_committed(term, 1), index)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn entries() -> Vec<Entry> {
    let members = BTreeSet::from([1u64]);
    let node = NodeInfo {
        name: "a1".into(),
        site: "a".into(),
        role: Role::Data,
        addr: "127.0.0.1:7000".into(),
    };
    vec![
        Entry::<TypeConfig>::new_membership(
            log_id(1, 1),
            Membership::new(vec![members], std::collections::BTreeMap::from([(1, node)]))
                .expect("membership"),
        ),
        Entry::<TypeConfig>::new_normal(
            log_id(1, 2),
            Command::AddSite {
                name: "a".into(),
                role: Role::Data,
            },
        ),
        Entry::<TypeConfig>::new_normal(
            log_id(1, 3),
            Command::CreateVolume {
                name: "vm1-disk0".into(),
                size: 1 << 30,
                group: "vm1".into(),
                mode: Mode::FlushSync,
                failover: Failover::Auto,
                owner_site: "a".into(),
            },
        ),
        Entry::<TypeConfig>::new_blank(log_id(2, 4)),
    ]
}

/// Write a vote, four entries, the commit mark, apply them and build a
/// snapshot, through openraft's traits.
async fn write_everything<B: Backend<TypeConfig> + std::fmt::Debug>(backend: &B) {
    let mut log = LogStore::<_, TypeConfig>::new(backend.clone());
    let mut sm = StateMachine::<_, TypeConfig>::open(backend.clone()).expect("state machine");
    log.save_vote(&Vote::<TypeConfig>::new_committed(2, 1))
        .await
        .expect("vote");
    log.append(entries(), IOFlushed::noop())
        .await
        .expect("append");
    log.save_committed(Some(log_id(1, 3)))
        .await
        .expect("committed");
    let items = entries().into_iter().take(3).map(|e| Ok((e, None)));
    sm.apply(futures_util::stream::iter(items))
        .await
        .expect("apply");
    let mut builder = sm.get_snapshot_builder().await;
    builder.build_snapshot().await.expect("snapshot");
}

/// Check what `write_everything` wrote, through fresh handles.
async fn check_everything<B: Backend<TypeConfig> + std::fmt::Debug>(backend: &B) {
    let mut log = LogStore::<_, TypeConfig>::new(backend.clone());
    let mut sm = StateMachine::<_, TypeConfig>::open(backend.clone()).expect("state machine");
    assert_eq!(
        log.read_vote().await.expect("vote"),
        Some(Vote::<TypeConfig>::new_committed(2, 1))
    );
    assert_eq!(
        log.read_committed().await.expect("committed"),
        Some(log_id(1, 3))
    );
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_log_id, Some(log_id(2, 4)));
    assert_eq!(
        log.try_get_log_entries(1..5).await.expect("entries"),
        entries()
    );
    let (applied, membership) = sm.applied_state().await.expect("applied");
    assert_eq!(applied, Some(log_id(1, 3)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 1)));
    let v = sm
        .metadata()
        .volume_by_name("vm1-disk0")
        .expect("volume survived");
    assert_eq!((v.id, v.group, v.size), (1, 1, 1 << 30));
    let snap = sm
        .get_current_snapshot()
        .await
        .expect("snapshot")
        .expect("a snapshot");
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 3)));
}

#[test]
fn redb_reopen_keeps_vote_log_and_state() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metadata.redb");
    let rt = runtime();
    {
        let backend = RedbBackend::open(&path).expect("create");
        rt.block_on(write_everything(&backend));
    }
    // Every handle is dropped: the file is closed and opened anew.
    let backend = RedbBackend::open(&path).expect("reopen");
    rt.block_on(check_everything(&backend));
}

#[test]
fn mem_store_survives_a_simulated_restart() {
    let backend = MemBackend::new();
    let rt = runtime();
    rt.block_on(write_everything(&backend));
    rt.block_on(check_everything(&backend));
}

#[test]
fn apply_answers_with_the_allocated_ids() {
    let mut state = stretch_metadata::AppliedState::<TypeConfig>::default();
    let results: Vec<_> = entries().iter().map(|e| state.apply_entry(e)).collect();
    assert_eq!(
        results[2],
        Ok(Outcome::VolumeCreated {
            volume: 1,
            group: 1,
            epoch: 1
        })
    );
    assert_eq!(state.last_applied, Some(log_id(2, 4)));
}

fn open_err(path: &std::path::Path) -> StoreError {
    match RedbBackend::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

#[test]
fn a_file_that_is_not_redb_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a database\n".repeat(1000)).expect("write");
    assert!(matches!(open_err(&text), StoreError::Open { .. }));

    // Pseudo-random bytes from a fixed LCG: same file every run.
    let noise = dir.path().join("noise.bin");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let bytes: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect();
    std::fs::write(&noise, &bytes).expect("write");
    assert!(matches!(open_err(&noise), StoreError::Open { .. }));
    // Refused files are left as they were.
    assert_eq!(std::fs::read(&noise).expect("read"), bytes);
}

#[test]
fn a_truncated_store_is_refused_or_opens_without_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metadata.redb");
    {
        let backend = RedbBackend::open(&path).expect("create");
        runtime().block_on(write_everything(&backend));
    }
    let full = std::fs::read(&path).expect("read");
    let rt = runtime();
    let mut cuts: Vec<usize> = (1..full.len()).step_by(997).collect();
    cuts.extend([16, 512, 4096, full.len() / 2, full.len() - 1]);
    for cut in cuts {
        let p = dir.path().join(format!("cut-{cut}.redb"));
        std::fs::write(&p, &full[..cut]).expect("write");
        // Whatever redb makes of it (refused, or repaired to an older
        // commit), the answer is a value, not a panic.
        if let Ok(backend) = RedbBackend::open(&p) {
            let mut log = LogStore::<_, TypeConfig>::new(backend.clone());
            let _ = rt.block_on(log.get_log_state());
            let _ = StateMachine::<_, TypeConfig>::open(backend);
        }
    }
}

#[test]
fn flipped_bytes_give_errors_not_panics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metadata.redb");
    {
        let backend = RedbBackend::open(&path).expect("create");
        runtime().block_on(write_everything(&backend));
    }
    let full = std::fs::read(&path).expect("read");
    let rt = runtime();
    for at in (0..full.len()).step_by(331) {
        let mut bytes = full.clone();
        bytes[at] ^= 0x5a;
        let p = dir.path().join(format!("flip-{at}.redb"));
        std::fs::write(&p, &bytes).expect("write");
        if let Ok(backend) = RedbBackend::open(&p) {
            let mut log = LogStore::<_, TypeConfig>::new(backend.clone());
            let _ = rt.block_on(log.get_log_state());
            let _ = rt.block_on(log.try_get_log_entries(0..10));
            let _ = rt.block_on(log.read_vote());
            let _ = StateMachine::<_, TypeConfig>::open(backend);
        }
    }
}

#[test]
fn a_foreign_redb_database_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&path).expect("create");
        let txn = db.begin_write().expect("txn");
        txn.open_table(redb::TableDefinition::<&str, u64>::new("inventory"))
            .expect("table")
            .insert("apples", 3)
            .expect("insert");
        txn.commit().expect("commit");
    }
    assert!(matches!(open_err(&path), StoreError::Foreign { .. }));
}

#[test]
fn a_store_of_another_format_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metadata.redb");
    drop(RedbBackend::open(&path).expect("create"));
    {
        let db = redb::Database::create(&path).expect("open");
        let txn = db.begin_write().expect("txn");
        txn.open_table(redb::TableDefinition::<&str, &str>::new("format"))
            .expect("table")
            .insert("format", "stretch-metadata/99")
            .expect("insert");
        txn.commit().expect("commit");
    }
    assert!(matches!(open_err(&path), StoreError::Format { .. }));
}

/// Overwrite one record of a closed store with `bytes`.
fn damage_log_entry(path: &std::path::Path, index: u64, bytes: &[u8]) {
    let db = redb::Database::create(path).expect("open");
    let txn = db.begin_write().expect("txn");
    txn.open_table(redb::TableDefinition::<u64, &[u8]>::new("raft_log"))
        .expect("table")
        .insert(index, bytes)
        .expect("insert");
    txn.commit().expect("commit");
}

fn store_error(e: &io::Error) -> &StoreError {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<StoreError>())
        .expect("a StoreError inside")
}

#[test]
fn damaged_records_give_typed_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metadata.redb");
    let rt = runtime();
    {
        let backend = RedbBackend::open(&path).expect("create");
        rt.block_on(write_everything(&backend));
    }

    damage_log_entry(&path, 2, b"{\"not\": \"an entry\"");
    {
        let mut log = LogStore::<_, TypeConfig>::new(RedbBackend::open(&path).expect("reopen"));
        let err = rt
            .block_on(log.try_get_log_entries(1..5))
            .expect_err("damaged entry");
        assert!(
            matches!(store_error(&err), StoreError::Decode { .. }),
            "{err}"
        );
        // Entries before the damage still read.
        assert_eq!(
            rt.block_on(log.try_get_log_entries(1..2))
                .expect("entry 1")
                .len(),
            1
        );
    }

    // A well-formed entry under the wrong index: the file lies about its log.
    let moved = serde_json::to_vec(&entries()[0]).expect("encode");
    damage_log_entry(&path, 4, &moved);
    let mut log = LogStore::<_, TypeConfig>::new(RedbBackend::open(&path).expect("reopen"));
    let err = rt
        .block_on(log.get_log_state())
        .expect_err("misplaced entry");
    assert!(
        matches!(store_error(&err), StoreError::Inconsistent(_)),
        "{err}"
    );
}

#[test]
fn a_damaged_state_machine_record_is_a_typed_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metadata.redb");
    {
        let backend = RedbBackend::open(&path).expect("create");
        runtime().block_on(write_everything(&backend));
    }
    {
        let db = redb::Database::create(&path).expect("open");
        let txn = db.begin_write().expect("txn");
        txn.open_table(redb::TableDefinition::<&str, &[u8]>::new("state_machine"))
            .expect("table")
            .insert("applied", b"\xff\xfe".as_slice())
            .expect("insert");
        txn.commit().expect("commit");
    }
    let err = StateMachine::<_, TypeConfig>::open(RedbBackend::open(&path).expect("reopen"))
        .expect_err("damaged state");
    assert!(matches!(err, StoreError::Decode { .. }), "{err}");
}
