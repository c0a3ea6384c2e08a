//! MoltBot's configuration. One file holds every service's section; each service reads its own and the shared
//! ones (`queue`, `model_provider`). Layers, later winning: built-in defaults → the `--config` YAML file →
//! `model_provider.yaml` beside it (the seed's file, its keys at the top level) → `MOLTBOT_…` environment
//! variables with `__` between nested keys. Unknown keys and bad values are rejected with their path.

mod models;
pub use models::{PACKAGED_MODELS, PackagedModel, model_file, packaged_model, packaged_model_names};

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Yaml},
};
use serde::{Deserialize, Serialize};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration file {path} cannot be read: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub dialogue_manager: DialogueManagerConfig,
    pub session_store: SessionStoreConfig,
    pub inference_worker: InferenceWorkerConfig,
    pub model_provider: ModelProviderConfig,
    /// More models `moltbot serve` hosts beside `model_provider`, each served by a worker of its own (a local GGUF
    /// model, or a remote API). A deployed inference worker serves `model_provider` only.
    pub models: Vec<ModelProviderConfig>,
    pub queue: QueueConfig,
    /// How MoltBot's own services trust each other.
    pub internal: InternalConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub plugins: PluginsConfig,
}

/// Plugins (S8): the built-in ones, those in the plugin directory, and the limits every call runs within. The
/// dialogue-manager loads and runs them.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// The plugin directory: every `*.py` module, Python package folder and `*.yaml` manifest in it is a plugin.
    /// Empty: no directory.
    pub dir: PathBuf,
    /// The interpreter that runs Python plugins; it needs `grpcio` (`python3 -m pip install grpcio`).
    pub python: String,
    /// The built-in plugins to offer: `calculator`, `datetime`.
    pub builtin: Vec<String>,
    /// Plugins whose failure to load stops start-up; any other is disabled and reported (a manifest may also say
    /// `required: true`).
    pub required: Vec<String>,
    /// Milliseconds a call may take before it fails as a tool error (a manifest may set its own `timeout_ms`).
    pub timeout_ms: u64,
    /// Calls of one plugin at once; more wait (within the timeout).
    pub max_concurrency: usize,
    /// Bytes of one call's result (as JSON); a larger result is a tool error.
    pub max_output_bytes: usize,
    /// Rounds of plugin calls in one turn (the model calls plugins a request offers it, the dialogue-manager runs
    /// the calls, the model goes on with the results); after the last round the model must answer in text.
    pub max_rounds: u32,
    /// Each plugin's own settings, e.g. `settings: { weather: { api_key: "…" } }`, or from the environment:
    /// `MOLTBOT_PLUGINS__SETTINGS__WEATHER__API_KEY`. A plugin sees only its own; they are never logged.
    pub settings: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    /// Plugins that call an external HTTP JSON API.
    pub http_json: Vec<HttpJsonPluginConfig>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            python: "python3".into(),
            builtin: vec!["calculator".into(), "datetime".into()],
            required: vec![],
            timeout_ms: 10_000,
            max_concurrency: 8,
            max_output_bytes: 64 << 10,
            max_rounds: 3,
            settings: Default::default(),
            http_json: vec![],
        }
    }
}

impl std::fmt::Debug for PluginsConfig {
    /// Settings by key only: they hold API keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings: std::collections::BTreeMap<_, Vec<_>> =
            self.settings.iter().map(|(plugin, values)| (plugin, values.keys().collect())).collect();
        f.debug_struct("PluginsConfig")
            .field("dir", &self.dir)
            .field("python", &self.python)
            .field("builtin", &self.builtin)
            .field("required", &self.required)
            .field("timeout_ms", &self.timeout_ms)
            .field("max_concurrency", &self.max_concurrency)
            .field("max_output_bytes", &self.max_output_bytes)
            .field("max_rounds", &self.max_rounds)
            .field("settings", &settings)
            .field("http_json", &self.http_json)
            .finish()
    }
}

