//! What a plugin sees of a call.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::PluginError;

/// One call: its arguments (validated against the plugin's schema), whose conversation and user it runs for, and
/// the plugin's own settings.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub(crate) arguments: Map<String, Value>,
    pub(crate) session_id: String,
    pub(crate) user_id: String,
    pub(crate) request_id: String,
    pub(crate) settings: Settings,
}

impl Context {
    pub fn new(arguments: Map<String, Value>, settings: Settings) -> Self {
        Self { arguments, settings, ..Self::default() }
    }

    /// The parameter `name` as a `T` (the seed's `ctx.get_param("location")`); a missing parameter or one of
    /// another type is the caller's error.
    pub fn get_param<T: DeserializeOwned>(&self, name: &str) -> Result<T, PluginError> {
        let value = self
            .arguments
            .get(name)
            .ok_or_else(|| PluginError::InvalidArguments(format!("the parameter `{name}` is missing")))?;
        serde_json::from_value(value.clone())
            .map_err(|e| PluginError::InvalidArguments(format!("the parameter `{name}`: {e}")))
    }

    /// The parameter `name` when it is given.
    pub fn param(&self, name: &str) -> Option<&Value> {
        self.arguments.get(name)
    }

    pub fn arguments(&self) -> &Map<String, Value> {
        &self.arguments
    }

    /// The conversation the call belongs to; empty outside a session.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// The user it runs for; empty for the anonymous user.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The plugin's setting `key` (`plugins.settings.<plugin>.<key>`, e.g. an API key).
    pub fn setting(&self, key: &str) -> Option<&str> {
        self.settings.get(key)
    }
}

/// A plugin's settings: configured for it alone, and never printed (they hold API keys).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Settings(BTreeMap<String, String>);

impl Settings {
    pub fn new(values: BTreeMap<String, String>) -> Self {
        Self(values)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// As the JSON object a plugin process receives.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).expect("a map of strings is JSON")
    }
}

impl std::fmt::Debug for Settings {
    /// The keys only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}
