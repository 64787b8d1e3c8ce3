//! API keys, for admins within their own role and scope.

use poem::web::Data;
use poem_openapi::OpenApi;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;

use super::dto::*;
use super::{ApiResult, Created, Credentials};
use crate::domain::{Principal, ZoneScope};
use crate::http::json_body::JsonBody;
use crate::http::problem::ApiError;
use crate::state::AppState;

pub struct KeysApi {
    pub state: AppState,
}

#[OpenApi(tag = "super::Tag::Keys")]
impl KeysApi {
    /// API keys (admin): name, role, zone scope, user; never the secrets.
    #[oai(path = "/keys", method = "get")]
    async fn keys(&self, _auth: Credentials, p: Data<&Principal>) -> ApiResult<Json<Vec<KeyBody>>> {
        let keys = self.state.service.keys(p.0).await?;
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
        let role = b.role.parse().map_err(ApiError::from)?;
        let zones = match &b.zones {
            None => ZoneScope::All,
            Some(z) => ZoneScope::from_json(z).map_err(ApiError::from)?,
        };
        let (key, secret) = self
            .state
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
        let key = self.state.service.revoke_key(p.0, &name.0).await?;
        if let Err(e) = self.state.auth.refresh_revocations().await {
            tracing::warn!(error = %e, "revocation not yet applied to open connections");
        }
        Ok(Json(key.into()))
    }
}
