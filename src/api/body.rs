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
use crate::app::AppState;

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

/// Parses a size: `65536`, `64KiB`, `64k`, `1MiB`, `1M`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: usize = n
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 65536, 64KiB, 1MiB)"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(format!("{s:?}: unknown unit (B, KiB, MiB)")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1 MiB"), Ok(1 << 20));
        assert!(parse_size("x").is_err());
        assert!(parse_size("1GiB").is_err());
    }
}
