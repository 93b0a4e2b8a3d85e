//! The admin web page in a real browser (SPEC §7): headless Chromium, driven by
//! `tests/browser/page_test.mjs` (playwright-core, no browser download), loads the page, filters
//! the execution log, opens a dead delivery and presses Retry; the database must show the effect.
//!
//! Needs Node.js 20+ with npm, and Chromium at /usr/bin/chromium (or CHROMIUM_PATH). Missing tools
//! fail the test with what to install; `SKIP_BROWSER_TEST=1` skips it (loudly).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::ids_where;
use crate::common::*;

const TOKEN: &str = "browser-test-token-7f3a";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                repo_root().join(p)
            }
        })
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Run a command to completion within `deadline`; returns (success, stdout, stderr).
async fn run(
    mut cmd: tokio::process::Command,
    deadline: Duration,
    what: &str,
) -> (bool, String, String) {
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = match tokio::time::timeout(deadline, cmd.output()).await {
        Err(_) => panic!("{what} did not finish within {deadline:?}"),
        Ok(Err(e)) => panic!("{what} could not be started: {e}"),
        Ok(Ok(out)) => out,
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Node.js and Chromium present, playwright-core installed (`npm ci` if not). Panics with what to
/// install otherwise.
async fn browser_tools() -> String {
    let chromium = std::env::var("CHROMIUM_PATH").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "Chromium not found at {chromium}: install it (Debian/Ubuntu: apt-get install -y chromium) or set \
         CHROMIUM_PATH; to skip the browser test set SKIP_BROWSER_TEST=1"
    );
    let mut node = tokio::process::Command::new("node");
    node.arg("--version");
    let version = match node.output().await {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => panic!(
            "Node.js is not installed (or not on PATH): install Node.js 20+ with npm (e.g. apt-get install -y nodejs npm); \
             to skip the browser test set SKIP_BROWSER_TEST=1"
        ),
    };
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 20,
        "Node.js {version} is too old: playwright-core needs Node.js 20+"
    );
    let dir = repo_root().join("tests/browser");
    if !dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        eprintln!(
            "browser test: installing playwright-core with `npm ci` in {}",
            dir.display()
        );
        let mut npm = tokio::process::Command::new("npm");
        npm.args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1");
        let (ok, out, err) = run(npm, Duration::from_secs(600), "npm ci").await;
        assert!(
            ok,
            "`npm ci` in {} failed (is npm installed and the registry reachable?):\n{out}\n{err}",
            dir.display()
        );
    }
    chromium
}

#[tokio::test]
async fn web_page_filters_the_log_and_retries_a_dead_delivery_in_chromium() {
    if std::env::var("SKIP_BROWSER_TEST").as_deref() == Ok("1") {
        eprintln!(
            "\n\n######################################################################\n\
             ##  BROWSER TEST SKIPPED (SKIP_BROWSER_TEST=1): the admin web  ##\n\
             ##  page was NOT exercised in Chromium.                              ##\n\
             ######################################################################\n"
        );
        return;
    }
    let chromium = browser_tools().await;

    let db = TestDb::vcs().await;
    let sc = deliver_scenario(&db).await;
    let dead = sc.dead_ids(&db).await;
    let target = dead[1]; // billing's delivery of clients.create for client 2
    let expected = ids_where(
        &db,
        "SELECT id FROM provisioning.attempts WHERE handler_name = 'billing' AND outcome = 'fail'",
    )
    .await;
    assert_eq!(expected.len(), 3);
    // a capture problem for the page to show
    db.client
        .batch_execute("DROP TRIGGER prov_capture_delete ON accounts")
        .await
        .unwrap();
    // an open circuit breaker on billing, as a live relay publishes it
    db.client
        .batch_execute(
            "INSERT INTO provisioning.relays (name, circuits)
             SELECT 'r-breaker', jsonb_build_array(jsonb_build_object(
                        'handler_id', id, 'since', now(), 'next_probe_at', now() + interval '5 seconds'))
               FROM provisioning.handlers WHERE name = 'billing'",
        )
        .await
        .unwrap();
    let server = AdminServer::start(&db, TOKEN, true).await;

    let screenshot = target_dir().join("browser-screenshot.png");
    std::fs::create_dir_all(screenshot.parent().unwrap()).expect("target directory");
    let _ = std::fs::remove_file(&screenshot);
    let expected_csv = expected
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut node = tokio::process::Command::new("node");
    node.arg(repo_root().join("tests/browser/page_test.mjs"))
        .arg(&server.url)
        .arg(TOKEN)
        .arg(target.to_string())
        .arg("billing")
        .arg(&expected_csv)
        .arg(&screenshot)
        .env("CHROMIUM_PATH", &chromium);
    let (ok, out, err) = run(node, Duration::from_secs(180), "the browser script").await;
    assert!(
        ok,
        "the page test failed (screenshot: {}):\nstdout: {out}\nstderr: {err}",
        screenshot.display()
    );
    let seen: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("no result line from the browser script ({e}): {out}\n{err}"));
    assert_eq!(seen["ok"], true);
    assert_eq!(seen["status_before"], "dead");
    assert_eq!(seen["dead_before"], 3);
    assert_eq!(seen["event"], "clients.create");
    assert_eq!(seen["shown"], serde_json::json!(expected));
    assert_eq!(seen["unfiltered"], 7);
    // The Test button: billing's receiver answers 500 and billing has no retries: shown as dead; the
    // receiver got one test_ request, and nothing was logged for it.
    let msg = seen["test_message"].as_str().unwrap();
    assert!(
        msg.contains("a delivery would go dead (its retry schedule is empty)"),
        "{msg}"
    );
    assert_eq!(seen["test_message_ok"], false);
    assert!(
        seen["test_outcome"]
            .as_str()
            .unwrap()
            .starts_with("fail — HTTP 500"),
        "{seen}"
    );
    assert!(
        seen["test_response"]
            .as_str()
            .unwrap()
            .contains("billing exploded"),
        "{seen}"
    );
    let tests: Vec<_> = sc
        .fail
        .received()
        .into_iter()
        .filter(|r| {
            r.header("webhook-id")
                .is_some_and(|id| id.starts_with("test_"))
        })
        .collect();
    assert_eq!(tests.len(), 1, "one test request");
    assert_eq!(
        count(&db.client, "SELECT count(*) FROM provisioning.attempts").await,
        7,
        "the test is not logged"
    );

    // The effect, in the database: that delivery is queued again, with a fresh schedule; the
    // other dead ones are untouched.
    let row = db
        .client
        .query_one(
            "SELECT status, attempts, last_error FROM provisioning.deliveries WHERE id = $1",
            &[&target],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, i32>(1), 0);
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("retry requested by an operator")
    );
    assert_eq!(
        ids_where(
            &db,
            "SELECT id FROM provisioning.deliveries WHERE status = 'dead'"
        )
        .await,
        vec![dead[2], dead[0]]
    );
    let png = std::fs::read(&screenshot).expect("the screenshot was saved");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real PNG"
    );
    eprintln!("browser test screenshot: {}", screenshot.display());
}
