//! The seed corpus of the `storage_decoders` fuzz target
//! (fuzz/corpus/storage_decoders) is made by the real encoders, here: a
//! first byte picking the decoder (0 dirty-region map, 1 resync marks, 2
//! journal record body), then the bytes as saved. This test checks
//! the committed seeds are still what the encoders write and that they
//! load; with `STRETCH_WRITE_FUZZ_SEEDS=1` it rewrites them.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use stretch_core::{
    BLOCK_SIZE, BlockImage, BlockKey, DeltaRecord, DeltaSeq, Epoch, GroupId, JournalPosition,
    VolumeId,
};
use stretch_storage::{
    FileSystem, Regions, SimFileSystem, StorageFile, decode_record, encode_record, load_dirty_map,
    load_resync_marks, save_dirty_map, save_resync_marks,
};

fn saved(fs: &SimFileSystem, path: &Path) -> Vec<u8> {
    fs.with_content(path, <[u8]>::to_vec).expect("saved")
}

fn seeds() -> Vec<(&'static str, u8, Vec<u8>)> {
    let fs = SimFileSystem::new();
    fs.create_dir_all(Path::new("/node")).expect("dir");

    let map_path = Path::new("/node/dirty-b.map");
    let regions: Regions = [(VolumeId(1), 0), (VolumeId(1), 7), (VolumeId(2), 3)].into();
    save_dirty_map(&fs, map_path, &regions).expect("save map");

    let marks_path = Path::new("/node/resync-marks");
    save_resync_marks(&fs, marks_path, &[GroupId(1), GroupId(4)]).expect("save marks");

    let record = DeltaRecord {
        position: JournalPosition(3),
        group: GroupId(1),
        epoch: Epoch(2),
        seq: DeltaSeq(9),
        blocks: vec![
            (
                BlockKey {
                    volume: VolumeId(1),
                    block: 0,
                },
                BlockImage::Data(Bytes::from(vec![0x5a; BLOCK_SIZE])),
            ),
            (
                BlockKey {
                    volume: VolumeId(1),
                    block: 2,
                },
                BlockImage::Zero,
            ),
        ],
    };
    // The decoder takes the body: the record less its 12-byte framing header.
    let body = encode_record(&record)[12..].to_vec();
    assert_eq!(decode_record(&body).expect("decodes"), record);

    vec![
        ("dirty-map", 0, saved(&fs, map_path)),
        ("resync-marks", 1, saved(&fs, marks_path)),
        ("journal-record", 2, body),
    ]
}

#[test]
fn committed_fuzz_seeds_are_what_the_encoders_write() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/storage_decoders");
    let write = std::env::var_os("STRETCH_WRITE_FUZZ_SEEDS").is_some();
    if write {
        std::fs::create_dir_all(&dir).expect("corpus dir");
    }
    for (name, which, bytes) in seeds() {
        let mut seed = vec![which];
        seed.extend_from_slice(&bytes);
        let path = dir.join(format!("seed-{name}"));
        if write {
            std::fs::write(&path, &seed).expect("write seed");
        }
        assert_eq!(
            std::fs::read(&path).expect("committed seed"),
            seed,
            "{name}"
        );
    }
    // And each loads through its decoder.
    let fs = SimFileSystem::new();
    fs.create_dir_all(Path::new("/node")).expect("dir");
    let seeds = seeds();
    let file = |name: &str, bytes: &[u8]| {
        let path = PathBuf::from(format!("/node/{name}"));
        let file = fs.open(&path, true).expect("create");
        file.write_all_at(bytes, 0).expect("write");
        path
    };
    assert_eq!(
        load_dirty_map(&fs, &file("b", &seeds[0].2))
            .expect("map loads")
            .expect("map")
            .len(),
        3
    );
    assert_eq!(
        load_resync_marks(&fs, &file("c", &seeds[1].2))
            .expect("marks load")
            .len(),
        2
    );
}
