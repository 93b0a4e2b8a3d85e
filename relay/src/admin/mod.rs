//! The admin HTTP server: health, readiness, Prometheus metrics, the JSON API (everything the CLI
//! does) and the web page. State-changing calls need `Authorization: Bearer <admin_token>`.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::ops::handlers::HandlerSpec;
use crate::ops::queries::{DeliveryFilter, EventFilter, LogFilter, ReplayRequest};
use crate::ops::{self, OpsError};

/// Largest request body accepted (handler definitions are small).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct AdminState {
    pub pool: Pool,
    /// Empty: state-changing calls are refused.
    pub token: Arc<str>,
    /// Read-only API calls without a token.
    pub open_reads: bool,
    pub metrics: PrometheusHandle,
    /// For `POST /api/handlers/{name}/test` (the relay's own transports).
    pub sender: crate::ops::test_send::TestSender,
}

pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/handlers", get(list_handlers).post(add_handler))
        .route(
            "/handlers/:name",
            get(get_handler)
                .patch(update_handler)
                .delete(remove_handler),
        )
        .route("/handlers/:name/test", post(test_handler))
        .route("/handlers/:name/:action", post(handler_action))
        .route("/events", get(list_events))
        .route("/events/:id", get(get_event))
        .route("/deliveries", get(list_deliveries))
        .route("/deliveries/:id", get(get_delivery))
        .route("/deliveries/:id/retry", post(retry))
        .route("/logs", get(logs))
        .route("/replay", post(replay))
        .route("/status", get(status))
        .route("/prune", post(prune))
        .layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .nest("/api", api)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serve on an already bound listener until `shutdown` (mini-redis style: tests bind port 0).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Compare without leaking the position of the first difference through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as usize;
    }
    diff == 0
}

async fn authorize(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let reading = req.method() == Method::GET || req.method() == Method::HEAD;
    if reading && state.open_reads {
        return next.run(req).await;
    }
    if state.token.is_empty() {
        return error(
            StatusCode::UNAUTHORIZED,
            "this call needs a token, and no admin_token is configured: set admin_token (or RELAY_ADMIN_TOKEN) to enable it",
        );
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), state.token.as_bytes()) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send Authorization: Bearer <admin_token>",
        );
    }
    next.run(req).await
}

fn error(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({"error": msg}))).into_response()
}

enum ApiError {
    Ops(OpsError),
    /// A response with its own status (413 body too large, 503 database unavailable).
    Status(StatusCode, String),
}

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        ApiError::Ops(e)
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApiError::Status(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("database unavailable: {e}"),
        )
    }
}

