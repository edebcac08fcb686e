//! The checker on hand-built histories: each guarantee's check fires on a
//! history that breaks it, and stays quiet on the same history kept whole
//! (so a check that cannot fail shows up here).

use super::*;

/// One volume of 16 sectors (8 KiB), owned by site 0, group 1.
fn checker(site_durable_flush: bool) -> Checker {
    Checker::new(
        &[VolumeSetup {
            group: 1,
            owner: 0,
            durable_writes: false,
            site_durable_flush,
            site_durable_writes: false,
        }],
        16 * SECTOR_BYTES,
    )
}

/// Two volumes of one group (a consistency group across volumes).
fn two_volume_checker() -> Checker {
    let setup = VolumeSetup {
        group: 1,
        owner: 0,
        durable_writes: false,
        site_durable_flush: false,
        site_durable_writes: false,
    };
    Checker::new(&[setup, setup], 16 * SECTOR_BYTES)
}

/// Issues and acknowledges a data write at the owner; returns its id.
fn acked_write(checker: &mut Checker, request: u64, volume: usize, first: u64, count: u64) -> u32 {
    let id = checker.issue_write(
        request,
        0,
        volume,
        first,
        count,
        WriteKind::Data,
        false,
        false,
    );
    checker
        .on_reply(request, true, None, false)
        .expect("a write's acknowledgement is fine");
    id
}

fn flush(checker: &mut Checker, request: u64, volume: usize) {
    let issued = checker.tick();
    checker.issue(request, 0, Tracked::Flush { volume, issued });
    checker
        .on_reply(request, true, None, false)
        .expect("a flush's answer is fine");
}

fn read(checker: &mut Checker, request: u64, first: u64, data: Bytes) -> Result<(), Violation> {
    let count = data.len() as u64 / SECTOR_BYTES;
    checker.issue(
        request,
        0,
        Tracked::Read {
            volume: 0,
            first,
            count,
        },
    );
    checker.on_reply(request, true, Some(&data), false)
}

fn zeros(sectors: u64) -> Bytes {
    Bytes::from(vec![0u8; (sectors * SECTOR_BYTES) as usize])
}

fn view(volume: usize, versions: &[u32]) -> View {
    View {
        volume,
        first: 0,
        versions: versions.to_vec(),
    }
}

fn guarantee(result: Result<(), Violation>) -> &'static str {
    result.expect_err("a violation").guarantee
}

#[test]
fn a_strict_read_older_than_an_acknowledged_write_breaks_g2() {
    let mut checker = checker(false);
    let id = acked_write(&mut checker, 1, 0, 0, 2);
    assert_eq!(guarantee(read(&mut checker, 2, 0, zeros(2))), "G2");
    read(&mut checker, 3, 0, payload(id, 0, 2)).expect("the newest write reads back");
}

#[test]
fn a_read_showing_a_write_not_yet_issued_or_garbage_breaks_g2() {
    let mut checker = checker(false);
    assert_eq!(guarantee(read(&mut checker, 1, 0, payload(7, 0, 1))), "G2");
    let garbage = Bytes::from(vec![0xa5u8; SECTOR_BYTES as usize]);
    assert_eq!(guarantee(read(&mut checker, 2, 0, garbage)), "G2");
    assert_eq!(
        guarantee(read(&mut checker, 3, 0, zeros(3).slice(..700))),
        "G2"
    );
}

#[test]
fn a_failed_read_at_the_owner_breaks_g2() {
    let mut checker = checker(false);
    checker.issue(
        1,
        0,
        Tracked::Read {
            volume: 0,
            first: 0,
            count: 1,
        },
    );
    assert_eq!(guarantee(checker.on_reply(1, false, None, false)), "G2");
}

#[test]
fn an_answer_to_nothing_or_twice_breaks_acks() {
    let mut checker = checker(false);
    assert_eq!(guarantee(checker.on_reply(9, true, None, false)), "acks");
    acked_write(&mut checker, 1, 0, 0, 1);
    assert_eq!(guarantee(checker.on_reply(1, true, None, false)), "acks");
    assert_eq!(
        guarantee(checker.on_snapshot_reply(4, Err("x".into()))),
        "acks"
    );
}

