//! Before-stage handlers: allow, modify, forbid — applied after commit as a guarded follow-up.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use crate::receiver::Receiver;

const WAIT: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> String {
    format!(
        "{}/../tests/fixtures/before/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A before-stage script handler running `decide.py <args>`.
async fn before_script(
    db: &TestDb,
    name: &str,
    events: &[&str],
    priority: i32,
    args: &[&str],
) -> i64 {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let id = add_handler(
        &db.client,
        name,
        events,
        "script",
        &fixture("decide.py"),
        "stage = 'before', timeout_ms = 10000, retry_schedule_ms = '{100}'",
    )
    .await;
    db.client
        .execute(
            "UPDATE provisioning.handlers SET args = $2, priority = $3 WHERE id = $1",
            &[&id, &args, &priority],
        )
        .await
        .unwrap();
    id
}

async fn decision(db: &TestDb, event: &str) -> (Option<String>, Option<String>) {
    let row = db
        .client
        .query_one("SELECT decision, decision_reason FROM provisioning.events WHERE name = $1 ORDER BY id DESC LIMIT 1", &[&event])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn wait_decided(db: &TestDb, event: &str) -> (String, Option<String>) {
    eventually(WAIT, &format!("decision on {event}"), || async {
        match decision(db, event).await {
            (Some(d), r) => Some((d, r)),
            _ => None,
        }
    })
    .await
}

async fn client_row(db: &TestDb, id: i64) -> Option<Value> {
    db.client
        .query_opt("SELECT jsonb_build_object('name', name, 'status', status, 'email', email) FROM clients WHERE id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

async fn event_count(db: &TestDb) -> i64 {
    count(&db.client, "SELECT count(*) FROM provisioning.events").await
}

#[tokio::test]
async fn jerasoft_prefix_script_modifies_the_new_client() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    let id = add_handler(
        &db.client,
        "prefix",
        &["clients.create"],
        "script",
        &fixture("jerasoft_prefix.py"),
        "stage = 'before'",
    )
    .await;
    assert!(id > 0);
    add_handler(
        &db.client,
        "crm",
        &["clients.create"],
        "http",
        &rx.url("/after"),
        "",
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute(
            "INSERT INTO clients (id, name) VALUES (1, 'Customer A')",
            &[],
        )
        .await
        .unwrap();

    let got = rx.wait_for("/after", 1, WAIT).await;
    assert_eq!(
        got[0].json()["data"]["name"],
        "Customer Atestprefix",
        "after-stage sees the modified data"
    );
    assert_eq!(
        client_row(&db, 1).await.unwrap()["name"],
        "Customer Atestprefix"
    );
    assert_eq!(wait_decided(&db, "clients.create").await.0, "modified");
    assert_eq!(
        event_count(&db).await,
        1,
        "the write-back emitted no new event"
    );
    let logged: i64 = count(&db.client, "SELECT count(*) FROM provisioning.attempts WHERE handler_name = 'prefix' AND outcome = 'success' AND response LIKE '%testprefix%'").await;
    assert_eq!(logged, 1);
    // Re-sending the delivery later carries the modified data too.
    let delivery: i64 = eventually(WAIT, "the after-stage attempt logged", || async {
        db.client
            .query_opt(
                "SELECT delivery_id FROM provisioning.attempts WHERE handler_name = 'crm'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, i64>(0))
    })
    .await;
    relay::ops::queries::retry(&db.client, delivery)
        .await
        .unwrap();
    let got = rx.wait_for("/after", 2, WAIT).await;
    assert_eq!(got[1].json()["data"]["name"], "Customer Atestprefix");
    assert_eq!(got[1].header("webhook-id"), got[0].header("webhook-id"));
    relay.stop().await;
}

#[tokio::test]
async fn echo_handler_allows_without_writing() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    add_handler(
        &db.client,
        "echo",
        &["clients.*"],
        "script",
        &fixture("echo.py"),
        "stage = 'before'",
    )
    .await;
    // An HTTP echo (the JeraSoft Flask handler's behaviour) as a second before-stage handler.
    add_handler(
        &db.client,
        "flask-echo",
        &["clients.*"],
        "http",
        &rx.url("/api"),
        "stage = 'before', priority = 200",
    )
    .await;
    rx.set_default(crate::receiver::Answer::Echo);
    let after = Receiver::start().await;
    add_handler(
        &db.client,
        "crm",
        &["clients.*"],
        "http",
        &after.url("/after"),
        "",
    )
    .await;
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (1, 'A')", &[])
        .await
        .unwrap();
    let before: String = db
        .client
        .query_one("SELECT to_jsonb(c)::text FROM clients c WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    let relay = RunningRelay::start(&db, &[]).await;
    let got = after.wait_for("/after", 1, WAIT).await;
    assert_eq!(got[0].json()["data"]["name"], "A");
    assert_eq!(wait_decided(&db, "clients.create").await.0, "allowed");
    let now: String = db
        .client
        .query_one("SELECT to_jsonb(c)::text FROM clients c WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, now, "allow writes nothing");
    assert_eq!(rx.received_on("/api").len(), 1);
    relay.stop().await;
}

/// allow / modify / forbid × insert / update / delete.
#[tokio::test]
async fn decisions_on_insert_update_delete() {
    struct Case {
        op: &'static str,
        args: &'static [&'static str],
        want_decision: &'static str,
        want_row: Option<Value>,
        after_called: bool,
    }
    let cases = [
        Case {
            op: "insert",
            args: &["allow"],
            want_decision: "allowed",
            want_row: Some(json!({"name": "New", "status": "active", "email": null})),
            after_called: true,
        },
        Case {
            op: "insert",
            args: &["set", "email", "\"x@example.com\""],
            want_decision: "modified",
            want_row: Some(json!({"name": "New", "status": "active", "email": "x@example.com"})),
            after_called: true,
        },
        Case {
            op: "insert",
            args: &["forbid", "no new clients"],
            want_decision: "forbidden",
            want_row: None,
            after_called: false,
        },
        Case {
            op: "update",
            args: &["allow"],
            want_decision: "allowed",
            want_row: Some(
                json!({"name": "Renamed", "status": "active", "email": "old@example.com"}),
            ),
            after_called: true,
        },
        Case {
            op: "update",
            args: &["set", "name", "\"Fixed\""],
            want_decision: "modified",
            want_row: Some(
                json!({"name": "Fixed", "status": "active", "email": "old@example.com"}),
            ),
            after_called: true,
        },
        Case {
            op: "update",
            args: &["forbid", "renames need approval"],
            want_decision: "forbidden",
            want_row: Some(json!({"name": "Old", "status": "active", "email": "old@example.com"})),
            after_called: false,
        },
        Case {
            op: "delete",
            args: &["allow"],
            want_decision: "allowed",
            want_row: None,
            after_called: true,
        },
        Case {
            op: "delete",
            args: &["forbid", "clients are never deleted"],
            want_decision: "forbidden",
            want_row: Some(json!({"name": "Old", "status": "active", "email": "old@example.com"})),
            after_called: false,
        },
    ];
    for case in cases {
        let db = TestDb::vcs().await;
        let rx = Receiver::start().await;
        let event = format!(
            "clients.{}",
            match case.op {
                "insert" => "create",
                o => o,
            }
        );
        if case.op != "insert" {
            db.client
                .execute(
                    "INSERT INTO clients (id, name, email) VALUES (5, 'Old', 'old@example.com')",
                    &[],
                )
                .await
                .unwrap();
        }
        before_script(&db, "gate", &[&event], 1, case.args).await;
        add_handler(&db.client, "crm", &[&event], "http", &rx.url("/after"), "").await;
        let relay = RunningRelay::start(&db, &[]).await;
        match case.op {
            "insert" => db
                .client
                .execute("INSERT INTO clients (id, name) VALUES (5, 'New')", &[])
                .await
                .unwrap(),
            "update" => db
                .client
                .execute("UPDATE clients SET name = 'Renamed' WHERE id = 5", &[])
                .await
                .unwrap(),
            _ => db
                .client
                .execute("DELETE FROM clients WHERE id = 5", &[])
                .await
                .unwrap(),
        };
        let (d, reason) = wait_decided(&db, &event).await;
        assert_eq!(
            d, case.want_decision,
            "{} {:?}: reason {reason:?}",
            case.op, case.args
        );
        if case.want_decision == "forbidden" {
            assert_eq!(
                reason.as_deref(),
                Some(case.args[1]),
                "the reason is recorded"
            );
        }
        assert_eq!(
            client_row(&db, 5).await,
            case.want_row,
            "{} {:?}",
            case.op,
            case.args
        );
        let events_now = event_count(&db).await;
        if case.after_called {
            let got = rx.wait_for("/after", 1, WAIT).await;
            if case.want_decision == "modified" {
                let field = case.args[1];
                let want: Value = serde_json::from_str(case.args[2]).unwrap();
                assert_eq!(
                    got[0].json()["data"][field],
                    want,
                    "after-stage sees the modification"
                );
            }
        } else {
            // The after-stage delivery is skipped, never called.
            eventually(WAIT, "after-stage skipped", || async {
                (count(
                    &db.client,
                    "SELECT count(*) FROM provisioning.deliveries WHERE status = 'skipped'",
                )
                .await
                    == 1)
                    .then_some(())
            })
            .await;
            assert!(rx.received().is_empty());
        }
        // Write-backs and undos emit nothing.
        assert_eq!(
            events_now,
            if case.op == "insert" { 1 } else { 2 },
            "{} {:?}",
            case.op,
            case.args
        );
        let gate_attempts = count(&db.client, "SELECT count(*) FROM provisioning.attempts WHERE handler_name = 'gate' AND outcome = 'success'").await;
        assert_eq!(gate_attempts, 1);
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_row_changed_before_the_decision_is_not_overwritten() {
    let db = TestDb::vcs().await;
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (9, 'Old')", &[])
        .await
        .unwrap();
    let h = before_script(&db, "gate", &["clients.update"], 1, &["forbid", "no"]).await;
    db.client
        .execute(
            "UPDATE provisioning.handlers SET status = 'paused' WHERE id = $1",
            &[&h],
        )
        .await
        .unwrap();
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("UPDATE clients SET name = 'First' WHERE id = 9", &[])
        .await
        .unwrap();
    // Someone changes the row again before the decision arrives (silently, to keep it simple).
    db.client
        .batch_execute("BEGIN; SET LOCAL provisioning.suppress = 'on'; UPDATE clients SET name = 'Second' WHERE id = 9; COMMIT;")
        .await
        .unwrap();
    db.client
        .execute(
            "UPDATE provisioning.handlers SET status = 'enabled' WHERE id = $1",
            &[&h],
        )
        .await
        .unwrap();
    let (d, reason) = wait_decided(&db, "clients.update").await;
    assert_eq!(d, "conflict");
    assert!(reason.unwrap().contains("changed after the event"));
    assert_eq!(
        client_row(&db, 9).await.unwrap()["name"],
        "Second",
        "nothing overwritten"
    );
    relay.stop().await;
}

#[tokio::test]
async fn chain_passes_modifications_and_stops_at_forbid() {
    // Modify then see: handler 2 receives handler 1's modification.
    let db = TestDb::vcs().await;
    before_script(
        &db,
        "first",
        &["clients.create"],
        1,
        &["set", "name", "\"By First\""],
    )
    .await;
    before_script(&db, "second", &["clients.create"], 2, &["allow"]).await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (1, 'A')", &[])
        .await
        .unwrap();
    assert_eq!(wait_decided(&db, "clients.create").await.0, "modified");
    let sent: String = db
        .client
        .query_one(
            "SELECT request_body FROM provisioning.attempts WHERE handler_name = 'second'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let sent: Value = serde_json::from_str(&sent).unwrap();
    assert_eq!(sent["data"]["name"], "By First");
    assert_eq!(client_row(&db, 1).await.unwrap()["name"], "By First");
    relay.stop().await;

    // Forbid by the first: the second is never called.
    let db = TestDb::vcs().await;
    before_script(&db, "first", &["clients.create"], 1, &["forbid", "stop"]).await;
    before_script(&db, "second", &["clients.create"], 2, &["allow"]).await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (1, 'A')", &[])
        .await
        .unwrap();
    assert_eq!(wait_decided(&db, "clients.create").await.0, "forbidden");
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.attempts WHERE handler_name = 'second'"
        )
        .await,
        0
    );
    assert_eq!(client_row(&db, 1).await, None);
    relay.stop().await;
}

#[tokio::test]
async fn a_pending_decision_holds_only_its_own_object() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    db.client
        .execute(
            "INSERT INTO clients (id, name) VALUES (7, 'Seven'), (8, 'Eight')",
            &[],
        )
        .await
        .unwrap();
    before_script(&db, "slow", &["clients.update"], 1, &["slow", "7", "3"]).await;
    add_handler(
        &db.client,
        "crm",
        &["clients.update", "clients.balance_zero"],
        "http",
        &rx.url("/after"),
        "",
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("UPDATE clients SET name = 'Seven v2' WHERE id = 7", &[])
        .await
        .unwrap();
    // Client 7's next event (no before-stage handler on it) must wait for the pending decision.
    db.client
        .execute("UPDATE clients SET balance = 5 WHERE id = 7", &[])
        .await
        .unwrap();
    db.client
        .execute("UPDATE clients SET balance = -1 WHERE id = 7", &[])
        .await
        .unwrap();
    db.client
        .execute("UPDATE clients SET name = 'Eight v2' WHERE id = 8", &[])
        .await
        .unwrap();
    let got = rx.wait_for("/after", 1, WAIT).await;
    assert_eq!(
        got[0].json()["event"]["object_id"],
        8,
        "client 8 is not held up by client 7"
    );
    let got = rx.wait_for("/after", 3, WAIT).await;
    let order: Vec<(Value, Value)> = got
        .iter()
        .map(|r| {
            (
                r.json()["event"]["object_id"].clone(),
                r.json()["event"]["events_id"].clone(),
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            (json!(8), json!("clients.update")),
            (json!(7), json!("clients.update")),
            (json!(7), json!("clients.balance_zero"))
        ]
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_dead_before_stage_holds_the_after_stage_and_flags_the_event() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    before_script(&db, "broken", &["clients.create"], 1, &["garbage"]).await;
    add_handler(
        &db.client,
        "crm",
        &["clients.create"],
        "http",
        &rx.url("/after"),
        "",
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (1, 'A')", &[])
        .await
        .unwrap();
    let (d, reason) = wait_decided(&db, "clients.create").await;
    assert_eq!(d, "dead");
    assert!(reason.unwrap().contains("not a decision"));
    assert_eq!(count(&db.client, "SELECT count(*) FROM provisioning.attempts WHERE handler_name = 'broken' AND outcome = 'fail'").await, 2);
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status = 'skipped'"
        )
        .await,
        1
    );
    assert!(rx.received().is_empty(), "never silently allowed");
    assert_eq!(
        client_row(&db, 1).await.unwrap()["name"],
        "A",
        "the change stays"
    );
    relay.stop().await;
}
