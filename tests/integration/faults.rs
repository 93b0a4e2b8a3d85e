//! The fault-injection suite, short form (SPEC §5, §8): two relay processes SIGKILLed and
//! restarted, PostgreSQL restarted (fast and immediate), database and receiver connections cut,
//! and a receiver failing in every way, under steady load — then nothing lost, per-object order
//! kept, duplicates only with the same webhook-id and body, dead deliveries with a reason.
//!
//! `cargo test --test integration faults -- --nocapture` (about 2–3 minutes; a PostgreSQL cluster
//! of its own, so the restarts disturb no other test). The long form is
//! `cargo build --release && cargo run --release --example faults -- --long`; the suite itself is
//! `tests/faults/suite.rs`. `FAULTS_SEED=<n>` replays a seed.

use std::path::PathBuf;

#[allow(dead_code)]
#[path = "../faults/suite.rs"]
mod suite;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_short_form_loses_nothing_and_keeps_order() {
    let opts = suite::Options::short(PathBuf::from(env!("CARGO_BIN_EXE_relay")));
    let report = suite::run(opts)
        .await
        .expect("the fault suite could not run");
    println!("{report}");
    assert!(
        report.passed(),
        "fault-injection suite found violations:\n{report}"
    );
    assert!(report.kills >= 2, "{report}");
    assert!(
        report.fast_restarts >= 1 && report.immediate_restarts >= 1,
        "{report}"
    );
    assert!(report.proxy_cuts >= 1, "{report}");
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(
        report.order_violations + report.start_order_violations,
        0,
        "{report}"
    );
}
