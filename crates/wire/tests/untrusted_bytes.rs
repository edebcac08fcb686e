//! Round trips, and bytes from a hostile or broken peer: every outcome is a
//! message or an error, never a panic.

use rkyv::rancor;
use stretch_core::{BLOCK_SIZE, LEASE_REGIONS_MAX, LOST_REGIONS_MAX};
use stretch_wire::{
    FRAME_BYTES_MAX, METADATA_BYTES_MAX, NAME_BYTES_MAX, PROTOCOL_VERSION, PeerMessage,
    WRITE_BYTES_MAX, WireBlock, WireError, WireFailure, WirePayload, WireRegion, WireRequest,
    WireResponse, decode_frame, encode_frame, frame_length,
};

fn region(volume: u32, region: u64) -> WireRegion {
    WireRegion { volume, region }
}

fn block(volume: u32, block: u64, byte: Option<u8>) -> WireBlock {
    WireBlock {
        volume,
        block,
        payload: byte.map_or(WirePayload::Zero, |byte| {
            WirePayload::Raw(vec![byte; BLOCK_SIZE])
        }),
    }
}

/// A block of `byte`s, LZ4-compressed as a node sends it.
fn compressed(volume: u32, block: u64, byte: u8) -> WireBlock {
    WireBlock {
        volume,
        block,
        payload: WirePayload::Lz4(lz4_flex::block::compress(&[byte; BLOCK_SIZE])),
    }
}

fn requests() -> Vec<WireRequest> {
    vec![
        WireRequest::Read {
            volume: 1,
            offset: 4096,
            length: 8192,
        },
        WireRequest::ReadSnapshot {
            volume: 1,
            offset: 0,
            length: 512,
        },
        WireRequest::Write {
            volume: 1,
            offset: 100,
            data: vec![0xa5; 300],
            fua: true,
        },
        WireRequest::WriteZeroes {
            volume: 2,
            offset: 0,
            length: 1 << 40,
            fua: false,
        },
        WireRequest::Trim {
            volume: 2,
            offset: 4096,
            length: 4096,
        },
        WireRequest::Flush { volume: 3 },
    ]
}

fn failures() -> Vec<WireFailure> {
    vec![
        WireFailure::NoVolume(9),
        WireFailure::OutOfRange {
            offset: 1 << 30,
            length: 4096,
            size: 1 << 30,
        },
        WireFailure::TooLarge {
            length: 1 << 26,
            cache_bytes_max: 1 << 25,
        },
        WireFailure::Io("site 1 does not own volume 4".into()),
        WireFailure::Failed("journal write failed".into()),
    ]
}

