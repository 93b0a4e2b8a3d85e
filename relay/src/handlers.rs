//! The handler registry as a relay sees it: loaded from `provisioning.handlers`, cached, and
//! reloaded when the table changes (NOTIFY from its trigger) or at the latest every second.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_postgres::GenericClient;

use crate::delivery::envelope::Format;
use crate::retry::DEFAULT_SCHEDULE_MS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Enabled,
    Paused,
    Disabled,
    Archived,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Enabled => "enabled",
            Status::Paused => "paused",
            Status::Disabled => "disabled",
            Status::Archived => "archived",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Before,
    After,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Before => "before",
            Stage::After => "after",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `parsed` once when the handler is loaded, not for every request (URL parsing and IDNA
    /// mapping showed up in the relay's profile); `None` if it does not parse (reported per attempt).
    Http {
        url: String,
        parsed: Option<reqwest::Url>,
    },
    Script {
        program: String,
        args: Vec<String>,
    },
}

#[derive(Clone)]
pub struct Handler {
    pub id: i64,
    pub name: String,
    pub priority: i32,
    pub status: Status,
    pub events: Vec<String>,
    pub stage: Stage,
    pub kind: Kind,
    pub timeout: Duration,
    pub retry_schedule_ms: Vec<u64>,
    pub headers: Vec<(String, String)>,
    pub secret: Option<String>,
    pub max_in_flight: u32,
    pub format: Format,
    /// Attempts started per second by this process, at most (0: no limit).
    pub rate_limit_per_s: u32,
    /// HTTP statuses (http) or exit codes (script) after which a delivery is not retried.
    pub give_up_on: Vec<i32>,
}

// Secrets never reach logs: Debug redacts them.
impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handler")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("status", &self.status)
            .field("stage", &self.stage)
            .field("kind", &self.kind)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

pub const SELECT_HANDLERS: &str =
    "SELECT id, name, priority, status, events, stage, kind, target, args, timeout_ms, \
     retry_schedule_ms, headers, secret, max_in_flight, format, \
     coalesce((to_jsonb(h) ->> 'rate_limit_per_s')::int, 0) AS rate_limit_per_s, \
     ARRAY(SELECT c::int FROM jsonb_array_elements_text(to_jsonb(h) -> 'give_up_on') c) AS give_up_on \
     FROM provisioning.handlers h";
// (rate_limit_per_s and give_up_on are read through to_jsonb: on a schema installed before the
// columns existed, a new binary still loads its handlers, without limits and retrying every
// failure, which is all that schema can hold.)

impl Handler {
    pub fn from_row(row: &tokio_postgres::Row) -> Handler {
        let status = match row.get::<_, &str>("status") {
            "enabled" => Status::Enabled,
            "paused" => Status::Paused,
            "disabled" => Status::Disabled,
            _ => Status::Archived,
        };
        let stage = if row.get::<_, &str>("stage") == "before" {
            Stage::Before
        } else {
            Stage::After
        };
        let target: String = row.get("target");
        let kind = if row.get::<_, &str>("kind") == "script" {
            Kind::Script {
                program: target,
                args: row.get("args"),
            }
        } else {
            Kind::Http {
                parsed: reqwest::Url::parse(&target).ok(),
                url: target,
            }
        };
        let schedule: Option<Vec<i32>> = row.get("retry_schedule_ms");
        let headers: serde_json::Value = row.get("headers");
        let headers = headers
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Handler {
            id: row.get("id"),
            name: row.get("name"),
            priority: row.get("priority"),
            status,
            events: row.get("events"),
            stage,
            kind,
            timeout: Duration::from_millis(row.get::<_, i32>("timeout_ms").max(1) as u64),
            retry_schedule_ms: schedule
                .map(|s| s.into_iter().map(|d| d.max(0) as u64).collect())
                .unwrap_or_else(|| DEFAULT_SCHEDULE_MS.to_vec()),
            headers,
            secret: row.get("secret"),
            max_in_flight: row.get::<_, i32>("max_in_flight").max(1) as u32,
            rate_limit_per_s: row.get::<_, i32>("rate_limit_per_s").max(0) as u32,
            give_up_on: row.get("give_up_on"),
            format: Format::parse(row.get("format")).unwrap_or(Format::Jerasoft),
        }
    }
}

/// Load every handler.
pub async fn load(
    client: &impl GenericClient,
) -> Result<HashMap<i64, Arc<Handler>>, tokio_postgres::Error> {
    let rows = client.query(SELECT_HANDLERS, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let h = Handler::from_row(r);
            (h.id, Arc::new(h))
        })
        .collect())
}

/// A snapshot-swapping cache: readers clone an `Arc` and never wait for a reload.
#[derive(Default)]
pub struct Registry {
    current: RwLock<Arc<HashMap<i64, Arc<Handler>>>>,
}

impl Registry {
    pub fn snapshot(&self) -> Arc<HashMap<i64, Arc<Handler>>> {
        self.current.read().expect("registry lock").clone()
    }

    pub fn get(&self, id: i64) -> Option<Arc<Handler>> {
        self.snapshot().get(&id).cloned()
    }

    /// Replace the snapshot; returns true when anything changed.
    pub fn replace(&self, handlers: HashMap<i64, Arc<Handler>>) -> bool {
        let mut cur = self.current.write().expect("registry lock");
        let changed = cur.len() != handlers.len()
            || handlers
                .iter()
                .any(|(id, h)| cur.get(id).map(|c| !same(c, h)).unwrap_or(true));
        if changed {
            *cur = Arc::new(handlers);
        }
        changed
    }
}

fn same(a: &Handler, b: &Handler) -> bool {
    a.name == b.name
        && a.priority == b.priority
        && a.status == b.status
        && a.events == b.events
        && a.stage == b.stage
        && a.kind == b.kind
        && a.timeout == b.timeout
        && a.retry_schedule_ms == b.retry_schedule_ms
        && a.headers == b.headers
        && a.secret == b.secret
        && a.max_in_flight == b.max_in_flight
        && a.format == b.format
        && a.rate_limit_per_s == b.rate_limit_per_s
        && a.give_up_on == b.give_up_on
}