/// A plugin that calls one endpoint of an external JSON API. Its key is `plugins.settings.<name>.api_key`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpJsonPluginConfig {
    pub name: String,
    pub description: String,
    /// The URL; `{parameter}` in it is replaced by that argument (URL-encoded).
    pub url: String,
    /// `GET` sends the other arguments as query parameters, `POST` as a JSON body.
    pub method: String,
    /// The arguments as a JSON Schema object.
    pub parameters: serde_json::Value,
    /// The header that carries the API key, and its scheme (`Authorization: Bearer <key>` by default; an empty
    /// scheme sends the key alone, e.g. `X-Api-Key`).
    pub auth_header: String,
    pub auth_scheme: String,
    /// A JSON pointer (RFC 6901) to the part of the answer to return, e.g. `/current`; empty: all of it.
    pub result_pointer: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Prometheus metrics (`GET /metrics`): the gateway's, and under `moltbot serve` every service's.
    pub metrics_listen: SocketAddr,
    /// gRPC address of the dialogue-manager; replicas' addresses separated by commas.
    pub dialogue_manager_url: String,
    /// Requests in flight before new ones get 429.
    pub max_concurrent_requests: usize,
    /// Requests in flight per user (API key, or `X-User-Id`) before that user's new ones get 429; 0: no cap.
    pub max_concurrent_per_user: usize,
    /// Messages in one chat request; more is a 400.
    pub max_messages: usize,
    /// Images (`image_url` content parts) in one chat request; more is a 400.
    pub max_images: usize,
    /// Bytes of one image (decoded from its `data:` URL); larger is a 400. Images ride in the request body, so
    /// `max_body_bytes` bounds them too.
    pub max_image_bytes: usize,
    /// Accept http(s) image URLs (the vision model's API fetches them); off: only `data:` URLs.
    pub allow_image_urls: bool,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Open client connections; more wait until one closes.
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive connection stays open.
    pub header_read_timeout: u64,
    /// Seconds a request may take end to end before 504.
    pub request_timeout: u64,
    /// Serve the chat page at `/` (the API is there either way).
    pub web_ui: bool,
    pub auth: AuthConfig,
    pub rate_limit: RateLimitConfig,
    pub cache_config: CacheConfig,
}

/// The response cache (S11): answers to single-turn, deterministic requests are served again without the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    /// Megabytes of cached response bodies.
    pub max_size: u64,
    /// Seconds an answer stays cached.
    pub ttl: u64,
    /// Request headers that are part of the cache key (the caller's user always is).
    pub include_headers: Vec<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { enabled: false, max_size: 1024, ttl: 3600, include_headers: vec!["Authorization".into()] }
    }
}

/// Requests per user (API key, or `X-User-Id` without auth) before 429.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Sustained rate; 0 turns the limit off.
    pub requests_per_minute: u32,
    /// Requests allowed at once after a quiet spell; 0: as many as `requests_per_minute`.
    pub burst: u32,
}

/// API keys for the gateway. Empty: auth is off, which the gateway allows only on a loopback address.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accepted as `Authorization: Bearer <key>`; each key is its own user. Set them from the environment, e.g.
    /// `MOLTBOT_GATEWAY__AUTH__API_KEYS='["k1","k2"]'`.
    pub api_keys: Vec<String>,
}

impl std::fmt::Debug for AuthConfig {
    /// Never prints a key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig").field("api_keys", &format_args!("[{} hidden]", self.api_keys.len())).finish()
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8000).into(),
            metrics_listen: ([127, 0, 0, 1], 8001).into(),
            dialogue_manager_url: "http://127.0.0.1:50051".into(),
            max_concurrent_requests: 64,
            max_concurrent_per_user: 16,
            max_messages: 256,
            max_images: 8,
            max_image_bytes: 512 * 1024,
            allow_image_urls: false,
            max_body_bytes: 1024 * 1024,
            max_connections: 1024,
            header_read_timeout: 30,
            request_timeout: 300,
            web_ui: true,
            auth: AuthConfig::default(),
            rate_limit: RateLimitConfig::default(),
            cache_config: CacheConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DialogueManagerConfig {
    pub listen: SocketAddr,
    /// Prometheus metrics (`GET /metrics`) when the service runs on its own (`moltbot serve` shows every
    /// service's on `gateway.metrics_listen`).
    pub metrics_listen: SocketAddr,
    /// gRPC address of the session-store; replicas' addresses separated by commas.
    pub session_store_url: String,
    /// Seconds without any event from a running job's worker before it counts as dead.
    pub worker_timeout: u64,
    /// How often a job whose worker died before streaming is queued again.
    pub max_retries: u32,
    /// Seconds a turn waits for the previous turn of the same session to finish before it is refused (409).
    pub session_lock_wait: u64,
    /// Seconds a turn's session lock outlives its holder: the holder renews it every third of that while the turn
    /// runs, so a dialogue-manager that dies mid-turn frees its session within this long.
    pub session_lock_lease: u64,
    /// Seconds the oldest queued job may have waited for a worker before new turns are refused (429 with
    /// `Retry-After`): overload is shed, not queued; 0: never.
    pub max_queue_wait: u64,
    /// The model a request without `model` gets; empty: the one served, when only one is.
    pub default_model: String,
    /// Other names for served models (`alias: model`), e.g. `gpt-4o-mini: smollm2-135m-instruct`.
    pub model_aliases: std::collections::BTreeMap<String, String>,
}

