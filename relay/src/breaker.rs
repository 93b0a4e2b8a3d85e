//! The circuit breaker of a handler's receiver, one per handler in each relay process.
//!
//! A receiver that is down (refuses connections, times out, answers 502, 503, 504 or 429) fails every
//! delivery sent to it. Without a breaker the relay keeps sending: each object's head delivery
//! spends an attempt of its retry schedule, so an outage longer than the schedule makes the whole
//! backlog dead, and the receiver is hit by all of it as it comes back. With one: after
//! `failures` attempts in a row found the receiver unavailable, this relay starts none of the
//! handler's deliveries for a pause, then one, the probe. Any answer to the probe that is not
//! "unavailable" closes the breaker; another failure opens it again for twice the pause, up to
//! `max_pause`. Deliveries held meanwhile stay pending without spending attempts, and go in due
//! order once it closes. Other handlers are not affected.
//!
//! Pure state over explicit instants, so the transitions are unit-tested without a clock.

use std::time::{Duration, Instant};

/// Settings of every handler's breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerOptions {
    /// Attempts in a row that found the receiver unavailable before the breaker opens; 0: never.
    pub failures: u32,
    /// The first pause.
    pub pause: Duration,
    /// The longest pause, however many probes failed.
    pub max_pause: Duration,
}

impl Default for BreakerOptions {
    fn default() -> Self {
        BreakerOptions {
            failures: 10,
            pause: Duration::from_secs(5),
            max_pause: Duration::from_secs(300),
        }
    }
}

/// What one attempt says about the receiver.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Health {
    /// It answered: a success, or a refusal of this request (a 4xx, a 500, a script's exit code).
    Up,
    /// No answer (refused connection, timeout, killed script), or an answer that says the
    /// receiver is unavailable: 502 Bad Gateway, 503 Service Unavailable, 504 Gateway Timeout,
    /// 429 Too Many Requests. (A 500 is the receiver's application answering, often about one
    /// request; it is retried on schedule like any failure.)
    Down,
}

/// The receiver's health by one attempt's reply.
pub fn health(success: bool, http_status: Option<u16>, exit_code: Option<i32>) -> Health {
    match (success, http_status, exit_code) {
        (true, _, _) => Health::Up,
        (false, Some(502..=504 | 429), _) => Health::Down,
        (false, Some(_), _) | (false, None, Some(_)) => Health::Up,
        (false, None, None) => Health::Down,
    }
}

/// Whether an attempt may start now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    Go,
    /// Go, as the probe: its outcome decides whether the breaker closes.
    Probe,
    /// Hold the delivery; the breaker admits a probe at this instant.
    Hold(Instant),
}

/// A change worth a log line and a metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    /// Too many failures in a row: attempts held for this long.
    Opened(Duration),
    /// The probe failed: held again, for this long.
    Reopened(Duration),
    /// An attempt got through: deliveries go again.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
enum State {
    #[default]
    Closed,
    Open {
        until: Instant,
        pause: Duration,
    },
    /// The probe (this delivery) is running; if its outcome never comes (it was handed back
    /// unstarted), another probe goes at `expires`.
    Probing {
        delivery_id: i64,
        pause: Duration,
        expires: Instant,
    },
}

#[derive(Debug, Default)]
pub struct Breaker {
    failures_in_a_row: u32,
    state: State,
    /// When it last opened from closed (for operators: how long deliveries have been held).
    opened_at: Option<Instant>,
}

impl Breaker {
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether delivery `delivery_id` may start at `now`. A probe's outcome is expected within
    /// `probe_time` (its handler's timeout and some margin).
    pub fn admit(&mut self, delivery_id: i64, now: Instant, probe_time: Duration) -> Admission {
        match self.state {
            State::Closed => Admission::Go,
            State::Open { until, pause } if now >= until => {
                self.probe(delivery_id, pause, now + probe_time)
            }
            State::Probing { pause, expires, .. } if now >= expires => {
                self.probe(delivery_id, pause, now + probe_time)
            }
            State::Open { until, .. } => Admission::Hold(until),
            State::Probing { expires, .. } => Admission::Hold(expires),
        }
    }

