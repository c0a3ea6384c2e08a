//! The chat page at `/` in a real headless Chromium (Debian's `chromium` and `chromium-driver`), driven over
//! WebDriver against `moltbot serve`'s embedded shape with an API key configured.

use fantoccini::Locator;
use moltbot_tests::{Browser, embedded, listener, test_config};
use serde_json::Value;

const KEY: &str = "browser-test-key-0123456789";
/// The question whose answer the test watches grow and stops; it is long by construction (`LONG_NEXT_ANSWER`),
/// whatever text this machine's kernels make of it.
const ESSAY: &str = "Write a long essay about the history of Rome.";

/// Makes the page's next `/api/chat` request ask for 1000 tokens exactly (`min_tokens`), as a test's own
/// instrument: the page itself stays as users get it.
const LONG_NEXT_ANSWER: &str = "const send = window.fetch;
    window.fetch = (url, init) => {
      if (url !== '/api/chat') return send(url, init);
      window.fetch = send;
      const body = { ...JSON.parse(init.body), min_tokens: 1000, max_tokens: 1000 };
      return send(url, { ...init, body: JSON.stringify(body) });
    };";
const SYSTEM: &str = "You are a historian who writes at length.";

/// The page's messages as `[role, phase, text]`; an answer's text is its Markdown source.
const MESSAGES: &str = "return [...document.querySelectorAll('.message')]
    .map(m => [m.classList.contains('user') ? 'user' : 'assistant', m.dataset.phase, m.dataset.source])";

/// The last answer's text once its phase is `phase`, else null.
fn last_answer_when(phase: &str) -> String {
    format!(
        "const a = [...document.querySelectorAll('.message.assistant')].pop();
         return a && a.dataset.phase === '{phase}' ? a.dataset.source : null"
    )
}

/// Clicks into the field `css` and types `text`, as a user would (chromedriver types into nothing after a
/// modal closed unless the field is clicked first).
async fn type_into(browser: &Browser, css: &str, text: &str) {
    let field = browser.page.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
    field.click().await.unwrap_or_else(|e| panic!("{css} takes a click: {e}"));
    field.send_keys(text).await.unwrap_or_else(|e| panic!("typing into {css}: {e}"));
}

