//! Security: secrets never leak; the least-privilege role is enough and no more.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use crate::receiver::{Answer, Receiver};

const WAIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Signing secrets, admin tokens, database passwords and signatures never appear in logs (even at
/// debug level), metrics, the API, the CLI or the web page.
#[tokio::test]
async fn secrets_never_appear_in_logs_metrics_api_or_page() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.script([Answer::Status(500)]);
    let signing_secret = "whsec_U2lnbmluZ1NlY3JldE5ldmVyTG9nZ2VkMTIzNA==";
    let admin_token = "admin-token-NEVER-LOGGED-9f8e7d";
    let db_password = "DbPassw0rd-NEVER-LOGGED";
    // Trust authentication ignores the password, but the relay must still never print it.
    let url = db
        .url
        .replacen("postgres@", &format!("postgres:{db_password}@"), 1);
    assert!(url.contains(db_password));
    let port = free_port();
    let log_path = std::env::temp_dir().join(format!(
        "relay-security-{}.log",
        uuid::Uuid::new_v4().simple()
    ));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["run", "--database-url", &url])
        .args(["--set", &format!("admin_listen=127.0.0.1:{port}")])
        .args(["--set", "poll_interval_ms=200", "--set", "log_format=json"])
        .env("RELAY_ADMIN_TOKEN", admin_token)
        .env("RELAY_LOG", "debug")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    eventually(WAIT, "admin server up", || {
        let http = http.clone();
        let base = base.clone();
        async move {
            http.get(format!("{base}/readyz"))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        }
    })
    .await;
    // Create the handler through the API, with its secret, so the secret travels through the relay.
    let created = http
        .post(format!("{base}/api/handlers"))
        .bearer_auth(admin_token)
        .header("content-type", "application/json")
        .body(
            serde_json::json!({
                "name": "signed", "events": ["clients.*"], "kind": "http", "target": rx.url("/hook"),
                "secret": signing_secret, "retry_schedule_ms": [100]
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created_body = created.text().await.unwrap();
    db.client
        .execute("INSERT INTO clients (name) VALUES ('A')", &[])
        .await
        .unwrap();
    let got = rx.wait_for("/hook", 2, WAIT).await;
    let signatures: Vec<String> = got
        .iter()
        .map(|r| r.header("webhook-signature").unwrap().to_string())
        .collect();
    eventually(WAIT, "success logged", || async {
        (count(
            &db.client,
            "SELECT count(*) FROM provisioning.attempts WHERE outcome = 'success'",
        )
        .await
            == 1)
            .then_some(())
    })
    .await;

    let mut exposed = vec![("API create reply", created_body)];
    for path in [
        "/metrics",
        "/api/handlers",
        "/api/handlers/signed",
        "/api/logs",
        "/api/status",
        "/api/events",
        "/api/deliveries",
        "/",
    ] {
        let body = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        exposed.push((path, body));
    }
    let delivery: i64 = db
        .client
        .query_one("SELECT delivery_id FROM provisioning.attempts LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    exposed.push((
        "delivery",
        http.get(format!("{base}/api/deliveries/{delivery}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    ));
    for args in [
        vec!["handlers", "show", "signed", "--json"],
        vec!["handlers", "list"],
        vec!["logs", "--json"],
        vec!["status"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_relay"))
            .args(&args)
            .args(["--database-url", &url])
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        exposed.push((
            "cli",
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        ));
    }
    // A failing CLI call mentions the URL: redacted.
    let bad = url.replacen(&db.name, "no_such_db_for_security", 1);
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["status", "--database-url", &bad])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    exposed.push((
        "cli error",
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ));

    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(
        logs.contains("delivery attempt failed"),
        "the log was captured at debug level"
    );
    exposed.push(("relay log", logs));

    let key_b64 = signing_secret.trim_start_matches("whsec_");
    for (where_, text) in &exposed {
        for secret in [signing_secret, key_b64, admin_token, db_password] {
            assert!(
                !text.contains(secret),
                "{where_} exposes a secret ({secret})"
            );
        }
        for sig in &signatures {
            let value = sig.trim_start_matches("v1,");
            assert!(!text.contains(value), "{where_} exposes a signature");
        }
    }
}

/// The relay works with only the grants of sql/grants.sql, and a write outside them is refused.
#[tokio::test]
async fn least_privilege_role_is_enough_and_no_more() {
    let db = TestDb::vcs().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let group = format!("prov_relay_{}", &suffix[..12]);
    let login = format!("relay_login_{}", &suffix[..12]);
    let grants = format!("{}/../sql/grants.sql", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("psql")
        .args([
            &db.url,
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-v",
            &format!("relay_role={group}"),
            "-f",
            &grants,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grants.sql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    db.client
        .batch_execute(&format!("CREATE ROLE {login} LOGIN IN ROLE {group}"))
        .await
        .unwrap();
    let relay_url = db.url.replacen("postgres@", &format!("{login}@"), 1);

    let rx = Receiver::start().await;
    let relay_client = connect(&relay_url).await;
    // Handlers can be managed through the relay's role (CLI/API use it).
    let spec = relay::ops::handlers::HandlerSpec {
        name: Some("crm".into()),
        events: Some(vec!["clients.*".into()]),
        kind: Some("http".into()),
        target: Some(rx.url("/crm")),
        ..Default::default()
    };
    relay::ops::handlers::add(&relay_client, &spec)
        .await
        .unwrap();
    let relay = RunningRelay::start(&db, &[("database_url", relay_url.as_str())]).await;
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (1, 'A')", &[])
        .await
        .unwrap();
    db.client
        .execute("UPDATE clients SET name = 'B' WHERE id = 1", &[])
        .await
        .unwrap();
    rx.wait_for("/crm", 2, WAIT).await;
    eventually(
        WAIT,
        "completions recorded by the least-privilege role",
        || async {
            (count(
                &db.client,
                "SELECT count(*) FROM provisioning.attempts WHERE outcome = 'success'",
            )
            .await
                == 2
                && count(&db.client, "SELECT count(*) FROM provisioning.deliveries").await == 0)
                .then_some(())
        },
    )
    .await;
    relay.stop().await;
    relay::ops::queries::status(&relay_client).await.unwrap();
    relay::ops::queries::prune(&relay_client, Duration::ZERO, true)
        .await
        .unwrap();

    // Outside the grants: refused.
    for sql in [
        "CREATE TABLE provisioning.evil (a int)",
        "UPDATE clients SET name = 'hacked'",
        "DELETE FROM clients",
        "INSERT INTO provisioning.events (name, entity, object_id, operation, data, relation) VALUES ('x.y', 'x', '1', 'insert', '{}', 'x')",
        "UPDATE provisioning.events SET data = '{}'",
        "DROP TABLE provisioning.attempts",
        "TRUNCATE provisioning.deliveries",
        "ALTER TABLE provisioning.handlers ADD COLUMN x int",
        "CREATE SCHEMA evil",
    ] {
        let err = relay_client.batch_execute(sql).await.expect_err(sql);
        let msg = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
        assert!(msg.contains("permission denied") || msg.contains("must be owner"), "{sql}: {msg}");
    }
    drop(relay_client);
    db.client
        .batch_execute(&format!("DROP OWNED BY {login}, {group}"))
        .await
        .unwrap();
    let admin = connect(&base_url()).await;
    admin
        .batch_execute(&format!("DROP ROLE {login}; DROP ROLE {group}"))
        .await
        .ok();
}
