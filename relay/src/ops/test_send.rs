//! `relay handlers test <name>` and `POST /api/handlers/{name}/test`: send one event to a handler
//! now, exactly as a delivery would send it (envelope, headers, signature, timeout), and say what
//! the relay would make of the reply. For an integrator wiring up a softswitch or a CRM, and for
//! an operator checking a handler before enabling or resuming it.
//!
//! Nothing is written: no delivery, no attempt in the execution log, no pause on `410 Gone`, no
//! before-stage decision applied. The handler may be in any status. The `webhook-id` is a fresh
//! `test_…` id, so a receiver that deduplicates by it never mistakes the test for the real
//! delivery of the same event (which carries `evt_<event>_h<handler>`).

use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use tokio_postgres::GenericClient;

use crate::decisions::{self, Decision};
use crate::delivery::envelope::{render, Event};
use crate::delivery::{Reply, Request};
use crate::handlers::{Handler, Kind, Stage, SELECT_HANDLERS};
use crate::retry::{given_up_on, next_step, NextStep};
use crate::worker::Transports;

use super::OpsError;

/// What a test send needs besides the database: the relay's transports (the same client, limits
/// and target policy as deliveries) and its bound on `Retry-After`.
#[derive(Clone)]
pub struct TestSender {
    pub transports: Transports,
    pub max_retry_after: Duration,
}

/// How far back the newest event matching the handler is looked for (a pattern matching nothing
/// recent must not walk the whole outbox).
const RECENT_EVENTS: i64 = 10_000;

const EVENT_COLUMNS: &str = "id, name, entity, object_id, operation, \
     coalesce(decided_data, data) AS data, old_row, new_row, changed_at";

