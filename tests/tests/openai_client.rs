//! The official OpenAI Python client (`tests/openai_client.py`) against the embedded shape's `/v1`.
//! `cargo xtask test` installs the `openai` package where the script finds it.

use moltbot_tests::{listener, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // A tool call takes about 30 tokens.
    config.model_provider.max_tokens = 64;
    let moltbot = moltbot::start(config, listener().await).await.unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/openai_client.py");
    let url = format!("http://{}", moltbot.gateway_addr);
    let output = tokio::process::Command::new("python3")
        .args([script, &url])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}); `cargo xtask test` needs python3 with pip"));
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(
        !stderr.contains("No module named 'openai'"),
        "the openai package is missing: run `cargo xtask test`, which installs it, or `pip install openai`"
    );
    assert!(output.status.success() && stdout.contains("openai client: ok"), "{stdout}\n{stderr}");
    moltbot.stop().await.unwrap();
}

/// Remote models behind this MoltBot (one test binary: one link).
mod providers;
