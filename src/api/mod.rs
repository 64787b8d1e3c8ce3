//! The REST API (poem-openapi), one module per resource: thin handlers that parse into
//! domain types, call the service (which decides who may do what), and shape the
//! reply. Swagger UI at `/docs`, the spec at `/openapi.json`.

pub mod dto;
mod items;
mod keys;
mod notifications;
mod ops;
mod zones;

use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApiService, SecurityScheme, Tags};

use crate::http::problem::ApiError;
use crate::state::AppState;

pub use items::ItemsApi;
pub use keys::KeysApi;
pub use notifications::NotificationsApi;
pub use ops::OpsApi;
pub use zones::ZonesApi;

type ApiResult<T> = Result<T, ApiError>;

/// The resources, as the spec groups them.
#[derive(Tags)]
pub(crate) enum Tag {
    /// Zones and their change log.
    Zones,
    /// Items and their stock.
    Items,
    /// API keys.
    Keys,
    /// Per-user notifications, watches and announcements.
    Notifications,
    /// The caller, and this node.
    Ops,
}

/// `Authorization: Bearer` with an API key or a JWT.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", rename = "bearer")]
#[allow(dead_code)] // declared for the spec; the middleware reads the credentials
pub(crate) struct BearerToken(poem_openapi::auth::Bearer);

/// An API key in the `X-API-Key` header.
#[derive(SecurityScheme)]
#[allow(dead_code)] // declared for the spec; the middleware reads the credentials
#[oai(
    ty = "api_key",
    key_name = "X-API-Key",
    key_in = "header",
    rename = "api_key"
)]
pub(crate) struct HeaderKey(poem_openapi::auth::ApiKey);

/// An API key or JWT in `?access_token=` (what browsers' EventSource can send).
#[derive(SecurityScheme)]
#[oai(
    ty = "api_key",
    key_name = "access_token",
    key_in = "query",
    rename = "access_token"
)]
#[allow(dead_code)] // declared for the spec; the middleware reads the credentials
pub(crate) struct QueryToken(poem_openapi::auth::ApiKey);

/// The credentials an operation takes, declared so that the spec (and Swagger UI's
/// Authorize button) knows them. The authentication middleware is what checks them;
/// the fallback lets this extractor accept anything, since that middleware has already
/// refused what it must (anonymous callers pass only with `--public-read`).
#[derive(SecurityScheme)]
#[allow(dead_code)]
pub(crate) enum Credentials {
    Bearer(BearerToken),
    Header(HeaderKey),
    Query(QueryToken),
    #[oai(fallback)]
    Checked,
}

#[derive(ApiResponse)]
pub enum Created<T: poem_openapi::types::ToJSON> {
    #[oai(status = 201)]
    Created(Json<T>),
}

/// Every resource, under `/api`.
pub type Api = (ZonesApi, ItemsApi, KeysApi, NotificationsApi, OpsApi);

pub fn service(state: &AppState) -> OpenApiService<Api, ()> {
    let api = (
        ZonesApi {
            state: state.clone(),
        },
        ItemsApi {
            state: state.clone(),
        },
        KeysApi {
            state: state.clone(),
        },
        NotificationsApi {
            state: state.clone(),
        },
        OpsApi {
            state: state.clone(),
        },
    );
    OpenApiService::new(api, "zonecast", env!("CARGO_PKG_VERSION"))
        .description("Real-time stock notifications: zones, items and their change log.")
        .server("/api")
}
