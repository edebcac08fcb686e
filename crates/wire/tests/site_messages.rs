//! The engines' messages survive the wire: what one site's engine sends is
//! what the other's receives.

use bytes::Bytes;
use stretch_core::{
    BLOCK_SIZE, BlockImage, BlockKey, DELTA_RECORD_BYTES_MAX, DeltaRecord, DeltaSeq, Epoch,
    GroupId, JournalPosition, Request, RequestError, Response, SiteMessage, VolumeId,
};
use stretch_wire::{
    Compression, FRAME_BYTES_MAX, PROTOCOL_VERSION, PeerMessage, WireBlock, WireError, WirePayload,
    WireResponse, decode_frame, encode_frame,
};

fn key(volume: u32, block: u64) -> BlockKey {
    BlockKey {
        volume: VolumeId(volume),
        block,
    }
}

fn data(byte: u8) -> BlockImage {
    BlockImage::Data(Bytes::from(vec![byte; BLOCK_SIZE]))
}

fn requests() -> Vec<Request> {
    let volume = VolumeId(3);
    vec![
        Request::Read {
            volume,
            offset: 4096,
            length: 100,
        },
        Request::ReadSnapshot {
            volume,
            offset: 0,
            length: 8192,
        },
        Request::Write {
            volume,
            offset: 10,
            data: Bytes::from_static(b"written at a replica"),
            fua: true,
        },
        Request::WriteZeroes {
            volume,
            offset: 0,
            length: 1 << 30,
            fua: false,
        },
        Request::Trim {
            volume,
            offset: 4096,
            length: 4096,
        },
        Request::Flush { volume },
    ]
}

fn errors() -> Vec<RequestError> {
    vec![
        RequestError::NoVolume(VolumeId(8)),
        RequestError::OutOfRange {
            offset: 1 << 20,
            length: 1,
            size: 1 << 20,
        },
        RequestError::TooLarge {
            length: 1 << 26,
            cache_bytes_max: 1 << 24,
        },
        RequestError::Io("site 2 does not own volume 3".into()),
        RequestError::Failed("journal sync failed".into()),
    ]
}

/// A message of every variant, and every variant of what they carry.
fn samples() -> Vec<SiteMessage> {
    let group = GroupId(2);
    let mut samples = vec![
        SiteMessage::Delta(DeltaRecord {
            position: JournalPosition(0),
            group,
            epoch: Epoch(3),
            seq: DeltaSeq(17),
            blocks: vec![
                (key(1, 0), data(1)),
                (key(1, 1), BlockImage::Zero),
                (key(4, 0), data(2)),
            ],
        }),
        SiteMessage::Delta(DeltaRecord {
            position: JournalPosition(0),
            group,
            epoch: Epoch(3),
            seq: DeltaSeq(18),
            blocks: Vec::new(),
        }),
        SiteMessage::Deltas {
            first: DeltaSeq(19),
            record: DeltaRecord {
                position: JournalPosition(0),
                group,
                epoch: Epoch(3),
                seq: DeltaSeq(23),
                blocks: vec![(key(1, 0), data(3)), (key(1, 2), BlockImage::Zero)],
            },
        },
        SiteMessage::Journaled {
            group,
            seq: DeltaSeq(17),
        },
        SiteMessage::Applied {
            group,
            seq: DeltaSeq(16),
        },
        SiteMessage::Resume {
            group,
            have: Some(DeltaSeq(16)),
            have_epoch: Some(Epoch(3)),
            lost_regions: Some(vec![(VolumeId(1), 0), (VolumeId(1), 3), (VolumeId(2), 1)]),
            resume: 1,
        },
        SiteMessage::Resume {
            group,
            have: Some(DeltaSeq(16)),
            have_epoch: Some(Epoch(3)),
            lost_regions: None,
            resume: 2,
        },
        SiteMessage::Resume {
            group,
            have: None,
            have_epoch: None,
            lost_regions: None,
            resume: u64::MAX,
        },
        SiteMessage::Resync {
            group,
            blocks: vec![(key(1, 256), data(5)), (key(1, 300), BlockImage::Zero)],
            last: false,
            base: DeltaSeq(16),
            consistent_at: DeltaSeq(20),
            consistent_epoch: Some(Epoch(3)),
            resume: 1,
        },
        SiteMessage::Resync {
            group,
            blocks: Vec::new(),
            last: true,
            base: DeltaSeq(20),
            consistent_at: DeltaSeq(20),
            consistent_epoch: None,
            resume: 1 << 40,
        },
        SiteMessage::ResyncAck {
            group,
            resume: 1 << 40,
        },
        SiteMessage::Rejoin { group },
        SiteMessage::ReadRequest {
            id: 1,
            request: requests().remove(0),
            have: Some(DeltaSeq(15)),
        },
        SiteMessage::ReadRequest {
            id: 2,
            request: requests().remove(0),
            have: None,
        },
        SiteMessage::ReadReply {
            id: 1,
            result: Ok(vec![(key(3, 1), data(9)), (key(3, 2), BlockImage::Zero)]),
        },
        SiteMessage::ReadReply {
            id: 2,
            result: Ok(Vec::new()),
        },
        SiteMessage::ForwardReply {
            id: 3,
            result: Ok(Response::Done),
        },
        SiteMessage::LeaseRequest {
            id: 5,
            volume: VolumeId(2),
            first_region: 7,
            regions: 2,
            have: DeltaSeq(15),
        },
        SiteMessage::LeaseReply {
            id: 5,
            lease_ms: 2000,
        },
        SiteMessage::LeaseReply { id: 6, lease_ms: 0 },
        SiteMessage::LeaseRevoke {
            id: 1,
            group,
            regions: vec![(VolumeId(1), 0), (VolumeId(1), 3), (VolumeId(2), 1)],
            all: false,
        },
        SiteMessage::LeaseRevoke {
            id: 2,
            group,
            regions: Vec::new(),
            all: true,
        },
        SiteMessage::LeaseRevoked { id: 2 },
        SiteMessage::ForwardReply {
            id: 4,
            result: Ok(Response::Data(Bytes::from_static(b"read at the owner"))),
        },
    ];
    for (id, request) in (10..).zip(requests()) {
        samples.push(SiteMessage::Forward { id, request });
    }
    for (id, error) in (20..).zip(errors()) {
        samples.push(SiteMessage::ReadReply {
            id,
            result: Err(error.clone()),
        });
        samples.push(SiteMessage::ForwardReply {
            id,
            result: Err(error),
        });
    }
    samples
}

