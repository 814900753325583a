//! The stream form of frames: batches in an HTTP body (PROTOCOL.md, "Over HTTP").
//!
//! A frame in a stream is laid out as in the ring — the 8-byte [`FrameHeader`], the payload,
//! zero padding to a multiple of [`FRAME_ALIGN`] — without wrap-around, so no PADDING frames.
//! A sender appends frames with [`encode_frame`] (or, for a DATA frame read straight from a file,
//! [`header_bytes`], the bytes, then [`padding`] zeros). A receiver pushes the body's bytes into
//! a [`FrameAssembler`] as they arrive and takes whole frames out; it never holds more than one
//! frame plus the last chunk pushed, and refuses an oversized frame from its header alone.
//!
//! ```
//! use shmback_proto::stream::{encode_frame, FrameAssembler, DEFAULT_MAX_FRAME};
//! use shmback_proto::{frame, Begin, Frame, Labels};
//!
//! let mut body = Vec::new();
//! encode_frame(&Frame::Begin(Begin { seq: 7, labels: Labels::default() }), &mut body).unwrap();
//! encode_frame(&Frame::Data(b"hello"), &mut body).unwrap();
//!
//! let mut asm = FrameAssembler::new(DEFAULT_MAX_FRAME);
//! let mut frames = Vec::new();
//! for chunk in body.chunks(5) {
//!     asm.push(chunk);
//!     while let Some((kind, payload)) = asm.peek().unwrap() {
//!         frames.push(frame::decode(kind, payload).unwrap().kind());
//!         asm.release();
//!     }
//! }
//! assert!(!asm.partial(), "the body ended on a frame boundary");
//! assert_eq!(frames.len(), 2);
//! ```

use crate::frame::{
    CODEC_VERSION, CodecError, FRAME_ALIGN, FRAME_HEADER_LEN, Frame, FrameHeader, FrameKind, MIN_CODEC_VERSION,
};

/// Content-Type of a body carrying frames.
pub const CONTENT_TYPE: &str = "application/vnd.shmback.frames.v1";
/// Header naming the producer a batch is from (lowercase: HTTP header names are case-insensitive).
pub const PRODUCER_HEADER: &str = "shmback-producer";
/// Where a producer pushes a batch (`POST`).
pub const PUSH_PATH: &str = "/v1/batches";
/// Where the uploader fetches a batch from a producer (`GET`).
pub const PULL_PATH: &str = "/v1/batch";
/// Where the uploader reports a pulled batch's outcome to the producer (`POST`).
pub const OUTCOME_PATH: &str = "/v1/outcome";
/// Largest frame payload a receiver takes by default (4 MiB; the writer's frames are far smaller).
pub const DEFAULT_MAX_FRAME: usize = 4 << 20;
/// Longest producer name ([`valid_producer_name`]).
pub const MAX_PRODUCER_LEN: usize = 128;

/// Zero bytes to copy padding from.
const ZEROS: [u8; FRAME_ALIGN] = [0; FRAME_ALIGN];

/// The header bytes of a frame of `kind` with a `len`-byte payload, as they go into a stream.
pub fn header_bytes(kind: FrameKind, len: u32) -> [u8; FRAME_HEADER_LEN] {
    FrameHeader::new(kind, len).to_bytes()
}

/// Zero bytes that follow a `len`-byte payload (so the next frame starts aligned).
pub fn padding(len: usize) -> usize {
    len.next_multiple_of(FRAME_ALIGN) - len
}

/// The padding bytes after a `len`-byte payload.
pub fn padding_bytes(len: usize) -> &'static [u8] {
    &ZEROS[..padding(len)]
}

/// Appends `frame` in stream form (header, payload, zero padding) to `out`.
pub fn encode_frame(frame: &Frame<'_>, out: &mut Vec<u8>) -> Result<(), CodecError> {
    frame.validate()?;
    let len = frame.encoded_len();
    let len32 = u32::try_from(len).map_err(|_| CodecError::Invalid {
        frame: frame.kind(),
        what: format!("payload of {len} bytes is over 4 GiB"),
    })?;
    out.reserve(FRAME_HEADER_LEN + len + padding(len));
    out.extend_from_slice(&header_bytes(frame.kind(), len32));
    let at = out.len();
    out.resize(at + len, 0);
    if let Err(e) = frame.encode(&mut out[at..]) {
        out.truncate(at - FRAME_HEADER_LEN);
        return Err(e);
    }
    out.extend_from_slice(padding_bytes(len));
    Ok(())
}

