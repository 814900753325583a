//! [`Outbox`]: a producer's attachment to one segment or one uploader's HTTP listener, and the
//! options every batch shares.

use std::path::{Path, PathBuf};
use std::time::Duration;

use shmback_proto::{Labels, Producer, Segment, SegmentOptions};

use crate::batch::Batch;
use crate::error::WriteError;
use crate::http::{HttpClient, HttpOptions};
use crate::send::RingChannel;

/// How an [`Outbox`] attaches and sends.
#[derive(Clone, Debug)]
pub struct OutboxOptions {
    /// Segment options: ring size when this side creates the segment (default 4 MiB), whether it
    /// may create it, group sharing, liveness tick.
    pub segment: SegmentOptions,
    /// Longest wait for any single step: room in the ring (backpressure) or the durable ack; over
    /// HTTP, connecting or a stalled write, and how long a commit keeps resending.
    pub timeout: Duration,
    /// Labels applied to every batch (host, tags, key/values); a batch can add tags and values.
    pub labels: Labels,
    /// Payload bytes per DATA frame (capped at the ring's maximum, over HTTP at
    /// [`shmback_proto::stream::DEFAULT_MAX_FRAME`]). Frames of 64 KiB and more move
    /// at memcpy speed (BENCHMARKS.md); 256 KiB also keeps `read()` calls few.
    pub frame_size: usize,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        Self {
            segment: SegmentOptions::default(),
            timeout: Duration::from_secs(60),
            labels: Labels::default(),
            frame_size: 256 << 10,
        }
    }
}

/// A producer's handle on one segment ([`Outbox::open`]) or on an uploader's HTTP listener
/// ([`Outbox::http`]): what a producer app keeps for its whole life. One batch at
/// a time: [`Outbox::batch`] borrows it until the batch is committed or dropped.
///
/// The uploader (`shmback run`) usually creates the segment; `Outbox::open` creates it when it is
/// not there yet, so the two can start in any order. Below, a stand-in uploader (hidden) plays
/// `shmback run`.
///
/// ```
/// use std::time::Duration;
/// use shmback_writer::{Outbox, OutboxOptions};
///
/// # let shm = tempfile::tempdir_in("/dev/shm").unwrap();
/// # let segment = shm.path().join("shmback");
/// # let data = tempfile::tempdir().unwrap();
/// # std::fs::write(data.path().join("orders.csv"), "1,2,3\n").unwrap();
/// # let data_dir = data.path();
/// let mut outbox = Outbox::open(&segment, OutboxOptions::default())?;
/// # // A stand-in uploader: reads the batch and acknowledges it as snapshot 0707…07.
/// # let mut ring = shmback_proto::Segment::consumer(&segment, &Default::default()).unwrap();
/// # let uploader = std::thread::spawn(move || {
/// #     let mut batches = shmback_proto::BatchDecoder::new();
/// #     loop {
/// #         let frame = ring.recv(Duration::from_secs(20)).unwrap();
/// #         let event = batches.feed(frame.decode().unwrap()).unwrap();
/// #         let committed = match event {
/// #             shmback_proto::Event::Commit { seq, .. } => Some(seq),
/// #             _ => None,
/// #         };
/// #         frame.release();
/// #         if let Some(seq) = committed {
/// #             return ring.publish_durable(seq, &[7; 32]);
/// #         }
/// #     }
/// # });
/// let mut batch = outbox.batch();
/// batch.add_dir("data", data_dir)?;               // walks it; files are opened one at a time
/// batch.add_bytes("VERSION", b"42\n".to_vec())?;
/// let ticket = batch.commit()?;                   // manifest, then data, then COMMIT
/// let id = ticket.wait_durable(Duration::from_secs(600))?;
/// assert_eq!(id.to_string(), "07".repeat(32));
/// # uploader.join().unwrap();
/// # Ok::<(), shmback_writer::WriteError>(())
/// ```
pub struct Outbox {
    transport: Transport,
    opts: OutboxOptions,
}

enum Transport {
    Ring {
        producer: Producer<Segment>,
        path: PathBuf,
    },
    Http(HttpClient),
    /// Batches only written with `Batch::write_to`; the last sequence handed out.
    Detached(u64),
}

/// What a batch borrows from its outbox.
pub(crate) struct Channel<'o> {
    pub(crate) route: Route<'o>,
    /// The outbox's labels, which the batch's own tags and values extend.
    pub(crate) labels: &'o Labels,
    pub(crate) timeout: Duration,
    pub(crate) frame_size: usize,
}

