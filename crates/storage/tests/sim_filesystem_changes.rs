//! The simulated disk's change tracking: whatever mix of writes, resizes,
//! syncs, crashes and renames happens between two looks at a file, every
//! byte that differs must lie in the ranges it reports. The simulator's
//! checker decodes only those ranges of a leg at each restart, so a byte
//! missed here would be a corruption the checker never sees.

// The expected answers are lists of ranges; a list of one is meant.
#![allow(clippy::single_range_in_vec_init)]

mod common;

use std::path::Path;

use common::Rng;
use stretch_storage::{CHANGE_CHUNK_BYTES, ContentMark, FileSystem, SimFileSystem, StorageFile};

const FILE_BYTES: u64 = 16 * CHANGE_CHUNK_BYTES as u64;

/// Where each test keeps its one file.
const PATH: &str = "/legs/volume-1";

/// Creates the file at `PATH`, `FILE_BYTES` of zeros.
fn create_sized(fs: &SimFileSystem) -> impl StorageFile {
    let file = fs.open(Path::new(PATH), true).expect("create");
    file.set_len(FILE_BYTES).expect("size the file");
    file
}

/// Looks at `path`: its content and the ranges reported changed since
/// `since`.
fn look(
    fs: &SimFileSystem,
    path: &Path,
    since: Option<ContentMark>,
) -> (Vec<u8>, Vec<std::ops::Range<usize>>, ContentMark) {
    let ((content, ranges), mark) = fs
        .with_content_changes(path, since, |content, ranges| {
            (content.to_vec(), ranges.to_vec())
        })
        .expect("the file exists");
    (content, ranges, mark)
}

/// Applies one random operation to the file at `path` (reopening it
/// after a crash, as the storage code does).
fn random_operation(fs: &SimFileSystem, path: &Path, rng: &mut Rng, step: u64) {
    let file = fs.open(path, false).expect("the file exists");
    match rng.below(10) {
        0..=5 => {
            let length = 1 + rng.below(3 * CHANGE_CHUNK_BYTES as u64) as usize;
            let offset = rng.below(FILE_BYTES + CHANGE_CHUNK_BYTES as u64);
            let byte = (step % 251) as u8 + 1;
            file.write_all_at(&vec![byte; length], offset)
                .expect("a simulated write succeeds");
        }
        6 => {
            let length = rng.below(2 * FILE_BYTES);
            file.set_len(length).expect("a simulated resize succeeds");
        }
        7 => file.sync_data().expect("a simulated sync succeeds"),
        8 => {
            let mut draw = |bound: u64| rng.below(bound);
            fs.crash(&mut draw);
        }
        _ => {
            let other = path.with_extension("moved");
            fs.rename(path, &other).expect("rename");
            fs.rename(&other, path).expect("rename back");
        }
    }
}

#[test]
fn every_changed_byte_is_reported_whatever_happened_between_two_looks() {
    let mut reported_some = 0;
    for seed in 0..200 {
        let mut rng = Rng(seed);
        let fs = SimFileSystem::new();
        let path = Path::new(PATH);
        let file = create_sized(&fs);
        file.sync_data().expect("sync");
        let (mut before, _, mut mark) = look(&fs, path, None);
        for step in 0..60 {
            for _ in 0..rng.below(4) {
                random_operation(&fs, path, &mut rng, step);
            }
            let (after, ranges, next) = look(&fs, path, Some(mark));
            if after.len() == before.len() {
                for (at, (old, new)) in before.iter().zip(&after).enumerate() {
                    if old != new {
                        assert!(
                            ranges.iter().any(|range| range.contains(&at)),
                            "seed {seed} step {step}: byte {at} changed ({old} -> {new}) outside the reported ranges {ranges:?}"
                        );
                    }
                }
                reported_some += usize::from(!ranges.is_empty() && ranges != [0..after.len()]);
            } else {
                assert_eq!(
                    ranges,
                    [0..after.len()],
                    "seed {seed} step {step}: a resized file is reported whole"
                );
            }
            assert!(
                ranges.iter().all(|range| range.end <= after.len()),
                "seed {seed} step {step}: ranges {ranges:?} run past the end ({})",
                after.len()
            );
            before = after;
            mark = next;
        }
    }
    // The check above is vacuous if every look reported the whole file.
    assert!(
        reported_some > 1000,
        "only {reported_some} looks reported part of the file"
    );
}

