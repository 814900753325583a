//! The batch state machine: valid batches pass with the right events; every kind of inconsistent
//! or hostile batch is rejected and the decoder recovers at the next BEGIN.
#![cfg(not(loom))]

use shmback_proto::batch::Event;
use shmback_proto::{BatchDecoder, Begin, Entry, EntryKind, Frame, Labels};

fn begin(seq: u64) -> Frame<'static> {
    Frame::Begin(Begin { seq, labels: Labels { host: Some("h".into()), tags: vec!["t".into()], meta: vec![] } })
}

fn file(path: &str, size: Option<u64>) -> Frame<'static> {
    Frame::Entry(Entry {
        path: path.as_bytes().to_vec(),
        kind: EntryKind::File,
        size,
        mode: 0o100644,
        uid: 1000,
        gid: 1000,
        mtime_ns: 1_700_000_000_000_000_000,
        target: vec![],
    })
}

fn dir(path: &str) -> Frame<'static> {
    Frame::Entry(Entry {
        path: path.as_bytes().to_vec(),
        kind: EntryKind::Dir,
        size: Some(0),
        mode: 0o40755,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        target: vec![],
    })
}

/// Feeds frames, returning the events or the first error.
fn run(frames: Vec<Frame<'static>>) -> Result<Vec<String>, String> {
    let mut d = BatchDecoder::new();
    let mut out = vec![];
    for f in frames {
        let ev = d.feed(f).map_err(|e| e.to_string())?;
        out.push(match ev {
            Event::Begin { begin, interrupted } => format!("begin {} {:?}", begin.seq, interrupted),
            Event::Entry { index, entry } => format!("entry {index} {}", String::from_utf8_lossy(&entry.path)),
            Event::EndOfManifest { entries, files } => format!("eom {entries} {files}"),
            Event::Data { file, bytes, last } => format!("data {file} {} {last}", bytes.len()),
            Event::EndOfFile { file, len } => format!("eof {file} {len}"),
            Event::Commit { seq, entries, bytes } => format!("commit {seq} {entries} {bytes}"),
            Event::Abort { seq, code, .. } => format!("abort {seq} {code}"),
            Event::Skipped(k) => format!("skip {k:?}"),
            Event::WantAsked => "want".to_string(),
            Event::Wanted { covered } => format!("wanted {covered}"),
        });
    }
    Ok(out)
}

#[test]
fn a_valid_batch_with_known_unknown_and_empty_files() {
    let events = run(vec![
        begin(7),
        dir("a"),
        file("a/b", Some(5)),
        file("a/c", Some(0)),
        dir("a/d"),
        file("a/d/e", None),
        file("a/z", Some(3)),
        file("b", None),
        Frame::EndOfManifest { entries: 7 },
        Frame::Data(b"hel"),
        Frame::Data(b"lo"),
        Frame::Data(b"dump"),
        Frame::EndOfFile { len: 4 },
        Frame::Data(b"xyz"),
        Frame::EndOfFile { len: 0 },
        Frame::Commit { entries: 7, bytes: 12 },
    ])
    .unwrap();
    assert_eq!(
        events,
        [
            "begin 7 None",
            "entry 0 a",
            "entry 1 a/b",
            "entry 2 a/c",
            "entry 3 a/d",
            "entry 4 a/d/e",
            "entry 5 a/z",
            "entry 6 b",
            "eom 7 5",
            "data 0 3 false",
            "data 0 2 true",
            "data 2 4 false",
            "eof 2 4",
            "data 3 3 true",
            "eof 4 0",
            "commit 7 7 12",
        ]
    );
}

#[test]
fn depth_first_order_is_path_cmp_not_byte_order() {
    // Byte order would put "a-b" before "a/b" ('-' < '/'); Path::cmp compares components.
    run(vec![begin(1), dir("a"), file("a/b", Some(0)), file("a-b", Some(0)), Frame::EndOfManifest { entries: 3 }])
        .unwrap();
    let err = run(vec![begin(1), file("a-b", Some(0)), dir("a"), file("a/b", Some(0))]).unwrap_err();
    assert!(err.contains("out of order"), "{err}");
}

