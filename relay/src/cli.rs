//! The `relay` command line. Every command prints a human table by default and JSON with `--json`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::config::Config;
use crate::ops::handlers::HandlerSpec;
use crate::ops::queries::{DeliveryFilter, EventFilter, LogFilter, ReplayRequest};
use crate::ops::{self, parse_duration};

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
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// PostgreSQL connection URL (overrides DATABASE_URL / RELAY_DATABASE_URL / the file).
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// Set any configuration key, e.g. --set poll_interval_ms=200 (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub set: Vec<(String, String)>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the relay service: claim captured events and deliver them to their handlers; serve the
    /// admin API, metrics and web page on admin_listen. Stops cleanly on SIGTERM/SIGINT.
    Run,
    /// See it work: a throwaway database (or PostgreSQL cluster when DATABASE_URL is not set), the
    /// VCS preset, an example handler and a few changes, each delivery printed. Ctrl-C stops and
    /// removes everything.
    Demo {
        /// Stop by itself after this long (e.g. 30s) instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<String>,
    },
    /// Install or upgrade the provisioning schema (the same SQL as sql/install.sql). Idempotent.
    Migrate {
        /// Also create the VCS preset tables (clients, accounts, client_packages) and their 15 events.
        #[arg(long)]
        vcs_preset: bool,
    },
    /// Manage handlers (who is called for which events).
    #[command(subcommand)]
    Handlers(HandlersCmd),
    /// List and show captured events.
    #[command(subcommand)]
    Events(EventsCmd),
    /// List and show deliveries (one per event and handler) with every attempt.
    #[command(subcommand)]
    Deliveries(DeliveriesCmd),
    /// The execution log: every attempt, newest first, with filters. Page with --before-id.
    Logs(LogArgs),
    /// Retry one delivery now (dead → queued with a fresh schedule; succeeded → sent again).
    Retry {
        /// Delivery id (see `relay deliveries list` or `relay logs`).
        delivery: i64,
    },
    /// Replay deliveries to a handler by status and time range (see --dry-run).
    Replay(ReplayArgs),
    /// Backlog, oldest pending delivery and dead count per handler; relays alive.
    Status,
    /// Delete attempt logs and finished events older than an age (dead deliveries only with --dead).
    Prune {
        /// Age, e.g. 7d, 12h.
        #[arg(long, value_name = "AGE")]
        older_than: String,
        /// Also delete dead and skipped deliveries older than the age.
        #[arg(long)]
        dead: bool,
    },
}

