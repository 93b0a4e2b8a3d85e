//! Shared test fixtures: a throwaway database per test (created from `DATABASE_URL`, dropped on
//! drop), and waiting on conditions with deadlines instead of sleeping.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// The server the tests run against. Default: the local server, user postgres.
pub fn base_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// `url` with its database name replaced by `db`.
pub fn url_with_db(url: &str, db: &str) -> String {
    relay::db::url_with_db(url, db)
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("cannot connect to {url}: {e} (is PostgreSQL running? set DATABASE_URL)")
        });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database of its own for one test; dropped (WITH FORCE) when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: Client,
}

impl TestDb {
    /// An empty database (nothing installed).
    pub async fn empty() -> TestDb {
        let name = format!("relay_test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&base_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let url = url_with_db(&base_url(), &name);
        let client = connect(&url).await;
        TestDb { name, url, client }
    }

    /// A database with `sql/install.sql` applied.
    pub async fn installed() -> TestDb {
        let db = TestDb::empty().await;
        relay::schema::migrate(&db.client)
            .await
            .expect("install schema");
        db
    }

    /// A database with the schema and the VCS preset (tables + 15 events).
    pub async fn vcs() -> TestDb {
        let db = TestDb::installed().await;
        relay::schema::install_vcs_preset(&db.client)
            .await
            .expect("install VCS preset");
        db
    }

    pub async fn connect(&self) -> Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context guarantees; use a private runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok((client, conn)) = tokio_postgres::connect(&base_url(), NoTls).await {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Poll `check` until it returns Some, or panic after `deadline` naming `what`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A relay running in-process against a test database, stopped (gracefully) on drop or `stop()`.
pub struct RunningRelay {
    pub shutdown: tokio_util::sync::CancellationToken,
    pub task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningRelay {
    /// Start a relay with test-friendly settings (fast polls, short leases), plus `overrides`.
    pub async fn start(db: &TestDb, overrides: &[(&str, &str)]) -> RunningRelay {
        let mut sets: Vec<(String, String)> = vec![
            ("database_url".into(), db.url.clone()),
            ("poll_interval_ms".into(), "200".into()),
            ("lease_margin_ms".into(), "2000".into()),
            ("shutdown_grace_ms".into(), "2000".into()),
            ("admin_listen".into(), String::new()),
            (
                "relay_name".into(),
                format!("test-{}", uuid::Uuid::new_v4().simple()),
            ),
        ];
        sets.extend(
            overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let config = relay::config::Config::load(None, &[], &sets).expect("test config");
        let relay = relay::service::build(&config).await.expect("build relay");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        RunningRelay {
            shutdown,
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("relay task");
        }
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Register a handler with SQL; returns its id.
pub async fn add_handler(
    client: &Client,
    name: &str,
    events: &[&str],
    kind: &str,
    target: &str,
    extra: &str,
) -> i64 {
    let events: Vec<String> = events.iter().map(|s| s.to_string()).collect();
    let sql = "INSERT INTO provisioning.handlers (name, events, kind, target) VALUES ($1, $2, $3, $4) RETURNING id";
    let id: i64 = client
        .query_one(sql, &[&name, &events, &kind, &target])
        .await
        .expect("add handler")
        .get(0);
    if !extra.is_empty() {
        client
            .execute(
                &format!("UPDATE provisioning.handlers SET {extra} WHERE id = $1"),
                &[&id],
            )
            .await
            .expect("configure handler");
    }
    id
}

/// `n` new clients (names c1..cn), one `clients.create` event each, in one transaction.
pub async fn create_clients(client: &Client, n: i32) {
    client
        .execute(
            "INSERT INTO clients (name) SELECT 'c' || i FROM generate_series(1, $1) i",
            &[&n],
        )
        .await
        .expect("create clients");
}

/// Relay settings that trip a handler's circuit breaker after two unavailable answers and hold
/// its deliveries for a minute (longer than any wait of a test that uses them).
pub const BREAKER_TRIPS_FAST: &[(&str, &str)] =
    &[("circuit_failures", "2"), ("circuit_pause_ms", "60000")];

/// Count rows of a query returning one bigint.
pub async fn count(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// The first column of every row of a query.
pub async fn column<T: tokio_postgres::types::FromSqlOwned>(client: &Client, sql: &str) -> Vec<T> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Operations tests (cli.rs, admin_api.rs, browser.rs): an in-process admin server and a realistic
// delivery history produced by a real relay.
// ------------------------------------------------------------------------------------------------

/// The admin HTTP server (`relay::admin::serve`) on 127.0.0.1:0 in this process; stopped on drop.
pub struct AdminServer {
    /// `http://127.0.0.1:<port>`
    pub url: String,
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl AdminServer {
    /// Serve `db` with this token (empty: state-changing calls are refused) and read policy.
    pub async fn start(db: &TestDb, token: &str, open_reads: bool) -> AdminServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the admin server");
        let url = format!("http://{}", listener.local_addr().expect("admin address"));
        let state = relay::admin::AdminState {
            pool: relay::db::make_pool(&db.url, 4, "test").expect("admin pool"),
            token: token.into(),
            open_reads,
            metrics: relay::metrics::install(),
            sender: relay::ops::test_send::TestSender {
                transports: relay::worker::Transports {
                    http: relay::delivery::http::HttpTransport::new(
                        Duration::from_secs(5),
                        64 * 1024,
                        false,
                    )
                    .expect("http transport"),
                    script: relay::delivery::script::ScriptTransport::new(64 * 1024),
                },
                max_retry_after: Duration::from_secs(3600),
            },
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            relay::admin::serve(listener, state, stop)
                .await
                .expect("admin server");
        });
        AdminServer { url, shutdown }
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What [`deliver_scenario`] produced: two handlers on a VCS database after a real relay ran.
///
/// - `crm` (`clients.*`) → `ok` receiver (200): 4 successful attempts, no deliveries left.
/// - `billing` (`clients.create`, `clients.accounts.*`, no retries) → `fail` receiver (500
///   "billing exploded"): 3 failed attempts, 3 dead deliveries.
///
/// Changes made: client 1 "Customer A" and client 2 "Customer B" created, client 1 renamed
/// "Customer A2", account 10 (login "acc10") created for client 2.
pub struct Scenario {
    pub ok: crate::receiver::Receiver,
    pub fail: crate::receiver::Receiver,
    pub crm_id: i64,
    pub billing_id: i64,
}

impl Scenario {
    /// Event ids in capture order: create 1, create 2, update 1, accounts.create 10.
    pub async fn event_ids(&self, db: &TestDb) -> Vec<i64> {
        db.client
            .query("SELECT id FROM provisioning.events ORDER BY id", &[])
            .await
            .expect("event ids")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Ids of billing's dead deliveries, in event order.
    pub async fn dead_ids(&self, db: &TestDb) -> Vec<i64> {
        db.client
            .query(
                "SELECT id FROM provisioning.deliveries WHERE handler_id = $1 AND status = 'dead' ORDER BY event_id",
                &[&self.billing_id],
            )
            .await
            .expect("dead deliveries")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

/// Build the history described on [`Scenario`] with a relay running in-process, and stop it.
pub async fn deliver_scenario(db: &TestDb) -> Scenario {
    let ok = crate::receiver::Receiver::start().await;
    let fail = crate::receiver::Receiver::start().await;
    fail.set_default(crate::receiver::Answer::Body(
        500,
        "billing exploded".into(),
    ));
    let crm_id = add_handler(
        &db.client,
        "crm",
        &["clients.*"],
        "http",
        &ok.url("/crm"),
        "",
    )
    .await;
    let billing_id = add_handler(
        &db.client,
        "billing",
        &["clients.create", "clients.accounts.*"],
        "http",
        &fail.url("/billing"),
        "retry_schedule_ms = '{}', priority = 50",
    )
    .await;
    let relay = RunningRelay::start(db, &[]).await;
    for sql in [
        "INSERT INTO clients (id, name) VALUES (1, 'Customer A')",
        "INSERT INTO clients (id, name) VALUES (2, 'Customer B')",
        "UPDATE clients SET name = 'Customer A2' WHERE id = 1",
        "INSERT INTO accounts (id, client_id, login) VALUES (10, 2, 'acc10')",
    ] {
        db.client.execute(sql, &[]).await.expect(sql);
    }
    eventually(
        Duration::from_secs(60),
        "4 crm successes and 3 dead billing deliveries",
        || async {
            let ok = count(&db.client, "SELECT count(*) FROM provisioning.attempts WHERE handler_name = 'crm' AND outcome = 'success'").await;
            let failed = count(&db.client, "SELECT count(*) FROM provisioning.attempts WHERE handler_name = 'billing' AND outcome = 'fail'").await;
            let dead = count(&db.client, "SELECT count(*) FROM provisioning.deliveries WHERE status = 'dead'").await;
            let left = count(&db.client, "SELECT count(*) FROM provisioning.deliveries WHERE status <> 'dead'").await;
            (ok == 4 && failed == 3 && dead == 3 && left == 0).then_some(())
        },
    )
    .await;
    relay.stop().await;
    Scenario {
        ok,
        fail,
        crm_id,
        billing_id,
    }
}