/// Why a stream of frames was refused. Every variant rejects the batch the stream carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// A frame header (or its padding) is not what a shmback sender writes.
    #[error(
        "invalid frame header at byte {at} of the body ({what}): the body is not a shmback frame \
         stream or was corrupted; send batches with shmback-send or shmback-writer"
    )]
    BadHeader {
        /// Stream offset of the frame.
        at: u64,
        /// What is wrong.
        what: String,
    },
    /// A frame's payload is over the receiver's limit; refused before it was buffered.
    #[error(
        "frame at byte {at} of the body has a {len}-byte payload, over this receiver's limit of {max} \
         bytes: send smaller frames (shmback-writer splits file data into small frames) or raise the \
         receiver's frame limit"
    )]
    TooLarge {
        /// Stream offset of the frame.
        at: u64,
        /// Payload length in the header.
        len: u64,
        /// The receiver's limit.
        max: u64,
    },
    /// A frame of another codec version.
    #[error(
        "frame at byte {at} of the body has codec version {found}, which its frame type does not have in \
         the codec versions this build speaks ({MIN_CODEC_VERSION} to {CODEC_VERSION}): run the producer and \
         the uploader from the same shmback release"
    )]
    Version {
        /// Stream offset of the frame.
        at: u64,
        /// Version in the header.
        found: u8,
    },
    /// The body ended inside a frame.
    #[error(
        "the body ended inside the frame at byte {at} ({buffered} bytes of it arrived): the \
         connection dropped or the sender stopped mid-batch; the producer must send the batch again"
    )]
    Truncated {
        /// Stream offset of the incomplete frame.
        at: u64,
        /// Bytes of it that arrived.
        buffered: usize,
    },
}

/// The receiver's incremental frame parser: push bytes as they arrive, take whole frames out.
///
/// Memory stays bounded by one frame (at most `max_payload` + 16 bytes) plus the chunk last
/// pushed, provided the caller takes every complete frame out ([`peek`](Self::peek) until
/// `None`, [`release`](Self::release) each) before pushing the next chunk.
#[derive(Debug)]
pub struct FrameAssembler {
    max_payload: usize,
    buf: Vec<u8>,
    /// Offset in `buf` of the next frame.
    start: usize,
    /// Stream offset of `buf[start]`.
    pos: u64,
    /// Size in the stream (header + payload + padding) of the frame `peek` returned.
    peeked: Option<usize>,
}

impl FrameAssembler {
    /// A parser refusing payloads over `max_payload` bytes ([`DEFAULT_MAX_FRAME`] is a good limit).
    pub fn new(max_payload: usize) -> Self {
        Self { max_payload, buf: Vec::new(), start: 0, pos: 0, peeked: None }
    }

