//! The REST API (poem-openapi): thin handlers that parse into domain types, call the
//! service, and shape the reply. Swagger UI at `/docs`, the spec at `/openapi.json`.

pub mod access;
pub mod body;
pub mod dto;
pub mod json_body;
pub mod problem;

use std::sync::Arc;

use poem::web::Data;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, OpenApiService, SecurityScheme};

use crate::auth::{Authenticator, Principal, ZoneScope};
use crate::domain::{DomainError, ItemPatch, NewItem, request_id};
use crate::limits::Limits;
use crate::notifications::NewNotification;
use crate::service::Service;
use dto::*;
use json_body::JsonBody;
use problem::ApiError;

pub struct Api {
    pub service: Service,
    pub slots: crate::server::Slots,
    pub auth: Authenticator,
    pub limits: Arc<Limits>,
    pub heartbeat: std::time::Duration,
}

fn read_zone(p: &Principal, zone: i32) -> Result<(), ApiError> {
    p.require_zone(zone).map_err(ApiError::from)
}

type ApiResult<T> = Result<T, ApiError>;

/// `Authorization: Bearer` with an API key or a JWT.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", rename = "bearer")]
#[allow(dead_code)] // declared for the spec; the middleware reads the credentials
struct BearerToken(poem_openapi::auth::Bearer);

/// An API key in the `X-API-Key` header.
#[derive(SecurityScheme)]
#[allow(dead_code)] // declared for the spec; the middleware reads the credentials
#[oai(
    ty = "api_key",
    key_name = "X-API-Key",
    key_in = "header",
    rename = "api_key"
)]
struct HeaderKey(poem_openapi::auth::ApiKey);

/// An API key or JWT in `?access_token=` (what browsers' EventSource can send).
#[derive(SecurityScheme)]
#[oai(
    ty = "api_key",
    key_name = "access_token",
    key_in = "query",
    rename = "access_token"
)]
#[allow(dead_code)] // declared for the spec; the middleware reads the credentials
struct QueryToken(poem_openapi::auth::ApiKey);

/// The credentials an operation takes, declared so that the spec (and Swagger UI's
/// Authorize button) knows them. The authentication middleware is what checks them;
/// the fallback lets this extractor accept anything, since that middleware has already
/// refused what it must (anonymous callers pass only with `--public-read`).
#[derive(SecurityScheme)]
#[allow(dead_code)]
enum Credentials {
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

#[OpenApi]
impl Api {
    /// The caller: principal name, role, zone scope and user.
    #[oai(path = "/me", method = "get")]
    async fn me(&self, _auth: Credentials, p: Data<&Principal>) -> Json<MeBody> {
        Json(MeBody {
            name: p.name.clone(),
            role: p.role.to_string(),
            zones: p.zones.to_json(),
            user: p.user.clone(),
        })
    }

    /// All zones.
    #[oai(path = "/zones", method = "get")]
    async fn zones(
        &self,
        _auth: Credentials,
        p: Data<&Principal>,
    ) -> ApiResult<Json<Vec<ZoneBody>>> {
        let zones = self.service.zones(p.0).await?;
        Ok(Json(zones.into_iter().map(Into::into).collect()))
    }

    /// Create a zone.
    #[oai(path = "/zones", method = "post")]
    async fn create_zone(
        &self,
        _auth: Credentials,
        body: JsonBody<CreateZone>,
        p: Data<&Principal>,
    ) -> ApiResult<Created<ZoneBody>> {
        let zone = self.service.create_zone(p.0, &body.0.name).await?;
        Ok(Created::Created(Json(zone.into())))
    }

    /// One zone.
    #[oai(path = "/zones/:id", method = "get")]
    async fn zone(
        &self,
        _auth: Credentials,
        id: Path<i32>,
        p: Data<&Principal>,
    ) -> ApiResult<Json<ZoneBody>> {
        read_zone(p.0, id.0)?;
        Ok(Json(self.service.zone(id.0).await?.into()))
    }

