//! The host: loads every plugin at start-up and runs each call within the plugin's limits.

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use moltbot_config::PluginsConfig;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::{
    Calculator, Context, DateTime, HttpJson, LoadCause, Plugin, PluginError, PluginInfo, PluginLoadError, Settings,
    manifest::{self, Entry, Source},
    remote::{ProcessSpec, RemotePlugin},
};

/// The Python side of the plugin contract, written next to MoltBot's cache for its Python plugins, so they
/// need only `grpcio` (a `pip install` of `crates/plugin/python` gives the same package to other programs).
const PYTHON_SDK: &[(&str, &str)] = &[
    ("moltbot/__init__.py", include_str!("../python/moltbot/__init__.py")),
    ("moltbot/core.py", include_str!("../python/moltbot/core.py")),
    ("moltbot/plugin_host.py", include_str!("../python/moltbot/plugin_host.py")),
    ("moltbot/_wire.py", include_str!("../python/moltbot/_wire.py")),
];

/// Who a call runs for.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    pub session_id: String,
    pub user_id: String,
    pub request_id: String,
}

/// A plugin as `GET /api/plugins` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginStatus {
    pub name: String,
    pub version: String,
    pub description: String,
    pub parameters: Value,
    /// `builtin`, `python:<file>`, `command:<file>`, `endpoint:<url>` or `http_json:<url>`.
    pub source: String,
    #[serde(flatten)]
    pub state: PluginState,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PluginState {
    Ready,
    Disabled { reason: String },
}

/// Every plugin, ready or disabled.
#[derive(Default)]
pub struct Plugins {
    ready: BTreeMap<String, Loaded>,
    disabled: Vec<PluginStatus>,
}

struct Loaded {
    plugin: Arc<dyn Plugin>,
    info: PluginInfo,
    validator: Arc<jsonschema::Validator>,
    source: String,
    settings: Settings,
    timeout: Duration,
    permits: Arc<Semaphore>,
    max_output_bytes: usize,
}

impl Plugins {
    /// Loads the built-in plugins, the HTTP JSON ones and every plugin of `plugins.dir`, concurrently. A plugin
    /// that fails to load is disabled and logged, unless it is required: then this is its `PluginLoadError`.
    pub async fn load(config: &PluginsConfig) -> Result<Self, PluginLoadError> {
        let mut plugins = Self::default();
        let timeout = Duration::from_millis(config.timeout_ms);
        for name in &config.builtin {
            let plugin: Arc<dyn Plugin> = match name.as_str() {
                "calculator" => Arc::new(Calculator),
                "datetime" => Arc::new(DateTime),
                other => unreachable!("validated: {other}"),
            };
            plugins.add(config, plugin, "builtin".into(), Default::default(), None, None, true)?;
        }
        for api in &config.http_json {
            let source = format!("http_json:{}", api.url);
            let plugin = Arc::new(HttpJson::new(api.clone(), timeout));
            let settings = Settings::new(config.settings.get(&api.name).cloned().unwrap_or_default());
            plugins.add(config, plugin, source, settings, None, None, true)?;
        }
        if config.dir.as_os_str().is_empty() {
            return Ok(plugins);
        }
        let (entries, errors) = manifest::scan(&config.dir);
        for (required, e) in errors {
            plugins.refuse(config, required, e, "manifest".into())?;
        }
        let sdk = if entries.iter().any(|e| matches!(e.source, Source::Python { .. })) {
            Some(python_sdk().map_err(|detail| PluginLoadError {
                plugin: "*".into(),
                cause: LoadCause::StartFailed { detail, fix: "make MoltBot's cache directory writable".into() },
            })?)
        } else {
            None
        };
        let loads = entries.into_iter().map(|entry| {
            let spec = spec(config, &entry, sdk.as_deref());
            async move {
                let loaded = match (&entry.source, spec) {
                    (Source::Endpoint { url }, _) => RemotePlugin::connect(url).await,
                    (_, Some(spec)) => RemotePlugin::start(spec).await,
                    (_, None) => unreachable!("every started plugin has a spec"),
                };
                (entry, loaded)
            }
        });
        for (entry, loaded) in futures::future::join_all(loads).await {
            let required = entry.required || config.required.contains(&entry.name);
            let source = match &entry.source {
                Source::Python { .. } => format!("python:{}", entry.path.display()),
                Source::Command { .. } => format!("command:{}", entry.path.display()),
                Source::Endpoint { url } => format!("endpoint:{url}"),
            };
            match loaded {
                Ok(plugin) => {
                    let mut settings = entry.settings.clone();
                    for key in [&entry.name, &plugin.info().name] {
                        settings.extend(config.settings.get(key).cloned().unwrap_or_default());
                    }
                    let (timeout, concurrency) = (entry.timeout, entry.max_concurrency);
                    let settings = Settings::new(settings);
                    plugins.add(config, Arc::new(plugin), source, settings, timeout, concurrency, required)?;
                }
                Err(cause) => {
                    plugins.refuse(config, required, PluginLoadError { plugin: entry.name, cause }, source)?
                }
            }
        }
        Ok(plugins)
    }

