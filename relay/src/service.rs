//! `relay run`: wire configuration, database, transports and the worker together, and stop
//! cleanly on SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::http::HttpTransport;
use crate::delivery::script::ScriptTransport;
use crate::handlers::Registry;
use crate::store::Store;
use crate::worker::{Relay, Transports};

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error(transparent)]
    Schema(#[from] crate::schema::SchemaError),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("cannot listen on admin_listen {0}: {1} (choose another address, or set admin_listen to \"\" to disable)")]
    Admin(String, #[source] std::io::Error),
}

impl ServiceError {
    /// The connection broke or the server is shutting down or starting up: worth retrying, unlike
    /// an answer (schema missing or of another version, permission denied).
    pub fn is_connection_lost(&self) -> bool {
        match self {
            ServiceError::Pool(_) => true,
            ServiceError::Schema(crate::schema::SchemaError::Query(e)) => {
                e.is_closed()
                    || e.code().is_none_or(|c| {
                        let c = c.code();
                        c.starts_with("08") || c.starts_with("57P")
                    })
            }
            _ => false,
        }
    }
}

/// The HTTP client and script runner, as configured (one per process, reused).
pub fn transports(config: &Config) -> Result<Transports, ServiceError> {
    let limit = config.response_limit_bytes as usize;
    Ok(Transports {
        http: HttpTransport::new(
            Duration::from_millis(config.http_connect_timeout_ms),
            limit,
            config.deny_private_targets,
        )?,
        script: ScriptTransport::new(limit),
    })
}

/// Build a relay from configuration: checks the database and the schema version first.
pub async fn build(config: &Config) -> Result<Relay, ServiceError> {
    let name = config.relay_name();
    let pool = crate::db::make_pool(
        &config.database_url,
        config.pool_size as usize,
        &format!("relay {name}"),
    )?;
    // The database may go away again between "it answers" and "its schema version" (a restart,
    // a failover): only a definite answer about the schema ends the start-up with an error.
    loop {
        crate::db::wait_for_database(
            &pool,
            &config.database_url,
            Duration::from_secs(u64::MAX / 4),
        )
        .await?;
        let checked = match pool.get().await {
            Ok(client) => crate::schema::check_version(&**client)
                .await
                .map_err(ServiceError::from),
            Err(e) => Err(e.into()),
        };
        match checked {
            Ok(()) => break,
            Err(e) if e.is_connection_lost() => {
                tracing::warn!(error = %e, "lost the database while checking the schema version; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
    let transports = transports(config)?;
    let mut listen_config = crate::db::parse_config(&config.database_url)?;
    listen_config.application_name(format!("relay {name} doorbell"));
    Ok(Relay {
        store: Store::new(pool, name),
        registry: Arc::new(Registry::default()),
        transports,
        options: config.worker_options(),
        listen_config,
    })
}

/// Cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        t.cancel();
    });
    token
}

/// `relay run`: the delivery loop, the admin server (when `admin_listen` is set) and retention,
/// until `shutdown`.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<(), ServiceError> {
    let metrics = crate::metrics::install();
    // Histograms keep raw samples until upkeep drains them: without a /metrics scrape the relay's
    // memory grew ~37 bytes per delivery (57 MiB after 1M). Upkeep bounds it.
    let upkeep = metrics.clone();
    let upkeep_task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    crate::metrics::describe();
    let relay = tokio::select! {
        r = build(config) => r?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    tracing::info!(
        relay = %relay.store.relay_name(),
        database = %crate::db::redact_url(&config.database_url),
        admin = %if config.admin_listen.is_empty() { "disabled" } else { config.admin_listen.as_str() },
        "relay started"
    );
    let pool = relay.store.pool().clone();
    let background = CancellationToken::new();
    let mut admin_task = None;
    if !config.admin_listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.admin_listen)
            .await
            .map_err(|e| ServiceError::Admin(config.admin_listen.clone(), e))?;
        if config.admin_token.is_empty() {
            tracing::warn!("admin_token is not set: the admin API and web page are read-only");
        }
        let state = crate::admin::AdminState {
            pool: pool.clone(),
            token: config.admin_token.as_str().into(),
            open_reads: config.admin_open_reads,
            metrics,
            sender: crate::ops::test_send::TestSender {
                transports: relay.transports.clone(),
                max_retry_after: Duration::from_millis(config.max_retry_after_ms),
            },
        };
        let stop = background.clone();
        admin_task = Some(tokio::spawn(async move {
            if let Err(e) = crate::admin::serve(listener, state, stop).await {
                tracing::error!(error = %e, "admin server failed");
            }
        }));
    }
    let retention = tokio::spawn(retain(
        pool,
        Duration::from_secs(config.retention_hours as u64 * 3600),
        background.clone(),
    ));
    relay.run(shutdown).await;
    upkeep_task.abort();
    background.cancel();
    let _ = retention.await;
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    Ok(())
}

/// Remove finished work older than the retention age, every few minutes, in small batches.
/// Dead deliveries stay until replayed or pruned on purpose.
async fn retain(pool: deadpool_postgres::Pool, age: Duration, stop: CancellationToken) {
    let every = Duration::from_secs(300);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let client = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "retention skipped: no database connection");
                continue;
            }
        };
        match crate::ops::queries::prune(&**client, age, false).await {
            Ok(v) => {
                tracing::info!(attempts = %v["attempts_removed"], events = %v["events_removed"], "retention pass")
            }
            Err(e) => tracing::warn!(error = %e, "retention pass failed"),
        }
    }
}
