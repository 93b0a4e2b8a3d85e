//! Delivery guarantees (SPEC §4, §5, §8): Retry-After, 410 Gone, redirects, timeouts, dead letters,
//! isolation between handlers, per-object order under failures, several relays at once, crashes
//! (`kill -9`), SIGTERM, and handler changes reaching a running relay.
//!
//! Every wait is a condition with a deadline; handler timeouts and schedules are short per handler
//! so the tests run fast, while deadlines stay generous for a loaded machine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::receiver::{Answer, Received, Receiver};

const WAIT: Duration = Duration::from_secs(30);
const LONG_WAIT: Duration = Duration::from_secs(120);

// ------------------------------------------------------------------------------------------------
// Helpers shared with scripts.rs
// ------------------------------------------------------------------------------------------------

/// The real `relay` binary running against a test database; SIGKILLed on drop if still running.
pub struct RelayProcess {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl RelayProcess {
    /// `relay run` with test-friendly settings plus `sets` (`--set key=value`) and extra
    /// environment variables. The database URL is given with `--database-url` unless `envs`
    /// provides `DATABASE_URL`.
    pub fn spawn(
        db: &TestDb,
        name: &str,
        sets: &[(&str, &str)],
        envs: &[(&str, &str)],
    ) -> RelayProcess {
        let log = std::env::temp_dir().join(format!(
            "relay-test-{}-{name}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let log_file = std::fs::File::create(&log).expect("create relay log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relay"));
        cmd.arg("run");
        if !envs.iter().any(|(k, _)| *k == "DATABASE_URL") {
            cmd.args(["--database-url", &db.url]);
        }
        let mut all: Vec<(String, String)> = vec![
            ("poll_interval_ms".into(), "200".into()),
            ("admin_listen".into(), String::new()),
            ("relay_name".into(), name.into()),
        ];
        all.extend(sets.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        for (k, v) in &all {
            cmd.args(["--set", &format!("{k}={v}")]);
        }
        cmd.envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file);
        let child = cmd.spawn().expect("spawn the relay binary");
        RelayProcess {
            child,
            name: name.into(),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL, reap, and wait until the database has no session of this relay left. A statement
    /// the relay sent just before it died still runs, and commits, in its backend after the
    /// process is gone; only when the backend has exited is the database's state final.
    pub async fn kill9_and_wait_sessions(&mut self, db: &TestDb) {
        self.kill9();
        let app = format!("relay {}", self.name);
        eventually(WAIT, "the killed relay's sessions ended", || async {
            let left: i64 = db
                .client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() \
                       AND (application_name = $1 OR application_name LIKE $1 || ' %')",
                    &[&app],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            (left == 0).then_some(())
        })
        .await;
    }

    pub fn sigterm(&self) {
        // SAFETY: plain kill(2) on our own child.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
    }

    /// Wait (without blocking the runtime) until the process exits.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > deadline {
                panic!(
                    "relay {} did not exit within {deadline:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if std::thread::panicking() {
                eprintln!("--- log of relay {} ---\n{}", self.name, self.log_text());
            }
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The event id in a `webhook-id` (`evt_{event}_h{handler}`).
pub fn event_id_of(r: &Received) -> i64 {
    let id = r.header("webhook-id").expect("webhook-id header");
    id.strip_prefix("evt_")
        .and_then(|s| s.split('_').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected webhook-id {id}"))
}

fn object_of(r: &Received) -> i64 {
    r.json()["event"]["object_id"]
        .as_i64()
        .expect("numeric object_id")
}

/// Number of distinct webhook-ids answered 200 on `path`.
fn successes(rx: &Receiver, path: &str) -> usize {
    rx.received_on(path)
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.header("webhook-id").unwrap_or("").to_string())
        .collect::<HashSet<_>>()
        .len()
}

/// Per-object order as the receiver saw it: for every object, the event ids of successive
/// requests never go down (no delivery starts before an earlier one of the same object finished),
/// the successful ones strictly increase, and no webhook-id succeeds twice.
fn assert_per_object_order(got: &[Received]) {
    let mut last_seen: HashMap<i64, i64> = HashMap::new();
    let mut last_success: HashMap<i64, i64> = HashMap::new();
    let mut succeeded: HashSet<String> = HashSet::new();
    for r in got {
        let (obj, ev) = (object_of(r), event_id_of(r));
        if let Some(&prev) = last_seen.get(&obj) {
            assert!(
                ev >= prev,
                "object {obj}: event {ev} was requested after event {prev} had started"
            );
        }
        if let Some(&prev) = last_success.get(&obj) {
            assert!(
                ev > prev,
                "object {obj}: event {ev} requested after event {prev} had already succeeded"
            );
        }
        last_seen.insert(obj, ev);
        if r.status == 200 {
            last_success.insert(obj, ev);
            let id = r.header("webhook-id").unwrap().to_string();
            assert!(
                succeeded.insert(id.clone()),
                "webhook-id {id} succeeded twice"
            );
        }
    }
}

async fn attempts_of(
    db: &TestDb,
    handler_id: i64,
) -> Vec<(String, Option<i32>, Option<String>, i32)> {
    db.client
        .query(
            "SELECT outcome, http_status, error, attempt FROM provisioning.attempts WHERE handler_id = $1 ORDER BY id",
            &[&handler_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

async fn wait_attempts(
    db: &TestDb,
    handler_id: i64,
    n: usize,
) -> Vec<(String, Option<i32>, Option<String>, i32)> {
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

// ------------------------------------------------------------------------------------------------
// 1. Retry-After
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn retry_after_on_429_and_503_delays_the_next_attempt_and_is_bounded() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    let slow_down = |status: u16, secs: &str| {
        Answer::StatusWithHeaders(status, vec![("retry-after", secs.to_string())])
    };
    let hid = add_handler(
        &db.client,
        "throttled",
        &["clients.create"],
        "http",
        &rx.url("/ra"),
        "retry_schedule_ms = '{100,100}'",
    )
    .await;
    let relay = RunningRelay::start(&db, &[("max_retry_after_ms", "3000")]).await;

    // 429 + Retry-After: 2 → the retry waits ~2 s, not the scheduled 100 ms.
    rx.script([slow_down(429, "2")]);
    db.client
        .execute("INSERT INTO clients (name) VALUES ('a')", &[])
        .await
        .unwrap();
    let got = rx.wait_for("/ra", 2, WAIT).await;
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "429 Retry-After: 2 honoured? retried after {gap:?}"
    );
    assert_eq!(got[0].body, got[1].body);

    // 503 + Retry-After: 2 → the same.
    rx.script([slow_down(503, "2")]);
    db.client
        .execute("INSERT INTO clients (name) VALUES ('b')", &[])
        .await
        .unwrap();
    let got = rx.wait_for("/ra", 4, WAIT).await;
    let gap = got[3].at - got[2].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "503 Retry-After: 2 honoured? retried after {gap:?}"
    );
    assert_eq!(got[2].body, got[3].body);
    assert_ne!(got[1].body, got[2].body);

    // A huge Retry-After is bounded by max_retry_after_ms (3 s here).
    rx.script([slow_down(429, "3600")]);
    db.client
        .execute("INSERT INTO clients (name) VALUES ('c')", &[])
        .await
        .unwrap();
    let got = rx.wait_for("/ra", 6, WAIT).await;
    let gap = got[5].at - got[4].at;
    assert!(
        gap >= Duration::from_millis(2900) && gap < Duration::from_secs(20),
        "Retry-After: 3600 bounded by max_retry_after_ms = 3000? retried after {gap:?}"
    );

    let log = wait_attempts(&db, hid, 6).await;
    let statuses: Vec<(String, Option<i32>)> = log.iter().map(|a| (a.0.clone(), a.1)).collect();
    assert_eq!(
        statuses,
        [
            ("fail", 429),
            ("success", 200),
            ("fail", 503),
            ("success", 200),
            ("fail", 429),
            ("success", 200)
        ]
        .map(|(o, s)| (o.to_string(), Some(s)))
    );
    relay.stop().await;
}

// ------------------------------------------------------------------------------------------------
// 2. 410 Gone
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn gone_410_pauses_the_handler_until_resumed() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    let control = Receiver::start().await;
    rx.script([Answer::Status(410)]);
    let hid = add_handler(
        &db.client,
        "gone",
        &["clients.update"],
        "http",
        &rx.url("/g"),
        "max_in_flight = 1, retry_schedule_ms = '{100}'",
    )
    .await;
    add_handler(
        &db.client,
        "control",
        &["clients.update"],
        "http",
        &control.url("/c"),
        "",
    )
    .await;
    db.client
        .execute(
            "INSERT INTO clients (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')",
            &[],
        )
        .await
        .unwrap();
    let relay = RunningRelay::start(&db, &[]).await;

    db.client
        .execute("UPDATE clients SET name = 'a1' WHERE id = 1", &[])
        .await
        .unwrap();
    let start = Instant::now();
    let reason: String = loop {
        let row = db
            .client
            .query_one(
                "SELECT status, status_reason FROM provisioning.handlers WHERE id = $1",
                &[&hid],
            )
            .await
            .unwrap();
        if row.get::<_, String>(0) == "paused" {
            break row.get::<_, Option<String>>(1).unwrap_or_default();
        }
        if start.elapsed() > WAIT {
            let log = attempts_of(&db, hid).await;
            let got: Vec<(String, u16)> = rx
                .received()
                .iter()
                .map(|r| (r.path.clone(), r.status))
                .collect();
            panic!(
                "handler not paused after a 410 within {WAIT:?}: handler status {:?}; requests {got:?}; attempts {log:?}; deliveries {:?}",
                row.get::<_, String>(0),
                db.client
                    .query("SELECT status, attempts, last_error FROM provisioning.deliveries", &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1), r.get::<_, Option<String>>(2)))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        reason.contains("410"),
        "status_reason names the 410: {reason:?}"
    );

    // Captured while paused: held, not delivered. The control handler (same events, same relay)
    // proves the relay processed them.
    for sql in [
        "UPDATE clients SET name = 'b1' WHERE id = 2",
        "UPDATE clients SET name = 'c1' WHERE id = 3",
        "UPDATE clients SET name = 'a2' WHERE id = 1",
    ] {
        db.client.execute(sql, &[]).await.unwrap();
    }
    control.wait_for("/c", 4, WAIT).await;
    // One more full round trip through the relay after that, still nothing for the paused handler.
    db.client
        .execute("UPDATE clients SET name = 'b2' WHERE id = 2", &[])
        .await
        .unwrap();
    control.wait_for("/c", 5, WAIT).await;
    assert_eq!(
        rx.received_on("/g").len(),
        1,
        "a paused handler received deliveries: {:?}",
        bodies(&rx.received_on("/g"))
    );
    assert_eq!(
        count(&db.client, &format!("SELECT count(*) FROM provisioning.deliveries WHERE handler_id = {hid} AND status = 'pending'")).await,
        5,
        "the 410'd delivery and the 4 captured while paused are held"
    );

    db.client
        .execute(
            "UPDATE provisioning.handlers SET status = 'enabled' WHERE id = $1",
            &[&hid],
        )
        .await
        .unwrap();
    let got = rx.wait_for("/g", 6, WAIT).await;
    eventually(WAIT, "paused backlog delivered", || async {
        (count(
            &db.client,
            &format!("SELECT count(*) FROM provisioning.deliveries WHERE handler_id = {hid}"),
        )
        .await
            == 0)
            .then_some(())
    })
    .await;
    let names: Vec<String> = got[1..]
        .iter()
        .map(|r| r.json()["data"]["name"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["a1", "a2", "b1", "b2", "c1"],
        "every held event delivered once after resume"
    );
    let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
    assert!(
        pos("a1") < pos("a2") && pos("b1") < pos("b2"),
        "per-object order after resume: {names:?}"
    );
    assert_eq!(
        got[0].body, got[1].body,
        "the 410'd event is the first delivered on resume"
    );
    let log = attempts_of(&db, hid).await;
    assert_eq!((log[0].0.as_str(), log[0].1), ("fail", Some(410)));
    relay.stop().await;
}

/// Found by running the suite under connection exhaustion: when writing the pause fails, the 410
/// is forgotten and the delivery is released for immediate redelivery.
#[tokio::test]
async fn gone_410_pauses_the_handler_even_if_the_first_pause_write_fails() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.script([Answer::Status(410)]);
    let hid = add_handler(
        &db.client,
        "gone",
        &["clients.update"],
        "http",
        &rx.url("/g"),
        "max_in_flight = 1, retry_schedule_ms = '{100}'",
    )
    .await;
    // A transient failure of the first write that pauses a handler (as when the pool cannot get a
    // connection: "too many clients"). Sequences are not transactional, so only the first fails.
    db.client
        .batch_execute(
            "CREATE SEQUENCE test_pause_failures;
             CREATE FUNCTION test_fail_first_pause() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.status = 'paused' AND OLD.status = 'enabled' AND nextval('test_pause_failures') = 1 THEN
                     RAISE EXCEPTION 'simulated transient failure' USING ERRCODE = '53300';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER test_fail_first_pause BEFORE UPDATE ON provisioning.handlers
                 FOR EACH ROW EXECUTE FUNCTION test_fail_first_pause();",
        )
        .await
        .unwrap();
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (1, 'a')", &[])
        .await
        .unwrap();
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("UPDATE clients SET name = 'a1' WHERE id = 1", &[])
        .await
        .unwrap();
    rx.wait_for("/g", 1, WAIT).await;
    let status = eventually(
        WAIT,
        "the 410 handled (handler paused or event redelivered)",
        || async {
            let status: String = db
                .client
                .query_one(
                    "SELECT status FROM provisioning.handlers WHERE id = $1",
                    &[&hid],
                )
                .await
                .unwrap()
                .get(0);
            (status == "paused" || rx.received_on("/g").len() > 1).then_some(status)
        },
    )
    .await;
    assert_eq!(
        (status.as_str(), rx.received_on("/g").len()),
        ("paused", 1),
        "the handler answered 410 Gone but was not paused, and the event was sent again"
    );
    relay.stop().await;
}

fn bodies(got: &[Received]) -> Vec<String> {
    got.iter().map(|r| r.body.clone()).collect()
}

// ------------------------------------------------------------------------------------------------
// 3. Redirects
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn redirect_is_a_failure_and_never_followed() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.script([Answer::Redirect("/elsewhere".into())]);
    let hid = add_handler(
        &db.client,
        "moved",
        &["clients.create"],
        "http",
        &rx.url("/old"),
        "retry_schedule_ms = '{}'",
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("INSERT INTO clients (name) VALUES ('x')", &[])
        .await
        .unwrap();

    eventually(WAIT, "delivery dead after the redirect", || async {
        (count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status = 'dead'",
        )
        .await
            == 1)
            .then_some(())
    })
    .await;
    let log = attempts_of(&db, hid).await;
    assert_eq!(log.len(), 1);
    let (outcome, status, error, _) = &log[0];
    assert_eq!((outcome.as_str(), *status), ("fail", Some(302)));
    let error = error.clone().unwrap_or_default();
    assert!(
        error.to_lowercase().contains("redirect"),
        "error mentions the redirect: {error:?}"
    );
    assert!(
        error.contains("/elsewhere"),
        "error names the Location: {error:?}"
    );
    assert_eq!(rx.received_on("/old").len(), 1);
    assert!(
        rx.received_on("/elsewhere").is_empty(),
        "the redirect was followed"
    );
    relay.stop().await;
}

// ------------------------------------------------------------------------------------------------
// 4. Timeouts
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn hanging_receiver_times_out_and_the_relay_keeps_going() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.script([Answer::Hang, Answer::Body(200, "fine".into())]);
    let hid = add_handler(
        &db.client,
        "hangs",
        &["clients.create"],
        "http",
        &rx.url("/h"),
        "timeout_ms = 300, retry_schedule_ms = '{100}'",
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    db.client
        .execute("INSERT INTO clients (name) VALUES ('x')", &[])
        .await
        .unwrap();

    let log = wait_attempts(&db, hid, 2).await;
    let (outcome, status, error, _) = &log[0];
    assert_eq!((outcome.as_str(), *status), ("fail", None));
    let error = error.clone().unwrap_or_default();
    assert!(
        error.contains("timed out"),
        "error says timed out: {error:?}"
    );
    let dur: f64 = db
        .client
        .query_one("SELECT duration_ms FROM provisioning.attempts WHERE handler_id = $1 ORDER BY id LIMIT 1", &[&hid])
        .await
        .unwrap()
        .get(0);
    assert!(
        (290.0..10_000.0).contains(&dur),
        "the hung attempt took {dur} ms (timeout 300 ms)"
    );
    assert_eq!(log[1].0, "success", "the retry went through");
    let response: Option<String> = db
        .client
        .query_one("SELECT response FROM provisioning.attempts WHERE handler_id = $1 AND outcome = 'success'", &[&hid])
        .await
        .unwrap()
        .get(0);
    assert_eq!(response.as_deref(), Some("fine"));

    // Keeps going: the next event is delivered at once.
    db.client
        .execute("INSERT INTO clients (name) VALUES ('y')", &[])
        .await
        .unwrap();
    let log = wait_attempts(&db, hid, 3).await;
    assert_eq!(log[2].0, "success");
    relay.stop().await;
}

// ------------------------------------------------------------------------------------------------
// 5. Dead letters
// ------------------------------------------------------------------------------------------------

/// Client 7, then two updates of it: events "first" and "second" of one object.
async fn first_and_second_update_of_client_7(db: &TestDb) {
    db.client
        .batch_execute(
            "INSERT INTO clients (id, name) VALUES (7, 'a');
             UPDATE clients SET name = 'first' WHERE id = 7;
             UPDATE clients SET name = 'second' WHERE id = 7;",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn exhausted_schedule_goes_dead_and_releases_the_object() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.script([
        Answer::Status(500),
        Answer::Status(500),
        Answer::Status(500),
    ]);
    let hid = add_handler(
        &db.client,
        "down",
        &["clients.update"],
        "http",
        &rx.url("/d"),
        "retry_schedule_ms = '{50,50}'",
    )
    .await;
    // Both events exist before the relay starts: the second waits behind the first.
    first_and_second_update_of_client_7(&db).await;
    let relay = RunningRelay::start(&db, &[]).await;

    let got = rx.wait_for("/d", 4, WAIT).await;
    let names: Vec<&str> = got
        .iter()
        .map(|r| {
            if r.body.contains("\"first\"") {
                "first"
            } else {
                "second"
            }
        })
        .collect();
    assert_eq!(
        names,
        ["first", "first", "first", "second"],
        "the second event waited for the first to go dead"
    );

    let (status, attempts, last_error): (String, i32, Option<String>) = {
        let r = db
            .client
            .query_one(
                "SELECT d.status, d.attempts, d.last_error FROM provisioning.deliveries d
                   JOIN provisioning.events e ON e.id = d.event_id WHERE e.data->>'name' = 'first'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((status.as_str(), attempts), ("dead", 3));
    assert!(
        last_error.as_deref().unwrap_or("").contains("500"),
        "last_error: {last_error:?}"
    );
    let log = wait_attempts(&db, hid, 4).await;
    let outcomes: Vec<(&str, Option<i32>, i32)> =
        log.iter().map(|a| (a.0.as_str(), a.1, a.3)).collect();
    assert_eq!(
        outcomes,
        [
            ("fail", Some(500), 1),
            ("fail", Some(500), 2),
            ("fail", Some(500), 3),
            ("success", Some(200), 1)
        ]
    );
    eventually(WAIT, "only the dead delivery is left", || async {
        (count(&db.client, "SELECT count(*) FROM provisioning.deliveries").await == 1).then_some(())
    })
    .await;
    relay.stop().await;
}

/// A status in the handler's `give_up_on` list ends the delivery as dead at once, schedule left
/// or not, and the object's next delivery goes; other failures are still retried. Codes that mean
/// something else (2xx, 410) or are no HTTP status are refused with the field named.
#[tokio::test]
async fn a_status_the_handler_gives_up_on_goes_dead_at_once_and_releases_the_object() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.script([Answer::Status(500), Answer::Status(422)]);
    let hid = add_handler(
        &db.client,
        "strict",
        &["clients.update"],
        "http",
        &rx.url("/s"),
        // three more attempts were left when the 422 came
        "retry_schedule_ms = '{50,50,50,50}', give_up_on = '{400,422}'",
    )
    .await;
    first_and_second_update_of_client_7(&db).await;
    let relay = RunningRelay::start(&db, &[]).await;

    let log = wait_attempts(&db, hid, 3).await;
    let outcomes: Vec<(&str, Option<i32>, i32)> =
        log.iter().map(|a| (a.0.as_str(), a.1, a.3)).collect();
    assert_eq!(
        outcomes,
        [
            ("fail", Some(500), 1),
            ("fail", Some(422), 2),
            ("success", Some(200), 1)
        ],
        "500 retried, 422 not, and the second event went after it"
    );
    let got = rx.wait_for("/s", 3, WAIT).await;
    assert!(got[2].body.contains("\"second\""), "{}", got[2].body);
    let (status, attempts, last_error): (String, i32, Option<String>) =
        eventually(WAIT, "the first event's delivery dead", || async {
            let r = db
                .client
                .query_opt(
                    "SELECT d.status, d.attempts, d.last_error FROM provisioning.deliveries d
                       JOIN provisioning.events e ON e.id = d.event_id
                      WHERE e.data->>'name' = 'first' AND d.status = 'dead'",
                    &[],
                )
                .await
                .unwrap()?;
            Some((r.get(0), r.get(1), r.get(2)))
        })
        .await;
    assert_eq!((status.as_str(), attempts), ("dead", 2));
    let last_error = last_error.unwrap_or_default();
    assert!(
        last_error.contains("422") && last_error.contains("give_up_on"),
        "last_error: {last_error:?}"
    );
    assert!(
        log[1].2.as_deref().unwrap_or("").contains("give_up_on"),
        "the attempt log says why: {:?}",
        log[1].2
    );
    relay.stop().await;
    assert_eq!(rx.received_on("/s").len(), 3, "nothing more was sent");

    for (list, says) in [
        ("{200}", "HTTP statuses must be between 400 and 599"),
        ("{410}", "not 410, which pauses the handler"),
        ("{422,NULL}", "none of them NULL"),
    ] {
        let err = db
            .client
            .execute(
                &format!("UPDATE provisioning.handlers SET give_up_on = '{list}' WHERE id = $1"),
                &[&hid],
            )
            .await
            .expect_err(list);
        let msg = err.as_db_error().map(|e| e.message()).unwrap_or("");
        assert!(
            msg.contains("field \"give_up_on\"") && msg.contains(says),
            "{list}: {msg}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// 6. Isolation between handlers
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_failing_handler_never_delays_another() {
    let db = TestDb::vcs().await;
    let hanging = Receiver::start().await;
    hanging.set_default(Answer::Hang);
    let healthy = Receiver::start().await;
    // A hangs for 60 s per attempt with one delivery at a time: coupled to it, B would wait.
    let a = add_handler(
        &db.client,
        "a-hangs",
        &["clients.create"],
        "http",
        &hanging.url("/a"),
        "timeout_ms = 60000, max_in_flight = 1, priority = 1",
    )
    .await;
    add_handler(
        &db.client,
        "b-healthy",
        &["clients.create"],
        "http",
        &healthy.url("/b"),
        "priority = 2",
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;

    // One event at a time, so that B's deliveries are claimed over time, not in one batch. Each
    // must reach B well within A's 60 s timeout.
    let start = Instant::now();
    for i in 1..=20 {
        db.client
            .execute(
                "INSERT INTO clients (name) VALUES ($1)",
                &[&format!("c{i}")],
            )
            .await
            .unwrap();
        healthy.wait_for("/b", i, Duration::from_secs(20)).await;
    }
    let took = start.elapsed();
    // All of B happened while A's first attempt was still hanging.
    assert_eq!(
        count(
            &db.client,
            &format!("SELECT count(*) FROM provisioning.attempts WHERE handler_id = {a}")
        )
        .await,
        0,
        "B finished only after an A attempt ended ({took:?})"
    );
    assert!(
        hanging.received_on("/a").len() <= 1,
        "max_in_flight = 1 for A"
    );
    assert_eq!(successes(&healthy, "/b"), 20);
    relay.stop().await;
}

/// A receiver that is down trips its handler's circuit breaker: after `circuit_failures` failures
/// in a row the relay holds the handler's deliveries (handed back unattempted, so they keep their
/// attempts) and sends one probe per pause; a handler of the same events with a healthy receiver
/// goes on meanwhile. Once a probe gets through, the held backlog goes, and only a few deliveries
/// ever spent an attempt.
#[tokio::test]
async fn a_receiver_that_is_down_trips_the_breaker_and_held_deliveries_keep_their_attempts() {
    let db = TestDb::vcs().await;
    let down = Receiver::start().await;
    down.set_default(Answer::Status(503));
    let healthy = Receiver::start().await;
    let hid = add_handler(
        &db.client,
        "down",
        &["clients.create"],
        "http",
        &down.url("/d"),
        "max_in_flight = 2, retry_schedule_ms = '{1000,1000,1000,1000,1000,1000,1000,1000,1000,1000}'",
    )
    .await;
    add_handler(
        &db.client,
        "healthy",
        &["clients.create"],
        "http",
        &healthy.url("/h"),
        "",
    )
    .await;
    create_clients(&db.client, 20).await;
    let mut relay = RelayProcess::spawn(
        &db,
        "breaker",
        &[
            ("circuit_failures", "3"),
            ("circuit_pause_ms", "300"),
            ("circuit_max_pause_ms", "300"),
        ],
        &[],
    );
    // the healthy handler is not held up
    healthy.wait_for("/h", 20, WAIT).await;
    // the first failures, then one probe per pause
    let got = down.wait_for("/d", 9, WAIT).await;
    let gaps = got
        .windows(2)
        .filter(|w| w[1].at - w[0].at >= Duration::from_millis(290))
        .count();
    assert!(
        gaps >= 4,
        "probes come one per 300 ms pause: {gaps} gaps of that size among {:?}",
        got.windows(2)
            .map(|w| w[1].at - w[0].at)
            .collect::<Vec<_>>()
    );
    // `relay status` (and the web page) show the handler held, by this relay, and no other.
    let held = |status: &serde_json::Value, name: &str| {
        status["handlers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .unwrap()["circuit_open"]
            .clone()
    };
    eventually(WAIT, "relay status shows the open breaker", || async {
        let s = relay::ops::queries::status(&db.client).await.unwrap();
        let open = held(&s, "down");
        (open[0]["relay"] == "breaker" && !open[0]["next_probe_at"].is_null()).then_some(())
    })
    .await;
    let s = relay::ops::queries::status(&db.client).await.unwrap();
    assert!(held(&s, "healthy").is_null(), "{s:#}");

    // The receiver comes back: the next probe closes the breaker and the backlog goes.
    down.set_default(Answer::Status(200));
    eventually(WAIT, "every delivery of the held handler done", || async {
        (count(
            &db.client,
            &format!("SELECT count(*) FROM provisioning.deliveries WHERE handler_id = {hid}"),
        )
        .await
            == 0)
            .then_some(())
    })
    .await;
    let failed = count(
        &db.client,
        &format!(
            "SELECT count(DISTINCT delivery_id) FROM provisioning.attempts
              WHERE handler_id = {hid} AND outcome = 'fail'"
        ),
    )
    .await;
    assert!(
        failed < 15,
        "{failed} of 20 deliveries spent an attempt on the receiver that was down"
    );
    let ok = count(
        &db.client,
        &format!(
            "SELECT count(DISTINCT delivery_id) FROM provisioning.attempts
              WHERE handler_id = {hid} AND outcome = 'success'"
        ),
    )
    .await;
    assert_eq!(ok, 20);
    // Held deliveries went back without spending an attempt: each success is numbered one past
    // its delivery's logged failures.
    let skipped = count(
        &db.client,
        &format!(
            "SELECT count(*) FROM provisioning.attempts a
              WHERE a.handler_id = {hid} AND a.outcome = 'success'
                AND a.attempt <> 1 + (SELECT count(*) FROM provisioning.attempts f
                                       WHERE f.delivery_id = a.delivery_id AND f.outcome = 'fail')"
        ),
    )
    .await;
    assert_eq!(skipped, 0, "attempt numbers spent without an attempt");
    eventually(WAIT, "relay status shows the breaker closed", || async {
        let s = relay::ops::queries::status(&db.client).await.unwrap();
        held(&s, "down").is_null().then_some(())
    })
    .await;
    relay.sigterm();
    assert!(relay.wait_exit(WAIT).await.success());
    let log = relay.log_text();
    assert!(log.contains("(circuit open)"), "{log}");
    assert!(log.contains("(circuit closed)"), "{log}");
}

/// An operator who points a held handler at a working target does not wait for the breaker's next
/// probe (a minute away here): the breaker starts afresh with the new target.
#[tokio::test]
async fn a_held_handler_pointed_at_another_target_goes_at_once() {
    let db = TestDb::vcs().await;
    let down = Receiver::start().await;
    down.set_default(Answer::Status(503));
    let fixed = Receiver::start().await;
    let hid = add_handler(
        &db.client,
        "moving",
        &["clients.create"],
        "http",
        &down.url("/old"),
        "max_in_flight = 1, retry_schedule_ms = '{60000,60000}'",
    )
    .await;
    create_clients(&db.client, 5).await;
    let relay = RunningRelay::start(&db, BREAKER_TRIPS_FAST).await;
    eventually(WAIT, "the breaker holds the handler", || async {
        let s = relay::ops::queries::status(&db.client).await.unwrap();
        s["handlers"][0]["circuit_open"].is_array().then_some(())
    })
    .await;
    assert_eq!(down.received_on("/old").len(), 2, "two failures, then held");
    db.client
        .execute(
            "UPDATE provisioning.handlers SET target = $1 WHERE id = $2",
            &[&fixed.url("/new"), &hid],
        )
        .await
        .unwrap();
    // the three never attempted go at once; the two that failed wait for their retry (60 s)
    fixed.wait_for("/new", 3, Duration::from_secs(20)).await;
    relay.stop().await;
}

// ------------------------------------------------------------------------------------------------
// 7. Per-object order under failures and retries
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn per_object_order_holds_while_failures_and_retries_interleave() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.seed(20_260_127);
    rx.set_default(Answer::Flaky {
        percent: 30,
        status: 500,
    });
    // 13 attempts: a delivery that fails 13 times in a row at 30 % is a 1-in-6-million event.
    let hid = add_handler(
        &db.client,
        "flaky",
        &["clients.update"],
        "http",
        &rx.url("/o"),
        "retry_schedule_ms = '{20,20,20,20,20,20,20,20,20,20,20,20}', max_in_flight = 16",
    )
    .await;
    db.client
        .execute(
            "INSERT INTO clients (id, name) SELECT g, 'c' || g FROM generate_series(1, 20) g",
            &[],
        )
        .await
        .unwrap();
    let relay = RunningRelay::start(&db, &[]).await;
    for seq in 1..=10 {
        for c in 1..=20i64 {
            db.client
                .execute(
                    "UPDATE clients SET name = $2 WHERE id = $1",
                    &[&c, &format!("c{c}-{seq}")],
                )
                .await
                .unwrap();
        }
    }
    eventually(LONG_WAIT, "200 updates delivered successfully", || async {
        (successes(&rx, "/o") >= 200).then_some(())
    })
    .await;
    eventually(WAIT, "queue drained", || async {
        (count(&db.client, "SELECT count(*) FROM provisioning.deliveries").await == 0).then_some(())
    })
    .await;

    let got = rx.received_on("/o");
    assert_per_object_order(&got);
    // The successful deliveries of each client carry its updates in order, each exactly once.
    let mut per_client: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for r in got.iter().filter(|r| r.status == 200) {
        per_client
            .entry(object_of(r))
            .or_default()
            .push(r.json()["data"]["name"].as_str().unwrap().to_string());
    }
    assert_eq!(per_client.len(), 20);
    for (c, names) in &per_client {
        let want: Vec<String> = (1..=10).map(|s| format!("c{c}-{s}")).collect();
        assert_eq!(names, &want, "client {c}");
    }
    let failed = got.iter().filter(|r| r.status != 200).count();
    assert!(
        failed >= 30,
        "the receiver failed only {failed} requests: the test did not exercise retries"
    );
    assert_eq!(
        count(&db.client, &format!("SELECT count(*) FROM provisioning.attempts WHERE handler_id = {hid} AND outcome = 'success'")).await,
        200
    );
    assert_eq!(
        count(&db.client, &format!("SELECT count(*) FROM provisioning.attempts WHERE handler_id = {hid} AND outcome = 'fail'")).await,
        failed as i64
    );
    relay.stop().await;
}

/// The claim statement reads only due, claimable deliveries: thousands in flight, waiting for a
/// later retry, or dead in front of them cost it nothing (no walk over them on every claim), and
/// it hands out the earliest due heads of their objects' queues.
#[tokio::test]
async fn a_claim_skips_in_flight_waiting_and_dead_deliveries_without_reading_them() {
    let db = TestDb::vcs().await;
    let hid = add_handler(
        &db.client,
        "h",
        &["clients.create"],
        "http",
        "http://127.0.0.1:9/x",
        "",
    )
    .await;
    db.client
        .batch_execute(
            "INSERT INTO clients (id, name) SELECT g, 'c' || g FROM generate_series(1, 10000) g;
             -- statistics from when every delivery was pending, as after a burst
             ANALYZE provisioning.deliveries;
             -- the oldest 2,000 in flight, the next 2,000 dead, 5,000 waiting for a retry in an hour
             UPDATE provisioning.deliveries SET status = 'running', lease_owner = 'other', lease_token = 1,
                    lease_expires_at = now() + interval '1 hour' WHERE object_key::int <= 2000;
             UPDATE provisioning.deliveries SET status = 'dead' WHERE object_key::int BETWEEN 2001 AND 4000;
             UPDATE provisioning.deliveries SET next_attempt_at = now() + interval '1 hour'
              WHERE object_key::int BETWEEN 4001 AND 9000;
             -- due: 9001..10000, the later ones first
             UPDATE provisioning.deliveries SET next_attempt_at = now() - (object_key::int - 9000) * interval '1 ms'
              WHERE object_key::int > 9000;",
        )
        .await
        .unwrap();
    db.client
        .batch_execute("VACUUM provisioning.deliveries")
        .await
        .unwrap();
    // As the relay runs it after a few executions: one generic plan.
    db.client
        .batch_execute(&format!(
            "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off;
             PREPARE claim(bigint[], int[], text, bigint, int[], boolean[]) AS {}",
            include_str!("../../relay/src/store/claim.sql")
        ))
        .await
        .unwrap();
    let explain = |token: i64| {
        format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE claim('{{{hid}}}', '{{10}}', 'me', {token}, '{{60000}}', '{{false}}')")
    };
    // The pages the scan for candidates (alias `d`, head checks included) reads per claim.
    fn scan_pages(node: &serde_json::Value) -> Option<i64> {
        if node["Alias"] == "d" && node["Relation Name"] == "deliveries" {
            return Some(
                node["Shared Hit Blocks"].as_i64()? + node["Shared Read Blocks"].as_i64()?,
            );
        }
        node["Plans"].as_array()?.iter().find_map(scan_pages)
    }
    let mut pages = Vec::new();
    for token in 1..=3 {
        let plan: serde_json::Value = db
            .client
            .query_one(&explain(token), &[])
            .await
            .unwrap()
            .get(0);
        let top = &plan[0]["Plan"];
        assert_eq!(top["Actual Rows"], 10, "{plan}");
        pages.push(scan_pages(top).unwrap_or_else(|| panic!("no scan of deliveries d in {plan}")));
    }
    // Ten heads and their order checks take a few dozen pages; walking the 5,000 deliveries in
    // front of them (or the 5,000 not yet due) takes hundreds to thousands.
    assert!(
        pages.iter().all(|&p| p < 100),
        "pages read by the candidate scan per claim of 10: {pages:?}"
    );
    let claimed: Vec<String> = column(
        &db.client,
        "SELECT object_key FROM provisioning.deliveries WHERE lease_owner = 'me' ORDER BY next_attempt_at, id",
    )
    .await;
    let expected: Vec<String> = (9971..=10000).rev().map(|k| k.to_string()).collect();
    assert_eq!(claimed, expected, "the earliest due first");
}

// ------------------------------------------------------------------------------------------------
// 8. Two relay processes
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn two_relay_processes_share_a_backlog_without_breaking_order() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.seed(42);
    rx.set_default(Answer::Flaky {
        percent: 5,
        status: 503,
    });
    let hid = add_handler(
        &db.client,
        "shared",
        &["clients.update"],
        "http",
        &rx.url("/two"),
        "retry_schedule_ms = '{20,20,20,20,20,20,20,20,20,20}', max_in_flight = 8, timeout_ms = 10000",
    )
    .await;
    db.client
        .execute(
            "INSERT INTO clients (id, name) SELECT g, 'c' || g FROM generate_series(1, 100) g",
            &[],
        )
        .await
        .unwrap();
    let sets = [("lease_margin_ms", "10000")];
    let mut r1 = RelayProcess::spawn(&db, "r1", &sets, &[]);
    let mut r2 = RelayProcess::spawn(&db, "r2", &sets, &[]);
    eventually(WAIT, "both relays registered", || async {
        (count(
            &db.client,
            "SELECT count(*) FROM provisioning.relays WHERE name IN ('r1', 'r2')",
        )
        .await
            == 2)
            .then_some(())
    })
    .await;

    // 20 rounds × 100 clients = 2000 events, inserted while both relays run.
    for seq in 1..=20 {
        db.client
            .execute(
                "UPDATE clients SET name = 'c' || id || '-' || $1::text",
                &[&seq.to_string()],
            )
            .await
            .unwrap();
    }
    eventually(LONG_WAIT, "2000 events delivered", || async {
        (successes(&rx, "/two") >= 2000).then_some(())
    })
    .await;
    eventually(WAIT, "queue drained", || async {
        (count(&db.client, "SELECT count(*) FROM provisioning.deliveries").await == 0).then_some(())
    })
    .await;

    let got = rx.received_on("/two");
    assert_per_object_order(&got);
    let delivered: HashSet<i64> = got
        .iter()
        .filter(|r| r.status == 200)
        .map(event_id_of)
        .collect();
    let events: HashSet<i64> = db
        .client
        .query(
            "SELECT id FROM provisioning.events WHERE name = 'clients.update'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events.len(), 2000);
    assert_eq!(delivered, events, "every event delivered");
    let by_relay: Vec<(String, i64)> = db
        .client
        .query(
            "SELECT relay, count(*) FROM provisioning.attempts WHERE handler_id = $1 AND outcome = 'success' GROUP BY 1 ORDER BY 1",
            &[&hid],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        by_relay.iter().map(|(_, n)| n).sum::<i64>(),
        2000,
        "{by_relay:?}"
    );
    assert_eq!(by_relay.len(), 2, "both relays took part: {by_relay:?}");
    r1.kill9();
    r2.kill9();
}

// ------------------------------------------------------------------------------------------------
// 9. kill -9 mid-flight
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn kill_9_mid_flight_loses_nothing() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.set_default(Answer::Delay(Duration::from_millis(400), 200));
    let hid = add_handler(
        &db.client,
        "slow",
        &["clients.update"],
        "http",
        &rx.url("/k"),
        "timeout_ms = 1000, max_in_flight = 4, retry_schedule_ms = '{50,50,50,50,50}'",
    )
    .await;
    db.client
        .execute(
            "INSERT INTO clients (id, name) SELECT g, 'c' || g FROM generate_series(1, 10) g",
            &[],
        )
        .await
        .unwrap();
    for seq in 1..=4 {
        db.client
            .execute(
                "UPDATE clients SET name = 'c' || id || '-' || $1::text",
                &[&seq.to_string()],
            )
            .await
            .unwrap();
    }
    let sets = [("lease_margin_ms", "1000")];
    let mut r1 = RelayProcess::spawn(&db, "r1", &sets, &[]);
    eventually(WAIT, "some delivered and some in flight", || async {
        let running = count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status = 'running'",
        )
        .await;
        (rx.received_on("/k").len() >= 5 && running > 0).then_some(())
    })
    .await;
    r1.kill9_and_wait_sessions(&db).await;
    let stranded = count(
        &db.client,
        "SELECT count(*) FROM provisioning.deliveries WHERE status = 'running'",
    )
    .await;
    assert!(
        stranded > 0,
        "no delivery was in flight when the relay died"
    );

    let _r2 = RelayProcess::spawn(&db, "r2", &sets, &[]);
    eventually(Duration::from_secs(60), "all 40 events delivered successfully", || async {
        let ok = count(
            &db.client,
            &format!("SELECT count(DISTINCT event_id) FROM provisioning.attempts WHERE handler_id = {hid} AND outcome = 'success'"),
        )
        .await;
        let left = count(&db.client, "SELECT count(*) FROM provisioning.deliveries").await;
        (ok == 40 && left == 0).then_some(())
    })
    .await;

    let expired = count(
        &db.client,
        "SELECT count(*) FROM provisioning.attempts WHERE outcome = 'fail' AND error LIKE '%lease expired%' AND error LIKE '%r1%'",
    )
    .await;
    assert!(
        expired >= 1 && expired <= stranded,
        "lease-expired attempts logged: {expired} (stranded {stranded})"
    );

    // Duplicates only with the same webhook-id: one id per body and one body per id.
    let got = rx.received_on("/k");
    let mut id_of_body: HashMap<&str, &str> = HashMap::new();
    let mut body_of_id: HashMap<&str, &str> = HashMap::new();
    for r in &got {
        let id = r.header("webhook-id").unwrap();
        assert_eq!(
            *id_of_body.entry(&r.body).or_insert(id),
            id,
            "one event, two webhook-ids"
        );
        assert_eq!(
            *body_of_id.entry(id).or_insert(&r.body),
            r.body,
            "one webhook-id, two bodies"
        );
    }
    assert_eq!(id_of_body.len(), 40);
    // No delivery of an object started while an earlier one of it was unfinished.
    let mut last: HashMap<i64, i64> = HashMap::new();
    for r in &got {
        let (obj, ev) = (object_of(r), event_id_of(r));
        assert!(
            last.get(&obj).is_none_or(|&p| ev >= p),
            "object {obj}: event {ev} after a later one"
        );
        last.insert(obj, ev);
    }
}

// ------------------------------------------------------------------------------------------------
// 10. Disabled and paused handlers
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn disabled_handler_gets_nothing_paused_handler_gets_everything_after_resume() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    let d = add_handler(
        &db.client,
        "disabled",
        &["clients.*"],
        "http",
        &rx.url("/disabled"),
        "status = 'disabled'",
    )
    .await;
    let p = add_handler(
        &db.client,
        "paused",
        &["clients.*"],
        "http",
        &rx.url("/paused"),
        "status = 'paused'",
    )
    .await;
    add_handler(
        &db.client,
        "enabled",
        &["clients.*"],
        "http",
        &rx.url("/enabled"),
        "",
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;

    db.client
        .execute(
            "INSERT INTO clients (id, name) VALUES (1, 'a'), (2, 'b')",
            &[],
        )
        .await
        .unwrap();
    db.client
        .execute("UPDATE clients SET name = 'a2' WHERE id = 1", &[])
        .await
        .unwrap();
    rx.wait_for("/enabled", 3, WAIT).await;
    // One more round trip through the relay.
    db.client
        .execute("UPDATE clients SET name = 'b2' WHERE id = 2", &[])
        .await
        .unwrap();
    rx.wait_for("/enabled", 4, WAIT).await;

    assert!(rx.received_on("/disabled").is_empty());
    assert!(
        rx.received_on("/paused").is_empty(),
        "a paused handler received deliveries"
    );
    assert_eq!(
        count(
            &db.client,
            &format!("SELECT count(*) FROM provisioning.deliveries WHERE handler_id = {d}")
        )
        .await,
        0
    );
    assert_eq!(
        count(&db.client, &format!("SELECT count(*) FROM provisioning.deliveries WHERE handler_id = {p} AND status = 'pending'")).await,
        4
    );

    db.client
        .execute(
            "UPDATE provisioning.handlers SET status = 'enabled' WHERE id = $1",
            &[&p],
        )
        .await
        .unwrap();
    let got = rx.wait_for("/paused", 4, WAIT).await;
    let enabled: Vec<String> = rx
        .received_on("/enabled")
        .iter()
        .map(|r| r.body.clone())
        .collect();
    let mut paused: Vec<String> = got.iter().map(|r| r.body.clone()).collect();
    let mut want = enabled.clone();
    paused.sort();
    want.sort();
    assert_eq!(
        paused, want,
        "the paused handler got exactly what the enabled one got"
    );
    assert_per_object_order(&got);

    // Enabling the disabled handler later does not deliver what was captured before.
    db.client
        .execute(
            "UPDATE provisioning.handlers SET status = 'enabled' WHERE id = $1",
            &[&d],
        )
        .await
        .unwrap();
    db.client
        .execute("UPDATE clients SET name = 'a3' WHERE id = 1", &[])
        .await
        .unwrap();
    let got = rx.wait_for("/disabled", 1, WAIT).await;
    rx.wait_for("/paused", 5, WAIT).await;
    rx.wait_for("/enabled", 5, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json()["data"]["name"], "a3");
    relay.stop().await;
}

// ------------------------------------------------------------------------------------------------
// 11. Handler changes reach a running relay
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn handler_changes_reach_a_running_relay_within_about_a_second() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (1, 'a')", &[])
        .await
        .unwrap();
    let relay = RunningRelay::start(&db, &[]).await;
    // The relay runs (and has registered) before the handler exists.
    eventually(WAIT, "relay registered", || async {
        (count(&db.client, "SELECT count(*) FROM provisioning.relays").await >= 1).then_some(())
    })
    .await;

    let hid = add_handler(
        &db.client,
        "late",
        &["clients.update"],
        "http",
        &rx.url("/old"),
        "",
    )
    .await;
    let start = Instant::now();
    db.client
        .execute("UPDATE clients SET name = 'a1' WHERE id = 1", &[])
        .await
        .unwrap();
    rx.wait_for("/old", 1, WAIT).await;
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "a new handler took {took:?} to be served"
    );

    // Change the target while running: within about a second later events go to the new URL.
    db.client
        .execute(
            "UPDATE provisioning.handlers SET target = $2 WHERE id = $1",
            &[&hid, &rx.url("/new")],
        )
        .await
        .unwrap();
    let start = Instant::now();
    let mut seq = 1;
    loop {
        seq += 1;
        let before = rx.received().len();
        db.client
            .execute(
                "UPDATE clients SET name = $1 WHERE id = 1",
                &[&format!("a{seq}")],
            )
            .await
            .unwrap();
        eventually(WAIT, "probe delivered", || async {
            (rx.received().len() > before).then_some(())
        })
        .await;
        if !rx.received_on("/new").is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "the new target was not used after {:?}",
            start.elapsed()
        );
    }
    let old = rx.received_on("/old").len();
    for i in 0..3 {
        db.client
            .execute(
                "UPDATE clients SET name = $1 WHERE id = 1",
                &[&format!("z{i}")],
            )
            .await
            .unwrap();
    }
    let new = rx.wait_for("/new", 4, WAIT).await;
    assert_eq!(
        rx.received_on("/old").len(),
        old,
        "events went to the old URL after the switch"
    );
    assert_eq!(new.last().unwrap().json()["data"]["name"], "z2");
    relay.stop().await;
}

// ------------------------------------------------------------------------------------------------
// 12. SIGTERM
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_during_a_drain_finishes_in_flight_work_and_exits_cleanly() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.set_default(Answer::Delay(Duration::from_millis(300), 200));
    let hid = add_handler(
        &db.client,
        "drain",
        &["clients.create"],
        "http",
        &rx.url("/t"),
        "timeout_ms = 5000, max_in_flight = 4",
    )
    .await;
    create_clients(&db.client, 40).await;
    let mut r1 = RelayProcess::spawn(&db, "r1", &[("shutdown_grace_ms", "5000")], &[]);
    eventually(WAIT, "draining with deliveries in flight", || async {
        let running = count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status = 'running'",
        )
        .await;
        (rx.received_on("/t").len() >= 4 && running > 0).then_some(())
    })
    .await;
    let t = Instant::now();
    r1.sigterm();
    let status = r1.wait_exit(Duration::from_secs(30)).await;
    let took = t.elapsed();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        r1.log_text()
    );
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}, more than the 5 s grace period, to exit"
    );
    // Written to a file (not a terminal): plain text, no colour codes for grep or a log shipper.
    let log = r1.log_text();
    assert!(log.contains("shutting down"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour escape codes in a log that is not a terminal:\n{log}"
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status = 'running'"
        )
        .await,
        0
    );
    // Claiming stopped at SIGTERM: what arrived afterwards can only be work already claimed
    // (at most max_in_flight = 4).
    let after = rx.received_on("/t").iter().filter(|r| r.at > t).count();
    assert!(
        after <= 4,
        "{after} requests started after SIGTERM: the relay kept claiming"
    );
    // In-flight work (300 ms each) finished within the grace period: every request the receiver
    // saw is logged as a success, and nothing was started and abandoned.
    let seen: HashSet<i64> = rx.received_on("/t").iter().map(event_id_of).collect();
    let ok: HashSet<i64> = db
        .client
        .query("SELECT event_id FROM provisioning.attempts WHERE handler_id = $1 AND outcome = 'success'", &[&hid])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        seen, ok,
        "in-flight deliveries were not finished before exit"
    );
    assert!(
        ok.len() < 40,
        "the drain was over before SIGTERM; the test proved nothing"
    );
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE attempts > 0"
        )
        .await,
        0,
        "a delivery was left half-done"
    );

    let relay = RunningRelay::start(&db, &[]).await;
    eventually(WAIT, "a new relay finishes the backlog", || async {
        (count(&db.client, "SELECT count(*) FROM provisioning.deliveries").await == 0).then_some(())
    })
    .await;
    assert_eq!(successes(&rx, "/t"), 40);
    relay.stop().await;
}