impl Default for DialogueManagerConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 50051).into(),
            metrics_listen: ([127, 0, 0, 1], 8002).into(),
            session_store_url: "http://127.0.0.1:50052".into(),
            worker_timeout: 3,
            max_retries: 2,
            session_lock_wait: 30,
            session_lock_lease: 15,
            max_queue_wait: 20,
            default_model: String::new(),
            model_aliases: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStoreType {
    Redis,
    Memory,
    Persistent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionStoreConfig {
    pub listen: SocketAddr,
    /// Prometheus metrics (`GET /metrics`) when the service runs on its own (`moltbot serve` shows every
    /// service's on `gateway.metrics_listen`).
    pub metrics_listen: SocketAddr,
    pub session_store_type: SessionStoreType,
    /// Seconds a session lives after its last use (sliding).
    pub session_ttl: u64,
    pub redis: RedisConfig,
    /// File of the embedded durable store (`persistent`).
    pub path: PathBuf,
    /// Sessions one user may hold; creating more is refused until some are deleted or expire.
    pub max_sessions_per_user: u32,
    /// Messages one session may hold; a turn past it is refused with advice to start a new session.
    pub max_session_messages: u32,
    /// Bytes of message text one session may hold: a session that holds this much takes no more turns (the
    /// last turn may pass it by its own size). With `max_sessions_per_user`, what one user can store is bounded.
    pub max_session_bytes: u64,
}

impl Default for SessionStoreConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 50052).into(),
            metrics_listen: ([127, 0, 0, 1], 8003).into(),
            session_store_type: SessionStoreType::Redis,
            session_ttl: 1800,
            redis: RedisConfig::default(),
            path: data_dir().join("sessions.redb"),
            max_sessions_per_user: 1000,
            max_session_messages: 10_000,
            max_session_bytes: 8 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub url: String,
    pub pool_size: usize,
    /// Prefix of every key MoltBot writes.
    pub key_prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self { url: "redis://127.0.0.1:6379".into(), pool_size: 16, key_prefix: "moltbot".into() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceWorkerConfig {
    pub listen: SocketAddr,
    /// Prometheus metrics (`GET /metrics`) when the service runs on its own (`moltbot serve` shows every
    /// service's on `gateway.metrics_listen`).
    pub metrics_listen: SocketAddr,
    /// Names this worker in events and logs; host name and a random suffix when empty.
    pub worker_id: String,
    /// Sequences the engine generates together; the worker takes this many jobs at once.
    pub max_batch_size: usize,
    /// Tokens in one forward pass (one per generating sequence plus prompt chunks).
    pub max_batch_tokens: usize,
    /// Milliseconds a step may take while sequences are generating: prompt chunks shrink to fit, so a long prompt
    /// never freezes the streams running beside it.
    pub max_step_ms: u64,
    /// Memory for the paged KV cache, in MiB; the context window shrinks when one whole window does not fit.
    pub kv_cache_mib: usize,
    /// Requests the engine queues beyond its batch before refusing more (429).
    pub max_waiting: usize,
    /// Compute threads for the engine; 0 means every core.
    pub threads: usize,
    /// Prompt tokens one request may have (its history is cut to fit; a newest message alone over it gets 400);
    /// 0: the model's context window less the reply.
    pub max_prompt_tokens: usize,
    /// Keeps finished sequences' KV blocks for later requests with the same prefix (a conversation's next turn,
    /// a shared system prompt), so only their new tokens are computed.
    pub prefix_caching: bool,
}

impl Default for InferenceWorkerConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 50053).into(),
            metrics_listen: ([127, 0, 0, 1], 8004).into(),
            worker_id: String::new(),
            max_batch_size: 16,
            max_batch_tokens: 1024,
            max_step_ms: 200,
            kv_cache_mib: 1024,
            max_waiting: 256,
            threads: 0,
            max_prompt_tokens: 0,
            prefix_caching: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderType {
    LocalLlm,
    RemoteApi,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelProviderConfig {
    /// `local_llm` or `remote_api`; `provider_type` (the seed's name) is the same key.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<ProviderType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_type: Option<ProviderType>,
    /// The name clients put in `model`; the worker announces it, and the dialogue-managers route by it.
    pub model_name: String,
    /// A packaged model by name (`cargo xtask model` lists them and fetches one); empty means the default.
    pub model: String,
    /// A GGUF file of your own; it wins over `model`.
    pub model_path: PathBuf,
    /// Most tokens generated for one answer; requests may ask for fewer.
    pub max_tokens: u32,
    /// Layers on the GPU: 0 runs on the engine's CPU kernels; N puts the last N layers and the output on CUDA
    /// device 0 (the one `CUDA_VISIBLE_DEVICES` shows first) and the first ones on the CPU, as llama.cpp's
    /// `--n-gpu-layers`; a value at or above the model's layer count (999) puts all of them there. Needs the `cuda`
    /// build.
    pub gpu_layers: u32,
    /// `none`: weights as the GGUF file stores them; `8bit` / `4bit`: F32, F16 (and for 4bit Q8_0) weights
    /// re-quantized at load, for a machine short of memory.
    pub quantization: String,
    /// Caps the context window below the model's own (0: the model's).
    pub context_length: u32,
    /// `remote_api`: the OpenAI-compatible API's base URL (`…/v1`); `endpoint` (the seed's name) is the same key.
    pub endpoint_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `remote_api`: `api_key` is sent as `Authorization: Bearer`, `organization` as `OpenAI-Organization`.
    pub auth: ProviderAuth,
    /// `remote_api`: the remote's name for the model; empty: `model_name`.
    pub remote_model: String,
    /// `remote_api`: requests in flight to the remote at once (the worker takes this many jobs).
    pub max_concurrency: usize,
    /// `remote_api`: seconds to connect, and seconds the remote may stay silent mid-answer.
    pub connect_timeout: u64,
    pub read_timeout: u64,
    /// `remote_api`: retries of a call refused with 429 or 5xx or not connected, before any of its answer came,
    /// with exponential backoff and jitter, waiting at least what `Retry-After` asks.
    pub max_retries: u32,
    /// `remote_api`: what the remote model accepts (the local engine knows its own).
    pub capabilities: Capabilities,
}

/// What a remote model accepts, as the operator declares it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capabilities {
    pub tools: bool,
    pub vision: bool,
    pub json_schema: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self { tools: true, vision: false, json_schema: true }
    }
}

