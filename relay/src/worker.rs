//! The dispatcher: claims due deliveries in batches, runs each on a task of its own (bounded per
//! handler and in total), and funnels outcomes to a completer that writes them back in batches.
//!
//! Waking up: while work keeps arriving (a claim found something within `idle_after`), a short
//! claim is followed by a short pause (`busy_poll_interval`) and another claim. Only after
//! `idle_after` without new work does the relay declare itself asleep
//! (`provisioning.relays.sleeping`), claim once more to close the race, and wait for the doorbell
//! (a NOTIFY that capture triggers send only while some relay sleeps), a completion, the next due
//! retry, or the poll timer — whichever comes first. So under steady traffic, even a light one,
//! writers never pay for NOTIFY's commit-time lock, and an idle relay still wakes in milliseconds.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::Rng;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::breaker::{health, Admission, Breaker, BreakerOptions, Health, Transition};
use crate::delivery::envelope::render;
use crate::delivery::http::{HttpTransport, Target};
use crate::delivery::script::ScriptTransport;
use crate::delivery::{Reply, Request};
use crate::handlers::{self, Handler, Kind, Registry, Status};
use crate::pacing::Pacing;
use crate::retry::{given_up_on, next_step, NextStep};
use crate::store::{Action, AttemptLog, Claimed, Completion, Store, Want};

/// Tuning of one relay process.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Poll even without a doorbell (the safety net).
    pub poll_interval: Duration,
    /// While work keeps arriving: the pause between a short claim and the next one.
    pub busy_poll_interval: Duration,
    /// The longest that pause grows to on a busy server (see `pacing`).
    pub max_busy_poll_interval: Duration,
    /// Server commits per second (besides this relay's) above which the pause grows; 0: never.
    pub busy_database_tps: u32,
    /// How often the server's commit rate is sampled.
    pub pacing_interval: Duration,
    /// Without new work for this long, the relay sleeps and waits for the doorbell.
    pub idle_after: Duration,
    /// Most deliveries claimed by one statement.
    pub claim_batch: usize,
    /// Most deliveries in flight in this process, over all handlers.
    pub max_in_flight: usize,
    /// Lease = handler timeout + this margin (more timeouts for a claim that waits: `plan_claims`).
    pub lease_margin: Duration,
    /// Upper bound for a handler's `Retry-After`.
    pub max_retry_after: Duration,
    /// Most outcomes written by one completion transaction.
    pub complete_batch: usize,
    /// On shutdown, how long in-flight deliveries may take before they are released.
    pub shutdown_grace: Duration,
    /// How often expired leases are looked for.
    pub lease_check_interval: Duration,
    /// How often handler definitions are reloaded without a notification.
    pub handler_refresh_interval: Duration,
    /// When a handler's receiver counts as down, and for how long its deliveries are held.
    pub breaker: BreakerOptions,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            poll_interval: Duration::from_millis(1000),
            busy_poll_interval: Duration::from_millis(2),
            max_busy_poll_interval: Duration::from_millis(100),
            busy_database_tps: 1000,
            pacing_interval: Duration::from_secs(1),
            idle_after: Duration::from_millis(250),
            claim_batch: 500,
            max_in_flight: 2048,
            lease_margin: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(3600),
            complete_batch: 1000,
            shutdown_grace: Duration::from_secs(10),
            lease_check_interval: Duration::from_secs(1),
            handler_refresh_interval: Duration::from_secs(1),
            breaker: BreakerOptions::default(),
        }
    }
}

/// How many claimed deliveries of a handler may wait in the relay for a slot, in multiples of its
/// `max_in_flight`. They cover the claim's round trip: while a claim is on its way, finishing
/// attempts start waiting ones instead of leaving their slots empty. On a loaded 2-core machine a
/// claim of ~130 deliveries took ~10 ms, as long as 128 slots of a fast receiver took to empty, so
/// one multiple left the slots idle at the end of every claim. Bench drain, alternating runs
/// against one multiple: with three, +23 % while the machine was loaded (9,844 -> 12,098
/// events/s); with two, +5 % and +6 % in quieter periods, where three did no better. Each multiple
/// lengthens the lease of the last waiting deliveries by one handler timeout (see `plan_claims`).
const WAITING_MULTIPLE: usize = 2;

/// One handler's claimed deliveries in this process: at most `max_in_flight` attempts run at once;
/// up to `WAITING_MULTIPLE` times as many more wait here, already claimed, so that a slot that
/// frees up is refilled at once instead of after the next claim's round trip (the claim is the
/// pipeline's slowest step).
#[derive(Default)]
struct HandlerSlots {
    /// Attempts running now.
    running: u32,
    /// Claimed, waiting for a slot (in dispatch order).
    queued: VecDeque<Claimed>,
}

impl HandlerSlots {
    /// Claimed and not yet finished: what counts against the handler's claim window.
    fn claimed(&self) -> usize {
        self.running as usize + self.queued.len()
    }
}

/// An open breaker: its handler's id, since when it holds deliveries, when it next probes.
type OpenCircuit = (i64, Instant, Option<Instant>);

