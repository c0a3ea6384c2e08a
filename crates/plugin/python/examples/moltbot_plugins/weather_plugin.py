# The seed's example plugin, as the seed writes it, with the get_plugin_info() every plugin needs.
from moltbot.core import PluginBase, Context


class WeatherPlugin(PluginBase):
    def __init__(self):
        self.api_key = "your-weather-api"

    def get_plugin_info(self):
        return {
            "name": "weather",
            "version": "1.0.0",
            "description": "The current weather at a location.",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string", "description": "a city, e.g. Paris"}},
                "required": ["location"],
            },
        }

    async def execute(self, ctx: Context):
        location = ctx.get_param("location")
        # Call the weather API here (with self.api_key); the seed's answer stands in for it.
        return {"location": location, "temperature": 25, "condition": "sunny"}
