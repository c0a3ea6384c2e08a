//! MoltBot spread over hosts (S11): Redis and NATS on one host, the session-store, the dialogue-manager and the
//! gateway each on their own, two worker hosts, and Nginx (deploy/nginx/moltbot.conf) in front, every host a
//! network namespace of the test's own. A conversation crosses them all; a worker host's link is cut mid-answer.

use std::time::{Duration, Instant};

use moltbot_config::{Config, SessionStoreType};
use moltbot_tests::{
    Http, Server,
    hosts::{Host, Network},
    sse_data, two_turn_conversation, worker_with_credential_when,
};

const API_KEY: &str = "a-multi-host-test-api-key";
const SERVICE_TOKEN: &str = "a-multi-host-deployment-secret";
/// The entry test below, by its path in this test binary.
const ENTRY: &str = "hosts::service_host";

/// The entry point of a service host's process (see `moltbot_tests::hosts`); alone it does nothing.
#[test]
#[ignore = "an entry point: the multi-host test runs each service's process through it"]
fn service_host() {
    moltbot_tests::hosts::service_host();
}

/// The deployment: which host runs what, and the addresses they find each other at.
struct Deployment {
    network: Network,
    workers: Vec<Host>,
    http: Http,
    nginx: Server,
}

/// Starts every host; `worker_hosts` worker hosts, each on a CPU of its own when `pinned`, as separate machines
/// would be (the other services, Nginx and the client are not pinned: they share every CPU, the workers' too).
fn deploy(worker_hosts: u8, pinned: bool, configure: impl Fn(&mut Config)) -> Deployment {
    let mut network = Network::new();
    let (data, store, manager, gateway) =
        (network.host("data", 2), network.host("ss", 3), network.host("dm", 4), network.host("gw", 5));
    let redis_dir = network.data_dir("redis").display().to_string();
    let nats_dir = network.data_dir("nats").display().to_string();
    let data_ip = data.address.to_string();
    let redis_args =
        ["--port", "6379", "--bind", &data_ip, "--protected-mode", "no", "--appendonly", "yes", "--dir", &redis_dir];
    network.run(&data, "redis", "redis-server", &redis_args, &[]);
    network.run(&data, "nats", "nats-server", &["-js", "-a", &data_ip, "-p", "4222", "-sd", &nats_dir], &[]);
    network.wait_for(data.at(6379));
    network.wait_for(data.at(4222));

    let mut config = moltbot_tests::test_config(std::path::Path::new("/nonexistent"));
    config.internal.service_token = SERVICE_TOKEN.into();
    config.gateway.auth.api_keys = vec![API_KEY.into()];
    config.gateway.listen = ([0, 0, 0, 0], 8000).into();
    config.gateway.dialogue_manager_url = format!("http://{}", manager.at(50051));
    config.dialogue_manager.listen = ([0, 0, 0, 0], 50051).into();
    config.dialogue_manager.session_store_url = format!("http://{}", store.at(50052));
    config.session_store.listen = ([0, 0, 0, 0], 50052).into();
    config.session_store.session_store_type = SessionStoreType::Redis;
    config.session_store.redis.url = format!("redis://{}", data.at(6379));
    config.inference_worker.listen = ([0, 0, 0, 0], 50053).into();
    config.queue.nats_url = format!("nats://{}", data.at(4222));
    configure(&mut config);

    network.service(&store, "session-store", "session-store", ENTRY, &config, None);
    let mut workers = vec![];
    for i in 1..=worker_hosts {
        let host = network.host(&format!("w{i}"), 10 + i);
        let mut worker = config.clone();
        worker.inference_worker.worker_id = format!("worker-{i}");
        let cpu = allowed_cpus()[(i - 1) as usize % allowed_cpus().len()].to_string();
        let cpus = pinned.then_some(cpu.as_str());
        network.service(&host, &format!("worker-{i}"), "inference-worker", ENTRY, &worker, cpus);
        workers.push(host);
    }
    network.service(&manager, "dialogue-manager", "dialogue-manager", ENTRY, &config, None);
    network.service(&gateway, "gateway", "gateway", ENTRY, &config, None);
    for (host, port) in [(&store, 50052), (&manager, 50051), (&gateway, 8000)] {
        network.wait_for(host.at(port));
    }
    for worker in &workers {
        network.wait_for(worker.at(50053));
    }

    let nginx = Server::nginx_as_deployed(&[gateway.at(8000)]);
    let certificate = reqwest::Certificate::from_pem(&nginx.certificate()).expect("the test CA");
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {API_KEY}").parse().expect("a header"));
    let client = reqwest::Client::builder()
        .add_root_certificate(certificate)
        .default_headers(headers)
        .build()
        .expect("a client");
    let http = Http { base: format!("https://127.0.0.1:{}", nginx.tls_port()), client };
    Deployment { network, workers, http, nginx }
}

/// The CPUs this process may run on (`Cpus_allowed_list`, e.g. `0-1` or `2,4-5`).
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).expect("Cpus_allowed_list").trim();
    let mut cpus = vec![];
    for range in list.split(',') {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        cpus.extend(first.parse::<usize>().expect("a CPU")..=last.parse::<usize>().expect("a CPU"));
    }
    cpus
}