/// Open breakers as `relay status` reads them: `[{handler_id, since, next_probe_at}]`.
fn circuits_json(open: &[OpenCircuit]) -> serde_json::Value {
    let now = Instant::now();
    let wall = |t: Instant| -> String {
        let utc = if t >= now {
            Utc::now() + chrono::Duration::from_std(t - now).unwrap_or_default()
        } else {
            Utc::now() - chrono::Duration::from_std(now - t).unwrap_or_default()
        };
        utc.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    serde_json::Value::Array(
        open.iter()
            .map(|(id, since, probe)| {
                serde_json::json!({
                    "handler_id": id,
                    "since": wall(*since),
                    "next_probe_at": probe.map(wall),
                })
            })
            .collect(),
    )
}

/// A handler's breaker, for the target it was tripped by: a handler pointed elsewhere (or
/// removed) starts afresh.
struct TargetBreaker {
    kind: Kind,
    /// The handler's name then (its metric's label, also once the handler is gone).
    name: String,
    breaker: Breaker,
}

/// Counters shared by the dispatcher and the completer.
struct Shared {
    /// Rung by completions (capacity freed), the doorbell, handler changes, recovered leases.
    wake: Arc<Notify>,
    slots: Mutex<HashMap<i64, HandlerSlots>>,
    total_in_flight: AtomicUsize,
    /// The earliest retry scheduled by this process that is not yet due.
    next_due: Mutex<Option<Instant>>,
    /// Per rate-limited handler: when its next attempt may start.
    rate_slots: Mutex<HashMap<i64, Instant>>,
    /// Per handler that had a failure: its receiver's circuit breaker (see `breaker`).
    breakers: Mutex<HashMap<i64, TargetBreaker>>,
    breaker_options: BreakerOptions,
}

impl Shared {
    /// Reserve the start of a rate-limited handler's next attempt (see [`rate_slot`]).
    fn reserve_rate_slot(&self, handler: &Handler) -> Instant {
        let mut slots = self.rate_slots.lock().expect("rate slots lock");
        let next = slots.get(&handler.id).copied();
        let (start, after) = rate_slot(next, Instant::now(), handler.rate_limit_per_s);
        slots.insert(handler.id, after);
        start
    }

    /// The open breakers: (handler id, held since, next probe), ordered by handler.
    fn open_circuits(&self) -> Vec<OpenCircuit> {
        let breakers = self.breakers.lock().expect("breakers lock");
        let mut open: Vec<OpenCircuit> = breakers
            .iter()
            .filter_map(|(id, t)| {
                let b = &t.breaker;
                Some((*id, b.held_since()?, b.next_probe_at()))
            })
            .collect();
        drop(breakers);
        open.sort_by_key(|o| o.0);
        open
    }

    /// Forget the breakers of handlers that are gone or now point at another target (an operator
    /// who fixed a handler's URL gets its deliveries going without waiting for the next probe).
    fn forget_stale_breakers(&self, snapshot: &HashMap<i64, Arc<Handler>>) {
        let mut breakers = self.breakers.lock().expect("breakers lock");
        breakers.retain(|id, t| {
            let current = snapshot.get(id);
            let keep = current.is_some_and(|h| h.kind == t.kind);
            if let Some(h) = current.filter(|h| keep && h.name != t.name) {
                // renamed: the open breaker's metric moves to the new name
                if !t.breaker.is_closed() {
                    metrics::gauge!("provisioning_circuit_open", "handler" => t.name.clone())
                        .set(0.0);
                    metrics::gauge!("provisioning_circuit_open", "handler" => h.name.clone())
                        .set(1.0);
                }
                t.name = h.name.clone();
            }
            if !keep && !t.breaker.is_closed() {
                if current.is_some() {
                    tracing::info!(handler = %t.name, "the handler's target changed: its circuit breaker starts afresh (circuit closed)");
                }
                metrics::gauge!("provisioning_circuit_open", "handler" => t.name.clone()).set(0.0);
            }
            keep
        });
    }

    /// Claim again at `at` at the latest (a retry or a probe falls due then).
    fn wake_at(&self, at: Instant) {
        let mut due = self.next_due.lock().expect("next_due lock");
        *due = Some(due.map_or(at, |d| d.min(at)));
    }

    /// The breaker's word on starting delivery `delivery_id` of `handler` now.
    fn admit(&self, handler: &Handler, delivery_id: i64) -> Admission {
        let mut breakers = self.breakers.lock().expect("breakers lock");
        let Some(t) = breakers.get_mut(&handler.id) else {
            return Admission::Go;
        };
        // A probe's outcome is due within its timeout; a lost one lets another probe after twice.
        let admission = t
            .breaker
            .admit(delivery_id, Instant::now(), handler.timeout * 2);
        if let Admission::Hold(at) = admission {
            drop(breakers);
            self.wake_at(at);
        }
        admission
    }

    /// Feed the outcome of an attempt that ran (or None: handed back unstarted) to the breaker of
    /// its handler; log and count what changed.
    fn record(&self, handler: &Handler, delivery_id: i64, outcome: Option<&AttemptLog>) {
        let mut breakers = self.breakers.lock().expect("breakers lock");
        let Some(log) = outcome else {
            if let Some(t) = breakers.get_mut(&handler.id) {
                t.breaker.not_attempted(delivery_id, Instant::now());
            }
            return;
        };
        let health = health(
            log.success,
            log.http_status.map(|s| s as u16),
            log.exit_code,
        );
        if health == Health::Up && !breakers.contains_key(&handler.id) {
            return; // the common case: no breaker state for a handler that never failed
        }
        let b = &mut breakers
            .entry(handler.id)
            .or_insert_with(|| TargetBreaker {
                kind: handler.kind.clone(),
                name: handler.name.clone(),
                breaker: Breaker::default(),
            })
            .breaker;
        let now = Instant::now();
        let Some(change) = b.record(delivery_id, health, now, &self.breaker_options) else {
            if b.is_closed() && health == Health::Up {
                breakers.remove(&handler.id);
            }
            return;
        };
        let probe_at = b.next_probe_at();
        drop(breakers);
        let error = log.error.as_deref().unwrap_or("");
        match change {
            Transition::Opened(pause) => {
                tracing::warn!(
                    handler = %handler.name, failures = self.breaker_options.failures, last_error = error,
                    "the handler's receiver looks down ({} attempts in a row got no answer, a 502, 503, 504 or 429): \
                     holding its deliveries for {pause:?} without spending their attempts, then one probe (circuit open)",
                    self.breaker_options.failures
                );
                metrics::counter!("provisioning_circuit_opened_total", "handler" => handler.name.clone()).increment(1);
            }
            Transition::Reopened(pause) => {
                tracing::warn!(handler = %handler.name, last_error = error, "the probe failed too: holding the handler's deliveries for {pause:?} (circuit open)");
            }
            Transition::Closed => {
                tracing::info!(handler = %handler.name, "an attempt got through: delivering the handler's held deliveries again (circuit closed)");
            }
        }
        let open = if change == Transition::Closed {
            0.0
        } else {
            1.0
        };
        metrics::gauge!("provisioning_circuit_open", "handler" => handler.name.clone()).set(open);
        if let Some(at) = probe_at {
            self.wake_at(at);
        }
    }
}

/// When the next attempt of a handler limited to `rate_per_s` attempts a second may start, and
/// when the one after it may: attempts are spaced `1 / rate_per_s` apart (no bursts: a quota of
/// N a second is never exceeded in any second), never before `now`. `next_free` is the start the
/// previous reservation left for this one (None: the first).
fn rate_slot(next_free: Option<Instant>, now: Instant, rate_per_s: u32) -> (Instant, Instant) {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate_per_s.max(1)));
    let start = next_free.map_or(now, |t| t.max(now));
    (start, start + interval)
}

