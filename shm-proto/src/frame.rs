//! Frames: the 8-byte frame header the ring understands, and the payload codec of each batch
//! frame type (one `encode`/`decode` pair per type).
//!
//! Longer than the house's ~400 lines on purpose: one codec, every frame type's layout beside
//! its encoder and decoder, so a format change is made in one place.
//!
//! All integers are little-endian. Decoding never panics and never trusts a length: every read
//! goes through [`Cursor`], which bounds-checks against the payload it was given.

use bytemuck::{Pod, Zeroable};

/// Bytes of a frame header in the ring.
pub const FRAME_HEADER_LEN: usize = 8;
/// Frames start at multiples of this in the ring.
pub const FRAME_ALIGN: usize = 8;
/// Newest version of the frame codec this build speaks. Version 2 added the want-list frames
/// ([`FrameKind::Want`], [`FrameKind::Wanted`]); every frame's header carries the version that
/// defines its kind ([`FrameKind::version`]), so frames of kinds 1–8 are byte-identical in both
/// versions and a producer that never asks for a want-list is a version-1 producer.
pub const CODEC_VERSION: u8 = 2;
/// Oldest frame codec version this build accepts.
pub const MIN_CODEC_VERSION: u8 = 1;

/// Longest snapshot path, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest path component, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Longest label string (host, tag, key or value), in bytes.
pub const MAX_LABEL_LEN: usize = 1024;
/// Most tags or key/value pairs in a BEGIN frame.
pub const MAX_LABELS: usize = 256;
/// Longest ABORT reason, in bytes.
pub const MAX_REASON_LEN: usize = 4096;

/// The frame header at the start of every frame in the ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FrameHeader {
    /// Payload bytes (not counting this header or the padding to [`FRAME_ALIGN`]).
    pub len: u32,
    /// A [`FrameKind`] byte.
    pub kind: u8,
    /// [`CODEC_VERSION`].
    pub version: u8,
    /// Reserved, zero.
    pub flags: u16,
}

impl FrameHeader {
    /// A header for a payload of `len` bytes.
    pub fn new(kind: FrameKind, len: u32) -> Self {
        Self { len: len.to_le(), kind: kind as u8, version: kind.version(), flags: 0 }
    }

    /// Checks the header's version against its kind: `Err` says what was found and what this
    /// build speaks (a peer from another release, or corrupt bytes).
    pub fn check_version(&self) -> Result<(), String> {
        let expected = FrameKind::from_u8(self.kind).map(FrameKind::version);
        match expected {
            Some(v) if v == self.version => Ok(()),
            Some(v) => Err(format!(
                "frame of kind {} has codec version {}, the kind belongs to version {v} (this build speaks \
                 versions {MIN_CODEC_VERSION} to {CODEC_VERSION})",
                self.kind, self.version
            )),
            None if (MIN_CODEC_VERSION..=CODEC_VERSION).contains(&self.version) => Ok(()),
            None => Err(format!(
                "frame codec version {}, this build speaks versions {MIN_CODEC_VERSION} to {CODEC_VERSION}: the \
                 peer is from another release; run producer and uploader from the same release (or the \
                 uploader from the newer one)",
                self.version
            )),
        }
    }

    /// Reads a header from the first 8 bytes of `bytes` (a copy: the source may be shared memory).
    pub fn read(bytes: &[u8]) -> Option<Self> {
        let raw: [u8; FRAME_HEADER_LEN] = bytes.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        let mut h: FrameHeader = bytemuck::cast(raw);
        h.len = u32::from_le(h.len);
        h.flags = u16::from_le(h.flags);
        Some(h)
    }

    /// The header's bytes as they go into the ring.
    pub fn to_bytes(self) -> [u8; FRAME_HEADER_LEN] {
        let le = FrameHeader { len: self.len.to_le(), flags: self.flags.to_le(), ..self };
        bytemuck::cast(le)
    }
}

