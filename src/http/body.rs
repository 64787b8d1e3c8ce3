//! The request body limit: a body is at most `--max-body` bytes and must arrive within
//! `--header-timeout`. A `Content-Length` over the limit is refused before a byte of
//! the body is read; a body without one (chunked) is read into memory up to the
//! limit and cut off there. Either way the client gets `413` problem+json, and a body
//! that arrives too slowly `408`.
//!
//! Runs after authentication, so an anonymous or unknown caller never gets a body read
//! at all; handlers then read the bounded, buffered copy.

use futures_util::StreamExt;
use poem::http::StatusCode;
use poem::{Endpoint, IntoResponse, Request, Response};

use super::problem::Problem;
use crate::state::AppState;

fn too_large(max: usize) -> Response {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("the request body is over the limit of {max} bytes (--max-body)"),
    )
    .response()
}

pub async fn limit_body<E: Endpoint>(next: E, mut req: Request) -> poem::Result<Response> {
    let Some((max, deadline)) = req
        .data::<AppState>()
        .map(|s| (s.config.max_body, s.config.header_timeout))
    else {
        return next.call(req).await.map(IntoResponse::into_response);
    };
    let declared = req
        .header("content-length")
        .map(|v| v.trim().parse::<u64>());
    match declared {
        Some(Ok(len)) if len > max as u64 => return Ok(too_large(max)),
        Some(Err(_)) => {
            return Ok(Problem::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "Content-Length is not a number",
            )
            .response());
        }
        _ => {}
    }
    let body = req.take_body();
    if body.is_empty() {
        req.set_body(body);
        return next.call(req).await.map(IntoResponse::into_response);
    }
    let read = async {
        let mut chunks = body.into_bytes_stream();
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if buf.len() + chunk.len() > max {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok::<_, std::io::Error>(Some(buf.freeze()))
    };
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(Some(bytes))) => req.set_body(bytes),
        Ok(Ok(None)) => return Ok(too_large(max)),
        Ok(Err(e)) => {
            return Ok(Problem::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the request body could not be read: {e}"),
            )
            .response());
        }
        Err(_) => {
            return Ok(Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the request body did not arrive within {} ms (--header-timeout)",
                    deadline.as_millis()
                ),
            )
            .response());
        }
    }
    next.call(req).await.map(IntoResponse::into_response)
}
