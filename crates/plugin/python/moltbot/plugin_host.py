"""Serves one `PluginBase` plugin over MoltBot's moltbot.plugin.v1 gRPC contract.

    python -m moltbot.plugin_host MODULE              # on $MOLTBOT_PLUGIN_SOCKET (MoltBot starts it so)
    python -m moltbot.plugin_host MODULE --listen 127.0.0.1:7001   # a plugin server of its own (an endpoint)

The first line on stdout is {"ready": true}, or {"error": {"kind": ..., "message": ...}} when the plugin cannot be
loaded; MoltBot turns the latter into a PluginLoadError that names the fix.
"""

import asyncio
import inspect
import importlib
import json
import os
import sys
import traceback


def _hello(**message):
    print(json.dumps(message), flush=True)


def _fail(kind, message, **extra):
    _hello(error={"kind": kind, "message": message, **extra})
    sys.exit(2)


try:
    import grpc
except ImportError as e:  # before anything else: without grpcio nothing can be served
    _fail("missing_dependency", str(e), module="grpc")

from moltbot import _wire
from moltbot.core import Context, PluginBase, PluginError

SERVICE = "moltbot.plugin.v1.Plugin"


def load(module_name):
    """Imports the module and instantiates its plugin class, or reports why it cannot."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            _fail("module_not_found", str(e), module=module_name)
        _fail("missing_dependency", str(e), module=(e.name or "").split(".")[0])
    except ImportError as e:
        _fail("missing_dependency", str(e), module=(e.name or "").split(".")[0])
    except Exception:
        _fail("import_failed", "importing it raised: " + traceback.format_exc(limit=4))
    classes = [
        c
        for c in vars(module).values()
        if inspect.isclass(c) and issubclass(c, PluginBase) and c is not PluginBase
        and c.__module__.startswith(module.__name__)
    ]
    if not classes:
        _fail("no_plugin_class", f"{module_name} defines no subclass of moltbot.core.PluginBase")
    cls = classes[0]
    if not any("get_plugin_info" in vars(k) for k in cls.__mro__ if k is not PluginBase):
        _fail("no_plugin_info", f"{cls.__name__} has no get_plugin_info()", **{"class": cls.__name__})
    try:
        plugin = cls()
    except Exception:
        _fail("init_failed", f"{cls.__name__}() raised: " + traceback.format_exc(limit=4))
    try:
        info = plugin.get_plugin_info()
    except Exception:
        _fail("invalid_info", "get_plugin_info() raised: " + traceback.format_exc(limit=4))
    if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not info["name"]:
        _fail("invalid_info", f"get_plugin_info() returned {info!r}, not a dict with a name")
    return plugin, info


def handlers(plugin, info):
    parameters = info.get("parameters") or {"type": "object"}
    described = _wire.encode({
        1: info["name"],
        2: str(info.get("version", "")),
        3: str(info.get("description", "")),
        4: json.dumps(parameters),
    })

    async def info_rpc(request, context):
        return described

    async def execute_rpc(request, context):
        fields = _wire.decode(request)
        try:
            ctx = Context(
                params=json.loads(fields.get(1) or "{}"),
                session_id=fields.get(2, ""),
                user_id=fields.get(3, ""),
                settings=json.loads(fields.get(4) or "{}"),
                request_id=fields.get(5, ""),
            )
            result = plugin.execute(ctx)
            if inspect.isawaitable(result):
                result = await result
            return _wire.encode({1: json.dumps(result)})
        except PluginError as e:
            return _wire.encode({2: str(e) or type(e).__name__})
        except (TypeError, ValueError) as e:
            traceback.print_exc()
            return _wire.encode({2: f"{type(e).__name__}: {e}"})
        except Exception as e:
            traceback.print_exc()
            return _wire.encode({2: f"the plugin raised {type(e).__name__}: {e}"})

    same = dict(request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Info": grpc.unary_unary_rpc_method_handler(info_rpc, **same),
        "Execute": grpc.unary_unary_rpc_method_handler(execute_rpc, **same),
    })


async def serve(plugin, info, address):
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers(plugin, info),))
    if not server.add_insecure_port(address):
        _fail("start_failed", f"cannot listen on {address}")
    await server.start()
    _hello(ready=True, name=info["name"])
    await server.wait_for_termination()


def main(argv):
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        sys.exit(64)
    module, address = argv[0], os.environ.get("MOLTBOT_PLUGIN_SOCKET", "")
    if len(argv) == 3 and argv[1] == "--listen":
        address = argv[2]
    if not address:
        _fail("start_failed", "no address: set MOLTBOT_PLUGIN_SOCKET or pass --listen HOST:PORT")
    plugin, info = load(module)
    asyncio.run(serve(plugin, info, address))


if __name__ == "__main__":
    main(sys.argv[1:])
