//! The `relay` command line (SPEC §7), run as the real binary against a test database: every
//! command, with `--json` parsed and the human tables checked, bad input refused with a non-zero
//! exit and a message naming the problem.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;
use crate::receiver::Answer;

const WAIT: Duration = Duration::from_secs(60);

/// What one run of the binary did.
pub struct CliOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Run `relay --database-url <db> <args>` with a scrubbed environment (no `RELAY_*`, no
/// `DATABASE_URL`: the test runner's own variables must not leak into the configuration).
pub async fn relay_cli(db: &TestDb, args: &[&str], envs: &[(&str, &str)]) -> CliOutput {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"));
    for (k, _) in std::env::vars() {
        if k.starts_with("RELAY_") || k == "DATABASE_URL" {
            cmd.env_remove(k);
        }
    }
    cmd.args(["--database-url", &db.url])
        .args(args)
        .envs(envs.iter().copied())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("relay {args:?} did not finish within {WAIT:?}"))
        .expect("run the relay binary");
    CliOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run with `--json`; the command must succeed; returns the parsed output.
pub async fn cli_json(db: &TestDb, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = relay_cli(db, &all, &[]).await;
    assert!(
        out.success,
        "relay {args:?} failed:\nstdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("relay {args:?} printed no JSON ({e}): {}", out.stdout))
}

/// Run a command that must fail; returns its stderr.
pub async fn cli_fails(db: &TestDb, args: &[&str]) -> String {
    let out = relay_cli(db, args, &[]).await;
    assert!(
        !out.success,
        "relay {args:?} should have failed but printed: {}",
        out.stdout
    );
    assert!(
        out.stderr.contains("error:"),
        "relay {args:?}: no error message: {}",
        out.stderr
    );
    out.stderr
}

/// The `id`s of a JSON array of rows, in output order.
pub fn ids_of(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a JSON array, got {v}"))
        .iter()
        .map(|r| r["id"].as_i64().expect("row id"))
        .collect()
}

/// Ids from a query returning one bigint column, newest (largest) first.
pub async fn ids_where(db: &TestDb, sql: &str) -> Vec<i64> {
    let mut ids: Vec<i64> = db
        .client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    ids
}

/// A row's timestamp as RFC 3339 with microseconds, exactly as stored.
async fn rfc3339(db: &TestDb, sql: &str) -> String {
    db.client
        .query_one(
            &format!("SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM ({sql}) s(t)"),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

#[tokio::test]
async fn cli_migrate_installs_schema_then_vcs_preset_and_other_commands_need_it() {
    let db = TestDb::empty().await;

    // Before migrate, commands refuse and say what to run.
    let err = cli_fails(&db, &["handlers", "list"]).await;
    assert!(err.contains("relay migrate"), "{err}");

    let out = relay_cli(&db, &["migrate"], &[]).await;
    assert!(out.success, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("installed provisioning schema version 1"),
        "{}",
        out.stdout
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT max(version)::bigint FROM provisioning.schema_version"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.capture_events"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM pg_class WHERE relname = 'clients' AND relkind = 'r'"
        )
        .await,
        0,
        "plain migrate installs no preset tables"
    );

    // Idempotent; --vcs-preset adds the tables and the 15 events.
    let out = relay_cli(&db, &["migrate", "--vcs-preset"], &[]).await;
    assert!(out.success, "{}", out.stderr);
    assert!(
        out.stdout.contains("already at version 1"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("VCS preset tables and events installed"),
        "{}",
        out.stdout
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(DISTINCT event) FROM provisioning.capture_events"
        )
        .await,
        15
    );
    for t in ["clients", "accounts", "client_packages"] {
        assert_eq!(
            count(
                &db.client,
                &format!("SELECT count(*) FROM pg_class WHERE relname = '{t}' AND relkind = 'r'")
            )
            .await,
            1,
            "table {t}"
        );
    }
    // The preset captures: a change is an event.
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (5, 'X')", &[])
        .await
        .unwrap();
    let events = cli_json(&db, &["events", "list"]).await;
    assert_eq!(events[0]["name"], "clients.create");
    let table = relay_cli(&db, &["status"], &[]).await;
    assert!(
        table.stdout.starts_with(
            "backlog: 0  dead: 0  oldest pending: -  relays alive: 0  events captured: 1\n"
        ),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("(none)"), "{}", table.stdout);
    // Running it again changes nothing.
    let out = relay_cli(&db, &["migrate", "--vcs-preset"], &[]).await;
    assert!(out.success, "{}", out.stderr);
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.events").await,
        1
    );
}

#[tokio::test]
async fn cli_handlers_add_show_update_status_changes_and_remove() {
    let db = TestDb::vcs().await;

    let h = relay_cli(
        &db,
        &[
            "--json",
            "handlers",
            "add",
            "crm",
            "--event",
            "clients.*",
            "--event",
            "clients.accounts.create",
            "--http",
            "https://crm.example.com/hooks",
            "--priority",
            "5",
            "--timeout",
            "2s",
            "--retry-schedule",
            "1s,5m",
            "--header",
            "X-Api-Key=k1",
            "--secret-env",
            "CRM_SECRET",
            "--max-in-flight",
            "4",
            "--format",
            "full",
            "--rate-limit",
            "20",
            "--give-up-on",
            "400, 422",
        ],
        &[("CRM_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")],
    )
    .await;
    assert!(h.success, "{}", h.stderr);
    assert!(
        !h.stdout.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "the secret is never printed: {}",
        h.stdout
    );
    let h: Value = serde_json::from_str(&h.stdout).unwrap();
    assert_eq!(h["name"], "crm");
    assert_eq!(
        h["events"],
        serde_json::json!(["clients.*", "clients.accounts.create"])
    );
    assert_eq!(h["kind"], "http");
    assert_eq!(h["target"], "https://crm.example.com/hooks");
    assert_eq!(h["priority"], 5);
    assert_eq!(h["timeout_ms"], 2000);
    assert_eq!(h["retry_schedule_ms"], serde_json::json!([1000, 300000]));
    assert_eq!(h["headers"], serde_json::json!({"X-Api-Key": "k1"}));
    assert_eq!(h["secret_set"], true);
    assert_eq!(h["max_in_flight"], 4);
    assert_eq!(h["rate_limit_per_s"], 20);
    assert_eq!(h["give_up_on"], serde_json::json!([400, 422]));
    assert_eq!(h["format"], "full");
    assert_eq!(h["status"], "enabled");
    let secret: String = db
        .client
        .query_one(
            "SELECT secret FROM provisioning.handlers WHERE name = 'crm'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");

    // A script handler with arguments (a leading dash is an argument, not a flag).
    let s = cli_json(
        &db,
        &[
            "handlers",
            "add",
            "hook",
            "--event",
            "clients.delete",
            "--script",
            "/bin/true",
            "--arg",
            "-v",
            "--arg",
            "x y",
            "--stage",
            "after",
        ],
    )
    .await;
    assert_eq!(s["kind"], "script");
    assert_eq!(s["target"], "/bin/true");
    assert_eq!(s["args"], serde_json::json!(["-v", "x y"]));

    // Bad definitions: refused, non-zero exit, the field named, nothing stored.
    let bad: &[(&[&str], &str)] = &[
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "nope.*",
                "--http",
                "http://h/x",
            ],
            "field \"events\"",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.frobnicate",
                "--http",
                "http://h/x",
            ],
            "field \"events\"",
        ),
        (
            &["handlers", "add", "x", "--http", "http://h/x"],
            "field \"events\"",
        ),
        (
            &["handlers", "add", "x", "--event", "clients.create"],
            "field \"kind\"",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.create",
                "--http",
                "ftp://h/x",
            ],
            "field \"target\"",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.create",
                "--script",
                "relative/run.sh",
            ],
            "field \"target\"",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.create",
                "--http",
                "http://h/x",
                "--stage",
                "middle",
            ],
            "field \"stage\"",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.create",
                "--http",
                "http://h/x",
                "--timeout",
                "0",
            ],
            "field \"timeout_ms\"",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.create",
                "--http",
                "http://h/x",
                "--format",
                "xml",
            ],
            "field \"format\"",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.create",
                "--http",
                "http://h/x",
                "--status",
                "sleepy",
            ],
            "field \"status\"",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.create",
                "--http",
                "http://h/x",
                "--max-in-flight",
                "0",
            ],
            "field \"max_in_flight\"",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.create",
                "--http",
                "http://h/x",
                "--rate-limit",
                "-5",
            ],
            "field \"rate_limit_per_s\"",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.create",
                "--http",
                "http://h/x",
                "--give-up-on",
                "410",
            ],
            "field \"give_up_on\"",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.create",
                "--http",
                "http://h/x",
                "--give-up-on",
                "4xx",
            ],
            "--give-up-on: \"4xx\" is not a number",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.create",
                "--http",
                "http://h/x",
                "--secret",
                "short",
            ],
            "field \"secret\"",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.create",
                "--http",
                "http://h/x",
                "--header",
                "Bad Header=v",
            ],
            "field \"headers\"",
        ),
        (
            &[
                "handlers",
                "add",
                "crm",
                "--event",
                "clients.create",
                "--http",
                "http://h/x",
            ],
            "field \"name\"",
        ),
        (
            &[
                "handlers",
                "add",
                "x",
                "--event",
                "clients.create",
                "--http",
                "http://h/x",
                "--timeout",
                "soon",
            ],
            "--timeout",
        ),
        (
            &["handlers", "update", "crm", "--event", "nope.x"],
            "field \"events\"",
        ),
        (
            &["handlers", "update", "crm", "--http", "not a url"],
            "field \"target\"",
        ),
    ];
    for (args, field) in bad {
        let err = cli_fails(&db, args).await;
        assert!(
            err.contains(field),
            "relay {args:?}: expected {field} in: {err}"
        );
    }
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.handlers").await,
        2,
        "refused definitions store nothing"
    );
    let err = cli_fails(&db, &["handlers", "show", "ghost"]).await;
    assert!(err.contains("no handler named \"ghost\""), "{err}");
    let err = cli_fails(&db, &["handlers", "update", "ghost", "--priority", "1"]).await;
    assert!(err.contains("no handler named"), "{err}");
    let err = cli_fails(&db, &["handlers", "update", "crm"]).await;
    assert!(err.contains("nothing to change"), "{err}");

    // list (JSON and table), show.
    let list = cli_json(&db, &["handlers", "list"]).await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["crm", "hook"], "ordered by priority");
    let table = relay_cli(&db, &["handlers", "list"], &[]).await;
    assert!(table.success);
    let lines: Vec<&str> = table.stdout.lines().collect();
    for head in [
        "NAME", "STATUS", "PRIO", "STAGE", "EVENTS", "TARGET", "BACKLOG", "DEAD", "FAIL/24H",
    ] {
        assert!(lines[0].contains(head), "header {head}: {}", table.stdout);
    }
    assert!(
        lines[1].starts_with("crm ")
            && lines[1].contains("enabled")
            && lines[1].contains("clients.*,clients.accounts.create")
            && lines[1].contains("https://crm.example.com/hooks"),
        "{}",
        table.stdout
    );
    assert!(lines[2].starts_with("hook "), "{}", table.stdout);
    let shown = cli_json(&db, &["handlers", "show", "crm"]).await;
    assert_eq!(shown["id"], h["id"]);
    assert_eq!(shown["target"], "https://crm.example.com/hooks");

    // update: only the flags given change.
    let u = cli_json(
        &db,
        &[
            "handlers",
            "update",
            "crm",
            "--priority",
            "7",
            "--http",
            "https://crm2.example.com/h",
            "--rename",
            "crm2",
        ],
    )
    .await;
    assert_eq!(u["name"], "crm2");
    assert_eq!(u["priority"], 7);
    assert_eq!(u["target"], "https://crm2.example.com/h");
    assert_eq!(u["timeout_ms"], 2000, "untouched fields keep their values");
    assert_eq!(u["format"], "full");
    assert_eq!(u["give_up_on"], serde_json::json!([400, 422]));
    assert_eq!(u["id"], h["id"]);
    let u = cli_json(&db, &["handlers", "update", "crm2", "--give-up-on", ""]).await;
    assert_eq!(u["give_up_on"], serde_json::json!([]), "'' clears the list");

    // Status changes, each visible in the output and the database.
    for (verb, status) in [
        ("pause", "paused"),
        ("resume", "enabled"),
        ("disable", "disabled"),
        ("enable", "enabled"),
        ("archive", "archived"),
    ] {
        let v = cli_json(&db, &["handlers", verb, "crm2"]).await;
        assert_eq!(v["status"], status, "{verb}");
        let stored: String = db
            .client
            .query_one(
                "SELECT status FROM provisioning.handlers WHERE name = 'crm2'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(stored, status, "{verb}");
    }
    let err = cli_fails(&db, &["handlers", "pause", "ghost"]).await;
    assert!(err.contains("no handler named"), "{err}");
    // Archived handlers are hidden unless --all.
    let list = cli_json(&db, &["handlers", "list"]).await;
    assert_eq!(ids_of(&list).len(), 1);
    assert_eq!(list[0]["name"], "hook");
    let list = cli_json(&db, &["handlers", "list", "--all"]).await;
    assert_eq!(list.as_array().unwrap().len(), 2);

    // remove: the handler and its queue go; the execution log stays.
    let hook_id = count(
        &db.client,
        "SELECT id FROM provisioning.handlers WHERE name = 'hook'",
    )
    .await;
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (1, 'A')", &[])
        .await
        .unwrap();
    db.client
        .execute("DELETE FROM clients WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(
        count(
            &db.client,
            &format!("SELECT count(*) FROM provisioning.deliveries WHERE handler_id = {hook_id}")
        )
        .await,
        1
    );
    db.client
        .execute(
            "INSERT INTO provisioning.attempts (delivery_id, event_id, handler_id, handler_name, event_name, object_id,
                attempt, started_at, duration_ms, outcome, exit_code, request_body, error, relay)
             SELECT d.id, d.event_id, d.handler_id, 'hook', 'clients.delete', '1', 1, now(), 3, 'fail', 1, '{}', 'exit 1', 'r'
               FROM provisioning.deliveries d WHERE d.handler_id = $1",
            &[&hook_id],
        )
        .await
        .unwrap();
    let r = cli_json(&db, &["handlers", "remove", "hook"]).await;
    assert_eq!(r["removed"], "hook");
    assert_eq!(r["deliveries_removed"], 1);
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.handlers WHERE name = 'hook'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.deliveries").await,
        0
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.attempts WHERE handler_name = 'hook'"
        )
        .await,
        1,
        "the execution log is kept"
    );
    let err = cli_fails(&db, &["handlers", "remove", "hook"]).await;
    assert!(err.contains("no handler named"), "{err}");
}