/// Bytes a frame with `payload` bytes occupies in the ring (header + payload + alignment padding).
pub const fn frame_size(payload: usize) -> usize {
    FRAME_HEADER_LEN + payload.next_multiple_of(FRAME_ALIGN)
}

/// Frame types. Zero is not a type, so zeroed memory is never a frame.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Fills the end of the ring so the next frame starts contiguous at offset 0.
    Padding = 1,
    /// Opens a batch: sequence and labels.
    Begin = 2,
    /// One manifest entry.
    Entry = 3,
    /// Closes the manifest.
    EndOfManifest = 4,
    /// File bytes for the current file.
    Data = 5,
    /// Ends a file whose size was unknown in its entry.
    EndOfFile = 6,
    /// Closes the batch successfully.
    Commit = 7,
    /// Abandons the batch.
    Abort = 8,
    /// Codec version 2: the batch asks for a want-list (right after BEGIN, before any ENTRY).
    Want = 9,
    /// Codec version 2: which want-list the producer applied (after END_OF_MANIFEST, before DATA).
    Wanted = 10,
}

impl FrameKind {
    /// The kind for a header byte, or `None` for an unknown type.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Padding,
            2 => Self::Begin,
            3 => Self::Entry,
            4 => Self::EndOfManifest,
            5 => Self::Data,
            6 => Self::EndOfFile,
            7 => Self::Commit,
            8 => Self::Abort,
            9 => Self::Want,
            10 => Self::Wanted,
            _ => return None,
        })
    }

    /// The codec version that defines this kind, which its frames carry in their header.
    pub fn version(self) -> u8 {
        match self {
            Self::Want | Self::Wanted => 2,
            _ => 1,
        }
    }
}

/// Why a payload could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Unknown frame type byte.
    #[error("unknown frame type {0}: the producer speaks a newer or different protocol")]
    UnknownKind(u8),
    /// Frame codec version differs.
    #[error("frame codec version {found}, expected {expected}: producer and uploader versions differ")]
    Version {
        /// Version in the frame.
        found: u8,
        /// Version this build speaks.
        expected: u8,
    },
    /// The payload ended before a field did.
    #[error("{frame:?} frame truncated: needed {needed} more bytes at offset {at}")]
    Truncated {
        /// Frame type.
        frame: FrameKind,
        /// Offset of the field.
        at: usize,
        /// Missing bytes.
        needed: usize,
    },
    /// Bytes left over after the last field.
    #[error("{frame:?} frame has {extra} trailing bytes")]
    Trailing {
        /// Frame type.
        frame: FrameKind,
        /// Bytes left.
        extra: usize,
    },
    /// A field's value is out of range.
    #[error("{frame:?} frame: {what}")]
    Invalid {
        /// Frame type.
        frame: FrameKind,
        /// What is wrong.
        what: String,
    },
    /// A snapshot path is not acceptable.
    #[error("invalid path {path:?}: {why}")]
    Path {
        /// The path, lossily printed.
        path: String,
        /// What is wrong with it.
        why: PathProblem,
    },
}

/// What is wrong with a snapshot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    /// Empty path.
    #[error("empty")]
    Empty,
    /// Starts with `/`.
    #[error("absolute (snapshot paths are relative)")]
    Absolute,
    /// Contains a NUL byte.
    #[error("contains a NUL byte")]
    Nul,
    /// Has a `..` component.
    #[error("contains a `..` component")]
    DotDot,
    /// Has a `.` component.
    #[error("contains a `.` component")]
    Dot,
    /// Has an empty component (`a//b` or a trailing `/`).
    #[error("contains an empty component (`//` or a trailing `/`)")]
    EmptyComponent,
    /// Longer than [`MAX_PATH_LEN`].
    #[error("longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    /// A component longer than [`MAX_NAME_LEN`].
    #[error("a component is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
}

