//! Test harness: real `redis-server` and `nats-server -js` processes on free ports with temporary data
//! directories, the real model, and HTTP helpers. Servers stop when their handle drops.

use std::{
    net::TcpListener as StdListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use moltbot_config::{Config, QueueConfig};
use serde_json::Value;

pub mod hosts;

/// The default model; panics with what to run when it is missing.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("MOLTBOT_MODEL_PROVIDER__MODEL_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(moltbot_config::default_model_path);
    assert!(path.is_file(), "model missing at {}: run `cargo xtask model` (cargo xtask test does)", path.display());
    path
}

/// A configuration for tests: the real model, short answers, a fresh embedded store under `dir`.
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.model_provider.model_path = model_path();
    config.model_provider.max_tokens = 24;
    config.session_store.session_store_type = moltbot_config::SessionStoreType::Persistent;
    config.session_store.path = dir.join("sessions.redb");
    config.dialogue_manager.worker_timeout = 5;
    config
}

/// A `remote_api` model served as `name`, called `remote_model` at the OpenAI-compatible `endpoint` (…/v1).
pub fn remote_api(
    name: &str,
    endpoint: &str,
    remote_model: &str,
    max_tokens: u32,
) -> moltbot_config::ModelProviderConfig {
    moltbot_config::ModelProviderConfig {
        kind: Some(moltbot_config::ProviderType::RemoteApi),
        model_name: name.into(),
        endpoint_url: endpoint.into(),
        remote_model: remote_model.into(),
        max_tokens,
        max_retries: 2,
        connect_timeout: 2,
        read_timeout: 20,
        ..Default::default()
    }
}

/// The counters of the worker at `url` once `done` holds for them, or after 10 s (the caller's asserts then say
/// what is wrong). A worker counts a job just after publishing its last event, so a count read the moment an
/// answer arrives can be one short.
pub async fn worker_when(
    url: &str,
    done: impl Fn(&moltbot_proto::inference::v1::ModelInfo) -> bool,
) -> moltbot_proto::inference::v1::ModelInfo {
    worker_with_credential_when(url, &moltbot_proto::Credential::none(), done).await
}

pub async fn worker_with_credential_when(
    url: &str,
    credential: &moltbot_proto::Credential,
    done: impl Fn(&moltbot_proto::inference::v1::ModelInfo) -> bool,
) -> moltbot_proto::inference::v1::ModelInfo {
    use moltbot_proto::inference::v1::{GetModelInfoRequest, inference_client::InferenceClient};
    let channel = moltbot_proto::Replicas::lazy(url).expect("a worker URL").with_credential(credential);
    let mut client = InferenceClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = client.get_model_info(GetModelInfoRequest {}).await.expect("worker gRPC").into_inner();
        if done(&info) || Instant::now() > deadline {
            return info;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The services the gRPC port at `$url` lists through server reflection, sorted, asked in reflection version `$v`
/// (`v1` or `v1alpha`).
#[macro_export]
macro_rules! listed_services {
    ($v:ident, $url:expr) => {{
        use tonic_reflection::pb::$v::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let channel = tonic::transport::Endpoint::from_shared($url.to_owned()).expect("a URL").connect().await;
        let mut client = ServerReflectionClient::new(channel.expect("the gRPC port answers"));
        let ask = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers =
            client.server_reflection_info(futures::stream::iter([ask])).await.expect("reflection").into_inner();
        match answers.message().await.expect("an answer").and_then(|a| a.message_response) {
            Some(MessageResponse::ListServicesResponse(list)) => {
                let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
                names.sort();
                names
            }
            other => panic!("not a list of services: {other:?}"),
        }
    }};
}

/// The embedded shape (`moltbot serve`) on a free loopback port, with `test_config` changed by `configure`.
/// The directory holds its store: keep it as long as the service.
pub async fn embedded(configure: impl FnOnce(&mut Config)) -> (moltbot::Embedded, Http, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = test_config(dir.path());
    configure(&mut config);
    let moltbot = moltbot::start(config, listener().await).await.expect("MoltBot starts");
    let http = Http::new(moltbot.gateway_addr);
    (moltbot, http, dir)
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

pub async fn listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port")
}

type Identify = fn(&mut std::net::TcpStream, &str) -> bool;

/// A server process killed on drop, with its data directory.
pub struct Server {
    child: Child,
    pub port: u16,
    program: &'static str,
    args: Vec<String>,
    env: Vec<(String, String)>,
    identify: Identify,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(program: &str, args: &[String], env: &[(String, String)]) -> Child {
    let mut command = Command::new(program);
    command.args(args).envs(env.iter().map(|(k, v)| (k, v))).stdout(Stdio::null()).stderr(Stdio::null());
    command.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot start {program} ({e}); install it: \
             apt-get install -y redis-server nginx-light chromium chromium-driver; nats-server comes from `cargo xtask test` \
             (.ci/run does both)"
        )
    })
}