#[test]
fn a_forwarded_write_acknowledged_before_its_owner_took_it_breaks_acks() {
    let mut checker = checker(false);
    let _id = checker.issue_write(1, 1, 0, 0, 1, WriteKind::Data, false, true);
    assert_eq!(guarantee(checker.on_reply(1, true, None, false)), "acks");
}

#[test]
fn a_flushed_write_lost_in_the_owners_crash_breaks_g4() {
    let mut checker = checker(false);
    let id = acked_write(&mut checker, 1, 0, 0, 2);
    flush(&mut checker, 2, 0);
    let lost = checker.after_owner_recovery(0, vec![view(0, &[0; 16])], &BTreeMap::new());
    assert_eq!(guarantee(lost), "G4");
    let mut kept = checker_with_flushed_write();
    let mut versions = vec![0; 16];
    versions[..2].copy_from_slice(&[id, id]);
    kept.after_owner_recovery(0, vec![view(0, &versions)], &BTreeMap::new())
        .expect("the flushed write survived");
}

fn checker_with_flushed_write() -> Checker {
    let mut checker = checker(false);
    acked_write(&mut checker, 1, 0, 0, 2);
    flush(&mut checker, 2, 0);
    checker
}

#[test]
fn an_unflushed_write_may_be_lost_but_then_stays_lost() {
    let mut checker = checker(false);
    let id = acked_write(&mut checker, 1, 0, 0, 2);
    checker
        .after_owner_recovery(0, vec![view(0, &[0; 16])], &BTreeMap::new())
        .expect("an unflushed write may be lost in a crash");
    // The model follows the recovered image: a later read of zeros is right.
    read(&mut checker, 2, 0, zeros(2)).expect("zeros after the loss");
    // A replica must never show the lost write.
    let mut versions = vec![0; 16];
    versions[..2].copy_from_slice(&[id, id]);
    assert_eq!(
        guarantee(checker.after_replica_recovery(1, vec![view(0, &versions)])),
        "G3"
    );
}

#[test]
fn a_write_surviving_only_in_part_breaks_g3() {
    let mut checker = checker(false);
    let id = acked_write(&mut checker, 1, 0, 0, 2);
    let mut versions = vec![0; 16];
    versions[0] = id;
    assert_eq!(
        guarantee(checker.after_owner_recovery(0, vec![view(0, &versions)], &BTreeMap::new())),
        "G3"
    );
}

/// Write 1 on volume 0, then write 2 on volume 1 (same group).
fn two_writes_of_one_group() -> (Checker, u32, u32) {
    let mut checker = two_volume_checker();
    let first = acked_write(&mut checker, 1, 0, 0, 1);
    let second = acked_write(&mut checker, 2, 1, 4, 1);
    (checker, first, second)
}

#[test]
fn a_later_write_surviving_an_earlier_lost_one_of_the_group_breaks_g3() {
    // After a crash volume 1 shows write 2 but volume 0 lacks write 1.
    let (mut checker, _, second) = two_writes_of_one_group();
    let mut later = vec![0; 16];
    later[4] = second;
    let reordered = checker.after_owner_recovery(
        0,
        vec![view(0, &[0; 16]), view(1, &later)],
        &BTreeMap::new(),
    );
    assert_eq!(guarantee(reordered), "G3");
    let (mut checker, first, second) = two_writes_of_one_group();
    let mut earlier = vec![0; 16];
    earlier[0] = first;
    let mut later = vec![0; 16];
    later[4] = second;
    checker
        .after_owner_recovery(
            0,
            vec![view(0, &earlier), view(1, &later)],
            &BTreeMap::new(),
        )
        .expect("both writes, in order");
}

