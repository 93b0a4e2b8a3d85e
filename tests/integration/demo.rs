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