/// Checks a snapshot path: relative, `/`-separated, no empty, `.` or `..` components, no NUL,
/// bounded length. Bytes need not be UTF-8.
pub fn validate_path(path: &[u8]) -> Result<(), PathProblem> {
    if path.is_empty() {
        return Err(PathProblem::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathProblem::TooLong);
    }
    if path[0] == b'/' {
        return Err(PathProblem::Absolute);
    }
    if path.contains(&0) {
        return Err(PathProblem::Nul);
    }
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" => return Err(PathProblem::EmptyComponent),
            b"." => return Err(PathProblem::Dot),
            b".." => return Err(PathProblem::DotDot),
            c if c.len() > MAX_NAME_LEN => return Err(PathProblem::NameTooLong),
            _ => {}
        }
    }
    Ok(())
}

fn path_error(path: &[u8], why: PathProblem) -> CodecError {
    let shown = &path[..path.len().min(256)];
    CodecError::Path { path: String::from_utf8_lossy(shown).into_owned(), why }
}

/// Batch labels carried by BEGIN: host, tags and free-form key/values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    /// Host name recorded in the snapshot (the uploader's default when `None`).
    pub host: Option<String>,
    /// Snapshot tags.
    pub tags: Vec<String>,
    /// Free-form key/value pairs.
    pub meta: Vec<(String, String)>,
}

/// BEGIN: opens batch `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// Batch sequence (monotonic per segment).
    pub seq: u64,
    /// Labels of the batch.
    pub labels: Labels,
}

/// What a manifest entry is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Regular file; its bytes follow the manifest as DATA frames.
    File = 1,
    /// Directory.
    Dir = 2,
    /// Symbolic link; the target is in the entry.
    Symlink = 3,
}

/// ENTRY: one manifest entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Snapshot path (relative, `/`-separated, raw bytes).
    pub path: Vec<u8>,
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// Size in bytes; `None` for a stream whose end is marked by an END_OF_FILE frame.
    pub size: Option<u64>,
    /// Unix mode bits (permissions and type bits as `st_mode`).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Symlink target (raw bytes); empty for other kinds.
    pub target: Vec<u8>,
}