    /// Appends bytes received. Releases a frame [`peek`](Self::peek) returned but was not released.
    pub fn push(&mut self, bytes: &[u8]) {
        self.peeked = None;
        if self.start > 0 {
            // Compact: what is left is less than one frame (the caller drained whole frames).
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame as `(kind byte, payload)`, or `None` when more bytes are needed.
    ///
    /// The header is checked as soon as its 8 bytes are here, so an oversized or foreign frame is
    /// refused before its payload is buffered. The kind byte is checked only for what a stream
    /// must never carry (zero, PADDING); [`crate::frame::decode`] refuses unknown kinds. Calling
    /// it again without [`release`](Self::release) returns the same frame.
    pub fn peek(&mut self) -> Result<Option<(u8, &[u8])>, StreamError> {
        let Some(h) = FrameHeader::read(&self.buf[self.start..]) else { return Ok(None) };
        let at = self.pos;
        if h.check_version().is_err() {
            return Err(StreamError::Version { at, found: h.version });
        }
        if h.kind == FrameKind::Want as u8 || h.kind == FrameKind::Wanted as u8 {
            let what = format!(
                "frame type {} (a want-list frame) cannot appear in a stream: want-lists travel only in a ring",
                h.kind
            );
            return Err(StreamError::BadHeader { at, what });
        }
        if h.flags != 0 {
            return Err(StreamError::BadHeader { at, what: format!("flags {:#06x}, expected 0", h.flags) });
        }
        if h.kind == 0 || h.kind == FrameKind::Padding as u8 {
            let what = format!("frame type {} (zero or PADDING) cannot appear in a stream", h.kind);
            return Err(StreamError::BadHeader { at, what });
        }
        let len = h.len as usize;
        if len > self.max_payload {
            return Err(StreamError::TooLarge { at, len: u64::from(h.len), max: self.max_payload as u64 });
        }
        let size = FRAME_HEADER_LEN + len + padding(len);
        let have = self.buf.len() - self.start;
        if have < size {
            // Reserve now for the whole frame: one allocation instead of doubling per chunk.
            self.buf.reserve(size - have);
            return Ok(None);
        }
        let avail = &self.buf[self.start..];
        let payload = &avail[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
        if avail[FRAME_HEADER_LEN + len..size].iter().any(|&b| b != 0) {
            return Err(StreamError::BadHeader { at, what: "non-zero padding after the payload".into() });
        }
        self.peeked = Some(size);
        Ok(Some((h.kind, payload)))
    }

    /// Consumes the frame [`peek`](Self::peek) returned; does nothing if there is none.
    pub fn release(&mut self) {
        if let Some(size) = self.peeked.take() {
            self.start += size;
            self.pos += size as u64;
            if self.start == self.buf.len() {
                self.buf.clear();
                self.start = 0;
            }
        }
    }

    /// Stream offset of the next frame (for error messages).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Whether bytes are buffered that are not a whole frame yet (at the end of a body: truncated).
    pub fn partial(&self) -> bool {
        self.buf.len() > self.start && self.peeked.is_none()
    }

    /// At the end of the body: `Err(Truncated)` when it ended inside a frame.
    pub fn finish(&self) -> Result<(), StreamError> {
        if self.partial() {
            return Err(StreamError::Truncated { at: self.pos, buffered: self.buf.len() - self.start });
        }
        Ok(())
    }

    /// Bytes held (for tests of the memory bound).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Compares a token received with the expected one in time independent of their contents (no
/// early exit on the first differing byte). The length of `expected` may show in the timing.
pub fn token_matches(expected: &[u8], given: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != given.len());
    for (i, &e) in expected.iter().enumerate() {
        // Compare against something for every byte of `expected`, even when `given` is shorter.
        let g = if given.is_empty() { !e } else { given[i % given.len()] };
        diff |= e ^ g;
    }
    std::hint::black_box(diff) == 0
}

/// Whether `name` is a valid producer name: 1 to [`MAX_PRODUCER_LEN`] of `[A-Za-z0-9._-]`.
pub fn valid_producer_name(name: &str) -> bool {
    (1..=MAX_PRODUCER_LEN).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Fuzz harness (the `stream` target): the first bytes choose chunk sizes, the rest is a body
/// pushed through a [`FrameAssembler`] in those chunks, each frame decoded and fed to a
/// [`crate::BatchDecoder`]. Must never panic, and the assembler must stay within its bound.
#[doc(hidden)]
pub fn fuzz_chunks(data: &[u8]) {
    let (sizes, body) = data.split_at(data.len().min(8));
    let sizes: Vec<usize> =
        if sizes.is_empty() { vec![1] } else { sizes.iter().map(|&s| usize::from(s) + 1).collect() };
    // A small limit so the fuzzer reaches TooLarge with short inputs.
    let max = 4096;
    let mut asm = FrameAssembler::new(max);
    let mut dec = crate::BatchDecoder::new();
    let mut rest = body;
    let mut i = 0;
    'body: while !rest.is_empty() {
        let n = sizes[i % sizes.len()].min(rest.len());
        i += 1;
        let (chunk, next) = rest.split_at(n);
        rest = next;
        asm.push(chunk);
        assert!(asm.buffered() <= FRAME_HEADER_LEN + max + FRAME_ALIGN + 256, "assembler over its bound");
        loop {
            match asm.peek() {
                Ok(Some((kind, payload))) => {
                    if let Ok(f) = crate::frame::decode(kind, payload) {
                        let _ = dec.feed(f);
                    }
                    asm.release();
                }
                Ok(None) => break,
                Err(_) => break 'body,
            }
        }
    }
    let _ = asm.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Begin, Entry, EntryKind, Labels, abort_code, decode};
    use proptest::prelude::*;

    fn owned(f: Frame<'_>) -> (u8, Vec<u8>) {
        (f.kind() as u8, f.encode_to_vec().unwrap())
    }

    fn file(path: &str, size: Option<u64>) -> Frame<'static> {
        Frame::Entry(Entry {
            path: path.as_bytes().to_vec(),
            kind: EntryKind::File,
            size,
            mode: 0o100644,
            uid: 1,
            gid: 2,
            mtime_ns: 3,
            target: Vec::new(),
        })
    }

    fn sample_batch(data: &[Vec<u8>]) -> Vec<Frame<'_>> {
        let mut frames = vec![Frame::Begin(Begin {
            seq: 42,
            labels: Labels { host: Some("h".into()), tags: vec!["t".into()], meta: vec![] },
        })];
        for (i, d) in data.iter().enumerate() {
            frames.push(file(&format!("f{i:03}"), Some(d.len() as u64)));
        }
        frames.push(Frame::EndOfManifest { entries: data.len() as u64 });
        let mut total = 0;
        for d in data {
            for c in d.chunks(1000) {
                frames.push(Frame::Data(c));
            }
            total += d.len() as u64;
        }
        frames.push(Frame::Commit { entries: data.len() as u64, bytes: total });
        frames
    }