impl Server {
    /// The temp dir's name, which the server reports back to prove it is ours.
    fn tag(&self) -> String {
        self.dir.path().file_name().and_then(|n| n.to_str()).expect("a UTF-8 temp dir").to_owned()
    }

    /// Waits up to 10 s for this server to answer on its port; false when it exited or never answered.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                stream.set_read_timeout(Some(Duration::from_secs(1))).expect("a read timeout");
                if (self.identify)(&mut stream, &self.tag()) {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Kills the server without warning (SIGKILL, as a crash would) and starts it again on the same port and
    /// data directory.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// Kills the server without warning (SIGKILL); it stays down until `start_again`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a killed server again on its port and data directory.
    pub fn start_again(&mut self) {
        self.child = start(self.program, &self.args, &self.env);
        assert!(self.wait_ready(), "{} did not come back on port {}", self.program, self.port);
    }
}

/// Starts `program` on a free port and returns once the server answering there is this one: `identify` gets a fresh
/// connection and says whether the server on it is ours. A port lost to a race (another server took it, or a probe
/// connected to itself) makes the child exit or fail `identify`; then it is retried on another port.
fn spawn(program: &'static str, args: impl Fn(u16, &str) -> Vec<String>, identify: Identify) -> Server {
    spawn_with_env(program, args, |_| vec![], identify)
}

/// `spawn` with environment variables that may depend on the temp dir's name (the tag).
fn spawn_with_env(
    program: &'static str,
    args: impl Fn(u16, &str) -> Vec<String>,
    env: impl Fn(&str) -> Vec<(String, String)>,
    identify: Identify,
) -> Server {
    for _ in 0..5 {
        let (port, dir) = (free_port(), tempfile::tempdir().expect("temp dir"));
        let args = args(port, &dir.path().display().to_string());
        let env = env(&dir.path().file_name().expect("a temp dir name").to_string_lossy());
        let mut server = Server { child: start(program, &args, &env), port, program, args, env, identify, dir };
        if server.wait_ready() {
            return server;
        }
    }
    panic!("{program} did not start listening on a free port in 5 tries");
}

/// Reads from `stream` until `needle` shows up, the peer stops, or the read times out.
fn reply_contains(stream: &mut std::net::TcpStream, needle: &str) -> bool {
    use std::io::Read;
    let (mut seen, mut buf) = (Vec::new(), [0u8; 1024]);
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        seen.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&seen).contains(needle) {
            return true;
        }
    }
    false
}

impl Server {
    /// Redis without persistence; ours when `CONFIG GET dir` names our temp dir.
    pub fn redis() -> Self {
        Self::redis_with(&["--save", ""])
    }