#[tokio::test]
async fn sigterm_releases_work_that_outlives_the_grace_period() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.set_default(Answer::Hang);
    let hid = add_handler(
        &db.client,
        "stuck",
        &["clients.create"],
        "http",
        &rx.url("/s"),
        "timeout_ms = 60000, max_in_flight = 3",
    )
    .await;
    create_clients(&db.client, 5).await;
    let mut r1 = RelayProcess::spawn(&db, "r1", &[("shutdown_grace_ms", "1000")], &[]);
    // All 5 claimed: 3 hanging attempts (the handler's limit) and 2 waiting for a slot.
    eventually(
        WAIT,
        "3 hanging deliveries in flight, 2 waiting",
        || async {
            let running = count(
                &db.client,
                "SELECT count(*) FROM provisioning.deliveries WHERE status = 'running'",
            )
            .await;
            (rx.received_on("/s").len() >= 3 && running == 5).then_some(())
        },
    )
    .await;
    assert_eq!(rx.received_on("/s").len(), 3, "max_in_flight = 3 exceeded");
    let t = Instant::now();
    r1.sigterm();
    let status = r1.wait_exit(Duration::from_secs(30)).await;
    let took = t.elapsed();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        r1.log_text()
    );
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the grace period ended"
    );
    assert!(
        took < Duration::from_secs(6),
        "took {took:?} to exit with a 1 s grace period"
    );
    let rows = db
        .client
        .query("SELECT status, attempts, lease_owner FROM provisioning.deliveries WHERE handler_id = $1", &[&hid])
        .await
        .unwrap();
    assert_eq!(rows.len(), 5);
    for r in &rows {
        let (status, attempts, owner): (String, i32, Option<String>) =
            (r.get(0), r.get(1), r.get(2));
        assert_eq!(
            (status.as_str(), attempts, owner),
            ("pending", 0, None),
            "released, attempt not counted"
        );
    }

    rx.set_default(Answer::Status(200));
    let relay = RunningRelay::start(&db, &[]).await;
    eventually(WAIT, "a new relay finishes the released work", || async {
        (count(&db.client, "SELECT count(*) FROM provisioning.deliveries").await == 0).then_some(())
    })
    .await;
    assert_eq!(successes(&rx, "/s"), 5);
    relay.stop().await;
}

