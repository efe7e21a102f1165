//! The operator commands' side of the admin API: `apply`, `get`, `delete`,
//! `history`, `diff`, `rollback`, `status`. Turns answers into short text, and API errors into messages that
//! name the field.

use std::str::FromStr;

use anyhow::{Context, bail};
use prism_proto::{Kind, Resource, policy_to_yaml};
use serde_json::Value;

/// Output format of `prism get`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Yaml,
    Json,
}

/// A client of the admin API at `base` (e.g. `http://127.0.0.1:9000`).
#[derive(Clone, Debug)]
pub struct AdminClient {
    base: String,
    http: reqwest::Client,
    /// Whether it sends a bearer token.
    has_token: bool,
}

impl AdminClient {
    /// A client that sends `token` with every request, if there is one,
    /// and trusts the CA certificates of `ca` (PEM) for an `https://` admin
    /// API, besides the web PKI roots.
    pub fn new(base: &str, token: Option<String>, ca: Option<&[u8]>) -> anyhow::Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        let bearer = token
            .filter(|t| !t.is_empty())
            .and_then(|t| reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).ok());
        let has_token = bearer.is_some();
        if let Some(mut value) = bearer {
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder().default_headers(headers);
        if let Some(pem) = ca {
            for cert in reqwest::Certificate::from_pem_bundle(pem).context("--admin-ca")? {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http: builder
                .build()
                .context("cannot build the admin API client")?,
            has_token,
        })
    }

    /// `POST /v1/apply` with `document`. A real apply is sent with
    /// `If-Match` on a revision: `if_match` if given, else the one a dry run
    /// just computed the changes against, so that the changes printed are
    /// the ones made. When the policy moved on in between, nothing is
    /// applied and the error says what changed underneath.
    pub async fn apply(
        &self,
        document: String,
        dry_run: bool,
        if_match: Option<u64>,
    ) -> anyhow::Result<String> {
        let post = |dry_run: bool, based_on: Option<u64>| {
            let mut request = self
                .http
                .post(format!("{}/v1/apply?dry_run={dry_run}", self.base))
                .header("content-type", "application/yaml")
                .body(document.clone());
            if let Some(revision) = based_on {
                request = request.header("if-match", format!("\"r{revision}\""));
            }
            request
        };
        let based_on = match (dry_run, if_match) {
            (false, None) => {
                let preview = self.send(post(true, None)).await?;
                preview["revision"].as_u64()
            }
            _ => if_match,
        };
        let answer = match self.send(post(dry_run, based_on)).await {
            Err(error) if based_on.is_some() && error.to_string().contains("(HTTP 412)") => {
                let based_on = based_on.unwrap_or_default();
                bail!(
                    "{error}\nnothing was applied; changed since revision {based_on}:\n{}",
                    self.changes_since(based_on).await?
                )
            }
            answer => answer?,
        };
        let revision = answer["revision"].as_u64().unwrap_or_default();
        let changes = answer["changes"].as_array().cloned().unwrap_or_default();
        let mut out = String::new();
        if changes.is_empty() {
            out.push_str(&format!("unchanged (revision {revision})\n"));
        } else {
            let verb = if dry_run { "would apply" } else { "applied" };
            out.push_str(&format!("{verb} at revision {revision}:\n"));
            out.push_str(&change_lines(&changes));
            // A dry run's changes carry their diffs.
            out.push_str(&diffs(&changes));
        }
        Ok(out)
    }

    /// `GET /v1/diff`: the unified diffs of what changed from revision
    /// `from` to `to` (the current one by default).
    pub async fn diff(&self, from: u64, to: Option<u64>) -> anyhow::Result<String> {
        let mut query = vec![("from", from.to_string())];
        query.extend(to.map(|to| ("to", to.to_string())));
        let request = self
            .http
            .get(format!("{}/v1/diff", self.base))
            .query(&query);
        let answer = self.send(request).await?;
        let changes = answer["changes"].as_array().cloned().unwrap_or_default();
        if changes.is_empty() {
            return Ok(format!(
                "no changes from revision {} to revision {}\n",
                answer["from"], answer["to"]
            ));
        }
        Ok(diffs(&changes))
    }

    /// `POST /v1/rollback`: one new revision whose policy equals
    /// `revision`'s (or with `dry_run`, what it would change), sent with
    /// `If-Match` on `if_match` if given.
    pub async fn rollback(
        &self,
        revision: u64,
        dry_run: bool,
        if_match: Option<u64>,
    ) -> anyhow::Result<String> {
        let mut request = self
            .http
            .post(format!("{}/v1/rollback", self.base))
            .query(&[
                ("to", revision.to_string()),
                ("dry_run", dry_run.to_string()),
            ]);
        if let Some(based_on) = if_match {
            request = request.header("if-match", format!("\"r{based_on}\""));
        }
        let answer = self.send(request).await?;
        let at = answer["revision"].as_u64().unwrap_or_default();
        let changes = answer["changes"].as_array().cloned().unwrap_or_default();
        if changes.is_empty() {
            return Ok(format!(
                "unchanged: the policy is revision {revision}'s already (revision {at})\n"
            ));
        }
        let verb = if dry_run {
            "would roll back"
        } else {
            "rolled back"
        };
        Ok(format!(
            "{verb} to revision {revision} at revision {at}:\n{}{}",
            change_lines(&changes),
            diffs(&changes)
        ))
    }

    /// `GET /v1/history`: the newest `limit` revisions, optionally only
    /// those that touched `namespace` or were made by `author`, newest first.
    pub async fn history(
        &self,
        limit: usize,
        namespace: Option<&str>,
        author: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut query = vec![("limit", limit.to_string())];
        query.extend(namespace.map(|ns| ("namespace", ns.to_string())));
        query.extend(author.map(|a| ("author", a.to_string())));
        let request = self
            .http
            .get(format!("{}/v1/history", self.base))
            .query(&query);
        let answer = self.send(request).await?;
        let items = answer["items"].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            return Ok("no revisions\n".to_string());
        }
        Ok(items.iter().map(revision_lines).collect())
    }

    /// The change log after `revision`, oldest first, one line per change.
    async fn changes_since(&self, revision: u64) -> anyhow::Result<String> {
        let url = format!("{}/v1/history?limit=1000", self.base);
        let answer = self.send(self.http.get(url)).await?;
        let mut items: Vec<Value> = answer["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|item| revision_of(item).is_some_and(|r| r > revision))
            .collect();
        items.reverse();
        Ok(items.iter().map(revision_lines).collect())
    }

    /// `GET /v1/{kind}` or `GET /v1/{kind}/{name}`, rendered as a policy
    /// document. Secrets come as the admin API shows them, redacted (name,
    /// kind, expiry, names): a view to read, not a document to apply again.
    pub async fn get(
        &self,
        kind: &str,
        name: Option<&str>,
        output: Output,
    ) -> anyhow::Result<String> {
        let kind = Kind::from_str(kind)?;
        let url = match name {
            Some(name) => format!("{}/v1/{}/{name}", self.base, kind.plural()),
            None => format!("{}/v1/{}", self.base, kind.plural()),
        };
        let answer = self.send(self.http.get(url)).await?;
        let items = match name {
            Some(_) => vec![answer],
            None => answer["items"].as_array().cloned().unwrap_or_default(),
        };
        match output {
            Output::Json => Ok(format!(
                "{}\n",
                serde_json::to_string_pretty(&Value::Array(items))?
            )),
            Output::Yaml if kind == Kind::Secret => Ok(serde_yaml::to_string(
                &serde_json::json!({ kind.plural(): items }),
            )?),
            Output::Yaml => {
                let resources = items
                    .into_iter()
                    .map(|item| Resource::from_json(kind, item))
                    .collect::<Result<Vec<_>, _>>()
                    .context("the admin API answered with a resource this CLI cannot read")?;
                Ok(policy_to_yaml(&resources))
            }
        }
    }

    /// `DELETE /v1/{kind}/{name}`.
    pub async fn delete(&self, kind: &str, name: &str) -> anyhow::Result<String> {
        let kind = Kind::from_str(kind)?;
        let url = format!("{}/v1/{}/{name}", self.base, kind.plural());
        let answer = self.send(self.http.delete(url)).await?;
        Ok(format!(
            "deleted {kind} {name} (revision {})\n",
            answer["revision"]
        ))
    }

    /// `GET /v1/proxies`, as a table.
    pub async fn status(&self) -> anyhow::Result<String> {
        let answer = self
            .send(self.http.get(format!("{}/v1/proxies", self.base)))
            .await?;
        let mut out = format!("revision {}\n", answer["revision"]);
        out.push_str(&format!(
            "{:<24} {:<12} {:<10} {:<8} {:<5} LAST NACK\n",
            "PROXY", "ZONE", "CONNECTED", "ACKED", "LAG"
        ));
        for proxy in answer["proxies"].as_array().cloned().unwrap_or_default() {
            let show = |v: &Value| match v {
                Value::Null => "-".to_string(),
                Value::String(s) if s.is_empty() => "-".to_string(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!(
                "{:<24} {:<12} {:<10} {:<8} {:<5} {}\n",
                show(&proxy["id"]),
                show(&proxy["zone"]),
                show(&proxy["connected"]),
                show(&proxy["acked_revision"]),
                show(&proxy["lag"]),
                show(&proxy["last_nack"]["message"]),
            ));
        }
        Ok(out)
    }

    /// `GET /v1/traffic`.
    pub async fn traffic(&self) -> anyhow::Result<Value> {
        self.send(self.http.get(format!("{}/v1/traffic", self.base)))
            .await
    }

    /// `GET /v1/traffic/stream`: calls `each` with every event's summary
    /// until the control plane ends the stream.
    pub async fn traffic_stream(&self, mut each: impl FnMut(&Value)) -> anyhow::Result<()> {
        let url = format!("{}/v1/traffic/stream", self.base);
        let mut response = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        if !response.status().is_success() {
            // The error's body, read as every other answer's.
            return self.send(self.http.get(url)).await.map(drop);
        }
        let mut events = SseReader::default();
        while let Some(chunk) = response
            .chunk()
            .await
            .context("the traffic stream broke off")?
        {
            for data in events.push(&chunk) {
                let summary: Value =
                    serde_json::from_str(&data).context("a traffic event that is not JSON")?;
                each(&summary);
            }
        }
        Ok(())
    }

    /// `POST /v1/tokens`: the new token, printed once.
    pub async fn create_token(
        &self,
        subject: &str,
        role: &str,
        namespaces: &[String],
    ) -> anyhow::Result<String> {
        let body =
            serde_json::json!({ "subject": subject, "role": role, "namespaces": namespaces });
        let request = self
            .http
            .post(format!("{}/v1/tokens", self.base))
            .json(&body);
        let answer = self.send(request).await?;
        Ok(format!(
            "{}\n(token {} for {}, role {}; shown only this once)\n",
            answer["token"].as_str().unwrap_or_default(),
            answer["id"].as_str().unwrap_or_default(),
            answer["subject"].as_str().unwrap_or_default(),
            answer["role"].as_str().unwrap_or_default(),
        ))
    }

    /// `GET /v1/tokens`, as a table.
    pub async fn tokens(&self) -> anyhow::Result<String> {
        let answer = self
            .send(self.http.get(format!("{}/v1/tokens", self.base)))
            .await?;
        let mut out = format!(
            "{:<17} {:<20} {:<7} {:<20} {:<21} CREATED BY\n",
            "ID", "SUBJECT", "ROLE", "NAMESPACES", "CREATED"
        );
        for token in answer["items"].as_array().cloned().unwrap_or_default() {
            let text = |k: &str| token[k].as_str().unwrap_or("-").to_string();
            let namespaces: Vec<&str> = token["namespaces"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let namespaces = if namespaces.is_empty() {
                "*".to_string()
            } else {
                namespaces.join(",")
            };
            out.push_str(&format!(
                "{:<17} {:<20} {:<7} {:<20} {:<21} {}\n",
                text("id"),
                text("subject"),
                text("role"),
                namespaces,
                text("created_at"),
                text("created_by"),
            ));
        }
        Ok(out)
    }

    /// `DELETE /v1/tokens/{id}`.
    pub async fn revoke_token(&self, id: &str) -> anyhow::Result<String> {
        let url = format!("{}/v1/tokens/{id}", self.base);
        self.send(self.http.delete(url)).await?;
        Ok(format!("revoked token {id}\n"))
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let error = &body["error"];
        let mut message = error["message"]
            .as_str()
            .unwrap_or("the admin API refused the request")
            .to_string();
        if let Some(field) = error["field"].as_str().filter(|f| !f.is_empty()) {
            message = format!("{field}: {message}");
        }
        if let Some(resource) = error["resource"].as_str().filter(|r| !r.is_empty()) {
            message = format!("{resource}: {message}");
        }
        if status == reqwest::StatusCode::UNAUTHORIZED && !self.has_token {
            message.push_str(
                "; pass --token or set PRISM_TOKEN, or point --token-file at the \
                 admin-token file in the control plane's data directory",
            );
        }
        bail!("{message} (HTTP {})", status.as_u16())
    }
}

/// Server-Sent Events read from chunks: the `data` of each complete event
/// (comments and keep-alives skipped).
#[derive(Debug, Default)]
struct SseReader {
    pending: String,
}

impl SseReader {
    fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.pending
            .push_str(&String::from_utf8_lossy(chunk).replace("\r\n", "\n"));
        let mut events = Vec::new();
        while let Some(end) = self.pending.find("\n\n") {
            let event: String = self.pending.drain(..end + 2).collect();
            let data: Vec<&str> = event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|data| data.strip_prefix(' ').unwrap_or(data))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

/// `GET /v1/traffic` as `prism top` shows it: each namespace, then each of
/// its routes (and the backend they went to).
pub fn traffic_table(summary: &Value) -> String {
    let number = |v: &Value| v.as_f64().unwrap_or(0.0);
    let millis = |v: &Value| v.as_f64().map_or("-".to_string(), |ms| format!("{ms:.2}"));
    let row = |name: &str, figures: &Value| {
        format!(
            "{name:<40} {:>9.1} {:>7.1}% {:>9} {:>9}\n",
            number(&figures["rps"]),
            number(&figures["error_rate"]) * 100.0,
            millis(&figures["p50_ms"]),
            millis(&figures["p99_ms"]),
        )
    };
    let list = |key: &str| summary[key].as_array().cloned().unwrap_or_default();
    let proxies = list("proxies");
    let mut out = format!(
        "traffic over the last {} s, {} {} reporting\n",
        number(&summary["summary_seconds"]),
        proxies.len(),
        if proxies.len() == 1 {
            "proxy"
        } else {
            "proxies"
        },
    );
    out.push_str(&format!(
        "{:<40} {:>9} {:>8} {:>9} {:>9}\n",
        "NAMESPACE / ROUTE -> BACKEND", "RPS", "ERRORS", "P50 MS", "P99 MS"
    ));
    let routes = list("routes");
    for namespace in list("namespaces") {
        let name = namespace["namespace"].as_str().unwrap_or("?");
        out.push_str(&row(name, &namespace));
        for route in routes
            .iter()
            .filter(|r| r["namespace"] == namespace["namespace"])
        {
            let text = |key: &str| match route[key].as_str() {
                Some("") | None => "-".to_string(),
                Some(text) => text.to_string(),
            };
            out.push_str(&row(
                &format!("  {} -> {}", text("route"), text("backend")),
                route,
            ));
        }
    }
    out
}

/// One indented line per change: op (lowercase), kind, name.
fn change_lines(changes: &[Value]) -> String {
    changes
        .iter()
        .map(|change| {
            let text = |k: &str| change[k].as_str().unwrap_or("?").to_string();
            let op = text("op").to_ascii_lowercase();
            format!("  {op:<7} {} {}\n", text("kind"), text("name"))
        })
        .collect()
}

/// The unified diffs the admin API gave with `changes`, one after another.
fn diffs(changes: &[Value]) -> String {
    changes
        .iter()
        .filter_map(|change| change["diff"].as_str())
        .collect()
}

/// A change-log entry: `revision N by ACTOR (ACTION) at TIME:`, then its
/// changes.
fn revision_lines(item: &Value) -> String {
    let millis = &item["unix_millis"];
    let at = millis
        .as_i64()
        .or_else(|| millis.as_str().and_then(|m| m.parse().ok()))
        .and_then(|ms| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
        })
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "?".to_string());
    format!(
        "revision {} by {} ({}) at {at}:\n{}",
        revision_of(item).unwrap_or_default(),
        item["actor"].as_str().unwrap_or("?"),
        item["action"].as_str().unwrap_or("?"),
        change_lines(item["changes"].as_array().map_or(&[][..], Vec::as_slice)),
    )
}

/// A change-log entry's revision: a string in the proto3 JSON mapping.
fn revision_of(item: &Value) -> Option<u64> {
    let revision = &item["revision"];
    revision
        .as_u64()
        .or_else(|| revision.as_str().and_then(|r| r.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_across_chunks_and_keep_alives_skipped() {
        let mut reader = SseReader::default();
        assert!(reader.push(b"event: traffic\ndata: {\"a\"").is_empty());
        assert_eq!(
            reader.push(b":1}\n\n:\n\nevent: traffic\r\ndata: 2\r\n\r\n"),
            ["{\"a\":1}", "2"]
        );
    }

    #[test]
    fn the_table_has_a_row_per_namespace_and_route() {
        let summary = serde_json::json!({
            "summary_seconds": 10.0,
            "proxies": [{"node": "a"}],
            "namespaces": [{"namespace": "demo", "rps": 12.5, "error_rate": 0.1, "p50_ms": 1.25, "p99_ms": null}],
            "routes": [{"namespace": "demo", "route": "root", "backend": "", "rps": 12.5, "error_rate": 0.1, "p50_ms": 1.25, "p99_ms": 8.0}],
        });
        let table = traffic_table(&summary);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "traffic over the last 10 s, 1 proxy reporting");
        assert!(lines[2].starts_with("demo "), "{table}");
        assert!(
            lines[2].ends_with("12.5    10.0%      1.25         -"),
            "{table}"
        );
        assert!(lines[3].starts_with("  root -> - "), "{table}");
    }
}
