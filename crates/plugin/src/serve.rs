//! Serving a Rust [`Plugin`] over `moltbot.plugin.v1`, so it can run as a process of its own (a manifest's
//! `command`) or as a plugin server (a manifest's `endpoint`).

use std::sync::Arc;

use moltbot_proto::plugin::v1::{
    ExecuteRequest, ExecuteResponse, InfoRequest, PluginInfo as InfoMessage,
    execute_response::Outcome,
    plugin_server::{Plugin as PluginService, PluginServer},
};
use serde_json::{Map, Value};
use tonic::{Request, Response, Status};

use crate::{Context, Plugin, PluginError, Settings};

struct Served(Arc<dyn Plugin>);

#[tonic::async_trait]
impl PluginService for Served {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoMessage>, Status> {
        let info = self.0.info();
        Ok(Response::new(InfoMessage {
            name: info.name,
            version: info.version,
            description: info.description,
            parameters_json: info.parameters.to_string(),
        }))
    }

    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<ExecuteResponse>, Status> {
        let r = request.into_inner();
        let parse = |json: &str| -> Result<Map<String, Value>, PluginError> {
            match json.trim() {
                "" => Ok(Map::new()),
                json => serde_json::from_str(json).map_err(|e| PluginError::InvalidArguments(e.to_string())),
            }
        };
        let outcome = async {
            let arguments = parse(&r.arguments_json)?;
            let settings = parse(&r.settings_json)?
                .into_iter()
                .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                .collect();
            let ctx = Context {
                arguments,
                session_id: r.session_id,
                user_id: r.user_id,
                request_id: r.request_id,
                settings: Settings::new(settings),
            };
            self.0.execute(&ctx).await
        }
        .await;
        let outcome = match outcome {
            Ok(value) => Outcome::ResultJson(value.to_string()),
            Err(e) => Outcome::Error(e.to_string()),
        };
        Ok(Response::new(ExecuteResponse { outcome: Some(outcome) }))
    }
}

/// Serves `plugin` on `listener` until the process ends.
pub async fn serve_on(
    plugin: Arc<dyn Plugin>,
    listener: tokio::net::TcpListener,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(PluginServer::new(Served(plugin)))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
}

/// Serves `plugin` the way MoltBot starts a plugin process: on the Unix socket in `MOLTBOT_PLUGIN_SOCKET`, after
/// writing `{"ready": true}` to stdout.
pub async fn serve_from_env(plugin: Arc<dyn Plugin>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let address = std::env::var("MOLTBOT_PLUGIN_SOCKET").map_err(|_| "MOLTBOT_PLUGIN_SOCKET is not set")?;
    let path = address.strip_prefix("unix:").ok_or("MOLTBOT_PLUGIN_SOCKET is not unix:PATH")?;
    let listener = tokio::net::UnixListener::bind(path)?;
    println!("{}", serde_json::json!({ "ready": true, "name": plugin.info().name }));
    tonic::transport::Server::builder()
        .add_service(PluginServer::new(Served(plugin)))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await?;
    Ok(())
}