    /// Redis with append-only-file persistence, fsynced on every write: what keeps sessions across a restart.
    pub fn redis_with_aof() -> Self {
        Self::redis_with(&["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
    }

    fn redis_with(extra: &'static [&'static str]) -> Self {
        spawn(
            "redis-server",
            move |port, dir| {
                let mut args: Vec<String> =
                    ["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir", dir].map(Into::into).into();
                args.extend(extra.iter().map(|a| a.to_string()));
                args
            },
            |stream, tag| {
                use std::io::Write;
                stream.write_all(b"CONFIG GET dir\r\n").is_ok() && reply_contains(stream, tag)
            },
        )
    }

    /// NATS with JetStream; ours when its greeting carries our server name.
    pub fn nats() -> Self {
        spawn(
            "nats-server",
            |port, dir| {
                let name =
                    std::path::Path::new(dir).file_name().expect("a temp dir name").to_string_lossy().into_owned();
                ["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd", dir, "-n", &name].map(Into::into).into()
            },
            |stream, tag| reply_contains(stream, &format!("\"server_name\":\"{tag}\"")),
        )
    }

    /// Nginx as a load balancer over the gateways on `upstreams` (what an ingress does): a request that cannot
    /// connect to one gateway goes to the next; answers stream through unbuffered. Ours when `/nginx-tag`
    /// answers our temp dir's name.
    pub fn nginx(upstreams: &[u16]) -> Self {
        let servers: String = upstreams.iter().map(|p| format!("server 127.0.0.1:{p} max_fails=0; ")).collect();
        let program = if std::path::Path::new("/usr/sbin/nginx").exists() { "/usr/sbin/nginx" } else { "nginx" };
        spawn(
            program,
            move |port, dir| {
                let tag =
                    std::path::Path::new(dir).file_name().expect("a temp dir name").to_string_lossy().into_owned();
                let conf = format!(
                    "daemon off; master_process off; worker_processes 1; pid {dir}/nginx.pid; error_log {dir}/error.log warn;
                     events {{ worker_connections 1024; }}
                     http {{
                       access_log off;
                       client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
                       uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
                       upstream gateways {{ {servers} }}
                       server {{
                         listen 127.0.0.1:{port};
                         client_max_body_size 64m;
                         location = /nginx-tag {{ return 200 '{tag}'; }}
                         location / {{
                           proxy_pass http://gateways; proxy_http_version 1.1; proxy_set_header Connection '';
                           proxy_buffering off; proxy_read_timeout 300s; proxy_next_upstream error timeout;
                         }}
                       }}
                     }}"
                );
                let path = format!("{dir}/nginx.conf");
                std::fs::write(&path, conf).expect("write nginx.conf");
                ["-c", &path, "-p", dir, "-e", &format!("{dir}/error.log")].map(Into::into).into()
            },
            |stream, tag| {
                use std::io::Write;
                stream.write_all(b"GET /nginx-tag HTTP/1.0\r\n\r\n").is_ok() && reply_contains(stream, tag)
            },
        )
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Redis as `deploy/k8s/base/redis.yaml` runs it: the manifest's own arguments (append-only file, the default
    /// user off, the ACL user `moltbot` limited to `moltbot:*` keys), on a free port and a temp dir. The password is
    /// the temp dir's name, so the AUTH that proves the server ours also proves the ACL user works.
    pub fn redis_as_deployed() -> Self {
        let manifest = std::fs::read_to_string(repo_root().join("deploy/k8s/base/redis.yaml")).expect("redis.yaml");
        let statefulset = serde_yaml::Deserializer::from_str(&manifest)
            .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("YAML"))
            .find(|o| o["kind"] == "StatefulSet")
            .expect("redis.yaml has the StatefulSet");
        let args: Vec<String> = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("the container's args")
            .iter()
            .map(|a| a.as_str().expect("string args").to_owned())
            .collect();
        assert!(args.iter().any(|a| a == ">$(REDIS_PASSWORD)"), "the manifest sets the ACL user's password: {args:?}");
        spawn(
            "redis-server",
            move |port, dir| {
                let tag = std::path::Path::new(dir).file_name().expect("a temp dir").to_string_lossy().into_owned();
                // The volume's path (`--dir /data`) becomes the temp dir.
                let volume = args.iter().position(|a| a == "--dir").expect("the manifest names its dir");
                let mut args: Vec<String> = (args.iter().enumerate())
                    .filter(|(i, _)| *i != volume && *i != volume + 1)
                    .map(|(_, a)| a.replace("$(REDIS_PASSWORD)", &tag))
                    .collect();
                args.extend(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir", dir].map(Into::into));
                args
            },
            |stream, tag| {
                use std::io::Write;
                stream.write_all(format!("AUTH moltbot {tag}\r\n").as_bytes()).is_ok() && reply_contains(stream, "+OK")
            },
        )
    }

    /// NATS as `deploy/k8s/base/nats/` configures it: JetStream, and the users and subject permissions of
    /// `auth.conf` (copied beside a config of the test's: port, store, log file), their passwords from the
    /// environment as in the StatefulSet. The users' passwords derive from the temp dir's name.
    pub fn nats_as_deployed() -> Self {
        spawn_with_env(
            "nats-server",
            |port, dir| {
                let name =
                    std::path::Path::new(dir).file_name().expect("a temp dir name").to_string_lossy().into_owned();
                std::fs::copy(repo_root().join("deploy/k8s/base/nats/auth.conf"), format!("{dir}/auth.conf"))
                    .expect("copy auth.conf");
                let conf = format!(
                    "listen: \"127.0.0.1:{port}\"\nserver_name: \"{name}\"\nlog_file: \"{dir}/nats.log\"\n\
                     jetstream {{ store_dir: \"{dir}\" }}\ninclude ./auth.conf\n"
                );
                std::fs::write(format!("{dir}/nats.conf"), conf).expect("write nats.conf");
                ["-c", &format!("{dir}/nats.conf")].map(Into::into).into()
            },
            |tag| {
                vec![
                    ("MOLTBOT_NATS_DIALOGUE_MANAGER_PASSWORD".into(), format!("dm-{tag}")),
                    ("MOLTBOT_NATS_WORKER_PASSWORD".into(), format!("worker-{tag}")),
                ]
            },
            |stream, tag| reply_contains(stream, &format!("\"server_name\":\"{tag}\"")),
        )
    }

    /// The password of a deployed NATS user (`dialogue-manager` or `worker`).
    pub fn nats_password(&self, user: &str) -> String {
        let prefix = if user == "dialogue-manager" { "dm" } else { user };
        format!("{prefix}-{}", self.tag())
    }

    /// Nginx running `deploy/nginx/moltbot.conf` in front of the gateways on `gateways`: the shipped file with only
    /// what a deployment changes replaced (the gateways, listen addresses, certificate and log paths), and a
    /// certificate for 127.0.0.1 from a CA of the test's, made with openssl. `port` is its plain-HTTP port; `tls_port` and
    /// `certificate` reach the HTTPS one.
    pub fn nginx_as_deployed(gateways: &[std::net::SocketAddr]) -> Self {
        let shipped = std::fs::read_to_string(repo_root().join("deploy/nginx/moltbot.conf")).expect("moltbot.conf");
        let upstreams: String =
            gateways.iter().map(|a| format!("    server {a} max_fails=1 fail_timeout=10s;\n")).collect();
        let program = if std::path::Path::new("/usr/sbin/nginx").exists() { "/usr/sbin/nginx" } else { "nginx" };
        spawn(
            program,
            move |port, dir| {
                let tls_port = free_port();
                std::fs::write(format!("{dir}/tls_port"), tls_port.to_string()).expect("write tls_port");
                std::fs::create_dir_all(format!("{dir}/tls")).expect("tls dir");
                // A CA of the test's, and the server's certificate signed by it (a client trusts the CA).
                let openssl = |subject: &str, out: &str, extra: &[&str]| {
                    let made = Command::new("openssl")
                        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
                        .args(["-days", "1", "-subj", subject])
                        .args(["-keyout", &format!("{dir}/tls/{out}.key"), "-out", &format!("{dir}/tls/{out}.crt")])
                        .args(extra)
                        .stderr(Stdio::null())
                        .status()
                        .expect("openssl runs");
                    assert!(made.success(), "openssl made no certificate");
                };
                openssl("/CN=MoltBot test CA", "ca", &[]);
                let (ca, ca_key) = (format!("{dir}/tls/ca.crt"), format!("{dir}/tls/ca.key"));
                let leaf = ["-CA", &ca, "-CAkey", &ca_key, "-addext", "subjectAltName=IP:127.0.0.1"];
                openssl(
                    "/CN=127.0.0.1",
                    "moltbot",
                    &[&leaf[..], &["-addext", "basicConstraints=critical,CA:FALSE"]].concat(),
                );
                let mut conf = shipped.clone();
                let gateways_start = conf.find("    server 10.0.0.11").expect("the shipped gateways");
                let gateways_end = conf[gateways_start..].find("    # Connections").expect("after the gateways");
                conf.replace_range(gateways_start..gateways_start + gateways_end, &upstreams);
                for (from, to) in [
                    ("listen 80;", format!("listen 127.0.0.1:{port};")),
                    ("listen 443 ssl http2;", format!("listen 127.0.0.1:{tls_port} ssl http2;")),
                    ("/etc/nginx/tls/", format!("{dir}/tls/")),
                    ("/var/log/nginx/", format!("{dir}/")),
                ] {
                    assert!(conf.contains(from), "deploy/nginx/moltbot.conf no longer has `{from}`");
                    conf = conf.replace(from, &to);
                }
                std::fs::write(format!("{dir}/moltbot.conf"), conf).expect("write moltbot.conf");
                let main = format!(
                    "daemon off; master_process off; worker_processes 1; pid {dir}/nginx.pid;
                     error_log {dir}/error.log warn;
                     events {{ worker_connections 1024; }}
                     http {{
                       client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
                       uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
                       include {dir}/moltbot.conf;
                     }}"
                );
                std::fs::write(format!("{dir}/nginx.conf"), main).expect("write nginx.conf");
                ["-c", &format!("{dir}/nginx.conf"), "-p", dir, "-e", &format!("{dir}/error.log")]
                    .map(Into::into)
                    .into()
            },
            // Plain HTTP redirects to HTTPS on the same host: a Host of our tag comes back in the Location (which
            // nginx writes in lower case).
            |stream, tag| {
                use std::io::Write;
                let probe = format!("GET / HTTP/1.0\r\nHost: {tag}\r\n\r\n");
                let location = format!("https://{}/", tag.to_lowercase());
                stream.write_all(probe.as_bytes()).is_ok() && reply_contains(stream, &location)
            },
        )
    }

    /// Nginx as deployed: its HTTPS port.
    pub fn tls_port(&self) -> u16 {
        std::fs::read_to_string(self.dir.path().join("tls_port")).expect("tls_port").parse().expect("a port")
    }

    /// Nginx as deployed: the CA that signed its certificate (PEM), for a client to trust.
    pub fn certificate(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("tls/ca.crt")).expect("the test CA's certificate")
    }

    /// A file the server wrote into its temp dir (Nginx's access log `moltbot.access.log`, NATS's `nats.log`).
    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// The address with a deployed NATS user's credentials, as a MoltBot service takes it.
    pub fn nats_url_as(&self, user: &str) -> String {
        format!("nats://{user}:{}@127.0.0.1:{}", self.nats_password(user), self.port)
    }

    /// The Redis address with the deployed ACL user's credentials.
    pub fn redis_url_as_deployed(&self) -> String {
        format!("redis://moltbot:{}@127.0.0.1:{}", self.tag(), self.port)
    }
}

/// The repository's root (deploy/ is read from there).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the repository").to_path_buf()
}

