//! Fault-injection suite: realistic load through capture → relay → a verifying receiver while
//! relays are SIGKILLed, PostgreSQL restarts (fast and immediate), database and receiver
//! connections are cut, and the receiver fails in every way it can. At the end it proves the
//! guarantees of SPEC §5 from the outside: nothing lost, per-object order, duplicates only with
//! the same `webhook-id` and body, dead deliveries with a reason, bounded relay memory.
//!
//! One source, two entry points:
//!
//! ```text
//! cargo test --test integration faults -- --nocapture          # short form (CI, ~2-3 minutes)
//! cargo build --release && cargo run --release --example faults -- --long      # long form
//! cargo run --release --example faults -- --minutes 4 --kills 6                # medium form
//! ```
//!
//! What runs (all on 127.0.0.1, nothing shared with other tests):
//!
//! - a throwaway PostgreSQL cluster ([`relay::demo::TempCluster`]) with the schema and the VCS
//!   preset, a few hundred clients and packages;
//! - a TCP proxy between the relays and PostgreSQL that can drop every connection at once;
//! - two real `relay run` processes (r1, r2) connected through the proxy;
//! - a raw-TCP HTTP/1.1 receiver (minimal parser, keep-alive) that answers each request, decided
//!   by a seeded RNG: 2xx (plain, slow body, 10 MiB body) or a failure — 500, 500 with a 10 MiB
//!   body, an answer slower than the handler timeout, a hang, a reset (RST), a close without an
//!   answer (FIN), a body cut short, invalid HTTP, 410 Gone (pauses the handler; the suite resumes
//!   it), 429 with Retry-After. From attempt 8 on it always accepts, so every delivery converges;
//! - three handlers: `faults-a` and `faults-b` (both `clients.*`, different paths, timeouts,
//!   payload formats, signing and failure mixes) and `faults-dead` (`clients.balance_zero`, always
//!   500, 3 attempts) which proves "dead with a reason" accounting;
//! - writers on several connections changing clients (details, balances crossing zero, custom
//!   fields, status, archive, delete + re-create), and client_packages (assign, activate, renew,
//!   deactivate, close, delete), with multi-row and rolled-back transactions, at a steady rate.
//!
//! Faults are scheduled at seeded random moments spread over the load: SIGKILL of one relay (then
//! restart), PostgreSQL `stop -m fast` / `stop -m immediate` + start, proxy cuts, receiver cuts.
//! Then the load stops, faults stop (the receiver accepts everything), and the suite waits — with
//! a deadline — for the queue to drain, stops the relays with SIGTERM (they must exit 0), and
//! checks, against `provisioning.events` (the truth) and what the receiver accepted:
//!
//! - expected = every captured event (after the handlers were created) × every handler whose
//!   subscription matches it (matched here, independently of the product's SQL);
//! - delivered = expected pairs accepted (2xx) at least once; dead = expected pairs with a
//!   `dead` delivery (each must have a `last_error`); lost = the rest, which must be 0;
//! - no delivery for an unknown event/handler, the `webhook-id` names the right handler and event,
//!   the body names the right event and object, identical bodies across all attempts, valid
//!   signatures;
//! - order: for each handler and object the accepted event ids never go down (a repeat of the
//!   same event is a duplicate, allowed); and no request for an event arrives before every earlier
//!   event of that handler and object was accepted (or went dead);
//! - duplicates are counted (same `webhook-id` and body by construction of the key and check);
//! - `faults-a`/`faults-b` never go dead; `faults-dead` deliveries all go dead;
//! - relays never exit by themselves or panic; peak RSS stays under the limit; every receiver
//!   failure mode was exercised; the planned numbers of kills, restarts and cuts happened.
//!
//! Seeds: the RNG seed is printed; the faults, receiver decisions and writers follow it (timing
//! still varies run to run, as on a real machine). `FAULTS_SEED=<n>` reuses one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

use relay::demo::TempCluster;

/// From this attempt on the receiver always accepts (the schedules allow 16 attempts).
const FORCE_ACCEPT_ATTEMPT: u32 = 8;
/// Signing secret of `faults-a` (the receiver verifies every signature).
const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const HUGE: usize = 10 * 1024 * 1024;

// ------------------------------------------------------------------------------------------------
// Options and report
// ------------------------------------------------------------------------------------------------

/// What to run. [`Options::short`] is the CI form, [`Options::long`] the long one.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `relay` binary to run (twice).
    pub relay_bin: PathBuf,
    /// How long the writers run.
    pub load: Duration,
    /// SIGKILLs of a relay (each followed by a restart).
    pub kills: usize,
    /// PostgreSQL `stop -m fast` + start.
    pub fast_restarts: usize,
    /// PostgreSQL `stop -m immediate` (crash) + start.
    pub immediate_restarts: usize,
    /// Drops of every relay↔PostgreSQL connection at the proxy.
    pub proxy_cuts: usize,
    /// Drops of every relay→receiver connection at the receiver.
    pub receiver_cuts: usize,
    /// 410 Gone answers per handler (each pauses it until the suite resumes it).
    pub max_gone: usize,
    /// Clients created before the load (objects; packages come on top).
    pub clients: i64,
    /// Packages assigned before the load (more are assigned during it).
    pub packages: i64,
    /// Writer connections.
    pub writers: usize,
    /// Transactions per second over all writers.
    pub rate: f64,
    pub seed: u64,
    /// How long the queue may take to drain once load and faults stopped.
    pub drain_deadline: Duration,
    /// Peak RSS allowed for a relay process.
    pub rss_limit_mib: u64,
    /// `lease_margin_ms` of the relays.
    pub lease_margin_ms: u64,
    /// Keep the relays' logs even when everything passed.
    pub keep_logs: bool,
}

impl Options {
    /// ~75 s of load, 3 kills, 1 fast + 1 immediate restart, 3 + 3 cuts: the CI form.
    pub fn short(relay_bin: PathBuf) -> Options {
        Options {
            relay_bin,
            load: Duration::from_secs(75),
            kills: 3,
            fast_restarts: 1,
            immediate_restarts: 1,
            proxy_cuts: 3,
            receiver_cuts: 3,
            max_gone: 2,
            clients: 250,
            packages: 120,
            writers: 4,
            rate: 40.0,
            seed: default_seed(),
            drain_deadline: Duration::from_secs(180),
            rss_limit_mib: 200,
            lease_margin_ms: 1500,
            keep_logs: false,
        }
    }

    /// 10 minutes of load, 12 kills (one of them both relays at once), 3 fast + 3 immediate
    /// restarts, 10 + 10 cuts.
    pub fn long(relay_bin: PathBuf) -> Options {
        Options {
            load: Duration::from_secs(600),
            kills: 12,
            fast_restarts: 3,
            immediate_restarts: 3,
            proxy_cuts: 10,
            receiver_cuts: 10,
            max_gone: 6,
            clients: 400,
            packages: 200,
            writers: 6,
            rate: 50.0,
            drain_deadline: Duration::from_secs(600),
            ..Options::short(relay_bin)
        }
    }

    /// Scale the fault counts of the short form to `load` (at least the short form's counts).
    pub fn medium(relay_bin: PathBuf, load: Duration) -> Options {
        let minutes = load.as_secs_f64() / 60.0;
        let per_min = |n: f64, min: usize| ((n * minutes).round() as usize).max(min);
        Options {
            load,
            kills: per_min(1.2, 3),
            fast_restarts: per_min(0.3, 1),
            immediate_restarts: per_min(0.3, 1),
            proxy_cuts: per_min(1.0, 3),
            receiver_cuts: per_min(1.0, 3),
            max_gone: per_min(0.6, 2),
            clients: 400,
            packages: 200,
            writers: 6,
            rate: 50.0,
            drain_deadline: Duration::from_secs(600),
            ..Options::short(relay_bin)
        }
    }
}

/// `FAULTS_SEED` or the clock.
pub fn default_seed() -> u64 {
    std::env::var("FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
        })
}

/// Per-handler numbers of the final report.
#[derive(Debug, Clone, Default)]
pub struct HandlerLine {
    pub name: String,
    pub subscribes: String,
    pub expected: usize,
    pub delivered: usize,
    pub dead: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub requests: usize,
}

