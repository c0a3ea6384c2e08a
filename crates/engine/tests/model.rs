//! Runs the engine on the real default model (SmolLM2-135M-Instruct); `cargo xtask test` fetches it first.

use std::path::PathBuf;

use moltbot_engine::{ChatMessage, Engine, EngineConfig, FinishReason, GenerationRequest, Prompt, SamplingParams};

/// The model `cargo xtask model` caches, or the one `MOLTBOT_MODEL_PROVIDER__MODEL_PATH` names.
fn model_path() -> PathBuf {
    let path = std::env::var_os("MOLTBOT_MODEL_PROVIDER__MODEL_PATH").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
        cache.join("moltbot/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.is_file(), "model missing at {}: run `cargo xtask model` (cargo xtask test does)", path.display());
    path
}

fn load() -> Option<Engine> {
    Some(
        Engine::load(EngineConfig {
            model_path: model_path(),
            name: None,
            device: Default::default(),
            max_context: None,
        })
        .unwrap(),
    )
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, repetition_penalty: 1.0, ..Default::default() }
}

#[test]
fn tokenizer_matches_reference_ids() {
    let Some(engine) = load() else { return };
    let tok = engine.tokenizer();
    // Reference ids from the Hugging Face tokenizer.json of SmolLM2 (digits split one by one, ChatML specials).
    assert_eq!(tok.encode("<|im_start|>user\nHello<|im_end|>").unwrap(), vec![1, 4093, 198, 19556, 2]);
    let ids = tok.encode("In 2024, héllo wörld!").unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), "In 2024, héllo wörld!");
    assert_eq!(ids.iter().filter(|&&id| ["2", "0", "4"].iter().any(|d| tok.token_id(d) == Some(id))).count(), 4);
}

#[tokio::test]
async fn greedy_chat_is_deterministic_and_on_topic() {
    let Some(engine) = load() else { return };
    let prompt = || Prompt::Chat(vec![ChatMessage::new("user", "What is 2+2?")]);
    let rendered = engine.render(&[ChatMessage::new("user", "hi")]).unwrap();
    assert!(rendered.ends_with("<|im_start|>assistant\n"), "{rendered}");
    let run = || engine.submit(GenerationRequest { prompt: prompt(), sampling: greedy(24) }).unwrap().collect();
    let (a, _, usage) = run().await.unwrap();
    let (b, _, _) = run().await.unwrap();
    assert_eq!(a, b);
    assert!(a.contains('4'), "{a}");
    assert!(usage.prompt_tokens > 10 && usage.completion_tokens > 0);
}

#[tokio::test]
async fn max_tokens_and_stop_strings_end_generation() {
    let Some(engine) = load() else { return };
    let req = |sampling| GenerationRequest { prompt: Prompt::Text("1, 2, 3, 4,".into()), sampling };
    let (_, reason, usage) = engine.submit(req(greedy(5))).unwrap().collect().await.unwrap();
    assert_eq!((reason, usage.completion_tokens), (FinishReason::Length, 5));
    let sampling = SamplingParams { stop: vec!["7".into()], ..greedy(30) };
    let (text, reason, _) = engine.submit(req(sampling)).unwrap().collect().await.unwrap();
    assert_eq!(reason, FinishReason::Stop);
    assert!(!text.contains('7') && text.contains('6'), "{text}");
}

#[tokio::test]
async fn bad_requests_fail_before_queueing() {
    let Some(engine) = load() else { return };
    let long = Prompt::Text("hello ".repeat(5000));
    let err = engine.submit(GenerationRequest { prompt: long, sampling: greedy(4) }).err().unwrap();
    assert!(err.to_string().contains("context window"), "{err}");
    let err = engine.submit(GenerationRequest { prompt: Prompt::Chat(vec![]), sampling: greedy(4) }).err().unwrap();
    assert!(err.to_string().contains("empty"), "{err}");
}

#[tokio::test]
async fn dropping_a_generation_cancels_it_and_frees_the_engine() {
    let Some(engine) = load() else { return };
    let first =
        engine.submit(GenerationRequest { prompt: Prompt::Text("Once upon a time".into()), sampling: greedy(2000) });
    drop(first.unwrap());
    let (text, _, _) = engine
        .submit(GenerationRequest { prompt: Prompt::Text("Hello".into()), sampling: greedy(3) })
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert!(!text.is_empty());
}

#[test]
fn missing_model_file_says_what_to_run() {
    let err = Engine::load(EngineConfig {
        model_path: "/nonexistent/model.gguf".into(),
        name: None,
        device: Default::default(),
        max_context: None,
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("cargo xtask model"), "{err}");
}
