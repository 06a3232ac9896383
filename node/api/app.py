"""The app factory: every route, middleware and resource of the HTTP API is wired here."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from node.adapters.factory import adapter_manager
from node.api.accounting import attribution_info, model_terms, open_accounting, payer_info, sample_metrics
from node.api.adapters import resolve_limited
from node.api.errors import error_middleware
from node.api.generation import chat_completions, completions
from node.api.keys import (
    ACCOUNTANT,
    ADAPTERS,
    ENGINE,
    LOCAL_IPFS,
    LOOKUPS,
    METRICS,
    OPENAPI,
    PAYER_LOOKUPS,
    SETTINGS,
    STARTED_AT,
)
from node.api.lookups import LookupLimiter, PayerLookups
from node.api.metrics import Metrics, metrics_middleware
from node.api.openapi import build_openapi
from node.api.schemas import Health, ModelCard, ModelList
from node.config import Settings
from node.engine import AsyncEngine, Engine
from node.engine.prepare import served_base_shape
from node.engine.types import GenerationRequest, SamplingParams
from node.threads import run_in_fresh_thread

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> web.Application:
    """The node's HTTP API. Serve it with `node.api.server.start_server` (it cancels the handlers of
    clients that disconnect, which aborts their engine requests)."""
    # metrics_middleware is outermost, so it counts the status error_middleware settled on.
    app = web.Application(middlewares=[metrics_middleware, error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[OPENAPI] = build_openapi()
    app[LOOKUPS] = LookupLimiter(settings.model_lookups_per_s)
    app[PAYER_LOOKUPS] = PayerLookups(settings.model_lookups_per_s)
    app.cleanup_ctx.append(_local_ipfs)
    app.cleanup_ctx.append(_accounting)
    app.cleanup_ctx.append(_adapters)
    app.cleanup_ctx.append(_engine)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_get("/v1/attribution", attribution_info)
    app.router.add_get("/v1/attribution/payers/{payer}", payer_info)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app


async def _local_ipfs(app: web.Application) -> AsyncIterator[None]:
    """With no IPFS gateway configured, run a local IPFS node (Helia, or Kubo in docker-compose)
    for the node's lifetime, supervised (restarted if it dies), and fetch adapters through it."""
    settings = app[SETTINGS]
    if settings.ipfs_gateways or not settings.local_ipfs:
        yield
        return
    from node.adapters.ipfs import LocalIpfsNode
    from node.adapters.ipfs.supervisor import NodeSupervisor

    node = supervision = None
    running = await LocalIpfsNode.running_endpoints(settings.ipfs_repo)  # another `serve` over this cache dir
    if running:
        gateway, api = running["gateway"], running["api"]
        log.info("using the local IPFS node already running over %s: gateway %s", settings.ipfs_repo, gateway)
    else:
        node = LocalIpfsNode(settings.ipfs_repo)
        await asyncio.get_running_loop().run_in_executor(None, node.start)
        gateway, api = node.gateway_url, node.api_url
        log.info("local IPFS node: gateway %s, RPC %s (repo %s)", gateway, api, settings.ipfs_repo)
        app[LOCAL_IPFS] = supervisor = NodeSupervisor(node)
        app[METRICS].watch_local_ipfs(supervisor)
        supervision = asyncio.create_task(supervisor.run(), name="local-ipfs-supervisor")
    app[SETTINGS] = settings.model_copy(
        update={
            "ipfs_gateways": [gateway],
            "ipfs_api_url": settings.ipfs_api_url or api,
            "adapter_index": settings.adapter_index or settings.default_adapter_index,
        }
    )
    try:
        yield
    finally:
        if supervision is not None:
            supervision.cancel()
            await asyncio.gather(supervision, return_exceptions=True)
        if node is not None:
            await asyncio.get_running_loop().run_in_executor(None, node.stop)


async def _accounting(app: web.Application) -> AsyncIterator[None]:
    """With a chain configured: the accountant (signed requests, usage records, the journal) and the
    submitter that batches, commits and finalizes the journal's records, for the app's lifetime."""
    settings = app[SETTINGS]
    if settings.chain_rpc_url is None:
        yield
        return
    async with open_accounting(settings) as accountant:
        app[ACCOUNTANT] = accountant
        yield


