//! `prism kv` and `prism pubsub`: the data gateway's HTTP/JSON API on a
//! proxy, for the quickstart and for scripts. Answers become short text;
//! errors carry the proxy's message and status.

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde_json::Value;

/// A client of a proxy's data APIs at `base` (e.g. `http://127.0.0.1:8080`).
#[derive(Clone, Debug)]
pub struct DataClient {
    base: String,
    http: reqwest::Client,
}

/// One item of a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanItem {
    pub key: String,
    pub value: Vec<u8>,
    pub version: u64,
}

impl DataClient {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
        }
    }

    fn key_url(&self, namespace: &str, key: &str) -> String {
        format!("{}/v1/kv/{}/{}", self.base, encode(namespace), encode(key))
    }

    /// The value at `key`.
    pub async fn get(&self, namespace: &str, key: &str) -> anyhow::Result<Bytes> {
        let response = self
            .send(self.http.get(self.key_url(namespace, key)))
            .await?;
        Ok(response.bytes().await?)
    }

    /// Writes `value`; its new version.
    pub async fn put(
        &self,
        namespace: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<&str>,
        if_version: Option<u64>,
    ) -> anyhow::Result<u64> {
        let mut query = Vec::new();
        if let Some(ttl) = ttl {
            query.push(("ttl", ttl.to_string()));
        }
        if let Some(version) = if_version {
            query.push(("if_version", version.to_string()));
        }
        let request = self
            .http
            .put(self.key_url(namespace, key))
            .query(&query)
            .body(value);
        let answer: Value = self.send(request).await?.json().await?;
        version_of(&answer["version"])
    }

    /// Deletes `key`; whether there was one.
    pub async fn delete(
        &self,
        namespace: &str,
        key: &str,
        if_version: Option<u64>,
    ) -> anyhow::Result<bool> {
        let query: Vec<(&str, String)> = if_version
            .map(|v| ("if_version", v.to_string()))
            .into_iter()
            .collect();
        let request = self.http.delete(self.key_url(namespace, key)).query(&query);
        let answer: Value = self.send(request).await?.json().await?;
        Ok(answer["deleted"].as_bool().unwrap_or(false))
    }

    /// Every item under `prefix` (at most `limit`), page after page.
    pub async fn scan(
        &self,
        namespace: &str,
        prefix: &str,
        limit: usize,
    ) -> anyhow::Result<Vec<ScanItem>> {
        let url = format!("{}/v1/kv/{}", self.base, encode(namespace));
        let mut items = Vec::new();
        let mut token = String::new();
        loop {
            let query = [("prefix", prefix), ("page_token", token.as_str())];
            let answer: Value = self
                .send(self.http.get(&url).query(&query))
                .await?
                .json()
                .await?;
            for item in answer["items"].as_array().into_iter().flatten() {
                if items.len() == limit {
                    return Ok(items);
                }
                items.push(ScanItem {
                    key: item["key"].as_str().unwrap_or_default().to_string(),
                    value: STANDARD
                        .decode(item["value"].as_str().unwrap_or_default())
                        .context("the proxy sent a value that is not base64")?,
                    version: version_of(&item["version"])?,
                });
            }
            token = answer["next_page_token"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if token.is_empty() {
                return Ok(items);
            }
        }
    }

    /// Publishes `payload` to `topic`; the message's id.
    pub async fn publish(
        &self,
        namespace: &str,
        topic: &str,
        payload: Vec<u8>,
    ) -> anyhow::Result<String> {
        let url = format!(
            "{}/v1/pubsub/{}/{}",
            self.base,
            encode(namespace),
            encode(topic)
        );
        let answer: Value = self
            .send(self.http.post(url).body(payload))
            .await?
            .json()
            .await?;
        Ok(answer["id"].as_str().unwrap_or_default().to_string())
    }

    /// Subscribes to `topic` (in `group`, when given) and hands each
    /// message to `each` until the stream ends; in a group, each message
    /// is acknowledged once `each` returned.
    pub async fn subscribe(
        &self,
        namespace: &str,
        topic: &str,
        group: Option<&str>,
        mut each: impl FnMut(&Value),
    ) -> anyhow::Result<()> {
        let url = format!(
            "{}/v1/pubsub/{}/{}",
            self.base,
            encode(namespace),
            encode(topic)
        );
        let query: Vec<(&str, &str)> = group.map(|g| ("group", g)).into_iter().collect();
        let mut response = self.send(self.http.get(url).query(&query)).await?;
        let mut buffer = String::new();
        let mut subscription = String::new();
        while let Some(chunk) = response.chunk().await? {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            // One event per blank-line-terminated block.
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                let field = |name: &str| {
                    event
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .unwrap_or_default()
                        .to_string()
                };
                match field("event: ").as_str() {
                    "subscription" => subscription = field("data: "),
                    "message" => {
                        let data: Value = serde_json::from_str(&field("data: "))
                            .context("the proxy sent an event that is not JSON")?;
                        each(&data);
                        if group.is_some() {
                            self.ack(namespace, &subscription, &data["id"]).await?;
                        }
                    }
                    "error" => bail!("the subscription failed: {}", field("data: ")),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    async fn ack(&self, namespace: &str, subscription: &str, id: &Value) -> anyhow::Result<()> {
        let url = format!("{}/v1/pubsub/{}:ack", self.base, encode(namespace));
        let body = serde_json::json!({ "subscription": subscription, "ids": [id] });
        self.send(self.http.post(url).json(&body)).await?;
        Ok(())
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the proxy at {}", self.base))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or("the proxy refused the request");
        bail!("{message} (HTTP {})", status.as_u16())
    }
}

/// A value as a terminal shows it: the text itself, or base64 when it is not
/// text.
pub fn printable(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) => text.to_string(),
        Err(_) => format!("base64:{}", STANDARD.encode(value)),
    }
}

/// A 64-bit integer as proto3 JSON writes it: a string.
fn version_of(value: &Value) -> anyhow::Result<u64> {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| value.as_u64())
        .context("the proxy sent no version")
}

/// Percent-encodes one path segment.
fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}
