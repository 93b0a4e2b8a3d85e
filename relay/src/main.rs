//! The `relay` binary. Errors are reported at this edge with anyhow.

use std::io::Write;

use anyhow::Context;
use clap::Parser;

use relay::cli::{Cli, Command};
use relay::config::Config;

/// Standard error for logs, never failing. tracing-subscriber reports a failed write with
/// `eprintln!`, which panics when standard error itself is broken (a closed pipe, a full disk, a
/// log collector that went away): the task that logged would die with it. That task may be the
/// one waiting for SIGTERM, or an attempt whose outcome must be recorded. A log line that cannot
/// be written is dropped instead; the relay goes on and stops cleanly.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn init_logging(config: &Config) {
    let filter = std::env::var("RELAY_LOG").unwrap_or_else(|_| config.log_level.clone());
    // The database driver logs query parameters at debug level, and parameters can hold secrets
    // (handler signing secrets written through the API): never let it log below info.
    let filter = format!("{filter},tokio_postgres=info");
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    // Colours only for a person at a terminal: not in files, pipes or journald.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(|| LossyStderr);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Print a command's output. A reader that went away (`relay logs | head`) ends the output
/// quietly, as with other Unix tools, instead of a panic; the command's exit status stays its own.
fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write the command's output")
        }
        _ => Ok(()),
    }
}

async fn connect(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(&config.database_url, tokio_postgres::NoTls)
        .await
        .with_context(|| {
            format!(
                "cannot connect to {} (set DATABASE_URL or --database-url)",
                relay::db::redact_url(&config.database_url)
            )
        })?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match real_main(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes, without a backtrace: messages say what failed and what to do.
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    let config = relay::cli::load_config(&cli)?;
    init_logging(&config);
    let json = cli.json;

    match cli.command {
        Command::Run => {
            let shutdown = relay::service::shutdown_on_signals();
            relay::service::run(&config, shutdown)
                .await
                .context("the relay stopped with an error")?;
            Ok(())
        }
        Command::Demo { duration } => {
            let database_given = cli.database_url.is_some()
                || std::env::var_os("DATABASE_URL").is_some()
                || std::env::var_os("RELAY_DATABASE_URL").is_some()
                || config.database_url != Config::default().database_url;
            let duration = duration
                .map(|d| relay::ops::parse_duration(&d))
                .transpose()?;
            let shutdown = relay::service::shutdown_on_signals();
            relay::demo::run(&config, database_given, duration, shutdown).await
        }
        Command::Migrate { vcs_preset } => {
            let client = connect(&config).await?;
            let before = relay::schema::installed_version(&client).await?;
            relay::schema::migrate(&client).await?;
            if vcs_preset {
                relay::schema::install_vcs_preset(&client).await?;
            }
            let after = relay::schema::installed_version(&client).await?;
            match before {
                None => out(&format!(
                    "installed provisioning schema version {}\n",
                    after.unwrap_or_default()
                ))?,
                Some(b) if Some(b) == after => out(&format!(
                    "provisioning schema already at version {b}; functions refreshed\n"
                ))?,
                Some(b) => out(&format!(
                    "upgraded provisioning schema from version {b} to {}\n",
                    after.unwrap_or_default()
                ))?,
            }
            if vcs_preset {
                out("VCS preset tables and events installed\n")?;
            }
            Ok(())
        }
        Command::Handlers(relay::cli::HandlersCmd::Test { name, event_id }) => {
            let client = connect(&config).await?;
            relay::schema::check_version(&client).await?;
            let sender = relay::ops::test_send::TestSender {
                transports: relay::service::transports(&config)?,
                max_retry_after: std::time::Duration::from_millis(config.max_retry_after_ms),
            };
            let value = relay::ops::test_send::test_send(&client, &sender, &name, event_id).await?;
            if json {
                out(&format!("{}\n", serde_json::to_string_pretty(&value)?))?;
            } else {
                out(&relay::cli::render_test(&value))?;
            }
            if value["ok"] != serde_json::Value::Bool(true) {
                // (what the reply means is printed above, or in the JSON)
                anyhow::bail!("handler {name}: a delivery would not succeed");
            }
            Ok(())
        }
        command => {
            let client = connect(&config).await?;
            relay::schema::check_version(&client).await?;
            let (value, table) = relay::cli::execute(command, &client).await?;
            match (json, table) {
                (false, Some(t)) => out(&relay::cli::render_table(t, &value))?,
                _ => out(&format!("{}\n", serde_json::to_string_pretty(&value)?))?,
            }
            Ok(())
        }
    }
}
