//! What a node reads back from its own disk, which a crash, a bad disk or
//! an operator may have mangled: a dirty-region map, the resync marks, and a
//! journal record body. The first byte picks the
//! decoder, the rest is the file. Must hold: no panic; whatever loads saves
//! and loads back the same.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use stretch_storage::{
    FileSystem, SimFileSystem, StorageFile, decode_record, encode_record, load_dirty_map,
    load_resync_marks, save_dirty_map, save_resync_marks,
};

const RECORD_HEADER_BYTES: usize = 12;

fn file_with(bytes: &[u8]) -> SimFileSystem {
    let fs = SimFileSystem::new();
    fs.create_dir_all(Path::new("/node")).expect("dir");
    let file = fs.open(Path::new("/node/file"), true).expect("create");
    file.write_all_at(bytes, 0).expect("write");
    fs
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let path = Path::new("/node/file");
    match which % 3 {
        0 => {
            let fs = file_with(bytes);
            if let Ok(Some(regions)) = load_dirty_map(&fs, path) {
                let copy = Path::new("/node/copy");
                save_dirty_map(&fs, copy, &regions).expect("save");
                let again = load_dirty_map(&fs, copy).expect("load").expect("saved");
                assert_eq!(again, regions);
            }
        }
        1 => {
            let fs = file_with(bytes);
            if let Ok(groups) = load_resync_marks(&fs, path) {
                let copy = Path::new("/node/copy");
                let list: Vec<_> = groups.iter().copied().collect();
                save_resync_marks(&fs, copy, &list).expect("save");
                assert_eq!(load_resync_marks(&fs, copy).expect("load"), groups);
            }
        }
        _ => {
            if let Ok(record) = decode_record(bytes) {
                let encoded = encode_record(&record);
                assert_eq!(&encoded[RECORD_HEADER_BYTES..], bytes);
                assert_eq!(
                    decode_record(&encoded[RECORD_HEADER_BYTES..]).expect("decodes"),
                    record
                );
            }
        }
    }
});
