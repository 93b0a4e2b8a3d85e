//! Claiming and completing deliveries. Every statement here is one round trip, batched, and
//! commits at once; ownership of in-flight work lives in lease columns guarded by a claim token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde_json::Value;
use thiserror::Error;

use crate::decisions::Decision;
use crate::delivery::envelope::Event;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("no database connection available: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error: {0}")]
    Query(#[from] tokio_postgres::Error),
}

impl StoreError {
    /// The database refused this data (it would refuse it again): not a connection problem, a
    /// restart, or a transient conflict. Retrying the same write is pointless.
    pub fn is_refusal(&self) -> bool {
        match self {
            StoreError::Query(e) => e
                .as_db_error()
                .map(|d| {
                    let class = &d.code().code()[..2];
                    !matches!(class, "08" | "40" | "53" | "57" | "58")
                })
                .unwrap_or(false),
            StoreError::Pool(_) => false,
        }
    }
}

/// One claimed delivery with its event.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub delivery_id: i64,
    pub handler_id: i64,
    /// Attempt number of this attempt (1 for the first).
    pub attempt: u32,
    pub token: i64,
    /// When the claim's lease runs out, by this process's clock (measured from before the claim
    /// was sent, so never later than the database's): a delivery that waited in the relay for a
    /// slot is not started if its attempt could outlast it.
    pub leased_until: Instant,
    /// `before` or `after`: the stage the delivery was captured for.
    pub stage: String,
    /// Data as modified by before-stage handlers, if any.
    pub modified_data: Option<Value>,
    pub event: Event,
}

/// Per-handler claim request.
#[derive(Debug, Clone, Copy)]
pub struct Want {
    pub handler_id: i64,
    pub limit: i32,
    pub lease: Duration,
    /// Fetch the events' old and new row images (only the `full` format sends them; reading and
    /// parsing them for every delivery was wasted work for the default format).
    pub row_images: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Done,
    Retry,
    Dead,
    /// Give the claim back without counting the attempt (shutdown, handler gone or paused).
    Release,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Done => "done",
            Action::Retry => "retry",
            Action::Dead => "dead",
            Action::Release => "release",
        }
    }
}

/// The execution-log record of one attempt.
#[derive(Debug, Clone)]
pub struct AttemptLog {
    pub delivery_id: i64,
    pub event_id: i64,
    pub handler_id: i64,
    pub handler_name: String,
    pub event_name: String,
    pub object_id: String,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: f64,
    pub success: bool,
    pub http_status: Option<i32>,
    pub exit_code: Option<i32>,
    pub request_body: String,
    pub response: Option<String>,
    pub error: Option<String>,
}

/// The outcome of one claimed delivery, to be written back.
#[derive(Debug, Clone)]
pub struct Completion {
    pub delivery_id: i64,
    pub handler_id: i64,
    pub token: i64,
    pub action: Action,
    pub delay: Duration,
    pub error: Option<String>,
    /// None when no attempt was made (a release).
    pub log: Option<AttemptLog>,
    /// A before-stage delivery: its decision (with `Action::Done`), or `None` for other outcomes.
    pub decision: Option<Decision>,
    /// True for a before-stage delivery (dead ones mark their event).
    pub before_stage: bool,
    /// The data the handler was sent (before-stage: passed on when it allows).
    pub sent_data: Option<serde_json::Value>,
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    relay_name: String,
    /// Transactions this relay ran through the frequent statements (claims, completions, commit
    /// rate samples), so that pacing can tell the server's other work from its own.
    own_transactions: Arc<AtomicU64>,
}