    fn probe(&mut self, delivery_id: i64, pause: Duration, expires: Instant) -> Admission {
        self.state = State::Probing {
            delivery_id,
            pause,
            expires,
        };
        Admission::Probe
    }

    /// Record the outcome of an attempt of delivery `delivery_id` that ran.
    pub fn record(
        &mut self,
        delivery_id: i64,
        health: Health,
        now: Instant,
        options: &BreakerOptions,
    ) -> Option<Transition> {
        match (health, self.state) {
            (Health::Up, State::Closed) => {
                self.failures_in_a_row = 0;
                None
            }
            // The probe, or an attempt that was already running when the breaker opened.
            (Health::Up, _) => {
                *self = Breaker::default();
                Some(Transition::Closed)
            }
            (Health::Down, State::Closed) => {
                self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
                if options.failures == 0 || self.failures_in_a_row < options.failures {
                    return None;
                }
                let pause = options.pause.min(options.max_pause);
                self.state = State::Open {
                    until: now + pause,
                    pause,
                };
                self.opened_at = Some(now);
                Some(Transition::Opened(pause))
            }
            (
                Health::Down,
                State::Probing {
                    delivery_id: probe,
                    pause,
                    ..
                },
            ) if probe == delivery_id => {
                let pause = (pause * 2).min(options.max_pause);
                self.state = State::Open {
                    until: now + pause,
                    pause,
                };
                Some(Transition::Reopened(pause))
            }
            // Attempts that were running when it opened: they tell nothing new.
            (Health::Down, _) => None,
        }
    }

    /// Delivery `delivery_id` was admitted but handed back without an attempt: if it was the
    /// probe, the next delivery probes at once.
    pub fn not_attempted(&mut self, delivery_id: i64, now: Instant) {
        if let State::Probing {
            delivery_id: probe,
            pause,
            ..
        } = self.state
        {
            if probe == delivery_id {
                self.state = State::Open { until: now, pause };
            }
        }
    }

    /// How many of the handler's deliveries a claim may take at `now`: None for no limit, 0 while
    /// it holds them, 1 when a probe is due.
    pub fn claim_cap(&self, now: Instant) -> Option<usize> {
        match self.state {
            State::Closed => None,
            State::Open { until, .. } => Some(usize::from(now >= until)),
            State::Probing { expires, .. } => Some(usize::from(now >= expires)),
        }
    }

    /// Since when it has held deliveries, if it does.
    pub fn held_since(&self) -> Option<Instant> {
        self.opened_at.filter(|_| !self.is_closed())
    }

