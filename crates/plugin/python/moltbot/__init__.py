"""MoltBot's Python plugin SDK: derive from `moltbot.core.PluginBase`, put the module in MoltBot's plugin
directory (`plugins.dir`), and MoltBot serves it with `python -m moltbot.plugin_host MODULE`."""
