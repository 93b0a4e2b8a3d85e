//! Provisioning Relay benchmark: one command, real PostgreSQL, the real release `relay` binary.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example bench -- [--events N] [--rate-seconds S] [--skip-rates]
//!                                        [--skip-capture-ratio] [--skip-raw-limits] ...
//! cargo run --release --example bench -- --help
//! ```
//!
//! It creates its own database (`--db-name`, default `relay_bench`) on the server of
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`), installs the schema and
//! the VCS preset exactly as `relay migrate --vcs-preset` does, and drops the database at the end.
//! Phases, in the order they run:
//!
//! 1. raw limits (d): (1) the outbox's own claim + complete rate, no HTTP: a backlog of
//!    `--raw-events` deliveries is drained by looping `relay::store::Store::claim` (500 at a time)
//!    and `Store::complete` (`Action::Done` plus the attempt log the relay writes) — the relay's
//!    exact SQL; (2) the in-process receiver's raw POST rate from one `reqwest::Client` at
//!    concurrency 128.
//! 2. backlog drain (a): `--events` captured events (INSERTs into `clients` in chunks of 10,000)
//!    for one enabled HTTP handler pointing at an in-process axum receiver; then `relay run` is
//!    started as a separate process and timed until every delivery is done.
//! 3. fixed-rate latency (b): autocommit single-row UPDATEs at each `--rates` value for
//!    `--rate-seconds`; the receiver measures receipt time − the envelope's `event.dt`.
//! 4. capture cost (e): pgbench at 8 writers on `clients` (captured, relay running) and on an
//!    identical `clients_plain` without triggers, alternating.
//!
//! Throughout, the relay's VmRSS is sampled (c), and CPU time is split between the relay, the
//! PostgreSQL processes, this bench (receiver + producers) and everything else on the machine.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::Router;
use chrono::{DateTime, Utc};
use clap::{Parser, ValueEnum};
use tokio_postgres::{Client, NoTls};

use relay::delivery::envelope::{render, Event, Format};
use relay::store::{Action, AttemptLog, Completion, Store, Want};

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Provisioning Relay benchmark: backlog drain, fixed-rate latency, relay RSS, raw limits, capture cost",
    long_about = "Provisioning Relay benchmark against a real PostgreSQL and the release relay binary.\n\n\
Build first:  cargo build --release\n\
Run:          cargo run --release --example bench -- [OPTIONS]\n\n\
Creates (and finally drops) its own database --db-name on the server of --database-url. Phases:\n\
  (d) raw limits: Store::claim + Store::complete on a --raw-events backlog (no HTTP), and the\n\
      receiver's raw POST rate (one reqwest Client, --post-concurrency, --post-seconds)\n\
  (a) backlog drain: --events captured events, one HTTP handler (--max-in-flight) -> in-process\n\
      receiver; `relay run` started as a process and timed until every delivery is done\n\
  (b) fixed-rate latency: single-row UPDATEs at each of --rates per second for --rate-seconds;\n\
      latency = receipt time - envelope event.dt; kept up = all received within --keep-up-grace-ms\n\
  (e) capture cost: pgbench -c 8 on clients (captured, relay running) vs clients_plain, alternating\n\
  (c) relay peak VmRSS sampled throughout, and VmHWM at the end.\n\n\
Targets: drain >= 10,000 events/s and >= 50 % of the lower raw limit; 500/s p50 <= 5 ms, p99 <= 50 ms;\n\
keeps up at 2,000/s; relay peak RSS <= 64 MiB draining 1,000,000 events; capture TPS ratio >= 0.85.\n\n\
The 1M-event RSS check:  cargo run --release --example bench -- --events 1000000 --skip-rates --skip-capture-ratio"
)]
struct Args {
    /// PostgreSQL server (any database on it; the bench creates its own).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Name of the scratch database (dropped and re-created at start, dropped at the end).
    #[arg(long, default_value = "relay_bench")]
    db_name: String,
    /// Events in the drain backlog (phase a).
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Backlog shape: `creates` = N clients inserted (N clients.create events, one per object);
    /// `mixed` = N/4 clients inserted then updated 3 times (4 ordered events per object).
    #[arg(long, value_enum, default_value_t = Backlog::Creates)]
    backlog: Backlog,
    /// Rows per INSERT/UPDATE statement when filling a backlog.
    #[arg(long, default_value_t = 10_000)]
    chunk: u64,
    /// The bench handler's max_in_flight.
    #[arg(long, default_value_t = 128)]
    max_in_flight: i32,
    /// Seconds per fixed-rate phase (b).
    #[arg(long, default_value_t = 30)]
    rate_seconds: u64,
    /// Production rates of the fixed-rate phases, events per second.
    #[arg(long, value_delimiter = ',', default_values_t = vec![500u32, 2000])]
    rates: Vec<u32>,
    /// Producer connections (autocommit UPDATEs) in the fixed-rate phases.
    #[arg(long, default_value_t = 16)]
    producers: usize,
    /// A phase "kept up" if all its events were received within this long after it ended.
    #[arg(long, default_value_t = 2000)]
    keep_up_grace_ms: u64,
    /// Backlog of the raw claim+complete limit (d1).
    #[arg(long, default_value_t = 50_000)]
    raw_events: u64,
    /// Claim limit per Store::claim in the raw limit (d1).
    #[arg(long, default_value_t = 500)]
    raw_batch: i32,
    /// Duration of the raw POST rate measurement (d2), seconds.
    #[arg(long, default_value_t = 5)]
    post_seconds: u64,
    /// Concurrent requests in the raw POST rate measurement (d2).
    #[arg(long, default_value_t = 128)]
    post_concurrency: usize,
    /// pgbench duration per run (e), seconds.
    #[arg(long, default_value_t = 15)]
    pgbench_seconds: u64,
    /// pgbench writers (-c and -j) (e).
    #[arg(long, default_value_t = 8)]
    pgbench_clients: u32,
    /// Rounds of (plain, captured) pgbench runs (e); the order alternates.
    #[arg(long, default_value_t = 2)]
    pgbench_rounds: u32,
    /// Rows the pgbench script updates (ids 1..=rows); default min(clients, 100000).
    #[arg(long)]
    pgbench_rows: Option<u64>,
    /// Balances of the updated rows are spread over -N..N before each run (e); each update adds
    /// -10..10, so an event (balance crossing zero) fires on about 4.7 % of updates at the default
    /// 50 and about 0.5 % at 500: how much capture costs depends on how many changes emit events.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    balance_spread: u32,
    /// The pgbench executable.
    #[arg(long, default_value = "pgbench")]
    pgbench: String,
    /// The relay binary (default: target/release/relay next to this example's directory).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Extra relay configuration, passed as `--set KEY=VALUE` (repeatable), e.g. claim_batch=1000.
    #[arg(long = "relay-set", value_name = "KEY=VALUE")]
    relay_set: Vec<String>,
    /// Per-database setting for the bench database (ALTER DATABASE .. SET), repeatable; e.g.
    /// session_preload_libraries=auto_explain to see the relay's plans in the server log.
    #[arg(long = "db-set", value_name = "KEY=VALUE")]
    db_set: Vec<String>,
    /// Give up on the drain after this many seconds (default: 120 + 1 s per 1,000 events).
    #[arg(long)]
    drain_timeout: Option<u64>,
    /// Skip the raw limits (d).
    #[arg(long)]
    skip_raw_limits: bool,
    /// Skip the fixed-rate latency phases (b).
    #[arg(long)]
    skip_rates: bool,
    /// Skip the pgbench capture-cost phase (e).
    #[arg(long)]
    skip_capture_ratio: bool,
    /// Stop the relay before the capture-cost phase (e): its captured runs then measure the
    /// triggers alone (deliveries accumulate, no relay wakes up, no doorbell NOTIFY).
    #[arg(long)]
    pgbench_without_relay: bool,
    /// Keep the database afterwards for inspection.
    #[arg(long)]
    keep_db: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backlog {
    Creates,
    Mixed,
}

static START: OnceLock<Instant> = OnceLock::new();
/// The bench database's name: its backends are told apart from the server's other processes.
static BENCH_DB: OnceLock<String> = OnceLock::new();
/// Set when the bench drops its database: its connections then end on purpose.
static CLOSING: AtomicBool = AtomicBool::new(false);

macro_rules! say {
    ($($arg:tt)*) => {{
        let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
        println!("[{t:7.1}s] {}", format!($($arg)*));
    }};
}

// ------------------------------------------------------------------------------------------------
// The receiver: axum on 127.0.0.1:0, answers 200 "ok", counts, optionally records latencies.
// ------------------------------------------------------------------------------------------------

/// A request seen by the receiver while recording: times in µs since the epoch.
#[derive(Clone, Copy)]
struct Sample {
    /// The envelope's `event.dt` (the change time stored by the capture trigger).
    dt: i64,
    /// Receipt.
    recv: i64,
    /// The producer's sequence number (`#<n>` at the end of the name it wrote), or u64::MAX.
    seq: u64,
}