impl Default for ModelProviderConfig {
    fn default() -> Self {
        Self {
            kind: None,
            provider_type: None,
            model_name: DEFAULT_MODEL_NAME.into(),
            model: String::new(),
            model_path: PathBuf::new(),
            max_tokens: 2048,
            gpu_layers: 0,
            quantization: "none".into(),
            context_length: 0,
            endpoint_url: String::new(),
            endpoint: None,
            auth: ProviderAuth::default(),
            remote_model: String::new(),
            max_concurrency: 16,
            connect_timeout: 5,
            read_timeout: 60,
            max_retries: 3,
            capabilities: Capabilities::default(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderAuth {
    pub api_key: String,
    pub organization: String,
}

impl ModelProviderConfig {
    /// `type`, else `provider_type`, else `local_llm`.
    pub fn provider(&self) -> ProviderType {
        self.kind.or(self.provider_type).unwrap_or(ProviderType::LocalLlm)
    }

    /// The rules of one model provider section (`key`: where it is in the configuration).
    pub fn validate(&self, key: &str) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::Invalid(format!("{key}.{field}: {why}")));
        if self.model_name.is_empty() {
            return bad("model_name", "must not be empty");
        }
        if !self.model.is_empty() && !self.model_path.as_os_str().is_empty() {
            return bad(
                "model",
                &format!(
                    "is set together with {key}.model_path; set one of them (a packaged model by name, or a GGUF file \
                     of your own)"
                ),
            );
        }
        if !self.model.is_empty() && packaged_model(&self.model).is_none() {
            return bad(
                "model",
                &format!(
                    "`{}` is not a packaged model (packaged: {}); set {key}.model_path for a GGUF file of your own",
                    self.model,
                    packaged_model_names()
                ),
            );
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1");
        }
        if let (Some(a), Some(b)) = (self.kind, self.provider_type)
            && a != b
        {
            return bad("type", &format!("disagrees with {key}.provider_type; set one of them"));
        }
        if let Some(endpoint) =
            self.endpoint.as_ref().filter(|e| !self.endpoint_url.is_empty() && **e != self.endpoint_url)
        {
            return bad("endpoint", &format!("`{endpoint}` disagrees with {key}.endpoint_url; set one of them"));
        }
        if self.provider() == ProviderType::RemoteApi {
            let endpoint = self.endpoint_url();
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return bad(
                    "endpoint_url",
                    "remote_api needs the OpenAI-compatible API's base URL, e.g. https://api.openai.com/v1",
                );
            }
            for (field, value) in [
                ("max_concurrency", self.max_concurrency as u64),
                ("connect_timeout", self.connect_timeout),
                ("read_timeout", self.read_timeout),
            ] {
                if value == 0 {
                    return bad(field, "must be at least 1");
                }
            }
            // Sent as HTTP header values.
            for (field, value) in [("auth.api_key", &self.auth.api_key), ("auth.organization", &self.auth.organization)]
            {
                if value.bytes().any(|b| b < 0x20 || b == 0x7f) {
                    return bad(field, "holds a control character (a pasted newline?); it is sent as an HTTP header");
                }
            }
        }
        if !matches!(self.quantization.as_str(), "none" | "" | "4bit" | "8bit") {
            return bad(
                "quantization",
                "must be `none` (weights as the GGUF file stores them), `8bit` (F32/F16 weights to Q8_0 at load) or \
                 `4bit` (F32/F16/Q8_0 weights to Q4_K or Q4_0 at load)",
            );
        }
        Ok(())
    }

    /// The remote API's base URL: `endpoint_url`, else `endpoint`.
    pub fn endpoint_url(&self) -> &str {
        match &self.endpoint {
            Some(endpoint) if self.endpoint_url.is_empty() => endpoint,
            _ => &self.endpoint_url,
        }
    }

    /// The name the remote API knows the model by.
    pub fn remote_model(&self) -> &str {
        if self.remote_model.is_empty() { &self.model_name } else { &self.remote_model }
    }

    /// The GGUF file to load: `model_path`, else the packaged `model` in the user's cache, else the default model.
    pub fn resolved_model_path(&self) -> PathBuf {
        if !self.model_path.as_os_str().is_empty() {
            return self.model_path.clone();
        }
        packaged_model(&self.model).map_or_else(default_model_path, PackagedModel::path)
    }
}

/// The trust between MoltBot's services.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InternalConfig {
    /// A secret every internal gRPC call presents (`authorization: Bearer`) and every internal service requires;
    /// set it from a Secret (`MOLTBOT_INTERNAL__SERVICE_TOKEN`). Empty: none, allowed only while the
    /// dialogue-manager, session-store and inference worker listen on loopback addresses.
    pub service_token: String,
}