// ------------------------------------------------------------------------------------------------
// Found while testing kill -9: a relay killed while asleep leaves the doorbell armed
// ------------------------------------------------------------------------------------------------

/// A LISTEN connection collecting notification payloads of one channel.
async fn listen(
    url: &str,
    channel: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use futures_util::StreamExt;
    let (client, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("LISTEN");
    (client, rx)
}

/// Wait for notification `marker`; returns the payloads received before it.
async fn notifications_until(
    listener: &tokio_postgres::Client,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    marker: &str,
) -> Vec<String> {
    let mut before = Vec::new();
    let start = Instant::now();
    loop {
        // A round trip on the listening session makes the server flush pending notifications.
        listener.batch_execute("SELECT 1").await.unwrap();
        while let Ok(p) = rx.try_recv() {
            if p == marker {
                return before;
            }
            before.push(p);
        }
        assert!(
            start.elapsed() < WAIT,
            "notification {marker:?} never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_relay_killed_while_asleep_does_not_leave_the_doorbell_ringing() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    add_handler(
        &db.client,
        "h",
        &["clients.create"],
        "http",
        &rx.url("/x"),
        "",
    )
    .await;
    let mut r1 = RelayProcess::spawn(&db, "r1", &[], &[]);
    wait_for_sleeping_relays(&db, 1, "r1 (the only relay) asleep").await;
    r1.kill9_and_wait_sessions(&db).await;
    // An hour later (simulated): r1 is long dead and no relay runs.
    db.client
        .execute("UPDATE provisioning.relays SET heartbeat_at = now() - interval '1 hour' WHERE name = 'r1'", &[])
        .await
        .unwrap();

    let (listener, mut notes) = listen(&db.url, "provisioning_events").await;
    db.client
        .execute("SELECT pg_notify('provisioning_events', 'start')", &[])
        .await
        .unwrap();
    notifications_until(&listener, &mut notes, "start").await;
    db.client
        .execute("INSERT INTO clients (name) VALUES ('x')", &[])
        .await
        .unwrap();
    db.client
        .execute("SELECT pg_notify('provisioning_events', 'end')", &[])
        .await
        .unwrap();
    let rung = notifications_until(&listener, &mut notes, "end").await;
    assert!(
        rung.is_empty(),
        "capture rang the doorbell for a relay dead for an hour ({} notifications); relays: {:?}",
        rung.len(),
        db.client
            .query(
                "SELECT name, sleeping, heartbeat_at::text FROM provisioning.relays",
                &[]
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (
                r.get::<_, String>(0),
                r.get::<_, bool>(1),
                r.get::<_, String>(2)
            ))
            .collect::<Vec<_>>()
    );
}

// ------------------------------------------------------------------------------------------------
// Lease fencing: a relay whose claim was taken over cannot mark the work done
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_relay_whose_claim_was_taken_over_cannot_complete_it() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.set_default(Answer::Delay(Duration::from_secs(2), 200));
    let hid = add_handler(
        &db.client,
        "fenced",
        &["clients.update"],
        "http",
        &rx.url("/f"),
        "timeout_ms = 10000, retry_schedule_ms = '{50,50}'",
    )
    .await;
    db.client
        .execute("INSERT INTO clients (id, name) VALUES (1, 'a')", &[])
        .await
        .unwrap();
    db.client
        .execute("UPDATE clients SET name = 'first' WHERE id = 1", &[])
        .await
        .unwrap();
    db.client
        .execute("UPDATE clients SET name = 'second' WHERE id = 1", &[])
        .await
        .unwrap();
    let relay = RunningRelay::start(&db, &[]).await;

    // While the relay's first attempt is in flight (the receiver answers after 2 s), another relay
    // "takes over" the claim: its lease expired there, and it was re-claimed with a new token.
    rx.wait_for("/f", 1, WAIT).await;
    let taken = db
        .client
        .execute(
            "UPDATE provisioning.deliveries
                SET lease_token = 4242, lease_owner = 'other-relay', lease_expires_at = now() + interval '3 seconds'
              WHERE handler_id = $1 AND status = 'running'",
            &[&hid],
        )
        .await
        .unwrap();
    assert_eq!(taken, 1, "the first attempt was not in flight any more");

    // The relay finishes its attempt (logged) but must not complete the other relay's claim...
    wait_attempts(&db, hid, 1).await;
    let row = db
        .client
        .query_opt(
            "SELECT status, lease_owner, lease_token FROM provisioning.deliveries d
               JOIN provisioning.events e ON e.id = d.event_id WHERE e.data->>'name' = 'first'",
            &[],
        )
        .await
        .unwrap()
        .expect("a stale claim completed (deleted) the delivery over another relay's claim");
    let (status, owner, token): (String, Option<String>, Option<i64>) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (status.as_str(), owner.as_deref(), token),
        ("running", Some("other-relay"), Some(4242)),
        "a stale claim completed over another relay's claim"
    );
    // ... and so the next event of the object does not start while the other relay holds the first.
    assert_eq!(
        rx.received_on("/f").len(),
        1,
        "the second event started while the first was held elsewhere"
    );

    // The other relay "dies": its lease expires, is recovered (and logged), and the work is redone.
    let got = rx.wait_for("/f", 3, WAIT).await;
    let names: Vec<String> = got
        .iter()
        .map(|r| r.json()["data"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["first", "first", "second"]);
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    eventually(WAIT, "queue drained", || async {
        (count(&db.client, "SELECT count(*) FROM provisioning.deliveries").await == 0).then_some(())
    })
    .await;
    assert_eq!(
        count(
            &db.client,
            "SELECT count(*) FROM provisioning.attempts WHERE error LIKE 'lease expired: relay other-relay%'"
        )
        .await,
        1
    );
    relay.stop().await;
}

/// Dead tuples in the queue stay bounded even where autovacuum is off or lagging: the relay
/// vacuums the outbox itself once they pile up.
#[tokio::test]
async fn the_relay_keeps_the_outbox_vacuumed() {
    let db = TestDb::vcs().await;
    db.client
        .batch_execute(
            "INSERT INTO provisioning.deliveries (event_id, handler_id, stage, priority, entity, object_key)
             SELECT g, 1, 'after', 100, 'clients', g::text FROM generate_series(1, 30000) g;
             DELETE FROM provisioning.deliveries;",
        )
        .await
        .unwrap();
    let dead = || async {
        db.client
            .query_one(
                "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'provisioning.deliveries'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    eventually(
        Duration::from_secs(20),
        "the deletes counted as dead tuples",
        || async { (dead().await >= 20_000).then_some(()) },
    )
    .await;
    let relay = RunningRelay::start(&db, &[]).await;
    eventually(Duration::from_secs(60), "the outbox vacuumed", || async {
        (dead().await < 1_000).then_some(())
    })
    .await;
    relay.stop().await;
}

// ------------------------------------------------------------------------------------------------
// In-flight limits and staying awake under traffic
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_handlers_in_flight_limit_holds() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.set_default(Answer::Delay(Duration::from_millis(200), 200));
    add_handler(
        &db.client,
        "slow",
        &["clients.create"],
        "http",
        &rx.url("/s"),
        "max_in_flight = 3",
    )
    .await;
    // 15 different objects: per-object order does not limit them, only the handler's slots do
    create_clients(&db.client, 15).await;
    let relay = RunningRelay::start(&db, &[]).await;
    let got = rx.wait_for("/s", 15, WAIT).await;
    relay.stop().await;
    // Each request is answered 200 ms after it arrives and its slot is free only then: no 190 ms
    // window may see more than 3 arrivals.
    let mut at: Vec<Instant> = got.iter().map(|r| r.at).collect();
    at.sort();
    for (i, start) in at.iter().enumerate() {
        let in_window = at[i..]
            .iter()
            .take_while(|t| t.duration_since(*start) < Duration::from_millis(190))
            .count();
        assert!(
            in_window <= 3,
            "{in_window} requests started within 190 ms of each other with max_in_flight = 3"
        );
    }
}

/// A handler whose answers each take `answer`, 4 objects captured for it, and a relay running
/// with `lease_margin_ms`; returns once `claimed` deliveries are claimed (running or waiting).
async fn four_slow_deliveries(
    path: &str,
    answer: Duration,
    handler: &str,
    lease_margin_ms: &str,
    claimed: i64,
) -> (TestDb, Receiver, i64, RunningRelay) {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    rx.set_default(Answer::Delay(answer, 200));
    let hid = add_handler(
        &db.client,
        "slow",
        &["clients.create"],
        "http",
        &rx.url(path),
        handler,
    )
    .await;
    create_clients(&db.client, 4).await;
    let relay = RunningRelay::start(&db, &[("lease_margin_ms", lease_margin_ms)]).await;
    eventually(WAIT, &format!("{claimed} deliveries claimed"), || async {
        let running = count(
            &db.client,
            "SELECT count(*) FROM provisioning.deliveries WHERE status = 'running'",
        )
        .await;
        (running == claimed).then_some(())
    })
    .await;
    (db, rx, hid, relay)
}

/// Wait until all 4 are delivered and the queue is empty; then every attempt succeeded and each
/// object was sent exactly once (no lease ran out mid-attempt or while waiting).
async fn four_delivered_once(
    db: &TestDb,
    rx: &Receiver,
    path: &str,
    hid: i64,
    relay: RunningRelay,
) {
    wait_attempts(db, hid, 4).await;
    eventually(WAIT, "the queue empty", || async {
        (count(&db.client, "SELECT count(*) FROM provisioning.deliveries").await == 0).then_some(())
    })
    .await;
    relay.stop().await;
    let log = attempts_of(db, hid).await;
    let failed: Vec<_> = log.iter().filter(|a| a.0 != "success").collect();
    assert!(
        failed.is_empty(),
        "no attempt may fail (a lease ran out?): {failed:?}"
    );
    let got = rx.received_on(path);
    let mut objects: Vec<i64> = got.iter().map(object_of).collect();
    objects.sort();
    objects.dedup();
    assert_eq!(
        (got.len(), objects.len()),
        (4, 4),
        "each delivery sent exactly once"
    );
}

#[tokio::test]
async fn a_delivery_waiting_for_a_slot_keeps_its_lease() {
    // A relay claims up to three times a handler's in-flight limit; the extra deliveries wait in
    // the relay for a slot, already leased. With one slot and every answer taking 1.2 s of a 1.5 s
    // timeout, the second waiting delivery starts ~2.4 s after its claim and ends ~3.6 s after
    // it: a lease of one timeout + margin (1.7 s) would run out mid-attempt and be recovered as a
    // failed attempt and sent again. Its lease must cover the wait.
    let settings = "max_in_flight = 1, timeout_ms = 1500";
    let (db, rx, hid, relay) =
        four_slow_deliveries("/w", Duration::from_millis(1200), settings, "200", 2).await;
    // Every claim here ends two deep in the queue: leased for three timeouts + the margin.
    let leases: Vec<f64> = column(
        &db.client,
        "SELECT extract(epoch FROM lease_expires_at - updated_at)::float8 * 1000
           FROM provisioning.deliveries WHERE status = 'running'",
    )
    .await;
    assert!(
        !leases.is_empty() && leases.iter().all(|ms| *ms == 4700.0),
        "leases in ms of the claimed deliveries: {leases:?}"
    );
    four_delivered_once(&db, &rx, "/w", hid, relay).await;
}

#[tokio::test]
async fn a_delivery_that_waited_past_its_lease_is_handed_back_not_sent_twice() {
    // 2 slots, 4 claimed (2 waiting, leased for two 3 s timeouts + 100 ms). The limit drops to 1
    // while they wait (the relay sees it within about a second), so the last one starts only after
    // two rounds of 2.5 s answers, when its lease has 1.1 s left, less than a timeout: sent then,
    // it would be recovered mid-attempt and sent again. The relay hands it back instead and claims
    // it afresh.
    let settings = "max_in_flight = 2, timeout_ms = 3000";
    let (db, rx, hid, relay) =
        four_slow_deliveries("/l", Duration::from_millis(2500), settings, "100", 4).await;
    db.client
        .execute(
            "UPDATE provisioning.handlers SET max_in_flight = 1 WHERE id = $1",
            &[&hid],
        )
        .await
        .unwrap();
    four_delivered_once(&db, &rx, "/l", hid, relay).await;
}

/// Wait until exactly `n` relays have declared themselves asleep.
async fn wait_for_sleeping_relays(db: &TestDb, n: i64, what: &str) {
    eventually(WAIT, what, || async {
        (count(
            &db.client,
            "SELECT count(*) FROM provisioning.relays WHERE sleeping",
        )
        .await
            == n)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_relay_stays_awake_while_work_flows_so_writers_do_not_notify() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    add_handler(
        &db.client,
        "h",
        &["clients.create"],
        "http",
        &rx.url("/x"),
        "",
    )
    .await;
    // generous idle_after: a loaded machine may stall the relay for a while
    let relay = RunningRelay::start(&db, &[("idle_after_ms", "3000")]).await;
    wait_for_sleeping_relays(&db, 1, "the idle relay asleep").await;
    let (listener, mut notes) = listen(&db.url, "provisioning_events").await;

    // The first change wakes it (one doorbell)...
    db.client
        .execute("INSERT INTO clients (name) VALUES ('first')", &[])
        .await
        .unwrap();
    rx.wait_for("/x", 1, WAIT).await;
    wait_for_sleeping_relays(&db, 0, "the relay awake").await;
    // ...and while changes keep coming, none of them rings.
    db.client
        .execute("SELECT pg_notify('provisioning_events', 'start')", &[])
        .await
        .unwrap();
    notifications_until(&listener, &mut notes, "start").await;
    for i in 0..20 {
        db.client
            .execute(
                "INSERT INTO clients (name) VALUES ($1)",
                &[&format!("c{i}")],
            )
            .await
            .unwrap();
        rx.wait_for("/x", 2 + i, WAIT).await;
        tokio::time::sleep(Duration::from_millis(30)).await; // the pace of the traffic, not a sync
    }
    db.client
        .execute("SELECT pg_notify('provisioning_events', 'end')", &[])
        .await
        .unwrap();
    let rung = notifications_until(&listener, &mut notes, "end").await;
    assert!(
        rung.is_empty(),
        "{} captured changes rang the doorbell while the relay was busy",
        rung.len()
    );
    // Without work it goes back to sleep, and the next change is still delivered.
    wait_for_sleeping_relays(&db, 1, "the relay asleep again").await;
    db.client
        .execute("INSERT INTO clients (name) VALUES ('last')", &[])
        .await
        .unwrap();
    rx.wait_for("/x", 22, WAIT).await;
    relay.stop().await;
}

/// A relay whose log output breaks (its stdout and stderr pipes nobody reads any more, as when a
/// log collector goes away) keeps delivering, records failed and retried attempts, and still stops
/// cleanly on SIGTERM: a log line that cannot be written is dropped, it takes no task down.
#[tokio::test]
async fn a_broken_log_output_stops_neither_deliveries_nor_shutdown() {
    let db = TestDb::vcs().await;
    let rx = Receiver::start().await;
    // the first attempt fails: the relay logs a warning, then retries
    rx.script([Answer::Status(500)]);
    add_handler(
        &db.client,
        "crm",
        &["clients.create"],
        "http",
        &rx.url("/c"),
        "retry_schedule_ms = '{200}'",
    )
    .await;
    let mut relay = RelayProcess {
        child: Command::new(env!("CARGO_BIN_EXE_relay"))
            .args(["run", "--database-url", &db.url])
            .args(["--set", "admin_listen=", "--set", "poll_interval_ms=200"])
            .args(["--set", "log_level=debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the relay binary"),
        name: "broken-log".into(),
        // (no log file: its output goes nowhere)
        log: PathBuf::new(),
    };
    // nobody reads its output: every log line meets a closed pipe
    drop(relay.child.stdout.take());
    drop(relay.child.stderr.take());
    db.client
        .execute(
            "INSERT INTO clients (id, name) VALUES (1, 'a'), (2, 'b')",
            &[],
        )
        .await
        .unwrap();
    rx.wait_for("/c", 3, WAIT).await;
    eventually(
        WAIT,
        "three attempts recorded, nothing left to deliver",
        || async {
            (count(&db.client, "SELECT count(*) FROM provisioning.attempts").await == 3
                && count(&db.client, "SELECT count(*) FROM provisioning.deliveries").await == 0)
                .then_some(())
        },
    )
    .await;
    assert!(
        relay.child.try_wait().expect("try_wait").is_none(),
        "the relay is still running"
    );
    relay.sigterm();
    let status = relay.wait_exit(WAIT).await;
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
}