#[derive(Default)]
struct Receiver {
    count: AtomicU64,
    first_us: AtomicI64,
    last_us: AtomicI64,
    record: AtomicBool,
    /// One per request while `record` is set.
    samples: Mutex<Vec<Sample>>,
    unparsed: AtomicU64,
}

impl Receiver {
    async fn start() -> Result<(Arc<Receiver>, String)> {
        let r = Arc::new(Receiver::default());
        let app = Router::new().fallback(receive).with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("receiver stopped: {e}");
            }
        });
        Ok((r, format!("http://{addr}/bench")))
    }

    fn reset_counts(&self) {
        self.count.store(0, Relaxed);
        self.first_us.store(0, Relaxed);
        self.last_us.store(0, Relaxed);
    }
}

async fn receive(State(r): State<Arc<Receiver>>, body: Bytes) -> &'static str {
    let now = Utc::now().timestamp_micros();
    r.count.fetch_add(1, Relaxed);
    let _ = r.first_us.compare_exchange(0, now, Relaxed, Relaxed);
    r.last_us.fetch_max(now, Relaxed);
    if r.record.load(Relaxed) {
        match envelope_dt_us(&body) {
            Some(dt) => {
                let seq = body_seq(&body).unwrap_or(u64::MAX);
                r.samples
                    .lock()
                    .expect("samples")
                    .push(Sample { dt, recv: now, seq });
            }
            None => {
                r.unparsed.fetch_add(1, Relaxed);
            }
        }
    }
    "ok"
}

