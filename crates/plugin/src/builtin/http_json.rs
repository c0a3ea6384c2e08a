//! `http_json`: one endpoint of an external JSON API as a plugin, configured in `plugins.http_json`.

use std::time::Duration;

use moltbot_config::HttpJsonPluginConfig;
use serde_json::{Map, Value};

use crate::{Context, Plugin, PluginError, PluginInfo, async_trait};

pub struct HttpJson {
    config: HttpJsonPluginConfig,
    client: reqwest::Client,
}

impl HttpJson {
    pub fn new(config: HttpJsonPluginConfig, timeout: Duration) -> Self {
        let client = reqwest::Client::builder().timeout(timeout).build().expect("a default HTTP client");
        Self { config, client }
    }
}

/// The longest piece of an error answer quoted back.
const QUOTED: usize = 300;

#[async_trait]
impl Plugin for HttpJson {
    fn info(&self) -> PluginInfo {
        let parameters = match &self.config.parameters {
            Value::Null => serde_json::json!({ "type": "object" }),
            schema => schema.clone(),
        };
        PluginInfo {
            name: self.config.name.clone(),
            version: "1".into(),
            description: self.config.description.clone(),
            parameters,
        }
    }

    async fn execute(&self, ctx: &Context) -> Result<Value, PluginError> {
        let c = &self.config;
        let mut rest: Map<String, Value> = ctx.arguments().clone();
        let mut url = c.url.clone();
        for (name, value) in ctx.arguments() {
            let placeholder = format!("{{{name}}}");
            if url.contains(&placeholder) {
                let text = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                url = url.replace(&placeholder, &encode(&text));
                rest.remove(name);
            }
        }
        let mut request = if c.method.eq_ignore_ascii_case("POST") {
            self.client.post(&url).json(&rest)
        } else {
            let query: Vec<(String, String)> =
                rest.into_iter().map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned))).collect();
            self.client.get(&url).query(&query)
        };
        if let Some(key) = ctx.setting("api_key").filter(|k| !k.is_empty()) {
            let header = if c.auth_header.is_empty() { "Authorization" } else { &c.auth_header };
            let scheme = if c.auth_header.is_empty() && c.auth_scheme.is_empty() { "Bearer" } else { &c.auth_scheme };
            let value = if scheme.is_empty() { key.to_owned() } else { format!("{scheme} {key}") };
            request = request.header(header, value);
        }
        let response = request.send().await.map_err(|e| {
            // The URL may carry arguments but never the key (it goes in a header).
            PluginError::Failed(format!("the API at {} could not be reached: {}", host(&c.url), e.without_url()))
        })?;
        let status = response.status();
        let body =
            response.text().await.map_err(|e| PluginError::Failed(format!("the API's answer broke off: {e}")))?;
        if !status.is_success() {
            let quoted: String = body.chars().take(QUOTED).collect();
            return Err(PluginError::Failed(format!("the API answered {status}: {quoted}")));
        }
        let value: Value = serde_json::from_str(&body)
            .map_err(|e| PluginError::Failed(format!("the API's answer is not JSON: {e}")))?;
        if c.result_pointer.is_empty() {
            return Ok(value);
        }
        value
            .pointer(&c.result_pointer)
            .cloned()
            .ok_or_else(|| PluginError::Failed(format!("the API's answer has nothing at {}", c.result_pointer)))
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest)
}