    fn reassemble(body: &[u8], chunks: &[usize], max: usize) -> Result<Vec<(u8, Vec<u8>)>, StreamError> {
        let mut asm = FrameAssembler::new(max);
        let mut out = Vec::new();
        let mut rest = body;
        let mut i = 0;
        while !rest.is_empty() {
            let n = chunks[i % chunks.len()].clamp(1, rest.len());
            i += 1;
            asm.push(&rest[..n]);
            rest = &rest[n..];
            while let Some((k, p)) = asm.peek()? {
                out.push((k, p.to_vec()));
                asm.release();
            }
            assert!(asm.buffered() <= FRAME_HEADER_LEN + max + FRAME_ALIGN + n, "bound");
        }
        asm.finish()?;
        Ok(out)
    }

    proptest! {
        #[test]
        fn chunked_body_reassembles(
            data in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 0..5),
            chunks in proptest::collection::vec(1usize..600, 1..8),
        ) {
            let frames = sample_batch(&data);
            let mut body = Vec::new();
            for f in &frames {
                encode_frame(f, &mut body).unwrap();
            }
            prop_assert_eq!(body.len() % FRAME_ALIGN, 0);
            let got = reassemble(&body, &chunks, DEFAULT_MAX_FRAME).unwrap();
            let want: Vec<_> = frames.iter().cloned().map(owned).collect();
            prop_assert_eq!(&got, &want);
            // And the batch decoder accepts the reassembled stream.
            let mut dec = crate::BatchDecoder::new();
            let mut last = None;
            for (k, p) in &got {
                last = Some(format!("{:?}", dec.feed(decode(*k, p).unwrap()).unwrap()));
            }
            prop_assert!(last.unwrap().starts_with("Commit"));
        }

