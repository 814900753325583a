//! [`Progress`]: what a batch has sent so far, for progress bars and the final summary.

/// Files, bytes, and totals of a batch as it is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Entries in the manifest.
    pub entries: u64,
    /// Files whose data has been sent.
    pub files_done: u64,
    /// Files in the batch.
    pub files_total: u64,
    /// Data bytes sent.
    pub bytes_done: u64,
    /// Data bytes expected (streams of unknown size count as they arrive; files the uploader's
    /// want-list left out do not count).
    pub bytes_total: u64,
    /// File-data bytes read from the batch's sources (files, readers, in-memory data). On an
    /// unchanged re-run through a ring whose uploader answers want-lists this stays 0.
    pub bytes_read: u64,
    /// Files the uploader's want-list left out: unchanged since its parent snapshot, so never
    /// opened or read here; the snapshot takes their content from the parent.
    pub files_unchanged: u64,
    /// Bytes of those files (by their manifest sizes).
    pub bytes_unchanged: u64,
}
