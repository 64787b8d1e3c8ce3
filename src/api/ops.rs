//! Who the caller is, and this node's connections and totals.

use poem::web::Data;
use poem_openapi::OpenApi;
use poem_openapi::payload::Json;

use super::dto::*;
use super::{ApiResult, Credentials};
use crate::domain::Principal;
use crate::state::AppState;

pub struct OpsApi {
    pub state: AppState,
}

#[OpenApi(tag = "super::Tag::Ops")]
impl OpsApi {
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

    /// Connections by stream and transport, unique users, and delivery totals (admins).
    #[oai(path = "/stats", method = "get")]
    async fn stats(&self, _auth: Credentials, p: Data<&Principal>) -> ApiResult<Json<StatsBody>> {
        let s = self.state.service.stats(p.0)?;
        let n = |v: usize| v as u64;
        let state = &self.state;
        Ok(Json(StatsBody {
            node_id: state.node.to_string(),
            scope: "node".into(),
            broker: state.config.broker_kind().as_str().into(),
            bus: state.service.broker().health().as_str().into(),
            open_sockets: n(self.state.slots.open()),
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
            heartbeat_interval: u64::try_from(self.state.config.heartbeat.as_millis())
                .unwrap_or(u64::MAX),
            metrics: StatsMetrics {
                total_messages_sent: s.total_messages_sent,
                total_broadcasts: s.total_broadcasts,
                total_send_errors: s.total_send_errors,
                last_broadcast_at: s.last_broadcast_at.as_ref().map(crate::domain::format_time),
            },
            fanout: StatsFanout {
                groups: s.fanout_groups,
                members: s.fanout_members,
                handed_back: s.fanout_handed_back,
            },
        }))
    }
}
