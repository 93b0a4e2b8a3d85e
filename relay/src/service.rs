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
}

/// Build a relay from configuration: checks the database and the schema version first.
pub async fn build(config: &Config) -> Result<Relay, ServiceError> {
    let name = config.relay_name();
    let pool = crate::db::make_pool(&config.database_url, config.pool_size as usize, &format!("relay {name}"))?;
    crate::db::wait_for_database(&pool, &config.database_url, Duration::from_secs(u64::MAX / 4)).await?;
    {
        let client = pool.get().await?;
        crate::schema::check_version(&**client).await?;
    }
    let limit = config.response_limit_bytes as usize;
    let transports = Transports {
        http: HttpTransport::new(Duration::from_millis(config.http_connect_timeout_ms), limit)?,
        script: ScriptTransport::new(limit),
    };
    let mut listen_config = crate::db::parse_config(&config.database_url)?;
    listen_config.application_name(&format!("relay {name} doorbell"));
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
