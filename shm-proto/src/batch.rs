//! The batch state machine: `BEGIN → ENTRY×n → END_OF_MANIFEST → DATA… (per file, manifest
//! order) → COMMIT | ABORT`, validated frame by frame.
//!
//! [`BatchDecoder`] is fed decoded frames and says what each one means. It enforces everything a
//! consumer must not take on trust: entry order (strictly increasing depth-first `Path::cmp`, so no
//! duplicates), no entry below a non-directory, every file's data ending exactly where its size
//! (or its END_OF_FILE) says, COMMIT totals matching what arrived. After an error the decoder
//! skips frames until the next BEGIN; the batch in progress is lost (no snapshot).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::frame::{Begin, Entry, EntryKind, Frame, FrameKind};
use crate::want::WantList;

/// Most entries one batch may carry (bounds the decoder's memory: ~24 bytes per file).
pub const MAX_ENTRIES: u64 = 50_000_000;

/// What a frame meant.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'f> {
    /// A batch began. `interrupted` is the sequence of a batch that was open and is now torn
    /// (its producer restarted and began anew).
    Begin {
        /// The BEGIN frame.
        begin: Begin,
        /// Sequence of the torn batch, if one was open.
        interrupted: Option<u64>,
    },
    /// Manifest entry number `index`.
    Entry {
        /// Position in the manifest.
        index: u64,
        /// The entry.
        entry: Entry,
    },
    /// The manifest is complete; file data follows.
    EndOfManifest {
        /// Entries in the manifest.
        entries: u64,
        /// Of which files (each gets data, in order).
        files: u64,
    },
    /// Bytes of file number `file` (index among the batch's files, manifest order).
    Data {
        /// File index.
        file: u64,
        /// The bytes (borrowed from the frame).
        bytes: &'f [u8],
        /// True when this completes the file.
        last: bool,
    },
    /// File `file` (of unknown size) ended with `len` bytes.
    EndOfFile {
        /// File index.
        file: u64,
        /// Its length.
        len: u64,
    },
    /// The batch is complete and consistent.
    Commit {
        /// Batch sequence.
        seq: u64,
        /// Entries.
        entries: u64,
        /// File bytes.
        bytes: u64,
    },
    /// The producer aborted the batch.
    Abort {
        /// Batch sequence.
        seq: u64,
        /// ABORT code.
        code: u32,
        /// ABORT reason.
        reason: String,
    },
    /// A frame outside any batch, skipped (e.g. the rest of a batch torn before we attached).
    Skipped(FrameKind),
    /// WANT: the batch asks for a want-list (answer it with [`BatchDecoder::answer_want`] once
    /// the manifest is complete).
    WantAsked,
    /// WANTED: the producer applied the consumer's want-list (`covered` files of it; 0: none,
    /// every file's data follows).
    Wanted {
        /// Files the applied list covers.
        covered: u64,
    },
}

/// Where a batch is in the want-list exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// The batch did not ask (a version-1 producer): every file's data follows.
    NotAsked,
    /// WANT arrived; `answer` is what the consumer published, once it has.
    Asked { answer: Option<WantList> },
    /// WANTED arrived: data follows for the wanted files of this list only.
    Applied(WantList),
}

/// Why a batch was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("batch {seq}: {what}")]
pub struct BatchError {
    /// Sequence of the rejected batch.
    pub seq: u64,
    /// What was wrong.
    pub what: String,
}

#[derive(Debug)]
enum State {
    /// Between batches, or skipping to the next BEGIN after an error.
    Idle,
    Manifest {
        entries: u64,
        last_path: Option<Vec<u8>>,
        last_was_dir: bool,
    },
    Data {
        entries: u64,
        /// Position in `sizes` of the current file.
        file: usize,
        /// Bytes of the current file received.
        received: u64,
        /// Total data bytes received.
        total: u64,
    },
}

/// Validates a stream of frames as batches. One per consumer of a segment.
#[derive(Debug)]
pub struct BatchDecoder {
    state: State,
    seq: u64,
    /// Sizes of the batch's files in manifest order (`None`: unknown, ends with END_OF_FILE).
    sizes: Vec<Option<u64>>,
    want: Want,
}