#[derive(Subcommand)]
pub enum HandlersCmd {
    /// List handlers with backlog, dead and recent failure counts.
    List {
        /// Include archived handlers.
        #[arg(long)]
        all: bool,
    },
    /// Show one handler.
    Show { name: String },
    /// Register a handler. Example:
    /// relay handlers add crm --event 'clients.*' --http https://crm.example.com/hooks --secret-env CRM_SECRET
    Add {
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Change fields of a handler (only the flags given).
    Update {
        name: String,
        /// New name.
        #[arg(long)]
        rename: Option<String>,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Enable: deliver (captured and delivered).
    Enable { name: String },
    /// Disable: events are no longer captured for it.
    Disable { name: String },
    /// Pause: events are captured and held; delivered on resume.
    Pause { name: String },
    /// Resume a paused handler.
    Resume { name: String },
    /// Archive: hidden, not captured.
    Archive { name: String },
    /// Delete a handler and its queued and dead deliveries (the execution log is kept).
    Remove { name: String },
    /// Send one event to a handler now, as a delivery would (envelope, headers, signature,
    /// timeout), and say what the relay would make of the reply; exits non-zero if a delivery
    /// would not succeed. Nothing is written (no attempt logged, no pause, no decision applied);
    /// any status. The event: --event-id, else the newest stored one it subscribes to, else a
    /// sample of a declared one (object id 0, empty data). The webhook-id is a fresh test_... id.
    Test {
        name: String,
        /// A stored event to send (see `relay events list`).
        #[arg(long)]
        event_id: Option<i64>,
    },
}

#[derive(Args, Default)]
pub struct SpecArgs {
    /// Event name or pattern (clients.*); repeatable.
    #[arg(long = "event", value_name = "EVENT")]
    pub events: Vec<String>,
    /// HTTP(S) handler URL.
    #[arg(long, conflicts_with = "script")]
    pub http: Option<String>,
    /// Script handler: absolute path of an executable.
    #[arg(long)]
    pub script: Option<String>,
    /// Script argument; repeatable.
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// after (default) or before (may modify or forbid the change).
    #[arg(long)]
    pub stage: Option<String>,
    /// Lower runs first (default 100).
    #[arg(long)]
    pub priority: Option<i32>,
    /// Attempt timeout, e.g. 15s (default).
    #[arg(long)]
    pub timeout: Option<String>,
    /// Delays between attempts, comma-separated, e.g. 5s,5m,30m,2h. Default: about a day.
    #[arg(long, value_name = "DELAYS")]
    pub retry_schedule: Option<String>,
    /// Extra HTTP header NAME=VALUE; repeatable.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_kv)]
    pub headers: Vec<(String, String)>,
    /// Signing secret (prefer --secret-env: arguments are visible to other local users). While
    /// rotating: the new and the old secret separated by a space; each request is signed with both.
    #[arg(long)]
    pub secret: Option<String>,
    /// Read the signing secret from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub secret_env: Option<String>,
    /// Most deliveries in flight at once (default 16).
    #[arg(long)]
    pub max_in_flight: Option<i32>,
    /// Payload format: jerasoft (default) or full.
    #[arg(long)]
    pub format: Option<String>,
    /// Most attempts started per second, by each relay process (0: no limit, the default); for a
    /// receiver with a request quota.
    #[arg(long, value_name = "PER_SECOND", allow_negative_numbers = true)]
    pub rate_limit: Option<i32>,
    /// HTTP statuses (http) or exit codes (script) not to retry, comma-separated, e.g. 400,422:
    /// a failed attempt ending with one makes the delivery dead at once. '' clears the list.
    #[arg(long, value_name = "CODES")]
    pub give_up_on: Option<String>,
    /// Status: enabled (default), paused, disabled, archived.
    #[arg(long)]
    pub status: Option<String>,
}

#[derive(Subcommand)]
pub enum EventsCmd {
    /// Captured events, newest first.
    List {
        /// Event name or pattern.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        object: Option<String>,
        /// Before-stage outcome: allowed, modified, forbidden, conflict, dead, failed.
        #[arg(long)]
        decision: Option<String>,
        /// From this time (RFC 3339, date, or age like 2h).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        before_id: Option<i64>,
    },
    /// One event with its rows, deliveries and attempts.
    Show { id: i64 },
}

#[derive(Subcommand)]
pub enum DeliveriesCmd {
    /// Unfinished and dead deliveries, newest first.
    List {
        #[arg(long)]
        handler: Option<String>,
        /// waiting, pending, running, dead, skipped
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        object: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        before_id: Option<i64>,
    },
    /// One delivery with every attempt's request and response.
    Show { id: i64 },
}

#[derive(Args)]
pub struct LogArgs {
    #[arg(long)]
    pub handler: Option<String>,
    /// Event name or pattern.
    #[arg(long)]
    pub event: Option<String>,
    /// success or fail
    #[arg(long)]
    pub status: Option<String>,
    /// Substring of the error text.
    #[arg(long)]
    pub error: Option<String>,
    #[arg(long)]
    pub object: Option<String>,
    /// From this time (RFC 3339, date, or age like 2h).
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long)]
    pub until: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    /// Next page: pass the smallest id of the previous page.
    #[arg(long)]
    pub before_id: Option<i64>,
}

#[derive(Args)]
pub struct ReplayArgs {
    #[arg(long)]
    pub handler: String,
    /// dead (default): requeue dead deliveries; success / fail: re-send events that had such an
    /// attempt; all: every subscribed event in the range, also those captured before the handler existed.
    #[arg(long, default_value = "dead")]
    pub status: String,
    /// Event name or pattern.
    #[arg(long)]
    pub event: Option<String>,
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long)]
    pub until: Option<String>,
    /// Only count what would be replayed.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