/// At least one message of every variant, and every variant of the enums
/// they carry.
fn samples() -> Vec<PeerMessage> {
    let mut samples = vec![
        PeerMessage::Hello {
            protocol: PROTOCOL_VERSION,
            cluster: "local".into(),
            node: "a1".into(),
            site: "a".into(),
        },
        PeerMessage::Delta {
            group: 3,
            epoch: 2,
            first: 41,
            seq: 41,
            blocks: vec![
                block(1, 0, Some(7)),
                block(1, 1, None),
                compressed(1, 2, 5),
                block(2, 9, Some(9)),
            ],
        },
        PeerMessage::Delta {
            group: 3,
            epoch: 2,
            first: 42,
            seq: 42,
            blocks: Vec::new(),
        },
        PeerMessage::Journaled { group: 3, seq: 41 },
        PeerMessage::Applied { group: 3, seq: 40 },
        PeerMessage::Resume {
            group: 3,
            have: Some(39),
            have_epoch: Some(4),
            lost_regions: Some(vec![region(1, 0), region(1, 7), region(2, 0)]),
            resume: 7,
        },
        PeerMessage::Resume {
            group: 3,
            have: None,
            have_epoch: None,
            lost_regions: None,
            resume: 8,
        },
        PeerMessage::Resync {
            group: 3,
            blocks: vec![
                block(1, 256, Some(1)),
                block(1, 257, None),
                compressed(1, 258, 3),
            ],
            last: false,
            base: 40,
            consistent_at: 44,
            consistent_epoch: Some(4),
            resume: 8,
        },
        PeerMessage::Resync {
            group: 3,
            blocks: Vec::new(),
            last: true,
            base: 44,
            consistent_at: 44,
            consistent_epoch: None,
            resume: 8,
        },
        PeerMessage::ResyncAck {
            group: 3,
            resume: 8,
        },
        PeerMessage::Rejoin { group: 3 },
        PeerMessage::ReadRequest {
            id: 5,
            volume: 1,
            offset: 4096,
            length: 8192,
            have: Some(40),
        },
        PeerMessage::ReadRequest {
            id: 6,
            volume: 1,
            offset: 1,
            length: 1,
            have: None,
        },
        PeerMessage::ReadReply {
            id: 5,
            result: Ok(vec![
                block(1, 1, Some(1)),
                block(1, 2, None),
                compressed(1, 3, 2),
            ]),
        },
        PeerMessage::ForwardReply {
            id: 7,
            result: Ok(WireResponse::Done),
        },
        PeerMessage::ForwardReply {
            id: 8,
            result: Ok(WireResponse::Data(vec![3; 512])),
        },
        PeerMessage::LeaseRequest {
            id: 9,
            volume: 1,
            first_region: 3,
            regions: 2,
            have: 40,
        },
        PeerMessage::LeaseReply {
            id: 9,
            lease_ms: 2000,
        },
        PeerMessage::LeaseRevoke {
            id: 4,
            group: 3,
            regions: vec![region(1, 3), region(1, 4)],
            all: false,
        },
        PeerMessage::LeaseRevoked { id: 4 },
        PeerMessage::RaftRequest {
            request: 1,
            body: br#"{"AppendEntries":{"vote":{"term":3,"node_id":1},"entries":[]}}"#.to_vec(),
        },
        PeerMessage::RaftReply {
            request: 1,
            body: br#"{"Ok":"Success"}"#.to_vec(),
        },
        PeerMessage::RaftRequest {
            request: u64::MAX,
            body: vec![0],
        },
        PeerMessage::RaftReply {
            request: u64::MAX,
            body: vec![0xff],
        },
    ];
    for (id, request) in (10..).zip(requests()) {
        samples.push(PeerMessage::Forward { id, request });
    }
    for (id, failure) in (20..).zip(failures()) {
        samples.push(PeerMessage::ReadReply {
            id,
            result: Err(failure.clone()),
        });
        samples.push(PeerMessage::ForwardReply {
            id,
            result: Err(failure),
        });
    }
    samples
}

/// The name of a message's variant; a new variant does not compile here
/// until it is named, and then [`samples_cover_every_variant`] wants a
/// sample of it.
fn variant(message: &PeerMessage) -> &'static str {
    match message {
        PeerMessage::Hello { .. } => "Hello",
        PeerMessage::Delta { .. } => "Delta",
        PeerMessage::Journaled { .. } => "Journaled",
        PeerMessage::Applied { .. } => "Applied",
        PeerMessage::Resume { .. } => "Resume",
        PeerMessage::Resync { .. } => "Resync",
        PeerMessage::ResyncAck { .. } => "ResyncAck",
        PeerMessage::Rejoin { .. } => "Rejoin",
        PeerMessage::ReadRequest { .. } => "ReadRequest",
        PeerMessage::ReadReply { .. } => "ReadReply",
        PeerMessage::Forward { .. } => "Forward",
        PeerMessage::ForwardReply { .. } => "ForwardReply",
        PeerMessage::LeaseRequest { .. } => "LeaseRequest",
        PeerMessage::LeaseReply { .. } => "LeaseReply",
        PeerMessage::LeaseRevoke { .. } => "LeaseRevoke",
        PeerMessage::LeaseRevoked { .. } => "LeaseRevoked",
        PeerMessage::RaftRequest { .. } => "RaftRequest",
        PeerMessage::RaftReply { .. } => "RaftReply",
    }
}