/// Names the variant, and the variants inside it; a new variant anywhere
/// does not compile here until it is named, and then
/// [`samples_cover_every_variant`] wants a sample of it.
fn variants(message: &SiteMessage) -> Vec<String> {
    fn request(request: &Request) -> &'static str {
        match request {
            Request::Read { .. } => "Read",
            Request::ReadSnapshot { .. } => "ReadSnapshot",
            Request::Write { .. } => "Write",
            Request::WriteZeroes { .. } => "WriteZeroes",
            Request::Trim { .. } => "Trim",
            Request::Flush { .. } => "Flush",
        }
    }
    fn error(error: &RequestError) -> &'static str {
        match error {
            RequestError::NoVolume(_) => "NoVolume",
            RequestError::OutOfRange { .. } => "OutOfRange",
            RequestError::TooLarge { .. } => "TooLarge",
            RequestError::Io(_) => "Io",
            RequestError::Failed(_) => "Failed",
        }
    }
    fn images(blocks: &[(BlockKey, BlockImage)]) -> Vec<&'static str> {
        blocks
            .iter()
            .map(|(_, image)| match image {
                BlockImage::Data(_) => "Data",
                BlockImage::Zero => "Zero",
            })
            .collect()
    }
    let (name, inner): (&str, Vec<&str>) = match message {
        SiteMessage::Delta(record) => ("Delta", images(&record.blocks)),
        SiteMessage::Deltas { record, .. } => ("Deltas", images(&record.blocks)),
        SiteMessage::Journaled { .. } => ("Journaled", Vec::new()),
        SiteMessage::Applied { .. } => ("Applied", Vec::new()),
        SiteMessage::Resume { have, .. } => ("Resume", vec![some(have)]),
        SiteMessage::Resync { blocks, last, .. } => {
            let mut inner = images(blocks);
            inner.push(if *last { "last" } else { "more" });
            ("Resync", inner)
        }
        SiteMessage::ResyncAck { .. } => ("ResyncAck", Vec::new()),
        SiteMessage::Rejoin { .. } => ("Rejoin", Vec::new()),
        SiteMessage::ReadRequest {
            request: r, have, ..
        } => ("ReadRequest", vec![request(r), some(have)]),
        SiteMessage::ReadReply { result, .. } => match result {
            Ok(blocks) => ("ReadReply", [vec!["Ok"], images(blocks)].concat()),
            Err(e) => ("ReadReply", vec![error(e)]),
        },
        SiteMessage::Forward { request: r, .. } => ("Forward", vec![request(r)]),
        SiteMessage::LeaseRequest { .. } => ("LeaseRequest", Vec::new()),
        SiteMessage::LeaseReply { lease_ms, .. } => (
            "LeaseReply",
            vec![if *lease_ms > 0 { "granted" } else { "refused" }],
        ),
        SiteMessage::LeaseRevoke { all, .. } => {
            ("LeaseRevoke", vec![if *all { "all" } else { "regions" }])
        }
        SiteMessage::LeaseRevoked { .. } => ("LeaseRevoked", Vec::new()),
        SiteMessage::ForwardReply { result, .. } => match result {
            Ok(Response::Done) => ("ForwardReply", vec!["Done"]),
            Ok(Response::Data(_)) => ("ForwardReply", vec!["Data"]),
            Err(e) => ("ForwardReply", vec![error(e)]),
        },
    };
    let mut all = vec![name.to_string()];
    all.extend(inner.into_iter().map(|inner| format!("{name} {inner}")));
    all
}

