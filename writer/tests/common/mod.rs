//! A test consumer built on shm-proto's decoder: receives one batch whole and validated.
#![allow(dead_code)]

use std::time::Duration;

use shmback_proto::batch::Event;
use shmback_proto::{BatchDecoder, Begin, Consumer, Entry, EntryKind, RingConfig, Segment, SegmentOptions};

pub const T: Duration = Duration::from_secs(20);

pub fn opts(ring: usize) -> SegmentOptions {
    SegmentOptions {
        capacity: Some(ring),
        ring: RingConfig { tick: Duration::from_millis(20), ..RingConfig::default() },
        ..SegmentOptions::default()
    }
}

#[derive(Debug)]
pub enum Outcome {
    Commit,
    Abort(String),
}

#[derive(Debug)]
pub struct Received {
    pub begin: Begin,
    pub entries: Vec<Entry>,
    /// Data of each file, in manifest order of the files.
    pub data: Vec<Vec<u8>>,
    pub outcome: Outcome,
}

impl Received {
    /// Data of the file at `path`.
    pub fn file(&self, path: &[u8]) -> &[u8] {
        let idx = self
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .position(|e| e.path == path)
            .unwrap_or_else(|| panic!("no file {:?}", String::from_utf8_lossy(path)));
        &self.data[idx]
    }
    pub fn entry(&self, path: &[u8]) -> &Entry {
        self.entries
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("no entry {:?}", String::from_utf8_lossy(path)))
    }
}

/// Receives the next batch (skipping frames outside a batch). `on_manifest` runs once the manifest
/// is complete, before any data is read.
pub fn receive(c: &mut Consumer<Segment>, mut on_manifest: impl FnMut(&[Entry])) -> Result<Received, String> {
    let mut dec = BatchDecoder::new();
    let mut got: Option<Received> = None;
    let attach_by = std::time::Instant::now() + T;
    loop {
        let f = match c.recv(T) {
            // Before the first frame, the previous producer of a reused segment may still be the
            // one recorded (gone) while the next one is starting: wait for it to attach.
            Err(shmback_proto::RingError::PeerGone { .. })
                if got.is_none() && std::time::Instant::now() < attach_by =>
            {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            r => r.map_err(|e| e.to_string())?,
        };
        let frame = f.decode().map_err(|e| e.to_string())?;
        let ev = dec.feed(frame).map_err(|e| e.to_string())?;
        let r = got.as_mut();
        match ev {
            Event::Begin { begin, .. } => {
                got = Some(Received { begin, entries: vec![], data: vec![], outcome: Outcome::Commit })
            }
            Event::Entry { entry, .. } => r.unwrap().entries.push(entry),
            Event::EndOfManifest { files, .. } => {
                let r = r.unwrap();
                r.data = vec![Vec::new(); files as usize];
                on_manifest(&r.entries);
            }
            Event::Data { file, bytes, .. } => r.unwrap().data[file as usize].extend_from_slice(bytes),
            Event::EndOfFile { .. } | Event::Skipped(_) | Event::WantAsked | Event::Wanted { .. } => {}
            Event::Commit { .. } => {
                f.release();
                return Ok(got.unwrap());
            }
            Event::Abort { reason, .. } => {
                f.release();
                let mut r = got.unwrap();
                r.outcome = Outcome::Abort(reason);
                return Ok(r);
            }
        }
        f.release();
    }
}