async def _adapters(app: web.Application) -> AsyncIterator[None]:
    """The adapter manager over the configured sources (none configured: no manager, base model only).
    The node owns adapters (fetch, verify, validate); the engine is handed the manager."""
    settings = app[SETTINGS]
    # prepares the base model directory on first use (a torch conversion: in a thread of its own, node.threads)
    base = await asyncio.get_running_loop().run_in_executor(None, run_in_fresh_thread, served_base_shape, settings)
    accountant = app.get(ACCOUNTANT)  # with a chain, the AdapterRegistry is a source too, read through its ledger
    manager = adapter_manager(settings, base, accountant.ledger if accountant is not None else None)
    if manager is not None:
        app[ADAPTERS] = manager
        app[METRICS].watch_adapter_cache(manager.cache_stats)
    yield


async def _engine(app: web.Application) -> AsyncIterator[None]:
    """Our engine (the model loaded in an executor: it blocks) or vLLM's server (`--engine vllm`: started
    and supervised, or reached at `--engine-url`), handed the adapter manager; run for the app's lifetime."""
    settings = app[SETTINGS]
    adapters = app.get(ADAPTERS)
    engine: Engine
    if settings.engine == "vllm":
        from node.vllm.engine import VllmEngine  # its client and process supervision only where it is used

        engine = await VllmEngine.open(settings, adapters)
    else:
        load = functools.partial(AsyncEngine.load, settings, adapters=adapters)
        engine = await asyncio.get_running_loop().run_in_executor(None, load)
    await engine.start()
    app[ENGINE] = engine
    app[METRICS].watch_adapters(lambda: _adapter_stats(app))
    warm = await _warm_up(engine)
    app[METRICS].warmup_seconds.set(warm)
    app[STARTED_AT] = int(time.time())
    log.info("engine ready: %s (context %d tokens, warmed up in %.2f s)", engine.model_name, engine.max_model_len, warm)
    try:
        yield
    finally:
        await engine.close()  # not just stop: the app object may outlive its cleanup (AsyncEngine.close)


def _adapter_stats(app: web.Application) -> dict:
    """Adapter tiers and failures, for /metrics: the manager's host tier and the engine's device slots."""
    adapters = app.get(ADAPTERS)
    if adapters is None:
        return {"host": 0, "device": 0, "loads": 0, "device_loads": 0, "failures": {}}
    return {
        "host": adapters.num_loaded,
        "loads": adapters.loads,
        "failures": dict(adapters.failure_counts),
        **app[ENGINE].lora_stats(),
    }


async def _warm_up(engine: Engine) -> float:
    """One short greedy generation before the node serves (so before /health can say ok): the first
    forward passes pay one-time costs (oneDNN primitives, the OpenMP pool, first-touch memory), which
    made the first real request after start take 5-9 s with SmolLM2. Returns the seconds it took."""
    started = time.perf_counter()
    prompt = engine.tokenizer.encode("Hello, how are you?") or [0]
    request = GenerationRequest("warmup", prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    async for _ in engine.generate(request):
        pass
    return time.perf_counter() - started


async def _card(app: web.Application, name: str) -> ModelCard:
    return ModelCard(id=name, created=app[STARTED_AT], **await model_terms(app, name))


async def list_models(request: web.Request) -> web.Response:
    adapters = request.app.get(ADAPTERS)
    names = [request.app[ENGINE].model_name] + (await adapters.names() if adapters is not None else [])
    body = ModelList(data=[await _card(request.app, name) for name in names])
    return web.json_response(text=body.model_dump_json(exclude_none=True))


async def get_model(request: web.Request) -> web.Response:
    """The answer a generation request naming this model would get: an adapter is fetched, verified
    and validated as for one (404 if no source has it, 400 `adapter_invalid`, 503 while unavailable).
    Lookups that may cost the network or a load are rate-limited (429, `node/api/lookups.py`): this is public."""
    name = request.match_info["model"]
    engine = request.app[ENGINE]
    if name != engine.model_name:
        resolved = await resolve_limited(request.app, name)
        adapters = request.app[ADAPTERS]
        adapters.release(await adapters.acquire(resolved.key))
    return web.json_response(text=(await _card(request.app, name)).model_dump_json(exclude_none=True))


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    stats = engine.stats()
    supervisor = request.app.get(LOCAL_IPFS)
    ipfs = None if supervisor is None else ("ok" if supervisor.up else "down")
    status = "engine_stopped" if not engine.healthy else "degraded" if ipfs == "down" else "ok"
    body = Health(status=status, model=engine.model_name, running=stats["running"], waiting=stats["waiting"], ipfs=ipfs)
    return web.json_response(text=body.model_dump_json(), status=200 if engine.healthy else 503)


async def metrics(request: web.Request) -> web.Response:
    await sample_metrics(request.app)
    text = request.app[METRICS].render(request.app[ENGINE].stats())
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])
