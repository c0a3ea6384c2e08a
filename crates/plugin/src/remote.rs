//! Plugins in other processes, over the `moltbot.plugin.v1` gRPC contract: programs MoltBot starts and
//! supervises (Python modules through the `moltbot` package's plugin host, or any command), and plugin servers
//! that run on their own (an endpoint).
//!
//! A started plugin gets a Unix socket path in `MOLTBOT_PLUGIN_SOCKET` (`unix:/…/plugin.sock`), serves the
//! contract there, and writes one JSON line to stdout: `{"ready": true}`, or `{"error": {"kind": …, "message":
//! …}}` when it cannot load. It is restarted when it dies, and killed when MoltBot stops.

use std::{
    path::PathBuf,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use moltbot_proto::plugin::v1::{ExecuteRequest, InfoRequest, execute_response::Outcome, plugin_client::PluginClient};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
    sync::Mutex,
};
use tonic::transport::{Channel, Endpoint};

use crate::{Context, LoadCause, Plugin, PluginError, PluginInfo, async_trait};

/// How long a started plugin has to say it is ready (a Python interpreter importing grpc takes about a second).
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A program that serves a plugin, and what it needs.
#[derive(Debug, Clone)]
pub(crate) struct ProcessSpec {
    /// How logs name it.
    pub name: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// The fix when it does not start.
    pub start_fix: String,
    /// For a Python plugin: the interpreter and the directory (load errors name them).
    pub python: Option<(String, String)>,
}

/// A plugin in another process.
pub(crate) struct RemotePlugin {
    info: PluginInfo,
    target: Target,
}

enum Target {
    Endpoint(PluginClient<Channel>),
    Process(Arc<Supervised>),
}

struct Supervised {
    spec: ProcessSpec,
    running: Mutex<Option<Running>>,
}

struct Running {
    child: Child,
    client: PluginClient<Channel>,
    /// Holds the socket's directory while the process runs.
    _socket_dir: tempfile::TempDir,
}

impl RemotePlugin {
    /// Starts the program, waits until it is ready and asks for its information.
    pub async fn start(spec: ProcessSpec) -> Result<Self, LoadCause> {
        let running = start(&spec).await?;
        let mut client = running.client.clone();
        let info = info(&mut client).await.map_err(|detail| LoadCause::StartFailed {
            detail: format!("it did not describe itself: {detail}"),
            fix: "make sure it serves moltbot.plugin.v1's Info".into(),
        })?;
        let supervised = Supervised { spec, running: Mutex::new(Some(running)) };
        Ok(Self { info, target: Target::Process(Arc::new(supervised)) })
    }

    /// Connects to a running plugin server and asks for its information.
    pub async fn connect(url: &str) -> Result<Self, LoadCause> {
        let unreachable = |detail: String| LoadCause::Unreachable { endpoint: url.to_owned(), detail };
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|e| unreachable(moltbot_proto::error_chain(&e)))?;
        let mut client = PluginClient::new(channel);
        let info = info(&mut client).await.map_err(unreachable)?;
        Ok(Self { info, target: Target::Endpoint(client) })
    }
}

#[async_trait]
impl Plugin for RemotePlugin {
    fn info(&self) -> PluginInfo {
        self.info.clone()
    }

    async fn execute(&self, ctx: &Context) -> Result<Value, PluginError> {
        let request = ExecuteRequest {
            arguments_json: Value::Object(ctx.arguments.clone()).to_string(),
            session_id: ctx.session_id.clone(),
            user_id: ctx.user_id.clone(),
            settings_json: ctx.settings.to_json(),
            request_id: ctx.request_id.clone(),
        };
        let (mut client, supervised) = match &self.target {
            Target::Endpoint(client) => (client.clone(), None),
            Target::Process(s) => (s.client().await?, Some(s)),
        };
        let response = match client.execute(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                if let Some(s) = supervised
                    && s.stopped_within(Duration::from_millis(500)).await
                {
                    // Back before the next call, not during it.
                    let s = Arc::clone(s);
                    tokio::spawn(async move { s.client().await });
                    return Err(PluginError::Crashed(status.message().to_owned()));
                }
                return Err(PluginError::Failed(format!("the plugin failed: {}", status.message())));
            }
        };
        match response.outcome {
            Some(Outcome::ResultJson(json)) => serde_json::from_str(&json)
                .map_err(|e| PluginError::Failed(format!("the plugin's result is not JSON: {e}"))),
            Some(Outcome::Error(message)) => Err(PluginError::Failed(message)),
            None => Err(PluginError::Failed("the plugin answered neither a result nor an error".into())),
        }
    }
}

impl Supervised {
    /// The running process's client, after starting it again if it has died.
    async fn client(&self) -> Result<PluginClient<Channel>, PluginError> {
        let mut running = self.running.lock().await;
        if let Some(r) = running.as_mut() {
            match r.child.try_wait() {
                Ok(None) => return Ok(r.client.clone()),
                status => {
                    tracing::warn!(plugin = %self.spec.name, ?status, "the plugin's process has stopped; restarting it")
                }
            }
        }
        *running = None;
        let started = Instant::now();
        let fresh = start(&self.spec).await.map_err(|cause| {
            PluginError::Crashed(format!("its process stopped and could not be restarted: {cause}"))
        })?;
        tracing::info!(plugin = %self.spec.name, took = ?started.elapsed(), "the plugin's process is back");
        let client = fresh.client.clone();
        *running = Some(fresh);
        Ok(client)
    }