fn some<T>(option: &Option<T>) -> &'static str {
    if option.is_some() { "Some" } else { "None" }
}

#[test]
fn samples_cover_every_variant() {
    let covered: std::collections::BTreeSet<String> = samples().iter().flat_map(variants).collect();
    let mut want = vec![
        "Delta Data",
        "Delta Zero",
        "Journaled",
        "Applied",
        "Resume Some",
        "Resume None",
        "Resync Data",
        "Resync Zero",
        "Resync last",
        "Resync more",
        "ResyncAck",
        "Rejoin",
        "ReadRequest Read",
        "ReadRequest Some",
        "ReadRequest None",
        "ReadReply Ok",
        "ReadReply Data",
        "ReadReply Zero",
        "ForwardReply Done",
        "ForwardReply Data",
        "LeaseRequest",
        "LeaseReply granted",
        "LeaseReply refused",
        "LeaseRevoke all",
        "LeaseRevoke regions",
        "LeaseRevoked",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    for request in [
        "Read",
        "ReadSnapshot",
        "Write",
        "WriteZeroes",
        "Trim",
        "Flush",
    ] {
        want.push(format!("Forward {request}"));
    }
    for error in ["NoVolume", "OutOfRange", "TooLarge", "Io", "Failed"] {
        want.push(format!("ReadReply {error}"));
        want.push(format!("ForwardReply {error}"));
    }
    let missing: Vec<&String> = want.iter().filter(|w| !covered.contains(*w)).collect();
    assert!(missing.is_empty(), "no sample of {missing:?}");
}

/// What arrives at the other site.
fn across(message: &SiteMessage) -> SiteMessage {
    across_with(message, Compression::Lz4)
}

fn across_with(message: &SiteMessage, compression: Compression) -> SiteMessage {
    let sent = PeerMessage::from_site(message, compression).expect("converts");
    let frame = encode_frame(&sent).expect("encodes");
    let received = decode_frame(&frame).expect("decodes");
    assert_eq!(received, sent);
    received
        .into_site()
        .expect("converts back")
        .expect("an engine message")
}

#[test]
fn every_site_message_round_trips() {
    for message in samples() {
        for compression in [Compression::Off, Compression::Lz4] {
            assert_eq!(across_with(&message, compression), message);
        }
    }
}

#[test]
fn blocks_that_compress_travel_compressed_only_where_the_link_says_so() {
    let text: Vec<u8> = b"a compressible block of a guest's file system. "
        .iter()
        .copied()
        .cycle()
        .take(BLOCK_SIZE)
        .collect();
    let delta = SiteMessage::Delta(DeltaRecord {
        position: JournalPosition(0),
        group: GroupId(1),
        epoch: Epoch(1),
        seq: DeltaSeq(1),
        blocks: vec![(key(1, 0), BlockImage::Data(Bytes::from(text)))],
    });
    let payload = |compression| match PeerMessage::from_site(&delta, compression) {
        Ok(PeerMessage::Delta { blocks, .. }) => blocks[0].payload.clone(),
        other => panic!("a delta: {other:?}"),
    };
    let WirePayload::Lz4(compressed) = payload(Compression::Lz4) else {
        panic!("text travels raw on a compressing link");
    };
    assert!(
        compressed.len() < BLOCK_SIZE / 4,
        "{} bytes",
        compressed.len()
    );
    assert!(matches!(payload(Compression::Off), WirePayload::Raw(_)));
    assert_eq!(across(&delta), delta);
}

#[test]
fn a_delta_arrives_without_the_senders_journal_position() {
    let SiteMessage::Delta(record) = samples().remove(0) else {
        panic!("the first sample is a delta");
    };
    let sent = SiteMessage::Delta(DeltaRecord {
        position: JournalPosition(4711),
        ..record.clone()
    });
    assert_eq!(across(&sent), SiteMessage::Delta(record));
}

#[test]
fn a_strict_read_carries_only_a_read() {
    for request in requests().into_iter().skip(1) {
        let message = SiteMessage::ReadRequest {
            id: 1,
            request,
            have: None,
        };
        assert!(
            matches!(
                PeerMessage::from_site(&message, Compression::Lz4),
                Err(WireError::Invalid(_))
            ),
            "{message:?} converted"
        );
    }
}

#[test]
fn hello_and_metadata_messages_are_not_the_engines() {
    for message in [
        PeerMessage::Hello {
            protocol: PROTOCOL_VERSION,
            cluster: "c".into(),
            node: "a1".into(),
            site: "a".into(),
        },
        PeerMessage::RaftRequest {
            request: 1,
            body: br#"{"Vote":{"term":1}}"#.to_vec(),
        },
        PeerMessage::RaftReply {
            request: 1,
            body: br#"{"Ok":null}"#.to_vec(),
        },
    ] {
        assert_eq!(message.into_site(), Ok(None));
    }
}

/// A message built by hand, not decoded, still cannot hand the engine a
/// short block or unsorted keys.
#[test]
fn a_message_breaking_the_rules_does_not_reach_the_engine() {
    let short = PeerMessage::Delta {
        group: 1,
        epoch: 1,
        first: 1,
        seq: 1,
        blocks: vec![WireBlock {
            volume: 1,
            block: 0,
            payload: WirePayload::Raw(vec![0; 512]),
        }],
    };
    assert!(matches!(short.into_site(), Err(WireError::Invalid(_))));
    let unsorted = PeerMessage::ReadReply {
        id: 1,
        result: Ok(vec![
            WireBlock {
                volume: 1,
                block: 2,
                payload: WirePayload::Zero,
            },
            WireBlock {
                volume: 1,
                block: 1,
                payload: WirePayload::Zero,
            },
        ]),
    };
    assert!(matches!(unsorted.into_site(), Err(WireError::Invalid(_))));
    let unnumbered = PeerMessage::RaftRequest {
        request: 0,
        body: b"{}".to_vec(),
    };
    assert!(matches!(unnumbered.into_site(), Err(WireError::Invalid(_))));
    let empty = PeerMessage::RaftReply {
        request: 1,
        body: Vec::new(),
    };
    assert!(matches!(empty.into_site(), Err(WireError::Invalid(_))));
}

#[test]
fn received_data_is_not_copied_into_the_engines_message() {
    let block = vec![7; BLOCK_SIZE];
    let block_at = block.as_ptr();
    let delta = PeerMessage::Delta {
        group: 1,
        epoch: 1,
        first: 1,
        seq: 1,
        blocks: vec![WireBlock {
            volume: 1,
            block: 0,
            payload: WirePayload::Raw(block),
        }],
    };
    let Ok(Some(SiteMessage::Delta(record))) = delta.into_site() else {
        panic!("a delta");
    };
    let BlockImage::Data(data) = &record.blocks[0].1 else {
        panic!("a data block");
    };
    assert_eq!(data.as_ptr(), block_at);

    let read = vec![1; 100];
    let read_at = read.as_ptr();
    let reply = PeerMessage::ForwardReply {
        id: 1,
        result: Ok(WireResponse::Data(read)),
    };
    let Ok(Some(SiteMessage::ForwardReply {
        result: Ok(Response::Data(data)),
        ..
    })) = reply.into_site()
    else {
        panic!("a forwarded read's data");
    };
    assert_eq!(data.as_ptr(), read_at);
}

/// A delta of `blocks` blocks that do not compress (as encrypted guest
/// data would not).
fn incompressible_delta(blocks: u64) -> SiteMessage {
    SiteMessage::Delta(DeltaRecord {
        position: JournalPosition(0),
        group: GroupId(1),
        epoch: Epoch(1),
        seq: DeltaSeq(1),
        blocks: (0..blocks)
            .map(|block| {
                let mut state = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let bytes: Vec<u8> = (0..BLOCK_SIZE)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state >> 24) as u8
                    })
                    .collect();
                (key(1, block), BlockImage::Data(Bytes::from(bytes)))
            })
            .collect(),
    })
}

#[test]
fn the_largest_delta_record_fits_one_frame() {
    let frame_bytes = |blocks: u64| {
        let message = PeerMessage::from_site(&incompressible_delta(blocks), Compression::Lz4)
            .expect("converts");
        encode_frame(&message).map(|frame| frame.len())
    };
    let largest = DELTA_RECORD_BYTES_MAX / BLOCK_SIZE as u64;
    let fits = frame_bytes(largest).expect("a record of DELTA_RECORD_BYTES_MAX is framed");
    assert!(fits <= FRAME_BYTES_MAX as usize + 4, "{fits} bytes");
    // What the engine's bound prevents: an 8 MiB delta one block short of
    // full, plus a 32 MiB request, in one record.
    let joined = largest + (8 << 20) / BLOCK_SIZE as u64 - 1;
    assert!(matches!(
        frame_bytes(joined),
        Err(WireError::FrameTooLarge(_))
    ));
}