impl std::fmt::Debug for InternalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = if self.service_token.is_empty() { "" } else { "<set>" };
        f.debug_struct("InternalConfig").field("service_token", &token).finish()
    }
}

impl InternalConfig {
    /// Refuses an internal service on a non-loopback address (`key`) without a service token: anyone who can reach
    /// it could read and write every user's sessions.
    pub fn guard(&self, addr: std::net::SocketAddr, key: &str) -> Result<()> {
        if self.service_token.is_empty() && !addr.ip().is_loopback() {
            return Err(Error::Invalid(format!(
                "{key} is {addr}, beyond loopback, without internal.service_token: any caller that reaches it could \
                 read and change every user's data. Set internal.service_token (MOLTBOT_INTERNAL__SERVICE_TOKEN, from \
                 a Secret) to the same secret in every MoltBot service, or listen on 127.0.0.1"
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// NATS server; the dialogue-manager and workers use JetStream on it. A deployment's NATS user goes in the
    /// address (`nats://worker:<password>@nats:4222`); error messages show it without the password.
    pub nats_url: String,
    /// Jobs waiting in the queue before new ones are refused (429).
    pub max_pending_jobs: i64,
    /// Seconds a job may wait plus run before it is dropped (504).
    pub job_timeout: u64,
    /// Copies JetStream keeps of the job and cancel streams (1 to 5; 3 on a cluster of three NATS servers, so a
    /// server's loss loses no queued job). Applies when the streams are made.
    pub stream_replicas: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { nats_url: "nats://127.0.0.1:4222".into(), max_pending_jobs: 1024, job_timeout: 300, stream_replicas: 1 }
    }
}

/// `url` as (scheme, user info, host, rest) when it holds user info (`scheme://userinfo@host/rest`).
fn with_userinfo(url: &str) -> Option<(&str, &str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let (userinfo, host) = authority.rsplit_once('@')?;
    Some((scheme, userinfo, host, path))
}

/// `url` without its credentials, and the user and password it held (`scheme://user:password@host`).
pub fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    match with_userinfo(url) {
        Some((scheme, userinfo, host, path)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (format!("{scheme}://{host}{path}"), Some((user.to_owned(), password.to_owned())))
        }
        None => (url.to_owned(), None),
    }
}

/// `url` fit for logs and error messages: a password in it (`scheme://user:password@host`) becomes `***`.
pub fn redact_url(url: &str) -> String {
    match with_userinfo(url)
        .and_then(|(scheme, userinfo, host, path)| Some((scheme, userinfo.split_once(':')?.0, host, path)))
    {
        Some((scheme, user, host, path)) => format!("{scheme}://{user}:***@{host}{path}"),
        None => url.to_owned(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter, e.g. `info` or `moltbot_engine=debug,info`; RUST_LOG wins when set.
    pub level: String,
    /// One JSON object per line instead of text.
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), json: false }
    }
}

/// Metrics (Prometheus) and traces (OpenTelemetry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Prometheus metrics on each service's `metrics_listen`; false: no metrics port, and nothing recorded.
    pub metrics: bool,
    /// An OTLP/gRPC collector to send traces to, e.g. `http://localhost:4317` (plain http: for TLS, run a collector
    /// beside MoltBot that forwards); empty: no traces. Export failures are not logged.
    pub otlp_endpoint: String,
    /// The share of new traces kept, 0 to 1 (a client's sampled `traceparent` is always followed).
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { metrics: true, otlp_endpoint: String::new(), sample_ratio: 1.0 }
    }
}

/// Where MoltBot keeps downloaded models: `$XDG_CACHE_HOME/moltbot` or `~/.cache/moltbot`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("moltbot")
}

/// Where MoltBot keeps its own data (the embedded session store): `$XDG_DATA_HOME/moltbot` or
/// `~/.local/share/moltbot`.
pub fn data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from(".local/share"))
        .join("moltbot")
}