impl SpecArgs {
    fn into_spec(self, name: Option<String>) -> anyhow::Result<HandlerSpec> {
        let (kind, target) = match (self.http, self.script) {
            (Some(u), None) => (Some("http".to_string()), Some(u)),
            (None, Some(p)) => (Some("script".to_string()), Some(p)),
            _ => (None, None),
        };
        let secret =
            match (self.secret, self.secret_env) {
                (Some(s), _) => Some(s),
                (None, Some(var)) => Some(std::env::var(&var).with_context(|| {
                    format!("--secret-env: environment variable {var} is not set")
                })?),
                _ => None,
            };
        let timeout_ms = self
            .timeout
            .map(|t| parse_duration(&t).map(|d| d.as_millis().min(i32::MAX as u128) as i32))
            .transpose()
            .map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
        let retry_schedule_ms = self
            .retry_schedule
            .map(|s| {
                s.split(',')
                    .filter(|p| !p.trim().is_empty())
                    .map(|p| parse_duration(p).map(|d| d.as_millis().min(i32::MAX as u128) as i32))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()
            .map_err(|e| anyhow::anyhow!("--retry-schedule: {e}"))?;
        let give_up_on = self
            .give_up_on
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        p.parse::<i32>()
                            .map_err(|_| anyhow::anyhow!("--give-up-on: {p:?} is not a number"))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        Ok(HandlerSpec {
            name,
            events: (!self.events.is_empty()).then_some(self.events),
            kind,
            target,
            args: (!self.args.is_empty()).then_some(self.args),
            stage: self.stage,
            priority: self.priority,
            status: self.status,
            timeout_ms,
            retry_schedule_ms,
            headers: (!self.headers.is_empty()).then(|| {
                self.headers
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect()
            }),
            secret,
            max_in_flight: self.max_in_flight,
            format: self.format,
            rate_limit_per_s: self.rate_limit,
            give_up_on,
        })
    }
}

/// Run a command other than `run`/`migrate` against the database; returns what to print.
pub async fn execute(
    command: Command,
    client: &tokio_postgres::Client,
) -> anyhow::Result<(Value, Option<Table>)> {
    use Command::*;
    let out = match command {
        Handlers(HandlersCmd::List { all }) => (
            ops::handlers::list(client, all).await?,
            Some(Table::Handlers),
        ),
        Handlers(HandlersCmd::Show { name }) => (ops::handlers::get(client, &name).await?, None),
        Handlers(HandlersCmd::Add { name, spec }) => (
            ops::handlers::add(client, &spec.into_spec(Some(name))?).await?,
            None,
        ),
        Handlers(HandlersCmd::Update { name, rename, spec }) => (
            ops::handlers::update(client, &name, &spec.into_spec(rename)?).await?,
            None,
        ),
        Handlers(HandlersCmd::Enable { name }) => (
            ops::handlers::set_status(client, &name, "enable").await?,
            None,
        ),
        Handlers(HandlersCmd::Disable { name }) => (
            ops::handlers::set_status(client, &name, "disable").await?,
            None,
        ),
        Handlers(HandlersCmd::Pause { name }) => (
            ops::handlers::set_status(client, &name, "pause").await?,
            None,
        ),
        Handlers(HandlersCmd::Resume { name }) => (
            ops::handlers::set_status(client, &name, "resume").await?,
            None,
        ),
        Handlers(HandlersCmd::Archive { name }) => (
            ops::handlers::set_status(client, &name, "archive").await?,
            None,
        ),
        Handlers(HandlersCmd::Remove { name }) => {
            (ops::handlers::remove(client, &name).await?, None)
        }
        Events(EventsCmd::List {
            name,
            object,
            decision,
            since,
            until,
            limit,
            before_id,
        }) => (
            ops::queries::events(
                client,
                &EventFilter {
                    name,
                    object,
                    decision,
                    since,
                    until,
                    limit: Some(limit),
                    before_id,
                },
            )
            .await?,
            Some(Table::Events),
        ),
        Events(EventsCmd::Show { id }) => (ops::queries::event(client, id).await?, None),
        Deliveries(DeliveriesCmd::List {
            handler,
            status,
            object,
            limit,
            before_id,
        }) => (
            ops::queries::deliveries(
                client,
                &DeliveryFilter {
                    handler,
                    status,
                    object,
                    limit: Some(limit),
                    before_id,
                },
            )
            .await?,
            Some(Table::Deliveries),
        ),
        Deliveries(DeliveriesCmd::Show { id }) => (ops::queries::delivery(client, id).await?, None),
        Logs(a) => (
            ops::queries::logs(
                client,
                &LogFilter {
                    handler: a.handler,
                    event: a.event,
                    status: a.status,
                    error: a.error,
                    object: a.object,
                    since: a.since,
                    until: a.until,
                    limit: Some(a.limit),
                    before_id: a.before_id,
                },
            )
            .await?,
            Some(Table::Logs),
        ),
        Retry { delivery } => (ops::queries::retry(client, delivery).await?, None),
        Replay(a) => (
            ops::queries::replay(
                client,
                &ReplayRequest {
                    handler: a.handler,
                    status: Some(a.status),
                    event: a.event,
                    since: a.since,
                    until: a.until,
                    dry_run: a.dry_run,
                },
            )
            .await?,
            None,
        ),
        Status => (ops::queries::status(client).await?, Some(Table::Status)),
        Prune { older_than, dead } => (
            ops::queries::prune(client, parse_duration(&older_than)?, dead).await?,
            None,
        ),
        Run | Demo { .. } | Migrate { .. } | Handlers(HandlersCmd::Test { .. }) => {
            unreachable!("handled by the caller")
        }
    };
    Ok(out)
}

/// Table layouts for list outputs.
#[derive(Debug, Clone, Copy)]
pub enum Table {
    Handlers,
    Events,
    Deliveries,
    Logs,
    Status,
}

impl Table {
    fn columns(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Table::Handlers => &[
                ("NAME", "name"),
                ("STATUS", "status"),
                ("PRIO", "priority"),
                ("STAGE", "stage"),
                ("EVENTS", "events"),
                ("TARGET", "target"),
                ("BACKLOG", "backlog"),
                ("DEAD", "dead"),
                ("FAIL/24H", "failures_24h"),
            ],
            Table::Events => &[
                ("ID", "id"),
                ("DATE", "changed_at"),
                ("EVENT", "name"),
                ("OBJECT", "object_id"),
                ("DECISION", "decision"),
                ("UNFINISHED", "unfinished"),
                ("DATA", "data"),
            ],
            Table::Deliveries => &[
                ("ID", "id"),
                ("EVENT", "event"),
                ("HANDLER", "handler"),
                ("OBJECT", "object_id"),
                ("STATUS", "status"),
                ("ATTEMPTS", "attempts"),
                ("NEXT", "next_attempt_at"),
                ("LAST ERROR", "last_error"),
            ],
            Table::Logs => &[
                ("ID", "id"),
                ("STATUS", "status"),
                ("DATE", "date"),
                ("EVENT", "event"),
                ("HANDLER", "handler"),
                ("OBJECT", "object_id"),
                ("HTTP/EXIT", "http_status"),
                ("MS", "duration_ms"),
                ("RESPONSE/ERROR", "message"),
            ],
            Table::Status => &[
                ("HANDLER", "name"),
                ("STATUS", "status"),
                ("BACKLOG", "backlog"),
                ("IN FLIGHT", "in_flight"),
                ("DEAD", "dead"),
                ("OLDEST PENDING (s)", "oldest_pending_age_s"),
                ("CIRCUIT", "circuit_open"),
            ],
        }
    }
}

fn cell(v: &Value) -> String {
    let s = match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    let s = s.replace(['\n', '\r', '\t'], " ");
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(59).collect::<String>())
    } else {
        s
    }
}