    /// Consistent snapshot of the zone's items with the id of the last event included.
    #[oai(path = "/zones/:id/items", method = "get")]
    async fn snapshot(
        &self,
        _auth: Credentials,
        id: Path<i32>,
        p: Data<&Principal>,
    ) -> ApiResult<Json<SnapshotBody>> {
        read_zone(p.0, id.0)?;
        Ok(Json(self.service.snapshot(id.0).await?.into()))
    }

    /// Create an item in the zone (event `item_created`).
    #[oai(path = "/zones/:id/items", method = "post")]
    async fn create_item(
        &self,
        _auth: Credentials,
        id: Path<i32>,
        body: JsonBody<CreateItem>,
        #[oai(name = "Idempotency-Key")] key: Header<Option<String>>,
        p: Data<&Principal>,
    ) -> ApiResult<Created<ItemChangeBody>> {
        p.require_write(id.0).map_err(ApiError::from)?;
        let b = body.0;
        let new = NewItem::parse(&b.sku, &b.name, b.quantity, b.low_stock_threshold)
            .map_err(ApiError::from)?;
        let rid = request_id(key.0.as_deref()).map_err(ApiError::from)?;
        let change = self.service.create_item(id.0, new, rid, p.0).await?;
        Ok(Created::Created(Json(change.into())))
    }

    /// Change quantity (absolute or delta), name or threshold (event `stock_updated` or
    /// `item_updated`; `low_stock_alert` on `alerts` when it crosses into low stock).
    #[oai(path = "/items/:id", method = "patch")]
    async fn patch_item(
        &self,
        _auth: Credentials,
        id: Path<i32>,
        body: JsonBody<PatchItem>,
        #[oai(name = "Idempotency-Key")] key: Header<Option<String>>,
        p: Data<&Principal>,
    ) -> ApiResult<Json<ItemChangeBody>> {
        let b = body.0;
        let patch = ItemPatch::parse(
            b.quantity,
            b.delta,
            b.name.as_deref(),
            b.low_stock_threshold,
            b.expected_version,
            b.reason.as_deref(),
        )
        .map_err(ApiError::from)?;
        let rid = request_id(key.0.as_deref()).map_err(ApiError::from)?;
        let change = self.service.update_item(id.0, patch, rid, p.0).await?;
        Ok(Json(change.into()))
    }

    /// Delete an item (event `item_deleted`); answers with its last state.
    #[oai(path = "/items/:id", method = "delete")]
    async fn delete_item(
        &self,
        _auth: Credentials,
        id: Path<i32>,
        #[oai(name = "Idempotency-Key")] key: Header<Option<String>>,
        p: Data<&Principal>,
    ) -> ApiResult<Json<ItemChangeBody>> {
        let rid = request_id(key.0.as_deref()).map_err(ApiError::from)?;
        let change = self.service.delete_item(id.0, rid, p.0).await?;
        Ok(Json(change.into()))
    }

    /// A page of the zone's change log: events with id > `after`, at most `limit`
    /// (default 100, at most 1000).
    #[oai(path = "/zones/:id/events", method = "get")]
    async fn events(
        &self,
        _auth: Credentials,
        id: Path<i32>,
        #[oai(default)] after: Query<u64>,
        limit: Query<Option<u64>>,
        p: Data<&Principal>,
    ) -> ApiResult<Json<EventsPage>> {
        read_zone(p.0, id.0)?;
        let limit = limit.0.unwrap_or(100).clamp(1, 1000);
        let events = self.service.events(id.0, after.0, limit).await?;
        let next_after = events.last().map_or(after.0, |e| e.seq);
        let events = events
            .iter()
            .filter_map(|e| serde_json::from_slice(&e.json).ok())
            .collect();
        Ok(Json(EventsPage {
            zone_id: id.0,
            events,
            next_after,
        }))
    }

