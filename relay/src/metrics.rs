//! Prometheus metrics. Names follow Prometheus conventions (`_total` counters, `_seconds` units).
//!
//! - `provisioning_events_captured_total`: events captured (highest event id, sampled)
//! - `provisioning_deliveries_total{handler,event,outcome}`: attempts by outcome (success | fail)
//! - `provisioning_deliveries_dead_total{handler,event}`: deliveries that exhausted their schedule
//! - `provisioning_decisions_total{decision}`: before-stage outcomes (allowed, modified, forbidden, conflict, failed)
//! - `provisioning_backlog{handler}`, `provisioning_oldest_pending_age_seconds{handler}`,
//!   `provisioning_dead{handler}`: queue state per handler (sampled)
//! - `provisioning_delivery_latency_seconds{handler}`: change → successful delivery
//! - `provisioning_attempt_duration_seconds{handler}`: one attempt's duration

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the process-wide recorder (once) and return the handle that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests embedding the relay): keep rendering ours.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "provisioning_events_captured_total",
        "Events captured by the triggers (highest event id)"
    );
    describe_counter!(
        "provisioning_deliveries_total",
        "Delivery attempts by handler, event and outcome"
    );
    describe_counter!(
        "provisioning_deliveries_dead_total",
        "Deliveries that exhausted their retry schedule"
    );
    describe_counter!(
        "provisioning_decisions_total",
        "Before-stage decisions by outcome"
    );
    describe_gauge!("provisioning_backlog", "Unfinished deliveries per handler");
    describe_gauge!(
        "provisioning_oldest_pending_age_seconds",
        Unit::Seconds,
        "Age of the oldest unfinished delivery per handler"
    );
    describe_gauge!("provisioning_dead", "Dead deliveries per handler");
    describe_gauge!(
        "provisioning_capture_problems",
        "Problems that keep declared events from being captured (relay status lists them)"
    );
    describe_gauge!(
        "provisioning_server_commits_per_second",
        "Transactions per second on the whole server besides this relay's (pacing)"
    );
    describe_gauge!(
        "provisioning_busy_poll_interval_seconds",
        Unit::Seconds,
        "Current pause between claims while work trickles in (longer on a busy server)"
    );
    describe_gauge!(
        "provisioning_circuit_open",
        "1 while this relay's circuit breaker holds the handler's deliveries (its receiver looks down)"
    );
    describe_counter!(
        "provisioning_circuit_opened_total",
        "Times this relay's circuit breaker opened for the handler"
    );
    describe_histogram!(
        "provisioning_delivery_latency_seconds",
        Unit::Seconds,
        "Time from the change to its successful delivery"
    );
    describe_histogram!(
        "provisioning_attempt_duration_seconds",
        Unit::Seconds,
        "Duration of one delivery attempt"
    );
}

/// Sample queue state from the database into gauges.
pub async fn sample(
    client: &impl tokio_postgres::GenericClient,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT h.name,
                    count(d.id) FILTER (WHERE d.status IN ('waiting', 'pending', 'running')),
                    count(d.id) FILTER (WHERE d.status = 'dead'),
                    coalesce(extract(epoch FROM now() - min(d.created_at) FILTER (WHERE d.status IN ('waiting', 'pending', 'running'))), 0)::float8
               FROM provisioning.handlers h LEFT JOIN provisioning.deliveries d ON d.handler_id = h.id
              WHERE h.status <> 'archived'
              GROUP BY h.name",
            &[],
        )
        .await?;
    for r in rows {
        let name: String = r.get(0);
        metrics::gauge!("provisioning_backlog", "handler" => name.clone())
            .set(r.get::<_, i64>(1) as f64);
        metrics::gauge!("provisioning_dead", "handler" => name.clone())
            .set(r.get::<_, i64>(2) as f64);
        metrics::gauge!("provisioning_oldest_pending_age_seconds", "handler" => name)
            .set(r.get::<_, f64>(3));
    }
    let max: i64 = client
        .query_one("SELECT coalesce(max(id), 0) FROM provisioning.events", &[])
        .await?
        .get(0);
    metrics::counter!("provisioning_events_captured_total").absolute(max as u64);
    let problems: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM ({}) problems(p)",
                crate::ops::queries::CAPTURE_PROBLEMS
            ),
            &[],
        )
        .await?
        .get(0);
    metrics::gauge!("provisioning_capture_problems").set(problems as f64);
    Ok(())
}