/// The digits after the last `#` of the body (the fixed-rate producers end the name with `#<n>`).
fn body_seq(body: &[u8]) -> Option<u64> {
    let at = body.iter().rposition(|&b| b == b'#')?;
    let digits: &[u8] = &body[at + 1..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// `event.dt` of a JeraSoft envelope, parsing only the prefix `{"event":{"dt":"<RFC 3339>"`.
fn envelope_dt_us(body: &[u8]) -> Option<i64> {
    let rest = body.strip_prefix(br#"{"event":{"dt":""#)?;
    let end = rest.iter().take(64).position(|&b| b == b'"')?;
    let s = std::str::from_utf8(&rest[..end]).ok()?;
    Some(DateTime::parse_from_rfc3339(s).ok()?.timestamp_micros())
}

// ------------------------------------------------------------------------------------------------
// The relay process, its memory and everybody's CPU.
// ------------------------------------------------------------------------------------------------

struct RelayProc {
    child: Child,
    log: PathBuf,
}

impl RelayProc {
    fn start(bin: &Path, url: &str, sets: &[String], log: &Path) -> Result<RelayProc> {
        let file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--database-url")
            .arg(url)
            .arg("--set")
            .arg("admin_listen=");
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(RelayProc {
            child,
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the relay exited ({status}); last log lines:\n{}",
                self.log_tail(20)
            );
        }
        Ok(())
    }

    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after 15 s.
    async fn stop(&mut self) -> Result<(ExitStatus, Duration)> {
        let t = Instant::now();
        if let Some(s) = self.child.try_wait()? {
            return Ok((s, Duration::ZERO));
        }
        unsafe {
            libc::kill(self.pid() as libc::pid_t, libc::SIGTERM);
        }
        while t.elapsed() < Duration::from_secs(15) {
            if let Some(s) = self.child.try_wait()? {
                return Ok((s, t.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.child.kill()?;
        Ok((self.child.wait()?, t.elapsed()))
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `kB` field of /proc/<pid>/status (VmRSS, VmHWM).
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    line[field.len() + 1..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Samples the relay's VmRSS every 20 ms on a thread of its own.
struct RssSampler {
    peak_kb: Arc<AtomicU64>,
    phase_peak_kb: Arc<AtomicU64>,
    last_kb: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let peak_kb = Arc::new(AtomicU64::new(0));
        let phase_peak_kb = Arc::new(AtomicU64::new(0));
        let last_kb = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, pp, l, s) = (
            peak_kb.clone(),
            phase_peak_kb.clone(),
            last_kb.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Relaxed) {
                if let Some(kb) = proc_status_kb(pid, "VmRSS") {
                    p.fetch_max(kb, Relaxed);
                    pp.fetch_max(kb, Relaxed);
                    l.store(kb, Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RssSampler {
            peak_kb,
            phase_peak_kb,
            last_kb,
            stop,
            thread: Some(thread),
        }
    }

    /// Peak since the last call (and restart the phase peak at the current value).
    fn take_phase_peak(&self) -> u64 {
        self.phase_peak_kb.swap(self.last_kb.load(Relaxed), Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// CPU ticks of every process, and of the whole machine.
struct CpuSnap {
    at: Instant,
    procs: HashMap<u32, (String, u64)>,
    busy: u64,
    /// CPU of this process's reaped children (pgbench).
    children: u64,
}

fn cpu_snapshot() -> CpuSnap {
    let mut procs = HashMap::new();
    let me = std::process::id();
    let mut children = 0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let mut comm = stat[open + 1..close].to_string();
            if comm == "postgres" {
                // "postgres: 15/main: user relay_bench 127.0.0.1(1234) idle"
                let cmdline =
                    std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if let Some(db) = BENCH_DB.get() {
                    if cmdline.contains(&format!(" {db} ")) {
                        comm = "postgres:bench".into();
                    }
                }
            }
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            // after "(comm)": state is field 3; utime and stime are fields 14 and 15
            let ticks = fields
                .get(11)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                + fields
                    .get(12)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            if pid == me {
                // cutime and cstime: fields 16 and 17
                children = fields
                    .get(13)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
                    + fields
                        .get(14)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
            }
            procs.insert(pid, (comm, ticks));
        }
    }
    let busy = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_string();
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            Some(
                v.iter().take(8).sum::<u64>()
                    - v.get(3).copied().unwrap_or(0)
                    - v.get(4).copied().unwrap_or(0),
            )
        })
        .unwrap_or(0);
    CpuSnap {
        at: Instant::now(),
        procs,
        busy,
        children,
    }
}

/// The server processes of the relay's sessions (its pool and its doorbell connection), to tell
/// the relay's share of the bench database's backends from the writers'.
async fn relay_backends(db: &Client) -> HashSet<u32> {
    match db
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'relay %'",
            &[],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect(),
        Err(_) => HashSet::new(),
    }
}

/// "relay 45 %, postgres 120 % (of which the relay's sessions 10 %), bench 20 %, pgbench 0 %,
/// other 5 %, idle 10 %" (100 % = one core).
fn cpu_split(
    before: &CpuSnap,
    after: &CpuSnap,
    relay_pid: Option<u32>,
    relay_backends: &HashSet<u32>,
) -> String {
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let wall = after.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let me = std::process::id();
    let (mut relay, mut pg, mut pg_other, mut bench, mut pgbench) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut pg_relay = 0u64;
    for (pid, (comm, ticks)) in &after.procs {
        let d = ticks.saturating_sub(before.procs.get(pid).map(|(_, t)| *t).unwrap_or(0));
        if Some(*pid) == relay_pid {
            relay += d;
        } else if *pid == me {
            bench += d;
        } else if comm == "postgres:bench" {
            pg += d;
            if relay_backends.contains(pid) {
                pg_relay += d;
            }
        } else if comm == "postgres" {
            pg_other += d;
        } else if comm == "pgbench" {
            pgbench += d;
        }
    }
    pgbench += after.children.saturating_sub(before.children);
    let busy = after.busy.saturating_sub(before.busy);
    let other = busy.saturating_sub(relay + pg + pg_other + bench + pgbench);
    let pct = |t: u64| 100.0 * t as f64 / hz / wall;
    let idle = (100.0 * cores - pct(busy)).max(0.0);
    let mut s = format!(
        "CPU (100 % = 1 core, {cores:.0} cores): relay {:.0} %, postgres (bench db backends) {:.0} % (of which the relay's sessions {:.1} %), postgres (background + other dbs) {:.0} %, bench {:.0} %",
        pct(relay),
        pct(pg),
        pct(pg_relay),
        pct(pg_other),
        pct(bench)
    );
    if pgbench > 0 {
        s.push_str(&format!(", pgbench (any) {:.0} %", pct(pgbench)));
    }
    s.push_str(&format!(
        ", other processes {:.0} %, idle {:.0} %",
        pct(other),
        idle
    ));
    s
}

fn uptime() -> String {
    Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("uptime failed: {e}"))
}

// ------------------------------------------------------------------------------------------------
// Database helpers.
// ------------------------------------------------------------------------------------------------

async fn connect(url: &str) -> Result<Client> {
    connect_named(url, "relay-bench").await
}

async fn connect_named(url: &str, application_name: &str) -> Result<Client> {
    let mut config: tokio_postgres::Config = url.parse().context("bad database URL")?;
    config.application_name(application_name);
    let (client, conn) = config
        .connect(NoTls)
        .await
        .with_context(|| format!("cannot connect to {}", relay::db::redact_url(url)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            if !CLOSING.load(Relaxed) {
                eprintln!("database connection closed: {e}");
            }
        }
    });
    Ok(client)
}

/// `url` with its database name replaced by `db` (query string kept).
fn url_with_db(url: &str, db: &str) -> String {
    if let Some(i) = url.find("://") {
        let (head, rest) = url.split_at(i + 3);
        let (main, query) = match rest.find('?') {
            Some(q) => (&rest[..q], &rest[q..]),
            None => (rest, ""),
        };
        let authority = main.split('/').next().unwrap_or("");
        format!("{head}{authority}/{db}{query}")
    } else {
        format!("{url} dbname={db}")
    }
}

async fn count(db: &Client, sql: &str) -> Result<i64> {
    Ok(db.query_one(sql, &[]).await?.get(0))
}

/// Dead tuples of the outbox tables, sampled every second while the relay drains (retention and
/// bloat: the relay vacuums its queue itself when autovacuum is off or lagging).
struct DeadTuples {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<HashMap<String, (i64, i64)>>,
}

const OUTBOX_TABLES: &str =
    "SELECT relname::text, n_live_tup, n_dead_tup, vacuum_count + autovacuum_count,
        pg_total_relation_size(relid)
   FROM pg_stat_user_tables
  WHERE schemaname = 'provisioning' AND relname IN ('deliveries', 'events', 'attempts')
  ORDER BY 1";

impl DeadTuples {
    async fn start(url: &str) -> Result<DeadTuples> {
        let db = connect_named(url, "relay-bench-stats").await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            // table -> (max dead tuples seen, live tuples at that moment)
            let mut max: HashMap<String, (i64, i64)> = HashMap::new();
            loop {
                if let Ok(rows) = db.query(OUTBOX_TABLES, &[]).await {
                    for r in rows {
                        let (name, live, dead): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
                        let e = max.entry(name).or_insert((0, 0));
                        if dead > e.0 {
                            *e = (dead, live);
                        }
                    }
                }
                tokio::select! {
                    _ = stopped.cancelled() => return max,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Ok(DeadTuples { stop, task })
    }

    /// Report lines: the peak during the drain and the state now.
    async fn finish(self, db: &Client) -> Result<Vec<String>> {
        self.stop.cancel();
        let max = self.task.await?;
        let mut out = Vec::new();
        for r in db.query(OUTBOX_TABLES, &[]).await? {
            let (name, live, dead, vacuums, bytes): (String, i64, i64, i64, i64) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            let (peak, live_then) = max.get(&name).copied().unwrap_or((0, 0));
            out.push(format!(
                "(a) pg_stat_user_tables provisioning.{name}: peak n_dead_tup during the drain {peak} (n_live_tup then {live_then}); now n_live_tup {live}, n_dead_tup {dead}, vacuums {vacuums}, size {:.1} MiB",
                bytes as f64 / 1048576.0
            ));
        }
        Ok(out)
    }
}

async fn checkpoint(db: &Client) {
    if let Err(e) = db.batch_execute("CHECKPOINT").await {
        say!("(CHECKPOINT failed, continuing: {e})");
    }
}

/// Insert clients with ids from..=to in chunks (each chunk one autocommit statement). Balances
/// are spread over -50..50.
async fn insert_clients(db: &Client, from: u64, to: u64, chunk: u64) -> Result<()> {
    let stmt = db
        .prepare(
            "INSERT INTO clients (id, name, balance, email, company, custom_fields)
             SELECT g, 'client ' || g, (g * 7919) % 101 - 50, 'c' || g || '@example.com',
                    'Company ' || (g % 97), jsonb_build_object('tariff', 'T' || (g % 5))
               FROM generate_series($1::bigint, $2::bigint) g",
        )
        .await?;
    let mut a = from;
    while a <= to {
        let b = (a + chunk.max(1) - 1).min(to);
        db.execute(&stmt, &[&(a as i64), &(b as i64)]).await?;
        a = b + 1;
    }
    Ok(())
}

/// Fill the backlog: returns (clients created, events captured, seconds).
async fn fill_backlog(
    db: &Client,
    events: u64,
    shape: Backlog,
    chunk: u64,
) -> Result<(u64, i64, f64)> {
    let before = count(db, "SELECT count(*) FROM provisioning.events").await?;
    let t = Instant::now();
    let clients = match shape {
        Backlog::Creates => {
            insert_clients(db, 1, events, chunk).await?;
            events
        }
        Backlog::Mixed => {
            let n = (events / 4).max(1);
            insert_clients(db, 1, n, chunk).await?;
            let stmt = db
                .prepare("UPDATE clients SET name = 'client ' || id || ' v' || $3::int WHERE id BETWEEN $1 AND $2")
                .await?;
            for round in 1..=3i32 {
                let mut a = 1u64;
                while a <= n {
                    let b = (a + chunk.max(1) - 1).min(n);
                    db.execute(&stmt, &[&(a as i64), &(b as i64), &round])
                        .await?;
                    a = b + 1;
                }
            }
            n
        }
    };
    let secs = t.elapsed().as_secs_f64();
    let after = count(db, "SELECT count(*) FROM provisioning.events").await?;
    Ok((clients, after - before, secs))
}

// ------------------------------------------------------------------------------------------------
// Phases.
// ------------------------------------------------------------------------------------------------

struct RawSql {
    events: i64,
    secs: f64,
    batches: u64,
    claim_ms: f64,
    complete_ms: f64,
    other_ms: f64,
}

/// (d1) Store::claim + Store::complete, exactly as the relay issues them, no HTTP.
async fn raw_sql_limit(db: &Client, url: &str, args: &Args) -> Result<RawSql> {
    let handler_id: i64 = db
        .query_one(
            "INSERT INTO provisioning.handlers (name, events, kind, target, max_in_flight)
             VALUES ('bench-raw', '{clients.*}', 'http', 'http://127.0.0.1:9/raw', $1) RETURNING id",
            &[&args.max_in_flight],
        )
        .await?
        .get(0);
    let (_, events, fill_secs) =
        fill_backlog(db, args.raw_events, Backlog::Creates, args.chunk).await?;
    db.batch_execute("ANALYZE provisioning.deliveries; ANALYZE provisioning.events")
        .await?;
    checkpoint(db).await;
    let backlog = count(db, "SELECT count(*) FROM provisioning.deliveries").await?;
    say!(
        "(d1) backlog of {backlog} deliveries filled in {fill_secs:.1} s ({:.0} events/s captured by bulk INSERT)",
        events as f64 / fill_secs
    );

    let pool = relay::db::make_pool(url, 4, "relay bench raw").context("pool")?;
    let store = Store::new(pool, "bench-raw".into());
    let lease = Duration::from_secs(300);
    let want = [Want {
        handler_id,
        limit: args.raw_batch,
        lease,
        row_images: false,
    }];
    let (mut claim_t, mut complete_t, mut other_t) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut batches = 0u64;
    let mut done = 0i64;
    let t0 = Instant::now();
    loop {
        let token: i64 = rand::random();
        let t = Instant::now();
        let claimed = store.claim(&want, token).await?;
        claim_t += t.elapsed();
        if claimed.is_empty() {
            break;
        }
        let t = Instant::now();
        let started_at = Utc::now();
        let batch: Vec<Completion> = claimed
            .iter()
            .map(|c| {
                let body = render(&c.event, c.modified_data.as_ref(), Format::Jerasoft);
                Completion {
                    delivery_id: c.delivery_id,
                    handler_id: c.handler_id,
                    token: c.token,
                    action: Action::Done,
                    delay: Duration::ZERO,
                    error: None,
                    log: Some(AttemptLog {
                        delivery_id: c.delivery_id,
                        event_id: c.event.id,
                        handler_id: c.handler_id,
                        handler_name: "bench-raw".into(),
                        event_name: c.event.name.clone(),
                        object_id: c.event.object_id.to_string(),
                        attempt: c.attempt as i32,
                        started_at,
                        duration_ms: 0.4,
                        success: true,
                        http_status: Some(200),
                        exit_code: None,
                        request_body: body,
                        response: Some("ok".into()),
                        error: None,
                    }),
                    decision: None,
                    before_stage: false,
                    sent_data: None,
                }
            })
            .collect();
        other_t += t.elapsed();
        let t = Instant::now();
        let applied = store.complete(&batch).await?;
        complete_t += t.elapsed();
        if applied != batch.len() {
            bail!(
                "raw limit: completed {applied} of {} claimed deliveries",
                batch.len()
            );
        }
        done += applied as i64;
        batches += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    let left = count(db, "SELECT count(*) FROM provisioning.deliveries").await?;
    if left != 0 || done != backlog {
        bail!("raw limit: {done} completed, {left} deliveries left (expected {backlog})");
    }
    let per = |d: Duration| d.as_secs_f64() * 1000.0 / batches.max(1) as f64;
    // Back to an empty outbox for the next phases (TRUNCATE fires no row triggers).
    db.batch_execute(
        "DELETE FROM provisioning.handlers WHERE name = 'bench-raw';
         TRUNCATE clients CASCADE;
         TRUNCATE provisioning.events, provisioning.deliveries, provisioning.attempts RESTART IDENTITY;",
    )
    .await?;
    Ok(RawSql {
        events: done,
        secs,
        batches,
        claim_ms: per(claim_t),
        complete_ms: per(complete_t),
        other_ms: per(other_t),
    })
}

/// A typical envelope, as the relay renders a clients.create event.
fn sample_envelope() -> String {
    let data = serde_json::json!({
        "id": 12345, "name": "client 12345", "email": "c12345@example.com", "credit": 0.0,
        "status": "active", "balance": -17.0, "company": "Company 26", "currency": "USD",
        "created_at": "2026-11-27T10:20:00.123456+00:00", "updated_at": "2026-11-27T10:20:00.123456+00:00",
        "custom_fields": {"tariff": "T0"}
    });
    let event = Event {
        id: 12345,
        name: "clients.create".into(),
        entity: "clients".into(),
        object_id: serde_json::json!(12345),
        operation: "insert".into(),
        data: data.clone(),
        old_row: None,
        new_row: Some(data),
        changed_at: Utc::now(),
    };
    render(&event, None, Format::Jerasoft)
}

/// (d2) The receiver's raw POST rate: one reqwest Client (built like the relay's), N concurrent.
async fn raw_post_limit(secs: u64, concurrency: usize) -> Result<(u64, u64, f64)> {
    let (recv, url) = Receiver::start().await?;
    let client = reqwest::Client::builder()
        .user_agent("provisioning-relay-bench")
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()?;
    let body = sample_envelope();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (client, url, body, ok, failed) = (
            client.clone(),
            url.clone(),
            body.clone(),
            ok.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let sent = client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header("webhook-id", format!("evt_{w}_{i}"))
                    .header("webhook-timestamp", Utc::now().timestamp())
                    .header("x-provisioning-event", "clients.create")
                    .header("x-provisioning-attempt", "1")
                    .body(body.clone())
                    .send()
                    .await;
                match sent {
                    Ok(r) => {
                        let good = r.status().is_success();
                        if r.bytes().await.is_ok() && good {
                            ok.fetch_add(1, Relaxed);
                        } else {
                            failed.fetch_add(1, Relaxed);
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let ok = ok.load(Relaxed);
    if recv.count.load(Relaxed) < ok {
        bail!("receiver counted fewer requests than the client");
    }
    Ok((ok, failed.load(Relaxed), secs))
}

struct Drain {
    /// False when --drain-timeout ran out first: the figures then cover what was delivered.
    complete: bool,
    expected: i64,
    events: i64,
    secs_from_start: f64,
    secs_first_to_last: f64,
    startup_secs: f64,
    peak_rss_kb: u64,
    cpu: String,
}

/// (a) Start the relay and time it until every delivery is done.
async fn drain(
    db: &Client,
    recv: &Receiver,
    relay: &mut Option<RelayProc>,
    sampler: &mut Option<RssSampler>,
    start: impl FnOnce() -> Result<RelayProc>,
    expected: i64,
    timeout: Duration,
) -> Result<Drain> {
    recv.reset_counts();
    let cpu0 = cpu_snapshot();
    let t0 = Instant::now();
    let spawned_us = Utc::now().timestamp_micros();
    let proc_ = start()?;
    let pid = proc_.pid();
    *sampler = Some(RssSampler::start(pid));
    *relay = Some(proc_);
    let relay = relay.as_mut().expect("just set");
    let mut last_report = Instant::now();
    let mut last_count = 0u64;
    let mut complete = true;
    loop {
        tokio::time::sleep(Duration::from_millis(25)).await;
        relay.check_alive()?;
        let n = recv.count.load(Relaxed);
        if n as i64 >= expected
            && count(db, "SELECT count(*) FROM provisioning.deliveries").await? == 0
        {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            let rate = (n - last_count) as f64 / last_report.elapsed().as_secs_f64();
            let rss = sampler
                .as_ref()
                .map(|s| s.last_kb.load(Relaxed))
                .unwrap_or(0);
            say!("(a)   {n} / {expected} received, {rate:.0}/s over the last 5 s, relay RSS {:.1} MiB", mib(rss));
            last_report = Instant::now();
            last_count = n;
        }
        if t0.elapsed() > timeout {
            let left = count(db, "SELECT count(*) FROM provisioning.deliveries").await?;
            say!("(a)   drain timeout ({timeout:?}) reached: {n} received, {left} deliveries left; reporting what was delivered");
            complete = false;
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_snapshot();
    let n = recv.count.load(Relaxed) as i64;
    if complete && n != expected {
        say!(
            "(a)   WARNING: the receiver got {n} requests for {expected} deliveries (duplicates?)"
        );
    }
    let first = recv.first_us.load(Relaxed);
    let last = recv.last_us.load(Relaxed);
    Ok(Drain {
        complete,
        expected,
        events: n,
        secs_from_start: secs,
        secs_first_to_last: (last - first) as f64 / 1e6,
        startup_secs: (first - spawned_us) as f64 / 1e6,
        peak_rss_kb: sampler.as_ref().map(|s| s.take_phase_peak()).unwrap_or(0),
        cpu: cpu_split(&cpu0, &cpu1, Some(pid), &relay_backends(db).await),
    })
}

/// Percentiles of a set of millisecond values.
#[derive(Clone, Copy)]
struct Dist {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Dist {
    fn of(mut v: Vec<f64>) -> Dist {
        v.sort_by(|a, b| a.total_cmp(b));
        Dist {
            n: v.len(),
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            max: v.last().copied().unwrap_or(f64::NAN),
            mean: v.iter().sum::<f64>() / v.len().max(1) as f64,
        }
    }

    fn show(&self) -> String {
        format!(
            "p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} mean {:.2} ms",
            self.p50, self.p90, self.p99, self.max, self.mean
        )
    }
}

struct RatePhase {
    rate: u32,
    planned: u64,
    produced: u64,
    errors: u64,
    achieved: f64,
    events_captured: i64,
    received_in_grace: u64,
    received_total: u64,
    /// receipt − event.dt: the figure the targets are about.
    e2e: Dist,
    /// the producer saw its UPDATE commit − event.dt (capture + commit, incl. lock waits).
    to_commit: Dist,
    /// receipt − the producer saw its commit (wake-up, claim, HTTP: the relay's share).
    after_commit: Dist,
    /// the producer's UPDATE round trip.
    update_rtt: Dist,
    /// what the producers' sessions were waiting on (pg_stat_activity samples).
    waits: String,
    /// database commits per event beyond the producer's own (mostly the relay's transactions).
    extra_commits_per_event: f64,
    kept_up: bool,
    peak_rss_kb: u64,
    cpu: String,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

const PRODUCER_APP: &str = "relay-bench-producer";

/// Samples what the sessions of one application_name wait on (pg_stat_activity, every 50 ms).
const ASLEEP: &str = "~asleep";

struct WaitMonitor {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<(HashMap<String, u64>, u64)>>,
}

impl WaitMonitor {
    fn start(client: Arc<Client>, application_name: &'static str) -> WaitMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let task = tokio::spawn(async move {
            let mut tally: HashMap<String, u64> = HashMap::new();
            let mut samples = 0u64;
            let stmt = client
                .prepare(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'running (no wait)')
                       FROM pg_stat_activity
                      WHERE application_name = $1 AND state = 'active' AND datname = current_database()
                     UNION ALL
                     SELECT $2 WHERE EXISTS (SELECT 1 FROM provisioning.relays WHERE sleeping)",
                )
                .await?;
            while !halt.load(Relaxed) {
                samples += 1;
                for row in client.query(&stmt, &[&application_name, &ASLEEP]).await? {
                    *tally.entry(row.get(0)).or_default() += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok((tally, samples))
        });
        WaitMonitor { stop, task }
    }

    /// Stop sampling (the result is collected by `finish`).
    fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    /// "6.2 of 16 sessions active on average; of those: Lock:object 85 %, ..." and the sample count.
    async fn finish(self, sessions: usize) -> Result<(String, u64)> {
        self.stop.store(true, Relaxed);
        let (mut tally, samples) = self.task.await??;
        let asleep = tally.remove(ASLEEP).unwrap_or(0);
        let asleep = format!(
            "; a relay was declared asleep (capture NOTIFYs) in {:.0} % of the samples",
            100.0 * asleep as f64 / samples.max(1) as f64
        );
        let active: u64 = tally.values().sum();
        let mut waits: Vec<(String, u64)> = tally.into_iter().collect();
        waits.sort_by_key(|w| std::cmp::Reverse(w.1));
        if active == 0 {
            return Ok((format!("no session seen active{asleep}"), samples));
        }
        let top = waits
            .iter()
            .take(5)
            .map(|(w, n)| format!("{w} {:.0} %", 100.0 * *n as f64 / active as f64))
            .collect::<Vec<_>>()
            .join(", ");
        Ok((
            format!(
                "{:.1} of {sessions} sessions active on average; of those: {top}{asleep}",
                active as f64 / samples.max(1) as f64
            ),
            samples,
        ))
    }
}

async fn xact_commits(db: &Client) -> Result<i64> {
    Ok(db
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?
        .get(0))
}

/// (b) Produce single-row UPDATEs at `rate`/s for `secs` from `producers` connections.
#[allow(clippy::too_many_arguments)]
async fn rate_phase(
    db: &Client,
    monitor: Arc<Client>,
    producers: &[Arc<Client>],
    recv: &Receiver,
    sampler: Option<&RssSampler>,
    relay_pid: u32,
    rate: u32,
    secs: u64,
    id_max: u64,
    grace: Duration,
) -> Result<RatePhase> {
    let total = rate as u64 * secs;
    let next = Arc::new(AtomicU64::new(0));
    let produced = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let done_us: Arc<Vec<AtomicI64>> = Arc::new((0..total).map(|_| AtomicI64::new(0)).collect());
    let events_before = count(db, "SELECT coalesce(max(id), 0) FROM provisioning.events").await?;
    recv.samples.lock().expect("samples").clear();
    recv.record.store(true, Relaxed);
    if let Some(s) = sampler {
        s.take_phase_peak();
    }
    // What the producers wait on, sampled every 50 ms.
    let monitor = WaitMonitor::start(monitor, PRODUCER_APP);
    let commits_before = xact_commits(db).await?;
    let cpu0 = cpu_snapshot();
    let start_us = Utc::now().timestamp_micros();
    let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
    let deadline = t0 + Duration::from_secs(secs + 2);
    let mut tasks = Vec::new();
    for c in producers {
        let (c, next, produced, errors, done_us) = (
            c.clone(),
            next.clone(),
            produced.clone(),
            errors.clone(),
            done_us.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let stmt = c
                .prepare("UPDATE clients SET name = $1 WHERE id = $2")
                .await?;
            let mut rtts = Vec::new();
            loop {
                let i = next.fetch_add(1, Relaxed);
                // Producers that cannot sustain the rate stop at the end of the phase (+2 s):
                // the achieved rate is reported, the phase does not stretch.
                if i >= total || tokio::time::Instant::now() > deadline {
                    return anyhow::Ok(rtts);
                }
                tokio::time::sleep_until(
                    t0 + Duration::from_nanos(i * 1_000_000_000 / rate as u64),
                )
                .await;
                let id = (splitmix(i ^ ((rate as u64) << 40)) % id_max + 1) as i64;
                let sent = Instant::now();
                // The receiver finds `#<i>` at the end of the body: per-event commit time.
                match c
                    .execute(&stmt, &[&format!("client {id} r{rate} #{i}"), &id])
                    .await
                {
                    Ok(n) => {
                        done_us[i as usize].store(Utc::now().timestamp_micros(), Relaxed);
                        rtts.push(sent.elapsed().as_secs_f64() * 1000.0);
                        produced.fetch_add(n, Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    let mut rtts = Vec::new();
    for t in tasks {
        rtts.extend(t.await??);
    }
    let prod_secs = t0.elapsed().as_secs_f64();
    let end_us = Utc::now().timestamp_micros();
    monitor.stop();
    let produced = produced.load(Relaxed);
    let in_window = |samples: &[Sample]| -> Vec<Sample> {
        samples
            .iter()
            .copied()
            .filter(|s| s.dt >= start_us && s.dt <= end_us)
            .collect()
    };
    tokio::time::sleep(grace).await;
    let cpu1 = cpu_snapshot();
    let grace_us = grace.as_micros() as i64;
    let received_in_grace = {
        let s = recv.samples.lock().expect("samples");
        in_window(&s)
            .iter()
            .filter(|s| s.recv <= end_us + grace_us)
            .count() as u64
    };
    // Wait (bounded) for stragglers, so the next phase starts idle and the totals are known.
    let waited = Instant::now();
    let mut received_total;
    loop {
        received_total = in_window(&recv.samples.lock().expect("samples")).len() as u64;
        if received_total >= produced || waited.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    recv.record.store(false, Relaxed);
    let (waits, monitor_samples) = monitor.finish(producers.len()).await?;
    let events_captured =
        count(db, "SELECT coalesce(max(id), 0) FROM provisioning.events").await? - events_before;
    // Statistics reach pg_stat_database within about a second of a backend going idle.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let commits = xact_commits(db).await? - commits_before;
    let extra = commits - produced as i64 - monitor_samples as i64 - 6;
    let samples = in_window(&recv.samples.lock().expect("samples"));
    let e2e = Dist::of(
        samples
            .iter()
            .map(|s| (s.recv - s.dt) as f64 / 1000.0)
            .collect(),
    );
    let mut to_commit = Vec::new();
    let mut after_commit = Vec::new();
    for s in &samples {
        if let Some(done) = done_us.get(s.seq as usize).map(|d| d.load(Relaxed)) {
            if done > 0 {
                to_commit.push((done - s.dt) as f64 / 1000.0);
                after_commit.push((s.recv - done) as f64 / 1000.0);
            }
        }
    }
    Ok(RatePhase {
        rate,
        planned: total,
        produced,
        errors: errors.load(Relaxed),
        achieved: produced as f64 / prod_secs,
        events_captured,
        received_in_grace,
        received_total,
        e2e,
        to_commit: Dist::of(to_commit),
        after_commit: Dist::of(after_commit),
        update_rtt: Dist::of(rtts),
        waits,
        extra_commits_per_event: extra as f64 / produced.max(1) as f64,
        kept_up: produced > 0 && received_in_grace >= produced,
        peak_rss_kb: sampler.map(|s| s.take_phase_peak()).unwrap_or(0),
        cpu: cpu_split(&cpu0, &cpu1, Some(relay_pid), &relay_backends(db).await),
    })
}

struct PgbenchRun {
    captured: bool,
    tps: f64,
    xacts: u64,
    events: i64,
    backlog_after: i64,
    drained_secs: Option<f64>,
    /// WAL written during the run per pgbench transaction (by everybody on the server).
    wal_per_xact: f64,
    relay_running: bool,
    cpu: String,
    waits: String,
    /// WAL records, full-page images, writes and syncs per pgbench transaction.
    wal_counts: String,
}

/// Server-wide WAL counters (`pg_stat_wal`): records, full-page images, writes, syncs.
async fn wal_stats(db: &Client) -> Result<[f64; 4]> {
    let r = db
        .query_one(
            "SELECT wal_records::float8, wal_fpi::float8, wal_write::float8, wal_sync::float8 FROM pg_stat_wal",
            &[],
        )
        .await?;
    Ok([r.get(0), r.get(1), r.get(2), r.get(3)])
}

/// (e) The balance each row starts from: spread over -n..n by a fixed permutation of the ids.
fn balance_spread_sql(n: u32) -> String {
    format!("(id * 7919) % {} - {n}", 2 * u64::from(n) + 1)
}

/// (e) One pgbench run on `clients` (captured) or `clients_plain`.
#[allow(clippy::too_many_arguments)]
async fn pgbench_run(
    db: &Client,
    args: &Args,
    url: &str,
    script: &Path,
    rows: u64,
    captured: bool,
    relay_pid: Option<u32>,
    recv: &Receiver,
    monitor: Arc<Client>,
) -> Result<PgbenchRun> {
    let table = if captured { "clients" } else { "clients_plain" };
    // Same starting state for every run: balances spread over -N..N, vacuumed, checkpointed.
    let spread = balance_spread_sql(args.balance_spread);
    db.batch_execute(&format!(
        "SET provisioning.suppress = 'on';
         UPDATE {table} SET balance = {spread} WHERE balance <> {spread};
         RESET provisioning.suppress;"
    ))
    .await?;
    db.batch_execute(&format!("VACUUM ANALYZE {table}")).await?;
    if captured {
        db.batch_execute("VACUUM ANALYZE provisioning.deliveries")
            .await?;
        db.batch_execute("VACUUM ANALYZE provisioning.events")
            .await?;
    }
    checkpoint(db).await;
    let events_before = count(db, "SELECT coalesce(max(id), 0) FROM provisioning.events").await?;
    let wal_before: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let received_before = recv.count.load(Relaxed);
    let stats_before = wal_stats(db).await?;
    let child = tokio::process::Command::new(&args.pgbench)
        .arg("-n")
        .args(["-M", "prepared"])
        .arg("-c")
        .arg(args.pgbench_clients.to_string())
        .arg("-j")
        .arg(args.pgbench_clients.to_string())
        .arg("-T")
        .arg(args.pgbench_seconds.to_string())
        .arg("-D")
        .arg(format!("rows={rows}"))
        .arg("-f")
        .arg(script)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", args.pgbench))?;
    // CPU split over the middle of the run, while pgbench and its backends are alive.
    let margin = if args.pgbench_seconds >= 4 { 1 } else { 0 };
    tokio::time::sleep(Duration::from_secs(margin)).await;
    let cpu0 = cpu_snapshot();
    let waits = WaitMonitor::start(monitor, "pgbench");
    tokio::time::sleep(Duration::from_secs(args.pgbench_seconds - 2 * margin)).await;
    let cpu1 = cpu_snapshot();
    let (waits, _) = waits.finish(args.pgbench_clients as usize).await?;
    let out = child.wait_with_output().await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("pgbench failed ({}):\n{text}", out.status);
    }
    let tps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("cannot find tps in pgbench output:\n{text}"))?;
    let xacts: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|l| l.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let events =
        count(db, "SELECT coalesce(max(id), 0) FROM provisioning.events").await? - events_before;
    let wal: f64 = db
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8",
            &[&wal_before],
        )
        .await?
        .get(0);
    let stats_after = wal_stats(db).await?;
    let per = |i: usize| (stats_after[i] - stats_before[i]) / xacts.max(1) as f64;
    let wal_counts = format!(
        "per update (server-wide): {:.2} WAL records, {:.3} full-page images, {:.3} WAL writes, {:.3} WAL syncs",
        per(0),
        per(1),
        per(2),
        per(3)
    );
    let backlog_after = count(db, "SELECT count(*) FROM provisioning.deliveries").await?;
    let mut drained_secs = None;
    if captured && relay_pid.is_some() {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if count(db, "SELECT count(*) FROM provisioning.deliveries").await? == 0 {
                drained_secs = Some(t.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = recv.count.load(Relaxed) - received_before;
        if got as i64 != events {
            say!(
                "(e)   note: receiver got {got} requests for {events} events captured in this run"
            );
        }
    }
    Ok(PgbenchRun {
        captured,
        tps,
        xacts,
        events,
        backlog_after,
        drained_secs,
        wal_per_xact: wal / xacts.max(1) as f64,
        relay_running: relay_pid.is_some(),
        cpu: cpu_split(&cpu0, &cpu1, relay_pid, &relay_backends(db).await),
        waits,
        wal_counts,
    })
}

// ------------------------------------------------------------------------------------------------
// Main.
// ------------------------------------------------------------------------------------------------

/// (c) Read the relay's memory figures, then stop it with SIGTERM.
async fn stop_relay(
    relay: &mut Option<RelayProc>,
    sampler: &mut Option<RssSampler>,
    relay_pid: u32,
    drain_peak_kb: u64,
    report: &mut Report,
) -> Result<()> {
    let hwm = proc_status_kb(relay_pid, "VmHWM").unwrap_or(0);
    let peak = sampler
        .as_ref()
        .map(|s| s.peak_kb.load(Relaxed))
        .unwrap_or(0);
    drop(sampler.take());
    let l = format!(
        "(c) relay memory over the whole run: peak sampled VmRSS {:.1} MiB, VmHWM {:.1} MiB (drain phase peak {:.1} MiB)",
        mib(peak),
        mib(hwm),
        mib(drain_peak_kb)
    );
    say!("{l}");
    report.line(l);
    if let Some(mut r) = relay.take() {
        let (status, took) = r.stop().await?;
        say!(
            "relay stopped by SIGTERM in {:.2} s ({status})",
            took.as_secs_f64()
        );
        let warnings = std::fs::read_to_string(&r.log).unwrap_or_default();
        let n = warnings.lines().count();
        if n > 0 {
            say!(
                "relay log ({} lines, {}), last lines:\n{}",
                n,
                r.log.display(),
                r.log_tail(10)
            );
        } else {
            let _ = std::fs::remove_file(&r.log);
        }
    }
    Ok(())
}

fn relay_binary(args: &Args) -> Result<PathBuf> {
    let path = match &args.relay_bin {
        Some(p) => p.clone(),
        None => {
            // target/release/examples/bench -> target/release/relay
            let exe = std::env::current_exe()?;
            let release = exe
                .parent()
                .and_then(Path::parent)
                .context("cannot locate target/release")?;
            release.join("relay")
        }
    };
    if !path.is_file() {
        bail!(
            "relay binary not found at {}; run `cargo build --release` first (or pass --relay-bin)",
            path.display()
        );
    }
    // A bare name ("relay-old") would be looked up in PATH when started, not here.
    std::fs::canonicalize(&path).with_context(|| format!("cannot resolve {}", path.display()))
}

#[derive(Default)]
struct Report {
    lines: Vec<String>,
    /// None: not established by this run (printed as [----]).
    checks: Vec<(String, Option<bool>)>,
}

impl Report {
    fn line(&mut self, s: String) {
        self.lines.push(s);
    }
    fn check(&mut self, what: String, ok: bool) {
        self.checks.push((what, Some(ok)));
    }
    fn unverified(&mut self, what: String) {
        self.checks.push((what, None));
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    START.get_or_init(Instant::now);
    let args = Args::parse();
    BENCH_DB.get_or_init(|| args.db_name.clone());
    let bin = relay_binary(&args)?;
    let admin = connect(&args.database_url).await?;
    let url = url_with_db(&args.database_url, &args.db_name);
    let result = run(&args, &bin, &admin, &url).await;
    CLOSING.store(true, Relaxed);
    if args.keep_db {
        say!("keeping database {} (--keep-db)", args.db_name);
    } else if let Err(e) = admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            args.db_name
        ))
        .await
    {
        eprintln!("cannot drop database {}: {e}", args.db_name);
    }
    result
}

async fn run(args: &Args, bin: &Path, admin: &Client, url: &str) -> Result<()> {
    let mut report = Report::default();
    say!("load at start: {}", uptime());
    let modified = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .map(|t| {
            DateTime::<Utc>::from(t)
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string()
        })
        .unwrap_or_default();
    let root = bin.ancestors().nth(3).unwrap_or(Path::new("."));
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let dirty = git(&["status", "--porcelain", "--", "relay/src", "sql"])
        .lines()
        .count();
    say!(
        "relay binary: {} (built {modified}); source tree {} at commit {}, {dirty} uncommitted file(s) in relay/src and sql/",
        bin.display(),
        root.display(),
        git(&["rev-parse", "--short", "HEAD"])
    );
    let server: String = admin
        .query_one(
            "SELECT 'PostgreSQL ' || current_setting('server_version') || ', shared_buffers=' || current_setting('shared_buffers')
                 || ', synchronous_commit=' || current_setting('synchronous_commit') || ', fsync=' || current_setting('fsync')",
            &[],
        )
        .await?
        .get(0);
    say!(
        "server: {server}; machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            args.db_name
        ))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {}", args.db_name))
        .await?;
    for kv in &args.db_set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--db-set {kv:?}: expected KEY=VALUE"))?;
        let v = v.replace('\'', "''");
        admin
            .batch_execute(&format!("ALTER DATABASE {} SET {k} = '{v}'", args.db_name))
            .await
            .with_context(|| format!("--db-set {kv}"))?;
        say!("ALTER DATABASE {} SET {k} = '{v}'", args.db_name);
    }
    let db = connect(url).await?;
    db.batch_execute("SET client_min_messages = warning")
        .await?;
    relay::schema::migrate(&db).await?;
    relay::schema::install_vcs_preset(&db).await?;
    say!(
        "database {} created: schema + VCS preset installed (as `relay migrate --vcs-preset`)",
        args.db_name
    );

    // ---- (d) raw limits -------------------------------------------------------------------------
    let mut lower_limit: Option<f64> = None;
    if !args.skip_raw_limits {
        say!("(d1) raw outbox limit: Store::claim(limit {}) + Store::complete(Done + attempt log), no HTTP", args.raw_batch);
        let r = raw_sql_limit(&db, url, args).await?;
        let sql_rate = r.events as f64 / r.secs;
        let l = format!(
            "(d1) raw SQL claim+complete: {} events in {:.2} s = {:.0} events/s ({} batches; per batch: claim {:.1} ms, complete {:.1} ms, render {:.1} ms)",
            r.events, r.secs, sql_rate, r.batches, r.claim_ms, r.complete_ms, r.other_ms
        );
        say!("{l}");
        report.line(l);

        say!(
            "(d2) raw POST limit: one reqwest Client, concurrency {}, {} s",
            args.post_concurrency,
            args.post_seconds
        );
        let (ok, failed, secs) = raw_post_limit(args.post_seconds, args.post_concurrency).await?;
        let post_rate = ok as f64 / secs;
        let l = format!(
            "(d2) raw receiver POST rate: {ok} requests ({failed} failed) in {secs:.2} s = {post_rate:.0} requests/s"
        );
        say!("{l}");
        report.line(l);
        let lower = sql_rate.min(post_rate);
        let l = format!(
            "(d)  lower limit: {lower:.0}/s ({})",
            if sql_rate <= post_rate {
                "the outbox SQL"
            } else {
                "the receiver's POST rate"
            }
        );
        say!("{l}");
        report.line(l);
        lower_limit = Some(lower);
    }

    // ---- (a) backlog drain ----------------------------------------------------------------------
    let (recv, recv_url) = Receiver::start().await?;
    db.execute(
        "INSERT INTO provisioning.handlers (name, events, kind, target, max_in_flight) VALUES ('bench', '{clients.*}', 'http', $1, $2)",
        &[&recv_url, &args.max_in_flight],
    )
    .await?;
    say!(
        "(a) filling the backlog: {} events ({:?}) for handler 'bench' (http, max_in_flight {}) -> {recv_url}",
        args.events,
        args.backlog,
        args.max_in_flight
    );
    let (clients, events, fill_secs) =
        fill_backlog(&db, args.events, args.backlog, args.chunk).await?;
    db.batch_execute(
        "ANALYZE clients; ANALYZE provisioning.deliveries; ANALYZE provisioning.events",
    )
    .await?;
    checkpoint(&db).await;
    let expected = count(&db, "SELECT count(*) FROM provisioning.deliveries").await?;
    say!(
        "(a) backlog: {events} events over {clients} clients, {expected} deliveries; filled in {fill_secs:.1} s ({:.0} events/s by bulk INSERT with capture)",
        events as f64 / fill_secs
    );
    let log = std::env::temp_dir().join(format!("relay_bench_{}.log", std::process::id()));
    let mut sets = vec!["log_level=warn".to_string()];
    sets.extend(args.relay_set.iter().cloned());
    say!(
        "(a) starting {} run --database-url <bench db> --set admin_listen= --set {} (log: {})",
        bin.display(),
        sets.join(" --set "),
        log.display()
    );
    let mut relay: Option<RelayProc> = None;
    let mut sampler: Option<RssSampler> = None;
    let timeout = Duration::from_secs(args.drain_timeout.unwrap_or(120 + args.events / 1000));
    let dead_tuples = DeadTuples::start(url).await?;
    let d = drain(
        &db,
        &recv,
        &mut relay,
        &mut sampler,
        || RelayProc::start(bin, url, &sets, &log),
        expected,
        timeout,
    )
    .await?;
    let drain_rate = d.events as f64 / d.secs_from_start;
    let steady_rate = d.events as f64 / d.secs_first_to_last.max(1e-3);
    let l = format!(
        "(a) drain{}: {} events in {:.2} s from relay start = {:.0} events/s (first->last receipt {:.2} s = {:.0}/s; relay start->first receipt {:.2} s); relay peak RSS {:.1} MiB",
        if d.complete { String::new() } else { format!(" INCOMPLETE (--drain-timeout): {} of {}", d.events, d.expected) },
        d.events, d.secs_from_start, drain_rate, d.secs_first_to_last, steady_rate, d.startup_secs, mib(d.peak_rss_kb)
    );
    say!("{l}");
    say!("(a) {}", d.cpu);
    report.line(l);
    report.line(format!("(a) {}", d.cpu));
    // the statistics reach pg_stat_user_tables within a second or so
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for l in dead_tuples.finish(&db).await? {
        say!("{l}");
        report.line(l);
    }
    report.check(
        format!("drain >= 10,000 events/s: {drain_rate:.0}/s"),
        drain_rate >= 10_000.0,
    );
    if let Some(lower) = lower_limit {
        let pct = 100.0 * drain_rate / lower;
        let l = format!("(a) drain = {pct:.0} % of the lower limit ({lower:.0}/s)");
        say!("{l}");
        report.line(l);
        report.check(
            format!("drain >= 50 % of the lower limit: {pct:.0} %"),
            pct >= 50.0,
        );
    }
    if args.events >= 1_000_000 && !d.complete {
        report.unverified(format!(
            "relay peak RSS <= 64 MiB while draining {} events: {:.1} MiB so far, but the drain did not finish ({} delivered)",
            args.events,
            mib(d.peak_rss_kb),
            d.events
        ));
    } else if args.events >= 1_000_000 {
        report.check(
            format!(
                "relay peak RSS <= 64 MiB while draining {} events: {:.1} MiB{}",
                args.events,
                mib(d.peak_rss_kb),
                if d.complete {
                    String::new()
                } else {
                    format!(" (drain incomplete: {} delivered)", d.events)
                }
            ),
            d.peak_rss_kb <= 64 * 1024,
        );
    }
    let relay_pid = relay.as_ref().map(|r| r.pid()).unwrap_or(0);

    let skip_rest = !d.complete;
    if skip_rest {
        say!("the backlog is not drained: skipping the rate and capture phases");
    }

    // ---- (b) fixed-rate latency -----------------------------------------------------------------
    if !args.skip_rates && !skip_rest {
        tokio::time::sleep(Duration::from_secs(2)).await; // let the relay go idle (asleep)
        let mut producers = Vec::new();
        for _ in 0..args.producers.max(1) {
            producers.push(Arc::new(connect_named(url, PRODUCER_APP).await?));
        }
        let monitor = Arc::new(connect_named(url, "relay-bench-monitor").await?);
        for &rate in &args.rates {
            relay.as_mut().expect("relay").check_alive()?;
            say!(
                "(b) {rate}/s for {} s: single-row UPDATE clients SET name (autocommit, {} connections)",
                args.rate_seconds,
                producers.len()
            );
            let p = rate_phase(
                &db,
                monitor.clone(),
                &producers,
                &recv,
                sampler.as_ref(),
                relay_pid,
                rate,
                args.rate_seconds,
                clients,
                Duration::from_millis(args.keep_up_grace_ms),
            )
            .await?;
            let lines = [
                format!(
                    "(b) {}/s: produced {} of {} planned updates ({} errors) at {:.0}/s achieved, {} events captured; received {} within {} ms after the phase, {} in total; kept up: {}",
                    p.rate,
                    p.produced,
                    p.planned,
                    p.errors,
                    p.achieved,
                    p.events_captured,
                    p.received_in_grace,
                    args.keep_up_grace_ms,
                    p.received_total,
                    if p.kept_up { "yes" } else { "NO" }
                ),
                format!("(b) {}/s latency receipt - event.dt:   {} (n={})", p.rate, p.e2e.show(), p.e2e.n),
                format!("(b) {}/s   of which event.dt -> commit: {}", p.rate, p.to_commit.show()),
                format!("(b) {}/s   of which commit -> receipt:  {}", p.rate, p.after_commit.show()),
                format!("(b) {}/s producer UPDATE round trip:    {}", p.rate, p.update_rtt.show()),
                format!("(b) {}/s producer waits: {}", p.rate, p.waits),
                format!(
                    "(b) {}/s other database commits per event (mostly the relay's): {:.2}; relay peak RSS {:.1} MiB",
                    p.rate,
                    p.extra_commits_per_event,
                    mib(p.peak_rss_kb)
                ),
                format!("(b) {}/s {}", p.rate, p.cpu),
            ];
            for l in lines {
                say!("{l}");
                report.line(l);
            }
            if rate == 500 {
                report.check(
                    format!("500/s p50 <= 5 ms: {:.2} ms", p.e2e.p50),
                    p.e2e.p50 <= 5.0,
                );
                report.check(
                    format!("500/s p99 <= 50 ms: {:.2} ms", p.e2e.p99),
                    p.e2e.p99 <= 50.0,
                );
            }
            if rate == 2000 {
                report.check(
                    format!(
                        "keeps up at 2,000/s: {} of {} within {} ms (achieved {:.0}/s)",
                        p.received_in_grace, p.produced, args.keep_up_grace_ms, p.achieved
                    ),
                    p.kept_up && p.achieved >= 1900.0,
                );
            }
            let unparsed = recv.unparsed.load(Relaxed);
            if unparsed > 0 {
                say!("(b) WARNING: {unparsed} request bodies without a parsable event.dt");
            }
        }
    }

    // ---- (e) capture cost -----------------------------------------------------------------------
    if !args.skip_capture_ratio && args.pgbench_without_relay && !skip_rest {
        say!("(e) --pgbench-without-relay: stopping the relay first");
        stop_relay(
            &mut relay,
            &mut sampler,
            relay_pid,
            d.peak_rss_kb,
            &mut report,
        )
        .await?;
    }
    if !args.skip_capture_ratio && !skip_rest {
        let rows = args
            .pgbench_rows
            .unwrap_or(clients.min(100_000))
            .min(clients);
        let spread = balance_spread_sql(args.balance_spread);
        db.batch_execute(&format!(
            "SET provisioning.suppress = 'on';
             UPDATE clients SET balance = {spread} WHERE balance <> {spread};
             RESET provisioning.suppress;
             DROP TABLE IF EXISTS clients_plain;
             CREATE TABLE clients_plain (LIKE clients INCLUDING ALL);
             INSERT INTO clients_plain SELECT * FROM clients;"
        ))
        .await?;
        // The same physical layout for both: the earlier phases left `clients` bloated (more
        // pages touched, more full-page images in WAL per update), the copy is compact.
        db.batch_execute("VACUUM FULL clients").await?;
        db.batch_execute("VACUUM FULL clients_plain").await?;
        let dir = std::env::temp_dir();
        let mut scripts = HashMap::new();
        for (captured, table) in [(true, "clients"), (false, "clients_plain")] {
            let path = dir.join(format!("relay_bench_{}_{table}.sql", std::process::id()));
            std::fs::write(
                &path,
                format!("\\set id random(1, :rows)\n\\set delta random(-10, 10)\nUPDATE {table} SET balance = balance + :delta WHERE id = :id;\n"),
            )?;
            scripts.insert(captured, path);
        }
        say!(
            "(e) capture cost: pgbench -n -M prepared -c {c} -j {c} -T {} on {rows} of {clients} rows, UPDATE balance = balance + random(-10,10), balances spread -{s}..{s}; {}",
            args.pgbench_seconds,
            if relay.is_some() { "relay running" } else { "relay STOPPED (--pgbench-without-relay)" },
            c = args.pgbench_clients,
            s = args.balance_spread,
        );
        let monitor = Arc::new(connect_named(url, "relay-bench-monitor").await?);
        let mut runs = Vec::new();
        for round in 0..args.pgbench_rounds {
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for captured in order {
                if let Some(r) = relay.as_mut() {
                    r.check_alive()?;
                }
                let r = pgbench_run(
                    &db,
                    args,
                    url,
                    &scripts[&captured],
                    rows,
                    captured,
                    relay.as_ref().map(|r| r.pid()),
                    &recv,
                    monitor.clone(),
                )
                .await?;
                let l = if captured {
                    format!(
                        "(e) captured: tps {:.0}, {} updates, {} events captured ({:.2} % of updates), {:.0} WAL bytes per update (server-wide), backlog right after {} -> {}",
                        r.tps,
                        r.xacts,
                        r.events,
                        100.0 * r.events as f64 / r.xacts.max(1) as f64,
                        r.wal_per_xact,
                        r.backlog_after,
                        match (r.relay_running, r.drained_secs) {
                            (false, _) => "kept (relay stopped)".to_string(),
                            (true, Some(s)) => format!("empty after {s:.2} s"),
                            (true, None) => "NOT empty within 60 s".to_string(),
                        }
                    )
                } else {
                    format!(
                        "(e) plain:    tps {:.0}, {} updates, {:.0} WAL bytes per update (server-wide)",
                        r.tps, r.xacts, r.wal_per_xact
                    )
                };
                let waits = format!("(e)   pgbench waits: {}", r.waits);
                let cpu = format!("(e)   {}", r.cpu);
                let wal = format!("(e)   {}", r.wal_counts);
                for line in [l, waits, cpu, wal] {
                    say!("{line}");
                    report.line(line);
                }
                runs.push(r);
            }
        }
        for s in scripts.values() {
            let _ = std::fs::remove_file(s);
        }
        let mean = |captured: bool| {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.captured == captured)
                .map(|r| r.tps)
                .collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        let (plain, captured) = (mean(false), mean(true));
        let ratio = captured / plain;
        let events: i64 = runs.iter().filter(|r| r.captured).map(|r| r.events).sum();
        let l = format!(
            "(e) mean TPS at {} writers: plain {plain:.0}, captured {captured:.0}, ratio {ratio:.3} ({events} events captured in the captured runs)",
            args.pgbench_clients
        );
        say!("{l}");
        report.line(l);
        // Each round is one plain and one captured run back to back: their ratio, round by round,
        // shows how much of a difference between two whole runs is the machine's noise.
        let per_round: Vec<String> = runs
            .chunks(2)
            .filter_map(|pair| {
                let plain = pair.iter().find(|r| !r.captured)?;
                let captured = pair.iter().find(|r| r.captured)?;
                Some(format!("{:.3}", captured.tps / plain.tps.max(1e-9)))
            })
            .collect();
        let l = format!("(e) ratio per round: {}", per_round.join(", "));
        say!("{l}");
        report.line(l);
        let xacts: u64 = runs.iter().filter(|r| r.captured).map(|r| r.xacts).sum();
        report.check(
            format!(
                "capture TPS ratio >= 0.85 at {} writers ({:.1} % of updates emit an event): {ratio:.3}",
                args.pgbench_clients,
                100.0 * events as f64 / xacts.max(1) as f64
            ),
            ratio >= 0.85,
        );
    }

    // ---- (c) memory, shutdown ---------------------------------------------------------------------
    if relay.is_some() {
        stop_relay(
            &mut relay,
            &mut sampler,
            relay_pid,
            d.peak_rss_kb,
            &mut report,
        )
        .await?;
    }
    say!("load at end: {}", uptime());

    println!();
    println!("==================================== SUMMARY ====================================");
    for l in &report.lines {
        println!("{l}");
    }
    println!("---------------------------------- targets ----------------------------------");
    for (what, ok) in &report.checks {
        let verdict = match ok {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "----",
        };
        println!("[{verdict}] {what}");
    }
    if args.events < 1_000_000 {
        println!("[----] relay peak RSS <= 64 MiB while draining 1,000,000 events: run with --events 1000000 (this run: {:.1} MiB at {} events)", mib(d.peak_rss_kb), args.events);
    }
    Ok(())
}
