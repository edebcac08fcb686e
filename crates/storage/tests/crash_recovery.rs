//! Journal and leg crash-recovery suite. Every scenario runs against the
//! host file system and against the simulated disk, which additionally
//! loses unsynced writes and tears the last one on crash.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use common::Rng;
use stretch_core::{
    BLOCK_SIZE, BlockImage, BlockKey, DeltaRecord, DeltaSeq, Epoch, GroupId, JournalPosition,
    VolumeId,
};
use stretch_storage::{
    FileSystem, Journal, Leg, OsFileSystem, Recovery, SimFileSystem, StorageFile, recover,
};

const VOLUME: VolumeId = VolumeId(1);
const GROUP: GroupId = GroupId(1);
const BLOCKS: u64 = 32;
const SEGMENT_BYTES: u64 = 64 << 10;

/// Random deltas, with the volume image after each one.
fn random_history(rng: &mut Rng, count: u64) -> (Vec<DeltaRecord>, Vec<Vec<u8>>) {
    let mut image = vec![0u8; (BLOCKS as usize) * BLOCK_SIZE];
    let mut records = Vec::new();
    let mut images = vec![image.clone()];
    for index in 0..count {
        let mut blocks = BTreeMap::new();
        for _ in 0..1 + rng.below(6) {
            let block = rng.below(BLOCKS);
            let image = if rng.below(5) == 0 {
                BlockImage::Zero
            } else {
                BlockImage::Data(Bytes::from(vec![rng.below(255) as u8 + 1; BLOCK_SIZE]))
            };
            blocks.insert(
                BlockKey {
                    volume: VOLUME,
                    block,
                },
                image,
            );
        }
        for (key, block_image) in &blocks {
            let at = key.block as usize * BLOCK_SIZE;
            block_image.copy_range(0, &mut image[at..at + BLOCK_SIZE]);
        }
        images.push(image.clone());
        records.push(DeltaRecord {
            position: JournalPosition(index + 1),
            group: GROUP,
            epoch: Epoch(1),
            seq: DeltaSeq(index + 1),
            blocks: blocks.into_iter().collect(),
        });
    }
    (records, images)
}

struct Node<F: FileSystem> {
    fs: Arc<F>,
    root: PathBuf,
}

impl<F: FileSystem> Node<F> {
    fn journal_dir(&self) -> PathBuf {
        self.root.join("journal")
    }

    fn leg_path(&self) -> PathBuf {
        self.root.join("legs").join("v.raw")
    }

    /// Recovery of this node's journal onto `legs`, with a node's regions.
    fn recover(&self, legs: &BTreeMap<VolumeId, Leg<F>>) -> Recovery {
        recover(
            &self.fs,
            &self.journal_dir(),
            legs,
            stretch_core::REGION_BLOCKS,
        )
        .expect("recover")
    }

    fn legs(&self, create: bool) -> BTreeMap<VolumeId, Leg<F>> {
        let size = BLOCKS * BLOCK_SIZE as u64;
        let leg = if create {
            Leg::create(self.fs.as_ref(), &self.leg_path(), size)
        } else {
            Leg::open(self.fs.as_ref(), &self.leg_path(), size)
        }
        .expect("leg");
        BTreeMap::from([(VOLUME, leg)])
    }

    fn leg_image(&self, legs: &BTreeMap<VolumeId, Leg<F>>) -> Vec<u8> {
        legs[&VOLUME]
            .read(0, BLOCKS * BLOCK_SIZE as u64)
            .expect("read leg")
            .to_vec()
    }
}

/// Writes `records` the way the engine orders it: append, sync, then apply
/// to the leg; syncs only up to `synced` records; returns the journal.
fn run_history<F: FileSystem>(
    node: &Node<F>,
    records: &[DeltaRecord],
    synced: usize,
    legs: &BTreeMap<VolumeId, Leg<F>>,
) -> Journal<F> {
    let mut journal = Journal::create(
        node.fs.clone(),
        &node.journal_dir(),
        SEGMENT_BYTES,
        JournalPosition(1),
        BTreeMap::new(),
    )
    .expect("journal");
    for (index, record) in records.iter().enumerate() {
        journal.append(record).expect("append");
        if index < synced {
            journal.sync().expect("sync");
            let blocks = record.blocks.iter().map(|(key, image)| (key.block, image));
            legs[&VOLUME].apply(blocks).expect("apply");
        }
    }
    journal
}

fn os_node() -> (tempfile::TempDir, Node<OsFileSystem>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node {
        fs: Arc::new(OsFileSystem),
        root: dir.path().to_path_buf(),
    };
    (dir, node)
}

fn sim_node() -> Node<SimFileSystem> {
    Node {
        fs: Arc::new(SimFileSystem::new()),
        root: PathBuf::from("/node"),
    }
}

