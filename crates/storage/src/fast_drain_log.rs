//! The log of a fast migration's target: the regions it copied from the
//! source whose copies are durable in its journal (see the engine's
//! `Action::SaveFastDrain`). After a crash the target asks again for every
//! region of the drain the log does not name; a region it names is never
//! asked again, since the target may have written it since.
//!
//! One text file, appended to and synced: a line per region,
//! `group epoch volume region`. An append torn by a crash leaves a last
//! line without its newline (or with bytes that are no line): it was never
//! acknowledged, and is dropped. At a start the file is compacted to each
//! group's newest drain (an older one of the same group ended: a group
//! drains once at a time) by a temporary file, fdatasync, rename, and a
//! directory sync, so a crash leaves the old log or the new one.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;

use stretch_core::{Epoch, GroupId, VolumeId};

use crate::filesystem::{FileSystem, StorageFile, replace_file};

/// The regions each drain logged, by group and the epoch of its switchover.
pub type DrainLog = BTreeMap<(GroupId, Epoch), BTreeSet<(VolumeId, u64)>>;

const HEADER: &str = "stretch fast drain log v1";
/// Far above any real log (one drain per group, at most
/// `FAST_DRAIN_REGIONS_MAX` regions each, or every region of its volumes);
/// a larger file is not ours.
const FILE_BYTES_MAX: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum DrainLogError {
    #[error("fast drain log {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("fast drain log {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
}

/// Appends `regions` of `group`'s drain at `epoch`, durably.
pub fn append_fast_drain_log<F: FileSystem>(
    fs: &F,
    path: &Path,
    group: GroupId,
    epoch: Epoch,
    regions: &[(VolumeId, u64)],
) -> Result<(), DrainLogError> {
    let io_error = |source| DrainLogError::Io {
        path: path.display().to_string(),
        source,
    };
    let created = !fs.exists(path);
    let file = fs.open(path, true).map_err(io_error)?;
    let mut end = file.len().map_err(io_error)?;
    if end > FILE_BYTES_MAX {
        return Err(DrainLogError::Corrupt {
            path: path.display().to_string(),
            reason: format!("{end} bytes"),
        });
    }
    let mut text = String::new();
    if end == 0 {
        text.push_str(HEADER);
        text.push('\n');
    } else {
        // A torn append before may have left a last line without its
        // newline: cut, so that it never reads as a whole line (its
        // digits may be the first of a longer number).
        let mut last = [0u8; 1];
        file.read_exact_at(&mut last, end - 1).map_err(io_error)?;
        if last[0] != b'\n' {
            let mut bytes = vec![0u8; end.min(FILE_BYTES_MAX) as usize];
            file.read_exact_at(&mut bytes, 0).map_err(io_error)?;
            end = bytes
                .iter()
                .rposition(|byte| *byte == b'\n')
                .map_or(0, |at| at as u64 + 1);
            file.set_len(end).map_err(io_error)?;
            if end == 0 {
                text.push_str(HEADER);
                text.push('\n');
            }
        }
    }
    for region in regions {
        push_line(&mut text, group, epoch, *region);
    }
    file.write_all_at(text.as_bytes(), end).map_err(io_error)?;
    file.sync_data().map_err(io_error)?;
    if created && let Some(dir) = path.parent() {
        fs.sync_dir(dir).map_err(io_error)?;
    }
    Ok(())
}

/// The log (empty if none was ever written), each group's newest drain
/// only; compacted on disk when it held more than that or a torn line.
pub fn load_fast_drain_log<F: FileSystem>(fs: &F, path: &Path) -> Result<DrainLog, DrainLogError> {
    let io_error = |source| DrainLogError::Io {
        path: path.display().to_string(),
        source,
    };
    let corrupt = |reason: String| DrainLogError::Corrupt {
        path: path.display().to_string(),
        reason,
    };
    if !fs.exists(path) {
        return Ok(DrainLog::new());
    }
    let file = fs.open(path, false).map_err(io_error)?;
    let len = file.len().map_err(io_error)?;
    if len > FILE_BYTES_MAX {
        return Err(corrupt(format!("{len} bytes")));
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0).map_err(io_error)?;
    let (log, stale) = parse(&bytes).map_err(corrupt)?;
    if stale {
        rewrite(fs, path, &log).map_err(io_error)?;
    }
    Ok(log)
}

