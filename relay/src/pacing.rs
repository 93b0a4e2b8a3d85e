//! Pacing: how long the relay pauses between claims while events keep trickling in.
//!
//! Each claim (and each completion) is a transaction on the server the business writes to. On a
//! quiet server, a claim every `busy_poll_interval` (2 ms) is invisible and keeps delivery within
//! a few milliseconds of the change. On a server busy with business commits, the same claims —
//! hundreds a second under a trickle, each finding one or two events — compete with the writers
//! for CPU and WAL flushes: measured at 8 pgbench writers (~500 events/s captured, ~10,000
//! commits/s), the relay took ~0.21 off the writers' TPS with a 2 ms poll and ~0.11 with a first,
//! linear pacing (README, Performance).
//!
//! So the relay watches the server's commit rate (`pg_stat_database`, all databases, minus its own
//! transactions) and, above `busy_database_tps`, stretches the pause with the square of the load,
//! up to `max_busy_poll_interval` (100 ms): twice the threshold, 4 × the pause; ten times, 100 ×
//! (capped). A linear stretch capped at 20 ms left the relay at 6–7 % of a core and ~0.06 off the
//! writers' TPS at ~11,000 commits/s; ~100 ms there halves the relay's CPU (3 %) and gave the
//! writers back ~0.02–0.05 in the same noisy runs, while a server at twice the threshold still sees
//! deliveries within ~10 ms. A backlog is never paced (a full claim is followed by the next one at
//! once), and an idle relay still wakes on the doorbell.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// The pause between claims while work trickles in, for a server that commits `others_tps`
/// transactions per second besides this relay's: `base` up to `busy_tps`, then growing with the
/// square of `others_tps / busy_tps`, never above `max` (nor below `base`). `busy_tps` 0 turns
/// pacing off.
pub fn busy_pause(base: Duration, max: Duration, others_tps: f64, busy_tps: u32) -> Duration {
    if busy_tps == 0 || !others_tps.is_finite() || others_tps <= busy_tps as f64 {
        return base;
    }
    let load = (others_tps / busy_tps as f64).min(1e6);
    base.mul_f64(load * load).min(max).max(base)
}

/// The server's transactions per second besides this relay's, from two readings `elapsed` apart:
/// `server` more transactions on the server, `own` of them this relay's. Never negative (the
/// server's counters restart with a statistics reset or a server restart).
pub fn others_per_second(server: i64, own: u64, elapsed: Duration) -> f64 {
    let others = server as f64 - own as f64;
    others.max(0.0) / elapsed.as_secs_f64().max(1e-3)
}

/// The current pause, shared by the sampler (writer) and the dispatcher (reader).
pub struct Pacing {
    base: Duration,
    max: Duration,
    busy_tps: u32,
    pause_us: AtomicU64,
    /// When a change between paced and not paced was last logged (a server whose load hovers
    /// around the threshold would otherwise log every few seconds).
    last_logged: Mutex<Option<Instant>>,
}

impl Pacing {
    pub fn new(base: Duration, max: Duration, busy_tps: u32) -> Arc<Pacing> {
        Arc::new(Pacing {
            base,
            max,
            busy_tps,
            pause_us: AtomicU64::new(base.as_micros() as u64),
            last_logged: Mutex::new(None),
        })
    }

    /// The pause between claims while work trickles in.
    pub fn pause(&self) -> Duration {
        Duration::from_micros(self.pause_us.load(Ordering::Relaxed))
    }

    fn set(&self, others_tps: f64) {
        let pause = busy_pause(self.base, self.max, others_tps, self.busy_tps);
        let before = self
            .pause_us
            .swap(pause.as_micros() as u64, Ordering::Relaxed);
        let was_paced = before > self.base.as_micros() as u64;
        if (pause > self.base) != was_paced && self.may_log() {
            if was_paced {
                tracing::info!(commits_per_second = others_tps.round(), pause = ?pause, "server no longer busy: claiming at the busy poll interval again");
            } else {
                tracing::info!(commits_per_second = others_tps.round(), pause = ?pause, busy_database_tps = self.busy_tps, "server busy with other work: claiming less often, in bigger batches");
            }
        }
        metrics::gauge!("provisioning_server_commits_per_second").set(others_tps);
        metrics::gauge!("provisioning_busy_poll_interval_seconds").set(pause.as_secs_f64());
    }