        #[test]
        fn truncated_body_is_detected(cut in 1usize..200, chunk in 1usize..64) {
            let data = vec![vec![7u8; 100]];
            let frames = sample_batch(&data);
            let mut body = Vec::new();
            for f in &frames {
                encode_frame(f, &mut body).unwrap();
            }
            let cut = cut.min(body.len() - 1);
            let body = &body[..body.len() - cut];
            // Either the body ends inside a frame, or it ends on a boundary before COMMIT.
            match reassemble(body, &[chunk], DEFAULT_MAX_FRAME) {
                Err(StreamError::Truncated { .. }) => {}
                Ok(frames) => prop_assert!(frames.last().unwrap().0 != FrameKind::Commit as u8),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }

    #[test]
    fn encode_frame_matches_ring_layout() {
        let mut body = Vec::new();
        encode_frame(&Frame::Data(b"abc"), &mut body).unwrap();
        assert_eq!(&body[..8], &[3, 0, 0, 0, FrameKind::Data as u8, 1, 0, 0]);
        assert_eq!(&body[8..], b"abc\0\0\0\0\0");
        // Header + file bytes + padding, as a sender streaming from a file writes it.
        let mut by_parts = header_bytes(FrameKind::Data, 3).to_vec();
        by_parts.extend_from_slice(b"abc");
        by_parts.extend_from_slice(padding_bytes(3));
        assert_eq!(by_parts, body);
        assert_eq!(padding(8), 0);
        assert_eq!(padding(0), 0);
        assert_eq!(padding(9), 7);
    }

    #[test]
    fn encode_frame_refuses_invalid_frames_and_leaves_out_intact() {
        let mut body = vec![1, 2, 3];
        let err = encode_frame(&file("../x", Some(1)), &mut body).unwrap_err();
        assert!(matches!(err, CodecError::Path { .. }), "{err}");
        assert_eq!(body, [1, 2, 3]);
    }

    #[test]
    fn oversize_frame_refused_from_its_header_alone() {
        let mut asm = FrameAssembler::new(1024);
        asm.push(&header_bytes(FrameKind::Data, 1025));
        let err = asm.peek().unwrap_err();
        assert_eq!(err, StreamError::TooLarge { at: 0, len: 1025, max: 1024 });
        assert!(err.to_string().contains("raise the receiver's frame limit"), "{err}");
        // Nothing of the payload was needed to refuse it, and nothing was reserved for it.
        assert!(asm.buf.capacity() < 1024);
    }

    #[test]
    fn foreign_headers_are_refused() {
        let at_second = |mut h: [u8; 8]| {
            let mut body = Vec::new();
            encode_frame(&Frame::EndOfFile { len: 1 }, &mut body).unwrap();
            h[0] = 0;
            body.extend_from_slice(&h);
            let mut asm = FrameAssembler::new(64);
            asm.push(&body);
            assert!(asm.peek().unwrap().is_some());
            asm.release();
            assert_eq!(asm.position(), 16);
            asm.peek().unwrap_err()
        };
        let mut h = header_bytes(FrameKind::Commit, 0);
        h[5] = 2;
        assert_eq!(at_second(h), StreamError::Version { at: 16, found: 2 });
        let mut h = header_bytes(FrameKind::Commit, 0);
        h[6] = 1;
        assert!(matches!(at_second(h), StreamError::BadHeader { at: 16, .. }));
        let h = header_bytes(FrameKind::Padding, 0);
        assert!(matches!(at_second(h), StreamError::BadHeader { at: 16, .. }));
        let mut h = header_bytes(FrameKind::Commit, 0);
        h[4] = 0;
        assert!(matches!(at_second(h), StreamError::BadHeader { at: 16, .. }));
    }

    #[test]
    fn non_zero_padding_is_refused() {
        let mut body = Vec::new();
        encode_frame(&Frame::Data(b"x"), &mut body).unwrap();
        *body.last_mut().unwrap() = 1;
        let mut asm = FrameAssembler::new(64);
        asm.push(&body);
        assert!(matches!(asm.peek(), Err(StreamError::BadHeader { at: 0, .. })));
    }

    #[test]
    fn truncation_inside_a_header_and_a_payload() {
        let mut body = Vec::new();
        encode_frame(&Frame::Abort { code: abort_code::CANCELLED, reason: "r".into() }, &mut body).unwrap();
        for cut in 1..body.len() {
            let mut asm = FrameAssembler::new(64);
            asm.push(&body[..cut]);
            assert_eq!(asm.peek().unwrap(), None);
            assert!(asm.partial());
            assert_eq!(asm.finish(), Err(StreamError::Truncated { at: 0, buffered: cut }));
        }
        let mut asm = FrameAssembler::new(64);
        assert!(!asm.partial());
        asm.push(&body);
        assert!(asm.peek().unwrap().is_some());
        assert!(!asm.partial(), "a peeked whole frame is not partial");
        asm.release();
        assert_eq!(asm.finish(), Ok(()));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secret", b"secreT"));
        assert!(!token_matches(b"secret", b"secret2"));
        assert!(!token_matches(b"secret", b"secre"));
        assert!(!token_matches(b"secret", b""));
        assert!(!token_matches(b"", b"x"));
        assert!(token_matches(b"", b""));
        // A repeated shorter token must not match by wrapping around.
        assert!(!token_matches(b"abab", b"ab"));
    }

    #[test]
    fn producer_names() {
        assert!(valid_producer_name("app-1.prod_x"));
        assert!(valid_producer_name(&"a".repeat(128)));
        assert!(!valid_producer_name(&"a".repeat(129)));
        assert!(!valid_producer_name(""));
        assert!(!valid_producer_name("a b"));
        assert!(!valid_producer_name("a/b"));
        assert!(!valid_producer_name("é"));
    }

    #[test]
    fn fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/stream");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("the stream target's seed corpus") {
            fuzz_chunks(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0, "no seeds in {}", dir.display());
    }
}
