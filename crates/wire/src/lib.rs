//! Messages between stretch nodes.
//!
//! [`PeerMessage`] is everything one node says to another: a
//! [`PeerMessage::Hello`] opening each connection, the messages of the
//! engines of two sites (deltas and their acknowledgements, resync, strict
//! reads and forwarded requests), and the nodes' metadata messages: Raft
//! RPCs and requests forwarded to the Raft leader, carried as opaque JSON
//! ([`PeerMessage::RaftRequest`], [`PeerMessage::RaftReply`]).
//!
//! The engines' messages are [`stretch_core::SiteMessage`]s;
//! [`PeerMessage::from_site`] turns one into its wire form and
//! [`PeerMessage::into_site`] turns a received one back (`None` for a hello
//! or a metadata message, which the node handles itself). The wire form has
//! plain integers for identifiers, a [`WirePayload`] for a block's image
//! (zero, raw, or LZ4-compressed where that pays: [`Compression`], set per
//! link) and its own mirrors of requests, responses and request errors
//! ([`WireRequest`], [`WireResponse`], [`WireFailure`]).
//!
//! Each message is an rkyv archive in a frame: a little-endian u32 length,
//! then the archive. Bytes from a peer are untrusted: a frame over
//! [`FRAME_BYTES_MAX`] is refused before anything is allocated for it, the
//! archive is validated (bytecheck) before any field is read, and then
//! checked against the protocol's own rules:
//! - site, node and cluster names at most [`NAME_BYTES_MAX`] bytes;
//! - every block exactly [`stretch_core::BLOCK_SIZE`] bytes, none for a
//!   zeroed block, or compressed to fewer bytes that expand to exactly one
//!   block (checked as it is expanded, in [`PeerMessage::into_site`]), and
//!   the blocks of a delta, a resync chunk or a read reply
//!   in strictly increasing `(volume, block)` order;
//! - at most [`stretch_core::LOST_REGIONS_MAX`] lost regions in a resume,
//!   strictly increasing;
//! - a strict read of 1 to [`FRAME_BYTES_MAX`] bytes, a forwarded read of
//!   at most that (its answer must fit in a frame), a forwarded write of at
//!   most [`WRITE_BYTES_MAX`] bytes;
//! - a metadata request or reply numbered other than 0, with a body of 1 to
//!   [`METADATA_BYTES_MAX`] bytes.
//!
//! Any failure is a [`WireError`]: the caller closes that stream and
//! carries on. Nothing here panics on input.
//!
//! [`encode_frame`] checks the same rules and the frame limit, so a node
//! never sends what its peer would refuse (and close the stream over).

mod compression;
mod convert;
mod frame;
mod message;

pub use compression::{Compression, PayloadBytes, SAVING_BYTES_MIN};
pub use frame::{
    ArchiveBuffer, FRAME_BYTES_MAX, FrameParts, WireError, decode_archive, decode_frame,
    encode_frame, encode_frame_parts, frame_length,
};
pub use message::{
    METADATA_BYTES_MAX, NAME_BYTES_MAX, PROTOCOL_VERSION, PeerMessage, WRITE_BYTES_MAX, WireBlock,
    WireFailure, WirePayload, WireRegion, WireRequest, WireResponse,
};