/// The variants of the enums inside a message, and of its options and
/// results, each prefixed by the message's variant.
fn nested_variants(message: &PeerMessage) -> Vec<String> {
    fn failure(failure: &WireFailure) -> &'static str {
        match failure {
            WireFailure::NoVolume(_) => "NoVolume",
            WireFailure::OutOfRange { .. } => "OutOfRange",
            WireFailure::TooLarge { .. } => "TooLarge",
            WireFailure::Io(_) => "Io",
            WireFailure::Failed(_) => "Failed",
        }
    }
    fn request(request: &WireRequest) -> &'static str {
        match request {
            WireRequest::Read { .. } => "Read",
            WireRequest::ReadSnapshot { .. } => "ReadSnapshot",
            WireRequest::Write { .. } => "Write",
            WireRequest::WriteZeroes { .. } => "WriteZeroes",
            WireRequest::Trim { .. } => "Trim",
            WireRequest::Flush { .. } => "Flush",
        }
    }
    fn blocks(blocks: &[WireBlock]) -> Vec<String> {
        blocks
            .iter()
            .map(|block| match block.payload {
                WirePayload::Raw(_) => "block data".to_string(),
                WirePayload::Lz4(_) => "block compressed".to_string(),
                WirePayload::Zero => "block zero".to_string(),
            })
            .collect()
    }
    let prefix = variant(message);
    let inner: Vec<String> = match message {
        PeerMessage::Delta { blocks: b, .. } | PeerMessage::Resync { blocks: b, .. } => blocks(b),
        PeerMessage::Resume { have, .. } | PeerMessage::ReadRequest { have, .. } => {
            vec![format!("have {}", have.is_some())]
        }
        PeerMessage::ReadReply { result, .. } => match result {
            Ok(b) => [vec!["Ok".to_string()], blocks(b)].concat(),
            Err(f) => vec![failure(f).into()],
        },
        PeerMessage::Forward { request: r, .. } => vec![request(r).into()],
        PeerMessage::ForwardReply { result, .. } => match result {
            Ok(WireResponse::Done) => vec!["Done".into()],
            Ok(WireResponse::Data(_)) => vec!["Data".into()],
            Err(f) => vec![failure(f).into()],
        },
        _ => Vec::new(),
    };
    inner
        .into_iter()
        .map(|inner| format!("{prefix} {inner}"))
        .collect()
}

#[test]
fn samples_cover_every_variant() {
    use std::collections::BTreeSet;
    let samples = samples();
    let variants: BTreeSet<&str> = samples.iter().map(variant).collect();
    assert_eq!(variants.len(), 18, "{variants:?}");
    let nested: BTreeSet<String> = samples.iter().flat_map(nested_variants).collect();
    let mut want: BTreeSet<String> = BTreeSet::new();
    for inner in ["block data", "block zero", "block compressed"] {
        for outer in ["Delta", "Resync", "ReadReply"] {
            want.insert(format!("{outer} {inner}"));
        }
    }
    for outer in ["Resume", "ReadRequest"] {
        want.insert(format!("{outer} have true"));
        want.insert(format!("{outer} have false"));
    }
    for failure in ["NoVolume", "OutOfRange", "TooLarge", "Io", "Failed"] {
        want.insert(format!("ReadReply {failure}"));
        want.insert(format!("ForwardReply {failure}"));
    }
    want.insert("ReadReply Ok".into());
    for request in [
        "Read",
        "ReadSnapshot",
        "Write",
        "WriteZeroes",
        "Trim",
        "Flush",
    ] {
        want.insert(format!("Forward {request}"));
    }
    for response in ["Done", "Data"] {
        want.insert(format!("ForwardReply {response}"));
    }
    let missing: Vec<&String> = want.difference(&nested).collect();
    assert!(missing.is_empty(), "no sample of {missing:?}");
    assert!(
        samples
            .iter()
            .any(|m| matches!(m, PeerMessage::Resync { last: true, .. }))
            && samples
                .iter()
                .any(|m| matches!(m, PeerMessage::Resync { last: false, .. }))
    );
}