#[test]
fn a_snapshot_from_a_site_mid_resync_or_half_applied_breaks_g3() {
    let mut checker = checker(false);
    let id = acked_write(&mut checker, 1, 0, 0, 2);
    let snapshot = |consistent| Tracked::Snapshot {
        volume: 0,
        first: 0,
        count: 2,
        consistent,
        issued: 0,
    };
    checker.issue(2, 1, snapshot(false));
    assert_eq!(
        guarantee(checker.on_snapshot_reply(2, Ok(&zeros(2)))),
        "G3",
        "served while it said it was mid-resync"
    );
    checker.issue(3, 1, snapshot(false));
    checker
        .on_snapshot_reply(3, Err("mid-resync".into()))
        .expect("refused while mid-resync");
    let mut half = payload(id, 0, 2).to_vec();
    half[SECTOR_BYTES as usize..].fill(0);
    checker.issue(4, 1, snapshot(true));
    assert_eq!(
        guarantee(checker.on_snapshot_reply(4, Ok(&Bytes::from(half)))),
        "G3"
    );
    checker.issue(5, 1, snapshot(true));
    assert_eq!(
        guarantee(checker.on_snapshot_reply(5, Err("no".into()))),
        "G2",
        "a consistent site refused"
    );
    checker.issue(6, 1, snapshot(true));
    checker
        .on_snapshot_reply(6, Ok(&payload(id, 0, 2)))
        .expect("a whole write");
}

#[test]
fn a_leg_with_torn_or_misplaced_sectors_breaks_g3() {
    let mut checker = checker(false);
    let id = acked_write(&mut checker, 1, 0, 0, 1);
    let mut image = vec![0u8; (16 * SECTOR_BYTES) as usize];
    image[..SECTOR_BYTES as usize].copy_from_slice(&payload(id, 0, 1));
    checker
        .decode_image(0, &image, true)
        .expect("a clean image");
    // The write's pattern for sector 0 found in sector 3: misplaced.
    let mut misplaced = image.clone();
    misplaced[3 * SECTOR_BYTES as usize..4 * SECTOR_BYTES as usize]
        .copy_from_slice(&payload(id, 3, 1));
    assert_eq!(
        guarantee(checker.decode_image(0, &misplaced, true).map(|_| ())),
        "G3"
    );
    let mut torn = image;
    torn[100] ^= 1;
    assert_eq!(
        guarantee(checker.decode_image(0, &torn, true).map(|_| ())),
        "G3"
    );
}

#[test]
fn flush_sync_writes_must_be_found_after_a_site_loss() {
    let mut checker = checker(true);
    let id = acked_write(&mut checker, 1, 0, 0, 1);
    assert!(checker.site_durable_writes(0).is_empty(), "not flushed yet");
    flush(&mut checker, 2, 0);
    assert_eq!(checker.site_durable_writes(0), vec![id]);
    assert!(checker.present_at(&[view(0, &[0; 16])], &[id]).is_empty());
    let mut versions = vec![0; 16];
    versions[0] = id;
    assert_eq!(checker.present_at(&[view(0, &versions)], &[id]), vec![id]);
}

#[test]
fn a_leg_that_did_not_converge_fails_the_final_check() {
    let mut checker = checker(false);
    let id = acked_write(&mut checker, 1, 0, 2, 1);
    let mut image = vec![0u8; (16 * SECTOR_BYTES) as usize];
    assert!(checker.check_final(0, &image).is_err());
    image[2 * SECTOR_BYTES as usize..3 * SECTOR_BYTES as usize].copy_from_slice(&payload(id, 2, 1));
    checker.check_final(0, &image).expect("converged");
}

/// A failover image that skips an acknowledged write but holds a later
/// one is not a whole-delta prefix (G3); the same image holding both is
/// adopted, and one that holds only the earlier write counts the later as
/// lost to the failover.
#[test]
fn a_failover_image_must_be_a_prefix_and_its_gap_is_counted_lost() {
    let image = |versions: &[u32]| View {
        volume: 0,
        first: 0,
        versions: versions.to_vec(),
    };
    let mut skipped = checker(false);
    acked_write(&mut skipped, 1, 0, 0, 4);
    let second = acked_write(&mut skipped, 2, 0, 4, 4);
    let mut gap = vec![0; 16];
    gap[4..8].fill(second);
    let violation = skipped
        .after_failover(1, 1, vec![image(&gap)], true)
        .expect_err("a skipped write breaks the prefix");
    assert_eq!(violation.guarantee, "G3");

    let mut whole = checker(false);
    let first_whole = acked_write(&mut whole, 1, 0, 0, 4);
    let second_whole = acked_write(&mut whole, 2, 0, 4, 4);
    let mut both = vec![0; 16];
    both[0..4].fill(first_whole);
    both[4..8].fill(second_whole);
    assert_eq!(whole.after_failover(1, 1, vec![image(&both)], true), Ok(0));

    let mut short = checker(false);
    let kept = acked_write(&mut short, 1, 0, 0, 4);
    acked_write(&mut short, 2, 0, 4, 4);
    let mut prefix = vec![0; 16];
    prefix[0..4].fill(kept);
    assert_eq!(
        short.after_failover(1, 1, vec![image(&prefix)], true),
        Ok(1)
    );
    // The new owner's image is the truth from now on.
    assert_eq!(short.check_final(0, &image_bytes(&prefix)), Ok(()));
}