pub const DEFAULT_MODEL_NAME: &str = "smollm2-135m-instruct";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

impl Config {
    /// The layers MoltBot reads: defaults, the config file (and `model_provider.yaml` beside it), environment.
    pub fn figment(path: Option<&Path>) -> Result<Figment> {
        Self::figment_over(Config::default(), path)
    }

    /// Like [`Config::figment`] with other built-in defaults (`moltbot serve` defaults to the embedded store).
    pub fn figment_over(base: Config, path: Option<&Path>) -> Result<Figment> {
        let mut figment = Figment::from(Serialized::defaults(base));
        if let Some(path) = path {
            if !path.is_file() {
                return Err(Error::File {
                    path: path.into(),
                    message: "no such file (copy config/config.example.yaml to start one)".into(),
                });
            }
            figment = figment.merge(Yaml::file_exact(path));
            let beside = path.with_file_name("model_provider.yaml");
            if beside.is_file() {
                let text = std::fs::read_to_string(&beside)
                    .map_err(|e| Error::File { path: beside.clone(), message: e.to_string() })?;
                let value: serde_yaml::Value = serde_yaml::from_str(&text)
                    .map_err(|e| Error::File { path: beside.clone(), message: e.to_string() })?;
                figment = figment.merge(Serialized::global("model_provider", value));
            }
        }
        // The engine's own switches (`MOLTBOT_ENGINE_NO_AVX512`, `MOLTBOT_ENGINE_NO_SIMD`,
        // `MOLTBOT_ENGINE_NO_INTERLEAVE`) share the prefix but are not configuration keys.
        let switches = ["engine_no_avx512", "engine_no_simd", "engine_no_interleave"];
        Ok(figment.merge(Env::prefixed("MOLTBOT_").ignore(&switches).split("__")))
    }