/// A headless Chromium driven over WebDriver (`chromedriver` on a free port). Call `close` at the end of a
/// test: it ends the browser; dropping only kills the driver.
pub struct Browser {
    pub page: fantoccini::Client,
    _driver: Server,
}

impl Browser {
    pub async fn start() -> Self {
        let driver = spawn(
            "chromedriver",
            |port, _| vec![format!("--port={port}")],
            |stream, _| {
                use std::io::Write;
                let status = b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
                stream.write_all(status).is_ok() && reply_contains(stream, "ChromeDriver ready")
            },
        );
        let mut capabilities = serde_json::Map::new();
        let args =
            ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"];
        capabilities.insert("goog:chromeOptions".into(), serde_json::json!({ "args": args }));
        let page = fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .unwrap_or_else(|e| panic!("chromedriver could not start chromium ({e}); apt-get install -y chromium"));
        Self { page, _driver: driver }
    }

    /// Runs `script` (a function body) in the page every 50 ms until it returns something other than null,
    /// false or undefined, and returns that; panics after `secs` seconds with `what` and what the page shows.
    pub async fn until(&self, secs: u64, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let value = self.page.execute(script, vec![]).await.unwrap_or_else(|e| panic!("{what}: {e}"));
            if !matches!(value, Value::Null | Value::Bool(false)) {
                return value;
            }
            if Instant::now() > deadline {
                let shown = self.page.execute("return document.body.innerText", vec![]).await.ok();
                panic!("{what}: not within {secs} s; the page shows {shown:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn close(self) {
        self.page.close().await.expect("the browser closes");
    }
}

/// A client for one gateway.
#[derive(Clone)]
pub struct Http {
    pub base: String,
    pub client: reqwest::Client,
}

impl Http {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self { base: format!("http://{addr}"), client: reqwest::Client::new() }
    }

    /// POSTs JSON with headers; returns status, headers and the body as JSON (or as a string).
    pub async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        self.try_post(path, headers, body).await.expect("gateway answers")
    }

