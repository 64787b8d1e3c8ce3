//! The REST API (poem-openapi): thin handlers that parse into domain types, call the
//! service, and shape the reply. Swagger UI at `/docs`, the spec at `/openapi.json`.

pub mod dto;
pub mod problem;

use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, OpenApiService};

use crate::domain::{ItemPatch, NewItem, request_id};
use crate::service::{ANONYMOUS, Service};
use dto::*;
use problem::ApiError;

pub struct Api {
    pub service: Service,
}

type ApiResult<T> = Result<T, ApiError>;

#[derive(ApiResponse)]
pub enum Created<T: poem_openapi::types::ToJSON> {
    #[oai(status = 201)]
    Created(Json<T>),
}

#[OpenApi]
impl Api {
    /// All zones.
    #[oai(path = "/zones", method = "get")]
    async fn zones(&self) -> ApiResult<Json<Vec<ZoneBody>>> {
        let zones = self.service.zones().await?;
        Ok(Json(zones.into_iter().map(Into::into).collect()))
    }

    /// Create a zone.
    #[oai(path = "/zones", method = "post")]
    async fn create_zone(&self, body: Json<CreateZone>) -> ApiResult<Created<ZoneBody>> {
        let zone = self.service.create_zone(&body.0.name).await?;
        Ok(Created::Created(Json(zone.into())))
    }

    /// One zone.
    #[oai(path = "/zones/:id", method = "get")]
    async fn zone(&self, id: Path<i32>) -> ApiResult<Json<ZoneBody>> {
        Ok(Json(self.service.zone(id.0).await?.into()))
    }

    /// Consistent snapshot of the zone's items with the id of the last event included.
    #[oai(path = "/zones/:id/items", method = "get")]
    async fn snapshot(&self, id: Path<i32>) -> ApiResult<Json<SnapshotBody>> {
        Ok(Json(self.service.snapshot(id.0).await?.into()))
    }

    /// Create an item in the zone (event `item_created`).
    #[oai(path = "/zones/:id/items", method = "post")]
    async fn create_item(
        &self,
        id: Path<i32>,
        body: Json<CreateItem>,
        #[oai(name = "Idempotency-Key")] key: Header<Option<String>>,
    ) -> ApiResult<Created<ItemChangeBody>> {
        let b = body.0;
        let new = NewItem::parse(&b.sku, &b.name, b.quantity, b.low_stock_threshold)
            .map_err(ApiError::from)?;
        let rid = request_id(key.0.as_deref()).map_err(ApiError::from)?;
        let change = self.service.create_item(id.0, new, rid, ANONYMOUS).await?;
        Ok(Created::Created(Json(change.into())))
    }

    /// Change quantity (absolute or delta), name or threshold (event `stock_updated` or
    /// `item_updated`; `low_stock_alert` on `alerts` when it crosses into low stock).
    #[oai(path = "/items/:id", method = "patch")]
    async fn patch_item(
        &self,
        id: Path<i32>,
        body: Json<PatchItem>,
        #[oai(name = "Idempotency-Key")] key: Header<Option<String>>,
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
        let change = self
            .service
            .update_item(id.0, patch, rid, ANONYMOUS)
            .await?;
        Ok(Json(change.into()))
    }

    /// Delete an item (event `item_deleted`); answers with its last state.
    #[oai(path = "/items/:id", method = "delete")]
    async fn delete_item(
        &self,
        id: Path<i32>,
        #[oai(name = "Idempotency-Key")] key: Header<Option<String>>,
    ) -> ApiResult<Json<ItemChangeBody>> {
        let rid = request_id(key.0.as_deref()).map_err(ApiError::from)?;
        let change = self.service.delete_item(id.0, rid, ANONYMOUS).await?;
        Ok(Json(change.into()))
    }

    /// A page of the zone's change log: events with id > `after`, at most `limit`
    /// (default 100, at most 1000).
    #[oai(path = "/zones/:id/events", method = "get")]
    async fn events(
        &self,
        id: Path<i32>,
        #[oai(default)] after: Query<u64>,
        limit: Query<Option<u64>>,
    ) -> ApiResult<Json<EventsPage>> {
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
}

pub fn service(service: Service) -> OpenApiService<Api, ()> {
    OpenApiService::new(Api { service }, "zonecast", env!("CARGO_PKG_VERSION"))
        .description("Real-time stock notifications: zones, items and their change log.")
        .server("/api")
}
