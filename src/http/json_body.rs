//! `JsonBody<T>`: a JSON request body whose errors name the field at fault.
//!
//! poem-openapi's `Json<T>` says `Expected input type "string", found null. (occurred
//! while parsing "CreateAnnouncement")`, which does not tell a client which member to
//! fix. This payload keeps the OpenAPI schema of `T` (its `Type` impl) but parses with
//! serde, through `serde_path_to_error`: `subject: invalid type: null, expected a
//! string`. The two derives on a body type must agree on member names and defaults.

use poem::{Request, RequestBody};
use poem_openapi::payload::{ParsePayload, Payload};
use poem_openapi::registry::{MetaSchemaRef, Registry};
use poem_openapi::types::Type;
use serde::de::DeserializeOwned;

/// A JSON request body parsed with serde.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: Type> Payload for JsonBody<T> {
    const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

    fn check_content_type(content_type: &str) -> bool {
        content_type.parse::<mime::Mime>().is_ok_and(|m| {
            m.type_() == "application"
                && (m.subtype() == "json" || m.suffix().is_some_and(|s| s == "json"))
        })
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

/// Why a body was refused, for people: the member's path, then what was wrong.
pub fn describe(err: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let path = err.path().to_string();
    let inner = err.inner().to_string();
    // serde_json appends " at line L column C"; the member's name says more.
    let inner = inner
        .rsplit_once(" at line ")
        .map_or(inner.as_str(), |(msg, _)| msg);
    // Rust's type names mean nothing to a client.
    let mut inner = inner.to_owned();
    for (rust, plain) in [
        ("expected i64", "expected an integer"),
        ("expected i32", "expected an integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
    ] {
        inner = inner.replace(rust, plain);
    }
    if path.is_empty() || path == "." {
        format!("the body is not valid: {inner}")
    } else {
        format!("`{path}`: {inner}")
    }
}

impl<T: Type + DeserializeOwned + Send> ParsePayload for JsonBody<T> {
    const IS_REQUIRED: bool = true;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        let data = <Vec<u8> as poem::FromRequest>::from_request(request, body).await?;
        let reason = if data.is_empty() {
            "the body is empty: send a JSON object".to_owned()
        } else {
            let mut de = serde_json::Deserializer::from_slice(&data);
            match serde_path_to_error::deserialize::<_, T>(&mut de) {
                Ok(v) => match de.end() {
                    Ok(()) => return Ok(JsonBody(v)),
                    Err(_) => "the body holds more than one JSON value".to_owned(),
                },
                Err(e) => describe(&e),
            }
        };
        Err(poem_openapi::error::ParseRequestPayloadError { reason }.into())
    }
}

poem_openapi::impl_apirequest_for_payload!(JsonBody<T>, T: Type + DeserializeOwned + Send);
