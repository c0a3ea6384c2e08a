//! `moltbot soak`: MoltBot under steady load for a long time. It starts `moltbot serve` as a child process (its
//! own port and store), measures how many multi-turn turns per second it completes with `concurrency` clients,
//! then offers `load` (70 %) of that for `minutes`, as many short conversations of `turns` turns, and reports
//! the error rate, latency p50/p99 and how the server's resident memory moved. `cargo xtask soak` runs it.

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

#[derive(clap::Args)]
pub struct Args {
    /// Minutes of steady load.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Share of the measured capacity to offer.
    #[arg(long, default_value_t = 0.7)]
    load: f64,
    /// Clients for the capacity measurement.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Seconds of the capacity measurement.
    #[arg(long, default_value_t = 60)]
    measure_secs: u64,
    /// Turns per conversation before a new one starts.
    #[arg(long, default_value_t = 10)]
    turns: usize,
    /// Tokens per answer.
    #[arg(long, default_value_t = 32)]
    tokens: u32,
}

/// The `moltbot serve` child, killed on drop.
pub(crate) struct Server {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Stops the server as an operator would (SIGTERM), so it finishes what it holds (and sends its last spans),
    /// and waits for it.
    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }
}

/// What the turns of a phase came to.
#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    errors: std::collections::BTreeMap<String, usize>,
}

/// One conversation: its user, its session once the first turn made one, and its turns so far.
struct Conversation {
    user: String,
    session: Option<String>,
    turns: usize,
}