#[test]
fn an_unchanged_file_reports_nothing_and_a_recreated_one_everything() {
    let fs = SimFileSystem::new();
    let path = Path::new(PATH);
    let file = create_sized(&fs);
    let (_, ranges, mark) = look(&fs, path, None);
    assert_eq!(ranges, [0..FILE_BYTES as usize]);
    let (_, ranges, mark) = look(&fs, path, Some(mark));
    assert!(ranges.is_empty(), "nothing changed: {ranges:?}");

    // One byte in the third chunk: that chunk alone.
    file.write_all_at(&[7], 2 * CHANGE_CHUNK_BYTES as u64 + 5)
        .expect("write");
    let (_, ranges, mark) = look(&fs, path, Some(mark));
    assert_eq!(
        ranges,
        [2 * CHANGE_CHUNK_BYTES..3 * CHANGE_CHUNK_BYTES],
        "one chunk changed"
    );

    // The same path removed and created again, same length: another file.
    fs.remove(path).expect("remove");
    create_sized(&fs);
    let (_, ranges, _) = look(&fs, path, Some(mark));
    assert_eq!(ranges, [0..FILE_BYTES as usize], "a new file is new");
}

/// A chooser that answers each draw from a script, in order.
fn scripted(answers: &[u64]) -> impl FnMut(u64) -> u64 + '_ {
    let mut next = answers.iter();
    move |bound| {
        let answer = *next.next().expect("the crash draws no more than scripted");
        assert!(answer < bound, "scripted answer {answer} not below {bound}");
        answer
    }
}

#[test]
fn a_crash_loses_what_was_not_synced_and_reports_it_changed() {
    let fs = SimFileSystem::new();
    let path = Path::new(PATH);
    let file = create_sized(&fs);
    file.write_all_at(&[1; 3 * CHANGE_CHUNK_BYTES], 0)
        .expect("write");
    file.sync_data().expect("sync");
    let (synced, _, _) = look(&fs, path, None);

    // Two unsynced writes, seen by the observer before the crash.
    file.write_all_at(&[2; 100], 10).expect("write");
    file.write_all_at(&[3; 100], 9 * CHANGE_CHUNK_BYTES as u64)
        .expect("write");
    let (_, _, mark) = look(&fs, path, None);
    // Keep none of the two pending writes.
    fs.crash(&mut scripted(&[0]));
    let (after, ranges, _) = look(&fs, path, Some(mark));
    assert_eq!(after, synced, "a crash keeps exactly what was synced");
    assert_eq!(
        ranges,
        [
            0..CHANGE_CHUNK_BYTES,
            9 * CHANGE_CHUNK_BYTES..10 * CHANGE_CHUNK_BYTES
        ],
        "the two chunks the crash restored, apart"
    );
}

#[test]
fn a_torn_write_keeps_its_first_sectors_and_reports_the_rest_restored() {
    const SECTOR: usize = 512;
    let fs = SimFileSystem::new();
    let path = Path::new(PATH);
    let file = create_sized(&fs);
    file.sync_data().expect("sync");
    // A write of three chunks at 100 bytes in.
    let offset = 100;
    let length = 3 * CHANGE_CHUNK_BYTES;
    file.write_all_at(&vec![7; length], offset as u64)
        .expect("write");
    let (_, _, mark) = look(&fs, path, None);
    // Keep the one pending write, tear it (draw 0 of 4), after 2 sectors.
    fs.crash(&mut scripted(&[1, 0, 2]));
    let (after, ranges, _) = look(&fs, path, Some(mark));
    let landed = offset..offset + 2 * SECTOR;
    for (at, byte) in after.iter().enumerate() {
        let expected = if landed.contains(&at) { 7 } else { 0 };
        assert_eq!(*byte, expected, "byte {at} after the tear");
    }
    // The bytes put back (from the tear to the write's end) are reported.
    assert_eq!(
        ranges,
        [0..4 * CHANGE_CHUNK_BYTES],
        "the torn write's chunks"
    );
}

#[test]
fn a_resize_undone_by_a_crash_gives_back_the_bytes_it_cut() {
    let fs = SimFileSystem::new();
    let path = Path::new(PATH);
    let file = fs.open(path, true).expect("create");
    file.write_all_at(&[5; 10_000], 0).expect("write");
    file.sync_data().expect("sync");
    file.set_len(10).expect("shrink");
    fs.crash(&mut scripted(&[0]));
    let (after, _, _) = look(&fs, path, None);
    assert_eq!(after, vec![5; 10_000], "the shrink was not synced");
}
