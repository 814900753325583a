//! Harnesses shared by the cargo-fuzz targets and the tests that replay their corpus.
//! Not part of the API.

use std::sync::Arc;

use crate::batch::BatchDecoder;
use crate::frame;
use crate::model::HeapMemory;
use crate::ring::{Consumer, RingConfig};

/// Treats `data` as a stream of `[kind: u8][len: u16 LE][payload]` records, decodes each and
/// feeds the frames to a [`BatchDecoder`]. Must never panic.
pub fn decode_stream(data: &[u8]) {
    let mut dec = BatchDecoder::new();
    let mut rest = data;
    while let [kind, l0, l1, tail @ ..] = rest {
        let len = (u16::from_le_bytes([*l0, *l1]) as usize).min(tail.len());
        let (payload, next) = tail.split_at(len);
        if let Ok(f) = frame::decode(*kind, payload) {
            let _ = dec.feed(f);
        }
        rest = next;
    }
}

/// Copies `data` into a 4 KiB heap ring as if a hostile producer had written it, publishes a
/// head derived from the first 8 bytes, and reads every frame the consumer will give. Must never
/// panic; every outcome is a frame or an error.
pub fn read_hostile_ring(data: &[u8]) {
    let mem = Arc::new(HeapMemory::new(4096));
    let (head_bytes, body) = data.split_at(data.len().min(8));
    let mut h = [0u8; 8];
    h[..head_bytes.len()].copy_from_slice(head_bytes);
    {
        // SAFETY: no other party uses this memory yet; the range is inside the ring.
        let mut w = unsafe { crate::ring::Memory::write(&*mem, 0, body.len().min(4096)) };
        w.copy_from_slice(&body[..body.len().min(4096)]);
    }
    crate::ring::Memory::shared(&*mem).head.store(u64::from_le_bytes(h), std::sync::atomic::Ordering::Release);
    let mut c = Consumer::new(mem, RingConfig::default());
    let mut dec = BatchDecoder::new();
    for _ in 0..1024 {
        match c.peek() {
            Ok(Some(f)) => {
                if let Ok(fr) = f.decode() {
                    let _ = dec.feed(fr);
                }
                f.release();
            }
            Ok(None) | Err(_) => break,
        }
    }
}

/// Reads fuzz bytes as numbers; zeros once they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let t = self.take(8);
        b[..t.len()].copy_from_slice(t);
        u64::from_le_bytes(b)
    }
}

/// Path components a hostile producer would try: plain, ordering traps (`a-b` sorts between `a`
/// and `a/b` bytewise but not by components), dot components, empty, NUL, a slash inside, a
/// non-UTF-8 byte, an over-long name.
fn component(b: &mut Bytes<'_>) -> Vec<u8> {
    match b.u8() % 12 {
        0 => b"a".to_vec(),
        1 => b"b".to_vec(),
        2 => b"a-b".to_vec(),
        3 => b"..".to_vec(),
        4 => b".".to_vec(),
        5 => Vec::new(),
        6 => b"x\0y".to_vec(),
        7 => b"d/e".to_vec(),
        8 => vec![0xff, 0xfe],
        9 => vec![b'n'; 256],
        10 => "é".as_bytes().to_vec(),
        _ => {
            let n = usize::from(b.u8() % 16);
            b.take(n).to_vec()
        }
    }
}

fn hostile_path(b: &mut Bytes<'_>) -> Vec<u8> {
    let mut p = Vec::new();
    if b.u8().is_multiple_of(8) {
        p.push(b'/');
    }
    for i in 0..(b.u8() % 5) {
        if i > 0 {
            p.push(b'/');
        }
        p.extend(component(b));
    }
    if b.u8().is_multiple_of(16) {
        p.push(b'/');
    }
    p
}

/// An ENTRY payload with every field from the fuzzer: kind and flags bytes as they come (valid
/// ones most of the time), reserved bits, sizes, and length fields that may disagree with the
/// bytes that follow.
fn hostile_entry(b: &mut Bytes<'_>) -> Vec<u8> {
    let sel = b.u8();
    let kind = match sel % 5 {
        0 | 1 => 1,
        2 => 2,
        3 => 3,
        _ => b.u8(),
    };
    let flags = if sel & 0x80 != 0 { b.u8() } else { (sel >> 3) & 1 };
    let reserved = if sel & 0x40 != 0 { b.u16() } else { 0 };
    let mode = if sel & 0x20 != 0 { b.u64() as u32 } else { 0o100644 };
    let size = match b.u8() % 4 {
        0 => 0,
        1 => u64::from(b.u8()),
        2 => u64::MAX,
        _ => b.u64(),
    };
    let path = hostile_path(b);
    let target = if kind == 3 || b.u8().is_multiple_of(8) { hostile_path(b) } else { Vec::new() };
    let (mut path_len, mut target_len) = (path.len() as u16, target.len() as u16);
    if b.u8().is_multiple_of(16) {
        path_len = path_len.wrapping_add(b.u16());
    }
    if b.u8().is_multiple_of(16) {
        target_len = target_len.wrapping_add(b.u16());
    }
    let mut e = vec![kind, flags];
    e.extend(reserved.to_le_bytes());
    e.extend(mode.to_le_bytes());
    e.extend(1000u32.to_le_bytes());
    e.extend(1000u32.to_le_bytes());
    e.extend(size.to_le_bytes());
    e.extend(1_700_000_000_000_000_000i64.to_le_bytes());
    e.extend(path_len.to_le_bytes());
    e.extend(target_len.to_le_bytes());
    e.extend(path);
    e.extend(target);
    e
}

