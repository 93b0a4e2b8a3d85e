//! Calling handlers: the envelope, its signature, and the two transports (HTTP, script).
//! A transport never fails: every outcome, including its own errors, comes back as a [`Reply`].

pub mod envelope;
pub mod http;
pub mod script;
pub mod signing;

use std::time::Duration;

/// Bytes of a response (HTTP body, script stdout/stderr) kept for the execution log and for
/// before-stage decisions; the rest is read and discarded (bounded memory).
pub const DEFAULT_RESPONSE_LIMIT: usize = 64 * 1024;

/// One attempt to deliver one envelope.
#[derive(Debug, Clone)]
pub struct Request {
    /// Standard Webhooks `webhook-id`: stable across attempts and replays of one event × handler.
    pub webhook_id: String,
    pub event_name: String,
    pub handler_name: String,
    pub attempt: u32,
    pub body: String,
    pub timeout: Duration,
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub success: bool,
    pub http_status: Option<u16>,
    pub exit_code: Option<i32>,
    /// Response body or script stdout, truncated to the limit.
    pub response: Option<String>,
    /// Why the attempt failed (transport error, non-2xx, non-zero exit, timeout...), or stderr.
    pub error: Option<String>,
    /// From `Retry-After` on a 429/503.
    pub retry_after: Option<Duration>,
    /// The handler answered `410 Gone`: pause it.
    pub gone: bool,
    pub duration: Duration,
}

/// Keep at most `limit` bytes, cut at a character boundary, marking the cut.
/// Invalid UTF-8 and NUL bytes (which PostgreSQL text cannot hold) become U+FFFD.
pub fn truncate_text(bytes: &[u8], limit: usize, total: usize) -> String {
    let keep = &bytes[..bytes.len().min(limit)];
    let mut s = String::from_utf8_lossy(keep).replace('\0', "\u{FFFD}");
    if total > keep.len() {
        s.push_str(&format!("\n…[truncated: {total} bytes in all]"));
    }
    s
}
