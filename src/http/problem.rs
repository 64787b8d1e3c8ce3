//! RFC 9457 problem details: the one place that picks HTTP status codes for errors.
//! Internal causes are logged here and never shown to clients.

use poem::http::StatusCode;
use poem::{Endpoint, IntoResponse, Request, Response};
use poem_openapi::{ApiResponse, Object, payload::Json};
use serde::Serialize;

use crate::credentials::AuthError;
use crate::domain::DomainError;
use crate::limits::RetryAfter;
use crate::service::ServiceError;
use crate::store::StoreError;

pub const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Debug, Clone, Object, Serialize)]
pub struct Problem {
    /// A URI reference naming the problem type: `/problems/{code}`.
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Machine-readable code, the same as the WebSocket error codes.
    pub code: String,
}

impl Problem {
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Problem {
            kind: format!("/problems/{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            code: code.to_owned(),
        }
    }

    /// As a plain poem response, for routes outside the OpenAPI service (SSE).
    pub fn response(&self) -> Response {
        let body = serde_json::to_vec(self).unwrap_or_default();
        Response::builder()
            .status(StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .content_type(PROBLEM_JSON)
            .body(body)
    }
}

/// Errors of the REST API, documented in the OpenAPI spec.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// Malformed request.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Problem>),
    /// Missing, invalid or revoked credentials.
    #[oai(status = 401, content_type = "application/problem+json")]
    Unauthorized(Json<Problem>),
    /// The caller may not do this (role or zone scope).
    #[oai(status = 403, content_type = "application/problem+json")]
    Forbidden(Json<Problem>),
    /// Unknown zone or item.
    #[oai(status = 404, content_type = "application/problem+json")]
    NotFound(Json<Problem>),
    /// `version_conflict`, or a duplicate.
    #[oai(status = 409, content_type = "application/problem+json")]
    Conflict(Json<Problem>),
    /// `invalid` field values, `insufficient_stock`, or `idempotency_key_reused`.
    #[oai(status = 422, content_type = "application/problem+json")]
    Unprocessable(Json<Problem>),
    /// Over a rate limit: retry after `Retry-After` seconds.
    #[oai(status = 429, content_type = "application/problem+json")]
    TooManyRequests(Json<Problem>, #[oai(header = "Retry-After")] u64),
    #[oai(status = 500, content_type = "application/problem+json")]
    Internal(Json<Problem>),
    #[oai(status = 503, content_type = "application/problem+json")]
    Unavailable(Json<Problem>),
}

impl ApiError {
    pub fn rate_limited(retry: RetryAfter, what: &str) -> Self {
        ApiError::TooManyRequests(
            Json(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many {what}; retry in {} s", retry.seconds()),
            )),
            retry.seconds(),
        )
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Store(s) => {
                tracing::error!(error = %s, "cannot check credentials");
                ApiError::Unavailable(Json(Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "credentials cannot be checked right now; retry",
                )))
            }
            other => {
                let detail = match other {
                    AuthError::Rejected(why) => why.to_owned(),
                    other => {
                        format!("{other}: send Authorization: Bearer, X-API-Key or ?access_token=")
                    }
                };
                ApiError::Unauthorized(Json(Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    detail,
                )))
            }
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Domain(d) => d.into(),
            ServiceError::Store(s) => s.into(),
        }
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        let detail = e.to_string();
        match e {
            DomainError::NotFound(_) => ApiError::NotFound(Json(Problem::new(
                StatusCode::NOT_FOUND,
                "not_found",
                detail,
            ))),
            DomainError::Invalid(_) => ApiError::Unprocessable(Json(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                detail,
            ))),
            DomainError::InsufficientStock { .. } => ApiError::Unprocessable(Json(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "insufficient_stock",
                detail,
            ))),
            DomainError::VersionConflict { .. } => ApiError::Conflict(Json(Problem::new(
                StatusCode::CONFLICT,
                "version_conflict",
                detail,
            ))),
            DomainError::Conflict(_) => {
                ApiError::Conflict(Json(Problem::new(StatusCode::CONFLICT, "conflict", detail)))
            }
            DomainError::IdempotencyKeyReused(_) => ApiError::Unprocessable(Json(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                detail,
            ))),
            DomainError::Unauthenticated(_) => ApiError::Unauthorized(Json(Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                detail,
            ))),
            DomainError::Forbidden(_) => ApiError::Forbidden(Json(Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                detail,
            ))),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage failure");
        ApiError::Internal(Json(Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; it has been logged",
        )))
    }
}

/// A service error as a plain poem response, for routes outside the OpenAPI service
/// (SSE, the WebSocket handshake): the same mapping as the REST API.
pub fn service_problem(e: ServiceError) -> Response {
    ApiError::from(e).into_response()
}

/// Any `ApiError` as a plain poem response.
pub fn error_response(e: impl Into<ApiError>) -> Response {
    e.into().into_response()
}

fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        409 => "conflict",
        413 => "too_large",
        415 => "unsupported_media_type",
        422 => "invalid",
        429 => "rate_limited",
        503 => "unavailable",
        s if s >= 500 => "internal",
        _ => "error",
    }
}

/// What is wrong with a path whose id did not parse, naming the id: every numeric
/// path parameter follows the resource it identifies (`/api/zones/{id}`,
/// `/sse/zones/{zone_id}/stock`, `/api/items/{id}`, `/api/notifications/{id}/read`).
fn path_error(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for pair in segments.windows(2) {
        let what = match pair[0] {
            "zones" => "zone",
            "items" => "item",
            "notifications" => "notification",
            _ => continue,
        };
        if pair[1].parse::<i32>().is_err() {
            return format!(
                "{what} id {:?} in the path is not a number: ids are positive integers",
                pair[1]
            );
        }
    }
    "a parameter in the path is not valid".to_owned()
}

/// Middleware: every error that leaves a route becomes problem+json, including the
/// ones poem and poem-openapi raise themselves (malformed JSON, bad path or query,
/// unknown route).
pub async fn problems<E: Endpoint>(next: E, req: Request) -> poem::Result<Response> {
    let path = req.uri().path().to_owned();
    match next.call(req).await {
        Ok(resp) => Ok(resp.into_response()),
        Err(err) => {
            let status = err.status();
            let detail = if let Some(e) =
                err.downcast_ref::<poem_openapi::error::ParseRequestPayloadError>()
            {
                e.reason.clone()
            } else if err.is::<poem_openapi::error::ParsePathError>()
                || err.is::<poem::error::ParsePathError>()
            {
                path_error(&path)
            } else if err.is::<poem::error::CorsError>() {
                "this origin is not allowed (see --cors-origin)".to_owned()
            } else {
                err.to_string()
            };
            let resp = err.into_response();
            let is_problem = resp
                .content_type()
                .is_some_and(|c| c.starts_with(PROBLEM_JSON));
            if is_problem {
                Ok(resp)
            } else {
                Ok(Problem::new(status, code_for(status), detail).response())
            }
        }
    }
}