impl Store {
    pub fn new(pool: Pool, relay_name: String) -> Store {
        Store {
            pool,
            relay_name,
            own_transactions: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn own_transactions(&self) -> u64 {
        self.own_transactions.load(Ordering::Relaxed)
    }

    fn count_transaction(&self) {
        self.own_transactions.fetch_add(1, Ordering::Relaxed);
    }

    /// Transactions committed or rolled back so far on the whole server (all databases), as the
    /// statistics system has them (backends publish their counts about once a second).
    pub async fn server_transactions(&self) -> Result<i64, StoreError> {
        let client = self.pool.get().await?;
        self.count_transaction();
        let row = client
            .query_one(
                "SELECT coalesce(sum(xact_commit + xact_rollback), 0)::bigint FROM pg_stat_database",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn relay_name(&self) -> &str {
        &self.relay_name
    }

    pub async fn claim(&self, wants: &[Want], token: i64) -> Result<Vec<Claimed>, StoreError> {
        if wants.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = wants.iter().map(|w| w.handler_id).collect();
        let limits: Vec<i32> = wants.iter().map(|w| w.limit).collect();
        let leases: Vec<i32> = wants
            .iter()
            .map(|w| w.lease.as_millis().min(i32::MAX as u128) as i32)
            .collect();
        let images: Vec<bool> = wants.iter().map(|w| w.row_images).collect();
        let sent_at = Instant::now();
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(include_str!("claim.sql")).await?;
        self.count_transaction();
        let rows = client
            .query(
                &stmt,
                &[&ids, &limits, &self.relay_name, &token, &leases, &images],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let handler_id: i64 = r.get("handler_id");
                Claimed {
                    delivery_id: r.get("id"),
                    handler_id,
                    attempt: r.get::<_, i32>("attempts").max(1) as u32,
                    token,
                    // every claimed row belongs to a want: the statement joins on them
                    leased_until: wants
                        .iter()
                        .find(|w| w.handler_id == handler_id)
                        .map_or(sent_at, |w| sent_at + w.lease),
                    stage: r.get("stage"),
                    modified_data: r.get("modified_data"),
                    event: Event {
                        id: r.get("event_id"),
                        name: r.get("name"),
                        entity: r.get("entity"),
                        object_id: r.get("object_id"),
                        operation: r.get("operation"),
                        data: r.get("data"),
                        old_row: r.get("old_row"),
                        new_row: r.get("new_row"),
                        changed_at: r.get("changed_at"),
                    },
                }
            })
            .collect())
    }

    /// Write a batch of outcomes and their attempt logs in one transaction. Returns how many
    /// deliveries were actually completed (the rest had lost their lease).
    pub async fn complete(&self, batch: &[Completion]) -> Result<usize, StoreError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let (decided, plain): (Vec<&Completion>, Vec<&Completion>) =
            batch.iter().partition(|c| c.decision.is_some());
        let ids: Vec<i64> = plain.iter().map(|c| c.delivery_id).collect();
        let tokens: Vec<i64> = plain.iter().map(|c| c.token).collect();
        let actions: Vec<&str> = plain.iter().map(|c| c.action.as_str()).collect();
        let delays: Vec<i64> = plain.iter().map(|c| c.delay.as_millis() as i64).collect();
        let errors: Vec<Option<&str>> = plain.iter().map(|c| c.error.as_deref()).collect();
        let logs: Vec<&AttemptLog> = batch.iter().filter_map(|c| c.log.as_ref()).collect();
        let c1: Vec<i64> = logs.iter().map(|l| l.delivery_id).collect();
        let c2: Vec<i64> = logs.iter().map(|l| l.event_id).collect();
        let c3: Vec<i64> = logs.iter().map(|l| l.handler_id).collect();
        let c4: Vec<&str> = logs.iter().map(|l| l.handler_name.as_str()).collect();
        let c5: Vec<&str> = logs.iter().map(|l| l.event_name.as_str()).collect();
        let c6: Vec<&str> = logs.iter().map(|l| l.object_id.as_str()).collect();
        let c7: Vec<i32> = logs.iter().map(|l| l.attempt).collect();
        let c8: Vec<DateTime<Utc>> = logs.iter().map(|l| l.started_at).collect();
        let c9: Vec<f64> = logs.iter().map(|l| l.duration_ms).collect();
        let c10: Vec<&str> = logs
            .iter()
            .map(|l| if l.success { "success" } else { "fail" })
            .collect();
        let c11: Vec<Option<i32>> = logs.iter().map(|l| l.http_status).collect();
        let c12: Vec<Option<i32>> = logs.iter().map(|l| l.exit_code).collect();
        let c13: Vec<&str> = logs.iter().map(|l| l.request_body.as_str()).collect();
        let c14: Vec<Option<&str>> = logs.iter().map(|l| l.response.as_deref()).collect();
        let c15: Vec<Option<&str>> = logs.iter().map(|l| l.error.as_deref()).collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 21] = [
            &ids,
            &tokens,
            &actions,
            &delays,
            &errors,
            &c1,
            &c2,
            &c3,
            &c4,
            &c5,
            &c6,
            &c7,
            &c8,
            &c9,
            &c10,
            &c11,
            &c12,
            &c13,
            &c14,
            &c15,
            &self.relay_name,
        ];
        // Durable before visible: once a `done` is visible, the object's next delivery may be
        // sent; an asynchronous commit lost in a crash would then resend this one after it.
        const DURABLE: &str = "SET LOCAL synchronous_commit = on";
        let mut client = self.pool.get().await?;
        let complete = client.prepare_cached(include_str!("complete.sql")).await?;
        self.count_transaction();

        let before_stage_work = !decided.is_empty()
            || plain
                .iter()
                .any(|c| c.before_stage && c.action == Action::Dead);
        if !before_stage_work {
            // The common case: one statement, its transaction pipelined around it (one round
            // trip). If the statement fails, COMMIT ends the aborted transaction as a rollback.
            let begin = format!("BEGIN; {DURABLE}");
            let (began, rows, commit) = tokio::join!(
                client.batch_execute(&begin),
                client.query(&complete, &params),
                client.batch_execute("COMMIT")
            );
            began?;
            let rows = rows?;
            commit?;
            return Ok(rows.len());
        }

        let tx = client.transaction().await?;
        tx.batch_execute(DURABLE).await?;
        let mut applied = tx.query(&complete, &params).await?.len();

        // Before-stage: dead ones flag their event; decided ones are resolved one by one (guarded
        // write-back or undo, next handler of the chain, after-stage release).
        for c in plain
            .iter()
            .filter(|c| c.before_stage && c.action == Action::Dead)
        {
            tx.execute("SELECT provisioning.before_dead($1)", &[&c.delivery_id])
                .await?;
        }
        for c in &decided {
            let decision = c.decision.as_ref().expect("partitioned on decision");
            let (data, reason): (Option<&serde_json::Value>, Option<&str>) = match decision {
                Decision::Allow => (None, None),
                Decision::Modify(d) => (Some(d), None),
                Decision::Forbid(r) => (None, Some(r.as_str())),
            };
            let data = match data {
                Some(d) => Some(d.clone()),
                None => c.sent_data.clone(),
            };
            let row = tx
                .query_one(
                    "SELECT provisioning.resolve_before($1, $2, $3, $4, $5)",
                    &[&c.delivery_id, &c.token, &decision.as_str(), &data, &reason],
                )
                .await?;
            let result: String = row.get(0);
            if result != "lost" && result != "next" {
                metrics::counter!("provisioning_decisions_total", "decision" => result.clone())
                    .increment(1);
            }
            match result.as_str() {
                "lost" => {}
                "conflict" | "failed" => {
                    applied += 1;
                    tracing::error!(
                        delivery = c.delivery_id, decision = decision.as_str(), result = %result,
                        "before-stage decision NOT applied: the source row changed since the event or the write failed; see provisioning.events.decision_reason"
                    );
                }
                _ => applied += 1,
            }
        }

        tx.commit().await?;
        Ok(applied)
    }

