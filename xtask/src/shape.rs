//! The distributed shape by hand: Redis, NATS with JetStream and each service as its own process, for `dev`
//! (fixed ports, the dev build) and for benchmarks (free ports, the release build, several workers).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// Processes killed (and waited for) when dropped.
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in self.0.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where each part listens.
pub struct Ports {
    pub redis: u16,
    pub nats: u16,
    pub session_store: u16,
    pub dialogue_manager: u16,
    pub gateway: u16,
    pub metrics: u16,
    /// The first worker's gRPC port; worker k listens on `worker + k`.
    pub worker: u16,
}

impl Ports {
    /// The ports `config/config.example.yaml` names.
    pub fn fixed() -> Self {
        Self {
            redis: 6379,
            nats: 4222,
            session_store: 50052,
            dialogue_manager: 50051,
            gateway: 8000,
            metrics: 8001,
            worker: 50053,
        }
    }

    /// Ports free right now on the loopback (`workers` consecutive ones for the workers).
    pub fn free(workers: usize) -> anyhow::Result<Self> {
        let port = || -> anyhow::Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
        let worker = (0..100)
            .map(|_| port())
            .find_map(|p| {
                let p = p.ok()?;
                let free = (0..workers as u16).all(|k| std::net::TcpListener::bind(("127.0.0.1", p + k)).is_ok());
                free.then_some(p)
            })
            .context("no run of free ports for the workers")?;
        Ok(Self {
            redis: port()?,
            nats: port()?,
            session_store: port()?,
            dialogue_manager: port()?,
            gateway: port()?,
            metrics: port()?,
            worker,
        })
    }
}

/// A running distributed shape.
pub struct Shape {
    pub gateway: String,
    pub children: Children,
}

/// Starts Redis and NATS (state under `state`), then the services from `bin` with `config`: a session-store,
/// `workers` inference-workers (`worker-1` …, each with `env`), a dialogue-manager and a gateway. Returns once the
/// gateway lists a model. The services log at `log` (`MOLTBOT_LOG__LEVEL` wins).
pub fn start(
    bin: &Path,
    config: &Path,
    state: &Path,
    ports: &Ports,
    workers: usize,
    env: &[(&str, &str)],
    log: &str,
) -> anyhow::Result<Shape> {
    std::fs::create_dir_all(state.join("nats"))?;
    let mut children = Children(vec![]);
    let quiet = || std::process::Stdio::null();
    children.0.push(
        Command::new("redis-server")
            .args(["--port", &ports.redis.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(state)
            .stdout(quiet())
            .spawn()
            .context("cannot start redis-server (apt-get install -y redis-server)")?,
    );
    children.0.push(
        Command::new(crate::nats_server()?)
            .args(["-js", "-a", "127.0.0.1", "-p", &ports.nats.to_string(), "-sd"])
            .arg(state.join("nats"))
            .stderr(quiet())
            .spawn()
            .context("cannot start nats-server")?,
    );
    for (name, port) in [("redis-server", ports.redis), ("nats-server", ports.nats)] {
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("{name} did not listen on port {port} within 15 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let common = [
        ("MOLTBOT_SESSION_STORE__SESSION_STORE_TYPE", "redis".to_owned()),
        ("MOLTBOT_SESSION_STORE__REDIS__URL", format!("redis://127.0.0.1:{}", ports.redis)),
        ("MOLTBOT_SESSION_STORE__LISTEN", format!("127.0.0.1:{}", ports.session_store)),
        ("MOLTBOT_QUEUE__NATS_URL", format!("nats://127.0.0.1:{}", ports.nats)),
        ("MOLTBOT_DIALOGUE_MANAGER__LISTEN", format!("127.0.0.1:{}", ports.dialogue_manager)),
        ("MOLTBOT_DIALOGUE_MANAGER__SESSION_STORE_URL", url(ports.session_store)),
        ("MOLTBOT_GATEWAY__LISTEN", format!("127.0.0.1:{}", ports.gateway)),
        ("MOLTBOT_GATEWAY__METRICS_LISTEN", format!("127.0.0.1:{}", ports.metrics)),
        ("MOLTBOT_GATEWAY__DIALOGUE_MANAGER_URL", url(ports.dialogue_manager)),
        // The other services' metrics on any free port: several workers on one host cannot share 8004.
        ("MOLTBOT_DIALOGUE_MANAGER__METRICS_LISTEN", "127.0.0.1:0".to_owned()),
        ("MOLTBOT_SESSION_STORE__METRICS_LISTEN", "127.0.0.1:0".to_owned()),
        ("MOLTBOT_INFERENCE_WORKER__METRICS_LISTEN", "127.0.0.1:0".to_owned()),
        ("MOLTBOT_LOG__LEVEL", std::env::var("MOLTBOT_LOG__LEVEL").unwrap_or_else(|_| log.to_owned())),
    ];
    let mut services: Vec<(&str, Vec<(String, String)>)> = vec![("moltbot-session-store", vec![])];
    for k in 0..workers {
        let mut own = vec![
            ("MOLTBOT_INFERENCE_WORKER__WORKER_ID".to_owned(), format!("worker-{}", k + 1)),
            ("MOLTBOT_INFERENCE_WORKER__LISTEN".to_owned(), format!("127.0.0.1:{}", ports.worker + k as u16)),
        ];
        own.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        services.push(("moltbot-inference-worker", own));
    }
    services.extend([("moltbot-dialogue-manager", vec![]), ("moltbot-gateway", vec![])]);
    for (service, own) in services {
        let mut cmd = Command::new(bin.join(service));
        cmd.arg("--config").arg(config).envs(common.iter().map(|(k, v)| (*k, v.as_str()))).envs(own);
        children.0.push(cmd.spawn().with_context(|| format!("cannot start {}", bin.join(service).display()))?);
        std::thread::sleep(Duration::from_millis(500));
    }
    let shape = Shape { gateway: url(ports.gateway), children };
    let deadline = Instant::now() + Duration::from_secs(60);
    while crate::http_status(ports.gateway, "/v1/models") != Some(200) {
        if Instant::now() > deadline {
            bail!("the gateway at {} did not list a model within 60 s", shape.gateway);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(shape)
}

/// A fresh directory for one run's Redis and NATS state.
pub fn state_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("moltbot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
