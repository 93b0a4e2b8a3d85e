//! The relay delivering to real HTTP receivers and real executables.

use std::time::Duration;

use crate::common::*;
use crate::receiver::{Answer, Receiver};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn delivers_jerasoft_envelope_byte_exact_with_headers_and_signature() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let hid = add_handler(
        &db.client,
        "crm",
        &["clients.*"],
        "http",
        &rx.url("/api"),
        &format!("secret = '{secret}', headers = '{{\"X-Api-Key\": \"k1\"}}'"),
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;

    db.client
        .execute(
            "INSERT INTO clients (id, name, balance) VALUES (12, 'Customer A', 5)",
            &[],
        )
        .await
        .unwrap();
    db.client
        .execute("UPDATE clients SET name = 'Customer B' WHERE id = 12", &[])
        .await
        .unwrap();
    let got = rx.wait_for("/api", 2, WAIT).await;

    let row = db.client.query_one(
        "SELECT id, to_char(changed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') FROM provisioning.events WHERE name = 'clients.update'", &[]).await.unwrap();
    let (event_id, dt): (i64, String) = (row.get(0), row.get(1));
    let update = &got[1];
    assert_eq!(
        update.body,
        format!(
            r#"{{"event":{{"dt":"{dt}+00:00","events_id":"clients.update","object_id":12}},"data":{{"id":12,"name":"Customer B"}}}}"#
        )
    );
    assert_eq!(update.header("content-type"), Some("application/json"));
    assert!(update
        .header("user-agent")
        .unwrap()
        .starts_with("provisioning-relay/"));
    assert_eq!(
        update.header("webhook-id"),
        Some(format!("evt_{event_id}_h{hid}").as_str())
    );
    assert_eq!(
        update.header("x-provisioning-event"),
        Some("clients.update")
    );
    assert_eq!(update.header("x-provisioning-attempt"), Some("1"));
    assert_eq!(update.header("x-api-key"), Some("k1"));
    let wh = standardwebhooks::Webhook::new(secret).unwrap();
    let mut headers = http_headers(update);
    wh.verify(update.body.as_bytes(), &headers)
        .expect("signature verifies with the standardwebhooks crate");
    // A tampered body must not verify (the check above can fail).
    headers.insert("webhook-id", "evt_other".parse().unwrap());
    assert!(wh.verify(update.body.as_bytes(), &headers).is_err());

    // The create carries the full row.
    assert_eq!(got[0].json()["event"]["events_id"], "clients.create");
    assert_eq!(got[0].json()["data"]["name"], "Customer A");

    // Execution log: two successful attempts with request and response.
    eventually(WAIT, "attempt log", || async {
        (count(&db.client, "SELECT count(*) FROM provisioning.attempts WHERE outcome = 'success' AND http_status = 200 AND response = 'ok'").await == 2).then_some(())
    }).await;
    let logged: String = db
        .client
        .query_one(
            "SELECT request_body FROM provisioning.attempts WHERE event_id = $1",
            &[&event_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, update.body);
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.deliveries").await,
        0
    );
    relay.stop().await;
}

/// A handler rotating its secret holds the new and the old one, separated by a space: each
/// request carries one signature per secret, so a receiver verifies it with either key (the
/// standardwebhooks crate as the independent check), and with no other. Too many secrets, or one
/// too short among them, are refused.
#[tokio::test]
async fn a_handler_rotating_its_secret_signs_with_the_new_and_the_old_one() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    let (new, old) = (
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
    );
    let hid = add_handler(
        &db.client,
        "rotating",
        &["clients.create"],
        "http",
        &rx.url("/r"),
        &format!("secret = '{new} {old}'"),
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("INSERT INTO clients (name) VALUES ('x')", &[])
        .await
        .unwrap();
    let got = rx.wait_for("/r", 1, WAIT).await;
    relay.stop().await;
    let sigs = got[0].header("webhook-signature").unwrap();
    assert_eq!(sigs.split(' ').count(), 2, "{sigs}");
    let headers = http_headers(&got[0]);
    for key in [new, old] {
        standardwebhooks::Webhook::new(key)
            .unwrap()
            .verify(got[0].body.as_bytes(), &headers)
            .unwrap_or_else(|e| panic!("verifies with {key}: {e:?}"));
    }
    let stranger = standardwebhooks::Webhook::new("whsec_dGhpcyBpcyBub3QgdGhlIGtleQ==").unwrap();
    assert!(stranger.verify(got[0].body.as_bytes(), &headers).is_err());

    for (secret, says) in [
        (
            format!("{new} short"),
            "too short (at least 8 characters per secret",
        ),
        ([new; 6].join(" "), "at most 5 secrets"),
    ] {
        let err = db
            .client
            .execute(
                "UPDATE provisioning.handlers SET secret = $1 WHERE id = $2",
                &[&secret, &hid],
            )
            .await
            .expect_err(says);
        let msg = err.as_db_error().map(|e| e.message()).unwrap_or("");
        assert!(
            msg.contains("field \"secret\"") && msg.contains(says),
            "{msg}"
        );
        assert!(
            !msg.contains(new),
            "the secret is never in the message: {msg}"
        );
    }
}

fn http_headers(r: &crate::receiver::Received) -> axum::http::HeaderMap {
    r.headers.clone()
}