    /// When the breaker next admits a probe, if it holds deliveries now.
    pub fn next_probe_at(&self) -> Option<Instant> {
        match self.state {
            State::Closed => None,
            State::Open { until, .. } => Some(until),
            State::Probing { expires, .. } => Some(expires),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: BreakerOptions = BreakerOptions {
        failures: 3,
        pause: Duration::from_secs(5),
        max_pause: Duration::from_secs(12),
    };
    const PROBE: Duration = Duration::from_secs(60);

    #[test]
    fn health_counts_only_unavailability() {
        assert_eq!(health(true, Some(200), None), Health::Up);
        for s in [502, 503, 504, 429] {
            assert_eq!(health(false, Some(s), None), Health::Down, "{s}");
        }
        assert_eq!(health(false, Some(500), None), Health::Up);
        assert_eq!(health(false, Some(501), None), Health::Up);
        // the receiver answered: this request was refused, not the receiver unavailable
        assert_eq!(health(false, Some(400), None), Health::Up);
        assert_eq!(health(false, Some(404), None), Health::Up);
        // a before-stage reply that was no decision
        assert_eq!(health(false, Some(200), None), Health::Up);
        assert_eq!(health(false, None, Some(1)), Health::Up);
        // refused connection, timeout, a killed script
        assert_eq!(health(false, None, None), Health::Down);
    }

    #[test]
    fn opens_after_failures_in_a_row_probes_after_the_pause_and_closes_on_an_answer() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert_eq!(b.record(1, Health::Down, t0, &OPTS), None);
        assert_eq!(b.record(2, Health::Down, t0, &OPTS), None);
        // an answer in between starts the count again
        assert_eq!(b.record(3, Health::Up, t0, &OPTS), None);
        assert_eq!(b.record(4, Health::Down, t0, &OPTS), None);
        assert_eq!(b.record(5, Health::Down, t0, &OPTS), None);
        assert_eq!(
            b.record(6, Health::Down, t0, &OPTS),
            Some(Transition::Opened(Duration::from_secs(5)))
        );
        assert_eq!(b.claim_cap(t0), Some(0));
        assert_eq!(b.held_since(), Some(t0));
        let until = t0 + Duration::from_secs(5);
        assert_eq!(b.admit(7, t0, PROBE), Admission::Hold(until));
        assert_eq!(b.next_probe_at(), Some(until));
        // attempts still running when it opened change nothing
        assert_eq!(b.record(8, Health::Down, t0, &OPTS), None);
        assert_eq!(b.claim_cap(until), Some(1));
        assert_eq!(b.admit(9, until, PROBE), Admission::Probe);
        // one probe at a time
        assert_eq!(b.claim_cap(until), Some(0));
        assert_eq!(b.admit(10, until, PROBE), Admission::Hold(until + PROBE));
        assert_eq!(
            b.record(9, Health::Up, until, &OPTS),
            Some(Transition::Closed)
        );
        assert!(b.is_closed());
        assert_eq!(b.held_since(), None);
        assert_eq!(b.claim_cap(until), None);
        assert_eq!(b.admit(11, until, PROBE), Admission::Go);
        // closed again with the count reset
        assert_eq!(b.record(12, Health::Down, until, &OPTS), None);
    }

    #[test]
    fn a_failed_probe_doubles_the_pause_up_to_the_maximum() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for id in 0..3 {
            b.record(id, Health::Down, t0, &OPTS);
        }
        let mut now = t0 + Duration::from_secs(5);
        for (probe, want) in [(100, 10), (101, 12), (102, 12)] {
            assert_eq!(b.admit(probe, now, PROBE), Admission::Probe);
            // a non-probe attempt's failure does not count as the probe's
            assert_eq!(b.record(probe + 50, Health::Down, now, &OPTS), None);
            assert_eq!(
                b.record(probe, Health::Down, now, &OPTS),
                Some(Transition::Reopened(Duration::from_secs(want)))
            );
            assert_eq!(b.claim_cap(now), Some(0));
            now += Duration::from_secs(want);
        }
    }

    #[test]
    fn a_probe_handed_back_unstarted_or_lost_lets_another_probe() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for id in 0..3 {
            b.record(id, Health::Down, t0, &OPTS);
        }
        let at = t0 + Duration::from_secs(5);
        assert_eq!(b.admit(7, at, PROBE), Admission::Probe);
        b.not_attempted(8, at); // not the probe: nothing changes
        assert_eq!(b.admit(9, at, PROBE), Admission::Hold(at + PROBE));
        b.not_attempted(7, at);
        assert_eq!(b.admit(9, at, PROBE), Admission::Probe);
        // its outcome never came: another probe once its time is up
        assert_eq!(b.admit(10, at + PROBE, PROBE), Admission::Probe);
    }

    #[test]
    fn zero_failures_never_opens() {
        let off = BreakerOptions {
            failures: 0,
            ..OPTS
        };
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for id in 0..1000 {
            assert_eq!(b.record(id, Health::Down, t0, &off), None);
        }
        assert_eq!(b.admit(1000, t0, PROBE), Admission::Go);
    }
}