/// The log in `bytes`, and whether the file holds more than it (older
/// drains, a torn last line).
fn parse(bytes: &[u8]) -> Result<(DrainLog, bool), String> {
    if bytes.is_empty() {
        // Created, then a crash before the header was durable.
        return Ok((DrainLog::new(), true));
    }
    let complete = bytes.ends_with(b"\n");
    let mut lines: Vec<&[u8]> = bytes.split(|byte| *byte == b'\n').collect();
    // The piece after the last newline: empty, or a torn append.
    let torn = lines.pop().is_some_and(|last| !last.is_empty());
    let mut lines = lines.into_iter();
    match lines.next() {
        Some(header) if header == HEADER.as_bytes() => {}
        // The header itself torn by the crash that created the file.
        None => return Ok((DrainLog::new(), true)),
        Some(_) if !complete && bytes.len() < HEADER.len() + 1 => {
            return Ok((DrainLog::new(), true));
        }
        Some(_) => return Err("unknown header".into()),
    }
    let lines: Vec<&[u8]> = lines.collect();
    let mut log = DrainLog::new();
    for (index, line) in lines.iter().enumerate() {
        match parse_line(line) {
            Some((group, epoch, region)) => {
                log.entry((group, epoch)).or_default().insert(region);
            }
            // Only the last line can be torn (zeros, a partial number).
            None if index + 1 == lines.len() && !torn => {
                return Ok((keep_newest(log).0, true));
            }
            None => {
                return Err(format!(
                    "line {}: {:?}",
                    index + 2,
                    String::from_utf8_lossy(line)
                ));
            }
        }
    }
    let (log, dropped) = keep_newest(log);
    Ok((log, dropped || torn))
}

/// One logged region, as [`parse_line`] reads it back.
fn push_line(text: &mut String, group: GroupId, epoch: Epoch, (volume, region): (VolumeId, u64)) {
    text.push_str(&format!("{} {} {} {region}\n", group.0, epoch.0, volume.0));
}

fn parse_line(line: &[u8]) -> Option<(GroupId, Epoch, (VolumeId, u64))> {
    let text = std::str::from_utf8(line).ok()?;
    let mut fields = text.split(' ');
    let group = fields.next()?.parse().ok()?;
    let epoch = fields.next()?.parse().ok()?;
    let volume = fields.next()?.parse().ok()?;
    let region = fields.next()?.parse().ok()?;
    if fields.next().is_some() {
        return None;
    }
    Some((GroupId(group), Epoch(epoch), (VolumeId(volume), region)))
}

/// Each group's newest drain, and whether older ones were dropped.
fn keep_newest(log: DrainLog) -> (DrainLog, bool) {
    let mut newest: BTreeMap<GroupId, Epoch> = BTreeMap::new();
    for (group, epoch) in log.keys() {
        let entry = newest.entry(*group).or_insert(*epoch);
        *entry = (*entry).max(*epoch);
    }
    let before = log.len();
    let kept: DrainLog = log
        .into_iter()
        .filter(|((group, epoch), _)| newest[group] == *epoch)
        .collect();
    let dropped = kept.len() != before;
    (kept, dropped)
}

