//! A real HTTP receiver on 127.0.0.1:0 that records every request and answers as scripted.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

/// How to answer one request.
#[derive(Clone, Debug)]
pub enum Answer {
    Status(u16),
    StatusWithHeaders(u16, Vec<(&'static str, String)>),
    /// Never answer (until the client gives up).
    Hang,
    /// 302 to another path.
    Redirect(String),
    /// Echo the request body back (the JeraSoft Flask example).
    Echo,
    Body(u16, String),
    /// Answer with this status after a delay (a slow receiver).
    Delay(Duration, u16),
    /// Fail with `status` for about `percent` % of requests, pseudo-randomly (deterministic
    /// sequence from the receiver's seed, see [`Receiver::seed`]); 200 otherwise.
    Flaky {
        percent: u32,
        status: u16,
    },
}

#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: String,
    pub at: Instant,
    /// The status the receiver chose to answer with (0 for [`Answer::Hang`]). The client may
    /// have gone away before the answer was written.
    pub status: u16,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("request body is JSON")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct Inner {
    received: Vec<Received>,
    script: VecDeque<Answer>,
    default: Option<Answer>,
    /// xorshift64 state for [`Answer::Flaky`].
    rng: u64,
}

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { addr, inner }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Answer the next requests with these, in order; then the default (200).
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.inner.lock().unwrap().script.extend(answers);
    }

    /// Seed the pseudo-random sequence used by [`Answer::Flaky`].
    pub fn seed(&self, seed: u64) {
        self.inner.lock().unwrap().rng = seed.max(1);
    }

    pub fn set_default(&self, answer: Answer) {
        self.inner.lock().unwrap().default = Some(answer);
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.lock().unwrap().received.clone()
    }

    pub fn received_on(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Wait until at least `n` requests arrived on `path`.
    pub async fn wait_for(&self, path: &str, n: usize, deadline: Duration) -> Vec<Received> {
        crate::common::eventually(deadline, &format!("{n} requests on {path}"), || async {
            let got = self.received_on(path);
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let answer = {
        let mut i = inner.lock().unwrap();
        let default = i.default.clone().unwrap_or(Answer::Status(200));
        let mut answer = i.script.pop_front().unwrap_or(default);
        if let Answer::Flaky { percent, status } = answer {
            let mut x = if i.rng == 0 {
                0x9E37_79B9_7F4A_7C15
            } else {
                i.rng
            };
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            i.rng = x;
            answer = if x % 100 < u64::from(percent) {
                Answer::Status(status)
            } else {
                Answer::Status(200)
            };
        }
        let status = match &answer {
            Answer::Status(s)
            | Answer::StatusWithHeaders(s, _)
            | Answer::Body(s, _)
            | Answer::Delay(_, s) => *s,
            Answer::Hang => 0,
            Answer::Redirect(_) => 302,
            Answer::Echo => 200,
            Answer::Flaky { .. } => unreachable!("resolved above"),
        };
        i.received.push(Received {
            path: uri.path().to_string(),
            headers: headers.clone(),
            body: String::from_utf8_lossy(&body).into_owned(),
            at: Instant::now(),
            status,
        });
        answer
    };
    match answer {
        Answer::Status(s) => (StatusCode::from_u16(s).unwrap(), "ok").into_response(),
        Answer::StatusWithHeaders(s, hs) => {
            let mut r = (StatusCode::from_u16(s).unwrap(), "slow down").into_response();
            for (k, v) in hs {
                r.headers_mut().insert(k, v.parse().unwrap());
            }
            r
        }
        Answer::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        Answer::Redirect(to) => {
            let mut r = StatusCode::FOUND.into_response();
            r.headers_mut().insert("location", to.parse().unwrap());
            r
        }
        Answer::Echo => {
            (StatusCode::OK, [("content-type", "application/json")], body).into_response()
        }
        Answer::Body(s, b) => (StatusCode::from_u16(s).unwrap(), b).into_response(),
        Answer::Delay(d, s) => {
            tokio::time::sleep(d).await;
            (StatusCode::from_u16(s).unwrap(), "ok").into_response()
        }
        Answer::Flaky { .. } => unreachable!("resolved when the request arrived"),
    }
}
