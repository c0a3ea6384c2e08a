"""What a MoltBot plugin implements (`PluginBase`) and what it is given (`Context`)."""

import json
import os


class PluginLoadError(Exception):
    """A plugin that cannot be loaded; the message says why and what fixes it."""


class PluginError(Exception):
    """Raised by `execute` for a failure the caller should read (bad input, the upstream API down)."""


class Context:
    """One call: its parameters (already validated against the plugin's schema), the session and user it runs
    for, and the plugin's own settings."""

    def __init__(self, params=None, session_id="", user_id="", settings=None, request_id=""):
        self.params = dict(params or {})
        self.session_id = session_id
        self.user_id = user_id
        self.settings = dict(settings or {})
        self.request_id = request_id

    def get_param(self, name, default=None):
        """The parameter `name`, or `default` when the call does not give it."""
        return self.params.get(name, default)

    def get_setting(self, name, default=None):
        """The plugin's setting `name` (`plugins.settings.<plugin>.<name>` in MoltBot's configuration)."""
        return self.settings.get(name, default)


class PluginBase:
    """A plugin. Implement `get_plugin_info()` and `async execute(ctx)`; `__init__` takes no arguments."""

    @property
    def settings(self):
        """The plugin's settings from MoltBot's configuration, also available in `__init__`."""
        return json.loads(os.environ.get("MOLTBOT_PLUGIN_SETTINGS") or "{}")

    def get_plugin_info(self):
        """A dict: name, version, description, and parameters as a JSON Schema object."""
        raise NotImplementedError

    async def execute(self, ctx):
        """Runs the plugin once; returns a JSON-serialisable value."""
        raise NotImplementedError
