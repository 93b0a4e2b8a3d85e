//! Handler management. Validation lives in the database (one set of rules for SQL, CLI and API);
//! its messages name the field.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;

use super::OpsError;

/// A handler definition, all fields optional (for updates); `add` needs name, events, kind, target.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerSpec {
    pub name: Option<String>,
    pub events: Option<Vec<String>>,
    pub kind: Option<String>,
    pub target: Option<String>,
    pub args: Option<Vec<String>>,
    pub stage: Option<String>,
    pub priority: Option<i32>,
    pub status: Option<String>,
    pub timeout_ms: Option<i32>,
    pub retry_schedule_ms: Option<Vec<i32>>,
    pub headers: Option<serde_json::Map<String, Value>>,
    pub secret: Option<String>,
    pub max_in_flight: Option<i32>,
    pub format: Option<String>,
    pub rate_limit_per_s: Option<i32>,
    pub give_up_on: Option<Vec<i32>>,
}

/// The public view of a handler: the secret is never shown, only whether one is set.
const HANDLER_JSON: &str = "jsonb_build_object(
    'id', h.id, 'name', h.name, 'priority', h.priority, 'status', h.status, 'status_reason', h.status_reason,
    'events', to_jsonb(h.events), 'stage', h.stage, 'kind', h.kind, 'target', h.target, 'args', to_jsonb(h.args),
    'timeout_ms', h.timeout_ms, 'retry_schedule_ms', to_jsonb(h.retry_schedule_ms), 'headers', h.headers,
    'secret_set', h.secret IS NOT NULL, 'max_in_flight', h.max_in_flight, 'format', h.format, 'rate_limit_per_s', h.rate_limit_per_s,
    'give_up_on', to_jsonb(h.give_up_on),
    'created_at', h.created_at, 'updated_at', h.updated_at,
    'backlog', (SELECT count(*) FROM provisioning.deliveries d WHERE d.handler_id = h.id AND d.status IN ('waiting', 'pending', 'running')),
    'dead', (SELECT count(*) FROM provisioning.deliveries d WHERE d.handler_id = h.id AND d.status = 'dead'),
    'failures_24h', (SELECT count(*) FROM provisioning.attempts a WHERE a.handler_id = h.id AND a.outcome = 'fail' AND a.started_at > now() - interval '24 hours'))";

pub async fn list(client: &impl GenericClient, include_archived: bool) -> Result<Value, OpsError> {
    let sql = format!(
        "SELECT coalesce(jsonb_agg({HANDLER_JSON} ORDER BY h.priority, h.name), '[]') FROM provisioning.handlers h
          WHERE $1 OR h.status <> 'archived'"
    );
    Ok(client.query_one(&sql, &[&include_archived]).await?.get(0))
}

pub async fn get(client: &impl GenericClient, name: &str) -> Result<Value, OpsError> {
    let sql = format!("SELECT {HANDLER_JSON} FROM provisioning.handlers h WHERE h.name = $1");
    client
        .query_opt(&sql, &[&name])
        .await?
        .map(|r| r.get(0))
        .ok_or_else(|| OpsError::NotFound(format!("no handler named {name:?}")))
}

