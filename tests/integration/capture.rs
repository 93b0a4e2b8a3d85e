//! Capture (SPEC §3): triggers turn row changes into named events in `provisioning.events`, in the
//! same transaction as the change. Also: event declarations and their errors, handler validation
//! (§4), fan-out into deliveries, and install / reinstall / racing installers / uninstall.
//!
//! Every test works on a database of its own and reads the outbox directly; nothing is mocked.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::common::TestDb;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// One row of `provisioning.events`.
#[derive(Debug, Clone)]
struct Event {
    id: i64,
    name: String,
    entity: String,
    object_id: Value,
    operation: String,
    data: Value,
    old_row: Option<Value>,
    new_row: Option<Value>,
    relation: String,
    changed_at: DateTime<Utc>,
}

/// A database with the schema and the VCS preset; the session reports timestamps in UTC so that
/// row images have predictable text.
async fn vcs_db() -> TestDb {
    let db = TestDb::vcs().await;
    db.client
        .batch_execute("SET TIME ZONE 'UTC'")
        .await
        .unwrap();
    db
}

async fn last_event_id(c: &Client) -> i64 {
    c.query_one(
        "SELECT coalesce(max(id), 0)::bigint FROM provisioning.events",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn events_since(c: &Client, after: i64) -> Vec<Event> {
    c.query(
        "SELECT id, name, entity, object_id, operation, data, old_row, new_row, relation, changed_at
           FROM provisioning.events WHERE id > $1 ORDER BY id",
        &[&after],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| Event {
        id: r.get(0),
        name: r.get(1),
        entity: r.get(2),
        object_id: r.get(3),
        operation: r.get(4),
        data: r.get(5),
        old_row: r.get(6),
        new_row: r.get(7),
        relation: r.get(8),
        changed_at: r.get(9),
    })
    .collect()
}

async fn server_clock(c: &Client) -> DateTime<Utc> {
    c.query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn search_path(c: &Client) -> String {
    c.query_one("SELECT current_setting('search_path')", &[])
        .await
        .unwrap()
        .get(0)
}

/// Run `sql` (one or more statements) and return the events it emitted, checking on the way that
/// each one was stamped with the time of the change.
async fn change(c: &Client, sql: &str) -> Vec<Event> {
    let mark = last_event_id(c).await;
    let before = server_clock(c).await;
    c.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    let after = server_clock(c).await;
    let evs = events_since(c, mark).await;
    for e in &evs {
        assert!(
            e.changed_at >= before && e.changed_at <= after,
            "event {} changed_at {} not within the change ({before} .. {after})",
            e.name,
            e.changed_at
        );
    }
    evs
}

/// Assert the exact list of (name, object_id, data), in order.
#[track_caller]
fn assert_events(evs: &[Event], expected: &[(&str, Value, Value)]) {
    let got: Vec<(String, Value, Value)> = evs
        .iter()
        .map(|e| (e.name.clone(), e.object_id.clone(), e.data.clone()))
        .collect();
    let want: Vec<(String, Value, Value)> = expected
        .iter()
        .map(|(n, o, d)| (n.to_string(), o.clone(), d.clone()))
        .collect();
    assert_eq!(got, want, "\nfull events: {evs:#?}");
}

fn names(evs: &[Event]) -> Vec<&str> {
    evs.iter().map(|e| e.name.as_str()).collect()
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

const TS: &str = "2024-01-02 03:04:05+00";
const TS_JSON: &str = "2024-01-02T03:04:05+00:00";

/// Insert client 42 with every column set; returns its full row image as capture must report it.
async fn client_42(c: &Client) -> Value {
    c.batch_execute(&format!(
        "INSERT INTO clients (id, name, status, balance, credit, currency, email, company, custom_fields, created_at, updated_at)
         VALUES (42, 'Customer A', 'active', 12.5, 100, 'EUR', 'a@example.com', 'ACME',
                 '{{\"tariff\": \"gold\", \"region\": \"eu\"}}', '{TS}', '{TS}')"
    ))
    .await
    .unwrap();
    client_row_json(
        42,
        "Customer A",
        "active",
        12.5,
        "a@example.com",
        json!({"tariff": "gold", "region": "eu"}),
    )
}

/// A numeric(16,4) column as the database renders it: exact, four decimals (the relay keeps numbers
/// exactly as PostgreSQL wrote them, never through a float).
fn numeric4(v: f64) -> Value {
    serde_json::from_str(&format!("{v:.4}")).unwrap()
}

fn client_row_json(
    id: i64,
    name: &str,
    status: &str,
    balance: f64,
    email: &str,
    cf: Value,
) -> Value {
    json!({
        "id": id, "name": name, "status": status, "balance": numeric4(balance), "credit": numeric4(100.0),
        "currency": "EUR", "email": email, "company": "ACME", "custom_fields": cf,
        "created_at": TS_JSON, "updated_at": TS_JSON
    })
}

/// A client with only a name and a balance (other columns default).
async fn client_with_balance(c: &Client, id: i64, balance: &str) {
    c.batch_execute(&format!(
        "INSERT INTO clients (id, name, balance) VALUES ({id}, 'client {id}', {balance})"
    ))
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// The SPEC §3 event table, row by row
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn clients_create_emits_the_full_new_row() {
    let db = vcs_db().await;
    let c = &db.client;
    let mark = last_event_id(c).await;
    let before = server_clock(c).await;
    let row = client_42(c).await;
    let evs = events_since(c, mark).await;
    assert_events(&evs, &[("clients.create", json!(42), row.clone())]);
    let e = &evs[0];
    assert_eq!(e.entity, "clients");
    assert_eq!(e.operation, "insert");
    assert_eq!(e.relation, "public.clients");
    assert_eq!(e.old_row, None);
    assert_eq!(e.new_row, Some(row));
    assert!(e.changed_at >= before && e.changed_at <= server_clock(c).await);
}

#[tokio::test]
async fn clients_update_emits_key_and_changed_detail_columns() {
    let db = vcs_db().await;
    let c = &db.client;
    let old = client_42(c).await;
    // balance and updated_at move too, but they are excluded: neither reported nor a trigger
    let evs = change(
        c,
        "UPDATE clients SET name = 'Customer B', email = 'b@example.com', balance = 13,
                updated_at = '2024-03-01 00:00:00+00' WHERE id = 42",
    )
    .await;
    assert_events(
        &evs,
        &[(
            "clients.update",
            json!(42),
            json!({"id": 42, "name": "Customer B", "email": "b@example.com"}),
        )],
    );
    let e = &evs[0];
    assert_eq!(e.entity, "clients");
    assert_eq!(e.operation, "update");
    assert_eq!(e.relation, "public.clients");
    assert_eq!(e.old_row.as_ref(), Some(&old));
    let mut new = old.clone();
    new["name"] = json!("Customer B");
    new["email"] = json!("b@example.com");
    new["balance"] = numeric4(13.0);
    new["updated_at"] = json!("2024-03-01T00:00:00+00:00");
    assert_eq!(e.new_row.as_ref(), Some(&new));

    // a status change other than archiving is a detail change
    let evs = change(c, "UPDATE clients SET status = 'suspended' WHERE id = 42").await;
    assert_events(
        &evs,
        &[(
            "clients.update",
            json!(42),
            json!({"id": 42, "status": "suspended"}),
        )],
    );

    // setting NULL is a change too; the changed column is reported as null
    let evs = change(c, "UPDATE clients SET company = NULL WHERE id = 42").await;
    assert_events(
        &evs,
        &[(
            "clients.update",
            json!(42),
            json!({"id": 42, "company": null}),
        )],
    );
}

#[tokio::test]
async fn clients_update_ignores_no_op_and_excluded_columns() {
    let db = vcs_db().await;
    let c = &db.client;
    client_42(c).await;
    // a no-op update, a timestamps-only update, a balance-only update: no events at all
    assert_events(
        &change(
            c,
            "UPDATE clients SET name = name, email = email WHERE id = 42",
        )
        .await,
        &[],
    );
    assert_events(
        &change(
            c,
            "UPDATE clients SET updated_at = now(), created_at = now() WHERE id = 42",
        )
        .await,
        &[],
    );
    assert_events(
        &change(c, "UPDATE clients SET balance = 20 WHERE id = 42").await,
        &[],
    );
    assert_events(
        &change(
            c,
            "UPDATE clients SET balance = balance + 1, updated_at = now() WHERE id = 42",
        )
        .await,
        &[],
    );
}

#[tokio::test]
async fn clients_archive_emits_empty_data_and_no_update() {
    let db = vcs_db().await;
    let c = &db.client;
    let old = client_42(c).await;
    let evs = change(c, "UPDATE clients SET status = 'archived' WHERE id = 42").await;
    assert_events(&evs, &[("clients.archive", json!(42), json!({}))]);
    assert_eq!(evs[0].operation, "update");
    assert_eq!(evs[0].old_row.as_ref(), Some(&old));
    assert_eq!(
        evs[0].new_row.as_ref().unwrap()["status"],
        json!("archived")
    );

    // already archived: staying archived is not a new archive
    assert_events(
        &change(c, "UPDATE clients SET balance = balance WHERE id = 42").await,
        &[],
    );

    // an archive together with a name change is reported as archive only
    client_with_balance(c, 43, "1").await;
    let evs = change(
        c,
        "UPDATE clients SET status = 'archived', name = 'gone', email = 'x@y.z' WHERE id = 43",
    )
    .await;
    assert_events(&evs, &[("clients.archive", json!(43), json!({}))]);
    assert_eq!(evs[0].new_row.as_ref().unwrap()["name"], json!("gone"));

    // un-archiving is an ordinary detail change
    let evs = change(c, "UPDATE clients SET status = 'active' WHERE id = 43").await;
    assert_events(
        &evs,
        &[(
            "clients.update",
            json!(43),
            json!({"id": 43, "status": "active"}),
        )],
    );
}

#[tokio::test]
async fn clients_custom_fields_update_reports_changed_and_removed_keys() {
    let db = vcs_db().await;
    let c = &db.client;
    c.batch_execute(r#"INSERT INTO clients (id, name, custom_fields) VALUES (5, 'cf', '{"a": 1, "b": 2, "c": {"x": 1}, "keep": "same"}')"#)
        .await
        .unwrap();
    let evs = change(
        c,
        r#"UPDATE clients SET custom_fields = '{"a": 1, "b": 20, "c": {"x": 2}, "d": [1, 2], "keep": "same"}' WHERE id = 5"#,
    )
    .await;
    assert_events(
        &evs,
        &[(
            "clients.custom_fields.update",
            json!(5),
            json!({"id": 5, "custom_fields": {"b": 20, "c": {"x": 2}, "d": [1, 2]}}),
        )],
    );
    assert_eq!(
        evs[0].old_row.as_ref().unwrap()["custom_fields"],
        json!({"a": 1, "b": 2, "c": {"x": 1}, "keep": "same"})
    );
    assert_eq!(
        evs[0].new_row.as_ref().unwrap()["custom_fields"],
        json!({"a": 1, "b": 20, "c": {"x": 2}, "d": [1, 2], "keep": "same"})
    );

    // removed keys are reported as null
    let evs = change(
        c,
        r#"UPDATE clients SET custom_fields = custom_fields - 'a' - 'd' WHERE id = 5"#,
    )
    .await;
    assert_events(
        &evs,
        &[(
            "clients.custom_fields.update",
            json!(5),
            json!({"id": 5, "custom_fields": {"a": null, "d": null}}),
        )],
    );

    // a key set to JSON null is a change from its old value
    let evs = change(c, r#"UPDATE clients SET custom_fields = jsonb_set(custom_fields, '{b}', 'null') WHERE id = 5"#).await;
    assert_events(
        &evs,
        &[(
            "clients.custom_fields.update",
            json!(5),
            json!({"id": 5, "custom_fields": {"b": null}}),
        )],
    );

    // rewriting the same document (other key order) is no change
    let evs = change(c, r#"UPDATE clients SET custom_fields = '{"keep": "same", "c": {"x": 2}, "b": null}' WHERE id = 5"#).await;
    assert_events(&evs, &[]);
}

#[tokio::test]
async fn clients_balance_zero_and_notzero() {
    let db = vcs_db().await;
    let c = &db.client;
    for (id, bal) in [
        (1, "5"),
        (2, "5"),
        (3, "-5"),
        (4, "-5"),
        (5, "5"),
        (6, "-5"),
        (7, "0"),
        (8, "0"),
        (9, "0.0001"),
    ] {
        client_with_balance(c, id, bal).await;
    }
    // crossing
    let evs = change(c, "UPDATE clients SET balance = 0 WHERE id = 1").await;
    assert_events(&evs, &[("clients.balance_zero", json!(1), json!({}))]);
    assert_eq!(evs[0].old_row.as_ref().unwrap()["balance"], numeric4(5.0));
    assert_eq!(evs[0].new_row.as_ref().unwrap()["balance"], numeric4(0.0));
    assert_eq!(evs[0].operation, "update");
    assert_events(
        &change(c, "UPDATE clients SET balance = -1 WHERE id = 2").await,
        &[("clients.balance_zero", json!(2), json!({}))],
    );
    assert_events(
        &change(c, "UPDATE clients SET balance = 0 WHERE id = 3").await,
        &[("clients.balance_notzero", json!(3), json!({}))],
    );
    assert_events(
        &change(c, "UPDATE clients SET balance = 3 WHERE id = 4").await,
        &[("clients.balance_notzero", json!(4), json!({}))],
    );
    assert_events(
        &change(c, "UPDATE clients SET balance = -0.0001 WHERE id = 9").await,
        &[("clients.balance_zero", json!(9), json!({}))],
    );

    // not crossing: no balance event (and a balance-only update is no clients.update either)
    assert_events(
        &change(c, "UPDATE clients SET balance = 3 WHERE id = 5").await,
        &[],
    );
    assert_events(
        &change(c, "UPDATE clients SET balance = -3 WHERE id = 6").await,
        &[],
    );
    assert_events(
        &change(c, "UPDATE clients SET balance = 5 WHERE id = 7").await,
        &[],
    );
    assert_events(
        &change(c, "UPDATE clients SET balance = -5 WHERE id = 8").await,
        &[],
    );
    // 0 -> 0 and staying at/below zero
    assert_events(
        &change(c, "UPDATE clients SET balance = 0 WHERE id = 1").await,
        &[],
    );
    assert_events(
        &change(c, "UPDATE clients SET balance = -7 WHERE id = 1").await,
        &[],
    );
}

#[tokio::test]
async fn clients_delete_emits_empty_data_with_old_row() {
    let db = vcs_db().await;
    let c = &db.client;
    let mut old = client_42(c).await;
    c.batch_execute("UPDATE clients SET balance = 12.5 WHERE id = 42")
        .await
        .unwrap();
    old["balance"] = numeric4(12.5);
    let evs = change(c, "DELETE FROM clients WHERE id = 42").await;
    assert_events(&evs, &[("clients.delete", json!(42), json!({}))]);
    assert_eq!(evs[0].operation, "delete");
    assert_eq!(evs[0].old_row.as_ref(), Some(&old));
    assert_eq!(evs[0].new_row, None);
    assert_eq!(evs[0].relation, "public.clients");
}

#[tokio::test]
async fn accounts_create_update_delete() {
    let db = vcs_db().await;
    let c = &db.client;
    client_42(c).await;
    let row = json!({
        "id": 7, "client_id": 42, "login": "acc7", "status": "active", "ip_address": "10.0.0.1",
        "tech_prefix": "99#", "created_at": TS_JSON, "updated_at": TS_JSON
    });
    let evs = change(
        c,
        &format!(
            "INSERT INTO accounts (id, client_id, login, status, ip_address, tech_prefix, created_at, updated_at)
             VALUES (7, 42, 'acc7', 'active', '10.0.0.1', '99#', '{TS}', '{TS}')"
        ),
    )
    .await;
    assert_events(&evs, &[("clients.accounts.create", json!(7), row.clone())]);
    assert_eq!(evs[0].entity, "accounts");
    assert_eq!(evs[0].operation, "insert");
    assert_eq!(evs[0].relation, "public.accounts");
    assert_eq!(evs[0].new_row.as_ref(), Some(&row));
    assert_eq!(evs[0].old_row, None);

    let evs = change(c, "UPDATE accounts SET status = 'blocked', ip_address = '10.0.0.2', updated_at = now() WHERE id = 7").await;
    assert_events(
        &evs,
        &[(
            "clients.accounts.update",
            json!(7),
            json!({"id": 7, "status": "blocked", "ip_address": "10.0.0.2"}),
        )],
    );
    assert_eq!(evs[0].old_row.as_ref(), Some(&row));
    assert_eq!(evs[0].new_row.as_ref().unwrap()["status"], json!("blocked"));

    // timestamps alone are no update
    assert_events(
        &change(c, "UPDATE accounts SET updated_at = now() WHERE id = 7").await,
        &[],
    );

    let evs = change(c, "DELETE FROM accounts WHERE id = 7").await;
    assert_events(&evs, &[("clients.accounts.delete", json!(7), json!({}))]);
    assert_eq!(evs[0].operation, "delete");
    assert_eq!(evs[0].old_row.as_ref().unwrap()["status"], json!("blocked"));
    assert_eq!(evs[0].new_row, None);
}

#[tokio::test]
async fn subscriptions_lifecycle() {
    let db = vcs_db().await;
    let c = &db.client;
    client_42(c).await;
    let row = json!({
        "id": 3, "client_id": 42, "package_name": "Gold", "status": "new", "paid_from": "2024-01-01",
        "paid_until": "2024-01-31", "created_at": TS_JSON, "updated_at": TS_JSON
    });
    let evs = change(
        c,
        &format!(
            "INSERT INTO client_packages (id, client_id, package_name, status, paid_from, paid_until, created_at, updated_at)
             VALUES (3, 42, 'Gold', 'new', '2024-01-01', '2024-01-31', '{TS}', '{TS}')"
        ),
    )
    .await;
    assert_events(
        &evs,
        &[("clients.subscriptions.assign", json!(3), row.clone())],
    );
    assert_eq!(evs[0].entity, "client_packages");
    assert_eq!(evs[0].operation, "insert");
    assert_eq!(evs[0].relation, "public.client_packages");
    assert_eq!(evs[0].new_row.as_ref(), Some(&row));

    // renew does not fire while the package is not active
    assert_events(
        &change(
            c,
            "UPDATE client_packages SET paid_until = '2024-02-15' WHERE id = 3",
        )
        .await,
        &[],
    );

    let evs = change(
        c,
        "UPDATE client_packages SET status = 'active', updated_at = now() WHERE id = 3",
    )
    .await;
    assert_events(
        &evs,
        &[(
            "clients.subscriptions.activate",
            json!(3),
            json!({"id": 3, "status": "active"}),
        )],
    );
    assert_eq!(evs[0].old_row.as_ref().unwrap()["status"], json!("new"));
    assert_eq!(evs[0].new_row.as_ref().unwrap()["status"], json!("active"));

    let evs = change(
        c,
        "UPDATE client_packages SET paid_until = '2024-02-29', updated_at = now() WHERE id = 3",
    )
    .await;
    assert_events(
        &evs,
        &[(
            "clients.subscriptions.renew",
            json!(3),
            json!({"id": 3, "paid_until": "2024-02-29"}),
        )],
    );
    assert_eq!(
        evs[0].old_row.as_ref().unwrap()["paid_until"],
        json!("2024-02-15")
    );

    // shortening the period is not a renewal; other changes while active emit nothing
    assert_events(
        &change(
            c,
            "UPDATE client_packages SET paid_until = '2024-02-20' WHERE id = 3",
        )
        .await,
        &[],
    );
    assert_events(
        &change(
            c,
            "UPDATE client_packages SET package_name = 'Platinum' WHERE id = 3",
        )
        .await,
        &[],
    );

    let evs = change(
        c,
        "UPDATE client_packages SET status = 'inactive' WHERE id = 3",
    )
    .await;
    assert_events(
        &evs,
        &[(
            "clients.subscriptions.deactivate",
            json!(3),
            json!({"id": 3, "status": "inactive"}),
        )],
    );
    // extending while inactive: no renew
    assert_events(
        &change(
            c,
            "UPDATE client_packages SET paid_until = '2024-12-31' WHERE id = 3",
        )
        .await,
        &[],
    );

    // activation together with an extension: activate (reporting both), not renew
    let evs = change(
        c,
        "UPDATE client_packages SET status = 'active', paid_until = '2025-01-31' WHERE id = 3",
    )
    .await;
    assert_events(
        &evs,
        &[(
            "clients.subscriptions.activate",
            json!(3),
            json!({"id": 3, "status": "active", "paid_until": "2025-01-31"}),
        )],
    );

    // close by status
    let evs = change(
        c,
        "UPDATE client_packages SET status = 'closed' WHERE id = 3",
    )
    .await;
    assert_events(
        &evs,
        &[("clients.subscriptions.close", json!(3), json!({}))],
    );
    assert_eq!(evs[0].operation, "update");
    assert_eq!(evs[0].new_row.as_ref().unwrap()["status"], json!("closed"));
    // staying closed is not another close
    assert_events(
        &change(
            c,
            "UPDATE client_packages SET status = 'closed' WHERE id = 3",
        )
        .await,
        &[],
    );

    // a period set where there was none, while active, is a renewal too
    c.batch_execute("INSERT INTO client_packages (id, client_id, package_name, status, paid_until) VALUES (5, 42, 'Trial', 'active', NULL)")
        .await
        .unwrap();
    assert_events(
        &change(
            c,
            "UPDATE client_packages SET paid_until = '2024-03-31' WHERE id = 5",
        )
        .await,
        &[(
            "clients.subscriptions.renew",
            json!(5),
            json!({"id": 5, "paid_until": "2024-03-31"}),
        )],
    );
    // and clearing it is not
    assert_events(
        &change(
            c,
            "UPDATE client_packages SET paid_until = NULL WHERE id = 5",
        )
        .await,
        &[],
    );

    // close by deleting the row (another package, never closed by status)
    c.batch_execute("INSERT INTO client_packages (id, client_id, package_name, status) VALUES (4, 42, 'Silver', 'active')")
        .await
        .unwrap();
    let evs = change(c, "DELETE FROM client_packages WHERE id = 4").await;
    assert_events(
        &evs,
        &[("clients.subscriptions.close", json!(4), json!({}))],
    );
    assert_eq!(evs[0].operation, "delete");
    assert_eq!(
        evs[0].old_row.as_ref().unwrap()["package_name"],
        json!("Silver")
    );
    assert_eq!(evs[0].new_row, None);
}

// ---------------------------------------------------------------------------------------------
// Transactions, multi-row statements, order, suppression
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rolled_back_change_emits_nothing() {
    let db = vcs_db().await;
    let c = &db.client;
    client_with_balance(c, 1, "5").await;
    let mark = last_event_id(c).await;
    c.batch_execute(
        "BEGIN;
         INSERT INTO clients (id, name) VALUES (2, 'tmp');
         UPDATE clients SET name = 'x', balance = -1 WHERE id = 1;
         DELETE FROM clients WHERE id = 2;
         ROLLBACK;",
    )
    .await
    .unwrap();
    assert_events(&events_since(c, mark).await, &[]);

    // an error aborts the transaction: nothing either
    let err = c
        .batch_execute("BEGIN; UPDATE clients SET name = 'y' WHERE id = 1; SELECT 1/0; COMMIT;")
        .await
        .unwrap_err();
    assert!(err.as_db_error().is_some());
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_events(&events_since(c, mark).await, &[]);

    // a savepoint rolled back drops only its part
    let evs = change(
        c,
        "BEGIN;
         UPDATE clients SET name = 'kept' WHERE id = 1;
         SAVEPOINT s; UPDATE clients SET balance = -1 WHERE id = 1; ROLLBACK TO SAVEPOINT s;
         COMMIT;",
    )
    .await;
    assert_events(
        &evs,
        &[("clients.update", json!(1), json!({"id": 1, "name": "kept"}))],
    );
}

#[tokio::test]
async fn committed_transaction_keeps_every_change_in_order() {
    let db = vcs_db().await;
    let c = &db.client;
    let evs = change(
        c,
        "BEGIN;
         INSERT INTO clients (id, name, balance) VALUES (1, 'one', 5);
         UPDATE clients SET balance = -5 WHERE id = 1;
         UPDATE clients SET name = 'uno' WHERE id = 1;
         DELETE FROM clients WHERE id = 1;
         COMMIT;",
    )
    .await;
    assert_eq!(
        names(&evs),
        [
            "clients.create",
            "clients.balance_zero",
            "clients.update",
            "clients.delete"
        ]
    );
    assert!(evs
        .windows(2)
        .all(|w| w[0].id < w[1].id && w[0].changed_at <= w[1].changed_at));
}

#[tokio::test]
async fn multi_row_update_emits_one_set_per_row() {
    let db = vcs_db().await;
    let c = &db.client;
    for id in 1..=3 {
        client_with_balance(c, id, "5").await;
    }
    client_with_balance(c, 4, "-5").await;
    let evs = change(
        c,
        "UPDATE clients SET name = name || ' renamed', balance = balance - 6",
    )
    .await;
    assert_eq!(evs.len(), 7, "{evs:#?}");
    // rows 1..3: update + balance_zero, row 4: update only; each row's events are consecutive
    let mut seen = Vec::new();
    let mut i = 0;
    while i < evs.len() {
        let id = evs[i].object_id.as_i64().unwrap();
        let name = format!("client {id} renamed");
        assert_eq!(evs[i].name, "clients.update");
        assert_eq!(evs[i].data, json!({"id": id, "name": name}));
        if id == 4 {
            i += 1;
        } else {
            assert_eq!(evs[i + 1].name, "clients.balance_zero");
            assert_eq!(evs[i + 1].object_id, json!(id));
            i += 2;
        }
        seen.push(id);
    }
    seen.sort();
    assert_eq!(seen, [1, 2, 3, 4]);

    // a multi-row delete: one event per row
    let evs = change(c, "DELETE FROM clients WHERE id IN (1, 2)").await;
    let mut ids: Vec<i64> = evs.iter().map(|e| e.object_id.as_i64().unwrap()).collect();
    ids.sort();
    assert_eq!(names(&evs), ["clients.delete", "clients.delete"]);
    assert_eq!(ids, [1, 2]);
}

#[tokio::test]
async fn several_events_of_one_change_come_in_documented_order() {
    let db = vcs_db().await;
    let c = &db.client;
    c.batch_execute(r#"INSERT INTO clients (id, name, balance, custom_fields) VALUES (1, 'a', 5, '{"k": 1}'), (2, 'b', -5, '{}'), (3, 'c', 5, '{}')"#)
        .await
        .unwrap();
    // positions: update 20, custom_fields.update 30, balance_zero 40, balance_notzero 50, archive 60
    let evs = change(
        c,
        r#"UPDATE clients SET name = 'A', custom_fields = '{"k": 2}', balance = -1 WHERE id = 1"#,
    )
    .await;
    assert_events(
        &evs,
        &[
            ("clients.update", json!(1), json!({"id": 1, "name": "A"})),
            (
                "clients.custom_fields.update",
                json!(1),
                json!({"id": 1, "custom_fields": {"k": 2}}),
            ),
            ("clients.balance_zero", json!(1), json!({})),
        ],
    );
    // all three share the row images of the one change
    assert!(evs
        .iter()
        .all(|e| e.old_row == evs[0].old_row && e.new_row == evs[0].new_row));

    let evs = change(c, r#"UPDATE clients SET email = 'b@x', custom_fields = '{"n": true}', balance = 1 WHERE id = 2"#).await;
    assert_events(
        &evs,
        &[
            ("clients.update", json!(2), json!({"id": 2, "email": "b@x"})),
            (
                "clients.custom_fields.update",
                json!(2),
                json!({"id": 2, "custom_fields": {"n": true}}),
            ),
            ("clients.balance_notzero", json!(2), json!({})),
        ],
    );

    // archive + custom fields + balance in one update: no clients.update, archive last
    let evs = change(c, r#"UPDATE clients SET status = 'archived', name = 'C', custom_fields = '{"z": 0}', balance = 0 WHERE id = 3"#).await;
    assert_events(
        &evs,
        &[
            (
                "clients.custom_fields.update",
                json!(3),
                json!({"id": 3, "custom_fields": {"z": 0}}),
            ),
            ("clients.balance_zero", json!(3), json!({})),
            ("clients.archive", json!(3), json!({})),
        ],
    );

    // the declared positions are what the catalogue says
    let rows = c
        .query(
            "SELECT event, position FROM provisioning.capture_events WHERE relation = 'public.clients' ORDER BY position, operation",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: Vec<(String, i32)> = [
        ("clients.create", 10),
        ("clients.update", 20),
        ("clients.custom_fields.update", 30),
        ("clients.balance_zero", 40),
        ("clients.balance_notzero", 50),
        ("clients.archive", 60),
        ("clients.delete", 70),
    ]
    .iter()
    .map(|(e, p)| (e.to_string(), *p))
    .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn custom_fields_only_update_emits_only_custom_fields_update() {
    let db = vcs_db().await;
    let c = &db.client;
    client_42(c).await;
    let evs = change(c, r#"UPDATE clients SET custom_fields = custom_fields || '{"tariff": "silver"}', updated_at = now() WHERE id = 42"#).await;
    assert_events(
        &evs,
        &[(
            "clients.custom_fields.update",
            json!(42),
            json!({"id": 42, "custom_fields": {"tariff": "silver"}}),
        )],
    );
}

#[tokio::test]
async fn relay_session_flag_suppresses_capture() {
    let db = vcs_db().await;
    let c = &db.client;
    client_with_balance(c, 1, "5").await;

    // session-wide, as the relay's write-back connection does
    let evs = change(
        c,
        "SET provisioning.suppress = 'on';
         INSERT INTO clients (id, name) VALUES (2, 'quiet');
         UPDATE clients SET name = 'n', balance = -1, status = 'archived', custom_fields = '{\"a\": 1}' WHERE id = 1;
         DELETE FROM clients WHERE id = 2;
         INSERT INTO accounts (id, client_id, login) VALUES (1, 1, 'l');
         INSERT INTO client_packages (id, client_id, package_name) VALUES (1, 1, 'p');
         UPDATE client_packages SET status = 'active' WHERE id = 1;
         DELETE FROM client_packages WHERE id = 1;",
    )
    .await;
    assert_events(&evs, &[]);
    // the changes themselves happened
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM clients WHERE id = 1 AND status = 'archived'"
        )
        .await,
        1
    );
    assert_eq!(count(c, "SELECT count(*) FROM accounts").await, 1);

    // back on: captured again
    let evs = change(
        c,
        "RESET provisioning.suppress; UPDATE clients SET name = 'loud' WHERE id = 1",
    )
    .await;
    assert_events(
        &evs,
        &[("clients.update", json!(1), json!({"id": 1, "name": "loud"}))],
    );
    let evs = change(
        c,
        "SET provisioning.suppress = 'off'; UPDATE clients SET name = 'louder' WHERE id = 1",
    )
    .await;
    assert_eq!(names(&evs), ["clients.update"]);

    // transaction-local, via set_config(..., true): only that transaction is quiet
    let evs = change(
        c,
        "BEGIN;
         SELECT set_config('provisioning.suppress', 'on', true);
         UPDATE clients SET name = 'tx-quiet', balance = 5 WHERE id = 1;
         COMMIT;",
    )
    .await;
    assert_events(&evs, &[]);
    // a writer whose search_path puts a schema before pg_catalog takes the capture code's safe
    // path, which swaps the search_path for the call: a suppressed change leaves early from
    // there too, and gives the writer's search_path back
    let evs = change(
        c,
        "SET search_path = public, pg_catalog;
         BEGIN;
         SELECT set_config('provisioning.suppress', 'on', true);
         UPDATE clients SET name = 'tx-quiet 2', balance = -5 WHERE id = 1;",
    )
    .await;
    assert_events(&evs, &[]);
    assert_eq!(search_path(c).await, "public, pg_catalog");
    c.batch_execute("COMMIT; RESET search_path").await.unwrap();
    let evs = change(c, "UPDATE clients SET name = 'after tx' WHERE id = 1").await;
    assert_events(
        &evs,
        &[(
            "clients.update",
            json!(1),
            json!({"id": 1, "name": "after tx"}),
        )],
    );

    // another session is never affected by one session's flag
    let other = db.connect().await;
    c.batch_execute("SET provisioning.suppress = 'on'")
        .await
        .unwrap();
    let mark = last_event_id(c).await;
    other
        .batch_execute("UPDATE clients SET name = 'other session' WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(names(&events_since(c, mark).await), ["clients.update"]);
}

#[tokio::test]
async fn deleting_a_client_cascades_into_child_events() {
    let db = vcs_db().await;
    let c = &db.client;
    client_42(c).await;
    c.batch_execute(
        "INSERT INTO accounts (id, client_id, login) VALUES (7, 42, 'acc');
         INSERT INTO client_packages (id, client_id, package_name, status) VALUES (3, 42, 'Gold', 'active');",
    )
    .await
    .unwrap();
    let evs = change(c, "DELETE FROM clients WHERE id = 42").await;
    let mut got: Vec<(String, Value)> = evs
        .iter()
        .map(|e| (e.name.clone(), e.object_id.clone()))
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [
            ("clients.accounts.delete".to_string(), json!(7)),
            ("clients.delete".to_string(), json!(42)),
            ("clients.subscriptions.close".to_string(), json!(3)),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Install, reinstall, racing installers, uninstall
// ---------------------------------------------------------------------------------------------

/// Everything the product installs, as comparable text: relations (with columns and indexes),
/// functions (with a digest of their body), triggers on any table, capture declarations, versions.
async fn catalog_snapshot(c: &Client) -> Vec<String> {
    let rows = c
        .query(
            "SELECT 'relation ' || n.nspname || '.' || cl.relname || ' kind=' || cl.relkind::text
                    || ' opts=' || coalesce(cl.reloptions::text, '')
               FROM pg_class cl JOIN pg_namespace n ON n.oid = cl.relnamespace
              WHERE n.nspname IN ('provisioning', 'public')
             UNION ALL
             SELECT 'column ' || a.attrelid::regclass::text || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                    || ' notnull=' || a.attnotnull || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
               FROM pg_attribute a JOIN pg_class cl ON cl.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = cl.relnamespace
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE n.nspname IN ('provisioning', 'public') AND cl.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
             UNION ALL
             SELECT 'index ' || pg_get_indexdef(i.indexrelid)
               FROM pg_index i JOIN pg_class cl ON cl.oid = i.indrelid
               JOIN pg_namespace n ON n.oid = cl.relnamespace
              WHERE n.nspname IN ('provisioning', 'public')
             UNION ALL
             SELECT 'constraint ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(co.oid)
               FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace
              WHERE n.nspname IN ('provisioning', 'public')
             UNION ALL
             SELECT 'function ' || p.oid::regprocedure::text || ' ' || md5(pg_get_functiondef(p.oid))
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'provisioning'
             UNION ALL
             SELECT 'trigger ' || t.tgrelid::regclass::text || ' ' || t.tgname || ' enabled=' || t.tgenabled::text
                    || ' ' || pg_get_triggerdef(t.oid)
               FROM pg_trigger t WHERE NOT t.tgisinternal
             UNION ALL
             SELECT 'capture ' || relation || ' ' || entity || ' ' || key_column FROM provisioning.captures
             UNION ALL
             SELECT 'event ' || event || ' ' || relation || ' ' || operation || ' ' || coalesce(condition, '-') || ' '
                    || data_shape || ' ' || coalesce(json_column, '-') || ' ' || exclude_columns::text || ' '
                    || position || ' ' || trigger_name
               FROM provisioning.capture_events
             UNION ALL
             SELECT 'version ' || version || ' ' || description FROM provisioning.schema_version
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test]
async fn installing_twice_changes_nothing() {
    let db = vcs_db().await;
    let c = &db.client;
    client_with_balance(c, 1, "5").await;
    c.batch_execute(
        "INSERT INTO provisioning.handlers (name, events, kind, target) VALUES ('h', '{clients.*}', 'http', 'http://127.0.0.1:9/hook')",
    )
    .await
    .unwrap();
    let before = catalog_snapshot(c).await;
    assert!(
        before
            .iter()
            .any(|l| l.starts_with("trigger clients prov_capture_update")),
        "{before:#?}"
    );
    assert_eq!(
        before.iter().filter(|l| l.starts_with("event ")).count(),
        16
    );
    let events_before = count(c, "SELECT count(*) FROM provisioning.events").await;

    relay::schema::migrate(c).await.expect("second migrate");
    relay::schema::install_vcs_preset(c)
        .await
        .expect("second preset install");
    relay::schema::migrate(c).await.expect("third migrate");
    relay::schema::install_vcs_preset(c)
        .await
        .expect("third preset install");

    let after = catalog_snapshot(c).await;
    assert_eq!(before, after);
    // user data, handlers and the outbox survive
    assert_eq!(count(c, "SELECT count(*) FROM clients").await, 1);
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM provisioning.handlers WHERE name = 'h'"
        )
        .await,
        1
    );
    assert_eq!(
        count(c, "SELECT count(*) FROM provisioning.events").await,
        events_before
    );
    assert_eq!(
        count(c, "SELECT count(*) FROM provisioning.schema_version").await,
        1
    );
    // insert, delete, and the update events in their four column groups; none duplicated
    assert_eq!(
        count(c, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'clients'::regclass AND tgname LIKE 'prov\\_%'").await,
        6,
        "capture triggers of clients"
    );

    // capture emits exactly one event per change: no duplicated triggers
    let evs = change(c, "INSERT INTO clients (id, name) VALUES (2, 'two')").await;
    assert_eq!(names(&evs), ["clients.create"]);
    let evs = change(
        c,
        "UPDATE clients SET name = 'one', balance = -1 WHERE id = 1",
    )
    .await;
    assert_eq!(names(&evs), ["clients.update", "clients.balance_zero"]);
    // and one delivery per subscribed handler per event
    assert_eq!(
        count(
            c,
            &format!(
                "SELECT count(*) FROM provisioning.deliveries WHERE event_id = {}",
                evs[0].id
            )
        )
        .await,
        1
    );
}

#[tokio::test]
async fn racing_installers_both_succeed() {
    for round in 0..3 {
        let db = TestDb::empty().await;
        let a = db.connect().await;
        let b = db.connect().await;
        let (ra, rb) = tokio::join!(relay::schema::migrate(&a), relay::schema::migrate(&b));
        ra.unwrap_or_else(|e| panic!("round {round}: first installer: {e:?}"));
        rb.unwrap_or_else(|e| panic!("round {round}: second installer: {e:?}"));
        assert_eq!(
            relay::schema::installed_version(&db.client).await.unwrap(),
            Some(relay::schema::SCHEMA_VERSION)
        );
        assert_eq!(
            count(
                &db.client,
                "SELECT count(*) FROM provisioning.schema_version"
            )
            .await,
            1
        );
        relay::schema::check_version(&db.client).await.unwrap();

        // racing again on an installed database is just as harmless, and so is the result
        let snap = catalog_snapshot(&db.client).await;
        let (ra, rb) = tokio::join!(relay::schema::migrate(&a), relay::schema::migrate(&b));
        ra.unwrap();
        rb.unwrap();
        assert_eq!(catalog_snapshot(&db.client).await, snap);

        // and so are two preset installs (tables and declarations) racing each other
        let (ra, rb) = tokio::join!(
            relay::schema::install_vcs_preset(&a),
            relay::schema::install_vcs_preset(&b)
        );
        ra.unwrap_or_else(|e| panic!("round {round}: first preset install: {e:?}"));
        rb.unwrap_or_else(|e| panic!("round {round}: second preset install: {e:?}"));
        assert_eq!(
            count(
                &db.client,
                "SELECT count(*) FROM provisioning.capture_events"
            )
            .await,
            16
        );
    }
}

#[tokio::test]
async fn uninstall_removes_the_product_and_keeps_user_data() {
    let db = vcs_db().await;
    let c = &db.client;
    client_42(c).await;
    c.batch_execute(
        "INSERT INTO accounts (id, client_id, login) VALUES (7, 42, 'acc');
         INSERT INTO client_packages (id, client_id, package_name) VALUES (3, 42, 'Gold');
         INSERT INTO provisioning.handlers (name, events, kind, target) VALUES ('h', '{clients.*}', 'http', 'http://127.0.0.1:9/hook');
         UPDATE clients SET name = 'before uninstall' WHERE id = 42;",
    )
    .await
    .unwrap();
    let data_before = count(c, "SELECT count(*) FROM clients").await;
    let rows_before: String = c
        .query_one(
            "SELECT (SELECT jsonb_agg(c ORDER BY id) FROM clients c)::text || (SELECT jsonb_agg(a ORDER BY id) FROM accounts a)::text
                    || (SELECT jsonb_agg(p ORDER BY id) FROM client_packages p)::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    c.batch_execute(relay::schema::UNINSTALL_SQL)
        .await
        .expect("uninstall");
    c.batch_execute(relay::schema::UNINSTALL_SQL)
        .await
        .expect("uninstall twice");

    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'provisioning'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'prov\\_%'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
              WHERE p.pronamespace::regnamespace::text = 'provisioning'"
        )
        .await,
        0
    );
    assert_eq!(relay::schema::installed_version(c).await.unwrap(), None);
    assert_eq!(count(c, "SELECT count(*) FROM clients").await, data_before);
    let rows_after: String = c
        .query_one(
            "SELECT (SELECT jsonb_agg(c ORDER BY id) FROM clients c)::text || (SELECT jsonb_agg(a ORDER BY id) FROM accounts a)::text
                    || (SELECT jsonb_agg(p ORDER BY id) FROM client_packages p)::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows_before, rows_after);

    // DML on the formerly watched tables works and nothing fails
    c.batch_execute(
        "INSERT INTO clients (id, name, balance) VALUES (1, 'new', 5);
         UPDATE clients SET name = 'x', balance = -1, status = 'archived', custom_fields = '{\"a\": 1}' WHERE id = 1;
         UPDATE client_packages SET status = 'active', paid_until = '2030-01-01';
         UPDATE accounts SET status = 'blocked';
         DELETE FROM clients;",
    )
    .await
    .expect("DML after uninstall");
    assert_eq!(count(c, "SELECT count(*) FROM clients").await, 0);

    // and the product can be installed again from scratch
    relay::schema::migrate(c).await.unwrap();
    relay::schema::install_vcs_preset(c).await.unwrap();
    let evs = change(c, "INSERT INTO clients (id, name) VALUES (9, 'again')").await;
    assert_eq!(names(&evs), ["clients.create"]);
}

#[tokio::test]
async fn uninstall_on_a_database_without_the_product_is_harmless() {
    let db = TestDb::empty().await;
    db.client
        .batch_execute(relay::schema::UNINSTALL_SQL)
        .await
        .expect("uninstall on empty db");
}

// ---------------------------------------------------------------------------------------------
// The preset on tables and columns named differently
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn preset_on_renamed_tables_and_columns() {
    let db = TestDb::installed().await;
    let c = &db.client;
    c.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();
    c.batch_execute(
        "CREATE SCHEMA billing;
         CREATE TABLE billing.customers (
             customer_no bigint PRIMARY KEY, title text NOT NULL, state text NOT NULL DEFAULT 'open',
             saldo numeric NOT NULL DEFAULT 0, extra jsonb NOT NULL DEFAULT '{}', modified timestamptz);
         CREATE TABLE billing.customer_accounts (
             acc_no bigint PRIMARY KEY, customer_no bigint NOT NULL REFERENCES billing.customers, login text NOT NULL,
             blocked boolean NOT NULL DEFAULT false, created_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE billing.subscriptions (
             sub_no bigint PRIMARY KEY, customer_no bigint NOT NULL REFERENCES billing.customers, plan text NOT NULL,
             state text NOT NULL DEFAULT 'draft', valid_to date);",
    )
    .await
    .unwrap();
    c.batch_execute(relay::schema::VCS_EVENTS_SQL)
        .await
        .unwrap();
    c.batch_execute(
        r#"SELECT provisioning.vcs_declare(
               clients  => 'billing.customers',
               accounts => 'billing.customer_accounts',
               packages => 'billing.subscriptions',
               columns  => '{"clients.key": "customer_no", "clients.status": "state", "clients.balance": "saldo",
                             "clients.custom_fields": "extra", "clients.archived_value": "closed",
                             "clients.exclude": ["modified"],
                             "accounts.key": "acc_no",
                             "packages.key": "sub_no", "packages.status": "state", "packages.paid_until": "valid_to",
                             "packages.active_value": "live", "packages.inactive_value": "paused",
                             "packages.closed_value": "ended"}')"#,
    )
    .await
    .unwrap();
    assert_eq!(
        count(c, "SELECT count(*) FROM provisioning.capture_events").await,
        16
    );

    let evs = change(
        c,
        "INSERT INTO billing.customers (customer_no, title, saldo) VALUES (1001, 'Alpha', 5)",
    )
    .await;
    let row = json!({"customer_no": 1001, "title": "Alpha", "state": "open", "saldo": 5, "extra": {}, "modified": null});
    assert_events(&evs, &[("clients.create", json!(1001), row.clone())]);
    assert_eq!(evs[0].entity, "clients");
    assert_eq!(evs[0].relation, "billing.customers");
    assert_eq!(evs[0].new_row.as_ref(), Some(&row));

    // detail change + excluded "modified" + saldo crossing zero
    let evs = change(c, "UPDATE billing.customers SET title = 'Beta', modified = now(), saldo = -1 WHERE customer_no = 1001").await;
    assert_events(
        &evs,
        &[
            (
                "clients.update",
                json!(1001),
                json!({"customer_no": 1001, "title": "Beta"}),
            ),
            ("clients.balance_zero", json!(1001), json!({})),
        ],
    );
    assert_events(
        &change(
            c,
            "UPDATE billing.customers SET modified = now(), saldo = -3 WHERE customer_no = 1001",
        )
        .await,
        &[],
    );
    assert_events(
        &change(
            c,
            "UPDATE billing.customers SET saldo = 0 WHERE customer_no = 1001",
        )
        .await,
        &[("clients.balance_notzero", json!(1001), json!({}))],
    );
    let evs = change(
        c,
        r#"UPDATE billing.customers SET extra = '{"sip": "x"}' WHERE customer_no = 1001"#,
    )
    .await;
    assert_events(
        &evs,
        &[(
            "clients.custom_fields.update",
            json!(1001),
            json!({"customer_no": 1001, "extra": {"sip": "x"}}),
        )],
    );

    // accounts
    let evs = change(c, "INSERT INTO billing.customer_accounts (acc_no, customer_no, login, created_at) VALUES (5, 1001, 'l', '2024-01-02 03:04:05+00')").await;
    assert_events(
        &evs,
        &[(
            "clients.accounts.create",
            json!(5),
            json!({"acc_no": 5, "customer_no": 1001, "login": "l", "blocked": false, "created_at": TS_JSON}),
        )],
    );
    assert_eq!(evs[0].entity, "accounts");
    assert_events(
        &change(c, "UPDATE billing.customer_accounts SET blocked = true, created_at = now() WHERE acc_no = 5").await,
        &[("clients.accounts.update", json!(5), json!({"acc_no": 5, "blocked": true}))],
    );
    assert_events(
        &change(c, "DELETE FROM billing.customer_accounts WHERE acc_no = 5").await,
        &[("clients.accounts.delete", json!(5), json!({}))],
    );

    // subscriptions with their own status values and "paid until" column
    let evs = change(c, "INSERT INTO billing.subscriptions (sub_no, customer_no, plan, valid_to) VALUES (9, 1001, 'gold', '2024-01-31')").await;
    assert_events(
        &evs,
        &[(
            "clients.subscriptions.assign",
            json!(9),
            json!({"sub_no": 9, "customer_no": 1001, "plan": "gold", "state": "draft", "valid_to": "2024-01-31"}),
        )],
    );
    assert_eq!(evs[0].entity, "client_packages");
    assert_events(
        &change(
            c,
            "UPDATE billing.subscriptions SET valid_to = '2024-02-10' WHERE sub_no = 9",
        )
        .await,
        &[],
    );
    assert_events(
        &change(
            c,
            "UPDATE billing.subscriptions SET state = 'live' WHERE sub_no = 9",
        )
        .await,
        &[(
            "clients.subscriptions.activate",
            json!(9),
            json!({"sub_no": 9, "state": "live"}),
        )],
    );
    assert_events(
        &change(
            c,
            "UPDATE billing.subscriptions SET valid_to = '2024-02-29' WHERE sub_no = 9",
        )
        .await,
        &[(
            "clients.subscriptions.renew",
            json!(9),
            json!({"sub_no": 9, "valid_to": "2024-02-29"}),
        )],
    );
    assert_events(
        &change(
            c,
            "UPDATE billing.subscriptions SET state = 'paused' WHERE sub_no = 9",
        )
        .await,
        &[(
            "clients.subscriptions.deactivate",
            json!(9),
            json!({"sub_no": 9, "state": "paused"}),
        )],
    );
    assert_events(
        &change(
            c,
            "UPDATE billing.subscriptions SET state = 'ended' WHERE sub_no = 9",
        )
        .await,
        &[("clients.subscriptions.close", json!(9), json!({}))],
    );
    assert_events(
        &change(c, "DELETE FROM billing.subscriptions WHERE sub_no = 9").await,
        &[("clients.subscriptions.close", json!(9), json!({}))],
    );

    // archive by the custom archived value, with a title change: archive only
    assert_events(
        &change(c, "UPDATE billing.customers SET state = 'closed', title = 'Gamma' WHERE customer_no = 1001").await,
        &[("clients.archive", json!(1001), json!({}))],
    );
    assert_events(
        &change(c, "DELETE FROM billing.customers WHERE customer_no = 1001").await,
        &[("clients.delete", json!(1001), json!({}))],
    );
}

// ---------------------------------------------------------------------------------------------
// Declaration errors
// ---------------------------------------------------------------------------------------------

/// Run a statement that must fail; return the server's error message.
async fn db_error(c: &Client, sql: &str) -> String {
    let err = c
        .batch_execute(sql)
        .await
        .expect_err(&format!("must fail: {sql}"));
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a database error: {err:?}"));
    db.message().to_string()
}

async fn prov_trigger_count(c: &Client) -> i64 {
    count(
        c,
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'prov\\_%'",
    )
    .await
}

#[tokio::test]
async fn declaration_errors_name_the_event_and_the_problem() {
    let db = vcs_db().await;
    let c = &db.client;
    let triggers = prov_trigger_count(c).await;
    let declared = count(c, "SELECT count(*) FROM provisioning.capture_events").await;

    // syntax error in the condition
    let msg = db_error(c, "SELECT provisioning.declare_event('clients.rich', 'clients', 'update', 'new.balance >', 'empty')").await;
    assert!(
        msg.contains("clients.rich") && msg.contains("syntax error"),
        "{msg}"
    );

    // unknown column in the condition
    let msg = db_error(c, "SELECT provisioning.declare_event('clients.rich', 'clients', 'update', 'old.blance > 0', 'empty')").await;
    assert!(
        msg.contains("clients.rich") && msg.contains("blance") && msg.contains("does not exist"),
        "{msg}"
    );

    // a condition that is not boolean
    let msg = db_error(c, "SELECT provisioning.declare_event('clients.rich', 'clients', 'update', 'new.balance', 'empty')").await;
    assert!(
        msg.contains("clients.rich") && msg.contains("boolean"),
        "{msg}"
    );

    // old.* on insert
    let msg = db_error(c, "SELECT provisioning.declare_event('clients.vip', 'clients', 'insert', 'old.balance > 0', 'row')").await;
    assert!(
        msg.contains("clients.vip") && msg.to_lowercase().contains("old"),
        "{msg}"
    );

    // unknown table: the regclass argument itself is refused, naming the table
    let msg = db_error(c, "SELECT provisioning.declare_event('clients.rich', 'no_such_table', 'update', NULL, 'empty')").await;
    assert!(
        msg.contains("relation \"no_such_table\" does not exist"),
        "{msg}"
    );

    // unknown excluded column
    let msg = db_error(
        c,
        "SELECT provisioning.declare_event('clients.rich', 'clients', 'update', NULL, 'changed', ARRAY['balance', 'no_such_col'])",
    )
    .await;
    assert!(
        msg.contains("clients.rich")
            && msg.contains("no_such_col")
            && msg.contains("does not exist"),
        "{msg}"
    );

    // a table with no capture attached
    c.batch_execute("CREATE TABLE plain (id int PRIMARY KEY, v int)")
        .await
        .unwrap();
    let msg = db_error(
        c,
        "SELECT provisioning.declare_event('plain.changed', 'plain', 'update', NULL, 'changed')",
    )
    .await;
    assert!(
        msg.contains("plain.changed") && msg.contains("no capture attached"),
        "{msg}"
    );

    // unknown operation / data shape / json column / bad event name
    let msg = db_error(
        c,
        "SELECT provisioning.declare_event('clients.rich', 'clients', 'upsert', NULL, 'empty')",
    )
    .await;
    assert!(
        msg.contains("clients.rich") && msg.contains("operation"),
        "{msg}"
    );
    let msg = db_error(c, "SELECT provisioning.declare_event('clients.rich', 'clients', 'update', NULL, 'everything')").await;
    assert!(
        msg.contains("clients.rich") && msg.contains("data shape"),
        "{msg}"
    );
    let msg = db_error(c, "SELECT provisioning.declare_event('clients.rich', 'clients', 'update', NULL, 'json_keys', p_json_column => 'name')").await;
    assert!(
        msg.contains("clients.rich") && msg.contains("json"),
        "{msg}"
    );
    let msg = db_error(
        c,
        "SELECT provisioning.declare_event('Rich Clients', 'clients', 'update', NULL, 'empty')",
    )
    .await;
    assert!(msg.contains("Rich Clients"), "{msg}");

    // attach with an unknown key column
    let msg = db_error(c, "SELECT provisioning.attach('plain', 'plain', 'no_key')").await;
    assert!(
        msg.contains("no_key") && msg.contains("does not exist"),
        "{msg}"
    );

    // nothing was left behind by the failures
    assert_eq!(prov_trigger_count(c).await, triggers);
    assert_eq!(
        count(c, "SELECT count(*) FROM provisioning.capture_events").await,
        declared
    );

    // a failed redeclaration keeps the previous declaration working
    let msg = db_error(c, "SELECT provisioning.declare_event('clients.balance_zero', 'clients', 'update', 'old.blance > 0', 'empty')").await;
    assert!(
        msg.contains("clients.balance_zero") && msg.contains("blance"),
        "{msg}"
    );
    assert_eq!(prov_trigger_count(c).await, triggers);
    client_with_balance(c, 1, "5").await;
    assert_events(
        &change(c, "UPDATE clients SET balance = 0 WHERE id = 1").await,
        &[("clients.balance_zero", json!(1), json!({}))],
    );

    // and a correct declaration works: a custom event on a plain table
    c.batch_execute(
        "SELECT provisioning.attach('plain', 'plain', 'id');
         SELECT provisioning.declare_event('plain.big', 'plain', 'update', 'new.v > 100 AND old.v <= 100', 'changed');",
    )
    .await
    .unwrap();
    c.batch_execute("INSERT INTO plain VALUES (1, 1)")
        .await
        .unwrap();
    assert_events(
        &change(c, "UPDATE plain SET v = 50 WHERE id = 1").await,
        &[],
    );
    let evs = change(c, "UPDATE plain SET v = 101 WHERE id = 1").await;
    assert_events(&evs, &[("plain.big", json!(1), json!({"id": 1, "v": 101}))]);
    assert_eq!(evs[0].entity, "plain");
}

/// Client 1 (balance 5) and an application transaction that has changed it and not committed: it
/// holds the lock on `clients` that any trigger DDL there (checking a condition too) waits for.
async fn writer_in_flight(db: &TestDb) -> Client {
    client_with_balance(&db.client, 1, "5").await;
    let writer = db.connect().await;
    writer
        .batch_execute("BEGIN; UPDATE clients SET name = 'in flight' WHERE id = 1")
        .await
        .unwrap();
    writer
}

#[tokio::test]
async fn a_declaration_that_cannot_lock_the_table_says_so() {
    let db = vcs_db().await;
    let writer = writer_in_flight(&db).await;
    let dba = db.connect().await;
    let err = dba
        .batch_execute(
            "SET lock_timeout = '200ms';
             SELECT provisioning.declare_event('clients.rich', 'clients', 'update', 'new.balance > 1000', 'empty');",
        )
        .await
        .expect_err("the condition check needs a lock the writer holds");
    let db_err = err.as_db_error().expect("a database error");
    let msg = db_err.message();
    // not "invalid condition": the condition is fine, the table was busy
    assert!(
        msg.contains("clients.rich")
            && msg.contains("cannot check the condition")
            && msg.contains("lock timeout"),
        "{msg}"
    );
    assert_eq!(db_err.code().code(), "55P03", "{msg}");
    assert!(db_err.hint().is_some_and(|h| h.contains("try again")));
    writer.batch_execute("COMMIT").await.unwrap();
    dba.batch_execute(
        "RESET lock_timeout;
         SELECT provisioning.declare_event('clients.rich', 'clients', 'update', 'new.balance > 1000', 'empty');",
    )
    .await
    .expect("the same declaration once the table is free");
}

#[tokio::test]
async fn declarations_name_tables_the_same_way_whatever_the_search_path() {
    let db = vcs_db().await;
    let c = &db.client;
    // captures, capture_events and events all use the schema-qualified name
    let rels: Vec<String> = c
        .query("SELECT relation FROM provisioning.captures ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rels,
        [
            "public.accounts",
            "public.client_packages",
            "public.clients"
        ]
    );
    let evs = change(c, "INSERT INTO clients (id, name) VALUES (1, 'one')").await;
    assert_eq!(evs[0].relation, "public.clients");
    assert_eq!(
        count(c, "SELECT count(*) FROM provisioning.captures WHERE relation = (SELECT relation FROM provisioning.events LIMIT 1)").await,
        1
    );

    // a session without public on its search_path manages the same declarations
    let triggers = prov_trigger_count(c).await;
    c.batch_execute(
        "SET search_path = pg_catalog;
         SELECT provisioning.refresh('public.clients');
         SELECT provisioning.declare_event('clients.big_credit', 'public.clients', 'update', 'new.credit > 1000', 'empty');",
    )
    .await
    .expect("declarations work with another search_path");
    // the table's update capture is regenerated: the new event reads another column (credit) than
    // the group before it, so it gets a trigger of its own, and nothing else is added
    assert_eq!(prov_trigger_count(c).await, triggers + 1);
    let evs = change(
        c,
        "UPDATE public.clients SET credit = 5000, name = 'rich' WHERE id = 1",
    )
    .await;
    assert_eq!(names(&evs), ["clients.update", "clients.big_credit"]);
    c.batch_execute("SELECT provisioning.detach('public.accounts'); RESET search_path;")
        .await
        .unwrap();
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM provisioning.capture_events WHERE relation = 'public.accounts'"
        )
        .await,
        0
    );
    assert_eq!(count(c, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'accounts'::regclass AND tgname LIKE 'prov\\_%'").await, 0);
    assert_events(
        &change(
            c,
            "INSERT INTO accounts (id, client_id, login) VALUES (1, 1, 'x')",
        )
        .await,
        &[],
    );
}

#[tokio::test]
async fn declarations_on_unusual_tables() {
    let db = vcs_db().await;
    let c = &db.client;
    c.batch_execute(
        r#"CREATE TABLE "Odd Table" ("Key" int PRIMARY KEY, doc json, note text, big_column_name_here int);
           SELECT provisioning.attach('"Odd Table"', 'odd', 'Key');"#,
    )
    .await
    .unwrap();

    // a json column (no equality operator) in a "changed" event
    c.batch_execute(r#"SELECT provisioning.declare_event('odd.update', '"Odd Table"', 'update', NULL, 'changed')"#)
        .await
        .expect("a table with a json column can have a changed event");
    c.batch_execute(r#"INSERT INTO "Odd Table" VALUES (1, '{"a": 1}', 'n', 0)"#)
        .await
        .unwrap();
    let evs = change(
        c,
        r#"UPDATE "Odd Table" SET doc = '{"a": 2}' WHERE "Key" = 1"#,
    )
    .await;
    assert_events(
        &evs,
        &[("odd.update", json!(1), json!({"Key": 1, "doc": {"a": 2}}))],
    );
    assert_eq!(evs[0].relation, "public.\"Odd Table\"");
    // same document, other spelling: no change
    assert_events(
        &change(
            c,
            r#"UPDATE "Odd Table" SET doc = '{ "a" : 2 }' WHERE "Key" = 1"#,
        )
        .await,
        &[],
    );

    // a json (not jsonb) column reported by a json_keys event: it fires when the document changed,
    // not when only its spelling did, nor on updates of other columns (checked below: a change
    // of note fires no odd.doc.update)
    c.batch_execute(r#"SELECT provisioning.declare_event('odd.doc.update', '"Odd Table"', 'update', NULL, 'json_keys', p_json_column => 'doc')"#)
        .await
        .expect("a json_keys event on a json column");
    assert_events(
        &change(
            c,
            r#"UPDATE "Odd Table" SET doc = '{"a": 2, "b": 1}' WHERE "Key" = 1"#,
        )
        .await,
        &[
            (
                "odd.update",
                json!(1),
                json!({"Key": 1, "doc": {"a": 2, "b": 1}}),
            ),
            (
                "odd.doc.update",
                json!(1),
                json!({"Key": 1, "doc": {"b": 1}}),
            ),
        ],
    );
    assert_events(
        &change(
            c,
            r#"UPDATE "Odd Table" SET doc = '{ "b": 1, "a": 2 }' WHERE "Key" = 1"#,
        )
        .await,
        &[],
    );

    // long event names declared for two operations get distinct trigger names
    let long = "odd.a_very_long_event_name_that_does_not_fit_in_a_trigger_name";
    c.batch_execute(&format!(
        r#"SELECT provisioning.declare_event('{long}', '"Odd Table"', 'update', 'new.note IS DISTINCT FROM old.note', 'empty', p_position => 50);
           SELECT provisioning.declare_event('{long}', '"Odd Table"', 'delete', NULL, 'empty', p_position => 50);
           SELECT provisioning.declare_event('{long}', '"Odd Table"', 'update', 'new.note IS DISTINCT FROM old.note', 'empty', p_position => 50);"#
    ))
    .await
    .expect("long event names for two operations");
    let evs = change(c, r#"UPDATE "Odd Table" SET note = 'm' WHERE "Key" = 1"#).await;
    assert_eq!(names(&evs), ["odd.update", long]);
    let evs = change(c, r#"DELETE FROM "Odd Table" WHERE "Key" = 1"#).await;
    assert_events(&evs, &[(long, json!(1), json!({}))]);
    assert_eq!(evs[0].operation, "delete");

    // a new column is watched after refresh()
    c.batch_execute(
        r#"INSERT INTO "Odd Table" VALUES (2, '{}', 'n', 0);
           ALTER TABLE "Odd Table" ADD COLUMN added text;
           SELECT provisioning.refresh('"Odd Table"');"#,
    )
    .await
    .unwrap();
    let evs = change(c, r#"UPDATE "Odd Table" SET added = 'x' WHERE "Key" = 2"#).await;
    assert_events(
        &evs,
        &[("odd.update", json!(2), json!({"Key": 2, "added": "x"}))],
    );

    // re-attaching with another entity and key column regenerates the triggers
    c.batch_execute(r#"SELECT provisioning.attach('"Odd Table"', 'odd_by_note', 'note')"#)
        .await
        .unwrap();
    let evs = change(
        c,
        r#"UPDATE "Odd Table" SET big_column_name_here = 1 WHERE "Key" = 2"#,
    )
    .await;
    assert_events(
        &evs,
        &[(
            "odd.update",
            json!("n"),
            json!({"note": "n", "big_column_name_here": 1}),
        )],
    );
    assert_eq!(evs[0].entity, "odd_by_note");
}

// ---------------------------------------------------------------------------------------------
// Handler definitions (SPEC §4) and fan-out into deliveries
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_handler_rows_are_refused_naming_the_field() {
    let db = vcs_db().await;
    let c = &db.client;
    // (column overrides, field named in the error)
    let cases: &[(&str, &str, &str)] = &[
        ("events", "'{clients.nosuch}'", "events"),
        ("events", "'{nosuch.*}'", "events"),
        ("events", "'{}'", "events"),
        ("target", "'http//broken'", "target"),
        ("target", "'http://'", "target"),
        ("target", "'not a url'", "target"),
        ("target", "'ftp://example.com/hook'", "target"),
        ("kind, target", "'script', 'bin/handler.sh'", "target"),
        ("kind, target", "'script', './handler.sh'", "target"),
        ("timeout_ms", "0", "timeout_ms"),
        ("timeout_ms", "-5", "timeout_ms"),
        ("status", "'on'", "status"),
        ("stage", "'during'", "stage"),
        ("format", "'xml'", "format"),
        ("kind", "'smtp'", "kind"),
        ("headers", r#"'{"X-Num": 1}'"#, "headers"),
        ("headers", r#"'{"bad header": "x"}'"#, "headers"),
        ("headers", r#"'["X-A"]'"#, "headers"),
        ("name", "'has space'", "name"),
    ];
    for (cols, vals, field) in cases {
        let (base_cols, base_vals) = base_handler(cols);
        let sql = format!(
            "INSERT INTO provisioning.handlers ({base_cols}{cols}) VALUES ({base_vals}{vals})"
        );
        let msg = db_error(c, &sql).await;
        assert!(
            msg.contains(&format!("field \"{field}\"")),
            "{sql}\n  -> {msg}"
        );
    }
    // updating a good handler into a bad one is refused the same way
    c.batch_execute("INSERT INTO provisioning.handlers (name, events, kind, target) VALUES ('ok', '{clients.update}', 'http', 'https://example.com/x')")
        .await
        .unwrap();
    let msg = db_error(
        c,
        "UPDATE provisioning.handlers SET target = 'ftp://x' WHERE name = 'ok'",
    )
    .await;
    assert!(msg.contains("field \"target\""), "{msg}");
    assert_eq!(
        count(c, "SELECT count(*) FROM provisioning.handlers").await,
        1
    );

    // good definitions are accepted
    c.batch_execute(
        r#"INSERT INTO provisioning.handlers (name, events, kind, target, headers, timeout_ms, secret)
               VALUES ('softswitch', '{clients.balance_zero,clients.balance_notzero}', 'http',
                       'http://127.0.0.1:8080/api?x=1', '{"Authorization": "Bearer t"}', 5000, 'whsec_c2VjcmV0c2VjcmV0');
           INSERT INTO provisioning.handlers (name, events, kind, target, args, stage)
               VALUES ('crm-script', '{clients.create}', 'script', '/usr/local/bin/crm-sync', '{--verbose}', 'before');
           INSERT INTO provisioning.handlers (name, events, kind, target, format, status)
               VALUES ('everything-clients', '{clients.*}', 'http', 'https://crm.example.com:8443/hooks', 'full', 'paused');
           INSERT INTO provisioning.handlers (name, events, kind, target)
               VALUES ('all', '{*}', 'http', 'https://example.com/all');"#,
    )
    .await
    .expect("valid handlers are accepted");
    assert_eq!(
        count(c, "SELECT count(*) FROM provisioning.handlers").await,
        5
    );
}

/// Columns and values of a valid handler, minus the columns given (which the caller supplies).
fn base_handler(overridden: &str) -> (String, String) {
    let all = [
        ("name", "'h1'"),
        ("events", "'{clients.update}'"),
        ("kind", "'http'"),
        ("target", "'http://example.com/hook'"),
    ];
    let over: Vec<&str> = overridden.split(',').map(str::trim).collect();
    let mut cols = String::new();
    let mut vals = String::new();
    for (col, val) in all {
        if !over.contains(&col) {
            cols.push_str(col);
            cols.push_str(", ");
            vals.push_str(val);
            vals.push_str(", ");
        }
    }
    (cols, vals)
}

#[tokio::test]
async fn events_reach_only_subscribed_live_handlers() {
    let db = vcs_db().await;
    let c = &db.client;
    client_with_balance(c, 1, "5").await;
    c.batch_execute(
        "INSERT INTO provisioning.handlers (name, events, kind, target, status, priority) VALUES
             ('enabled',  '{clients.*}',      'http', 'http://127.0.0.1:9/a', 'enabled', 10),
             ('disabled', '{clients.*}',      'http', 'http://127.0.0.1:9/b', 'disabled', 10),
             ('paused',   '{clients.update}', 'http', 'http://127.0.0.1:9/c', 'paused', 20),
             ('archived', '{clients.*}',      'http', 'http://127.0.0.1:9/d', 'archived', 10),
             ('other',    '{clients.delete,clients.accounts.*}', 'http', 'http://127.0.0.1:9/e', 'enabled', 10);",
    )
    .await
    .unwrap();
    // the insert above happened before any handler existed: no deliveries for it
    assert_eq!(
        count(c, "SELECT count(*) FROM provisioning.deliveries").await,
        0
    );

    let evs = change(c, "UPDATE clients SET name = 'renamed' WHERE id = 1").await;
    assert_eq!(names(&evs), ["clients.update"]);
    let ev = evs[0].id;
    let rows = c
        .query(
            "SELECT h.name, d.status, d.stage, d.priority, d.entity, d.object_key, d.attempts
               FROM provisioning.deliveries d JOIN provisioning.handlers h ON h.id = d.handler_id
              WHERE d.event_id = $1 ORDER BY h.name",
            &[&ev],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, String, i32, String, String, i32)> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        got[0],
        (
            "enabled".into(),
            "pending".into(),
            "after".into(),
            10,
            "clients".into(),
            "1".into(),
            0
        )
    );
    assert_eq!(got[1].0, "paused");
    assert!(got[1].1 == "pending" || got[1].1 == "waiting", "{got:?}");
    assert_eq!(
        (got[1].3, got[1].4.as_str(), got[1].5.as_str()),
        (20, "clients", "1")
    );

    // a handler created after the event gets nothing for it, but does get later events
    c.batch_execute("INSERT INTO provisioning.handlers (name, events, kind, target) VALUES ('late', '{clients.*}', 'http', 'http://127.0.0.1:9/f')")
        .await
        .unwrap();
    assert_eq!(
        count(
            c,
            &format!(
                "SELECT count(*) FROM provisioning.deliveries d JOIN provisioning.handlers h ON h.id = d.handler_id
                  WHERE h.name = 'late' AND d.event_id <= {ev}"
            )
        )
        .await,
        0
    );
    let evs = change(c, "UPDATE clients SET balance = 0 WHERE id = 1").await;
    assert_eq!(names(&evs), ["clients.balance_zero"]);
    assert_eq!(delivered_to(c, evs[0].id).await, ["enabled", "late"]);

    // routes follow later declarations (a pattern subscribes to events declared after it) and
    // status changes (a disabled handler gets nothing from then on)
    c.batch_execute(
        "SELECT provisioning.declare_event('clients.vip', 'clients', 'update', 'new.credit > 1000', 'empty');
         UPDATE provisioning.handlers SET status = 'disabled' WHERE name = 'late';",
    )
    .await
    .unwrap();
    let evs = change(c, "UPDATE clients SET credit = 5000 WHERE id = 1").await;
    assert_eq!(names(&evs), ["clients.update", "clients.vip"]);
    for (ev, expected) in [
        (&evs[0], vec!["enabled", "paused"]),
        (&evs[1], vec!["enabled"]),
    ] {
        assert_eq!(delivered_to(c, ev.id).await, expected, "{}", ev.name);
    }

    // suppressed changes create neither events nor deliveries
    let deliveries = count(c, "SELECT count(*) FROM provisioning.deliveries").await;
    assert_events(
        &change(c, "BEGIN; SET LOCAL provisioning.suppress = 'on'; UPDATE clients SET name = 'quiet' WHERE id = 1; COMMIT;").await,
        &[],
    );
    assert_eq!(
        count(c, "SELECT count(*) FROM provisioning.deliveries").await,
        deliveries
    );

    // a rolled-back change leaves no deliveries either
    c.batch_execute("BEGIN; UPDATE clients SET name = 'gone' WHERE id = 1; ROLLBACK;")
        .await
        .unwrap();
    assert_eq!(
        count(c, "SELECT count(*) FROM provisioning.deliveries").await,
        deliveries
    );
}

/// The handlers an event got deliveries for, by name.
async fn delivered_to(c: &Client, event_id: i64) -> Vec<String> {
    let mut names = delivery_order(c, event_id).await;
    names.sort();
    names
}

/// The handlers an event got deliveries for, in delivery-id order.
async fn delivery_order(c: &Client, event_id: i64) -> Vec<String> {
    c.query(
        "SELECT h.name FROM provisioning.deliveries d JOIN provisioning.handlers h ON h.id = d.handler_id
          WHERE d.event_id = $1 ORDER BY d.id",
        &[&event_id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Wait until some session waits for the routes lock.
async fn wait_for_routes_lock_waiter(db: &TestDb, what: &str) {
    crate::common::eventually(std::time::Duration::from_secs(10), what, || async {
        (count(
            &db.client,
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'provisioning.routes'::regclass",
        )
        .await
            > 0)
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn concurrent_handler_changes_both_reach_the_routes() {
    let db = vcs_db().await;
    let (a, b) = (db.connect().await, db.connect().await);
    a.batch_execute("BEGIN; INSERT INTO provisioning.handlers (name, events, kind, target) VALUES ('a', '{clients.*}', 'http', 'http://127.0.0.1:9/a')")
        .await
        .unwrap();
    // b's rebuild waits for a's transaction, then sees a's handler as committed
    let second = tokio::spawn(async move {
        b.batch_execute("BEGIN; INSERT INTO provisioning.handlers (name, events, kind, target) VALUES ('b', '{clients.delete}', 'http', 'http://127.0.0.1:9/b'); COMMIT;")
            .await
            .unwrap();
    });
    wait_for_routes_lock_waiter(&db, "b waits for a's routes lock").await;
    a.batch_execute("COMMIT").await.unwrap();
    second.await.unwrap();
    let routes: Vec<(String, String)> = db
        .client
        .query(
            "SELECT r.event, h.name FROM provisioning.routes r JOIN provisioning.handlers h ON h.id = r.handler_id
              WHERE r.event IN ('clients.delete', 'clients.create') ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        routes,
        [
            ("clients.create".to_string(), "a".to_string()),
            ("clients.delete".to_string(), "a".to_string()),
            ("clients.delete".to_string(), "b".to_string()),
        ]
    );
}

#[tokio::test]
async fn handler_writers_queue_for_the_routes_without_deadlocking() {
    let db = vcs_db().await;
    db.client
        .batch_execute("INSERT INTO provisioning.handlers (name, events, kind, target) VALUES ('h', '{clients.*}', 'http', 'http://127.0.0.1:9/h')")
        .await
        .unwrap();
    let (operator, relay) = (db.connect().await, db.connect().await);
    // an operator's transaction changes declarations (holding the routes lock) and then a handler
    operator
        .batch_execute("BEGIN; SELECT provisioning.declare_event('clients.vip', 'clients', 'update', 'new.credit > 1000', 'empty')")
        .await
        .unwrap();
    // meanwhile the relay pauses that handler (a 410): it queues before taking the row's lock
    let pause = tokio::spawn(async move {
        relay
            .batch_execute("UPDATE provisioning.handlers SET status = 'paused' WHERE name = 'h'")
            .await
    });
    wait_for_routes_lock_waiter(&db, "the pause waits for the routes lock").await;
    operator
        .batch_execute("UPDATE provisioning.handlers SET priority = 5 WHERE name = 'h'; COMMIT;")
        .await
        .expect("no deadlock for the operator");
    pause.await.unwrap().expect("no deadlock for the relay");
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.routes r JOIN provisioning.handlers h ON h.id = r.handler_id
                            WHERE h.status = 'paused' AND h.priority = 5 AND r.priority = 5 AND r.event = 'clients.vip'").await,
        1
    );
}

#[tokio::test]
async fn handler_changes_rewrite_capture_without_waiting_for_writers() {
    let db = vcs_db().await;
    let c = &db.client;
    // The capture functions carry their routes as literals and a handler change rewrites them.
    // That must not lock the captured table, which an uncommitted application change holds.
    let writer = writer_in_flight(&db).await;
    let operator = db.connect().await;
    operator
        .batch_execute(
            "SET lock_timeout = '5s';
             INSERT INTO provisioning.handlers (name, events, kind, target, priority) VALUES
                 ('first',  '{clients.*}', 'http', 'http://127.0.0.1:9/a', 5),
                 ('second', '{clients.update,clients.balance_zero}', 'http', 'http://127.0.0.1:9/b', 50);",
        )
        .await
        .expect("a handler change does not wait for the writers of captured tables");
    writer.batch_execute("COMMIT").await.unwrap();
    // the writer's change was captured before the handlers existed
    let first_event = last_event_id(c).await;
    assert_eq!(delivery_order(c, first_event).await, Vec::<String>::new());

    // the next changes are routed by the rewritten code, deliveries in priority order
    let evs = change(c, "UPDATE clients SET name = 'routed' WHERE id = 1").await;
    assert_eq!(names(&evs), ["clients.update"]);
    assert_eq!(delivery_order(c, evs[0].id).await, ["first", "second"]);
    let evs = change(c, "UPDATE clients SET balance = 0 WHERE id = 1").await;
    assert_eq!(names(&evs), ["clients.balance_zero"]);
    assert_eq!(delivery_order(c, evs[0].id).await, ["first", "second"]);

    // a priority change reorders; a disabled handler drops out; an event nobody subscribes to
    // is still stored (for replays), with no deliveries
    operator
        .batch_execute(
            "UPDATE provisioning.handlers SET priority = 90 WHERE name = 'first';
             UPDATE provisioning.handlers SET status = 'disabled' WHERE name = 'second';",
        )
        .await
        .unwrap();
    assert_events(
        &change(c, "UPDATE clients SET balance = -2 WHERE id = 1").await,
        &[],
    );
    let evs = change(c, "UPDATE clients SET balance = 3 WHERE id = 1").await;
    assert_eq!(names(&evs), ["clients.balance_notzero"]);
    assert_eq!(delivery_order(c, evs[0].id).await, ["first"]);
    operator
        .batch_execute("UPDATE provisioning.handlers SET status = 'enabled' WHERE name = 'second'")
        .await
        .unwrap();
    let evs = change(c, "UPDATE clients SET name = 'again' WHERE id = 1").await;
    assert_eq!(delivery_order(c, evs[0].id).await, ["second", "first"]);
    operator
        .batch_execute("DELETE FROM provisioning.handlers")
        .await
        .unwrap();
    let evs = change(c, "UPDATE clients SET name = 'unrouted' WHERE id = 1").await;
    assert_eq!(names(&evs), ["clients.update"]);
    assert_eq!(delivery_order(c, evs[0].id).await, Vec::<String>::new());
}

/// Without the DDL event trigger (an install by a non-superuser), a renamed table is not
/// followed: it keeps capturing under its old name with the routes it had, until the next install.
#[tokio::test]
async fn a_routing_change_leaves_a_renamed_tables_capture_running() {
    let db = vcs_db().await;
    let c = &db.client;
    client_with_balance(c, 1, "5").await;
    c.batch_execute(
        "ALTER EVENT TRIGGER provisioning_refresh_on_ddl DISABLE;
         INSERT INTO provisioning.handlers (name, events, kind, target) VALUES ('a', '{clients.*}', 'http', 'http://127.0.0.1:9/a');
         ALTER TABLE clients RENAME TO customers;
         INSERT INTO provisioning.handlers (name, events, kind, target) VALUES ('b', '{clients.*}', 'http', 'http://127.0.0.1:9/b');",
    )
    .await
    .expect("a handler change succeeds although a captured table was renamed");
    // its triggers still run the functions generated for the old name, with the routes they had
    let evs = change(
        c,
        "UPDATE customers SET name = 'renamed table' WHERE id = 1",
    )
    .await;
    assert_eq!(names(&evs), ["clients.update"]);
    assert_eq!(delivery_order(c, evs[0].id).await, ["a"]);
    // installing (again, or a newer version) follows the rename that nothing followed: the
    // capture moves to the new name with today's routes instead of being dropped as the capture
    // of a table that no longer exists
    relay::schema::migrate(c).await.expect("migrate again");
    let evs = change(c, "UPDATE customers SET name = 'followed' WHERE id = 1").await;
    assert_eq!(names(&evs), ["clients.update"]);
    assert_eq!(evs[0].relation, "public.customers");
    assert_eq!(delivery_order(c, evs[0].id).await, ["a", "b"]);
}

/// A captured table renamed, moved to another schema, or whose schema is renamed, keeps its
/// capture under the new name: its declarations move, its routes follow handler changes, its events
/// name it, and an event still waiting for a before-stage decision is applied to it.
#[tokio::test]
async fn a_renamed_table_or_schema_keeps_its_capture_under_the_new_name() {
    let db = vcs_db().await;
    let c = &db.client;
    client_with_balance(c, 1, "5").await;
    c.batch_execute(
        "INSERT INTO provisioning.handlers (name, events, kind, target) VALUES ('a', '{clients.*}', 'http', 'http://127.0.0.1:9/a');
         ALTER TABLE clients RENAME TO customers;
         INSERT INTO provisioning.handlers (name, events, kind, target) VALUES ('b', '{clients.update}', 'http', 'http://127.0.0.1:9/b');",
    )
    .await
    .unwrap();
    let evs = change(c, "UPDATE customers SET name = 'renamed' WHERE id = 1").await;
    assert_eq!(names(&evs), ["clients.update"]);
    assert_eq!(evs[0].relation, "public.customers");
    assert_eq!(delivery_order(c, evs[0].id).await, ["a", "b"]);

    // an event held by a before-stage handler, then the table moves to another schema
    c.batch_execute(
        "INSERT INTO provisioning.handlers (name, events, kind, target, stage) VALUES ('gate', '{clients.update}', 'http', 'http://127.0.0.1:9/g', 'before');",
    )
    .await
    .unwrap();
    let held = change(c, "UPDATE customers SET name = 'held' WHERE id = 1").await;
    c.batch_execute(
        "CREATE SCHEMA billing;
         ALTER TABLE customers SET SCHEMA billing;
         ALTER SCHEMA billing RENAME TO crm;",
    )
    .await
    .unwrap();
    assert_eq!(
        count(c, &format!("SELECT count(*) FROM provisioning.events WHERE id = {} AND relation = 'crm.customers'", held[0].id)).await,
        1,
        "the held event names the table where its decision will be applied"
    );
    assert_eq!(
        count(c, &format!("SELECT count(*) FROM provisioning.events WHERE id = {} AND relation = 'public.customers'", evs[0].id)).await,
        1,
        "finished events keep the name they were captured under"
    );
    let evs = change(c, "UPDATE crm.customers SET balance = -1 WHERE id = 1").await;
    assert_eq!(names(&evs), ["clients.balance_zero"]);
    assert_eq!(evs[0].relation, "crm.customers");
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM provisioning.captures WHERE relation IN ('crm.customers', 'public.accounts', 'public.client_packages')"
        )
        .await,
        3
    );
    // the functions generated for the old names are gone; the new ones run the table's triggers
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'provisioning'::regnamespace AND proname ~ '^capture_(insert|update|delete)_(clients|customers)_'"
        )
        .await,
        count(
            c,
            "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
              WHERE t.tgrelid = 'crm.customers'::regclass AND p.proname ~ '^capture_(insert|update|delete)_customers_'"
        )
        .await,
    );
}

// ---------------------------------------------------------------------------------------------
// The generated capture code
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn generated_capture_code_is_static_and_one_trigger_per_operation() {
    let db = vcs_db().await;
    let c = &db.client;
    let bodies: Vec<(String, String)> = c
        .query(
            "SELECT p.proname::text, p.prosrc FROM pg_proc p
              WHERE p.pronamespace = 'provisioning'::regnamespace AND p.proname LIKE 'capture\\_%\\_%'
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // insert and delete on each of the three preset tables; update in column groups: clients 4
    // (details, custom fields, balance, status), accounts 1, client_packages 2 (status + details,
    // status)
    assert_eq!(bodies.len(), 13, "{bodies:#?}");
    for (name, body) in &bodies {
        // no dynamic SQL per row
        assert!(!body.to_uppercase().contains("EXECUTE"), "{name}:\n{body}");
        assert!(body.contains("provisioning.suppress"), "{name}:\n{body}");
    }
    // the update capture of clients: its groups in trigger (= name) order
    let update: String = bodies
        .iter()
        .filter(|(n, _)| n.starts_with("capture_update_clients_"))
        .map(|(_, b)| b.as_str())
        .collect();
    // the events appear in their documented order
    let positions: Vec<usize> = [
        "'clients.update'",
        "'clients.custom_fields.update'",
        "'clients.balance_zero'",
        "'clients.balance_notzero'",
        "'clients.archive'",
    ]
    .iter()
    .map(|e| update.find(e).unwrap_or_else(|| panic!("{e} in\n{update}")))
    .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{update}");

    // dropping the last event of an operation removes its trigger and function
    c.batch_execute("SELECT provisioning.drop_event('clients.accounts.delete')")
        .await
        .unwrap();
    assert_eq!(
        count(c, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'accounts'::regclass AND tgname = 'prov_capture_delete'").await,
        0
    );
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'capture\\_delete\\_accounts\\_%'"
        )
        .await,
        0
    );
    c.batch_execute("INSERT INTO clients (id, name) VALUES (1, 'one'); INSERT INTO accounts (id, client_id, login) VALUES (1, 1, 'x')")
        .await
        .unwrap();
    assert_events(&change(c, "DELETE FROM accounts WHERE id = 1").await, &[]);
    // detach removes the rest
    c.batch_execute("SELECT provisioning.detach('accounts')")
        .await
        .unwrap();
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'capture\\_%\\_accounts\\_%'"
        )
        .await,
        0
    );
    assert_eq!(
        count(c, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'accounts'::regclass AND NOT tgisinternal").await,
        0
    );
}

/// The generated code's search-path guard is an IMMUTABLE function, folded into a constant when
/// PL/pgSQL plans the IF that calls it; it stays right only because PL/pgSQL plans that IF again
/// whenever the session's effective search path changes. This pins that behaviour down (in a
/// function called the way the generated code calls it), so that a PostgreSQL release that
/// changed it would fail here rather than silently open the guard.
#[tokio::test]
async fn search_path_guard_follows_every_change_of_the_writers_path() {
    let db = vcs_db().await;
    let c = &db.client;
    c.batch_execute(
        "CREATE FUNCTION guard_probe() RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN
             IF provisioning.search_path_is_unusual() THEN RETURN true; END IF;
             RETURN false;
         END $$;",
    )
    .await
    .unwrap();
    // (statement run first, the guard's answer after it, why)
    let steps = [
        ("", false, "default path: pg_catalog is searched first"),
        ("", false, "the same again, from the cached plan"),
        (
            "SET search_path = public, pg_catalog",
            true,
            "a schema listed before pg_catalog",
        ),
        (
            "SET search_path = pg_catalog, public",
            false,
            "pg_catalog listed first",
        ),
        ("RESET search_path", false, "the default again"),
        ("BEGIN", false, "in a transaction, before any SET"),
        (
            "SET LOCAL search_path = public, pg_catalog",
            true,
            "SET LOCAL after the guard ran in this transaction",
        ),
        ("COMMIT", false, "the SET LOCAL ended with its transaction"),
        // a temporary schema is searched before pg_catalog for types and tables
        (
            "CREATE TEMP TABLE scratch (a int)",
            true,
            "the session now has a temporary schema",
        ),
        (
            "SET search_path = pg_catalog, pg_temp, public",
            false,
            "pg_catalog listed before pg_temp",
        ),
    ];
    for (sql, unusual, why) in steps {
        c.batch_execute(sql).await.unwrap();
        let got: bool = c
            .query_one("SELECT guard_probe()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, unusual, "after {sql:?}: {why}");
    }
    c.batch_execute("RESET search_path").await.unwrap();
}

#[tokio::test]
async fn conditions_mean_the_same_whatever_the_writers_search_path() {
    let db = vcs_db().await;
    let c = &db.client;
    // a DBA's helper function, found through the search_path at declaration time
    c.batch_execute(
        "CREATE SCHEMA rules;
         CREATE FUNCTION rules.is_vip(credit numeric) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT credit >= 1000';
         SET search_path = rules, public;
         SELECT provisioning.declare_event('clients.vip', 'clients', 'update', 'is_vip(new.credit) AND NOT is_vip(old.credit)', 'empty');
         RESET search_path;
         INSERT INTO clients (id, name) VALUES (1, 'one');",
    )
    .await
    .expect("declare with a helper function");
    let stored: String = c
        .query_one(
            "SELECT compiled_condition FROM provisioning.capture_events WHERE event = 'clients.vip'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored.contains("rules.is_vip"), "{stored}");

    // writers whose search_path does not contain `rules` (or anything) still capture
    let evs = change(
        c,
        "SET search_path = pg_catalog; UPDATE public.clients SET credit = 5000 WHERE id = 1; RESET search_path;",
    )
    .await;
    assert_eq!(names(&evs), ["clients.update", "clients.vip"]);
    // and a look-alike function earlier on a writer's search_path is not picked up
    c.batch_execute(
        "CREATE SCHEMA evil;
         CREATE FUNCTION evil.is_vip(credit numeric) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true';",
    )
    .await
    .unwrap();
    let evs = change(
        c,
        "SET search_path = evil, public; UPDATE clients SET name = 'renamed' WHERE id = 1; RESET search_path;",
    )
    .await;
    assert_eq!(names(&evs), ["clients.update"]);
    // nor an operator that shadows pg_catalog's for a writer who puts their schema first (the
    // capture code runs as the schema owner: this would be a privilege escalation)
    c.batch_execute(
        "CREATE FUNCTION evil.always_equal(numeric, numeric) RETURNS boolean LANGUAGE sql AS 'SELECT true';
         CREATE OPERATOR evil.= (LEFTARG = numeric, RIGHTARG = numeric, FUNCTION = evil.always_equal);",
    )
    .await
    .unwrap();
    let evs = change(
        c,
        "SET search_path = evil, pg_catalog, public; UPDATE clients SET credit = 7 WHERE id = 1; RESET search_path;",
    )
    .await;
    assert_eq!(names(&evs), ["clients.update"]);
    // the writer's search_path is theirs again after the change
    c.batch_execute("SET search_path = evil, pg_catalog, public")
        .await
        .unwrap();
    c.batch_execute("UPDATE clients SET credit = 9 WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(search_path(c).await, "evil, pg_catalog, public");
    c.batch_execute("RESET search_path").await.unwrap();
    // a session with temporary tables (pg_temp searched first) captures the same way
    let evs = change(
        c,
        "CREATE TEMP TABLE scratch (a int); UPDATE clients SET credit = 10 WHERE id = 1;",
    )
    .await;
    assert_eq!(names(&evs), ["clients.update"]);
}

#[tokio::test]
async fn application_roles_need_no_grants_and_cannot_forge_events() {
    let db = vcs_db().await;
    let c = &db.client;
    let role = format!("app_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    c.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN;
         GRANT SELECT, INSERT, UPDATE, DELETE ON clients TO {role};"
    ))
    .await
    .unwrap();
    let app = crate::common::connect(&db.url.replacen("postgres@", &format!("{role}@"), 1)).await;
    app.batch_execute(
        "INSERT INTO clients (id, name, balance) VALUES (1, 'one', 5);
         UPDATE clients SET balance = 0 WHERE id = 1;
         DELETE FROM clients WHERE id = 1;",
    )
    .await
    .expect("an application role with rights on its own table only can change it");
    assert_eq!(
        names(&events_since(c, 0).await),
        ["clients.create", "clients.balance_zero", "clients.delete"]
    );

    // writing events directly, or borrowing a generated capture function for a trigger of one's
    // own, is refused, even with usage on the schema
    let forge_insert = "INSERT INTO provisioning.events (name, entity, object_id, operation, data, relation)
                        VALUES ('clients.delete', 'clients', '7', 'delete', '{}', 'public.clients')";
    let capture_fn: String = c
        .query_one(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
              WHERE p.pronamespace = 'provisioning'::regnamespace AND p.proname LIKE 'capture\\_delete\\_clients\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let forge_trigger = format!(
        "CREATE TABLE my_clients (LIKE clients);
         CREATE TRIGGER forge AFTER DELETE ON my_clients FOR EACH ROW EXECUTE FUNCTION {capture_fn}"
    );
    for with_usage in [false, true] {
        if with_usage {
            c.batch_execute(&format!("GRANT USAGE ON SCHEMA provisioning TO {role}"))
                .await
                .unwrap();
        }
        let err = app
            .batch_execute(forge_insert)
            .await
            .expect_err("forged event");
        let refused = if with_usage {
            "permission denied for table events"
        } else {
            "permission denied for schema provisioning"
        };
        assert!(format!("{err:?}").contains(refused), "{err:?}");
    }
    assert_eq!(
        count(c, "SELECT count(*) FROM provisioning.events").await,
        3
    );
    c.batch_execute(&format!("GRANT CREATE ON SCHEMA public TO {role}"))
        .await
        .unwrap();
    let err = app
        .batch_execute(&forge_trigger)
        .await
        .expect_err("a trigger on the capture function of another table");
    assert!(
        format!("{err:?}")
            .contains("permission denied for function provisioning.capture_delete_clients_"),
        "{err:?}"
    );
    c.batch_execute(&format!("REVOKE CREATE ON SCHEMA public FROM {role}"))
        .await
        .unwrap();

    drop(app);
    c.batch_execute(&format!(
        "REVOKE ALL ON SCHEMA provisioning FROM {role}; REVOKE ALL ON clients FROM {role}; DROP ROLE {role};"
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn partitioned_tables_report_the_table_not_the_partition() {
    let db = vcs_db().await;
    let c = &db.client;
    c.batch_execute(
        "CREATE TABLE calls (id bigint, day date, cost numeric, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
         CREATE TABLE calls_2024 PARTITION OF calls FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         CREATE TABLE calls_2025 PARTITION OF calls FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         SELECT provisioning.attach('calls', 'calls', 'id');
         SELECT provisioning.declare_event('calls.create', 'calls', 'insert', NULL, 'row');
         SELECT provisioning.declare_event('calls.costly', 'calls', 'update', 'new.cost > 100', 'changed');",
    )
    .await
    .expect("capture on a partitioned table");
    let evs = change(
        c,
        "INSERT INTO calls VALUES (1, '2024-06-01', 5), (2, '2025-06-01', 7)",
    )
    .await;
    assert_eq!(names(&evs), ["calls.create", "calls.create"]);
    assert!(evs.iter().all(|e| e.relation == "public.calls"), "{evs:#?}");
    let evs = change(c, "UPDATE calls SET cost = 500 WHERE id = 2").await;
    assert_events(
        &evs,
        &[("calls.costly", json!(2), json!({"id": 2, "cost": 500}))],
    );
    assert_eq!(evs[0].relation, "public.calls");
    // a partition added later is captured too
    c.batch_execute("CREATE TABLE calls_2023 PARTITION OF calls FOR VALUES FROM ('2023-01-01') TO ('2024-01-01')")
        .await
        .unwrap();
    let evs = change(c, "INSERT INTO calls VALUES (3, '2023-06-01', 1)").await;
    assert_events(
        &evs,
        &[(
            "calls.create",
            json!(3),
            json!({"id": 3, "day": "2023-06-01", "cost": 1}),
        )],
    );
}

#[tokio::test]
async fn changed_events_on_columns_without_an_equality_operator() {
    let db = vcs_db().await;
    let c = &db.client;
    c.batch_execute(
        "CREATE TABLE sites (id int PRIMARY KEY, location point, doc xml, note text);
         SELECT provisioning.attach('sites', 'sites', 'id');
         SELECT provisioning.declare_event('sites.update', 'sites', 'update', NULL, 'changed');
         INSERT INTO sites VALUES (1, '(1,2)', '<a/>', 'n');",
    )
    .await
    .expect("changed event on point and xml columns");
    let evs = change(c, "UPDATE sites SET location = '(3,4)' WHERE id = 1").await;
    assert_events(
        &evs,
        &[(
            "sites.update",
            json!(1),
            json!({"id": 1, "location": "(3,4)"}),
        )],
    );
    let evs = change(c, "UPDATE sites SET doc = '<b/>' WHERE id = 1").await;
    assert_events(
        &evs,
        &[("sites.update", json!(1), json!({"id": 1, "doc": "<b/>"}))],
    );
    assert_events(
        &change(
            c,
            "UPDATE sites SET location = '(3,4)', doc = '<b/>' WHERE id = 1",
        )
        .await,
        &[],
    );
}

// ---------------------------------------------------------------------------------------------
// Column-specific update triggers
// ---------------------------------------------------------------------------------------------

/// How many capture triggers a table has for updates (`prov_capture_update` or its column groups).
async fn update_capture_triggers(c: &Client, table: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname LIKE 'prov\\_capture\\_update%'",
        &[&table],
    )
    .await
    .unwrap()
    .get(0)
}

/// The update capture of clients is split into triggers by the columns their events read, so a
/// balance-only UPDATE runs the balance events' function and nothing else.
#[tokio::test]
async fn a_balance_only_update_runs_only_the_balance_capture() {
    let db = vcs_db().await;
    let c = &db.client;
    let triggers: Vec<(String, String)> = c
        .query(
            "SELECT t.tgname::text,
                    coalesce((SELECT string_agg(a.attname, ',' ORDER BY a.attname) FROM pg_attribute a
                               WHERE a.attrelid = t.tgrelid AND a.attnum = ANY (t.tgattr::int2[])), '')
               FROM pg_trigger t
              WHERE t.tgrelid = 'clients'::regclass AND t.tgname LIKE 'prov\\_capture\\_update%'
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expect = |n: &str, cols: &str| (n.to_string(), cols.to_string());
    assert_eq!(
        triggers,
        [
            expect(
                "prov_capture_update_01",
                "company,credit,currency,email,id,name,status"
            ),
            expect("prov_capture_update_02", "custom_fields"),
            expect("prov_capture_update_03", "balance"),
            expect("prov_capture_update_04", "status"),
        ]
    );
    client_with_balance(c, 1, "5").await;
    c.batch_execute("SET track_functions = 'all'")
        .await
        .unwrap();
    // Calls of each update capture function by one statement: the backend's counters read before
    // and after it inside one transaction (they are not flushed while a transaction is open).
    let counters = || async move {
        c.query(
            "SELECT funcname::text, calls FROM pg_stat_xact_user_functions
              WHERE schemaname = 'provisioning' AND funcname LIKE 'capture\\_update\\_clients\\_%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect::<std::collections::BTreeMap<String, i64>>()
    };
    let calls = |sql: &'static str| async move {
        c.batch_execute("BEGIN").await.unwrap();
        let before = counters().await;
        c.batch_execute(sql).await.unwrap();
        let after = counters().await;
        c.batch_execute("COMMIT").await.unwrap();
        after
            .iter()
            .filter(|(f, n)| **n > before.get(*f).copied().unwrap_or(0))
            .map(|(f, n)| {
                format!(
                    "{}={}",
                    &f[f.len() - 2..],
                    n - before.get(f).copied().unwrap_or(0)
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        calls("UPDATE clients SET balance = balance + 1 WHERE id = 1").await,
        ["g3=1"]
    );
    assert_eq!(
        calls("UPDATE clients SET name = 'x', balance = -1 WHERE id = 1").await,
        ["g1=1", "g3=1"]
    );
    // and the events are the same as with one trigger, in position order
    let evs = change(
        c,
        "UPDATE clients SET status = 'archived', custom_fields = '{\"a\": 1}', balance = 7, name = 'y' WHERE id = 1",
    )
    .await;
    assert_eq!(
        names(&evs),
        [
            "clients.custom_fields.update",
            "clients.balance_notzero",
            "clients.archive"
        ]
    );
    let evs = change(
        c,
        "UPDATE clients SET custom_fields = '{}', balance = -1, name = 'z' WHERE id = 1",
    )
    .await;
    assert_eq!(
        names(&evs),
        [
            "clients.update",
            "clients.custom_fields.update",
            "clients.balance_zero"
        ]
    );
}

/// A BEFORE UPDATE trigger may change columns the UPDATE did not assign, which column-specific
/// triggers would not see: creating one makes the capture go back to a single trigger for every
/// UPDATE, at once (an event trigger regenerates it).
#[tokio::test]
async fn a_before_trigger_created_later_has_its_changes_captured() {
    let db = vcs_db().await;
    let c = &db.client;
    client_with_balance(c, 1, "5").await;
    c.batch_execute(
        "CREATE FUNCTION suspend_at_zero() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF new.balance <= 0 THEN new.status := 'suspended'; END IF; RETURN new; END $$;
         CREATE TRIGGER suspend_at_zero BEFORE UPDATE ON clients FOR EACH ROW EXECUTE FUNCTION suspend_at_zero();",
    )
    .await
    .unwrap();
    assert_eq!(update_capture_triggers(c, "clients").await, 1);
    let evs = change(c, "UPDATE clients SET balance = -7 WHERE id = 1").await;
    assert_events(
        &evs,
        &[
            (
                "clients.update",
                json!(1),
                json!({"id": 1, "status": "suspended"}),
            ),
            ("clients.balance_zero", json!(1), json!({})),
        ],
    );
    // without it (and a refresh), the column groups come back
    c.batch_execute(
        "DROP TRIGGER suspend_at_zero ON clients; SELECT provisioning.refresh('clients')",
    )
    .await
    .unwrap();
    assert_eq!(update_capture_triggers(c, "clients").await, 4);
}

/// A column added to a captured table joins the "changed" comparison without a manual refresh.
#[tokio::test]
async fn a_column_added_to_a_captured_table_is_captured_at_once() {
    let db = vcs_db().await;
    let c = &db.client;
    client_with_balance(c, 1, "5").await;
    c.batch_execute("ALTER TABLE clients ADD COLUMN note text")
        .await
        .unwrap();
    let evs = change(c, "UPDATE clients SET note = 'vip' WHERE id = 1").await;
    assert_events(
        &evs,
        &[("clients.update", json!(1), json!({"id": 1, "note": "vip"}))],
    );
}

/// `ddl` must fail with a message holding every one of `message` and a hint holding `hint`.
async fn assert_alter_refused(c: &Client, ddl: &str, message: &[&str], hint: &str) {
    let err = c.batch_execute(ddl).await.expect_err(ddl);
    let e = err.as_db_error().expect("a database error");
    assert!(
        message.iter().all(|m| e.message().contains(m)),
        "{ddl}: {}",
        e.message()
    );
    assert!(
        e.hint().unwrap_or("").contains(hint),
        "{ddl}: {:?}",
        e.hint()
    );
}

/// An ALTER TABLE that the capture cannot follow (a column a condition reads renamed or retyped)
/// is refused and rolled back: allowed, it would leave capture triggers that fail every write of
/// the application to the table.
#[tokio::test]
async fn an_alter_table_the_capture_cannot_follow_is_refused() {
    let db = vcs_db().await;
    let c = &db.client;
    client_with_balance(c, 1, "5").await;
    for (ddl, event) in [
        (
            "ALTER TABLE clients RENAME COLUMN balance TO bal",
            "clients.balance_zero",
        ),
        (
            "ALTER TABLE clients RENAME COLUMN status TO state",
            "clients.update",
        ),
    ] {
        assert_alter_refused(
            c,
            ddl,
            &[
                "this ALTER TABLE would break the capture of public.clients",
                event,
            ],
            "provisioning.drop_event",
        )
        .await;
    }
    // nothing was renamed, and the application's writes are captured as before
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'clients'::regclass AND attname IN ('balance', 'status')"
        )
        .await,
        2
    );
    let evs = change(c, "UPDATE clients SET balance = -1 WHERE id = 1").await;
    assert_eq!(names(&evs), ["clients.balance_zero"]);
    // without the events that read it, the column can be renamed
    c.batch_execute(
        "SELECT provisioning.drop_event('clients.balance_zero');
         SELECT provisioning.drop_event('clients.balance_notzero');
         ALTER TABLE clients RENAME COLUMN balance TO bal",
    )
    .await
    .unwrap();
    let evs = change(c, "UPDATE clients SET bal = 3, name = 'n' WHERE id = 1").await;
    assert_events(
        &evs,
        &[("clients.update", json!(1), json!({"id": 1, "name": "n"}))],
    );
}

/// Renaming the key column, the JSON column of a json_keys event or an excluded column is
/// followed: the same object ids, the same reported keys and the same exclusions, under the new
/// names. Dropping the key column is refused.
#[tokio::test]
async fn renamed_key_json_and_excluded_columns_are_followed() {
    let db = vcs_db().await;
    let c = &db.client;
    c.batch_execute(
        "CREATE TABLE devices (id bigint PRIMARY KEY, name text, settings jsonb NOT NULL DEFAULT '{}', seen_at timestamptz);
         SELECT provisioning.attach('devices', 'devices', 'id');
         SELECT provisioning.declare_event('devices.update', 'devices', 'update', NULL, 'changed', ARRAY['seen_at', 'settings']);
         SELECT provisioning.declare_event('devices.settings.update', 'devices', 'update', NULL, 'json_keys', p_json_column => 'settings');
         INSERT INTO devices VALUES (7, 'a', '{}', now());
         ALTER TABLE devices RENAME COLUMN id TO device_no;
         ALTER TABLE devices RENAME COLUMN settings TO config;
         ALTER TABLE devices RENAME COLUMN seen_at TO last_seen;",
    )
    .await
    .unwrap();
    // the excluded column (renamed) still fires no devices.update; the json_keys event fires only
    // when its JSON column (renamed) changed
    let evs = change(
        c,
        "UPDATE devices SET last_seen = now() WHERE device_no = 7",
    )
    .await;
    assert_events(&evs, &[]);
    let evs = change(
        c,
        "UPDATE devices SET config = '{\"speed\": 2}' WHERE device_no = 7",
    )
    .await;
    assert_events(
        &evs,
        &[(
            "devices.settings.update",
            json!(7),
            json!({"device_no": 7, "config": {"speed": 2}}),
        )],
    );
    let evs = change(c, "UPDATE devices SET name = 'b' WHERE device_no = 7").await;
    assert_events(
        &evs,
        &[(
            "devices.update",
            json!(7),
            json!({"device_no": 7, "name": "b"}),
        )],
    );
    // a change of the JSON value's text alone (key order, spacing) is no change
    let evs = change(
        c,
        "UPDATE devices SET config = '{ \"speed\" : 2 }' WHERE device_no = 7",
    )
    .await;
    assert_events(&evs, &[]);
    // the key's new name is what before-stage write-backs use too
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM provisioning.captures WHERE relation = 'public.devices' AND key_column = 'device_no'"
        )
        .await,
        1
    );
    assert_alter_refused(
        c,
        "ALTER TABLE devices DROP COLUMN device_no CASCADE",
        &["key column device_no of public.devices does not exist"],
        "provisioning.attach",
    )
    .await;
    let evs = change(
        c,
        "UPDATE devices SET name = 'c', config = '{}' WHERE device_no = 7",
    )
    .await;
    assert_eq!(names(&evs), ["devices.update", "devices.settings.update"]);
}

/// A BEFORE trigger on one partition of a captured partitioned table counts too.
#[tokio::test]
async fn a_before_trigger_on_a_partition_has_its_changes_captured() {
    let db = vcs_db().await;
    let c = &db.client;
    c.batch_execute(
        "CREATE TABLE calls (id bigint, day date, cost numeric, flagged boolean NOT NULL DEFAULT false,
                             PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
         CREATE TABLE calls_2025 PARTITION OF calls FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         SELECT provisioning.attach('calls', 'calls', 'id');
         SELECT provisioning.declare_event('calls.flagged', 'calls', 'update', 'new.flagged AND NOT old.flagged', 'empty');
         SELECT provisioning.declare_event('calls.costly', 'calls', 'update', 'new.cost > 100 AND old.cost <= 100', 'empty');
         INSERT INTO calls VALUES (1, '2025-06-01', 5), (2, '2025-06-02', 5);",
    )
    .await
    .unwrap();
    assert_eq!(
        update_capture_triggers(c, "calls").await,
        2,
        "one trigger per column group while no BEFORE trigger exists"
    );
    let evs = change(c, "UPDATE calls SET cost = 500 WHERE id = 1").await;
    assert_eq!(names(&evs), ["calls.costly"]);
    c.batch_execute(
        "CREATE FUNCTION flag_costly() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF new.cost > 100 THEN new.flagged := true; END IF; RETURN new; END $$;
         CREATE TRIGGER flag_costly BEFORE UPDATE ON calls_2025 FOR EACH ROW EXECUTE FUNCTION flag_costly();",
    )
    .await
    .unwrap();
    let evs = change(c, "UPDATE calls SET cost = 500 WHERE id = 2").await;
    assert_eq!(names(&evs), ["calls.flagged", "calls.costly"]);
}
