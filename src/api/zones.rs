//! Zones: listing, creating, one zone, its consistent snapshot, and pages of its
//! change log.

use poem::web::Data;
use poem_openapi::OpenApi;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;

use super::dto::*;
use super::{ApiResult, Created, Credentials};
use crate::domain::Principal;
use crate::http::json_body::JsonBody;
use crate::state::AppState;

pub struct ZonesApi {
    pub state: AppState,
}

#[OpenApi(tag = "super::Tag::Zones")]
impl ZonesApi {
    /// All zones.
    #[oai(path = "/zones", method = "get")]
    async fn zones(
        &self,
        _auth: Credentials,
        p: Data<&Principal>,
    ) -> ApiResult<Json<Vec<ZoneBody>>> {
        let zones = self.state.service.zones(p.0).await?;
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
        let zone = self.state.service.create_zone(p.0, &body.0.name).await?;
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
        Ok(Json(self.state.service.zone(p.0, id.0).await?.into()))
    }

    /// Consistent snapshot of the zone's items with the id of the last event included.
    #[oai(path = "/zones/:id/items", method = "get")]
    async fn snapshot(
        &self,
        _auth: Credentials,
        id: Path<i32>,
        p: Data<&Principal>,
    ) -> ApiResult<Json<SnapshotBody>> {
        Ok(Json(self.state.service.snapshot(p.0, id.0).await?.into()))
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
        let limit = limit.0.unwrap_or(100).clamp(1, 1000);
        let events = self.state.service.events(p.0, id.0, after.0, limit).await?;
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
