//! MoltBot's plugins (S8): what a plugin is, the plugins built into MoltBot, and the host that loads the plugin
//! directory and runs every call within its limits.
//!
//! A plugin mirrors the seed's `PluginBase`: [`Plugin::info`] is `get_plugin_info()` (a name, a version, a
//! description and its parameters as a JSON Schema) and [`Plugin::execute`] is `async execute(ctx)`, returning
//! JSON. The same shape crosses a process boundary as the `moltbot.plugin.v1` gRPC contract: the Python package
//! in `python/` serves a `PluginBase` class with it, [`serve`] serves a Rust plugin, and [`Plugins`] starts such
//! processes from the plugin directory, supervises them and calls them.

mod builtin;
mod context;
mod error;
mod host;
mod manifest;
mod remote;
pub mod serve;

pub use async_trait::async_trait;
pub use builtin::{Calculator, DateTime, HttpJson};
pub use context::{Context, Settings};
pub use error::{LoadCause, PluginError, PluginLoadError};
pub use host::{CallContext, PluginState, PluginStatus, Plugins};

/// What a plugin is and what it takes: the seed's `get_plugin_info()`, and an OpenAI function's description.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    /// The parameters as a JSON Schema object; the arguments of every call are validated against it first.
    pub parameters: serde_json::Value,
}

/// A plugin: MoltBot's `PluginBase`.
#[async_trait]
pub trait Plugin: Send + Sync + 'static {
    fn info(&self) -> PluginInfo;

    /// Runs once with validated arguments. An `Err` is shown to the model or the user as the call's error.
    async fn execute(&self, ctx: &Context) -> Result<serde_json::Value, PluginError>;
}

#[cfg(test)]
mod tests;