/// Send one event to handler `name`: the stored event `event_id`, or else the newest stored event
/// the handler subscribes to, or else a sample of the first declared event it subscribes to
/// (object id 0, empty data, not stored). Returns what was sent, the reply and its meaning; `ok`
/// says whether a delivery would have succeeded.
pub async fn test_send(
    client: &impl GenericClient,
    sender: &TestSender,
    name: &str,
    event_id: Option<i64>,
) -> Result<Value, OpsError> {
    let row = client
        .query_opt(&format!("{SELECT_HANDLERS} WHERE name = $1"), &[&name])
        .await?
        .ok_or_else(|| OpsError::NotFound(format!("no handler named {name:?}")))?;
    let handler = Handler::from_row(&row);
    let (event, source) = pick_event(client, &handler, event_id).await?;
    let req = Request {
        webhook_id: format!("test_{}", uuid::Uuid::now_v7().simple()),
        event_name: event.name.clone(),
        handler_name: handler.name.clone(),
        attempt: 1,
        body: render(&event, None, handler.format),
        timeout: handler.timeout,
    };
    let mut reply = sender.transports.send(&handler, &req).await;

    // What a delivery would make of it: the same rules as the worker's, without their effects.
    let mut decision = Value::Null;
    if handler.stage == Stage::Before && reply.success {
        match decisions::parse(reply.response.as_deref().unwrap_or(""), &event.data) {
            Ok(d) => decision = decision_json(&d),
            Err(e) => {
                reply.success = false;
                reply.error = Some(e);
            }
        }
    }
    let meaning = meaning(&handler, &reply, sender.max_retry_after);
    Ok(json!({
        "ok": reply.success,
        "meaning": meaning,
        "handler": {
            "name": handler.name,
            "status": handler.status.as_str(),
            "stage": handler.stage.as_str(),
            "target": match &handler.kind {
                Kind::Http { url, .. } => url.clone(),
                Kind::Script { program, .. } => program.clone(),
            },
        },
        "event": {
            "source": source,
            "id": (event.id > 0).then_some(event.id),
            "name": event.name,
            "object_id": event.object_id,
        },
        "request": {
            "webhook_id": req.webhook_id,
            "body": req.body,
            "signed": handler.secret.is_some() && matches!(handler.kind, Kind::Http { .. }),
        },
        "reply": {
            "http_status": reply.http_status,
            "exit_code": reply.exit_code,
            "duration_ms": (reply.duration.as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
            "response": reply.response,
            "error": reply.error,
            "retry_after_ms": reply.retry_after.map(|d| d.as_millis() as u64),
        },
        "decision": decision,
    }))
}

/// The event to send and where it came from.
async fn pick_event(
    client: &impl GenericClient,
    handler: &Handler,
    event_id: Option<i64>,
) -> Result<(Event, String), OpsError> {
    if let Some(id) = event_id {
        let row = client
            .query_opt(
                &format!("SELECT {EVENT_COLUMNS} FROM provisioning.events WHERE id = $1"),
                &[&id],
            )
            .await?
            .ok_or_else(|| {
                OpsError::NotFound(format!(
                    "no stored event {id} (it may have been pruned); see `relay events list`"
                ))
            })?;
        return Ok((event_from_row(&row), format!("stored event {id}")));
    }
    let newest = client
        .query_opt(
            &format!(
                "SELECT {EVENT_COLUMNS}
                   FROM (SELECT * FROM provisioning.events ORDER BY id DESC LIMIT $2) e
                  WHERE EXISTS (SELECT 1 FROM unnest($1::text[]) p WHERE provisioning.event_matches(p, e.name))
                  ORDER BY id DESC LIMIT 1"
            ),
            &[&handler.events, &RECENT_EVENTS],
        )
        .await?;
    if let Some(row) = newest {
        let e = event_from_row(&row);
        let source = format!("the newest stored event it subscribes to ({})", e.id);
        return Ok((e, source));
    }
    let declared = client
        .query_opt(
            "SELECT ce.event, c.entity, ce.operation
               FROM provisioning.capture_events ce JOIN provisioning.captures c USING (relation)
              WHERE EXISTS (SELECT 1 FROM unnest($1::text[]) p WHERE provisioning.event_matches(p, ce.event))
              ORDER BY ce.relation, ce.operation, ce.position, ce.event LIMIT 1",
            &[&handler.events],
        )
        .await?
        .ok_or_else(|| {
            OpsError::NotFound(format!(
                "handler {:?} subscribes to {:?}, and no stored or declared event matches: \
                 declare the event (provisioning.declare_event) or pass a stored event's id",
                handler.name, handler.events
            ))
        })?;
    let e = Event {
        id: 0,
        name: declared.get(0),
        entity: declared.get(1),
        object_id: json!(0),
        operation: declared.get(2),
        data: json!({}),
        old_row: None,
        new_row: None,
        changed_at: Utc::now(),
    };
    Ok((
        e,
        "a sample (no stored event it subscribes to): object id 0, empty data".to_string(),
    ))
}

fn event_from_row(row: &tokio_postgres::Row) -> Event {
    Event {
        id: row.get("id"),
        name: row.get("name"),
        entity: row.get("entity"),
        object_id: row.get("object_id"),
        operation: row.get("operation"),
        data: row.get("data"),
        old_row: row.get("old_row"),
        new_row: row.get("new_row"),
        changed_at: row.get("changed_at"),
    }
}

fn decision_json(d: &Decision) -> Value {
    match d {
        Decision::Allow => json!({"decision": "allow"}),
        Decision::Modify(data) => json!({"decision": "modify", "data": data}),
        Decision::Forbid(reason) => json!({"decision": "forbid", "reason": reason}),
    }
}

/// One sentence: what a real delivery would do after this reply.
fn meaning(handler: &Handler, reply: &Reply, max_retry_after: Duration) -> String {
    if reply.success {
        return if handler.stage == Stage::Before {
            "success: a delivery would be done and this decision applied to the source row".into()
        } else {
            "success: a delivery would be marked done".into()
        };
    }
    let why = reply.error.as_deref().unwrap_or("failed");
    if let Some(code) = given_up_on(&handler.give_up_on, reply.http_status, reply.exit_code) {
        return format!("{why}: a delivery would go dead at once ({code} is in the handler's give_up_on list, so it is not retried)");
    }
    if reply.gone {
        return format!("{why}: a delivery would pause the handler (410 Gone) until it is resumed");
    }
    // The middle of the jitter band: the figure an operator can expect.
    match next_step(
        &handler.retry_schedule_ms,
        1,
        0.5,
        reply.retry_after,
        max_retry_after,
    ) {
        NextStep::RetryAfter(d) => format!(
            "{why}: a delivery would be retried, attempt 2 in about {}",
            human(d)
        ),
        NextStep::Dead => format!("{why}: a delivery would go dead (its retry schedule is empty)"),
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{} ms", d.as_millis())
    } else if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}