#[derive(Clone)]
pub struct Transports {
    pub http: HttpTransport,
    pub script: ScriptTransport,
}

impl Transports {
    /// One attempt of `req` to `handler`, by its kind (deliveries and `relay handlers test`).
    pub async fn send(&self, handler: &Handler, req: &Request) -> Reply {
        match &handler.kind {
            Kind::Http { url, parsed } => {
                let target = Target {
                    url,
                    parsed: parsed.as_ref(),
                    headers: &handler.headers,
                    secret: handler.secret.as_deref(),
                };
                self.http.send(&target, req).await
            }
            Kind::Script { program, args } => self.script.run(program, args, req).await,
        }
    }
}

/// Everything the relay loop needs; built by the binary (or a test).
pub struct Relay {
    pub store: Store,
    pub registry: Arc<Registry>,
    pub transports: Transports,
    pub options: WorkerOptions,
    /// For the dedicated LISTEN connection.
    pub listen_config: tokio_postgres::Config,
}

impl Relay {
    /// Run until `shutdown` is cancelled; then stop claiming, let in-flight work finish within the
    /// grace period, release the rest, and return.
    pub async fn run(self, shutdown: CancellationToken) {
        let Relay {
            store,
            registry,
            transports,
            options,
            listen_config,
        } = self;
        let shared = Arc::new(Shared {
            wake: Arc::new(Notify::new()),
            slots: Mutex::new(HashMap::new()),
            total_in_flight: AtomicUsize::new(0),
            next_due: Mutex::new(None),
            rate_slots: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
            breaker_options: options.breaker,
        });
        let handlers_changed = Arc::new(Notify::new());
        let background = CancellationToken::new();
        let tasks = TaskTracker::new();

        // Initial handler load; the refresher keeps it current.
        match store.pool().get().await {
            Ok(client) => match handlers::load(&**client).await {
                Ok(h) => {
                    registry.replace(h);
                }
                Err(e) => tracing::error!(error = %e, "cannot load handlers; will retry"),
            },
            Err(e) => tracing::error!(error = %e, "cannot load handlers; will retry"),
        }
        if let Err(e) = store.heartbeat().await {
            tracing::warn!(error = %e, "cannot register relay");
        }

        tasks.spawn(crate::wakeup::listen(
            listen_config,
            shared.wake.clone(),
            handlers_changed.clone(),
            background.clone(),
        ));
        tasks.spawn(refresh_handlers(
            store.clone(),
            registry.clone(),
            handlers_changed,
            shared.wake.clone(),
            options.handler_refresh_interval,
            background.clone(),
        ));
        let pacing = Pacing::new(
            options.busy_poll_interval,
            options.max_busy_poll_interval,
            options.busy_database_tps,
        );
        tasks.spawn(
            pacing
                .clone()
                .run(store.clone(), options.pacing_interval, background.clone()),
        );
        tasks.spawn(maintain(
            store.clone(),
            shared.clone(),
            options.lease_check_interval,
            background.clone(),
        ));

        let (done_tx, done_rx) = mpsc::unbounded_channel::<Completion>();
        let completer = tokio::spawn(complete_loop(
            store.clone(),
            shared.clone(),
            done_rx,
            options.complete_batch,
        ));

        // Deliveries stop on `hard_stop` (after the grace period) and release their claim.
        let hard_stop = CancellationToken::new();
        let deliveries = TaskTracker::new();
        let attempts = Attempts {
            registry: registry.clone(),
            transports,
            store: store.clone(),
            shared: shared.clone(),
            done_tx: done_tx.clone(),
            tracker: deliveries.clone(),
            hard_stop: hard_stop.clone(),
            shutdown: shutdown.clone(),
            max_retry_after: options.max_retry_after,
        };
        dispatch(
            &store, &registry, &options, &pacing, &shared, &attempts, &shutdown,
        )
        .await;

        // Shutdown: no more claims, and no more attempts start. Claimed deliveries still waiting
        // for a slot go back at once; running ones may finish within the grace period.
        let waiting: Vec<Claimed> = {
            let mut slots = shared.slots.lock().expect("slots lock");
            slots
                .values_mut()
                .flat_map(|s| s.queued.drain(..))
                .collect()
        };
        for c in &waiting {
            let _ = done_tx.send(release(
                c.delivery_id,
                c.handler_id,
                c.token,
                "relay shut down before the attempt started",
            ));
        }
        let in_flight = shared.total_in_flight.load(Ordering::SeqCst);
        tracing::info!(in_flight, released = waiting.len(), grace = ?options.shutdown_grace, "shutting down: claiming stopped");
        deliveries.close();
        if tokio::time::timeout(options.shutdown_grace, deliveries.wait())
            .await
            .is_err()
        {
            tracing::warn!("grace period over: releasing unfinished deliveries");
            hard_stop.cancel();
            deliveries.wait().await;
        }
        drop(attempts); // holds a sender of outcomes too
        drop(done_tx);
        let _ = completer.await;
        background.cancel();
        tasks.close();
        tasks.wait().await;
        if let Err(e) = store.unregister().await {
            tracing::warn!(error = %e, "cannot unregister relay");
        }
        tracing::info!("relay stopped");
    }
}