/// ABORT reason codes.
pub mod abort_code {
    /// The producer decided to abandon the batch (caller's abort or drop).
    pub const CANCELLED: u32 = 1;
    /// Reading a source failed.
    pub const SOURCE_ERROR: u32 = 2;
    /// A source changed while it was being read.
    pub const SOURCE_CHANGED: u32 = 3;
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// BEGIN.
    Begin(Begin),
    /// ENTRY.
    Entry(Entry),
    /// END_OF_MANIFEST with the number of entries sent.
    EndOfManifest {
        /// Entries in the manifest.
        entries: u64,
    },
    /// DATA: bytes of the current file, borrowed from the ring.
    Data(&'a [u8]),
    /// END_OF_FILE of a file of unknown size, with its final length.
    EndOfFile {
        /// Bytes the file had.
        len: u64,
    },
    /// COMMIT with the totals the decoder checks.
    Commit {
        /// Entries in the manifest.
        entries: u64,
        /// File bytes sent.
        bytes: u64,
    },
    /// ABORT with a code from [`abort_code`] and a reason.
    Abort {
        /// Reason code.
        code: u32,
        /// Human-readable reason.
        reason: String,
    },
    /// WANT (codec 2): this batch asks the consumer for a want-list.
    Want,
    /// WANTED (codec 2): the want-list the producer applied. `covered == 0`: none, every file's
    /// data follows; otherwise files below `covered` get data only where the list's bit is set,
    /// files from `covered` on all get data. `digest` is [`crate::want::WantList::digest`].
    Wanted {
        /// Files the applied list covers.
        covered: u64,
        /// Digest of the applied list's bits.
        digest: u64,
    },
}

const ENTRY_FIXED: usize = 1 + 1 + 2 + 4 + 4 + 4 + 8 + 8 + 2 + 2;
const ENTRY_SIZE_KNOWN: u8 = 1;

impl Frame<'_> {
    /// The frame's type.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Begin(_) => FrameKind::Begin,
            Frame::Entry(_) => FrameKind::Entry,
            Frame::EndOfManifest { .. } => FrameKind::EndOfManifest,
            Frame::Data(_) => FrameKind::Data,
            Frame::EndOfFile { .. } => FrameKind::EndOfFile,
            Frame::Commit { .. } => FrameKind::Commit,
            Frame::Abort { .. } => FrameKind::Abort,
            Frame::Want => FrameKind::Want,
            Frame::Wanted { .. } => FrameKind::Wanted,
        }
    }

    /// Payload bytes [`Frame::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        let label = |s: &str| 2 + s.len();
        match self {
            Frame::Begin(b) => {
                8 + 1
                    + b.labels.host.as_deref().map_or(0, label)
                    + 2
                    + b.labels.tags.iter().map(|t| label(t)).sum::<usize>()
                    + 2
                    + b.labels.meta.iter().map(|(k, v)| label(k) + label(v)).sum::<usize>()
            }
            Frame::Entry(e) => ENTRY_FIXED + e.path.len() + e.target.len(),
            Frame::EndOfManifest { .. } | Frame::EndOfFile { .. } => 8,
            Frame::Data(d) => d.len(),
            Frame::Commit { .. } => 16,
            Frame::Abort { reason, .. } => 4 + 2 + reason.len().min(MAX_REASON_LEN),
            Frame::Want => 0,
            Frame::Wanted { .. } => 16,
        }
    }

    /// Checks the frame can be encoded (paths, label sizes) without writing anything.
    pub fn validate(&self) -> Result<(), CodecError> {
        let kind = self.kind();
        let check_label = |s: &str, what: &str| {
            if s.len() > MAX_LABEL_LEN {
                return Err(CodecError::Invalid {
                    frame: kind,
                    what: format!("{what} is {} bytes, at most {MAX_LABEL_LEN}", s.len()),
                });
            }
            Ok(())
        };
        match self {
            Frame::Begin(b) => {
                if let Some(h) = &b.labels.host {
                    check_label(h, "host")?;
                }
                if b.labels.tags.len() > MAX_LABELS || b.labels.meta.len() > MAX_LABELS {
                    return Err(CodecError::Invalid {
                        frame: kind,
                        what: format!("more than {MAX_LABELS} tags or key/values"),
                    });
                }
                for t in &b.labels.tags {
                    check_label(t, "tag")?;
                }
                for (k, v) in &b.labels.meta {
                    check_label(k, "label key")?;
                    check_label(v, "label value")?;
                }
            }
            Frame::Entry(e) => {
                validate_path(&e.path).map_err(|why| path_error(&e.path, why))?;
                validate_target(e)?;
            }
            Frame::Data(d) if d.len() > u32::MAX as usize => {
                return Err(CodecError::Invalid { frame: kind, what: "data frame over 4 GiB".into() });
            }
            _ => {}
        }
        Ok(())
    }

    /// Encodes the payload into `out`, which must be exactly [`Frame::encoded_len`] bytes.
    pub fn encode(&self, out: &mut [u8]) -> Result<(), CodecError> {
        self.validate()?;
        if out.len() != self.encoded_len() {
            return Err(CodecError::Invalid {
                frame: self.kind(),
                what: format!("output buffer is {} bytes, payload is {}", out.len(), self.encoded_len()),
            });
        }
        let mut w = Put { buf: out, at: 0 };
        match self {
            Frame::Begin(b) => {
                w.u64(b.seq);
                match &b.labels.host {
                    Some(h) => {
                        w.u8(1);
                        w.str16(h);
                    }
                    None => w.u8(0),
                }
                w.u16(b.labels.tags.len() as u16);
                for t in &b.labels.tags {
                    w.str16(t);
                }
                w.u16(b.labels.meta.len() as u16);
                for (k, v) in &b.labels.meta {
                    w.str16(k);
                    w.str16(v);
                }
            }
            Frame::Entry(e) => {
                w.u8(e.kind as u8);
                w.u8(if e.size.is_some() { ENTRY_SIZE_KNOWN } else { 0 });
                w.u16(0);
                w.u32(e.mode);
                w.u32(e.uid);
                w.u32(e.gid);
                w.u64(e.size.unwrap_or(0));
                w.u64(e.mtime_ns as u64);
                w.u16(e.path.len() as u16);
                w.u16(e.target.len() as u16);
                w.bytes(&e.path);
                w.bytes(&e.target);
            }
            Frame::EndOfManifest { entries } => w.u64(*entries),
            Frame::Data(d) => w.bytes(d),
            Frame::EndOfFile { len } => w.u64(*len),
            Frame::Commit { entries, bytes } => {
                w.u64(*entries);
                w.u64(*bytes);
            }
            Frame::Abort { code, reason } => {
                w.u32(*code);
                let r = truncate_utf8(reason, MAX_REASON_LEN);
                w.str16(r);
            }
            Frame::Want => {}
            Frame::Wanted { covered, digest } => {
                w.u64(*covered);
                w.u64(*digest);
            }
        }
        debug_assert_eq!(w.at, out.len());
        Ok(())
    }

    /// Encodes the payload into a new vector.
    pub fn encode_to_vec(&self) -> Result<Vec<u8>, CodecError> {
        let mut v = vec![0; self.encoded_len()];
        self.encode(&mut v)?;
        Ok(v)
    }
}

