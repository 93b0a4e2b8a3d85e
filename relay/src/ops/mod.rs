//! Operations shared by the CLI and the admin API: handlers, events, deliveries, the execution log,
//! retry/replay, status and prune. Every function returns JSON (what `--json` prints and what the
//! API serves), so the two front ends cannot drift apart.

pub mod handlers;
pub mod queries;
pub mod test_send;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum OpsError {
    /// The database refused the change (e.g. a bad handler definition: the message names the field).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("database error: {0}")]
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for OpsError {
    fn from(e: tokio_postgres::Error) -> Self {
        // Validation errors raised by the schema carry their own clear message.
        match e.as_db_error() {
            Some(db)
                if db.code().code().starts_with("23")
                    || db.code().code() == "P0001"
                    || db.code().code() == "22P02" =>
            {
                let mut msg = db.message().to_string();
                if let Some(hint) = db.hint() {
                    msg.push_str(&format!(" (hint: {hint})"));
                }
                OpsError::Refused(msg)
            }
            _ => OpsError::Db(e),
        }
    }
}

/// Parse a human duration: `30s`, `5m`, `2h`, `7d`, `500ms`, or plain milliseconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, OpsError> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| {
        OpsError::BadRequest(format!(
            "bad duration {s:?}: expected e.g. 500ms, 30s, 5m, 2h, 7d"
        ))
    })?;
    let ms = match unit {
        "" | "ms" => n,
        "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => {
            return Err(OpsError::BadRequest(format!(
                "bad duration {s:?}: unknown unit {unit:?} (ms, s, m, h, d)"
            )))
        }
    };
    Ok(std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("250").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