    /// Return expired leases to the queue (or to dead). Returns how many.
    pub async fn recover_expired_leases(&self) -> Result<u64, StoreError> {
        let client = self.pool.get().await?;
        let default_len = crate::retry::DEFAULT_SCHEDULE_MS.len() as i32;
        Ok(client
            .execute(
                include_str!("recover_leases.sql"),
                &[&default_len, &self.relay_name],
            )
            .await?)
    }

    /// Register this relay (or refresh its heartbeat).
    pub async fn heartbeat(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO provisioning.relays (name) VALUES ($1)
                 ON CONFLICT (name) DO UPDATE SET heartbeat_at = now()",
                &[&self.relay_name],
            )
            .await?;
        // Forget relays that stopped heartbeating long ago (killed, never unregistered).
        client
            .execute(
                "DELETE FROM provisioning.relays WHERE heartbeat_at < now() - interval '1 hour'",
                &[],
            )
            .await?;
        Ok(())
    }

    /// Declare this relay asleep (capture triggers then ring the doorbell) or awake.
    pub async fn set_sleeping(&self, sleeping: bool) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO provisioning.relays (name, sleeping) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET sleeping = $2, heartbeat_at = now()",
                &[&self.relay_name, &sleeping],
            )
            .await?;
        Ok(())
    }

    /// Publish this relay's open circuit breakers (`relay status` shows them): a JSON array of
    /// `{handler_id, since, next_probe_at}`.
    pub async fn record_circuits(&self, circuits: &serde_json::Value) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE provisioning.relays SET circuits = $2 WHERE name = $1",
                &[&self.relay_name, circuits],
            )
            .await?;
        Ok(())
    }

    pub async fn unregister(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "DELETE FROM provisioning.relays WHERE name = $1",
                &[&self.relay_name],
            )
            .await?;
        Ok(())
    }

    /// Queue hygiene: every delivery leaves dead tuples behind (claim update, delete). Autovacuum
    /// normally removes them (the tables are tuned for it); where it is off or lagging, the relay
    /// vacuums the outbox tables itself once dead tuples pile up — one relay at a time (advisory
    /// lock), and only if its role owns them. Returns the tables vacuumed, or an explanation of why
    /// it could not.
    pub async fn vacuum_if_bloated(&self) -> Result<Vec<String>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT c.relname::text, s.n_dead_tup, s.n_live_tup,
                        pg_has_role(current_user, c.relowner, 'USAGE') AS may_vacuum
                   FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
                  WHERE s.schemaname = 'provisioning' AND s.relname IN ('deliveries', 'events', 'attempts')
                    AND s.n_dead_tup > 20000 AND s.n_dead_tup > s.n_live_tup / 5",
                &[],
            )
            .await?;
        let mut done = Vec::new();
        for r in rows {
            let table: String = r.get(0);
            let dead: i64 = r.get(1);
            if !r.get::<_, bool>(3) {
                tracing::warn!(
                    table = %table, dead_tuples = dead,
                    "provisioning.{table} is bloating and this relay's role may not vacuum it: enable autovacuum (the tables are tuned for it) or vacuum it from the owner's account"
                );
                continue;
            }
            let locked: bool = client
                .query_one("SELECT pg_try_advisory_lock(7291850212)", &[])
                .await?
                .get(0);
            if !locked {
                break; // another relay is at it
            }
            let result = client
                .batch_execute(&format!("VACUUM (ANALYZE) provisioning.{table}"))
                .await;
            client
                .execute("SELECT pg_advisory_unlock(7291850212)", &[])
                .await?;
            result?;
            tracing::info!(table = %table, dead_tuples = dead, "vacuumed the outbox table (autovacuum is off or lagging)");
            done.push(table);
        }
        Ok(done)
    }

    /// A handler answered 410 Gone: pause it, saying why.
    pub async fn pause_handler(&self, handler_id: i64, reason: &str) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE provisioning.handlers SET status = 'paused', status_reason = $2
                  WHERE id = $1 AND status = 'enabled'",
                &[&handler_id, &reason],
            )
            .await?;
        Ok(())
    }
}
