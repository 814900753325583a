//! The snapshot gate: a backend wrapper that stores a batch's snapshot file only if the batch was
//! committed and every file was delivered whole.
//!
//! rustic_core's `archive()` logs a failing reader ("ignoring error") and saves the snapshot
//! anyway, without the file. A torn or invalid batch must make no snapshot at all, so the gate
//! refuses the snapshot write (which makes `archive()` fail) unless the batch ended in a valid
//! COMMIT. Packs and index written for a refused batch are unreferenced; prune removes them.

use std::sync::{Arc, Mutex};

use rustic_core::{BytesList, ErrorKind, FileType, Id, RusticError, RusticResult, WriteBackend};

use super::pump::{BatchEnd, Ring};

/// The ring of the batch whose snapshot may be written, and how that batch ended.
#[derive(Default)]
struct GateState {
    batch: Option<Arc<Ring>>,
    outcome: Option<BatchEnd>,
}

/// A handle to open and close the gate for one batch.
#[derive(Clone, Default)]
pub(crate) struct Gate(Arc<Mutex<GateState>>);

impl Gate {
    /// Opens the gate for the batch being read from `ring`.
    pub(crate) fn arm(&self, ring: Arc<Ring>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = GateState { batch: Some(ring), outcome: None };
    }

    /// Closes the gate; returns the batch's outcome if the snapshot write was attempted.
    pub(crate) fn disarm(&self) -> Option<BatchEnd> {
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        st.batch = None;
        st.outcome.take()
    }
}

/// The repository backend behind the gate.
pub(crate) struct GatedBackend {
    inner: Arc<dyn WriteBackend>,
    gate: Gate,
}

impl GatedBackend {
    /// Wraps `inner`.
    pub(crate) fn new(inner: Arc<dyn WriteBackend>, gate: Gate) -> Self {
        Self { inner, gate }
    }
}

crate::backends::forward_read_backend!(GatedBackend);

impl WriteBackend for GatedBackend {
    fn create(&self) -> RusticResult<()> {
        self.inner.create()
    }

    fn write_bytes(&self, tpe: FileType, id: &Id, cacheable: bool, buf: BytesList) -> RusticResult<()> {
        if tpe == FileType::Snapshot {
            let mut st = self.gate.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(batch) = st.batch.clone() {
                // Every file the archiver wanted is read; read the rest of the batch (skipped
                // files, COMMIT) and decide.
                let end = batch.lock().finish();
                st.outcome = Some(end.clone());
                if let BatchEnd::Failed(why, _) = end {
                    return Err(
                        RusticError::new(ErrorKind::InputOutput, "batch not stored: {why}").attach_context("why", why)
                    );
                }
            }
        }
        self.inner.write_bytes(tpe, id, cacheable, buf)
    }

    fn remove(&self, tpe: FileType, id: &Id, cacheable: bool) -> RusticResult<()> {
        self.inner.remove(tpe, id, cacheable)
    }
}
