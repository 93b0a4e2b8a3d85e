//! Every handler example in examples/ works against a real relay.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(30);

fn example(path: &str) -> String {
    format!("{}/../examples/{path}", env!("CARGO_MANIFEST_DIR"))
}

/// A child process killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_listening(port: u16) {
    eventually(WAIT, &format!("a server on port {port}"), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

async fn attempts(db: &TestDb, handler: &str, outcome: &str) -> i64 {
    db.client
        .query_one(
            "SELECT count(*) FROM provisioning.attempts WHERE handler_name = $1 AND outcome = $2",
            &[&handler, &outcome],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn flask_echo_handler_works_after_and_before() {
    let port = free_port();
    let _flask = Server(
        Command::new("python3")
            .arg(example("flask_echo/app.py"))
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with Flask (pip install flask)"),
    );
    wait_listening(port).await;
    let db = TestDb::vcs().await;
    let url = format!("http://127.0.0.1:{port}/api");
    add_handler(&db.client, "flask-after", &["clients.*"], "http", &url, "").await;
    add_handler(
        &db.client,
        "flask-before",
        &["clients.update"],
        "http",
        &url,
        "stage = 'before'",
    )
    .await;
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (1, 'A')", &[])
        .await
        .unwrap();
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("UPDATE clients SET name = 'B' WHERE id = 1", &[])
        .await
        .unwrap();
    eventually(WAIT, "two after-stage deliveries", || async {
        (attempts(&db, "flask-after", "success").await == 2).then_some(())
    })
    .await;
    // The echo as a before-stage handler means "allow": nothing written back.
    let decision: Option<String> = db
        .client
        .query_one(
            "SELECT decision FROM provisioning.events WHERE name = 'clients.update'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(decision.as_deref(), Some("allowed"));
    let echoed: String = db
        .client
        .query_one(
            "SELECT response FROM provisioning.attempts WHERE handler_name = 'flask-after' AND event_name = 'clients.update'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let v: serde_json::Value = serde_json::from_str(&echoed).unwrap();
    assert_eq!(v["data"]["name"], "B", "the reply is the echoed envelope");
    relay.stop().await;
}

#[tokio::test]
async fn node_handler_verifies_signatures() {
    let port = free_port();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let _node = Server(
        Command::new("node")
            .arg(example("node_verify/server.js"))
            .env("PORT", port.to_string())
            .env("WEBHOOK_SECRET", secret)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node (Node.js) on PATH"),
    );
    wait_listening(port).await;
    let db = TestDb::vcs().await;
    let url = format!("http://127.0.0.1:{port}/hooks");
    add_handler(
        &db.client,
        "signed",
        &["clients.create"],
        "http",
        &url,
        &format!("secret = '{secret}'"),
    )
    .await;
    add_handler(
        &db.client,
        "wrong-secret",
        &["clients.create"],
        "http",
        &url,
        "secret = 'whsec_d3Jvbmcgc2VjcmV0IGtleQ==', retry_schedule_ms = '{}'",
    )
    .await;
    add_handler(
        &db.client,
        "unsigned",
        &["clients.create"],
        "http",
        &url,
        "retry_schedule_ms = '{}'",
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("INSERT INTO clients (name) VALUES ('A')", &[])
        .await
        .unwrap();
    eventually(WAIT, "all three handlers attempted", || async {
        (attempts(&db, "signed", "success").await == 1
            && attempts(&db, "wrong-secret", "fail").await == 1
            && attempts(&db, "unsigned", "fail").await == 1)
            .then_some(())
    })
    .await;
    let status: Option<i32> = db
        .client
        .query_one(
            "SELECT http_status FROM provisioning.attempts WHERE handler_name = 'wrong-secret'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, Some(401));
    relay.stop().await;
}

#[tokio::test]
async fn shell_and_before_stage_script_examples() {
    let db = TestDb::vcs().await;
    let dir = std::env::temp_dir().join(format!("relay-example-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("provisioning.log");
    let log_str = log.to_str().unwrap().to_string();
    let id = add_handler(
        &db.client,
        "audit-log",
        &["clients.*"],
        "script",
        &example("scripts/log_event.sh"),
        "",
    )
    .await;
    db.client
        .execute(
            "UPDATE provisioning.handlers SET args = ARRAY[$2] WHERE id = $1",
            &[&id, &log_str],
        )
        .await
        .unwrap();
    add_handler(
        &db.client,
        "prefix",
        &["clients.create"],
        "script",
        &example("scripts/before_prefix.py"),
        "stage = 'before'",
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute(
            "INSERT INTO clients (id, name) VALUES (1, 'Customer A'), (2, 'Test client')",
            &[],
        )
        .await
        .unwrap();
    eventually(WAIT, "both decided", || async {
        (count(
            &db.client,
            "SELECT count(*) FROM provisioning.events WHERE decision IS NOT NULL",
        )
        .await
            == 2)
            .then_some(())
    })
    .await;
    let names: Vec<String> = db
        .client
        .query("SELECT name FROM clients ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        names,
        vec!["Customer Atestprefix".to_string()],
        "modified one, forbade the test client"
    );
    let text = eventually(WAIT, "the shell handler's log line", || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|t| t.contains("clients.create"))
        }
    })
    .await;
    assert!(text.contains("attempt=1 id=evt_"), "{text}");
    assert!(
        text.contains("Customer Atestprefix"),
        "the after-stage sees the modified data: {text}"
    );
    assert!(
        !text.contains("Test client"),
        "a forbidden change reaches no after-stage handler: {text}"
    );
    relay.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
