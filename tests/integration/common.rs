//! Shared test fixtures: a throwaway database per test (created from `DATABASE_URL`, dropped on
//! drop), and waiting on conditions with deadlines instead of sleeping.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// The server the tests run against. Default: the local server, user postgres.
pub fn base_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// `url` with its database name replaced by `db`.
pub fn url_with_db(url: &str, db: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e} (is PostgreSQL running? set DATABASE_URL)"));
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
        relay::schema::migrate(&db.client).await.expect("install schema");
        db
    }

    /// A database with the schema and the VCS preset (tables + 15 events).
    pub async fn vcs() -> TestDb {
        let db = TestDb::installed().await;
        relay::schema::install_vcs_preset(&db.client).await.expect("install VCS preset");
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
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
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