fn check_round_trip<F: FileSystem>(node: &Node<F>) {
    let mut rng = Rng(1);
    let (records, images) = random_history(&mut rng, 40);
    let legs = node.legs(true);
    let journal = run_history(node, &records, records.len(), &legs);
    drop(journal);
    // Start over from disk: a fresh leg handle, zeroed, then replay alone
    // must rebuild the image.
    let legs = node.legs(true);
    let recovery = node.recover(&legs);
    assert_eq!(recovery.replayed_deltas, 40);
    assert_eq!(recovery.dropped_tail, None);
    assert_eq!(recovery.next_position, JournalPosition(41));
    assert_eq!(recovery.next_seq[&GROUP], DeltaSeq(41));
    assert!(
        node.leg_image(&legs) == images[40],
        "leg differs from the model"
    );
}

fn corrupt_tail<F: FileSystem>(node: &Node<F>, how: impl Fn(&F::File, u64)) {
    let mut rng = Rng(2);
    let (records, images) = random_history(&mut rng, 5);
    let legs = node.legs(true);
    drop(run_history(node, &records, 5, &legs));
    let segments = node.fs.list(&node.journal_dir()).expect("list");
    let last = segments.last().expect("a segment");
    let file = node.fs.open(last, false).expect("open");
    let len = file.len().expect("len");
    how(&file, len);
    let legs = node.legs(true);
    let recovery = node.recover(&legs);
    assert_eq!(
        recovery.replayed_deltas, 4,
        "the damaged last record is dropped"
    );
    assert!(recovery.dropped_tail.is_some());
    assert!(node.leg_image(&legs) == images[4]);
}

fn check_torn_tail<F: FileSystem>(node: &Node<F>) {
    corrupt_tail(node, |file, len| file.set_len(len - 100).expect("truncate"));
}

fn check_bit_flip<F: FileSystem>(node: &Node<F>) {
    corrupt_tail(node, |file, len| {
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, len - 10).expect("read");
        byte[0] ^= 0x40;
        file.write_all_at(&byte, len - 10).expect("write");
    });
}

fn check_release_and_continue<F: FileSystem>(node: &Node<F>) {
    let mut rng = Rng(3);
    let (records, images) = random_history(&mut rng, 60);
    let legs = node.legs(true);
    let mut journal = run_history(node, &records, 60, &legs);
    let before = node.fs.list(&node.journal_dir()).expect("list").len();
    assert!(before > 2, "the history spans several segments");
    legs[&VOLUME].sync().expect("sync legs");
    journal.release(JournalPosition(50)).expect("release");
    let after = node.fs.list(&node.journal_dir()).expect("list").len();
    assert!(after < before, "released segments are deleted");
    drop(journal);
    let recovery = node.recover(&legs);
    assert_eq!(recovery.next_position, JournalPosition(61));
    assert_eq!(recovery.next_seq[&GROUP], DeltaSeq(61));
    assert!(node.leg_image(&legs) == images[60]);
}

/// The core promise under power loss: after any crash, the leg is the image
/// after a whole delta k, with k at least the number of synced deltas.
fn check_crash_at_random_points(seed: u64) {
    let node = sim_node();
    let mut rng = Rng(seed);
    let count = 5 + rng.below(40);
    let synced = rng.below(count + 1) as usize;
    let (records, images) = random_history(&mut rng, count);
    let legs = node.legs(true);
    // Unsynced deltas are not on the leg either (the engine applies only
    // synced deltas), but their journal appends may partly survive.
    drop(run_history(&node, &records, synced, &legs));
    drop(legs);
    node.fs.crash(&mut |bound| rng.below(bound));
    let legs = node.legs(false);
    let recovery = node.recover(&legs);
    let k = recovery.replayed_deltas as usize;
    assert!(
        k >= synced,
        "seed {seed}: lost a synced delta ({k} < {synced})"
    );
    assert!(
        node.leg_image(&legs) == images[k],
        "seed {seed}: leg is not the image after whole delta {k}"
    );
    // The journal goes on where recovery stopped.
    let mut journal = Journal::create(
        node.fs.clone(),
        &node.journal_dir(),
        SEGMENT_BYTES,
        recovery.next_position,
        recovery.next_seq.clone(),
    )
    .expect("journal after recovery");
    journal
        .discard_replayed(&recovery.stale_segments)
        .expect("discard replayed segments");
    assert_eq!(node.fs.list(&node.journal_dir()).expect("list").len(), 1);
    let mut next = records[0].clone();
    next.position = recovery.next_position;
    journal.append(&next).expect("append after recovery");
}

#[test]
fn round_trip_on_host_files() {
    let (_dir, node) = os_node();
    check_round_trip(&node);
}

#[test]
fn round_trip_on_simulated_disk() {
    check_round_trip(&sim_node());
}

#[test]
fn torn_tail_is_dropped_on_host_files() {
    let (_dir, node) = os_node();
    check_torn_tail(&node);
}

#[test]
fn torn_tail_is_dropped_on_simulated_disk() {
    check_torn_tail(&sim_node());
}

