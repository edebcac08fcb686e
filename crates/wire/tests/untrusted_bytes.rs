//! Round trips, and bytes from a hostile or broken peer: every outcome is a
//! message or an error, never a panic.

use bytes::Bytes;
use stretch_core::{
    BLOCK_SIZE, BlockImage, BlockKey, DeltaRecord, DeltaSeq, Epoch, GroupId, JournalPosition,
    VolumeId,
};
use stretch_wire::{
    FRAME_BYTES_MAX, PROTOCOL_VERSION, PeerMessage, WireBlock, WireError, decode_frame,
    encode_frame, frame_length,
};

fn block(volume: u32, block: u64, byte: Option<u8>) -> WireBlock {
    WireBlock {
        volume,
        block,
        data: byte.map(|byte| vec![byte; BLOCK_SIZE]),
    }
}

fn samples() -> Vec<PeerMessage> {
    vec![
        PeerMessage::Hello {
            protocol: PROTOCOL_VERSION,
            cluster: "local".into(),
            node: "a1".into(),
        },
        PeerMessage::Delta {
            group: 3,
            epoch: 2,
            seq: 41,
            blocks: vec![
                block(1, 0, Some(7)),
                block(1, 1, None),
                block(2, 9, Some(9)),
            ],
        },
        PeerMessage::DeltaAck {
            group: 3,
            epoch: 2,
            seq: 41,
        },
        PeerMessage::ReadRequest {
            request: 5,
            volume: 1,
            offset: 4096,
            length: 8192,
            have_seq: 40,
        },
        PeerMessage::ReadReply {
            request: 5,
            owner_seq: 41,
            blocks: vec![block(1, 1, Some(1))],
        },
        PeerMessage::ReadFailed {
            request: 6,
            reason: "owner unreachable".into(),
        },
    ]
}

/// splitmix64, for garbage that is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[test]
fn every_message_round_trips() {
    for message in samples() {
        let frame = encode_frame(&message);
        assert_eq!(decode_frame(&frame), Ok(message));
    }
}

#[test]
fn a_delta_record_survives_the_trip_but_for_its_local_position() {
    let record = DeltaRecord {
        position: JournalPosition(17),
        group: GroupId(4),
        epoch: Epoch(1),
        seq: DeltaSeq(9),
        blocks: vec![
            (
                BlockKey {
                    volume: VolumeId(2),
                    block: 5,
                },
                BlockImage::Data(Bytes::from(vec![3u8; BLOCK_SIZE])),
            ),
            (
                BlockKey {
                    volume: VolumeId(2),
                    block: 6,
                },
                BlockImage::Zero,
            ),
        ],
    };
    let frame = encode_frame(&PeerMessage::from_delta(&record));
    let received = decode_frame(&frame)
        .expect("decodes")
        .into_delta(JournalPosition(99))
        .expect("a delta");
    assert_eq!(received.position, JournalPosition(99));
    assert_eq!(
        DeltaRecord {
            position: JournalPosition(17),
            ..received
        },
        record
    );
}

#[test]
fn every_truncation_is_an_error() {
    for message in samples() {
        let frame = encode_frame(&message);
        for cut in 0..frame.len() {
            assert!(decode_frame(&frame[..cut]).is_err(), "cut at {cut} decoded");
        }
    }
}

#[test]
fn flipped_bits_never_panic() {
    for message in samples() {
        let frame = encode_frame(&message);
        // Skip the data blocks' interiors in long frames: flips there are
        // valid data, and the test stays quick.
        let positions: Vec<usize> = if frame.len() > 600 {
            (0..200).chain(frame.len() - 200..frame.len()).collect()
        } else {
            (0..frame.len()).collect()
        };
        for position in positions {
            for bit in 0..8 {
                let mut damaged = frame.clone();
                damaged[position] ^= 1 << bit;
                if let Ok(decoded) = decode_frame(&damaged) {
                    // Whatever passes validation obeys the protocol rules.
                    let again = encode_frame(&decoded);
                    assert_eq!(decode_frame(&again), Ok(decoded));
                }
            }
        }
    }
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = Rng(7);
    let mut decoded = 0;
    for _ in 0..20_000 {
        let length = (rng.next() % 300) as usize;
        let mut frame = (length as u32).to_le_bytes().to_vec();
        frame.extend((0..length).map(|_| rng.next() as u8));
        if decode_frame(&frame).is_ok() {
            decoded += 1;
        }
    }
    // Random bytes almost never form a valid archive.
    assert!(decoded < 100, "{decoded} random frames decoded");
}

#[test]
fn protocol_rules_are_enforced() {
    let short_block = PeerMessage::Delta {
        group: 1,
        epoch: 1,
        seq: 1,
        blocks: vec![WireBlock {
            volume: 1,
            block: 0,
            data: Some(vec![0; BLOCK_SIZE - 1]),
        }],
    };
    assert!(matches!(
        decode_frame(&encode_frame(&short_block)),
        Err(WireError::Invalid(_))
    ));
    let unsorted = PeerMessage::Delta {
        group: 1,
        epoch: 1,
        seq: 1,
        blocks: vec![block(1, 5, None), block(1, 4, None)],
    };
    assert!(matches!(
        decode_frame(&encode_frame(&unsorted)),
        Err(WireError::Invalid(_))
    ));
    let empty_read = PeerMessage::ReadRequest {
        request: 1,
        volume: 1,
        offset: 0,
        length: 0,
        have_seq: 0,
    };
    assert!(decode_frame(&encode_frame(&empty_read)).is_err());
}

#[test]
fn oversized_frames_are_refused_from_their_header() {
    let header = (FRAME_BYTES_MAX + 1).to_le_bytes();
    assert_eq!(
        frame_length(header),
        Err(WireError::FrameTooLarge(FRAME_BYTES_MAX as u64 + 1))
    );
    assert_eq!(frame_length(64u32.to_le_bytes()), Ok(64));
    let mut frame = header.to_vec();
    frame.extend([0u8; 16]);
    assert!(matches!(
        decode_frame(&frame),
        Err(WireError::FrameTooLarge(_))
    ));
}