    /// Like `post`, but returns transport errors instead of panicking.
    pub async fn try_post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<(u16, reqwest::header::HeaderMap, Value), reqwest::Error> {
        let mut request = self.client.post(format!("{}{path}", self.base)).header("content-type", "application/json");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.body(body.to_owned()).send().await?;
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        let text = response.text().await?;
        Ok((status, headers, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    /// POSTs JSON and returns the response as soon as its headers arrive, for reading a stream piece by piece.
    pub async fn stream(&self, path: &str, body: &str) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("gateway answers")
    }

    /// Any method, with headers and an optional JSON body; the status and the JSON answer (Null when empty).
    pub async fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_owned());
        }
        let response = request.send().await.expect("gateway answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(format!("{}{path}", self.base)).send().await.expect("gateway answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_owned)).collect()
}

/// The checks both shapes must pass: a two-turn conversation whose second prompt holds the first turn.
/// Returns the session id.
pub async fn two_turn_conversation(http: &Http) -> String {
    let (status, _, first) = http
        .post(
            "/api/chat",
            &[("x-user-id", "alice"), ("x-dialogue-mode", "multi")],
            r#"{"message":"What is 2+2?","temperature":0}"#,
        )
        .await;
    assert_eq!(status, 200, "{first}");
    let session = first["session_id"].as_str().expect("a session id").to_owned();
    assert!(!first["message"]["content"].as_str().unwrap().is_empty(), "{first}");
    let first_prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let first_answer = first["usage"]["completion_tokens"].as_u64().unwrap();

    // The second turn goes through the OpenAI endpoint with the session header, streaming.
    let body = r#"{"model":"smollm2-135m-instruct","messages":[{"role":"user","content":"And 3+3?"}],"stream":true,"temperature":0,"stream_options":{"include_usage":true}}"#;
    let (status, headers, streamed) =
        http.post("/v1/chat/completions", &[("x-user-id", "alice"), ("x-session-id", &session)], body).await;
    assert_eq!(status, 200, "{streamed}");
    assert_eq!(headers["content-type"], "text/event-stream");
    let events = sse_data(streamed.as_str().unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let chunks: Vec<Value> = events.iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(!text.is_empty(), "{events:?}");
    let usage = chunks.iter().find_map(|c| c.get("usage").filter(|u| !u.is_null())).expect("a usage chunk");
    // The second prompt holds the first question and answer, plus the new question.
    let second_prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert!(
        second_prompt > first_prompt + first_answer,
        "turn 2 prompt {second_prompt} vs turn 1 {first_prompt}+{first_answer}"
    );
    session
}

/// A service of the distributed shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    SessionStore,
    Worker(String),
    DialogueManager,
    Gateway,
}

