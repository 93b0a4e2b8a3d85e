//! `relay demo`: see it work in a minute on a fresh machine.
//!
//! Uses `DATABASE_URL` (a throwaway database on that server) when given; otherwise starts a
//! throwaway PostgreSQL cluster from the local binaries in a temporary directory (as a non-root
//! user when started as root). Installs the schema and the VCS preset, registers an example handler
//! served by the demo itself (JeraSoft's echo handler), makes a few realistic changes and prints
//! each delivery as it arrives. Ctrl-C (or `--duration`) stops everything and removes what it
//! created.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::routing::any;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// A line for the user. Output they stopped reading (`relay demo | head`) is dropped: the demo
/// still runs to its end and removes the cluster and database it created.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// A PostgreSQL cluster in a temporary directory; stopped and deleted on drop.
pub struct TempCluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    run_as: Option<String>,
}

impl TempCluster {
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn start_options(&self) -> String {
        format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        )
    }

    /// Stop the server: `mode` is smart, fast or immediate (immediate = crash, recovery on start).
    pub fn stop(&self, mode: &str) -> anyhow::Result<()> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl stop -m {mode} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Start the (stopped) server again on the same port.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-o", &self.start_options(), "-l"])
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", "60", "start"])
            .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    /// Find initdb/pg_ctl, create and start a cluster on a free port.
    pub fn start() -> anyhow::Result<TempCluster> {
        let bin = find_postgres_bin().context(
            "no PostgreSQL server binaries (initdb, pg_ctl) found on PATH or in /usr/lib/postgresql/*/bin, \
             /usr/pgsql-*/bin: install PostgreSQL (Debian/Ubuntu: apt-get install postgresql; RHEL/Fedora: \
             dnf install postgresql-server), or set DATABASE_URL to a server where you may create a database",
        )?;
        let is_root = unsafe { libc::geteuid() } == 0;
        let run_as = if is_root {
            // PostgreSQL refuses to run as root.
            let user = ["postgres", "nobody"]
                .into_iter()
                .find(|u| Command::new("id").arg("-u").arg(u).output().map(|o| o.status.success()).unwrap_or(false))
                .context("running as root and no unprivileged user (postgres or nobody) to run PostgreSQL as")?;
            Some(user.to_string())
        } else {
            None
        };
        let dir = std::env::temp_dir().join(format!("relay-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut cluster = TempCluster {
            dir,
            port: 0,
            bin,
            run_as,
        };
        if let Some(user) = &cluster.run_as {
            let ok = Command::new("chown")
                .arg("-R")
                .arg(user)
                .arg(&cluster.dir)
                .status()?
                .success();
            if !ok {
                bail!("cannot hand {} to user {user}", cluster.dir.display());
            }
        }
        let data = cluster.dir.join("data");
        let out = cluster
            .command("initdb")
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .context("cannot run initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        cluster.port = free_port()?;
        if let Err(e) = cluster.start_again() {
            let log = std::fs::read_to_string(cluster.dir.join("postgres.log")).unwrap_or_default();
            bail!("{e}\n{log}");
        }
        Ok(cluster)
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        if data.join("postmaster.pid").exists() {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .args(["-m", "fast", "-w", "-t", "60", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_postgres_bin() -> Option<PathBuf> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has(&d) {
                return Some(d);
            }
        }
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    for pattern_dir in ["/usr/lib/postgresql", "/usr/local/pgsql"] {
        if let Ok(entries) = std::fs::read_dir(pattern_dir) {
            for e in entries.flatten() {
                candidates.push(e.path().join("bin"));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("pgsql") {
                candidates.push(e.path().join("bin"));
            }
        }
    }
    candidates.push(PathBuf::from("/usr/local/pgsql/bin"));
    // Newest version first (directory names are versions).
    candidates.sort_by_key(|p| {
        std::cmp::Reverse(
            p.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| {
                    v.to_string_lossy()
                        .trim_start_matches("pgsql-")
                        .parse::<f64>()
                        .ok()
                })
                .map(|v| (v * 100.0) as i64)
                .unwrap_or(0),
        )
    });
    candidates.into_iter().find(|d| has(d))
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// JeraSoft's echo handler, served by the demo: prints and echoes each delivery.
async fn start_echo(counter: Arc<AtomicUsize>) -> anyhow::Result<SocketAddr> {
    let app = Router::new().route(
        "/api",
        any(move |body: Bytes| {
            let counter = counter.clone();
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                say!("  delivery #{n} → {}", String::from_utf8_lossy(&body));
                body
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

const CHANGES: &[(&str, &str)] = &[
    ("a client is created", "INSERT INTO clients (id, name, balance, currency) VALUES (1001, 'Customer A', 10, 'USD')"),
    ("its balance drops below zero", "UPDATE clients SET balance = -5 WHERE id = 1001"),
    ("the balance recovers", "UPDATE clients SET balance = 25 WHERE id = 1001"),
    ("a package is assigned", "INSERT INTO client_packages (id, client_id, package_name) VALUES (501, 1001, 'Unlimited EU')"),
    ("the package is activated", "UPDATE client_packages SET status = 'active', paid_until = current_date + 30 WHERE id = 501"),
    ("the client is renamed", "UPDATE clients SET name = 'Customer A Ltd' WHERE id = 1001"),
];

/// Run the demo until Ctrl-C or `duration`.
pub async fn run(
    base: &Config,
    database_given: bool,
    duration: Option<Duration>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut cluster = None;
    let mut dropper: Option<(String, String)> = None;
    let url = if database_given {
        // A database of its own on the given server, dropped at the end.
        let name = format!("relay_demo_{}", std::process::id());
        let (admin, conn) = tokio_postgres::connect(&base.database_url, tokio_postgres::NoTls)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to {}",
                    crate::db::redact_url(&base.database_url)
                )
            })?;
        tokio::spawn(conn);
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| {
                format!("cannot create the demo database {name} (the demo needs CREATEDB)")
            })?;
        let url = crate::db::url_with_db(&base.database_url, &name);
        dropper = Some((base.database_url.clone(), name));
        say!(
            "Using a throwaway database on {}",
            crate::db::redact_url(&url)
        );
        url
    } else {
        say!("No DATABASE_URL: starting a throwaway PostgreSQL cluster…");
        let c = tokio::task::spawn_blocking(TempCluster::start).await??;
        say!(
            "PostgreSQL running in {} on port {}",
            c.dir.display(),
            c.port
        );
        let url = c.url();
        cluster = Some(c);
        url
    };

    let result = demo_body(base, &url, duration, shutdown).await;

    if let Some((admin_url, name)) = dropper {
        if let Ok((admin, conn)) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
    if let Some(c) = cluster {
        let dir = c.dir.clone();
        tokio::task::spawn_blocking(move || drop(c)).await?;
        say!("Stopped PostgreSQL and removed {}", dir.display());
    }
    result
}

async fn demo_body(
    base: &Config,
    url: &str,
    duration: Option<Duration>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    crate::schema::migrate(&client).await?;
    crate::schema::install_vcs_preset(&client).await?;
    say!("Installed the provisioning schema and the VCS preset (clients, accounts, client_packages).");

    let received = Arc::new(AtomicUsize::new(0));
    let echo = start_echo(received.clone()).await?;
    let target = format!("http://{echo}/api");
    client
        .execute(
            "INSERT INTO provisioning.handlers (name, events, kind, target, retry_schedule_ms)
             VALUES ('demo-echo', '{clients.*}', 'http', $1, '{500,1000,2000}')",
            &[&target],
        )
        .await?;
    say!("Registered handler demo-echo for clients.* → {target}");

    let mut config = base.clone();
    config.database_url = url.to_string();
    config.poll_interval_ms = 500;
    if config.admin_listen.is_empty() || std::net::TcpListener::bind(&config.admin_listen).is_err()
    {
        config.admin_listen = format!("127.0.0.1:{}", free_port()?);
    }
    let relay_stop = CancellationToken::new();
    let relay_config = config.clone();
    let relay_token = relay_stop.clone();
    let relay = tokio::spawn(async move { crate::service::run(&relay_config, relay_token).await });
    say!(
        "Relay running; admin page: http://{}/   (Ctrl-C to stop)\n",
        config.admin_listen
    );

    let deadline = duration.map(|d| tokio::time::Instant::now() + d);
    let until_stop = async {
        match deadline {
            Some(d) => {
                tokio::select! { _ = shutdown.cancelled() => {}, _ = tokio::time::sleep_until(d) => {} }
            }
            None => shutdown.cancelled().await,
        }
    };
    tokio::pin!(until_stop);
    for (what, sql) in CHANGES {
        tokio::select! {
            _ = &mut until_stop => break,
            _ = tokio::time::sleep(Duration::from_millis(800)) => {}
        }
        say!("change: {what}\n  SQL: {sql}");
        client.execute(*sql, &[]).await?;
    }
    (&mut until_stop).await;
    relay_stop.cancel();
    relay.await??;
    say!(
        "\nDemo stopped: {} deliveries received.",
        received.load(Ordering::SeqCst)
    );
    Ok(())
}