impl Default for BatchDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchDecoder {
    /// A decoder between batches.
    pub fn new() -> Self {
        Self { state: State::Idle, seq: 0, sizes: Vec::new(), want: Want::NotAsked }
    }

    /// Whether a batch is open (its outcome not yet known).
    pub fn in_batch(&self) -> bool {
        !matches!(self.state, State::Idle)
    }

    /// Sequence of the open (or last) batch.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Sizes of the open batch's files, once the manifest is complete.
    pub fn file_sizes(&self) -> &[Option<u64>] {
        &self.sizes
    }

    /// Abandons the open batch (e.g. its producer died); skips to the next BEGIN.
    pub fn reset(&mut self) {
        self.state = State::Idle;
        self.sizes.clear();
        self.want = Want::NotAsked;
    }

    /// Whether the open batch asked for a want-list (sent WANT after BEGIN).
    pub fn want_asked(&self) -> bool {
        !matches!(self.want, Want::NotAsked)
    }

    /// Records the want-list the consumer published for the open batch (what
    /// [`crate::Consumer::publish_want`] returned), which the batch's WANTED must name. Ignored
    /// unless the batch asked and its WANTED has not arrived.
    pub fn answer_want(&mut self, list: WantList) {
        if let Want::Asked { answer } = &mut self.want {
            *answer = Some(list);
        }
    }

    /// Whether file `file` of the open batch gets data: false only for a file the applied
    /// want-list left out (its content comes from the parent snapshot).
    pub fn file_wanted(&self, file: u64) -> bool {
        match &self.want {
            Want::Applied(list) => list.is_wanted(file),
            _ => true,
        }
    }

    fn fail(&mut self, what: impl Into<String>) -> BatchError {
        self.reset();
        BatchError { seq: self.seq, what: what.into() }
    }

