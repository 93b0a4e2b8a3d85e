//! Read and act on events, deliveries and the execution log.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_postgres::GenericClient;

use super::{parse_duration, OpsError};

/// Largest page any list returns (the API and CLI cap user-given limits to this).
pub const MAX_PAGE: i64 = 1000;
pub const DEFAULT_PAGE: i64 = 50;

/// A point in time: RFC 3339 (`2026-11-27T08:00:00Z`), a date (`2026-11-27`), or an age (`2h` = two hours ago).
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, OpsError> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    if let Ok(age) = parse_duration(s) {
        return Ok(Utc::now() - chrono::Duration::from_std(age).unwrap_or_default());
    }
    Err(OpsError::BadRequest(format!(
        "bad time {s:?}: expected RFC 3339 (2026-11-27T08:00:00Z), a date (2026-11-27) or an age (30m, 2h, 7d)"
    )))
}

fn opt_time(s: &Option<String>) -> Result<Option<DateTime<Utc>>, OpsError> {
    s.as_deref()
        .filter(|s| !s.is_empty())
        .map(parse_time)
        .transpose()
}

fn page(limit: Option<i64>) -> i64 {
    limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE)
}

fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// Filters of the execution log (all optional; empty strings are ignored).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogFilter {
    pub handler: Option<String>,
    /// Event name or pattern (`clients.*`).
    pub event: Option<String>,
    /// `success` or `fail`.
    pub status: Option<String>,
    /// Substring of the error text (case-insensitive).
    pub error: Option<String>,
    pub object: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<i64>,
    /// Paging: only attempts with a smaller id (pass the last id of the previous page).
    pub before_id: Option<i64>,
}

/// The execution log, newest first.
pub async fn logs(client: &impl GenericClient, f: &LogFilter) -> Result<Value, OpsError> {
    if let Some(s) = nonempty(&f.status) {
        if s != "success" && s != "fail" {
            return Err(OpsError::BadRequest(format!(
                "bad status {s:?}: expected success or fail"
            )));
        }
    }
    let since = opt_time(&f.since)?;
    let until = opt_time(&f.until)?;
    let error = nonempty(&f.error).map(|e| format!("%{}%", like_escape(e)));
    let row = client
        .query_one(
            "SELECT coalesce(jsonb_agg(x ORDER BY x.id DESC), '[]') FROM (
               SELECT a.id, a.started_at AS date, a.outcome AS status, a.event_name AS event,
                      a.handler_name AS handler, a.object_id, a.delivery_id, a.event_id, a.attempt,
                      a.http_status, a.exit_code, round(a.duration_ms::numeric, 1) AS duration_ms,
                      left(coalesce(a.error, a.response, ''), 300) AS message, a.relay
                 FROM provisioning.attempts a
                WHERE ($1::text IS NULL OR a.handler_name = $1)
                  AND ($2::text IS NULL OR provisioning.event_matches($2, a.event_name))
                  AND ($3::text IS NULL OR a.outcome = $3)
                  AND ($4::text IS NULL OR a.error ILIKE $4)
                  AND ($5::text IS NULL OR a.object_id = $5)
                  AND ($6::timestamptz IS NULL OR a.started_at >= $6)
                  AND ($7::timestamptz IS NULL OR a.started_at < $7)
                  AND ($8::bigint IS NULL OR a.id < $8)
                ORDER BY a.id DESC
                LIMIT $9) x",
            &[
                &nonempty(&f.handler),
                &nonempty(&f.event),
                &nonempty(&f.status),
                &error,
                &nonempty(&f.object),
                &since,
                &until,
                &f.before_id,
                &page(f.limit),
            ],
        )
        .await?;
    Ok(row.get(0))
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventFilter {
    /// Event name or pattern.
    pub name: Option<String>,
    pub object: Option<String>,
    /// Before-stage outcome: allowed, modified, forbidden, conflict, dead, failed.
    pub decision: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<i64>,
    pub before_id: Option<i64>,
}

