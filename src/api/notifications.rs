//! Per-user notifications, watches on zones, and announcements.

use poem::web::Data;
use poem_openapi::OpenApi;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;

use super::dto::*;
use super::{ApiResult, Created, Credentials};
use crate::domain::{NewNotification, Principal, request_id};
use crate::http::json_body::JsonBody;
use crate::http::problem::ApiError;
use crate::state::AppState;

pub struct NotificationsApi {
    pub state: AppState,
}

#[OpenApi(tag = "super::Tag::Notifications")]
impl NotificationsApi {
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
            .state
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
        let n = self.state.service.notify(p.0, &b.user_id, new, rid).await?;
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
        let r = self.state.service.mark_read(p.0, Some(id.0)).await?;
        Ok(Json(ReadBody {
            ids: r.ids,
            unread_count: r.unread,
        }))
    }

    /// Mark all the caller's notifications read.
    #[oai(path = "/notifications/read-all", method = "post")]
    async fn read_all(&self, _auth: Credentials, p: Data<&Principal>) -> ApiResult<Json<ReadBody>> {
        let r = self.state.service.mark_read(p.0, None).await?;
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
            count: self.state.service.unread_count(p.0).await?,
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
        self.state.service.watch(p.0, id.0, true).await?;
        Ok(Json(self.state.service.zone(p.0, id.0).await?.into()))
    }

    #[oai(path = "/zones/:id/watch", method = "delete")]
    async fn unwatch(
        &self,
        _auth: Credentials,
        id: Path<i32>,
        p: Data<&Principal>,
    ) -> ApiResult<Json<ZoneBody>> {
        self.state.service.watch(p.0, id.0, false).await?;
        Ok(Json(self.state.service.zone(p.0, id.0).await?.into()))
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
            .state
            .service
            .announce(p.0, &b.subject, &b.message, b.priority.as_deref(), rid)
            .await?;
        Ok(Created::Created(Json(EventId { event_id })))
    }
}