    /// API keys (admin): name, role, zone scope, user; never the secrets.
    #[oai(path = "/keys", method = "get")]
    async fn keys(&self, _auth: Credentials, p: Data<&Principal>) -> ApiResult<Json<Vec<KeyBody>>> {
        let keys = self.service.keys(p.0).await?;
        Ok(Json(keys.into_iter().map(Into::into).collect()))
    }

    /// Create an API key (admin). The `key` in the reply is shown only this once.
    #[oai(path = "/keys", method = "post")]
    async fn create_key(
        &self,
        _auth: Credentials,
        body: JsonBody<CreateKey>,
        p: Data<&Principal>,
    ) -> ApiResult<Created<NewKeyBody>> {
        let b = body.0;
        let role = b
            .role
            .parse()
            .map_err(|e: String| ApiError::from(DomainError::Invalid(e)))?;
        let zones = match &b.zones {
            None => ZoneScope::All,
            Some(z) => ZoneScope::from_json(z).map_err(ApiError::from)?,
        };
        let (key, secret) = self
            .service
            .create_key(p.0, &b.name, role, zones, b.user.as_deref())
            .await?;
        Ok(Created::Created(Json(NewKeyBody {
            key: secret,
            info: key.into(),
        })))
    }

    /// Revoke an API key (admin): refused at once, its open connections closed.
    #[oai(path = "/keys/:name", method = "delete")]
    async fn revoke_key(
        &self,
        _auth: Credentials,
        name: Path<String>,
        p: Data<&Principal>,
    ) -> ApiResult<Json<KeyBody>> {
        let key = self.service.revoke_key(p.0, &name.0).await?;
        if let Err(e) = self.auth.refresh_revocations().await {
            tracing::warn!(error = %e, "revocation not yet applied to open connections");
        }
        Ok(Json(key.into()))
    }

    /// The caller's notifications, newest first (`unread=true` for unread only;
    /// page with `before` = the smallest id seen).
    #[oai(path = "/notifications", method = "get")]
    async fn notifications(
        &self,
        _auth: Credentials,
        #[oai(default)] unread: Query<bool>,
        before: Query<Option<i32>>,
        limit: Query<Option<u64>>,
        p: Data<&Principal>,
    ) -> ApiResult<Json<Vec<NotificationBody>>> {
        let limit = limit.0.unwrap_or(50).clamp(1, 500);
        let list = self
            .service
            .notifications(p.0, unread.0, before.0, limit)
            .await?;
        Ok(Json(list.into_iter().map(Into::into).collect()))
    }

    /// Create a notification for a user (writers and admins): `notification` and
    /// `unread_count` on that user's stream.
    #[oai(path = "/notifications", method = "post")]
    async fn create_notification(
        &self,
        _auth: Credentials,
        body: JsonBody<CreateNotification>,
        #[oai(name = "Idempotency-Key")] key: Header<Option<String>>,
        p: Data<&Principal>,
    ) -> ApiResult<Created<NotificationBody>> {
        let b = body.0;
        let new = NewNotification::parse(
            b.kind.as_deref(),
            b.priority.as_deref(),
            &b.subject,
            &b.message,
            b.data,
        )
        .map_err(ApiError::from)?;
        let rid = request_id(key.0.as_deref()).map_err(ApiError::from)?;
        let n = self.service.notify(p.0, &b.user_id, new, rid).await?;
        Ok(Created::Created(Json(n.into())))
    }

    /// Mark one of the caller's notifications read.
    #[oai(path = "/notifications/:id/read", method = "post")]
    async fn read_one(
        &self,
        _auth: Credentials,
        id: Path<i32>,
        p: Data<&Principal>,
    ) -> ApiResult<Json<ReadBody>> {
        let r = self.service.mark_read(p.0, Some(id.0)).await?;
        Ok(Json(ReadBody {
            ids: r.ids,
            unread_count: r.unread,
        }))
    }

