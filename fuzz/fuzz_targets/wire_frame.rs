//! Frames from a peer node: `decode_frame` (length prefix, rkyv
//! validation, protocol rules) and `PeerMessage::into_site`. Must hold: no
//! panic; whatever decodes re-encodes (a node never refuses to send what
//! it accepts) and decodes back to the same message; an engine message
//! converted to the engine's form converts back to the same wire message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stretch_wire::{PeerMessage, decode_frame, encode_frame, frame_length};

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
    if let Some(site) = message
        .clone()
        .into_site()
        .expect("a valid message converts")
    {
        let back = PeerMessage::from_site(&site).expect("an engine message converts back");
        assert_eq!(back, message);
    }
});