#[test]
fn flipped_bit_is_dropped_on_host_files() {
    let (_dir, node) = os_node();
    check_bit_flip(&node);
}

#[test]
fn flipped_bit_is_dropped_on_simulated_disk() {
    check_bit_flip(&sim_node());
}

#[test]
fn release_and_continue_on_host_files() {
    let (_dir, node) = os_node();
    check_release_and_continue(&node);
}

#[test]
fn release_and_continue_on_simulated_disk() {
    check_release_and_continue(&sim_node());
}

#[test]
fn power_loss_keeps_whole_deltas_and_every_synced_one() {
    for seed in 0..300 {
        check_crash_at_random_points(seed);
    }
}

#[test]
fn recovery_of_an_empty_directory_starts_at_one() {
    let node = sim_node();
    let legs = node.legs(true);
    let recovery = recover(
        &node.fs,
        Path::new("/nowhere"),
        &legs,
        stretch_core::REGION_BLOCKS,
    )
    .expect("recover");
    assert_eq!(recovery.next_position, JournalPosition(1));
    assert_eq!(recovery.replayed_deltas, 0);
}

/// A replica's journal whose numbering goes down: deltas 1 to 40 under
/// epoch 1 (its own, as an owner a failover replaced), then a resync from
/// the new owner renumbers it to that owner's line (a first chunk standing
/// for delta 5, epoch 2) and deltas 6 to 24 of epoch 2 follow. Recovery
/// numbers the group after the newest record, not the highest seq: 25,
/// epoch 2 (numbered 41 under epoch 1, the site would claim deltas 25 to
/// 40 of a line the cluster dropped, and as an owner it would resync its
/// replicas to "delta 40, epoch 1", which no history names). The header of
/// a later segment says the same once the older ones are released.
fn check_renumbered_by_a_resync<F: FileSystem>(node: &Node<F>) {
    let mut rng = Rng(4);
    let (mut records, images) = random_history(&mut rng, 60);
    for (index, record) in records.iter_mut().enumerate().skip(40) {
        record.epoch = Epoch(2);
        record.seq = DeltaSeq(index as u64 - 35);
    }
    let legs = node.legs(true);
    let mut journal = run_history(node, &records, records.len(), &legs);
    let recovery = node.recover(&legs);
    assert_eq!(recovery.next_seq[&GROUP], DeltaSeq(25));
    assert_eq!(recovery.last_epochs().get(&GROUP), Some(&Epoch(2)));
    assert!(node.leg_image(&legs) == images[60]);
    // Every record released: only the newest segment's header is left.
    legs[&VOLUME].sync().expect("sync legs");
    journal.release(JournalPosition(60)).expect("release");
    drop(journal);
    let recovery = node.recover(&legs);
    assert_eq!(recovery.replayed_deltas, 0);
    assert_eq!(recovery.next_seq[&GROUP], DeltaSeq(25));
}

#[test]
fn a_resync_renumbering_a_replica_downwards_survives_recovery_on_host_files() {
    let (_dir, node) = os_node();
    check_renumbered_by_a_resync(&node);
}

#[test]
fn a_resync_renumbering_a_replica_downwards_survives_recovery_on_simulated_disk() {
    check_renumbered_by_a_resync(&sim_node());
}

/// A release that finds the active segment fully released starts a new
/// one; when that roll fails (here its header's fsync), its file may stay on
/// disk, empty, named after the next position. Records appended after the
/// failure must not go on in the old segment past that position: recovery
/// would read the empty file as a gap there and drop every record after it,
/// synced or not. The next append rolls again at the same position.
#[test]
fn a_failed_segment_roll_does_not_hide_later_records_from_recovery() {
    let node = sim_node();
    let mut rng = Rng(5);
    let (records, images) = random_history(&mut rng, 30);
    let legs = node.legs(true);
    let mut journal = run_history(&node, &records[..10], 10, &legs);
    legs[&VOLUME].sync().expect("sync legs");
    node.fs.set_sync_failure(true);
    assert!(
        journal.release(JournalPosition(10)).is_err(),
        "the new segment's header cannot be synced"
    );
    node.fs.set_sync_failure(false);
    for record in &records[10..] {
        journal.append(record).expect("append");
        journal.sync().expect("sync");
        let blocks = record.blocks.iter().map(|(key, image)| (key.block, image));
        legs[&VOLUME].apply(blocks).expect("apply");
    }
    // Release everything before the newest segments, as the engine does
    // once the legs hold them.
    legs[&VOLUME].sync().expect("sync legs");
    journal.release(JournalPosition(20)).expect("release");
    drop(journal);
    let legs = node.legs(false);
    let recovery = node.recover(&legs);
    assert_eq!(recovery.dropped_tail, None);
    assert_eq!(recovery.next_position, JournalPosition(31));
    assert_eq!(recovery.next_seq[&GROUP], DeltaSeq(31));
    assert!(
        node.leg_image(&legs) == images[30],
        "every synced record is replayed"
    );
}