async fn turn(client: &reqwest::Client, base: &str, c: &mut Conversation, tokens: u32, tally: &Mutex<Tally>) {
    let mut request = client.post(format!("{base}/api/chat")).header("x-user-id", &c.user).json(
        &serde_json::json!({ "message": format!("Turn {}: say something short.", c.turns), "max_tokens": tokens }),
    );
    request = match &c.session {
        Some(id) => request.header("x-session-id", id),
        None => request.header("x-dialogue-mode", "multi"),
    };
    let started = Instant::now();
    let outcome = match request.send().await {
        Ok(response) if response.status().is_success() => match response.json::<serde_json::Value>().await {
            Ok(body) => {
                c.session = body["session_id"].as_str().map(str::to_owned).or(c.session.take());
                Ok(())
            }
            Err(e) => Err(format!("body: {e}")),
        },
        Ok(response) => Err(response.status().as_u16().to_string()),
        Err(e) => Err(if e.is_timeout() { "timeout".into() } else { "connection".into() }),
    };
    c.turns += 1;
    let mut tally = tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match outcome {
        Ok(()) => tally.latencies.push(started.elapsed().as_secs_f64()),
        Err(kind) => *tally.errors.entry(kind).or_default() += 1,
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() { f64::NAN } else { sorted[((sorted.len() - 1) as f64 * q).round() as usize] }
}

/// Starts `moltbot serve` (this program) with its own gateway port and store, and `env` on top (metrics on any
/// free port unless `env` says), and waits until it is ready; returns it and its base URL.
pub(crate) async fn serve(env: &[(&str, String)]) -> anyhow::Result<(Server, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dir = tempfile::tempdir()?;
    let child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .env("MOLTBOT_GATEWAY__LISTEN", format!("127.0.0.1:{port}"))
        // Any free port: a MoltBot already running here holds 8001.
        .env("MOLTBOT_GATEWAY__METRICS_LISTEN", "127.0.0.1:0")
        .env("MOLTBOT_GATEWAY__MAX_CONCURRENT_REQUESTS", "1024")
        .env("MOLTBOT_SESSION_STORE__PATH", dir.path().join("sessions.redb"))
        .env("MOLTBOT_LOG__LEVEL", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .spawn()?;
    let server = Server { child, _dir: dir };
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let ready = Instant::now();
    while !client.get(format!("{base}/ready")).send().await.is_ok_and(|r| r.status().is_success()) {
        anyhow::ensure!(ready.elapsed() < Duration::from_secs(60), "moltbot serve did not become ready in 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok((server, base))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let (server, base) = serve(&[]).await?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;

    // Capacity: closed loop, each client its own conversations.
    let measured = Arc::new(Mutex::new(Tally::default()));
    // At least `measure_secs`, and long enough for every client to finish a whole conversation: later turns carry
    // longer histories, and a capacity of first turns only would overstate what steady load can get.
    let until = Instant::now() + Duration::from_secs(args.measure_secs);
    let measuring = Instant::now();
    let clients: Vec<_> = (0..args.concurrency)
        .map(|i| {
            let (client, base, tally, turns, tokens) =
                (client.clone(), base.clone(), measured.clone(), args.turns, args.tokens);
            tokio::spawn(async move {
                let mut c = Conversation { user: format!("measure-{i}"), session: None, turns: 0 };
                let mut conversations = 0;
                while Instant::now() < until || conversations == 0 {
                    if c.turns == turns {
                        c = Conversation { user: c.user.clone(), session: None, turns: 0 };
                        conversations += 1;
                    }
                    turn(&client, &base, &mut c, tokens, &tally).await;
                }
            })
        })
        .collect();
    futures::future::join_all(clients).await;
    let done = measured.lock().unwrap_or_else(std::sync::PoisonError::into_inner).latencies.len();
    let capacity = done as f64 / measuring.elapsed().as_secs_f64();
    anyhow::ensure!(capacity > 0.0, "no turn completed while measuring capacity");
    let rate = capacity * args.load;
    println!("capacity: {capacity:.2} turns/s with {} clients; offering {rate:.2} turns/s", args.concurrency);

    // Soak: open loop at `rate`, conversations handed out round robin.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let conversations: Vec<Arc<tokio::sync::Mutex<Conversation>>> = (0..64)
        .map(|i| Arc::new(tokio::sync::Mutex::new(Conversation { user: format!("soak-{i}"), session: None, turns: 0 })))
        .collect();
    let rss_start = server.rss_mib();
    let (mut rss_max, mut samples) = (rss_start, vec![(0.0, rss_start)]);
    let start = Instant::now();
    let length = Duration::from_secs_f64(args.minutes * 60.0);
    let (mut next, mut seed, mut k) = (start, 0x2545_f491_4f6c_dd1d_u64, 0usize);
    let mut sampled = start;
    let mut tasks = vec![];
    while start.elapsed() < length {
        // Exponential gaps (a Poisson process) from a fixed-seed generator: every run offers the same pattern.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let uniform = (seed >> 11) as f64 / (1u64 << 53) as f64;
        next += Duration::from_secs_f64(-(1.0 - uniform).ln() / rate);
        tokio::time::sleep_until(next.into()).await;
        let (client, base, tally, tokens, turns) =
            (client.clone(), base.clone(), tally.clone(), args.tokens, args.turns);
        let conversation = conversations[k % conversations.len()].clone();
        k += 1;
        tasks.push(tokio::spawn(async move {
            let mut c = conversation.lock().await;
            if c.turns == turns {
                *c = Conversation { user: c.user.clone(), session: None, turns: 0 };
            }
            turn(&client, &base, &mut c, tokens, &tally).await;
        }));
        tasks.retain(|t| !t.is_finished());
        if sampled.elapsed() >= Duration::from_secs(10) {
            sampled = Instant::now();
            let rss = server.rss_mib();
            rss_max = rss_max.max(rss);
            samples.push((start.elapsed().as_secs_f64(), rss));
        }
    }
    futures::future::join_all(tasks).await;
    let rss_end = server.rss_mib();
    let tally = tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut latencies = tally.latencies.clone();
    latencies.sort_by(f64::total_cmp);
    let errors: usize = tally.errors.values().sum();
    let total = latencies.len() + errors;
    println!(
        "soak: {:.1} min at {rate:.2} turns/s: {total} turns, {errors} failed ({:.2} %) {:?}",
        args.minutes,
        100.0 * errors as f64 / total.max(1) as f64,
        tally.errors
    );
    println!("latency: p50 {:.2} s, p99 {:.2} s", quantile(&latencies, 0.5), quantile(&latencies, 0.99));
    println!(
        "server RSS: {rss_start:.0} MiB at the start, {rss_end:.0} MiB at the end ({:+.0} MiB), {rss_max:.0} MiB at most",
        rss_end - rss_start
    );
    let trail: Vec<String> = samples.iter().map(|(t, rss)| format!("{:.0}s {rss:.0}", t)).collect();
    println!("RSS samples (MiB): {}", trail.join(", "));
    Ok(())
}
