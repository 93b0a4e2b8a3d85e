//! Bad input, generated: handler definitions and before-stage replies of any bytes never crash
//! anything, never lose work, and are refused (or handled) with a clear message.

use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::common::*;

/// Random handler definitions: each is either accepted and valid, or refused with the field named —
/// never any other error.
#[tokio::test]
async fn random_handler_definitions_are_accepted_valid_or_refused_naming_the_field() {
    let db = TestDb::vcs().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let names = ["ok-name", "", " ", "a b", "h", "x\ny"];
    let events = [
        "clients.*",
        "clients.update",
        "clients.nope",
        "*",
        "",
        "clients.**",
        "cl*ents.x",
        "clients.subscriptions.*",
    ];
    let kinds = ["http", "script", "ftp", "", "HTTP"];
    let targets = [
        "http://127.0.0.1:9/x",
        "https://example.com/hook?a=1",
        "ftp://x",
        "http://",
        "http:/x",
        "/usr/bin/true",
        "bin/true",
        "",
        "javascript:alert(1)",
        "http://a b/",
        "https://[::1]:99/",
    ];
    let statuses = ["enabled", "paused", "disabled", "archived", "on", ""];
    let stages = ["after", "before", "during"];
    let formats = ["jerasoft", "full", "xml"];
    // Mostly valid fields (index 0), sometimes anything: a mix of accepted and refused rows.
    fn pick<'a, T>(rng: &mut rand::rngs::StdRng, a: &'a [T]) -> &'a T {
        if rng.gen_bool(0.8) {
            &a[0]
        } else {
            &a[rng.gen_range(0..a.len())]
        }
    }
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..400 {
        let name = format!(
            "{}{}",
            *pick(&mut rng, &names),
            if rng.gen_bool(0.7) {
                i.to_string()
            } else {
                String::new()
            }
        );
        let ev: Vec<String> = (0..rng.gen_range(0..3))
            .map(|_| pick(&mut rng, &events).to_string())
            .collect();
        let kind = *pick(&mut rng, &kinds);
        let target = *pick(&mut rng, &targets);
        let status = *pick(&mut rng, &statuses);
        let stage = *pick(&mut rng, &stages);
        let format = *pick(&mut rng, &formats);
        let timeout: i32 = *pick(&mut rng, &[15000, -5, 1, 0, 99_999_999]);
        let inflight: i32 = *pick(&mut rng, &[16, 1, 0, 100_000]);
        let schedule: Vec<i32> = (0..rng.gen_range(0..4))
            .map(|_| *pick(&mut rng, &[100, 0, -1, 700_000_000]))
            .collect();
        let headers = *pick(
            &mut rng,
            &[
                r#"{}"#,
                r#"{"X-A": "1"}"#,
                r#"{"bad header": "1"}"#,
                r#"{"X-N": 5}"#,
                r#"[1]"#,
            ],
        );
        let headers: serde_json::Value = serde_json::from_str(headers).unwrap();
        let r = db
            .client
            .query_opt(
                "INSERT INTO provisioning.handlers (name, events, kind, target, status, stage, format, timeout_ms, max_in_flight, retry_schedule_ms, headers)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id",
                &[&name, &ev, &kind, &target, &status, &stage, &format, &timeout, &inflight, &schedule, &headers],
            )
            .await;
        match r {
            Ok(_) => {
                accepted += 1;
                assert!(kind == "http" || kind == "script");
                assert!(!ev.is_empty());
                if kind == "http" {
                    assert!(
                        target.starts_with("http://1") || target.starts_with("https://"),
                        "accepted bad URL {target}"
                    );
                } else {
                    assert!(
                        target.starts_with('/'),
                        "accepted relative script path {target}"
                    );
                }
                assert!(timeout > 0 && timeout <= 3_600_000 && inflight > 0 && inflight <= 10_000);
                assert!(schedule.iter().all(|d| *d >= 0 && *d <= 604_800_000));
            }
            Err(e) => {
                refused += 1;
                let msg = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string());
                assert!(
                    msg.contains("field \"") || msg.contains("duplicate key"),
                    "refusal without a field name: {msg}"
                );
            }
        }
    }
    assert!(
        accepted > 5 && refused > 100,
        "accepted {accepted}, refused {refused}"
    );
}

/// A before-stage script that prints arbitrary bytes: every attempt is logged, the decision is
/// never taken as "allow", the relay keeps running, and other objects keep flowing.
#[tokio::test]
async fn before_stage_replies_of_random_bytes_never_crash_or_allow() {
    let db = TestDb::vcs().await;
    let dir = std::env::temp_dir().join(format!("relay-bytes-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    // One script per client: prints a fixed random blob (deterministic per object).
    let script = dir.join("random_reply.sh");
    std::fs::write(&script, "#!/bin/sh\ncat > /dev/null\ncat \"$1\"\n").unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let blob = dir.join("blob");
    let bytes: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
    std::fs::write(&blob, &bytes).unwrap();
    let id = add_handler(
        &db.client,
        "noise",
        &["clients.create"],
        "script",
        script.to_str().unwrap(),
        "stage = 'before', retry_schedule_ms = '{50,50}'",
    )
    .await;
    let blob_path = blob.to_str().unwrap().to_string();
    db.client
        .execute(
            "UPDATE provisioning.handlers SET args = ARRAY[$2] WHERE id = $1",
            &[&id, &blob_path],
        )
        .await
        .unwrap();
    let rx = crate::receiver::Receiver::start().await;
    add_handler(
        &db.client,
        "after",
        &["clients.*"],
        "http",
        &rx.url("/after"),
        "",
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute(
            "INSERT INTO clients (id, name) SELECT g, 'c' || g FROM generate_series(1, 5) g",
            &[],
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "all five events dead", || async {
        (count(
            &db.client,
            "SELECT count(*) FROM provisioning.events WHERE decision = 'dead'",
        )
        .await
            == 5)
            .then_some(())
    })
    .await;
    assert_eq!(count(&db.client, "SELECT count(*) FROM provisioning.attempts WHERE handler_name = 'noise' AND outcome = 'fail'").await, 15);
    assert!(rx.received().is_empty(), "garbage was never taken as allow");
    // The relay still works: a later change to another object flows.
    db.client
        .execute("UPDATE clients SET name = 'z' WHERE id = 1", &[])
        .await
        .unwrap();
    rx.wait_for("/after", 1, Duration::from_secs(30)).await;
    relay.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Start-up checks the schema version after the database answers; if the server goes away in
/// between (a restart), that is retried, while a definite answer (no schema) stops the start-up.
#[tokio::test]
async fn a_connection_lost_while_checking_the_schema_is_retried_an_answer_is_not() {
    use relay::schema::{check_version, SchemaError};
    use relay::service::ServiceError;

    let db = TestDb::installed().await;
    let victim = db.connect().await;
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    db.client
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let lost = ServiceError::from(check_version(&victim).await.expect_err("terminated"));
    assert!(
        matches!(lost, ServiceError::Schema(SchemaError::Query(_))),
        "{lost:?}"
    );
    assert!(lost.is_connection_lost(), "{lost:?}");

    let empty = TestDb::empty().await;
    let answer = ServiceError::from(check_version(&empty.client).await.expect_err("no schema"));
    assert!(!answer.is_connection_lost(), "{answer:?}");
    let denied = ServiceError::from(SchemaError::Query(
        empty
            .client
            .batch_execute("SET ROLE pg_monitor; CREATE TABLE nope (a int)")
            .await
            .expect_err("permission denied"),
    ));
    assert!(!denied.is_connection_lost(), "{denied:?}");
}