#[tokio::test]
async fn cli_events_and_deliveries_list_and_show_with_filters() {
    let db = TestDb::vcs().await;
    // No relay runs: deliveries stay queued.
    add_handler(
        &db.client,
        "crm",
        &["clients.*"],
        "http",
        "http://127.0.0.1:9/crm",
        "",
    )
    .await;
    add_handler(
        &db.client,
        "acct",
        &["clients.accounts.*"],
        "http",
        "http://127.0.0.1:9/acct",
        "",
    )
    .await;
    for sql in [
        "INSERT INTO clients (id, name) VALUES (1, 'Customer A')",
        "INSERT INTO clients (id, name) VALUES (2, 'Customer B')",
        "UPDATE clients SET name = 'Customer A2' WHERE id = 1",
        "INSERT INTO accounts (id, client_id, login) VALUES (10, 2, 'acc10')",
    ] {
        db.client.execute(sql, &[]).await.unwrap();
    }
    let all = ids_where(&db, "SELECT id FROM provisioning.events").await;
    assert_eq!(all.len(), 4);

    let v = cli_json(&db, &["events", "list"]).await;
    assert_eq!(ids_of(&v), all, "newest first");
    assert_eq!(v[0]["name"], "clients.accounts.create");
    assert_eq!(v[0]["unfinished"], 2, "crm and acct");
    for (args, sql) in [
        (
            vec!["--name", "clients.update"],
            "SELECT id FROM provisioning.events WHERE name = 'clients.update'",
        ),
        (
            vec!["--name", "clients.accounts.*"],
            "SELECT id FROM provisioning.events WHERE name LIKE 'clients.accounts.%'",
        ),
        (
            vec!["--name", "clients.*"],
            "SELECT id FROM provisioning.events",
        ),
        (
            vec!["--object", "1"],
            "SELECT id FROM provisioning.events WHERE object_id = '1'",
        ),
        (
            vec!["--object", "10"],
            "SELECT id FROM provisioning.events WHERE object_id = '10'",
        ),
        (
            vec!["--name", "clients.create", "--object", "2"],
            "SELECT id FROM provisioning.events WHERE name = 'clients.create' AND object_id = '2'",
        ),
        (vec!["--since", "1h"], "SELECT id FROM provisioning.events"),
        (
            vec!["--until", "1h"],
            "SELECT id FROM provisioning.events WHERE false",
        ),
    ] {
        let mut a = vec!["events", "list"];
        a.extend(args.iter().copied());
        let got = ids_of(&cli_json(&db, &a).await);
        let want = ids_where(&db, sql).await;
        assert!(!args.is_empty());
        assert_eq!(got, want, "events list {args:?}");
    }
    // Decision filter (set as a before-stage decision would).
    db.client
        .execute(
            "UPDATE provisioning.events SET decision = 'forbidden', decision_reason = 'no' WHERE id = $1",
            &[&all[1]],
        )
        .await
        .unwrap();
    assert_eq!(
        ids_of(&cli_json(&db, &["events", "list", "--decision", "forbidden"]).await),
        vec![all[1]]
    );
    // Paging.
    let p1 = ids_of(&cli_json(&db, &["events", "list", "--limit", "3"]).await);
    assert_eq!(p1, all[..3]);
    let before = p1[2].to_string();
    let p2 = ids_of(
        &cli_json(
            &db,
            &["events", "list", "--limit", "3", "--before-id", &before],
        )
        .await,
    );
    assert_eq!(p2, all[3..]);
    // Time range on the exact capture time of the third event.
    let t = rfc3339(
        &db,
        &format!(
            "SELECT changed_at FROM provisioning.events WHERE id = {}",
            all[1]
        ),
    )
    .await;
    let since = ids_of(&cli_json(&db, &["events", "list", "--since", &t]).await);
    assert_eq!(
        since,
        ids_where(
            &db,
            &format!("SELECT id FROM provisioning.events WHERE changed_at >= '{t}'")
        )
        .await
    );
    assert_eq!(since, all[..2]);
    let until = ids_of(&cli_json(&db, &["events", "list", "--until", &t]).await);
    assert_eq!(until, all[2..]);
    let err = cli_fails(&db, &["events", "list", "--since", "yesterday-ish"]).await;
    assert!(err.contains("bad time"), "{err}");

    // The table.
    let table = relay_cli(&db, &["events", "list", "--name", "clients.update"], &[]).await;
    assert!(table.success);
    for head in [
        "ID",
        "DATE",
        "EVENT",
        "OBJECT",
        "DECISION",
        "UNFINISHED",
        "DATA",
    ] {
        assert!(
            table.stdout.lines().next().unwrap().contains(head),
            "{}",
            table.stdout
        );
    }
    assert_eq!(table.stdout.lines().count(), 2, "{}", table.stdout);
    assert!(
        table.stdout.contains("clients.update") && table.stdout.contains("Customer A2"),
        "{}",
        table.stdout
    );

    // events show: the rows, deliveries and attempts.
    let upd = all[1];
    let e = cli_json(&db, &["events", "show", &upd.to_string()]).await;
    assert_eq!(e["id"], upd);
    assert_eq!(e["name"], "clients.update");
    assert_eq!(
        e["data"],
        serde_json::json!({"id": 1, "name": "Customer A2"})
    );
    assert_eq!(e["old_row"]["name"], "Customer A");
    assert_eq!(e["new_row"]["name"], "Customer A2");
    assert_eq!(e["deliveries"].as_array().unwrap().len(), 1);
    assert_eq!(e["deliveries"][0]["handler"], "crm");
    assert_eq!(e["deliveries"][0]["status"], "pending");
    assert_eq!(e["attempts"], serde_json::json!([]));
    let err = cli_fails(&db, &["events", "show", "999999"]).await;
    assert!(err.contains("no event 999999"), "{err}");

    // deliveries list / show.
    let all_d = ids_where(&db, "SELECT id FROM provisioning.deliveries").await;
    assert_eq!(
        all_d.len(),
        5,
        "crm: 4 events (clients.* covers accounts too), acct: 1"
    );
    assert_eq!(ids_of(&cli_json(&db, &["deliveries", "list"]).await), all_d);
    db.client
        .execute(
            "UPDATE provisioning.deliveries SET status = 'dead', attempts = 8, last_error = 'HTTP 500' WHERE id = $1",
            &[&all_d[1]],
        )
        .await
        .unwrap();
    for (args, sql) in [
        (vec!["--handler", "acct"], "SELECT d.id FROM provisioning.deliveries d JOIN provisioning.handlers h ON h.id = d.handler_id WHERE h.name = 'acct'"),
        (vec!["--handler", "crm"], "SELECT d.id FROM provisioning.deliveries d JOIN provisioning.handlers h ON h.id = d.handler_id WHERE h.name = 'crm'"),
        (vec!["--status", "dead"], "SELECT id FROM provisioning.deliveries WHERE status = 'dead'"),
        (vec!["--status", "pending"], "SELECT id FROM provisioning.deliveries WHERE status = 'pending'"),
        (vec!["--object", "1"], "SELECT id FROM provisioning.deliveries WHERE object_key = '1'"),
        (vec!["--handler", "crm", "--object", "2"], "SELECT d.id FROM provisioning.deliveries d JOIN provisioning.handlers h ON h.id = d.handler_id WHERE h.name = 'crm' AND d.object_key = '2'"),
        (vec!["--handler", "nobody"], "SELECT id FROM provisioning.deliveries WHERE false"),
    ] {
        let mut a = vec!["deliveries", "list"];
        a.extend(args.iter().copied());
        assert_eq!(ids_of(&cli_json(&db, &a).await), ids_where(&db, sql).await, "deliveries list {args:?}");
    }
    let p1 = ids_of(&cli_json(&db, &["deliveries", "list", "--limit", "4"]).await);
    let p2 = ids_of(
        &cli_json(
            &db,
            &[
                "deliveries",
                "list",
                "--limit",
                "4",
                "--before-id",
                &p1[3].to_string(),
            ],
        )
        .await,
    );
    assert_eq!([p1, p2].concat(), all_d);
    let table = relay_cli(&db, &["deliveries", "list", "--status", "dead"], &[]).await;
    assert!(table.success);
    for head in [
        "ID",
        "EVENT",
        "HANDLER",
        "OBJECT",
        "STATUS",
        "ATTEMPTS",
        "NEXT",
        "LAST ERROR",
    ] {
        assert!(
            table.stdout.lines().next().unwrap().contains(head),
            "{}",
            table.stdout
        );
    }
    let row = table.stdout.lines().nth(1).unwrap();
    assert!(
        row.starts_with(&all_d[1].to_string()) && row.contains("dead") && row.contains("HTTP 500"),
        "{}",
        table.stdout
    );

    let d = cli_json(&db, &["deliveries", "show", &all_d[1].to_string()]).await;
    assert_eq!(d["id"], all_d[1]);
    assert_eq!(d["status"], "dead");
    assert_eq!(d["attempts"], 8);
    assert!(
        d.get("lease_token").is_none(),
        "the lease token is internal"
    );
    assert_eq!(d["attempt_log"], serde_json::json!([]));
    let err = cli_fails(&db, &["deliveries", "show", "999999"]).await;
    assert!(err.contains("no delivery 999999"), "{err}");
}