/// Where a batch's frames go.
pub(crate) enum Route<'o> {
    Ring(RingChannel<'o>),
    Http(&'o mut HttpClient),
    /// The last sequence handed out.
    Detached(&'o mut u64),
}

impl Outbox {
    /// Attaches to (or creates) the segment at `segment` as its producer.
    pub fn open(segment: impl AsRef<Path>, opts: OutboxOptions) -> Result<Outbox, WriteError> {
        let path = segment.as_ref().to_path_buf();
        let producer = Segment::producer(&path, &opts.segment)?;
        Ok(Outbox { transport: Transport::Ring { producer, path }, opts })
    }

    /// Sends batches over HTTP to the uploader listening at `base_url` (`shmback run --listen`),
    /// e.g. `http://backup:8700`, as `POST /v1/batches` (PROTOCOL.md, "Over HTTP"). Nothing
    /// connects until a commit. `opts.segment` is not used.
    ///
    /// A commit streams the batch as the request body (files read one at a time, nothing
    /// buffered whole) and returns once the body is sent; [`crate::Ticket::wait_durable`] waits
    /// for the answer, which comes once the snapshot is stored. A dropped connection, 408, 429 or
    /// 503 sends the whole batch again — files read again — with backoff: during the commit
    /// within `opts.timeout`, during the wait within its timeout. A batch holding a reader
    /// ([`Batch::add_reader`]) can be sent again only if the reader was not read yet
    /// ([`WriteError::NotResendable`]). Sequences are the milliseconds since the Unix epoch at the
    /// batch's start, so they keep increasing across restarts of the producer.
    ///
    /// Below, a stand-in uploader (hidden) answers as `shmback run --listen` does.
    ///
    /// ```
    /// use std::time::Duration;
    /// use shmback_writer::{HttpOptions, Outbox, OutboxOptions};
    ///
    /// # fn main() -> Result<(), shmback_writer::WriteError> {
    /// # let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    /// # let url = format!("http://{}", listener.local_addr().unwrap());
    /// # let uploader = std::thread::spawn(move || stand_in::serve_one(listener, [9; 32]));
    /// let http = HttpOptions { token: Some("s3cret".into()), producer: "orders-db".into() };
    /// let mut outbox = Outbox::http(&url, http, OutboxOptions::default())?;
    /// let mut batch = outbox.batch();
    /// batch.add_bytes("VERSION", b"42\n".to_vec())?;
    /// let ticket = batch.commit()?;                   // the body is sent
    /// let id = ticket.wait_durable(Duration::from_secs(600))?; // the uploader stored it
    /// assert_eq!(id.to_string(), "09".repeat(32));
    /// # uploader.join().unwrap();
    /// # Ok(())
    /// # }
    /// # mod stand_in {
    /// #     use std::io::{BufRead, BufReader, Read, Write};
    /// #     pub fn serve_one(l: std::net::TcpListener, id: [u8; 32]) {
    /// #         let (s, _) = l.accept().unwrap();
    /// #         let mut r = BufReader::new(s.try_clone().unwrap());
    /// #         let mut w = s;
    /// #         let mut line = String::new();
    /// #         while { line.clear(); r.read_line(&mut line).unwrap(); line != "\r\n" } {}
    /// #         w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
    /// #         let mut asm = shmback_proto::stream::FrameAssembler::new(1 << 20);
    /// #         let mut dec = shmback_proto::BatchDecoder::new();
    /// #         let mut seq = None;
    /// #         // The whole body, up to its last (empty) chunk: closing a socket with unread bytes
    /// #         // resets it, and the client could lose the answer.
    /// #         loop {
    /// #             line.clear();
    /// #             r.read_line(&mut line).unwrap();
    /// #             let n = usize::from_str_radix(line.trim(), 16).unwrap();
    /// #             let mut chunk = vec![0; n + 2];
    /// #             r.read_exact(&mut chunk).unwrap();
    /// #             if n == 0 { break; }
    /// #             asm.push(&chunk[..n]);
    /// #             while let Some((kind, payload)) = asm.peek().unwrap() {
    /// #                 let frame = shmback_proto::frame::decode(kind, payload).unwrap();
    /// #                 if let shmback_proto::Event::Commit { seq: s, .. } = dec.feed(frame).unwrap() {
    /// #                     seq = Some(s);
    /// #                 }
    /// #                 asm.release();
    /// #             }
    /// #         }
    /// #         let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    /// #         let body = format!(r#"{{"seq":{},"snapshot":"{hex}"}}"#, seq.unwrap());
    /// #         write!(w, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).unwrap();
    /// #     }
    /// # }
    /// ```
    pub fn http(base_url: &str, http: HttpOptions, opts: OutboxOptions) -> Result<Outbox, WriteError> {
        let client = HttpClient::new(base_url, http, opts.timeout)?;
        Ok(Outbox { transport: Transport::Http(client), opts })
    }

    /// An outbox with no transport: its batches are written into any byte stream with
    /// [`Batch::write_to`] (e.g. the body of a `GET /v1/batch` answer in pull mode, as
    /// `shmback-send --serve` does); [`Batch::commit`] fails with [`WriteError::Detached`].
    pub fn detached(opts: OutboxOptions) -> Outbox {
        Outbox { transport: Transport::Detached(0), opts }
    }

    /// Starts a batch (one snapshot). Nothing is sent until [`Batch::commit`].
    pub fn batch(&mut self) -> Batch<'_> {
        let frame_size = self.frame_size();
        let route = match &mut self.transport {
            Transport::Ring { producer, path } => Route::Ring(RingChannel { producer, segment: path }),
            Transport::Http(client) => Route::Http(client),
            Transport::Detached(last) => Route::Detached(last),
        };
        Batch::new(Channel { route, labels: &self.opts.labels, timeout: self.opts.timeout, frame_size })
    }

    /// The segment's path (`None` over HTTP or detached).
    pub fn path(&self) -> Option<&Path> {
        match &self.transport {
            Transport::Ring { path, .. } => Some(path),
            _ => None,
        }
    }

    /// Ring bytes of the segment (`None` over HTTP or detached).
    pub fn ring_capacity(&self) -> Option<usize> {
        match &self.transport {
            Transport::Ring { producer, .. } => Some(producer.capacity()),
            _ => None,
        }
    }

    /// Payload bytes per DATA frame actually used.
    fn frame_size(&self) -> usize {
        let max = match &self.transport {
            Transport::Ring { producer, .. } => producer.max_payload(),
            _ => shmback_proto::stream::DEFAULT_MAX_FRAME,
        };
        self.opts.frame_size.clamp(4096, max)
    }
}