/// A running service: its own stop token, so one can be stopped (and drained) while the others serve.
struct Running {
    role: Role,
    addr: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits for the service to end after its stop; any error fails the test. Returns its role.
    async fn stopped(self) -> Role {
        let result = self.task.await.expect("service task");
        result.unwrap_or_else(|e| panic!("{:?} stops cleanly: {e:#}", self.role));
        self.role
    }
}

/// The distributed shape in one test process: every service its own server on its own port, the
/// session-store on a real Redis, workers pulling from a real NATS JetStream. With replicas, each service
/// runs more than once, clients reach the gateways through a real Nginx, and the gateways and
/// dialogue-managers name all replicas of what they call.
pub struct Cluster {
    pub http: Http,
    pub config: Config,
    pub worker_urls: Vec<String>,
    /// The session-store replicas, comma-separated (what `dialogue_manager.session_store_url` takes).
    pub session_store_url: String,
    dialogue_manager_url: String,
    services: Vec<Running>,
    /// Workers that serve another model than `config.model_provider`'s, by id.
    providers: std::collections::HashMap<String, moltbot_config::ModelProviderConfig>,
    pub redis: Server,
    pub nats: Server,
    /// With NATS as deployed: each role's own NATS address (dialogue-manager, worker).
    nats_users: Option<(String, String)>,
    pub nginx: Option<Server>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts Redis (with AOF persistence), NATS, the session-store, `workers` inference workers, the dialogue-manager and the gateway.
    pub async fn start(workers: usize, configure: impl FnOnce(&mut Config)) -> Self {
        Self::start_replicated(1, workers, configure).await
    }

    /// Like `start`, with `replicas` session-stores, dialogue-managers and gateways, and Nginx in front of the
    /// gateways when there is more than one.
    pub async fn start_replicated(replicas: usize, workers: usize, configure: impl FnOnce(&mut Config)) -> Self {
        let (redis, nats) = (Server::redis_with_aof(), Server::nats());
        let (redis_url, nats_url) = (redis.redis_url(), nats.nats_url());
        Self::start_on(redis, nats, None, replicas, workers, |c| {
            c.session_store.redis.url = redis_url;
            c.queue.nats_url = nats_url;
            configure(c);
        })
        .await
    }