#[tokio::test]
async fn cli_logs_filters_return_exactly_the_matching_attempts_newest_first() {
    let db = TestDb::vcs().await;
    let sc = deliver_scenario(&db).await;
    let all = ids_where(&db, "SELECT id FROM provisioning.attempts").await;
    assert_eq!(all.len(), 7);

    let v = cli_json(&db, &["logs"]).await;
    assert_eq!(ids_of(&v), all, "every attempt, newest first");
    let first_fail = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["status"] == "fail")
        .unwrap();
    assert_eq!(first_fail["handler"], "billing");
    assert_eq!(first_fail["http_status"], 500);
    assert_eq!(first_fail["message"], "HTTP 500 Internal Server Error");
    assert!(first_fail["delivery_id"].as_i64().is_some());

    let q = |w: &str| format!("SELECT id FROM provisioning.attempts WHERE {w}");
    let cases: Vec<(Vec<&str>, String, usize)> = vec![
        (vec!["--handler", "crm"], q("handler_name = 'crm'"), 4),
        (
            vec!["--handler", "billing"],
            q("handler_name = 'billing'"),
            3,
        ),
        (vec!["--handler", "nobody"], q("false"), 0),
        (
            vec!["--event", "clients.update"],
            q("event_name = 'clients.update'"),
            1,
        ),
        (
            vec!["--event", "clients.create"],
            q("event_name = 'clients.create'"),
            4,
        ),
        (
            vec!["--event", "clients.accounts.*"],
            q("event_name LIKE 'clients.accounts.%'"),
            2,
        ),
        (vec!["--event", "clients.*"], q("true"), 7),
        (vec!["--status", "fail"], q("outcome = 'fail'"), 3),
        (vec!["--status", "success"], q("outcome = 'success'"), 4),
        (vec!["--error", "HTTP 500"], q("error LIKE 'HTTP 500%'"), 3),
        (
            vec!["--error", "internal server"],
            q("error LIKE 'HTTP 500%'"),
            3,
        ),
        (vec!["--error", "billing exploded"], q("false"), 0),
        (vec!["--error", "100%"], q("false"), 0),
        (vec!["--object", "1"], q("object_id = '1'"), 3),
        (vec!["--object", "10"], q("object_id = '10'"), 2),
        (
            vec!["--handler", "billing", "--object", "2"],
            q("handler_name = 'billing' AND object_id = '2'"),
            1,
        ),
        (vec!["--handler", "crm", "--status", "fail"], q("false"), 0),
        (
            vec![
                "--event",
                "clients.create",
                "--status",
                "success",
                "--object",
                "2",
            ],
            q("event_name = 'clients.create' AND outcome = 'success' AND object_id = '2'"),
            1,
        ),
        (vec!["--since", "1h"], q("true"), 7),
        (vec!["--until", "1h"], q("false"), 0),
    ];
    for (args, sql, n) in cases {
        let mut a = vec!["logs"];
        a.extend(args.iter().copied());
        let got = ids_of(&cli_json(&db, &a).await);
        let want = ids_where(&db, &sql).await;
        assert_eq!(want.len(), n, "expected set for {args:?}");
        assert_eq!(got, want, "logs {args:?}");
    }
    // Time range on the exact start of the fourth attempt.
    let nth = |n: usize| {
        format!(
            "SELECT started_at FROM provisioning.attempts ORDER BY started_at OFFSET {n} LIMIT 1"
        )
    };
    let t = rfc3339(&db, &nth(3)).await;
    let since = ids_of(&cli_json(&db, &["logs", "--since", &t]).await);
    let until = ids_of(&cli_json(&db, &["logs", "--until", &t]).await);
    assert_eq!(
        since,
        ids_where(&db, &q(&format!("started_at >= '{t}'"))).await
    );
    assert_eq!(
        until,
        ids_where(&db, &q(&format!("started_at < '{t}'"))).await
    );
    assert!(!since.is_empty() && !until.is_empty());
    assert_eq!(since.len() + until.len(), 7);
    let t2 = rfc3339(&db, &nth(5)).await;
    let window = ids_of(&cli_json(&db, &["logs", "--since", &t, "--until", &t2]).await);
    assert_eq!(
        window,
        ids_where(
            &db,
            &q(&format!("started_at >= '{t}' AND started_at < '{t2}'"))
        )
        .await
    );

    // Paging: --limit and --before-id walk the whole log without overlap.
    let mut pages = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let mut a = vec!["logs".to_string(), "--limit".into(), "3".into()];
        if let Some(b) = before {
            a.push("--before-id".into());
            a.push(b.to_string());
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let page = ids_of(&cli_json(&db, &a).await);
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        before = page.last().copied();
        pages.push(page);
        assert!(pages.len() <= 3, "paging must end");
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(pages.concat(), all);

    // Bad filters are refused.
    let err = cli_fails(&db, &["logs", "--status", "maybe"]).await;
    assert!(err.contains("bad status \"maybe\""), "{err}");
    let err = cli_fails(&db, &["logs", "--since", "last tuesday"]).await;
    assert!(err.contains("bad time"), "{err}");

    // The human table.
    let table = relay_cli(&db, &["logs", "--handler", "billing"], &[]).await;
    assert!(table.success, "{}", table.stderr);
    let lines: Vec<&str> = table.stdout.lines().collect();
    for head in [
        "ID",
        "STATUS",
        "DATE",
        "EVENT",
        "HANDLER",
        "OBJECT",
        "HTTP/EXIT",
        "MS",
        "RESPONSE/ERROR",
    ] {
        assert!(lines[0].contains(head), "{}", table.stdout);
    }
    assert_eq!(lines.len(), 4, "{}", table.stdout);
    for l in &lines[1..] {
        assert!(
            l.contains(" fail ")
                && l.contains("billing")
                && l.contains("500")
                && l.contains("HTTP 500 Internal Server Error"),
            "{l}"
        );
    }
    assert!(sc.fail.received_on("/billing").len() == 3);
}

