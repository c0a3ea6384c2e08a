//! The plugin directory: what each file in it is.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{LoadCause, PluginLoadError};

/// How a plugin of the directory is reached.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Source {
    /// A Python module or package of the directory, served by the `moltbot` package's plugin host.
    Python { module: String },
    /// A program that serves `moltbot.plugin.v1` on the socket MoltBot gives it.
    Command { argv: Vec<String> },
    /// A plugin server that runs on its own.
    Endpoint { url: String },
}

/// One plugin of the directory, before it is loaded.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The file's stem, or the manifest's `name`: how load errors and settings name it before it says its own.
    pub name: String,
    pub path: PathBuf,
    pub source: Source,
    pub required: bool,
    pub timeout: Option<Duration>,
    pub max_concurrency: Option<usize>,
    pub settings: BTreeMap<String, String>,
}

/// A `*.yaml` file of the directory.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Manifest {
    name: Option<String>,
    /// A Python module of the directory (e.g. `weather_plugin` for `weather_plugin.py`).
    module: Option<String>,
    /// A program and its arguments, relative to the directory unless absolute.
    command: Option<Vec<String>>,
    /// `http://host:port` of a running plugin server.
    endpoint: Option<String>,
    settings: BTreeMap<String, String>,
    required: bool,
    timeout_ms: Option<u64>,
    max_concurrency: Option<usize>,
}

/// Every plugin in `dir`: `*.yaml` manifests, then the `*.py` modules and package folders no manifest names.
/// Files whose names start with `_` or `.` are not plugins (`__init__.py`, `__pycache__`).
pub(crate) fn scan(dir: &Path) -> (Vec<Entry>, Vec<(bool, PluginLoadError)>) {
    let (mut entries, mut errors) = (vec![], vec![]);
    let listing = match std::fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) => {
            let cause = LoadCause::Manifest {
                path: dir.display().to_string(),
                detail: format!("the plugin directory cannot be read: {e}"),
                fix: "create it, or set plugins.dir to the directory that holds the plugins".into(),
            };
            errors.push((true, PluginLoadError { plugin: "*".into(), cause }));
            return (entries, errors);
        }
    };
    let mut paths: Vec<PathBuf> = listing.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let stem = |p: &Path| p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
    let hidden = |p: &Path| stem(p).starts_with(['_', '.']);
    let mut claimed = BTreeSet::new();
    for path in paths.iter().filter(|p| !hidden(p) && matches!(extension(p), "yaml" | "yml")) {
        match manifest(dir, path) {
            Ok(entry) => {
                if let Source::Python { module } = &entry.source {
                    claimed.insert(module.clone());
                }
                entries.push(entry);
            }
            Err((required, e)) => errors.push((required, e)),
        }
    }
    for path in paths.iter().filter(|p| !hidden(p)) {
        let module = stem(path);
        let python =
            (path.is_file() && extension(path) == "py") || (path.is_dir() && path.join("__init__.py").is_file());
        if python && !claimed.contains(&module) {
            entries.push(Entry {
                name: module.clone(),
                path: path.clone(),
                source: Source::Python { module },
                required: false,
                timeout: None,
                max_concurrency: None,
                settings: BTreeMap::new(),
            });
        }
    }
    (entries, errors)
}

fn extension(path: &Path) -> &str {
    path.extension().and_then(|e| e.to_str()).unwrap_or_default()
}

fn manifest(dir: &Path, path: &Path) -> Result<Entry, (bool, PluginLoadError)> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
    let invalid = |detail: String, fix: &str, required: bool| {
        let cause = LoadCause::Manifest { path: path.display().to_string(), detail, fix: fix.into() };
        (required, PluginLoadError { plugin: stem.clone(), cause })
    };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string(), "make the file readable", false))?;
    let m: Manifest = serde_yaml::from_str(&text).map_err(|e| {
        invalid(
            e.to_string(),
            "keep to the keys name, module, command, endpoint, settings, required, timeout_ms, max_concurrency",
            false,
        )
    })?;
    let one_of = "give exactly one of `module` (a Python module of the directory), `command` (a program that \
                  serves moltbot.plugin.v1) and `endpoint` (a running plugin server's http://host:port)";
    let source = match (m.module, m.command, m.endpoint) {
        (Some(module), None, None) => Source::Python { module },
        (None, Some(argv), None) if !argv.is_empty() => {
            let mut argv = argv;
            let program = Path::new(&argv[0]);
            if program.components().count() > 1 && program.is_relative() {
                argv[0] = dir.join(program).display().to_string();
            }
            Source::Command { argv }
        }
        (None, None, Some(url)) if url.starts_with("http://") || url.starts_with("https://") => {
            Source::Endpoint { url }
        }
        _ => return Err(invalid("it names no single way to reach the plugin".into(), one_of, m.required)),
    };
    Ok(Entry {
        name: m.name.unwrap_or(stem),
        path: path.to_owned(),
        source,
        required: m.required,
        timeout: m.timeout_ms.map(Duration::from_millis),
        max_concurrency: m.max_concurrency,
        settings: m.settings,
    })
}