fn columns(spec: &HandlerSpec) -> Vec<(&'static str, Box<dyn ToSql + Sync + Send>)> {
    let mut cols: Vec<(&'static str, Box<dyn ToSql + Sync + Send>)> = Vec::new();
    macro_rules! put {
        ($field:ident) => {
            if let Some(v) = &spec.$field {
                cols.push((stringify!($field), Box::new(v.clone())));
            }
        };
    }
    put!(name);
    put!(events);
    put!(kind);
    put!(target);
    put!(args);
    put!(stage);
    put!(priority);
    put!(status);
    put!(timeout_ms);
    put!(retry_schedule_ms);
    put!(secret);
    put!(max_in_flight);
    put!(format);
    put!(rate_limit_per_s);
    put!(give_up_on);
    if let Some(h) = &spec.headers {
        cols.push(("headers", Box::new(Value::Object(h.clone()))));
    }
    cols
}

pub async fn add(client: &impl GenericClient, spec: &HandlerSpec) -> Result<Value, OpsError> {
    for (field, missing) in [
        ("name", spec.name.is_none()),
        ("events", spec.events.is_none()),
        ("kind", spec.kind.is_none()),
        ("target", spec.target.is_none()),
    ] {
        if missing {
            // A bad definition like any other (422 from the API), not a malformed request.
            return Err(OpsError::Refused(format!(
                "invalid handler: field \"{field}\" is required"
            )));
        }
    }
    let cols = columns(spec);
    let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
    let params: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "INSERT INTO provisioning.handlers ({}) VALUES ({}) RETURNING name",
        names.join(", "),
        params.join(", ")
    );
    let values: Vec<&(dyn ToSql + Sync)> = cols
        .iter()
        .map(|(_, v)| v.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let name: String = client
        .query_one(&sql, &values)
        .await
        .map_err(|e| unique_name(e, spec))?
        .get(0);
    get(client, &name).await
}

fn unique_name(e: tokio_postgres::Error, spec: &HandlerSpec) -> OpsError {
    if e.as_db_error()
        .map(|d| d.code().code() == "23505")
        .unwrap_or(false)
    {
        return OpsError::Refused(format!(
            "invalid handler: field \"name\": a handler named {:?} already exists",
            spec.name.as_deref().unwrap_or("")
        ));
    }
    e.into()
}

pub async fn update(
    client: &impl GenericClient,
    name: &str,
    spec: &HandlerSpec,
) -> Result<Value, OpsError> {
    let cols = columns(spec);
    if cols.is_empty() {
        return Err(OpsError::BadRequest(
            "nothing to change: give at least one field".into(),
        ));
    }
    let sets: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, (n, _))| format!("{n} = ${}", i + 2))
        .collect();
    let mut extra = String::new();
    if spec.status.is_some() {
        extra = ", status_reason = NULL".into();
    }
    let sql = format!(
        "UPDATE provisioning.handlers SET {}{extra} WHERE name = $1 RETURNING name",
        sets.join(", ")
    );
    let mut values: Vec<&(dyn ToSql + Sync)> = vec![&name];
    values.extend(cols.iter().map(|(_, v)| v.as_ref() as &(dyn ToSql + Sync)));
    let row = client
        .query_opt(&sql, &values)
        .await
        .map_err(|e| unique_name(e, spec))?;
    let new_name: String = row
        .ok_or_else(|| OpsError::NotFound(format!("no handler named {name:?}")))?
        .get(0);
    get(client, &new_name).await
}

/// enable / disable / pause / resume / archive.
pub async fn set_status(
    client: &impl GenericClient,
    name: &str,
    verb: &str,
) -> Result<Value, OpsError> {
    let status = match verb {
        "enable" | "resume" => "enabled",
        "disable" => "disabled",
        "pause" => "paused",
        "archive" => "archived",
        other => {
            return Err(OpsError::BadRequest(format!(
                "unknown handler action {other:?}"
            )))
        }
    };
    update(
        client,
        name,
        &HandlerSpec {
            status: Some(status.into()),
            ..HandlerSpec::default()
        },
    )
    .await
}

/// Remove a handler with its queue (pending and dead deliveries). The execution log is kept.
pub async fn remove(client: &impl GenericClient, name: &str) -> Result<Value, OpsError> {
    let row = client
        .query_opt(
            "WITH h AS (DELETE FROM provisioning.handlers WHERE name = $1 RETURNING id),
                  d AS (DELETE FROM provisioning.deliveries WHERE handler_id IN (SELECT id FROM h) RETURNING 1)
             SELECT (SELECT id FROM h), (SELECT count(*) FROM d)",
            &[&name],
        )
        .await?;
    match row {
        Some(r) if r.get::<_, Option<i64>>(0).is_some() => Ok(serde_json::json!({
            "removed": name, "deliveries_removed": r.get::<_, i64>(1)
        })),
        _ => Err(OpsError::NotFound(format!("no handler named {name:?}"))),
    }
}