pub async fn events(client: &impl GenericClient, f: &EventFilter) -> Result<Value, OpsError> {
    let since = opt_time(&f.since)?;
    let until = opt_time(&f.until)?;
    let row = client
        .query_one(
            "SELECT coalesce(jsonb_agg(x ORDER BY x.id DESC), '[]') FROM (
               SELECT e.id, e.name, e.entity, e.object_id, e.operation, e.changed_at, e.data,
                      e.decision, e.decision_reason,
                      (SELECT count(*) FROM provisioning.deliveries d WHERE d.event_id = e.id
                          AND d.status IN ('waiting', 'pending', 'running')) AS unfinished
                 FROM provisioning.events e
                WHERE ($1::text IS NULL OR provisioning.event_matches($1, e.name))
                  AND ($2::text IS NULL OR e.object_id #>> '{}' = $2)
                  AND ($3::text IS NULL OR e.decision = $3)
                  AND ($4::timestamptz IS NULL OR e.changed_at >= $4)
                  AND ($5::timestamptz IS NULL OR e.changed_at < $5)
                  AND ($6::bigint IS NULL OR e.id < $6)
                ORDER BY e.id DESC
                LIMIT $7) x",
            &[
                &nonempty(&f.name),
                &nonempty(&f.object),
                &nonempty(&f.decision),
                &since,
                &until,
                &f.before_id,
                &page(f.limit),
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// One event with its old/new rows, its unfinished or dead deliveries, and its attempts.
pub async fn event(client: &impl GenericClient, id: i64) -> Result<Value, OpsError> {
    let row = client
        .query_opt(
            "SELECT to_jsonb(e) || jsonb_build_object(
                 'deliveries', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', d.id, 'handler', h.name, 'status', d.status,
                                    'attempts', d.attempts, 'next_attempt_at', d.next_attempt_at, 'last_error', d.last_error) ORDER BY d.id), '[]')
                                  FROM provisioning.deliveries d LEFT JOIN provisioning.handlers h ON h.id = d.handler_id
                                 WHERE d.event_id = e.id),
                 'attempts', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', a.id, 'date', a.started_at, 'handler', a.handler_name,
                                    'delivery_id', a.delivery_id, 'attempt', a.attempt, 'status', a.outcome, 'http_status', a.http_status,
                                    'exit_code', a.exit_code, 'duration_ms', a.duration_ms, 'error', a.error) ORDER BY a.id), '[]')
                                FROM provisioning.attempts a WHERE a.event_id = e.id))
               FROM provisioning.events e WHERE e.id = $1",
            &[&id],
        )
        .await?;
    row.map(|r| r.get(0))
        .ok_or_else(|| OpsError::NotFound(format!("no event {id}")))
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryFilter {
    pub handler: Option<String>,
    /// waiting, pending, running, dead, skipped
    pub status: Option<String>,
    pub object: Option<String>,
    pub limit: Option<i64>,
    pub before_id: Option<i64>,
}

/// Unfinished and dead deliveries (succeeded ones live on in the execution log).
pub async fn deliveries(
    client: &impl GenericClient,
    f: &DeliveryFilter,
) -> Result<Value, OpsError> {
    let row = client
        .query_one(
            "SELECT coalesce(jsonb_agg(x ORDER BY x.id DESC), '[]') FROM (
               SELECT d.id, d.event_id, e.name AS event, h.name AS handler, d.stage, d.entity, d.object_key AS object_id,
                      d.status, d.attempts, d.next_attempt_at, d.lease_owner, d.lease_expires_at, d.last_error, d.created_at
                 FROM provisioning.deliveries d
                 LEFT JOIN provisioning.handlers h ON h.id = d.handler_id
                 LEFT JOIN provisioning.events e ON e.id = d.event_id
                WHERE ($1::text IS NULL OR h.name = $1)
                  AND ($2::text IS NULL OR d.status = $2)
                  AND ($3::text IS NULL OR d.object_key = $3)
                  AND ($4::bigint IS NULL OR d.id < $4)
                ORDER BY d.id DESC
                LIMIT $5) x",
            &[&nonempty(&f.handler), &nonempty(&f.status), &nonempty(&f.object), &f.before_id, &page(f.limit)],
        )
        .await?;
    Ok(row.get(0))
}

