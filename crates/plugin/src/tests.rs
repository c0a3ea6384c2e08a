//! The plugin host with real plugins: the built-ins, Python plugins run by `python3` (with `grpcio` on
//! PYTHONPATH, as `cargo xtask test` sets it), a Rust plugin served over gRPC, and a local HTTP JSON API.

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use moltbot_config::{HttpJsonPluginConfig, PluginsConfig};
use serde_json::{Value, json};

use crate::{CallContext, Context, LoadCause, Plugin, PluginError, PluginInfo, PluginState, Plugins, async_trait};

fn config(dir: &Path) -> PluginsConfig {
    PluginsConfig { dir: dir.to_owned(), ..PluginsConfig::default() }
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

async fn call(plugins: &Plugins, name: &str, arguments: Value) -> Result<Value, PluginError> {
    plugins.execute(name, arguments, CallContext::default()).await
}

#[tokio::test]
async fn the_built_in_plugins_compute_and_refuse_bad_arguments() {
    let plugins = Plugins::load(&PluginsConfig::default()).await.unwrap();
    let names: Vec<String> = plugins.list().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["calculator", "datetime"]);
    let sum = call(&plugins, "calculator", json!({ "expression": "(2 + 3) * 4 ^ 0.5" })).await.unwrap();
    assert_eq!(sum["result"], 10.0);
    let bad = call(&plugins, "calculator", json!({ "expression": "2 +* 3" })).await.unwrap_err();
    assert!(matches!(bad, PluginError::InvalidArguments(_)), "{bad}");
    // The schema is checked before the plugin runs: a missing parameter and an unknown one are named.
    let missing = call(&plugins, "calculator", json!({})).await.unwrap_err();
    assert!(missing.to_string().contains("expression"), "{missing}");
    let extra = call(&plugins, "calculator", json!({ "expression": "1", "x": 2 })).await.unwrap_err();
    assert!(extra.to_string().contains("x"), "{extra}");
    let not_object = call(&plugins, "calculator", json!("1 + 1")).await.unwrap_err();
    assert!(matches!(not_object, PluginError::InvalidArguments(_)), "{not_object}");

    let paris = json!({ "timezone": "Europe/Paris", "at": "2026-01-15T12:00:00Z" });
    let paris = call(&plugins, "datetime", paris).await.unwrap();
    assert_eq!((paris["time"].as_str(), paris["utc_offset"].as_str()), (Some("13:00:00"), Some("+01")), "{paris}");
    assert_eq!(paris["weekday"], "Thursday");
    let summer = call(&plugins, "datetime", json!({ "timezone": "Europe/Paris", "at": "2026-07-15T12:00:00Z" }));
    assert_eq!(summer.await.unwrap()["time"], "14:00:00");
    let nowhere = call(&plugins, "datetime", json!({ "timezone": "Mars/Olympus" })).await.unwrap_err();
    assert!(nowhere.to_string().contains("Mars/Olympus"), "{nowhere}");
    assert_eq!(call(&plugins, "weather", json!({})).await.unwrap_err(), PluginError::NotFound("weather".into()));
}

/// The seed's weather plugin, written as the seed shows it, from the examples' plugin directory.
#[tokio::test]
async fn the_seeds_weather_plugin_loads_from_the_plugin_directory_and_answers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/examples/moltbot_plugins");
    let mut config = config(&dir);
    config.settings.insert("weather".into(), BTreeMap::from([("api_key".into(), "k-123".into())]));
    let plugins = Plugins::load(&config).await.unwrap();
    let weather = plugins.list().into_iter().find(|p| p.name == "weather").expect("listed");
    assert_eq!(weather.state, PluginState::Ready, "{weather:?}");
    assert_eq!(weather.parameters["required"], json!(["location"]));
    assert!(format!("{:?}", plugins.list()).contains("python:"), "the source is shown");
    let call = CallContext { session_id: "s1".into(), user_id: "alice".into(), request_id: "r1".into() };
    let answer = plugins.execute("weather", json!({ "location": "Paris" }), call).await.unwrap();
    assert_eq!(answer, json!({ "location": "Paris", "temperature": 25, "condition": "sunny" }));
    // Its schema requires a location; the call never reaches the process without one.
    let missing = plugins.execute("weather", json!({}), CallContext::default()).await.unwrap_err();
    assert!(matches!(missing, PluginError::InvalidArguments(_)), "{missing}");
}