#[tokio::test]
async fn cli_retry_requeues_dead_and_resends_succeeded_deliveries() {
    let db = TestDb::vcs().await;
    let sc = deliver_scenario(&db).await;
    let dead = sc.dead_ids(&db).await;
    assert_eq!(dead.len(), 3);

    // A dead delivery goes back to the queue with a fresh schedule.
    let r = cli_json(&db, &["retry", &dead[0].to_string()]).await;
    assert_eq!(r["retried"], true);
    assert_eq!(r["was"], "dead");
    let row = db
        .client
        .query_one("SELECT status, attempts, next_attempt_at <= now() FROM provisioning.deliveries WHERE id = $1", &[&dead[0]])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, i32>(1), 0);
    assert!(row.get::<_, bool>(2));
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status = 'dead'"
        )
        .await,
        2,
        "only that one"
    );

    // A succeeded delivery (gone from the queue, alive in the log) is sent again.
    let (crm_delivery, crm_event): (i64, i64) = {
        let r = db
            .client
            .query_one(
                "SELECT delivery_id, event_id FROM provisioning.attempts WHERE handler_name = 'crm' AND event_name = 'clients.update'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    let r = cli_json(&db, &["retry", &crm_delivery.to_string()]).await;
    assert_eq!(r["was"], "succeeded");
    let new_id = r["new_delivery_id"].as_i64().expect("a new delivery");
    let row = db
        .client
        .query_one(
            "SELECT event_id, handler_id, status FROM provisioning.deliveries WHERE id = $1",
            &[&new_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), crm_event);
    assert_eq!(row.get::<_, i64>(1), sc.crm_id);
    assert_eq!(row.get::<_, String>(2), "pending");

    let err = cli_fails(&db, &["retry", "999999"]).await;
    assert!(err.contains("no delivery 999999"), "{err}");

    // Both are really delivered once a relay runs (billing has recovered).
    sc.fail.set_default(Answer::Status(200));
    let crm_before = sc.ok.received_on("/crm").len();
    let relay = RunningRelay::start(&db, &[]).await;
    sc.fail.wait_for("/billing", 4, WAIT).await;
    let crm = sc.ok.wait_for("/crm", crm_before + 1, WAIT).await;
    let resent = crm.last().unwrap();
    assert_eq!(resent.json()["event"]["events_id"], "clients.update");
    assert_eq!(resent.json()["data"]["name"], "Customer A2");
    eventually(WAIT, "both retried deliveries logged as successes", || async {
        let n = count(
            &db.client,
            &format!(
                "SELECT count(*) FROM provisioning.attempts WHERE outcome = 'success' AND delivery_id IN ({}, {new_id})",
                dead[0]
            ),
        )
        .await;
        (n == 2).then_some(())
    })
    .await;
    relay.stop().await;
    let d = cli_json(&db, &["deliveries", "show", &dead[0].to_string()]).await;
    assert_eq!(d["status"], "succeeded");
    let log = d["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0]["outcome"], "fail");
    assert_eq!(log[1]["outcome"], "success");
    assert_eq!(log[1]["attempt"], 1, "a fresh schedule");
}

/// `relay replay --dry-run <args>`: how many deliveries would be queued.
async fn replay_count(db: &TestDb, args: Vec<String>) -> i64 {
    let mut a = vec!["replay", "--dry-run"];
    a.extend(args.iter().map(String::as_str));
    let v = cli_json(db, &a).await;
    assert_eq!(v["dry_run"], true);
    v["deliveries"].as_i64().expect("a count")
}

#[tokio::test]
async fn cli_replay_dead_success_fail_and_all_with_dry_run_and_time_range() {
    let db = TestDb::vcs().await;
    let sc = deliver_scenario(&db).await;
    let ev = sc.event_ids(&db).await; // create 1, create 2, update 1, accounts.create 10
    let dead = sc.dead_ids(&db).await;

    // Dry runs count and change nothing.
    let dry = |args: &[&str]| replay_count(&db, args.iter().map(|s| s.to_string()).collect());
    assert_eq!(
        dry(&["--handler", "billing"]).await,
        3,
        "default status: dead"
    );
    assert_eq!(
        dry(&[
            "--handler",
            "billing",
            "--status",
            "dead",
            "--event",
            "clients.accounts.*"
        ])
        .await,
        1
    );
    assert_eq!(
        dry(&["--handler", "billing", "--event", "clients.create"]).await,
        2
    );
    assert_eq!(dry(&["--handler", "crm", "--status", "dead"]).await, 0);
    assert_eq!(dry(&["--handler", "crm", "--status", "success"]).await, 4);
    assert_eq!(dry(&["--handler", "crm", "--status", "fail"]).await, 0);
    assert_eq!(dry(&["--handler", "crm", "--status", "all"]).await, 4);
    assert_eq!(
        dry(&["--handler", "billing", "--status", "fail"]).await,
        0,
        "their dead deliveries are still queued: replay them as dead"
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status = 'dead'"
        )
        .await,
        3
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status <> 'dead'"
        )
        .await,
        0
    );

    // Time range: from the capture of client 2 (inclusive) to the update (exclusive).
    let t2 = rfc3339(
        &db,
        &format!(
            "SELECT changed_at FROM provisioning.events WHERE id = {}",
            ev[1]
        ),
    )
    .await;
    let t3 = rfc3339(
        &db,
        &format!(
            "SELECT changed_at FROM provisioning.events WHERE id = {}",
            ev[2]
        ),
    )
    .await;
    let (t2s, t3s) = (t2.as_str(), t3.as_str());
    assert_eq!(dry(&["--handler", "billing", "--since", t2s]).await, 2);
    assert_eq!(dry(&["--handler", "billing", "--until", t2s]).await, 1);
    assert_eq!(
        dry(&["--handler", "billing", "--since", t2s, "--until", t3s]).await,
        1
    );
    assert_eq!(
        dry(&[
            "--handler",
            "crm",
            "--status",
            "success",
            "--since",
            t2s,
            "--until",
            t3s
        ])
        .await,
        1
    );

    // Replay dead in a range: exactly those go back to the queue.
    let v = cli_json(&db, &["replay", "--handler", "billing", "--since", &t2]).await;
    assert_eq!(v["deliveries"], 2);
    assert_eq!(v["dry_run"], false);
    let pending = ids_where(
        &db,
        "SELECT id FROM provisioning.deliveries WHERE status = 'pending'",
    )
    .await;
    assert_eq!(pending, vec![dead[2], dead[1]]);
    assert_eq!(
        ids_where(
            &db,
            "SELECT id FROM provisioning.deliveries WHERE status = 'dead'"
        )
        .await,
        vec![dead[0]]
    );

    // Replay successes for one event: a new delivery of that event.
    let v = cli_json(
        &db,
        &[
            "replay",
            "--handler",
            "crm",
            "--status",
            "success",
            "--event",
            "clients.update",
        ],
    )
    .await;
    assert_eq!(v["deliveries"], 1);
    assert_eq!(
        count(&db.client, &format!("SELECT count(*) FROM provisioning.deliveries WHERE handler_id = {} AND event_id = {} AND status = 'pending'", sc.crm_id, ev[2])).await,
        1
    );
    // Not twice while it is queued.
    assert_eq!(
        dry(&[
            "--handler",
            "crm",
            "--status",
            "success",
            "--event",
            "clients.update"
        ])
        .await,
        0
    );

    // all: also events captured before the handler existed.
    let late = add_handler(
        &db.client,
        "late",
        &["clients.create"],
        "http",
        &sc.ok.url("/late"),
        "",
    )
    .await;
    assert_eq!(dry(&["--handler", "late", "--status", "all"]).await, 2);
    let v = cli_json(&db, &["replay", "--handler", "late", "--status", "all"]).await;
    assert_eq!(v["deliveries"], 2);
    assert_eq!(
        ids_where(
            &db,
            &format!("SELECT event_id FROM provisioning.deliveries WHERE handler_id = {late}")
        )
        .await,
        vec![ev[1], ev[0]]
    );

    // Bad requests.
    let err = cli_fails(&db, &["replay", "--handler", "ghost"]).await;
    assert!(err.contains("no handler named \"ghost\""), "{err}");
    let err = cli_fails(
        &db,
        &["replay", "--handler", "crm", "--status", "sometimes"],
    )
    .await;
    assert!(err.contains("bad status"), "{err}");

    // A relay delivers every replayed delivery.
    sc.fail.set_default(Answer::Status(200));
    let relay = RunningRelay::start(&db, &[]).await;
    sc.ok.wait_for("/late", 2, WAIT).await;
    sc.fail.wait_for("/billing", 5, WAIT).await;
    sc.ok.wait_for("/crm", 5, WAIT).await;
    eventually(WAIT, "queue drained except the one still dead", || async {
        (count(&db.client, "SELECT count(*) FROM provisioning.deliveries").await == 1).then_some(())
    })
    .await;
    relay.stop().await;
    let billing: BTreeSet<String> = sc.fail.received_on("/billing")[3..]
        .iter()
        .map(|r| r.json()["event"]["events_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        billing,
        [
            "clients.accounts.create".to_string(),
            "clients.create".to_string()
        ]
        .into()
    );
    // Now billing's replayed events have a success, and its failures can be replayed by status.
    assert_eq!(
        dry(&["--handler", "billing", "--status", "success"]).await,
        2
    );
    assert_eq!(
        dry(&["--handler", "billing", "--status", "fail"]).await,
        2,
        "the dead one is still queued"
    );
}

/// `relay status` says what keeps declared events from being captured, each problem with the
/// command that mends it, and running those commands clears them; a missing DDL event trigger is
/// a note of its own.
#[tokio::test]
async fn cli_status_reports_capture_problems_with_the_command_that_mends_each() {
    let db = TestDb::vcs().await;
    let problems = |v: &Value| -> Vec<String> {
        v["capture_problems"]
            .as_array()
            .expect("capture_problems")
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        problems(&cli_json(&db, &["status"]).await),
        Vec::<String>::new()
    );

    db.client
        .batch_execute(
            "DROP TABLE client_packages;
             DROP TRIGGER prov_capture_insert ON accounts;
             ALTER EVENT TRIGGER provisioning_refresh_on_ddl DISABLE;",
        )
        .await
        .unwrap();
    let found = problems(&cli_json(&db, &["status"]).await);
    assert_eq!(found.len(), 2, "{found:#?}");
    let mend = |what: &str, from: &str| -> String {
        let p = found
            .iter()
            .find(|p| p.contains(what))
            .unwrap_or_else(|| panic!("no problem about {what}: {found:#?}"));
        p[p.find(from).unwrap_or_else(|| panic!("{p}"))..].to_string()
    };
    let forget = mend(
        "captured table public.client_packages no longer exists",
        "SELECT provisioning.drop_event",
    );
    let refresh = mend(
        "table public.accounts has insert events declared but no insert capture trigger",
        "SELECT provisioning.refresh",
    );
    // not a capture problem (events are still captured), but said
    let s = cli_json(&db, &["status"]).await;
    assert_eq!(s["ddl_event_trigger"], false);
    let enable = "ALTER EVENT TRIGGER provisioning_refresh_on_ddl ENABLE".to_string();
    let table = relay_cli(&db, &["status"], &[]).await;
    assert!(table.success, "{}", table.stderr);
    assert!(
        table.stdout.starts_with(
            "note: the event trigger provisioning_refresh_on_ddl is missing or disabled"
        ) && table.stdout.contains(&enable)
            && table.stdout.contains("capture problems:\n  - ")
            && table.stdout.contains(&refresh),
        "{}",
        table.stdout
    );

    let inserts = "SELECT count(*) FROM provisioning.events WHERE name = 'clients.accounts.create'";
    db.client
        .batch_execute("INSERT INTO clients (id, name) VALUES (1, 'c'); INSERT INTO accounts (client_id, login) VALUES (1, 'a')")
        .await
        .unwrap();
    assert_eq!(count(&db.client, inserts).await, 0, "the problem is real");
    for sql in [&forget, &refresh, &enable] {
        db.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let s = cli_json(&db, &["status"]).await;
    assert_eq!(problems(&s), Vec::<String>::new());
    assert_eq!(s["ddl_event_trigger"], true);
    db.client
        .batch_execute("INSERT INTO accounts (client_id, login) VALUES (1, 'b')")
        .await
        .unwrap();
    assert_eq!(count(&db.client, inserts).await, 1, "mended");
}

#[tokio::test]
async fn cli_status_summarises_backlog_and_dead_and_prune_removes_old_work() {
    let db = TestDb::vcs().await;
    let sc = deliver_scenario(&db).await;

    // Queue one more client (no relay runs now): one delivery each for crm and billing.
    db.client
        .execute(
            "INSERT INTO clients (id, name) VALUES (3, 'Customer C')",
            &[],
        )
        .await
        .unwrap();
    let s = cli_json(&db, &["status"]).await;
    assert_eq!(s["backlog"], 2);
    assert_eq!(s["dead"], 3);
    assert_eq!(s["schema_version"], 1);
    assert_eq!(
        s["events_captured"],
        count(&db.client, "SELECT max(id) FROM provisioning.events").await
    );
    assert!(s["oldest_pending_age_s"].as_f64().unwrap() >= 0.0);
    let handlers = s["handlers"].as_array().unwrap();
    assert_eq!(handlers.len(), 2);
    assert_eq!(handlers[0]["name"], "billing", "by priority");
    assert_eq!(handlers[0]["dead"], 3);
    assert_eq!(handlers[0]["backlog"], 1);
    assert!(handlers[0]["oldest_pending_age_s"].as_f64().is_some());
    assert_eq!(handlers[1]["name"], "crm");
    assert_eq!(handlers[1]["backlog"], 1);
    assert_eq!(handlers[1]["dead"], 0);
    assert_eq!(handlers[1]["in_flight"], 0);
    assert!(handlers[1]["oldest_pending_age_s"].as_f64().is_some());
    assert_eq!(
        s["relays_alive"], 0,
        "the test relay stopped and deregistered"
    );

    let table = relay_cli(&db, &["status"], &[]).await;
    assert!(table.success, "{}", table.stderr);
    assert!(
        table
            .stdout
            .starts_with("backlog: 2  dead: 3  oldest pending: "),
        "{}",
        table.stdout
    );
    let lines: Vec<&str> = table.stdout.lines().collect();
    let head = lines
        .iter()
        .position(|l| l.starts_with("HANDLER"))
        .expect("table header");
    for h in [
        "STATUS",
        "BACKLOG",
        "IN FLIGHT",
        "DEAD",
        "OLDEST PENDING (s)",
    ] {
        assert!(lines[head].contains(h), "{}", table.stdout);
    }
    assert!(
        lines[head + 1].starts_with("billing") && lines[head + 1].contains(" 3 "),
        "{}",
        table.stdout
    );
    assert!(lines[head + 2].starts_with("crm"), "{}", table.stdout);

    // Prune: age the scenario's history by ten days (the new client stays fresh).
    db.client
        .batch_execute(
            "UPDATE provisioning.attempts SET started_at = started_at - interval '10 days';
             UPDATE provisioning.events SET changed_at = changed_at - interval '10 days' WHERE object_id <> '3';
             UPDATE provisioning.deliveries SET created_at = created_at - interval '10 days' WHERE status = 'dead';",
        )
        .await
        .unwrap();
    let nothing = cli_json(&db, &["prune", "--older-than", "30d"]).await;
    assert_eq!(nothing["attempts_removed"], 0);
    assert_eq!(nothing["events_removed"], 0);
    assert_eq!(nothing["dead_removed"], 0);

    let p = cli_json(&db, &["prune", "--older-than", "7d"]).await;
    assert_eq!(p["attempts_removed"], 7);
    // Events without deliveries: the update and (no billing) ... the update only; creates 1, 2
    // and the account keep their dead billing deliveries, client 3's event is fresh.
    assert_eq!(p["events_removed"], 1);
    assert_eq!(p["dead_removed"], 0, "dead deliveries stay unless --dead");
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.attempts").await,
        0
    );
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.events").await,
        4
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status = 'dead'"
        )
        .await,
        3
    );

    let p = cli_json(&db, &["prune", "--older-than", "7d", "--dead"]).await;
    assert_eq!(p["dead_removed"], 3);
    assert_eq!(p["events_removed"], 3);
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.events").await,
        1,
        "client 3's event, fresh and still queued"
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status = 'pending'"
        )
        .await,
        2,
        "queued work is never pruned"
    );
    let err = cli_fails(&db, &["prune", "--older-than", "a while"]).await;
    assert!(err.contains("bad duration"), "{err}");
    let _ = sc;
}

