//! Database connections: one pool per relay (claims, completions, admin), and a dedicated
//! connection for LISTEN (pooled connections cannot listen).

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use thiserror::Error;
use tokio_postgres::NoTls;

#[derive(Debug, Error)]
pub enum DbError {
    #[error(
        "invalid database URL: {0} (expected postgres://user[:password]@host[:port]/database)"
    )]
    BadUrl(#[source] tokio_postgres::Error),
    #[error("cannot build the connection pool: {0}")]
    Pool(String),
    #[error("cannot reach the database: {0}")]
    Unreachable(#[source] deadpool_postgres::PoolError),
}

/// Parse a URL or key=value connection string.
pub fn parse_config(url: &str) -> Result<tokio_postgres::Config, DbError> {
    url.parse::<tokio_postgres::Config>()
        .map_err(DbError::BadUrl)
}

/// `url` (postgres://…/db?params) with its database name replaced by `db`.
pub fn url_with_db(url: &str, db: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// The password-free form of a connection string, for logs and messages.
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            return format!("{}{}{}", &url[..scheme_end + 3], masked, &rest[at..]);
        }
        return url.to_string();
    }
    // key=value form: mask password=...
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A pool whose connections run relay transactions with `synchronous_commit = off`: a claim lost in
/// a crash only means a redelivery, never a lost event. Completions switch back to a synchronous
/// commit (`Store::complete`): an acknowledgement lost after the object's next event was sent
/// would be redelivered after it, out of order.
pub fn make_pool(url: &str, size: usize, application_name: &str) -> Result<Pool, DbError> {
    let mut cfg = parse_config(url)?;
    cfg.application_name(application_name);
    // JIT compilation of the claim statement (its estimated cost crosses jit_above_cost on a big
    // backlog) cost more than the query itself: measured 255 vs 5,514 deliveries/s on a 1M drain.
    // Index probes only: every statement of the relay is built as "a few hundred ids, each looked
    // up by index", and the queue's statistics are stale by nature (it goes from empty to a
    // million rows and back between two ANALYZEs). Planned as "nearly empty", a claim scanned the
    // whole queue once per candidate (740 ms per claim; the relay fell 10 s behind at 2,000
    // events/s), and a hash or merge join would read the whole queue for 500 ids.
    // Options from the database URL are kept (appended to).
    let ours = "-c synchronous_commit=off -c jit=off -c enable_seqscan=off -c enable_hashjoin=off -c enable_mergejoin=off";
    let options = match cfg.get_options() {
        Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {ours}"),
        _ => ours.to_string(),
    };
    cfg.options(&options);
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(5));
    }
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(30));
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(10)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Wait until the database answers, retrying with backoff and saying so; gives up after `max_wait`.
pub async fn wait_for_database(pool: &Pool, url: &str, max_wait: Duration) -> Result<(), DbError> {
    let redacted = redact_url(url);
    let attempt = || async { pool.get().await.map(|_| ()) };
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_total_delay(Some(max_wait))
                .without_max_times()
                .with_jitter(),
        )
        .notify(|e, next| {
            tracing::warn!(database = %redacted, error = %e, "database unreachable; retrying in {:?}", next);
        })
        .await
        .map_err(DbError::Unreachable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            url_with_db("postgres://u@h:5432/a", "b"),
            "postgres://u@h:5432/b"
        );
        assert_eq!(
            url_with_db("postgres://u@h/a?sslmode=disable", "b"),
            "postgres://u@h/b?sslmode=disable"
        );
        assert_eq!(url_with_db("postgres://u@h", "b"), "postgres://u@h/b");
        assert_eq!(
            redact_url("postgres://u:secret@h/a"),
            "postgres://u:***@h/a"
        );
        assert_eq!(
            redact_url("host=h password=secret dbname=a"),
            "host=h password=*** dbname=a"
        );
    }
}
