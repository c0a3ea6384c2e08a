//! The session-store service: serves the `moltbot.session.v1.SessionStore` gRPC contract over one of three
//! backends (`redis`, `memory`, `persistent`). The contract is the seed's "custom storage strategy" interface:
//! anything that implements it can stand in for this service.

mod backend;
pub mod conformance;
mod embedded;
mod redis;
mod service;

use std::future::Future;

use moltbot_config::{SessionStoreConfig, SessionStoreType};
use tokio::net::TcpListener;

pub use backend::{Backend, SessionPatch, SessionRecord, SessionSettings, StoredMessage};
pub use service::{SessionStoreService, stored_id};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("session {0} not found")]
    NotFound(String),
    #[error("session {0} already exists")]
    AlreadyExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("another turn of session {0} is still running; retry when it has finished")]
    Busy(String),
    #[error("{0}")]
    Full(String),
    #[error("Redis at {url} is not reachable: {message}; start it (`redis-server`) or set session_store.redis.url")]
    RedisUnreachable { url: String, message: String },
    #[error("session storage failed: {0}")]
    Storage(String),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        // Ids go back as the client knows them (without the owner's scope), and never longer than a line.
        let e = match e {
            Error::NotFound(id) => Error::NotFound(service::shown_id(&id)),
            Error::AlreadyExists(id) => Error::AlreadyExists(service::shown_id(&id)),
            Error::Busy(id) => Error::Busy(service::shown_id(&id)),
            e => e,
        };
        let message = e.to_string();
        match e {
            Error::NotFound(_) => tonic::Status::not_found(message),
            Error::AlreadyExists(_) => tonic::Status::already_exists(message),
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            Error::Busy(_) => tonic::Status::aborted(message),
            Error::Full(_) => tonic::Status::failed_precondition(message),
            Error::RedisUnreachable { .. } | Error::Storage(_) => tonic::Status::unavailable(message),
        }
    }
}

/// Opens the configured backend; fails fast when it is unreachable.
pub async fn open_backend(config: &SessionStoreConfig) -> Result<Backend> {
    let ttl = config.session_ttl;
    let limits = Limits {
        sessions_per_user: config.max_sessions_per_user,
        session_messages: config.max_session_messages,
        session_bytes: config.max_session_bytes,
    };
    Ok(match config.session_store_type {
        SessionStoreType::Redis => Backend::Redis(redis::RedisBackend::connect(&config.redis, ttl, limits).await?),
        SessionStoreType::Memory => Backend::Embedded(embedded::EmbeddedBackend::in_memory(ttl, limits)?),
        SessionStoreType::Persistent => Backend::Embedded(embedded::EmbeddedBackend::open(&config.path, ttl, limits)?),
    })
}

/// What one user, and one session, may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub sessions_per_user: u32,
    pub session_messages: u32,
    /// Bytes of message text: a session holding this many takes no more appends.
    pub session_bytes: u64,
}

impl Limits {
    fn too_many_sessions(&self) -> Error {
        Error::Full(format!(
            "you hold {} sessions, the most this server keeps per user (session_store.max_sessions_per_user); \
             delete some (DELETE /api/sessions/{{id}}) or let idle ones expire",
            self.sessions_per_user
        ))
    }

    fn too_many_messages(&self, id: &str) -> Error {
        Error::Full(format!(
            "session {} is full: it holds the most messages this server keeps in one session ({}, \
             session_store.max_session_messages); start a new session",
            service::shown_id(id),
            self.session_messages
        ))
    }

    fn too_many_bytes(&self, id: &str) -> Error {
        Error::Full(format!(
            "session {} is full: it holds {} bytes of messages or more, the most this server keeps in one session \
             (session_store.max_session_bytes); start a new session",
            service::shown_id(id),
            self.session_bytes
        ))
    }
}

/// The bytes of message text `messages` hold, as the byte cap counts them.
pub(crate) fn text_bytes<'a>(contents: impl IntoIterator<Item = &'a str>) -> u64 {
    contents.into_iter().map(|c| c.len() as u64).sum()
}

/// A session counts as active (`moltbot_sessions_active`) this long after its last turn or read.
pub const ACTIVE_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// Serves the session store on `listener` until `shutdown` resolves; calls must present `credential`.
pub async fn run(
    listener: TcpListener,
    backend: Backend,
    credential: moltbot_proto::Credential,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let backend = std::sync::Arc::new(backend);
    let counting = tokio_util::sync::CancellationToken::new();
    // The sessions in use as a metric, every 10 s while the store serves.
    let counter =
        tokio::spawn(moltbot_telemetry::metrics::sample_every(std::time::Duration::from_secs(10), counting.clone(), {
            let backend = backend.clone();
            move || {
                let backend = backend.clone();
                async move {
                    if let Ok(active) = backend.active(ACTIVE_WINDOW.as_millis() as i64).await {
                        metrics::gauge!("moltbot_sessions_active").set(active as f64);
                    }
                }
            }
        }));
    let _stop_counting = counting.clone().drop_guard();
    let service =
        moltbot_proto::session::v1::session_store_server::SessionStoreServer::new(SessionStoreService::new(backend));
    let served = moltbot_proto::server::serve(listener, service, credential, shutdown).await;
    // The store is closed when this returns (an embedded one's file may be opened again at once).
    counting.cancel();
    let _ = counter.await;
    Ok(served?)
}

/// The session-store as its own process (the `moltbot-session-store` binary, `moltbot run session-store`):
/// telemetry, its metrics port, its backend, gRPC until SIGTERM.
pub async fn serve(config: &moltbot_config::Config) -> anyhow::Result<()> {
    config.internal.guard(config.session_store.listen, "session_store.listen")?;
    let (service, metrics) = ("moltbot-session-store", config.session_store.metrics_listen);
    let _tracing = moltbot_telemetry::start(config, service, metrics, "session_store.metrics_listen").await?;
    let backend = open_backend(&config.session_store).await?;
    let listener = moltbot_telemetry::bind(config.session_store.listen, "session_store.listen").await?;
    let credential = moltbot_proto::Credential::new(&config.internal.service_token);
    run(listener, backend, credential, moltbot_telemetry::shutdown_signal()).await
}
