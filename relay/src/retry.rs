//! The persisted retry schedule: data (a list of delays) and a pure function of the attempt number.
//!
//! Attempt 1 runs as soon as the event is captured. After failed attempt `n`, the next one waits
//! `schedule[n - 1]` ± jitter; when the schedule is exhausted the delivery is dead.

use std::time::Duration;

/// Default delays before attempts 2..=8 (Svix-like): 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h —
/// about 27.5 hours from first to last attempt.
pub const DEFAULT_SCHEDULE_MS: [u64; 7] = [
    5_000,
    5 * 60_000,
    30 * 60_000,
    2 * 3_600_000,
    5 * 3_600_000,
    10 * 3_600_000,
    10 * 3_600_000,
];

/// Relative jitter applied to every delay (±10 %), so that a burst of failures does not retry in
/// lock-step.
pub const JITTER: f64 = 0.10;

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NextStep {
    RetryAfter(Duration),
    Dead,
}

/// The step after failed attempt number `attempts_made` (1-based), given the handler's schedule.
/// `unit_random` is a number in `[0, 1)`; the caller passes randomness so this stays pure.
/// `retry_after` (from a 429/503 reply) raises the delay, clamped to `max_retry_after`.
pub fn next_step(
    schedule_ms: &[u64],
    attempts_made: u32,
    unit_random: f64,
    retry_after: Option<Duration>,
    max_retry_after: Duration,
) -> NextStep {
    let idx = attempts_made.saturating_sub(1) as usize;
    let Some(&base_ms) = schedule_ms.get(idx) else {
        return NextStep::Dead;
    };
    let factor = 1.0 + JITTER * (2.0 * unit_random.clamp(0.0, 1.0) - 1.0);
    let mut delay = Duration::from_millis((base_ms as f64 * factor).round() as u64);
    if let Some(ra) = retry_after {
        delay = delay.max(ra.min(max_retry_after));
    }
    NextStep::RetryAfter(delay)
}

/// Whether a failed attempt is final by the handler's `give_up_on` list: the HTTP status (an http
/// handler's reply) or the exit code (a script's) when the list holds it, as the attempt log and
/// the error text name it ("HTTP 422", "exit code 3"). A failure with neither (a timeout, a refused
/// connection, a killed script) is never final by the list.
pub fn given_up_on(
    give_up_on: &[i32],
    http_status: Option<u16>,
    exit_code: Option<i32>,
) -> Option<String> {
    if let Some(s) = http_status.filter(|s| give_up_on.contains(&i32::from(*s))) {
        return Some(format!("HTTP {s}"));
    }
    exit_code
        .filter(|c| give_up_on.contains(c))
        .map(|c| format!("exit code {c}"))
}

/// Total number of attempts a schedule allows (the first plus one per delay).
pub fn max_attempts(schedule_ms: &[u64]) -> u32 {
    schedule_ms.len() as u32 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(3600);

    #[test]
    fn only_a_listed_status_or_exit_code_is_given_up_on() {
        let list = [400, 422];
        assert_eq!(
            given_up_on(&list, Some(422), None).as_deref(),
            Some("HTTP 422")
        );
        assert_eq!(given_up_on(&list, Some(500), None), None);
        assert_eq!(given_up_on(&list, Some(401), None), None);
        // a timeout or a refused connection has no status: retried
        assert_eq!(given_up_on(&list, None, None), None);
        assert_eq!(given_up_on(&[], Some(400), None), None);
        assert_eq!(
            given_up_on(&[3], None, Some(3)).as_deref(),
            Some("exit code 3")
        );
        assert_eq!(given_up_on(&[3], None, Some(1)), None);
    }

    #[test]
    fn default_schedule_spans_about_a_day() {
        let total: u64 = DEFAULT_SCHEDULE_MS.iter().sum();
        assert!(
            total > 20 * 3_600_000 && total < 36 * 3_600_000,
            "total {total} ms"
        );
        assert_eq!(max_attempts(&DEFAULT_SCHEDULE_MS), 8);
    }

    #[test]
    fn delays_follow_the_schedule_without_jitter_at_midpoint() {
        let s = [100, 2_000, 30_000];
        assert_eq!(
            next_step(&s, 1, 0.5, None, CAP),
            NextStep::RetryAfter(Duration::from_millis(100))
        );
        assert_eq!(
            next_step(&s, 2, 0.5, None, CAP),
            NextStep::RetryAfter(Duration::from_millis(2_000))
        );
        assert_eq!(
            next_step(&s, 3, 0.5, None, CAP),
            NextStep::RetryAfter(Duration::from_millis(30_000))
        );
        assert_eq!(next_step(&s, 4, 0.5, None, CAP), NextStep::Dead);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let s = [10_000];
        let lo = next_step(&s, 1, 0.0, None, CAP);
        let hi = next_step(&s, 1, 0.999_999, None, CAP);
        assert_eq!(lo, NextStep::RetryAfter(Duration::from_millis(9_000)));
        assert_eq!(hi, NextStep::RetryAfter(Duration::from_millis(11_000)));
    }

    #[test]
    fn empty_schedule_means_one_attempt() {
        assert_eq!(next_step(&[], 1, 0.5, None, CAP), NextStep::Dead);
        assert_eq!(max_attempts(&[]), 1);
    }

    #[test]
    fn retry_after_raises_the_delay_but_is_clamped() {
        let s = [1_000];
        assert_eq!(
            next_step(&s, 1, 0.5, Some(Duration::from_secs(7)), CAP),
            NextStep::RetryAfter(Duration::from_secs(7))
        );
        assert_eq!(
            next_step(&s, 1, 0.5, Some(Duration::from_secs(86_400)), CAP),
            NextStep::RetryAfter(CAP)
        );
        // A shorter Retry-After never shortens the schedule.
        assert_eq!(
            next_step(&[60_000], 1, 0.5, Some(Duration::from_secs(1)), CAP),
            NextStep::RetryAfter(Duration::from_secs(60))
        );
        // Retry-After does not resurrect an exhausted schedule.
        assert_eq!(
            next_step(&s, 2, 0.5, Some(Duration::from_secs(1)), CAP),
            NextStep::Dead
        );
    }
}