/// The manifest phase of the batch state machine under a hostile producer: a valid BEGIN, then
/// frames chosen by `data` — ENTRY frames built field by field ([`hostile_entry`]),
/// END_OF_MANIFEST with the right or a wrong count, DATA, COMMIT, another BEGIN, WANT and WANTED
/// (with the published want-list, "everything" or anything; a want-list is answered at the
/// manifest's end, and DATA is accepted only for wanted files), and garbage
/// frames of any kind byte — each decoded with [`frame::decode`] and fed to a [`BatchDecoder`],
/// the path every frame takes in the uploader. Must never panic, and what the decoder accepts
/// must hold: entry paths relative, without empty, `.` or `..` components or NUL, strictly
/// increasing; an accepted END_OF_MANIFEST counts exactly the entries accepted since BEGIN.
pub fn manifest_stream(data: &[u8]) {
    use crate::batch::Event;
    use crate::frame::{Begin, Frame, FrameKind, Labels};
    use std::os::unix::ffi::OsStrExt;

    let mut b = Bytes(data);
    let mut dec = BatchDecoder::new();
    let begin = |seq| Frame::Begin(Begin { seq, labels: Labels::default() }).encode_to_vec().expect("valid BEGIN");
    let mut seq = 1;
    let mut frames: Vec<(u8, Vec<u8>)> = vec![(FrameKind::Begin as u8, begin(seq))];
    let (kind, payload) = &frames[0];
    dec.feed(frame::decode(*kind, payload).expect("valid BEGIN")).expect("a BEGIN opens a batch");
    let mut entries = 0u64;
    let mut prev: Option<Vec<u8>> = None;
    let mut answered: Option<crate::want::WantList> = None;
    let path = |p: &[u8]| std::path::Path::new(std::ffi::OsStr::from_bytes(p)).to_path_buf();
    while !b.0.is_empty() {
        match b.u8() % 12 {
            0..=4 => frames.push((FrameKind::Entry as u8, hostile_entry(&mut b))),
            10 => frames.push((FrameKind::Want as u8, Vec::new())),
            11 => {
                // WANTED naming the list the consumer published, "everything", or anything.
                let (covered, digest) = match (b.u8() % 3, &answered) {
                    (0, Some(l)) => (l.covered(), l.digest()),
                    (1, _) => (0, 0),
                    _ => (b.u64(), b.u64()),
                };
                let mut p = covered.to_le_bytes().to_vec();
                p.extend(digest.to_le_bytes());
                frames.push((FrameKind::Wanted as u8, p));
            }
            5 => {
                let n = if b.u8() % 4 == 0 { b.u64() } else { entries };
                frames.push((FrameKind::EndOfManifest as u8, n.to_le_bytes().to_vec()));
            }
            6 => {
                let n = usize::from(b.u8());
                frames.push((FrameKind::Data as u8, b.take(n).to_vec()));
            }
            7 => {
                let mut p = b.u64().to_le_bytes().to_vec();
                p.extend(b.u64().to_le_bytes());
                frames.push((FrameKind::Commit as u8, p));
            }
            8 => {
                seq += 1;
                frames.push((FrameKind::Begin as u8, begin(seq)));
            }
            _ => {
                let kind = b.u8();
                let n = usize::from(b.u8());
                frames.push((kind, b.take(n).to_vec()));
            }
        }
        // Feed as we go, so `entries` (the right END_OF_MANIFEST count) tracks the decoder.
        let (kind, payload) = frames.last().expect("pushed");
        let Ok(frame) = frame::decode(*kind, payload) else { continue };
        match dec.feed(frame) {
            Ok(Event::Begin { .. }) | Err(_) => {
                entries = 0;
                prev = None;
            }
            Ok(Event::Entry { index, entry }) => {
                assert_eq!(index, entries, "entry index");
                let p = &entry.path;
                assert!(!p.is_empty() && !p.starts_with(b"/") && !p.contains(&0), "accepted path {p:?}");
                assert!(
                    p.split(|c| *c == b'/').all(|c| !c.is_empty() && c != b"." && c != b".."),
                    "accepted path {p:?}"
                );
                if let Some(prev) = &prev {
                    assert!(path(prev) < path(p), "accepted {p:?} after {prev:?}");
                }
                prev = Some(p.clone());
                entries += 1;
            }
            Ok(Event::EndOfManifest { entries: n, files }) => {
                assert_eq!(n, entries, "END_OF_MANIFEST accepted with a wrong count");
                assert!(files <= n);
                if dec.want_asked() {
                    // The consumer's answer: a list over some of the files, bits from the input.
                    let mut list = crate::want::WantList::none_of(files.min(u64::from(b.u8())));
                    (0..list.covered()).filter(|_| b.u8() % 2 == 0).for_each(|f| list.want(f));
                    dec.answer_want(list.clone());
                    answered = Some(list);
                }
            }
            Ok(Event::Data { file, .. }) => {
                assert!(dec.file_wanted(file), "data accepted for file {file}, which the want-list left out");
            }
            Ok(_) => {}
        }
    }
}
