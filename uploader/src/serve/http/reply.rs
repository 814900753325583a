//! The HTTP answer to a batch (shm-proto/PROTOCOL.md, "Over HTTP"): the status a client acts on
//! and a small JSON body with the reason.

use shmback_proto::RejectCode;

/// One answer: status, JSON body (empty for 401) and, for answers worth retrying, when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: String,
    pub(crate) retry_after: Option<u32>,
}

fn hex(id: &[u8; 32]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Reply {
    fn json(status: u16, value: serde_json::Value, retry_after: Option<u32>) -> Self {
        Reply { status, body: value.to_string(), retry_after }
    }

    /// The durable ack.
    pub(crate) fn stored(seq: u64, id: &[u8; 32]) -> Self {
        Self::json(200, serde_json::json!({ "seq": seq, "snapshot": hex(id) }), None)
    }

    fn refused(status: u16, seq: u64, code: &str, reason: &str, retry_after: Option<u32>) -> Self {
        Self::json(status, serde_json::json!({ "seq": seq, "code": code, "reason": reason }), retry_after)
    }

    /// A rejected batch: no snapshot. `too_large` marks a frame over the size limit (which the
    /// decoder reports as malformed).
    pub(crate) fn rejected(seq: u64, code: RejectCode, why: &str, too_large: bool) -> Self {
        match code {
            RejectCode::Malformed if too_large => Self::refused(413, seq, "too-large", why, None),
            RejectCode::Malformed => Self::refused(400, seq, "malformed", why, None),
            RejectCode::Aborted => Self::refused(409, seq, "aborted", why, None),
            RejectCode::TooLarge => Self::refused(413, seq, "too-large", why, None),
            RejectCode::Stalled => Self::refused(408, seq, "idle", why, None),
            RejectCode::StorageFailed => Self::refused(503, seq, "storage-failed", why, Some(30)),
            RejectCode::ShuttingDown => Self::refused(503, seq, "shutting-down", why, Some(10)),
            RejectCode::Other(_) => Self::refused(500, seq, "internal", why, Some(30)),
        }
    }

    pub(crate) fn malformed(seq: u64, why: &str) -> Self {
        Self::refused(400, seq, "malformed", why, None)
    }

    pub(crate) fn shutting_down(seq: u64) -> Self {
        let why = "the uploader is shutting down: no snapshot was made; resend when it is back";
        Self::refused(503, seq, "shutting-down", why, Some(10))
    }

    pub(crate) fn storage_failed(seq: u64, why: &str) -> Self {
        Self::refused(503, seq, "storage-failed", why, Some(30))
    }

    /// A batch resent after it was stored, older than what the uploader still remembers.
    pub(crate) fn stale(seq: u64, producer: &str, last: u64) -> Self {
        let why = format!(
            "batch {seq} is older than batch {last}, the last one stored for producer {producer}; \
             it was stored before: send a new batch"
        );
        Self::refused(409, seq, "stale", &why, None)
    }

    pub(crate) fn busy(why: &str) -> Self {
        Self::json(429, serde_json::json!({ "code": "busy", "reason": why }), Some(5))
    }

    pub(crate) fn protocol(why: &str) -> Self {
        Self::json(415, serde_json::json!({ "code": "protocol", "reason": why }), None)
    }

    pub(crate) fn bad_request(why: &str) -> Self {
        Self::json(400, serde_json::json!({ "code": "bad-request", "reason": why }), None)
    }

    pub(crate) fn not_found() -> Self {
        Self::json(404, serde_json::json!({ "code": "not-found", "reason": "no such endpoint" }), None)
    }

    pub(crate) fn method_not_allowed() -> Self {
        Self::json(405, serde_json::json!({ "code": "method", "reason": "method not allowed here" }), None)
    }

    /// No detail on purpose: a wrong token learns nothing.
    pub(crate) fn unauthorized() -> Self {
        Reply { status: 401, body: String::new(), retry_after: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rejection_has_the_status_its_client_acts_on() {
        let cases = [
            (RejectCode::Malformed, false, 400, "malformed"),
            (RejectCode::Malformed, true, 413, "too-large"),
            (RejectCode::Aborted, false, 409, "aborted"),
            (RejectCode::TooLarge, false, 413, "too-large"),
            (RejectCode::Stalled, false, 408, "idle"),
            (RejectCode::StorageFailed, false, 503, "storage-failed"),
            (RejectCode::ShuttingDown, false, 503, "shutting-down"),
        ];
        for (code, too_large, status, name) in cases {
            let r = Reply::rejected(7, code, "why", too_large);
            assert_eq!(r.status, status, "{code:?}");
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(
                (v["seq"].as_u64(), v["code"].as_str(), v["reason"].as_str()),
                (Some(7), Some(name), Some("why"))
            );
            assert_eq!(r.retry_after.is_some(), status == 503, "{code:?}");
        }
        let ok = Reply::stored(9, &[0xab; 32]);
        assert_eq!(ok.status, 200);
        assert_eq!(ok.body, format!(r#"{{"seq":9,"snapshot":"{}"}}"#, "ab".repeat(32)));
    }
}