    /// Adds a plugin after checking its information; a bad one is refused like one that did not load.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        config: &PluginsConfig,
        plugin: Arc<dyn Plugin>,
        source: String,
        settings: Settings,
        timeout: Option<Duration>,
        concurrency: Option<usize>,
        required: bool,
    ) -> Result<(), PluginLoadError> {
        let info = plugin.info();
        let refuse = |cause| PluginLoadError { plugin: info.name.clone(), cause };
        let checked = check(&info, &self.ready).map_err(refuse);
        let validator = checked.and_then(|()| {
            if info.parameters.get("type").and_then(Value::as_str) != Some("object") {
                let detail = "the schema must describe an object (\"type\": \"object\")".into();
                return Err(refuse(LoadCause::InvalidSchema { detail }));
            }
            jsonschema::validator_for(&info.parameters)
                .map_err(|e| refuse(LoadCause::InvalidSchema { detail: e.to_string() }))
        });
        match validator {
            Ok(validator) => {
                tracing::info!(plugin = %info.name, %source, "plugin loaded");
                let loaded = Loaded {
                    plugin,
                    info: info.clone(),
                    validator: Arc::new(validator),
                    source,
                    settings,
                    timeout: timeout.unwrap_or(Duration::from_millis(config.timeout_ms)),
                    permits: Arc::new(Semaphore::new(concurrency.unwrap_or(config.max_concurrency).max(1))),
                    max_output_bytes: config.max_output_bytes,
                };
                self.ready.insert(info.name, loaded);
                Ok(())
            }
            Err(e) => self.refuse(config, required, e, source),
        }
    }

    fn refuse(
        &mut self,
        config: &PluginsConfig,
        required: bool,
        e: PluginLoadError,
        source: String,
    ) -> Result<(), PluginLoadError> {
        if required || config.required.contains(&e.plugin) {
            return Err(e);
        }
        tracing::error!("{e} (the plugin is disabled)");
        self.disabled.push(PluginStatus {
            name: e.plugin.clone(),
            version: String::new(),
            description: String::new(),
            parameters: Value::Null,
            source,
            state: PluginState::Disabled { reason: e.to_string() },
        });
        Ok(())
    }

    /// Every plugin, the ready ones first, each group by name.
    pub fn list(&self) -> Vec<PluginStatus> {
        let ready = self.ready.values().map(|l| PluginStatus {
            name: l.info.name.clone(),
            version: l.info.version.clone(),
            description: l.info.description.clone(),
            parameters: l.info.parameters.clone(),
            source: l.source.clone(),
            state: PluginState::Ready,
        });
        ready.chain(self.disabled.iter().cloned()).collect()
    }

    /// Runs `name` with `arguments` (a JSON object, validated against its schema first), within its timeout,
    /// concurrency limit and output cap.
    pub async fn execute(&self, name: &str, arguments: Value, call: CallContext) -> Result<Value, PluginError> {
        let Some(loaded) = self.ready.get(name) else {
            return Err(match self.disabled.iter().find(|d| d.name == name) {
                Some(PluginStatus { state: PluginState::Disabled { reason }, .. }) => {
                    PluginError::Disabled { name: name.into(), reason: reason.clone() }
                }
                _ => PluginError::NotFound(name.into()),
            });
        };
        let Value::Object(arguments) = arguments else {
            return Err(PluginError::InvalidArguments("the arguments must be a JSON object".into()));
        };
        let instance = Value::Object(arguments);
        let problems: Vec<String> = loaded
            .validator
            .iter_errors(&instance)
            .take(3)
            .map(|e| match e.instance_path().to_string() {
                path if path.is_empty() => e.to_string(),
                path => format!("{path}: {e}"),
            })
            .collect();
        if !problems.is_empty() {
            return Err(PluginError::InvalidArguments(problems.join("; ")));
        }
        let Value::Object(arguments) = instance else { unreachable!("an object above") };
        let deadline = tokio::time::Instant::now() + loaded.timeout;
        let _permit = tokio::time::timeout_at(deadline, loaded.permits.acquire())
            .await
            .map_err(|_| PluginError::Timeout(loaded.timeout))?
            .expect("the semaphore is never closed");
        let ctx = Context {
            arguments,
            session_id: call.session_id,
            user_id: call.user_id,
            request_id: call.request_id,
            settings: loaded.settings.clone(),
        };
        let result = tokio::time::timeout_at(deadline, loaded.plugin.execute(&ctx))
            .await
            .map_err(|_| PluginError::Timeout(loaded.timeout))??;
        let bytes = serde_json::to_vec(&result).map_or(usize::MAX, |b| b.len());
        if bytes > loaded.max_output_bytes {
            return Err(PluginError::OutputTooLarge { bytes, limit: loaded.max_output_bytes });
        }
        Ok(result)
    }
}