/// Every cause the seed names for `PluginLoadError`, and the others a plugin directory can have: each is
/// reported with the plugin's name and a fix, the plugin is disabled and listed, and a required one stops loading.
#[tokio::test]
async fn each_load_failure_names_the_plugin_its_cause_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "missing_module.yaml", "module: no_such_module\n");
    write(d, "needs_dependency.py", "import surely_not_installed_pkg\n");
    write(
        d,
        "no_info.py",
        "from moltbot.core import PluginBase\nclass NoInfo(PluginBase):\n    async def execute(self, ctx):\n        return 1\n",
    );
    write(d, "no_class.py", "X = 1\n");
    write(
        d,
        "bad_schema.py",
        "from moltbot.core import PluginBase\nclass Bad(PluginBase):\n    def get_plugin_info(self):\n        return {'name': 'bad_schema', 'version': '1', 'description': '', 'parameters': {'type': 'object', 'properties': 5}}\n    async def execute(self, ctx):\n        return 1\n",
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    write(d, "gone.yaml", &format!("endpoint: http://{closed}\n"));
    write(d, "two_ways.yaml", "module: x\nendpoint: http://127.0.0.1:1\n");
    let plugins = Plugins::load(&config(d)).await.unwrap();
    let reasons: BTreeMap<String, String> = plugins
        .list()
        .into_iter()
        .filter_map(|p| match p.state {
            PluginState::Disabled { reason } => Some((p.name, reason)),
            PluginState::Ready => None,
        })
        .collect();
    let expect = [
        ("missing_module", "Module not found: `no_such_module`"),
        ("needs_dependency", "surely_not_installed_pkg"),
        ("no_info", "does not implement get_plugin_info()"),
        ("no_class", "defines no plugin class"),
        ("bad_schema", "not a valid JSON Schema"),
        ("gone", "does not answer"),
        ("two_ways", "names no single way"),
    ];
    for (name, cause) in expect {
        let reason = reasons.get(name).unwrap_or_else(|| panic!("{name} is not reported: {reasons:#?}"));
        assert!(reason.starts_with(&format!("PluginLoadError: plugin `{name}`")), "{reason}");
        assert!(reason.contains(cause) && reason.contains("Fix: "), "{name}: {reason}");
    }
    assert!(reasons["needs_dependency"].contains("pip install surely_not_installed_pkg"), "{reasons:#?}");
    // The built-ins still load beside them; a disabled plugin's call says why it is off.
    assert_eq!(call(&plugins, "calculator", json!({ "expression": "1+1" })).await.unwrap()["result"], 2.0);
    let off = call(&plugins, "no_info", json!({})).await.unwrap_err();
    assert!(matches!(off, PluginError::Disabled { .. }), "{off}");

    // Required: the first failure is the error.
    let mut strict = config(d);
    strict.required = vec!["no_info".into()];
    let e = Plugins::load(&strict).await.err().expect("a required plugin failed");
    assert_eq!(e.plugin, "no_info");
    assert!(matches!(e.cause, LoadCause::NoPluginInfo { .. }), "{e}");
}

#[tokio::test]
async fn a_plugin_that_crashes_or_hangs_gives_a_tool_error_and_is_back_for_the_next_call() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "fragile.py",
        r#"import asyncio, os
from moltbot.core import PluginBase

class Fragile(PluginBase):
    def get_plugin_info(self):
        return {"name": "fragile", "version": "1", "description": "crashes or hangs on request",
                "parameters": {"type": "object", "properties": {"do": {"enum": ["crash", "hang", "big", "fail", "ok"]}}}}

    async def execute(self, ctx):
        what = ctx.get_param("do")
        if what == "crash":
            os._exit(3)
        if what == "hang":
            await asyncio.sleep(3600)
        if what == "big":
            return "x" * 100000
        if what == "fail":
            raise RuntimeError("the upstream API is down")
        return {"pid": os.getpid(), "key": ctx.get_setting("api_key")}
