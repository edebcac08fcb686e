//! The seed corpus of the `wire_frame` fuzz target (fuzz/corpus/wire_frame)
//! is made by the real encoder, here. This test checks the committed seeds
//! still decode to these messages (an archive layout change would quietly
//! turn them into garbage the fuzzer must rediscover); with
//! `STRETCH_WRITE_FUZZ_SEEDS=1` it rewrites them.

use std::path::PathBuf;

use stretch_core::BLOCK_SIZE;
use stretch_wire::{
    PROTOCOL_VERSION, PeerMessage, WireBlock, WireFailure, WirePayload, WireRegion, WireRequest,
    WireResponse, decode_frame, encode_frame,
};

fn seeds() -> Vec<(&'static str, PeerMessage)> {
    let blocks = vec![
        WireBlock {
            volume: 1,
            block: 0,
            payload: WirePayload::Raw(vec![0xa5; BLOCK_SIZE]),
        },
        WireBlock {
            volume: 1,
            block: 3,
            payload: WirePayload::Zero,
        },
        WireBlock {
            volume: 1,
            block: 4,
            payload: WirePayload::Lz4(lz4_flex::block::compress(&[0x5a; BLOCK_SIZE])),
        },
    ];
    vec![
        (
            "hello",
            PeerMessage::Hello {
                protocol: PROTOCOL_VERSION,
                cluster: "c".into(),
                node: "a1".into(),
                site: "a".into(),
            },
        ),
        (
            "delta",
            PeerMessage::Delta {
                group: 2,
                epoch: 1,
                first: 7,
                seq: 7,
                blocks: blocks.clone(),
            },
        ),
        (
            "merged-deltas",
            PeerMessage::Delta {
                group: 2,
                epoch: 1,
                first: 8,
                seq: 12,
                blocks: blocks.clone(),
            },
        ),
        ("journaled", PeerMessage::Journaled { group: 2, seq: 7 }),
        (
            "resume",
            PeerMessage::Resume {
                group: 2,
                have: Some(3),
                have_epoch: Some(2),
                lost_regions: Some(vec![WireRegion {
                    volume: 1,
                    region: 4,
                }]),
                resume: 9,
            },
        ),
        (
            "resync",
            PeerMessage::Resync {
                group: 2,
                blocks: blocks.clone(),
                last: true,
                base: 3,
                consistent_at: 7,
                consistent_epoch: Some(2),
                resume: 9,
            },
        ),
        (
            "read-request",
            PeerMessage::ReadRequest {
                id: 5,
                volume: 1,
                offset: 4096,
                length: 8192,
                have: None,
            },
        ),
        (
            "read-reply",
            PeerMessage::ReadReply {
                id: 5,
                result: Ok(blocks),
            },
        ),
        (
            "forward-write",
            PeerMessage::Forward {
                id: 6,
                request: WireRequest::Write {
                    volume: 1,
                    offset: 100,
                    data: vec![1; 300],
                    fua: true,
                },
            },
        ),
        (
            "forward-reply",
            PeerMessage::ForwardReply {
                id: 6,
                result: Err(WireFailure::OutOfRange {
                    offset: 1,
                    length: 2,
                    size: 3,
                }),
            },
        ),
        (
            "forward-data",
            PeerMessage::ForwardReply {
                id: 7,
                result: Ok(WireResponse::Data(vec![2; 16])),
            },
        ),
        (
            "lease-request",
            PeerMessage::LeaseRequest {
                id: 8,
                volume: 1,
                first_region: 2,
                regions: 1,
                have: 5,
            },
        ),
        (
            "lease-reply",
            PeerMessage::LeaseReply {
                id: 8,
                lease_ms: 2000,
            },
        ),
        (
            "lease-revoke",
            PeerMessage::LeaseRevoke {
                id: 1,
                group: 2,
                regions: vec![WireRegion {
                    volume: 1,
                    region: 2,
                }],
                all: false,
            },
        ),
        ("lease-revoked", PeerMessage::LeaseRevoked { id: 1 }),
        (
            "raft-request",
            PeerMessage::RaftRequest {
                request: 1,
                body: br#"{"Vote":{"vote":{"term":2,"node_id":1},"last_log_id":null}}"#.to_vec(),
            },
        ),
        (
            "raft-reply",
            PeerMessage::RaftReply {
                request: 1,
                body: br#"{"Ok":{"vote":{"term":2,"node_id":1},"vote_granted":true}}"#.to_vec(),
            },
        ),
    ]
}

#[test]
fn committed_fuzz_seeds_are_current_frames() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/wire_frame");
    let write = std::env::var_os("STRETCH_WRITE_FUZZ_SEEDS").is_some();
    if write {
        std::fs::create_dir_all(&dir).expect("corpus dir");
    }
    for (name, message) in seeds() {
        let path = dir.join(format!("seed-{name}"));
        let frame = encode_frame(&message).expect("encodes");
        if write {
            std::fs::write(&path, &frame).expect("write seed");
        }
        let committed = std::fs::read(&path).expect("committed seed");
        assert_eq!(
            decode_frame(&committed).expect("seed decodes"),
            message,
            "{name}"
        );
    }
}