    /// Whether the process has stopped, or stops within `grace`: a call's broken connection can be seen before
    /// the process's exit is.
    async fn stopped_within(&self, grace: Duration) -> bool {
        let until = Instant::now() + grace;
        loop {
            let stopped = {
                let mut running = self.running.lock().await;
                running.as_mut().is_none_or(|r| !matches!(r.child.try_wait(), Ok(None)))
            };
            if stopped || Instant::now() >= until {
                return stopped;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn info(client: &mut PluginClient<Channel>) -> Result<PluginInfo, String> {
    let info = client.info(InfoRequest {}).await.map_err(|s| s.message().to_owned())?.into_inner();
    let parameters = match info.parameters_json.trim() {
        "" => serde_json::json!({ "type": "object" }),
        json => serde_json::from_str(json).map_err(|e| format!("its parameters are not JSON: {e}"))?,
    };
    Ok(PluginInfo { name: info.name, version: info.version, description: info.description, parameters })
}

/// What a starting plugin writes first.
#[derive(serde::Deserialize)]
struct Hello {
    #[serde(default)]
    ready: bool,
    error: Option<StartError>,
}

#[derive(serde::Deserialize)]
struct StartError {
    kind: String,
    message: String,
    #[serde(default)]
    module: String,
    #[serde(default)]
    class: String,
}

async fn start(spec: &ProcessSpec) -> Result<Running, LoadCause> {
    let failed = |detail: String| LoadCause::StartFailed { detail, fix: spec.start_fix.clone() };
    let socket_dir = tempfile::Builder::new().prefix("moltbot-plugin-").tempdir().map_err(|e| failed(e.to_string()))?;
    let socket = socket_dir.path().join("plugin.sock");
    let (program, args) = spec.argv.split_first().ok_or_else(|| failed("no program to run".into()))?;
    let mut child = Command::new(program)
        .args(args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env("MOLTBOT_PLUGIN_SOCKET", format!("unix:{}", socket.display()))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("`{program}` could not be started: {e}")))?;
    let mut stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
    let stderr = child.stderr.take().expect("piped");
    let (tail_tx, tail) = tokio::sync::oneshot::channel();
    tokio::spawn(log_lines(spec.name.clone(), stderr, tail_tx));
    let first = tokio::time::timeout(READY_WITHIN, stdout.next_line()).await;
    let line = match first {
        Err(_) => return Err(failed(format!("it did not say it was ready within {READY_WITHIN:?}"))),
        Ok(Ok(Some(line))) => line,
        Ok(_) => {
            let status = child.wait().await.map(|s| s.to_string()).unwrap_or_default();
            let said = tail.await.unwrap_or_default();
            return Err(failed(format!("it exited ({status}) before it was ready; it said: {}", said.trim())));
        }
    };
    tokio::spawn(async move {
        let mut stdout = stdout;
        while let Ok(Some(line)) = stdout.next_line().await {
            tracing::info!(target: "moltbot_plugin::output", "{line}");
        }
    });
    let hello: Hello = serde_json::from_str(&line).map_err(|_| {
        failed(format!("its first line was not the ready message: {}", line.chars().take(200).collect::<String>()))
    })?;
    if let Some(e) = hello.error {
        let (python, dir) = spec.python.clone().unwrap_or_default();
        return Err(match e.kind.as_str() {
            "module_not_found" => LoadCause::ModuleNotFound { module: e.module, dir },
            "missing_dependency" => {
                let package = if e.module == "grpc" { "grpcio".to_owned() } else { e.module.clone() };
                LoadCause::MissingDependency { detail: e.message, package, python }
            }
            "no_plugin_class" => LoadCause::NoPluginClass,
            "no_plugin_info" => LoadCause::NoPluginInfo { class: e.class },
            "invalid_info" => LoadCause::InvalidInfo {
                detail: e.message,
                fix: "return a dict with name, version, description and parameters from get_plugin_info()".into(),
            },
            _ => failed(e.message),
        });
    }
    if !hello.ready {
        return Err(failed(format!("its first line was not the ready message: {line}")));
    }
    let path = socket.clone();
    let channel = Endpoint::from_static("http://plugin.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| {
            failed(format!("its socket {} does not answer: {}", socket.display(), moltbot_proto::error_chain(&e)))
        })?;
    Ok(Running { child, client: PluginClient::new(channel), _socket_dir: socket_dir })
}

/// Logs a plugin's stderr; its first lines also go to `tail` when it closes, for the error when the plugin stops
/// before it is ready.
async fn log_lines(name: String, from: impl AsyncRead + Unpin, tail: tokio::sync::oneshot::Sender<String>) {
    let mut lines = BufReader::new(from).lines();
    let mut kept = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::warn!(plugin = %name, "{line}");
        if kept.len() < 2000 {
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    let _ = tail.send(kept);
}
