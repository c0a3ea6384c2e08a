//! What goes wrong with plugins: at load (`PluginLoadError`, the seed's name) and in a call (`PluginError`).

use std::time::Duration;

/// A plugin that could not be loaded: which one, why, and what fixes it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("PluginLoadError: plugin `{plugin}`: {cause}")]
pub struct PluginLoadError {
    pub plugin: String,
    pub cause: LoadCause,
}

/// Why a plugin did not load. Every message ends with the fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoadCause {
    #[error(
        "Module not found: `{module}` cannot be imported from the plugin directory {dir}. Fix: put the plugin's \
         file (or package folder) in plugins.dir, which MoltBot puts on the plugin's PYTHONPATH, or correct the \
         module name in its manifest"
    )]
    ModuleNotFound { module: String, dir: String },
    #[error(
        "a dependency is missing: {detail}. Fix: install it for the interpreter that runs plugins (`{python} -m \
         pip install {package}`), or set plugins.python to one that has it"
    )]
    MissingDependency { detail: String, package: String, python: String },
    #[error(
        "the module defines no plugin class. Fix: define a class that derives from moltbot.core.PluginBase and \
         implements get_plugin_info() and async execute(ctx)"
    )]
    NoPluginClass,
    #[error(
        "`{class}` does not implement get_plugin_info(). Fix: add get_plugin_info(self) returning a dict with \
         name, version, description and parameters (a JSON Schema object)"
    )]
    NoPluginInfo { class: String },
    #[error("its information is not usable: {detail}. Fix: {fix}")]
    InvalidInfo { detail: String, fix: String },
    #[error(
        "its parameters are not a valid JSON Schema: {detail}. Fix: make `parameters` a JSON Schema object, e.g. \
         {{\"type\": \"object\", \"properties\": {{\"location\": {{\"type\": \"string\"}}}}, \"required\": [\"location\"]}}"
    )]
    InvalidSchema { detail: String },
    #[error(
        "the endpoint {endpoint} does not answer: {detail}. Fix: start the plugin's server, or correct `endpoint` \
         in its manifest"
    )]
    Unreachable { endpoint: String, detail: String },
    #[error("the plugin failed while starting: {detail}. Fix: {fix}")]
    StartFailed { detail: String, fix: String },
    #[error("its manifest {path} is invalid: {detail}. Fix: {fix}")]
    Manifest { path: String, detail: String, fix: String },
}

/// A call that did not give a result. The model or the user sees the message as the call's error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginError {
    #[error("no plugin is called `{0}`")]
    NotFound(String),
    #[error("the plugin `{name}` is disabled: {reason}")]
    Disabled { name: String, reason: String },
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    #[error("{0}")]
    Failed(String),
    #[error("the plugin did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the plugin's process stopped during the call ({0}); it is restarted for the next call")]
    Crashed(String),
    #[error("the plugin's result is {bytes} bytes, over the limit of {limit} (plugins.max_output_bytes)")]
    OutputTooLarge { bytes: usize, limit: usize },
}

impl PluginError {
    /// A short, stable name for the kind of failure (API error codes, logs).
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "plugin_not_found",
            Self::Disabled { .. } => "plugin_disabled",
            Self::InvalidArguments(_) => "invalid_arguments",
            Self::Failed(_) => "plugin_failed",
            Self::Timeout(_) => "plugin_timeout",
            Self::Crashed(_) => "plugin_crashed",
            Self::OutputTooLarge { .. } => "plugin_output_too_large",
        }
    }
}