async fn dispatch(
    store: &Store,
    registry: &Arc<Registry>,
    options: &WorkerOptions,
    pacing: &Pacing,
    shared: &Arc<Shared>,
    attempts: &Attempts,
    shutdown: &CancellationToken,
) {
    let mut sleeping = false;
    // when a claim last found work, and the current pause between claims while awake
    let mut last_work: Option<Instant> = None;
    let mut busy_pause = options.busy_poll_interval;
    let mut error_backoff = Duration::from_millis(100);
    // the handler snapshot the breakers were last checked against
    let mut breakers_checked: Option<Arc<HashMap<i64, Arc<Handler>>>> = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let snapshot = registry.snapshot();
        // (the registry swaps its snapshot only when a handler changed)
        if !breakers_checked
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &snapshot))
        {
            shared.forget_stale_breakers(&snapshot);
            breakers_checked = Some(snapshot.clone());
        }
        // A handler whose in-flight limit was raised: start waiting deliveries in the new slots.
        attempts.start_waiting(&snapshot);
        let wants = wants(&snapshot, shared, options);
        let requested: i64 = wants.iter().map(|w| w.limit as i64).sum();
        let token: i64 = rand::thread_rng().gen();
        let claimed = match store.claim(&wants, token).await {
            Ok(c) => {
                error_backoff = Duration::from_millis(100);
                c
            }
            Err(e) => {
                tracing::error!(error = %e, "claiming deliveries failed; retrying in {:?}", error_backoff);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(error_backoff) => {}
                }
                error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let got = claimed.len() as i64;
        // The shortest pause between claims: longer on a server busy with other work.
        let paced = pacing.pause();
        if got > 0 {
            attempts.start(claimed, &snapshot);
            last_work = Some(Instant::now());
            busy_pause = paced;
            // Work is flowing: stay awake, so that writers stop ringing the doorbell.
            if sleeping {
                sleeping = false;
                if let Err(e) = store.set_sleeping(false).await {
                    tracing::warn!(error = %e, "cannot update relay state");
                }
            }
        }
        if requested > 0 && got == requested {
            // Under load: claim again as soon as capacity allows.
            continue;
        }
        if requested > 0 && !sleeping && last_work.is_some_and(|t| t.elapsed() < options.idle_after)
        {
            // Recently busy: more work is likely within milliseconds. Poll again shortly rather
            // than asking every capturing commit for a NOTIFY. Each empty claim doubles the
            // pause (up to 1/8 of idle_after), so a trickle costs few claims.
            let pause = busy_pause.max(paced);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            if got == 0 {
                busy_pause = (pause * 2).min((options.idle_after / 8).max(paced));
            }
            continue;
        }
        if requested > 0 && !sleeping {
            // The queue looks drained: ask for the doorbell, then look once more (a change that
            // committed while we were setting the flag did not ring).
            match store.set_sleeping(true).await {
                Ok(()) => sleeping = true,
                Err(e) => tracing::warn!(error = %e, "cannot update relay state"),
            }
            continue;
        }
        // Wait for a reason to claim again.
        let deadline = {
            let mut due = shared.next_due.lock().expect("next_due lock");
            let poll_at = Instant::now() + options.poll_interval;
            match *due {
                Some(d) if d <= poll_at => {
                    if d <= Instant::now() {
                        *due = None;
                        continue;
                    }
                    d
                }
                _ => poll_at,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep_until(deadline.into()) => {
                let mut due = shared.next_due.lock().expect("next_due lock");
                if matches!(*due, Some(d) if d <= Instant::now()) {
                    *due = None;
                }
            }
        }
    }
}

/// How many deliveries to ask for, per enabled handler, within the per-handler and total limits.
fn wants(
    snapshot: &HashMap<i64, Arc<Handler>>,
    shared: &Shared,
    options: &WorkerOptions,
) -> Vec<Want> {
    let total = shared.total_in_flight.load(Ordering::SeqCst);
    let room = options
        .max_in_flight
        .saturating_sub(total)
        .min(options.claim_batch);
    let now = Instant::now();
    let breakers = shared.breakers.lock().expect("breakers lock");
    let slots = shared.slots.lock().expect("slots lock");
    let mut demands: Vec<Demand> = snapshot
        .values()
        .filter(|h| h.status == Status::Enabled)
        .map(|h| Demand {
            handler: h,
            claimed: slots.get(&h.id).map_or(0, HandlerSlots::claimed),
            cap: breakers.get(&h.id).and_then(|t| t.breaker.claim_cap(now)),
        })
        // an open breaker: none of the handler's deliveries until its probe is due
        .filter(|d| d.cap != Some(0))
        .collect();
    drop(slots);
    drop(breakers);
    demands.sort_by_key(|d| (d.handler.priority, d.handler.id));
    plan_claims(&demands, room, options.lease_margin)
}

/// One enabled handler as the claim planner sees it.
struct Demand<'a> {
    handler: &'a Arc<Handler>,
    /// Its deliveries claimed by this process and not yet finished (running or waiting).
    claimed: usize,
    /// The most its breaker lets it have claimed (1: a probe), if it is not closed.
    cap: Option<usize>,
}

/// Split `room` (what the process-wide limit and the claim batch allow) between the handlers, in
/// priority order.
///
/// A handler's claim window is its `max_in_flight` deliveries that may run, plus
/// `WAITING_MULTIPLE` times as many waiting in the relay for a slot. Claims come in batches of at
/// least half a `max_in_flight` rather than one per finished attempt. Slots that can run now are
/// served first, for every handler, and only then the waiting parts of the windows: where the
/// process-wide limit is short, one handler's waiting deliveries never take another handler's
/// free slots.
///
/// Lease: every attempt running now ends within the handler's timeout and starts the next waiting
/// one, so the n-th waiting delivery starts within ceil(n / max_in_flight) timeouts; its lease
/// covers those and its own attempt, plus the margin.
///
/// A rate-limited handler (N attempts a second) has a window of at most 2 N (what it can start in
/// two seconds), its in-flight limit and batch threshold capped by that window, and the leases
/// of its claims also cover one turn of 1/N s for every delivery claimed ahead.
fn plan_claims(demands: &[Demand<'_>], mut room: usize, lease_margin: Duration) -> Vec<Want> {
    let rate = |d: &Demand<'_>| d.handler.rate_limit_per_s as usize;
    // A rate-limited handler's window is two seconds of its rate at most: what it can start
    // before its claim goes stale, and no more taken from other relays.
    let window = |d: &Demand<'_>| {
        let w = (1 + WAITING_MULTIPLE) * (d.handler.max_in_flight as usize).max(1);
        let w = match rate(d) {
            0 => w,
            r => w.min(2 * r),
        };
        // (a cap of 0 never gets here: wants() leaves such handlers out)
        w.min(d.cap.unwrap_or(usize::MAX)).max(1)
    };
    let limit = |d: &Demand<'_>| (d.handler.max_in_flight as usize).clamp(1, window(d));
    // Worth a claim: nothing claimed yet, or at least half a max_in_flight (capped as above) free.
    let worth = |d: &Demand<'_>| {
        let space = window(d).saturating_sub(d.claimed);
        space > 0 && (d.claimed == 0 || space >= (limit(d) / 2).max(1))
    };
    let mut take = vec![0usize; demands.len()];
    // First the slots that can start at once (waiting deliveries fill freed slots first)...
    for (i, d) in demands.iter().enumerate().filter(|(_, d)| worth(d)) {
        let now = limit(d).saturating_sub(d.claimed).min(room);
        take[i] = now;
        room -= now;
    }
    // ...then the waiting part of each window.
    for (i, d) in demands.iter().enumerate().filter(|(_, d)| worth(d)) {
        let more = window(d).saturating_sub(d.claimed + take[i]).min(room);
        take[i] += more;
        room -= more;
    }
    demands
        .iter()
        .zip(take)
        .filter(|(_, n)| *n > 0)
        .map(|(d, n)| {
            // The last of this claim waits behind `waiting` others (0: all start at once).
            let waiting = (d.claimed + n).saturating_sub(limit(d));
            let timeouts = 1 + waiting.div_ceil(limit(d)) as u32;
            // ...and, rate-limited, the turns of everything claimed before it (1 / rate each).
            let turns = match rate(d) {
                0 => Duration::ZERO,
                r => Duration::from_secs_f64((d.claimed + n) as f64 / r as f64),
            };
            Want {
                handler_id: d.handler.id,
                limit: n as i32,
                lease: d.handler.timeout * timeouts + turns + lease_margin,
                row_images: d.handler.format == crate::delivery::envelope::Format::Full,
            }
        })
        .collect()
}

