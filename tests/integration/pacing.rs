//! Pacing against a real server: the commit rate is read from `pg_stat_database`, the relay's own
//! claims are told apart from other work, and a busy server stretches the pause between claims.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use relay::pacing::Pacing;
use relay::store::{Store, Want};
use tokio_util::sync::CancellationToken;

use crate::common::*;

const MS: Duration = Duration::from_millis(1);

fn store(db: &TestDb) -> Store {
    let pool = relay::db::make_pool(&db.url, 2, "relay-pacing-test").expect("pool");
    Store::new(pool, format!("pacing-{}", uuid::Uuid::new_v4().simple()))
}

#[tokio::test]
async fn claims_count_as_the_relays_own_transactions() {
    let db = TestDb::vcs().await;
    let h = add_handler(
        &db.client,
        "own",
        &["clients.*"],
        "http",
        "http://127.0.0.1:9/never",
        "",
    )
    .await;
    let store = store(&db);
    let before = store.own_transactions();
    let want = Want {
        handler_id: h,
        limit: 10,
        lease: Duration::from_secs(30),
        row_images: false,
    };
    for _ in 0..3 {
        store
            .claim(std::slice::from_ref(&want), 1)
            .await
            .expect("claim");
    }
    assert_eq!(store.own_transactions() - before, 3);
    let first = store
        .server_transactions()
        .await
        .expect("read commit counter");
    assert!(
        first > 0,
        "a running server has committed something: {first}"
    );
}

#[tokio::test]
async fn a_server_busy_with_other_commits_stretches_the_pause_between_claims() {
    let db = TestDb::installed().await;
    let pacing = Pacing::new(2 * MS, 20 * MS, 50);
    assert_eq!(pacing.pause(), 2 * MS, "starts at the busy poll interval");
    let stop = CancellationToken::new();
    let sampler = tokio::spawn(pacing.clone().run(store(&db), 100 * MS, stop.clone()));

    // Another session commits as fast as it can (far above 50 a second, even on a loaded machine).
    let busy = Arc::new(AtomicBool::new(true));
    let writer = {
        let client = db.connect().await;
        let busy = busy.clone();
        tokio::spawn(async move {
            while busy.load(Ordering::Relaxed) {
                client.batch_execute("SELECT 1").await.expect("load");
            }
        })
    };
    let pause = eventually(
        Duration::from_secs(30),
        "the pause to grow while another session commits",
        || {
            let p = pacing.pause();
            async move { (p > 2 * MS).then_some(p) }
        },
    )
    .await;
    assert!(pause <= 20 * MS, "never above the max: {pause:?}");
    busy.store(false, Ordering::Relaxed);
    writer.await.expect("writer");
    stop.cancel();
    sampler.await.expect("sampler");
}

#[tokio::test]
async fn pacing_turned_off_never_reads_the_server_and_keeps_the_busy_poll() {
    let db = TestDb::installed().await;
    let pacing = Pacing::new(2 * MS, 20 * MS, 0);
    let store = store(&db);
    // returns at once, without a sample (it would count as an own transaction)
    pacing
        .clone()
        .run(store.clone(), 10 * MS, CancellationToken::new())
        .await;
    assert_eq!(store.own_transactions(), 0);
    assert_eq!(pacing.pause(), 2 * MS);
}
