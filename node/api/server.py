"""Run the app on a TCP port: the one way the CLI and the tests serve it."""

from __future__ import annotations

from aiohttp import web


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Start serving `app` (port 0: any free port); returns the runner (call `cleanup()` to stop) and
    the base URL. Startup runs the app's cleanup contexts, so the engine is loaded on return.

    `handler_cancellation`: when a client disconnects, aiohttp cancels its handler; the cancellation
    leaves `engine.generate`, which aborts the request and frees its KV blocks.
    """
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    if ":" in bound_host:
        bound_host = f"[{bound_host}]"
    return runner, f"http://{bound_host}:{bound_port}"