#[tokio::test]
async fn cli_help_explains_every_command() {
    let db = TestDb::empty().await;
    let out = relay_cli(&db, &["--help"], &[]).await;
    assert!(out.success);
    for cmd in [
        "run",
        "migrate",
        "handlers",
        "events",
        "deliveries",
        "logs",
        "retry",
        "replay",
        "status",
        "prune",
    ] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{cmd} "))),
            "{cmd} in --help: {}",
            out.stdout
        );
    }
    let out = relay_cli(&db, &["logs", "--help"], &[]).await;
    for flag in [
        "--handler",
        "--event",
        "--status",
        "--error",
        "--object",
        "--since",
        "--until",
        "--limit",
        "--before-id",
    ] {
        assert!(out.stdout.contains(flag), "{flag}: {}", out.stdout);
    }
}

#[tokio::test]
async fn cli_replay_all_skips_events_forbidden_or_undecided_by_a_before_stage() {
    let db = TestDb::vcs().await;
    // Clients 1 and 3 are captured with no handler; a before-stage handler forbade client 1
    // (recorded on the event as apply_decision records it).
    for sql in [
        "INSERT INTO clients (id, name) VALUES (1, 'Forbidden')",
        "INSERT INTO clients (id, name) VALUES (3, 'Allowed')",
        "UPDATE provisioning.events SET decision = 'forbidden', decision_reason = 'no' WHERE object_id = '1'",
    ] {
        db.client.execute(sql, &[]).await.unwrap();
    }
    // Client 2 is captured while a before-stage handler subscribes: its decision is still open.
    add_handler(
        &db.client,
        "gate",
        &["clients.create"],
        "http",
        "http://127.0.0.1:9/gate",
        "stage = 'before'",
    )
    .await;
    db.client
        .execute(
            "INSERT INTO clients (id, name) VALUES (2, 'Undecided')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE stage = 'before' AND status = 'pending'"
        )
        .await,
        1
    );
    let late = add_handler(
        &db.client,
        "late",
        &["clients.create"],
        "http",
        "http://127.0.0.1:9/late",
        "",
    )
    .await;
    assert_eq!(
        replay_count(
            &db,
            vec![
                "--handler".into(),
                "late".into(),
                "--status".into(),
                "all".into()
            ]
        )
        .await,
        1
    );
    let v = cli_json(&db, &["replay", "--handler", "late", "--status", "all"]).await;
    assert_eq!(v["deliveries"], 1);
    assert_eq!(
        count(
            &db.client,
            &format!(
                "SELECT (e.object_id #>> '{{}}')::bigint FROM provisioning.deliveries d JOIN provisioning.events e ON e.id = d.event_id WHERE d.handler_id = {late}"
            )
        )
        .await,
        3,
        "only the event nobody objected to"
    );
    // A before-stage handler's decisions are never replayed.
    let err = cli_fails(&db, &["replay", "--handler", "gate", "--status", "all"]).await;
    assert!(
        err.contains("before-stage decisions are never replayed"),
        "{err}"
    );
}