#[test]
fn inconsistent_batches_are_rejected() {
    let cases: Vec<(Vec<Frame<'static>>, &str)> = vec![
        (vec![begin(1), file("b", Some(0)), file("a", Some(0))], "out of order"),
        (vec![begin(1), file("a", Some(0)), file("a", Some(0))], "duplicate"),
        (vec![begin(1), file("a", Some(0)), file("a/b", Some(0))], "not a directory"),
        (vec![begin(1), file("a", Some(1)), Frame::EndOfManifest { entries: 2 }], "END_OF_MANIFEST says 2"),
        (vec![begin(1), Frame::Data(b"x")], "inside the manifest"),
        (
            vec![begin(1), file("a", Some(2)), Frame::EndOfManifest { entries: 1 }, Frame::Data(b"xyz")],
            "got 3 bytes, its entry says 2",
        ),
        (
            vec![
                begin(1),
                file("a", Some(1)),
                Frame::EndOfManifest { entries: 1 },
                Frame::Data(b"x"),
                Frame::Data(b"y"),
            ],
            "after the last file",
        ),
        (
            vec![
                begin(1),
                file("a", None),
                Frame::EndOfManifest { entries: 1 },
                Frame::Data(b"xy"),
                Frame::EndOfFile { len: 3 },
            ],
            "END_OF_FILE says 3",
        ),
        (
            vec![
                begin(1),
                file("a", Some(2)),
                Frame::EndOfManifest { entries: 1 },
                Frame::Data(b"x"),
                Frame::EndOfFile { len: 1 },
            ],
            "whose size is known",
        ),
        (
            vec![
                begin(1),
                file("a", Some(2)),
                Frame::EndOfManifest { entries: 1 },
                Frame::Data(b"x"),
                Frame::Commit { entries: 1, bytes: 1 },
            ],
            "COMMIT after 0 of 1 files",
        ),
        (
            vec![
                begin(1),
                file("a", Some(1)),
                Frame::EndOfManifest { entries: 1 },
                Frame::Data(b"x"),
                Frame::Commit { entries: 1, bytes: 9 },
            ],
            "COMMIT says 1 entries / 9 bytes",
        ),
        (
            vec![begin(1), Frame::EndOfManifest { entries: 0 }, Frame::EndOfManifest { entries: 0 }],
            "in the data section",
        ),
    ];
    for (frames, want) in cases {
        let err = run(frames).unwrap_err();
        assert!(err.contains(want), "expected {want:?} in {err:?}");
        assert!(err.starts_with("batch 1:"), "{err}");
    }
}

#[test]
fn after_an_error_the_decoder_skips_to_the_next_begin() {
    let mut d = BatchDecoder::new();
    d.feed(begin(1)).unwrap();
    d.feed(file("b", Some(0))).unwrap();
    assert!(d.feed(file("a", Some(0))).is_err());
    assert!(!d.in_batch());
    assert_eq!(d.feed(Frame::Data(b"junk")).unwrap(), Event::Skipped(shmback_proto::FrameKind::Data));
    assert!(matches!(d.feed(begin(2)).unwrap(), Event::Begin { interrupted: None, .. }));
    d.feed(Frame::EndOfManifest { entries: 0 }).unwrap();
    assert_eq!(d.feed(Frame::Commit { entries: 0, bytes: 0 }).unwrap(), Event::Commit { seq: 2, entries: 0, bytes: 0 });
}

#[test]
fn a_begin_inside_a_batch_tears_it_and_abort_ends_it() {
    let events = run(vec![
        begin(1),
        file("a", Some(9)),
        begin(2),
        Frame::Abort { code: 1, reason: "cancelled".into() },
        Frame::Abort { code: 1, reason: "stray".into() },
    ])
    .unwrap();
    assert_eq!(events, ["begin 1 None", "entry 0 a", "begin 2 Some(1)", "abort 2 1", "skip Abort"]);
}

/// Feeds a batch that asks for a want-list; the consumer answers with `answer` (files wanted of
/// the first `covered`) once the manifest is complete. Returns the events or the first error.
fn run_want(frames: Vec<Frame<'static>>, answer: Option<shmback_proto::WantList>) -> Result<Vec<String>, String> {
    let mut d = BatchDecoder::new();
    let mut out = vec![];
    for f in frames {
        let ev = d.feed(f).map_err(|e| e.to_string())?;
        let eom = matches!(ev, Event::EndOfManifest { .. });
        out.push(match ev {
            Event::Data { file, bytes, last } => format!("data {file} {} {last}", bytes.len()),
            Event::Commit { seq, entries, bytes } => format!("commit {seq} {entries} {bytes}"),
            Event::Wanted { covered } => format!("wanted {covered}"),
            Event::WantAsked => "want".to_string(),
            other => format!("{other:?}").chars().take(12).collect(),
        });
        if eom {
            assert!(d.want_asked());
            if let Some(a) = answer.clone() {
                d.answer_want(a);
            }
        }
    }
    Ok(out)
}