    /// Like `start`, on Redis and NATS run as `deploy/k8s` runs them: each service with its own credentials (the
    /// Redis ACL user; the dialogue-manager's and the workers' NATS users with their subject permissions).
    pub async fn start_as_deployed(workers: usize, configure: impl FnOnce(&mut Config)) -> Self {
        let (redis, nats) = (Server::redis_as_deployed(), Server::nats_as_deployed());
        let redis_url = redis.redis_url_as_deployed();
        let users = (nats.nats_url_as("dialogue-manager"), nats.nats_url_as("worker"));
        let dialogue_manager = users.0.clone();
        Self::start_on(redis, nats, Some(users), 1, workers, |c| {
            c.session_store.redis.url = redis_url;
            c.queue.nats_url = dialogue_manager;
            configure(c);
        })
        .await
    }

    async fn start_on(
        redis: Server,
        nats: Server,
        nats_users: Option<(String, String)>,
        replicas: usize,
        workers: usize,
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path());
        config.session_store.session_store_type = moltbot_config::SessionStoreType::Redis;
        configure(&mut config);
        let mut cluster = Self {
            http: Http { base: String::new(), client: reqwest::Client::new() },
            config,
            worker_urls: vec![],
            session_store_url: String::new(),
            dialogue_manager_url: String::new(),
            services: vec![],
            providers: Default::default(),
            redis,
            nats,
            nats_users,
            nginx: None,
            _dir: dir,
        };
        let listeners = async |n: usize| {
            let mut out = vec![];
            for _ in 0..n {
                out.push(listener().await);
            }
            let urls: Vec<String> = out.iter().map(|l| format!("http://{}", l.local_addr().unwrap())).collect();
            (out, urls.join(","))
        };
        let (stores, urls) = listeners(replicas).await;
        cluster.session_store_url = urls;
        for l in stores {
            cluster.launch(Role::SessionStore, l).await;
        }
        for i in 0..workers {
            cluster.add_worker(&format!("worker-{i}")).await;
        }
        let (managers, urls) = listeners(replicas).await;
        cluster.dialogue_manager_url = urls;
        for l in managers {
            cluster.launch(Role::DialogueManager, l).await;
        }
        let (gateways, _) = listeners(replicas).await;
        let ports: Vec<u16> = gateways.iter().map(|l| l.local_addr().unwrap().port()).collect();
        for l in gateways {
            cluster.launch(Role::Gateway, l).await;
        }
        cluster.http = if replicas > 1 {
            let nginx = Server::nginx(&ports);
            let http = Http::new(([127, 0, 0, 1], nginx.port).into());
            cluster.nginx = Some(nginx);
            http
        } else {
            Http::new(([127, 0, 0, 1], ports[0]).into())
        };
        cluster
    }

    /// Starts `role` on `listener` with its own stop token.
    async fn launch(&mut self, role: Role, listener: tokio::net::TcpListener) {
        let addr = listener.local_addr().expect("a bound listener");
        let stop = tokio_util::sync::CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let mut config = self.config.clone();
        if let Some((dialogue_manager, worker)) = &self.nats_users {
            config.queue.nats_url = if matches!(role, Role::Worker(_)) { worker } else { dialogue_manager }.clone();
        }
        let task = match &role {
            Role::SessionStore => {
                let backend = moltbot_session_store::open_backend(&config.session_store).await.expect("Redis is up");
                tokio::spawn(moltbot_session_store::run(listener, backend, self.credential(), shutdown))
            }
            Role::Worker(id) => {
                let mut worker_config = config.inference_worker.clone();
                worker_config.worker_id = id.clone();
                let provider = self.providers.get(id).unwrap_or(&config.model_provider);
                let mut worker =
                    moltbot_inference_worker::Worker::load(provider, &worker_config).expect("the model loads");
                worker.credential = self.credential();
                let queue =
                    moltbot_queue::JobQueue::nats(&QueueConfig { max_pending_jobs: 64, ..config.queue.clone() })
                        .await
                        .expect("NATS");
                tokio::spawn(moltbot_inference_worker::run(listener, worker, queue, shutdown))
            }
            Role::DialogueManager => {
                let sessions =
                    moltbot_dialogue_manager::connect_session_store(&self.session_store_url, &self.credential())
                        .await
                        .expect("session-store is up");
                let queue = moltbot_queue::JobQueue::nats(&config.queue).await.expect("NATS");
                let plugins = moltbot_plugin::Plugins::load(&config.plugins).await.expect("the plugins load");
                let dialogue =
                    moltbot_dialogue_manager::DialogueService::new(&config, sessions, queue).with_plugins(plugins);
                tokio::spawn(moltbot_dialogue_manager::run(listener, dialogue, shutdown))
            }
            Role::Gateway => {
                let client = moltbot_gateway::dialogue_client(&self.dialogue_manager_url, &self.credential()).unwrap();
                tokio::spawn(async move { moltbot_gateway::run(listener, &config.gateway, client, shutdown).await })
            }
        };
        self.services.push(Running { role, addr, stop, task });
    }

    /// Starts one more inference worker with its own gRPC port.
    pub async fn add_worker(&mut self, id: &str) {
        let l = listener().await;
        self.worker_urls.push(format!("http://{}", l.local_addr().unwrap()));
        self.launch(Role::Worker(id.into()), l).await;
    }

    /// The dialogue-manager replicas' URLs, comma-separated (what `gateway.dialogue_manager_url` takes).
    pub fn dialogue_manager_url(&self) -> String {
        self.dialogue_manager_url.clone()
    }

    /// The cluster's service credential (`internal.service_token`; none unless the test set one).
    pub fn credential(&self) -> moltbot_proto::Credential {
        moltbot_proto::Credential::new(&self.config.internal.service_token)
    }

    /// Starts one more inference worker, serving `provider`'s model instead of the cluster's.
    pub async fn add_worker_serving(&mut self, id: &str, provider: moltbot_config::ModelProviderConfig) {
        self.providers.insert(id.to_owned(), provider);
        self.add_worker(id).await;
    }

    /// Every running service: its role and address, in start order.
    pub fn services(&self) -> Vec<(Role, std::net::SocketAddr)> {
        self.services.iter().map(|s| (s.role.clone(), s.addr)).collect()
    }

    /// Stops the service at `addr` the way SIGTERM does (it drains: running work finishes, new work goes
    /// elsewhere), then starts it again on the same port; returns how long the drain took.
    pub async fn restart(&mut self, addr: std::net::SocketAddr) -> Duration {
        let started = Instant::now();
        let role = self.stop_service(addr).await;
        let drained = started.elapsed();
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() > deadline => panic!("cannot bind {addr} again: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.launch(role, listener).await;
        drained
    }

    /// Stops the service at `addr` the way SIGTERM does and waits until it has drained; returns its role.
    pub async fn stop_service(&mut self, addr: std::net::SocketAddr) -> Role {
        let at = self.services.iter().position(|s| s.addr == addr).expect("a running service at that address");
        let service = self.services.remove(at);
        service.stop.cancel();
        service.stopped().await
    }

    /// Each worker's model info and counters, asked over gRPC.
    pub async fn worker_info(&self) -> Vec<moltbot_proto::inference::v1::ModelInfo> {
        let mut out = vec![];
        for url in &self.worker_urls {
            out.push(worker_with_credential_when(url, &self.credential(), |_| true).await);
        }
        out
    }

    /// Every worker's info once `done` holds for them, or after 10 s (the caller's asserts then say what is
    /// wrong). A worker counts a job as completed just after publishing its last event, so a count read the moment
    /// an answer arrives can be one short.
    pub async fn workers_when(
        &self,
        done: impl Fn(&[moltbot_proto::inference::v1::ModelInfo]) -> bool,
    ) -> Vec<moltbot_proto::inference::v1::ModelInfo> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let infos = self.worker_info().await;
            if done(&infos) || Instant::now() > deadline {
                return infos;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The first worker's info once `done` holds for it, or after 10 s.
    pub async fn first_worker_when(
        &self,
        done: impl Fn(&moltbot_proto::inference::v1::ModelInfo) -> bool,
    ) -> moltbot_proto::inference::v1::ModelInfo {
        self.workers_when(|infos| done(&infos[0])).await.swap_remove(0)
    }

    /// Stops every service gracefully; any service error fails the test.
    pub async fn stop(self) {
        for service in &self.services {
            service.stop.cancel();
        }
        for service in self.services {
            service.stopped().await;
        }
    }
}
