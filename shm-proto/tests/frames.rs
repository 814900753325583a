//! Frame codec: every frame type round-trips; arbitrary bytes are rejected, never a panic; hostile
//! paths are refused; the fuzz corpus decodes without panicking.
#![cfg(not(loom))]

use proptest::prelude::*;
use shmback_proto::frame::{self, FrameHeader, PathProblem, abort_code, validate_path};
use shmback_proto::{BatchDecoder, Begin, CodecError, Entry, EntryKind, Frame, FrameKind, Labels};

fn label() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _.:/=-]{0,40}"
}

fn component() -> impl Strategy<Value = Vec<u8>> {
    // Any bytes but '/' and NUL, not "." or "..": non-UTF-8 names included.
    proptest::collection::vec(any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0), 1..20)
        .prop_filter("not . or ..", |c| c != b"." && c != b"..")
}

fn path() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(component(), 1..6).prop_map(|cs| cs.join(&b'/'))
}

fn entry() -> impl Strategy<Value = Entry> {
    (path(), 0u8..3, any::<u64>(), any::<bool>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<i64>(), path())
        .prop_map(|(path, k, size, known, mode, uid, gid, mtime_ns, target)| {
            let kind = [EntryKind::File, EntryKind::Dir, EntryKind::Symlink][k as usize];
            let size = match kind {
                EntryKind::File if !known => None,
                _ => Some(size),
            };
            let target = if kind == EntryKind::Symlink { target } else { Vec::new() };
            Entry { path, kind, size, mode, uid, gid, mtime_ns, target }
        })
}

fn any_frame() -> impl Strategy<Value = Frame<'static>> {
    prop_oneof![
        (
            any::<u64>(),
            proptest::option::of(label()),
            proptest::collection::vec(label(), 0..5),
            proptest::collection::vec((label(), label()), 0..5)
        )
            .prop_map(|(seq, host, tags, meta)| Frame::Begin(Begin { seq, labels: Labels { host, tags, meta } })),
        entry().prop_map(Frame::Entry),
        any::<u64>().prop_map(|entries| Frame::EndOfManifest { entries }),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|d| Frame::Data(Box::leak(d.into_boxed_slice()))),
        any::<u64>().prop_map(|len| Frame::EndOfFile { len }),
        (any::<u64>(), any::<u64>()).prop_map(|(entries, bytes)| Frame::Commit { entries, bytes }),
        (any::<u32>(), label()).prop_map(|(code, reason)| Frame::Abort { code, reason }),
    ]
}

proptest! {
    #[test]
    fn every_frame_round_trips(f in any_frame()) {
        let bytes = f.encode_to_vec().unwrap();
        prop_assert_eq!(bytes.len(), f.encoded_len());
        let back = frame::decode(f.kind() as u8, &bytes).unwrap();
        prop_assert_eq!(back, f);
    }

    #[test]
    fn arbitrary_payloads_never_panic(kind in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..200)) {
        // Whatever the bytes, decode returns Ok or Err; feeding the result to a decoder too.
        let mut dec = BatchDecoder::new();
        if let Ok(f) = frame::decode(kind, &payload) {
            let _ = dec.feed(f);
        }
    }

    #[test]
    fn truncated_frames_are_rejected(f in any_frame(), cut in 1usize..16) {
        prop_assume!(!matches!(f, Frame::Data(_)));
        let bytes = f.encode_to_vec().unwrap();
        prop_assume!(cut <= bytes.len());
        let short = &bytes[..bytes.len() - cut];
        let decoded = frame::decode(f.kind() as u8, short);
        prop_assert!(decoded.is_err(), "decoded a frame with {} bytes cut: {:?}", cut, decoded);
    }

    #[test]
    fn header_round_trips(len in any::<u32>(), kind in 1u8..9) {
        let h = FrameHeader::new(FrameKind::from_u8(kind).unwrap(), len);
        prop_assert_eq!(FrameHeader::read(&h.to_bytes()), Some(h));
    }
}

