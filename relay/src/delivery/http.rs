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
    /// `url`, parsed ahead (when it parses).
    pub parsed: Option<&'a reqwest::Url>,
    pub headers: &'a [(String, String)],
    pub secret: Option<&'a str>,
}

#[derive(Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    response_limit: usize,
    deny_private: bool,
}

impl HttpTransport {
    /// `deny_private`: refuse targets that are (or resolve to) loopback, private, link-local or
    /// otherwise non-public addresses — SSRF protection for deployments where handler URLs come
    /// from less trusted users. Off by default so local handlers work.
    pub fn new(
        connect_timeout: Duration,
        response_limit: usize,
        deny_private: bool,
    ) -> Result<HttpTransport, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .redirect(Policy::none()) // a redirect is a failure, never followed blindly
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true);
        if deny_private {
            builder = builder.dns_resolver(std::sync::Arc::new(PublicOnlyResolver));
        }
        Ok(HttpTransport {
            client: builder.build()?,
            response_limit,
            deny_private,
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
        if self.deny_private {
            // IP literals never reach the resolver: check them here.
            if let Some(ip) = target
                .parsed
                .cloned()
                .or_else(|| reqwest::Url::parse(target.url).ok())
                .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
                .and_then(|h| h.parse::<std::net::IpAddr>().ok())
            {
                if !is_public(ip) {
                    return Reply {
                        error: Some(format!(
                            "refused: {ip} is not a public address (deny_private_targets is on)"
                        )),
                        ..Reply::default()
                    };
                }
            }
        }
        let headers = match build_headers(target, req) {
            Ok(h) => h,
            Err(e) => {
                return Reply {
                    error: Some(e),
                    ..Reply::default()
                }
            }
        };
        let post = match target.parsed {
            Some(url) => self.client.post(url.clone()),
            None => self.client.post(target.url),
        };
        let sent = post
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
        let sig =
            signing::signature_header(secret, &req.webhook_id, timestamp, req.body.as_bytes());
        h.insert("webhook-signature", header_value(&sig)?);
    }
    h.insert("x-provisioning-event", header_value(&req.event_name)?);
    h.insert("x-provisioning-attempt", HeaderValue::from(req.attempt));
    Ok(h)
}

fn header_value(s: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(s).map_err(|_| format!("cannot send {s:?} as a header value"))
}

/// Is this address reachable from the public internet (not loopback, private, link-local, CGNAT,
/// unique-local, unspecified, multicast or documentation space)?
pub fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 CGNAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link local
                || (seg[0] == 0x2001 && seg[1] == 0x0db8)) // documentation
        }
    }
}

/// A resolver that drops non-public addresses (SSRF protection).
struct PublicOnlyResolver;

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "refused: {host} resolves to no public address (deny_private_targets is on)"
                )
                .into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
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
    fn public_and_private_addresses() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn private_targets_are_refused_when_configured() {
        let t = HttpTransport::new(Duration::from_secs(1), 1024, true).unwrap();
        let req = Request {
            webhook_id: "evt_1_h1".into(),
            event_name: "clients.update".into(),
            handler_name: "h".into(),
            attempt: 1,
            body: "{}".into(),
            timeout: Duration::from_secs(2),
        };
        for url in [
            "http://127.0.0.1:9/x",
            "http://localhost:9/x",
            "http://[::1]:9/x",
        ] {
            let r = t
                .send(
                    &Target {
                        url,
                        parsed: None,
                        headers: &[],
                        secret: None,
                    },
                    &req,
                )
                .await;
            assert!(!r.success);
            let e = r.error.unwrap();
            assert!(
                e.contains("refused") && e.contains("deny_private_targets"),
                "{url}: {e}"
            );
        }
    }

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