/// What happened, and every violated guarantee (empty = pass).
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub load_secs: f64,
    pub drain_secs: f64,
    pub total_secs: f64,
    pub events: usize,
    pub handlers: Vec<HandlerLine>,
    pub expected: usize,
    pub delivered: usize,
    pub dead: usize,
    pub dead_reasons: BTreeMap<String, usize>,
    pub lost: usize,
    pub duplicates: usize,
    pub order_violations: usize,
    pub start_order_violations: usize,
    pub requests: usize,
    pub modes: BTreeMap<String, u64>,
    pub kills: usize,
    pub relay_starts: usize,
    pub fast_restarts: usize,
    pub immediate_restarts: usize,
    pub pg_downtime_secs: f64,
    /// Changes made in the bursts right before immediate stops.
    pub burst_changes: usize,
    pub proxy_cuts: usize,
    pub proxy_connections_cut: usize,
    pub receiver_cuts: usize,
    pub receiver_connections_cut: usize,
    pub gone_pauses: usize,
    pub resumes: usize,
    pub peak_rss_mib: f64,
    pub peak_hwm_mib: f64,
    pub writer_commits: u64,
    pub writer_rollbacks: u64,
    pub writer_errors: u64,
    pub lease_recoveries_logged: usize,
    pub fenced_completion_warnings: usize,
    pub log_dir: Option<PathBuf>,
    pub details: Vec<String>,
    pub violations: Vec<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "================ fault-injection report ================"
        )?;
        writeln!(
            f,
            "seed {}   load {:.0} s   drain {:.1} s   total {:.0} s",
            self.seed, self.load_secs, self.drain_secs, self.total_secs
        )?;
        writeln!(
            f,
            "writers: {} commits, {} deliberate rollbacks, {} errors (faults)",
            self.writer_commits, self.writer_rollbacks, self.writer_errors
        )?;
        writeln!(f, "events captured:          {}", self.events)?;
        writeln!(f, "handlers:                 {}", self.handlers.len())?;
        writeln!(
            f,
            "  {:<12} {:<22} {:>8} {:>9} {:>6} {:>5} {:>6} {:>8}",
            "name", "subscribes", "expected", "delivered", "dead", "lost", "dups", "requests"
        )?;
        for h in &self.handlers {
            writeln!(
                f,
                "  {:<12} {:<22} {:>8} {:>9} {:>6} {:>5} {:>6} {:>8}",
                h.name,
                h.subscribes,
                h.expected,
                h.delivered,
                h.dead,
                h.lost,
                h.duplicates,
                h.requests
            )?;
        }
        writeln!(f, "deliveries expected:      {}", self.expected)?;
        writeln!(f, "delivered (2xx ≥ once):   {}", self.delivered)?;
        writeln!(f, "dead (with a reason):     {}", self.dead)?;
        for (reason, n) in &self.dead_reasons {
            writeln!(f, "    {n} × {reason}")?;
        }
        writeln!(f, "LOST:                     {}", self.lost)?;
        writeln!(
            f,
            "order violations:         {} (accepted ids going down), {} (started before an earlier one was accepted)",
            self.order_violations, self.start_order_violations
        )?;
        writeln!(
            f,
            "duplicates:               {} (same webhook-id, identical body)",
            self.duplicates
        )?;
        writeln!(f, "receiver requests:        {}", self.requests)?;
        let modes: Vec<String> = self.modes.iter().map(|(m, n)| format!("{m} {n}")).collect();
        writeln!(f, "  answers: {}", modes.join(", "))?;
        writeln!(
            f,
            "relay SIGKILLs:           {} ({} relay starts in all)",
            self.kills, self.relay_starts
        )?;
        writeln!(
            f,
            "PostgreSQL restarts:      {} fast, {} immediate ({:.1} s down in all; {} burst changes just before the crashes)",
            self.fast_restarts, self.immediate_restarts, self.pg_downtime_secs, self.burst_changes
        )?;
        writeln!(
            f,
            "connection cuts:          proxy {} ({} connections), receiver {} ({} connections)",
            self.proxy_cuts,
            self.proxy_connections_cut,
            self.receiver_cuts,
            self.receiver_connections_cut
        )?;
        writeln!(
            f,
            "410 pauses / resumes:     {} / {}",
            self.gone_pauses, self.resumes
        )?;
        writeln!(
            f,
            "lease recoveries logged:  {}   fenced-completion warnings: {}",
            self.lease_recoveries_logged, self.fenced_completion_warnings
        )?;
        writeln!(
            f,
            "relay peak RSS:           {:.1} MiB (sampled VmRSS), {:.1} MiB (VmHWM)",
            self.peak_rss_mib, self.peak_hwm_mib
        )?;
        if let Some(dir) = &self.log_dir {
            writeln!(f, "relay logs:               {}", dir.display())?;
        }
        for d in &self.details {
            writeln!(f, "  {d}")?;
        }
        if self.violations.is_empty() {
            writeln!(f, "RESULT: PASS")?;
        } else {
            writeln!(f, "RESULT: FAIL — {} violation(s):", self.violations.len())?;
            for v in &self.violations {
                writeln!(f, "  - {v}")?;
            }
        }
        write!(
            f,
            "========================================================"
        )
    }
}

// ------------------------------------------------------------------------------------------------
// Progress output
// ------------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Say {
    t0: Instant,
}

