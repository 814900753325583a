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
    /// Data bytes expected (streams of unknown size count as they arrive).
    pub bytes_total: u64,
}