#[tokio::test]
async fn full_format_adds_event_id_entity_and_row_images() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    add_handler(
        &db.client,
        "full",
        &["clients.update"],
        "http",
        &rx.url("/full"),
        "format = 'full'",
    )
    .await;
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (3, 'A')", &[])
        .await
        .unwrap();
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("UPDATE clients SET name = 'B' WHERE id = 3", &[])
        .await
        .unwrap();
    let got = rx.wait_for("/full", 1, WAIT).await;
    let row = db.client.query_one(
        "SELECT id, to_char(changed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), old_row::text, new_row::text FROM provisioning.events WHERE name = 'clients.update'", &[]).await.unwrap();
    let (id, dt, old, new): (i64, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let compact = |s: &str| {
        serde_json::to_string(&serde_json::from_str::<serde_json::Value>(s).unwrap()).unwrap()
    };
    assert_eq!(
        got[0].body,
        format!(
            r#"{{"event":{{"dt":"{dt}+00:00","events_id":"clients.update","object_id":3,"id":{id},"entity":"clients","operation":"update"}},"data":{{"id":3,"name":"B"}},"old":{},"new":{}}}"#,
            compact(&old),
            compact(&new)
        )
    );
    relay.stop().await;
}

#[tokio::test]
async fn retries_500_then_succeeds_on_schedule() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.script([Answer::Status(500), Answer::Status(500)]);
    add_handler(
        &db.client,
        "flaky",
        &["clients.create"],
        "http",
        &rx.url("/f"),
        "retry_schedule_ms = '{300,600}'",
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("INSERT INTO clients (name) VALUES ('x')", &[])
        .await
        .unwrap();
    let got = rx.wait_for("/f", 3, WAIT).await;
    let gap1 = got[1].at - got[0].at;
    let gap2 = got[2].at - got[1].at;
    // 300 ms ±10 %, 600 ms ±10 % (plus scheduling slack, never less).
    assert!(
        gap1 >= Duration::from_millis(270),
        "first retry after {gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(540),
        "second retry after {gap2:?}"
    );
    assert_eq!(got[0].header("webhook-id"), got[2].header("webhook-id"));
    assert_eq!(
        got[0].body, got[2].body,
        "the body is identical on every attempt"
    );
    assert_eq!(got[2].header("x-provisioning-attempt"), Some("3"));
    eventually(WAIT, "log of 3 attempts", || async {
        let rows = db
            .client
            .query(
                "SELECT outcome, http_status, attempt FROM provisioning.attempts ORDER BY id",
                &[],
            )
            .await
            .unwrap();
        let v: Vec<(String, Option<i32>, i32)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        (v.len() == 3).then_some(v)
    })
    .await
    .iter()
    .zip([("fail", 500, 1), ("fail", 500, 2), ("success", 200, 3)])
    .for_each(|(got, want)| {
        assert_eq!(
            (got.0.as_str(), got.1, got.2),
            (want.0, Some(want.1), want.2)
        );
    });
    relay.stop().await;
}

/// A handler's rate limit spaces its attempts (a backlog of 25 at 10 a second takes 2.4 s from
/// the first to the last, instead of arriving at once) without slowing another handler of the
/// same events; a bad limit is refused with a message naming the field.
#[tokio::test]
async fn a_rate_limited_handler_gets_its_backlog_spaced_and_other_handlers_do_not_wait() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    add_handler(
        &db.client,
        "quota",
        &["clients.create"],
        "http",
        &rx.url("/quota"),
        "rate_limit_per_s = 10",
    )
    .await;
    add_handler(
        &db.client,
        "free",
        &["clients.create"],
        "http",
        &rx.url("/free"),
        "",
    )
    .await;
    let err = db
        .client
        .execute(
            "UPDATE provisioning.handlers SET rate_limit_per_s = -1 WHERE name = 'quota'",
            &[],
        )
        .await
        .expect_err("a negative rate limit is refused");
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("field \"rate_limit_per_s\": must be between 0 (no limit) and 100000"),
        "{err}"
    );
    create_clients(&db.client, 25).await;
    let relay = RunningRelay::start(&db, &[]).await;
    let free = rx.wait_for("/free", 25, WAIT).await;
    let quota_when_free_done = rx.received_on("/quota").len();
    let quota = rx.wait_for("/quota", 25, WAIT).await;
    relay.stop().await;
    assert!(
        quota_when_free_done < 25,
        "the unlimited handler finished first ({quota_when_free_done} of 25 rate-limited ones by then)"
    );
    let first = quota.iter().map(|r| r.at).min().unwrap();
    let last = quota.iter().map(|r| r.at).max().unwrap();
    // 24 gaps of 100 ms: starts are reserved 1/rate apart, so the span is at least 2.4 s less
    // however late the first one was sent (a generous 0.6 s)
    assert!(
        last - first >= Duration::from_millis(1800),
        "25 attempts at 10/s arrived within {:?}",
        last - first
    );
    let free_span =
        free.iter().map(|r| r.at).max().unwrap() - free.iter().map(|r| r.at).min().unwrap();
    assert!(
        free_span < last - first,
        "free {free_span:?}, quota {:?}",
        last - first
    );
    // every delivery once, per-object order is not at stake (25 objects)
    let mut objects: Vec<i64> = quota
        .iter()
        .map(|r| r.json()["event"]["object_id"].as_i64().unwrap())
        .collect();
    objects.sort_unstable();
    objects.dedup();
    assert_eq!(objects.len(), 25);
}