/// A replica's snapshot read issued before a failover may show a write
/// the failover then judged lost (the image it read was on the cluster's
/// line when the read began); one issued after it may not.
#[test]
fn a_write_lost_to_a_failover_shows_only_in_snapshot_reads_issued_before_it() {
    let mut checker = checker(false);
    let kept = acked_write(&mut checker, 1, 0, 0, 2);
    let lost = acked_write(&mut checker, 2, 0, 2, 2);
    let snapshot = |checker: &mut Checker, request: u64| {
        let issued = checker.tick();
        checker.issue(
            request,
            2,
            Tracked::Snapshot {
                volume: 0,
                first: 0,
                count: 4,
                consistent: true,
                issued,
            },
        );
    };
    snapshot(&mut checker, 3);
    let mut image = vec![0; 16];
    image[0..2].fill(kept);
    let adopted = checker.after_failover(
        1,
        1,
        vec![View {
            volume: 0,
            first: 0,
            versions: image,
        }],
        false,
    );
    assert_eq!(adopted, Ok(1));
    let read = image_bytes(&[kept, kept, lost, lost]);
    checker
        .on_snapshot_reply(3, Ok(&Bytes::from(read.clone())))
        .expect("issued before the failover");
    snapshot(&mut checker, 4);
    assert_eq!(
        guarantee(checker.on_snapshot_reply(4, Ok(&Bytes::from(read)))),
        "G3",
        "issued after the failover judged the write lost"
    );
}

/// Bytes of an image whose sectors hold these versions.
fn image_bytes(versions: &[u32]) -> Vec<u8> {
    let mut bytes = vec![0u8; versions.len() * SECTOR_BYTES as usize];
    for (sector, version) in versions.iter().enumerate() {
        if *version != 0 {
            let at = sector * SECTOR_BYTES as usize;
            fill_sector(
                &mut bytes[at..at + SECTOR_BYTES as usize],
                *version,
                sector as u64,
            );
        }
    }
    bytes
}

/// Every write that failed since a sector's last acknowledged one may be
/// what it shows (a failed write may have landed), not only the newest
/// failed one; a version no write put there since is still caught.
#[test]
fn any_failed_write_since_the_last_acknowledged_one_may_show() {
    let mut checker = checker(false);
    let acked = acked_write(&mut checker, 1, 0, 0, 2);
    let failed = |checker: &mut Checker, request: u64| {
        let id = checker.issue_write(request, 0, 0, 0, 2, WriteKind::Data, false, false);
        checker
            .on_reply(request, false, None, false)
            .expect("a failed write is fine");
        id
    };
    let first_failed = failed(&mut checker, 2);
    let second_failed = failed(&mut checker, 3);
    for shown in [acked, first_failed, second_failed] {
        let mut versions = vec![0; 16];
        versions[..2].fill(shown);
        assert_eq!(
            checker.check_final(0, &image_bytes(&versions)),
            Ok(()),
            "write {shown}"
        );
    }
    assert!(checker.check_final(0, &image_bytes(&[0; 16])).is_err());
    // An acknowledged write replaces what failed before it.
    let newest = acked_write(&mut checker, 4, 0, 0, 2);
    let mut versions = vec![0; 16];
    versions[..2].fill(first_failed);
    assert!(checker.check_final(0, &image_bytes(&versions)).is_err());
    versions[..2].fill(newest);
    assert_eq!(checker.check_final(0, &image_bytes(&versions)), Ok(()));
}