"#,
    );
    write(dir.path(), "fragile.yaml", "module: fragile\ntimeout_ms: 1500\nsettings:\n  api_key: from-manifest\n");
    let plugins = Plugins::load(&config(dir.path())).await.unwrap();
    let ok = call(&plugins, "fragile", json!({ "do": "ok" })).await.unwrap();
    assert_eq!(ok["key"], "from-manifest", "the plugin's own settings reach it");
    let first_pid = ok["pid"].clone();

    let crashed = call(&plugins, "fragile", json!({ "do": "crash" })).await.unwrap_err();
    assert!(matches!(crashed, PluginError::Crashed(_)), "{crashed}");
    let back = call(&plugins, "fragile", json!({ "do": "ok" })).await.unwrap();
    assert_ne!(back["pid"], first_pid, "a new process answers");

    let hung = call(&plugins, "fragile", json!({ "do": "hang" })).await.unwrap_err();
    assert_eq!(hung, PluginError::Timeout(Duration::from_millis(1500)));
    assert_eq!(call(&plugins, "fragile", json!({ "do": "ok" })).await.unwrap()["pid"], back["pid"]);

    let failed = call(&plugins, "fragile", json!({ "do": "fail" })).await.unwrap_err();
    assert!(failed.to_string().contains("the upstream API is down"), "{failed}");
    let big = call(&plugins, "fragile", json!({ "do": "big" })).await.unwrap_err();
    assert!(matches!(big, PluginError::OutputTooLarge { .. }), "{big}");
    let invalid = call(&plugins, "fragile", json!({ "do": "explode" })).await.unwrap_err();
    assert!(matches!(invalid, PluginError::InvalidArguments(_)), "{invalid}");
}

struct Echo;

#[async_trait]
impl Plugin for Echo {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "echo".into(),
            version: "1".into(),
            description: "says it back".into(),
            parameters: json!({ "type": "object", "properties": { "text": { "type": "string" } } }),
        }
    }

    async fn execute(&self, ctx: &Context) -> Result<Value, PluginError> {
        let text: String = ctx.get_param("text")?;
        Ok(json!({ "text": text, "user": ctx.user_id(), "session": ctx.session_id() }))
    }
}

#[tokio::test]
async fn a_rust_plugin_served_over_grpc_is_an_endpoint_plugin() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(crate::serve::serve_on(Arc::new(Echo), listener));
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "echo.yaml", &format!("endpoint: http://{addr}\nrequired: true\n"));
    let plugins = Plugins::load(&config(dir.path())).await.unwrap();
    let call = CallContext { session_id: "s9".into(), user_id: "bob".into(), request_id: String::new() };
    let answer = plugins.execute("echo", json!({ "text": "hi" }), call).await.unwrap();
    assert_eq!(answer, json!({ "text": "hi", "user": "bob", "session": "s9" }));
}

/// The HTTP JSON plugin against a local server standing in for the third-party API.
#[tokio::test]
async fn the_http_json_plugin_calls_the_configured_api_with_its_key() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 8192];
            let n = socket.read(&mut request).await.unwrap();
            let head = String::from_utf8_lossy(&request[..n]).into_owned();
            let body = if head.to_ascii_lowercase().contains("x-api-key: secret-key") {
                r#"{"data": {"city": "Paris", "temp": 21}}"#
            } else {
                r#"{"error": "no key"}"#
            };
            let status = if body.contains("error") { "401 Unauthorized" } else { "200 OK" };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(response.as_bytes()).await.unwrap();
            seen_tx.send(head.lines().next().unwrap_or_default().to_owned()).unwrap();
        }
    });
    let api = HttpJsonPluginConfig {
        name: "city_weather".into(),
        description: "weather by city".into(),
        url: format!("http://{addr}/v1/weather/{{city}}"),
        method: "GET".into(),
        parameters: json!({ "type": "object", "properties": { "city": { "type": "string" }, "units": { "type": "string" } }, "required": ["city"] }),
        auth_header: "X-Api-Key".into(),
        auth_scheme: String::new(),
        result_pointer: "/data".into(),
    };
    let mut config = PluginsConfig { builtin: vec![], http_json: vec![api], ..PluginsConfig::default() };
    config.settings.insert("city_weather".into(), BTreeMap::from([("api_key".into(), "secret-key".into())]));
    let plugins = Plugins::load(&config).await.unwrap();
    let answer = call(&plugins, "city_weather", json!({ "city": "Saint Étienne", "units": "metric" })).await.unwrap();
    assert_eq!(answer, json!({ "city": "Paris", "temp": 21 }));
    assert_eq!(seen.recv().await.unwrap(), "GET /v1/weather/Saint%20%C3%89tienne?units=metric HTTP/1.1");

    config.settings.clear();
    let keyless = Plugins::load(&config).await.unwrap();
    let refused = call(&keyless, "city_weather", json!({ "city": "Paris" })).await.unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
    assert!(format!("{config:?}").contains("http_json"));
}

#[test]
fn settings_are_never_printed() {
    let mut config = PluginsConfig::default();
    config.settings.insert("weather".into(), BTreeMap::from([("api_key".into(), "very-secret".into())]));
    assert!(!format!("{config:?}").contains("very-secret"));
    let settings = crate::Settings::new(BTreeMap::from([("api_key".into(), "very-secret".into())]));
    assert!(!format!("{:?}", Context::new(Default::default(), settings)).contains("very-secret"));
}