/// How many attempts of a handler may run at once. A handler that is gone has no limit: its
/// deliveries start at once and are handed back untouched (`deliver` finds no handler).
fn slot_limit(handler: Option<&Arc<Handler>>) -> u32 {
    handler.map_or(u32::MAX, |h| h.max_in_flight)
}

/// What attempts need, shared by the tasks that run them.
#[derive(Clone)]
struct Attempts {
    registry: Arc<Registry>,
    transports: Transports,
    store: Store,
    shared: Arc<Shared>,
    done_tx: mpsc::UnboundedSender<Completion>,
    tracker: TaskTracker,
    /// After the grace period: running attempts stop and release their claim.
    hard_stop: CancellationToken,
    /// No waiting delivery starts after this.
    shutdown: CancellationToken,
    max_retry_after: Duration,
}

impl Attempts {
    /// Take freshly claimed deliveries: each starts now if its handler has a free slot, or waits.
    fn start(&self, mut claimed: Vec<Claimed>, snapshot: &HashMap<i64, Arc<Handler>>) {
        // Dispatch order: event order, then handler priority.
        claimed.sort_by_key(|c| {
            (
                c.event.id,
                snapshot
                    .get(&c.handler_id)
                    .map(|h| h.priority)
                    .unwrap_or(i32::MAX),
            )
        });
        self.shared
            .total_in_flight
            .fetch_add(claimed.len(), Ordering::SeqCst);
        let mut now = Vec::new();
        {
            let mut slots = self.shared.slots.lock().expect("slots lock");
            for c in claimed {
                let limit = slot_limit(snapshot.get(&c.handler_id));
                let s = slots.entry(c.handler_id).or_default();
                if s.running < limit && s.queued.is_empty() {
                    s.running += 1;
                    now.push(c);
                } else {
                    s.queued.push_back(c);
                }
            }
        }
        for c in now {
            self.spawn(c, false);
        }
    }

    /// Fill slots that opened without an attempt ending (a raised `max_in_flight`).
    fn start_waiting(&self, snapshot: &HashMap<i64, Arc<Handler>>) {
        let mut now = Vec::new();
        {
            let mut slots = self.shared.slots.lock().expect("slots lock");
            for (id, s) in slots.iter_mut() {
                let limit = slot_limit(snapshot.get(id));
                while s.running < limit {
                    let Some(c) = s.queued.pop_front() else { break };
                    s.running += 1;
                    now.push(c);
                }
            }
        }
        for c in now {
            self.spawn(c, true);
        }
    }

    /// One slot: runs the delivery, then the handler's next waiting one, until none waits.
    /// `waited`: the first delivery waited in the relay for its slot.
    fn spawn(&self, first: Claimed, waited: bool) {
        let this = self.clone();
        self.tracker.spawn(async move {
            let mut next = Some((first, waited));
            while let Some((c, waited)) = next {
                let handler_id = c.handler_id;
                // The definition as it is now: a delivery that waited may find its handler paused.
                let handler = this.registry.get(handler_id);
                let (delivery_id, token) = (c.delivery_id, c.token);
                // A rate-limited handler: wait for this attempt's turn (a shutdown ends the wait).
                let mut paced = false;
                if let Some(h) = handler
                    .as_ref()
                    .filter(|h| h.rate_limit_per_s > 0 && h.status == Status::Enabled)
                {
                    let at = this.shared.reserve_rate_slot(h);
                    if at > Instant::now() {
                        paced = true;
                        tokio::select! {
                            _ = this.shutdown.cancelled() => {}
                            _ = tokio::time::sleep_until(at.into()) => {}
                        }
                    }
                }
                let completion = if paced && this.shutdown.is_cancelled() {
                    release(
                        delivery_id,
                        handler_id,
                        token,
                        "relay shut down before the attempt started",
                    )
                } else if (waited || paced)
                    && handler
                        .as_ref()
                        .is_some_and(|h| Instant::now() + h.timeout > c.leased_until)
                {
                    // It waited longer than its lease allows (the handler's max_in_flight was
                    // lowered meanwhile): started now, the lease could run out mid-attempt and
                    // another claim send it again. Hand it back; the next claim leases it afresh.
                    release(
                        delivery_id,
                        handler_id,
                        token,
                        "its lease would have run out during the attempt (it waited too long for a slot or its handler's rate limit)",
                    )
                } else if let Some(at) = handler
                    .as_ref()
                    .filter(|h| h.status == Status::Enabled)
                    .and_then(|h| match this.shared.admit(h, delivery_id) {
                        Admission::Hold(at) => Some(at),
                        Admission::Go | Admission::Probe => None,
                    })
                {
                    // Claimed before the breaker opened: back to the queue, no attempt spent.
                    let wait = at.saturating_duration_since(Instant::now());
                    release(
                        delivery_id,
                        handler_id,
                        token,
                        &format!("held: the handler's receiver looks down (circuit open); the next probe goes in {wait:.1?}"),
                    )
                } else {
                    let completion = tokio::select! {
                        biased;
                        _ = this.hard_stop.cancelled() => release(delivery_id, handler_id, token, "relay shut down during the attempt"),
                        done = deliver(handler.clone(), c, &this.transports, &this.store, this.max_retry_after) => done,
                    };
                    if let Some(h) = &handler {
                        this.shared.record(h, delivery_id, completion.log.as_ref());
                    }
                    completion
                };
                // (Per-object order does not depend on this task: the delivery stays `running` in
                // the database, blocking its object's next one, until the outcome is committed.)
                let _ = this.done_tx.send(completion);
                next = this.next_waiting(handler_id).map(|c| (c, true));
                this.shared.wake.notify_one();
            }
        });
    }