impl Say {
    fn say(&self, msg: impl AsRef<str>) {
        println!(
            "[{:>7.1}s] {}",
            self.t0.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }
}

// ------------------------------------------------------------------------------------------------
// TCP proxy between the relays and PostgreSQL
// ------------------------------------------------------------------------------------------------

struct Proxy {
    addr: SocketAddr,
    generation: Arc<Mutex<CancellationToken>>,
    active: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let active = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (g, a, s) = (generation.clone(), active.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let inbound = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok((sock, _)) => sock,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let cut = g.lock().expect("proxy lock").clone();
                let active = a.clone();
                let stop = s.clone();
                tokio::spawn(async move {
                    let mut inbound = inbound;
                    let mut outbound = match tokio::time::timeout(
                        Duration::from_secs(5),
                        TcpStream::connect(upstream),
                    )
                    .await
                    {
                        Ok(Ok(o)) => o,
                        // PostgreSQL is down: the client sees its connection die.
                        _ => return,
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    active.fetch_add(1, Ordering::SeqCst);
                    tokio::select! {
                        _ = cut.cancelled() => {
                            let _ = inbound.set_zero_linger();
                            let _ = outbound.set_zero_linger();
                        }
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Proxy {
            addr,
            generation,
            active,
            stop,
        })
    }

    /// Drop every current connection (RST both ways). Returns how many there were.
    fn cut(&self) -> usize {
        let old = std::mem::replace(
            &mut *self.generation.lock().expect("proxy lock"),
            CancellationToken::new(),
        );
        let n = self.active.load(Ordering::SeqCst);
        old.cancel();
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// ------------------------------------------------------------------------------------------------
// The verifying receiver: raw TCP, minimal HTTP/1.1
// ------------------------------------------------------------------------------------------------

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Mode {
    /// 200, small body.
    Ok,
    /// 200 whose body trickles in over ~0.5 s (within the timeout).
    OkSlowBody,
    /// 200 with a 10 MiB body (the relay keeps a truncated copy).
    OkHuge,
    /// 500.
    Fail500,
    /// 500 with a 10 MiB body.
    Fail500Huge,
    /// Answers (504) only after the handler timeout.
    Timeout,
    /// Never answers; waits until the relay gives up.
    Hang,
    /// Closes with RST without answering.
    Reset,
    /// Closes with FIN without answering.
    Close,
    /// 200 headers, then a body that trickles past the timeout and is cut short.
    SlowBodyCut,
    /// Something that is not HTTP.
    Invalid,
    /// 410 Gone: the relay pauses the handler.
    Gone,
    /// 429 with Retry-After.
    TooMany,
}

const ALL_MODES: [Mode; 13] = [
    Mode::Ok,
    Mode::OkSlowBody,
    Mode::OkHuge,
    Mode::Fail500,
    Mode::Reset,
    Mode::Invalid,
    Mode::Timeout,
    Mode::Hang,
    Mode::Close,
    Mode::SlowBodyCut,
    Mode::TooMany,
    Mode::Fail500Huge,
    Mode::Gone,
];

impl Mode {
    /// Does the receiver take the delivery (2xx with a complete body)?
    fn accepts(self) -> bool {
        matches!(self, Mode::Ok | Mode::OkSlowBody | Mode::OkHuge)
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Ok => "200",
            Mode::OkSlowBody => "200-slow-body",
            Mode::OkHuge => "200-10MiB",
            Mode::Fail500 => "500",
            Mode::Fail500Huge => "500-10MiB",
            Mode::Timeout => "too-slow",
            Mode::Hang => "hang",
            Mode::Reset => "reset",
            Mode::Close => "close",
            Mode::SlowBodyCut => "body-cut",
            Mode::Invalid => "invalid-http",
            Mode::Gone => "410",
            Mode::TooMany => "429",
        }
    }
}

/// One receiver path = one handler.
#[derive(Debug, Clone)]
struct Route {
    path: &'static str,
    handler: &'static str,
    /// Probability that an attempt (below [`FORCE_ACCEPT_ATTEMPT`]) fails.
    p_fail: f64,
    /// Failure mix (weights).
    weights: Vec<(Mode, u32)>,
    always_fail: bool,
    timeout: Duration,
    secret: Option<&'static str>,
    full_format: bool,
}

/// One complete request as the receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    seq: usize,
    at: Duration,
    route: usize,
    webhook_id: String,
    /// From the webhook-id (`evt_<event>_h<handler>`); -1 if malformed.
    event_id: i64,
    wh_handler: i64,
    attempt: u32,
    mode: Mode,
    body_hash: u64,
    /// From the body.
    event_name: String,
    object: String,
    body_event_id: Option<i64>,
}

struct RecvShared {
    routes: Vec<Route>,
    rng: Mutex<StdRng>,
    seen: Mutex<Vec<Seen>>,
    unused: Mutex<Vec<Vec<Mode>>>,
    gone_left: Mutex<Vec<usize>>,
    /// 410s are spread over the run: at most one per route per `gone_spacing`.
    gone_next: Mutex<Vec<Instant>>,
    gone_spacing: Duration,
    faults_on: AtomicBool,
    cut: Mutex<CancellationToken>,
    open: AtomicUsize,
    problems: Mutex<Vec<String>>,
    modes: Mutex<BTreeMap<Mode, u64>>,
    start: Instant,
    stop: CancellationToken,
}

struct Receiver {
    addr: SocketAddr,
    shared: Arc<RecvShared>,
}

struct RawRequest {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    close: bool,
}

impl RawRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Receiver {
    async fn start(
        routes: Vec<Route>,
        seed: u64,
        max_gone: usize,
        gone_spacing: Duration,
    ) -> anyhow::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let n = routes.len();
        let shared = Arc::new(RecvShared {
            routes,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            seen: Mutex::new(Vec::new()),
            unused: Mutex::new(vec![ALL_MODES.to_vec(); n]),
            gone_left: Mutex::new(vec![max_gone; n]),
            gone_next: Mutex::new(vec![Instant::now(); n]),
            gone_spacing,
            faults_on: AtomicBool::new(true),
            cut: Mutex::new(CancellationToken::new()),
            open: AtomicUsize::new(0),
            problems: Mutex::new(Vec::new()),
            modes: Mutex::new(BTreeMap::new()),
            start: Instant::now(),
            stop: CancellationToken::new(),
        });
        let s = shared.clone();
        tokio::spawn(async move {
            loop {
                let sock = tokio::select! {
                    _ = s.stop.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok((sock, _)) => sock,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let s2 = s.clone();
                let cut = s.cut.lock().expect("cut lock").clone();
                tokio::spawn(async move {
                    s2.open.fetch_add(1, Ordering::SeqCst);
                    serve_connection(&s2, sock, cut).await;
                    s2.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Receiver { addr, shared })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Drop every open connection (RST). Returns how many there were.
    fn cut(&self) -> usize {
        let old = std::mem::replace(
            &mut *self.shared.cut.lock().expect("cut lock"),
            CancellationToken::new(),
        );
        let n = self.shared.open.load(Ordering::SeqCst);
        old.cancel();
        n
    }

    fn faults(&self, on: bool) {
        self.shared.faults_on.store(on, Ordering::SeqCst);
    }

    fn accepted_count(&self) -> usize {
        self.shared
            .seen
            .lock()
            .expect("seen lock")
            .iter()
            .filter(|s| s.mode.accepts())
            .count()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        self.cut();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Read one request (request line, headers, Content-Length body). `Ok(None)` at a clean EOF.
async fn read_request(
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<RawRequest>> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let head_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(bad("request head larger than 64 KiB"));
        }
        buf.reserve(16 * 1024);
        if sock.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(bad("connection closed mid-request"))
            };
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, path, version) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    if method != "POST" || !path.starts_with('/') || version != "HTTP/1.1" {
        return Err(bad(&format!("unexpected request line {request_line:?}")));
    }
    let path = path.to_string();
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(&format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    if header("transfer-encoding").is_some() {
        return Err(bad("chunked request bodies are not expected"));
    }
    let len: usize = match header("content-length") {
        Some(v) => v.parse().map_err(|_| bad("bad content-length"))?,
        None => 0,
    };
    if len > 4 * 1024 * 1024 {
        return Err(bad("request body larger than 4 MiB"));
    }
    let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    while buf.len() < head_end + len {
        buf.reserve(head_end + len - buf.len());
        if sock.read_buf(buf).await? == 0 {
            return Err(bad("connection closed mid-body"));
        }
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Ok(Some(RawRequest {
        path,
        headers,
        body,
        close,
    }))
}

async fn serve_connection(shared: &Arc<RecvShared>, mut sock: TcpStream, cut: CancellationToken) {
    let _ = sock.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    loop {
        let req = tokio::select! {
            _ = cut.cancelled() => {
                let _ = sock.set_zero_linger();
                return;
            }
            r = read_request(&mut sock, &mut buf) => r,
        };
        let req = match req {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    shared
                        .problems
                        .lock()
                        .expect("problems lock")
                        .push(format!("malformed request from a relay: {e}"));
                }
                return;
            }
        };
        let Some(route_idx) = shared.routes.iter().position(|r| r.path == req.path) else {
            shared
                .problems
                .lock()
                .expect("problems lock")
                .push(format!("request for unknown path {}", req.path));
            let _ = sock
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await;
            continue;
        };
        let mode = record(shared, route_idx, &req);
        let keep = tokio::select! {
            _ = cut.cancelled() => {
                let _ = sock.set_zero_linger();
                return;
            }
            k = answer(shared, &mut sock, route_idx, mode) => k,
        };
        if !keep || req.close {
            return;
        }
    }
}

/// Check the request, decide how to answer it, and record it (acceptance is recorded before the
/// 2xx is written: a relay can never see a success the receiver did not count).
fn record(shared: &RecvShared, route_idx: usize, req: &RawRequest) -> Mode {
    let route = &shared.routes[route_idx];
    let webhook_id = req.header("webhook-id").unwrap_or("").to_string();
    let (event_id, wh_handler) = parse_webhook_id(&webhook_id).unwrap_or((-1, -1));
    let attempt: u32 = req
        .header("x-provisioning-attempt")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut problems = Vec::new();
    if event_id < 0 {
        problems.push(format!(
            "{}: malformed webhook-id {webhook_id:?}",
            route.path
        ));
    }
    if attempt == 0 {
        problems.push(format!(
            "{}: {webhook_id}: no x-provisioning-attempt header",
            route.path
        ));
    }
    if let Some(secret) = route.secret {
        let ts: Option<i64> = req.header("webhook-timestamp").and_then(|v| v.parse().ok());
        let ok = match (ts, req.header("webhook-signature")) {
            (Some(ts), Some(sig)) => {
                let want = relay::delivery::signing::sign(secret, &webhook_id, ts, &req.body);
                sig.split_whitespace().any(|s| s == want)
            }
            _ => false,
        };
        if !ok {
            problems.push(format!(
                "{}: {webhook_id}: missing or invalid webhook-signature",
                route.path
            ));
        }
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    req.body.hash(&mut hasher);
    let body_hash = hasher.finish();
    let (event_name, object, body_event_id) =
        match serde_json::from_slice::<serde_json::Value>(&req.body) {
            Ok(v) => {
                let ev = &v["event"];
                let object = match &ev["object_id"] {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (
                    ev["events_id"].as_str().unwrap_or("").to_string(),
                    object,
                    ev["id"].as_i64(),
                )
            }
            Err(e) => {
                problems.push(format!(
                    "{}: {webhook_id}: body is not JSON: {e}",
                    route.path
                ));
                (String::new(), String::new(), None)
            }
        };
    if !problems.is_empty() {
        shared
            .problems
            .lock()
            .expect("problems lock")
            .extend(problems);
    }
    let mode = decide(shared, route_idx, attempt);
    *shared
        .modes
        .lock()
        .expect("modes lock")
        .entry(mode)
        .or_default() += 1;
    let mut seen = shared.seen.lock().expect("seen lock");
    let seq = seen.len();
    seen.push(Seen {
        seq,
        at: shared.start.elapsed(),
        route: route_idx,
        webhook_id,
        event_id,
        wh_handler,
        attempt,
        mode,
        body_hash,
        event_name,
        object,
        body_event_id,
    });
    mode
}

fn parse_webhook_id(id: &str) -> Option<(i64, i64)> {
    let rest = id.strip_prefix("evt_")?;
    let (ev, h) = rest.split_once("_h")?;
    Some((ev.parse().ok()?, h.parse().ok()?))
}

fn decide(shared: &RecvShared, route_idx: usize, attempt: u32) -> Mode {
    let route = &shared.routes[route_idx];
    if route.always_fail {
        return Mode::Fail500;
    }
    if !shared.faults_on.load(Ordering::SeqCst) {
        return Mode::Ok;
    }
    let mut rng = shared.rng.lock().expect("rng lock");
    let mut unused = shared.unused.lock().expect("unused lock");
    let unused = &mut unused[route_idx];
    let fail = attempt < FORCE_ACCEPT_ATTEMPT && rng.gen_bool(route.p_fail);
    if !fail {
        // Exercise the accepting variants early, then mostly plain 200s.
        if let Some(p) = unused.iter().position(|m| m.accepts()) {
            return unused.remove(p);
        }
        let x = rng.gen_range(0..100);
        return match x {
            0..=3 => Mode::OkSlowBody,
            4 => Mode::OkHuge,
            _ => Mode::Ok,
        };
    }
    let mut mode = match unused.iter().position(|m| !m.accepts()) {
        Some(p) => unused.remove(p),
        None => {
            let total: u32 = route.weights.iter().map(|(_, w)| w).sum();
            let mut x = rng.gen_range(0..total);
            let mut pick = Mode::Fail500;
            for (m, w) in &route.weights {
                if x < *w {
                    pick = *m;
                    break;
                }
                x -= w;
            }
            pick
        }
    };
    if mode == Mode::Gone {
        let mut left = shared.gone_left.lock().expect("gone lock");
        let mut next = shared.gone_next.lock().expect("gone lock");
        let now = Instant::now();
        if left[route_idx] == 0 || now < next[route_idx] {
            mode = Mode::Fail500;
        } else {
            left[route_idx] -= 1;
            next[route_idx] = now + shared.gone_spacing;
        }
    }
    mode
}

/// Write the answer; false = close the connection.
async fn answer(shared: &RecvShared, sock: &mut TcpStream, route_idx: usize, mode: Mode) -> bool {
    let route = &shared.routes[route_idx];
    let simple = |status: &str, extra: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{extra}\r\n{body}",
            body.len()
        )
    };
    match mode {
        Mode::Ok => sock
            .write_all(simple("200 OK", "", "{\"ok\":true}").as_bytes())
            .await
            .is_ok(),
        Mode::OkSlowBody => {
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1000\r\n\r\n";
            if sock.write_all(head.as_bytes()).await.is_err() {
                return false;
            }
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if sock.write_all(&[b's'; 100]).await.is_err() {
                    return false;
                }
            }
            true
        }
        Mode::OkHuge | Mode::Fail500Huge => {
            let status = if mode == Mode::OkHuge {
                "200 OK"
            } else {
                "500 Internal Server Error"
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {HUGE}\r\n\r\n"
            );
            if sock.write_all(head.as_bytes()).await.is_err() {
                return false;
            }
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0;
            while sent < HUGE {
                if sock.write_all(&chunk).await.is_err() {
                    return false;
                }
                sent += chunk.len();
            }
            false
        }
        Mode::Fail500 => sock
            .write_all(
                simple(
                    "500 Internal Server Error",
                    "",
                    "receiver failure (planned)",
                )
                .as_bytes(),
            )
            .await
            .is_ok(),
        Mode::Timeout => {
            tokio::time::sleep(route.timeout + Duration::from_millis(1000)).await;
            let _ = sock
                .write_all(simple("504 Gateway Timeout", "", "too late").as_bytes())
                .await;
            false
        }
        Mode::Hang => {
            // Hold the connection until the relay gives up (EOF), or a generous cap.
            let mut scratch = [0u8; 1024];
            let cap = route.timeout * 4 + Duration::from_secs(10);
            let _ = tokio::time::timeout(cap, async {
                loop {
                    match sock.read(&mut scratch).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            false
        }
        Mode::Reset => {
            let _ = sock.set_zero_linger();
            false
        }
        Mode::Close => {
            let _ = sock.shutdown().await;
            false
        }
        Mode::SlowBodyCut => {
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100000\r\n\r\n";
            if sock.write_all(head.as_bytes()).await.is_err() {
                return false;
            }
            let until = Instant::now() + route.timeout + Duration::from_millis(500);
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if sock.write_all(b"trickle...").await.is_err() {
                    return false;
                }
            }
            false
        }
        Mode::Invalid => {
            let variant = shared.rng.lock().expect("rng lock").gen_range(0..4);
            let junk: &[u8] = match variant {
                0 => b"this is not HTTP at all\r\n\r\n",
                1 => b"HTTP/1.1 abc Nope\r\ncontent-length: 0\r\n\r\n",
                2 => b"HTTP/9.9 500 Who Knows\r\n\r\n",
                _ => b"\x00\x01\x02\xff\xfe garbage \r\n\r\n",
            };
            let _ = sock.write_all(junk).await;
            false
        }
        Mode::Gone => sock
            .write_all(simple("410 Gone", "", "this endpoint is gone (planned)").as_bytes())
            .await
            .is_ok(),
        Mode::TooMany => {
            let secs = shared.rng.lock().expect("rng lock").gen_range(1..=2);
            sock.write_all(
                simple(
                    "429 Too Many Requests",
                    &format!("retry-after: {secs}\r\n"),
                    "slow down",
                )
                .as_bytes(),
            )
            .await
            .is_ok()
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The two relay processes
// ------------------------------------------------------------------------------------------------

struct Slot {
    name: String,
    child: Option<Child>,
    incarnation: u32,
}

struct Relays {
    bin: PathBuf,
    url: String,
    dir: PathBuf,
    lease_margin_ms: u64,
    slots: Mutex<Vec<Slot>>,
    kills: AtomicUsize,
    starts: AtomicUsize,
    crashes: Mutex<Vec<String>>,
    peak_rss_kib: AtomicU64,
    peak_hwm_kib: AtomicU64,
    logs: Mutex<Vec<PathBuf>>,
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Relays {
    fn new(bin: PathBuf, url: String, dir: PathBuf, lease_margin_ms: u64, n: usize) -> Relays {
        Relays {
            bin,
            url,
            dir,
            lease_margin_ms,
            slots: Mutex::new(
                (1..=n)
                    .map(|i| Slot {
                        name: format!("r{i}"),
                        child: None,
                        incarnation: 0,
                    })
                    .collect(),
            ),
            kills: AtomicUsize::new(0),
            starts: AtomicUsize::new(0),
            crashes: Mutex::new(Vec::new()),
            peak_rss_kib: AtomicU64::new(0),
            peak_hwm_kib: AtomicU64::new(0),
            logs: Mutex::new(Vec::new()),
        }
    }

    fn spawn(&self, slot: &mut Slot) -> anyhow::Result<u32> {
        slot.incarnation += 1;
        let log = self
            .dir
            .join(format!("{}-{}.log", slot.name, slot.incarnation));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(&self.bin)
            .arg("run")
            .args(["--database-url", &self.url])
            .args(["--set", "admin_listen="])
            .args(["--set", &format!("relay_name={}", slot.name)])
            .args([
                "--set",
                &format!("lease_margin_ms={}", self.lease_margin_ms),
            ])
            .args(["--set", "poll_interval_ms=200"])
            .args(["--set", "shutdown_grace_ms=3000"])
            .env_remove("RELAY_CONFIG")
            .env_remove("DATABASE_URL")
            .env_remove("RELAY_LOG")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let pid = child.id();
        slot.child = Some(child);
        self.starts.fetch_add(1, Ordering::SeqCst);
        self.logs.lock().expect("logs lock").push(log);
        Ok(pid)
    }

    fn start_all(&self) -> anyhow::Result<()> {
        let mut slots = self.slots.lock().expect("slots lock");
        for s in slots.iter_mut() {
            self.spawn(s)?;
        }
        Ok(())
    }

    fn count(&self) -> usize {
        self.slots.lock().expect("slots lock").len()
    }

    fn sample_one(&self, pid: u32) {
        if let Some(kib) = proc_status_kib(pid, "VmRSS:") {
            self.peak_rss_kib.fetch_max(kib, Ordering::SeqCst);
        }
        if let Some(kib) = proc_status_kib(pid, "VmHWM:") {
            self.peak_hwm_kib.fetch_max(kib, Ordering::SeqCst);
        }
    }

    /// SIGKILL relay `i` and reap it. Returns its name and pid, or None if it was not running.
    fn kill(&self, i: usize) -> Option<(String, u32)> {
        let mut slots = self.slots.lock().expect("slots lock");
        let slot = &mut slots[i];
        let mut child = slot.child.take()?;
        let pid = child.id();
        if let Ok(Some(status)) = child.try_wait() {
            self.note_crash(slot, status);
            return None;
        }
        self.sample_one(pid);
        let _ = child.kill();
        let _ = child.wait();
        self.kills.fetch_add(1, Ordering::SeqCst);
        Some((slot.name.clone(), pid))
    }

    fn restart(&self, i: usize) -> anyhow::Result<Option<(String, u32)>> {
        let mut slots = self.slots.lock().expect("slots lock");
        let slot = &mut slots[i];
        if slot.child.is_some() {
            return Ok(None);
        }
        let pid = self.spawn(slot)?;
        Ok(Some((slot.name.clone(), pid)))
    }

    fn note_crash(&self, slot: &Slot, status: std::process::ExitStatus) {
        let log = self
            .dir
            .join(format!("{}-{}.log", slot.name, slot.incarnation));
        self.crashes.lock().expect("crash lock").push(format!(
            "relay {} (start #{}) exited by itself with {status}; log tail:\n{}",
            slot.name,
            slot.incarnation,
            tail(&log, 30)
        ));
    }

    /// Sample RSS; detect (and restart) relays that exited by themselves.
    fn sample(&self) {
        let mut slots = self.slots.lock().expect("slots lock");
        for slot in slots.iter_mut() {
            let Some(child) = slot.child.as_mut() else {
                continue;
            };
            match child.try_wait() {
                Ok(Some(status)) => {
                    slot.child = None;
                    self.note_crash(slot, status);
                    if let Err(e) = self.spawn(slot) {
                        self.crashes
                            .lock()
                            .expect("crash lock")
                            .push(format!("cannot restart {}: {e:#}", slot.name));
                    }
                }
                Ok(None) => {
                    let pid = child.id();
                    self.sample_one(pid);
                }
                Err(_) => {}
            }
        }
    }

    /// SIGTERM every relay and wait for a clean exit. Returns problems.
    async fn terminate_all(&self, deadline: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        let mut children: Vec<(String, u32, Child)> = Vec::new();
        {
            let mut slots = self.slots.lock().expect("slots lock");
            for slot in slots.iter_mut() {
                if let Some(child) = slot.child.take() {
                    let pid = child.id();
                    self.sample_one(pid);
                    // SAFETY: kill(2) on our own child process.
                    unsafe {
                        libc::kill(pid as i32, libc::SIGTERM);
                    }
                    children.push((format!("{}-{}", slot.name, slot.incarnation), pid, child));
                }
            }
        }
        let start = Instant::now();
        for (name, _pid, mut child) in children {
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() {
                            problems.push(format!(
                                "relay {name} did not exit cleanly on SIGTERM: {status}; log tail:\n{}",
                                tail(&self.dir.join(format!("{name}.log")), 20)
                            ));
                        }
                        break;
                    }
                    Ok(None) if start.elapsed() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        problems.push(format!(
                            "relay {name} did not exit within {deadline:?} of SIGTERM (killed)"
                        ));
                        break;
                    }
                    Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                    Err(e) => {
                        problems.push(format!("waiting for relay {name}: {e}"));
                        break;
                    }
                }
            }
        }
        problems
    }

    /// Count log lines containing `needle` over every relay log.
    fn grep(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .expect("logs lock")
            .iter()
            .map(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.slots.lock() {
            for slot in slots.iter_mut() {
                if let Some(mut child) = slot.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Load: writers on the VCS tables
// ------------------------------------------------------------------------------------------------

#[derive(Default)]
struct WriterStats {
    commits: AtomicU64,
    rollbacks: AtomicU64,
    errors: AtomicU64,
}

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn connect_within(url: &str, limit: Duration) -> Option<Client> {
    match tokio::time::timeout(limit, connect(url)).await {
        Ok(Ok(c)) => Some(c),
        _ => None,
    }
}

struct LoadShape {
    clients: i64,
    /// While set, writers skip their turns (the quiet moment before a crash, see [`pg_restart`]).
    quiet: Arc<AtomicBool>,
    packages_cap: i64,
    max_package: Arc<AtomicI64>,
}

/// One realistic change (or a deliberate rollback). Returns true if it committed.
async fn one_change(
    c: &mut Client,
    rng: &mut StdRng,
    shape: &LoadShape,
) -> Result<bool, tokio_postgres::Error> {
    let id: i64 = rng.gen_range(1..=shape.clients);
    let roll = rng.gen_range(0..100);
    let tag: i64 = rng.gen_range(0..1_000_000);
    match roll {
        // balance moves around zero: balance_zero / balance_notzero, no clients.update
        0..=27 => {
            let b: i64 = rng.gen_range(-100..=100);
            c.execute(
                "UPDATE clients SET balance = $2::bigint, updated_at = now() WHERE id = $1",
                &[&id, &b],
            )
            .await?;
        }
        // details: clients.update
        28..=45 => {
            c.execute(
                "UPDATE clients SET name = 'Client ' || id || ' #' || $2::bigint, \
                 email = 'c' || id || '.' || $2::bigint || '@example.com', updated_at = now() WHERE id = $1",
                &[&id, &tag],
            )
            .await?;
        }
        // custom fields: clients.custom_fields.update
        46..=53 => {
            let key = format!("k{}", rng.gen_range(0..6));
            c.execute(
                "UPDATE clients SET custom_fields = custom_fields || jsonb_build_object($2::text, $3::bigint) WHERE id = $1",
                &[&id, &key, &tag],
            )
            .await?;
        }
        // status: active <-> suspended (clients.update), sometimes archived (clients.archive)
        54..=59 => {
            if rng.gen_bool(0.25) {
                c.execute(
                    "UPDATE clients SET status = 'archived' WHERE id = $1 AND status <> 'archived'",
                    &[&id],
                )
                .await?;
            } else {
                c.execute(
                    "UPDATE clients SET status = CASE status WHEN 'active' THEN 'suspended' ELSE 'active' END WHERE id = $1",
                    &[&id],
                )
                .await?;
            }
        }
        // packages: assign, activate, renew, deactivate, close, delete
        60..=79 => {
            let max = shape.max_package.load(Ordering::SeqCst).max(1);
            let pkg: i64 = rng.gen_range(1..=max);
            let what = rng.gen_range(0..100);
            match what {
                0..=14 if max < shape.packages_cap => {
                    let row = c
                        .query_opt(
                            "INSERT INTO client_packages (client_id, package_name) \
                             SELECT id, 'Package ' || $2::bigint FROM clients WHERE id = $1 RETURNING id",
                            &[&id, &tag],
                        )
                        .await?;
                    if let Some(r) = row {
                        shape
                            .max_package
                            .fetch_max(r.get::<_, i64>(0), Ordering::SeqCst);
                    }
                }
                0..=39 => {
                    c.execute(
                        "UPDATE client_packages SET status = 'active', paid_from = coalesce(paid_from, current_date), \
                         paid_until = coalesce(paid_until, current_date) + 30, updated_at = now() \
                         WHERE id = $1 AND status <> 'active'",
                        &[&pkg],
                    )
                    .await?;
                }
                40..=64 => {
                    c.execute(
                        "UPDATE client_packages SET paid_until = paid_until + 30 WHERE id = $1 AND status = 'active'",
                        &[&pkg],
                    )
                    .await?;
                }
                65..=84 => {
                    c.execute(
                        "UPDATE client_packages SET status = 'inactive' WHERE id = $1 AND status = 'active'",
                        &[&pkg],
                    )
                    .await?;
                }
                85..=96 => {
                    c.execute(
                        "UPDATE client_packages SET status = 'closed' WHERE id = $1 AND status <> 'closed'",
                        &[&pkg],
                    )
                    .await?;
                }
                _ => {
                    c.execute("DELETE FROM client_packages WHERE id = $1", &[&pkg])
                        .await?;
                }
            }
        }
        // several rows in one transaction (ascending ids: no deadlocks between writers)
        80..=89 => {
            let mut ids: Vec<i64> = (0..3).map(|_| rng.gen_range(1..=shape.clients)).collect();
            ids.sort_unstable();
            ids.dedup();
            let b: i64 = rng.gen_range(-100..=100);
            let tx = c.transaction().await?;
            for (k, cid) in ids.iter().enumerate() {
                if k % 2 == 0 {
                    tx.execute(
                        "UPDATE clients SET company = 'Co ' || $2::bigint, balance = $3::bigint WHERE id = $1",
                        &[cid, &tag, &b],
                    )
                    .await?;
                } else {
                    tx.execute(
                        "UPDATE clients SET credit = credit + 1, custom_fields = custom_fields || jsonb_build_object('batch', $2::bigint) WHERE id = $1",
                        &[cid, &tag],
                    )
                    .await?;
                }
            }
            tx.commit().await?;
        }
        // a change that rolls back: must emit nothing
        90..=94 => {
            let tx = c.transaction().await?;
            tx.execute(
                "UPDATE clients SET name = 'rolled back', balance = -balance WHERE id = $1",
                &[&id],
            )
            .await?;
            tx.execute(
                "INSERT INTO client_packages (client_id, package_name) VALUES ($1, 'never')",
                &[&id],
            )
            .await?;
            tx.rollback().await?;
            return Ok(false);
        }
        // delete and re-create a client (its packages go by cascade: subscriptions.close)
        95..=96 => {
            let tx = c.transaction().await?;
            tx.execute("DELETE FROM clients WHERE id = $1", &[&id])
                .await?;
            tx.execute(
                "INSERT INTO clients (id, name, balance, email) VALUES ($1, 'Client ' || $1 || ' reborn', 10, 'c' || $1 || '@example.com')",
                &[&id],
            )
            .await?;
            tx.commit().await?;
        }
        // back from archive
        _ => {
            c.execute(
                "UPDATE clients SET status = 'active', name = name || '.' WHERE id = $1 AND status = 'archived'",
                &[&id],
            )
            .await?;
        }
    }
    Ok(true)
}

async fn writer(
    url: String,
    period: Duration,
    seed: u64,
    shape: Arc<LoadShape>,
    stats: Arc<WriterStats>,
    stop: CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if shape.quiet.load(Ordering::SeqCst) {
            continue;
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = connect_within(&url, Duration::from_secs(3)).await;
            if client.is_none() {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        let c = client.as_mut().expect("connected");
        match tokio::time::timeout(Duration::from_secs(15), one_change(c, &mut rng, &shape)).await {
            Ok(Ok(true)) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(false)) => {
                stats.rollbacks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(_)) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                if c.is_closed() {
                    client = None;
                }
            }
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                client = None;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Faults
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Kill,
    KillBoth,
    PgRestart(&'static str),
    ProxyCut,
    ReceiverCut,
}

#[derive(Default)]
struct FaultStats {
    fast: AtomicUsize,
    immediate: AtomicUsize,
    downtime_ms: AtomicU64,
    proxy_cuts: AtomicUsize,
    proxy_conns: AtomicUsize,
    receiver_cuts: AtomicUsize,
    receiver_conns: AtomicUsize,
    errors: Mutex<Vec<String>>,
}

/// `n` moments spread over [lo, hi] × span: one random point in each of n equal slots.
fn spread(rng: &mut StdRng, n: usize, span: Duration, lo: f64, hi: f64) -> Vec<Duration> {
    (0..n)
        .map(|i| {
            let a = lo + (hi - lo) * i as f64 / n as f64;
            let b = lo + (hi - lo) * (i + 1) as f64 / n as f64;
            span.mul_f64(rng.gen_range(a..b))
        })
        .collect()
}

fn schedule(opts: &Options, rng: &mut StdRng) -> Vec<(Duration, Fault)> {
    let span = opts.load;
    let mut plan: Vec<(Duration, Fault)> = Vec::new();
    // In the long form one of the kills takes both relays down at once.
    let (singles, both) = if opts.kills >= 8 {
        (opts.kills - 2, 1)
    } else {
        (opts.kills, 0)
    };
    for t in spread(rng, singles, span, 0.05, 0.9) {
        plan.push((t, Fault::Kill));
    }
    for t in spread(rng, both, span, 0.4, 0.6) {
        plan.push((t, Fault::KillBoth));
    }
    // PostgreSQL restarts alternate fast / immediate over evenly spaced slots.
    let restarts = opts.fast_restarts + opts.immediate_restarts;
    let mut modes: Vec<&'static str> = Vec::new();
    let (mut f, mut i) = (opts.fast_restarts, opts.immediate_restarts);
    while f + i > 0 {
        if f > 0 && (f >= i) {
            modes.push("fast");
            f -= 1;
        } else {
            modes.push("immediate");
            i -= 1;
        }
    }
    for (t, m) in spread(rng, restarts, span, 0.15, 0.85)
        .into_iter()
        .zip(modes)
    {
        plan.push((t, Fault::PgRestart(m)));
    }
    for t in spread(rng, opts.proxy_cuts, span, 0.05, 0.92) {
        plan.push((t, Fault::ProxyCut));
    }
    for t in spread(rng, opts.receiver_cuts, span, 0.05, 0.92) {
        plan.push((t, Fault::ReceiverCut));
    }
    plan.sort_by_key(|(t, _)| *t);
    plan
}

struct FaultCtx {
    cluster: Arc<TempCluster>,
    relays: Arc<Relays>,
    proxy: Arc<Proxy>,
    receiver: Arc<Receiver>,
    stats: Arc<FaultStats>,
    pg_lock: Arc<tokio::sync::Mutex<()>>,
    say: Say,
    db_url: String,
    shape: Arc<LoadShape>,
    burst_events: Arc<AtomicUsize>,
}

/// A hot object: `n` quick changes to each of `ids` (autocommit, as an application would make
/// them). Returns how many committed.
async fn burst(url: &str, ids: &[i64], n: usize) -> usize {
    let Some(c) = connect_within(url, Duration::from_secs(3)).await else {
        return 0;
    };
    let mut done = 0;
    for i in 0..n {
        for id in ids {
            let ok = c
                .execute(
                    "UPDATE clients SET name = 'Client ' || id || ' burst ' || $2::bigint WHERE id = $1",
                    &[id, &(i as i64)],
                )
                .await
                .is_ok();
            done += ok as usize;
        }
    }
    done
}

/// Restart PostgreSQL. An immediate stop (a crash) comes at the worst moment for the relay's own
/// commits: right after a burst of changes to a few hot objects, while the application is quiet,
/// so the relays are busy walking those objects' chains (ack one event, send the next) and
/// nothing else flushes the WAL. An acknowledgement lost in the crash after the next event of its
/// object was sent would show up as an order violation.
async fn pg_restart(
    ctx: Arc<FaultCtx>,
    mode: &'static str,
    down: Duration,
    hot: Vec<i64>,
    settle: Duration,
) {
    let _guard = ctx.pg_lock.lock().await;
    if mode == "immediate" {
        ctx.shape.quiet.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = burst(&ctx.db_url, &hot, 40).await;
        ctx.burst_events.fetch_add(n, Ordering::SeqCst);
        ctx.say.say(format!(
            "        burst: {n} changes to clients {hot:?}, writers quiet; crash in {} ms",
            settle.as_millis()
        ));
        tokio::time::sleep(settle).await;
    }
    ctx.say
        .say(format!("FAULT postgres: pg_ctl stop -m {mode}"));
    let t = Instant::now();
    let c = ctx.cluster.clone();
    let stopped = tokio::task::spawn_blocking(move || c.stop(mode)).await;
    if let Err(e) = stopped.map_err(anyhow::Error::from).and_then(|r| r) {
        ctx.stats
            .errors
            .lock()
            .expect("errors lock")
            .push(format!("pg_ctl stop -m {mode}: {e:#}"));
    }
    tokio::time::sleep(down).await;
    let c = ctx.cluster.clone();
    let started = tokio::task::spawn_blocking(move || c.start_again()).await;
    if let Err(e) = started.map_err(anyhow::Error::from).and_then(|r| r) {
        ctx.stats
            .errors
            .lock()
            .expect("errors lock")
            .push(format!("pg_ctl start after -m {mode}: {e:#}"));
        ctx.shape.quiet.store(false, Ordering::SeqCst);
        return;
    }
    let took = t.elapsed();
    ctx.stats
        .downtime_ms
        .fetch_add(took.as_millis() as u64, Ordering::SeqCst);
    match mode {
        "fast" => ctx.stats.fast.fetch_add(1, Ordering::SeqCst),
        _ => ctx.stats.immediate.fetch_add(1, Ordering::SeqCst),
    };
    ctx.shape.quiet.store(false, Ordering::SeqCst);
    ctx.say.say(format!(
        "        postgres up again after {:.1} s ({mode})",
        took.as_secs_f64()
    ));
}

async fn kill_and_restart(ctx: &FaultCtx, which: &[usize], rng: &mut StdRng) {
    let mut killed = Vec::new();
    for &i in which {
        if let Some((name, pid)) = ctx.relays.kill(i) {
            ctx.say
                .say(format!("FAULT SIGKILL relay {name} (pid {pid})"));
            killed.push(i);
        }
    }
    let pause = Duration::from_millis(rng.gen_range(200..2000));
    tokio::time::sleep(pause).await;
    for i in killed {
        match ctx.relays.restart(i) {
            Ok(Some((name, pid))) => ctx.say.say(format!(
                "        restarted relay {name} (pid {pid}) after {} ms",
                pause.as_millis()
            )),
            Ok(None) => {}
            Err(e) => ctx
                .stats
                .errors
                .lock()
                .expect("errors lock")
                .push(format!("cannot restart relay: {e:#}")),
        }
    }
}

async fn run_faults(
    ctx: Arc<FaultCtx>,
    plan: Vec<(Duration, Fault)>,
    seed: u64,
    t0: tokio::time::Instant,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut restarts = Vec::new();
    for (at, fault) in plan {
        tokio::time::sleep_until(t0 + at).await;
        match fault {
            Fault::Kill => {
                let i = rng.gen_range(0..ctx.relays.count());
                kill_and_restart(&ctx, &[i], &mut rng).await;
            }
            Fault::KillBoth => {
                let all: Vec<usize> = (0..ctx.relays.count()).collect();
                kill_and_restart(&ctx, &all, &mut rng).await;
            }
            Fault::PgRestart(mode) => {
                let down = Duration::from_millis(rng.gen_range(300..2500));
                let hot: Vec<i64> = (0..3)
                    .map(|_| rng.gen_range(1..=ctx.shape.clients))
                    .collect();
                let settle = Duration::from_millis(rng.gen_range(150..700));
                restarts.push(tokio::spawn(pg_restart(
                    ctx.clone(),
                    mode,
                    down,
                    hot,
                    settle,
                )));
            }
            Fault::ProxyCut => {
                let n = ctx.proxy.cut();
                ctx.stats.proxy_cuts.fetch_add(1, Ordering::SeqCst);
                ctx.stats.proxy_conns.fetch_add(n, Ordering::SeqCst);
                ctx.say
                    .say(format!("FAULT proxy: cut {n} relay↔postgres connections"));
            }
            Fault::ReceiverCut => {
                let n = ctx.receiver.cut();
                ctx.stats.receiver_cuts.fetch_add(1, Ordering::SeqCst);
                ctx.stats.receiver_conns.fetch_add(n, Ordering::SeqCst);
                ctx.say.say(format!(
                    "FAULT receiver: cut {n} relay→receiver connections"
                ));
            }
        }
    }
    for r in restarts {
        let _ = r.await;
    }
}

// ------------------------------------------------------------------------------------------------
// Background helpers: resume 410-paused handlers, sample relays, show progress
// ------------------------------------------------------------------------------------------------

/// Resume handlers the relay paused after a 410 (what an operator would do). Returns resumes.
async fn resumer(
    url: String,
    names: Vec<String>,
    resumes: Arc<AtomicUsize>,
    problems: Arc<Mutex<Vec<String>>>,
    say: Say,
    stop: CancellationToken,
) {
    let mut client: Option<Client> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = connect_within(&url, Duration::from_secs(2)).await;
        }
        let Some(c) = client.as_ref() else { continue };
        let rows = c
            .query(
                "WITH p AS (SELECT id, name, status_reason FROM provisioning.handlers WHERE status = 'paused' AND name = ANY($1) FOR UPDATE)
                 UPDATE provisioning.handlers h SET status = 'enabled', status_reason = NULL FROM p WHERE h.id = p.id
                 RETURNING p.name, p.status_reason",
                &[&names],
            )
            .await;
        if let Ok(rows) = rows {
            for r in rows {
                let name: String = r.get(0);
                let reason: Option<String> = r.get(1);
                resumes.fetch_add(1, Ordering::SeqCst);
                if !reason.as_deref().unwrap_or("").contains("410") {
                    problems.lock().expect("problems lock").push(format!(
                        "handler {name} was paused without a 410 reason: {reason:?}"
                    ));
                }
                say.say(format!(
                    "        resumed handler {name} (paused: {})",
                    reason.unwrap_or_default()
                ));
            }
        }
    }
}

async fn monitor(relays: Arc<Relays>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        relays.sample();
    }
}

async fn progress(
    url: String,
    receiver: Arc<Receiver>,
    relays: Arc<Relays>,
    stats: Arc<WriterStats>,
    say: Say,
    every: Duration,
    stop: CancellationToken,
) {
    let mut client: Option<Client> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = connect_within(&url, Duration::from_secs(2)).await;
        }
        let queue = match client.as_ref() {
            Some(c) => c
                .query_one(
                    "SELECT (SELECT coalesce(max(id), 0) FROM provisioning.events),
                            (SELECT count(*) FROM provisioning.deliveries WHERE status IN ('pending', 'running', 'waiting')),
                            (SELECT count(*) FROM provisioning.deliveries WHERE status = 'dead')",
                    &[],
                )
                .await
                .map(|r| format!("events≤{} queue {} dead {}", r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)))
                .unwrap_or_else(|_| "database unavailable".into()),
            None => "database unavailable".into(),
        };
        say.say(format!(
            "progress: {queue}; receiver accepted {}; writers {} commits / {} errors; kills {}; relay RSS peak {:.1} MiB",
            receiver.accepted_count(),
            stats.commits.load(Ordering::Relaxed),
            stats.errors.load(Ordering::Relaxed),
            relays.kills.load(Ordering::SeqCst),
            relays.peak_rss_kib.load(Ordering::SeqCst) as f64 / 1024.0,
        ));
    }
}

// ------------------------------------------------------------------------------------------------
// The run
// ------------------------------------------------------------------------------------------------

fn routes(a_timeout: Duration, b_timeout: Duration, dead_timeout: Duration) -> Vec<Route> {
    vec![
        Route {
            path: "/a",
            handler: "faults-a",
            p_fail: 0.30,
            weights: vec![
                (Mode::Fail500, 30),
                (Mode::Reset, 15),
                (Mode::Close, 10),
                (Mode::Invalid, 15),
                (Mode::Hang, 5),
                (Mode::Timeout, 5),
                (Mode::SlowBodyCut, 3),
                (Mode::Fail500Huge, 4),
                (Mode::TooMany, 8),
                (Mode::Gone, 5),
            ],
            always_fail: false,
            timeout: a_timeout,
            secret: Some(SECRET_A),
            full_format: false,
        },
        Route {
            path: "/b",
            handler: "faults-b",
            p_fail: 0.25,
            weights: vec![
                (Mode::Fail500, 10),
                (Mode::Reset, 5),
                (Mode::Close, 5),
                (Mode::Invalid, 5),
                (Mode::Hang, 10),
                (Mode::Timeout, 15),
                (Mode::SlowBodyCut, 10),
                (Mode::Fail500Huge, 8),
                (Mode::TooMany, 25),
                (Mode::Gone, 5),
            ],
            always_fail: false,
            timeout: b_timeout,
            secret: None,
            full_format: true,
        },
        Route {
            path: "/dead",
            handler: "faults-dead",
            p_fail: 1.0,
            weights: vec![(Mode::Fail500, 1)],
            always_fail: true,
            timeout: dead_timeout,
            secret: None,
            full_format: false,
        },
    ]
}

/// Violations, at most 10 shown per kind.
#[derive(Default)]
struct Violations {
    list: Vec<String>,
    counts: HashMap<&'static str, usize>,
}

impl Violations {
    fn add(&mut self, kind: &'static str, msg: String) {
        let n = self.counts.entry(kind).or_default();
        *n += 1;
        if *n <= 10 {
            self.list.push(msg);
        } else if *n == 11 {
            self.list
                .push(format!("… more {kind} violations (not shown)"));
        }
    }

    fn push(&mut self, msg: String) {
        self.list.push(msg);
    }
}

/// Does a handler's subscription entry match an event name? (An independent oracle of the
/// documented rule: exact name, `prefix.*`, or `*`.)
fn subscription_matches(pattern: &str, event: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix('*') {
        Some(prefix) if prefix.ends_with('.') => event.starts_with(prefix),
        _ => pattern == event,
    }
}

/// Run the whole suite. Errors are failures of the harness itself (cannot start PostgreSQL…);
/// violated guarantees are in [`Report::violations`].
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    let say = Say { t0 };
    if !opts.relay_bin.is_file() {
        bail!("relay binary not found at {}", opts.relay_bin.display());
    }
    say.say(format!(
        "fault suite: seed {}, load {:?}, {} kills, {} fast + {} immediate PostgreSQL restarts, {} proxy cuts, {} receiver cuts, relay {}",
        opts.seed,
        opts.load,
        opts.kills,
        opts.fast_restarts,
        opts.immediate_restarts,
        opts.proxy_cuts,
        opts.receiver_cuts,
        opts.relay_bin.display()
    ));
    let mut rng = StdRng::seed_from_u64(opts.seed);

    // PostgreSQL of our own, restartable without disturbing anyone.
    let cluster = Arc::new(
        tokio::task::spawn_blocking(TempCluster::start)
            .await
            .context("starting PostgreSQL")??,
    );
    let db_url = cluster.url();
    say.say(format!(
        "PostgreSQL cluster in {} on port {}",
        cluster.dir.display(),
        cluster.port
    ));
    let result = run_on(&opts, &cluster, &db_url, &say, &mut rng).await;
    let c = cluster.clone();
    drop(cluster);
    // Stop and remove the cluster off the runtime (pg_ctl blocks).
    let _ = tokio::task::spawn_blocking(move || drop(c)).await;
    let mut report = result?;
    report.total_secs = t0.elapsed().as_secs_f64();
    Ok(report)
}

async fn run_on(
    opts: &Options,
    cluster: &Arc<TempCluster>,
    db_url: &str,
    say: &Say,
    rng: &mut StdRng,
) -> anyhow::Result<Report> {
    let mut report = Report {
        seed: opts.seed,
        ..Report::default()
    };
    let admin = connect(db_url).await.context("connecting to PostgreSQL")?;
    relay::schema::migrate(&admin).await?;
    relay::schema::install_vcs_preset(&admin).await?;
    admin
        .execute(
            "SELECT setseed($1)",
            &[&((opts.seed % 1000) as f64 / 1000.0)],
        )
        .await?;
    admin
        .execute(
            "INSERT INTO clients (id, name, balance, email)
             SELECT g, 'Client ' || g, (random() * 100 - 50)::int, 'c' || g || '@example.com'
               FROM generate_series(1, $1::bigint) g",
            &[&opts.clients],
        )
        .await?;
    admin
        .execute(
            "INSERT INTO client_packages (client_id, package_name)
             SELECT 1 + (random() * ($1::bigint - 1))::bigint, 'Package ' || g FROM generate_series(1, $2::bigint) g",
            &[&opts.clients, &opts.packages],
        )
        .await?;
    // Events so far were captured before any handler existed: not expected anywhere.
    let watermark: i64 = admin
        .query_one("SELECT coalesce(max(id), 0) FROM provisioning.events", &[])
        .await?
        .get(0);

    // Receiver and handlers.
    let (a_timeout, b_timeout, dead_timeout) = (
        Duration::from_millis(2000),
        Duration::from_millis(3000),
        Duration::from_millis(1000),
    );
    let routes = routes(a_timeout, b_timeout, dead_timeout);
    let gone_spacing = opts.load / (opts.max_gone as u32 + 1);
    let receiver =
        Arc::new(Receiver::start(routes.clone(), rng.gen(), opts.max_gone, gone_spacing).await?);
    let schedule_ms = format!("{{{}}}", vec!["200"; 15].join(","));
    for r in &routes {
        let (events, retry, priority) = match r.handler {
            "faults-dead" => ("{clients.balance_zero}", "{100,100}".to_string(), 200),
            "faults-a" => ("{clients.*}", schedule_ms.clone(), 10),
            _ => ("{clients.*}", schedule_ms.clone(), 50),
        };
        admin
            .execute(
                "INSERT INTO provisioning.handlers
                    (name, events, kind, target, timeout_ms, retry_schedule_ms, max_in_flight, secret, format, priority, headers)
                 VALUES ($1, $2::text::text[], 'http', $3, $4, $5::text::int[], 64, $6, $7, $8, $9::text::jsonb)",
                &[
                    &r.handler,
                    &events,
                    &receiver.url(r.path),
                    &(r.timeout.as_millis() as i32),
                    &retry,
                    &r.secret,
                    &(if r.full_format { "full" } else { "jerasoft" }),
                    &priority,
                    &format!("{{\"x-fault-suite\": \"{}\"}}", r.handler),
                ],
            )
            .await
            .with_context(|| format!("registering handler {}", r.handler))?;
    }
    let handler_names: Vec<String> = routes.iter().map(|r| r.handler.to_string()).collect();
    say.say(format!(
        "schema, VCS preset, {} clients, {} packages, handlers {:?} → receiver {}",
        opts.clients, opts.packages, handler_names, receiver.addr
    ));

    // Proxy and relays.
    let proxy = Arc::new(Proxy::start(SocketAddr::from(([127, 0, 0, 1], cluster.port))).await?);
    let proxy_url = format!("postgres://postgres@{}/postgres", proxy.addr);
    let log_dir =
        std::env::temp_dir().join(format!("relay-faults-{}-{}", std::process::id(), opts.seed));
    std::fs::create_dir_all(&log_dir)?;
    let relays = Arc::new(Relays::new(
        opts.relay_bin.clone(),
        proxy_url.clone(),
        log_dir.clone(),
        opts.lease_margin_ms,
        2,
    ));
    relays.start_all()?;
    say.say(format!(
        "relays r1, r2 started through proxy {} (logs in {})",
        proxy.addr,
        log_dir.display()
    ));

    // Background: sampling, resuming, progress.
    let background = CancellationToken::new();
    let resumes = Arc::new(AtomicUsize::new(0));
    let side_problems: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(monitor(relays.clone(), background.clone())));
    tasks.push(tokio::spawn(resumer(
        db_url.to_string(),
        handler_names.clone(),
        resumes.clone(),
        side_problems.clone(),
        say.clone(),
        background.clone(),
    )));
    let wstats = Arc::new(WriterStats::default());
    tasks.push(tokio::spawn(progress(
        db_url.to_string(),
        receiver.clone(),
        relays.clone(),
        wstats.clone(),
        say.clone(),
        Duration::from_secs(if opts.load > Duration::from_secs(180) {
            30
        } else {
            10
        }),
        background.clone(),
    )));

    // Load.
    let load_start = tokio::time::Instant::now();
    let stop_writers = CancellationToken::new();
    let shape = Arc::new(LoadShape {
        clients: opts.clients,
        quiet: Arc::new(AtomicBool::new(false)),
        packages_cap: opts.packages * 2,
        max_package: Arc::new(AtomicI64::new(opts.packages)),
    });
    let period = Duration::from_secs_f64(opts.writers as f64 / opts.rate);
    let writers: Vec<_> = (0..opts.writers)
        .map(|_| {
            tokio::spawn(writer(
                db_url.to_string(),
                period,
                rng.gen(),
                shape.clone(),
                wstats.clone(),
                stop_writers.clone(),
            ))
        })
        .collect();

    // Faults.
    let plan = schedule(opts, rng);
    let fstats = Arc::new(FaultStats::default());
    let burst_events = Arc::new(AtomicUsize::new(0));
    let ctx = Arc::new(FaultCtx {
        cluster: cluster.clone(),
        relays: relays.clone(),
        proxy: proxy.clone(),
        receiver: receiver.clone(),
        stats: fstats.clone(),
        pg_lock: Arc::new(tokio::sync::Mutex::new(())),
        say: say.clone(),
        db_url: db_url.to_string(),
        shape: shape.clone(),
        burst_events: burst_events.clone(),
    });
    let faults = tokio::spawn(run_faults(ctx, plan, rng.gen(), load_start));

    tokio::time::sleep_until(load_start + opts.load).await;
    stop_writers.cancel();
    for w in writers {
        let _ = w.await;
    }
    report.load_secs = load_start.elapsed().as_secs_f64();
    say.say("load stopped; waiting for the last faults to end");
    let _ = faults.await;
    receiver.faults(false);
    // Every relay must be up for the drain (a kill may have raced the end of the schedule).
    for i in 0..relays.count() {
        relays.restart(i)?;
    }
    say.say("faults stopped (receiver accepts everything now); waiting for the queue to drain");

    // Drain: every delivery done or dead, no handler paused.
    let drain_start = Instant::now();
    let mut drained = false;
    let mut last_state = String::new();
    let mut watcher: Option<Client> = None;
    while drain_start.elapsed() < opts.drain_deadline {
        if watcher.as_ref().is_none_or(|c| c.is_closed()) {
            watcher = connect_within(db_url, Duration::from_secs(3)).await;
        }
        if let Some(c) = watcher.as_ref() {
            if let Ok(row) = c
                .query_one(
                    "SELECT (SELECT count(*) FROM provisioning.deliveries WHERE status IN ('pending', 'running', 'waiting')),
                            (SELECT count(*) FROM provisioning.handlers WHERE status = 'paused')",
                    &[],
                )
                .await
            {
                let (left, paused): (i64, i64) = (row.get(0), row.get(1));
                last_state = format!("{left} deliveries unfinished, {paused} handlers paused");
                if left == 0 && paused == 0 {
                    drained = true;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.drain_secs = drain_start.elapsed().as_secs_f64();
    if drained {
        say.say(format!("queue drained in {:.1} s", report.drain_secs));
    } else {
        report.violations.push(format!(
            "the queue did not drain within {:?} after load and faults stopped: {last_state}",
            opts.drain_deadline
        ));
    }

    // Stop the relays the polite way: they must exit 0.
    relays.sample();
    let term_problems = relays.terminate_all(Duration::from_secs(30)).await;
    report.violations.extend(term_problems);
    background.cancel();
    for t in tasks {
        let _ = t.await;
    }

    // ---------------------------------------------------------------------------------------
    // Verify.
    // ---------------------------------------------------------------------------------------
    let client = connect(db_url)
        .await
        .context("reconnecting for the verification")?;
    let events: HashMap<i64, (String, String, String)> = client
        .query(
            "SELECT id, name, entity, object_id #>> '{}' FROM provisioning.events WHERE id > $1",
            &[&watermark],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    report.events = events.len();
    let handler_rows: Vec<(i64, String, Vec<String>)> = client
        .query(
            "SELECT id, name, events FROM provisioning.handlers WHERE name = ANY($1) ORDER BY id",
            &[&handler_names],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let route_handler: Vec<i64> = routes
        .iter()
        .map(|r| {
            handler_rows
                .iter()
                .find(|(_, n, _)| n == r.handler)
                .map(|(id, _, _)| *id)
                .unwrap_or(-1)
        })
        .collect();
    let handler_name: HashMap<i64, String> = handler_rows
        .iter()
        .map(|(id, n, _)| (*id, n.clone()))
        .collect();

    // Expected (event, handler) pairs from the events and the subscriptions.
    let mut expected: HashSet<(i64, i64)> = HashSet::new();
    for (eid, (name, _, _)) in &events {
        for (hid, _, subs) in &handler_rows {
            if subs.iter().any(|p| subscription_matches(p, name)) {
                expected.insert((*eid, *hid));
            }
        }
    }
    report.expected = expected.len();

    // What the queue says.
    let mut dead: HashMap<(i64, i64), Option<String>> = HashMap::new();
    let mut unfinished = 0usize;
    for r in client
        .query(
            "SELECT event_id, handler_id, status, last_error FROM provisioning.deliveries",
            &[],
        )
        .await?
    {
        let key: (i64, i64) = (r.get(0), r.get(1));
        let status: String = r.get(2);
        if status == "dead" {
            dead.insert(key, r.get(3));
        } else if key.0 > watermark {
            unfinished += 1;
        }
    }

    // What the receiver saw.
    let seen: Vec<Seen> = receiver.shared.seen.lock().expect("seen lock").clone();
    report.requests = seen.len();
    report.modes = receiver
        .shared
        .modes
        .lock()
        .expect("modes lock")
        .iter()
        .map(|(m, n)| (m.label().to_string(), *n))
        .collect();
    let mut v = Violations::default();

    for p in receiver
        .shared
        .problems
        .lock()
        .expect("problems lock")
        .iter()
    {
        v.add("request", p.clone());
    }
    for p in side_problems.lock().expect("problems lock").iter() {
        v.add("pause", p.clone());
    }

    // Per request: the webhook-id names this handler and a captured event; the body matches it;
    // every attempt of one webhook-id carries the same body.
    let mut body_of: HashMap<(usize, i64), u64> = HashMap::new();
    let mut accepted: HashMap<(i64, i64), usize> = HashMap::new();
    for s in &seen {
        let hid = route_handler[s.route];
        if s.wh_handler != hid {
            v.add(
                "identity",
                format!(
                    "{} got webhook-id {} naming handler {} (expected h{hid})",
                    routes[s.route].path, s.webhook_id, s.wh_handler
                ),
            );
            continue;
        }
        let Some((name, _entity, object)) = events.get(&s.event_id) else {
            v.add(
                "unexpected",
                format!(
                    "{} got {} for an event that was never captured (after the handlers existed)",
                    routes[s.route].path, s.webhook_id
                ),
            );
            continue;
        };
        if !expected.contains(&(s.event_id, hid)) {
            v.add(
                "unexpected",
                format!(
                    "{} got {} ({name}) although the handler does not subscribe to it",
                    routes[s.route].path, s.webhook_id
                ),
            );
        }
        if &s.event_name != name || &s.object != object {
            v.add(
                "body",
                format!(
                    "{}: body of {} names {} / object {} but the event is {name} / object {object}",
                    routes[s.route].path, s.webhook_id, s.event_name, s.object
                ),
            );
        }
        if routes[s.route].full_format && s.body_event_id != Some(s.event_id) {
            v.add(
                "body",
                format!(
                    "{}: full-format body of {} carries event id {:?}",
                    routes[s.route].path, s.webhook_id, s.body_event_id
                ),
            );
        }
        let first = *body_of.entry((s.route, s.event_id)).or_insert(s.body_hash);
        if first != s.body_hash {
            v.add(
                "body",
                format!(
                    "{}: {} arrived with a different body on attempt {}",
                    routes[s.route].path, s.webhook_id, s.attempt
                ),
            );
        }
        if s.mode.accepts() {
            *accepted.entry((s.event_id, hid)).or_default() += 1;
        }
    }

    // Delivered / dead / lost, per handler.
    let mut lost_examples = Vec::new();
    for (ri, r) in routes.iter().enumerate() {
        let hid = route_handler[ri];
        let subs = handler_rows
            .iter()
            .find(|(id, _, _)| *id == hid)
            .map(|(_, _, s)| s.join(","))
            .unwrap_or_default();
        let mut line = HandlerLine {
            name: r.handler.to_string(),
            subscribes: subs,
            requests: seen.iter().filter(|s| s.route == ri).count(),
            ..HandlerLine::default()
        };
        for &(eid, h) in expected.iter().filter(|(_, h)| *h == hid) {
            let n = accepted.get(&(eid, h)).copied().unwrap_or(0);
            if n > 0 {
                line.delivered += 1;
                line.duplicates += n - 1;
            }
            if let Some(reason) = dead.get(&(eid, h)) {
                line.dead += 1;
                let reason = reason.clone().unwrap_or_default();
                if reason.trim().is_empty() {
                    v.add(
                        "dead",
                        format!(
                            "dead delivery of event {eid} for {} has no last_error",
                            r.handler
                        ),
                    );
                }
                let key = format!(
                    "{}: {}",
                    r.handler,
                    reason.chars().take(80).collect::<String>()
                );
                *report.dead_reasons.entry(key).or_default() += 1;
                if !r.always_fail {
                    v.add("dead", format!(
                            "{} delivery of event {eid} went dead although the receiver accepts by attempt {FORCE_ACCEPT_ATTEMPT}: {reason}",
                            r.handler
                        ));
                }
            } else if n == 0 {
                line.lost += 1;
                if lost_examples.len() < 10 {
                    lost_examples.push((eid, h));
                }
            }
        }
        line.expected = expected.iter().filter(|(_, h)| *h == hid).count();
        if r.always_fail && line.delivered > 0 {
            v.add(
                "dead",
                format!(
                    "{} accepted {} deliveries although it always fails",
                    r.handler, line.delivered
                ),
            );
        }
        report.delivered += line.delivered;
        report.dead += line.dead;
        report.lost += line.lost;
        report.duplicates += line.duplicates;
        report.handlers.push(line);
    }
    if report.lost > 0 {
        let mut detail = Vec::new();
        for (eid, hid) in &lost_examples {
            let row = client
                .query_opt(
                    "SELECT status, attempts, last_error FROM provisioning.deliveries WHERE event_id = $1 AND handler_id = $2",
                    &[eid, hid],
                )
                .await?;
            let logged: Vec<String> = client
                .query(
                    "SELECT attempt || ':' || outcome || coalesce(' ' || http_status, '') || coalesce(' ' || left(error, 60), '') || ' by ' || relay
                       FROM provisioning.attempts WHERE event_id = $1 AND handler_id = $2 ORDER BY id",
                    &[eid, hid],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            detail.push(format!(
                "event {eid} × {}: queue row {:?}; attempts logged {:?}; receiver saw {:?}",
                handler_name.get(hid).cloned().unwrap_or_default(),
                row.map(|r| (
                    r.get::<_, String>(0),
                    r.get::<_, i32>(1),
                    r.get::<_, Option<String>>(2)
                )),
                logged,
                seen.iter()
                    .filter(|s| s.event_id == *eid && route_handler[s.route] == *hid)
                    .map(|s| format!("#{} {}", s.attempt, s.mode.label()))
                    .collect::<Vec<_>>()
            ));
        }
        v.push(format!(
            "{} deliveries LOST (neither accepted by the receiver nor dead), e.g.:\n      {}",
            report.lost,
            detail.join("\n      ")
        ));
    }

    // Per-object order, as the receiver saw it.
    //  (1) accepted event ids per handler and object never go down;
    //  (2) no request for an event before every earlier event of that handler and object was
    //      accepted (or is dead).
    let mut by_object: HashMap<(i64, String, String), Vec<i64>> = HashMap::new();
    for &(eid, hid) in &expected {
        if dead.contains_key(&(eid, hid)) {
            continue;
        }
        let (_, entity, object) = &events[&eid];
        by_object
            .entry((hid, entity.clone(), object.clone()))
            .or_default()
            .push(eid);
    }
    for v in by_object.values_mut() {
        v.sort_unstable();
    }
    let mut max_accepted: HashMap<(i64, String, String), (i64, usize)> = HashMap::new();
    let mut next_idx: HashMap<(i64, String, String), usize> = HashMap::new();
    let mut accepted_so_far: HashSet<(i64, i64)> = HashSet::new();
    for s in &seen {
        let hid = route_handler[s.route];
        if routes[s.route].always_fail || s.wh_handler != hid {
            continue;
        }
        let Some((_, entity, object)) = events.get(&s.event_id) else {
            continue;
        };
        let key = (hid, entity.clone(), object.clone());
        // (2)
        if let Some(list) = by_object.get(&key) {
            let idx = next_idx.entry(key.clone()).or_default();
            while *idx < list.len() && accepted_so_far.contains(&(list[*idx], hid)) {
                *idx += 1;
            }
            if let Some(&first_open) = list.get(*idx) {
                if s.event_id > first_open {
                    report.start_order_violations += 1;
                    v.add("order", format!(
                            "{} {entity} {object}: event {} requested (attempt {}, {:.2} s) while earlier event {first_open} had not been accepted",
                            routes[s.route].handler, s.event_id, s.attempt, s.at.as_secs_f64()
                        ));
                }
            }
        }
        if s.mode.accepts() {
            accepted_so_far.insert((s.event_id, hid));
            // (1)
            match max_accepted.get(&key) {
                Some(&(max, seq)) if s.event_id < max => {
                    report.order_violations += 1;
                    let prev = &seen[seq];
                    v.add("order", format!(
                            "{} {entity} {object}: event {} accepted (attempt {}, {:.2} s) after later event {max} had been accepted (attempt {}, {:.2} s)",
                            routes[s.route].handler,
                            s.event_id,
                            s.attempt,
                            s.at.as_secs_f64(),
                            prev.attempt,
                            prev.at.as_secs_f64()
                        ));
                }
                Some(&(max, _)) if s.event_id == max => {}
                _ => {
                    max_accepted.insert(key, (s.event_id, s.seq));
                }
            }
        }
    }

    // Faults and processes.
    report.kills = relays.kills.load(Ordering::SeqCst);
    report.relay_starts = relays.starts.load(Ordering::SeqCst);
    report.fast_restarts = fstats.fast.load(Ordering::SeqCst);
    report.immediate_restarts = fstats.immediate.load(Ordering::SeqCst);
    report.pg_downtime_secs = fstats.downtime_ms.load(Ordering::SeqCst) as f64 / 1000.0;
    report.burst_changes = burst_events.load(Ordering::SeqCst);
    report.proxy_cuts = fstats.proxy_cuts.load(Ordering::SeqCst);
    report.proxy_connections_cut = fstats.proxy_conns.load(Ordering::SeqCst);
    report.receiver_cuts = fstats.receiver_cuts.load(Ordering::SeqCst);
    report.receiver_connections_cut = fstats.receiver_conns.load(Ordering::SeqCst);
    report.gone_pauses = report.modes.get(Mode::Gone.label()).copied().unwrap_or(0) as usize;
    report.resumes = resumes.load(Ordering::SeqCst);
    report.peak_rss_mib = relays.peak_rss_kib.load(Ordering::SeqCst) as f64 / 1024.0;
    report.peak_hwm_mib = relays.peak_hwm_kib.load(Ordering::SeqCst) as f64 / 1024.0;
    report.writer_commits = wstats.commits.load(Ordering::Relaxed);
    report.writer_rollbacks = wstats.rollbacks.load(Ordering::Relaxed);
    report.writer_errors = wstats.errors.load(Ordering::Relaxed);
    report.lease_recoveries_logged = client
        .query_one(
            "SELECT count(*) FROM provisioning.attempts WHERE error LIKE 'lease expired%'",
            &[],
        )
        .await?
        .get::<_, i64>(0) as usize;
    report.fenced_completion_warnings = relays.grep("arrived after their lease expired");

    for c in relays.crashes.lock().expect("crash lock").iter() {
        v.push(c.clone());
    }
    let panics = relays.grep("panicked");
    if panics > 0 {
        v.push(format!("{panics} panic(s) in the relay logs"));
    }
    for e in fstats.errors.lock().expect("errors lock").iter() {
        v.push(format!("fault injection failed: {e}"));
    }
    if report.kills < opts.kills {
        v.push(format!(
            "only {} of {} planned kills happened",
            report.kills, opts.kills
        ));
    }
    if report.fast_restarts < opts.fast_restarts
        || report.immediate_restarts < opts.immediate_restarts
    {
        v.push(format!(
            "PostgreSQL restarts: {} fast / {} immediate of {} / {} planned",
            report.fast_restarts,
            report.immediate_restarts,
            opts.fast_restarts,
            opts.immediate_restarts
        ));
    }
    if report.proxy_cuts < opts.proxy_cuts
        || (opts.proxy_cuts > 0 && report.proxy_connections_cut == 0)
    {
        v.push(format!(
            "proxy cuts: {} ({} connections) of {} planned",
            report.proxy_cuts, report.proxy_connections_cut, opts.proxy_cuts
        ));
    }
    if report.receiver_cuts < opts.receiver_cuts {
        v.push(format!(
            "receiver cuts: {} of {} planned",
            report.receiver_cuts, opts.receiver_cuts
        ));
    }
    let missing: Vec<&str> = ALL_MODES
        .iter()
        .filter(|m| !report.modes.contains_key(m.label()))
        .map(|m| m.label())
        .collect();
    if !missing.is_empty() {
        v.push(format!(
            "receiver modes never exercised: {}",
            missing.join(", ")
        ));
    }
    if report.gone_pauses > 0 && report.resumes == 0 {
        v.push("410 answers were given but no handler was ever paused and resumed".into());
    }
    if report.peak_rss_mib > opts.rss_limit_mib as f64
        || report.peak_hwm_mib > opts.rss_limit_mib as f64
    {
        v.push(format!(
            "relay peak memory {:.1} MiB RSS / {:.1} MiB HWM is over the {} MiB limit",
            report.peak_rss_mib, report.peak_hwm_mib, opts.rss_limit_mib
        ));
    }
    if report.events == 0 || report.delivered == 0 {
        v.push("no load reached the receiver".into());
    }
    report.details.push(format!(
        "unfinished deliveries left: {unfinished}; expected pairs with a dead row: {}",
        dead.keys().filter(|k| expected.contains(k)).count()
    ));
    report.violations.extend(v.list);

    drop(proxy);
    drop(receiver);
    if report.passed() && !opts.keep_logs {
        let _ = std::fs::remove_dir_all(&log_dir);
    } else {
        report.log_dir = Some(log_dir);
    }
    Ok(report)
}
