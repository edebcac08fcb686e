//! Messages between stretch nodes.
//!
//! Each message is an rkyv archive in a frame: a little-endian u32 length,
//! then the archive. Bytes from a peer are untrusted: a frame over
//! [`FRAME_BYTES_MAX`] is refused before anything is allocated for it, the
//! archive is validated (bytecheck) before any field is read, and then
//! checked against the protocol's own rules (block sizes, key order). Any
//! failure is a [`WireError`]: the caller closes that stream and carries on.
//! Nothing here panics on input.

mod message;

pub use message::{
    FRAME_BYTES_MAX, PROTOCOL_VERSION, PeerMessage, WireBlock, WireError, decode_frame,
    encode_frame, frame_length,
};
