//! The `relay` binary. Errors are reported at this edge with anyhow.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use relay::config::Config;

#[derive(Parser)]
#[command(
    name = "relay",
    version,
    about = "Provisioning Relay: delivers row changes captured in PostgreSQL to HTTP and script handlers",
    long_about = "Provisioning Relay: SQL triggers write named events (clients.update, ...) to an outbox in the same \
transaction as the change; `relay run` delivers them to handlers with retries, per-object order and an \
execution log.\n\nConfiguration layers: defaults < --config FILE (or RELAY_CONFIG) < RELAY_* environment variables \
(and DATABASE_URL) < flags. See relay.example.toml for every key."
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// PostgreSQL connection URL (overrides DATABASE_URL / RELAY_DATABASE_URL / the file).
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Set any configuration key, e.g. --set poll_interval_ms=200 (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE", value_parser = parse_kv)]
    set: Vec<(String, String)>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay service: claim captured events and deliver them to their handlers.
    Run,
    /// Install or upgrade the provisioning schema (the same SQL as sql/install.sql). Idempotent.
    Migrate {
        /// Also create the VCS preset tables (clients, accounts, client_packages) and their events.
        #[arg(long)]
        vcs_preset: bool,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn init_logging(config: &Config) {
    let filter = std::env::var("RELAY_LOG").unwrap_or_else(|_| config.log_level.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut overrides = cli.set.clone();
    if let Some(url) = &cli.database_url {
        overrides.push(("database_url".into(), url.clone()));
    }
    let config = Config::load(cli.config.as_deref(), &env, &overrides).context("invalid configuration")?;
    init_logging(&config);

    match cli.command {
        Command::Run => {
            let shutdown = relay::service::shutdown_on_signals();
            let relay = tokio::select! {
                r = relay::service::build(&config) => r.context("cannot start the relay")?,
                _ = shutdown.cancelled() => return Ok(()),
            };
            tracing::info!(
                relay = %relay.store.relay_name(),
                database = %relay::db::redact_url(&config.database_url),
                "relay started"
            );
            relay.run(shutdown).await;
            Ok(())
        }
        Command::Migrate { vcs_preset } => {
            let (client, conn) = tokio_postgres::connect(&config.database_url, tokio_postgres::NoTls)
                .await
                .with_context(|| format!("cannot connect to {}", relay::db::redact_url(&config.database_url)))?;
            tokio::spawn(conn);
            let before = relay::schema::installed_version(&client).await?;
            relay::schema::migrate(&client).await?;
            if vcs_preset {
                relay::schema::install_vcs_preset(&client).await?;
            }
            let after = relay::schema::installed_version(&client).await?;
            match before {
                None => println!("installed provisioning schema version {}", after.unwrap_or_default()),
                Some(b) if Some(b) == after => println!("provisioning schema already at version {b}; refreshed functions"),
                Some(b) => println!("upgraded provisioning schema from version {b} to {}", after.unwrap_or_default()),
            }
            if vcs_preset {
                println!("VCS preset tables and events installed");
            }
            Ok(())
        }
    }
}
