//! HTTP(S) delivery: one shared `reqwest::Client` (one connection pool) per relay.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::redirect::Policy;
use reqwest::StatusCode;

use super::{signing, truncate_text, Reply, Request};

pub const USER_AGENT: &str = concat!("provisioning-relay/", env!("CARGO_PKG_VERSION"));

/// The per-handler part of an HTTP call.
#[derive(Clone)]
pub struct Target<'a> {
    pub url: &'a str,
    pub headers: &'a [(String, String)],
    pub secret: Option<&'a str>,
}

#[derive(Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    response_limit: usize,
}

impl HttpTransport {
    pub fn new(
        connect_timeout: Duration,
        response_limit: usize,
    ) -> Result<HttpTransport, reqwest::Error> {
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .redirect(Policy::none()) // a redirect is a failure, never followed blindly
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        Ok(HttpTransport {
            client,
            response_limit,
        })
    }

    pub async fn send(&self, target: &Target<'_>, req: &Request) -> Reply {
        let start = Instant::now();
        let mut reply = match tokio::time::timeout(req.timeout, self.exchange(target, req)).await {
            Ok(reply) => reply,
            Err(_) => Reply {
                error: Some(format!("timed out after {} ms", req.timeout.as_millis())),
                ..Reply::default()
            },
        };
        reply.duration = start.elapsed();
        reply
    }

    async fn exchange(&self, target: &Target<'_>, req: &Request) -> Reply {
        let headers = match build_headers(target, req) {
            Ok(h) => h,
            Err(e) => {
                return Reply {
                    error: Some(e),
                    ..Reply::default()
                }
            }
        };
        let sent = self
            .client
            .post(target.url)
            .headers(headers)
            .timeout(req.timeout)
            .body(req.body.clone())
            .send()
            .await;
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => {
                return Reply {
                    error: Some(describe_error(&e)),
                    ..Reply::default()
                }
            }
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);

        // Read at most the limit; count (but do not keep) the rest, up to 4x the limit, then stop.
        let mut kept: Vec<u8> = Vec::new();
        let mut total = 0usize;
        let mut body_error = None;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    total += chunk.len();
                    if kept.len() < self.response_limit {
                        let room = self.response_limit - kept.len();
                        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    if total > self.response_limit * 4 {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    body_error = Some(format!(
                        "reading the response body failed: {}",
                        describe_error(&e)
                    ));
                    break;
                }
            }
        }
        let response = Some(truncate_text(&kept, self.response_limit, total));
        let success = status.is_success() && body_error.is_none();
        let error = if success {
            None
        } else if let Some(e) = body_error {
            Some(e)
        } else if status.is_redirection() {
            Some(format!(
                "HTTP {status}: redirects are not followed (Location: {}); register the final URL",
                location.as_deref().unwrap_or("-")
            ))
        } else {
            Some(format!("HTTP {status}"))
        };
        Reply {
            success,
            http_status: Some(status.as_u16()),
            exit_code: None,
            response,
            error,
            retry_after: if status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::SERVICE_UNAVAILABLE
            {
                retry_after
            } else {
                None
            },
            gone: status == StatusCode::GONE,
            duration: Duration::ZERO,
        }
    }
}

fn build_headers(target: &Target<'_>, req: &Request) -> Result<HeaderMap, String> {
    let mut h = HeaderMap::new();
    for (name, value) in target.headers {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?} in handler"))?;
        let v = HeaderValue::from_str(value)
            .map_err(|_| format!("invalid value for header {name:?} in handler"))?;
        h.insert(n, v);
    }
    let timestamp = chrono::Utc::now().timestamp();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert("webhook-id", header_value(&req.webhook_id)?);
    h.insert("webhook-timestamp", HeaderValue::from(timestamp));
    if let Some(secret) = target.secret {
        let sig = signing::sign(secret, &req.webhook_id, timestamp, req.body.as_bytes());
        h.insert("webhook-signature", header_value(&sig)?);
    }
    h.insert("x-provisioning-event", header_value(&req.event_name)?);
    h.insert("x-provisioning-attempt", HeaderValue::from(req.attempt));
    Ok(h)
}

fn header_value(s: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(s).map_err(|_| format!("cannot send {s:?} as a header value"))
}

/// `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// reqwest's Display hides the cause chain; operators need it ("connection refused" etc.).
fn describe_error(e: &reqwest::Error) -> String {
    let mut msg = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let future = (chrono::Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
        let d = parse_retry_after(&future).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