    /// At most one pacing change a minute goes to the log (the metrics show every one).
    fn may_log(&self) -> bool {
        let mut last = self.last_logged.lock().expect("pacing log lock");
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// Sample the server's commit rate every `interval` and keep the pause current, until `stop`.
    /// Backends publish their counters about once a second, so one sample is lumpy: the rate is a
    /// moving average (half of each new sample), which follows a change within a few seconds.
    pub async fn run(self: Arc<Self>, store: Store, interval: Duration, stop: CancellationToken) {
        if self.busy_tps == 0 {
            return;
        }
        let mut last: Option<(Instant, i64, u64)> = None;
        let mut rate: Option<f64> = None;
        loop {
            match store.server_transactions().await {
                Ok(total) => {
                    let now = Instant::now();
                    let own = store.own_transactions();
                    if let Some((at, prev_total, prev_own)) = last {
                        let sample = others_per_second(
                            total - prev_total,
                            own - prev_own,
                            now.duration_since(at),
                        );
                        let smoothed = rate.map_or(sample, |r| (r + sample) / 2.0);
                        rate = Some(smoothed);
                        self.set(smoothed);
                    }
                    last = Some((now, total, own));
                }
                Err(e) => {
                    // Without a reading, fall back to the plain busy poll (never slower).
                    tracing::debug!(error = %e, "cannot read the server's commit rate");
                    last = None;
                    rate = None;
                    self.set(0.0);
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const US: Duration = Duration::from_micros(1);

    #[test]
    fn quiet_server_keeps_the_base_pause() {
        assert_eq!(busy_pause(2 * MS, 20 * MS, 0.0, 1000), 2 * MS);
        assert_eq!(busy_pause(2 * MS, 20 * MS, 999.0, 1000), 2 * MS);
        assert_eq!(busy_pause(2 * MS, 20 * MS, 1000.0, 1000), 2 * MS);
    }

    #[test]
    fn busy_server_stretches_the_pause_with_the_square_of_the_load_up_to_the_max() {
        assert_eq!(busy_pause(2 * MS, 100 * MS, 1500.0, 1000), 4500 * US);
        assert_eq!(busy_pause(2 * MS, 100 * MS, 2000.0, 1000), 8 * MS);
        assert_eq!(busy_pause(2 * MS, 100 * MS, 5000.0, 1000), 50 * MS);
        assert_eq!(busy_pause(2 * MS, 100 * MS, 10_000.0, 1000), 100 * MS);
        assert_eq!(busy_pause(2 * MS, 100 * MS, 1e9, 1000), 100 * MS);
        assert_eq!(busy_pause(2 * MS, 100 * MS, f64::MAX, 1), 100 * MS);
    }

    #[test]
    fn the_relays_own_transactions_are_not_counted_as_load() {
        let second = Duration::from_secs(1);
        assert_eq!(others_per_second(5_000, 400, second), 4_600.0);
        // only its own claims: no load at all, however many
        assert_eq!(others_per_second(400, 400, second), 0.0);
        // counters reset (pg_stat_reset, a restart): no load rather than a negative one
        assert_eq!(others_per_second(-1_000_000, 10, second), 0.0);
        assert_eq!(
            others_per_second(1_000, 0, Duration::from_millis(500)),
            2_000.0
        );
    }

    #[test]
    fn pacing_off_or_nonsense_inputs_keep_the_base_pause() {
        assert_eq!(busy_pause(2 * MS, 20 * MS, 1e9, 0), 2 * MS);
        assert_eq!(busy_pause(2 * MS, 20 * MS, f64::NAN, 1000), 2 * MS);
        assert_eq!(busy_pause(2 * MS, 20 * MS, f64::INFINITY, 1000), 2 * MS);
        // a max below the base never shortens the base
        assert_eq!(busy_pause(5 * MS, MS, 1e9, 1000), 5 * MS);
    }
}