#[test]
fn hostile_paths_are_refused() {
    let cases: &[(&[u8], PathProblem)] = &[
        (b"", PathProblem::Empty),
        (b"/etc/passwd", PathProblem::Absolute),
        (b"../x", PathProblem::DotDot),
        (b"a/../../x", PathProblem::DotDot),
        (b"a/..", PathProblem::DotDot),
        (b"./a", PathProblem::Dot),
        (b"a//b", PathProblem::EmptyComponent),
        (b"a/", PathProblem::EmptyComponent),
        (b"a\0b", PathProblem::Nul),
    ];
    for (p, why) in cases {
        assert_eq!(validate_path(p), Err(*why), "{:?}", String::from_utf8_lossy(p));
        let e = Entry {
            path: p.to_vec(),
            kind: EntryKind::File,
            size: Some(0),
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            target: vec![],
        };
        // Refused when encoding...
        assert!(matches!(Frame::Entry(e.clone()).encode_to_vec(), Err(CodecError::Path { .. })));
        // ...and when a hostile producer writes it anyway.
        let mut raw = Frame::Entry(Entry { path: b"x".to_vec(), ..e }).encode_to_vec().unwrap();
        raw.truncate(raw.len() - 1);
        raw[32..34].copy_from_slice(&(p.len() as u16).to_le_bytes());
        raw.extend_from_slice(p);
        assert!(matches!(frame::decode(FrameKind::Entry as u8, &raw), Err(CodecError::Path { .. })), "{p:?}");
    }
    assert_eq!(validate_path(&vec![b'a'; 256]), Err(PathProblem::NameTooLong));
    assert_eq!(validate_path(&[b"a/".repeat(2048), b"b".to_vec()].concat()), Err(PathProblem::TooLong));
    assert_eq!(validate_path("données/é\u{1F600}".as_bytes()), Ok(()));
    assert_eq!(validate_path(b"\xff\xfe/name"), Ok(()));
}

#[test]
fn unknown_kinds_versions_and_trailing_bytes_are_rejected() {
    assert_eq!(frame::decode(0, b""), Err(CodecError::UnknownKind(0)));
    assert_eq!(frame::decode(99, b""), Err(CodecError::UnknownKind(99)));
    assert!(matches!(frame::decode(FrameKind::Padding as u8, b""), Err(CodecError::Invalid { .. })));
    let mut eom = Frame::EndOfManifest { entries: 3 }.encode_to_vec().unwrap();
    eom.push(0);
    assert_eq!(
        frame::decode(FrameKind::EndOfManifest as u8, &eom),
        Err(CodecError::Trailing { frame: FrameKind::EndOfManifest, extra: 1 })
    );
    // Unknown-size entries must carry a zero size field; unknown flags are refused.
    let stream = Entry {
        path: b"db.sql".to_vec(),
        kind: EntryKind::File,
        size: None,
        mode: 0o600,
        uid: 1,
        gid: 1,
        mtime_ns: 1,
        target: vec![],
    };
    let mut raw = Frame::Entry(stream).encode_to_vec().unwrap();
    raw[20] = 1;
    assert!(matches!(frame::decode(FrameKind::Entry as u8, &raw), Err(CodecError::Invalid { .. })));
    raw[20] = 0;
    raw[1] = 0x80;
    assert!(matches!(frame::decode(FrameKind::Entry as u8, &raw), Err(CodecError::Invalid { .. })));
    // Labels over the limits are refused on both sides.
    let big = Frame::Begin(Begin { seq: 1, labels: Labels { host: Some("h".repeat(2000)), ..Default::default() } });
    assert!(matches!(big.encode_to_vec(), Err(CodecError::Invalid { .. })));
    let reason = Frame::Abort { code: abort_code::CANCELLED, reason: "é".repeat(5000) };
    let bytes = reason.encode_to_vec().unwrap();
    match frame::decode(FrameKind::Abort as u8, &bytes).unwrap() {
        Frame::Abort { reason, .. } => assert!(reason.len() <= frame::MAX_REASON_LEN && reason.starts_with('é')),
        other => panic!("decoded {other:?}"),
    }
}

#[test]
fn fuzz_corpus_replays_without_panicking() {
    // The corpus cargo-fuzz grew (shm-proto/fuzz/corpus/*), through the same harnesses as the targets.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, harness) in [
        ("decode", shmback_proto::fuzzing::decode_stream as fn(&[u8])),
        ("ring", shmback_proto::fuzzing::read_hostile_ring),
        ("manifest", shmback_proto::fuzzing::manifest_stream),
    ] {
        let mut n = 0;
        for f in std::fs::read_dir(root.join(target)).expect("fuzz corpus is checked in") {
            harness(&std::fs::read(f.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n >= 10, "{target} corpus has only {n} inputs");
    }
}
