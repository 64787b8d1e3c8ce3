//! The authentication middleware: every request to `/api`, `/sse` and `/ws` carries a
//! resolved `Principal` (and its rate-limit key) in its extensions, or is answered 401
//! before any handler runs. Authorization is the handlers' (and the service's) job.
//!
//! Credentials are read from `Authorization: Bearer`, `X-API-Key`, or `?access_token=`
//! (browsers' EventSource and WebSocket cannot set headers). None is ever logged.

use poem::http::StatusCode;
use poem::{Endpoint, IntoResponse, Request, Response};
use serde::Deserialize;

use super::problem::{ApiError, error_response};
use crate::credentials::AuthError;
use crate::state::AppState;

/// The key rate limits count a caller under: the principal, or the client IP when
/// anonymous.
#[derive(Debug, Clone)]
pub struct RateKey(pub String);

#[derive(Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

fn credential(req: &Request) -> Option<String> {
    if let Some(v) = req.header("Authorization") {
        let v = v.trim();
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .unwrap_or(v);
        return Some(token.trim().to_owned());
    }
    if let Some(v) = req.header("X-API-Key") {
        return Some(v.trim().to_owned());
    }
    req.params::<TokenQuery>().ok().and_then(|q| q.access_token)
}

fn guarded(path: &str) -> bool {
    path.starts_with("/api/")
        || path.starts_with("/sse/")
        || path == "/ws"
        || path.starts_with("/ws/")
}

/// The routes whose handlers change nothing but through `Service::write` (item
/// changes), which checks a remembered key in the change's own transaction: only
/// these may authenticate with `Authenticator::authenticate_write`. A route added here
/// must keep to that.
fn item_change(method: &poem::http::Method, path: &str) -> bool {
    use poem::http::Method;
    let id = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match *method {
        Method::PATCH | Method::DELETE => path.strip_prefix("/api/items/").is_some_and(id),
        Method::POST => path
            .strip_prefix("/api/zones/")
            .and_then(|rest| rest.strip_suffix("/items"))
            .is_some_and(id),
        _ => false,
    }
}

/// Every request that writes (any method but GET, HEAD and OPTIONS under `/api/`)
/// counts against the caller's write limit, whatever its role, before its body is
/// read. WebSocket messages that write are counted by the WS transport.
pub async fn limit_writes<E: Endpoint>(next: E, req: Request) -> poem::Result<Response> {
    let writes = !matches!(
        *req.method(),
        poem::http::Method::GET | poem::http::Method::HEAD | poem::http::Method::OPTIONS
    ) && req.uri().path().starts_with("/api/");
    if writes
        && let (Some(state), Some(rate)) = (req.data::<AppState>(), req.data::<RateKey>())
        && let Err(retry) = state.limits.write(&rate.0)
    {
        return Ok(error_response(ApiError::rate_limited(retry, "writes")));
    }
    next.call(req).await.map(IntoResponse::into_response)
}

pub async fn authenticate<E: Endpoint>(next: E, mut req: Request) -> poem::Result<Response> {
    if !guarded(req.uri().path()) {
        return next.call(req).await.map(IntoResponse::into_response);
    }
    let Some(state) = req.data::<AppState>().cloned() else {
        return next.call(req).await.map(IntoResponse::into_response);
    };
    let ip = req
        .remote_addr()
        .as_socket_addr()
        .map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string());
    let token = credential(&req);
    let found = if item_change(req.method(), req.uri().path()) {
        state.auth.authenticate_write(token.as_deref()).await
    } else {
        state.auth.authenticate(token.as_deref()).await
    };
    let principal = match found {
        Ok(p) => p,
        Err(e @ (AuthError::Invalid | AuthError::Rejected(_))) => {
            // Guessing costs the guesser: past the limit, 429 instead of 401.
            if let Err(retry) = state.limits.auth_failure(&ip) {
                return Ok(error_response(ApiError::rate_limited(
                    retry,
                    "failed authentications from this address",
                )));
            }
            return Ok(error_response(e));
        }
        Err(e) => return Ok(error_response(e)),
    };
    let rate_key = if principal.anonymous {
        format!("ip:{ip}")
    } else {
        principal.name.clone()
    };
    let remembered = principal.key_remembered;
    req.extensions_mut().insert(RateKey(rate_key));
    req.extensions_mut().insert(principal);
    let answered = next.call(req).await.map(IntoResponse::into_response);
    // A remembered key is checked in the change's transaction; a refusal made before
    // it (an unknown item, a zone the key may not write, a malformed body) must not
    // answer for a key revoked elsewhere since: look the key up, and say 401 if so.
    // Refusals are rare, so the lookup costs the hot path nothing.
    let status = match &answered {
        Ok(r) => r.status(),
        Err(e) => e.status(),
    };
    if remembered
        && status.is_client_error()
        && status != StatusCode::UNAUTHORIZED
        && status != StatusCode::TOO_MANY_REQUESTS
        && let Err(e @ (AuthError::Invalid | AuthError::Rejected(_))) =
            state.auth.authenticate(token.as_deref()).await
    {
        return Ok(error_response(e));
    }
    answered
}

#[cfg(test)]
mod tests {
    use super::item_change;
    use poem::http::Method;

    #[test]
    fn only_item_changes_may_use_a_remembered_key() {
        for (method, path) in [
            (Method::PATCH, "/api/items/12"),
            (Method::DELETE, "/api/items/3"),
            (Method::POST, "/api/zones/7/items"),
        ] {
            assert!(item_change(&method, path), "{method} {path}");
        }
        for (method, path) in [
            (Method::GET, "/api/items/12"),
            (Method::GET, "/api/zones/7/items"),
            (Method::PATCH, "/api/items/"),
            (Method::PATCH, "/api/items/12/x"),
            (Method::PATCH, "/api/items/1a"),
            (Method::POST, "/api/zones/7/items/"),
            (Method::POST, "/api/zones//items"),
            (Method::POST, "/api/zones/7/watch"),
            (Method::POST, "/api/keys"),
            (Method::DELETE, "/api/keys/k"),
            (Method::POST, "/api/notifications/1/read"),
        ] {
            assert!(!item_change(&method, path), "{method} {path}");
        }
    }
}