fn validate_target(e: &Entry) -> Result<(), CodecError> {
    let bad = |what: &str| CodecError::Invalid { frame: FrameKind::Entry, what: what.into() };
    match e.kind {
        EntryKind::Symlink => {
            if e.target.is_empty() {
                return Err(bad("symlink with an empty target"));
            }
            if e.target.len() > MAX_PATH_LEN {
                return Err(bad("symlink target longer than 4096 bytes"));
            }
            if e.target.contains(&0) {
                return Err(bad("symlink target contains a NUL byte"));
            }
            if e.size.is_none() {
                return Err(bad("symlink with unknown size"));
            }
        }
        EntryKind::Dir | EntryKind::File => {
            if !e.target.is_empty() {
                return Err(bad("target on an entry that is not a symlink"));
            }
            if e.kind == EntryKind::Dir && e.size.is_none() {
                return Err(bad("directory with unknown size"));
            }
        }
    }
    Ok(())
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Decodes the payload of a frame of type byte `kind`.
pub fn decode(kind: u8, payload: &[u8]) -> Result<Frame<'_>, CodecError> {
    let kind = FrameKind::from_u8(kind).ok_or(CodecError::UnknownKind(kind))?;
    let mut c = Cursor { buf: payload, at: 0, frame: kind };
    let frame = match kind {
        FrameKind::Padding => {
            return Err(CodecError::Invalid { frame: kind, what: "padding is not a batch frame".into() });
        }
        FrameKind::Begin => {
            let seq = c.u64()?;
            let host = match c.u8()? {
                0 => None,
                1 => Some(c.str16("host")?),
                other => return Err(c.invalid(format!("host flag {other}, expected 0 or 1"))),
            };
            let ntags = c.count("tags")?;
            let mut tags = Vec::with_capacity(ntags);
            for _ in 0..ntags {
                tags.push(c.str16("tag")?);
            }
            let nmeta = c.count("key/values")?;
            let mut meta = Vec::with_capacity(nmeta);
            for _ in 0..nmeta {
                let k = c.str16("label key")?;
                let v = c.str16("label value")?;
                meta.push((k, v));
            }
            Frame::Begin(Begin { seq, labels: Labels { host, tags, meta } })
        }
        FrameKind::Entry => {
            let ek = match c.u8()? {
                1 => EntryKind::File,
                2 => EntryKind::Dir,
                3 => EntryKind::Symlink,
                other => return Err(c.invalid(format!("entry kind {other}, expected 1..=3"))),
            };
            let flags = c.u8()?;
            if flags & !ENTRY_SIZE_KNOWN != 0 {
                return Err(c.invalid(format!("unknown entry flags {flags:#x}")));
            }
            if c.u16()? != 0 {
                return Err(c.invalid("reserved entry field is not zero".into()));
            }
            let mode = c.u32()?;
            let uid = c.u32()?;
            let gid = c.u32()?;
            let size = c.u64()?;
            let mtime_ns = c.u64()? as i64;
            let path_len = c.u16()? as usize;
            let target_len = c.u16()? as usize;
            let path = c.bytes(path_len)?.to_vec();
            let target = c.bytes(target_len)?.to_vec();
            validate_path(&path).map_err(|why| path_error(&path, why))?;
            let size_known = flags & ENTRY_SIZE_KNOWN != 0;
            if !size_known && size != 0 {
                // A stream's size field is unused; it must be zero so that nothing hides there.
                return Err(c.invalid("unknown-size entry with a non-zero size field".into()));
            }
            let size = size_known.then_some(size);
            let entry = Entry { path, kind: ek, size, mode, uid, gid, mtime_ns, target };
            validate_target(&entry)?;
            Frame::Entry(entry)
        }
        FrameKind::EndOfManifest => Frame::EndOfManifest { entries: c.u64()? },
        FrameKind::Data => {
            c.at = payload.len();
            Frame::Data(payload)
        }
        FrameKind::EndOfFile => Frame::EndOfFile { len: c.u64()? },
        FrameKind::Commit => Frame::Commit { entries: c.u64()?, bytes: c.u64()? },
        FrameKind::Abort => {
            let code = c.u32()?;
            let reason = c.str16("reason")?;
            Frame::Abort { code, reason }
        }
        FrameKind::Want => Frame::Want,
        FrameKind::Wanted => Frame::Wanted { covered: c.u64()?, digest: c.u64()? },
    };
    let extra = payload.len() - c.at;
    if extra != 0 {
        return Err(CodecError::Trailing { frame: kind, extra });
    }
    Ok(frame)
}