/// A frame of any message, even one the protocol's rules refuse.
fn raw_frame(message: &PeerMessage) -> Vec<u8> {
    let archive = rkyv::to_bytes::<rancor::Error>(message).expect("serialises");
    let mut frame = (archive.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&archive);
    frame
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
        let frame = encode_frame(&message).expect("encodes");
        assert_eq!(frame, raw_frame(&message));
        assert_eq!(decode_frame(&frame), Ok(message));
    }
}

#[test]
fn every_truncation_is_an_error() {
    for message in samples() {
        let frame = encode_frame(&message).expect("encodes");
        for cut in 0..frame.len() {
            assert!(decode_frame(&frame[..cut]).is_err(), "cut at {cut} decoded");
        }
        // A cut archive under a header that agrees with it.
        for cut in 0..frame.len() - 4 {
            let mut short = (cut as u32).to_le_bytes().to_vec();
            short.extend_from_slice(&frame[4..4 + cut]);
            let _ = decode_frame(&short);
        }
    }
}

#[test]
fn flipped_bits_never_panic() {
    for message in samples() {
        let frame = encode_frame(&message).expect("encodes");
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
                    let again = encode_frame(&decoded).expect("re-encodes");
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

/// Random bytes spliced into valid frames get past more of the validation
/// than pure garbage does.
#[test]
fn spliced_garbage_never_panics() {
    let mut rng = Rng(11);
    let samples = samples();
    for _ in 0..20_000 {
        let index = (rng.next() % samples.len() as u64) as usize;
        let mut frame = encode_frame(&samples[index]).expect("encodes");
        let body = frame.len() - 4;
        let start = 4 + (rng.next() % body as u64) as usize;
        let length = (rng.next() % 9) as usize;
        for byte in frame.iter_mut().skip(start).take(length) {
            *byte = rng.next() as u8;
        }
        if let Ok(decoded) = decode_frame(&frame) {
            let again = encode_frame(&decoded).expect("re-encodes");
            assert_eq!(decode_frame(&again), Ok(decoded));
        }
    }
}

/// Whether the protocol's rules refuse the message, both when it is
/// received and when it is to be sent.
fn refused(message: &PeerMessage) -> bool {
    let received = decode_frame(&raw_frame(message));
    let sent = encode_frame(message);
    match (received, sent) {
        (Err(WireError::Invalid(_)), Err(WireError::Invalid(_))) => true,
        (Ok(decoded), Ok(_)) => {
            assert_eq!(&decoded, message);
            false
        }
        (received, sent) => panic!("received as {received:?}, sent as {sent:?}"),
    }
}

#[test]
fn protocol_rules_are_enforced() {
    let delta = |blocks| PeerMessage::Delta {
        group: 1,
        epoch: 1,
        first: 1,
        seq: 1,
        blocks,
    };
    let resync = |blocks| PeerMessage::Resync {
        group: 1,
        blocks,
        last: false,
        base: 0,
        consistent_at: 1,
        consistent_epoch: None,
        resume: 1,
    };
    let reply = |blocks| PeerMessage::ReadReply {
        id: 1,
        result: Ok(blocks),
    };
    for carrier in [delta, resync, reply] {
        let short = WireBlock {
            volume: 1,
            block: 0,
            payload: WirePayload::Raw(vec![0; BLOCK_SIZE - 1]),
        };
        let long = WireBlock {
            payload: WirePayload::Raw(vec![0; BLOCK_SIZE + 1]),
            ..short.clone()
        };
        assert!(refused(&carrier(vec![short])));
        assert!(refused(&carrier(vec![block(1, 0, None), long])));
        assert!(refused(&carrier(vec![
            block(1, 5, None),
            block(1, 4, None)
        ])));
        assert!(refused(&carrier(vec![
            block(2, 0, None),
            block(1, 9, None)
        ])));
        assert!(refused(&carrier(vec![
            block(1, 4, None),
            block(1, 4, None)
        ])));
        assert!(!refused(&carrier(vec![
            block(1, 9, None),
            block(2, 0, None)
        ])));
        // A compressed block shorter than a block, and not empty.
        let compressed_as = |payload: Vec<u8>| WireBlock {
            volume: 1,
            block: 0,
            payload: WirePayload::Lz4(payload),
        };
        assert!(refused(&carrier(vec![compressed_as(Vec::new())])));
        assert!(refused(&carrier(vec![compressed_as(vec![0; BLOCK_SIZE])])));
        assert!(!refused(&carrier(vec![compressed(1, 0, 9)])));
    }

    // Merged deltas: a first delta after the last is refused.
    let merged = |first, seq| PeerMessage::Delta {
        group: 1,
        epoch: 1,
        first,
        seq,
        blocks: vec![block(1, 0, None)],
    };
    assert!(refused(&merged(5, 4)));
    assert!(!refused(&merged(4, 4)));
    assert!(!refused(&merged(2, 4)));

    let read = |length| PeerMessage::ReadRequest {
        id: 1,
        volume: 1,
        offset: 0,
        length,
        have: None,
    };
    assert!(refused(&read(0)));
    assert!(refused(&read(u64::from(FRAME_BYTES_MAX) + 1)));
    assert!(!refused(&read(u64::from(FRAME_BYTES_MAX))));

    let write = |length| PeerMessage::Forward {
        id: 1,
        request: WireRequest::Write {
            volume: 1,
            offset: 0,
            data: vec![0; length],
            fua: false,
        },
    };
    assert!(refused(&write(WRITE_BYTES_MAX + 1)));
    assert!(!refused(&write(WRITE_BYTES_MAX)));
    let forwarded_read = PeerMessage::Forward {
        id: 1,
        request: WireRequest::Read {
            volume: 1,
            offset: 0,
            length: u64::from(FRAME_BYTES_MAX) + 1,
        },
    };
    assert!(refused(&forwarded_read));

    let resume = |regions| PeerMessage::Resume {
        group: 1,
        have: Some(9),
        have_epoch: Some(1),
        lost_regions: Some(regions),
        resume: 1,
    };
    assert!(!refused(&resume(Vec::new())));
    assert!(!refused(&resume(vec![region(1, 9), region(2, 0)])));
    assert!(refused(&resume(vec![region(1, 4), region(1, 4)])));
    assert!(refused(&resume(vec![region(2, 0), region(1, 9)])));
    let most: Vec<WireRegion> = (0..LOST_REGIONS_MAX as u64)
        .map(|index| region(1, index))
        .collect();
    assert!(!refused(&resume(most.clone())));
    let too_many = [most, vec![region(2, 0)]].concat();
    assert!(refused(&resume(too_many)));

    let revoke = |regions| PeerMessage::LeaseRevoke {
        id: 1,
        group: 1,
        regions,
        all: false,
    };
    assert!(!refused(&revoke(vec![region(1, 2), region(2, 0)])));
    assert!(refused(&revoke(vec![region(1, 2), region(1, 2)])));
    assert!(refused(&revoke(vec![region(2, 0), region(1, 9)])));
    let most: Vec<WireRegion> = (0..LEASE_REGIONS_MAX as u64)
        .map(|index| region(1, index))
        .collect();
    assert!(!refused(&revoke(most.clone())));
    assert!(refused(&revoke([most, vec![region(2, 0)]].concat())));
    let ask = |regions| PeerMessage::LeaseRequest {
        id: 1,
        volume: 1,
        first_region: 0,
        regions,
        have: 3,
    };
    assert!(!refused(&ask(1)));
    assert!(!refused(&ask(LEASE_REGIONS_MAX as u64)));
    assert!(refused(&ask(0)));
    assert!(refused(&ask(LEASE_REGIONS_MAX as u64 + 1)));

    let name = |bytes| "n".repeat(bytes);
    let hello = |cluster: String, node: String, site: String| PeerMessage::Hello {
        protocol: PROTOCOL_VERSION,
        cluster,
        node,
        site,
    };
    let fine = name(NAME_BYTES_MAX);
    let long = name(NAME_BYTES_MAX + 1);
    assert!(!refused(&hello(fine.clone(), fine.clone(), fine.clone())));
    assert!(refused(&hello(long.clone(), fine.clone(), fine.clone())));
    assert!(refused(&hello(fine.clone(), long.clone(), fine.clone())));
    assert!(refused(&hello(fine.clone(), fine.clone(), long.clone())));
}

#[test]
fn metadata_rules_are_enforced() {
    let request = |request, body| PeerMessage::RaftRequest { request, body };
    let reply = |request, body| PeerMessage::RaftReply { request, body };
    for carrier in [request, reply] {
        assert!(!refused(&carrier(1, b"{}".to_vec())));
        assert!(!refused(&carrier(u64::MAX, vec![0])));
        // 0 is never issued.
        assert!(refused(&carrier(0, b"{}".to_vec())));
        assert!(refused(&carrier(1, Vec::new())));
        // The largest body is sent and received; one byte more is neither.
        let mut body = vec![b' '; METADATA_BYTES_MAX];
        assert!(!refused(&carrier(2, body.clone())));
        body.push(b' ');
        assert!(refused(&carrier(2, body)));
    }
    // A whole metadata body fits in a frame.
    const { assert!(METADATA_BYTES_MAX < FRAME_BYTES_MAX as usize) };
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

#[test]
fn a_message_over_the_frame_limit_is_not_sent() {
    let blocks = FRAME_BYTES_MAX as usize / BLOCK_SIZE;
    let delta = |blocks: usize| PeerMessage::Delta {
        group: 1,
        epoch: 1,
        first: 1,
        seq: 1,
        blocks: (0..blocks as u64).map(|b| block(1, b, Some(1))).collect(),
    };
    assert!(matches!(
        encode_frame(&delta(blocks)),
        Err(WireError::FrameTooLarge(_))
    ));
    // A delta of 32 MiB of blocks fits.
    let fits = delta(WRITE_BYTES_MAX / BLOCK_SIZE);
    let frame = encode_frame(&fits).expect("a 32 MiB delta encodes");
    assert!(frame.len() <= FRAME_BYTES_MAX as usize + 4);
    assert_eq!(decode_frame(&frame), Ok(fits));
}

/// A compressed block passes the frame's checks whatever it holds (they
/// do not expand it), but reaches the engine only if it expands to
/// exactly one block.
#[test]
fn a_compressed_block_reaches_the_engine_only_if_it_expands_to_one_block() {
    let delta = |payload: Vec<u8>| PeerMessage::Delta {
        group: 1,
        epoch: 1,
        first: 1,
        seq: 1,
        blocks: vec![WireBlock {
            volume: 1,
            block: 0,
            payload: WirePayload::Lz4(payload),
        }],
    };
    let not_lz4 = vec![0xff, 0x00, 0x13, 0x37, 0x42];
    let half = lz4_flex::block::compress(&[7u8; BLOCK_SIZE / 2]);
    let double = lz4_flex::block::compress(&[7u8; BLOCK_SIZE * 2]);
    for payload in [not_lz4, half, double] {
        let message = delta(payload);
        let received = decode_frame(&raw_frame(&message)).expect("the frame itself is well formed");
        assert!(
            matches!(received.into_site(), Err(WireError::Invalid(_))),
            "{message:?} reached the engine"
        );
    }
    let whole = lz4_flex::block::compress(&[7u8; BLOCK_SIZE]);
    let Ok(Some(stretch_core::SiteMessage::Delta(record))) = delta(whole).into_site() else {
        panic!("a whole compressed block is refused");
    };
    assert_eq!(
        record.blocks[0].1,
        stretch_core::BlockImage::Data(vec![7u8; BLOCK_SIZE].into())
    );
}