fn four_files_want() -> Vec<Frame<'static>> {
    vec![begin(9), Frame::Want, file("a", Some(2)), file("b", Some(3)), file("c", Some(0)), file("d", Some(4))]
}

#[test]
fn a_want_list_leaves_out_the_unwanted_files_data() {
    let mut list = shmback_proto::WantList::none_of(4);
    list.want(1);
    let mut frames = four_files_want();
    frames.extend([
        Frame::EndOfManifest { entries: 4 },
        Frame::Wanted { covered: 4, digest: list.digest() },
        Frame::Data(b"xyz"),
        Frame::Commit { entries: 4, bytes: 3 },
    ]);
    let ev = run_want(frames, Some(list)).unwrap();
    assert_eq!(ev[1], "want");
    assert_eq!(ev[7..], ["wanted 4", "data 1 3 true", "commit 9 4 3"]);
}

#[test]
fn a_list_shorter_than_the_files_wants_the_rest_and_covered_zero_wants_all() {
    let list = shmback_proto::WantList::none_of(2);
    let mut frames = four_files_want();
    frames.extend([
        Frame::EndOfManifest { entries: 4 },
        Frame::Wanted { covered: 2, digest: list.digest() },
        Frame::Data(b"zzzz"),
        Frame::Commit { entries: 4, bytes: 4 },
    ]);
    assert_eq!(run_want(frames, Some(list.clone())).unwrap()[7..], ["wanted 2", "data 3 4 true", "commit 9 4 4"]);
    // The producer may always fall back to sending everything (it timed out waiting).
    let mut frames = four_files_want();
    frames.extend([
        Frame::EndOfManifest { entries: 4 },
        Frame::Wanted { covered: 0, digest: 0 },
        Frame::Data(b"ab"),
        Frame::Data(b"abc"),
        Frame::Data(b"abcd"),
        Frame::Commit { entries: 4, bytes: 9 },
    ]);
    let ev = run_want(frames, Some(list)).unwrap();
    assert_eq!(ev[7..], ["wanted 0", "data 0 2 true", "data 1 3 true", "data 3 4 true", "commit 9 4 9"]);
}

#[test]
fn want_list_frames_out_of_place_or_naming_another_list_are_rejected() {
    let list = shmback_proto::WantList::none_of(4);
    // Another list than the one published.
    let mut frames = four_files_want();
    frames.extend([Frame::EndOfManifest { entries: 4 }, Frame::Wanted { covered: 3, digest: 1 }]);
    let e = run_want(frames, Some(list.clone())).unwrap_err();
    assert!(e.contains("the uploader published one of 4 files"), "{e}");
    // A list when none was published.
    let mut frames = four_files_want();
    frames.extend([Frame::EndOfManifest { entries: 4 }, Frame::Wanted { covered: 4, digest: list.digest() }]);
    let e = run_want(frames, None).unwrap_err();
    assert!(e.contains("never published"), "{e}");
    // DATA before WANTED.
    let mut frames = four_files_want();
    frames.extend([Frame::EndOfManifest { entries: 4 }, Frame::Data(b"ab")]);
    let e = run_want(frames, Some(list.clone())).unwrap_err();
    assert!(e.contains("before WANTED"), "{e}");
    // WANT after an entry; WANTED in a batch that did not ask.
    let e = run(vec![begin(1), file("a", Some(1)), Frame::Want]).unwrap_err();
    assert!(e.contains("not right after BEGIN"), "{e}");
    let e = run(vec![
        begin(1),
        file("a", Some(1)),
        Frame::EndOfManifest { entries: 1 },
        Frame::Wanted { covered: 0, digest: 0 },
    ])
    .unwrap_err();
    assert!(e.contains("Wanted frame in the data section"), "{e}");
}