    /// Extracts and validates a configuration from any figment (tests build one from strings).
    pub fn from_figment(figment: &Figment) -> Result<Self> {
        let config: Config = figment
            .extract()
            .map_err(|e| Error::Invalid(e.into_iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")))?;
        let mut config = config;
        // A packaged model is served under its own name unless `model_name` says otherwise.
        for provider in std::iter::once(&mut config.model_provider).chain(&mut config.models) {
            if !provider.model.is_empty() && provider.model_name == DEFAULT_MODEL_NAME {
                provider.model_name = provider.model.clone();
            }
        }
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: Option<&Path>) -> Result<Self> {
        Self::from_figment(&Self::figment(path)?)
    }

    /// Rules across fields that serde cannot express.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(Error::Invalid(format!("{key}: {why}")));
        if self.gateway.max_concurrent_requests == 0 {
            return bad("gateway.max_concurrent_requests", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return bad("telemetry.sample_ratio", "must be 0 to 1");
        }
        let endpoint = &self.telemetry.otlp_endpoint;
        if !(endpoint.is_empty() || endpoint.starts_with("http://")) {
            return bad(
                "telemetry.otlp_endpoint",
                "must be an http:// URL (an OTLP/gRPC collector, e.g. http://localhost:4317; for TLS, a collector \
                 beside MoltBot that forwards), or empty",
            );
        }
        if self.gateway.max_connections == 0 || self.gateway.max_connections > u32::MAX as usize {
            return bad("gateway.max_connections", "must be at least 1");
        }
        if self.gateway.header_read_timeout == 0 {
            return bad("gateway.header_read_timeout", "must be at least 1 second");
        }
        if !(1..=86_400).contains(&self.gateway.request_timeout) {
            return bad("gateway.request_timeout", "must be 1 to 86400 seconds");
        }
        if self.session_store.max_sessions_per_user == 0 {
            return bad("session_store.max_sessions_per_user", "must be at least 1");
        }
        if self.session_store.max_session_messages < 2 {
            return bad("session_store.max_session_messages", "must be at least 2 (one turn)");
        }
        if self.session_store.max_session_bytes == 0 {
            return bad("session_store.max_session_bytes", "must be at least 1");
        }
        if self.gateway.max_messages == 0 {
            return bad("gateway.max_messages", "must be at least 1");
        }
        if self.gateway.max_body_bytes < 1024 {
            return bad("gateway.max_body_bytes", "must be at least 1024");
        }
        if self.session_store.session_ttl == 0 {
            return bad("session_store.session_ttl", "must be at least 1 second");
        }
        self.model_provider.validate("model_provider")?;
        let mut names = std::collections::BTreeSet::from([self.model_provider.model_name.as_str()]);
        for (i, model) in self.models.iter().enumerate() {
            model.validate(&format!("models[{i}]"))?;
            if !names.insert(&model.model_name) {
                return bad(
                    &format!("models[{i}].model_name"),
                    &format!("`{}` is served twice; give each model its own model_name", model.model_name),
                );
            }
        }
        for (alias, model) in &self.dialogue_manager.model_aliases {
            if alias.is_empty() || model.is_empty() {
                return bad("dialogue_manager.model_aliases", "an alias and its model must both be named");
            }
        }
        if self.inference_worker.max_batch_size == 0 || self.inference_worker.max_batch_tokens == 0 {
            return bad("inference_worker.max_batch_size", "max_batch_size and max_batch_tokens must be at least 1");
        }
        if self.inference_worker.kv_cache_mib == 0 || self.inference_worker.max_waiting == 0 {
            return bad("inference_worker.kv_cache_mib", "kv_cache_mib and max_waiting must be at least 1");
        }
        let token = &self.internal.service_token;
        if !token.is_empty() && (token.len() < 16 || token.bytes().any(|b| !b.is_ascii_graphic())) {
            return bad("internal.service_token", "must have at least 16 visible ASCII characters (no spaces)");
        }
        if self.gateway.auth.api_keys.iter().any(|k| k.trim().len() < 16) {
            return bad("gateway.auth.api_keys", "every API key must have at least 16 characters");
        }
        if self.dialogue_manager.session_lock_lease == 0 {
            return bad("dialogue_manager.session_lock_lease", "must be at least 1 second");
        }
        if !(1..=5).contains(&self.queue.stream_replicas) {
            return bad("queue.stream_replicas", "must be 1 to 5 (what JetStream allows)");
        }
        if self.queue.max_pending_jobs < 1 {
            return bad("queue.max_pending_jobs", "must be at least 1");
        }
        if !(1..=16).contains(&self.plugins.max_rounds) {
            return bad("plugins.max_rounds", "must be between 1 and 16");
        }
        if self.plugins.timeout_ms == 0 || self.plugins.max_concurrency == 0 || self.plugins.max_output_bytes == 0 {
            return bad("plugins.timeout_ms", "timeout_ms, max_concurrency and max_output_bytes must be at least 1");
        }
        if let Some(unknown) = self.plugins.builtin.iter().find(|b| !["calculator", "datetime"].contains(&b.as_str())) {
            return bad("plugins.builtin", &format!("`{unknown}` is not a built-in plugin (calculator, datetime)"));
        }
        for api in &self.plugins.http_json {
            if api.name.is_empty() || !(api.url.starts_with("http://") || api.url.starts_with("https://")) {
                return bad("plugins.http_json", "every entry needs a name and an http(s) url");
            }
            if !matches!(api.method.to_ascii_uppercase().as_str(), "" | "GET" | "POST") {
                return bad("plugins.http_json.method", "must be GET or POST");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_an_address_never_reaches_a_message() {
        assert_eq!(redact_url("nats://worker:s3cret@nats:4222"), "nats://worker:***@nats:4222");
        assert_eq!(redact_url("redis://moltbot:p@ss@redis:6379/0"), "redis://moltbot:***@redis:6379/0");
        assert_eq!(redact_url("redis://:only-password@redis/0?x=1"), "redis://:***@redis/0?x=1");
        for plain in ["nats://user@nats:4222", "redis://127.0.0.1:6379", "not a url"] {
            assert_eq!(redact_url(plain), plain);
        }
        let (bare, credentials) = split_credentials("nats://worker:s3:cr@t@nats:4222/x");
        assert_eq!((bare.as_str(), credentials), ("nats://nats:4222/x", Some(("worker".into(), "s3:cr@t".into()))));
        assert_eq!(split_credentials("nats://nats:4222"), ("nats://nats:4222".into(), None));
    }

    #[test]
    fn a_packaged_model_is_served_under_its_name_and_unknown_or_doubled_choices_are_refused() {
        let load = |yaml: &str| {
            Config::from_figment(&Figment::from(Serialized::defaults(Config::default())).merge(Yaml::string(yaml)))
        };
        let config = load("model_provider:\n  model: gemma-3-270m\n").unwrap();
        assert_eq!(config.model_provider.model_name, "gemma-3-270m");
        assert_eq!(config.model_provider.resolved_model_path(), packaged_model("gemma-3-270m").unwrap().path());
        let named = load("model_provider:\n  model: gemma-3-270m\n  model_name: g\n").unwrap();
        assert_eq!(named.model_provider.model_name, "g");
        let unknown = load("model_provider:\n  model: nope\n").unwrap_err().to_string();
        assert!(
            unknown.contains("model_provider.model") && unknown.contains("qwen2.5-coder-0.5b-instruct"),
            "{unknown}"
        );
        let both = load("model_provider:\n  model: gemma-3-270m\n  model_path: /m.gguf\n").unwrap_err().to_string();
        assert!(both.contains("model_path"), "{both}");
    }

    fn load(yaml: &str) -> Result<Config> {
        Config::from_figment(&Figment::from(Serialized::defaults(Config::default())).merge(Yaml::string(yaml)))
    }

    #[test]
    fn defaults_are_valid_and_match_the_documented_ports() {
        let c = load("").unwrap();
        assert_eq!(c.gateway.listen.port(), 8000);
        assert_eq!(c.gateway.metrics_listen.port(), 8001);
        assert_eq!(c.session_store.session_ttl, 1800);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        let err = load("gateway:\n  listn: 1").unwrap_err().to_string();
        assert!(err.contains("listn") && err.contains("gateway"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key_and_the_allowed_ones() {
        let err = load("session_store:\n  session_store_type: mongo").unwrap_err().to_string();
        assert!(err.contains("session_store_type") && err.contains("redis"), "{err}");
        let err = load("gateway:\n  max_concurrent_requests: 0").unwrap_err().to_string();
        assert!(err.contains("gateway.max_concurrent_requests"), "{err}");
        let err = load("telemetry:\n  otlp_endpoint: localhost:4317").unwrap_err().to_string();
        assert!(err.contains("telemetry.otlp_endpoint") && err.contains("http://localhost:4317"), "{err}");
        let err = load("telemetry:\n  sample_ratio: 1.5").unwrap_err().to_string();
        assert!(err.contains("telemetry.sample_ratio"), "{err}");
    }

    #[test]
    fn seed_keys_keep_their_names() {
        let c = load("model_provider:\n  provider_type: local_llm\n  max_tokens: 512\n  gpu_layers: 24").unwrap();
        assert_eq!((c.model_provider.max_tokens, c.model_provider.gpu_layers), (512, 24));
    }

    #[test]
    fn remote_models_need_an_endpoint_and_every_model_its_own_name() {
        let remote = "model_provider:\n  type: remote_api\n  model_name: gpt-4o-mini\n";
        let missing = load(remote).unwrap_err().to_string();
        assert!(missing.contains("model_provider.endpoint_url"), "{missing}");
        let c = load(&format!("{remote}  endpoint: https://api.example.com/v1\n  auth: {{ api_key: k }}\n")).unwrap();
        assert_eq!(
            (c.model_provider.endpoint_url(), c.model_provider.remote_model()),
            ("https://api.example.com/v1", "gpt-4o-mini")
        );
        let twice = "models:\n  - model_name: smollm2-135m-instruct\n";
        assert!(load(twice).unwrap_err().to_string().contains("models[0].model_name"));
        let bad = "models:\n  - model_name: other\n    type: remote_api\n    endpoint_url: ftp://x\n";
        assert!(load(bad).unwrap_err().to_string().contains("models[0].endpoint_url"));
        let aliases = load("dialogue_manager:\n  model_aliases: { gpt-4: smollm2-135m-instruct }\n").unwrap();
        assert_eq!(aliases.dialogue_manager.model_aliases["gpt-4"], "smollm2-135m-instruct");
    }

    #[test]
    fn the_example_config_is_every_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/config.example.yaml");
        let figment = Config::figment_over(Config::default(), Some(&path)).unwrap();
        let example = Config::from_figment(&figment).unwrap();
        assert_eq!(example.gateway, Config::default().gateway);
        assert_eq!(example.inference_worker, Config::default().inference_worker);
        assert_eq!(example.dialogue_manager, Config::default().dialogue_manager);
        // `model_provider.yaml` beside the example says `provider_type: local_llm`.
        let local = Some(ProviderType::LocalLlm);
        let provider = ModelProviderConfig { kind: local, provider_type: local, ..Default::default() };
        assert_eq!(example.model_provider, provider);
        assert!(example.models.is_empty());
        assert_eq!(example.plugins, Config::default().plugins);
        assert_eq!(example.telemetry, Config::default().telemetry);
        assert_eq!(example.session_store.metrics_listen, Config::default().session_store.metrics_listen);
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own error type
    fn environment_overrides_nested_keys() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MOLTBOT_SESSION_STORE__SESSION_TTL", "60");
            jail.set_env("MOLTBOT_GATEWAY__AUTH__API_KEYS", r#"["k1-0123456789abcdef","k2-0123456789abcdef"]"#);
            // The engine's instruction-set switch is not a configuration key (and used to fail the load).
            jail.set_env("MOLTBOT_ENGINE_NO_AVX512", "1");
            jail.set_env("MOLTBOT_ENGINE_NO_INTERLEAVE", "1");
            jail.create_file("moltbot.yaml", "gateway:\n  listen: 127.0.0.1:9000\n")?;
            jail.create_file("model_provider.yaml", "provider_type: local_llm\nmax_tokens: 99\n")?;
            let c = Config::load(Some(Path::new("moltbot.yaml"))).unwrap();
            assert_eq!(c.session_store.session_ttl, 60);
            assert_eq!(c.gateway.listen.port(), 9000);
            assert_eq!(c.model_provider.max_tokens, 99);
            assert_eq!(c.gateway.auth.api_keys, ["k1-0123456789abcdef", "k2-0123456789abcdef"]);
            assert!(!format!("{c:?}").contains("k1-0123"), "keys never show in debug output");
            Ok(())
        });
    }
}