/// One delivery: its state (or `succeeded` once done) and every attempt in full.
pub async fn delivery(client: &impl GenericClient, id: i64) -> Result<Value, OpsError> {
    let row = client
        .query_one(
            "SELECT (SELECT to_jsonb(d) - 'lease_token' || jsonb_build_object('handler', h.name, 'event', e.name)
                       FROM provisioning.deliveries d
                       LEFT JOIN provisioning.handlers h ON h.id = d.handler_id
                       LEFT JOIN provisioning.events e ON e.id = d.event_id
                      WHERE d.id = $1),
                    (SELECT jsonb_agg(to_jsonb(a) ORDER BY a.id) FROM provisioning.attempts a WHERE a.delivery_id = $1)",
            &[&id],
        )
        .await?;
    let live: Option<Value> = row.get(0);
    let attempts: Option<Value> = row.get(1);
    match (live, attempts) {
        (None, None) => Err(OpsError::NotFound(format!(
            "no delivery {id} (it may have been pruned)"
        ))),
        (Some(mut d), attempts) => {
            d["attempt_log"] = attempts.unwrap_or(json!([]));
            Ok(d)
        }
        (None, Some(attempts)) => {
            let last = attempts
                .as_array()
                .and_then(|a| a.last())
                .cloned()
                .unwrap_or(Value::Null);
            Ok(json!({
                "id": id,
                "status": if last["outcome"] == "success" { "succeeded" } else { "finished" },
                "event_id": last["event_id"], "event": last["event_name"], "handler": last["handler_name"],
                "object_id": last["object_id"], "attempts": last["attempt"],
                "attempt_log": attempts,
            }))
        }
    }
}

/// Retry one delivery now: a dead or waiting-for-retry one goes back to the queue with a fresh
/// schedule; a succeeded one is sent again (a new delivery of the same event to the same handler).
pub async fn retry(client: &impl GenericClient, id: i64) -> Result<Value, OpsError> {
    let row = client
        .query_opt(
            "SELECT status FROM provisioning.deliveries WHERE id = $1",
            &[&id],
        )
        .await?;
    if let Some(r) = row {
        let status: String = r.get(0);
        return match status.as_str() {
            "dead" | "pending" => {
                let n = client
                    .execute(
                        "UPDATE provisioning.deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(),
                                last_error = 'retry requested by an operator', updated_at = now()
                          WHERE id = $1 AND status IN ('dead', 'pending')",
                        &[&id],
                    )
                    .await?;
                if n == 0 {
                    // claimed (or finished) between the read and the update: say so, not "retried"
                    return Err(OpsError::BadRequest(format!(
                        "delivery {id} changed while retrying it (a relay may be delivering it now); look again"
                    )));
                }
                Ok(json!({"delivery_id": id, "retried": true, "was": status}))
            }
            "running" => Err(OpsError::BadRequest(format!("delivery {id} is being delivered right now; nothing to retry"))),
            other => Err(OpsError::BadRequest(format!(
                "delivery {id} is {other}: it waits for (or was skipped by) a before-stage decision; retry that delivery instead"
            ))),
        };
    }
    let last = client
        .query_opt(
            "SELECT a.event_id, a.handler_id FROM provisioning.attempts a WHERE a.delivery_id = $1 ORDER BY a.id DESC LIMIT 1",
            &[&id],
        )
        .await?
        .ok_or_else(|| OpsError::NotFound(format!("no delivery {id}")))?;
    let (event_id, handler_id): (i64, i64) = (last.get(0), last.get(1));
    let new_id = resend(client, event_id, handler_id).await?;
    Ok(json!({"delivery_id": id, "retried": true, "was": "succeeded", "new_delivery_id": new_id}))
}