/// A handler's open circuit breakers (one per relay that holds its deliveries), as
/// "open on r1 since 12:03:05, next probe 12:03:15"; "-" when none is open.
fn circuit_cell(open: &Value) -> String {
    let time = |v: &Value| {
        v.as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map_or("?".to_string(), |t| {
                t.with_timezone(&chrono::Local)
                    .format("%H:%M:%S")
                    .to_string()
            })
    };
    let parts: Vec<String> = open
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    format!(
                        "open on {} since {}, next probe {}",
                        c["relay"].as_str().unwrap_or("?"),
                        time(&c["since"]),
                        time(&c["next_probe_at"])
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join("; ")
    }
}

/// Render rows as an aligned text table.
pub fn render_table(table: Table, value: &Value) -> String {
    let (rows, header): (Vec<Value>, String) = match table {
        Table::Status => {
            let head = format!(
                "backlog: {}  dead: {}  oldest pending: {}  relays alive: {}  events captured: {}\n\n",
                value["backlog"], value["dead"],
                // "-" when nothing is pending (not "-s")
                value["oldest_pending_age_s"].as_f64().map_or("-".to_string(), |s| format!("{s}s")),
                value["relays_alive"], value["events_captured"]
            );
            // Problems come first: they mean events are silently not captured.
            let problems = value["capture_problems"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let head = if problems.is_empty() {
                head
            } else {
                let list: String = problems
                    .iter()
                    .map(|p| format!("  - {}\n", p.as_str().unwrap_or_default()))
                    .collect();
                format!("capture problems:\n{list}\n{head}")
            };
            let head = if value["ddl_event_trigger"] == Value::Bool(false) {
                format!(
                    "note: the event trigger provisioning_refresh_on_ddl is missing or disabled: ALTER TABLE of a \
                     captured table is not followed (renaming a column a condition reads breaks the table's writes) \
                     and update capture fires on every UPDATE; run install.sql as a superuser, or ALTER EVENT \
                     TRIGGER provisioning_refresh_on_ddl ENABLE\n\n{head}"
                )
            } else {
                head
            };
            (
                value["handlers"].as_array().cloned().unwrap_or_default(),
                head,
            )
        }
        _ => (value.as_array().cloned().unwrap_or_default(), String::new()),
    };
    let cols = table.columns();
    let mut cells: Vec<Vec<String>> = vec![cols.iter().map(|(h, _)| h.to_string()).collect()];
    for r in &rows {
        cells.push(
            cols.iter()
                .map(|(h, k)| {
                    if *h == "HTTP/EXIT" {
                        if r["http_status"].is_null() {
                            cell(&r["exit_code"])
                        } else {
                            cell(&r["http_status"])
                        }
                    } else if *h == "CIRCUIT" {
                        circuit_cell(&r[*k])
                    } else {
                        cell(&r[*k])
                    }
                })
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..cols.len())
        .map(|i| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = header;
    for r in &cells {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

/// Load configuration from the command line's layers.
pub fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut overrides = cli.set.clone();
    if let Some(url) = &cli.database_url {
        overrides.push(("database_url".into(), url.clone()));
    }
    Config::load(cli.config.as_deref(), &env, &overrides).context("invalid configuration")
}

/// `relay handlers test` for a person: what was sent, what came back, what it means.
pub fn render_test(v: &Value) -> String {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    };
    let h = &v["handler"];
    let e = &v["event"];
    let r = &v["reply"];
    let mut out = format!(
        "handler   {} ({}, {} stage) -> {}\n",
        s(&h["name"]),
        s(&h["status"]),
        s(&h["stage"]),
        s(&h["target"])
    );
    out.push_str(&format!(
        "event     {}, object {}: {}\n",
        s(&e["name"]),
        s(&e["object_id"]),
        s(&e["source"])
    ));
    let body = s(&v["request"]["body"]);
    out.push_str(&format!(
        "sent      {} bytes, webhook-id {}{}\n          {}\n",
        body.len(),
        s(&v["request"]["webhook_id"]),
        if v["request"]["signed"] == Value::Bool(true) {
            ", signed"
        } else {
            ""
        },
        body
    ));
    let status = match (&r["http_status"], &r["exit_code"]) {
        (Value::Number(n), _) => format!("HTTP {n}"),
        (_, Value::Number(n)) => format!("exit {n}"),
        _ => "no answer".to_string(),
    };
    out.push_str(&format!(
        "reply     {status} in {} ms\n",
        s(&r["duration_ms"])
    ));
    if !r["response"].is_null() {
        out.push_str(&format!("response  {}\n", s(&r["response"])));
    }
    if !r["error"].is_null() {
        out.push_str(&format!("error     {}\n", s(&r["error"])));
    }
    if !v["decision"].is_null() {
        out.push_str(&format!("decision  {}\n", v["decision"]));
    }
    out.push_str(&format!("=> {}\n", s(&v["meaning"])));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_cell_names_each_relay_holding_the_handler() {
        assert_eq!(circuit_cell(&Value::Null), "-");
        let open = serde_json::json!([
            {"relay": "r1", "since": "2026-12-07T10:00:00Z", "next_probe_at": "2026-12-07T10:00:05Z"},
            {"relay": "r2", "since": "2026-12-07T10:00:01Z", "next_probe_at": null}
        ]);
        let text = circuit_cell(&open);
        let local = |t: &str| {
            chrono::DateTime::parse_from_rfc3339(t)
                .unwrap()
                .with_timezone(&chrono::Local)
                .format("%H:%M:%S")
                .to_string()
        };
        assert_eq!(
            text,
            format!(
                "open on r1 since {}, next probe {}; open on r2 since {}, next probe ?",
                local("2026-12-07T10:00:00Z"),
                local("2026-12-07T10:00:05Z"),
                local("2026-12-07T10:00:01Z")
            )
        );
    }
}
