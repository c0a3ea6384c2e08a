//! Hosts made of Linux network namespaces: each host its own namespace with one interface (a veth pair) plugged
//! into a bridge that lives in a "switch" namespace; the test's own namespace is plugged in too (10.x.y.1), so the
//! test and an Nginx it runs reach every host. A host's link can be cut (its switch port set down), as a pulled
//! cable or a partitioned node would be. Services run as processes inside their host: this test binary again,
//! through [`service_host`], so a service is the same code as its product binary without linking another one.
//! Needs root (CAP_NET_ADMIN) and `ip` (iproute2).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use moltbot_config::Config;

/// The environment that turns a run of a test binary into a service host (see [`service_host`]); not `MOLTBOT_…`,
/// which the config would read as settings.
pub const ROLE: &str = "TEST_HOST_ROLE";
const CONFIG: &str = "TEST_HOST_CONFIG";

/// What a test binary's `#[ignore]`d entry test calls: when the environment names a role, runs that service with
/// the config it names until killed; otherwise returns at once.
pub fn service_host() {
    let (Ok(role), Ok(path)) = (std::env::var(ROLE), std::env::var(CONFIG)) else { return };
    let config = Config::load(Some(Path::new(&path))).expect("the host's config loads");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    let served = runtime.block_on(async {
        match role.as_str() {
            "gateway" => moltbot_gateway::serve(&config).await,
            "dialogue-manager" => moltbot_dialogue_manager::serve(&config).await,
            "session-store" => moltbot_session_store::serve(&config).await,
            "inference-worker" => moltbot_inference_worker::serve(&config).await,
            other => panic!("no service called {other}"),
        }
    });
    served.expect("the service ran");
}

/// Runs `ip` with `args`; panics with its error when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2) runs");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A switch with hosts on it, all torn down on drop (processes first, then namespaces and their links).
pub struct Network {
    prefix: String,
    subnet: u8,
    namespaces: Vec<String>,
    processes: Vec<(String, Child)>,
    dir: tempfile::TempDir,
}