async fn resend(
    client: &impl GenericClient,
    event_id: i64,
    handler_id: i64,
) -> Result<i64, OpsError> {
    let row = client
        .query_opt(
            "INSERT INTO provisioning.deliveries (event_id, handler_id, stage, priority, entity, object_key, status, data)
             SELECT e.id, h.id, 'after', h.priority, e.entity, coalesce(e.object_id #>> '{}', ''), 'pending', e.decided_data
               FROM provisioning.events e, provisioning.handlers h
              WHERE e.id = $1 AND h.id = $2 AND h.stage = 'after'
             RETURNING id",
            &[&event_id, &handler_id],
        )
        .await?;
    row.map(|r| r.get(0)).ok_or_else(|| {
        OpsError::BadRequest(
            "cannot resend: the event was pruned, the handler was removed, or it is a before-stage handler (decisions are never replayed)".into(),
        )
    })
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayRequest {
    pub handler: String,
    /// dead (requeue dead deliveries), success / fail (events with such an attempt), all (every
    /// event the handler subscribes to, also those captured before it existed). Default: dead.
    pub status: Option<String>,
    pub event: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub dry_run: bool,
}

/// Replay by handler, status and time range. Returns how many deliveries were (or would be) queued.
pub async fn replay(client: &impl GenericClient, r: &ReplayRequest) -> Result<Value, OpsError> {
    let h = client
        .query_opt(
            "SELECT id, stage FROM provisioning.handlers WHERE name = $1",
            &[&r.handler],
        )
        .await?
        .ok_or_else(|| OpsError::NotFound(format!("no handler named {:?}", r.handler)))?;
    let (handler_id, stage): (i64, String) = (h.get(0), h.get(1));
    let status = nonempty(&r.status).unwrap_or("dead").to_string();
    let since = opt_time(&r.since)?;
    let until = opt_time(&r.until)?;
    let event = nonempty(&r.event);
    let count: i64 = if status == "dead" {
        let sql = if r.dry_run {
            "SELECT count(*) FROM provisioning.deliveries d JOIN provisioning.events e ON e.id = d.event_id
              WHERE d.handler_id = $1 AND d.status = 'dead'
                AND ($2::timestamptz IS NULL OR e.changed_at >= $2) AND ($3::timestamptz IS NULL OR e.changed_at < $3)
                AND ($4::text IS NULL OR provisioning.event_matches($4, e.name))"
        } else {
            "WITH r AS (UPDATE provisioning.deliveries d SET status = 'pending', attempts = 0, next_attempt_at = now(),
                           last_error = 'replayed by an operator', updated_at = now()
                          FROM provisioning.events e
                         WHERE e.id = d.event_id AND d.handler_id = $1 AND d.status = 'dead'
                           AND ($2::timestamptz IS NULL OR e.changed_at >= $2) AND ($3::timestamptz IS NULL OR e.changed_at < $3)
                           AND ($4::text IS NULL OR provisioning.event_matches($4, e.name))
                        RETURNING 1)
             SELECT count(*) FROM r"
        };
        client
            .query_one(sql, &[&handler_id, &since, &until, &event])
            .await?
            .get(0)
    } else {
        if !matches!(status.as_str(), "success" | "fail" | "all") {
            return Err(OpsError::BadRequest(format!(
                "bad status {status:?}: expected dead, success, fail or all"
            )));
        }
        if stage == "before" {
            return Err(OpsError::BadRequest(
                "replay re-sends events to after-stage handlers only; before-stage decisions are never replayed (retry a dead before-stage delivery instead)".into(),
            ));
        }
        let select = "SELECT e.id, e.entity, coalesce(e.object_id #>> '{}', '') AS object_key, e.decided_data
                        FROM provisioning.events e, provisioning.handlers h
                       WHERE h.id = $1
                         AND EXISTS (SELECT 1 FROM unnest(h.events) p WHERE provisioning.event_matches(p, e.name))
                         AND ($2::timestamptz IS NULL OR e.changed_at >= $2) AND ($3::timestamptz IS NULL OR e.changed_at < $3)
                         AND ($4::text IS NULL OR provisioning.event_matches($4, e.name))
                         AND ($5 = 'all' OR EXISTS (SELECT 1 FROM provisioning.attempts a
                                                      WHERE a.event_id = e.id AND a.handler_id = h.id AND a.outcome = $5))
                         AND NOT EXISTS (SELECT 1 FROM provisioning.deliveries d WHERE d.event_id = e.id AND d.handler_id = h.id
                                           AND d.status IN ('waiting', 'pending', 'running', 'dead'))
                         -- after-stage handlers never see an event its before-stage forbade (or could not
                         -- decide: conflict, failed, dead), nor one whose decision is still open (SPEC 6)
                         AND (e.decision IS NULL OR e.decision IN ('allowed', 'modified'))
                         AND NOT EXISTS (SELECT 1 FROM provisioning.deliveries b WHERE b.event_id = e.id AND b.stage = 'before'
                                           AND b.status IN ('waiting', 'pending', 'running', 'dead'))";
        let sql = if r.dry_run {
            format!("SELECT count(*) FROM ({select}) s")
        } else {
            format!(
                "WITH r AS (INSERT INTO provisioning.deliveries (event_id, handler_id, stage, priority, entity, object_key, status, data)
                            SELECT s.id, $1, 'after', (SELECT priority FROM provisioning.handlers WHERE id = $1), s.entity, s.object_key, 'pending', s.decided_data
                              FROM ({select}) s ORDER BY s.id
                            RETURNING 1)
                 SELECT count(*) FROM r"
            )
        };
        client
            .query_one(&sql, &[&handler_id, &since, &until, &event, &status])
            .await?
            .get(0)
    };
    Ok(json!({"handler": r.handler, "status": status, "dry_run": r.dry_run, "deliveries": count}))
}

