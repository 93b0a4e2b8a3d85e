//! The admin HTTP server (SPEC §7): health, readiness, Prometheus metrics, the page, and every JSON
//! API route, served in-process on port 0 and called over real HTTP. State-changing calls need the
//! token; filters return exactly the matching rows; bodies and pages are bounded.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::cli::{ids_of, ids_where};
use crate::common::*;

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "s3cret-admin-token";

/// One HTTP response: status and body (parsed as JSON when it is JSON, else a string).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub content_type: String,
}

/// Call the admin server. `auth` is the raw Authorization header value, if any.
pub async fn call(
    server: &AdminServer,
    method: Method,
    path: &str,
    auth: Option<&str>,
    body: Option<String>,
) -> Reply {
    let mut req = reqwest::Client::new()
        .request(method.clone(), server.at(path))
        .timeout(WAIT);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = resp.text().await.expect("response body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply {
        status,
        body,
        content_type,
    }
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// GET with the token; must be 200; returns the JSON.
async fn get_ok(server: &AdminServer, path: &str) -> Value {
    let r = call(server, Method::GET, path, Some(bearer().as_str()), None).await;
    assert_eq!(r.status, 200, "GET {path}: {:?}", r.body);
    r.body
}

/// A state-changing call with the token.
async fn send(server: &AdminServer, method: Method, path: &str, body: Value) -> Reply {
    let body = (!body.is_null()).then(|| body.to_string());
    call(server, method, path, Some(bearer().as_str()), body).await
}

fn error_text(r: &Reply) -> &str {
    r.body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {r:?}"))
}

/// Everything a state-changing call could touch, as one comparable string.
async fn fingerprint(db: &TestDb) -> String {
    db.client
        .query_one(
            "SELECT concat_ws('|',
                (SELECT string_agg(concat_ws(',', id, name, status, priority, target, updated_at), ';' ORDER BY id) FROM provisioning.handlers),
                (SELECT string_agg(concat_ws(',', id, status, attempts, next_attempt_at, updated_at), ';' ORDER BY id) FROM provisioning.deliveries),
                (SELECT count(*) FROM provisioning.events), (SELECT count(*) FROM provisioning.attempts))",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A VCS database with handler `crm` (clients.*), one event and its delivery, made dead.
async fn small_db() -> (TestDb, i64) {
    let db = TestDb::vcs().await;
    add_handler(
        &db.client,
        "crm",
        &["clients.*"],
        "http",
        "http://127.0.0.1:9/crm",
        "",
    )
    .await;
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (1, 'A')", &[])
        .await
        .unwrap();
    let dead = count(
        &db.client,
        "UPDATE provisioning.deliveries SET status = 'dead', attempts = 8, last_error = 'HTTP 500' RETURNING id",
    )
    .await;
    (db, dead)
}

/// Every state-changing route, with a body that would succeed given the token.
fn changing_calls(dead: i64) -> Vec<(Method, String, Option<String>)> {
    vec![
        (
            Method::POST,
            "/api/handlers".into(),
            Some(
                json!({"name": "new", "events": ["clients.create"], "kind": "http", "target": "http://127.0.0.1:9/n"})
                    .to_string(),
            ),
        ),
        (
            Method::PATCH,
            "/api/handlers/crm".into(),
            Some(json!({"priority": 1}).to_string()),
        ),
        (Method::POST, "/api/handlers/crm/pause".into(), None),
        (Method::POST, format!("/api/deliveries/{dead}/retry"), None),
        (
            Method::POST,
            "/api/replay".into(),
            Some(json!({"handler": "crm", "status": "all"}).to_string()),
        ),
        (
            Method::POST,
            "/api/prune".into(),
            Some(json!({"older_than": "0s", "dead": true}).to_string()),
        ),
        (Method::DELETE, "/api/handlers/crm".into(), None),
    ]
}

/// Every read route.
fn read_paths(dead: i64) -> Vec<String> {
    vec![
        "/api/handlers".into(),
        "/api/handlers/crm".into(),
        "/api/events".into(),
        "/api/events/1".into(),
        "/api/deliveries".into(),
        format!("/api/deliveries/{dead}"),
        "/api/logs".into(),
        "/api/status".into(),
    ]
}

#[tokio::test]
async fn admin_health_readiness_page_and_metrics() {
    let db = TestDb::installed().await;
    let server = AdminServer::start(&db, TOKEN, false).await;
    // Open even when reads need a token: probes and scrapers carry none.
    let r = call(&server, Method::GET, "/healthz", None, None).await;
    assert_eq!((r.status, r.body.as_str()), (200, Some("ok")));
    let r = call(&server, Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, json!({"ready": true}));
    let r = call(&server, Method::GET, "/", None, None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.content_type.starts_with("text/html"),
        "{}",
        r.content_type
    );
    let html = r.body.as_str().unwrap();
    for part in [
        "<title>Provisioning Relay</title>",
        "Execution log",
        "id=\"filters\"",
        "id=\"retry\"",
        "id=\"token\"",
        "Replay",
    ] {
        assert!(html.contains(part), "{part}");
    }
    let r = call(&server, Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.content_type.starts_with("text/plain"),
        "{}",
        r.content_type
    );
    let text = r.body.as_str().unwrap_or("").to_string();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("the exposition format parses");
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "provisioning_events_captured_total"),
        "{text}"
    );
    let r = call(&server, Method::GET, "/nowhere", None, None).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn admin_readyz_is_503_with_the_reason_without_the_schema() {
    let db = TestDb::empty().await;
    let server = AdminServer::start(&db, TOKEN, true).await;
    let r = call(&server, Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body["ready"], false);
    let e = r.body["error"].as_str().unwrap();
    assert!(
        e.contains("not installed") && e.contains("relay migrate"),
        "{e}"
    );
    assert_eq!(
        call(&server, Method::GET, "/healthz", None, None)
            .await
            .status,
        200,
        "alive, just not ready"
    );
    // Installing the schema makes it ready without a restart.
    relay::schema::migrate(&db.client).await.unwrap();
    assert_eq!(
        call(&server, Method::GET, "/readyz", None, None)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn admin_state_changing_calls_need_the_right_token() {
    let (db, dead) = small_db().await;
    let server = AdminServer::start(&db, TOKEN, true).await;
    let before = fingerprint(&db).await;
    let wrong = [
        None,
        Some("Bearer wrong-token".to_string()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_string()),
        Some("Bearer ".to_string()),
    ];
    for (method, path, body) in changing_calls(dead) {
        for auth in &wrong {
            let r = call(
                &server,
                method.clone(),
                &path,
                auth.as_deref(),
                body.clone(),
            )
            .await;
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {:?}", r.body);
            assert!(error_text(&r).contains("token"), "{:?}", r.body);
        }
    }
    assert_eq!(fingerprint(&db).await, before, "nothing changed");

    // Reads are open (open_reads = true), with or without a token.
    for path in read_paths(dead) {
        let r = call(&server, Method::GET, &path, None, None).await;
        assert_eq!(r.status, 200, "GET {path}: {:?}", r.body);
    }

    // With the token every call goes through.
    let expected = [201, 200, 200, 200, 200, 200, 200];
    for ((method, path, body), status) in changing_calls(dead).into_iter().zip(expected) {
        let r = call(
            &server,
            method.clone(),
            &path,
            Some(bearer().as_str()),
            body,
        )
        .await;
        assert_eq!(r.status, status, "{method} {path}: {:?}", r.body);
    }
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.handlers WHERE name = 'crm'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.handlers WHERE name = 'new'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn admin_without_a_configured_token_refuses_every_change() {
    let (db, dead) = small_db().await;
    let server = AdminServer::start(&db, "", true).await;
    let before = fingerprint(&db).await;
    for (method, path, body) in changing_calls(dead) {
        for auth in [None, Some("Bearer "), Some("Bearer anything")] {
            let r = call(&server, method.clone(), &path, auth, body.clone()).await;
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}");
            assert!(
                error_text(&r).contains("no admin_token is configured"),
                "{:?}",
                r.body
            );
        }
    }
    assert_eq!(fingerprint(&db).await, before);
    for path in read_paths(dead) {
        assert_eq!(
            call(&server, Method::GET, &path, None, None).await.status,
            200,
            "{path}"
        );
    }
    // Reads closed and no token: nothing but the probes and the page.
    let closed = AdminServer::start(&db, "", false).await;
    for path in read_paths(dead) {
        let r = call(&closed, Method::GET, &path, Some("Bearer "), None).await;
        assert_eq!(r.status, 401, "{path}");
    }
    assert_eq!(
        call(&closed, Method::GET, "/healthz", None, None)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn admin_closed_reads_need_the_token() {
    let (db, dead) = small_db().await;
    let server = AdminServer::start(&db, TOKEN, false).await;
    for path in read_paths(dead) {
        for auth in [None, Some("Bearer nope".to_string())] {
            let r = call(&server, Method::GET, &path, auth.as_deref(), None).await;
            assert_eq!(r.status, 401, "GET {path} with {auth:?}");
        }
        let r = call(&server, Method::GET, &path, Some(bearer().as_str()), None).await;
        assert_eq!(r.status, 200, "GET {path} with the token: {:?}", r.body);
    }
    for path in ["/", "/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            call(&server, Method::GET, path, None, None).await.status,
            200,
            "{path}"
        );
    }
}

#[tokio::test]
async fn admin_handlers_create_read_update_actions_and_delete() {
    let db = TestDb::vcs().await;
    let server = AdminServer::start(&db, TOKEN, true).await;

    let r = send(
        &server,
        Method::POST,
        "/api/handlers",
        json!({
            "name": "crm", "events": ["clients.*"], "kind": "http", "target": "https://crm.example.com/h",
            "priority": 5, "headers": {"X-Api-Key": "k1"}, "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "retry_schedule_ms": [1000, 2000], "timeout_ms": 3000, "format": "full"
        }),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["name"], "crm");
    assert_eq!(r.body["priority"], 5);
    assert_eq!(r.body["secret_set"], true);
    assert_eq!(r.body["retry_schedule_ms"], json!([1000, 2000]));
    assert!(
        !r.body
            .to_string()
            .contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "the secret is never served"
    );
    let r = send(
        &server,
        Method::POST,
        "/api/handlers",
        json!({"name": "hook", "events": ["clients.delete"], "kind": "script", "target": "/bin/true", "args": ["-v"]}),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);

    // Bad definitions: 422 naming the field; nothing stored.
    let base =
        json!({"name": "x", "events": ["clients.create"], "kind": "http", "target": "http://h/x"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        if v.is_null() {
            b.as_object_mut().unwrap().remove(k);
        } else {
            b[k] = v;
        }
        b
    };
    for (body, field) in [
        (with("events", json!(["nope.*"])), "field \"events\""),
        (with("events", json!([])), "field \"events\""),
        (with("events", Value::Null), "field \"events\""),
        (with("target", json!("ftp://h/x")), "field \"target\""),
        (with("target", Value::Null), "field \"target\""),
        (with("kind", json!("carrier-pigeon")), "field \"kind\""),
        (with("stage", json!("middle")), "field \"stage\""),
        (with("timeout_ms", json!(0)), "field \"timeout_ms\""),
        (with("headers", json!({"X-Num": 1})), "field \"headers\""),
        (with("name", json!("two words")), "field \"name\""),
        (with("name", json!("crm")), "field \"name\""),
        (with("status", json!("sleepy")), "field \"status\""),
        (with("format", json!("xml")), "field \"format\""),
        (
            with("retry_schedule_ms", json!([-1])),
            "field \"retry_schedule_ms\"",
        ),
    ] {
        let r = send(&server, Method::POST, "/api/handlers", body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {:?}", r.body);
        assert!(error_text(&r).contains(field), "{body}: {:?}", r.body);
    }
    // Malformed requests: 400 naming the problem.
    for (body, needle) in [
        (with("colour", json!("red")).to_string(), "colour"),
        (with("priority", json!("high")).to_string(), "priority"),
        ("{\"name\": ".to_string(), "invalid handler"),
    ] {
        let r = call(
            &server,
            Method::POST,
            "/api/handlers",
            Some(bearer().as_str()),
            Some(body.clone()),
        )
        .await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert!(error_text(&r).contains(needle), "{body}: {:?}", r.body);
    }
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.handlers").await,
        2
    );

    // Read.
    let list = get_ok(&server, "/api/handlers").await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["crm", "hook"]);
    let h = get_ok(&server, "/api/handlers/crm").await;
    assert_eq!(h["target"], "https://crm.example.com/h");
    assert_eq!(h["headers"], json!({"X-Api-Key": "k1"}));
    let r = call(&server, Method::GET, "/api/handlers/ghost", None, None).await;
    assert_eq!(r.status, 404);
    assert!(error_text(&r).contains("no handler named \"ghost\""));

    // Update.
    let r = send(
        &server,
        Method::PATCH,
        "/api/handlers/crm",
        json!({"priority": 7, "name": "crm2"}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["name"], "crm2");
    assert_eq!(r.body["priority"], 7);
    assert_eq!(r.body["timeout_ms"], 3000, "untouched");
    let r = send(
        &server,
        Method::PATCH,
        "/api/handlers/crm2",
        json!({"events": ["clients.nope"]}),
    )
    .await;
    assert_eq!(r.status, 422);
    assert!(error_text(&r).contains("field \"events\""));
    let r = send(&server, Method::PATCH, "/api/handlers/crm2", json!({})).await;
    assert_eq!(r.status, 400);
    assert!(error_text(&r).contains("nothing to change"));
    let r = send(
        &server,
        Method::PATCH,
        "/api/handlers/ghost",
        json!({"priority": 1}),
    )
    .await;
    assert_eq!(r.status, 404);
    let r = send(
        &server,
        Method::PATCH,
        "/api/handlers/crm2",
        json!({"secret": "whsec_other-secret-value"}),
    )
    .await;
    assert_eq!(r.status, 200);
    let stored: String = db
        .client
        .query_one(
            "SELECT secret FROM provisioning.handlers WHERE name = 'crm2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "whsec_other-secret-value");

    // Actions.
    for (action, status) in [
        ("pause", "paused"),
        ("resume", "enabled"),
        ("disable", "disabled"),
        ("enable", "enabled"),
        ("archive", "archived"),
    ] {
        let r = send(
            &server,
            Method::POST,
            &format!("/api/handlers/crm2/{action}"),
            Value::Null,
        )
        .await;
        assert_eq!(r.status, 200, "{action}: {:?}", r.body);
        assert_eq!(r.body["status"], status);
        let stored: String = db
            .client
            .query_one(
                "SELECT status FROM provisioning.handlers WHERE name = 'crm2'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(stored, status);
    }
    let r = send(
        &server,
        Method::POST,
        "/api/handlers/crm2/explode",
        Value::Null,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(error_text(&r).contains("unknown handler action"));
    let r = send(
        &server,
        Method::POST,
        "/api/handlers/ghost/pause",
        Value::Null,
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(ids_of(&get_ok(&server, "/api/handlers").await).len(), 1);
    assert_eq!(
        ids_of(&get_ok(&server, "/api/handlers?all=true").await).len(),
        2
    );
    // PATCH status works too (the page's status toggle).
    let r = send(
        &server,
        Method::PATCH,
        "/api/handlers/crm2",
        json!({"status": "paused"}),
    )
    .await;
    assert_eq!(r.body["status"], "paused");

    // Delete.
    let r = send(&server, Method::DELETE, "/api/handlers/crm2", Value::Null).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["removed"], "crm2");
    let r = send(&server, Method::DELETE, "/api/handlers/crm2", Value::Null).await;
    assert_eq!(r.status, 404);
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.handlers").await,
        1
    );
}

#[tokio::test]
async fn admin_events_deliveries_and_logs_filters_are_exact() {
    let db = TestDb::vcs().await;
    let sc = deliver_scenario(&db).await;
    let server = AdminServer::start(&db, TOKEN, true).await;
    let ev = sc.event_ids(&db).await;
    let dead = sc.dead_ids(&db).await;

    // Events.
    let all = ids_where(&db, "SELECT id FROM provisioning.events").await;
    assert_eq!(ids_of(&get_ok(&server, "/api/events").await), all);
    for (query, sql) in [
        ("name=clients.update", "name = 'clients.update'"),
        ("name=clients.accounts.*", "name LIKE 'clients.accounts.%'"),
        (
            "name=clients.create&object=2",
            "name = 'clients.create' AND object_id = '2'",
        ),
        ("object=1", "object_id = '1'"),
        ("since=1h", "true"),
        ("until=1h", "false"),
        (
            "limit=2",
            "id > (SELECT min(id) + 1 FROM provisioning.events)",
        ),
    ] {
        let got = ids_of(&get_ok(&server, &format!("/api/events?{query}")).await);
        let want = ids_where(
            &db,
            &format!("SELECT id FROM provisioning.events WHERE {sql}"),
        )
        .await;
        assert_eq!(got, want, "/api/events?{query}");
    }
    let p2 = ids_of(
        &get_ok(
            &server,
            &format!("/api/events?limit=2&before_id={}", all[1]),
        )
        .await,
    );
    assert_eq!(p2, all[2..]);
    let r = call(&server, Method::GET, "/api/events?colour=red", None, None).await;
    assert_eq!(r.status, 400, "unknown filters are refused");
    let e = get_ok(&server, &format!("/api/events/{}", ev[2])).await;
    assert_eq!(e["name"], "clients.update");
    assert_eq!(e["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(e["attempts"][0]["handler"], "crm");
    assert_eq!(e["attempts"][0]["status"], "success");
    assert_eq!(
        call(&server, Method::GET, "/api/events/999999", None, None)
            .await
            .status,
        404
    );
    assert_eq!(
        call(&server, Method::GET, "/api/events/abc", None, None)
            .await
            .status,
        400
    );

    // Deliveries.
    let mut want_dead = dead.clone();
    want_dead.reverse();
    assert_eq!(
        ids_of(&get_ok(&server, "/api/deliveries?handler=billing&status=dead").await),
        want_dead
    );
    assert_eq!(
        ids_of(&get_ok(&server, "/api/deliveries?handler=crm").await),
        Vec::<i64>::new()
    );
    assert_eq!(
        ids_of(&get_ok(&server, "/api/deliveries?object=10").await),
        vec![dead[2]]
    );
    assert_eq!(
        ids_of(&get_ok(&server, "/api/deliveries?status=pending").await),
        Vec::<i64>::new()
    );
    let d = get_ok(&server, &format!("/api/deliveries/{}", dead[2])).await;
    assert_eq!(d["status"], "dead");
    assert_eq!(d["handler"], "billing");
    assert_eq!(d["event"], "clients.accounts.create");
    let log = d["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["http_status"], 500);
    assert_eq!(log[0]["response"], "billing exploded");
    assert_eq!(log[0]["error"], "HTTP 500 Internal Server Error");
    let sent: Value = serde_json::from_str(log[0]["request_body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["event"]["events_id"], "clients.accounts.create");
    assert_eq!(sent["data"]["login"], "acc10");
    let crm_delivery = count(
        &db.client,
        "SELECT delivery_id FROM provisioning.attempts WHERE handler_name = 'crm' AND event_name = 'clients.update'",
    )
    .await;
    let d = get_ok(&server, &format!("/api/deliveries/{crm_delivery}")).await;
    assert_eq!(d["status"], "succeeded");
    assert_eq!(d["handler"], "crm");
    assert_eq!(d["attempt_log"][0]["outcome"], "success");
    assert_eq!(
        call(&server, Method::GET, "/api/deliveries/999999", None, None)
            .await
            .status,
        404
    );

    // The execution log.
    let q = |w: &str| format!("SELECT id FROM provisioning.attempts WHERE {w}");
    assert_eq!(
        ids_of(&get_ok(&server, "/api/logs").await),
        ids_where(&db, &q("true")).await
    );
    for (query, sql, n) in [
        ("handler=crm", q("handler_name = 'crm'"), 4),
        ("handler=billing", q("handler_name = 'billing'"), 3),
        (
            "event=clients.update",
            q("event_name = 'clients.update'"),
            1,
        ),
        (
            "event=clients.accounts.*",
            q("event_name = 'clients.accounts.create'"),
            2,
        ),
        ("status=fail", q("outcome = 'fail'"), 3),
        ("status=success", q("outcome = 'success'"), 4),
        ("error=http+500", q("outcome = 'fail'"), 3),
        ("error=nothing+like+this", q("false"), 0),
        ("object=1", q("object_id = '1'"), 3),
        (
            "handler=billing&object=2",
            q("handler_name = 'billing' AND object_id = '2'"),
            1,
        ),
        (
            "handler=billing&status=fail&event=clients.create",
            q("handler_name = 'billing' AND event_name = 'clients.create'"),
            2,
        ),
        ("since=1h&until=", q("true"), 7),
        ("handler=&status=", q("true"), 7),
        ("until=1h", q("false"), 0),
    ] {
        let got = ids_of(&get_ok(&server, &format!("/api/logs?{query}")).await);
        let want = ids_where(&db, &sql).await;
        assert_eq!(want.len(), n, "{query}");
        assert_eq!(got, want, "/api/logs?{query}");
    }
    let t: String = db
        .client
        .query_one(
            "SELECT to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM provisioning.attempts ORDER BY started_at OFFSET 3 LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let got = ids_of(&get_ok(&server, &format!("/api/logs?since={t}")).await);
    assert_eq!(
        got,
        ids_where(&db, &q(&format!("started_at >= '{t}'"))).await
    );
    let got = ids_of(&get_ok(&server, &format!("/api/logs?until={t}")).await);
    assert_eq!(
        got,
        ids_where(&db, &q(&format!("started_at < '{t}'"))).await
    );
    let page1 = ids_of(&get_ok(&server, "/api/logs?limit=4").await);
    let page2 = ids_of(
        &get_ok(
            &server,
            &format!("/api/logs?limit=4&before_id={}", page1[3]),
        )
        .await,
    );
    assert_eq!([page1, page2].concat(), ids_where(&db, &q("true")).await);
    for bad in ["status=maybe", "since=whenever", "limit=lots", "colour=red"] {
        let r = call(
            &server,
            Method::GET,
            &format!("/api/logs?{bad}"),
            None,
            None,
        )
        .await;
        assert_eq!(r.status, 400, "{bad}: {:?}", r.body);
    }
    let _ = sc;
}

#[tokio::test]
async fn admin_retry_replay_status_and_prune() {
    let db = TestDb::vcs().await;
    let sc = deliver_scenario(&db).await;
    let server = AdminServer::start(&db, TOKEN, true).await;
    let dead = sc.dead_ids(&db).await;
    let ev = sc.event_ids(&db).await;

    let s = get_ok(&server, "/api/status").await;
    assert_eq!(s["backlog"], 0);
    assert_eq!(s["dead"], 3);
    assert_eq!(s["handlers"][0]["name"], "billing");
    assert_eq!(s["handlers"][0]["dead"], 3);
    assert_eq!(s["handlers"][1]["name"], "crm");
    assert_eq!(s["handlers"][1]["dead"], 0);

    // Retry a dead delivery.
    let r = send(
        &server,
        Method::POST,
        &format!("/api/deliveries/{}/retry", dead[0]),
        Value::Null,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["was"], "dead");
    assert_eq!(
        count(&db.client, &format!("SELECT count(*) FROM provisioning.deliveries WHERE id = {} AND status = 'pending' AND attempts = 0", dead[0])).await,
        1
    );
    // Retry a succeeded one: a new delivery of the same event.
    let crm_delivery = count(
        &db.client,
        "SELECT delivery_id FROM provisioning.attempts WHERE handler_name = 'crm' AND event_name = 'clients.update'",
    )
    .await;
    let r = send(
        &server,
        Method::POST,
        &format!("/api/deliveries/{crm_delivery}/retry"),
        Value::Null,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["was"], "succeeded");
    let new_id = r.body["new_delivery_id"].as_i64().unwrap();
    assert_eq!(
        count(&db.client, &format!("SELECT event_id FROM provisioning.deliveries WHERE id = {new_id} AND status = 'pending'")).await,
        ev[2]
    );
    let r = send(
        &server,
        Method::POST,
        "/api/deliveries/999999/retry",
        Value::Null,
    )
    .await;
    assert_eq!(r.status, 404);
    // A delivery being delivered right now is left alone.
    db.client
        .execute(
            "UPDATE provisioning.deliveries SET status = 'running' WHERE id = $1",
            &[&dead[1]],
        )
        .await
        .unwrap();
    let r = send(
        &server,
        Method::POST,
        &format!("/api/deliveries/{}/retry", dead[1]),
        Value::Null,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(error_text(&r).contains("right now"));
    db.client
        .execute(
            "UPDATE provisioning.deliveries SET status = 'dead' WHERE id = $1",
            &[&dead[1]],
        )
        .await
        .unwrap();

    let s = get_ok(&server, "/api/status").await;
    assert_eq!(s["backlog"], 2);
    assert_eq!(s["dead"], 2);

    // Replay.
    let r = send(
        &server,
        Method::POST,
        "/api/replay",
        json!({"handler": "billing", "dry_run": true}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        json!({"handler": "billing", "status": "dead", "dry_run": true, "deliveries": 2})
    );
    let r = send(
        &server,
        Method::POST,
        "/api/replay",
        json!({"handler": "billing", "event": "clients.accounts.*", "dry_run": true}),
    )
    .await;
    assert_eq!(r.body["deliveries"], 1);
    let r = send(
        &server,
        Method::POST,
        "/api/replay",
        json!({"handler": "crm", "status": "success", "dry_run": true}),
    )
    .await;
    assert_eq!(
        r.body["deliveries"], 3,
        "the update is already queued again"
    );
    let r = send(
        &server,
        Method::POST,
        "/api/replay",
        json!({"handler": "billing"}),
    )
    .await;
    assert_eq!(r.body["deliveries"], 2);
    assert_eq!(r.body["dry_run"], false);
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status = 'dead'"
        )
        .await,
        0
    );
    for (body, status) in [
        (json!({"handler": "ghost"}), 404),
        (json!({"handler": "crm", "status": "sometimes"}), 400),
        (json!({"handler": "crm", "colour": "red"}), 400),
        (json!({"handler": "crm", "since": "whenever"}), 400),
    ] {
        let r = send(&server, Method::POST, "/api/replay", body.clone()).await;
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
    }

    // Prune: age the log by ten days; dead deliveries only with dead = true.
    db.client
        .batch_execute(
            "UPDATE provisioning.attempts SET started_at = started_at - interval '10 days';
             UPDATE provisioning.deliveries SET status = 'dead', created_at = created_at - interval '10 days' WHERE handler_id = (SELECT id FROM provisioning.handlers WHERE name = 'billing');
             UPDATE provisioning.events SET changed_at = changed_at - interval '10 days';",
        )
        .await
        .unwrap();
    let r = send(
        &server,
        Method::POST,
        "/api/prune",
        json!({"older_than": "30d"}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (
            r.body["attempts_removed"].as_i64(),
            r.body["events_removed"].as_i64()
        ),
        (Some(0), Some(0))
    );
    let r = send(
        &server,
        Method::POST,
        "/api/prune",
        json!({"older_than": "7d"}),
    )
    .await;
    assert_eq!(r.body["attempts_removed"], 7);
    assert_eq!(r.body["dead_removed"], 0);
    assert_eq!(
        r.body["events_removed"], 0,
        "every event still has a queued or dead delivery"
    );
    let r = send(
        &server,
        Method::POST,
        "/api/prune",
        json!({"older_than": "7d", "dead": true}),
    )
    .await;
    assert_eq!(r.body["dead_removed"], 3);
    assert_eq!(
        r.body["events_removed"], 3,
        "creates 1 and 2 and the account; the update keeps its queued resend"
    );
    for (body, status) in [
        (json!({"older_than": "soon"}), 400),
        (json!({"older_than": "7d", "colour": "red"}), 400),
        (json!({"dead": true}), 400),
    ] {
        let r = send(&server, Method::POST, "/api/prune", body.clone()).await;
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
    }
}

#[tokio::test]
async fn admin_refuses_oversized_bodies_and_caps_pages() {
    let db = TestDb::vcs().await;
    let server = AdminServer::start(&db, TOKEN, true).await;
    add_handler(
        &db.client,
        "crm",
        &["clients.*"],
        "http",
        "http://127.0.0.1:9/c",
        "",
    )
    .await;
    let huge = "a".repeat(100 * 1024);
    let body = json!({"name": "big", "events": ["clients.create"], "kind": "http", "target": format!("http://h/{huge}")});
    for (method, path) in [
        (Method::POST, "/api/handlers"),
        (Method::PATCH, "/api/handlers/crm"),
        (Method::POST, "/api/replay"),
        (Method::POST, "/api/prune"),
    ] {
        let r = send(&server, method.clone(), path, body.clone()).await;
        assert_eq!(r.status, 413, "{method} {path}: {:?}", r.body);
        // Without the token it never gets that far.
        let r = call(&server, method.clone(), path, None, Some(body.to_string())).await;
        assert_eq!(r.status, 401, "{method} {path}");
    }
    // Just under the limit is read (and judged on its merits).
    let near = json!({"name": "big one", "events": ["clients.create"], "kind": "http", "target": format!("http://h/{}", "a".repeat(60 * 1024))});
    let r = send(&server, Method::POST, "/api/handlers", near).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(error_text(&r).contains("field \"name\""));
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.handlers").await,
        1
    );

    // 1100 attempts in the log (bulk rows, as a busy day leaves them).
    db.client
        .execute(
            "INSERT INTO provisioning.attempts (delivery_id, event_id, handler_id, handler_name, event_name, object_id,
                attempt, started_at, duration_ms, outcome, http_status, request_body, response, relay)
             SELECT g, g, 1, 'crm', 'clients.update', g::text, 1, now() - g * interval '1 second', 5, 'success', 200, '{}', 'ok', 'r'
               FROM generate_series(1, 1100) g",
            &[],
        )
        .await
        .unwrap();
    let rows = get_ok(&server, "/api/logs?limit=100000").await;
    let got = ids_of(&rows);
    assert_eq!(got.len(), 1000, "capped at 1000");
    let newest: Vec<i64> = ids_where(&db, "SELECT id FROM provisioning.attempts").await;
    assert_eq!(got, newest[..1000]);
    assert_eq!(
        ids_of(&get_ok(&server, "/api/logs").await).len(),
        50,
        "default page"
    );
    assert_eq!(ids_of(&get_ok(&server, "/api/logs?limit=0").await).len(), 1);
    assert_eq!(
        ids_of(&get_ok(&server, "/api/logs?limit=-5").await).len(),
        1
    );
    assert!(ids_of(&get_ok(&server, "/api/events?limit=100000").await).len() <= 1000);
    assert!(ids_of(&get_ok(&server, "/api/deliveries?limit=100000").await).len() <= 1000);
}

/// The value of the counter/gauge `metric` with these labels, summed over other labels; 0 if absent.
fn sample_sum(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{metric}: not a single value: {other:?}"),
        })
        .sum()
}

fn has_sample(scrape: &prometheus_parse::Scrape, metric: &str, handler: &str) -> bool {
    scrape
        .samples
        .iter()
        .any(|s| s.metric == metric && s.labels.get("handler") == Some(handler))
}

async fn scrape(server: &AdminServer) -> prometheus_parse::Scrape {
    let r = call(server, Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status, 200);
    let text = r.body.as_str().expect("text").to_string();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses")
}

/// The breaker's metrics: `provisioning_circuit_open` is 1 while the relay holds a handler's
/// deliveries and back to 0 once the handler is gone (no alert left firing for it), and
/// `provisioning_circuit_opened_total` counts the openings.
#[tokio::test]
async fn circuit_breaker_metrics_follow_the_breaker() {
    let db = TestDb::vcs().await;
    relay::metrics::install();
    relay::metrics::describe();
    let name = format!("breaker_{}", uuid::Uuid::new_v4().simple());
    let down = crate::receiver::Receiver::start().await;
    down.set_default(crate::receiver::Answer::Status(503));
    let hid = add_handler(
        &db.client,
        &name,
        &["clients.create"],
        "http",
        &down.url("/down"),
        "max_in_flight = 1, retry_schedule_ms = '{60000}'",
    )
    .await;
    let server = AdminServer::start(&db, TOKEN, true).await;
    create_clients(&db.client, 4).await;
    let relay = RunningRelay::start(&db, BREAKER_TRIPS_FAST).await;
    let open = [("handler", name.as_str())];
    eventually(WAIT, "provisioning_circuit_open = 1", || async {
        let s = scrape(&server).await;
        (sample_sum(&s, "provisioning_circuit_open", &open) == 1.0).then_some(s)
    })
    .await;
    let s = scrape(&server).await;
    assert_eq!(
        sample_sum(&s, "provisioning_circuit_opened_total", &open),
        1.0
    );
    // the handler removed (its deliveries go with it): the gauge falls back to 0
    db.client
        .execute("DELETE FROM provisioning.handlers WHERE id = $1", &[&hid])
        .await
        .unwrap();
    eventually(WAIT, "provisioning_circuit_open = 0", || async {
        let s = scrape(&server).await;
        (sample_sum(&s, "provisioning_circuit_open", &open) == 0.0).then_some(())
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn metrics_move_as_deliveries_happen() {
    let db = TestDb::vcs().await;
    relay::metrics::install();
    relay::metrics::describe();
    // The recorder is process-wide: names of our own keep other tests' deliveries out.
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let ok_name = format!("metrics_ok_{tag}");
    let bad_name = format!("metrics_bad_{tag}");
    let rx = crate::receiver::Receiver::start().await;
    let rx_bad = crate::receiver::Receiver::start().await;
    rx_bad.set_default(crate::receiver::Answer::Status(500));
    add_handler(
        &db.client,
        &ok_name,
        &["clients.create", "clients.update"],
        "http",
        &rx.url("/ok"),
        "",
    )
    .await;
    add_handler(
        &db.client,
        &bad_name,
        &["clients.create"],
        "http",
        &rx_bad.url("/bad"),
        "retry_schedule_ms = '{}'",
    )
    .await;
    let server = AdminServer::start(&db, TOKEN, true).await;

    let before = scrape(&server).await;
    let success = [("handler", ok_name.as_str()), ("outcome", "success")];
    let base_ok = sample_sum(&before, "provisioning_deliveries_total", &success);
    let base_hist = sample_sum(
        &before,
        "provisioning_attempt_duration_seconds_count",
        &[("handler", &ok_name)],
    );
    let base_fail = sample_sum(
        &before,
        "provisioning_deliveries_total",
        &[("handler", &bad_name), ("outcome", "fail")],
    );
    let base_dead = sample_sum(
        &before,
        "provisioning_deliveries_dead_total",
        &[("handler", &bad_name)],
    );
    // Gauges are sampled from the database at scrape time: present before any delivery.
    assert!(has_sample(&before, "provisioning_backlog", &ok_name));

    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .batch_execute(
            "INSERT INTO clients (id, name) VALUES (1, 'A'), (2, 'B'), (3, 'C');
             UPDATE clients SET name = 'A2' WHERE id = 1;",
        )
        .await
        .unwrap();
    rx.wait_for("/ok", 4, WAIT).await;
    eventually(WAIT, "7 attempts logged", || async {
        (count(&db.client, "SELECT count(*) FROM provisioning.attempts").await == 7).then_some(())
    })
    .await;
    relay.stop().await;

    let after = scrape(&server).await;
    assert_eq!(
        sample_sum(&after, "provisioning_deliveries_total", &success) - base_ok,
        4.0
    );
    assert_eq!(
        sample_sum(
            &after,
            "provisioning_deliveries_total",
            &[
                ("handler", &ok_name),
                ("outcome", "success"),
                ("event", "clients.create")
            ]
        ) - sample_sum(
            &before,
            "provisioning_deliveries_total",
            &[
                ("handler", &ok_name),
                ("outcome", "success"),
                ("event", "clients.create")
            ]
        ),
        3.0
    );
    assert_eq!(
        sample_sum(
            &after,
            "provisioning_deliveries_total",
            &[("handler", &bad_name), ("outcome", "fail")]
        ) - base_fail,
        3.0
    );
    assert_eq!(
        sample_sum(
            &after,
            "provisioning_deliveries_total",
            &[("handler", &ok_name), ("outcome", "fail")]
        ),
        0.0
    );
    assert_eq!(
        sample_sum(
            &after,
            "provisioning_deliveries_dead_total",
            &[("handler", &bad_name)]
        ) - base_dead,
        3.0
    );
    assert_eq!(
        sample_sum(
            &after,
            "provisioning_attempt_duration_seconds_count",
            &[("handler", &ok_name)]
        ) - base_hist,
        4.0
    );
    let hist = after
        .samples
        .iter()
        .find(|s| {
            s.metric == "provisioning_attempt_duration_seconds"
                && s.labels.get("handler") == Some(ok_name.as_str())
        })
        .expect("attempt duration histogram");
    let prometheus_parse::Value::Histogram(buckets) = &hist.value else {
        panic!("not a histogram: {hist:?}");
    };
    let inf = buckets
        .iter()
        .find(|b| b.less_than.is_infinite())
        .expect("+Inf bucket");
    assert!(inf.count >= 4.0);
    assert!(has_sample(
        &after,
        "provisioning_delivery_latency_seconds_count",
        &ok_name
    ));
    assert_eq!(
        sample_sum(&after, "provisioning_backlog", &[("handler", &ok_name)]),
        0.0
    );
    assert_eq!(
        sample_sum(&after, "provisioning_dead", &[("handler", &bad_name)]),
        3.0
    );
    assert!(has_sample(
        &after,
        "provisioning_oldest_pending_age_seconds",
        &ok_name
    ));
    // Process-wide values (the last database sampled): present, not compared here.
    for metric in [
        "provisioning_events_captured_total",
        "provisioning_capture_problems",
    ] {
        assert!(
            after.samples.iter().any(|s| s.metric == metric),
            "{metric} missing"
        );
    }
    assert!(
        after.docs.contains_key("provisioning_deliveries_total"),
        "described"
    );

    // A queued delivery shows in the backlog gauge.
    db.client
        .execute("UPDATE clients SET name = 'B2' WHERE id = 2", &[])
        .await
        .unwrap();
    let queued = scrape(&server).await;
    assert_eq!(
        sample_sum(&queued, "provisioning_backlog", &[("handler", &ok_name)]),
        1.0
    );
}

/// `POST /api/handlers/{name}/test`: the CLI's test send over the API. It calls out to the
/// handler, so it needs the token even where reads are open; the body is optional.
#[tokio::test]
async fn api_test_sends_one_event_to_a_handler_with_the_token_only() {
    let db = TestDb::vcs().await;
    let rx = crate::receiver::Receiver::start().await;
    add_handler(
        &db.client,
        "crm",
        &["clients.*"],
        "http",
        &rx.url("/hook"),
        "",
    )
    .await;
    db.client
        .batch_execute("INSERT INTO clients (id, name) VALUES (5, 'E')")
        .await
        .unwrap();
    let event_id = count(&db.client, "SELECT max(id) FROM provisioning.events").await;
    let server = AdminServer::start(&db, TOKEN, true).await;

    let r = call(&server, Method::POST, "/api/handlers/crm/test", None, None).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert!(rx.received().is_empty(), "nothing sent without the token");

    let r = call(
        &server,
        Method::POST,
        "/api/handlers/crm/test",
        Some(&bearer()),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["ok"], true);
    assert_eq!(r.body["event"]["id"], event_id);
    let r = call(
        &server,
        Method::POST,
        "/api/handlers/crm/test",
        Some(&bearer()),
        Some(json!({"event_id": event_id}).to_string()),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let got = rx.wait_for("/hook", 2, WAIT).await;
    assert_eq!(got[1].json()["event"]["object_id"], 5);
    assert!(got[1].header("webhook-id").unwrap().starts_with("test_"));

    // bad input: unknown field, unknown handler, unknown event
    let r = call(
        &server,
        Method::POST,
        "/api/handlers/crm/test",
        Some(&bearer()),
        Some(r#"{"event": 1}"#.to_string()),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let r = call(
        &server,
        Method::POST,
        "/api/handlers/nobody/test",
        Some(&bearer()),
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    let r = call(
        &server,
        Method::POST,
        "/api/handlers/crm/test",
        Some(&bearer()),
        Some(json!({"event_id": 999_999}).to_string()),
    )
    .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.attempts").await,
        0
    );
    assert_eq!(rx.received().len(), 2);
}
