//! Items: creating, changing (quantity, name, threshold) and deleting, each with an
//! optional `Idempotency-Key`.

use poem::web::Data;
use poem_openapi::OpenApi;
use poem_openapi::param::{Header, Path};
use poem_openapi::payload::Json;

use super::dto::*;
use super::{ApiResult, Created, Credentials};
use crate::domain::{ItemPatch, NewItem, Principal, request_id};
use crate::http::json_body::JsonBody;
use crate::http::problem::ApiError;
use crate::state::AppState;

pub struct ItemsApi {
    pub state: AppState,
}

#[OpenApi(tag = "super::Tag::Items")]
impl ItemsApi {
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
        let b = body.0;
        let new = NewItem::parse(&b.sku, &b.name, b.quantity, b.low_stock_threshold)
            .map_err(ApiError::from)?;
        let rid = request_id(key.0.as_deref()).map_err(ApiError::from)?;
        let change = self.state.service.create_item(id.0, new, rid, p.0).await?;
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
        let change = self
            .state
            .service
            .update_item(id.0, patch, rid, p.0)
            .await?;
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
        let change = self.state.service.delete_item(id.0, rid, p.0).await?;
        Ok(Json(change.into()))
    }
}