impl Deployment {
    /// Waits until the gateway answers ready through Nginx.
    async fn ready(&self) {
        let since = Instant::now();
        while self.http.get("/ready").await.0 != 200 {
            assert!(since.elapsed() < Duration::from_secs(30), "not ready through nginx:\n{}", self.network.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_crosses_six_hosts_through_nginx_and_a_worker_host_cut_mid_answer_is_one_clear_error() {
    let deployment = deploy(2, false, |c| c.model_provider.max_tokens = 3000);
    deployment.ready().await;
    let Deployment { network, workers, http, .. } = &deployment;
    two_turn_conversation(http).await;

    // A long answer (3000 tokens by construction) in a session; once it streams, its worker host's link is cut.
    let (status, session) = http.call("POST", "/api/sessions", &[], None).await;
    assert_eq!(status, 201, "{session}");
    let id = session["id"].as_str().unwrap().to_owned();
    let question = "Count from 1 to 1000, separated by commas.";
    let body =
        format!(r#"{{"session_id":"{id}","message":"{question}","max_tokens":3000,"min_tokens":3000,"stream":true}}"#);
    let mut response = http.stream("/api/chat", &body).await;
    assert_eq!(response.status(), 200);
    let mut seen = String::new();
    while seen.matches("event: delta").count() < 4 {
        seen.push_str(&String::from_utf8_lossy(&response.chunk().await.unwrap().expect("more of the stream")));
    }
    let credential = moltbot_proto::Credential::new(SERVICE_TOKEN);
    let mut running = None;
    for host in workers {
        let url = format!("http://{}", host.at(50053));
        if worker_with_credential_when(&url, &credential, |_| true).await.running > 0 {
            running = Some(host);
        }
    }
    let running = running.expect("a worker host runs the answer");
    network.cut(running);
    let cut = Instant::now();
    // The client hears of it within seconds (the dialogue-manager's worker_timeout, 5 s here): an error event
    // ends the stream, rather than a hang until the job's deadline.
    let rest = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(chunk) = response.chunk().await.expect("the stream ends cleanly") {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(rest.is_ok(), "the stream hung for 30 s after its worker host was cut");
    let waited = cut.elapsed();
    let events = sse_data(&seen);
    let error = events.iter().find(|e| e.contains("\"error\"")).expect("an error event ends the stream");
    assert!(error.contains("503"), "{error}");
    assert!(waited < Duration::from_secs(20), "the error came {waited:?} after the cut");

    // A failed turn saves nothing (ARCHITECTURE.md's invariant): the session holds the first conversation's turns
    // and none of this one — not half of it, and nothing to repeat when the client sends it again.
    let (status, stored) = http.get(&format!("/api/sessions/{id}")).await;
    assert_eq!(status, 200, "{stored}");
    let messages = stored["messages"].as_array().unwrap();
    assert!(messages.is_empty(), "the failed turn left {stored}");

    // The conversation goes on with the other worker host.
    let next = format!(r#"{{"session_id":"{id}","message":"Stop there.","max_tokens":4}}"#);
    let again = Instant::now();
    loop {
        let (status, _, answer) = http.post("/api/chat", &[], &next).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(again.elapsed() < Duration::from_secs(60), "no answer from the other worker host: {answer}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, stored) = http.get(&format!("/api/sessions/{id}")).await;
    let roles: Vec<&str> = stored["messages"].as_array().unwrap().iter().filter_map(|m| m["role"].as_str()).collect();
    assert_eq!(roles, ["user", "assistant"], "one whole turn: {stored}");
}

/// `cargo xtask bench hosts`: aggregate tokens/s of streamed chats through Nginx with one worker host and with two,
/// each worker pinned to its own CPU, under the same load (`moltbot bench --http-only` at BENCH_MOLTBOT_BIN,
/// 16 concurrent chats of 64 tokens), alternating, `BENCH_ROUNDS` (3) rounds; medians and their ratio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: cargo xtask bench hosts"]
async fn scale_out() {
    let bench = std::env::var("BENCH_MOLTBOT_BIN")
        .expect("BENCH_MOLTBOT_BIN: the release moltbot binary (cargo xtask bench hosts sets it)");
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let mut figures: [Vec<f64>; 2] = [vec![], vec![]];
    for round in 1..=rounds {
        for hosts in [1u8, 2] {
            let deployment = deploy(hosts, true, |c| {
                c.model_provider.max_tokens = 64;
                c.gateway.max_concurrent_per_user = 64;
            });
            deployment.ready().await;
            let ca = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(ca.path(), deployment.nginx.certificate()).unwrap();
            let url = deployment.http.base.clone();
            let args = ["bench", "--http-only", "--url", &url, "--concurrency", "16", "--tokens", "64"];
            let out = tokio::process::Command::new(&bench)
                .args(args)
                .env("BENCH_API_KEY", API_KEY)
                .env("SSL_CERT_FILE", ca.path())
                .output()
                .await
                .expect("the bench runs");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
            let line = stdout.lines().find(|l| l.contains("16 concurrent chat(s)")).expect("the 16-chat figure");
            let rate: f64 = line
                .split(" tok/s")
                .next()
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|r| r.parse().ok())
                .expect("tok/s");
            println!("round {round}, {hosts} worker host(s): {line}");
            figures[usize::from(hosts) - 1].push(rate);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (one, two) = (median(&mut figures[0]), median(&mut figures[1]));
    println!(
        "scale-out through nginx, 16 concurrent streamed chats of 64 tokens, median of {rounds}: 1 worker host {one:.1} tok/s, 2 worker hosts {two:.1} tok/s, ratio {:.2}",
        two / one
    );
}