    /// The slot of a finished attempt: hand it to the handler's next waiting delivery, or free it.
    fn next_waiting(&self, handler_id: i64) -> Option<Claimed> {
        let limit = slot_limit(self.registry.get(handler_id).as_ref());
        let mut slots = self.shared.slots.lock().expect("slots lock");
        let s = slots.get_mut(&handler_id)?;
        // (running counts this slot: above the limit, it was lowered meanwhile)
        if s.running <= limit && !self.shutdown.is_cancelled() {
            if let Some(c) = s.queued.pop_front() {
                return Some(c);
            }
        }
        s.running = s.running.saturating_sub(1);
        None
    }
}

fn release(delivery_id: i64, handler_id: i64, token: i64, why: &str) -> Completion {
    Completion {
        delivery_id,
        handler_id,
        token,
        action: Action::Release,
        delay: Duration::ZERO,
        error: Some(why.to_string()),
        log: None,
        decision: None,
        before_stage: false,
        sent_data: None,
    }
}

/// The Standard Webhooks id: one per event × handler, the same on every attempt and replay.
pub fn webhook_id(event_id: i64, handler_id: i64) -> String {
    format!("evt_{event_id}_h{handler_id}")
}

async fn deliver(
    handler: Option<Arc<Handler>>,
    c: Claimed,
    transports: &Transports,
    store: &Store,
    max_retry_after: Duration,
) -> Completion {
    let Some(handler) = handler.filter(|h| h.status == Status::Enabled) else {
        // Removed, paused or disabled between claim and start: hand it back untouched.
        return release(
            c.delivery_id,
            c.handler_id,
            c.token,
            "handler not enabled when the attempt was due",
        );
    };
    let body = render(&c.event, c.modified_data.as_ref(), handler.format);
    let req = Request {
        webhook_id: webhook_id(c.event.id, handler.id),
        event_name: c.event.name.clone(),
        handler_name: handler.name.clone(),
        attempt: c.attempt,
        body,
        timeout: handler.timeout,
    };
    let started_at = Utc::now();
    let reply = transports.send(&handler, &req).await;
    outcome(&handler, c, req, reply, started_at, store, max_retry_after).await
}

async fn outcome(
    handler: &Handler,
    c: Claimed,
    req: Request,
    mut reply: Reply,
    started_at: chrono::DateTime<Utc>,
    store: &Store,
    max_retry_after: Duration,
) -> Completion {
    let before_stage = c.stage == "before";
    // Only a before-stage decision needs the data that was sent (a copy per delivery otherwise).
    let sent_data = before_stage.then(|| {
        c.modified_data
            .clone()
            .unwrap_or_else(|| c.event.data.clone())
    });
    let mut decision = None;
    if let (Some(sent), true) = (&sent_data, reply.success) {
        match crate::decisions::parse(reply.response.as_deref().unwrap_or(""), sent) {
            Ok(d) => decision = Some(d),
            Err(e) => {
                // Not a decision: a failed attempt, retried on schedule; never taken as "allow".
                reply.success = false;
                reply.error = Some(e);
            }
        }
    }
    // Why a delivery that goes dead now does (for its log line).
    let mut dead_because = "retry schedule exhausted".to_string();
    let (action, delay) = if reply.success {
        (Action::Done, Duration::ZERO)
    } else if let Some(code) = given_up_on(&handler.give_up_on, reply.http_status, reply.exit_code)
    {
        // The receiver refused this request in a way the handler says no retry changes.
        dead_because = format!("{code} is in the handler's give_up_on list, so it is not retried");
        let error = reply.error.take().unwrap_or_else(|| "failed".into());
        reply.error = Some(format!("{error} ({dead_because})"));
        (Action::Dead, Duration::ZERO)
    } else if reply.gone {
        let reason = format!(
            "paused by the relay: the handler answered 410 Gone at {}",
            Utc::now().to_rfc3339()
        );
        let mut paused = false;
        for wait_ms in [0u64, 200, 1000] {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            match store.pause_handler(handler.id, &reason).await {
                Ok(()) => {
                    paused = true;
                    break;
                }
                Err(e) => {
                    tracing::error!(handler = %handler.name, error = %e, "cannot pause handler after 410 Gone; retrying")
                }
            }
        }
        if paused {
            tracing::warn!(handler = %handler.name, "handler answered 410 Gone: paused; resume it to deliver its backlog");
            // Queued again at once, but a paused handler is not claimed: it waits for resume.
            (Action::Retry, Duration::ZERO)
        } else {
            // The pause could not be recorded: never forget the 410, fall back to the schedule.
            let r: f64 = rand::thread_rng().gen();
            match next_step(
                &handler.retry_schedule_ms,
                c.attempt,
                r,
                None,
                max_retry_after,
            ) {
                NextStep::RetryAfter(d) => (Action::Retry, d),
                NextStep::Dead => (Action::Dead, Duration::ZERO),
            }
        }
    } else {
        let r: f64 = rand::thread_rng().gen();
        match next_step(
            &handler.retry_schedule_ms,
            c.attempt,
            r,
            reply.retry_after,
            max_retry_after,
        ) {
            NextStep::RetryAfter(d) => (Action::Retry, d),
            NextStep::Dead => (Action::Dead, Duration::ZERO),
        }
    };
    let outcome_label = if reply.success { "success" } else { "fail" };
    metrics::counter!("provisioning_deliveries_total", "handler" => handler.name.clone(), "event" => c.event.name.clone(), "outcome" => outcome_label).increment(1);
    metrics::histogram!("provisioning_attempt_duration_seconds", "handler" => handler.name.clone())
        .record(reply.duration.as_secs_f64());
    if reply.success {
        let latency = (Utc::now() - c.event.changed_at)
            .to_std()
            .unwrap_or_default();
        metrics::histogram!("provisioning_delivery_latency_seconds", "handler" => handler.name.clone()).record(latency.as_secs_f64());
    }
    if action == Action::Dead {
        metrics::counter!("provisioning_deliveries_dead_total", "handler" => handler.name.clone(), "event" => c.event.name.clone()).increment(1);
        tracing::error!(handler = %handler.name, event = %c.event.name, event_id = c.event.id, "delivery is dead: {dead_because}; see `relay deliveries list --status dead`");
    }
    if !reply.success {
        tracing::warn!(
            handler = %handler.name, event = %c.event.name, event_id = c.event.id, attempt = c.attempt,
            error = reply.error.as_deref().unwrap_or(""), next = ?action, delay_ms = delay.as_millis() as u64,
            "delivery attempt failed"
        );
    }
    let log = AttemptLog {
        delivery_id: c.delivery_id,
        event_id: c.event.id,
        handler_id: handler.id,
        handler_name: handler.name.clone(),
        event_name: c.event.name.clone(),
        object_id: match &c.event.object_id {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        },
        attempt: c.attempt as i32,
        started_at,
        duration_ms: reply.duration.as_secs_f64() * 1000.0,
        success: reply.success,
        http_status: reply.http_status.map(i32::from),
        exit_code: reply.exit_code,
        request_body: req.body,
        response: reply.response,
        error: reply.error.clone(),
    };
    Completion {
        delivery_id: c.delivery_id,
        handler_id: c.handler_id,
        token: c.token,
        action,
        delay,
        error: if reply.success { None } else { reply.error },
        log: Some(log),
        decision,
        before_stage,
        sent_data,
    }
}

