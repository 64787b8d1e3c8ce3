//! The server under load, as the tool talks to it: zonecast's REST API for setup and
//! changes.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// A zonecast node and the key the tool uses there.
#[derive(Clone)]
pub struct Zonecast {
    pub base: String,
    pub http: reqwest::Client,
}

impl Zonecast {
    pub fn new(base: &url::Url, key: &str) -> anyhow::Result<Zonecast> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {key}").parse().context("key")?,
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(Zonecast {
            base: base.as_str().trim_end_matches('/').to_owned(),
            http,
        })
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// A new zone with one item at quantity 0 (no low-stock alerts): `(zone, item)`.
    pub async fn zone_with_item(&self, name: &str) -> anyhow::Result<(i64, i64)> {
        let z = self.post("/api/zones", json!({ "name": name })).await?;
        let zone = z["id"].as_i64().context("zone id")?;
        let i = self
            .post(
                &format!("/api/zones/{zone}/items"),
                json!({"sku": "LOAD", "name": "load item", "quantity": 0, "low_stock_threshold": 0}),
            )
            .await?;
        Ok((zone, i["item"]["id"].as_i64().context("item id")?))
    }

    /// One change (+1): the event id it appended.
    pub async fn bump(&self, item: i64) -> anyhow::Result<u64> {
        let r = self
            .http
            .patch(format!("{}/api/items/{item}", self.base))
            .json(&json!({"delta": 1}))
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("PATCH: {status}: {text}");
        }
        let v: Value = serde_json::from_str(&text)?;
        v["event_id"].as_u64().context("event_id")
    }

    /// The zone's last seq.
    pub async fn last_seq(&self, zone: i64) -> anyhow::Result<u64> {
        let r = self
            .http
            .get(format!("{}/api/zones/{zone}/items", self.base))
            .send()
            .await?;
        let v: Value = r.json().await?;
        v["last_event_id"].as_u64().context("last_event_id")
    }
}