/// A name OpenAI's function calling accepts, not taken by another plugin.
fn check(info: &PluginInfo, taken: &BTreeMap<String, Loaded>) -> Result<(), LoadCause> {
    let valid = !info.name.is_empty()
        && info.name.len() <= 64
        && info.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(LoadCause::InvalidInfo {
            detail: format!("the name `{}` is not 1 to 64 letters, digits, `_` or `-`", info.name),
            fix: "give it such a name (models call plugins by it)".into(),
        });
    }
    if let Some(other) = taken.get(&info.name) {
        return Err(LoadCause::InvalidInfo {
            detail: format!("the name `{}` is already taken by {}", info.name, other.source),
            fix: "rename one of the two".into(),
        });
    }
    Ok(())
}

/// How to start a plugin of the directory (`None` for an endpoint).
fn spec(config: &PluginsConfig, entry: &Entry, sdk: Option<&Path>) -> Option<ProcessSpec> {
    let dir = config.dir.canonicalize().unwrap_or_else(|_| config.dir.clone());
    let settings = entry.settings.iter().chain(config.settings.get(&entry.name).into_iter().flatten());
    let settings = serde_json::to_string(&settings.collect::<BTreeMap<_, _>>()).expect("strings are JSON");
    match &entry.source {
        Source::Endpoint { .. } => None,
        Source::Command { argv } => Some(ProcessSpec {
            name: entry.name.clone(),
            argv: argv.clone(),
            env: vec![("MOLTBOT_PLUGIN_SETTINGS".into(), settings)],
            cwd: dir,
            start_fix: format!(
                "run `{}` by hand to see why, or correct `command` in {}",
                argv.join(" "),
                entry.path.display()
            ),
            python: None,
        }),
        Source::Python { module } => {
            let parent = dir.parent().unwrap_or(&dir).to_owned();
            let mut path = vec![sdk.expect("written for Python plugins").to_owned(), dir.clone(), parent];
            path.extend(
                std::env::var_os("PYTHONPATH")
                    .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                    .unwrap_or_default(),
            );
            let pythonpath = std::env::join_paths(path).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
            Some(ProcessSpec {
                name: entry.name.clone(),
                argv: vec![config.python.clone(), "-m".into(), "moltbot.plugin_host".into(), module.clone()],
                env: vec![("PYTHONPATH".into(), pythonpath), ("MOLTBOT_PLUGIN_SETTINGS".into(), settings)],
                cwd: dir.clone(),
                start_fix: format!(
                    "check that `{}` runs (plugins.python) and run the module by hand to see why",
                    config.python
                ),
                python: Some((config.python.clone(), dir.display().to_string())),
            })
        }
    }
}

/// Writes the bundled Python package (once per version) and returns the directory to put on PYTHONPATH.
fn python_sdk() -> Result<std::path::PathBuf, String> {
    let root = moltbot_config::cache_dir().join("python-sdk").join(env!("CARGO_PKG_VERSION"));
    for (file, text) in PYTHON_SDK {
        let path = root.join(file);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(*text) {
            continue;
        }
        let dir = path.parent().expect("a file in a folder");
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Written aside and renamed: a plugin starting meanwhile never imports half a file.
        let partial = path.with_extension(format!("partial{}", std::process::id()));
        std::fs::write(&partial, text).map_err(|e| format!("{}: {e}", partial.display()))?;
        std::fs::rename(&partial, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(root)
}
