//! Operator endpoints and per-request telemetry: `/metrics`, `/readyz`, and the
//! request span (with its request id) around every HTTP request.
//!
//! Logs carry the path, never the query string: `?access_token=` must not reach a log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use poem::http::{HeaderValue, StatusCode};
use poem::web::Data;
use poem::{Endpoint, IntoResponse, Request, Response, handler};
use tracing::Instrument;

use crate::broker::BusHealth;
use crate::http::problem::Problem;
use crate::state::AppState;

/// `GET /metrics`: Prometheus text format.
#[handler]
pub fn metrics() -> Response {
    let body = crate::observe::prometheus()
        .map(|p| p.render())
        .unwrap_or_default();
    Response::builder()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}

/// `GET /readyz`: the database answers, no migration is pending, and a node of several
/// is listening for the other nodes' events.
#[handler]
pub async fn readyz(Data(state): Data<&AppState>) -> Response {
    let ready = match state.service.store.ready().await {
        Ok(()) if state.service.broker().health() == BusHealth::Reconnecting => Err(format!(
            "not listening for other nodes' events (reconnecting); they reach this node by \
             the sweep, up to {} late",
            humantime::format_duration(state.config.sweep_interval)
        )),
        r => r,
    };
    match ready {
        Ok(()) => "ready".into_response(),
        Err(why) => {
            tracing::warn!(why = %why, "not ready");
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why).response()
        }
    }
}

fn request_id(req: &Request) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    req.header("X-Request-Id")
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            format!("{:x}-{n:x}", std::process::id())
        })
}

/// Runs each request in a span with its request id (taken from `X-Request-Id` or
/// made up, and returned in the response), and logs one line when it is answered.
pub async fn request_span<E: Endpoint>(next: E, req: Request) -> poem::Result<Response> {
    let id = request_id(&req);
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    async move {
        let started = Instant::now();
        let mut resp = next.call(req).await.map(IntoResponse::into_response)?;
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert("X-Request-Id", v);
        }
        // Milliseconds to two decimals: `elapsed_ms=15.89`, not 15.886970999999999.
        let elapsed_ms = (started.elapsed().as_secs_f64() * 100_000.0).round() / 100.0;
        tracing::info!(status = resp.status().as_u16(), elapsed_ms, "answered");
        Ok(resp)
    }
    .instrument(span)
    .await
}