/// Bounds-checked little-endian reader over an untrusted payload.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
    frame: FrameKind,
}

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.at.checked_add(n);
        match end.and_then(|end| self.buf.get(self.at..end)) {
            Some(b) => {
                self.at += n;
                Ok(b)
            }
            None => Err(CodecError::Truncated {
                frame: self.frame,
                at: self.at,
                needed: n.saturating_sub(self.buf.len() - self.at),
            }),
        }
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let b = self.bytes(N)?;
        let mut a = [0; N];
        a.copy_from_slice(b);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        self.array().map(u64::from_le_bytes)
    }
    fn count(&mut self, what: &str) -> Result<usize, CodecError> {
        let n = self.u16()? as usize;
        if n > MAX_LABELS {
            return Err(self.invalid(format!("{n} {what}, at most {MAX_LABELS}")));
        }
        Ok(n)
    }
    fn str16(&mut self, what: &str) -> Result<String, CodecError> {
        let n = self.u16()? as usize;
        let limit = if self.frame == FrameKind::Abort { MAX_REASON_LEN } else { MAX_LABEL_LEN };
        if n > limit {
            return Err(self.invalid(format!("{what} is {n} bytes, at most {limit}")));
        }
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.invalid(format!("{what} is not UTF-8")))
    }
    fn invalid(&self, what: String) -> CodecError {
        CodecError::Invalid { frame: self.frame, what }
    }
}

/// Writer over a buffer sized by `encoded_len` (so no bounds can fail).
struct Put<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Put<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn str16(&mut self, s: &str) {
        self.u16(s.len() as u16);
        self.bytes(s.as_bytes());
    }
}
