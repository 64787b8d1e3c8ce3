//! The static pages people use to watch and test zonecast, compiled into the binary so
//! it serves them offline from anywhere: the dashboard, the `zonecast.js` client, and
//! the raw SSE and WebSocket test pages. Nothing is loaded from outside.

use poem::http::StatusCode;
use poem::{Endpoint, IntoResponse, Request, Response, handler};

use crate::http::problem::Problem;
use crate::state::AppState;

fn page(body: &'static str, content_type: &str) -> Response {
    Response::builder()
        .content_type(content_type)
        // Revalidate every time: a new server version must not meet an old client.
        .header("Cache-Control", "no-cache")
        .header("X-Content-Type-Options", "nosniff")
        .body(body)
}

#[handler]
pub fn index() -> Response {
    page(
        include_str!("../static/index.html"),
        "text/html; charset=utf-8",
    )
}

#[handler]
pub fn client() -> Response {
    page(
        include_str!("../static/zonecast.js"),
        "text/javascript; charset=utf-8",
    )
}

#[handler]
pub fn sse_client() -> Response {
    page(
        include_str!("../static/sse-client.html"),
        "text/html; charset=utf-8",
    )
}

#[handler]
pub fn ws_client() -> Response {
    page(
        include_str!("../static/ws-client.html"),
        "text/html; charset=utf-8",
    )
}

/// `--refuse-sse` (tests): every `/sse/…` request gets 503, as behind a proxy that
/// breaks event streams.
pub async fn refuse_sse<E: Endpoint>(next: E, req: Request) -> poem::Result<Response> {
    let refuse = req.uri().path().starts_with("/sse/")
        && req.data::<AppState>().is_some_and(|s| s.config.refuse_sse);
    if refuse {
        return Ok(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "SSE is refused on this server (--refuse-sse)",
        )
        .response());
    }
    next.call(req).await.map(IntoResponse::into_response)
}