fn rewrite<F: FileSystem>(fs: &F, path: &Path, log: &DrainLog) -> io::Result<()> {
    let mut text = String::from(HEADER);
    text.push('\n');
    for ((group, epoch), regions) in log {
        for region in regions {
            push_line(&mut text, *group, *epoch, *region);
        }
    }
    replace_file(fs, path, &path.with_extension("tmp"), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimFileSystem;

    fn regions(list: &[(u32, u64)]) -> BTreeSet<(VolumeId, u64)> {
        list.iter()
            .map(|(volume, region)| (VolumeId(*volume), *region))
            .collect()
    }

    fn setup() -> (SimFileSystem, &'static Path) {
        let fs = SimFileSystem::new();
        fs.create_dir_all(Path::new("/node")).expect("dir");
        (fs, Path::new("/node/fast-drain-log"))
    }

    #[test]
    fn appended_regions_load_back_and_a_missing_log_is_empty() {
        let (fs, path) = setup();
        assert!(load_fast_drain_log(&fs, path).expect("load").is_empty());
        append_fast_drain_log(&fs, path, GroupId(1), Epoch(4), &[(VolumeId(2), 0)])
            .expect("append");
        append_fast_drain_log(
            &fs,
            path,
            GroupId(1),
            Epoch(4),
            &[(VolumeId(2), 7), (VolumeId(3), 1)],
        )
        .expect("append");
        append_fast_drain_log(&fs, path, GroupId(5), Epoch(2), &[(VolumeId(9), 3)])
            .expect("append");
        let log = load_fast_drain_log(&fs, path).expect("load");
        assert_eq!(log.len(), 2);
        assert_eq!(
            log[&(GroupId(1), Epoch(4))],
            regions(&[(2, 0), (2, 7), (3, 1)])
        );
        assert_eq!(log[&(GroupId(5), Epoch(2))], regions(&[(9, 3)]));
    }

    #[test]
    fn a_groups_older_drains_are_dropped_and_the_log_compacted() {
        let (fs, path) = setup();
        append_fast_drain_log(&fs, path, GroupId(1), Epoch(2), &[(VolumeId(1), 0)])
            .expect("append");
        append_fast_drain_log(&fs, path, GroupId(1), Epoch(5), &[(VolumeId(1), 1)])
            .expect("append");
        let before = fs.open(path, false).expect("open").len().expect("len");
        let log = load_fast_drain_log(&fs, path).expect("load");
        assert_eq!(
            log.keys().copied().collect::<Vec<_>>(),
            vec![(GroupId(1), Epoch(5))]
        );
        let after = fs.open(path, false).expect("open").len().expect("len");
        assert!(after < before, "compacted: {after} of {before} bytes");
        assert_eq!(load_fast_drain_log(&fs, path).expect("load"), log);
    }

    #[test]
    fn an_append_torn_by_a_crash_is_dropped_and_later_appends_still_load() {
        let (fs, path) = setup();
        append_fast_drain_log(&fs, path, GroupId(1), Epoch(2), &[(VolumeId(1), 0)])
            .expect("append");
        // A crash tore the next append: part of a line, no newline.
        let file = fs.open(path, false).expect("open");
        let end = file.len().expect("len");
        file.write_all_at(b"1 2 1 4", end).expect("write");
        file.sync_data().expect("sync");
        append_fast_drain_log(&fs, path, GroupId(1), Epoch(2), &[(VolumeId(1), 9)])
            .expect("append");
        // The next crash tears one at the very end.
        let end = fs.open(path, false).expect("open").len().expect("len");
        fs.open(path, false)
            .expect("open")
            .write_all_at(&[0, 0, 0], end)
            .expect("write");
        let log = load_fast_drain_log(&fs, path).expect("load");
        assert_eq!(log[&(GroupId(1), Epoch(2))], regions(&[(1, 0), (1, 9)]));
    }

    #[test]
    fn a_crash_loses_only_an_append_not_yet_synced() {
        let (fs, path) = setup();
        append_fast_drain_log(&fs, path, GroupId(1), Epoch(2), &[(VolumeId(1), 0)])
            .expect("append");
        let file = fs.open(path, false).expect("open");
        let end = file.len().expect("len");
        file.write_all_at(b"1 2 1 5\n", end).expect("write");
        // Nothing pending survives.
        fs.crash(&mut |_bound: u64| 0);
        let log = load_fast_drain_log(&fs, path).expect("load");
        assert_eq!(log[&(GroupId(1), Epoch(2))].len(), 1, "{log:?}");
    }

    #[test]
    fn a_corrupt_log_is_an_error_not_a_guess() {
        let (fs, path) = setup();
        let file = fs.open(path, true).expect("open");
        file.write_all_at(b"something else entirely\n", 0)
            .expect("write");
        assert!(matches!(
            load_fast_drain_log(&fs, path),
            Err(DrainLogError::Corrupt { .. })
        ));
        let file = fs.open(path, true).expect("open");
        let text = format!("{HEADER}\n1 2 x 4\n1 2 1 5\n");
        file.write_all_at(text.as_bytes(), 0).expect("write");
        assert!(matches!(
            load_fast_drain_log(&fs, path),
            Err(DrainLogError::Corrupt { .. })
        ));
    }
}
