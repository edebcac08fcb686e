//! Frames from a peer node: `decode_frame` (length prefix, rkyv
//! validation, protocol rules) and `PeerMessage::into_site`. Must hold: no
//! panic; whatever decodes re-encodes (a node never refuses to send what
//! it accepts) and decodes back to the same message; a decoded message
//! reaches the engine unless a compressed block in it does not expand to
//! one block; an engine message sent again, compressed or not, arrives as
//! the same engine message, and uncompressed as the same wire message when
//! it came uncompressed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stretch_wire::{
    Compression, PeerMessage, WireBlock, WirePayload, decode_frame, encode_frame, frame_length,
};

fn has_compressed(message: &PeerMessage) -> bool {
    let compressed =
        |blocks: &[WireBlock]| blocks.iter().any(|block| matches!(block.payload, WirePayload::Lz4(_)));
    match message {
        PeerMessage::Delta { blocks, .. } | PeerMessage::Resync { blocks, .. } => {
            compressed(blocks)
        }
        PeerMessage::ReadReply {
            result: Ok(blocks), ..
        } => compressed(blocks),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.first_chunk::<4>() {
        let _ = frame_length(*header);
    }
    let Ok(message) = decode_frame(data) else {
        return;
    };
    let frame = encode_frame(&message).expect("a decoded message re-encodes");
    let again = decode_frame(&frame).expect("a re-encoded message decodes");
    assert_eq!(again, message);
    let site = match message.clone().into_site() {
        Ok(site) => site,
        Err(_) => {
            assert!(has_compressed(&message), "a valid message without compressed blocks is refused");
            return;
        }
    };
    let Some(site) = site else {
        return;
    };
    for compression in [Compression::Off, Compression::Lz4] {
        let back = PeerMessage::from_site(&site, compression).expect("an engine message converts back");
        if compression == Compression::Off && !has_compressed(&message) {
            assert_eq!(back, message);
        }
        let arrived = back.into_site().expect("a message a node sends converts");
        assert_eq!(arrived.as_ref(), Some(&site));
    }
});