async fn type_message(browser: &Browser, text: &str) {
    type_into(browser, "#input", text).await;
    browser.page.find(Locator::Css("#send")).await.expect("the send button").click().await.expect("send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_asks_for_the_key_streams_stops_remembers_and_deletes_a_conversation() {
    let (moltbot, api, _dir) = embedded(|c| {
        c.model_provider.max_tokens = 2000;
        c.gateway.auth.api_keys = vec![KEY.into()];
    })
    .await;
    let browser = Browser::start().await;
    browser.page.goto(&format!("http://{}/", moltbot.gateway_addr)).await.expect("the page loads");

    // The API wants a key, so the page asks for one.
    browser.until(10, "the key dialog", "return document.getElementById('key-dialog').open").await;
    let key_input = browser.page.find(Locator::Css("#key-input")).await.unwrap();
    key_input.send_keys(KEY).await.unwrap();
    browser.page.find(Locator::Css("#key-save")).await.unwrap().click().await.unwrap();
    browser.until(10, "the dialog closes", "return !document.getElementById('key-dialog').open").await;

    // Settings: greedy answers, and a system prompt for new conversations.
    browser.page.find(Locator::Css("#settings summary")).await.unwrap().click().await.unwrap();
    type_into(&browser, "#temperature", "0").await;
    type_into(&browser, "#system-prompt", SYSTEM).await;

    // A long answer streams in word by word while Stop shows; Stop ends it where it is.
    browser.page.execute(LONG_NEXT_ANSWER, vec![]).await.expect("the fetch instrument");
    type_message(&browser, ESSAY).await;
    let early = browser.until(60, "the first words of the answer", &streaming_text_longer_than(0)).await;
    let early = early.as_str().unwrap().to_owned();
    browser.until(60, "the answer grows while it streams", &streaming_text_longer_than(early.len() + 8)).await;
    browser.until(5, "the stop button", "return !document.getElementById('stop').hidden").await;
    browser.page.find(Locator::Css("#stop")).await.unwrap().click().await.unwrap();
    let stopped = browser.until(10, "the stopped answer", &last_answer_when("stopped")).await;
    let stopped = stopped.as_str().unwrap().to_owned();
    assert!(stopped.starts_with(&early) && stopped.len() < 4000, "{early:?} then {stopped:?}");
    browser.until(5, "the send button is back", "return !document.getElementById('send').hidden").await;

    // The conversation goes on: a second question is answered to its end, the key travelling with it.
    type_message(&browser, "Thanks. Now say hello.").await;
    let done = browser.until(120, "the second answer", &last_answer_when("done")).await;
    assert!(!done.as_str().unwrap().is_empty());
    let before = browser.page.execute(MESSAGES, vec![]).await.unwrap();

    // After a reload the conversation is listed under its first message; opening it shows what the server
    // kept: both questions, the stopped answer as far as it came, and the finished one.
    browser.page.refresh().await.unwrap();
    let title = browser
        .until(10, "the conversation list", "return document.querySelector('.conversation .open')?.textContent")
        .await;
    assert_eq!(title, ESSAY);
    browser.page.find(Locator::Css(".conversation .open")).await.unwrap().click().await.unwrap();
    let after = browser
        .until(
            10,
            "the conversation's messages",
            &format!("const m = (() => {{ {MESSAGES} }})(); return m.length === 4 ? m : null"),
        )
        .await;
    let (before, after) = (before.as_array().unwrap(), after.as_array().unwrap());
    let roles = |m: &[Value]| m.iter().map(|m| m[0].clone()).collect::<Vec<_>>();
    assert_eq!(roles(before), ["user", "assistant", "user", "assistant"]);
    assert_eq!(roles(after), roles(before));
    assert!(after.iter().all(|m| m[1] == "done"), "{after:?}");
    for i in [0, 2, 3] {
        assert_eq!(after[i][2], before[i][2], "message {i}");
    }
    // The server may have sent a token or two more than the page showed when it stopped reading.
    let kept = after[1][2].as_str().unwrap();
    assert!(kept.starts_with(&stopped) && kept.len() < stopped.len() + 40, "showed {stopped:?}, kept {kept:?}");

    // The conversation was created with the system prompt from the settings, which survive the reload.
    let id = browser
        .until(5, "the open conversation", "return document.querySelector('.conversation.active')?.dataset.id")
        .await;
    let bearer = format!("Bearer {KEY}");
    let path = format!("/api/sessions/{}", id.as_str().unwrap());
    let (status, session) = api.call("GET", &path, &[("authorization", &bearer)], None).await;
    assert_eq!(status, 200, "{session}");
    assert_eq!(session["system_prompt"], SYSTEM);
    let temperature = browser.until(5, "the settings", "return document.getElementById('temperature').value").await;
    assert_eq!(temperature, "0");

    // Deleting the conversation (after the page asks to confirm) empties the list and the page.
    browser.page.find(Locator::Css(".conversation.active .delete")).await.unwrap().click().await.unwrap();
    browser.page.accept_alert().await.expect("a confirmation");
    browser.until(10, "the emptied page", "return !document.querySelector('.conversation, .message')").await;
    let (status, _) = api.call("GET", &path, &[("authorization", &bearer)], None).await;
    assert_eq!(status, 404);

    browser.close().await;
    moltbot.stop().await.unwrap();
}

/// The streaming answer's text once it is longer than `chars`, else null.
fn streaming_text_longer_than(chars: usize) -> String {
    format!(
        "const a = [...document.querySelectorAll('.message.assistant')].pop();
         return a && a.dataset.phase === 'streaming' && a.dataset.source.length > {chars} ? a.dataset.source : null"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_comes_from_the_binary_under_a_strict_policy_and_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.gateway.auth.api_keys = vec![KEY.into()];
    let moltbot = moltbot::start(config.clone(), listener().await).await.unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://{}", moltbot.gateway_addr);
    // No key is needed for the page itself; every API call it makes needs one.
    for (path, kind, needle) in [
        ("/", "text/html", "/assets/app.js"),
        ("/assets/app.js", "text/javascript", "/api/chat"),
        ("/assets/app.css", "text/css", ".message"),
    ] {
        let response = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
        assert!(header("content-type").starts_with(kind), "{path}: {}", header("content-type"));
        assert!(header("content-security-policy").contains("script-src 'self'"), "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert!(response.text().await.unwrap().contains(needle), "{path}");
    }
    assert_eq!(client.get(format!("{base}/api/sessions")).send().await.unwrap().status(), 401);
    moltbot.stop().await.unwrap();

    config.gateway.web_ui = false;
    let moltbot = moltbot::start(config, listener().await).await.unwrap();
    let response = client.get(format!("http://{}/", moltbot.gateway_addr)).send().await.unwrap();
    assert_eq!(response.status(), 404);
    moltbot.stop().await.unwrap();
}

/// An answer is Markdown, rendered (a code block is a code block) and sanitized (stored HTML that would run does
/// not); a plugin call and its result show in the conversation; the ready plugins are offered in the settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_render_as_sanitized_markdown_and_tool_calls_show() {
    let (moltbot, api, _dir) = embedded(|c| c.gateway.auth.api_keys = vec![KEY.into()]).await;
    let bearer = format!("Bearer {KEY}");
    let auth = [("authorization", bearer.as_str())];
    let (status, session) =
        api.call("POST", "/api/sessions", &auth, Some(r#"{"metadata":{"title":"Markdown"}}"#)).await;
    assert_eq!(status, 201, "{session}");
    let id = session["id"].as_str().unwrap();
    // A turn may bring earlier messages of its own: here an answer with a code block and HTML that must not run.
    let markdown = "Here:\n\n```rust\nfn main() {}\n```\n\n<img src=x onerror=\"window.pwned = 1\"> **bold**";
    let turn = serde_json::json!({ "session_id": id, "max_tokens": 4, "messages": [
        { "role": "user", "content": "Show me code." },
        { "role": "assistant", "content": markdown },
        { "role": "user", "content": "Thanks." },
    ]});
    let (status, answer) = api.call("POST", "/api/chat", &auth, Some(&turn.to_string())).await;
    assert_eq!(status, 200, "{answer}");
    let call = serde_json::json!({ "arguments": { "expression": "6 * 7" }, "session_id": id }).to_string();
    let (status, called) = api.call("POST", "/api/plugins/calculator/execute", &auth, Some(&call)).await;
    assert_eq!(status, 200, "{called}");

    let browser = Browser::start().await;
    browser.page.goto(&format!("http://{}/", moltbot.gateway_addr)).await.expect("the page loads");
    let key = format!("localStorage.setItem('moltbot.api_key', '{KEY}')");
    browser.page.execute(&key, vec![]).await.unwrap();
    browser.page.refresh().await.unwrap();
    browser.until(10, "the conversation list", "return document.querySelector('.conversation .open')").await;
    browser.page.find(Locator::Css(".conversation .open")).await.unwrap().click().await.unwrap();
    let code = browser
        .until(
            10,
            "the rendered code block",
            "return document.querySelector('.message.assistant pre code')?.textContent",
        )
        .await;
    assert_eq!(code, "fn main() {}\n");
    let page = browser
        .page
        .execute(
            "return { bold: document.querySelector('.message.assistant strong')?.textContent,
                      handlers: document.querySelectorAll('#messages [onerror]').length,
                      pwned: window.pwned ?? null,
                      tool: document.querySelector('.tool')?.dataset.name,
                      call: document.querySelector('.tool summary')?.textContent,
                      result: document.querySelector('.tool pre')?.textContent,
                      plugins: [...document.querySelectorAll('#plugins input')].map(b => b.value) }",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(page["bold"], "bold", "{page}");
    assert_eq!((page["handlers"].as_u64(), &page["pwned"]), (Some(0), &Value::Null), "sanitized: {page}");
    assert_eq!(page["tool"], "calculator", "{page}");
    assert!(page["call"].as_str().unwrap().contains("6 * 7"), "{page}");
    assert!(page["result"].as_str().unwrap().contains("42"), "{page}");
    let plugins: Vec<&str> = page["plugins"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(plugins, ["calculator", "datetime"], "{page}");
    browser.close().await;
    moltbot.stop().await.unwrap();
}