/// `relay handlers test`: one event sent now as a delivery would send it (envelope, headers,
/// Standard Webhooks signature), the reply read by the delivery rules (410, Retry-After,
/// before-stage decisions), and nothing written: no attempt, no delivery change, no pause, no
/// decision applied.
#[tokio::test]
async fn cli_handlers_test_sends_one_event_as_a_delivery_would_and_writes_nothing() {
    let db = TestDb::vcs().await;
    let rx = crate::receiver::Receiver::start().await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    add_handler(
        &db.client,
        "crm",
        &["clients.*"],
        "http",
        &rx.url("/hook"),
        &format!("status = 'paused', secret = '{secret}', headers = '{{\"x-api-key\": \"k1\"}}'"),
    )
    .await;

    // No stored event yet: a sample of a declared event it subscribes to.
    let r = cli_json(&db, &["handlers", "test", "crm"]).await;
    assert_eq!(r["ok"], true, "{r:#}");
    assert!(r["event"]["id"].is_null());
    assert!(r["event"]["source"].as_str().unwrap().contains("sample"));
    let got = rx.wait_for("/hook", 1, WAIT).await;
    let sample = got[0].json();
    assert!(sample["event"]["events_id"]
        .as_str()
        .unwrap()
        .starts_with("clients."));
    assert_eq!(sample["event"]["object_id"], 0);
    assert_eq!(sample["data"], serde_json::json!({}));
    let webhook_id = got[0].header("webhook-id").unwrap().to_string();
    assert!(webhook_id.starts_with("test_"), "{webhook_id}");
    assert_eq!(r["request"]["webhook_id"], webhook_id.as_str());
    assert_eq!(got[0].header("x-api-key"), Some("k1"));
    let wh = standardwebhooks::Webhook::new(secret).unwrap();
    wh.verify(got[0].body.as_bytes(), &got[0].headers)
        .expect("the test send is signed like a delivery");

    // A stored event: the newest one it subscribes to, byte for byte as a delivery sends it.
    db.client
        .batch_execute(
            "INSERT INTO clients (id, name) VALUES (12, 'Customer B');
             UPDATE clients SET name = 'Customer C' WHERE id = 12;",
        )
        .await
        .unwrap();
    let (update_id, dt): (i64, String) = {
        let row = db.client.query_one(
            "SELECT id, to_char(changed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') FROM provisioning.events WHERE name = 'clients.update'", &[]).await.unwrap();
        (row.get(0), row.get(1))
    };
    let pending_before = count(
        &db.client,
        "SELECT count(*) FROM provisioning.deliveries WHERE status = 'pending' AND attempts = 0",
    )
    .await;
    assert_eq!(pending_before, 2, "held for the paused handler");
    let r = cli_json(&db, &["handlers", "test", "crm"]).await;
    assert_eq!(r["event"]["id"], update_id);
    let got = rx.wait_for("/hook", 2, WAIT).await;
    assert_eq!(
        got[1].body,
        format!(
            r#"{{"event":{{"dt":"{dt}+00:00","events_id":"clients.update","object_id":12}},"data":{{"id":12,"name":"Customer C"}}}}"#
        )
    );
    assert_eq!(got[1].header("x-provisioning-attempt"), Some("1"));
    // --event-id picks another one
    let create_id = update_id - 1;
    let r = cli_json(
        &db,
        &[
            "handlers",
            "test",
            "crm",
            "--event-id",
            &create_id.to_string(),
        ],
    )
    .await;
    assert_eq!(r["event"]["name"], "clients.create");
    let got = rx.wait_for("/hook", 3, WAIT).await;
    assert_eq!(got[2].json()["data"]["name"], "Customer B");

    // 410 Gone: reported as what a delivery would do, exit non-zero; the handler is not touched.
    db.client
        .batch_execute("UPDATE provisioning.handlers SET status = 'enabled' WHERE name = 'crm'")
        .await
        .unwrap();
    rx.script([crate::receiver::Answer::Status(410)]);
    let out = relay_cli(&db, &["handlers", "test", "crm"], &[]).await;
    assert!(!out.success, "a 410 is not a success: {}", out.stdout);
    assert!(out.stdout.contains("HTTP 410"), "{}", out.stdout);
    assert!(
        out.stdout.contains("would pause the handler"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("a delivery would not succeed"),
        "{}",
        out.stderr
    );
    // 429 with Retry-After: the next attempt it would mean
    rx.script([crate::receiver::Answer::StatusWithHeaders(
        429,
        vec![("retry-after", "30".to_string())],
    )]);
    let out = relay_cli(&db, &["--json", "handlers", "test", "crm"], &[]).await;
    assert!(!out.success);
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(r["ok"], false);
    assert_eq!(r["reply"]["http_status"], 429);
    assert_eq!(r["reply"]["retry_after_ms"], 30_000);
    assert!(
        r["meaning"]
            .as_str()
            .unwrap()
            .contains("attempt 2 in about 30 s"),
        "{r:#}"
    );
    // a status the handler gives up on: dead at once, the schedule notwithstanding
    db.client
        .batch_execute("UPDATE provisioning.handlers SET give_up_on = '{422}' WHERE name = 'crm'")
        .await
        .unwrap();
    rx.script([crate::receiver::Answer::Status(422)]);
    let out = relay_cli(&db, &["handlers", "test", "crm"], &[]).await;
    assert!(!out.success);
    assert!(
        out.stdout.contains(
            "would go dead at once (HTTP 422 is in the handler's give_up_on list, so it is not retried)"
        ),
        "{}",
        out.stdout
    );

    // A before-stage script: its reply read as a decision, which is not applied.
    let decide = format!(
        "{}/../tests/fixtures/before/decide.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let id = add_handler(
        &db.client,
        "guard",
        &["clients.update"],
        "script",
        &decide,
        "stage = 'before', status = 'disabled'",
    )
    .await;
    db.client
        .execute(
            "UPDATE provisioning.handlers SET args = ARRAY['forbid', 'no credit'] WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let r = cli_json(&db, &["handlers", "test", "guard"]).await;
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(
        r["decision"],
        serde_json::json!({"decision": "forbid", "reason": "no credit"})
    );
    assert_eq!(r["reply"]["exit_code"], 0);
    db.client
        .execute(
            "UPDATE provisioning.handlers SET args = ARRAY['garbage'] WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let out = relay_cli(&db, &["--json", "handlers", "test", "guard"], &[]).await;
    assert!(!out.success, "a reply that is no decision fails");

    // Nothing was written by any of it.
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.attempts").await,
        0
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status = 'pending' AND attempts = 0"
        )
        .await,
        pending_before
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.events WHERE decision IS NOT NULL"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM clients WHERE id = 12 AND name = 'Customer C'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.handlers WHERE name = 'crm' AND status = 'enabled'"
        )
        .await,
        1
    );

    // Bad input: an unknown handler, an event that is not stored.
    let err = cli_fails(&db, &["handlers", "test", "nobody"]).await;
    assert!(err.contains("no handler named \"nobody\""), "{err}");
    let err = cli_fails(&db, &["handlers", "test", "crm", "--event-id", "999999"]).await;
    assert!(err.contains("no stored event 999999"), "{err}");
}

/// `relay events list | head -1`: a reader that goes away ends the output quietly (exit 0, no
/// panic), as with other Unix tools.
#[tokio::test]
async fn cli_output_into_a_closed_pipe_ends_quietly() {
    let db = TestDb::vcs().await;
    // more output than a pipe holds, so the writer meets the closed end whatever the timing
    db.client
        .execute(
            "INSERT INTO clients (name) SELECT 'client number ' || g FROM generate_series(1, 1000) g",
            &[],
        )
        .await
        .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args([
            "--database-url",
            &db.url,
            "events",
            "list",
            "--limit",
            "1000",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the relay binary");
    drop(child.stdout.take());
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the command ends")
        .expect("wait for the relay binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