/// The JSON body, or why not: 413 when it exceeds [`MAX_BODY_BYTES`], 400 otherwise (malformed
/// JSON, unknown fields, wrong types), prefixed with `what`.
fn json_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
    what: &str,
) -> Result<T, ApiError> {
    match body {
        Ok(Json(v)) => Ok(v),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::Status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{what}: request body too large (at most {MAX_BODY_BYTES} bytes)"),
        )),
        Err(e) => Err(OpsError::BadRequest(format!("{what}: {}", e.body_text())).into()),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = match self {
            ApiError::Status(status, m) => return error(status, &m),
            ApiError::Ops(e) => e,
        };
        match e {
            OpsError::Refused(m) => error(StatusCode::UNPROCESSABLE_ENTITY, &m),
            OpsError::NotFound(m) => error(StatusCode::NOT_FOUND, &m),
            OpsError::BadRequest(m) => error(StatusCode::BAD_REQUEST, &m),
            OpsError::Db(e) => {
                tracing::error!(error = %e, "admin API database error");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "database error; see the relay's log",
                )
            }
        }
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let check = async {
        let client = s
            .pool
            .get()
            .await
            .map_err(|e| format!("database unreachable: {e}"))?;
        crate::schema::check_version(&**client)
            .await
            .map_err(|e| e.to_string())
    };
    match check.await {
        Ok(()) => Json(json!({"ready": true})).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "error": e})),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    if let Ok(client) = s.pool.get().await {
        if let Err(e) = crate::metrics::sample(&**client).await {
            tracing::warn!(error = %e, "cannot sample queue metrics");
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ListHandlers {
    all: bool,
}

async fn list_handlers(State(s): State<AdminState>, Query(q): Query<ListHandlers>) -> ApiResult {
    Ok(Json(
        ops::handlers::list(&**s.pool.get().await?, q.all).await?,
    ))
}

async fn get_handler(State(s): State<AdminState>, Path(name): Path<String>) -> ApiResult {
    Ok(Json(
        ops::handlers::get(&**s.pool.get().await?, &name).await?,
    ))
}

async fn add_handler(
    State(s): State<AdminState>,
    body: Result<Json<HandlerSpec>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let spec = json_body(body, "invalid handler")?;
    let created = ops::handlers::add(&**s.pool.get().await?, &spec).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn update_handler(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<HandlerSpec>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let spec = json_body(body, "invalid handler")?;
    Ok(Json(
        ops::handlers::update(&**s.pool.get().await?, &name, &spec).await?,
    ))
}

async fn remove_handler(State(s): State<AdminState>, Path(name): Path<String>) -> ApiResult {
    Ok(Json(
        ops::handlers::remove(&**s.pool.get().await?, &name).await?,
    ))
}

async fn handler_action(
    State(s): State<AdminState>,
    Path((name, action)): Path<(String, String)>,
) -> ApiResult {
    Ok(Json(
        ops::handlers::set_status(&**s.pool.get().await?, &name, &action).await?,
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TestRequest {
    event_id: Option<i64>,
}

/// Send one event to the handler now and report the reply (nothing is written). A body is
/// optional: `{"event_id": 123}` picks a stored event.
async fn test_handler(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let t: TestRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TestRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| OpsError::BadRequest(format!("test request: {e}")))?
    };
    Ok(Json(
        ops::test_send::test_send(&**s.pool.get().await?, &s.sender, &name, t.event_id).await?,
    ))
}

async fn list_events(State(s): State<AdminState>, Query(f): Query<EventFilter>) -> ApiResult {
    Ok(Json(
        ops::queries::events(&**s.pool.get().await?, &f).await?,
    ))
}

async fn get_event(State(s): State<AdminState>, Path(id): Path<i64>) -> ApiResult {
    Ok(Json(ops::queries::event(&**s.pool.get().await?, id).await?))
}

async fn list_deliveries(
    State(s): State<AdminState>,
    Query(f): Query<DeliveryFilter>,
) -> ApiResult {
    Ok(Json(
        ops::queries::deliveries(&**s.pool.get().await?, &f).await?,
    ))
}

async fn get_delivery(State(s): State<AdminState>, Path(id): Path<i64>) -> ApiResult {
    Ok(Json(
        ops::queries::delivery(&**s.pool.get().await?, id).await?,
    ))
}

async fn retry(State(s): State<AdminState>, Path(id): Path<i64>) -> ApiResult {
    Ok(Json(ops::queries::retry(&**s.pool.get().await?, id).await?))
}

async fn logs(State(s): State<AdminState>, Query(f): Query<LogFilter>) -> ApiResult {
    Ok(Json(ops::queries::logs(&**s.pool.get().await?, &f).await?))
}

async fn replay(
    State(s): State<AdminState>,
    body: Result<Json<ReplayRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let r = json_body(body, "invalid replay request")?;
    Ok(Json(
        ops::queries::replay(&**s.pool.get().await?, &r).await?,
    ))
}

async fn status(State(s): State<AdminState>) -> ApiResult {
    Ok(Json(ops::queries::status(&**s.pool.get().await?).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneRequest {
    older_than: String,
    #[serde(default)]
    dead: bool,
}

async fn prune(
    State(s): State<AdminState>,
    body: Result<Json<PruneRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let r = json_body(body, "invalid prune request")?;
    let age = ops::parse_duration(&r.older_than)?;
    Ok(Json(
        ops::queries::prune(&**s.pool.get().await?, age, r.dead).await?,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares_fully() {
        assert!(super::constant_time_eq(b"secret", b"secret"));
        assert!(!super::constant_time_eq(b"secret", b"secreT"));
        assert!(!super::constant_time_eq(b"secret", b"secret2"));
        assert!(!super::constant_time_eq(b"", b"x"));
    }
}