/// Write outcomes back in batches; never drop one (retry while the database is away).
async fn complete_loop(
    store: Store,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Completion>,
    batch_size: usize,
) {
    let mut batch: Vec<Completion> = Vec::with_capacity(batch_size);
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(c) => batch.push(c),
                None => return,
            }
        }
        while batch.len() < batch_size {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            match store.complete(&batch).await {
                Ok(applied) => {
                    if applied < batch.len() {
                        tracing::warn!(
                            lost = batch.len() - applied,
                            "some outcomes arrived after their lease expired; another relay owns them now"
                        );
                    }
                    break;
                }
                Err(e) if e.is_refusal() => {
                    // One outcome the database will not take must not block the others.
                    tracing::error!(error = %e, "the database refused a batch of outcomes; recording them one by one");
                    complete_one_by_one(&store, &mut batch).await;
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, pending = batch.len(), "cannot record outcomes; retrying in {:?}", backoff);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        {
            // (handler slots were freed when each attempt ended; the total bounds outcomes not
            // yet written too)
            let mut due = shared.next_due.lock().expect("next_due lock");
            let now = Instant::now();
            for c in &batch {
                if c.action == Action::Retry {
                    let at = now + c.delay;
                    *due = Some(due.map_or(at, |d| d.min(at)));
                }
            }
            shared
                .total_in_flight
                .fetch_sub(batch.len(), Ordering::SeqCst);
        }
        batch.clear();
        shared.wake.notify_one();
    }
}

/// Fallback after a refused batch: each outcome alone; one that is still refused is recorded with
/// its log text replaced by the reason, then without a log; if even that fails its lease runs out
/// and the delivery is retried (nothing is lost, the attempt is logged then).
async fn complete_one_by_one(store: &Store, batch: &mut [Completion]) {
    for c in batch.iter_mut() {
        for round in 0..3 {
            let r = store.complete(std::slice::from_ref(c)).await;
            match r {
                Ok(_) => break,
                Err(e) if e.is_refusal() && round == 0 => {
                    let why = format!("the outcome could not be stored as received: {e}");
                    if let Some(log) = c.log.as_mut() {
                        log.response = None;
                        log.error = Some(why.clone());
                    }
                    c.error = Some(why);
                }
                Err(e) if e.is_refusal() && round == 1 => {
                    c.log = None;
                    c.error = Some("the outcome could not be stored".into());
                    tracing::error!(delivery = c.delivery_id, error = %e, "outcome refused even without its log text");
                }
                Err(e) => {
                    tracing::error!(delivery = c.delivery_id, error = %e, "cannot record this outcome; its lease will expire and it will be retried");
                    break;
                }
            }
        }
    }
}

