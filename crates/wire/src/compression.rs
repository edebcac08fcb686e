//! Block payloads compressed on a link.
//!
//! Each 4 KiB block is compressed on its own, as one LZ4 block: a replica
//! expands it without any state shared across messages (a delta lost with
//! its connection leaves nothing behind), and a block of any message is
//! bounded on its own. A block travels compressed only when that saves at
//! least [`SAVING_BYTES_MIN`]; data that does not compress (encrypted or
//! already compressed guest data) travels raw, and a message whose first
//! blocks do not compress stops trying for the rest of it, so such data
//! costs a few compression attempts per message, not one per block.

use stretch_core::BLOCK_SIZE;

use crate::frame::WireError;
use crate::message::WirePayload;

/// How a link carries block payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Every block raw (or zero).
    Off,
    /// Blocks that shrink by at least [`SAVING_BYTES_MIN`] travel as LZ4.
    #[default]
    Lz4,
}

/// Bytes a compressed block must save to travel compressed: a smaller
/// saving costs the receiver an expansion for almost nothing.
pub const SAVING_BYTES_MIN: usize = BLOCK_SIZE / 8;

/// Blocks at the start of a message tried before the rest of it goes raw
/// without a try, when none of them shrank.
const TRIES_WITHOUT_GAIN_MAX: usize = 8;

/// Compresses the blocks of one message.
pub(crate) struct Compressor {
    compression: Compression,
    tried: usize,
    gained: bool,
}

impl Compressor {
    pub(crate) fn new(compression: Compression) -> Self {
        Compressor {
            compression,
            tried: 0,
            gained: false,
        }
    }

    /// The payload one block of `data` (exactly [`BLOCK_SIZE`] bytes)
    /// travels as.
    pub(crate) fn payload(&mut self, data: &[u8]) -> WirePayload {
        let giving_up = !self.gained && self.tried >= TRIES_WITHOUT_GAIN_MAX;
        if self.compression == Compression::Off || giving_up || data.len() != BLOCK_SIZE {
            return WirePayload::Raw(data.to_vec());
        }
        self.tried += 1;
        let compressed = lz4_flex::block::compress(data);
        if compressed.len() + SAVING_BYTES_MIN > BLOCK_SIZE {
            return WirePayload::Raw(data.to_vec());
        }
        self.gained = true;
        WirePayload::Lz4(compressed)
    }
}

/// The block bytes of a message: as the engine holds them (zeroed blocks
/// excluded: they travel as a tag) and as they travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PayloadBytes {
    pub blocks: u64,
    pub sent: u64,
}

impl crate::PeerMessage {
    /// The block bytes this message carries, before and after compression.
    pub fn payload_bytes(&self) -> PayloadBytes {
        let blocks: &[crate::WireBlock] = match self {
            crate::PeerMessage::Delta { blocks, .. }
            | crate::PeerMessage::Resync { blocks, .. } => blocks,
            crate::PeerMessage::ReadReply {
                result: Ok(blocks), ..
            } => blocks,
            _ => &[],
        };
        let mut bytes = PayloadBytes::default();
        for block in blocks {
            let sent = match &block.payload {
                WirePayload::Zero => continue,
                WirePayload::Raw(data) | WirePayload::Lz4(data) => data.len() as u64,
            };
            bytes.blocks += BLOCK_SIZE as u64;
            bytes.sent += sent;
        }
        bytes
    }
}

/// Expands a compressed block: it must come to exactly one block.
pub(crate) fn expand(compressed: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut block = vec![0u8; BLOCK_SIZE];
    match lz4_flex::block::decompress_into(compressed, &mut block) {
        Ok(BLOCK_SIZE) => Ok(block),
        Ok(length) => Err(WireError::Invalid(format!(
            "a compressed block expands to {length} bytes, not {BLOCK_SIZE}"
        ))),
        Err(error) => Err(WireError::Invalid(format!(
            "a compressed block does not expand: {error}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_block() -> Vec<u8> {
        b"stretch keeps a volume at every site. "
            .iter()
            .copied()
            .cycle()
            .take(BLOCK_SIZE)
            .collect()
    }

    /// Bytes no compressor shrinks (a xorshift stream).
    fn noise_block(seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..BLOCK_SIZE)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn a_compressible_block_travels_compressed_and_expands_to_itself() {
        let block = text_block();
        let WirePayload::Lz4(compressed) = Compressor::new(Compression::Lz4).payload(&block) else {
            panic!("text did not compress");
        };
        assert!(compressed.len() < BLOCK_SIZE / 4);
        assert_eq!(expand(&compressed).expect("expands"), block);
    }

    #[test]
    fn with_compression_off_every_block_travels_raw() {
        let block = text_block();
        assert_eq!(
            Compressor::new(Compression::Off).payload(&block),
            WirePayload::Raw(block)
        );
    }

    #[test]
    fn incompressible_blocks_travel_raw_and_a_message_of_them_stops_trying() {
        let mut compressor = Compressor::new(Compression::Lz4);
        for seed in 0..TRIES_WITHOUT_GAIN_MAX as u64 {
            assert!(matches!(
                compressor.payload(&noise_block(seed)),
                WirePayload::Raw(_)
            ));
        }
        assert_eq!(compressor.tried, TRIES_WITHOUT_GAIN_MAX);
        // Even a compressible block goes raw now, untried.
        assert!(matches!(
            compressor.payload(&text_block()),
            WirePayload::Raw(_)
        ));
        assert_eq!(compressor.tried, TRIES_WITHOUT_GAIN_MAX);
    }

    #[test]
    fn a_message_whose_blocks_compress_keeps_trying() {
        let mut compressor = Compressor::new(Compression::Lz4);
        assert!(matches!(
            compressor.payload(&text_block()),
            WirePayload::Lz4(_)
        ));
        for seed in 0..2 * TRIES_WITHOUT_GAIN_MAX as u64 {
            compressor.payload(&noise_block(seed));
        }
        assert!(matches!(
            compressor.payload(&text_block()),
            WirePayload::Lz4(_)
        ));
    }

    #[test]
    fn a_compressed_block_that_does_not_expand_to_one_block_is_refused() {
        let short = lz4_flex::block::compress(&[7u8; BLOCK_SIZE / 2]);
        assert!(matches!(expand(&short), Err(WireError::Invalid(_))));
        let long = lz4_flex::block::compress(&[7u8; BLOCK_SIZE * 2]);
        assert!(matches!(expand(&long), Err(WireError::Invalid(_))));
        assert!(matches!(
            expand(&[0xff, 0x00, 0x13, 0x37]),
            Err(WireError::Invalid(_))
        ));
        assert!(matches!(expand(&[]), Err(WireError::Invalid(_))));
    }
}
