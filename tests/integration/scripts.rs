//! Script handlers (SPEC §5 "Script", §8): the envelope on stdin, environment, arguments, exit
//! codes, retries, timeouts that kill the whole process group, bounded output, and scripts that
//! cannot start. The fixtures live in tests/fixtures/.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;
use crate::guarantees::RelayProcess;
use crate::receiver::Receiver;

const WAIT: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> String {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures")).join(name);
    let p = p
        .canonicalize()
        .unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()));
    p.to_str().unwrap().to_string()
}

/// A fresh temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p =
            std::env::temp_dir().join(format!("relay-script-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.0.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Attempt {
    outcome: String,
    exit_code: Option<i32>,
    response: Option<String>,
    error: Option<String>,
    request_body: String,
    attempt: i32,
    duration_ms: f64,
}

async fn attempts_of(db: &TestDb, handler_id: i64) -> Vec<Attempt> {
    db.client
        .query(
            "SELECT outcome, exit_code, response, error, request_body, attempt, duration_ms
               FROM provisioning.attempts WHERE handler_id = $1 ORDER BY id",
            &[&handler_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Attempt {
            outcome: r.get(0),
            exit_code: r.get(1),
            response: r.get(2),
            error: r.get(3),
            request_body: r.get(4),
            attempt: r.get(5),
            duration_ms: r.get(6),
        })
        .collect()
}

async fn wait_attempts(db: &TestDb, handler_id: i64, n: usize) -> Vec<Attempt> {
    eventually(
        WAIT,
        &format!("{n} logged attempts of handler {handler_id}"),
        || async {
            let a = attempts_of(db, handler_id).await;
            (a.len() >= n).then_some(a)
        },
    )
    .await
}

/// Dead or a zombie (its parent may not reap it): either way it no longer runs.
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('Z' | 'X')))
            .unwrap_or(false),
    }
}