    /// Mark all the caller's notifications read.
    #[oai(path = "/notifications/read-all", method = "post")]
    async fn read_all(&self, _auth: Credentials, p: Data<&Principal>) -> ApiResult<Json<ReadBody>> {
        let r = self.service.mark_read(p.0, None).await?;
        Ok(Json(ReadBody {
            ids: r.ids,
            unread_count: r.unread,
        }))
    }

    #[oai(path = "/notifications/unread-count", method = "get")]
    async fn unread_count(
        &self,
        _auth: Credentials,
        p: Data<&Principal>,
    ) -> ApiResult<Json<UnreadCount>> {
        Ok(Json(UnreadCount {
            count: self.service.unread_count(p.0).await?,
        }))
    }

    /// The caller's user gets a `stock_alert` notification when an item of the zone
    /// crosses into low stock.
    #[oai(path = "/zones/:id/watch", method = "post")]
    async fn watch(
        &self,
        _auth: Credentials,
        id: Path<i32>,
        p: Data<&Principal>,
    ) -> ApiResult<Json<ZoneBody>> {
        self.service.watch(p.0, id.0, true).await?;
        Ok(Json(self.service.zone(id.0).await?.into()))
    }

    #[oai(path = "/zones/:id/watch", method = "delete")]
    async fn unwatch(
        &self,
        _auth: Credentials,
        id: Path<i32>,
        p: Data<&Principal>,
    ) -> ApiResult<Json<ZoneBody>> {
        self.service.watch(p.0, id.0, false).await?;
        Ok(Json(self.service.zone(id.0).await?.into()))
    }

    /// Connections by stream and transport, unique users, and delivery totals (admins).
    #[oai(path = "/stats", method = "get")]
    async fn stats(&self, _auth: Credentials, p: Data<&Principal>) -> ApiResult<Json<StatsBody>> {
        let s = self.service.stats(p.0)?;
        let n = |v: usize| v as u64;
        Ok(Json(StatsBody {
            open_sockets: n(self.slots.open()),
            total_connections: n(s.total_connections),
            connections_by_stream: s
                .connections_by_stream
                .into_iter()
                .map(|(k, v)| (k, n(v)))
                .collect(),
            connections_by_transport: s
                .connections_by_transport
                .into_iter()
                .map(|(k, v)| (k, n(v)))
                .collect(),
            unique_users: n(s.unique_users),
            heartbeat_interval: u64::try_from(self.heartbeat.as_millis()).unwrap_or(u64::MAX),
            metrics: StatsMetrics {
                total_messages_sent: s.total_messages_sent,
                total_broadcasts: s.total_broadcasts,
                total_send_errors: s.total_send_errors,
                last_broadcast_at: s.last_broadcast_at.as_ref().map(crate::domain::format_time),
            },
        }))
    }

    /// An announcement on the alerts stream (admins).
    #[oai(path = "/announcements", method = "post")]
    async fn announce(
        &self,
        _auth: Credentials,
        body: JsonBody<CreateAnnouncement>,
        #[oai(name = "Idempotency-Key")] key: Header<Option<String>>,
        p: Data<&Principal>,
    ) -> ApiResult<Created<EventId>> {
        let b = body.0;
        let rid = request_id(key.0.as_deref()).map_err(ApiError::from)?;
        let event_id = self
            .service
            .announce(p.0, &b.subject, &b.message, b.priority.as_deref(), rid)
            .await?;
        Ok(Created::Created(Json(EventId { event_id })))
    }
}

pub fn service(
    service: Service,
    slots: crate::server::Slots,
    auth: Authenticator,
    limits: Arc<Limits>,
    heartbeat: std::time::Duration,
) -> OpenApiService<Api, ()> {
    let api = Api {
        service,
        slots,
        auth,
        limits,
        heartbeat,
    };
    OpenApiService::new(api, "zonecast", env!("CARGO_PKG_VERSION"))
        .description("Real-time stock notifications: zones, items and their change log.")
        .server("/api")
}