    /// Feeds one decoded frame.
    pub fn feed<'f>(&mut self, frame: Frame<'f>) -> Result<Event<'f>, BatchError> {
        if let Frame::Begin(begin) = frame {
            let interrupted = self.in_batch().then_some(self.seq);
            self.seq = begin.seq;
            self.sizes.clear();
            self.want = Want::NotAsked;
            self.state = State::Manifest { entries: 0, last_path: None, last_was_dir: false };
            return Ok(Event::Begin { begin, interrupted });
        }
        if let Frame::Abort { code, reason } = frame {
            if !self.in_batch() {
                return Ok(Event::Skipped(FrameKind::Abort));
            }
            self.reset();
            return Ok(Event::Abort { seq: self.seq, code, reason });
        }
        match &mut self.state {
            State::Idle => Ok(Event::Skipped(frame.kind())),
            State::Manifest { entries, last_path, last_was_dir } => match frame {
                Frame::Want if *entries == 0 && self.want == Want::NotAsked => {
                    self.want = Want::Asked { answer: None };
                    Ok(Event::WantAsked)
                }
                Frame::Want => Err(self.fail("WANT frame not right after BEGIN, or sent twice")),
                Frame::Entry(entry) => {
                    if *entries >= MAX_ENTRIES {
                        return Err(self.fail(format!("more than {MAX_ENTRIES} entries")));
                    }
                    if let Some(prev) = last_path.as_deref() {
                        let (p, c) = (as_path(prev), as_path(&entry.path));
                        if c <= p {
                            let what = format!(
                                "entry {:?} is out of order or a duplicate (after {:?}): entries must be \
                                 sorted depth-first by path",
                                c, p
                            );
                            return Err(self.fail(what));
                        }
                        if !*last_was_dir && c.starts_with(p) {
                            let what = format!("entry {c:?} lies below {p:?}, which is not a directory");
                            return Err(self.fail(what));
                        }
                    }
                    let index = *entries;
                    *entries += 1;
                    *last_was_dir = entry.kind == EntryKind::Dir;
                    *last_path = Some(entry.path.clone());
                    if entry.kind == EntryKind::File {
                        self.sizes.push(entry.size);
                    }
                    Ok(Event::Entry { index, entry })
                }
                Frame::EndOfManifest { entries: n } => {
                    let entries = *entries;
                    if n != entries {
                        return Err(self.fail(format!("END_OF_MANIFEST says {n} entries, {entries} were sent")));
                    }
                    let files = self.sizes.len() as u64;
                    self.state = State::Data { entries, file: 0, received: 0, total: 0 };
                    self.skip_empty_files();
                    Ok(Event::EndOfManifest { entries, files })
                }
                other => Err(self.fail(format!("{:?} frame inside the manifest", other.kind()))),
            },
            State::Data { .. } if matches!(self.want, Want::Asked { .. }) => {
                match frame {
                    Frame::Wanted { covered, digest } => self.apply_want(covered, digest),
                    other => Err(self
                        .fail(format!("{:?} frame before WANTED in a batch that asked for a want-list", other.kind()))),
                }
            }
            State::Data { entries, file, received, total } => match frame {
                Frame::Data(bytes) => {
                    let Some(&size) = self.sizes.get(*file) else {
                        return Err(self.fail("file data after the last file"));
                    };
                    let n = bytes.len() as u64;
                    let now = *received + n;
                    if let Some(size) = size
                        && now > size
                    {
                        let idx = *file;
                        return Err(self.fail(format!("file {idx} got {now} bytes, its entry says {size}")));
                    }
                    *received = now;
                    *total += n;
                    let index = *file as u64;
                    let last = size == Some(now);
                    if last {
                        *file += 1;
                        *received = 0;
                        self.skip_empty_files();
                    }
                    Ok(Event::Data { file: index, bytes, last })
                }
                Frame::EndOfFile { len } => {
                    let idx = *file;
                    match self.sizes.get(idx) {
                        Some(None) if len == *received => {
                            *file += 1;
                            *received = 0;
                            self.skip_empty_files();
                            Ok(Event::EndOfFile { file: idx as u64, len })
                        }
                        Some(None) => {
                            let got = *received;
                            Err(self.fail(format!("END_OF_FILE says {len} bytes, file {idx} got {got}")))
                        }
                        Some(Some(_)) => Err(self.fail(format!("END_OF_FILE for file {idx}, whose size is known"))),
                        None => Err(self.fail("END_OF_FILE after the last file")),
                    }
                }
                Frame::Commit { entries: e, bytes } => {
                    let (entries, file, total) = (*entries, *file, *total);
                    if file < self.sizes.len() {
                        let n = self.sizes.len();
                        return Err(self.fail(format!("COMMIT after {file} of {n} files")));
                    }
                    if e != entries || bytes != total {
                        let what = format!("COMMIT says {e} entries / {bytes} bytes, {entries} / {total} were sent");
                        return Err(self.fail(what));
                    }
                    self.reset();
                    Ok(Event::Commit { seq: self.seq, entries, bytes })
                }
                other => Err(self.fail(format!("{:?} frame in the data section", other.kind()))),
            },
        }
    }

    /// WANTED: the producer names the list it applied: none (`covered == 0`, every file follows)
    /// or exactly the one the consumer published.
    fn apply_want(&mut self, covered: u64, digest: u64) -> Result<Event<'static>, BatchError> {
        let Want::Asked { answer } = &self.want else {
            return Err(self.fail("WANTED frame in a batch that did not ask for a want-list"));
        };
        let applied = match answer {
            _ if covered == 0 && digest == 0 => WantList::all(),
            Some(list) if list.covered() == covered && list.digest() == digest => list.clone(),
            Some(list) => {
                let what = format!(
                    "WANTED names a want-list of {covered} files (digest {digest:#x}), the uploader published \
                     one of {} files (digest {:#x})",
                    list.covered(),
                    list.digest()
                );
                return Err(self.fail(what));
            }
            None => return Err(self.fail("WANTED names a want-list the uploader never published")),
        };
        self.want = Want::Applied(applied);
        self.skip_empty_files();
        Ok(Event::Wanted { covered })
    }

    /// Moves past files that get no DATA frames: known size zero, or left out by the want-list.
    fn skip_empty_files(&mut self) {
        if let State::Data { file, .. } = &mut self.state {
            let wanted = |f: usize| match &self.want {
                Want::Applied(list) => list.is_wanted(f as u64),
                _ => true,
            };
            while self.sizes.get(*file).is_some_and(|s| *s == Some(0) || !wanted(*file)) {
                *file += 1;
            }
        }
    }
}

fn as_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}