/// What keeps declared events from being captured, one row per problem (column `p`), each ending
/// with the command that mends it: declarations whose table is gone, and an operation whose
/// capture trigger was dropped by hand.
pub const CAPTURE_PROBLEMS: &str = "
                   -- declarations whose table is gone: they capture nothing
                   SELECT format('captured table %s no longer exists (dropped, or renamed while nothing followed it): its events %s capture nothing; '
                                 'if it was renamed, SELECT provisioning.follow_table_renames(); if it was dropped, SELECT provisioning.drop_event(event) '
                                 'FROM (SELECT DISTINCT event FROM provisioning.capture_events WHERE relation = %L) e', c.relation,
                                 (SELECT string_agg(DISTINCT e.event, ', ') FROM provisioning.capture_events e WHERE e.relation = c.relation),
                                 c.relation) AS p
                     FROM provisioning.captures c
                    WHERE to_regclass(c.relation) IS NULL
                      AND EXISTS (SELECT 1 FROM provisioning.capture_events e WHERE e.relation = c.relation)
                   UNION ALL
                   -- an operation with declared events but no capture trigger on the table (dropped by hand)
                   SELECT format('table %s has %s events declared but no %s capture trigger: they capture nothing; '
                                 'generate it again with SELECT provisioning.refresh(%L)', e.relation, e.operation, e.operation, e.relation)
                     FROM (SELECT DISTINCT relation, operation FROM provisioning.capture_events) e
                    WHERE to_regclass(e.relation) IS NOT NULL
                      AND NOT EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_proc f ON f.oid = t.tgfoid
                                       WHERE t.tgrelid = to_regclass(e.relation) AND t.tgenabled <> 'D'
                                         AND f.pronamespace = 'provisioning'::regnamespace
                                         AND t.tgname LIKE 'prov\\_capture\\_' || e.operation || '%')
";

