//! The cache proper: the newest in-memory image of every block that has one,
//! with byte accounting and a FIFO of clean blocks for eviction.
//!
//! A block is *dirty* while the delta holding its newest image has not
//! reached the leg (its buffer is shared with that delta, and counted there),
//! and *clean* afterwards (counted here, evictable unless pinned). Pins keep
//! a clean block resident while a partial write waits to merge into it: if
//! it were evicted, the merge would have to start again from a leg read.

use std::collections::{BTreeMap, VecDeque};

use crate::types::{BlockImage, BlockKey, DeltaSeq};

/// Bookkeeping charged per resident block on top of its buffer, so that a
/// range of zeroed blocks (no buffer) still counts against the cache bound.
pub(crate) const ENTRY_OVERHEAD_BYTES: u64 = 64;

#[derive(Debug)]
pub(crate) struct Entry {
    pub image: BlockImage,
    /// `Some(seq)`: the newest image lives in delta `seq` of the block's
    /// group and is not on the leg yet. `None`: clean.
    pub dirty_seq: Option<DeltaSeq>,
    pub pins: u32,
    /// Matches the clean-queue slot that may evict this entry.
    clean_stamp: u64,
}

impl Entry {
    pub fn charge(image: &BlockImage) -> u64 {
        image.memory_bytes() + ENTRY_OVERHEAD_BYTES
    }
}

#[derive(Debug, Default)]
pub(crate) struct BlockIndex {
    entries: BTreeMap<BlockKey, Entry>,
    clean_queue: VecDeque<(BlockKey, u64)>,
    next_stamp: u64,
    clean_bytes: u64,
}

impl BlockIndex {
    pub fn get(&self, key: &BlockKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// The entries of blocks `from..to`.
    pub fn range(&self, from: BlockKey, to: BlockKey) -> impl Iterator<Item = (&BlockKey, &Entry)> {
        self.entries.range(from..to)
    }

    pub fn clean_bytes(&self) -> u64 {
        self.clean_bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Records a new dirty image from delta `seq`.
    pub fn set_dirty(&mut self, key: BlockKey, image: BlockImage, seq: DeltaSeq) {
        match self.entries.get_mut(&key) {
            Some(entry) => {
                if entry.dirty_seq.is_none() {
                    self.clean_bytes -= Entry::charge(&entry.image);
                }
                entry.image = image;
                entry.dirty_seq = Some(seq);
            }
            None => {
                self.entries.insert(
                    key,
                    Entry {
                        image,
                        dirty_seq: Some(seq),
                        pins: 0,
                        clean_stamp: 0,
                    },
                );
            }
        }
    }

    /// Delta `seq` reached the leg: the block becomes clean if that delta
    /// still holds its newest image.
    pub fn mark_applied(&mut self, key: BlockKey, seq: DeltaSeq) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        if entry.dirty_seq != Some(seq) {
            return;
        }
        entry.dirty_seq = None;
        self.clean_bytes += Entry::charge(&entry.image);
        self.next_stamp += 1;
        entry.clean_stamp = self.next_stamp;
        self.clean_queue.push_back((key, self.next_stamp));
        self.compact_queue();
    }

    /// Inserts a clean image read from the leg, pinned once, unless the block
    /// is already resident (then the resident image, newer or equal, wins and
    /// is pinned instead).
    pub fn insert_clean_pinned(&mut self, key: BlockKey, image: BlockImage) {
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.pins += 1;
            return;
        }
        self.clean_bytes += Entry::charge(&image);
        self.next_stamp += 1;
        self.entries.insert(
            key,
            Entry {
                image,
                dirty_seq: None,
                pins: 1,
                clean_stamp: self.next_stamp,
            },
        );
        self.clean_queue.push_back((key, self.next_stamp));
        self.compact_queue();
    }

    /// Pins a resident block; false if it is not resident.
    pub fn pin(&mut self, key: &BlockKey) -> bool {
        match self.entries.get_mut(key) {
            Some(entry) => {
                entry.pins += 1;
                true
            }
            None => false,
        }
    }

    pub fn unpin(&mut self, key: &BlockKey) {
        if let Some(entry) = self.entries.get_mut(key) {
            assert!(entry.pins > 0, "unpin of block {key:?} that is not pinned");
            entry.pins -= 1;
        }
    }

    /// Evicts clean, unpinned blocks in the order they became clean until
    /// `needed` bytes were freed or none is left; returns the bytes freed.
    pub fn evict(&mut self, needed: u64) -> u64 {
        let mut freed = 0;
        let mut skipped = Vec::new();
        while freed < needed {
            let Some((key, stamp)) = self.clean_queue.pop_front() else {
                break;
            };
            let Some(entry) = self.entries.get(&key) else {
                continue;
            };
            if entry.dirty_seq.is_some() || entry.clean_stamp != stamp {
                continue;
            }
            if entry.pins > 0 {
                skipped.push((key, stamp));
                continue;
            }
            let charge = Entry::charge(&entry.image);
            self.entries.remove(&key);
            self.clean_bytes -= charge;
            freed += charge;
        }
        // Pinned blocks keep their place at the front: they are the oldest.
        for slot in skipped.into_iter().rev() {
            self.clean_queue.push_front(slot);
        }
        freed
    }

    /// Drops every block of blocks matching `filter` (a deleted volume).
    pub fn remove_where(&mut self, filter: impl Fn(&BlockKey) -> bool) {
        let mut clean_freed = 0;
        self.entries.retain(|key, entry| {
            if !filter(key) {
                return true;
            }
            if entry.dirty_seq.is_none() {
                clean_freed += Entry::charge(&entry.image);
            }
            false
        });
        self.clean_bytes -= clean_freed;
    }

    /// Stale queue slots (blocks dirtied again or evicted) are skipped lazily;
    /// this keeps the queue within twice the number of resident blocks.
    fn compact_queue(&mut self) {
        if self.clean_queue.len() <= 2 * self.entries.len() + 1024 {
            return;
        }
        let entries = &self.entries;
        self.clean_queue.retain(|(key, stamp)| {
            entries
                .get(key)
                .is_some_and(|entry| entry.dirty_seq.is_none() && entry.clean_stamp == *stamp)
        });
    }
}
