//! `relay demo` runs non-interactively, shows deliveries, and leaves nothing behind.

use std::process::Command;

#[tokio::test]
async fn demo_shows_deliveries_and_cleans_up() {
    let out = tokio::task::spawn_blocking(|| {
        Command::new(env!("CARGO_BIN_EXE_relay"))
            .args([
                "demo",
                "--duration",
                "12s",
                "--set",
                "admin_listen=127.0.0.1:0",
            ])
            .env_remove("DATABASE_URL")
            .env_remove("RELAY_DATABASE_URL")
            .output()
            .expect("run relay demo")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for event in [
        "clients.create",
        "clients.balance_zero",
        "clients.balance_notzero",
        "clients.subscriptions.assign",
        "clients.subscriptions.activate",
    ] {
        assert!(
            stdout.contains(&format!("\"events_id\":\"{event}\"")),
            "no {event} delivery shown:\n{stdout}"
        );
    }
    // Exact numeric values travel unchanged (no float rounding of numeric columns).
    assert!(stdout.contains("\"balance\":10.0000"), "{stdout}");
    let dir = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("PostgreSQL running in ")
                .and_then(|r| r.split(" on port").next())
        })
        .expect("the demo names its cluster directory")
        .to_string();
    assert!(stdout.contains(&format!("removed {dir}")));
    assert!(
        !std::path::Path::new(&dir).exists(),
        "{dir} was left behind"
    );
    let ps = Command::new("pgrep").args(["-f", &dir]).output().unwrap();
    assert!(
        ps.stdout.is_empty(),
        "processes left behind: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

/// `relay demo | head`: once nobody reads its output, the demo still runs to its end, exits 0 and
/// removes its cluster (a panic at the first line it could not print left PostgreSQL running).
#[tokio::test]
async fn demo_whose_output_is_closed_still_cleans_up() {
    let (status, dir, stderr) = tokio::task::spawn_blocking(|| {
        use std::io::{BufRead, BufReader, Read};
        let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
            .args([
                "demo",
                "--duration",
                "6s",
                "--set",
                "admin_listen=127.0.0.1:0",
            ])
            .env_remove("DATABASE_URL")
            .env_remove("RELAY_DATABASE_URL")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run relay demo");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let dir = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                l.strip_prefix("PostgreSQL running in ")
                    .and_then(|r| r.split(" on port").next())
                    .map(str::to_string)
            })
            .expect("the demo names its cluster directory");
        drop(lines); // the reader goes away, as `head` does
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (child.wait().unwrap(), dir, stderr)
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !std::path::Path::new(&dir).exists(),
        "{dir} was left behind"
    );
    let ps = Command::new("pgrep").args(["-f", &dir]).output().unwrap();
    assert!(
        ps.stdout.is_empty(),
        "processes left behind: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}