/// Backlog and oldest pending age per handler, dead counts, live relays, what keeps declared
/// events from being captured (`capture_problems`: each says what to run), and whether the DDL
/// event trigger is on.
pub async fn status(client: &impl GenericClient) -> Result<Value, OpsError> {
    let row = client
        .query_one(
            &format!(
            "SELECT jsonb_build_object(
               'schema_version', (SELECT max(version) FROM provisioning.schema_version),
               'events_captured', (SELECT coalesce(max(id), 0) FROM provisioning.events),
               'handlers', (SELECT coalesce(jsonb_agg(x ORDER BY x.priority, x.name), '[]') FROM (
                   SELECT h.name, h.status, h.priority, h.status_reason,
                          count(d.id) FILTER (WHERE d.status IN ('waiting', 'pending', 'running')) AS backlog,
                          count(d.id) FILTER (WHERE d.status = 'running') AS in_flight,
                          count(d.id) FILTER (WHERE d.status = 'dead') AS dead,
                          round(extract(epoch FROM now() - min(d.created_at) FILTER (WHERE d.status IN ('waiting', 'pending', 'running')))::numeric, 3) AS oldest_pending_age_s,
                          -- live relays whose circuit breaker holds this handler's deliveries
                          (SELECT jsonb_agg(jsonb_build_object('relay', r.name, 'since', c -> 'since',
                                                               'next_probe_at', c -> 'next_probe_at') ORDER BY r.name)
                             FROM provisioning.relays r
                            CROSS JOIN LATERAL jsonb_array_elements(coalesce(to_jsonb(r) -> 'circuits', '[]')) c
                            WHERE r.heartbeat_at > now() - interval '30 seconds'
                              AND (c ->> 'handler_id')::bigint = h.id) AS circuit_open
                     FROM provisioning.handlers h
                     LEFT JOIN provisioning.deliveries d ON d.handler_id = h.id
                    WHERE h.status <> 'archived'
                    GROUP BY h.id) x),
               'backlog', (SELECT count(*) FROM provisioning.deliveries WHERE status IN ('waiting', 'pending', 'running')),
               'dead', (SELECT count(*) FROM provisioning.deliveries WHERE status = 'dead'),
               'oldest_pending_age_s', (SELECT round(extract(epoch FROM now() - min(created_at))::numeric, 3)
                                          FROM provisioning.deliveries WHERE status IN ('waiting', 'pending', 'running')),
               'relays', (SELECT coalesce(jsonb_agg(jsonb_build_object('name', name, 'sleeping', sleeping, 'started_at', started_at,
                                 'heartbeat_at', heartbeat_at, 'alive', heartbeat_at > now() - interval '30 seconds') ORDER BY name), '[]')
                            FROM provisioning.relays),
               'relays_alive', (SELECT count(*) FROM provisioning.relays WHERE heartbeat_at > now() - interval '30 seconds'),
               'capture_problems', (SELECT coalesce(jsonb_agg(p ORDER BY p), '[]') FROM ({CAPTURE_PROBLEMS}) problems(p)),
               -- without it ALTER TABLE is not followed and update capture fires on every UPDATE: a
               -- risk rather than a problem (an install without a superuser has no other choice)
               'ddl_event_trigger', EXISTS (SELECT 1 FROM pg_event_trigger
                                             WHERE evtname = 'provisioning_refresh_on_ddl' AND evtenabled <> 'D'))"),
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Delete finished work older than `older_than`: attempt logs, and events none of whose
/// deliveries is unfinished or dead; with `dead`, also dead deliveries. In small batches, so
/// writers are never stalled and autovacuum keeps up.
pub async fn prune(
    client: &impl GenericClient,
    older_than: std::time::Duration,
    dead: bool,
) -> Result<Value, OpsError> {
    let cutoff = Utc::now() - chrono::Duration::from_std(older_than).unwrap_or_default();
    let mut removed_dead = 0u64;
    if dead {
        loop {
            let n = client
                .execute(
                    "DELETE FROM provisioning.deliveries WHERE id IN (
                        SELECT id FROM provisioning.deliveries WHERE status IN ('dead', 'skipped') AND created_at < $1 ORDER BY id LIMIT 5000)",
                    &[&cutoff],
                )
                .await?;
            removed_dead += n;
            if n == 0 {
                break;
            }
        }
    }
    let mut attempts = 0u64;
    loop {
        let n = client
            .execute(
                "DELETE FROM provisioning.attempts WHERE id IN (
                    SELECT id FROM provisioning.attempts WHERE started_at < $1 ORDER BY id LIMIT 5000)",
                &[&cutoff],
            )
            .await?;
        attempts += n;
        if n == 0 {
            break;
        }
    }
    let mut events = 0u64;
    loop {
        let n = client
            .execute(
                "DELETE FROM provisioning.events WHERE id IN (
                    SELECT e.id FROM provisioning.events e
                     WHERE e.changed_at < $1
                       AND NOT EXISTS (SELECT 1 FROM provisioning.deliveries d WHERE d.event_id = e.id)
                     ORDER BY e.id LIMIT 5000)",
                &[&cutoff],
            )
            .await?;
        events += n;
        if n == 0 {
            break;
        }
    }
    Ok(
        json!({"cutoff": cutoff, "attempts_removed": attempts, "events_removed": events, "dead_removed": removed_dead}),
    )
}