fn set_handler_args(args: &[&str]) -> String {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| format!("\"{}\"", a.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("args = '{{{}}}'", quoted.join(",").replace('\'', "''"))
}

// ------------------------------------------------------------------------------------------------
// 13. stdin, environment, arguments, stdout
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn script_gets_envelope_on_stdin_env_and_args_and_nothing_of_the_relay_environment() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    let out = TempDir::new();
    let hid = add_handler(
        &db.client,
        "script",
        &["clients.update"],
        "script",
        &fixture("capture.sh"),
        &set_handler_args(&[out.path(), "two words", "--flag=$HOME", "*"]),
    )
    .await;
    add_handler(
        &db.client,
        "http-twin",
        &["clients.update"],
        "http",
        &rx.url("/twin"),
        "",
    )
    .await;
    db.client
        .execute(
            "INSERT INTO clients (id, name) VALUES (12, 'Customer A')",
            &[],
        )
        .await
        .unwrap();

    // The real binary, with a secret-looking variable and the database URL in its environment.
    let leak_name = format!("PROVISIONING_TEST_LEAK_{}", uuid::Uuid::new_v4().simple());
    let mut relay = RelayProcess::spawn(
        &db,
        "script-relay",
        &[],
        &[
            (&leak_name, "s3cr3t-must-not-leak"),
            ("DATABASE_URL", &db.url),
            ("PGPASSWORD", "pg-secret"),
        ],
    );
    db.client
        .execute("UPDATE clients SET name = 'Customer B' WHERE id = 12", &[])
        .await
        .unwrap();
    let log = wait_attempts(&db, hid, 1).await;
    let twin = rx.wait_for("/twin", 1, WAIT).await;
    relay.kill9();

    let a = &log[0];
    assert_eq!(a.outcome, "success", "error: {:?}", a.error);
    assert_eq!(a.exit_code, Some(0));
    assert_eq!(
        a.response.as_deref(),
        Some("handled clients.update attempt 1\n"),
        "stdout is the response"
    );

    // Byte-exact envelope, the same as the HTTP body of the same event.
    let row = db
        .client
        .query_one(
            "SELECT id, to_char(changed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') FROM provisioning.events WHERE name = 'clients.update'",
            &[],
        )
        .await
        .unwrap();
    let (event_id, dt): (i64, String) = (row.get(0), row.get(1));
    let stdin = out.read("stdin");
    assert_eq!(
        stdin,
        format!(
            r#"{{"event":{{"dt":"{dt}+00:00","events_id":"clients.update","object_id":12}},"data":{{"id":12,"name":"Customer B"}}}}"#
        )
    );
    assert_eq!(stdin, twin[0].body, "stdin equals the HTTP body");
    assert_eq!(stdin, a.request_body, "stdin equals the logged request");

    // Arguments passed as given: no shell, no splitting, no expansion.
    assert_eq!(out.read("args"), "two words\n--flag=$HOME\n*\n");

    let env = out.read("env");
    let vars: Vec<(&str, &str)> = env.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
    assert_eq!(get("PROVISIONING_EVENT"), Some("clients.update"));
    assert_eq!(
        get("PROVISIONING_DELIVERY_ID"),
        Some(format!("evt_{event_id}_h{hid}").as_str())
    );
    assert_eq!(get("PROVISIONING_ATTEMPT"), Some("1"));
    assert!(
        !env.contains(&leak_name) && !env.contains("s3cr3t"),
        "the relay's environment leaked:\n{env}"
    );
    assert!(
        get("DATABASE_URL").is_none() && get("PGPASSWORD").is_none() && !env.contains("pg-secret"),
        "{env}"
    );
    for (name, _) in &vars {
        assert!(
            name.starts_with("PROVISIONING_")
                || ["PATH", "LANG", "PWD", "SHLVL", "_", "OLDPWD"].contains(name),
            "unexpected variable {name} in the script's environment:\n{env}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// 14. Non-zero exit
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn non_zero_exit_fails_is_retried_and_stderr_is_logged() {
    let db = TestDb::vcs().await;
    let ok_third = add_handler(
        &db.client,
        "third-time-lucky",
        &["clients.create"],
        "script",
        &fixture("fail_until.sh"),
        &format!(
            "{}, retry_schedule_ms = '{{100,100,100}}'",
            set_handler_args(&["3"])
        ),
    )
    .await;
    let never = add_handler(
        &db.client,
        "never",
        &["clients.create"],
        "script",
        &fixture("fail_until.sh"),
        &format!(
            "{}, retry_schedule_ms = '{{50,50}}'",
            set_handler_args(&["99"])
        ),
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("INSERT INTO clients (name) VALUES ('x')", &[])
        .await
        .unwrap();

    let log = wait_attempts(&db, ok_third, 3).await;
    let summary: Vec<(&str, Option<i32>, i32)> = log
        .iter()
        .map(|a| (a.outcome.as_str(), a.exit_code, a.attempt))
        .collect();
    assert_eq!(
        summary,
        [
            ("fail", Some(7), 1),
            ("fail", Some(7), 2),
            ("success", Some(0), 3)
        ]
    );
    for (i, a) in log[..2].iter().enumerate() {
        let e = a.error.as_deref().unwrap_or("");
        assert!(
            e.contains(&format!("not yet: attempt {} of clients.create", i + 1)),
            "stderr in the error: {e:?}"
        );
        assert!(e.contains('7'), "exit status in the error: {e:?}");
    }
    assert_eq!(log[2].response.as_deref(), Some("done at attempt 3\n"));

    let log = wait_attempts(&db, never, 3).await;
    assert!(log
        .iter()
        .all(|a| a.outcome == "fail" && a.exit_code == Some(7)));
    let (status, last_error): (String, Option<String>) = eventually(WAIT, "dead", || async {
        let r = db
            .client
            .query_one(
                "SELECT status, last_error FROM provisioning.deliveries WHERE handler_id = $1",
                &[&never],
            )
            .await
            .unwrap();
        (r.get::<_, String>(0) == "dead").then(|| (r.get(0), r.get(1)))
    })
    .await;
    assert_eq!(status, "dead");
    assert!(last_error
        .unwrap_or_default()
        .contains("not yet: attempt 3"));
    assert_eq!(attempts_of(&db, never).await.len(), 3);
    relay.stop().await;
}

/// An exit code in the handler's `give_up_on` list is final: the delivery is dead after that one
/// attempt, with the reason in its error. Exit code 0 (success) cannot be listed.
#[tokio::test]
async fn an_exit_code_the_handler_gives_up_on_is_not_retried() {
    let db = TestDb::vcs().await;
    let refuses = add_handler(
        &db.client,
        "refuses",
        &["clients.create"],
        "script",
        &fixture("fail_until.sh"),
        &format!(
            "{}, retry_schedule_ms = '{{50,50}}', give_up_on = '{{7}}'",
            set_handler_args(&["99"])
        ),
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("INSERT INTO clients (name) VALUES ('x')", &[])
        .await
        .unwrap();
    let last_error: Option<String> = eventually(WAIT, "dead", || async {
        let r = db
            .client
            .query_one(
                "SELECT status, last_error FROM provisioning.deliveries WHERE handler_id = $1",
                &[&refuses],
            )
            .await
            .unwrap();
        (r.get::<_, String>(0) == "dead").then(|| r.get(1))
    })
    .await;
    relay.stop().await;
    let last_error = last_error.unwrap_or_default();
    assert!(
        last_error.contains("exit code 7 is in the handler's give_up_on list"),
        "{last_error:?}"
    );
    let log = attempts_of(&db, refuses).await;
    let summary: Vec<(&str, Option<i32>, i32)> = log
        .iter()
        .map(|a| (a.outcome.as_str(), a.exit_code, a.attempt))
        .collect();
    assert_eq!(summary, [("fail", Some(7), 1)], "one attempt, not three");

    let err = db
        .client
        .execute(
            "UPDATE provisioning.handlers SET give_up_on = '{0}' WHERE id = $1",
            &[&refuses],
        )
        .await
        .expect_err("exit code 0 is success");
    let msg = err.as_db_error().map(|e| e.message()).unwrap_or("");
    assert!(
        msg.contains("field \"give_up_on\": exit codes must be between 1 and 255"),
        "{msg}"
    );
}

// ------------------------------------------------------------------------------------------------
// 15. Timeouts kill the whole process group
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn timeout_kills_the_script_and_its_children() {
    let db = TestDb::vcs().await;
    let dir = TempDir::new();
    let hid = add_handler(
        &db.client,
        "hangs",
        &["clients.create"],
        "script",
        &fixture("spawn_and_hang.sh"),
        &format!(
            "{}, timeout_ms = 2000, retry_schedule_ms = '{{}}'",
            set_handler_args(&[dir.path()])
        ),
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("INSERT INTO clients (name) VALUES ('x')", &[])
        .await
        .unwrap();

    let log = wait_attempts(&db, hid, 1).await;
    let a = &log[0];
    assert_eq!(a.outcome, "fail");
    let e = a.error.as_deref().unwrap_or("");
    assert!(e.contains("timed out"), "error: {e:?}");
    assert!(
        a.duration_ms < 10_000.0,
        "the attempt lasted {} ms with a 2 s timeout",
        a.duration_ms
    );
    let script: i32 = dir.read("script.pid").trim().parse().unwrap();
    let child: i32 = dir.read("child.pid").trim().parse().unwrap();
    eventually(
        Duration::from_secs(10),
        "script and child killed",
        || async { (process_gone(script) && process_gone(child)).then_some(()) },
    )
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn a_child_left_behind_by_a_finished_script_is_killed_and_does_not_hold_the_attempt() {
    let db = TestDb::vcs().await;
    let dir = TempDir::new();
    let hid = add_handler(
        &db.client,
        "leaves-child",
        &["clients.create"],
        "script",
        &fixture("spawn_and_hang.sh"),
        &format!(
            "{}, timeout_ms = 20000, retry_schedule_ms = '{{}}'",
            set_handler_args(&[dir.path(), "exit"])
        ),
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("INSERT INTO clients (name) VALUES ('x')", &[])
        .await
        .unwrap();

    let log = wait_attempts(&db, hid, 1).await;
    let a = &log[0];
    assert_eq!(a.outcome, "success", "error: {:?}", a.error);
    assert_eq!(a.response.as_deref(), Some("left a child behind\n"));
    // The child keeps the stdout pipe open; the attempt must not wait for it (nor for the timeout).
    assert!(
        a.duration_ms < 15_000.0,
        "the attempt lasted {} ms",
        a.duration_ms
    );
    let child: i32 = dir.read("child.pid").trim().parse().unwrap();
    eventually(Duration::from_secs(10), "child killed", || async {
        process_gone(child).then_some(())
    })
    .await;
    relay.stop().await;
}

// ------------------------------------------------------------------------------------------------
// 16. Output floods are bounded
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn stdout_flood_is_truncated_and_the_relay_keeps_going() {
    let db = TestDb::vcs().await;
    let hid = add_handler(
        &db.client,
        "flood",
        &["clients.create"],
        "script",
        &fixture("flood.py"),
        &format!(
            "{}, timeout_ms = 60000, retry_schedule_ms = '{{}}'",
            set_handler_args(&["50"])
        ),
    )
    .await;
    let limit: usize = 65_536;
    let relay = RunningRelay::start(&db, &[("response_limit_bytes", "65536")]).await;
    db.client
        .execute("INSERT INTO clients (name) VALUES ('x')", &[])
        .await
        .unwrap();

    let log = eventually(Duration::from_secs(90), "flood attempt logged", || async {
        let a = attempts_of(&db, hid).await;
        (!a.is_empty()).then_some(a)
    })
    .await;
    let a = &log[0];
    assert_eq!(
        (a.outcome.as_str(), a.exit_code),
        ("success", Some(0)),
        "error: {:?}",
        a.error.as_deref().map(|e| &e[..e.len().min(300)])
    );
    let response = a.response.as_deref().unwrap_or("");
    assert!(
        response.len() >= limit && response.len() <= limit + 200,
        "stored response is {} bytes, limit {limit}",
        response.len()
    );
    assert!(response.starts_with("xxxx"));
    assert!(
        response.contains("truncated") && response.contains("52428800"),
        "marks the cut: {:?}",
        &response[limit..]
    );
    let error = a.error.as_deref().unwrap_or("");
    assert!(
        error.len() <= limit + 300,
        "stored stderr is {} bytes",
        error.len()
    );

    // The relay is alive and delivers the next event.
    db.client
        .execute("INSERT INTO clients (name) VALUES ('y')", &[])
        .await
        .unwrap();
    let log = eventually(Duration::from_secs(90), "second attempt logged", || async {
        let a = attempts_of(&db, hid).await;
        (a.len() >= 2).then_some(a)
    })
    .await;
    assert_eq!(log[1].outcome, "success");
    relay.stop().await;
}

// ------------------------------------------------------------------------------------------------
// 17. Scripts that cannot start
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_or_non_executable_script_fails_with_a_clear_error() {
    let db = TestDb::vcs().await;
    let dir = TempDir::new();
    let not_exec = dir.0.join("not-executable.sh");
    std::fs::write(&not_exec, "#!/bin/sh\nexit 0\n").unwrap();
    let missing = add_handler(
        &db.client,
        "missing",
        &["clients.create"],
        "script",
        "/nonexistent/provisioning/handler.sh",
        "retry_schedule_ms = '{50}'",
    )
    .await;
    let noexec = add_handler(
        &db.client,
        "noexec",
        &["clients.create"],
        "script",
        not_exec.to_str().unwrap(),
        "retry_schedule_ms = '{}'",
    )
    .await;
    let good = add_handler(
        &db.client,
        "good",
        &["clients.create"],
        "script",
        &fixture("fail_until.sh"),
        &set_handler_args(&["0"]),
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("INSERT INTO clients (name) VALUES ('x')", &[])
        .await
        .unwrap();

    let log = wait_attempts(&db, missing, 2).await;
    for a in &log {
        assert_eq!((a.outcome.as_str(), a.exit_code), ("fail", None));
        let e = a.error.as_deref().unwrap_or("");
        assert!(
            e.contains("cannot start script /nonexistent/provisioning/handler.sh"),
            "error: {e:?}"
        );
        assert!(e.contains("No such file"), "error names the cause: {e:?}");
    }
    let log = wait_attempts(&db, noexec, 1).await;
    let e = log[0].error.as_deref().unwrap_or("");
    assert!(
        e.contains("cannot start script") && e.contains("ermission denied"),
        "error: {e:?}"
    );
    let log = wait_attempts(&db, good, 1).await;
    assert_eq!(log[0].outcome, "success", "other handlers unaffected");
    eventually(WAIT, "both failing deliveries dead", || async {
        (count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status = 'dead'",
        )
        .await
            == 2)
            .then_some(())
    })
    .await;
    relay.stop().await;
}

// ------------------------------------------------------------------------------------------------
// Found while testing kill -9: scripts outlive a crashed relay
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_script_does_not_outlive_a_relay_killed_with_sigkill() {
    let db = TestDb::vcs().await;
    let dir = TempDir::new();
    add_handler(
        &db.client,
        "hangs",
        &["clients.create"],
        "script",
        &fixture("spawn_and_hang.sh"),
        &format!(
            "{}, timeout_ms = 2000, retry_schedule_ms = '{{}}'",
            set_handler_args(&[dir.path()])
        ),
    )
    .await;
    let mut relay = RelayProcess::spawn(&db, "r1", &[("lease_margin_ms", "1000")], &[]);
    db.client
        .execute("INSERT INTO clients (name) VALUES ('x')", &[])
        .await
        .unwrap();
    let (script, child) = eventually(WAIT, "script running", || async {
        let s = std::fs::read_to_string(dir.0.join("script.pid")).ok()?;
        let c = std::fs::read_to_string(dir.0.join("child.pid")).ok()?;
        Some((
            s.trim().parse::<i32>().unwrap(),
            c.trim().parse::<i32>().unwrap(),
        ))
    })
    .await;
    relay.kill9();
    // Well past the script's 2 s timeout: nothing may be left running on the relay's behalf.
    let start = std::time::Instant::now();
    while !(process_gone(script) && process_gone(child))
        && start.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alive: Vec<i32> = [script, child]
        .into_iter()
        .filter(|p| !process_gone(*p))
        .collect();
    for p in &alive {
        // SAFETY: kill(2) of a process this test started (through the relay): cleanup.
        unsafe {
            libc::kill(*p, libc::SIGKILL);
        }
    }
    assert!(
        alive.is_empty(),
        "still running 10 s after the relay died: {alive:?}"
    );
}