impl Network {
    /// A switch, and the test's namespace plugged into it as 10.77.<subnet>.1, on a subnet no route of this
    /// machine uses yet. Needs root.
    pub fn new() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let effective_uid = status.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().nth(1));
        assert!(
            effective_uid == Some("0"),
            "hosts of network namespaces need root (CAP_NET_ADMIN): run the suite as root, as CI does"
        );
        static NETWORKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let (pid, n) = (std::process::id(), NETWORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let prefix = format!("mb{}{n}", pid % 100_000);
        let subnet = (0..230u32)
            .map(|i| ((pid + n * 7 + i) % 230 + 20) as u8)
            .find(|s| {
                let routes = Command::new("ip").args(["-4", "route", "show", &format!("10.77.{s}.0/24")]).output();
                routes.is_ok_and(|o| o.stdout.is_empty())
            })
            .expect("a free 10.77.x.0/24 subnet");
        let switch = format!("{prefix}-sw");
        let mut network =
            Self { prefix, subnet, namespaces: vec![], processes: vec![], dir: tempfile::tempdir().expect("temp dir") };
        // A namespace left by a killed run of this process id would be in the way.
        let _ = Command::new("ip").args(["netns", "del", &switch]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &switch]);
        network.namespaces.push(switch.clone());
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        let (inside, _) = network.plug(1);
        ip(&["addr", "add", &format!("{}/24", network.address(1)), "dev", &inside]);
        ip(&["link", "set", &inside, "up"]);
        network
    }

    /// A veth pair for host `n`: its host end (left in this namespace) and its switch end (on the bridge).
    fn plug(&self, n: u8) -> (String, String) {
        let (inside, port) = (format!("{}h{n}", self.prefix), format!("{}s{n}", self.prefix));
        let switch = format!("{}-sw", self.prefix);
        let _ = Command::new("ip").args(["link", "del", &inside]).stderr(Stdio::null()).status();
        ip(&["link", "add", &inside, "type", "veth", "peer", "name", &port]);
        ip(&["link", "set", &port, "netns", &switch]);
        ip(&["-n", &switch, "link", "set", &port, "master", "br0"]);
        ip(&["-n", &switch, "link", "set", &port, "up"]);
        (inside, port)
    }

    /// Host `n`'s address.
    pub fn address(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, n)
    }

    /// A new host `n` called `name`: its own namespace, loopback up, one interface on the switch.
    pub fn host(&mut self, name: &str, n: u8) -> Host {
        let namespace = format!("{}-{name}", self.prefix);
        let _ = Command::new("ip").args(["netns", "del", &namespace]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &namespace]);
        self.namespaces.push(namespace.clone());
        ip(&["-n", &namespace, "link", "set", "lo", "up"]);
        let (inside, _) = self.plug(n);
        ip(&["link", "set", &inside, "netns", &namespace]);
        ip(&["-n", &namespace, "addr", "add", &format!("{}/24", self.address(n)), "dev", &inside]);
        ip(&["-n", &namespace, "link", "set", &inside, "up"]);
        Host { namespace, n, address: self.address(n) }
    }

    /// Runs `program` on `host`, its output in the network's temp dir (shown by `logs`).
    pub fn run(&mut self, host: &Host, name: &str, program: &str, args: &[&str], env: &[(&str, &str)]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("a log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &host.namespace, program])
            .args(args)
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("the log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program} on {}: {e}", host.namespace));
        self.processes.push((name.to_owned(), child));
    }

    /// Runs MoltBot's `role` on `host` with `config` (this test binary, through its entry test `entry`); with
    /// `cpus` (e.g. "0"), only on those CPUs, as if the host had just them.
    pub fn service(&mut self, host: &Host, name: &str, role: &str, entry: &str, config: &Config, cpus: Option<&str>) {
        let path = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, serde_yaml::to_string(config).expect("the config as YAML")).expect("write the config");
        let exe = std::env::current_exe().expect("this test binary").display().to_string();
        let path = path.display().to_string();
        let mut args = vec![];
        if let Some(cpus) = cpus {
            args.extend(["-c", cpus, &exe]);
        }
        args.extend(["--ignored", "--exact", entry, "--nocapture", "--test-threads", "1"]);
        let program = if cpus.is_some() { "taskset" } else { exe.as_str() };
        self.run(host, name, program, &args, &[(ROLE, role), (CONFIG, &path), ("RUST_LOG", "warn")]);
    }

    /// Waits until `addr` takes connections (up to 60 s: a worker loads its model first); panics with the logs
    /// when it does not or a process ended.
    pub fn wait_for(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            let ended = self.processes.iter_mut().find_map(|(name, child)| {
                child.try_wait().ok().flatten().map(|status| format!("{name} ended ({status})"))
            });
            if let Some(ended) = ended {
                panic!("{ended} before {addr} answered:\n{}", self.logs());
            }
            assert!(Instant::now() < deadline, "{addr} did not answer in 60 s:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Cuts host `host`'s link: its switch port goes down; nothing reaches it and it reaches nothing.
    pub fn cut(&self, host: &Host) {
        let switch = format!("{}-sw", self.prefix);
        ip(&["-n", &switch, "link", "set", &format!("{}s{}", self.prefix, host.n), "down"]);
    }

    /// Every process's output so far.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.processes {
            let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            out.push_str(&format!("--- {name}\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
        }
        out
    }

    /// A directory for the hosts' data (Redis, NATS).
    pub fn data_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("a data dir");
        dir
    }
}

impl Default for Network {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for (_, child) in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A namespace's links go with it; the test's end of each pair goes with its peer.
        for namespace in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", namespace]).status();
        }
    }
}

/// One host: a network namespace with one address.
pub struct Host {
    pub namespace: String,
    n: u8,
    pub address: Ipv4Addr,
}

impl Host {
    pub fn at(&self, port: u16) -> SocketAddr {
        (self.address, port).into()
    }
}