/// Reload handler definitions on notification or every `interval`.
async fn refresh_handlers(
    store: Store,
    registry: Arc<Registry>,
    changed: Arc<Notify>,
    wake: Arc<Notify>,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
        let loaded = match store.pool().get().await {
            Ok(client) => handlers::load(&**client).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match loaded {
            Ok(h) => {
                if registry.replace(h) {
                    tracing::info!("handler definitions changed; applied");
                    wake.notify_one();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload handlers; keeping the previous definitions")
            }
        }
    }
}

/// Heartbeat, lease recovery, and outbox vacuuming where autovacuum does not keep up.
async fn maintain(store: Store, shared: Arc<Shared>, interval: Duration, stop: CancellationToken) {
    let wake = &shared.wake;
    let mut last_heartbeat = Instant::now();
    let mut last_vacuum_check = Instant::now();
    // the circuits last published (none at start), and whether publishing ever failed
    let mut circuits: Vec<OpenCircuit> = Vec::new();
    let mut circuits_warned = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match store.recover_expired_leases().await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(recovered = n, "expired leases returned to the queue");
                wake.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "lease recovery failed"),
        }
        if last_vacuum_check.elapsed() >= Duration::from_secs(10) {
            last_vacuum_check = Instant::now();
            if let Err(e) = store.vacuum_if_bloated().await {
                tracing::warn!(error = %e, "vacuuming the outbox failed");
            }
        }
        if last_heartbeat.elapsed() >= Duration::from_secs(5) {
            last_heartbeat = Instant::now();
            if let Err(e) = store.heartbeat().await {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
        // Open breakers, for `relay status`: written when they change (or a probe time moved).
        let now_open = shared.open_circuits();
        if now_open != circuits {
            match store.record_circuits(&circuits_json(&now_open)).await {
                Ok(()) => circuits = now_open,
                Err(e) if !circuits_warned => {
                    circuits_warned = true;
                    tracing::warn!(error = %e, "cannot publish open circuit breakers for `relay status` (is the schema older than this relay? run `relay migrate`); delivery is not affected");
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::envelope::Format;
    use crate::handlers::{Kind, Stage};

    fn handler(id: i64, max_in_flight: u32) -> Arc<Handler> {
        Arc::new(Handler {
            id,
            name: format!("h{id}"),
            priority: 100,
            status: Status::Enabled,
            events: vec!["clients.*".into()],
            stage: Stage::After,
            kind: Kind::Http {
                url: "http://127.0.0.1:1/".into(),
                parsed: None,
            },
            timeout: Duration::from_secs(10),
            retry_schedule_ms: vec![],
            headers: vec![],
            secret: None,
            max_in_flight,
            format: Format::Jerasoft,
            rate_limit_per_s: 0,
            give_up_on: vec![],
        })
    }

    const MARGIN: Duration = Duration::from_secs(30);

    fn plan(demands: &[(&Arc<Handler>, usize)], room: usize) -> Vec<(i64, i32, u64)> {
        plan_capped(
            &demands
                .iter()
                .map(|(h, n)| (*h, *n, None))
                .collect::<Vec<_>>(),
            room,
        )
    }

    fn plan_capped(
        demands: &[(&Arc<Handler>, usize, Option<usize>)],
        room: usize,
    ) -> Vec<(i64, i32, u64)> {
        let demands: Vec<Demand> = demands
            .iter()
            .map(|(h, claimed, cap)| Demand {
                handler: h,
                claimed: *claimed,
                cap: *cap,
            })
            .collect();
        plan_claims(&demands, room, MARGIN)
            .iter()
            .map(|w| (w.handler_id, w.limit, w.lease.as_secs()))
            .collect()
    }

    #[test]
    fn an_idle_handler_claims_its_whole_window_with_a_lease_for_the_waiting_part() {
        let h = handler(1, 128);
        // 128 run at once, 256 wait: the last starts within two timeouts (10 s each), so the
        // claim's lease covers three + margin
        assert_eq!(plan(&[(&h, 0)], 500), vec![(1, 384, 60)]);
        // capped by the process-wide room: 128 run, 72 wait, the last within one timeout
        assert_eq!(plan(&[(&h, 0)], 200), vec![(1, 200, 50)]);
    }

    #[test]
    fn a_claim_that_fits_the_free_slots_has_a_lease_of_one_timeout() {
        let h = handler(1, 128);
        // the process-wide room allows only 100: all start at once
        assert_eq!(plan(&[(&h, 0)], 100), vec![(1, 100, 40)]);
    }

    #[test]
    fn a_handler_claims_again_only_when_half_its_limit_is_free() {
        let h = handler(1, 128);
        assert_eq!(plan(&[(&h, 328)], 500), vec![], "56 free of 384");
        // 64 free: a batch, all of which wait (128 running, 192 waiting): the last of it is the
        // 256th waiting, it starts within two timeouts
        assert_eq!(plan(&[(&h, 320)], 500), vec![(1, 64, 60)]);
        // 128 running, 64 waiting: the batch of 192 ends 256 deep as well
        assert_eq!(plan(&[(&h, 192)], 500), vec![(1, 192, 60)]);
        let small = handler(2, 32);
        assert_eq!(
            plan(&[(&small, 72)], 500),
            vec![(2, 24, 60)],
            "24 free of 96"
        );
        assert_eq!(plan(&[(&small, 82)], 500), vec![], "14 free of 96");
    }

    #[test]
    fn a_claim_that_only_waits_one_round_has_a_lease_of_two_timeouts() {
        let h = handler(1, 128);
        // 100 running: 28 start at once, 72 wait behind the running ones
        assert_eq!(plan(&[(&h, 100)], 100), vec![(1, 100, 50)]);
    }

    #[test]
    fn free_slots_of_every_handler_come_before_waiting_deliveries() {
        let (a, b) = (handler(1, 100), handler(2, 100));
        // room for 250: both fill their 100 slots, then `a` (first by priority) waits 50
        assert_eq!(
            plan(&[(&a, 0), (&b, 0)], 250),
            vec![(1, 150, 50), (2, 100, 40)]
        );
        // room for 150: `b`'s free slots are not taken by `a`'s waiting deliveries
        assert_eq!(
            plan(&[(&a, 0), (&b, 0)], 150),
            vec![(1, 100, 40), (2, 50, 40)]
        );
    }

    #[test]
    fn no_room_no_claims() {
        let h = handler(1, 128);
        assert_eq!(plan(&[(&h, 0)], 0), vec![]);
    }

    fn limited(id: i64, max_in_flight: u32, rate: u32) -> Arc<Handler> {
        let mut h = (*handler(id, max_in_flight)).clone();
        h.rate_limit_per_s = rate;
        Arc::new(h)
    }

    #[test]
    fn a_rate_limited_handler_claims_two_seconds_of_its_rate_with_their_turns_in_the_lease() {
        // 5 a second: 10 claimed, all within the in-flight limit; the last starts 2 s from now
        let h = limited(1, 16, 5);
        assert_eq!(plan(&[(&h, 0)], 500), vec![(1, 10, 10 + 2 + 30)]);
        // claims again once half of that window is free; the new ones queue behind the rest
        assert_eq!(plan(&[(&h, 6)], 500), vec![]);
        assert_eq!(plan(&[(&h, 5)], 500), vec![(1, 5, 42)]);
        // a rate above what the window allows anyway changes nothing but the lease
        let fast = limited(2, 128, 1000);
        assert_eq!(plan(&[(&fast, 0)], 500), vec![(2, 384, 60)]);
        assert_eq!(plan(&[(&handler(3, 128), 0)], 500), vec![(3, 384, 60)]);
    }

    #[test]
    fn a_handler_whose_breaker_is_due_a_probe_claims_one_delivery_and_nothing_while_it_runs() {
        let h = handler(1, 128);
        let other = handler(2, 4);
        assert_eq!(
            plan_capped(&[(&h, 0, Some(1)), (&other, 0, None)], 500),
            vec![(1, 1, 10 + 30), (2, 12, 30 + 30)]
        );
        assert_eq!(plan_capped(&[(&h, 1, Some(1))], 500), vec![]);
    }

    #[test]
    fn rate_slots_are_spaced_one_over_the_rate_apart_and_never_in_the_past() {
        let t0 = Instant::now();
        let (a, next) = rate_slot(None, t0, 4);
        assert_eq!(a, t0);
        assert_eq!(next, t0 + Duration::from_millis(250));
        // reserved at once: the next turn is a quarter second later, and so on
        let (b, next) = rate_slot(Some(next), t0, 4);
        assert_eq!(b, t0 + Duration::from_millis(250));
        let (c, _) = rate_slot(Some(next), t0, 4);
        assert_eq!(c, t0 + Duration::from_millis(500));
        // a handler idle for a while starts at once (no saved-up burst)
        let later = t0 + Duration::from_secs(10);
        let (d, next) = rate_slot(Some(t0 + Duration::from_millis(750)), later, 4);
        assert_eq!(d, later);
        assert_eq!(next, later + Duration::from_millis(250));
    }
}
