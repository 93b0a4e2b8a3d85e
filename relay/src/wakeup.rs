//! The doorbell listener: a dedicated connection that LISTENs for `provisioning_events` (rung by
//! capture triggers only while a relay sleeps) and `provisioning_handlers` (handler changes).
//! Notifications are hints: they get lost across reconnects, so every reconnect is followed by a
//! catch-up wake, and the dispatcher polls anyway.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

pub const EVENTS_CHANNEL: &str = "provisioning_events";
pub const HANDLERS_CHANNEL: &str = "provisioning_handlers";

/// Runs until `shutdown`; rings `events` and `handlers` on notifications and after reconnects.
pub async fn listen(
    config: tokio_postgres::Config,
    events: Arc<Notify>,
    handlers: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                backoff = Duration::from_millis(200);
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                // Drive the connection ourselves: notifications only surface through poll_message.
                let driver = tokio::spawn(async move {
                    let mut stream =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(msg) = stream.next().await {
                        match msg {
                            Ok(AsyncMessage::Notification(n)) => {
                                if tx.send(n.channel().to_string()).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "doorbell connection lost; reconnecting");
                                return;
                            }
                        }
                    }
                });
                let listen = format!("LISTEN {EVENTS_CHANNEL}; LISTEN {HANDLERS_CHANNEL}");
                if let Err(e) = client.batch_execute(&listen).await {
                    tracing::warn!(error = %e, "LISTEN failed; retrying");
                    driver.abort();
                } else {
                    tracing::debug!("doorbell listening");
                    // Catch up on anything missed while disconnected.
                    events.notify_one();
                    handlers.notify_one();
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => { driver.abort(); return; }
                            msg = rx.recv() => match msg {
                                Some(ch) if ch == HANDLERS_CHANNEL => handlers.notify_one(),
                                Some(_) => events.notify_one(),
                                None => break,
                            }
                        }
                    }
                }
                drop(client);
            }
            Err(e) => {
                tracing::warn!(error = %e, "doorbell cannot connect; retrying in {:?} (polling continues)", backoff);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
